//! After an OpenCTI outage of any length, the sighting backlog starts draining within
//! `bridge.probe_max_ms` (5 s) of OpenCTI's return — proven on tokio's paused clock for
//! outages of 30 s, 10 min and 2 h, with the real drainer ([`ToOpenCti`]) and the real store
//! in front of an in-memory OpenCTI that is down for the outage.
//!
//! Virtual time only: every figure below is arithmetic on the paused clock, so the test is
//! deterministic however busy the machine is. (The wall-clock figure for the 30 s case,
//! through the daemon binary, is printed by `cargo bench --bench sightings -- outage`.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opencti_threatbus::admin::Status;
use opencti_threatbus::config::{BridgeConfig, DEFAULT_PROBE_MAX};
use opencti_threatbus::metrics::Metrics;
use opencti_threatbus::opencti::graphql::{GraphqlError, SightingInput};
use opencti_threatbus::pipeline::to_opencti::{SightingApi, ToOpenCti, ToOpenCtiConfig};
use opencti_threatbus::retry::RetryPolicy;
use opencti_threatbus::store::{Queue, Store, StoreOptions};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

/// Sightings queued before the outage: enough that the drainer is busy at full concurrency
/// when OpenCTI goes away, and still has a backlog when it comes back.
const SIGHTINGS: usize = 2_000;
/// The default `bridge.opencti_concurrency`.
const CONCURRENCY: usize = 4;
/// Per request, up or down (a refused connection is quicker, a 502 about as quick).
const LATENCY: Duration = Duration::from_millis(10);
/// OpenCTI works this long before the outage: some sightings are delivered, and requests
/// are in flight when it begins (the case that used to push the backoff `concurrency`
/// steps per failure).
const UP_BEFORE: Duration = Duration::from_secs(1);

/// OpenCTI, in memory: down in `[down_from, down_until)`, counting what it sees.
struct Peer {
    down_from: Instant,
    down_until: Instant,
    in_flight: AtomicUsize,
    /// Requests in flight at once, seen by a request arriving well into the outage.
    max_in_flight_down: AtomicUsize,
    /// Requests in flight at once after the return.
    max_in_flight_after: AtomicUsize,
    /// Requests that arrived while down.
    refused: AtomicUsize,
    delivered: AtomicUsize,
    /// Told when the last sighting is delivered.
    all_delivered: tokio::sync::Notify,
    /// When the first request after the return arrived.
    first_after: Mutex<Option<Instant>>,
}

impl Peer {
    fn new(outage: Duration) -> Peer {
        let down_from = Instant::now() + UP_BEFORE;
        Peer {
            down_from,
            down_until: down_from + outage,
            in_flight: AtomicUsize::new(0),
            max_in_flight_down: AtomicUsize::new(0),
            max_in_flight_after: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            delivered: AtomicUsize::new(0),
            all_delivered: tokio::sync::Notify::new(),
            first_after: Mutex::new(None),
        }
    }
}

impl SightingApi for Peer {
    async fn create_sighting(&self, _input: &SightingInput) -> Result<String, GraphqlError> {
        let now = Instant::now();
        let at_once = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let down = now >= self.down_from && now < self.down_until;
        if down {
            self.refused.fetch_add(1, Ordering::SeqCst);
            // Past the first answers: the drainer knows by then.
            if now >= self.down_from + LATENCY * 10 {
                self.max_in_flight_down.fetch_max(at_once, Ordering::SeqCst);
            }
        } else if now >= self.down_until {
            self.max_in_flight_after
                .fetch_max(at_once, Ordering::SeqCst);
            self.first_after
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(now);
        }
        tokio::time::sleep(LATENCY).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if down {
            Err(GraphqlError::Transport {
                message: "connection refused".into(),
            })
        } else {
            if self.delivered.fetch_add(1, Ordering::SeqCst) + 1 == SIGHTINGS {
                self.all_delivered.notify_one();
            }
            Ok("sighting-internal-id".into())
        }
    }

    async fn get_or_create_organization(
        &self,
        _name: &str,
        _description: &str,
    ) -> Result<String, GraphqlError> {
        Ok("organization-internal-id".into())
    }
}

/// What one outage showed.
struct Run {
    /// From OpenCTI's return to the first request it got.
    noticed: Duration,
    /// From OpenCTI's return to the last sighting delivered.
    drained: Duration,
    /// Requests refused during the outage (probes, and the ones in flight when it began).
    refused: usize,
    max_in_flight_down: usize,
    max_in_flight_after: usize,
}

async fn outage(length: Duration) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), &StoreOptions::default()).unwrap());
    let payloads = (0..SIGHTINGS)
        .map(|i| {
            json!({
                "type": "sighting",
                "spec_version": "2.1",
                "id": format!("sighting--00000000-0000-4000-8000-{i:012}"),
                "created": "2024-01-02T03:05:00Z",
                "modified": "2024-01-02T03:05:00Z",
                "last_seen": "2024-01-02T03:05:00Z",
                "sighting_of_ref": "indicator--3d63fc4d-ba50-4892-be4d-f3a44fdc4461",
            })
            .to_string()
            .into_bytes()
        })
        .collect();
    drop(store.enqueue(Queue::Sightings, payloads, None).unwrap());
    let bridge = BridgeConfig::with_data_dir(dir.path());
    let peer = Arc::new(Peer::new(length));
    let drainer = ToOpenCti::new(
        Arc::clone(&store),
        Arc::clone(&peer),
        ToOpenCtiConfig {
            concurrency: CONCURRENCY,
            max_attempts: bridge.max_attempts,
            retry: RetryPolicy::from_config(&bridge),
            probe: RetryPolicy::probe(&bridge),
            auth_retry: Duration::from_secs(60),
            confidence: 70,
            entity_name: "Threat Bus Sensors".into(),
            entity_description: "sightings".into(),
        },
        Arc::new(Status::default()),
        Arc::new(Metrics::default()),
    );
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(drainer.run(shutdown));
    let give_up = peer.down_until + Duration::from_secs(3600);
    tokio::time::timeout_at(give_up, peer.all_delivered.notified())
        .await
        .expect("the backlog never drained");
    let drained = Instant::now() - peer.down_until;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(store.len(Queue::Sightings), 0);
    assert_eq!(store.dead_len(), 0, "an outage dead-letters nothing");
    let first_after = peer
        .first_after
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .expect("a request after the return");
    Run {
        noticed: first_after - peer.down_until,
        drained,
        refused: peer.refused.load(Ordering::SeqCst),
        max_in_flight_down: peer.max_in_flight_down.load(Ordering::SeqCst),
        max_in_flight_after: peer.max_in_flight_after.load(Ordering::SeqCst),
    }
}

async fn check(length: Duration) {
    let run = outage(length).await;
    eprintln!(
        "outage {:>5} s: first request {:.2} s after the return, backlog drained {:.2} s after, \
         {} requests refused, in flight during / after: {} / {}",
        length.as_secs(),
        run.noticed.as_secs_f64(),
        run.drained.as_secs_f64(),
        run.refused,
        run.max_in_flight_down,
        run.max_in_flight_after,
    );
    assert!(
        run.noticed <= DEFAULT_PROBE_MAX,
        "after {length:?} down, the backlog waited {:?} after the return",
        run.noticed
    );
    assert_eq!(run.max_in_flight_down, 1, "one probe at a time while down");
    assert_eq!(
        run.max_in_flight_after, CONCURRENCY,
        "full concurrency again once OpenCTI answers"
    );
    // The outage drives the backoff: probes settle at the cap (never faster than its
    // lowest jitter, 0.7/1.3 of it), so their number follows the outage's length.
    let slowest = DEFAULT_PROBE_MAX.as_secs_f64() * 0.7 / 1.3;
    let most = (length.as_secs_f64() / slowest) as usize + 10 + CONCURRENCY;
    assert!(
        run.refused <= most,
        "{} requests refused in {length:?}",
        run.refused
    );
}

#[tokio::test(start_paused = true)]
async fn backlog_drains_within_5_s_after_a_30_s_outage() {
    check(Duration::from_secs(30)).await;
}

#[tokio::test(start_paused = true)]
async fn backlog_drains_within_5_s_after_a_10_min_outage() {
    check(Duration::from_secs(600)).await;
}

#[tokio::test(start_paused = true)]
async fn backlog_drains_within_5_s_after_a_2_h_outage() {
    check(Duration::from_secs(7200)).await;
}
