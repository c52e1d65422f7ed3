//! The indicator catalog: what the bridge has told Threat Bus, one entry per STIX id.
//!
//! Snapshot answers, gap reconciliation and loop-safe import all need to know the latest
//! state of every indicator the bridge forwarded. Since format 4 the catalog is written
//! where an indicator is told, not where it is queued: the Threat Bus drainer records each
//! indicator ([`Store::record_told`]) just before it publishes it, so the echo of a
//! publication always finds its entry. Writing it with the outbox items instead (format 2
//! and 3) cost the stream reader half its rate: sled's cost is per key written, and every
//! indicator wrote two (`migrations/0004-catalog-at-delivery.md`). Where it is now, the
//! second key is written at Threat Bus's pace, a few hundred per second, far below what
//! the store sustains.
//!
//! Crash safety is the same as before, seen from the other side: an item leaves the outbox
//! only after its entry was written (the drainer records before it publishes, and acks
//! only what was published), so the catalog and the outbox together always hold every
//! indicator; after a crash, what was recorded but not acked is read, recorded (the same
//! entry again) and sent again.
//!
//! An entry records the last operation sent for the id. A `REMOVE` takes the indicator out
//! of the active set but leaves a small tombstone (no body): a late echo or another app's
//! copy of a removed indicator is still recognised as the bridge's own.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::record::{decode, encode, TAG_CATALOG};
use super::{Store, StoreError};

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
    /// When the bridge read this version from the stream (ms since the epoch: its outbox
    /// item's `received_at_ms`): a replay that started after it has refreshed the entry,
    /// one that started before has not.
    pub recorded_at_ms: u64,
    /// The JSON object as queued for Threat Bus; empty for a `REMOVE` (a tombstone).
    pub body: Vec<u8>,
}

/// The leading fields of a [`CatalogEntry`]: bincode reads them without the body.
#[derive(Deserialize)]
pub(crate) struct EntryHead {
    pub(crate) operation: Forwarded,
    pub(crate) modified_ms: i64,
    pub(crate) recorded_at_ms: u64,
}

/// An indicator about to be told to Threat Bus, as the catalog records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogUpdate {
    pub stix_id: String,
    pub operation: Forwarded,
    pub modified_ms: i64,
    /// When its outbox item was received (see [`CatalogEntry::recorded_at_ms`]).
    pub recorded_at_ms: u64,
    /// The object as queued; dropped for a `REMOVE`.
    pub body: Vec<u8>,
}

/// Catalog sizes, kept in memory (counted once at open, then followed on every write).
#[derive(Default)]
pub(crate) struct CatalogCounts {
    total: AtomicU64,
    active: AtomicU64,
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

/// Writes one entry and follows the counts. A plain insert, not a batch: each entry stands
/// on its own, the insert hands back the previous record (no read before the write), and
/// every sled batch seals an I/O buffer, which wakes all of sled's I/O threads. Only one
/// task writes the catalog (the Threat Bus drainer; the upgrade before anything runs), so
/// nothing can slip between the write and the count.
pub(crate) fn write_entry(
    tree: &sled::Tree,
    counts: &CatalogCounts,
    update: CatalogUpdate,
) -> Result<(), StoreError> {
    let active = update.operation.is_active();
    let entry = CatalogEntry {
        operation: update.operation,
        modified_ms: update.modified_ms,
        recorded_at_ms: update.recorded_at_ms,
        body: if active { update.body } else { Vec::new() },
    };
    let previous = tree.insert(catalog_key(&update.stix_id), encode(&entry)?)?;
    let was_active = match &previous {
        Some(raw) => decode::<EntryHead>(raw).is_ok_and(|h| h.operation.is_active()),
        None => false,
    };
    if previous.is_none() {
        counts.total.fetch_add(1, Ordering::Relaxed);
    }
    match (was_active, active) {
        (false, true) => {
            counts.active.fetch_add(1, Ordering::Relaxed);
        }
        (true, false) => {
            counts.active.fetch_sub(1, Ordering::Relaxed);
        }
        _ => {}
    }
    Ok(())
}

impl CatalogCounts {
    /// Counts the catalog once at open.
    pub(crate) fn count(&self, tree: &sled::Tree) -> Result<(), StoreError> {
        let (mut total, mut active) = (0, 0);
        // Every entry: touching, or the scan's pages stay resident (see `scan`).
        for entry in super::scan::touching(tree, tree.scan_prefix([TAG_CATALOG])) {
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

/// What [`Store::record_told`] decided for the indicators handed to it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Told {
    /// Outbox keys of reconciliation `REMOVE`s that the stream overtook (the indicator
    /// changed after OpenCTI was asked): taken out of the outbox, not to be sent.
    pub dropped: Vec<u64>,
}

impl Store {
    /// Records indicators the drainer is about to publish, in outbox order, each with the
    /// key of its outbox item. Call it before publishing them: their echoes must find the
    /// entries. A reconciliation `REMOVE` is checked here against the entry it was decided
    /// on ([`Store::commit_removals`]): if the stream changed the indicator since, the
    /// `REMOVE` is dropped from the outbox instead of recorded, and its key returned.
    pub fn record_told(&self, told: Vec<(u64, CatalogUpdate)>) -> Result<Told, StoreError> {
        let mut outcome = Told::default();
        for (key, update) in told {
            if update.operation == Forwarded::Remove && !self.removal_still_wanted(key, &update)? {
                outcome.dropped.push(key);
                continue;
            }
            write_entry(&self.tree, &self.catalog, update)?;
            self.told_through.fetch_max(key + 1, Ordering::Relaxed);
        }
        Ok(outcome)
    }

    /// Whether every indicator queued before `seq` (an outbox key) has been recorded as
    /// told: by this process, or by an earlier one (it then left the outbox).
    pub fn told_through(&self, seq: u64) -> Result<bool, StoreError> {
        if self.told_through.load(Ordering::Relaxed) >= seq {
            return Ok(true);
        }
        Ok(self
            .oldest_key(super::Queue::Indicators)?
            .is_none_or(|head| head >= seq))
    }

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

    /// The `modified` (ms) of the last version told for `stix_id`, tombstones included,
    /// read without copying the body: the intake asks this of every indicator echo.
    pub fn catalog_modified(&self, stix_id: &str) -> Result<Option<i64>, StoreError> {
        Ok(self
            .catalog_read::<EntryHead>(stix_id)?
            .map(|head| head.modified_ms))
    }

    /// The record of `stix_id` decoded as `T` (the whole entry, or its leading fields).
    pub(crate) fn catalog_read<T: serde::de::DeserializeOwned>(
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
        // A snapshot or a reconciliation pages through the whole catalog: touching.
        for entry in super::scan::touching(&self.tree, self.tree.range(start..end.to_vec())) {
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

/// Queue items read per batch when a format-1 store is upgraded.
const UPGRADE_CHUNK: usize = 1000;

/// Upgrade step 1 → 2: a format-1 store has no catalog. The indicators still queued are
/// what will be sent, so they seed it, in queue order (a later item for the same id wins).
/// Indicators delivered before the upgrade are unknown until they next change (see
/// `migrations/0002-indicator-catalog.md`). Since format 4 the drainer records them again
/// when it sends them; seeding still serves snapshot requests that come before that.
/// Idempotent: an upgrade interrupted by a crash is simply run again at the next open (the
/// version is bumped only after it).
pub(crate) fn seed_from_queue(tree: &sled::Tree) -> Result<(), String> {
    use super::record::{Envelope, Queue};
    let tag = Queue::Indicators.tag();
    // Counted again from disk once the store is open.
    let counts = CatalogCounts::default();
    let mut seeded = 0usize;
    let mut last = None;
    loop {
        let start = super::record::item_key(tag, last.map_or(0, |k: u64| k + 1));
        let end = super::record::item_key(tag, u64::MAX);
        let mut read = 0;
        for entry in tree.range(start..=end).take(UPGRADE_CHUNK) {
            let (key, raw) = entry.map_err(|e| e.to_string())?;
            read += 1;
            last = super::record::key_seq(&key).or(last);
            // Undecodable or unkeyable items are left to the drainer, which dead-letters them.
            let Ok(envelope) = decode::<Envelope>(&raw) else {
                continue;
            };
            let Some(update) = update_for_payload(&envelope.payload, envelope.received_at_ms)
            else {
                continue;
            };
            write_entry(tree, &counts, update).map_err(|e| e.to_string())?;
            seeded += 1;
        }
        if read < UPGRADE_CHUNK {
            break;
        }
    }
    tracing::info!(
        seeded,
        "indicator catalog seeded from the queued indicators"
    );
    Ok(())
}

/// The catalog update an indicator payload (as queued for Threat Bus) implies, or `None`
/// when it lacks a usable id, `modified` or `x_threatbus_update`.
pub fn update_for_payload(payload: &[u8], recorded_at_ms: u64) -> Option<CatalogUpdate> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let key = crate::stix::indicator_echo_key(&value)?;
    Some(update_for_echo_key(key, payload.to_vec(), recorded_at_ms))
}

/// [`update_for_payload`] once the payload's echo key is known (the drainer has it).
pub fn update_for_echo_key(
    key: crate::stix::EchoKey,
    body: Vec<u8>,
    recorded_at_ms: u64,
) -> CatalogUpdate {
    let operation = match key.update {
        crate::stix::Operation::Create => Forwarded::Create,
        crate::stix::Operation::Edit => Forwarded::Edit,
        crate::stix::Operation::Remove => Forwarded::Remove,
    };
    CatalogUpdate {
        stix_id: key.id,
        operation,
        modified_ms: key.modified_ms,
        recorded_at_ms,
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Queue, Removal, Store, StoreOptions};
    use super::*;

    fn update(id: &str, operation: Forwarded, modified_ms: i64) -> CatalogUpdate {
        CatalogUpdate {
            stix_id: id.to_owned(),
            operation,
            modified_ms,
            recorded_at_ms: modified_ms as u64 * 10,
            body: format!(r#"{{"id":"{id}","modified_ms":{modified_ms}}}"#).into_bytes(),
        }
    }

    /// Queues the updates' bodies, then tells them as the drainer does.
    fn tell(store: &Store, updates: Vec<CatalogUpdate>) -> Told {
        let items = updates.iter().map(|u| u.body.clone()).collect();
        drop(store.enqueue(Queue::Indicators, items, None).unwrap());
        let queued = store.scan(Queue::Indicators, None, usize::MAX).unwrap();
        let keys = queued[queued.len() - updates.len()..].iter().map(|i| i.key);
        store.record_told(keys.zip(updates).collect()).unwrap()
    }

    fn size(active: u64, total: u64) -> CatalogSize {
        CatalogSize { active, total }
    }

    #[test]
    fn the_catalog_follows_creates_edits_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        tell(
            &store,
            vec![
                update("indicator--a", Forwarded::Create, 1),
                update("indicator--b", Forwarded::Create, 2),
                update("indicator--c", Forwarded::Create, 3),
            ],
        );
        assert_eq!(store.catalog_size(), size(3, 3));
        // In one batch: b edited twice (the last wins), c removed, a removed and re-created.
        tell(
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
        assert_eq!(
            (b.operation, b.modified_ms, b.recorded_at_ms),
            (Forwarded::Edit, 6, 60)
        );
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
        // Told again (a resend after a crash): the same entries, the same sizes.
        tell(&store, vec![update("indicator--b", Forwarded::Edit, 6)]);
        assert_eq!(store.catalog_size(), size(2, 4));
        // Counted again from disk, the sizes are the same.
        store.close().unwrap();
        drop(store);
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(store.catalog_size(), size(2, 4));
    }

    #[test]
    fn queuing_alone_changes_nothing_in_the_catalog() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let body = update("indicator--a", Forwarded::Create, 1).body;
        drop(
            store
                .enqueue(Queue::Indicators, vec![body], Some("1-0"))
                .unwrap(),
        );
        assert_eq!(store.catalog_size(), size(0, 0));
        assert_eq!(store.catalog_modified("indicator--a").unwrap(), None);
        assert!(!store.told_through(1).unwrap(), "queued, not told yet");
        assert!(store.told_through(0).unwrap());
    }

    #[test]
    fn active_entries_are_read_in_pages_after_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let ids: Vec<String> = (0..25).map(|i| format!("indicator--{i:03}")).collect();
        tell(
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

    fn removal(store: &Store, id: &str) -> Removal {
        let entry = store.catalog_get(id).unwrap().unwrap();
        Removal {
            stix_id: id.to_owned(),
            seen_recorded_at_ms: entry.recorded_at_ms,
            seen_modified_ms: entry.modified_ms,
            body: remove_body(id, entry.modified_ms),
        }
    }

    fn remove_body(id: &str, modified_ms: i64) -> Vec<u8> {
        format!(r#"{{"id":"{id}","modified_ms":{modified_ms},"x_threatbus_update":"REMOVE"}}"#)
            .into_bytes()
    }

    /// Tells the queued items from the key after `after` on, as the drainer reads them.
    fn tell_queued(store: &Store, after: Option<u64>) -> (Told, Vec<u64>) {
        let items = store.scan(Queue::Indicators, after, usize::MAX).unwrap();
        let keys: Vec<u64> = items.iter().map(|i| i.key).collect();
        let told = items
            .into_iter()
            .map(|item| {
                let text = String::from_utf8(item.envelope.payload.clone()).unwrap();
                let value: serde_json::Value = serde_json::from_str(&text).unwrap();
                let id = value["id"].as_str().unwrap();
                let modified = value["modified_ms"].as_i64().unwrap();
                let op = if text.contains("REMOVE") {
                    Forwarded::Remove
                } else if text.contains("EDIT") {
                    Forwarded::Edit
                } else {
                    Forwarded::Create
                };
                let mut u = update(id, op, modified);
                u.recorded_at_ms = item.envelope.received_at_ms;
                u.body = item.envelope.payload;
                (item.key, u)
            })
            .collect();
        (store.record_told(told).unwrap(), keys)
    }

    #[test]
    fn a_removal_is_sent_only_while_its_entry_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        tell(
            &store,
            vec![
                update("indicator--a", Forwarded::Create, 1),
                update("indicator--b", Forwarded::Create, 2),
                update("indicator--c", Forwarded::Create, 3),
                update("indicator--d", Forwarded::Create, 4),
            ],
        );
        let told_keys: Vec<u64> = store
            .scan(Queue::Indicators, None, usize::MAX)
            .unwrap()
            .iter()
            .map(|i| i.key)
            .collect();
        store.ack_many(Queue::Indicators, &told_keys).unwrap();
        let (a, b, c, d) = (
            removal(&store, "indicator--a"),
            removal(&store, "indicator--b"),
            removal(&store, "indicator--c"),
            removal(&store, "indicator--d"),
        );
        // After the lookups, the stream edits b (told already) and queues an edit of c
        // (not told yet): neither may be removed. d is removed by the stream meanwhile.
        tell(&store, vec![update("indicator--b", Forwarded::Edit, 5)]);
        let head = store.scan(Queue::Indicators, None, 1).unwrap()[0].key;
        store.ack(Queue::Indicators, head).unwrap();
        let mut edit_c = update("indicator--c", Forwarded::Edit, 6);
        edit_c.body =
            br#"{"id":"indicator--c","modified_ms":6,"x_threatbus_update":"EDIT"}"#.to_vec();
        let remove_d = remove_body("indicator--d", 4);
        drop(
            store
                .enqueue(Queue::Indicators, vec![edit_c.body.clone(), remove_d], None)
                .unwrap(),
        );
        let (queued, durable) = store.commit_removals(vec![a, b, c, d]).unwrap();
        durable.wait_blocking().unwrap();
        // b is seen changed at once; c and d only once the drainer gets to them.
        assert_eq!(queued, ["indicator--a", "indicator--c", "indicator--d"]);
        assert_eq!(store.len(Queue::Indicators), 2 + 3);
        let (told, keys) = tell_queued(&store, None);
        assert_eq!(told.dropped.len(), 2, "the REMOVEs of c and d are dropped");
        assert_eq!(told.dropped, keys[3..].to_vec());
        assert_eq!(
            store.len(Queue::Indicators),
            3,
            "edit c, remove d, remove a"
        );
        let op = |id: &str| store.catalog_get(id).unwrap().unwrap().operation;
        assert_eq!(op("indicator--a"), Forwarded::Remove);
        assert_eq!(op("indicator--b"), Forwarded::Edit);
        assert_eq!(op("indicator--c"), Forwarded::Edit);
        assert_eq!(op("indicator--d"), Forwarded::Remove);
        assert_eq!(store.catalog_size(), size(2, 4));
        // Told again (a crash before the acks): the REMOVE of a is sent, as decided.
        let (told, _) = tell_queued(&store, None);
        assert!(told.dropped.is_empty());
        assert_eq!(store.catalog_size(), size(2, 4));
    }

    #[test]
    fn a_condition_left_behind_never_judges_another_item() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        tell(&store, vec![update("indicator--a", Forwarded::Create, 1)]);
        let a = removal(&store, "indicator--a");
        let keys: Vec<u64> = store
            .scan(Queue::Indicators, None, 10)
            .unwrap()
            .iter()
            .map(|i| i.key)
            .collect();
        store.ack_many(Queue::Indicators, &keys).unwrap();
        let (queued, _) = store.commit_removals(vec![a]).unwrap();
        assert_eq!(queued.len(), 1);
        // The REMOVE leaves the outbox another way (an operator purges it)...
        let key = store.scan(Queue::Indicators, None, 10).unwrap()[0].key;
        store.dead_letter(Queue::Indicators, key, "test").unwrap();
        store.close().unwrap();
        drop(store);
        // ...and after a restart (keys start again from the head) the stream's own REMOVE
        // of a, at the same key, is sent although a changed since the condition was set.
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        tell(&store, vec![update("indicator--a", Forwarded::Edit, 2)]);
        drop(
            store
                .enqueue(
                    Queue::Indicators,
                    vec![remove_body("indicator--a", 2)],
                    None,
                )
                .unwrap(),
        );
        let (told, _) = tell_queued(&store, None);
        assert!(told.dropped.is_empty());
        assert_eq!(store.catalog_size(), size(0, 1));
    }
}
