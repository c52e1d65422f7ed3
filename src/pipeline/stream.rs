//! OpenCTI stream → indicator outbox.
//!
//! One connection at a time; every event is mapped ([`crate::stix`]) and written to the
//! store, the new resume position after its items ([`Checkpoint`] decides
//! how far the position may move). Events that arrive back to back are committed together,
//! so a busy stream costs one store write per burst, not per event.

use std::cmp::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::checkpoint::{Checkpoint, EventRole};
use super::outage::{Failure, OutageLog};
use super::reconcile::{ReconcileRequest, META_RECONCILE_PENDING};
use crate::admin::Status;
use crate::metrics::Metrics;
use crate::opencti::connector_state::{self, ConnectorState, ReaderSide, StateRequest};
use crate::opencti::stream::compare_event_ids as compare_ids;
use crate::opencti::stream::{
    parse_connected, EventStream, PoisonEvent, SseEvent, StreamClient, StreamError,
};
use crate::retry::Backoff;
use crate::stix::{self, StreamAction};
use crate::store::disk_space::{DiskSpace, Room, CATALOG_DISK_FACTOR};
use crate::store::{Commit, Queue, Store, StoreError};

/// Events committed together at most: bounds the work lost to a crash mid-burst and the
/// memory of one batch, while keeping store writes rare on a busy stream.
const MAX_BATCH_EVENTS: usize = 512;
/// How long to wait between checks of a full indicator outbox.
const FULL_OUTBOX_POLL: Duration = Duration::from_millis(100);
/// 401/403/410 will not fix themselves in a second: retry slowly, never in a tight loop.
pub const DEFAULT_AUTH_RETRY: Duration = Duration::from_secs(60);
/// Failed connections in a row at one position, failing the same way, before it is logged
/// as an error: two can be chance (a restart, a proxy's idle cut), three is a pattern. The
/// error is logged again each time the count doubles, so it is never silent and never a
/// flood.
const REPEATED_FAILURE_ALERT: u32 = 3;

#[derive(Debug, Clone)]
pub struct ReaderConfig {
    pub forward_all_iocs: bool,
    pub indicator_limit: u64,
    pub stream_timeout: Duration,
    /// A live stream (`/stream/{id}`) honours `recover`; the raw `/stream` does not.
    pub live: bool,
    /// First start only: `Last-Event-ID` (pycti: live_stream_start_timestamp, default 0-0).
    pub first_start_from: String,
    /// First start only: the recover date (pycti: live_stream_recover_iso_date, default now).
    pub first_start_recover: Option<String>,
    pub retry: crate::retry::RetryPolicy,
    /// Delay after 401/403/410 ([`DEFAULT_AUTH_RETRY`]).
    pub auth_retry: Duration,
    /// How long an incomplete batch waits for more events before it is committed (the
    /// daemon uses `bridge.flush_interval_ms`: the same bound on how long a write waits to
    /// become durable); zero commits before every wait.
    pub linger: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    /// The store failed: nothing can be recorded, so the reader stops (the daemon exits 1).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where and how the next connection starts.
struct Resume {
    last_event_id: String,
    recover: Option<String>,
}

/// Why a connection ended.
enum Outcome {
    /// The stream ended or failed: reconnect after the backoff delay.
    Failed(StreamError),
    /// The stream timed out (no heartbeat): reconnect.
    Silent,
    /// A gap was found on a live stream: reconnect at once in recover mode.
    Recover,
    /// Asked to stop.
    Shutdown,
    /// The connector state was reset or changed in OpenCTI: reconnect from this state.
    Restart(ConnectorState),
}

/// Store meta key of the recover date in force. A replay (first start, or after a gap) sends
/// `<updated_at>-0` ids that are database times, not stream ids: resuming from one without
/// `recover` would read the raw stream from that time instead of finishing the replay. So,
/// like pycti, every connection sends the recover date until the position has passed it.
pub(crate) const META_RECOVER_UNTIL: &str = crate::store::RECOVER_UNTIL_META;
/// Store meta key of when the replay in force started (ms since the epoch, wall clock):
/// catalog entries recorded before it and not since were not refreshed by the replay, and
/// are what reconciliation checks once it has finished.
pub(crate) const META_RECOVER_STARTED: &str = "stream_recover_started_ms";

/// Consecutive failures at one position, the same way (see [`REPEATED_FAILURE_ALERT`]).
struct Repeated {
    position: String,
    kind: &'static str,
    count: u32,
}

pub struct StreamReader {
    recover_until: Option<String>,
    /// The failures in a row at the current position; `None` once it moves.
    repeated: Option<Repeated>,
    /// OpenCTI unreachable: one warning per outage, not per attempt.
    unreachable: OutageLog,
    client: StreamClient,
    store: Arc<Store>,
    config: ReaderConfig,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    checkpoint: Checkpoint,
    /// Told when a replay has finished (gap reconciliation); none in tests that run the
    /// reader alone.
    reconcile: Option<mpsc::UnboundedSender<ReconcileRequest>>,
    /// The state pings carry to OpenCTI, and what their answers ask for.
    connector_state: ReaderSide,
    /// The free-space watermark (`bridge.min_free_mb`); none in tests that run the reader
    /// alone.
    disk: Option<Arc<DiskSpace>>,
    /// The indicators queued when the reader last paused for disk space, while the disk
    /// stays low (see [`StreamReader::wait_for_disk`]).
    disk_cap: Option<u64>,
    /// The mean size of the indicator items written, for the disk reserve of their catalog
    /// entries (see [`crate::store::disk_space`]).
    item_bytes: MeanItemBytes,
}

/// Until the reader has written anything: a typical indicator as the stream sends it
/// (issue 8 measured 1.4 KiB; with the envelope's fields, rounded up).
const DEFAULT_ITEM_BYTES: u64 = 2048;

/// A running mean that follows the stream's recent items (each burst weighs 1/8), so a
/// change in what OpenCTI sends shows within a few bursts.
struct MeanItemBytes(u64);

impl MeanItemBytes {
    fn add_burst(&mut self, items: &[Vec<u8>]) {
        if items.is_empty() {
            return;
        }
        let total: usize = items.iter().map(Vec::len).sum();
        let burst = (total / items.len()) as u64;
        self.0 = (self.0 * 7 + burst) / 8;
    }
}

/// What one burst of events adds to the store.
#[derive(Default)]
struct Batch {
    events: usize,
    items: Vec<Vec<u8>>,
    parked: Vec<(Vec<u8>, String)>,
    position: Option<String>,
    /// When the batch's first event was taken: it is committed at most `linger` later.
    started: Option<tokio::time::Instant>,
}

impl Batch {
    /// Until when an incomplete batch may wait for more events before it is committed;
    /// `None` when it is empty, lingering is off, or the time is up.
    fn linger_until(&self, linger: Duration) -> Option<tokio::time::Instant> {
        let deadline = self.started? + linger;
        (!linger.is_zero() && tokio::time::Instant::now() < deadline).then_some(deadline)
    }
}

impl StreamReader {
    pub fn new(
        client: StreamClient,
        store: Arc<Store>,
        config: ReaderConfig,
        status: Arc<Status>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ReaderError> {
        let checkpoint = Checkpoint::new(store.position()?);
        let recover_until = store.meta(META_RECOVER_UNTIL)?;
        // Not connected to any ping until `with_connector_state`: requests never come.
        let (connector_state, _) = connector_state::channel(ConnectorState {
            start_from: first_start_id(&config.first_start_from),
            recover_until: None,
        });
        let mut reader = StreamReader {
            recover_until,
            repeated: None,
            unreachable: OutageLog::default(),
            client,
            store,
            config,
            status,
            metrics,
            checkpoint,
            reconcile: None,
            connector_state,
            disk: None,
            disk_cap: None,
            item_bytes: MeanItemBytes(DEFAULT_ITEM_BYTES),
        };
        // Decided now rather than at the first connection, so that the first ping already
        // shows the first start's recover date.
        reader.first_start_if_needed()?;
        reader.publish_state();
        Ok(reader)
    }

    /// Publishes the reader's state to `side` (for the pings) and takes the requests their
    /// answers bring (connector state reset or changed in OpenCTI).
    pub fn with_connector_state(mut self, side: ReaderSide) -> Self {
        self.connector_state = side;
        self.publish_state();
        self
    }

    /// Where the stream resumes, as the connector state OpenCTI shows.
    fn current_state(&self) -> ConnectorState {
        ConnectorState {
            start_from: match self.checkpoint.position() {
                Some(position) => position.to_string(),
                None => first_start_id(&self.config.first_start_from),
            },
            recover_until: self.recover_until.clone(),
        }
    }

    fn publish_state(&self) {
        let current = self.current_state();
        self.connector_state.state.send_if_modified(|published| {
            let changed = *published != current;
            if changed {
                *published = current;
            }
            changed
        });
    }

    /// A request that arrived and was not seen yet, without waiting.
    fn poll_request(&mut self) -> Option<StateRequest> {
        if self.connector_state.requests.has_changed().unwrap_or(false) {
            self.connector_state.requests.borrow_and_update().clone()
        } else {
            None
        }
    }

    /// Pauses reading while the data directory's disk is nearly full.
    pub fn with_disk_space(mut self, disk: Arc<DiskSpace>) -> Self {
        self.disk = Some(disk);
        self
    }

    /// Asks `reconcile` for a pass whenever a replay finishes.
    pub fn with_reconcile(mut self, reconcile: mpsc::UnboundedSender<ReconcileRequest>) -> Self {
        self.reconcile = Some(reconcile);
        self
    }

    /// Reads until `shutdown` turns true. Only a store failure ends it early.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), ReaderError> {
        let mut backoff = Backoff::new(self.config.retry.clone());
        loop {
            if let Some(request) = self.poll_request() {
                self.apply(request)?;
            }
            // Not even a first burst onto a full disk (a restart after sled failed on one).
            self.wait_for_disk(&mut shutdown).await;
            let resume = self.resume()?;
            self.status.set(
                "stream",
                format!("connecting from {}", resume.last_event_id),
            );
            let connected = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
                request = next_request(&mut self.connector_state.requests) => Err(request),
                c = self.client.connect(&resume.last_event_id, resume.recover.as_deref()) => Ok(c),
            };
            let connected = match connected {
                Ok(connected) => connected,
                Err(request) => {
                    self.apply(request)?;
                    continue;
                }
            };
            let delay = match connected {
                Ok(stream) => {
                    if let Some(ended) = self.unreachable.succeeded(std::time::Instant::now()) {
                        tracing::info!(
                            down_s = ended.down_for.as_secs(),
                            failed_attempts = ended.failures,
                            "the OpenCTI stream answers again"
                        );
                    }
                    self.checkpoint.reset_connection();
                    let recovering = resume.recover.is_some();
                    let before = self.checkpoint.position().map(str::to_owned);
                    let outcome = self
                        .read(stream, recovering, &mut shutdown, &mut backoff)
                        .await?;
                    if self.checkpoint.position() != before.as_deref() {
                        // The connection got somewhere: its end is a new failure, not one
                        // more of the old ones.
                        backoff.reset();
                    }
                    match outcome {
                        Outcome::Shutdown => return Ok(()),
                        Outcome::Recover => {
                            self.start_recovery(now_iso())?;
                            continue;
                        }
                        Outcome::Restart(target) => {
                            self.metrics.stream_reconnects.inc();
                            self.restart_from(target)?;
                            continue;
                        }
                        Outcome::Silent => {
                            tracing::warn!(
                                timeout_s = self.config.stream_timeout.as_secs(),
                                "no heartbeat from OpenCTI: reconnecting"
                            );
                            self.repeated_failure(
                                "silence",
                                "no heartbeat within connector.stream_timeout_s",
                            );
                            backoff.next_delay()
                        }
                        Outcome::Failed(error) => {
                            tracing::warn!(reason = %error, "stream interrupted: reconnecting");
                            self.repeated_failure(failure_kind(&error), &error.to_string());
                            backoff.next_delay()
                        }
                    }
                }
                Err(e) => {
                    self.repeated_failure(failure_kind(&e), &e.to_string());
                    self.connect_failed(&e, &mut backoff)
                }
            };
            self.metrics.stream_reconnects.inc();
            let status = match &self.repeated {
                Some(r) if r.count >= REPEATED_FAILURE_ALERT => format!(
                    "reconnecting in {:.1}s; failed {} times in a row at position {} ({})",
                    delay.as_secs_f64(),
                    r.count,
                    r.position,
                    r.kind
                ),
                _ => format!("reconnecting in {:.1}s", delay.as_secs_f64()),
            };
            self.status.set("stream", status);
            // A state request cuts the wait short.
            let request = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
                request = next_request(&mut self.connector_state.requests) => Some(request),
                _ = tokio::time::sleep(delay) => None,
            };
            if let Some(request) = request {
                self.apply(request)?;
            }
        }
    }

    fn first_start_if_needed(&mut self) -> Result<(), ReaderError> {
        if self.checkpoint.position().is_none() && self.recover_until.is_none() {
            // First start, like pycti: replay the current state up to the recover date
            // (a live stream does; the raw stream ignores it), then go live.
            let until = self
                .config
                .first_start_recover
                .clone()
                .unwrap_or_else(now_iso);
            self.start_recovery(until)?;
        }
        Ok(())
    }

    /// Applies a connector state from OpenCTI (SPEC §3, "State in OpenCTI"). The store is
    /// the source of truth: a state ahead of the stored position is ignored (resuming
    /// there would skip events never read into the outbox), one behind it is taken (what
    /// lies between is read again: at-least-once). The outbox is never touched.
    fn apply(&mut self, request: StateRequest) -> Result<(), ReaderError> {
        match self.plan(request) {
            Some(target) => self.restart_from(target),
            None => Ok(()),
        }
    }

    /// Where a request moves the stream, if anywhere; logs what happens and why.
    fn plan(&self, request: StateRequest) -> Option<ConnectorState> {
        let current = self.current_state();
        match request {
            StateRequest::Reset => {
                let from = first_start_id(&self.config.first_start_from);
                let until = self
                    .config
                    .first_start_recover
                    .clone()
                    .unwrap_or_else(now_iso);
                tracing::warn!(
                    previous = %current.start_from,
                    previous_recover_until = ?current.recover_until,
                    start_from = %from,
                    recover_until = %until,
                    queued = self.store.len(Queue::Indicators),
                    "connector state reset in OpenCTI: restarting the stream from the first-start position, \
                     replaying the current state (queued items stay queued and are delivered)"
                );
                Some(ConnectorState {
                    start_from: from,
                    recover_until: Some(until),
                })
            }
            StateRequest::Resume(platform) if platform == current => None,
            StateRequest::Resume(platform) => {
                match compare_ids(&platform.start_from, &current.start_from) {
                    Some(Ordering::Greater) => {
                        tracing::warn!(
                            platform = %platform.start_from,
                            stored = %current.start_from,
                            "the connector state in OpenCTI is ahead of the stored stream position: ignored \
                             (the store is the source of truth; resuming there would skip events not yet read). \
                             The next ping sends the stored position back"
                        );
                        None
                    }
                    Some(_) => {
                        tracing::warn!(
                            previous = %current.start_from,
                            previous_recover_until = ?current.recover_until,
                            start_from = %platform.start_from,
                            recover_until = ?platform.recover_until,
                            queued = self.store.len(Queue::Indicators),
                            "connector state changed in OpenCTI: restarting the stream from it \
                             (events after it are read again; queued items stay queued)"
                        );
                        Some(platform)
                    }
                    None => {
                        tracing::warn!(
                            platform = %platform.start_from,
                            "the connector state in OpenCTI has a start_from that is not a stream id: ignored"
                        );
                        None
                    }
                }
            }
        }
    }

    /// Moves the stored position (backwards, possibly) and the recover date. Never both at
    /// once in sled, so ordered: the stored position must never be left without a recover
    /// date it needs (a replay id read as a raw stream time would skip the replay).
    fn restart_from(&mut self, target: ConnectorState) -> Result<(), ReaderError> {
        let ConnectorState {
            start_from: from,
            recover_until: recover,
        } = target;
        match recover {
            Some(until) => {
                self.start_recovery(until)?;
                drop(self.store.set_position(&from)?);
            }
            None => {
                drop(self.store.set_position(&from)?);
                if self.recover_until.take().is_some() {
                    // The replay is abandoned, not finished: no reconciliation pass.
                    drop(self.store.update_meta(&[
                        (META_RECOVER_UNTIL, None),
                        (META_RECOVER_STARTED, None),
                    ])?);
                }
            }
        }
        self.checkpoint = Checkpoint::new(Some(from));
        self.status
            .set("stream", "restarting from the connector state");
        self.publish_state();
        Ok(())
    }

    fn resume(&mut self) -> Result<Resume, ReaderError> {
        self.first_start_if_needed()?;
        let last_event_id = match self.checkpoint.position() {
            Some(position) => position.to_string(),
            None => first_start_id(&self.config.first_start_from),
        };
        Ok(Resume {
            last_event_id,
            recover: self.recover_until.clone(),
        })
    }

    fn start_recovery(&mut self, until: String) -> Result<(), ReaderError> {
        tracing::info!(until = %until, "replaying the current state up to this date (recover mode)");
        let started = crate::store::now_ms().to_string();
        drop(self.store.update_meta(&[
            (META_RECOVER_UNTIL, Some(until.as_str())),
            (META_RECOVER_STARTED, Some(started.as_str())),
        ])?);
        self.recover_until = Some(until);
        self.publish_state();
        Ok(())
    }

    /// Once the position is past the recover date, the replay is over.
    fn end_recovery_if_passed(&mut self, position: &str) -> Result<(), ReaderError> {
        let Some(until) = &self.recover_until else {
            return Ok(());
        };
        let until_ms = crate::stix::Timestamp::parse(until)
            .map(|t| t.unix_millis())
            .ok();
        let position_ms = position
            .parse::<crate::opencti::stream::EventId>()
            .ok()
            .map(|id| id.millis as i64);
        if let (Some(until_ms), Some(position_ms)) = (until_ms, position_ms) {
            if position_ms > until_ms {
                tracing::info!(position, "replay finished: following the live stream");
                // One write: a pass is recorded exactly when the replay is over. A store
                // from before reconciliation has no start: then every entry is checked.
                let started = self.store.meta(META_RECOVER_STARTED)?;
                let pending = started.as_deref().unwrap_or("0");
                drop(self.store.update_meta(&[
                    (META_RECONCILE_PENDING, Some(pending)),
                    (META_RECOVER_UNTIL, None),
                    (META_RECOVER_STARTED, None),
                ])?);
                self.recover_until = None;
                if let Some(reconcile) = &self.reconcile {
                    let _ = reconcile.send(ReconcileRequest::AfterReplay);
                }
            }
        }
        Ok(())
    }

    /// Counts a failed connection at the current position; the same position failing the
    /// same way again and again is an error the operator must see, not a silent loop.
    fn repeated_failure(&mut self, kind: &'static str, reason: &str) {
        let position = self.checkpoint.position().map_or_else(
            || first_start_id(&self.config.first_start_from),
            str::to_owned,
        );
        let count = match &mut self.repeated {
            Some(r) if r.position == position && r.kind == kind => {
                r.count = r.count.saturating_add(1);
                r.count
            }
            _ => {
                self.repeated = Some(Repeated {
                    position: position.clone(),
                    kind,
                    count: 1,
                });
                1
            }
        };
        self.metrics.stream_repeated_failures.set(i64::from(count));
        if count >= REPEATED_FAILURE_ALERT
            && (count / REPEATED_FAILURE_ALERT).is_power_of_two()
            && count % REPEATED_FAILURE_ALERT == 0
        {
            tracing::error!(
                position,
                count,
                kind,
                reason,
                "the stream keeps failing at the same position the same way: {count} times in a row \
                 at {position} ({kind})"
            );
        }
    }

    /// The position moved: whatever failed before is behind us.
    fn progressed(&mut self) {
        if let Some(r) = self.repeated.take() {
            if r.count >= REPEATED_FAILURE_ALERT {
                tracing::info!(
                    position = ?self.checkpoint.position(),
                    after = r.count,
                    "the stream moves again past the position that kept failing"
                );
            }
        }
        self.metrics.stream_repeated_failures.set(0);
    }

    fn connect_failed(&mut self, error: &StreamError, backoff: &mut Backoff) -> Duration {
        match error {
            StreamError::Unauthorized { .. } => {
                tracing::error!(error = %error, retry_s = self.config.auth_retry.as_secs(), "OpenCTI refused the token: check OPENCTI_TOKEN and the connector user's rights");
                self.config.auth_retry
            }
            StreamError::Gone => {
                tracing::error!(error = %error, retry_s = self.config.auth_retry.as_secs(), "the live stream is stopped or deleted in OpenCTI: start it again (Data > Data sharing > Live streams)");
                self.config.auth_retry
            }
            other => {
                let delay = backoff.next_delay();
                match self.unreachable.failed(std::time::Instant::now()) {
                    Failure::Started => {
                        tracing::warn!(error = %other, retry_s = delay.as_secs_f64(), "cannot connect to the OpenCTI stream: trying again until it answers (each attempt is logged at debug)")
                    }
                    Failure::StillDown { down_for, failures } => {
                        tracing::warn!(error = %other, down_s = down_for.as_secs(), failed_attempts = failures, "the OpenCTI stream is still unreachable")
                    }
                    Failure::Quiet => {
                        tracing::debug!(error = %other, retry_s = delay.as_secs_f64(), "cannot connect to the OpenCTI stream")
                    }
                }
                delay
            }
        }
    }

    async fn read(
        &mut self,
        mut stream: EventStream,
        recovering: bool,
        shutdown: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
    ) -> Result<Outcome, ReaderError> {
        let mut batch = Batch::default();
        loop {
            // Checked between events too: a busy stream may never wait below.
            if let Some(target) = self.poll_request().and_then(|r| self.plan(r)) {
                self.commit(&mut batch)?;
                return Ok(Outcome::Restart(target));
            }
            // Take what is already buffered without waiting. When nothing is, a batch
            // lingers for more events up to `linger` after its first one, then is committed
            // before any longer wait: at a steady few hundred events/s that is one store
            // write per flush interval instead of one per event (each sled batch wakes
            // sled's I/O threads), for at most `linger` of extra latency.
            let next = match stream.next().now_or_never() {
                Some(next) => next,
                None => match batch.linger_until(self.config.linger) {
                    Some(deadline) => {
                        let waited = tokio::select! {
                            _ = shutdown.wait_for(|s| *s) => {
                                self.commit(&mut batch)?;
                                return Ok(Outcome::Shutdown);
                            }
                            next = tokio::time::timeout_at(deadline, stream.next()) => next,
                        };
                        match waited {
                            Ok(next) => next,
                            // Time is up: the next turn commits the batch and waits.
                            Err(_) => continue,
                        }
                    }
                    None => {
                        self.commit(&mut batch)?;
                        self.wait_for_room(shutdown).await;
                        let timeout = self.config.stream_timeout;
                        let waited = tokio::select! {
                            _ = shutdown.wait_for(|s| *s) => return Ok(Outcome::Shutdown),
                            request = next_request(&mut self.connector_state.requests) => Err(request),
                            next = tokio::time::timeout(timeout, stream.next()) => Ok(next),
                        };
                        match waited {
                            // The batch was committed before waiting.
                            Err(request) => match self.plan(request) {
                                Some(target) => return Ok(Outcome::Restart(target)),
                                None => continue,
                            },
                            Ok(Ok(next)) => next,
                            Ok(Err(_)) => return Ok(Outcome::Silent),
                        }
                    }
                },
            };
            let event = match next {
                Some(Ok(event)) => event,
                Some(Err(StreamError::Poison(poison))) => {
                    batch.started.get_or_insert_with(tokio::time::Instant::now);
                    self.on_poison(*poison, &mut batch);
                    if batch.events >= MAX_BATCH_EVENTS {
                        self.commit(&mut batch)?;
                        self.wait_for_room(shutdown).await;
                    }
                    continue;
                }
                Some(Err(e)) => {
                    self.commit(&mut batch)?;
                    return Ok(Outcome::Failed(e));
                }
                None => {
                    self.commit(&mut batch)?;
                    return Ok(Outcome::Failed(StreamError::Ended));
                }
            };
            if event.event == "connected" {
                // After failures at this very position, the next one waits its full delay:
                // a stream that connects and then fails at the same event must not loop
                // at the initial delay. Progress resets it (see `run`).
                if self.repeated.is_none() {
                    backoff.reset();
                }
                if let Some(outcome) = self.on_connected(&event, recovering) {
                    self.commit(&mut batch)?;
                    return Ok(outcome);
                }
                continue;
            }
            batch.started.get_or_insert_with(tokio::time::Instant::now);
            self.on_event(event, &mut batch);
            if batch.events >= MAX_BATCH_EVENTS {
                self.commit(&mut batch)?;
                self.wait_for_room(shutdown).await;
            }
        }
    }

    /// Gap detection (SPEC §2.7): our position is older than the oldest event OpenCTI
    /// still retains, so events were trimmed away while the bridge was down.
    fn on_connected(&mut self, event: &SseEvent, recovering: bool) -> Option<Outcome> {
        let connected = match parse_connected(&event.data) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable `connected` event; gap detection skipped");
                return None;
            }
        };
        self.status.set("stream", "connected");
        tracing::info!(position = ?self.checkpoint.position(), first = ?connected.first_event_id, last = ?connected.last_event_id, "stream connected");
        let (Some(position), Some(first)) = (
            self.checkpoint.position(),
            connected.first_event_id.as_deref(),
        ) else {
            return None;
        };
        if recovering
            || compare_ids(position, first) != Some(std::cmp::Ordering::Less)
            || position == "0-0"
        {
            return None;
        }
        self.metrics.stream_gaps.inc();
        if self.config.live {
            tracing::error!(
                position,
                first_retained = first,
                "events between the stored position and the oldest retained one were trimmed while the bridge was down: \
                 reconnecting in recover mode to replay the current state (deletions inside the gap cannot be replayed)"
            );
            Some(Outcome::Recover)
        } else {
            tracing::error!(
                position,
                first_retained = first,
                "events between the stored position and the oldest retained one were trimmed while the bridge was down, \
                 and the raw /stream cannot recover them: set connector.live_stream_id to a live stream to recover"
            );
            None
        }
    }

    fn on_event(&mut self, event: SseEvent, batch: &mut Batch) {
        batch.events += 1;
        self.metrics.stream_events.inc();
        let role = match event.event.as_str() {
            "create" | "update" | "delete" | "merge" => self.on_data_event(&event, batch),
            _ => EventRole::Heartbeat,
        };
        if let Some(position) = self.checkpoint.observe(event.id.as_deref(), role) {
            batch.position = Some(position);
        }
    }

    fn on_data_event(&mut self, event: &SseEvent, batch: &mut Batch) -> EventRole {
        let parsed: Value = match serde_json::from_str(&event.data) {
            Ok(value) => value,
            Err(e) => {
                let reason = format!(
                    "{} event {}: data is not valid JSON: {e}",
                    event.event,
                    event.id.as_deref().unwrap_or("without id")
                );
                self.park(event, reason, batch);
                return EventRole::Complete;
            }
        };
        let role = if stix::is_dependency_event(&parsed) {
            EventRole::Dependency
        } else {
            EventRole::Complete
        };
        match stix::map_stream_value(&event.event, parsed, self.config.forward_all_iocs) {
            StreamAction::Skip { reason } => {
                tracing::trace!(?reason, id = ?event.id, "event skipped")
            }
            StreamAction::Publish(objects) => {
                for object in objects {
                    batch
                        .items
                        .push(serde_json::to_vec(&object).unwrap_or_default());
                }
            }
            StreamAction::NeedsFullIndicator { stix_id, .. } => {
                let reason = format!(
                    "{stix_id}: OpenCTI 4.x sends patch-only updates; reading the full indicator through the API is not supported yet"
                );
                self.park(event, reason, batch);
            }
            StreamAction::Invalid { reason } => self.park(event, reason, batch),
        }
        role
    }

    fn park(&self, event: &SseEvent, reason: String, batch: &mut Batch) {
        self.park_bytes(
            event.id.as_deref(),
            event.data.clone().into_bytes(),
            reason,
            batch,
        );
    }

    fn park_bytes(&self, id: Option<&str>, data: Vec<u8>, reason: String, batch: &mut Batch) {
        tracing::warn!(?id, %reason, "stream event parked as a dead letter");
        // An indicator dead letter like any other: counted where the exporter reads it.
        self.metrics.indicators.dead.inc();
        batch.parked.push((data, reason));
    }

    /// SPEC §2.8: an event the parser could not use (invalid UTF-8, over
    /// `bridge.max_event_bytes`) is parked with its bytes and the reason, and the position
    /// moves past it like past any other event, so reconnecting never reads it again.
    fn on_poison(&mut self, poison: PoisonEvent, batch: &mut Batch) {
        batch.events += 1;
        self.metrics.stream_events.inc();
        let role = match poison.event.as_str() {
            // Lossy text is often still JSON (a bad byte inside a string): then it can tell
            // a dependency, which must not move the position past its event. An oversized
            // event cannot (only its prefix is kept), and dependencies are small objects.
            "create" | "update" | "delete" | "merge" => {
                if stix::is_dependency_data(&String::from_utf8_lossy(&poison.data)) {
                    EventRole::Dependency
                } else {
                    EventRole::Complete
                }
            }
            _ => EventRole::Heartbeat,
        };
        let reason = format!(
            "{} event {}: {}",
            poison.event,
            poison.id.as_deref().unwrap_or("without id"),
            poison.reason
        );
        self.park_bytes(poison.id.as_deref(), poison.data, reason, batch);
        if let Some(position) = self.checkpoint.observe(poison.id.as_deref(), role) {
            batch.position = Some(position);
        }
    }

    /// Writes the batch, then its position (sled recovers a prefix: never one without the
    /// other's items).
    fn commit(&mut self, batch: &mut Batch) -> Result<(), ReaderError> {
        if batch.items.is_empty() && batch.parked.is_empty() && batch.position.is_none() {
            batch.events = 0;
            return Ok(());
        }
        let batch = std::mem::take(batch);
        let queued = batch.items.len() as u64;
        self.item_bytes.add_burst(&batch.items);
        let position = batch.position.clone();
        // No flush is asked for: the position is written with the items, so whatever a
        // crash loses is read again from the stream.
        let commit = Commit {
            items: batch.items,
            parked: batch.parked,
            position: batch.position,
        };
        self.store.commit_replayable(commit)?;
        self.metrics.received(Queue::Indicators, queued);
        // After the position write: sled recovers a prefix of writes, so the recover date
        // can never be gone while the position still points into the replay.
        if let Some(position) = position {
            self.progressed();
            self.end_recovery_if_passed(&position)?;
            self.publish_state();
        }
        Ok(())
    }

    /// SPEC §2.9: the stream can be replayed, so a full outbox pauses reading rather than
    /// dropping anything. Checked between bursts, so the outbox may exceed the limit by at
    /// most one burst (`MAX_BATCH_EVENTS` events).
    async fn wait_for_room(&mut self, shutdown: &mut watch::Receiver<bool>) {
        self.wait_for_disk(shutdown).await;
        // A state request is applied at once (the reader then waits here again).
        let request_pending = || self.connector_state.requests.has_changed().unwrap_or(false);
        let limit = self.config.indicator_limit;
        if self.store.len(Queue::Indicators) < limit {
            return;
        }
        tracing::warn!(
            limit,
            "indicator outbox full: pausing the stream until Threat Bus catches up"
        );
        self.status.set("stream", "paused: indicator outbox full");
        while self.store.len(Queue::Indicators) >= limit
            && !*shutdown.borrow()
            && !request_pending()
        {
            tokio::time::sleep(FULL_OUTBOX_POLL).await;
        }
        tracing::info!(
            queued = self.store.len(Queue::Indicators),
            "indicator outbox has room again: resuming the stream"
        );
        self.status.set("stream", "connected");
    }
}

impl StreamReader {
    /// Pauses while the disk of the data directory is below `bridge.min_free_mb`: sled
    /// cannot survive a full disk (see [`crate::store::disk_space`]), and the stream can be
    /// read again later. Checked between bursts, like the queue limit.
    ///
    /// sled reuses the space of delivered items inside its file and never gives it back to
    /// the filesystem, so delivering does not raise the free space: while the disk stays
    /// low, the reader reads again once the outbox has drained to half of what it held at
    /// the pause (new items then fill space sled already has), and pauses again when it
    /// is back there. An outbox empty at the pause earns no such credit: something else
    /// fills the disk. Below the sighting floor, no credit at all.
    ///
    /// The free space compared is what is left after a reserve for the catalog entries the
    /// queued indicators will take when delivered (format 4 writes them then): without it,
    /// delivering a paused backlog filled the disk the reader had stopped short of.
    async fn wait_for_disk(&mut self, shutdown: &mut watch::Receiver<bool>) {
        let Some(disk) = self.disk.clone() else {
            return;
        };
        let queued = || self.store.len(Queue::Indicators);
        let per_item = self.item_bytes.0 * CATALOG_DISK_FACTOR;
        // Every check first renews the reserve: what is queued now still needs its entry.
        let room_now = || {
            disk.set_reserve(queued().saturating_mul(per_item));
            disk.room_now()
        };
        let low = |room: Room| match room {
            Room::Enough => None,
            Room::Low { free } | Room::Critical { free } => Some(free),
        };
        let room = room_now();
        let Some(free) = low(room) else {
            self.disk_cap = None;
            return;
        };
        if matches!(room, Room::Low { .. }) && self.disk_cap.is_some_and(|cap| queued() < cap) {
            return;
        }
        let cap = *self.disk_cap.get_or_insert(queued());
        let why = disk.describe_low(free);
        tracing::warn!(
            free_mb = free / crate::config::MB,
            min_free_mb = disk.min_free() / crate::config::MB,
            queued = queued(),
            "{why}: pausing the stream until there is room (delivering frees space inside the store)"
        );
        self.status.set("stream", format!("paused: {why}"));
        self.metrics.stream_paused_disk.set(1);
        let request_pending = || self.connector_state.requests.has_changed().unwrap_or(false);
        loop {
            if *shutdown.borrow() || request_pending() {
                break;
            }
            match room_now() {
                Room::Enough => {
                    self.disk_cap = None;
                    break;
                }
                Room::Low { .. } if cap > 0 && queued() <= cap / 2 => break,
                room => {
                    if let Some(free) = low(room) {
                        self.metrics.disk_free_bytes.set(free as i64);
                        self.status
                            .set("stream", format!("paused: {}", disk.describe_low(free)));
                    }
                }
            }
            tokio::time::sleep(FULL_OUTBOX_POLL).await;
        }
        tracing::info!(
            free_mb = disk.free().unwrap_or(0) / crate::config::MB,
            queued = queued(),
            "room on the disk again: resuming the stream"
        );
        self.metrics.stream_paused_disk.set(0);
        self.status.set("stream", "connected");
    }
}

/// The next state request; never, once the pinging side is gone (or was never there).
async fn next_request(requests: &mut watch::Receiver<Option<StateRequest>>) -> StateRequest {
    loop {
        if requests.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        if let Some(request) = requests.borrow_and_update().clone() {
            return request;
        }
    }
}

/// How a connection failed, coarsely: two failures are "the same way" when these match
/// (messages differ in details such as ports and byte counts).
fn failure_kind(error: &StreamError) -> &'static str {
    match error {
        StreamError::Setup { .. } => "setup",
        StreamError::Unauthorized { .. } => "refused",
        StreamError::Gone => "stopped",
        StreamError::NotFound => "not found",
        StreamError::HttpStatus { .. } => "http error",
        StreamError::Transport { .. } => "transport",
        StreamError::Protocol(_) => "protocol",
        StreamError::Poison(_) => "poison",
        StreamError::Ended => "ended",
    }
}

/// pycti appends `-0` to a configured start timestamp (milliseconds).
fn first_start_id(configured: &str) -> String {
    if configured.contains('-') {
        configured.to_string()
    } else {
        format!("{configured}-0")
    }
}

/// Now as OpenCTI's ISO dates: `2024-03-01T10:00:00.000Z`.
fn now_iso() -> String {
    crate::stix::Timestamp::from_system_time(std::time::SystemTime::now())
        .map(|t| t.to_rfc3339_millis())
        .unwrap_or_else(|| "1970-01-01T00:00:00.000Z".into())
}
