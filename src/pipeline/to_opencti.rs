//! Sighting outbox → OpenCTI sighting relationships, `concurrency` requests at a time.
//!
//! Failures are sorted by whose fault they are (SPEC §2.8):
//! - OpenCTI unreachable, 5xx, 429: an outage, not the sighting's fault. The whole drainer
//!   pauses with exponential backoff and jitter; no attempt is charged to any item, so an
//!   outage of days loses nothing and dead-letters nothing.
//! - 401/403: the token. Pause slowly and say so loudly.
//! - Missing reference / validation: this sighting. Retried a few times with backoff (the
//!   indicator may still be on its way into OpenCTI), then dead-lettered with the message.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin::Status;
use crate::metrics::Metrics;
use crate::opencti::graphql::{GraphqlClient, GraphqlError, SightingInput};
use crate::retry::{Backoff, RetryPolicy};
use crate::stix::{parse_sighting, Timestamp};
use crate::store::{now_ms, Item, Queue, Store, StoreError};

/// Store meta key of the cached organization id (`connector.entity_name`).
pub const META_ORGANIZATION_ID: &str = "organization_id";
/// How often an idle drainer looks at the outbox even without a wake-up.
const IDLE_POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct ToOpenCtiConfig {
    pub concurrency: usize,
    pub max_attempts: u32,
    pub retry: RetryPolicy,
    /// Pause after 401/403 ([`super::stream::DEFAULT_AUTH_RETRY`]).
    pub auth_retry: Duration,
    pub confidence: u8,
    pub entity_name: String,
    pub entity_description: String,
}

pub struct ToOpenCti {
    store: Arc<Store>,
    client: Arc<GraphqlClient>,
    config: ToOpenCtiConfig,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    backoff: Backoff,
    /// No new requests before this instant (an outage or an auth failure).
    paused_until: Option<Instant>,
    /// An outage is being waited out: log its end once.
    outage: Option<Instant>,
}

type Outcome = (u64, Result<String, GraphqlError>);

impl ToOpenCti {
    pub fn new(
        store: Arc<Store>,
        client: Arc<GraphqlClient>,
        config: ToOpenCtiConfig,
        status: Arc<Status>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let backoff = Backoff::new(config.retry.clone());
        ToOpenCti {
            store,
            client,
            config,
            status,
            metrics,
            backoff,
            paused_until: None,
            outage: None,
        }
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), StoreError> {
        let Some(mut organization) = self.organization(&mut shutdown).await? else {
            return Ok(());
        };
        self.status.set("to_opencti", "forwarding");
        let mut running: JoinSet<Outcome> = JoinSet::new();
        // Outbox key → (attempts so far, received at ms) of each request in flight.
        let mut claimed: HashMap<u64, (u32, u64)> = HashMap::new();
        let mut refresh_organization = false;
        loop {
            if std::mem::take(&mut refresh_organization) {
                // Our organization vanished from OpenCTI: resolve it again.
                drop(self.store.remove_meta(META_ORGANIZATION_ID)?);
                match self.organization(&mut shutdown).await? {
                    Some(id) => organization = id,
                    None => return Ok(()),
                }
            }
            if !self.paused() {
                self.fill(&mut running, &mut claimed, &organization)?;
            }
            let idle = running.len() < self.config.concurrency && !self.paused();
            let wake = self
                .paused_until
                .unwrap_or_else(|| Instant::now() + IDLE_POLL);
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => {
                    // Requests in flight stay queued: re-sent at the next start, upserted by stix_id.
                    running.abort_all();
                    return Ok(());
                }
                Some(done) = running.join_next() => {
                    if let Ok((key, result)) = done {
                        let (attempts, received_at_ms) = claimed.remove(&key).unwrap_or((0, 0));
                        if result.is_ok() {
                            self.metrics.sightings.latency.observe_since(received_at_ms);
                        }
                        refresh_organization |= self.settle(key, attempts, result, &organization)?;
                    }
                }
                _ = self.store.notified(Queue::Sightings), if idle => {}
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    fn paused(&self) -> bool {
        self.paused_until.is_some_and(|t| Instant::now() < t)
    }

    /// Starts requests for ready sightings until `concurrency` are running.
    fn fill(
        &self,
        running: &mut JoinSet<Outcome>,
        claimed: &mut HashMap<u64, (u32, u64)>,
        organization: &str,
    ) -> Result<(), StoreError> {
        let room = self.config.concurrency.saturating_sub(running.len());
        if room == 0 {
            return Ok(());
        }
        // The requests in flight are (mostly) the oldest items: passed over, not decoded.
        let fresh = self
            .store
            .next_ready_except(Queue::Sightings, now_ms(), room, |key| {
                claimed.contains_key(&key)
            })?;
        for item in fresh {
            let Some(input) = self.input(&item, organization)? else {
                continue;
            };
            claimed.insert(
                item.key,
                (item.envelope.attempts, item.envelope.received_at_ms),
            );
            let client = Arc::clone(&self.client);
            let key = item.key;
            running.spawn(async move { (key, client.create_sighting(&input).await) });
        }
        Ok(())
    }

    /// The request for one outbox item; an item that is not a sighting is dead-lettered.
    fn input(&self, item: &Item, organization: &str) -> Result<Option<SightingInput>, StoreError> {
        let parsed = std::str::from_utf8(&item.envelope.payload)
            .map_err(|e| e.to_string())
            .and_then(|json| parse_sighting(json).map_err(|e| e.to_string()));
        match parsed {
            Ok(sighting) => {
                let received = Timestamp::from_unix_millis(item.envelope.received_at_ms);
                Ok(Some(SightingInput::from_sighting(
                    &sighting,
                    organization,
                    self.config.confidence,
                    received,
                )))
            }
            Err(error) => {
                let reason = format!("not a valid STIX 2.1 sighting: {error}");
                tracing::error!(key = item.key, %reason, "sighting dead-lettered");
                self.store
                    .dead_letter(Queue::Sightings, item.key, &reason)?;
                self.metrics.sightings.dead.inc();
                Ok(None)
            }
        }
    }

    /// Records one request's outcome. Returns true when the organization must be resolved
    /// again (OpenCTI no longer knows the cached id).
    fn settle(
        &mut self,
        key: u64,
        attempts: u32,
        result: Result<String, GraphqlError>,
        organization: &str,
    ) -> Result<bool, StoreError> {
        let error = match result {
            Ok(_) => {
                if self.store.ack(Queue::Sightings, key)? {
                    self.metrics.sightings.delivered.inc();
                }
                self.recovered();
                return Ok(false);
            }
            Err(error) => error,
        };
        if error.is_auth() {
            tracing::error!(error = %error, retry_s = self.config.auth_retry.as_secs(), "OpenCTI refused the token: sightings wait in the outbox; check OPENCTI_TOKEN and the connector user's rights");
            self.status.set(
                "to_opencti",
                format!("paused: authentication failed ({error})"),
            );
            self.paused_until = Some(Instant::now() + self.config.auth_retry);
            self.outage.get_or_insert_with(Instant::now);
            return Ok(false);
        }
        if !error.is_permanent() {
            let delay = self.backoff.next_delay();
            if self.outage.is_none() {
                tracing::warn!(error = %error, waiting = self.store.len(Queue::Sightings), "OpenCTI unreachable: sightings wait in the outbox");
                self.outage = Some(Instant::now());
            }
            self.status.set(
                "to_opencti",
                format!("paused: {error}; retrying in {:.1}s", delay.as_secs_f64()),
            );
            self.paused_until = Some(Instant::now() + delay);
            return Ok(false);
        }
        if matches!(&error, GraphqlError::MissingReference { message } if message.contains(organization))
        {
            tracing::warn!(organization, "the cached organization is gone from OpenCTI");
            return Ok(true);
        }
        self.recovered();
        self.reject(key, attempts + 1, &error)?;
        Ok(false)
    }

    /// The sighting itself was refused: retry later with backoff, and dead-letter it (with
    /// its attempt count and the server's message) after `max_attempts`.
    fn reject(&self, key: u64, attempts: u32, error: &GraphqlError) -> Result<(), StoreError> {
        let message = error.to_string();
        if attempts >= self.config.max_attempts {
            self.store.reschedule(Queue::Sightings, key, 0, &message)?;
            let reason = format!("OpenCTI refused it {attempts} times: {message}");
            tracing::error!(key, %reason, "sighting dead-lettered");
            self.store.dead_letter(Queue::Sightings, key, &reason)?;
            self.metrics.sightings.dead.inc();
        } else {
            let next = now_ms() + self.config.retry.delay_after(attempts).as_millis() as u64;
            self.store
                .reschedule(Queue::Sightings, key, next, &message)?;
            self.metrics.sightings.retried.inc();
            tracing::warn!(key, attempts, error = %message, "sighting refused by OpenCTI; will retry");
        }
        Ok(())
    }

    fn recovered(&mut self) {
        self.backoff.reset();
        self.paused_until = None;
        if let Some(since) = self.outage.take() {
            tracing::info!(
                after_s = since.elapsed().as_secs(),
                waiting = self.store.len(Queue::Sightings),
                "OpenCTI reachable again: delivering waiting sightings"
            );
            self.status.set("to_opencti", "forwarding");
        }
    }

    /// The organization sightings are attributed to: cached in the store, else looked up or
    /// created, retrying until OpenCTI answers. `None` on shutdown.
    async fn organization(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<String>, StoreError> {
        if let Some(id) = self.store.meta(META_ORGANIZATION_ID)? {
            return Ok(Some(id));
        }
        let mut backoff = Backoff::new(self.config.retry.clone());
        loop {
            match self
                .client
                .get_or_create_organization(
                    &self.config.entity_name,
                    &self.config.entity_description,
                )
                .await
            {
                Ok(id) => {
                    tracing::info!(organization = %self.config.entity_name, %id, "sightings are attributed to this organization");
                    drop(self.store.set_meta(META_ORGANIZATION_ID, &id)?);
                    return Ok(Some(id));
                }
                Err(error) => {
                    let delay = if error.is_auth() {
                        self.config.auth_retry
                    } else {
                        backoff.next_delay()
                    };
                    tracing::warn!(error = %error, retry_s = delay.as_secs_f64(), organization = %self.config.entity_name, "cannot resolve the organization in OpenCTI");
                    self.status
                        .set("to_opencti", format!("waiting for OpenCTI: {error}"));
                    tokio::select! {
                        _ = shutdown.wait_for(|s| *s) => return Ok(None),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}
