//! Indicators from other Threat Bus apps → OpenCTI, in indicators per second.
//!
//! `cargo bench --bench import` prints, at 1 ms of API latency:
//! - baseline: a trivial client doing what an import costs at least — the bridge's lookup
//!   (`IndicatorImportTarget`) then its create (`IndicatorImportAdd`), same variables —
//!   straight to a fresh OpenCTI GraphQL double, one indicator at a time (reqwest, no
//!   bridge);
//! - the bridge: the release binary subscribed to the fake Threat Bus
//!   (`tests/support/fakebus.rs`), M new indicators published at once as another app's;
//!   the rate is M / the time from the first publish until the double holds all M. The
//!   path: ZeroMQ → intake (own-echo check against the catalog) → durable import outbox →
//!   the import drainer (lookup, plan, create).
//!
//! The double validates every request against the OpenCTI 6.9.28 schema, as in the tests.
//! Figures, not assertions: this machine is shared and noisy.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use opencti_threatbus::opencti::indicator_import::{
    import_target_variables, indicator_add_variables, IMPORT_ADD, IMPORT_TARGET,
};
use opencti_threatbus::stix::import::ImportIndicator;
use serde_json::{json, Value};
use support::bridge::{Bridge, BridgeEnv, BIN, TOKEN};
use support::fakebus::FakeBus;
use support::opencti::OpenCti;
use support::opencti_graphql::GraphqlDouble;

/// Indicators per measurement.
const M: usize = 2_000;
const LATENCY: Duration = Duration::from_millis(1);
/// Measurements per figure (baseline and bridge alternating); best and median shown.
const RUNS: usize = 3;
const DEADLINE: Duration = Duration::from_secs(120);

fn main() {
    assert!(
        BIN.contains("/release/"),
        "the bridge binary is not the release build: {BIN} (run `cargo bench --bench import`)"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("import benchmark: fake Threat Bus → bridge → OpenCTI GraphQL double, {M} new indicators, latency {} ms", LATENCY.as_millis());
    let mut baselines = Vec::new();
    let mut bridges = Vec::new();
    for run in 0..RUNS {
        baselines.push(runtime.block_on(baseline(run)));
        bridges.push(bridge(run));
    }
    let (baseline_best, baseline_median) = best_and_median(&baselines);
    let (bridge_best, bridge_median) = best_and_median(&bridges);
    println!(
        "baseline (lookup + create, one at a time, reqwest → double): best {baseline_best:.0}/s, median {baseline_median:.0}/s"
    );
    println!(
        "bridge (fake bus → intake → import outbox → drainer → double): best {bridge_best:.0}/s, median {bridge_median:.0}/s = {:.2}x the baseline",
        bridge_best / baseline_best
    );
}

fn best_and_median(values: &[f64]) -> (f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    (sorted[sorted.len() - 1], sorted[sorted.len() / 2])
}

/// Another app's indicator number `n` of run `run` (distinct ids and patterns).
fn indicator(run: usize, n: usize) -> Value {
    json!({
        "type": "indicator",
        "spec_version": "2.1",
        "id": format!("indicator--5a1e0f3c-{run:04x}-4000-8000-{n:012x}"),
        "created": "2024-03-01T10:00:00.000Z",
        "modified": "2024-03-01T10:00:00.000Z",
        "name": format!("misp {run}/{n}"),
        "pattern": format!("[ipv4-addr:value = '10.{run}.{}.{}']", (n >> 8) & 255, n & 255),
        "pattern_type": "stix",
        "valid_from": "2024-03-01T10:00:00.000Z",
        "confidence": 60,
    })
}

fn double() -> (OpenCti, GraphqlDouble) {
    let graphql = GraphqlDouble::new(TOKEN);
    graphql.set_latency(LATENCY);
    let opencti = OpenCti::start_with_graphql(graphql.clone());
    (opencti, graphql)
}

async fn baseline(run: usize) -> f64 {
    let (opencti, graphql) = double();
    let endpoint = format!("{}/graphql", opencti.base_url());
    let client = reqwest::Client::new();
    let indicators: Vec<ImportIndicator> = (0..M)
        .map(|n| ImportIndicator::from_stix(&indicator(run, n)).expect("a valid indicator"))
        .collect();
    let started = Instant::now();
    for indicator in &indicators {
        for body in [
            json!({ "query": IMPORT_TARGET, "variables": import_target_variables(&indicator.stix_id) }),
            json!({ "query": IMPORT_ADD, "variables": indicator_add_variables(indicator) }),
        ] {
            let answer: Value = client
                .post(&endpoint)
                .bearer_auth(TOKEN)
                .json(&body)
                .send()
                .await
                .expect("posting to the double")
                .json()
                .await
                .expect("a JSON answer");
            assert!(
                answer.get("errors").is_none(),
                "the double refused: {answer}"
            );
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(graphql.indicator_adds().len(), M);
    M as f64 / elapsed.as_secs_f64()
}

fn bridge(run: usize) -> f64 {
    let bus = FakeBus::start();
    let (opencti, graphql) = double();
    let dir = tempfile::tempdir().expect("tempdir");
    let env = BridgeEnv::new(
        &opencti.base_url(),
        bus.manage_port(),
        &dir.path().join("data"),
    )
    .set("CONNECTOR_LOG_LEVEL", "warn");
    let mut bridge = Bridge::start(env);
    bus.wait_subscribers(1, Duration::from_secs(30));
    let frames: Vec<String> = (0..M)
        .map(|n| indicator(run + 100, n).to_string())
        .collect();
    let started = Instant::now();
    for frame in &frames {
        bus.publish_to_all("indicator", frame);
    }
    loop {
        let created = graphql.indicator_adds().len();
        if created >= M {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE && bridge.running(),
            "{created} of {M} imported after {:?}:\n{}",
            started.elapsed(),
            bridge.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let rate = M as f64 / started.elapsed().as_secs_f64();
    bridge.terminate(Duration::from_secs(15));
    drop(opencti);
    rate
}
