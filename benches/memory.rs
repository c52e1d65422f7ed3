//! The daemon's memory with a large backlog (issue 8 item 5): is it ≤ 256 MB RSS with
//! 1,000,000 indicators queued, and how long does a restart take to a healthy daemon?
//!
//! `cargo bench --bench memory` prints, for N indicators of ~1.4 KiB queued (written as the
//! stream reader writes them: `Store::commit` of 512 items and the position; each also in
//! the catalog, as if an earlier version had been told, the worst case for memory),
//! N = 100,000 and 1,000,000:
//! - the store's disk bytes per item;
//! - for each sled cache (the default of `bridge.cache_mb`, and 128 MiB, the old fixed value,
//!   as the baseline): the daemon binary (the release build under `cargo bench`) started on
//!   that data directory with Threat Bus away (nothing drains) and an OpenCTI stream double
//!   at the stored position; the time until `health` answers, then VmRSS once it settled
//!   ([`SETTLE`]) and VmHWM (the peak), from `/proc/<pid>/status`.
//!
//! Before each size, the writing process's own peak RSS: the store's share of the memory
//! while ingesting (the stream reader's own buffers are not in it).
//!
//! Environment: `MEMORY_BENCH_N` (comma-separated counts), `MEMORY_BENCH_CACHE_MB`
//! (comma-separated; `default` = no `BRIDGE_CACHE_MB`), `MEMORY_BENCH_DIR` (where the
//! stores go; 1M items take ~3.5 GB). Figures, not assertions: the machine is shared.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use opencti_threatbus::store::catalog::update_for_payload;
use opencti_threatbus::store::{Commit, Queue, Store, StoreOptions, DEFAULT_CACHE_MB};
use serde_json::Value;
use support::bridge::{Bridge, BridgeEnv};
use support::opencti::OpenCti;
use support::threatbus::unused_port;

/// Bytes of one queued indicator (the STIX JSON).
const ITEM_BYTES: usize = 1400;
/// Items per commit: a full stream-reader batch.
const BATCH: usize = 512;
/// How long the daemon runs after `health` first answers before RSS is read.
const SETTLE: Duration = Duration::from_secs(5);
/// The target of issue 8 item 5.
const TARGET_RSS_MB: f64 = 256.0;
/// The cache before `bridge.cache_mb`: the baseline.
const BASELINE_CACHE_MB: u64 = 128;
const WAIT: Duration = Duration::from_secs(300);

fn main() {
    let sizes = list("MEMORY_BENCH_N", "100000,1000000");
    let caches: Vec<Option<u64>> = std::env::var("MEMORY_BENCH_CACHE_MB")
        .unwrap_or_else(|_| format!("default,{BASELINE_CACHE_MB}"))
        .split(',')
        .map(|c| match c.trim() {
            "default" => None,
            n => Some(
                n.parse()
                    .expect("MEMORY_BENCH_CACHE_MB: integers or default"),
            ),
        })
        .collect();
    let root = std::env::var_os("MEMORY_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    println!(
        "=== opencti-threatbus memory benchmark: N indicators queued, daemon restarted on them ==="
    );
    println!(
        "command: cargo bench --bench memory   (stores under {})",
        root.display()
    );
    println!(
        "items ~{ITEM_BYTES} B with catalog entries, commits of {BATCH}; Threat Bus away; \
         RSS read {} s after health answers; target <= {TARGET_RSS_MB:.0} MB RSS at 1M",
        SETTLE.as_secs()
    );
    println!(
        "{:>9} {:>12} {:>10} {:>12} {:>12} {:>12} {:>12}",
        "N", "cache", "write s", "healthy s", "RSS MB", "peak MB", "disk B/item"
    );
    std::fs::create_dir_all(&root).expect("MEMORY_BENCH_DIR cannot be created");
    let opencti = OpenCti::start();
    let seed = opencti.append_marking();
    for n in sizes {
        let dir = tempfile::tempdir_in(&root).expect("tempdir");
        let data = dir.path().join("data");
        let started = Instant::now();
        write(&data, n, &seed);
        let write_s = started.elapsed().as_secs_f64();
        // The store's share of ingest memory (no stream reader): this process's peak so far.
        let writer_peak = status_mb(std::process::id(), "VmHWM:");
        println!("{n:>9} written through the library (default cache): this process's peak RSS {writer_peak:.1} MB");
        let disk = dir_bytes(&data.join("store")) as f64 / n as f64;
        if std::env::var_os("MEMORY_BENCH_KEEP").is_some() {
            // For a profiler run by hand on the same store.
            println!("keeping {}", data.display());
            std::mem::forget(dir);
            continue;
        }
        for &cache in &caches {
            let (healthy, rss, peak) = run_daemon(&opencti, &data, cache, n);
            let label = match cache {
                None => format!("{DEFAULT_CACHE_MB} MiB dflt"),
                Some(mb) if mb == BASELINE_CACHE_MB => format!("{mb} MiB base"),
                Some(mb) => format!("{mb} MiB"),
            };
            println!(
                "{n:>9} {label:>12} {write_s:>10.1} {:>12.2} {rss:>12.1} {peak:>12.1} {disk:>12.0}",
                healthy.as_secs_f64()
            );
        }
    }
}

fn list(var: &str, default: &str) -> Vec<usize> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|n| n.trim().parse().expect("comma-separated integers"))
        .collect()
}

/// Starts the daemon on `data` (a restart: the store holds `n` indicators and a position),
/// returns (spawn → health answers, VmRSS after settling, VmHWM) in MB.
fn run_daemon(
    opencti: &OpenCti,
    data: &Path,
    cache_mb: Option<u64>,
    n: usize,
) -> (Duration, f64, f64) {
    let mut env =
        BridgeEnv::new(&opencti.base_url(), unused_port(), data).set("CONNECTOR_LOG_LEVEL", "info");
    if let Some(mb) = cache_mb {
        env = env.set("BRIDGE_CACHE_MB", mb.to_string());
    }
    // Experiments (e.g. MALLOC_ARENA_MAX=2): `K=V` pairs, comma-separated.
    for pair in std::env::var("MEMORY_BENCH_DAEMON_ENV")
        .unwrap_or_default()
        .split(',')
    {
        if let Some((k, v)) = pair.split_once('=') {
            env = env.set(k.trim(), v.trim());
        }
    }
    let spawned = Instant::now();
    let mut bridge = Bridge::start(env);
    bridge.wait_healthy(WAIT);
    let healthy = spawned.elapsed();
    let pid = bridge.pid().expect("running");
    std::thread::sleep(SETTLE);
    let queued = bridge.queued("indicators");
    assert_eq!(queued, n as u64, "the daemon sees every queued indicator");
    let rss = status_mb(pid, "VmRSS:");
    let peak = status_mb(pid, "VmHWM:");
    if std::env::var_os("MEMORY_BENCH_DETAIL").is_some() {
        println!(
            "          detail: anon {:.1} MB, file {:.1} MB, threads {}",
            status_mb(pid, "RssAnon:"),
            status_mb(pid, "RssFile:"),
            std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
        );
    }
    assert!(
        bridge.terminate(Duration::from_secs(20)).is_some(),
        "the daemon stops on SIGTERM"
    );
    (healthy, rss, peak)
}

/// A `kB` line of `/proc/<pid>/status`, in MB.
fn status_mb(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("status field");
    kb * 1024.0 / 1e6
}

/// Queues `n` indicators as the stream reader does, each with a catalog entry, then closes
/// the store cleanly (as a daemon stopped by SIGTERM leaves it).
fn write(data: &Path, n: usize, position: &str) {
    let store = Store::open(data, &StoreOptions::default()).expect("open store");
    let mut pending = std::collections::VecDeque::new();
    for start in (0..n).step_by(BATCH) {
        let mut commit = Commit {
            position: Some(position.to_string()),
            ..Commit::default()
        };
        let first = store.next_key(Queue::Indicators);
        let mut told = Vec::new();
        for i in start..(start + BATCH).min(n) {
            let body = serde_json::to_vec(&indicator(i)).expect("json");
            let key = first + (i - start) as u64;
            told.extend(update_for_payload(&body, 0).map(|update| (key, update)));
            commit.items.push(body);
        }
        pending.push_back(store.commit(Queue::Indicators, commit).expect("commit"));
        // The worst case for memory and disk: every queued indicator also in the catalog
        // (an earlier version of each told before Threat Bus went away).
        store.record_told(told).expect("record");
        // The reader's read-ahead: a few batches waiting for their group commit.
        while pending.len() > 8 {
            if let Some(d) = pending.pop_front() {
                d.wait_blocking().expect("durable");
            }
        }
    }
    for d in pending {
        d.wait_blocking().expect("durable");
    }
    store.close().expect("close");
}

/// A STIX indicator padded to about `ITEM_BYTES`.
fn indicator(n: usize) -> Value {
    let mut value = serde_json::json!({
        "type": "indicator",
        "spec_version": "2.1",
        "id": format!("indicator--{:08x}-0000-4000-8000-{:012x}", n as u32, n),
        "created": "2024-01-02T03:04:05.000Z",
        "modified": "2024-01-02T03:04:05.000Z",
        "pattern": format!("[ipv4-addr:value = '10.{}.{}.{}']", (n >> 16) & 255, (n >> 8) & 255, n & 255),
        "pattern_type": "stix",
        "valid_from": "2024-01-02T03:04:05Z",
    });
    let used = value.to_string().len() + 20;
    value["description"] = Value::from("x".repeat(ITEM_BYTES.saturating_sub(used)));
    value
}

fn dir_bytes(path: &Path) -> u64 {
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
