//! Threat Bus subscription → sighting outbox, and echoes → the indicator drainer.
//!
//! Threat Bus gives no acknowledgement and cannot be paused, so sightings are written at
//! once (one group-committed batch per burst) and are durable within `flush_interval_ms`
//! (SPEC §2.5). Echoes of the bridge's own indicators only confirm delivery: they are
//! never written back to OpenCTI. Snapshot requests go to the snapshot task.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;
use crate::stix::{classify_bus_message, BusMessage, EchoKey};
use crate::store::{Commit, Queue, Store, StoreError};
use crate::threatbus::Incoming;

/// Messages taken from the subscription per store write at most.
const MAX_BATCH: usize = 1000;

pub struct Intake {
    store: Arc<Store>,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    echoes: mpsc::UnboundedSender<EchoKey>,
    /// Snapshot request bodies, for [`super::snapshot`].
    snapshot_requests: mpsc::UnboundedSender<String>,
    sighting_limit: u64,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Batch {
    sightings: Vec<Vec<u8>>,
    parked: Vec<(Vec<u8>, String)>,
}

impl Intake {
    pub fn new(
        store: Arc<Store>,
        incoming: mpsc::UnboundedReceiver<Incoming>,
        echoes: mpsc::UnboundedSender<EchoKey>,
        snapshot_requests: mpsc::UnboundedSender<String>,
        sighting_limit: u64,
        metrics: Arc<Metrics>,
    ) -> Self {
        Intake {
            store,
            incoming,
            echoes,
            snapshot_requests,
            sighting_limit,
            metrics,
        }
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), StoreError> {
        loop {
            let first = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
                message = self.incoming.recv() => match message {
                    Some(message) => message,
                    None => return Ok(()),
                },
            };
            let mut batch = Batch::default();
            self.take(first, &mut batch);
            while batch.sightings.len() + batch.parked.len() < MAX_BATCH {
                match self.incoming.try_recv() {
                    Ok(message) => self.take(message, &mut batch),
                    Err(_) => break,
                }
            }
            self.commit(batch)?;
        }
    }

    fn take(&self, message: Incoming, batch: &mut Batch) {
        match message {
            Incoming::Indicator(json) => match classify_bus_message("indicator", &json) {
                BusMessage::Indicator {
                    echo_key: Some(key),
                } => {
                    let _ = self.echoes.send(key);
                }
                _ => tracing::debug!(
                    "indicator from Threat Bus without a usable id/modified: skipped"
                ),
            },
            Incoming::Sighting(json) => match classify_bus_message("sighting", &json) {
                BusMessage::Sighting(_) => batch.sightings.push(json.into_bytes()),
                BusMessage::InvalidSighting(error) => {
                    tracing::warn!(%error, "invalid sighting from Threat Bus parked as a dead letter");
                    batch
                        .parked
                        .push((json.into_bytes(), format!("invalid sighting: {error}")));
                }
                _ => {}
            },
            Incoming::SnapshotRequest(json) => {
                tracing::debug!(request = %json, "snapshot request from Threat Bus");
                if self.snapshot_requests.send(json).is_err() {
                    tracing::warn!("snapshot request not answered: the snapshot task has stopped");
                }
            }
            Incoming::Unknown { suffix, body } => {
                tracing::warn!(%suffix, bytes = body.len(), "message with an unknown topic from Threat Bus skipped");
            }
        }
    }

    /// Writes the burst; beyond the sighting outbox limit, counts and logs every drop.
    fn commit(&self, mut batch: Batch) -> Result<(), StoreError> {
        let queued = self.store.len(Queue::Sightings);
        let room = self.sighting_limit.saturating_sub(queued) as usize;
        if batch.sightings.len() > room {
            let dropped = batch.sightings.split_off(room);
            self.metrics.sightings.dropped.add(dropped.len() as u64);
            for sighting in &dropped {
                tracing::error!(
                    limit = self.sighting_limit,
                    sighting = %String::from_utf8_lossy(sighting),
                    "sighting outbox full: sighting DROPPED"
                );
            }
        }
        if batch.sightings.is_empty() && batch.parked.is_empty() {
            return Ok(());
        }
        let received = batch.sightings.len() as u64;
        self.metrics.sightings.dead.add(batch.parked.len() as u64);
        let commit = Commit {
            items: batch.sightings,
            parked: batch.parked,
            ..Commit::default()
        };
        let _durable = self.store.commit(Queue::Sightings, commit)?;
        self.metrics.received(Queue::Sightings, received);
        Ok(())
    }
}
