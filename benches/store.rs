//! Durable enqueue throughput of the outbox next to raw sled, in the same run.
//!
//! `cargo bench --bench store` prints, for 1 KiB items at batch sizes 1, 100 and 1000:
//! - raw sled: insert the batch, `flush()`, repeat (the baseline: one fsync per batch);
//! - store, pipelined: `enqueue` with up to 4096 items awaiting their group commit, counting
//!   only items confirmed durable (how the stream reader and the intake use it);
//! - store, one at a time: `enqueue` then wait for durability before the next batch (the
//!   latency floor: bounded by `flush_interval`);
//! - store + catalog, pipelined: the same as the stream reader writes since format 2, every
//!   item with its indicator-catalog entry in the same batch (the cost of the catalog: the
//!   ratio to "store durable", target ≥ 0.80);
//! - then the catalog's size: logical bytes per entry and disk bytes per indicator (20,000
//!   indicators written and delivered, with and without the catalog).
//!
//! Figures, not assertions: this machine is shared and noisy.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use opencti_threatbus::store::catalog::update_for_indicator;
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
        "{:>6} {:>16} {:>20} {:>8} {:>20} {:>22} {:>14}",
        "batch",
        "raw sled it/s",
        "store durable it/s",
        "ratio",
        "store wait-each it/s",
        "store+catalog it/s",
        "with/without"
    );
    for batch in [1usize, 100, 1000] {
        let raw = raw_sled(batch);
        let piped = store_pipelined(batch, &options, false);
        let each = store_wait_each(batch, &options);
        let cataloged = store_pipelined(batch, &options, true);
        println!(
            "{batch:>6} {raw:>16.0} {piped:>20.0} {:>7.2}x {each:>20.0} {cataloged:>22.0} {:>13.2}x",
            piped / raw,
            cataloged / piped
        );
    }
    catalog_size(&options);
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
            let (items, catalog) = indicators(start, 100, with_catalog);
            if with_catalog {
                logical += catalog
                    .iter()
                    .map(|u| 1 + u.stix_id.len() + 4 + 8 + 8 + 8 + u.body.len())
                    .sum::<usize>();
            }
            let commit = Commit {
                items,
                catalog,
                position: Some(format!("{start}-0")),
                ..Commit::default()
            };
            drop(store.commit(Queue::Indicators, commit).expect("commit"));
        }
        // Delivered: the queue is empty again, as in steady state; the catalog stays.
        let keys: Vec<u64> = store
            .scan(Queue::Indicators, None, N)
            .expect("scan")
            .iter()
            .map(|i| i.key)
            .collect();
        store.ack_many(Queue::Indicators, &keys).expect("ack");
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
/// and, when `with_catalog`, their catalog entries computed as the reader computes them.
fn indicators(
    start: usize,
    count: usize,
    with_catalog: bool,
) -> (Vec<Vec<u8>>, Vec<opencti_threatbus::store::CatalogUpdate>) {
    let mut items = Vec::with_capacity(count);
    let mut catalog = Vec::new();
    for n in start..start + count {
        let value = indicator(n);
        let body = serde_json::to_vec(&value).expect("json");
        if with_catalog {
            catalog.extend(update_for_indicator(&value, body.clone()));
        }
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

/// Pipelined durable enqueues of indicators; `with_catalog`: each with its catalog entry.
fn store_pipelined(batch: usize, options: &StoreOptions, with_catalog: bool) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), options).expect("open store");
    let start = Instant::now();
    let (mut sent, mut durable) = (0usize, 0usize);
    let mut pending = VecDeque::new();
    while start.elapsed() < RUN_FOR {
        let (items, catalog) = indicators(sent, batch, with_catalog);
        let commit = Commit {
            items,
            catalog,
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
