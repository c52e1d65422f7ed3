//! The Threat Bus intake in process: what arrives on the subscription and where it goes.
//! (The real Threat Bus drops invalid STIX itself; a peer or a future bus version may not,
//! so the bridge checks again and parks what it cannot use.)

use std::sync::Arc;
use std::time::Duration;

use opencti_threatbus::metrics::Metrics;
use opencti_threatbus::pipeline::intake::Intake;
use opencti_threatbus::store::{Queue, Store, StoreOptions};
use opencti_threatbus::threatbus::Incoming;
use tokio::sync::{mpsc, watch};

const GOOD: &str = r#"{"type": "sighting", "spec_version": "2.1", "id": "sighting--65184b15-a91d-4ee2-b023-efd239ddb72b", "created": "2024-01-02T03:05:00Z", "modified": "2024-01-02T03:05:00Z", "last_seen": "2024-01-02T03:05:00Z", "sighting_of_ref": "indicator--3d63fc4d-ba50-4892-be4d-f3a44fdc4461"}"#;
const ECHO: &str = r#"{"type": "indicator", "spec_version": "2.1", "id": "indicator--3d63fc4d-ba50-4892-be4d-f3a44fdc4461", "created": "2024-01-02T03:04:05Z", "modified": "2024-01-02T03:04:05Z", "pattern": "[domain-name:value = 'evil.example']", "pattern_type": "stix", "pattern_version": "2.1", "valid_from": "2024-01-02T03:04:05Z", "x_threatbus_update": "EDIT"}"#;

/// What one intake run left behind.
struct Outcome {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    /// Ids of the echoes handed to the indicator drainer.
    echoes: Vec<String>,
    /// Bodies handed to the snapshot task.
    snapshot_requests: Vec<String>,
    _dir: tempfile::TempDir,
}

async fn run(messages: Vec<Incoming>, limit: u64) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), &StoreOptions::default()).unwrap());
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let (echo_tx, mut echo_rx) = mpsc::unbounded_channel();
    let (snapshot_tx, mut snapshot_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop) = watch::channel(false);
    let intake = Intake::new(
        Arc::clone(&store),
        rx,
        echo_tx,
        snapshot_tx,
        limit,
        Arc::clone(&metrics),
    );
    let task = tokio::spawn(intake.run(stop));
    for m in messages {
        tx.send(m).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop_tx.send(true).unwrap();
    task.await.unwrap().unwrap();
    let mut echoes = Vec::new();
    while let Ok(key) = echo_rx.try_recv() {
        echoes.push(key.id);
    }
    let mut snapshot_requests = Vec::new();
    while let Ok(body) = snapshot_rx.try_recv() {
        snapshot_requests.push(body);
    }
    Outcome {
        store,
        metrics,
        echoes,
        snapshot_requests,
        _dir: dir,
    }
}

const SNAPSHOT_REQUEST: &str =
    r#"{"type": "snapshotrequest", "snapshot_type": 1, "snapshot_id": "x", "snapshot": 60}"#;

#[tokio::test]
async fn sightings_are_queued_and_invalid_ones_parked_with_the_reason() {
    let missing_ref = GOOD.replace(
        r#", "sighting_of_ref": "indicator--3d63fc4d-ba50-4892-be4d-f3a44fdc4461""#,
        "",
    );
    let Outcome {
        store,
        metrics,
        echoes,
        snapshot_requests,
        ..
    } = run(
        vec![
            Incoming::Sighting(GOOD.into()),
            Incoming::Sighting(missing_ref.clone()),
            Incoming::Sighting("{not json".into()),
            Incoming::Indicator(ECHO.into()),
            Incoming::SnapshotRequest(SNAPSHOT_REQUEST.into()),
            Incoming::Unknown {
                suffix: "weird".into(),
                body: "{}".into(),
            },
        ],
        1000,
    )
    .await;
    let queued = store.scan(Queue::Sightings, None, 10).unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].envelope.payload, GOOD.as_bytes());
    let dead = store.dead_letters(None, 10).unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].letter.envelope.payload, missing_ref.as_bytes());
    assert!(
        dead[0].letter.reason.contains("sighting_of_ref"),
        "{}",
        dead[0].letter.reason
    );
    assert!(
        dead[1].letter.reason.starts_with("invalid sighting"),
        "{}",
        dead[1].letter.reason
    );
    assert_eq!(dead[1].letter.queue, Queue::Sightings);
    // The echo confirms delivery to the indicator drainer; it is never queued for OpenCTI.
    assert_eq!(
        echoes,
        vec!["indicator--3d63fc4d-ba50-4892-be4d-f3a44fdc4461".to_string()]
    );
    assert_eq!(metrics.sightings.received.get(), 1);
    // Snapshot requests go to the snapshot task, untouched.
    assert_eq!(snapshot_requests, vec![SNAPSHOT_REQUEST.to_string()]);
}

#[tokio::test]
async fn beyond_the_sighting_limit_drops_are_counted() {
    let sightings = (0..5)
        .map(|i| Incoming::Sighting(GOOD.replace("65184b15", &format!("6518{i:04}"))))
        .collect();
    let outcome = run(sightings, 3).await;
    assert_eq!(outcome.store.len(Queue::Sightings), 3);
    assert_eq!(outcome.metrics.sightings.dropped.get(), 2);
}

/// Below the disk's sighting floor (here: a watermark no disk can meet), sightings and
/// imports are dropped and counted like beyond the queue limit: nothing is written.
#[tokio::test]
async fn below_the_disk_floor_sightings_are_dropped_and_counted() {
    use opencti_threatbus::store::disk_space::DiskSpace;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), &StoreOptions::default()).unwrap());
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let (echo_tx, _echo_rx) = mpsc::unbounded_channel();
    let (snapshot_tx, _snapshot_rx) = mpsc::unbounded_channel();
    let (_stop_tx, stop) = watch::channel(false);
    let intake = Intake::new(
        Arc::clone(&store),
        rx,
        echo_tx,
        snapshot_tx,
        1_000,
        Arc::clone(&metrics),
    )
    .with_disk_space(Arc::new(DiskSpace::new(dir.path(), u64::MAX)));
    for _ in 0..3 {
        tx.send(Incoming::Sighting(GOOD.to_owned())).unwrap();
    }
    // The subscription ends: the intake returns once it has taken everything.
    drop(tx);
    intake.run(stop).await.unwrap();
    assert_eq!(store.len(Queue::Sightings), 0);
    assert_eq!(metrics.sightings.dropped.get(), 3);
    assert_eq!(store.dead_len(), 0);
}
