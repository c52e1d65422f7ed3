//! Counters the daemon keeps (SPEC §7), exposed through the Prometheus project's own client
//! (`prometheus-client`) when enabled: it owns the metric types, the text formats, the
//! histogram layout and the escaping of help texts and label values.
//!
//! The rest of the daemon sees only [`Metrics`] and its small [`Counter`] / [`Histogram`]
//! handles; which library renders them stays inside this file.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter as PromCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram as PromHistogram;
use prometheus_client::registry::{Registry, Unit};

use crate::store::{Queue, Store};

/// Every exported name starts with this (`opencti_threatbus_…`).
const PREFIX: &str = "opencti_threatbus";

/// `Content-Type` of the OpenMetrics 1.0 text format, served when the scraper asks for it.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the Prometheus text format 0.0.4, served otherwise (curl, old scrapers).
pub const TEXT_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A monotonically increasing count. A thin handle over the client's counter so that the
/// pipelines keep one small API (`inc`, `add`, `get`) whatever renders it.
#[derive(Debug, Clone, Default)]
pub struct Counter(PromCounter);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.inc_by(n);
    }
    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

/// A value that goes up and down. A thin handle like [`Counter`].
#[derive(Debug, Clone, Default)]
pub struct GaugeValue(Gauge<i64, std::sync::atomic::AtomicI64>);

impl GaugeValue {
    pub fn set(&self, value: i64) {
        self.0.set(value);
    }
    pub fn get(&self) -> i64 {
        self.0.get()
    }
}

/// Upper bounds (seconds) of the delivery-latency buckets: from a quick local delivery to
/// an item that waited out an outage of an hour.
const LATENCY_BUCKETS_S: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0, 3600.0,
];

/// A fn pointer (not a closure) so that the family's type can be named in a struct field.
fn latency_histogram() -> PromHistogram {
    PromHistogram::new(LATENCY_BUCKETS_S)
}

/// Delivery latency: receipt by the bridge → confirmed delivery.
#[derive(Debug, Clone)]
pub struct Histogram {
    inner: PromHistogram,
    /// The client exposes its own count only to its tests; kept here for [`Histogram::count`].
    count: Counter,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::from(latency_histogram())
    }
}

impl From<PromHistogram> for Histogram {
    fn from(inner: PromHistogram) -> Self {
        Histogram {
            inner,
            count: Counter::default(),
        }
    }
}

impl Histogram {
    pub fn observe_ms(&self, ms: u64) {
        self.inner.observe(ms as f64 / 1000.0);
        self.count.inc();
    }

    /// Observes the latency of an item received at `received_at_ms`.
    pub fn observe_since(&self, received_at_ms: u64) {
        self.observe_ms(crate::store::now_ms().saturating_sub(received_at_ms));
    }

    pub fn count(&self) -> u64 {
        self.count.get()
    }
}

/// The one label of the per-queue metrics: `queue="indicators"`, `"sightings"` or `"dead"`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: &'static str,
}

impl QueueLabel {
    fn of(queue: Queue) -> Self {
        QueueLabel {
            queue: queue.name(),
        }
    }
}

const DEAD: QueueLabel = QueueLabel { queue: "dead" };

/// The `state` label of the catalog gauge: `active` or `removed`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

type CounterFamily = Family<QueueLabel, PromCounter>;
type LatencyFamily = Family<QueueLabel, PromHistogram, fn() -> PromHistogram>;

/// The labelled families the per-queue handles belong to: one family per metric name, so
/// that the exposition has one `# HELP`/`# TYPE` block per name with a sample per queue.
#[derive(Debug)]
struct Families {
    received: CounterFamily,
    delivered: CounterFamily,
    retried: CounterFamily,
    dead: CounterFamily,
    dropped: CounterFamily,
    latency: LatencyFamily,
}

impl Default for Families {
    fn default() -> Self {
        Families {
            received: Family::default(),
            delivered: Family::default(),
            retried: Family::default(),
            dead: Family::default(),
            dropped: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
        }
    }
}

impl Families {
    /// The handles of one queue: clones share the family's value, so a pipeline's `inc()`
    /// is one atomic add, with no family lock on the hot path.
    fn queue(&self, queue: Queue) -> QueueCounters {
        let label = QueueLabel::of(queue);
        QueueCounters {
            latency: Histogram::from(self.latency.get_or_create_owned(&label)),
            received: Counter(self.received.get_or_create_owned(&label)),
            delivered: Counter(self.delivered.get_or_create_owned(&label)),
            retried: Counter(self.retried.get_or_create_owned(&label)),
            dead: Counter(self.dead.get_or_create_owned(&label)),
            dropped: Counter(self.dropped.get_or_create_owned(&label)),
        }
    }
}

#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Receipt → confirmed delivery.
    pub latency: Histogram,
    pub received: Counter,
    pub delivered: Counter,
    pub retried: Counter,
    pub dead: Counter,
    pub dropped: Counter,
}

#[derive(Debug)]
pub struct Metrics {
    pub indicators: QueueCounters,
    pub sightings: QueueCounters,
    /// Indicators from other Threat Bus apps, imported into OpenCTI.
    pub imports: QueueCounters,
    pub stream_events: Counter,
    pub stream_reconnects: Counter,
    pub stream_gaps: Counter,
    /// Failed connections in a row at the same stream position, failing the same way.
    pub stream_repeated_failures: GaugeValue,
    /// Free bytes on the data directory's filesystem, as last read (see
    /// [`crate::store::disk_space`]).
    pub disk_free_bytes: GaugeValue,
    /// 1 while the stream reader is paused because the disk is nearly full.
    pub stream_paused_disk: GaugeValue,
    pub bus_resubscriptions: Counter,
    /// Snapshot requests received from Threat Bus (both kinds).
    pub snapshot_requests: Counter,
    /// Indicator snapshot requests answered to the end.
    pub snapshots_answered: Counter,
    /// Indicators sent in snapshot answers.
    pub snapshot_indicators: Counter,
    /// Reconciliation passes finished (after a replay, or asked for by `reconcile`).
    pub reconcile_runs: Counter,
    /// Active catalog indicators looked up in OpenCTI by reconciliation.
    pub reconcile_checked: Counter,
    /// `REMOVE`s queued by reconciliation for indicators OpenCTI no longer has.
    pub reconcile_removed: Counter,
    /// Reconciliation `REMOVE`s not sent: the stream changed the indicator after the
    /// lookup (its newer word wins).
    pub reconcile_overtaken: Counter,
    /// Imported indicators that added nothing to what OpenCTI holds (no write).
    pub imports_unchanged: Counter,
    /// Indicators from Threat Bus not imported: the bridge's own echoes, `REMOVE`s,
    /// revoked ones.
    pub imports_skipped: Counter,
    /// Damaged stores moved aside and rebuilt at start (`bridge.on_damaged_store: rebuild`).
    pub store_rebuilds: Counter,
    /// Queued sightings and dead letters lost with a damaged store (the stream cannot give
    /// them back; indicators are read again).
    pub store_damage_lost: Counter,
    families: Families,
}

impl Default for Metrics {
    fn default() -> Self {
        let families = Families::default();
        Metrics {
            indicators: families.queue(Queue::Indicators),
            sightings: families.queue(Queue::Sightings),
            imports: families.queue(Queue::Imports),
            stream_events: Counter::default(),
            stream_reconnects: Counter::default(),
            stream_gaps: Counter::default(),
            stream_repeated_failures: GaugeValue::default(),
            disk_free_bytes: GaugeValue::default(),
            stream_paused_disk: GaugeValue::default(),
            bus_resubscriptions: Counter::default(),
            snapshot_requests: Counter::default(),
            snapshots_answered: Counter::default(),
            snapshot_indicators: Counter::default(),
            reconcile_runs: Counter::default(),
            reconcile_checked: Counter::default(),
            reconcile_removed: Counter::default(),
            reconcile_overtaken: Counter::default(),
            imports_unchanged: Counter::default(),
            imports_skipped: Counter::default(),
            store_rebuilds: Counter::default(),
            store_damage_lost: Counter::default(),
            families,
        }
    }
}

impl Metrics {
    pub fn queue(&self, queue: Queue) -> &QueueCounters {
        match queue {
            Queue::Indicators => &self.indicators,
            Queue::Sightings => &self.sightings,
            Queue::Imports => &self.imports,
        }
    }

    pub fn received(&self, queue: Queue, n: u64) {
        self.queue(queue).received.add(n);
    }

    /// Prometheus text exposition format, version 0.0.4.
    pub fn render(&self, store: &Store) -> String {
        let mut out = String::new();
        let encoded =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry(store));
        log_encode_error(encoded);
        out
    }

    /// OpenMetrics 1.0 text: counters' `# TYPE` lines name the family without `_total`
    /// (the samples keep it), units get a `# UNIT` line, and it ends in `# EOF`.
    pub fn render_openmetrics(&self, store: &Store) -> String {
        let mut out = String::new();
        let encoded = prometheus_client::encoding::text::encode(&mut out, &self.registry(store));
        log_encode_error(encoded);
        out
    }

    /// Everything one scrape exports. Built per scrape, because the gauges are read from the
    /// store at that moment (and the stream lag exists only once there is a position); the
    /// counters and histograms are shared handles, so registering them again costs a clone.
    /// Counters are registered without `_total`: both encoders append it to the samples.
    fn registry(&self, store: &Store) -> Registry {
        let mut r = Registry::with_prefix(PREFIX);
        let f = &self.families;
        for (name, help, family) in [
            ("received", "Items written to the outbox", &f.received),
            (
                "delivered",
                "Items confirmed delivered and removed from the outbox",
                &f.delivered,
            ),
            (
                "retried",
                "Failed delivery attempts that will be retried",
                &f.retried,
            ),
            ("dead", "Items moved to the dead letters", &f.dead),
            (
                "dropped",
                "Items dropped because the outbox was full",
                &f.dropped,
            ),
        ] {
            r.register(name, help, family.clone());
        }

        let depth = Family::<QueueLabel, Gauge<u64, AtomicU64>>::default();
        for queue in Queue::ALL {
            depth
                .get_or_create(&QueueLabel::of(queue))
                .set(store.len(queue));
        }
        depth.get_or_create(&DEAD).set(store.dead_len());
        r.register("queue_depth", "Items waiting in the outbox", depth);

        let size = store.catalog_size();
        let catalog = Family::<StateLabel, Gauge<u64, AtomicU64>>::default();
        catalog
            .get_or_create(&StateLabel { state: "active" })
            .set(size.active);
        catalog
            .get_or_create(&StateLabel { state: "removed" })
            .set(size.total.saturating_sub(size.active));
        r.register(
            "catalog_indicators",
            "Indicators in the catalog of what was sent to Threat Bus (active: tools match them)",
            catalog,
        );

        let now = crate::store::now_ms();
        let ages = Family::<QueueLabel, Gauge<f64, AtomicU64>>::default();
        for queue in Queue::ALL {
            // A store read error shows as 0 rather than failing the whole scrape.
            let age_ms = store
                .oldest_received_ms(queue)
                .ok()
                .flatten()
                .map_or(0, |t| now.saturating_sub(t));
            ages.get_or_create(&QueueLabel::of(queue))
                .set(age_ms as f64 / 1000.0);
        }
        r.register_with_unit(
            "queue_oldest_age",
            "Age of the oldest item waiting in the outbox",
            Unit::Seconds,
            ages,
        );

        // A stream id starts with its time in ms: now minus that is how far behind the bridge
        // reads. Without a position there is nothing to be behind, so no sample at all.
        let position_ms = store
            .position()
            .ok()
            .flatten()
            .and_then(|p| p.split_once('-').and_then(|(ms, _)| ms.parse::<u64>().ok()));
        if let Some(ms) = position_ms {
            let lag = Gauge::<f64, AtomicU64>::default();
            lag.set(now.saturating_sub(ms) as f64 / 1000.0);
            r.register_with_unit(
                "stream_lag",
                "Now minus the time of the stored stream position",
                Unit::Seconds,
                lag,
            );
        }

        r.register(
            "stream_repeated_failures",
            "Failed stream connections in a row at the same position, failing the same way \
             (0 once the position moves)",
            self.stream_repeated_failures.0.clone(),
        );
        r.register_with_unit(
            "disk_free",
            "Free space on the data directory's filesystem (bridge.min_free_mb pauses the stream below it)",
            Unit::Bytes,
            self.disk_free_bytes.0.clone(),
        );
        r.register(
            "stream_paused_disk",
            "1 while the stream reader is paused because the data directory's disk is nearly full",
            self.stream_paused_disk.0.clone(),
        );

        r.register_with_unit(
            "delivery_latency",
            "From receipt by the bridge to confirmed delivery",
            Unit::Seconds,
            f.latency.clone(),
        );

        for (name, help, counter) in [
            (
                "stream_events",
                "SSE events read from OpenCTI",
                &self.stream_events,
            ),
            (
                "stream_reconnects",
                "Reconnections to the OpenCTI stream",
                &self.stream_reconnects,
            ),
            (
                "stream_gaps",
                "Times the stored position was older than the oldest retained event",
                &self.stream_gaps,
            ),
            (
                "threatbus_resubscriptions",
                "Subscriptions to Threat Bus after the first",
                &self.bus_resubscriptions,
            ),
            (
                "snapshot_requests",
                "Snapshot requests received from Threat Bus (indicators and sightings)",
                &self.snapshot_requests,
            ),
            (
                "snapshots_answered",
                "Indicator snapshot requests answered to the end",
                &self.snapshots_answered,
            ),
            (
                "snapshot_indicators",
                "Indicators sent in snapshot answers",
                &self.snapshot_indicators,
            ),
            (
                "reconcile_runs",
                "Reconciliation passes finished (after a replay, or on request)",
                &self.reconcile_runs,
            ),
            (
                "reconcile_checked",
                "Active catalog indicators looked up in OpenCTI by reconciliation",
                &self.reconcile_checked,
            ),
            (
                "reconcile_removed",
                "REMOVEs queued for indicators OpenCTI deleted, revoked, merged or no longer detects",
                &self.reconcile_removed,
            ),
            (
                "reconcile_overtaken",
                "Reconciliation REMOVEs not sent: the stream changed the indicator after the lookup",
                &self.reconcile_overtaken,
            ),
            (
                "imports_unchanged",
                "Indicators from other Threat Bus apps that added nothing to OpenCTI (no write)",
                &self.imports_unchanged,
            ),
            (
                "imports_skipped",
                "Indicators from Threat Bus not imported (the bridge's own echoes, REMOVEs, revoked)",
                &self.imports_skipped,
            ),
            (
                "store_rebuilds",
                "Damaged stores moved aside and rebuilt from the stream at start",
                &self.store_rebuilds,
            ),
            (
                "store_damage_lost",
                "Queued sightings and dead letters lost with a damaged store",
                &self.store_damage_lost,
            ),
        ] {
            r.register(name, help, counter.0.clone());
        }
        r
    }
}

/// Encoding into a `String` cannot fail on I/O; an error would be a metric the format cannot
/// express. The scrape then gets what was written so far, and the log says why.
fn log_encode_error(result: std::fmt::Result) {
    if let Err(e) = result {
        tracing::warn!(error = %e, "encoding the metrics failed; the scrape is incomplete");
    }
}

/// Which text format the scraper asked for in its `Accept` header: OpenMetrics when it
/// prefers `application/openmetrics-text` (version 1.0.0, or no version) over the Prometheus
/// text format, as Prometheus does; the 0.0.4 text format otherwise, also when there is no
/// `Accept` header at all (curl, a browser, an old scraper).
fn wants_openmetrics(head: &str) -> bool {
    let Some(accept) = head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("accept").then_some(value)
    }) else {
        return false;
    };
    let (mut openmetrics, mut text) = (0.0_f64, 0.0_f64);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let (mut q, mut version) = (1.0_f64, None);
        for param in parts {
            match param.split_once('=') {
                Some((k, v)) if k.trim().eq_ignore_ascii_case("q") => {
                    q = v.trim().parse().unwrap_or(0.0);
                }
                Some((k, v)) if k.trim().eq_ignore_ascii_case("version") => {
                    version = Some(v.trim().to_string());
                }
                _ => {}
            }
        }
        match media.as_str() {
            "application/openmetrics-text" if version.as_deref().is_none_or(|v| v == "1.0.0") => {
                openmetrics = openmetrics.max(q);
            }
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    openmetrics > 0.0 && openmetrics > text
}

/// A request head longer than this is refused: a scraper sends a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Serves `GET /metrics` on `listener` until the task is dropped, in the text format the
/// scraper asks for (see [`wants_openmetrics`]).
/// Hand-rolled on purpose: one fixed endpoint does not warrant an HTTP server dependency.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
    store: std::sync::Arc<Store>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let (metrics, store) = (
            std::sync::Arc::clone(&metrics),
            std::sync::Arc::clone(&store),
        );
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &metrics, &store).await {
                tracing::debug!(error = %e, "metrics request failed");
            }
        });
    }
}

async fn answer(
    mut stream: tokio::net::TcpStream,
    metrics: &Metrics,
    store: &Store,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let request_line = String::from_utf8_lossy(&head);
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let (status, content_type, body) =
        if request_line.starts_with("GET ") && (path == "/metrics" || path == "/") {
            if wants_openmetrics(&request_line) {
                (
                    "200 OK",
                    OPENMETRICS_CONTENT_TYPE,
                    metrics.render_openmetrics(store),
                )
            } else {
                ("200 OK", TEXT_CONTENT_TYPE, metrics.render(store))
            }
        } else {
            (
                "404 Not Found",
                "text/plain; charset=utf-8",
                "only GET /metrics is served here\n".to_string(),
            )
        };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests;
