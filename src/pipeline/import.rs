//! Import outbox → OpenCTI: indicators other Threat Bus apps published, created or patched.
//!
//! The intake writes every foreign indicator durably at once (the bridge's own echoes and
//! `REMOVE`s never get here). This drainer takes them one at a time, in arrival order:
//! reads what OpenCTI holds under the STIX id, decides ([`plan_import`]) and writes only
//! what adds something — a create with the STIX id kept, or a patch of exactly the fields
//! that differ — so a re-delivery, an unchanged republish or a replay after a crash writes
//! nothing (OpenCTI's stream must not fill with empty updates). One at a time because two
//! versions of one indicator must not race, and because the import rate of other apps is
//! small next to the stream: a read and a write per indicator at OpenCTI's latency.
//!
//! Outages (transport, 5xx, auth) pause the drainer with backoff and are retried forever;
//! an indicator OpenCTI refuses (validation, missing reference) is retried
//! `max_attempts` times and then dead-lettered with OpenCTI's message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;

use crate::admin::Status;
use crate::metrics::Metrics;
use crate::opencti::graphql::{GraphqlClient, GraphqlError};
use crate::retry::{Backoff, RetryPolicy};
use crate::stix::import::{plan_import, ImportIndicator, ImportPlan};
use crate::store::{now_ms, Item, Queue, Store, StoreError};

/// How often an idle drainer looks for items whose retry time has come.
const IDLE_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct ImportConfig {
    pub max_attempts: u32,
    pub retry: RetryPolicy,
    /// Delay after OpenCTI refused the token.
    pub auth_retry: Duration,
}

/// What one attempt did.
#[derive(Debug, PartialEq, Eq)]
enum Done {
    Created,
    Patched(usize),
    NothingToWrite(&'static str),
}

pub struct Importer {
    store: Arc<Store>,
    client: Arc<GraphqlClient>,
    config: ImportConfig,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    backoff: Backoff,
    outage: Option<Instant>,
}

impl Importer {
    pub fn new(
        store: Arc<Store>,
        client: Arc<GraphqlClient>,
        config: ImportConfig,
        status: Arc<Status>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let backoff = Backoff::new(config.retry.clone());
        Importer {
            store,
            client,
            config,
            status,
            metrics,
            backoff,
            outage: None,
        }
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), StoreError> {
        self.status.set("import", "idle");
        loop {
            let next = self
                .store
                .next_ready(Queue::Imports, None, now_ms(), 1)?
                .into_iter()
                .next();
            let Some(item) = next else {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return Ok(()),
                    _ = self.store.notified(Queue::Imports) => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                }
                continue;
            };
            let pause = tokio::select! {
                // An attempt cut short is made again at the next start: it writes nothing
                // twice, the plan reads OpenCTI first.
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
                outcome = self.attempt(&item) => self.settle(&item, outcome)?,
            };
            if let Some(delay) = pause {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }

    /// One indicator: read what OpenCTI holds, plan, write what adds something. `Err(None)`
    /// when the payload itself is unusable (dead-letter at once).
    async fn attempt(&self, item: &Item) -> Result<Done, Option<GraphqlError>> {
        let indicator = match serde_json::from_slice::<Value>(&item.envelope.payload)
            .map_err(|e| e.to_string())
            .and_then(|value| ImportIndicator::from_stix(&value).map_err(|e| e.to_string()))
        {
            Ok(indicator) => indicator,
            Err(reason) => {
                tracing::error!(key = item.key, %reason, "queued import is not a usable indicator");
                return Err(None);
            }
        };
        let target = self
            .client
            .read_import_target(&indicator.stix_id)
            .await
            .map_err(Some)?;
        let plan = plan_import(&indicator, target.as_ref().map(|t| &t.fields)).map_err(|e| {
            Some(GraphqlError::Other {
                message: e.to_string(),
            })
        })?;
        match plan {
            ImportPlan::Create => {
                let written = self
                    .client
                    .create_indicator(&indicator)
                    .await
                    .map_err(Some)?;
                tracing::info!(stix_id = %indicator.stix_id, opencti_id = %written.id, standard_id = %written.standard_id, "indicator from Threat Bus created in OpenCTI");
                Ok(Done::Created)
            }
            ImportPlan::Patch { id, changes } => {
                self.client
                    .patch_indicator(&id, &changes)
                    .await
                    .map_err(Some)?;
                let fields: Vec<&str> = changes.iter().map(|c| c.key()).collect();
                tracing::info!(stix_id = %indicator.stix_id, opencti_id = %id, ?fields, "indicator from Threat Bus updated in OpenCTI");
                Ok(Done::Patched(changes.len()))
            }
            ImportPlan::NoWrite(reason) => {
                tracing::debug!(stix_id = %indicator.stix_id, reason = reason.kind(), "indicator from Threat Bus adds nothing to OpenCTI");
                Ok(Done::NothingToWrite(reason.kind()))
            }
        }
    }

    /// Records an attempt's outcome; returns how long to pause the drainer (an outage).
    fn settle(
        &mut self,
        item: &Item,
        outcome: Result<Done, Option<GraphqlError>>,
    ) -> Result<Option<Duration>, StoreError> {
        let error = match outcome {
            Ok(done) => {
                if self.store.ack(Queue::Imports, item.key)? {
                    self.metrics.imports.delivered.inc();
                    self.metrics
                        .imports
                        .latency
                        .observe_since(item.envelope.received_at_ms);
                }
                if let Done::NothingToWrite(_) = done {
                    self.metrics.imports_unchanged.inc();
                }
                self.recovered();
                return Ok(None);
            }
            Err(None) => {
                let reason = "not a STIX 2.1 indicator the bridge can import";
                self.store.dead_letter(Queue::Imports, item.key, reason)?;
                self.metrics.imports.dead.inc();
                return Ok(None);
            }
            Err(Some(error)) => error,
        };
        if error.is_auth() || !error.is_permanent() {
            let delay = if error.is_auth() {
                self.config.auth_retry
            } else {
                self.backoff.next_delay()
            };
            if self.outage.is_none() {
                tracing::warn!(error = %error, waiting = self.store.len(Queue::Imports), "OpenCTI unreachable: imported indicators wait in the outbox");
                self.outage = Some(Instant::now());
            }
            self.status.set(
                "import",
                format!("paused: {error}; retrying in {:.1}s", delay.as_secs_f64()),
            );
            return Ok(Some(delay));
        }
        self.recovered();
        super::refusal::refused(
            &self.store,
            &self.metrics.imports,
            Queue::Imports,
            item.key,
            item.envelope.attempts + 1,
            self.config.max_attempts,
            &self.config.retry,
            &error.to_string(),
            "imported indicator",
        )?;
        Ok(None)
    }

    fn recovered(&mut self) {
        self.backoff.reset();
        if let Some(since) = self.outage.take() {
            tracing::info!(
                after_s = since.elapsed().as_secs(),
                waiting = self.store.len(Queue::Imports),
                "OpenCTI reachable again: importing waiting indicators"
            );
        }
        self.status.set("import", "importing");
    }
}
