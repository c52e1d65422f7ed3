//! Snapshot answers against the real Threat Bus: how fast a rejoining tool gets the
//! bridge's intelligence, next to what Threat Bus relays for a plain app in the same run.
//!
//! `cargo bench --bench snapshot` prints:
//! 1. **baseline**: a plain Threat Bus app publishes [`N`] indicator frames at once (XPUB,
//!    SNDHWM=0, after Threat Bus's subscription arrived); a second app subscribed to
//!    `stix2/indicator` counts them: Threat Bus's relay rate, first → last arrival.
//! 2. **bridge**: the bridge binary (release build) with [`N`] active indicators in its
//!    catalog (written to the store before it starts, all delivered: nothing is queued),
//!    and a tool subscribing with `snapshot: 30` days: request → first and last snapshot
//!    frame at the tool, at the default pacing (400 frames/s) and with pacing far above
//!    Threat Bus's rate (where Threat Bus is the limit).
//!
//! Figures, not assertions: the machine is shared and noisy.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use opencti_threatbus::store::catalog::update_for_payload;
use opencti_threatbus::store::{Commit, Queue, Store, StoreOptions};
use serde_json::Value;
use support::bridge::{Bridge, BridgeEnv};
use support::opencti::OpenCti;
use support::threatbus::{sample_indicator, TestApp, ThreatBus};

/// Catalog indicators answered (the figure).
const N: usize = 20_000;
/// Longest wait for one run.
const WAIT: Duration = Duration::from_secs(240);
/// Pacings measured: the default, and one no Threat Bus keeps up with.
const RATES: [u32; 2] = [400, 5_000];

fn main() {
    println!("snapshot benchmark: {N} indicators, real Threat Bus");
    let baseline = baseline();
    println!(
        "baseline: Threat Bus relays a plain app's {N} frames at {baseline:.0} frames/s (first → last arrival)"
    );
    for rate in RATES {
        let (first, rate_seen, total) = bridge_snapshot(rate);
        println!(
            "bridge, snapshot_rate {rate}: first frame {:.0} ms after the request, {rate_seen:.0} frames/s \
             (first → last), all {N} in {:.1} s = {:.2}x the baseline relay",
            first.as_secs_f64() * 1000.0,
            total.as_secs_f64(),
            rate_seen / baseline
        );
    }
}

/// A plain app's burst through Threat Bus; frames/s first → last arrival.
fn baseline() -> f64 {
    let bus = ThreatBus::start();
    let counter = TestApp::subscribe(bus.manage_port, &["stix2/indicator"]);
    let mut publisher = TestApp::subscribe(bus.manage_port, &["stix2/indicator"]);
    // Warm up both subscriptions (slow joiner on the receiving side).
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter.count() == 0 {
        assert!(Instant::now() < deadline, "the probe never arrived");
        publisher.publish("stix2/indicator", &sample_indicator().to_string());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = counter.count();
    let frames: Vec<String> = (0..N).map(|n| indicator(n).to_string()).collect();
    for frame in &frames {
        publisher.publish("stix2/indicator", frame);
    }
    let (first, last) = arrivals(&counter, before, N);
    N as f64 / (last - first).as_secs_f64()
}

/// The bridge answering one snapshot request from `N` catalog entries; returns (request →
/// first frame, frames/s first → last, request → last).
fn bridge_snapshot(rate: u32) -> (Duration, f64, Duration) {
    let opencti = OpenCti::start();
    let bus = ThreatBus::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let seed = opencti.append_marking();
    fill_catalog(&data, &seed);
    let env = BridgeEnv::new(&opencti.base_url(), bus.manage_port, &data)
        .set("THREATBUS_SNAPSHOT_RATE", rate.to_string())
        .set("CONNECTOR_LOG_LEVEL", "info");
    let mut bridge = Bridge::start(env);
    bridge.wait_subscribed(WAIT);
    let asked = Instant::now();
    let tool = TestApp::subscribe_with_snapshot(bus.manage_port, &["stix2/indicator"], 30);
    let (first, last) = arrivals(&tool, 0, N);
    (
        first - asked,
        N as f64 / (last - first).as_secs_f64(),
        last - asked,
    )
}

/// Writes `N` delivered indicators (catalog entries, empty queue) and the position.
fn fill_catalog(data_dir: &Path, position: &str) {
    let store = Store::open(data_dir, &StoreOptions::default()).expect("open store");
    for start in (0..N).step_by(500) {
        let mut commit = Commit::default();
        for n in start..(start + 500).min(N) {
            commit
                .items
                .push(serde_json::to_vec(&indicator(n)).expect("json"));
        }
        drop(store.commit(Queue::Indicators, commit).expect("commit"));
        // Told and delivered, as the drainer does.
        let queued = store.scan(Queue::Indicators, None, N).expect("scan");
        let keys: Vec<u64> = queued.iter().map(|i| i.key).collect();
        let told = queued
            .into_iter()
            .filter_map(|item| {
                let update =
                    update_for_payload(&item.envelope.payload, item.envelope.received_at_ms)?;
                Some((item.key, update))
            })
            .collect();
        store.record_told(told).expect("record");
        store.ack_many(Queue::Indicators, &keys).expect("ack");
    }
    drop(store.set_position(position).expect("position"));
    let active = store.catalog_size().active;
    assert_eq!(active, N as u64, "every indicator active in the catalog");
    store.close().expect("close");
}

/// Waits for `n` arrivals after `before`; (first, last) arrival times, polled every 2 ms.
fn arrivals(app: &TestApp, before: usize, n: usize) -> (Instant, Instant) {
    let deadline = Instant::now() + WAIT;
    let mut first = None;
    loop {
        let got = app.count().saturating_sub(before);
        let now = Instant::now();
        if got > 0 && first.is_none() {
            first = Some(now);
        }
        if got >= n {
            return (first.unwrap_or(now), now);
        }
        assert!(now < deadline, "{got} of {n} frames after {WAIT:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A realistic indicator as the bridge forwards it (modified now: inside any window).
fn indicator(n: usize) -> Value {
    let mut value = sample_indicator();
    let now = opencti_threatbus::stix::Timestamp::from_system_time(std::time::SystemTime::now())
        .map(|t| t.to_rfc3339_millis())
        .unwrap_or_default();
    value["modified"] = Value::from(now);
    value["name"] = Value::from(format!(
        "10.{}.{}.{}",
        (n >> 16) & 255,
        (n >> 8) & 255,
        n & 255
    ));
    value["pattern"] = Value::from(format!(
        "[ipv4-addr:value = '10.{}.{}.{}']",
        (n >> 16) & 255,
        (n >> 8) & 255,
        n & 255
    ));
    value
        .as_object_mut()
        .map(|o| o.remove("x_threatbus_update"));
    value
}
