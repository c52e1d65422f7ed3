//! OpenCTI → Threat Bus end to end: the bridge binary between the OpenCTI double and the
//! **real Threat Bus**, with a plain Threat Bus app subscribed to `stix2/indicator` counting
//! what arrives — through Threat Bus restarts, bridge SIGKILLs and stream cuts.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::Value;
use support::bridge::{store_position, Bridge, BridgeEnv, TOKEN};
use support::opencti::{organization, tlp_marking, Indicator, OpenCti, Then};
use support::opencti_graphql::GraphqlDouble;
use support::proxy::Proxy;
use support::threatbus::{TestApp, ThreatBus};

/// (STIX id, x_threatbus_update) of one indicator as Threat Bus delivers it.
type Op = (String, Option<String>);

const WAIT: Duration = Duration::from_secs(90);

struct World {
    opencti: OpenCti,
    bus: ThreatBus,
    dir: tempfile::TempDir,
    /// What the bridge must deliver, in stream order.
    expected: Vec<Op>,
    counter: usize,
}

impl World {
    fn new() -> World {
        let opencti = OpenCti::start_with_graphql(GraphqlDouble::new(TOKEN));
        let bus = ThreatBus::start();
        let dir = tempfile::tempdir().unwrap();
        // A bridge that has run before: a stored position at the stream's first event.
        let seed = opencti.append_marking();
        store_position(&dir.path().join("data"), &seed);
        World {
            opencti,
            bus,
            dir,
            expected: Vec::new(),
            counter: 0,
        }
    }

    fn env(&self, manage_port: u16) -> BridgeEnv {
        BridgeEnv::new(
            &self.opencti.base_url(),
            manage_port,
            &self.dir.path().join("data"),
        )
    }

    fn next_ip(&mut self) -> String {
        self.counter += 1;
        format!(
            "10.{}.{}.{}",
            (self.counter >> 16) & 255,
            (self.counter >> 8) & 255,
            self.counter & 255
        )
    }

    /// Appends a realistic mix and records what must come out: creates (some with
    /// detection off: filtered), updates turning detection on (EDIT) and off (REMOVE),
    /// deletes (REMOVE), and non-indicator events.
    fn append_mix(&mut self, rounds: usize) {
        for _ in 0..rounds {
            // With its marking and author as dependency events sharing its id.
            let on = Indicator::ipv4(&self.next_ip());
            let deps = [
                tlp_marking("TLP:GREEN", 1_700_000_000_000),
                organization("ACME CERT", 1_700_000_000_000),
            ];
            self.opencti
                .append_dependency_then(&deps, Then::Create(&on));
            self.expected.push((on.stix_id.clone(), None));

            let off =
                Indicator::domain(&format!("d{}.example", self.counter)).with_detection(false);
            self.opencti.append_indicator_create(&off);
            let now_on = off.with_detection(true);
            self.opencti.append_indicator_update(&now_on);
            self.expected
                .push((now_on.stix_id.clone(), Some("EDIT".into())));

            let switched_off = on.clone().with_detection(false);
            self.opencti.append_indicator_update(&switched_off);
            self.expected
                .push((on.stix_id.clone(), Some("REMOVE".into())));

            self.opencti.append_raw("create", &serde_json::json!({"version": "4", "type": "create", "data": tlp_marking("TLP:AMBER", 1_700_000_000_000), "origin": {}}).to_string());

            self.opencti.append_indicator_delete(&now_on);
            self.expected
                .push((now_on.stix_id.clone(), Some("REMOVE".into())));
        }
    }
}

fn op_of(json: &str) -> Op {
    let v: Value = serde_json::from_str(json).expect("Threat Bus relays JSON");
    (
        v["id"].as_str().unwrap().to_string(),
        v["x_threatbus_update"].as_str().map(str::to_string),
    )
}

fn indicators(app: &TestApp) -> Vec<Op> {
    app.received()
        .into_iter()
        .filter(|(suffix, _)| suffix == "indicator")
        .map(|(_, body)| op_of(&body))
        .collect()
}

/// Every expected operation arrived, and their first arrivals are in stream order.
fn assert_complete_and_ordered(received: &[Op], expected: &[Op]) {
    let mut first_seen = Vec::new();
    let mut seen = HashSet::new();
    for op in received {
        if seen.insert(op.clone()) {
            first_seen.push(op.clone());
        }
    }
    let missing: Vec<&Op> = expected.iter().filter(|op| !seen.contains(*op)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} operations never arrived, e.g. {:?}",
        missing.len(),
        expected.len(),
        missing.first()
    );
    let wanted: HashSet<&Op> = expected.iter().collect();
    let in_order: Vec<&Op> = first_seen.iter().filter(|op| wanted.contains(op)).collect();
    let expected_refs: Vec<&Op> = expected.iter().collect();
    assert_eq!(
        in_order, expected_refs,
        "first arrivals out of stream order"
    );
}

#[test]
fn indicators_arrive_in_stream_order_filtered_and_marked() {
    let mut world = World::new();
    let app = TestApp::subscribe(world.bus.manage_port, &["stix2/indicator"]);
    let mut bridge = Bridge::start(world.env(world.bus.manage_port));
    bridge.wait_healthy(WAIT);
    world.append_mix(25);
    let expected = world.expected.clone();
    bridge.until("every indicator at the app", WAIT, || {
        indicators(&app).len() >= expected.len()
    });
    bridge.until("the outbox to drain (every echo confirmed)", WAIT, || {
        bridge.queued("indicators") == 0
    });
    std::thread::sleep(Duration::from_millis(300));
    let received = indicators(&app);
    assert_eq!(
        received, expected,
        "exactly the expected indicators, in order, once each"
    );
    assert_eq!(bridge.queued("dead"), 0);
    assert_eq!(
        bridge.terminate(Duration::from_secs(10)),
        Some(0),
        "clean exit on SIGTERM"
    );
}

#[test]
fn a_threatbus_restart_loses_nothing() {
    let mut world = World::new();
    // The bridge reaches Threat Bus's manage port through a proxy, so the test can make
    // sure the counting app re-subscribes before the bridge does after the restart
    // (Threat Bus only routes to subscriptions that exist when a message arrives).
    let proxy = Proxy::start(world.bus.manage_port);
    let app1 = TestApp::subscribe(world.bus.manage_port, &["stix2/indicator"]);
    let mut bridge = Bridge::start(world.env(proxy.port));
    bridge.wait_healthy(WAIT);
    world.append_mix(40);
    bridge.until("part of the run to arrive", WAIT, || {
        indicators(&app1).len() >= 20
    });
    proxy.block();
    world.bus.kill();
    world.append_mix(40); // read and queued while Threat Bus is down
    bridge.until("the outbox to fill while Threat Bus is down", WAIT, || {
        bridge.queued("indicators") > 0
    });
    world.bus.restart();
    let app2 = TestApp::subscribe(world.bus.manage_port, &["stix2/indicator"]);
    proxy.unblock();
    world.append_mix(20);
    let expected = world.expected.clone();
    bridge.until("the outbox to drain after the restart", WAIT, || {
        bridge.queued("indicators") == 0
    });
    let expected_set: HashSet<&Op> = expected.iter().collect();
    bridge.until("every indicator at the apps", WAIT, || {
        let got: HashSet<Op> = indicators(&app1)
            .into_iter()
            .chain(indicators(&app2))
            .collect();
        expected_set.iter().all(|op| got.contains(*op))
    });
    let mut received = indicators(&app1);
    received.extend(indicators(&app2));
    assert_complete_and_ordered(&received, &expected);
    assert!(
        bridge.log_text().contains("resending")
            || bridge.log_text().contains("subscribed to Threat Bus")
    );
}

#[test]
fn bridge_sigkilled_at_random_moments_loses_nothing() {
    let mut world = World::new();
    // Kills land between dependency events, heartbeats and their event too (SPEC §2.2).
    world.opencti.set_heartbeat_inside_dependencies(true);
    world.opencti.set_event_delay(Duration::from_millis(2));
    let app = TestApp::subscribe(world.bus.manage_port, &["stix2/indicator"]);
    let env = world.env(world.bus.manage_port);
    let window: usize = 100;
    let mut bridge = Bridge::start(env);
    bridge.wait_healthy(WAIT);
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill seed: {seed}");
    let kills = 6;
    for _ in 0..kills {
        world.append_mix(15);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(100 + seed % 1400));
        bridge.restart(); // SIGKILL, then start again
    }
    world.append_mix(10);
    let expected = world.expected.clone();
    bridge.wait_healthy(WAIT);
    bridge.until("the outbox to drain", WAIT, || {
        bridge.queued("indicators") == 0
    });
    let expected_set: HashSet<&Op> = expected.iter().collect();
    bridge.until("every indicator at the app", WAIT, || {
        let got: HashSet<Op> = indicators(&app).into_iter().collect();
        expected_set.iter().all(|op| got.contains(*op))
    });
    std::thread::sleep(Duration::from_millis(500));
    let received = indicators(&app);
    assert_complete_and_ordered(&received, &expected);
    let duplicates = received.len() - expected.len();
    let mut counts: HashMap<&Op, usize> = HashMap::new();
    for op in &received {
        *counts.entry(op).or_default() += 1;
    }
    eprintln!(
        "{} operations, {} received, {duplicates} duplicates over {kills} kills",
        expected.len(),
        received.len()
    );
    // Per kill: at most the in-flight window, plus what was acked or read in the last
    // flush period before the kill.
    assert!(
        duplicates <= kills * 2 * window,
        "{duplicates} duplicates exceed the bound of {}",
        kills * 2 * window
    );
    assert_eq!(bridge.queued("dead"), 0);
}

#[test]
fn a_cut_stream_resumes_from_the_position_without_replaying() {
    let mut world = World::new();
    let app = TestApp::subscribe(world.bus.manage_port, &["stix2/indicator"]);
    let mut bridge = Bridge::start(world.env(world.bus.manage_port));
    bridge.wait_healthy(WAIT);
    world.append_mix(20);
    let first_part = world.expected.len();
    bridge.until("the first part", WAIT, || {
        indicators(&app).len() >= first_part
    });
    let before = world.opencti.request_count();
    world.opencti.cut_connections();
    world.append_mix(20);
    let expected = world.expected.clone();
    bridge.until("the second part", WAIT, || {
        indicators(&app).len() >= expected.len()
    });
    bridge.until("the outbox to drain", WAIT, || {
        bridge.queued("indicators") == 0
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        indicators(&app),
        expected,
        "nothing missing, nothing replayed"
    );
    let requests = world.opencti.requests();
    assert!(requests.len() > before, "the bridge reconnected");
    let resumed = &requests[before];
    let from = resumed.header("last-event-id").unwrap();
    assert_ne!(from, "0-0");
    assert!(
        resumed.query_param("recover").is_none(),
        "a resume, not a replay"
    );
}
