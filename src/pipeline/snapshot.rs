//! Threat Bus snapshot requests → answers from the indicator catalog.
//!
//! When an app (Zeek, VAST, …) subscribes with `snapshot: N` days, Threat Bus asks every
//! other app for its intelligence of the last N days. The bridge answers with every active
//! catalog indicator whose `modified` falls in the window, each as a
//! `threatbus/snapshotenvelope` frame, so that a tool that rejoins gets OpenCTI's current
//! indicators at once instead of when each next changes.
//!
//! Answers are paced (`threatbus.snapshot_rate` frames/s): Threat Bus relays ~700
//! messages/s, and a 20,000-indicator answer written at once would queue live indicators
//! behind it for half a minute. Paced below Threat Bus's rate, live frames written by the
//! indicator drainer interleave with the snapshot on the same socket, and neither starves.
//! There is no acknowledgement and no end marker in the protocol: a snapshot is best effort
//! by design, and a frame the link refuses (Threat Bus away) is retried until it is written.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::admin::Status;
use crate::metrics::Metrics;
use crate::stix::{parse_snapshot_request, snapshot_envelope_frame, SnapshotKind, SnapshotRequest};
use crate::store::{now_ms, Store, StoreError};
use crate::threatbus::{LinkState, Publisher};

/// Time slice of the pacing: at 400 frames/s, 20 frames every 50 ms on average.
const TICK: Duration = Duration::from_millis(50);
/// Snapshot ids remembered as answered: Threat Bus sends each request once per app, so
/// this only guards against a duplicate delivery; a few thousand cost nothing.
const ANSWERED_MEMORY: usize = 4096;
/// Catalog entries read per store access.
const CATALOG_CHUNK: usize = 256;

#[derive(Debug, Clone)]
pub struct SnapshotConfig {
    /// Frames per second at most.
    pub rate: u32,
}

/// Answers snapshot requests, one at a time, in arrival order.
pub struct Snapshots {
    store: Arc<Store>,
    link: Publisher,
    link_state: watch::Receiver<LinkState>,
    requests: mpsc::UnboundedReceiver<String>,
    config: SnapshotConfig,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    answered: HashSet<String>,
    answered_order: VecDeque<String>,
}

/// How one answer ended.
enum Answer {
    Done { sent: u64 },
    Shutdown,
}

impl Snapshots {
    pub fn new(
        store: Arc<Store>,
        link: Publisher,
        link_state: watch::Receiver<LinkState>,
        requests: mpsc::UnboundedReceiver<String>,
        config: SnapshotConfig,
        status: Arc<Status>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Snapshots {
            store,
            link,
            link_state,
            requests,
            config,
            status,
            metrics,
            answered: HashSet::new(),
            answered_order: VecDeque::new(),
        }
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), StoreError> {
        self.status.set("snapshots", "idle");
        loop {
            let body = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
                body = self.requests.recv() => match body {
                    Some(body) => body,
                    None => return Ok(()),
                },
            };
            let request = match parse_snapshot_request(&body) {
                Ok(request) => request,
                Err(error) => {
                    tracing::warn!(%error, request = %body, "unusable Threat Bus snapshot request skipped");
                    continue;
                }
            };
            self.metrics.snapshot_requests.inc();
            if request.kind == SnapshotKind::Sightings {
                tracing::info!(
                    snapshot_id = %request.snapshot_id,
                    "sighting snapshot request not answered: OpenCTI, not the bridge, holds sighting history"
                );
                continue;
            }
            if !self.remember(&request.snapshot_id) {
                tracing::info!(snapshot_id = %request.snapshot_id, "snapshot request already answered: skipped");
                continue;
            }
            let started = Instant::now();
            let since_ms = window_start_ms(now_ms(), request.window_s);
            tracing::info!(
                snapshot_id = %request.snapshot_id,
                window_s = request.window_s,
                active = self.store.catalog_size().active,
                rate = self.config.rate,
                "answering a Threat Bus snapshot request from the indicator catalog"
            );
            self.status
                .set("snapshots", format!("answering {}", request.snapshot_id));
            match self.answer(&request, since_ms, &mut shutdown).await? {
                Answer::Done { sent } => {
                    tracing::info!(
                        snapshot_id = %request.snapshot_id,
                        sent,
                        duration_s = started.elapsed().as_secs_f64(),
                        "snapshot answered"
                    );
                    self.metrics.snapshots_answered.inc();
                }
                Answer::Shutdown => {
                    tracing::info!(snapshot_id = %request.snapshot_id, "shutting down in the middle of a snapshot answer");
                    return Ok(());
                }
            }
            self.status.set("snapshots", "idle");
        }
    }

    /// Records `snapshot_id`; false if it was answered before.
    fn remember(&mut self, snapshot_id: &str) -> bool {
        if !self.answered.insert(snapshot_id.to_owned()) {
            return false;
        }
        self.answered_order.push_back(snapshot_id.to_owned());
        if self.answered_order.len() > ANSWERED_MEMORY {
            if let Some(oldest) = self.answered_order.pop_front() {
                self.answered.remove(&oldest);
            }
        }
        true
    }

    /// Walks the catalog in id order and publishes what is in the window, paced.
    async fn answer(
        &mut self,
        request: &SnapshotRequest,
        since_ms: i64,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Answer, StoreError> {
        let rate = f64::from(self.config.rate.max(1));
        let burst = max_burst(self.config.rate);
        // Token bucket: `rate` frames a second, at most `burst` at once (after a wait for
        // the link, the bucket does not let a backlog out in one go).
        let mut budget = 0.0f64;
        let mut last_tick = Instant::now();
        let mut cursor: Option<String> = None;
        let mut pending: VecDeque<String> = VecDeque::new();
        let mut exhausted = false;
        let mut sent = 0u64;
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Top up the frames to send from the catalog, a chunk at a time.
            while pending.len() < burst && !exhausted {
                let chunk = self
                    .store
                    .catalog_active(cursor.as_deref(), CATALOG_CHUNK)?;
                exhausted = chunk.len() < CATALOG_CHUNK;
                if let Some((last, _)) = chunk.last() {
                    cursor = Some(last.clone());
                }
                pending.extend(
                    chunk
                        .into_iter()
                        .filter(|(_, entry)| entry.modified_ms >= since_ms)
                        .filter_map(|(_, entry)| snapshot_envelope_frame(request, &entry.body)),
                );
            }
            if pending.is_empty() {
                return Ok(Answer::Done { sent });
            }
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return Ok(Answer::Shutdown),
                _ = ticks.tick() => {}
            }
            if !self.wait_until_ready(shutdown).await {
                return Ok(Answer::Shutdown);
            }
            let now = Instant::now();
            budget = (budget + rate * (now - last_tick).as_secs_f64()).min(burst as f64);
            last_tick = now;
            let take = (budget as usize).min(pending.len());
            if take == 0 {
                continue;
            }
            let frames: Vec<String> = pending.iter().take(take).cloned().collect();
            match self.link.publish(frames).await {
                Ok(_) => {
                    budget -= take as f64;
                    pending.drain(..take);
                    sent += take as u64;
                    self.metrics.snapshot_indicators.add(take as u64);
                }
                // Nothing written: the same frames go again once the link is back.
                Err(e) => {
                    tracing::debug!(error = %e, "snapshot frames refused; waiting for the link")
                }
            }
        }
    }

    /// Waits for a ready link; false on shutdown.
    async fn wait_until_ready(&mut self, shutdown: &mut watch::Receiver<bool>) -> bool {
        loop {
            if matches!(
                *self.link_state.borrow_and_update(),
                LinkState::Ready { .. }
            ) {
                return true;
            }
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return false,
                changed = self.link_state.changed() => if changed.is_err() { return false },
            }
        }
    }
}

/// The earliest `modified` (ms) inside a window of `window_s` seconds ending at `now_ms`.
fn window_start_ms(now_ms: u64, window_s: u64) -> i64 {
    let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
    let window = i64::try_from(window_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    now.saturating_sub(window)
}

/// The most frames let out at once: two ticks' worth at `rate` frames/s, at least one.
fn max_burst(rate: u32) -> usize {
    let per_tick = u64::from(rate) * TICK.as_millis() as u64 / 1000;
    (2 * per_tick).max(1) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_and_windows() {
        assert_eq!(max_burst(400), 40);
        assert_eq!(max_burst(1), 1);
        assert_eq!(window_start_ms(100_000, 30), 70_000);
        assert_eq!(window_start_ms(1_000, 30), -29_000);
        assert_eq!(window_start_ms(1_000, u64::MAX), 1_000 - i64::MAX);
    }
}
