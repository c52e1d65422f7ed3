//! Indicators from other Threat Bus apps → OpenCTI, end to end: the bridge binary between
//! the OpenCTI double (which validates every GraphQL request against the real schema) and
//! the **real Threat Bus**, another app publishing.
//!
//! New and changed indicators land in OpenCTI, unchanged ones, `REMOVE`s and the bridge's
//! own echoes cause no write, nothing is lost while OpenCTI is down or across a SIGKILL,
//! and an imported indicator that comes back on the OpenCTI stream goes to Threat Bus once
//! and is never imported again.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use support::bridge::Bridge;
use support::opencti::Indicator;
use support::threatbus::TestApp;
use support::world::World;

const WAIT: Duration = Duration::from_secs(90);

/// An indicator as another app (MISP, say) publishes it.
fn foreign(n: u32, modified: &str, description: &str) -> Value {
    json!({
        "type": "indicator",
        "spec_version": "2.1",
        "id": format!("indicator--5a1e0f3c-0000-4000-8000-{n:012x}"),
        "created": "2024-03-01T10:00:00.000Z",
        "modified": modified,
        "name": format!("misp {n}"),
        "description": description,
        "pattern": format!("[ipv4-addr:value = '198.51.100.{n}']"),
        "pattern_type": "stix",
        "valid_from": "2024-03-01T10:00:00.000Z",
        "confidence": 60,
    })
}

/// STIX ids OpenCTI holds among `ids` (by any of its STIX ids).
fn in_opencti(world: &World, ids: &[String]) -> BTreeSet<String> {
    ids.iter()
        .filter(|id| world.graphql.indicator(id).is_some())
        .cloned()
        .collect()
}

/// Every indicator write that reached OpenCTI.
fn writes(world: &World) -> usize {
    world.graphql.indicator_adds().len() + world.graphql.indicator_patches().len()
}

fn id_of(indicator: &Value) -> String {
    indicator["id"].as_str().unwrap().to_owned()
}

#[test]
fn other_apps_indicators_land_in_opencti_once_without_loops_or_losses() {
    let world = World::ran_before();
    let mut misp = TestApp::subscribe(world.bus.manage_port, &["stix2/indicator"]);
    // OpenCTI's own indicator, forwarded by the bridge: its echo must never be imported.
    let own = Indicator::ipv4("10.66.0.1");
    world.opencti.append_indicator_create(&own);

    let mut bridge = Bridge::start(world.env());
    bridge.wait_subscribed(WAIT);
    bridge.until("OpenCTI's indicator at the other app", WAIT, || {
        misp.received()
            .iter()
            .any(|(_, body)| body.contains(&own.stix_id))
    });

    // New ones, then a changed, an unchanged (republished as is), a REMOVE, a revoked one.
    let v1: Vec<Value> = (1..=5)
        .map(|n| foreign(n, "2024-03-01T10:00:00.000Z", "first"))
        .collect();
    for indicator in &v1 {
        misp.publish("stix2/indicator", &indicator.to_string());
    }
    let ids: Vec<String> = v1.iter().map(id_of).collect();
    bridge.until("the five new indicators in OpenCTI", WAIT, || {
        in_opencti(&world, &ids).len() == 5
    });
    let changed = foreign(1, "2024-03-02T10:00:00.000Z", "seen again by MISP");
    let unchanged = v1[1].clone();
    let mut removed = v1[2].clone();
    removed["x_threatbus_update"] = json!("REMOVE");
    let mut revoked = foreign(9, "2024-03-02T10:00:00.000Z", "withdrawn");
    revoked["revoked"] = json!(true);
    for indicator in [&changed, &unchanged, &removed, &revoked] {
        misp.publish("stix2/indicator", &indicator.to_string());
    }
    bridge.until("the changed one patched", WAIT, || {
        world.graphql.indicator_writes(&ids[0]) == 2
    });
    bridge.until("the import outbox drained", WAIT, || {
        bridge.queued("imports") == 0
    });
    assert_eq!(
        world.graphql.indicator(&ids[0]).unwrap()["description"],
        "seen again by MISP"
    );
    for id in &ids[1..] {
        assert_eq!(
            world.graphql.indicator_writes(id),
            1,
            "{id}: created once, never rewritten"
        );
    }
    assert!(
        world.graphql.indicator(&id_of(&revoked)).is_none(),
        "revoked: not imported"
    );
    assert_eq!(
        world.graphql.indicator_writes(&own.stix_id),
        0,
        "own echo: no write"
    );
    assert_eq!(
        world.graphql.indicator_patches().len(),
        1,
        "exactly one patch"
    );
    assert_eq!(bridge.queued("dead"), 0);

    // OpenCTI down; three more arrive, the bridge is SIGKILLed with them queued.
    world.graphql.set_bad_gateway(true);
    let during: Vec<Value> = (20..23)
        .map(|n| foreign(n, "2024-03-03T10:00:00.000Z", "during the outage"))
        .collect();
    for indicator in &during {
        misp.publish("stix2/indicator", &indicator.to_string());
    }
    bridge.until("the three queued", WAIT, || bridge.queued("imports") == 3);
    // Durable within the flush interval (10 ms here), like sightings: then kill it.
    std::thread::sleep(Duration::from_millis(200));
    bridge.kill9();
    let mut bridge = Bridge::start(world.env());
    bridge.wait_subscribed(WAIT);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        bridge.queued("imports"),
        3,
        "kept across the SIGKILL and the outage"
    );
    world.graphql.set_bad_gateway(false);
    let during_ids: Vec<String> = during.iter().map(id_of).collect();
    bridge.until("the queued ones in OpenCTI", WAIT, || {
        in_opencti(&world, &during_ids).len() == 3
    });
    bridge.until("the import outbox drained", WAIT, || {
        bridge.queued("imports") == 0
    });

    // OpenCTI publishes an imported indicator on its stream (under its own standard id,
    // detection on): the bridge forwards it once, and its echo is not imported again.
    let stored = world.graphql.indicator(&ids[3]).unwrap();
    let standard_id = stored["standard_id"].as_str().unwrap().to_owned();
    let mut back = Indicator::ipv4("198.51.100.4");
    back.stix_id = standard_id.clone();
    let writes_before = writes(&world);
    world.opencti.append_indicator_create(&back);
    bridge.until(
        "the imported indicator forwarded from the stream",
        WAIT,
        || {
            misp.received()
                .iter()
                .any(|(_, body)| body.contains(&standard_id))
        },
    );
    bridge.until("the indicator outbox drained", WAIT, || {
        bridge.queued("indicators") == 0
    });
    std::thread::sleep(Duration::from_millis(1000));
    let times = misp
        .received()
        .iter()
        .filter(|(_, body)| body.contains(&standard_id))
        .count();
    assert_eq!(times, 1, "forwarded to Threat Bus once");
    assert_eq!(
        writes(&world),
        writes_before,
        "no write bounced back to OpenCTI"
    );
    // The bridge's own echoes never even reach the import drainer (the catalog knows
    // them): OpenCTI was never asked about them.
    for id in [&own.stix_id, &standard_id] {
        let asked = world
            .graphql
            .requests()
            .iter()
            .filter(|r| {
                r.query
                    .as_deref()
                    .is_some_and(|q| q.starts_with("query IndicatorImportTarget"))
                    && r.variables["id"].as_str() == Some(id.as_str())
            })
            .count();
        assert_eq!(
            asked, 0,
            "{id} is the bridge's own: not looked up for import"
        );
    }
    assert_eq!(bridge.queued("dead"), 0);
}

#[test]
fn with_import_off_nothing_is_written() {
    let world = World::ran_before();
    let mut misp = TestApp::subscribe(world.bus.manage_port, &["stix2/indicator"]);
    let mut bridge = Bridge::start(world.env().set("THREATBUS_IMPORT_INDICATORS", "false"));
    bridge.wait_subscribed(WAIT);
    let indicator = foreign(1, "2024-03-01T10:00:00.000Z", "first");
    misp.publish("stix2/indicator", &indicator.to_string());
    // A sighting published after it is written to OpenCTI: the indicator had its chance.
    let sighting = support::threatbus::sample_sighting(&id_of(&indicator));
    world.graphql.accept_any_from_id(true);
    misp.publish_sighting(&sighting.to_string());
    bridge.until("the sighting in OpenCTI", WAIT, || {
        world.graphql.sighting_count() == 1
    });
    assert_eq!(writes(&world), 0);
    assert_eq!(bridge.queued("imports"), 0);
}
