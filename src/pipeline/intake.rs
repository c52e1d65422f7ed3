//! Threat Bus subscription → sighting and import outboxes, and echoes → the indicator drainer.
//!
//! Threat Bus gives no acknowledgement and cannot be paused, so sightings are written at
//! once (one group-committed batch per burst) and are durable within `flush_interval_ms`
//! (SPEC §2.5). Every indicator's echo key goes to the indicator drainer (it confirms the
//! bridge's own deliveries). With `threatbus.import_indicators`, an indicator that is not
//! the bridge's own is written to the import outbox the same way as a sighting. "Own" is
//! what the indicator catalog says the bridge sent: the same id with the same `modified`
//! (tombstones included), so an echo — however late, across restarts — is never imported.
//! `REMOVE`s and revoked indicators from other apps are not imported (see
//! [`crate::stix::import`]). Snapshot requests go to the snapshot task.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;
use crate::stix::import::ImportIndicator;
use crate::stix::{classify_bus_message, indicator_echo_key_of_json, BusMessage, EchoKey};
use crate::store::disk_space::{DiskSpace, Room};
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
    /// `threatbus.import_indicators`.
    import: bool,
    /// Below its sighting floor, sightings and imports are dropped (see
    /// [`crate::store::disk_space`]).
    disk: Option<Arc<DiskSpace>>,
}

#[derive(Default)]
struct Batch {
    sightings: Vec<Vec<u8>>,
    parked: Vec<(Vec<u8>, String)>,
    imports: Vec<Vec<u8>>,
    imports_parked: Vec<(Vec<u8>, String)>,
}

impl Batch {
    fn len(&self) -> usize {
        self.sightings.len() + self.parked.len() + self.imports.len() + self.imports_parked.len()
    }
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
            import: false,
            disk: None,
        }
    }

    /// Imports indicators other apps publish (`threatbus.import_indicators`).
    pub fn with_import(mut self, import: bool) -> Self {
        self.import = import;
        self
    }

    /// Drops what arrives while the data directory's disk is below the sighting floor.
    pub fn with_disk_space(mut self, disk: Arc<DiskSpace>) -> Self {
        self.disk = Some(disk);
        self
    }

    /// Below the sighting floor every write could be the one that fills the disk, which
    /// sled does not survive: the burst is dropped, each item counted and logged, as at the
    /// queue limit. Returns whether it was.
    fn dropped_for_disk(&self, batch: &mut Batch) -> bool {
        let Some(disk) = &self.disk else {
            return false;
        };
        let Room::Critical { free } = disk.room() else {
            return false;
        };
        let free_mb = free / crate::config::MB;
        let floor_mb = disk.sighting_floor() / crate::config::MB;
        let sightings = std::mem::take(&mut batch.sightings).into_iter().chain(
            std::mem::take(&mut batch.parked)
                .into_iter()
                .map(|(s, _)| s),
        );
        for sighting in sightings {
            self.metrics.sightings.dropped.inc();
            tracing::error!(free_mb, floor_mb, sighting = %String::from_utf8_lossy(&sighting), "disk full: sighting DROPPED");
        }
        let imports = std::mem::take(&mut batch.imports).into_iter().chain(
            std::mem::take(&mut batch.imports_parked)
                .into_iter()
                .map(|(s, _)| s),
        );
        for indicator in imports {
            self.metrics.imports.dropped.inc();
            tracing::error!(free_mb, floor_mb, indicator = %String::from_utf8_lossy(&indicator), "disk full: indicator from Threat Bus DROPPED");
        }
        true
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
            while batch.len() < MAX_BATCH {
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
            Incoming::Indicator(json) => self.take_indicator(json, batch),
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

    /// An indicator: its echo key to the drainer; a foreign one to the import outbox.
    fn take_indicator(&self, json: String, batch: &mut Batch) {
        let key = indicator_echo_key_of_json(&json);
        match &key {
            Some(key) => {
                let _ = self.echoes.send(key.clone());
            }
            None => tracing::debug!("indicator from Threat Bus without a usable id/modified"),
        }
        if !self.import {
            return;
        }
        if let Some(key) = &key {
            // The catalog holds what the bridge queued for Threat Bus: the same version is
            // its own echo. A read error only costs the check: the import drainer reads
            // OpenCTI before writing and finds the version not newer.
            let own = self.store.catalog_modified(&key.id).ok().flatten() == Some(key.modified_ms);
            if own {
                self.metrics.imports_skipped.inc();
                return;
            }
        }
        // Parsed whole only now: most indicators are the bridge's own echoes.
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&json) else {
            batch.imports_parked.push((
                json.into_bytes(),
                "indicator from Threat Bus is not JSON".into(),
            ));
            return;
        };
        match ImportIndicator::from_stix(&value) {
            Ok(indicator) => match indicator.ignored() {
                Some(reason) => {
                    tracing::debug!(stix_id = %indicator.stix_id, reason = reason.kind(), "indicator from Threat Bus not imported");
                    self.metrics.imports_skipped.inc();
                }
                None => batch.imports.push(json.into_bytes()),
            },
            Err(error) => {
                tracing::warn!(%error, "invalid indicator from Threat Bus parked as a dead letter");
                batch
                    .imports_parked
                    .push((json.into_bytes(), format!("invalid indicator: {error}")));
            }
        }
    }

    /// Writes the burst; beyond the sighting outbox limit, counts and logs every drop.
    fn commit(&self, mut batch: Batch) -> Result<(), StoreError> {
        if self.dropped_for_disk(&mut batch) {
            return Ok(());
        }
        self.commit_queue(Queue::Imports, batch.imports, batch.imports_parked)?;
        self.commit_queue(Queue::Sightings, batch.sightings, batch.parked)
    }

    /// Writes one queue's part of the burst. Both outboxes fed from Threat Bus share
    /// `bridge.sighting_queue_limit`: Threat Bus cannot be paused, so beyond it every drop
    /// is counted and logged.
    fn commit_queue(
        &self,
        queue: Queue,
        mut items: Vec<Vec<u8>>,
        parked: Vec<(Vec<u8>, String)>,
    ) -> Result<(), StoreError> {
        let counters = self.metrics.queue(queue);
        let room = self.sighting_limit.saturating_sub(self.store.len(queue)) as usize;
        if items.len() > room {
            let dropped = items.split_off(room);
            counters.dropped.add(dropped.len() as u64);
            for item in &dropped {
                let item = String::from_utf8_lossy(item);
                let limit = self.sighting_limit;
                match queue {
                    Queue::Imports => tracing::error!(
                        limit,
                        indicator = %item,
                        "import outbox full: indicator from Threat Bus DROPPED"
                    ),
                    _ => tracing::error!(
                        limit,
                        sighting = %item,
                        "sighting outbox full: sighting DROPPED"
                    ),
                }
            }
        }
        if items.is_empty() && parked.is_empty() {
            return Ok(());
        }
        let received = items.len() as u64;
        counters.dead.add(parked.len() as u64);
        let commit = Commit {
            items,
            parked,
            ..Commit::default()
        };
        let _durable = self.store.commit(queue, commit)?;
        self.metrics.received(queue, received);
        Ok(())
    }
}
