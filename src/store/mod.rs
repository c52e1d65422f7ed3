//! The durable outbox: two queues (indicators, sightings), dead letters, the SSE position,
//! the indicator catalog ([`catalog`]) and a little metadata, in one sled database.
//!
//! Writers get a [`Durable`] handle that resolves once a group-commit flush covers them.
//! Counts are kept in memory (counted once at open), so `len` and `oldest_age` never scan.

pub mod catalog;
mod commit;
pub mod damage;
pub mod disk_space;
mod error;
mod migrate;
mod record;
mod removal;
mod scan;
pub mod sidecar;
mod watermark;

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

pub use catalog::{CatalogEntry, CatalogSize, CatalogUpdate, Forwarded, Told};
pub use commit::Durable;
pub use error::StoreError;
pub use migrate::CURRENT_FORMAT;
pub use record::{now_ms, DeadItem, DeadLetter, Envelope, Item, Queue};
pub use removal::Removal;
pub use watermark::Resume;

use catalog::CatalogCounts;
use commit::GroupCommit;
use record::{decode, encode, item_key, key_seq, META_STREAM_POSITION, TAG_DEAD, TAG_META};
use sidecar::{Checkpoint, Closed, Held};
use watermark::Watermarks;

/// The sled database lives in this subdirectory of `bridge.data_dir`; the admin socket
/// sits beside it.
pub const STORE_SUBDIR: &str = "store";

/// sled's page cache in MiB (`bridge.cache_mb`). The outbox is read mostly at its head and
/// tail, and catalog lookups by id hit random pages that no cache of a bounded size holds,
/// so a small cache serves it: writing 1,000,000 indicators took 53 s with 16 MiB, 65 s
/// with 128 MiB (the same bench, noisy machine).
///
/// Measured (`cargo bench --bench memory`: 1,000,000 indicators of 1.4 KiB queued with
/// their catalog entries, the daemon restarted on them; RSS settled / peak): 16 MiB
/// 92 / 108 MB, 128 MiB 197 / 213 MB; under the 256 MB target either way, since the
/// open-time scans no longer leave sled's pages resident (`scan`). The smaller cache
/// also writes faster, hence the default.
pub const DEFAULT_CACHE_MB: u64 = 16;
const DEFAULT_CACHE_BYTES: u64 = DEFAULT_CACHE_MB * 1024 * 1024;

/// Tunables of the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Longest a write waits for its group-commit flush.
    pub flush_interval: Duration,
    /// A flush starts at once when this many items are waiting for it.
    pub flush_max_items: usize,
    pub cache_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            flush_interval: Duration::from_millis(10),
            flush_max_items: 1000,
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

/// sled's own periodic flush (its default, set here because [`Store::commit_replayable`]
/// relies on it): the most of a quiet stream's writes a crash can lose, all read again
/// from the stream. Two flushes a second cost nothing; the group commit flushes sooner
/// whenever a sighting or import is waiting.
pub const REPLAYABLE_FLUSH_MS: u64 = 500;

/// sled 0.34 releases its file lock only when its background threads have stopped, a
/// little after the `Db` is dropped (spacejam/sled#1289): a lock held by this very process
/// a moment ago is waited for this long before another process is blamed.
const LOCK_WAIT: Duration = Duration::from_secs(1);

fn open_sled(path: &Path, options: &StoreOptions) -> Result<sled::Db, StoreError> {
    let config = sled::Config::new()
        .path(path)
        .cache_capacity(options.cache_bytes)
        .flush_every_ms(Some(REPLAYABLE_FLUSH_MS))
        .mode(sled::Mode::HighThroughput);
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let mut pause = Duration::from_millis(5);
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            Err(e) => match StoreError::from_open(path.to_path_buf(), e) {
                StoreError::Locked { .. } if std::time::Instant::now() < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                other => return Err(other),
            },
        }
    }
}

/// Which dead letters a maintenance command applies to.
#[derive(Debug, Clone, Default)]
pub struct DeadFilter {
    /// Only dead letters from this queue.
    pub queue: Option<Queue>,
    /// Only these dead-letter keys; empty = all.
    pub keys: Vec<u64>,
}

impl DeadFilter {
    fn matches(&self, item: &DeadItem) -> bool {
        self.queue.is_none_or(|q| q == item.letter.queue)
            && (self.keys.is_empty() || self.keys.contains(&item.key))
    }
}

/// Per-range bookkeeping, so that counts never need a scan.
#[derive(Default)]
struct Range {
    next_seq: AtomicU64,
    len: AtomicU64,
    retrying: AtomicU64,
    /// Serializes sequence allocation with the write, so key order is commit order.
    write: Mutex<()>,
}

pub struct Store {
    /// Wakes a queue's drainer when items arrive (one drainer per queue).
    arrivals: [tokio::sync::Notify; 3],
    db: sled::Db,
    tree: sled::Tree,
    commit: GroupCommit,
    path: PathBuf,
    format_found: u32,
    indicators: Range,
    sightings: Range,
    imports: Range,
    dead: Range,
    catalog: CatalogCounts,
    /// One past the newest outbox key this process recorded in the catalog.
    told_through: AtomicU64,
    /// The resume point of each commit still holding undelivered indicators.
    watermarks: Mutex<Watermarks>,
}

/// One atomic write: items for a queue, items parked as dead letters on arrival (payload,
/// reason) and the new stream position (only with the indicator queue). Empty parts are
/// left out. The indicator catalog is not part of it: the drainer records an indicator
/// when it tells Threat Bus ([`Store::record_told`]).
#[derive(Debug, Default)]
pub struct Commit {
    pub items: Vec<Vec<u8>>,
    pub parked: Vec<(Vec<u8>, String)>,
    pub position: Option<String>,
}

impl Store {
    /// Opens (or creates) the store in `data_dir`, checking and upgrading its format.
    pub fn open(data_dir: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
        let store = Store::open_unverified(data_dir, options)?;
        store.forget_closed()?;
        Ok(store)
    }

    /// Before anything can change the store: the exact claims of a clean close no longer
    /// hold once it is open (a maintenance command may purge or requeue). [`damage`]
    /// compares them first.
    pub(crate) fn forget_closed(&self) -> Result<(), StoreError> {
        sidecar::forget_closed(self.data_dir())
    }

    /// [`Store::open`], leaving the checkpoint file as it is.
    pub(crate) fn open_unverified(
        data_dir: &Path,
        options: &StoreOptions,
    ) -> Result<Store, StoreError> {
        let path = data_dir.join(STORE_SUBDIR);
        let db = open_sled(&path, options)?;
        let tree = db.open_tree("outbox")?;
        let format_found = migrate::check_and_upgrade(&tree, &path)?;
        let commit =
            GroupCommit::start(db.clone(), options.flush_interval, options.flush_max_items);
        let store = Store {
            arrivals: Default::default(),
            db,
            tree,
            commit,
            path,
            format_found,
            indicators: Range::default(),
            sightings: Range::default(),
            imports: Range::default(),
            dead: Range::default(),
            catalog: CatalogCounts::default(),
            told_through: AtomicU64::new(0),
            watermarks: Mutex::default(),
        };
        store.count_all()?;
        store.catalog.count(&store.tree)?;
        store.drop_stale_conditions()?;
        // Items queued before this open were read at or after the last checkpoint's
        // watermark; without one, only a full replay is sure to cover them.
        let carried = sidecar::read(data_dir)
            .map(|c| c.watermark)
            .unwrap_or_default();
        let current = Resume {
            position: store.position()?,
            recover_until: store.meta(RECOVER_UNTIL_META)?,
        };
        let head = store.oldest_key(Queue::Indicators)?;
        *lock_watermarks(&store.watermarks) = Watermarks::new(current, head, carried);
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format version the store had when opened (0 = created by this open).
    pub fn format_found(&self) -> u32 {
        self.format_found
    }

    // ----- writing -------------------------------------------------------------------

    /// Appends `payloads` to `queue` and, for the indicator queue, stores `position` after
    /// them: after a crash the position never points past a lost item.
    pub fn enqueue(
        &self,
        queue: Queue,
        payloads: Vec<Vec<u8>>,
        position: Option<&str>,
    ) -> Result<Durable, StoreError> {
        let commit = Commit {
            items: payloads,
            position: position.map(str::to_owned),
            ..Commit::default()
        };
        self.commit(queue, commit)
    }

    /// The general write (the stream reader's and the intake's): everything in `commit`
    /// written so that after a crash the position never points past a lost item (see
    /// `commit_locked`); the handle resolves once a group-commit flush covers it.
    pub fn commit(&self, queue: Queue, commit: Commit) -> Result<Durable, StoreError> {
        if queue != Queue::Indicators && commit.position.is_some() {
            return Err(StoreError::PositionOnSightings);
        }
        let _order = lock(&self.range(queue).write);
        let written = self.commit_locked(queue, commit, Vec::new(), now_ms())?;
        Ok(self.commit.register(written))
    }

    /// [`Store::commit`] for what the OpenCTI stream can give again (the stream reader's
    /// indicators, dead letters and position): it asks for no flush of its own and becomes
    /// durable with the next flush anyone asks for, or sled's periodic one
    /// ([`REPLAYABLE_FLUSH_MS`]). A crash before that loses a suffix of the writes, the
    /// position with its items (sled recovers a prefix of its log), and the stream gives
    /// them again. Not asking saves a flush per linger interval on a steady stream: each
    /// one wakes every idle sled I/O thread (its pool notifies all of them per write),
    /// which was about a third of the bridge's CPU per indicator at 500/s.
    pub fn commit_replayable(&self, commit: Commit) -> Result<(), StoreError> {
        let _order = lock(&self.range(Queue::Indicators).write);
        self.commit_locked(Queue::Indicators, commit, Vec::new(), now_ms())
            .map(drop)
    }

    /// [`Store::commit`] once the queue's write lock is held (the caller may have had to
    /// know the items' keys: see [`Store::commit_removals`]); `extra` records go into the
    /// same batch. Returns how many items were written, for the group commit's count; the
    /// caller decides whether to wait for a flush.
    fn commit_locked(
        &self,
        queue: Queue,
        commit: Commit,
        extra: Vec<([u8; 9], Vec<u8>)>,
        now: u64,
    ) -> Result<usize, StoreError> {
        let Commit {
            items: payloads,
            parked,
            position,
        } = commit;
        let range = self.range(queue);
        let _dead_order = (!parked.is_empty()).then(|| lock(&self.dead.write));
        let items = payloads.len();
        let first = range.next_seq.load(Ordering::Relaxed);
        let parked_count = parked.len();
        let first_dead = self.dead.next_seq.load(Ordering::Relaxed);
        // Everything encoded before anything is written: an encoding error writes nothing.
        // With `extra` records (a reconciliation's conditions), the whole commit is one
        // sled batch: a condition left without its `REMOVE` could meet a later item that
        // reuses the key. Those commits are rare.
        let atomic = !extra.is_empty();
        let mut records = Vec::with_capacity(extra.len() + items + parked_count + 1);
        records.extend(extra);
        for (i, payload) in payloads.into_iter().enumerate() {
            let envelope = Envelope::new(payload, now);
            records.push((item_key(queue.tag(), first + i as u64), encode(&envelope)?));
        }
        for (i, (payload, reason)) in parked.into_iter().enumerate() {
            let letter = DeadLetter {
                queue,
                original_key: None,
                dead_at_ms: now,
                reason,
                envelope: Envelope::new(payload, now),
            };
            records.push((item_key(TAG_DEAD, first_dead + i as u64), encode(&letter)?));
        }
        let outcome = if atomic {
            let mut batch = sled::Batch::default();
            for (key, value) in records {
                batch.insert(&key, value);
            }
            if let Some(position) = &position {
                batch.insert(META_STREAM_POSITION, position.as_bytes());
            }
            self.tree.apply_batch(batch)
        } else {
            // Otherwise plain inserts in this order, not one sled batch: every batch seals
            // sled's I/O buffer twice (`pin_log`), each seal a write + `sync_file_range`
            // on an I/O thread that wakes all of them; at a steady 500 events/s that was a
            // third of the bridge's CPU. The order gives what the stream needs, because
            // sled recovers a prefix of its log: the position goes last, so it never
            // points past a lost item, and a crash in between only has events read again.
            records
                .into_iter()
                .try_for_each(|(key, value)| self.tree.insert(key, value).map(drop))
                .and_then(|()| match &position {
                    Some(position) => self
                        .tree
                        .insert(META_STREAM_POSITION, position.as_bytes())
                        .map(drop),
                    None => Ok(()),
                })
        };
        if let Err(error) = outcome {
            // Keys are never handed out twice, whatever part was written: the caller stops
            // (a store error ends the task and the daemon), and the next open counts what
            // is there.
            range
                .next_seq
                .fetch_max(first + items as u64, Ordering::Relaxed);
            self.dead
                .next_seq
                .fetch_max(first_dead + parked_count as u64, Ordering::Relaxed);
            return Err(error.into());
        }
        if queue == Queue::Indicators && (items > 0 || position.is_some()) {
            let recover_until = self.meta(RECOVER_UNTIL_META)?;
            lock_watermarks(&self.watermarks).on_commit(
                first,
                items,
                position.as_deref(),
                recover_until,
            );
        }
        range
            .next_seq
            .store(first + items as u64, Ordering::Relaxed);
        range.len.fetch_add(items as u64, Ordering::Relaxed);
        self.dead
            .next_seq
            .store(first_dead + parked_count as u64, Ordering::Relaxed);
        self.dead
            .len
            .fetch_add(parked_count as u64, Ordering::Relaxed);
        if items > 0 {
            // The drainer sends what is visible; durability is the writer's concern (a
            // permit is stored if the drainer is not waiting right now).
            self.arrivals[queue_index(queue)].notify_one();
        }
        Ok(items + parked_count)
    }

    /// Advances the stream position alone (an event that carries no indicator).
    pub fn set_position(&self, position: &str) -> Result<Durable, StoreError> {
        self.enqueue(Queue::Indicators, Vec::new(), Some(position))
    }

    /// Parks one item as a dead letter on arrival (it never entered its queue).
    pub fn park(
        &self,
        queue: Queue,
        payload: Vec<u8>,
        reason: String,
    ) -> Result<Durable, StoreError> {
        let commit = Commit {
            parked: vec![(payload, reason)],
            ..Commit::default()
        };
        self.commit(queue, commit)
    }

    /// Stores a small metadata value (organization id, Threat Bus topic).
    pub fn set_meta(&self, name: &str, value: &str) -> Result<Durable, StoreError> {
        self.tree.insert(meta_key(name), value.as_bytes())?;
        Ok(self.commit.register(0))
    }

    pub fn remove_meta(&self, name: &str) -> Result<Durable, StoreError> {
        self.tree.remove(meta_key(name))?;
        Ok(self.commit.register(0))
    }

    /// Sets (`Some`) or removes (`None`) several metadata values in one atomic write.
    pub fn update_meta(&self, changes: &[(&str, Option<&str>)]) -> Result<Durable, StoreError> {
        let mut batch = sled::Batch::default();
        for (name, value) in changes {
            match value {
                Some(value) => batch.insert(meta_key(name), value.as_bytes()),
                None => batch.remove(meta_key(name)),
            }
        }
        self.tree.apply_batch(batch)?;
        Ok(self.commit.register(0))
    }

    // ----- reading -------------------------------------------------------------------

    pub fn position(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .tree
            .get(META_STREAM_POSITION)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn meta(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .tree
            .get(meta_key(name))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Up to `limit` items of `queue` in key order, starting after `after`. Records that
    /// cannot be decoded are moved to the dead letters on the way (they can never be sent).
    pub fn scan(
        &self,
        queue: Queue,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Item>, StoreError> {
        self.scan_where(queue, after, limit, |_| false, |_| true)
    }

    /// Like [`scan`](Self::scan), but only items whose next attempt is due at `now_ms`.
    pub fn next_ready(
        &self,
        queue: Queue,
        after: Option<u64>,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Item>, StoreError> {
        self.scan_where(
            queue,
            after,
            limit,
            |_| false,
            |e| e.next_attempt_ms <= now_ms,
        )
    }

    /// Like [`next_ready`](Self::next_ready) from the head, passing over the keys `skip`
    /// names without decoding them: a drainer's items in flight sit at the head of the
    /// queue, and decoding them again on every refill cost as much as the new items.
    pub fn next_ready_except(
        &self,
        queue: Queue,
        now_ms: u64,
        limit: usize,
        skip: impl Fn(u64) -> bool,
    ) -> Result<Vec<Item>, StoreError> {
        self.scan_where(queue, None, limit, skip, |e| e.next_attempt_ms <= now_ms)
    }

    fn scan_where(
        &self,
        queue: Queue,
        after: Option<u64>,
        limit: usize,
        skip: impl Fn(u64) -> bool,
        keep: impl Fn(&Envelope) -> bool,
    ) -> Result<Vec<Item>, StoreError> {
        let mut items = Vec::new();
        for entry in self.tree.range(seq_range(queue.tag(), after)) {
            if items.len() >= limit {
                break;
            }
            let (key, raw) = entry?;
            let Some(seq) = key_seq(&key) else { continue };
            if skip(seq) {
                continue;
            }
            match decode::<Envelope>(&raw) {
                Ok(envelope) if keep(&envelope) => items.push(Item { key: seq, envelope }),
                Ok(_) => {}
                Err(e) => self.park_undecodable(queue, seq, raw.to_vec(), &e)?,
            }
        }
        Ok(items)
    }

    /// Up to `limit` dead letters in key order, starting after `after`.
    pub fn dead_letters(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeadItem>, StoreError> {
        let mut items = Vec::new();
        for entry in self.tree.range(seq_range(TAG_DEAD, after)).take(limit) {
            let (key, raw) = entry?;
            let Some(seq) = key_seq(&key) else { continue };
            items.push(DeadItem {
                key: seq,
                letter: decode_dead(&raw),
            });
        }
        Ok(items)
    }

    /// Resolves when items arrive in `queue` (at once if some arrived since the last call).
    pub fn notified(&self, queue: Queue) -> tokio::sync::futures::Notified<'_> {
        self.arrivals[queue_index(queue)].notified()
    }

    /// The key the next item queued in `queue` gets.
    pub fn next_key(&self, queue: Queue) -> u64 {
        self.range(queue).next_seq.load(Ordering::Relaxed)
    }

    pub fn len(&self, queue: Queue) -> u64 {
        self.range(queue).len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self, queue: Queue) -> bool {
        self.len(queue) == 0
    }

    pub fn dead_len(&self) -> u64 {
        self.dead.len.load(Ordering::Relaxed)
    }

    /// Items of `queue` that failed at least once and wait for another attempt.
    pub fn retrying(&self, queue: Queue) -> u64 {
        self.range(queue).retrying.load(Ordering::Relaxed)
    }

    /// When the oldest queued item was received (ms since the epoch).
    pub fn oldest_received_ms(&self, queue: Queue) -> Result<Option<u64>, StoreError> {
        let first = self.tree.range(seq_range(queue.tag(), None)).next();
        Ok(match first {
            Some(entry) => decode::<EnvelopeHead>(&entry?.1)
                .ok()
                .map(|h| h.received_at_ms),
            None => None,
        })
    }

    /// When the oldest dead letter was parked (ms since the epoch).
    pub fn oldest_dead_ms(&self) -> Result<Option<u64>, StoreError> {
        let first = self.tree.range(seq_range(TAG_DEAD, None)).next();
        Ok(match first {
            Some(entry) => Some(decode_dead(&entry?.1).dead_at_ms),
            None => None,
        })
    }

    // ----- settling items --------------------------------------------------------------

    /// Removes a delivered item. Returns false if it was not there (already acked).
    pub fn ack(&self, queue: Queue, key: u64) -> Result<bool, StoreError> {
        let Some(old) = self.tree.remove(item_key(queue.tag(), key))? else {
            return Ok(false);
        };
        self.forget_item(queue, &old);
        Ok(true)
    }

    /// The counters' side of an item leaving its queue (`raw`: its record as it was).
    fn forget_item(&self, queue: Queue, raw: &[u8]) {
        let range = self.range(queue);
        range.len.fetch_sub(1, Ordering::Relaxed);
        if decode::<EnvelopeHead>(raw).is_ok_and(|h| h.attempts > 0) {
            range.retrying.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Removes several delivered items. Plain removes, not one batch: an ack needs no
    /// atomicity with anything, and every sled batch seals an I/O buffer, which wakes all
    /// of sled's I/O threads. Returns how many were there.
    pub fn ack_many(&self, queue: Queue, keys: &[u64]) -> Result<usize, StoreError> {
        let mut found = 0;
        for &key in keys {
            if self.ack(queue, key)? {
                found += 1;
            }
        }
        Ok(found)
    }

    /// Records a failed attempt: bumps `attempts`, sets the next attempt time and the error.
    /// Returns the new attempt count, or `None` if the item is gone.
    pub fn reschedule(
        &self,
        queue: Queue,
        key: u64,
        next_attempt_ms: u64,
        error: &str,
    ) -> Result<Option<u32>, StoreError> {
        let mut before = None;
        let updated = self
            .tree
            .update_and_fetch(item_key(queue.tag(), key), |old| {
                // Returning None would delete the record: a record this code cannot read
                // or write is kept as it is (the next scan parks it as undecodable).
                let old = old?;
                let Ok(mut envelope) = decode::<Envelope>(old) else {
                    return Some(old.to_vec());
                };
                before = Some(envelope.attempts);
                envelope.attempts = envelope.attempts.saturating_add(1);
                envelope.next_attempt_ms = next_attempt_ms;
                envelope.last_error = Some(error.to_string());
                Some(encode(&envelope).unwrap_or_else(|_| old.to_vec()))
            })?;
        let Some(updated) = updated else {
            return Ok(None);
        };
        if before == Some(0) {
            self.range(queue).retrying.fetch_add(1, Ordering::Relaxed);
        }
        Ok(decode::<EnvelopeHead>(&updated).ok().map(|h| h.attempts))
    }

    /// Moves an item to the dead letters with `reason`. Returns false if it was not there.
    pub fn dead_letter(&self, queue: Queue, key: u64, reason: &str) -> Result<bool, StoreError> {
        let qkey = item_key(queue.tag(), key);
        let Some(raw) = self.tree.get(qkey)? else {
            return Ok(false);
        };
        let envelope: Envelope = match decode(&raw) {
            Ok(envelope) => envelope,
            Err(_) => Envelope::new(raw.to_vec(), now_ms()),
        };
        let was_retrying = envelope.attempts > 0;
        self.move_to_dead(queue, key, envelope, reason.to_string())?;
        if was_retrying {
            self.range(queue).retrying.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(true)
    }

    fn park_undecodable(
        &self,
        queue: Queue,
        key: u64,
        raw: Vec<u8>,
        err: &bincode::Error,
    ) -> Result<(), StoreError> {
        tracing::error!(%queue, key, error = %err, "undecodable record moved to the dead letters");
        let reason = format!("undecodable record: {err}");
        self.move_to_dead(queue, key, Envelope::new(raw, now_ms()), reason)
    }

    fn move_to_dead(
        &self,
        queue: Queue,
        key: u64,
        envelope: Envelope,
        reason: String,
    ) -> Result<(), StoreError> {
        let range = self.range(queue);
        let _dead_order = lock(&self.dead.write);
        let seq = self.dead.next_seq.load(Ordering::Relaxed);
        let letter = DeadLetter {
            queue,
            original_key: Some(key),
            dead_at_ms: now_ms(),
            reason,
            envelope,
        };
        let mut batch = sled::Batch::default();
        batch.remove(&item_key(queue.tag(), key));
        batch.insert(&item_key(TAG_DEAD, seq), encode(&letter)?);
        self.tree.apply_batch(batch)?;
        self.dead.next_seq.store(seq + 1, Ordering::Relaxed);
        self.dead.len.fetch_add(1, Ordering::Relaxed);
        range.len.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    /// Puts matching dead letters back at the end of their queue with a fresh attempt
    /// count. Returns how many were requeued.
    pub fn requeue_dead(&self, filter: &DeadFilter) -> Result<usize, StoreError> {
        let mut moved = 0;
        for dead in self.matching_dead(filter)? {
            let queue = dead.letter.queue;
            let range = self.range(queue);
            let _order = lock(&range.write);
            let _dead_order = lock(&self.dead.write);
            let seq = range.next_seq.load(Ordering::Relaxed);
            let mut envelope = dead.letter.envelope;
            envelope.attempts = 0;
            envelope.next_attempt_ms = 0;
            envelope.last_error = None;
            let mut batch = sled::Batch::default();
            batch.remove(&item_key(TAG_DEAD, dead.key));
            batch.insert(&item_key(queue.tag(), seq), encode(&envelope)?);
            self.tree.apply_batch(batch)?;
            if queue == Queue::Indicators {
                lock_watermarks(&self.watermarks).on_unpositioned(seq);
            }
            range.next_seq.store(seq + 1, Ordering::Relaxed);
            range.len.fetch_add(1, Ordering::Relaxed);
            self.dead.len.fetch_sub(1, Ordering::Relaxed);
            self.arrivals[queue_index(queue)].notify_one();
            moved += 1;
        }
        self.flush()?;
        Ok(moved)
    }

    /// Deletes matching dead letters for good. Returns how many were removed.
    pub fn purge_dead(&self, filter: &DeadFilter) -> Result<usize, StoreError> {
        let mut removed = 0;
        for dead in self.matching_dead(filter)? {
            if self.tree.remove(item_key(TAG_DEAD, dead.key))?.is_some() {
                self.dead.len.fetch_sub(1, Ordering::Relaxed);
                removed += 1;
            }
        }
        self.flush()?;
        Ok(removed)
    }

    /// Dead letters the filter selects. One that cannot be decoded is left alone: its
    /// queue is unknown, so it can neither go back nor be matched by queue.
    fn matching_dead(&self, filter: &DeadFilter) -> Result<Vec<DeadItem>, StoreError> {
        let mut matching = Vec::new();
        for entry in scan::touching(&self.tree, self.tree.range(seq_range(TAG_DEAD, None))) {
            let (key, raw) = entry?;
            let Some(seq) = key_seq(&key) else { continue };
            match decode::<DeadLetter>(&raw) {
                Ok(letter) => {
                    let item = DeadItem { key: seq, letter };
                    if filter.matches(&item) {
                        matching.push(item);
                    }
                }
                Err(e) => {
                    tracing::warn!(key = seq, error = %e, "skipping an undecodable dead letter")
                }
            }
        }
        Ok(matching)
    }

    // ----- the checkpoint file ------------------------------------------------------------

    /// The key of the oldest item of `queue`, if any.
    fn oldest_key(&self, queue: Queue) -> Result<Option<u64>, StoreError> {
        match self.tree.range(seq_range(queue.tag(), None)).next() {
            Some(entry) => Ok(key_seq(&entry?.0)),
            None => Ok(None),
        }
    }

    /// The key of the newest item of `queue`, if any.
    fn newest_key(&self, queue: Queue) -> Result<Option<u64>, StoreError> {
        match self.tree.range(seq_range(queue.tag(), None)).next_back() {
            Some(entry) => Ok(key_seq(&entry?.0)),
            None => Ok(None),
        }
    }

    /// The low watermark: a resume point at or before every indicator still queued.
    pub fn low_watermark(&self) -> Result<Resume, StoreError> {
        let head = self.oldest_key(Queue::Indicators)?;
        let mut low = lock_watermarks(&self.watermarks).low(head);
        if head.is_none() {
            // The replay in force now (it may have started since the last commit).
            low.recover_until = self.meta(RECOVER_UNTIL_META)?;
        }
        Ok(low)
    }

    /// The claims of the checkpoint file as of now: write it only once a flush that
    /// started after this call has finished ([`Store::write_checkpoint`] does both).
    pub fn checkpoint(&self) -> Result<Checkpoint, StoreError> {
        Ok(Checkpoint::new(
            self.low_watermark()?,
            self.catalog_size().total,
            self.held(),
        ))
    }

    fn held(&self) -> Held {
        Held {
            indicators: self.len(Queue::Indicators),
            sightings: self.len(Queue::Sightings),
            dead: self.dead_len(),
            imports: Some(self.len(Queue::Imports)),
        }
    }

    /// Reads the claims, flushes, writes the checkpoint file (unless its claims equal
    /// `last`'s). The order keeps the file from claiming what is not yet on disk. Returns
    /// what the file now says.
    pub fn write_checkpoint(&self, last: Option<&Checkpoint>) -> Result<Checkpoint, StoreError> {
        let checkpoint = self.checkpoint()?;
        if last.is_some_and(|last| last.same_claims(&checkpoint)) {
            return Ok(checkpoint);
        }
        self.flush()?;
        sidecar::write(self.data_dir(), &checkpoint)?;
        Ok(checkpoint)
    }

    /// After [`Store::close`]: writes the checkpoint file with the exact state, so that the
    /// next open can tell a store that gives back less than it held.
    pub fn write_closed_checkpoint(&self) -> Result<(), StoreError> {
        self.flush()?;
        let mut checkpoint = self.checkpoint()?;
        checkpoint.closed = Some(Closed {
            held: checkpoint.held,
            catalog: checkpoint.catalog_at_least,
            newest_indicator: self.newest_key(Queue::Indicators)?,
            position: self.position()?,
        });
        sidecar::write(self.data_dir(), &checkpoint)
    }

    /// The state the exact claims of a clean close are compared with.
    pub(crate) fn closed_state(&self) -> Result<Closed, StoreError> {
        Ok(Closed {
            held: self.held(),
            catalog: self.catalog_size().total,
            newest_indicator: self.newest_key(Queue::Indicators)?,
            position: self.position()?,
        })
    }

    fn data_dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    // ----- lifecycle -------------------------------------------------------------------

    /// Flushes everything written so far, synchronously.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Stops the flusher after a final flush. Waiters still pending are flushed first.
    pub fn close(&self) -> Result<(), StoreError> {
        self.commit.stop();
        self.flush()
    }

    fn range(&self, queue: Queue) -> &Range {
        match queue {
            Queue::Indicators => &self.indicators,
            Queue::Sightings => &self.sightings,
            Queue::Imports => &self.imports,
        }
    }

    /// Counts every range once at open; from then on the counters follow each write.
    fn count_all(&self) -> Result<(), StoreError> {
        for (tag, range) in [
            (Queue::Indicators.tag(), &self.indicators),
            (Queue::Sightings.tag(), &self.sightings),
            (Queue::Imports.tag(), &self.imports),
            (TAG_DEAD, &self.dead),
        ] {
            let (mut len, mut retrying, mut last) = (0, 0, None);
            // Every record: touching, or the scan's pages stay resident (see `scan`).
            for entry in scan::touching(&self.tree, self.tree.range(seq_range(tag, None))) {
                let (key, raw) = entry?;
                len += 1;
                last = key_seq(&key).or(last);
                if tag != TAG_DEAD && decode::<EnvelopeHead>(&raw).is_ok_and(|h| h.attempts > 0) {
                    retrying += 1;
                }
            }
            range.len.store(len, Ordering::Relaxed);
            range.retrying.store(retrying, Ordering::Relaxed);
            range
                .next_seq
                .store(last.map_or(0, |l| l + 1), Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.commit.stop();
    }
}

/// The leading fields of an [`Envelope`]: bincode reads a prefix without the payload.
#[derive(serde::Deserialize)]
struct EnvelopeHead {
    received_at_ms: u64,
    attempts: u32,
}

fn decode_dead(raw: &[u8]) -> DeadLetter {
    decode(raw).unwrap_or_else(|e| DeadLetter {
        queue: Queue::Indicators,
        original_key: None,
        dead_at_ms: 0,
        reason: format!("undecodable dead letter: {e}"),
        envelope: Envelope::new(raw.to_vec(), 0),
    })
}

fn seq_range(tag: u8, after: Option<u64>) -> RangeInclusive<[u8; 9]> {
    // Sequence numbers count up from 0 and never reach u64::MAX, so saturating is exact.
    let start = item_key(tag, after.map_or(0, |seq| seq.saturating_add(1)));
    start..=item_key(tag, u64::MAX)
}

fn queue_index(queue: Queue) -> usize {
    match queue {
        Queue::Indicators => 0,
        Queue::Sightings => 1,
        Queue::Imports => 2,
    }
}

fn meta_key(name: &str) -> Vec<u8> {
    let mut key = vec![TAG_META];
    key.extend_from_slice(b"meta/");
    key.extend_from_slice(name.as_bytes());
    key
}

fn lock(mutex: &Mutex<()>) -> std::sync::MutexGuard<'_, ()> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn lock_watermarks(mutex: &Mutex<Watermarks>) -> std::sync::MutexGuard<'_, Watermarks> {
    // Poisoned only by a panic elsewhere; the bookkeeping stays conservative either way.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The stream reader's meta key of the replay in force (see `pipeline::stream`): the
/// watermark carries it, because a replay id resumed without it is read as a raw time.
pub(crate) const RECOVER_UNTIL_META: &str = "stream_recover_until";

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_undecodable_record_is_parked_never_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        drop(
            store
                .enqueue(Queue::Sightings, vec![b"{}".to_vec()], None)
                .unwrap(),
        );
        let garbage = vec![0xff; 3];
        store
            .tree
            .insert(item_key(Queue::Sightings.tag(), 0), garbage.clone())
            .unwrap();
        // A retry of an unreadable record leaves it alone...
        assert_eq!(store.reschedule(Queue::Sightings, 0, 5, "x").unwrap(), None);
        // ...and the next read moves it to the dead letters, bytes intact.
        assert!(store.scan(Queue::Sightings, None, 10).unwrap().is_empty());
        let dead = store.dead_letters(None, 10).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].letter.envelope.payload, garbage);
        assert_eq!(dead[0].letter.original_key, Some(0));
        assert!(dead[0].letter.reason.starts_with("undecodable record"));
        assert_eq!((store.len(Queue::Sightings), store.dead_len()), (0, 1));
    }

    #[test]
    fn a_position_goes_only_with_the_indicator_queue() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let err = store
            .enqueue(Queue::Sightings, vec![], Some("1-0"))
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::PositionOnSightings));
    }

    /// The drainers wait on `notified` when idle: every commit with items must wake them
    /// (or leave a permit for their next wait), else new items wait for the idle poll.
    #[tokio::test]
    async fn commits_wake_the_queue_drainer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let waiting = store.notified(Queue::Sightings);
        drop(
            store
                .enqueue(Queue::Sightings, vec![b"{}".to_vec()], None)
                .unwrap(),
        );
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("a waiting drainer is woken");
        drop(
            store
                .enqueue(Queue::Indicators, vec![b"{}".to_vec()], Some("1-0"))
                .unwrap(),
        );
        tokio::time::timeout(Duration::from_secs(1), store.notified(Queue::Indicators))
            .await
            .expect("the next wait returns at once");
    }
}
