//! Upgrades of stores written by earlier format versions (`migrations/`): a store of the
//! previous version, with items queued, is upgraded in place at open and everything it
//! held is still delivered.
//!
//! The version-1 store is written here byte for byte as `migrations/0001-initial.md`
//! describes it (its own record structs, not the crate's), so that a change to the
//! crate's records cannot silently change what "a version-1 store" means.

mod support;

use std::path::Path;
use std::time::Duration;

use opencti_threatbus::store::{Forwarded, Queue, Store, StoreOptions, CURRENT_FORMAT};
use serde::Serialize;
use serde_json::{json, Value};
use support::bridge::{Bridge, BridgeEnv, TOKEN};
use support::opencti::{Indicator, OpenCti};
use support::opencti_graphql::GraphqlDouble;
use support::threatbus::{TestApp, ThreatBus};

const WAIT: Duration = Duration::from_secs(90);

/// `Envelope` of format 1.
#[derive(Serialize)]
struct EnvelopeV1 {
    received_at_ms: u64,
    attempts: u32,
    next_attempt_ms: u64,
    last_error: Option<String>,
    payload: Vec<u8>,
}

/// `DeadLetter` of format 1 (`queue`: 0 = indicators, 1 = sightings).
#[derive(Serialize)]
struct DeadLetterV1 {
    queue: u32,
    original_key: Option<u64>,
    dead_at_ms: u64,
    reason: String,
    envelope: EnvelopeV1,
}

fn envelope(payload: &Value, attempts: u32) -> Vec<u8> {
    bincode::serialize(&EnvelopeV1 {
        received_at_ms: 1_700_000_000_000,
        attempts,
        next_attempt_ms: 0,
        last_error: (attempts > 0).then(|| "no echo from Threat Bus".to_owned()),
        payload: payload.to_string().into_bytes(),
    })
    .unwrap()
}

fn key(tag: u8, seq: u64) -> Vec<u8> {
    let mut key = vec![tag];
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// An indicator as the bridge queues it for Threat Bus.
fn indicator(id: &str, modified: &str, update: Option<&str>) -> Value {
    let mut value = json!({
        "type": "indicator",
        "spec_version": "2.1",
        "id": id,
        "created": "2024-01-02T03:04:05.000Z",
        "modified": modified,
        "name": "bad domain evil.example",
        "pattern": "[domain-name:value = 'evil.example']",
        "pattern_type": "stix",
        "valid_from": "2024-01-02T03:04:05Z",
    });
    if let Some(update) = update {
        value["x_threatbus_update"] = json!(update);
    }
    value
}

/// Writes a format-1 store into `data_dir`: `indicators` queued in this order, `sighting`
/// queued, one dead letter, the stream position and a meta value.
fn write_v1_store(data_dir: &Path, indicators: &[Value], sighting: &Value, position: &str) {
    let db = sled::open(data_dir.join("store")).unwrap();
    let tree = db.open_tree("outbox").unwrap();
    tree.insert(b"\x00format_version", &1u32.to_be_bytes())
        .unwrap();
    tree.insert(b"\x00stream_position", position.as_bytes())
        .unwrap();
    tree.insert(b"\x00meta/organization_id", b"identity--x".as_slice())
        .unwrap();
    for (seq, value) in indicators.iter().enumerate() {
        tree.insert(key(0x01, 10 + seq as u64), envelope(value, seq as u32 % 2))
            .unwrap();
    }
    tree.insert(key(0x02, 4), envelope(sighting, 0)).unwrap();
    let dead = DeadLetterV1 {
        queue: 0,
        original_key: Some(3),
        dead_at_ms: 1_700_000_000_000,
        reason: "Threat Bus never confirmed it".to_owned(),
        envelope: EnvelopeV1 {
            received_at_ms: 1_700_000_000_000,
            attempts: 5,
            next_attempt_ms: 0,
            last_error: None,
            payload: b"{}".to_vec(),
        },
    };
    tree.insert(key(0x03, 0), bincode::serialize(&dead).unwrap())
        .unwrap();
    db.flush().unwrap();
}

const A: &str = "indicator--3d63fc4d-ba50-4892-be4d-f3a44fdc4461";
const B: &str = "indicator--8e2e2d2b-17d4-4cbf-938f-98ee46b3cd3f";
const C: &str = "indicator--c4d3a1f0-5b6e-4d2a-9f3c-1e2d3c4b5a69";

#[test]
fn a_version_1_store_is_upgraded_in_place_and_seeds_the_catalog_from_its_queue() {
    let dir = tempfile::tempdir().unwrap();
    let queued = vec![
        indicator(A, "2024-01-02T03:04:05.000Z", None),
        indicator(B, "2024-01-02T03:04:06.000Z", None),
        indicator(A, "2024-01-03T00:00:00.000Z", Some("EDIT")),
        indicator(C, "2024-01-04T00:00:00.000Z", Some("REMOVE")),
        json!({"not": "an indicator"}),
    ];
    let sighting = json!({"type": "sighting", "id": "sighting--1"});
    write_v1_store(dir.path(), &queued, &sighting, "1709287215731-0");
    // sled releases its lock a moment after the last handle is dropped.
    std::thread::sleep(Duration::from_millis(300));

    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    assert_eq!(store.format_found(), 1);
    // Nothing of version 1 is touched.
    assert_eq!(
        store.position().unwrap().as_deref(),
        Some("1709287215731-0")
    );
    assert_eq!(
        store.meta("organization_id").unwrap().as_deref(),
        Some("identity--x")
    );
    let items = store.scan(Queue::Indicators, None, 10).unwrap();
    let payloads: Vec<Value> = items
        .iter()
        .map(|i| serde_json::from_slice(&i.envelope.payload).unwrap())
        .collect();
    assert_eq!(payloads, queued);
    assert_eq!(items[0].key, 10, "keys and attempts are kept");
    assert_eq!(items[1].envelope.attempts, 1);
    assert_eq!(store.retrying(Queue::Indicators), 2);
    assert_eq!(store.len(Queue::Sightings), 1);
    assert_eq!(store.dead_len(), 1);
    // The catalog holds what the queue will send: the later EDIT of A, B, C removed.
    let size = store.catalog_size();
    assert_eq!((size.active, size.total), (2, 3));
    let a = store.catalog_get(A).unwrap().unwrap();
    assert_eq!(a.operation, Forwarded::Edit);
    assert_eq!(a.body, queued[2].to_string().into_bytes());
    assert_eq!(
        store.catalog_get(C).unwrap().unwrap().operation,
        Forwarded::Remove
    );
    // New items continue after the old keys.
    drop(
        store
            .enqueue(Queue::Indicators, vec![b"{}".to_vec()], None)
            .unwrap(),
    );
    assert_eq!(store.scan(Queue::Indicators, None, 10).unwrap()[5].key, 15);
    store.close().unwrap();
    drop(store);

    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    assert_eq!(
        store.format_found(),
        CURRENT_FORMAT,
        "upgraded once, for good"
    );
    assert_eq!(store.catalog_size().total, 3);
}

/// Through the daemon: a version-1 store left by the previous release, with indicators
/// waiting for Threat Bus and a stream position. The new binary upgrades it, delivers
/// every queued indicator and then goes on reading the stream from the stored position.
#[test]
fn the_daemon_upgrades_a_version_1_store_and_delivers_what_it_held() {
    let graphql = GraphqlDouble::new(TOKEN);
    graphql.seed_indicator_with_standard_id(A);
    let opencti = OpenCti::start_with_graphql(graphql.clone());
    let bus = ThreatBus::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let position = opencti.append_marking();
    let queued: Vec<Value> = (0..30)
        .map(|i| {
            let id = format!("indicator--{}", uuid::Uuid::new_v4());
            indicator(&id, &format!("2024-01-02T03:04:{:02}.000Z", i % 60), None)
        })
        .collect();
    std::fs::create_dir_all(&data).unwrap();
    let sighting = support::threatbus::sample_sighting(A);
    write_v1_store(&data, &queued, &sighting, &position);
    let after = Indicator::ipv4("10.77.0.1");
    opencti.append_indicator_create(&after);

    let app = TestApp::subscribe(bus.manage_port, &["stix2/indicator"]);
    let mut bridge = Bridge::start(BridgeEnv::new(&opencti.base_url(), bus.manage_port, &data));
    bridge.wait_healthy(WAIT);
    let mut wanted: Vec<String> = queued
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    wanted.push(after.stix_id.clone());
    bridge.until(
        "every queued indicator and the new one at the app",
        WAIT,
        || {
            let got: Vec<String> = app
                .received()
                .iter()
                .map(|(_, body)| support::threatbus::stix_id(body))
                .collect();
            wanted.iter().all(|id| got.contains(id))
        },
    );
    bridge.until("the outbox to drain", WAIT, || {
        bridge.queued("indicators") == 0
    });
    let report = bridge.inspect();
    assert_eq!(report["format_version"], CURRENT_FORMAT);
    assert_eq!(report["catalog"]["active"], 31, "{}", report["catalog"]);
    assert!(bridge.log_text().contains("store upgraded"));
    // The queued sighting reaches OpenCTI; the dead letter stays for the operator.
    bridge.until("the queued sighting in OpenCTI", WAIT, || {
        graphql.sighting_count() == 1 && bridge.queued("sightings") == 0
    });
    assert_eq!(bridge.queued("dead"), 1);
}

/// A version-2 store (the catalog, no import queue) with items queued, written by the
/// store code as version 2 wrote it (version 3 adds keys only, so the bytes are the same
/// but for the version record), is upgraded in place and keeps everything.
#[test]
fn a_version_2_store_is_upgraded_to_3_and_keeps_its_items_and_catalog() {
    use opencti_threatbus::store::catalog::update_for_payload;
    use opencti_threatbus::store::Commit;
    let dir = tempfile::tempdir().unwrap();
    let queued = vec![
        indicator(A, "2024-01-02T03:04:05.000Z", None),
        indicator(B, "2024-01-02T03:04:06.000Z", Some("EDIT")),
    ];
    {
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let items: Vec<Vec<u8>> = queued.iter().map(|v| v.to_string().into_bytes()).collect();
        let catalog = items.iter().filter_map(|i| update_for_payload(i)).collect();
        let commit = Commit {
            items,
            catalog,
            position: Some("1709287215731-0".into()),
            ..Commit::default()
        };
        store
            .commit(Queue::Indicators, commit)
            .unwrap()
            .wait_blocking()
            .unwrap();
        let sighting = json!({"type": "sighting", "id": "sighting--1"}).to_string();
        drop(
            store
                .enqueue(Queue::Sightings, vec![sighting.into_bytes()], None)
                .unwrap(),
        );
        drop(
            store
                .park(Queue::Sightings, b"bad".to_vec(), "invalid".into())
                .unwrap(),
        );
        store.close().unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    {
        let db = sled::open(dir.path().join("store")).unwrap();
        let tree = db.open_tree("outbox").unwrap();
        tree.insert(b"\x00format_version", &2u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));

    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    assert_eq!(store.format_found(), 2);
    assert_eq!(
        store.position().unwrap().as_deref(),
        Some("1709287215731-0")
    );
    let payloads: Vec<Value> = store
        .scan(Queue::Indicators, None, 10)
        .unwrap()
        .iter()
        .map(|i| serde_json::from_slice(&i.envelope.payload).unwrap())
        .collect();
    assert_eq!(payloads, queued);
    assert_eq!(store.len(Queue::Sightings), 1);
    assert_eq!(store.dead_len(), 1);
    assert_eq!(store.len(Queue::Imports), 0);
    let size = store.catalog_size();
    assert_eq!((size.active, size.total), (2, 2));
    // The new queue works next to the old ones.
    drop(
        store
            .enqueue(Queue::Imports, vec![b"{}".to_vec()], None)
            .unwrap(),
    );
    assert_eq!(store.len(Queue::Imports), 1);
    store.close().unwrap();
    drop(store);
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    assert_eq!(store.format_found(), CURRENT_FORMAT);
    assert_eq!(
        (store.len(Queue::Indicators), store.len(Queue::Imports)),
        (2, 1)
    );
}
