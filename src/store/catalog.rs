//! The indicator catalog: what the bridge has told Threat Bus, one entry per STIX id.
//!
//! Snapshot answers, gap reconciliation and loop-safe import all need to know the latest
//! state of every indicator the bridge forwarded. The catalog is written by the stream
//! reader **in the same sled batch** as the outbox items and the stream position
//! ([`Store::commit`](super::Store::commit)): after a crash it describes exactly what the
//! outbox will (re)send, never more, never less.
//!
//! An entry records the last operation sent for the id. A `REMOVE` takes the indicator out
//! of the active set but leaves a small tombstone (no body): a late echo or another app's
//! copy of a removed indicator is still recognised as the bridge's own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::record::{decode, encode, TAG_CATALOG};
use super::{Commit, Durable, Queue, Store, StoreError};

/// The last operation the bridge queued for Threat Bus for one indicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")] // for JSON; bincode stores the variant index
pub enum Forwarded {
    /// Sent as new (`x_threatbus_update` absent).
    Create,
    /// Sent as `EDIT`.
    Edit,
    /// Sent as `REMOVE`: tools no longer match it.
    Remove,
}

impl Forwarded {
    /// Whether tools behind Threat Bus should match the indicator after this operation.
    pub fn is_active(self) -> bool {
        self != Forwarded::Remove
    }
}

/// One catalog record (bincode; the layout is in `migrations/0002-indicator-catalog.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    pub operation: Forwarded,
    /// The indicator's STIX `modified`, in ms since the epoch (what snapshot windows use).
    pub modified_ms: i64,
    /// When the bridge wrote this entry (ms since the epoch): a replay that started after
    /// it has refreshed the entry, one that started before has not.
    pub recorded_at_ms: u64,
    /// The JSON object as queued for Threat Bus; empty for a `REMOVE` (a tombstone).
    pub body: Vec<u8>,
}

/// The leading fields of a [`CatalogEntry`]: bincode reads them without the body.
#[derive(Deserialize)]
struct EntryHead {
    operation: Forwarded,
    modified_ms: i64,
}

/// A change to the catalog, handed to [`Store::commit`](super::Store::commit) with the
/// outbox items it describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogUpdate {
    pub stix_id: String,
    pub operation: Forwarded,
    pub modified_ms: i64,
    /// The object as queued; dropped for a `REMOVE`.
    pub body: Vec<u8>,
}

/// Catalog sizes, kept in memory (counted once at open, then followed on every write).
#[derive(Default)]
pub(crate) struct CatalogCounts {
    total: AtomicU64,
    active: AtomicU64,
}

/// What a batch of catalog updates changes in the counts.
#[derive(Default)]
pub(crate) struct CountDelta {
    added: u64,
    activated: u64,
    deactivated: u64,
}

pub(crate) fn catalog_key(stix_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + stix_id.len());
    key.push(TAG_CATALOG);
    key.extend_from_slice(stix_id.as_bytes());
    key
}

fn id_of_key(key: &[u8]) -> String {
    String::from_utf8_lossy(key.get(1..).unwrap_or_default()).into_owned()
}

/// Adds `updates` to `batch` and returns how they change the counts. Reads the previous
/// state of each id (the caller holds the indicator write lock, so nothing else writes the
/// catalog meanwhile); an id updated twice in one batch counts once, by its last update.
pub(crate) fn stage(
    tree: &sled::Tree,
    batch: &mut sled::Batch,
    updates: Vec<CatalogUpdate>,
    now_ms: u64,
) -> Result<CountDelta, StoreError> {
    let mut delta = CountDelta::default();
    // id → (was present before this batch, active before this batch, active now)
    let mut seen: HashMap<String, (bool, bool, bool)> = HashMap::new();
    for update in updates {
        let key = catalog_key(&update.stix_id);
        let active = update.operation.is_active();
        let entry = CatalogEntry {
            operation: update.operation,
            modified_ms: update.modified_ms,
            recorded_at_ms: now_ms,
            body: if active { update.body } else { Vec::new() },
        };
        batch.insert(key.as_slice(), encode(&entry)?);
        match seen.get_mut(&update.stix_id) {
            Some(state) => state.2 = active,
            None => {
                // Some(active before) when the id was in the catalog already.
                let before = tree
                    .get(&key)?
                    .map(|raw| decode::<EntryHead>(&raw).is_ok_and(|h| h.operation.is_active()));
                seen.insert(
                    update.stix_id,
                    (before.is_some(), before.unwrap_or(false), active),
                );
            }
        }
    }
    for (present, was_active, active) in seen.into_values() {
        if !present {
            delta.added += 1;
        }
        match (was_active, active) {
            (false, true) => delta.activated += 1,
            (true, false) => delta.deactivated += 1,
            _ => {}
        }
    }
    Ok(delta)
}

impl CatalogCounts {
    pub(crate) fn apply(&self, delta: &CountDelta) {
        self.total.fetch_add(delta.added, Ordering::Relaxed);
        self.active.fetch_add(delta.activated, Ordering::Relaxed);
        self.active.fetch_sub(delta.deactivated, Ordering::Relaxed);
    }

    /// Counts the catalog once at open.
    pub(crate) fn count(&self, tree: &sled::Tree) -> Result<(), StoreError> {
        let (mut total, mut active) = (0, 0);
        for entry in tree.scan_prefix([TAG_CATALOG]) {
            let (_, raw) = entry?;
            total += 1;
            if decode::<EntryHead>(&raw).is_ok_and(|h| h.operation.is_active()) {
                active += 1;
            }
        }
        self.total.store(total, Ordering::Relaxed);
        self.active.store(active, Ordering::Relaxed);
        Ok(())
    }
}

/// Catalog sizes as `inspect-queue` and the metrics show them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogSize {
    /// Indicators tools should match (last sent as create or EDIT).
    pub active: u64,
    /// Every id ever forwarded, tombstones of removed ones included.
    pub total: u64,
}

impl Store {
    pub fn catalog_size(&self) -> CatalogSize {
        CatalogSize {
            active: self.catalog.active.load(Ordering::Relaxed),
            total: self.catalog.total.load(Ordering::Relaxed),
        }
    }

    /// The catalog entry of `stix_id`, active or not.
    pub fn catalog_get(&self, stix_id: &str) -> Result<Option<CatalogEntry>, StoreError> {
        self.catalog_read(stix_id)
    }

    /// The `modified` (ms) of the last version queued for `stix_id`, tombstones included,
    /// read without copying the body: the intake asks this of every indicator echo.
    pub fn catalog_modified(&self, stix_id: &str) -> Result<Option<i64>, StoreError> {
        Ok(self
            .catalog_read::<EntryHead>(stix_id)?
            .map(|head| head.modified_ms))
    }

    /// The record of `stix_id` decoded as `T` (the whole entry, or its leading fields).
    fn catalog_read<T: serde::de::DeserializeOwned>(
        &self,
        stix_id: &str,
    ) -> Result<Option<T>, StoreError> {
        match self.tree.get(catalog_key(stix_id))? {
            Some(raw) => decode(&raw)
                .map(Some)
                .map_err(|error| StoreError::Undecodable {
                    what: format!("catalog entry of {stix_id}"),
                    error,
                }),
            None => Ok(None),
        }
    }

    /// Up to `limit` active entries in id order, starting after the id `after`. An entry
    /// that cannot be decoded is skipped with a warning (the next write of its id replaces
    /// it; the outbox, not the catalog, is what guarantees delivery).
    pub fn catalog_active(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, CatalogEntry)>, StoreError> {
        let start = match after {
            // The smallest key greater than `after`'s key: the key with a 0 byte appended.
            Some(id) => {
                let mut key = catalog_key(id);
                key.push(0);
                key
            }
            None => vec![TAG_CATALOG],
        };
        let end = [TAG_CATALOG + 1];
        let mut out = Vec::new();
        for entry in self.tree.range(start..end.to_vec()) {
            if out.len() >= limit {
                break;
            }
            let (key, raw) = entry?;
            match decode::<CatalogEntry>(&raw) {
                Ok(entry) if entry.operation.is_active() => out.push((id_of_key(&key), entry)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(id = %id_of_key(&key), error = %e, "undecodable catalog entry skipped")
                }
            }
        }
        Ok(out)
    }
}

/// A `REMOVE` to queue for an indicator found gone, if its catalog entry is still the one
/// the decision was made on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub stix_id: String,
    /// `recorded_at_ms` and `modified_ms` of the entry as read before asking OpenCTI.
    pub seen_recorded_at_ms: u64,
    pub seen_modified_ms: i64,
    /// The `REMOVE` object as it is to be sent.
    pub body: Vec<u8>,
}

impl Store {
    /// Queues each removal whose catalog entry is unchanged since it was read, with its
    /// tombstone, in one atomic write; returns the ids queued. An entry the stream reader
    /// rewrote meanwhile (OpenCTI changed the indicator again after the lookup) is left
    /// alone: the stream's newer word wins over the lookup's older one. Checked under the
    /// indicator write lock, so no stream commit can slip between check and write.
    pub fn commit_removals(
        &self,
        removals: Vec<Removal>,
    ) -> Result<(Vec<String>, Durable), StoreError> {
        let _order = super::lock(&self.range(Queue::Indicators).write);
        let mut queued = Vec::new();
        let mut commit = Commit::default();
        for removal in removals {
            let unchanged = self.catalog_get(&removal.stix_id)?.is_some_and(|entry| {
                entry.operation.is_active()
                    && entry.recorded_at_ms == removal.seen_recorded_at_ms
                    && entry.modified_ms == removal.seen_modified_ms
            });
            if !unchanged {
                continue;
            }
            commit.catalog.push(CatalogUpdate {
                stix_id: removal.stix_id.clone(),
                operation: Forwarded::Remove,
                modified_ms: removal.seen_modified_ms,
                body: Vec::new(),
            });
            commit.items.push(removal.body);
            queued.push(removal.stix_id);
        }
        let durable = self.commit_locked(Queue::Indicators, commit, super::now_ms())?;
        Ok((queued, durable))
    }
}

/// Queue items read per batch when a format-1 store is upgraded.
const UPGRADE_CHUNK: usize = 1000;

/// Upgrade step 1 → 2: a format-1 store has no catalog. The indicators still queued are
/// what will be sent, so they seed it, in queue order (a later item for the same id wins).
/// Indicators delivered before the upgrade are unknown until they next change (see
/// `migrations/0002-indicator-catalog.md`). Idempotent: an upgrade interrupted by a crash
/// is simply run again at the next open (the version is bumped only after it).
pub(crate) fn seed_from_queue(tree: &sled::Tree) -> Result<(), String> {
    use super::record::{Envelope, Queue};
    let tag = Queue::Indicators.tag();
    let mut updates = Vec::new();
    let mut seeded = 0usize;
    let flush = |updates: &mut Vec<CatalogUpdate>| -> Result<(), String> {
        let mut batch = sled::Batch::default();
        stage(tree, &mut batch, std::mem::take(updates), super::now_ms())
            .map_err(|e| e.to_string())?;
        tree.apply_batch(batch).map_err(|e| e.to_string())
    };
    for entry in tree.scan_prefix([tag]) {
        let (_, raw) = entry.map_err(|e| e.to_string())?;
        // Undecodable or unkeyable items are left to the drainer, which dead-letters them.
        let Ok(envelope) = decode::<Envelope>(&raw) else {
            continue;
        };
        let Some(update) = update_for_payload(&envelope.payload) else {
            continue;
        };
        updates.push(update);
        seeded += 1;
        if updates.len() >= UPGRADE_CHUNK {
            flush(&mut updates)?;
        }
    }
    flush(&mut updates)?;
    tracing::info!(
        seeded,
        "indicator catalog seeded from the queued indicators"
    );
    Ok(())
}

/// The catalog update an indicator payload (as queued for Threat Bus) implies, or `None`
/// when it lacks a usable id, `modified` or `x_threatbus_update`.
pub fn update_for_payload(payload: &[u8]) -> Option<CatalogUpdate> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    update_for_indicator(&value, payload.to_vec())
}

/// [`update_for_payload`] for an indicator already parsed; `body` is its serialized form.
pub fn update_for_indicator(indicator: &serde_json::Value, body: Vec<u8>) -> Option<CatalogUpdate> {
    let key = crate::stix::indicator_echo_key(indicator)?;
    let operation = match key.update {
        crate::stix::Operation::Create => Forwarded::Create,
        crate::stix::Operation::Edit => Forwarded::Edit,
        crate::stix::Operation::Remove => Forwarded::Remove,
    };
    Some(CatalogUpdate {
        stix_id: key.id,
        operation,
        modified_ms: key.modified_ms,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{Commit, Queue, Store, StoreOptions};
    use super::*;

    fn update(id: &str, operation: Forwarded, modified_ms: i64) -> CatalogUpdate {
        CatalogUpdate {
            stix_id: id.to_owned(),
            operation,
            modified_ms,
            body: format!(r#"{{"id":"{id}","modified_ms":{modified_ms}}}"#).into_bytes(),
        }
    }

    fn commit(store: &Store, updates: Vec<CatalogUpdate>) {
        let items = updates.iter().map(|u| u.body.clone()).collect();
        let commit = Commit {
            items,
            catalog: updates,
            ..Commit::default()
        };
        drop(store.commit(Queue::Indicators, commit).unwrap());
    }

    fn size(active: u64, total: u64) -> CatalogSize {
        CatalogSize { active, total }
    }

    #[test]
    fn the_catalog_follows_creates_edits_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        commit(
            &store,
            vec![
                update("indicator--a", Forwarded::Create, 1),
                update("indicator--b", Forwarded::Create, 2),
                update("indicator--c", Forwarded::Create, 3),
            ],
        );
        assert_eq!(store.catalog_size(), size(3, 3));
        // In one batch: b edited twice (the last wins), c removed, a removed and re-created.
        commit(
            &store,
            vec![
                update("indicator--b", Forwarded::Edit, 5),
                update("indicator--b", Forwarded::Edit, 6),
                update("indicator--c", Forwarded::Remove, 7),
                update("indicator--a", Forwarded::Remove, 8),
                update("indicator--a", Forwarded::Create, 9),
                update("indicator--d", Forwarded::Remove, 10),
            ],
        );
        assert_eq!(store.catalog_size(), size(2, 4));
        let b = store.catalog_get("indicator--b").unwrap().unwrap();
        assert_eq!((b.operation, b.modified_ms), (Forwarded::Edit, 6));
        let c = store.catalog_get("indicator--c").unwrap().unwrap();
        assert_eq!(c.operation, Forwarded::Remove);
        assert!(c.body.is_empty(), "a tombstone keeps no body");
        let active: Vec<String> = store
            .catalog_active(None, 10)
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(active, ["indicator--a", "indicator--b"]);
        // Counted again from disk, the sizes are the same.
        store.close().unwrap();
        drop(store);
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(store.catalog_size(), size(2, 4));
    }

    #[test]
    fn active_entries_are_read_in_pages_after_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let ids: Vec<String> = (0..25).map(|i| format!("indicator--{i:03}")).collect();
        commit(
            &store,
            ids.iter()
                .enumerate()
                .map(|(i, id)| {
                    let op = if i % 5 == 0 {
                        Forwarded::Remove
                    } else {
                        Forwarded::Create
                    };
                    update(id, op, i as i64)
                })
                .collect(),
        );
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store.catalog_active(after.as_deref(), 7).unwrap();
            if page.is_empty() {
                break;
            }
            after = page.last().map(|(id, _)| id.clone());
            seen.extend(page.into_iter().map(|(id, _)| id));
        }
        let expected: Vec<String> = ids
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 5 != 0)
            .map(|(_, id)| id.clone())
            .collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn a_removal_is_queued_only_while_its_entry_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        commit(
            &store,
            vec![
                update("indicator--a", Forwarded::Create, 1),
                update("indicator--b", Forwarded::Create, 2),
                update("indicator--c", Forwarded::Create, 3),
            ],
        );
        let seen = |id: &str| store.catalog_get(id).unwrap().unwrap();
        let removal = |id: &str| {
            let entry = seen(id);
            Removal {
                stix_id: id.to_owned(),
                seen_recorded_at_ms: entry.recorded_at_ms,
                seen_modified_ms: entry.modified_ms,
                body: format!(r#"{{"id":"{id}","x_threatbus_update":"REMOVE"}}"#).into_bytes(),
            }
        };
        let (a, b, c) = (
            removal("indicator--a"),
            removal("indicator--b"),
            removal("indicator--c"),
        );
        // After the lookup, the stream edits b: its removal must not be queued.
        commit(&store, vec![update("indicator--b", Forwarded::Edit, 5)]);
        let queued_before = store.len(Queue::Indicators);
        let (queued, durable) = store.commit_removals(vec![a, b, c.clone()]).unwrap();
        durable.wait_blocking().unwrap();
        assert_eq!(queued, ["indicator--a", "indicator--c"]);
        assert_eq!(store.len(Queue::Indicators), queued_before + 2);
        assert_eq!(seen("indicator--a").operation, Forwarded::Remove);
        assert_eq!(seen("indicator--b").operation, Forwarded::Edit);
        assert_eq!(store.catalog_size(), size(1, 3));
        // A second pass finds c removed already: nothing is queued twice.
        let (queued, _) = store.commit_removals(vec![c]).unwrap();
        assert!(queued.is_empty());
        assert_eq!(store.len(Queue::Indicators), queued_before + 2);
    }

    #[test]
    fn catalog_changes_go_only_with_the_indicator_queue() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let commit = Commit {
            catalog: vec![update("indicator--a", Forwarded::Create, 1)],
            ..Commit::default()
        };
        let err = store.commit(Queue::Sightings, commit).err().unwrap();
        assert!(matches!(err, StoreError::CatalogOnSightings));
        assert_eq!(store.catalog_size(), size(0, 0));
    }
}
