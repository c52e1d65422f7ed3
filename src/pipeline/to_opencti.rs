//! Sighting outbox → OpenCTI sighting relationships, `concurrency` requests at a time.
//!
//! Failures are sorted by whose fault they are (SPEC §2.8):
//! - OpenCTI unreachable, 5xx, 429: an outage, not the sighting's fault. The whole drainer
//!   pauses; no attempt is charged to any item, so an outage of days loses nothing and
//!   dead-letters nothing. While it lasts OpenCTI is *probed*: one request at a time, never
//!   `concurrency`, each failed probe one step of the backoff (capped at
//!   `bridge.probe_max_ms`). The requests that were in flight when the outage began fail
//!   too, but they are the same news, not more of it: they do not move the backoff. So the
//!   first probe after OpenCTI's return comes within the cap, after an outage of any
//!   length, and the first answer opens the drainer to full concurrency again.
//! - 401/403: the token. Pause slowly and say so loudly.
//! - Missing reference / validation: this sighting. Retried a few times with backoff (the
//!   indicator may still be on its way into OpenCTI), then dead-lettered with the message.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
// Tokio's clock, so that outages of hours can be proven on a paused clock.
use tokio::time::Instant;

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

/// What the drainer needs from OpenCTI: [`GraphqlClient`] in the daemon, an in-memory
/// peer in the tests that prove outage recovery on a paused clock.
pub trait SightingApi: Send + Sync + 'static {
    /// Creates (or upserts by `stix_id`) one sighting relationship; its internal id.
    fn create_sighting(
        &self,
        input: &SightingInput,
    ) -> impl Future<Output = Result<String, GraphqlError>> + Send;

    /// The internal id of the organization `name`, created when OpenCTI has none.
    fn get_or_create_organization(
        &self,
        name: &str,
        description: &str,
    ) -> impl Future<Output = Result<String, GraphqlError>> + Send;
}

impl SightingApi for GraphqlClient {
    fn create_sighting(
        &self,
        input: &SightingInput,
    ) -> impl Future<Output = Result<String, GraphqlError>> + Send {
        GraphqlClient::create_sighting(self, input)
    }

    fn get_or_create_organization(
        &self,
        name: &str,
        description: &str,
    ) -> impl Future<Output = Result<String, GraphqlError>> + Send {
        GraphqlClient::get_or_create_organization(self, name, description)
    }
}

#[derive(Debug, Clone)]
pub struct ToOpenCtiConfig {
    pub concurrency: usize,
    pub max_attempts: u32,
    /// Per sighting: the delays between the attempts of one OpenCTI refused.
    pub retry: RetryPolicy,
    /// While OpenCTI is down: the delays between probes ([`RetryPolicy::probe`]).
    pub probe: RetryPolicy,
    /// Pause after 401/403 ([`super::stream::DEFAULT_AUTH_RETRY`]).
    pub auth_retry: Duration,
    pub confidence: u8,
    pub entity_name: String,
    pub entity_description: String,
}

pub struct ToOpenCti<C: SightingApi = GraphqlClient> {
    store: Arc<Store>,
    client: Arc<C>,
    config: ToOpenCtiConfig,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    /// Between probes while OpenCTI is down: driven by failed probes only.
    backoff: Backoff,
    /// No new requests before this instant (an outage or an auth failure).
    paused_until: Option<Instant>,
    /// An outage is being waited out since then: one probe at a time, and its end is
    /// logged once.
    outage: Option<Instant>,
    /// The outbox key of the probe in flight, if one is.
    probe: Option<u64>,
}

type Outcome = (u64, Result<String, GraphqlError>);

impl<C: SightingApi> ToOpenCti<C> {
    pub fn new(
        store: Arc<Store>,
        client: Arc<C>,
        config: ToOpenCtiConfig,
        status: Arc<Status>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let backoff = Backoff::new(config.probe.clone());
        ToOpenCti {
            store,
            client,
            config,
            status,
            metrics,
            backoff,
            paused_until: None,
            outage: None,
            probe: None,
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
            let idle = running.len() < self.room() && !self.paused();
            // A pause that is over must not be the wake-up: a deadline in the past wakes at
            // once, and the loop would spin while the probe is in flight.
            let now = Instant::now();
            let wake = self
                .paused_until
                .filter(|until| *until > now)
                .unwrap_or(now + IDLE_POLL);
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
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    fn paused(&self) -> bool {
        self.paused_until.is_some_and(|t| Instant::now() < t)
    }

    /// Requests that may run at once: `concurrency`, but one (the probe) during an outage.
    fn room(&self) -> usize {
        if self.outage.is_some() {
            1
        } else {
            self.config.concurrency
        }
    }

    /// Starts requests for ready sightings until `concurrency` are running; during an
    /// outage, one probe once the previous one has settled and its delay has passed (the
    /// requests still in flight from before the outage do not count: they are not probes).
    fn fill(
        &mut self,
        running: &mut JoinSet<Outcome>,
        claimed: &mut HashMap<u64, (u32, u64)>,
        organization: &str,
    ) -> Result<(), StoreError> {
        let room = if self.outage.is_some() {
            usize::from(self.probe.is_none())
        } else {
            self.config.concurrency.saturating_sub(running.len())
        };
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
            if self.outage.is_some() {
                self.probe = Some(key);
            }
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
        // Whether this answer is news about OpenCTI: the probe's, or any while it was up.
        // A request sent before the outage began failing now tells nothing new.
        let probe = self.probe == Some(key);
        if probe {
            self.probe = None;
        }
        let news = probe || self.outage.is_none();
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
            if news {
                self.paused_until = Some(Instant::now() + self.config.auth_retry);
            }
            self.outage.get_or_insert_with(Instant::now);
            return Ok(false);
        }
        if !error.is_permanent() {
            if !news {
                return Ok(false);
            }
            let delay = self.backoff.next_delay();
            if self.outage.is_none() {
                tracing::warn!(error = %error, waiting = self.store.len(Queue::Sightings), "OpenCTI unreachable: sightings wait in the outbox; probing it with one request at a time");
                self.outage = Some(Instant::now());
            }
            self.status.set(
                "to_opencti",
                format!(
                    "paused: {error}; probing again in {:.1}s",
                    delay.as_secs_f64()
                ),
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
        super::refusal::refused(
            &self.store,
            &self.metrics.sightings,
            Queue::Sightings,
            key,
            attempts,
            self.config.max_attempts,
            &self.config.retry,
            &error.to_string(),
            "sighting",
        )
    }

    fn recovered(&mut self) {
        self.backoff.reset();
        self.paused_until = None;
        self.probe = None;
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
        // One request at a time already: each failure is one probe of OpenCTI.
        let mut backoff = Backoff::new(self.config.probe.clone());
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
