//! Snapshot answers end to end: the bridge binary between the OpenCTI double and the **real
//! Threat Bus**. A tool that (re)joins Threat Bus with `snapshot: N` days must get exactly
//! the indicators tools should match now and that changed in the last N days, each in its
//! latest version — also after Threat Bus restarted.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use opencti_threatbus::stix::Timestamp;
use serde_json::Value;
use support::bridge::{store_position, Bridge, BridgeEnv, TOKEN};
use support::opencti::{Indicator, OpenCti};
use support::opencti_graphql::GraphqlDouble;
use support::threatbus::{TestApp, ThreatBus};

const WAIT: Duration = Duration::from_secs(90);
const DAY_MS: u64 = 24 * 3600 * 1000;
const SNAPSHOT_DAYS: u32 = 30;

struct World {
    opencti: OpenCti,
    bus: ThreatBus,
    dir: tempfile::TempDir,
    counter: usize,
}

impl World {
    /// The double's clock starts 40 days ago; the bridge has a stored position there.
    fn new() -> World {
        let opencti = OpenCti::start_with_graphql(GraphqlDouble::new(TOKEN));
        let now = opencti.now_ms();
        opencti.set_clock_ms(now - 40 * DAY_MS);
        let bus = ThreatBus::start();
        let dir = tempfile::tempdir().unwrap();
        let seed = opencti.append_marking();
        store_position(&dir.path().join("data"), &seed);
        World {
            opencti,
            bus,
            dir,
            counter: 0,
        }
    }

    fn env(&self) -> BridgeEnv {
        BridgeEnv::new(
            &self.opencti.base_url(),
            self.bus.manage_port,
            &self.dir.path().join("data"),
        )
    }

    fn ip(&mut self) -> Indicator {
        self.counter += 1;
        let c = self.counter;
        self.opencti.advance_clock(Duration::from_millis(7));
        Indicator::ipv4(&format!("10.9.{}.{}", (c >> 8) & 255, c & 255))
    }

    /// The `modified` OpenCTI holds for `stix_id`, in ms.
    fn modified_ms(&self, stix_id: &str) -> i64 {
        let object = self.opencti.object(stix_id).expect("stored");
        Timestamp::parse(object["modified"].as_str().unwrap())
            .unwrap()
            .unix_millis()
    }
}

/// The indicators a snapshot requester received: id → (body, how many times).
fn snapshot_bodies(app: &TestApp) -> BTreeMap<String, (Value, usize)> {
    let mut out: BTreeMap<String, (Value, usize)> = BTreeMap::new();
    for (suffix, body) in app.received() {
        if suffix != "indicator" {
            continue;
        }
        let value: Value = serde_json::from_str(&body).unwrap();
        let id = value["id"].as_str().unwrap().to_owned();
        out.entry(id).or_insert((value, 0)).1 += 1;
    }
    out
}

/// Subscribes a tool with a snapshot and checks it gets exactly `expected` (id → modified).
fn assert_snapshot(world: &World, bridge: &Bridge, expected: &BTreeMap<String, i64>) {
    let app = TestApp::subscribe_with_snapshot(
        world.bus.manage_port,
        &["stix2/indicator"],
        SNAPSHOT_DAYS,
    );
    bridge.until("the snapshot at the requester", WAIT, || {
        snapshot_bodies(&app).len() >= expected.len()
    });
    // Anything extra (a removed or too-old indicator) would arrive with the rest.
    std::thread::sleep(Duration::from_millis(1500));
    let got = snapshot_bodies(&app);
    let got_ids: BTreeSet<&String> = got.keys().collect();
    let expected_ids: BTreeSet<&String> = expected.keys().collect();
    assert_eq!(
        got_ids, expected_ids,
        "exactly the active set inside the window"
    );
    for (id, (body, times)) in &got {
        assert_eq!(*times, 1, "{id} arrived {times} times");
        assert!(
            body.get("x_threatbus_update").is_none(),
            "{id}: a snapshot item is a create: {body}"
        );
        let modified = Timestamp::parse(body["modified"].as_str().unwrap())
            .unwrap()
            .unix_millis();
        assert_eq!(modified, expected[id], "{id}: not its latest version");
    }
}

#[test]
fn a_rejoining_tool_gets_the_active_indicators_of_the_window_also_after_a_bus_restart() {
    let mut world = World::new();
    // 40 days ago: outside a 30-day window unless changed since.
    let too_old = world.ip();
    world.opencti.append_indicator_create(&too_old);
    let old_then_edited = world.ip();
    world.opencti.append_indicator_create(&old_then_edited);

    // 10 days ago.
    let now = world.opencti.now_ms() + 40 * DAY_MS;
    world.opencti.set_clock_ms(now - 10 * DAY_MS);
    let recent = world.ip();
    world.opencti.append_indicator_create(&recent);
    let recent_deleted = world.ip();
    world.opencti.append_indicator_create(&recent_deleted);

    // Now.
    world.opencti.set_clock_ms(now);
    let edited = world.ip();
    world.opencti.append_indicator_create(&edited);
    world.opencti.advance_clock(Duration::from_millis(5));
    world
        .opencti
        .append_indicator_update(&edited.clone().with_score(90));
    world.opencti.advance_clock(Duration::from_millis(5));
    world
        .opencti
        .append_indicator_update(&old_then_edited.clone().with_description("seen again"));
    let switched_off = world.ip();
    world.opencti.append_indicator_create(&switched_off);
    world.opencti.advance_clock(Duration::from_millis(5));
    world
        .opencti
        .append_indicator_update(&switched_off.clone().with_detection(false));
    let revoked = world.ip();
    world.opencti.append_indicator_create(&revoked);
    world.opencti.advance_clock(Duration::from_millis(5));
    world
        .opencti
        .append_indicator_update(&revoked.clone().with_revoked(true));
    let never_detected = world.ip().with_detection(false);
    world.opencti.append_indicator_create(&never_detected);
    world.opencti.advance_clock(Duration::from_millis(5));
    world.opencti.append_indicator_delete(&recent_deleted);
    let target = world.ip();
    let source_a = world.ip();
    let source_b = world.ip();
    for indicator in [&target, &source_a, &source_b] {
        world.opencti.append_indicator_create(indicator);
    }
    world.opencti.advance_clock(Duration::from_millis(5));
    world
        .opencti
        .append_indicator_merge(&target.clone().with_score(75), &[&source_a, &source_b]);
    let plain = (0..10).map(|_| world.ip()).collect::<Vec<_>>();
    for indicator in &plain {
        world.opencti.append_indicator_create(indicator);
    }

    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for indicator in [&old_then_edited, &recent, &edited, &target]
        .into_iter()
        .chain(plain.iter())
    {
        expected.insert(
            indicator.stix_id.clone(),
            world.modified_ms(&indicator.stix_id),
        );
    }

    let mut bridge = Bridge::start(world.env());
    bridge.wait_subscribed(WAIT);
    bridge.until("every indicator read and delivered", WAIT, || {
        let report = bridge.inspect();
        report["catalog"]["total"] == 20 && bridge.queued("indicators") == 0
    });
    let catalog = &bridge.inspect()["catalog"];
    // Every forwarded id is known; of them, the removed ones are tombstones.
    assert_eq!(catalog["active"], 14 + 1, "{catalog}"); // the window's 14 plus too_old
    assert_eq!(catalog["total"], 20, "{catalog}");

    assert_snapshot(&world, &bridge, &expected);

    // Threat Bus forgets every subscription on a restart; the bridge subscribes again and
    // answers the tool's new request from the same catalog.
    let readies = |bridge: &Bridge| bridge.log_text().matches("Threat Bus link ready").count();
    let before = readies(&bridge);
    world.bus.restart();
    bridge.until("the bridge to subscribe again", WAIT, || {
        readies(&bridge) > before
    });
    bridge.wait_subscribed(WAIT);
    assert_snapshot(&world, &bridge, &expected);
    let log = bridge.log_text();
    assert!(
        log.contains("snapshot answered"),
        "start and end are logged"
    );
    assert_eq!(bridge.queued("dead"), 0);
}

/// A sighting snapshot is not the bridge's to answer (OpenCTI holds the history); it does
/// not disturb the indicator part of a request for both.
#[test]
fn sighting_snapshot_requests_are_logged_not_answered() {
    let mut world = World::new();
    let indicator = world.ip();
    world
        .opencti
        .set_clock_ms(world.opencti.now_ms() + 40 * DAY_MS);
    world.opencti.append_indicator_create(&indicator);
    let mut bridge = Bridge::start(world.env());
    bridge.wait_subscribed(WAIT);
    bridge.until("the outbox to drain", WAIT, || {
        bridge.queued("indicators") == 0 && bridge.inspect()["catalog"]["active"] == 1
    });
    let app = TestApp::subscribe_with_snapshot(world.bus.manage_port, &["stix2/sighting"], 7);
    bridge.until("the sighting request to be logged", WAIT, || {
        bridge
            .log_text()
            .contains("sighting snapshot request not answered")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        snapshot_bodies(&app).is_empty(),
        "no indicator for a sighting snapshot"
    );
    // `stix2` asks for both kinds under one id: the indicator part is answered.
    let both = TestApp::subscribe_with_snapshot(world.bus.manage_port, &["stix2"], 7);
    bridge.until("the indicator at the stix2 requester", WAIT, || {
        snapshot_bodies(&both).contains_key(&indicator.stix_id)
    });
}
