//! Model-based property test of the outbox (after Vector's disk-buffer model tests): random
//! sequences of operations run against the real store and a plain in-memory model, and after
//! every step the two must agree on every visible fact — order, keys, attempts, errors,
//! dead letters, the stream position, the indicator catalog and the counters — including
//! across reopen.

use std::collections::BTreeMap;

use opencti_threatbus::store::{
    CatalogUpdate, Commit, DeadFilter, Forwarded, Queue, Store, StoreOptions,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Enqueue {
        queue: Queue,
        n: usize,
        position: bool,
    },
    Park {
        queue: Queue,
    },
    SetPosition,
    /// What the stream reader writes: indicator items and maybe a position; then what the
    /// drainer records when it tells them: each one's catalog change (one of a few ids, so
    /// that ids repeat within and across batches).
    Forward {
        changes: Vec<(usize, Forwarded)>,
        position: bool,
    },
    Ack {
        queue: Queue,
        idx: usize,
    },
    /// Several keys at once, some possibly repeated or already gone.
    AckMany {
        queue: Queue,
        idxs: Vec<usize>,
    },
    Reschedule {
        queue: Queue,
        idx: usize,
        at: u64,
    },
    DeadLetter {
        queue: Queue,
        idx: usize,
    },
    Requeue {
        queue: Option<Queue>,
        idx: Option<usize>,
    },
    Purge {
        queue: Option<Queue>,
        idx: Option<usize>,
    },
    Reopen,
}

fn queue() -> impl Strategy<Value = Queue> {
    prop_oneof![Just(Queue::Indicators), Just(Queue::Sightings)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (queue(), 0..4usize, any::<bool>()).prop_map(|(queue, n, position)| Op::Enqueue {
            queue,
            n,
            position: position && queue == Queue::Indicators
        }),
        1 => queue().prop_map(|queue| Op::Park { queue }),
        1 => Just(Op::SetPosition),
        3 => (
            proptest::collection::vec(
                (0..6usize, prop_oneof![Just(Forwarded::Create), Just(Forwarded::Edit), Just(Forwarded::Remove)]),
                0..6,
            ),
            any::<bool>(),
        )
            .prop_map(|(changes, position)| Op::Forward { changes, position }),
        3 => (queue(), any::<usize>()).prop_map(|(queue, idx)| Op::Ack { queue, idx }),
        1 => (queue(), proptest::collection::vec(any::<usize>(), 0..5))
            .prop_map(|(queue, idxs)| Op::AckMany { queue, idxs }),
        2 => (queue(), any::<usize>(), 0..3000u64)
            .prop_map(|(queue, idx, at)| Op::Reschedule { queue, idx, at }),
        2 => (queue(), any::<usize>()).prop_map(|(queue, idx)| Op::DeadLetter { queue, idx }),
        1 => (proptest::option::of(queue()), proptest::option::of(any::<usize>()))
            .prop_map(|(queue, idx)| Op::Requeue { queue, idx }),
        1 => (proptest::option::of(queue()), proptest::option::of(any::<usize>()))
            .prop_map(|(queue, idx)| Op::Purge { queue, idx }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Clone, PartialEq)]
struct ModelItem {
    payload: Vec<u8>,
    attempts: u32,
    next_attempt_ms: u64,
    last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
struct ModelDead {
    queue: Queue,
    original_key: Option<u64>,
    reason: String,
    item: ModelItem,
}

#[derive(Default)]
struct Model {
    queues: BTreeMap<Queue, BTreeMap<u64, ModelItem>>,
    next_seq: BTreeMap<Queue, u64>,
    dead: BTreeMap<u64, ModelDead>,
    next_dead: u64,
    position: Option<String>,
    /// STIX id → (last operation, modified, body; empty once removed).
    catalog: BTreeMap<String, (Forwarded, i64, Vec<u8>)>,
    counter: u64,
}

impl Model {
    fn fresh_payload(&mut self) -> Vec<u8> {
        self.counter += 1;
        format!("{{\"n\":{}}}", self.counter).into_bytes()
    }

    fn push(&mut self, queue: Queue, item: ModelItem) {
        let seq = self.next_seq.entry(queue).or_insert(0);
        self.queues.entry(queue).or_default().insert(*seq, item);
        *seq += 1;
    }

    fn push_dead(&mut self, dead: ModelDead) {
        self.dead.insert(self.next_dead, dead);
        self.next_dead += 1;
    }

    fn key_at(&self, queue: Queue, idx: usize) -> Option<u64> {
        let q = self.queues.get(&queue)?;
        if q.is_empty() {
            return None;
        }
        q.keys().nth(idx % q.len()).copied()
    }

    fn dead_key_at(&self, idx: usize) -> Option<u64> {
        if self.dead.is_empty() {
            return None;
        }
        self.dead.keys().nth(idx % self.dead.len()).copied()
    }

    /// sled keys restart after the largest key present, exactly like the store.
    fn reopen(&mut self) {
        for queue in Queue::ALL {
            let last = self
                .queues
                .get(&queue)
                .and_then(|q| q.keys().next_back().copied());
            self.next_seq.insert(queue, last.map_or(0, |l| l + 1));
        }
        self.next_dead = self.dead.keys().next_back().map_or(0, |l| l + 1);
    }

    fn dead_matching(&self, queue: Option<Queue>, idx: Option<usize>) -> Vec<u64> {
        let only = idx.and_then(|i| self.dead_key_at(i));
        self.dead
            .iter()
            .filter(|(k, d)| {
                queue.is_none_or(|q| q == d.queue) && (idx.is_none() || only == Some(**k))
            })
            .map(|(k, _)| *k)
            .collect()
    }
}

fn new_item(payload: Vec<u8>) -> ModelItem {
    ModelItem {
        payload,
        attempts: 0,
        next_attempt_ms: 0,
        last_error: None,
    }
}

fn apply(slot: &mut Option<Store>, model: &mut Model, op: &Op, dir: &std::path::Path) {
    if let Op::Reopen = op {
        let old = slot.take().unwrap();
        old.close().unwrap();
        drop(old);
        *slot = Some(Store::open(dir, &options()).unwrap());
        model.reopen();
        return;
    }
    let store = slot.as_ref().unwrap();
    match *op {
        Op::Enqueue { queue, n, position } => {
            let payloads: Vec<_> = (0..n).map(|_| model.fresh_payload()).collect();
            let pos = position.then(|| format!("{}-0", model.counter));
            let durable = store
                .enqueue(queue, payloads.clone(), pos.as_deref())
                .unwrap();
            durable.wait_blocking().unwrap();
            for p in payloads {
                model.push(queue, new_item(p));
            }
            if pos.is_some() {
                model.position = pos;
            }
        }
        Op::Park { queue } => {
            let payload = model.fresh_payload();
            store
                .park(queue, payload.clone(), "bad".into())
                .unwrap()
                .wait_blocking()
                .unwrap();
            model.push_dead(ModelDead {
                queue,
                original_key: None,
                reason: "bad".into(),
                item: new_item(payload),
            });
        }
        Op::SetPosition => {
            model.counter += 1;
            let pos = format!("{}-1", model.counter);
            store.set_position(&pos).unwrap().wait_blocking().unwrap();
            model.position = Some(pos);
        }
        Op::Forward {
            ref changes,
            position,
        } => {
            let mut items = Vec::new();
            let mut catalog = Vec::new();
            for &(id, operation) in changes {
                let body = model.fresh_payload();
                model.counter += 1;
                catalog.push(CatalogUpdate {
                    stix_id: format!("indicator--{id}"),
                    operation,
                    modified_ms: model.counter as i64,
                    recorded_at_ms: model.counter,
                    body: body.clone(),
                });
                items.push(body);
            }
            let pos = position.then(|| format!("{}-0", model.counter));
            let commit = Commit {
                items: items.clone(),
                position: pos.clone(),
                ..Commit::default()
            };
            let first = store.next_key(Queue::Indicators);
            store
                .commit(Queue::Indicators, commit)
                .unwrap()
                .wait_blocking()
                .unwrap();
            let told = (first..).zip(catalog.iter().cloned()).collect();
            assert!(store.record_told(told).unwrap().dropped.is_empty());
            for p in items {
                model.push(Queue::Indicators, new_item(p));
            }
            for update in catalog {
                let body = if update.operation == Forwarded::Remove {
                    Vec::new()
                } else {
                    update.body
                };
                model
                    .catalog
                    .insert(update.stix_id, (update.operation, update.modified_ms, body));
            }
            if pos.is_some() {
                model.position = pos;
            }
        }
        Op::AckMany { queue, ref idxs } => {
            let mut keys: Vec<u64> = idxs
                .iter()
                .filter_map(|i| model.key_at(queue, *i))
                .collect();
            keys.sort_unstable();
            keys.dedup();
            let mut asked = keys.clone();
            asked.push(999_999); // never there
            assert_eq!(store.ack_many(queue, &asked).unwrap(), keys.len());
            for key in keys {
                model.queues.get_mut(&queue).unwrap().remove(&key);
            }
        }
        Op::Ack { queue, idx } => {
            let Some(key) = model.key_at(queue, idx) else {
                assert!(!store.ack(queue, 12345).unwrap());
                return;
            };
            assert!(store.ack(queue, key).unwrap());
            model.queues.get_mut(&queue).unwrap().remove(&key);
            assert!(
                !store.ack(queue, key).unwrap(),
                "a second ack finds nothing"
            );
        }
        Op::Reschedule { queue, idx, at } => {
            let Some(key) = model.key_at(queue, idx) else {
                assert_eq!(store.reschedule(queue, 999_999, at, "x").unwrap(), None);
                return;
            };
            let error = format!("failed at {at}");
            let attempts = store.reschedule(queue, key, at, &error).unwrap();
            let item = model.queues.get_mut(&queue).unwrap().get_mut(&key).unwrap();
            item.attempts += 1;
            item.next_attempt_ms = at;
            item.last_error = Some(error);
            assert_eq!(attempts, Some(item.attempts));
        }
        Op::DeadLetter { queue, idx } => {
            let Some(key) = model.key_at(queue, idx) else {
                assert!(!store.dead_letter(queue, 777_777, "nope").unwrap());
                return;
            };
            assert!(store.dead_letter(queue, key, "poison").unwrap());
            let item = model.queues.get_mut(&queue).unwrap().remove(&key).unwrap();
            model.push_dead(ModelDead {
                queue,
                original_key: Some(key),
                reason: "poison".into(),
                item,
            });
        }
        Op::Requeue { queue, idx } => {
            let keys = model.dead_matching(queue, idx);
            let filter = DeadFilter {
                queue,
                keys: if idx.is_some() { keys.clone() } else { vec![] },
            };
            if idx.is_some() && keys.is_empty() {
                return; // an empty key list means "all" to the store
            }
            assert_eq!(store.requeue_dead(&filter).unwrap(), keys.len());
            for key in keys {
                let dead = model.dead.remove(&key).unwrap();
                model.push(dead.queue, new_item(dead.item.payload));
            }
        }
        Op::Purge { queue, idx } => {
            let keys = model.dead_matching(queue, idx);
            if idx.is_some() && keys.is_empty() {
                return;
            }
            let filter = DeadFilter {
                queue,
                keys: if idx.is_some() { keys.clone() } else { vec![] },
            };
            assert_eq!(store.purge_dead(&filter).unwrap(), keys.len());
            for key in keys {
                model.dead.remove(&key);
            }
        }
        Op::Reopen => unreachable!("handled above"),
    }
}

fn check(store: &Store, model: &Model) {
    for queue in Queue::ALL {
        let empty = BTreeMap::new();
        let expected = model.queues.get(&queue).unwrap_or(&empty);
        let actual = store.scan(queue, None, usize::MAX).unwrap();
        let actual: BTreeMap<u64, ModelItem> = actual
            .into_iter()
            .map(|i| {
                (
                    i.key,
                    ModelItem {
                        payload: i.envelope.payload,
                        attempts: i.envelope.attempts,
                        next_attempt_ms: i.envelope.next_attempt_ms,
                        last_error: i.envelope.last_error,
                    },
                )
            })
            .collect();
        assert_eq!(&actual, expected, "{queue} contents");
        assert_eq!(store.len(queue), expected.len() as u64, "{queue} len");
        let retrying = expected.values().filter(|i| i.attempts > 0).count() as u64;
        assert_eq!(store.retrying(queue), retrying, "{queue} retrying");
        assert_eq!(
            store.oldest_received_ms(queue).unwrap().is_some(),
            !expected.is_empty()
        );

        // Readiness at every boundary that matters: each item's own due time, and just before.
        let mut instants: Vec<u64> = expected.values().map(|i| i.next_attempt_ms).collect();
        instants.extend(
            expected
                .values()
                .map(|i| i.next_attempt_ms.saturating_sub(1)),
        );
        for now in instants {
            let ready: Vec<u64> = store
                .next_ready(queue, None, now, usize::MAX)
                .unwrap()
                .iter()
                .map(|i| i.key)
                .collect();
            let want: Vec<u64> = expected
                .iter()
                .filter(|(_, i)| i.next_attempt_ms <= now)
                .map(|(k, _)| *k)
                .collect();
            assert_eq!(ready, want, "{queue} ready at {now}");
            // The drainer's refill: the first two ready items, passing over every other key.
            let except: Vec<u64> = store
                .next_ready_except(queue, now, 2, |key| key % 2 == 1)
                .unwrap()
                .iter()
                .map(|i| i.key)
                .collect();
            let want: Vec<u64> = want.into_iter().filter(|k| k % 2 == 0).take(2).collect();
            assert_eq!(except, want, "{queue} ready at {now}, odd keys skipped");
        }

        // Paging with a cursor sees the same sequence as one scan.
        if let Some(first) = expected.keys().next() {
            let page: Vec<u64> = store
                .scan(queue, Some(*first), 2)
                .unwrap()
                .iter()
                .map(|i| i.key)
                .collect();
            let want: Vec<u64> = expected.keys().skip(1).take(2).copied().collect();
            assert_eq!(page, want, "{queue} page after {first}");
        }
    }
    let dead = store.dead_letters(None, usize::MAX).unwrap();
    let dead: BTreeMap<u64, ModelDead> = dead
        .into_iter()
        .map(|d| {
            (
                d.key,
                ModelDead {
                    queue: d.letter.queue,
                    original_key: d.letter.original_key,
                    reason: d.letter.reason,
                    item: ModelItem {
                        payload: d.letter.envelope.payload,
                        attempts: d.letter.envelope.attempts,
                        next_attempt_ms: d.letter.envelope.next_attempt_ms,
                        last_error: d.letter.envelope.last_error,
                    },
                },
            )
        })
        .collect();
    assert_eq!(dead, model.dead, "dead letters");
    assert_eq!(store.dead_len(), model.dead.len() as u64);
    assert_eq!(
        store.oldest_dead_ms().unwrap().is_some(),
        !model.dead.is_empty()
    );
    assert_eq!(store.position().unwrap(), model.position, "stream position");
    check_catalog(store, model);
}

fn check_catalog(store: &Store, model: &Model) {
    let active: BTreeMap<String, (i64, Vec<u8>)> = model
        .catalog
        .iter()
        .filter(|(_, (op, _, _))| *op != Forwarded::Remove)
        .map(|(id, (_, modified, body))| (id.clone(), (*modified, body.clone())))
        .collect();
    let actual: BTreeMap<String, (i64, Vec<u8>)> = store
        .catalog_active(None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(id, e)| (id, (e.modified_ms, e.body)))
        .collect();
    assert_eq!(actual, active, "active catalog");
    let size = store.catalog_size();
    assert_eq!(size.active, active.len() as u64, "catalog active count");
    assert_eq!(
        size.total,
        model.catalog.len() as u64,
        "catalog total count"
    );
    for (id, (op, modified, body)) in &model.catalog {
        let entry = store.catalog_get(id).unwrap().expect("catalog entry");
        assert_eq!(
            (&entry.operation, &entry.modified_ms, &entry.body),
            (op, modified, body),
            "{id}"
        );
    }
}

fn options() -> StoreOptions {
    StoreOptions {
        flush_interval: std::time::Duration::from_millis(1),
        ..StoreOptions::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Some(Store::open(dir.path(), &options()).unwrap());
        let mut model = Model::default();
        for op in &ops {
            apply(&mut store, &mut model, op, dir.path());
            check(store.as_ref().unwrap(), &model);
        }
    }
}

/// A write wakes its queue's drainer at once (`Store::notified`), whether or not the
/// drainer waits yet; without it the drainers find new items only at their idle poll.
#[tokio::test]
async fn a_write_wakes_the_queue_drainer() {
    for queue in [Queue::Indicators, Queue::Sightings] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &options()).unwrap();
        let waiting = store.notified(queue);
        drop(store.enqueue(queue, vec![b"{}".to_vec()], None).unwrap());
        let woken = tokio::time::timeout(std::time::Duration::from_secs(1), waiting).await;
        assert!(woken.is_ok(), "{queue}: a waiting drainer was not woken");
        drop(store.enqueue(queue, vec![b"{}".to_vec()], None).unwrap());
        let later = tokio::time::timeout(std::time::Duration::from_secs(1), store.notified(queue));
        assert!(later.await.is_ok(), "{queue}: the wake-up was lost");
    }
}
