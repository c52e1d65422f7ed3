//! Gap reconciliation: active catalog indicators → OpenCTI lookups → `REMOVE`s.
//!
//! A replay (recover mode: after a trimmed gap, a first start, a reset) sends the current
//! state of every indicator OpenCTI still has, and nothing for those it deleted, revoked or
//! stopped detecting while the bridge was not reading: the stream had the events, the gap
//! lost them. Without this pass, those indicators stay active in every tool for good.
//!
//! So when a replay ends, every catalog indicator still active that the replay did not
//! refresh (its entry is older than the replay's start) is looked up in OpenCTI, many per
//! request ([`crate::opencti::indicator_lookup`]), and a `REMOVE` is queued for each one
//! OpenCTI no longer has ([`crate::stix::reconcile::verdict`]). The pass is recorded in the
//! store before it starts (`reconcile_pending`) and cleared only when it has finished, so a
//! crash or a restart mid-pass runs it again; a pass is idempotent (a removed indicator is
//! no longer active). OpenCTI outages are waited out with backoff. The `reconcile`
//! maintenance command runs the same pass over the whole active catalog on demand, once,
//! and reports what it found.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::admin::Status;
use crate::metrics::Metrics;
use crate::opencti::graphql::{GraphqlClient, GraphqlError};
use crate::opencti::indicator_lookup::LOOKUP_BATCH;
use crate::retry::{Backoff, RetryPolicy};
use crate::stix::reconcile::{removal_body, verdict};
use crate::store::{CatalogEntry, Queue, Removal, Store, StoreError};

/// Store meta key of a pass still to run: the replay's start (ms since the epoch); catalog
/// entries recorded before it were not refreshed by the replay. `0`: check them all.
pub const META_RECONCILE_PENDING: &str = "reconcile_pending";
/// Active catalog entries read per store access.
const CATALOG_PAGE: usize = 500;
/// Removed ids listed in a report at most (the count is always complete).
const REPORT_IDS: usize = 200;
/// How often a pass waiting for the drainer looks again: it waits for Threat Bus, at
/// hundreds of indicators per second, so a fraction of a second is soon enough.
const TOLD_POLL: std::time::Duration = std::time::Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    /// The stream mapping's rule: detection off is not a reason to remove when set.
    pub forward_all_iocs: bool,
    /// Backoff while OpenCTI is unreachable during a pass after a replay.
    pub retry: RetryPolicy,
}

/// Why a pass runs.
#[derive(Debug)]
pub enum ReconcileRequest {
    /// A replay finished; the pass is recorded in [`META_RECONCILE_PENDING`].
    AfterReplay,
    /// The `reconcile` command: the whole active catalog, once, no retries; the report
    /// goes back on `reply`.
    OnDemand {
        reply: oneshot::Sender<ReconcileReport>,
    },
}

/// What one pass found (the `reconcile` command prints it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    /// Active catalog indicators looked up in OpenCTI.
    pub checked: u64,
    /// `REMOVE`s queued.
    pub removed: u64,
    /// Removals by reason (`deleted`, `revoked`, `detection_off`, `merged`).
    pub by_reason: BTreeMap<String, u64>,
    /// The first removed ids (at most 200).
    pub removed_ids: Vec<String>,
    /// Found gone, but the stream changed the indicator after the lookup: not removed.
    pub changed_meanwhile: u64,
    /// Catalog bodies that could not be turned into a `REMOVE` (logged).
    pub unusable: u64,
    pub duration_ms: u64,
    /// Set when the pass stopped early (OpenCTI failed); the counts are what it did.
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The store failed: the task stops (the daemon exits 1).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a pass ended.
enum Ended {
    Finished,
    /// OpenCTI refused the lookup for good (or, on demand, failed at all).
    Failed(GraphqlError),
    Shutdown,
}

pub struct Reconciler {
    store: Arc<Store>,
    client: Arc<GraphqlClient>,
    config: ReconcileConfig,
    requests: mpsc::UnboundedReceiver<ReconcileRequest>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
}

impl Reconciler {
    pub fn new(
        store: Arc<Store>,
        client: Arc<GraphqlClient>,
        config: ReconcileConfig,
        requests: mpsc::UnboundedReceiver<ReconcileRequest>,
        status: Arc<Status>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Reconciler {
            store,
            client,
            config,
            requests,
            status,
            metrics,
        }
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), ReconcileError> {
        self.status.set("reconcile", "idle");
        // A pass a replay left behind (the bridge stopped or crashed before it finished).
        if self.store.meta(META_RECONCILE_PENDING)?.is_some()
            && matches!(self.after_replay(&mut shutdown).await?, Ended::Shutdown)
        {
            return Ok(());
        }
        loop {
            let request = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
                request = self.requests.recv() => request,
            };
            let Some(request) = request else {
                // Every sender is gone: nothing can ask any more; wait for the shutdown.
                let _ = shutdown.wait_for(|s| *s).await;
                return Ok(());
            };
            match request {
                ReconcileRequest::AfterReplay => {
                    if matches!(self.after_replay(&mut shutdown).await?, Ended::Shutdown) {
                        return Ok(());
                    }
                }
                ReconcileRequest::OnDemand { reply } => {
                    tracing::info!(
                        "reconciliation asked for: checking every active indicator against OpenCTI"
                    );
                    let mut report = ReconcileReport::default();
                    let ended = self.pass(None, false, &mut report, &mut shutdown).await?;
                    self.finish(&ended, &report);
                    let _ = reply.send(report);
                    if matches!(ended, Ended::Shutdown) {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// The pass recorded in the store, retried through outages; cleared once finished.
    async fn after_replay(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Ended, ReconcileError> {
        let Some(pending) = self.store.meta(META_RECONCILE_PENDING)? else {
            return Ok(Ended::Finished);
        };
        let cutoff = pending.parse::<u64>().ok().filter(|&ms| ms > 0);
        if !self.wait_until_told(shutdown).await? {
            return Ok(Ended::Shutdown);
        }
        tracing::info!(
            replay_started_ms = cutoff,
            "replay finished: checking the active indicators it did not refresh against OpenCTI"
        );
        let mut report = ReconcileReport::default();
        let ended = self.pass(cutoff, true, &mut report, shutdown).await?;
        self.finish(&ended, &report);
        if matches!(ended, Ended::Finished) {
            // Only if no newer replay asked for a pass meanwhile (its own request follows).
            if self.store.meta(META_RECONCILE_PENDING)?.as_deref() == Some(pending.as_str()) {
                drop(self.store.remove_meta(META_RECONCILE_PENDING)?);
            }
        }
        Ok(ended)
    }

    /// Waits until every indicator queued so far is in the catalog (the drainer records
    /// them as it tells Threat Bus). Until then, what the replay refreshed still looks
    /// stale, and each would be looked up in OpenCTI for nothing. Correctness does not
    /// depend on it (a `REMOVE` the stream overtook is dropped at delivery); OpenCTI's
    /// load after a large replay does. Returns false on shutdown.
    async fn wait_until_told(
        &self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool, ReconcileError> {
        let target = self.store.next_key(Queue::Indicators);
        let mut said = false;
        while !self.store.told_through(target)? {
            if !said {
                tracing::info!(
                    queued = self.store.len(Queue::Indicators),
                    "reconciliation waits until the replay's indicators have reached Threat Bus"
                );
                self.status.set(
                    "reconcile",
                    "waiting for the replay's indicators to reach Threat Bus",
                );
                said = true;
            }
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return Ok(false),
                _ = tokio::time::sleep(TOLD_POLL) => {}
            }
        }
        Ok(true)
    }

    fn finish(&self, ended: &Ended, report: &ReconcileReport) {
        match ended {
            Ended::Finished => {
                self.metrics.reconcile_runs.inc();
                tracing::info!(
                    checked = report.checked,
                    removed = report.removed,
                    by_reason = ?report.by_reason,
                    changed_meanwhile = report.changed_meanwhile,
                    duration_ms = report.duration_ms,
                    "reconciliation finished"
                );
                self.status.set(
                    "reconcile",
                    format!(
                        "last pass: {} checked, {} removed",
                        report.checked, report.removed
                    ),
                );
            }
            Ended::Failed(error) => {
                tracing::error!(error = %error, checked = report.checked, removed = report.removed, "reconciliation stopped: OpenCTI refused the lookup");
                self.status
                    .set("reconcile", format!("last pass failed: {error}"));
            }
            Ended::Shutdown => {}
        }
    }

    /// Checks the active entries recorded before `cutoff` (all without one).
    async fn pass(
        &mut self,
        cutoff: Option<u64>,
        retry: bool,
        report: &mut ReconcileReport,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Ended, ReconcileError> {
        let started = Instant::now();
        self.status.set("reconcile", "running");
        let mut after: Option<String> = None;
        let ended = loop {
            let page = self.store.catalog_active(after.as_deref(), CATALOG_PAGE)?;
            let Some((last, _)) = page.last() else {
                break Ended::Finished;
            };
            after = Some(last.clone());
            let candidates: Vec<(String, CatalogEntry)> = page
                .into_iter()
                .filter(|(_, entry)| cutoff.is_none_or(|c| entry.recorded_at_ms < c))
                .collect();
            let mut failed = None;
            for chunk in candidates.chunks(LOOKUP_BATCH) {
                match self.check(chunk, retry, report, shutdown).await? {
                    Ended::Finished => {}
                    other => {
                        failed = Some(other);
                        break;
                    }
                }
            }
            if let Some(ended) = failed {
                break ended;
            }
        };
        report.duration_ms = started.elapsed().as_millis() as u64;
        if let Ended::Failed(error) = &ended {
            report.error = Some(error.to_string());
        }
        Ok(ended)
    }

    /// Looks one chunk up and queues the removals it calls for.
    async fn check(
        &mut self,
        chunk: &[(String, CatalogEntry)],
        retry: bool,
        report: &mut ReconcileReport,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Ended, ReconcileError> {
        let ids: Vec<String> = chunk.iter().map(|(id, _)| id.clone()).collect();
        let mut backoff = Backoff::new(self.config.retry.clone());
        let answers = loop {
            let error = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return Ok(Ended::Shutdown),
                answer = self.client.lookup_indicators(&ids) => match answer {
                    Ok(answers) => break answers,
                    Err(error) => error,
                },
            };
            if !retry || error.is_permanent() {
                return Ok(Ended::Failed(error));
            }
            let delay = backoff.next_delay();
            tracing::warn!(error = %error, retry_s = delay.as_secs_f64(), "reconciliation: OpenCTI lookup failed, retrying");
            self.status
                .set("reconcile", format!("waiting for OpenCTI: {error}"));
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return Ok(Ended::Shutdown),
                _ = tokio::time::sleep(delay) => {}
            }
        };
        report.checked += ids.len() as u64;
        self.metrics.reconcile_checked.add(ids.len() as u64);
        let mut removals = Vec::new();
        let mut reasons = BTreeMap::new();
        for ((id, entry), found) in chunk.iter().zip(&answers) {
            let Some(gone) = verdict(id, found.as_ref(), self.config.forward_all_iocs) else {
                continue;
            };
            let body = match removal_body(&entry.body) {
                Ok(body) => body,
                Err(reason) => {
                    tracing::warn!(id = %id, %reason, "reconciliation: cannot build the REMOVE from the catalog entry");
                    report.unusable += 1;
                    continue;
                }
            };
            reasons.insert(id.clone(), gone);
            removals.push(Removal {
                stix_id: id.clone(),
                seen_recorded_at_ms: entry.recorded_at_ms,
                seen_modified_ms: entry.modified_ms,
                body,
            });
        }
        if removals.is_empty() {
            return Ok(Ended::Finished);
        }
        let wanted = removals.len();
        let (queued, _durable) = self.store.commit_removals(removals)?;
        report.changed_meanwhile += (wanted - queued.len()) as u64;
        for id in queued {
            let reason = reasons.get(&id).map(|g| g.label()).unwrap_or("gone");
            tracing::info!(id = %id, reason, "indicator gone from OpenCTI: REMOVE queued");
            *report.by_reason.entry(reason.to_owned()).or_default() += 1;
            report.removed += 1;
            self.metrics.reconcile_removed.inc();
            if report.removed_ids.len() < REPORT_IDS {
                report.removed_ids.push(id);
            }
        }
        Ok(Ended::Finished)
    }
}
