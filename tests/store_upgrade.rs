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
    let mut wanted = ids(&queued);
    wanted.push(after.stix_id.clone());
    until_received(
        &bridge,
        &app,
        "every queued indicator and the new one at the app",
        &wanted,
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

/// `CatalogEntry` of formats 2 and 3 (`operation`: 0 create, 1 EDIT, 2 REMOVE).
#[derive(Serialize)]
struct CatalogEntryV2 {
    operation: u32,
    modified_ms: i64,
    recorded_at_ms: u64,
    body: Vec<u8>,
}

fn catalog_key(id: &str) -> Vec<u8> {
    let mut key = vec![0x04];
    key.extend_from_slice(id.as_bytes());
    key
}

/// The catalog record format 2 and 3 wrote for an indicator as queued.
fn catalog_entry(value: &Value) -> Vec<u8> {
    let operation = match value["x_threatbus_update"].as_str() {
        None => 0,
        Some("EDIT") => 1,
        Some(_) => 2,
    };
    let modified = value["modified"].as_str().unwrap();
    let modified_ms = chrono_free_millis(modified);
    bincode::serialize(&CatalogEntryV2 {
        operation,
        modified_ms,
        recorded_at_ms: 1_700_000_000_000,
        body: if operation == 2 {
            Vec::new()
        } else {
            value.to_string().into_bytes()
        },
    })
    .unwrap()
}

/// Milliseconds of the `2024-01-0DTHH:MM:SS.000Z` times used here.
fn chrono_free_millis(time: &str) -> i64 {
    let day: i64 = time[8..10].parse().unwrap();
    let (h, m, s): (i64, i64, i64) = (
        time[11..13].parse().unwrap(),
        time[14..16].parse().unwrap(),
        time[17..19].parse().unwrap(),
    );
    // 2024-01-01T00:00:00Z
    1_704_067_200_000 + (((day - 1) * 24 + h) * 60 + m) * 60_000 + s * 1000
}

/// Writes a store of `version` (2 or 3: the same records, 3 adds a queue this test leaves
/// empty) as those versions wrote it: `queued` indicators with their catalog entries
/// (written with them), `delivered` ones only in the catalog, a sighting, a dead letter
/// and the position.
fn write_v2_store(data_dir: &Path, version: u32, queued: &[Value], delivered: &[Value]) {
    let db = sled::open(data_dir.join("store")).unwrap();
    let tree = db.open_tree("outbox").unwrap();
    tree.insert(b"\x00format_version", &version.to_be_bytes())
        .unwrap();
    tree.insert(b"\x00stream_position", b"1709287215731-0".as_slice())
        .unwrap();
    for value in delivered.iter().chain(queued) {
        tree.insert(
            catalog_key(value["id"].as_str().unwrap()),
            catalog_entry(value),
        )
        .unwrap();
    }
    for (seq, value) in queued.iter().enumerate() {
        tree.insert(key(0x01, 7 + seq as u64), envelope(value, 0))
            .unwrap();
    }
    let sighting = json!({"type": "sighting", "id": "sighting--1"});
    tree.insert(key(0x02, 0), envelope(&sighting, 0)).unwrap();
    let dead = DeadLetterV1 {
        queue: 1,
        original_key: None,
        dead_at_ms: 1_700_000_000_000,
        reason: "invalid".to_owned(),
        envelope: EnvelopeV1 {
            received_at_ms: 1_700_000_000_000,
            attempts: 0,
            next_attempt_ms: 0,
            last_error: None,
            payload: b"bad".to_vec(),
        },
    };
    tree.insert(key(0x03, 0), bincode::serialize(&dead).unwrap())
        .unwrap();
    db.flush().unwrap();
}

/// Stores of versions 2 and 3 (the catalog written with the queue) are upgraded in place
/// and keep everything: items, keys, the catalog of delivered and queued indicators.
#[test]
fn version_2_and_3_stores_are_upgraded_and_keep_their_items_and_catalog() {
    for version in [2, 3] {
        let dir = tempfile::tempdir().unwrap();
        let queued = vec![
            indicator(A, "2024-01-02T03:04:05.000Z", None),
            indicator(B, "2024-01-02T03:04:06.000Z", Some("EDIT")),
        ];
        let delivered = vec![indicator(C, "2024-01-01T00:00:00.000Z", None)];
        write_v2_store(dir.path(), version, &queued, &delivered);
        std::thread::sleep(Duration::from_millis(300));

        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(store.format_found(), version);
        assert_eq!(
            store.position().unwrap().as_deref(),
            Some("1709287215731-0")
        );
        let items = store.scan(Queue::Indicators, None, 10).unwrap();
        let payloads: Vec<Value> = items
            .iter()
            .map(|i| serde_json::from_slice(&i.envelope.payload).unwrap())
            .collect();
        assert_eq!(payloads, queued);
        assert_eq!(items[0].key, 7);
        assert_eq!(store.len(Queue::Sightings), 1);
        assert_eq!(store.dead_len(), 1);
        assert_eq!(store.len(Queue::Imports), 0);
        let size = store.catalog_size();
        assert_eq!((size.active, size.total), (3, 3), "version {version}");
        let c = store.catalog_get(C).unwrap().unwrap();
        assert_eq!(c.body, delivered[0].to_string().into_bytes());
        assert_eq!(
            c.modified_ms,
            chrono_free_millis("2024-01-01T00:00:00.000Z")
        );
        // The new queue works next to the old ones.
        drop(
            store
                .enqueue(Queue::Imports, vec![b"{}".to_vec()], None)
                .unwrap(),
        );
        store.close().unwrap();
        drop(store);
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(store.format_found(), CURRENT_FORMAT);
        assert_eq!(
            (store.len(Queue::Indicators), store.len(Queue::Imports)),
            (2, 1)
        );
    }
}

/// Through the daemon: a version-3 store whose catalog holds delivered indicators and the
/// queued ones (as version 3 wrote them, with the queue). The new binary upgrades it,
/// delivers every queued indicator, recording each again as it tells Threat Bus, and
/// answers a snapshot request with the whole catalog: nothing of version 3 is lost.
#[test]
fn the_daemon_upgrades_a_version_3_store_and_keeps_its_catalog() {
    let opencti = OpenCti::start_with_graphql(GraphqlDouble::new(TOKEN));
    let bus = ThreatBus::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let new_id = || format!("indicator--{}", uuid::Uuid::new_v4());
    let queued: Vec<Value> = (0..20)
        .map(|i| indicator(&new_id(), &format!("2024-01-02T03:04:{i:02}.000Z"), None))
        .collect();
    let delivered: Vec<Value> = (0..10)
        .map(|i| indicator(&new_id(), &format!("2024-01-01T00:00:{i:02}.000Z"), None))
        .collect();
    write_v2_store(&data, 3, &queued, &delivered);
    opencti.append_marking();

    let app = TestApp::subscribe(bus.manage_port, &["stix2/indicator"]);
    let mut bridge = Bridge::start(BridgeEnv::new(&opencti.base_url(), bus.manage_port, &data));
    bridge.wait_healthy(WAIT);
    let wanted = ids(&queued);
    until_received(&bridge, &app, "every queued indicator at the app", &wanted);
    bridge.until("the outbox to drain", WAIT, || {
        bridge.queued("indicators") == 0
    });
    let report = bridge.inspect();
    assert_eq!(report["format_version"], CURRENT_FORMAT);
    assert_eq!(report["catalog"]["active"], 30, "{}", report["catalog"]);
    assert_eq!(report["catalog"]["total"], 30, "{}", report["catalog"]);
    assert!(bridge.log_text().contains("store upgraded"));
    // A tool rejoining with a snapshot of every day gets delivered and queued ones alike.
    let tool = TestApp::subscribe_with_snapshot(bus.manage_port, &["stix2/indicator"], 100_000);
    let mut everything = ids(&delivered);
    everything.extend(wanted);
    until_received(
        &bridge,
        &tool,
        "the snapshot with the whole catalog",
        &everything,
    );
}

/// The STIX ids of `values`.
fn ids(values: &[Value]) -> Vec<String> {
    values
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until `app` has received every id of `wanted`.
fn until_received(bridge: &Bridge, app: &TestApp, what: &str, wanted: &[String]) {
    bridge.until(what, WAIT, || {
        let got: Vec<String> = app
            .received()
            .iter()
            .map(|(_, body)| support::threatbus::stix_id(body))
            .collect();
        wanted.iter().all(|id| got.contains(id))
    });
}
