//! Durable enqueue throughput of the outbox next to raw sled, in the same run.
//!
//! `cargo bench --bench store` prints, for 1 KiB items at batch sizes 1, 100 and 1000:
//! - raw sled: insert the batch, `flush()`, repeat (the baseline: one fsync per batch);
//! - store, pipelined: `enqueue` with up to 4096 items awaiting their group commit, counting
//!   only items confirmed durable (how the stream reader and the intake use it);
//! - store, one at a time: `enqueue` then wait for durability before the next batch (the
//!   latency floor: bounded by `flush_interval`).
//!
//! Figures, not assertions: this machine is shared and noisy.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use opencti_threatbus::store::{Queue, Store, StoreOptions};

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
        "batch", "raw sled it/s", "store durable it/s", "ratio", "store wait-each it/s"
    );
    for batch in [1usize, 100, 1000] {
        let raw = raw_sled(batch);
        let piped = store_pipelined(batch, &options);
        let each = store_wait_each(batch, &options);
        println!(
            "{batch:>6} {raw:>16.0} {piped:>20.0} {:>7.2}x {each:>20.0}",
            piped / raw
        );
    }
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

fn store_pipelined(batch: usize, options: &StoreOptions) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), options).expect("open store");
    let start = Instant::now();
    let (mut sent, mut durable) = (0usize, 0usize);
    let mut pending = VecDeque::new();
    while start.elapsed() < RUN_FOR {
        let items = (sent..sent + batch).map(payload).collect();
        let position = format!("{sent}-0");
        pending.push_back(
            store
                .enqueue(Queue::Indicators, items, Some(&position))
                .expect("enqueue"),
        );
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
