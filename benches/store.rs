//! Durable enqueue throughput of the outbox next to raw sled, in the same run.
//!
//! `cargo bench --bench store` prints, for 1 KiB items at batch sizes 1, 100 and 1000:
//! - raw sled: insert the batch, `flush()`, repeat (the baseline: one fsync per batch);
//! - store, pipelined: `enqueue` with up to 4096 items awaiting their group commit, counting
//!   only items confirmed durable (how the stream reader and the intake use it);
//! - store, one at a time: `enqueue` then wait for durability before the next batch (the
//!   latency floor: bounded by `flush_interval`);
//! - the indicator catalog's cost. Since format 4 it is written where an indicator is told
//!   to Threat Bus, not where it is queued, so the durable enqueue rate ("store durable")
//!   is the same with the catalog as without (ratio 1.00, target ≥ 0.80). The catalog's
//!   work is on the drain side, measured next: 20,000 queued indicators read in the
//!   drainer's batches of 32, recorded in the catalog (or not) and acked, indicators/s
//!   with/without, and the store's whole work per indicator (enqueue + drain) in µs;
//! - then the catalog's size: logical bytes per entry and disk bytes per indicator (20,000
//!   indicators written and delivered, with and without the catalog).
//!
//! Figures, not assertions: this machine is shared and noisy.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use opencti_threatbus::store::catalog::update_for_payload;
use opencti_threatbus::store::{Commit, Queue, Store, StoreOptions};
use serde_json::Value;

const ITEM_BYTES: usize = 1024;
const RUN_FOR: Duration = Duration::from_secs(3);
/// Items written but not yet confirmed durable, at most (the stream reader's read-ahead).
const WINDOW_ITEMS: usize = 4096;

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported and ignored.
    let options = StoreOptions::default();
    println!(
        "store benchmark: {ITEM_BYTES} B items, {:.0} s per figure, flush_interval {} ms, flush_max_items {}",
        RUN_FOR.as_secs_f64(),
        options.flush_interval.as_millis(),
        options.flush_max_items
    );
    println!(
        "{:>6} {:>16} {:>20} {:>8} {:>20}",
        "batch", "raw sled it/s", "store durable it/s", "ratio", "store wait-each it/s",
    );
    let mut enqueue_rate = 0.0;
    for batch in [1usize, 100, 1000] {
        let raw = raw_sled(batch);
        let piped = store_pipelined(batch, &options);
        let each = store_wait_each(batch, &options);
        println!(
            "{batch:>6} {raw:>16.0} {piped:>20.0} {:>7.2}x {each:>20.0}",
            piped / raw,
        );
        if batch == 100 {
            enqueue_rate = piped;
        }
    }
    println!(
        "durable enqueue with the catalog / without: 1.00x (target ≥ 0.80): since format 4 \
         the stream reader writes no catalog entry"
    );
    let without = drain(&options, false);
    let with = drain(&options, true);
    let per_indicator = |drain: f64| 1e6 / enqueue_rate + 1e6 / drain;
    println!(
        "drain side (read {DRAIN_BATCH}, record, ack): {without:.0} indicators/s without the \
         catalog, {with:.0} with: {:.2}x; Threat Bus relays ~800/s on this machine \
         (cargo bench --bench e2e), so the drainer never waits for the store",
        with / without
    );
    println!(
        "store work per indicator (enqueue at batch 100 + drain): {:.1} µs without, {:.1} µs \
         with the catalog",
        per_indicator(without),
        per_indicator(with)
    );
    catalog_size(&options);
}

/// The Threat Bus drainer's read size under load (`pipeline::to_bus`, `MAX_REFILL_BATCH`).
const DRAIN_BATCH: usize = 32;

/// 20,000 indicators queued, then drained as the drainer does: read a batch, record it in
/// the catalog (`with_catalog`), ack it. Indicators/s of the drain alone.
fn drain(options: &StoreOptions, with_catalog: bool) -> f64 {
    const N: usize = 20_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), options).expect("open store");
    for start in (0..N).step_by(100) {
        let (items, _) = indicators(start, 100);
        drop(
            store
                .enqueue(Queue::Indicators, items, None)
                .expect("enqueue"),
        );
    }
    store.flush().expect("flush");
    let started = Instant::now();
    let mut drained = 0;
    loop {
        let items = store
            .scan(Queue::Indicators, None, DRAIN_BATCH)
            .expect("scan");
        if items.is_empty() {
            break;
        }
        let keys: Vec<u64> = items.iter().map(|i| i.key).collect();
        if with_catalog {
            let told = items
                .into_iter()
                .filter_map(|item| {
                    let update =
                        update_for_payload(&item.envelope.payload, item.envelope.received_at_ms)?;
                    Some((item.key, update))
                })
                .collect();
            store.record_told(told).expect("record");
        }
        drained += store.ack_many(Queue::Indicators, &keys).expect("ack");
    }
    let rate = drained as f64 / started.elapsed().as_secs_f64();
    store.close().expect("close");
    rate
}

/// Bytes the catalog adds per indicator: the entry's logical size, and what the store
/// directory grows by when 20,000 indicators are written and delivered with it.
fn catalog_size(options: &StoreOptions) {
    const N: usize = 20_000;
    let mut sizes = [0u64; 2];
    let mut logical = 0usize;
    for (with_catalog, size) in [false, true].into_iter().zip(&mut sizes) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), options).expect("open store");
        for start in (0..N).step_by(100) {
            let (items, catalog) = indicators(start, 100);
            let commit = Commit {
                items,
                position: Some(format!("{start}-0")),
                ..Commit::default()
            };
            drop(store.commit(Queue::Indicators, commit).expect("commit"));
            // Delivered (told, then acked): the queue empty again, as in steady state; the
            // catalog stays.
            let queued = store.scan(Queue::Indicators, None, N).expect("scan");
            let keys: Vec<u64> = queued.iter().map(|i| i.key).collect();
            if with_catalog {
                logical += catalog
                    .iter()
                    .map(|u| 1 + u.stix_id.len() + 4 + 8 + 8 + 8 + u.body.len())
                    .sum::<usize>();
                store
                    .record_told(keys.iter().copied().zip(catalog).collect())
                    .expect("record");
            }
            store.ack_many(Queue::Indicators, &keys).expect("ack");
        }
        store.close().expect("close");
        drop(store);
        *size = dir_bytes(dir.path());
    }
    println!(
        "catalog size, {N} indicators of {ITEM_BYTES} B delivered: entry {:.0} B logical; \
         store on disk {:.1} MB without, {:.1} MB with the catalog: {:.0} B per indicator",
        logical as f64 / N as f64,
        sizes[0] as f64 / 1e6,
        sizes[1] as f64 / 1e6,
        sizes[1].saturating_sub(sizes[0]) as f64 / N as f64
    );
}

fn dir_bytes(path: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(path).expect("read_dir").flatten() {
        let meta = entry.metadata().expect("metadata");
        total += if meta.is_dir() {
            dir_bytes(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

/// `count` indicators (each a create with its own id) as the stream reader queues them,
/// and their catalog entries as the drainer records them.
fn indicators(
    start: usize,
    count: usize,
) -> (Vec<Vec<u8>>, Vec<opencti_threatbus::store::CatalogUpdate>) {
    let mut items = Vec::with_capacity(count);
    let mut catalog = Vec::new();
    for n in start..start + count {
        let body = serde_json::to_vec(&indicator(n)).expect("json");
        catalog.extend(update_for_payload(&body, 0));
        items.push(body);
    }
    (items, catalog)
}

/// A STIX indicator padded to about `ITEM_BYTES`.
fn indicator(n: usize) -> Value {
    let mut value = serde_json::json!({
        "type": "indicator",
        "spec_version": "2.1",
        "id": format!("indicator--{:08x}-0000-4000-8000-{:012x}", n as u32, n),
        "created": "2024-01-02T03:04:05.000Z",
        "modified": "2024-01-02T03:04:05.000Z",
        "pattern": format!("[ipv4-addr:value = '10.0.{}.{}']", (n >> 8) & 255, n & 255),
        "pattern_type": "stix",
        "valid_from": "2024-01-02T03:04:05Z",
    });
    let used = value.to_string().len() + 20;
    value["description"] = Value::from("x".repeat(ITEM_BYTES.saturating_sub(used)));
    value
}

fn payload(i: usize) -> Vec<u8> {
    let mut p = format!("{{\"n\":{i},\"pad\":\"").into_bytes();
    p.resize(ITEM_BYTES - 2, b'x');
    p.extend_from_slice(b"\"}");
    p
}

fn raw_sled(batch: usize) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = sled::Config::new()
        .path(dir.path())
        .mode(sled::Mode::HighThroughput)
        .open()
        .expect("open sled");
    let tree = db.open_tree("raw").expect("tree");
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < RUN_FOR {
        for _ in 0..batch {
            tree.insert((n as u64).to_be_bytes(), payload(n))
                .expect("insert");
            n += 1;
        }
        db.flush().expect("flush");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Pipelined durable enqueues of indicators, as the stream reader writes them.
fn store_pipelined(batch: usize, options: &StoreOptions) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), options).expect("open store");
    let start = Instant::now();
    let (mut sent, mut durable) = (0usize, 0usize);
    let mut pending = VecDeque::new();
    while start.elapsed() < RUN_FOR {
        let (items, _) = indicators(sent, batch);
        let commit = Commit {
            items,
            position: Some(format!("{sent}-0")),
            ..Commit::default()
        };
        pending.push_back(store.commit(Queue::Indicators, commit).expect("commit"));
        sent += batch;
        while pending.len() * batch > WINDOW_ITEMS.max(batch)
            || pending.front_mut().is_some_and(|d| d.is_done())
        {
            if let Some(d) = pending.pop_front() {
                d.wait_blocking().expect("durable");
                durable += batch;
            }
        }
    }
    for d in pending {
        d.wait_blocking().expect("durable");
        durable += batch;
    }
    let rate = durable as f64 / start.elapsed().as_secs_f64();
    store.close().expect("close");
    rate
}

fn store_wait_each(batch: usize, options: &StoreOptions) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), options).expect("open store");
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < RUN_FOR {
        let items = (n..n + batch).map(payload).collect();
        store
            .enqueue(Queue::Indicators, items, None)
            .expect("enqueue")
            .wait_blocking()
            .expect("durable");
        n += batch;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    store.close().expect("close");
    rate
}
