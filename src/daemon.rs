//! `run`: opens the store, serves the admin socket, starts the pipelines and shuts all of
//! it down cleanly on SIGTERM/SIGINT (SPEC §2.10).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::admin::{self, Status};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::opencti::connector_state::{self, ConnectorState};
use crate::opencti::graphql::{ConnectorRegistration, GraphqlClient};
use crate::opencti::registration;
use crate::opencti::stream::{StreamClient, StreamConfig, StreamError};
use crate::pipeline::import::{ImportConfig, Importer};
use crate::pipeline::intake::Intake;
use crate::pipeline::reconcile::{ReconcileConfig, Reconciler};
use crate::pipeline::snapshot::{SnapshotConfig, Snapshots};
use crate::pipeline::stream::{ReaderConfig, StreamReader, DEFAULT_AUTH_RETRY};
use crate::pipeline::to_bus::{ToBus, ToBusConfig};
use crate::pipeline::to_opencti::{ToOpenCti, ToOpenCtiConfig};
use crate::retry::RetryPolicy;
use crate::store::damage::{open_checked, DamageReport, Opened};
use crate::store::disk_space::{DiskSpace, Room};
use crate::store::{Queue, Store, StoreError, StoreOptions};
use crate::threatbus::{Link, LinkConfig, LinkState};

mod disk_wait;

pub fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bridge")
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(run_async(config));
    // Dropping the runtime would wait for every blocking task: one stuck in a store that
    // cannot write (its close timed out above) must not keep the process, and sled's lock,
    // alive.
    runtime.shutdown_timeout(RUNTIME_STOP_TIMEOUT);
    result
}

/// How long blocking tasks get once the daemon is done (they are all finished in a
/// clean shutdown).
const RUNTIME_STOP_TIMEOUT: Duration = Duration::from_secs(2);

pub fn store_options(config: &Config) -> StoreOptions {
    StoreOptions {
        flush_interval: config.bridge.flush_interval,
        flush_max_items: config.bridge.flush_max_items,
        cache_bytes: config.bridge.cache_mb * 1024 * 1024,
    }
}

/// Store meta key of the Threat Bus subscription (p2p topic) this bridge holds: Threat Bus
/// never expires subscriptions, so one left by a crash is unsubscribed at the next start.
const META_BUS_TOPIC: &str = "threatbus_topic";
/// SPEC §2.10: exit within 10 s of SIGTERM. The tasks get most of it, the link the rest.
const TASK_STOP_TIMEOUT: Duration = Duration::from_secs(5);

async fn run_async(config: Config) -> anyhow::Result<()> {
    let mut signals = Signals::install()?;
    for key in &config.unknown_keys {
        tracing::warn!(key = %key, "unknown configuration key ignored (a typo?)");
    }
    let data_dir = config.bridge.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let Some((store, damage)) = disk_wait::open_store_when_room(&config, &mut signals).await?
    else {
        return Ok(());
    };
    let status = Arc::new(Status::default());
    let metrics = Arc::new(Metrics::default());
    match &damage {
        None => status.set("store", "open"),
        Some(report) => {
            metrics.store_rebuilds.inc();
            metrics.store_damage_lost.add(report.lost());
            status.set(
                "store",
                format!(
                    "rebuilt after damage ({}); the damaged store is kept in {}; lost {} sightings, {} imports and {} dead letters",
                    report.reason,
                    report.moved_to.display(),
                    report.held.sightings,
                    report.held.imports.unwrap_or(0),
                    report.held.dead
                ),
            );
        }
    }
    let listener = admin::bind(&data_dir)?;
    let (reconcile_tx, reconcile_rx) = mpsc::unbounded_channel();
    let admin_task = tokio::spawn(admin::serve(
        listener,
        Arc::clone(&store),
        Arc::clone(&status),
        admin::Daemon {
            reconcile: Some(reconcile_tx.clone()),
        },
    ));
    let metrics_task = start_metrics(&config, &metrics, &store).await?;

    let (shutdown_tx, shutdown) = watch::channel(false);
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let disk = Arc::new(DiskSpace::new(&data_dir, config.bridge.min_free_bytes));
    tasks.spawn(watch_disk(
        shutdown.clone(),
        Arc::clone(&disk),
        Arc::clone(&status),
        Arc::clone(&metrics),
    ));

    // Threat Bus link, and the topic bookkeeping that survives a crash.
    let stale_topic = store.meta(META_BUS_TOPIC)?;
    let mut link_config = LinkConfig::from_config(&config.threatbus, stale_topic);
    // A subscription attempt is one request at a time: each failure is a probe of Threat
    // Bus, and `bridge.probe_max_ms` bounds how long its return goes unnoticed.
    link_config.retry_max = link_config.retry_max.min(config.bridge.probe_max);
    link_config.retry_initial = link_config.retry_initial.min(link_config.retry_max);
    let (link, incoming) = Link::start(link_config)?;
    tasks.spawn(track_topic(
        shutdown.clone(),
        link.state(),
        Arc::clone(&store),
        Arc::clone(&status),
        Arc::clone(&metrics),
    ));

    let (echo_tx, echo_rx) = mpsc::unbounded_channel();
    let (snapshot_tx, snapshot_rx) = mpsc::unbounded_channel();
    let intake = Intake::new(
        Arc::clone(&store),
        incoming,
        echo_tx,
        snapshot_tx,
        config.bridge.sighting_queue_limit,
        Arc::clone(&metrics),
    )
    .with_import(config.threatbus.import_indicators)
    .with_disk_space(Arc::clone(&disk));
    let stop = shutdown.clone();
    tasks.spawn(async move { Ok(intake.run(stop).await?) });
    tasks.spawn(write_checkpoints(shutdown.clone(), Arc::clone(&store)));

    let to_bus = ToBus::new(
        Arc::clone(&store),
        link.publisher(),
        link.state(),
        echo_rx,
        ToBusConfig {
            window: config.bridge.inflight_window,
            confirm: config.threatbus.confirm_delivery,
            confirm_timeout: config.bridge.confirm_timeout,
            max_attempts: config.bridge.max_attempts,
            retry: RetryPolicy::from_config(&config.bridge),
        },
        Arc::clone(&status),
        Arc::clone(&metrics),
    );
    let stop = shutdown.clone();
    tasks.spawn(async move { Ok(to_bus.run(stop).await?) });

    let snapshots = Snapshots::new(
        Arc::clone(&store),
        link.publisher(),
        link.state(),
        snapshot_rx,
        SnapshotConfig {
            rate: config.threatbus.snapshot_rate,
        },
        Arc::clone(&status),
        Arc::clone(&metrics),
    );
    let stop = shutdown.clone();
    tasks.spawn(async move { Ok(snapshots.run(stop).await?) });

    // The reader publishes its position for the pings; ping answers that show a reset or
    // another state in OpenCTI come back to it.
    let (reader_state, ping_state) = connector_state::channel(ConnectorState {
        start_from: String::new(),
        recover_until: None,
    });
    let reader = StreamReader::new(
        stream_client(&config)?,
        Arc::clone(&store),
        reader_config(&config),
        Arc::clone(&status),
        Arc::clone(&metrics),
    )?
    .with_reconcile(reconcile_tx)
    .with_connector_state(reader_state)
    .with_disk_space(Arc::clone(&disk));
    let stop = shutdown.clone();
    tasks.spawn(async move { Ok(reader.run(stop).await?) });

    let graphql = Arc::new(GraphqlClient::new(&config.opencti)?);
    let reconciler = Reconciler::new(
        Arc::clone(&store),
        Arc::clone(&graphql),
        ReconcileConfig {
            forward_all_iocs: config.connector.forward_all_iocs,
            retry: RetryPolicy::from_config(&config.bridge),
        },
        reconcile_rx,
        Arc::clone(&status),
        Arc::clone(&metrics),
    );
    let stop = shutdown.clone();
    tasks.spawn(async move { Ok(reconciler.run(stop).await?) });
    // Runs even with import off: it drains what an earlier run with import on queued.
    let importer = Importer::new(
        Arc::clone(&store),
        Arc::clone(&graphql),
        ImportConfig {
            max_attempts: config.bridge.max_attempts,
            retry: RetryPolicy::from_config(&config.bridge),
            auth_retry: DEFAULT_AUTH_RETRY,
        },
        Arc::clone(&status),
        Arc::clone(&metrics),
    );
    let stop = shutdown.clone();
    tasks.spawn(async move { Ok(importer.run(stop).await?) });
    let to_opencti = ToOpenCti::new(
        Arc::clone(&store),
        Arc::clone(&graphql),
        ToOpenCtiConfig {
            concurrency: config.bridge.opencti_concurrency,
            max_attempts: config.bridge.max_attempts,
            retry: RetryPolicy::from_config(&config.bridge),
            probe: RetryPolicy::probe(&config.bridge),
            auth_retry: DEFAULT_AUTH_RETRY,
            confidence: config.connector.confidence_level,
            entity_name: config.connector.entity_name.clone(),
            entity_description: config.connector.entity_description.clone(),
        },
        Arc::clone(&status),
        Arc::clone(&metrics),
    );
    let stop = shutdown.clone();
    tasks.spawn(async move { Ok(to_opencti.run(stop).await?) });
    let stop = shutdown.clone();
    let registration_status = Arc::clone(&status);
    let retry = RetryPolicy::from_config(&config.bridge);
    let connector = ConnectorRegistration::from_config(&config.connector);
    let ping_interval = config.connector.ping_interval;
    tasks.spawn(async move {
        registration::run(
            graphql,
            connector,
            ping_state,
            ping_interval,
            retry,
            registration_status,
            stop,
        )
        .await;
        Ok(())
    });

    // Run until a signal, or until a task fails (only the store can make one fail).
    let outcome = tokio::select! {
        signal = signals.recv() => { tracing::info!(signal, "shutting down"); Ok(()) }
        Some(done) = tasks.join_next() => match done {
            Ok(Ok(())) => Err(anyhow::anyhow!("a pipeline task ended unexpectedly")),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(anyhow::anyhow!("a pipeline task panicked: {e}")),
        },
    };
    if let Err(error) = &outcome {
        // Said before anything stops, so that `health` reports it while the daemon exits.
        // The reader's and the intake's errors wrap a StoreError transparently (it is then
        // not in the chain itself): its text tells.
        let disk_full = error.chain().any(|e| {
            e.downcast_ref::<StoreError>()
                .is_some_and(StoreError::is_disk_full)
                || e.to_string().contains("No space left on device")
        });
        if disk_full {
            tracing::error!(
                %error,
                dir = %data_dir.display(),
                "DISK FULL: the store cannot write any more (sled refuses every write after a failed one \
                 until it is opened again); exiting. The next start opens the store, delivers what it holds \
                 and reads the stream only once there is room again (bridge.min_free_mb)"
            );
            status.set_unhealthy("store", Some(format!("disk full, exiting: {error}")));
        } else {
            status.set_unhealthy("daemon", Some(format!("exiting: {error:#}")));
        }
    }
    let _ = shutdown_tx.send(true);
    if tokio::time::timeout(TASK_STOP_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!("pipeline tasks did not stop in time; aborting them");
        tasks.abort_all();
    }
    match link.shutdown().await {
        Some(left) => {
            let _ = store.set_meta(META_BUS_TOPIC, &left);
        }
        None => {
            let _ = store.remove_meta(META_BUS_TOPIC);
        }
    }
    admin_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    let _ = std::fs::remove_file(admin::socket_path(&data_dir));
    let closing = tokio::task::spawn_blocking(move || {
        store.close()?;
        // Only now are the exact claims true: nothing writes to the store any more.
        store.write_closed_checkpoint()
    });
    // Never alive and idle: a store that cannot finish its last flush (a full disk) must
    // not keep the process, and sled's lock, around. What was not flushed is read again.
    let closed = match tokio::time::timeout(STORE_CLOSE_TIMEOUT, closing).await {
        Ok(joined) => joined
            .context("closing the store")?
            .map_err(anyhow::Error::from),
        Err(_) => Err(anyhow::anyhow!(
            "closing the store did not finish within {}s",
            STORE_CLOSE_TIMEOUT.as_secs()
        )),
    };
    match (outcome, closed) {
        (Ok(()), Ok(())) => {
            tracing::info!("store flushed; bye");
            Ok(())
        }
        (Ok(()), Err(e)) => Err(e),
        (Err(e), closed) => {
            if let Err(close_error) = closed {
                tracing::error!(error = %close_error, "closing the store failed too");
            }
            Err(e)
        }
    }
}

/// How long the last flush at exit may take. A healthy flush takes milliseconds; this
/// only bounds a store that cannot write.
const STORE_CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Keeps the free-space gauge and the `disk` line of `health` current; below the sighting
/// floor the daemon is unhealthy (it drops sightings). Ends only at shutdown.
async fn watch_disk(
    mut shutdown: watch::Receiver<bool>,
    disk: Arc<DiskSpace>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let mb = crate::config::MB;
    loop {
        let reading = disk.free();
        let room = disk.room();
        if let Some(free) = reading {
            metrics
                .disk_free_bytes
                .set(i64::try_from(free).unwrap_or(i64::MAX));
            status.set(
                "disk",
                format!(
                    "{} MB free (stream pauses below {} MB, sightings dropped below {} MB)",
                    free / mb,
                    disk.min_free() / mb,
                    disk.sighting_floor() / mb
                ),
            );
        }
        match room {
            Room::Critical { free } => status.set_unhealthy(
                "disk",
                Some(format!(
                    "disk full: {} MB free < {} MB: the stream is paused and sightings are dropped",
                    free / mb,
                    disk.sighting_floor() / mb
                )),
            ),
            _ => status.set_unhealthy("disk", None),
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
            _ = tokio::time::sleep(crate::store::disk_space::REFRESH) => {}
        }
    }
}

/// Hands the heap the open-time counting scans freed back to the OS. The scans read every
/// record once; glibc keeps what they freed (in the arenas of the blocking threads) as RSS
/// for the life of the process: 1,000,000 queued indicators with a 32 MiB cache, 273 MB
/// RSS after start without this, 221 MB with it. Once, at start.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own arenas to the OS.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn open_store(config: &Config) -> anyhow::Result<(Arc<Store>, Option<DamageReport>)> {
    let options = store_options(config);
    let dir = config.bridge.data_dir.clone();
    let policy = config.bridge.on_damaged_store;
    let Opened { store, damage } =
        tokio::task::spawn_blocking(move || open_checked(&dir, &options, policy))
            .await
            .context("opening the store")??;
    release_freed_heap();
    if let Some(report) = &damage {
        // Once, loudly: what was lost cannot be recovered by the bridge.
        tracing::error!(
            reason = %report.reason,
            moved_to = %report.moved_to.display(),
            resume_from = %report.resume_text(),
            indicators_read_again = report.held.indicators,
            lost_sightings = report.held.sightings,
            lost_imports = report.held.imports.unwrap_or(0),
            lost_dead_letters = report.held.dead,
            as_of = report.as_of.as_deref().unwrap_or("unknown (no checkpoint file)"),
            "DAMAGED STORE: moved aside and replaced by a fresh one; the stream is read again from the \
             checkpoint so every undelivered indicator is delivered; the queued sightings, imports and dead \
             letters it held are lost to the bridge (the moved store is kept for salvage)"
        );
    }
    tracing::info!(
        path = %store.path().display(),
        indicators = store.len(Queue::Indicators),
        sightings = store.len(Queue::Sightings),
        dead = store.dead_len(),
        position = ?store.position()?,
        "store open"
    );
    Ok((Arc::new(store), damage))
}

/// The longest a stream event waits for others to be committed with (never longer than
/// `bridge.flush_interval_ms`). Batching a steady stream saves a store write and a
/// hand-off to Threat Bus per event; 5 ms leaves room in a 15 ms p99 at 500 events/s for
/// Threat Bus's own relay (its p99 ~9 ms there), where 10 ms did not (`cargo bench
/// --bench e2e -- latency`: p99 ~12 ms against ~18 ms, for ~15 % more CPU).
const STREAM_LINGER: Duration = Duration::from_millis(5);

/// How often the checkpoint file is brought up to date. It may lag: an older watermark only
/// means reading more of the stream again after a damage; each write costs a flush and two
/// fsyncs, and an idle bridge writes nothing.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Keeps `{data_dir}/checkpoint.json` current until shutdown (the clean close writes the
/// last one). A failed write is logged and retried: the store itself is fine.
async fn write_checkpoints(
    mut shutdown: watch::Receiver<bool>,
    store: Arc<Store>,
) -> anyhow::Result<()> {
    let mut last = None;
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
            _ = tokio::time::sleep(CHECKPOINT_INTERVAL) => {}
        }
        let writer = Arc::clone(&store);
        let previous = last.clone();
        match tokio::task::spawn_blocking(move || writer.write_checkpoint(previous.as_ref())).await
        {
            Ok(Ok(written)) => last = Some(written),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "writing the checkpoint file failed; retrying")
            }
            Err(e) => tracing::warn!(error = %e, "the checkpoint writer failed; retrying"),
        }
    }
}

async fn start_metrics(
    config: &Config,
    metrics: &Arc<Metrics>,
    store: &Arc<Store>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if !config.connector.expose_metrics {
        return Ok(None);
    }
    let port = config.connector.metrics_port;
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .with_context(|| {
            format!("listening for metrics on port {port} (connector.metrics_port)")
        })?;
    tracing::info!(port, "serving Prometheus metrics on /metrics");
    Ok(Some(tokio::spawn(crate::metrics::serve(
        listener,
        Arc::clone(metrics),
        Arc::clone(store),
    ))))
}

fn stream_client(config: &Config) -> Result<StreamClient, StreamError> {
    let mut client = StreamClient::new(&StreamConfig::from_config(config))?;
    client.set_max_event_bytes(config.bridge.max_event_bytes);
    Ok(client)
}

fn reader_config(config: &Config) -> ReaderConfig {
    ReaderConfig {
        forward_all_iocs: config.connector.forward_all_iocs,
        indicator_limit: config.bridge.indicator_queue_limit,
        stream_timeout: config.connector.stream_timeout,
        live: config.connector.live_stream_id.is_some(),
        first_start_from: config
            .connector
            .live_stream_start_timestamp
            .clone()
            .unwrap_or_else(|| "0-0".into()),
        first_start_recover: config.connector.live_stream_recover_iso_date.clone(),
        // One connection at a time: every failed connection is a probe of OpenCTI.
        retry: RetryPolicy::probe(&config.bridge),
        auth_retry: DEFAULT_AUTH_RETRY,
        linger: config.bridge.flush_interval.min(STREAM_LINGER),
    }
}

/// Persists the current Threat Bus topic, logs link state changes, counts resubscriptions.
async fn track_topic(
    mut shutdown: watch::Receiver<bool>,
    mut state: watch::Receiver<LinkState>,
    store: Arc<Store>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let mut subscribed_once = false;
    loop {
        let current = state.borrow_and_update().clone();
        match &current {
            LinkState::Ready { topic, generation } => {
                // Durable before anything else: a crash must not leak the subscription.
                store.set_meta(META_BUS_TOPIC, topic)?.wait().await?;
                if subscribed_once {
                    metrics.bus_resubscriptions.inc();
                }
                subscribed_once = true;
                tracing::info!(generation, "subscribed to Threat Bus");
                status.set("threatbus", "ready");
            }
            LinkState::Connecting => status.set("threatbus", "connecting"),
            LinkState::Down { reason } => {
                tracing::warn!(%reason, "Threat Bus link down");
                status.set("threatbus", format!("down: {reason}"));
            }
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
            changed = state.changed() => if changed.is_err() { return Ok(()) },
        }
    }
}

/// SIGTERM and SIGINT, caught from the very start: a signal that arrives while the store
/// opens must still mean a clean shutdown, not the default instant death.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
