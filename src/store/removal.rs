//! Reconciliation `REMOVE`s, queued on a condition: the entry they were decided on.
//!
//! Reconciliation reads a catalog entry, asks OpenCTI about the indicator (seconds may
//! pass), and queues a `REMOVE` when OpenCTI no longer has it. The stream may change the
//! indicator meanwhile, and its newer word must win over the lookup's older one. Since
//! format 4 the catalog changes only when the drainer tells an indicator, and the stream's
//! newer version may still wait in the outbox when the `REMOVE` is queued behind it. So
//! the `REMOVE` goes into the outbox with a condition record beside it (`0x06` + the same
//! sequence number): the entry's `recorded_at_ms` and `modified_ms` as read. When the
//! drainer reaches it ([`Store::record_told`]), the catalog shows everything queued before
//! it, and the `REMOVE` is sent only if the entry is still the one it was decided on.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::catalog::{CatalogUpdate, EntryHead};
use super::record::{decode, encode, item_key, key_seq, TAG_CONDITION};
use super::{lock, Commit, Durable, Queue, Store, StoreError};

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

/// The condition record of a queued reconciliation `REMOVE` (bincode; layout in
/// `migrations/0004-catalog-at-delivery.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Condition {
    /// The id the `REMOVE` is for: a condition applies only to its own indicator.
    stix_id: String,
    recorded_at_ms: u64,
    modified_ms: i64,
}

fn condition_key(seq: u64) -> [u8; 9] {
    item_key(TAG_CONDITION, seq)
}

impl Store {
    /// Queues each removal whose catalog entry is unchanged so far, with its condition,
    /// in one atomic write; returns the ids queued. One whose entry the stream already
    /// changed (or removed) is left out; the drainer checks the rest again when it reaches
    /// them, against everything queued before them.
    pub fn commit_removals(
        &self,
        removals: Vec<Removal>,
    ) -> Result<(Vec<String>, Durable), StoreError> {
        let mut wanted = Vec::new();
        for removal in removals {
            let condition = Condition {
                stix_id: removal.stix_id,
                recorded_at_ms: removal.seen_recorded_at_ms,
                modified_ms: removal.seen_modified_ms,
            };
            if self.entry_unchanged(&condition)? {
                wanted.push((condition, removal.body));
            }
        }
        let queued = wanted.iter().map(|(c, _)| c.stix_id.clone()).collect();
        let _order = lock(&self.range(Queue::Indicators).write);
        // The keys the items get: the condition records go into the same batch.
        let first = self
            .range(Queue::Indicators)
            .next_seq
            .load(Ordering::Relaxed);
        let mut conditions = Vec::with_capacity(wanted.len());
        let mut commit = Commit::default();
        for (i, (condition, body)) in wanted.into_iter().enumerate() {
            conditions.push((condition_key(first + i as u64), encode(&condition)?));
            commit.items.push(body);
        }
        let written = self.commit_locked(Queue::Indicators, commit, conditions, super::now_ms())?;
        Ok((queued, self.commit.register(written)))
    }

    /// For [`Store::record_told`]: whether the `REMOVE` at outbox key `seq` is still to be
    /// sent. Unconditional ones (from the stream) always are. A conditional one is if the
    /// entry it was decided on is unchanged; its condition record is deleted before the
    /// `REMOVE` is recorded (a crash in between sends it, as decided). One the stream
    /// overtook leaves the outbox with its condition in one atomic write.
    pub(crate) fn removal_still_wanted(
        &self,
        seq: u64,
        update: &CatalogUpdate,
    ) -> Result<bool, StoreError> {
        let key = condition_key(seq);
        let Some(raw) = self.tree.get(key)? else {
            return Ok(true);
        };
        let condition = match decode::<Condition>(&raw) {
            Ok(condition) if condition.stix_id == update.stix_id => condition,
            // Not this indicator's (left over by an item that left the outbox another
            // way), or unreadable: the REMOVE goes as the stream or the operator queued it.
            _ => {
                self.tree.remove(key)?;
                return Ok(true);
            }
        };
        if self.entry_unchanged(&condition)? {
            self.tree.remove(key)?;
            return Ok(true);
        }
        tracing::info!(id = %update.stix_id, "reconciliation REMOVE dropped: the stream changed the indicator after OpenCTI was asked");
        let item = item_key(Queue::Indicators.tag(), seq);
        let mut batch = sled::Batch::default();
        batch.remove(&key);
        batch.remove(&item);
        let old = self.tree.get(item)?;
        self.tree.apply_batch(batch)?;
        if let Some(old) = old {
            self.forget_item(Queue::Indicators, &old);
        }
        Ok(false)
    }

    /// Whether the catalog entry of `condition`'s indicator is still the active one the
    /// removal was decided on: checked when the `REMOVE` is queued and again when told.
    fn entry_unchanged(&self, condition: &Condition) -> Result<bool, StoreError> {
        Ok(self
            .catalog_read::<EntryHead>(&condition.stix_id)?
            .is_some_and(|entry| {
                entry.operation.is_active()
                    && entry.recorded_at_ms == condition.recorded_at_ms
                    && entry.modified_ms == condition.modified_ms
            }))
    }

    /// At open: condition records whose `REMOVE` is no longer queued (it was parked as a
    /// dead letter, or purged) are deleted, so that a later item at the same key (keys
    /// are reused once the outbox has emptied) is never judged by them.
    pub(crate) fn drop_stale_conditions(&self) -> Result<(), StoreError> {
        let start = condition_key(0);
        let end = condition_key(u64::MAX);
        for entry in self.tree.range(start..=end) {
            let (key, _) = entry?;
            let Some(seq) = key_seq(&key) else { continue };
            if !self
                .tree
                .contains_key(item_key(Queue::Indicators.tag(), seq))?
            {
                self.tree.remove(&key)?;
            }
        }
        Ok(())
    }
}
