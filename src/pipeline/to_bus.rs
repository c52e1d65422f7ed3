//! Indicator outbox → Threat Bus, in strict stream order, confirmed by echo (SPEC §2.3, §2.6).
//!
//! ZeroMQ PUB drops silently, but Threat Bus routes every indicator back to every matching
//! subscriber, the bridge included: the echo on our own subscription is the acknowledgement.
//! Up to `inflight_window` indicators are out at once. When the oldest is not confirmed in
//! time, it and everything after it are sent again in order (go-back-N), so a create is never
//! overtaken by its update; duplicates stay bounded by the window.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::admin::Status;
use crate::config::ConfirmDelivery;
use crate::metrics::Metrics;
use crate::retry::RetryPolicy;
use crate::stix::{indicator_echo_key_of_json, EchoKey};
use crate::store::catalog::update_for_echo_key;
use crate::store::{CatalogUpdate, Item, Queue, Store, StoreError};
use crate::threatbus::{LinkState, Publisher};

/// Topic the bridge publishes indicators on.
const INDICATOR_TOPIC: &str = "stix2/indicator";
/// The most indicators a saturated window waits to have room for before it refills.
const MAX_REFILL_BATCH: usize = 32;
/// How often an idle drainer looks at the outbox even without a wake-up (belt and braces:
/// every enqueue also notifies it).
const IDLE_POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub struct ToBusConfig {
    pub window: usize,
    pub confirm: ConfirmDelivery,
    pub confirm_timeout: Duration,
    pub max_attempts: u32,
    pub retry: RetryPolicy,
}

struct InFlight {
    key: u64,
    /// When the bridge read it from the stream, for the delivery-latency histogram.
    received_at_ms: u64,
    echo: EchoKey,
    frame: String,
    attempts: u32,
    sent_at: Instant,
}

pub struct ToBus {
    store: Arc<Store>,
    link: Publisher,
    link_state: watch::Receiver<LinkState>,
    echoes: mpsc::UnboundedReceiver<EchoKey>,
    config: ToBusConfig,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    inflight: VecDeque<InFlight>,
    /// The last outbox key read; everything up to it is in flight or settled.
    cursor: Option<u64>,
    /// The link generation the in-flight indicators were sent under.
    sent_generation: u64,
}

impl ToBus {
    pub fn new(
        store: Arc<Store>,
        link: Publisher,
        link_state: watch::Receiver<LinkState>,
        echoes: mpsc::UnboundedReceiver<EchoKey>,
        config: ToBusConfig,
        status: Arc<Status>,
        metrics: Arc<Metrics>,
    ) -> Self {
        ToBus {
            store,
            link,
            link_state,
            echoes,
            config,
            status,
            metrics,
            inflight: VecDeque::new(),
            cursor: None,
            sent_generation: 0,
        }
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), StoreError> {
        let mut state = self.link_state.clone();
        let mut was_ready = false;
        loop {
            let generation = match &*state.borrow_and_update() {
                LinkState::Ready { generation, .. } => Some(*generation),
                _ => None,
            };
            let Some(generation) = generation else {
                if was_ready {
                    tracing::warn!(
                        waiting = self.store.len(Queue::Indicators),
                        "Threat Bus link down: indicators wait in the outbox"
                    );
                    was_ready = false;
                }
                self.status
                    .set("to_threatbus", "paused: Threat Bus link down");
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return Ok(()),
                    changed = state.changed() => if changed.is_err() { return Ok(()) },
                }
                continue;
            };
            if !was_ready {
                self.status.set("to_threatbus", "forwarding");
                was_ready = true;
            }
            if generation != self.sent_generation && !self.inflight.is_empty() {
                // A new subscription: whatever was out under the old one may be lost.
                tracing::info!(
                    resending = self.inflight.len(),
                    "Threat Bus subscription renewed: resending unconfirmed indicators"
                );
                self.resend_all().await;
            }
            self.fill_window().await?;
            self.wait_for_progress(&mut state, &mut shutdown).await?;
            if *shutdown.borrow() {
                return Ok(());
            }
        }
    }

    /// Sends outbox items after the cursor until the window is full.
    async fn fill_window(&mut self) -> Result<(), StoreError> {
        if !self.can_refill() {
            return Ok(());
        }
        while self.inflight.len() < self.config.window {
            let room = self.config.window - self.inflight.len();
            let items = self.store.scan(Queue::Indicators, self.cursor, room)?;
            if items.is_empty() {
                return Ok(());
            }
            let before = self.cursor;
            let mut batch = Vec::with_capacity(items.len());
            let mut told = Vec::with_capacity(items.len());
            for item in items {
                self.cursor = Some(item.key);
                if let Some((inflight, update)) = self.prepare(item)? {
                    told.push((inflight.key, update));
                    batch.push(inflight);
                }
            }
            // Recorded before they are published: an echo must find its entry, or the
            // intake would take it for another app's indicator.
            let dropped = self.store.record_told(told)?.dropped;
            if !dropped.is_empty() {
                batch.retain(|inflight| !dropped.contains(&inflight.key));
                self.metrics.reconcile_overtaken.add(dropped.len() as u64);
            }
            if batch.is_empty() {
                continue;
            }
            let frames = batch.iter().map(|i| i.frame.clone()).collect();
            match self.link.publish(frames).await {
                Ok(generation) => {
                    self.sent_generation = generation;
                    let now = Instant::now();
                    for mut inflight in batch {
                        inflight.sent_at = now;
                        self.inflight.push_back(inflight);
                    }
                    if self.config.confirm == ConfirmDelivery::None {
                        self.ack_all_sent()?;
                    }
                }
                Err(e) => {
                    // Not written: rewind so these go out once the link is back.
                    tracing::debug!(error = %e, "publish refused; waiting for the link");
                    self.cursor = before;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Under load, refill in batches: one store scan and one hand-off to the socket thread
    /// per batch of indicators, not per echo. A window with nothing in flight refills at once.
    fn can_refill(&self) -> bool {
        let refill = (self.config.window / 8).clamp(1, MAX_REFILL_BATCH);
        self.inflight.is_empty() || self.config.window - self.inflight.len() >= refill
    }

    /// Turns an outbox item into a frame and its catalog entry, or dead-letters it if it
    /// cannot be confirmed.
    fn prepare(&self, item: Item) -> Result<Option<(InFlight, CatalogUpdate)>, StoreError> {
        let json = std::str::from_utf8(&item.envelope.payload).ok();
        let echo = json.and_then(indicator_echo_key_of_json);
        let (Some(echo), Some(json)) = (echo, json) else {
            let reason =
                "not a STIX indicator with id and modified: Threat Bus could never confirm it";
            tracing::error!(key = item.key, reason, "indicator dead-lettered");
            self.store
                .dead_letter(Queue::Indicators, item.key, reason)?;
            self.metrics.indicators.dead.inc();
            return Ok(None);
        };
        let inflight = InFlight {
            key: item.key,
            echo: echo.clone(),
            frame: format!("{INDICATOR_TOPIC} {json}"),
            attempts: item.envelope.attempts,
            received_at_ms: item.envelope.received_at_ms,
            sent_at: Instant::now(),
        };
        let update = update_for_echo_key(echo, item.envelope.payload, item.envelope.received_at_ms);
        Ok(Some((inflight, update)))
    }

    fn ack_all_sent(&mut self) -> Result<(), StoreError> {
        while let Some(inflight) = self.inflight.pop_front() {
            self.settle(inflight.key)?;
            self.metrics
                .indicators
                .latency
                .observe_since(inflight.received_at_ms);
        }
        Ok(())
    }

    fn settle(&self, key: u64) -> Result<(), StoreError> {
        if self.store.ack(Queue::Indicators, key)? {
            self.metrics.indicators.delivered.inc();
        }
        Ok(())
    }

    /// Waits for an echo, a timeout of the oldest in-flight indicator, new outbox items, a
    /// link change or shutdown — and handles echoes and timeouts.
    async fn wait_for_progress(
        &mut self,
        state: &mut watch::Receiver<LinkState>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), StoreError> {
        let window_full = !self.can_refill();
        let deadline = self.head_deadline();
        let notified = self.store.notified(Queue::Indicators);
        let timed_out = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => false,
            _ = state.changed() => false,
            echo = self.echoes.recv() => {
                if let Some(echo) = echo {
                    // Settle what else has arrived too.
                    let mut confirmed = Vec::new();
                    self.on_echo(&echo, &mut confirmed);
                    while let Ok(echo) = self.echoes.try_recv() {
                        self.on_echo(&echo, &mut confirmed);
                    }
                    let settled = self.store.ack_many(Queue::Indicators, &confirmed)?;
                    self.metrics.indicators.delivered.add(settled as u64);
                }
                false
            }
            _ = sleep_until(deadline) => true,
            _ = notified, if !window_full => false,
            _ = tokio::time::sleep(IDLE_POLL), if !window_full => false,
        };
        if timed_out {
            self.on_timeout().await?;
        }
        Ok(())
    }

    fn head_deadline(&self) -> Option<Instant> {
        let head = self.inflight.front()?;
        Some(head.sent_at + self.timeout_for(head.attempts))
    }

    /// Unconfirmed for longer than this means lost; it grows with each attempt (backoff).
    fn timeout_for(&self, attempts: u32) -> Duration {
        self.config
            .confirm_timeout
            .max(self.config.retry.delay_after(attempts))
    }

    /// Matches an echo to the oldest in-flight indicator with its key; its outbox key goes
    /// to `confirmed`.
    fn on_echo(&mut self, echo: &EchoKey, confirmed: &mut Vec<u64>) {
        match self.inflight.iter().position(|i| &i.echo == echo) {
            Some(index) => {
                if let Some(inflight) = self.inflight.remove(index) {
                    confirmed.push(inflight.key);
                    self.metrics
                        .indicators
                        .latency
                        .observe_since(inflight.received_at_ms);
                }
            }
            // A late duplicate of one already confirmed, or another app's indicator.
            None => {
                tracing::trace!(id = %echo.id, "indicator from Threat Bus matches nothing in flight")
            }
        }
    }

    async fn on_timeout(&mut self) -> Result<(), StoreError> {
        let Some(head) = self.inflight.front() else {
            return Ok(());
        };
        let (key, attempts) = (head.key, head.attempts + 1);
        let error = format!(
            "no echo from Threat Bus within {:.0}s (attempt {attempts})",
            self.timeout_for(head.attempts).as_secs_f64()
        );
        if attempts >= self.config.max_attempts {
            let reason = format!("Threat Bus never confirmed it after {attempts} attempts (it drops invalid STIX silently)");
            tracing::error!(key, id = %head.echo.id, %reason, "indicator dead-lettered");
            self.inflight.pop_front();
            self.store.dead_letter(Queue::Indicators, key, &reason)?;
            self.metrics.indicators.dead.inc();
        } else {
            tracing::warn!(key, id = %head.echo.id, %error, resending = self.inflight.len(), "indicator unconfirmed: resending the window in order");
            self.store.reschedule(Queue::Indicators, key, 0, &error)?;
            self.metrics.indicators.retried.inc();
            if let Some(head) = self.inflight.front_mut() {
                head.attempts = attempts;
            }
        }
        self.resend_all().await;
        Ok(())
    }

    /// Go-back-N: sends every in-flight indicator again, oldest first.
    async fn resend_all(&mut self) {
        if self.inflight.is_empty() {
            return;
        }
        let frames = self.inflight.iter().map(|i| i.frame.clone()).collect();
        match self.link.publish(frames).await {
            Ok(generation) => {
                self.sent_generation = generation;
                let now = Instant::now();
                for inflight in &mut self.inflight {
                    inflight.sent_at = now;
                }
            }
            Err(e) => tracing::debug!(error = %e, "resend refused; waiting for the link"),
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}
