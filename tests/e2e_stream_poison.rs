//! Poison on the OpenCTI stream never blocks (SPEC §2.8, §2.11), through the bridge binary
//! between the OpenCTI double and the **real Threat Bus**: an event with an invalid UTF-8
//! byte, one over `bridge.max_event_bytes` and one that is not JSON each become a dead
//! letter with their bytes and the reason, on one connection (no reconnect loop), and the
//! indicators after them arrive; the position is past them, so a restart parks nothing
//! again. A stream that keeps failing at one position is said loudly, never looped on
//! silently.

mod support;

use std::path::Path;
use std::time::Duration;

use opencti_threatbus::store::{Store, StoreOptions};
use serde_json::Value;
use support::bridge::{store_position, Bridge, BridgeEnv, TOKEN};
use support::opencti::{Indicator, OpenCti};
use support::opencti_graphql::GraphqlDouble;
use support::threatbus::{TestApp, ThreatBus};

const WAIT: Duration = Duration::from_secs(90);
/// A small limit, so that an oversized event is quick to send in a test.
const MAX_EVENT_BYTES: usize = 65_536;
/// What a dead letter keeps of an oversized event (`POISON_PREFIX_BYTES`).
const PREFIX: usize = opencti_threatbus::opencti::stream::POISON_PREFIX_BYTES;

/// The STIX ids of the indicators Threat Bus relayed to `app`.
fn relayed(app: &TestApp) -> Vec<String> {
    app.received()
        .into_iter()
        .filter(|(suffix, _)| suffix == "indicator")
        .filter_map(|(_, body)| {
            let v: Value = serde_json::from_str(&body).ok()?;
            v["id"].as_str().map(str::to_string)
        })
        .collect()
}

/// (reason, payload) of every dead letter, from the closed store.
fn dead_letters(data_dir: &Path) -> Vec<(String, Vec<u8>)> {
    let store = Store::open(data_dir, &StoreOptions::default()).expect("open the store");
    let dead = store
        .dead_letters(None, usize::MAX)
        .expect("dead letters")
        .into_iter()
        .map(|d| (d.letter.reason, d.letter.envelope.payload))
        .collect();
    store.close().expect("close the store");
    dead
}

fn position(data_dir: &Path) -> Option<String> {
    let store = Store::open(data_dir, &StoreOptions::default()).expect("open the store");
    let position = store.position().expect("the position");
    store.close().expect("close the store");
    position
}

/// An OpenCTI create event for an indicator whose name holds the byte 0xFF.
fn invalid_utf8_event() -> Vec<u8> {
    let mut data = br#"{"version":"4","type":"create","data":{"type":"indicator","spec_version":"2.1","id":"indicator--9d1f8c55-6c38-4b6f-9a4e-1f0f2a6b7c01","name":"bad "#.to_vec();
    data.push(0xff);
    data.extend_from_slice(
        br#" byte","pattern":"[ipv4-addr:value = '10.9.9.9']","pattern_type":"stix"},"origin":{}}"#,
    );
    data
}

/// An OpenCTI create event four times over the limit.
fn oversized_event() -> Vec<u8> {
    format!(
        r#"{{"version":"4","type":"create","data":{{"type":"indicator","spec_version":"2.1","id":"indicator--5b0c3a1e-2f4d-4c6b-8a9e-0d1c2b3a4f50","description":"{}"}},"origin":{{}}}}"#,
        "x".repeat(MAX_EVENT_BYTES * 4)
    )
    .into_bytes()
}

#[test]
fn poison_on_the_stream_is_parked_with_its_bytes_and_the_stream_goes_on() {
    let opencti = OpenCti::start_with_graphql(GraphqlDouble::new(TOKEN));
    let bus = ThreatBus::start();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    store_position(&data_dir, &opencti.append_marking());
    let app = TestApp::subscribe(bus.manage_port, &["stix2/indicator"]);

    let before = Indicator::ipv4("10.0.0.1");
    opencti.append_indicator_create(&before);
    let invalid = invalid_utf8_event();
    opencti.append_raw_bytes("create", &invalid);
    let oversized = oversized_event();
    let oversized_id = opencti.append_raw_bytes("create", &oversized);
    opencti.append_raw("create", "{this is not JSON");
    let after = Indicator::ipv4("10.0.0.2");
    let last = opencti.append_indicator_create(&after);

    let env = BridgeEnv::new(&opencti.base_url(), bus.manage_port, &data_dir)
        .set("BRIDGE_MAX_EVENT_BYTES", MAX_EVENT_BYTES.to_string());
    let mut bridge = Bridge::start(env);
    bridge.wait_healthy(WAIT);
    bridge.until("the indicators around the poison", WAIT, || {
        let ids = relayed(&app);
        ids.contains(&before.stix_id) && ids.contains(&after.stix_id)
    });
    bridge.until("three dead letters", WAIT, || bridge.queued("dead") == 3);
    bridge.until("the outbox to drain", WAIT, || {
        bridge.queued("indicators") == 0
    });
    assert_eq!(
        opencti.request_count(),
        1,
        "one connection: poison is no reason to reconnect"
    );
    assert_eq!(bridge.terminate(Duration::from_secs(10)), Some(0));

    assert_eq!(position(&data_dir).as_deref(), Some(last.as_str()));
    let dead = dead_letters(&data_dir);
    assert_eq!(dead.len(), 3, "{dead:?}");
    let find = |needle: &str| {
        dead.iter()
            .find(|(reason, _)| reason.contains(needle))
            .unwrap_or_else(|| panic!("no dead letter says {needle:?}: {dead:?}"))
    };
    let (_, bytes) = find("not valid UTF-8");
    assert_eq!(bytes, &invalid, "the raw bytes, bad byte included");
    let (reason, bytes) = find("over bridge.max_event_bytes");
    // Its size counts every line of it (terminators aside), the dropped ones too.
    let size = format!("id: {oversized_id}").len()
        + "event: create".len()
        + "data: ".len()
        + oversized.len();
    assert!(reason.contains(&format!("{size} bytes")), "{reason}");
    assert_eq!(bytes.len(), PREFIX, "a bounded prefix");
    assert_eq!(bytes[..], oversized[..PREFIX]);
    let (_, bytes) = find("not valid JSON");
    assert_eq!(bytes, b"{this is not JSON");

    // The position is past the poison: a restart reads on from there and parks nothing again.
    let later = Indicator::ipv4("10.0.0.3");
    opencti.append_indicator_create(&later);
    bridge.restart();
    bridge.wait_healthy(WAIT);
    bridge.until("the indicator after the restart", WAIT, || {
        relayed(&app).contains(&later.stix_id)
    });
    assert_eq!(bridge.queued("dead"), 3, "nothing parked twice");
    let resumed = opencti.requests().pop().expect("a second connection");
    assert_eq!(resumed.header("last-event-id"), Some(last.as_str()));
    assert_eq!(bridge.terminate(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_position_that_keeps_failing_is_said_with_its_position_and_count() {
    let opencti = OpenCti::start_with_graphql(GraphqlDouble::new(TOKEN));
    let bus = ThreatBus::start();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let seed = opencti.append_marking();
    store_position(&data_dir, &seed);
    let app = TestApp::subscribe(bus.manage_port, &["stix2/indicator"]);
    // The same position answered 502 six times in a row, then served.
    opencti.fail_next(502, 6);
    let mut bridge = Bridge::start(BridgeEnv::new(
        &opencti.base_url(),
        bus.manage_port,
        &data_dir,
    ));
    bridge.wait_healthy(WAIT);
    bridge.until("the error naming the position", WAIT, || {
        bridge
            .log_text()
            .contains("keeps failing at the same position")
    });
    let log = bridge.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("keeps failing at the same position"))
        .expect("the line");
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains(&seed), "it names the position: {line}");
    assert!(line.contains("3 times in a row"), "and the count: {line}");

    let ind = Indicator::ipv4("10.1.0.1");
    opencti.append_indicator_create(&ind);
    bridge.until("the stream to work again", WAIT, || {
        relayed(&app).contains(&ind.stix_id)
    });
    bridge.until("the all-clear", WAIT, || {
        bridge
            .log_text()
            .contains("the stream moves again past the position that kept failing")
    });
    assert!(
        bridge.log_text().contains("6 times in a row"),
        "said again as the count doubles"
    );
    assert_eq!(bridge.terminate(Duration::from_secs(10)), Some(0));
}
