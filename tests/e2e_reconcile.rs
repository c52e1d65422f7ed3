//! Gap reconciliation end to end: the bridge binary between the OpenCTI double (stream and
//! GraphQL on one address, agreeing on what OpenCTI holds) and the **real Threat Bus**.
//!
//! Deletions, revocations, merges and detection turned off inside a trimmed gap cannot be
//! replayed: after the replay, each such indicator must reach the subscriber as `REMOVE`
//! (found through batched lookups), and nothing OpenCTI still has may be removed. The
//! `reconcile` command does the same on demand.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::bridge::{Bridge, BIN};
use support::opencti::Indicator;
use support::threatbus::TestApp;
use support::world::World;

const WAIT: Duration = Duration::from_secs(90);

/// The usual world, and a counter for fresh indicator addresses.
struct Scene {
    world: World,
    counter: usize,
}

impl std::ops::Deref for Scene {
    type Target = World;
    fn deref(&self) -> &World {
        &self.world
    }
}

impl Scene {
    fn new() -> Scene {
        Scene {
            world: World::ran_before(),
            counter: 0,
        }
    }

    fn created(&mut self, n: usize) -> Vec<Indicator> {
        (0..n)
            .map(|_| {
                self.counter += 1;
                let c = self.counter;
                let indicator = Indicator::ipv4(&format!("10.7.{}.{}", (c >> 8) & 255, c & 255));
                self.world.opencti.append_indicator_create(&indicator);
                indicator
            })
            .collect()
    }
}

/// Per id, the `x_threatbus_update` values the subscriber received, in order.
fn received_updates(app: &TestApp) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (suffix, body) in app.received() {
        if suffix != "indicator" {
            continue;
        }
        let value: Value = serde_json::from_str(&body).unwrap();
        let update = value["x_threatbus_update"]
            .as_str()
            .unwrap_or("CREATE")
            .to_owned();
        out.entry(value["id"].as_str().unwrap().to_owned())
            .or_default()
            .push(update);
    }
    out
}

fn removed_ids(app: &TestApp) -> BTreeSet<String> {
    received_updates(app)
        .into_iter()
        .filter(|(_, updates)| updates.last().map(String::as_str) == Some("REMOVE"))
        .map(|(id, _)| id)
        .collect()
}

fn ids(indicators: &[&Indicator]) -> BTreeSet<String> {
    indicators.iter().map(|i| i.stix_id.clone()).collect()
}

fn reconcile(world: &World, extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("reconcile")
        .args(extra)
        .arg("--data-dir")
        .arg(world.data_dir())
        .env_clear()
        .output()
        .expect("run reconcile")
}

#[test]
fn after_a_trimmed_gap_what_opencti_no_longer_has_is_removed_and_nothing_else() {
    let mut world = Scene::new();
    let app = TestApp::subscribe(world.bus.manage_port, &["stix2/indicator"]);
    let kept = world.created(6);
    let edited = world.created(2);
    let deleted = world.created(4);
    let switched_off = world.created(3);
    let revoked = world.created(2);
    let target = world.created(1).remove(0);
    let sources = world.created(2);
    let all = 6 + 2 + 4 + 3 + 2 + 1 + 2;

    let mut bridge = Bridge::start(world.env());
    bridge.wait_subscribed(WAIT);
    bridge.until("every indicator delivered", WAIT, || {
        bridge.inspect()["catalog"]["active"] == all && bridge.queued("indicators") == 0
    });
    assert_eq!(bridge.terminate(Duration::from_secs(10)), Some(0));

    // While the bridge is down, OpenCTI changes and then trims everything it did.
    for indicator in &edited {
        world
            .opencti
            .append_indicator_update(&indicator.clone().with_score(95));
    }
    for indicator in &deleted {
        world.opencti.append_indicator_delete(indicator);
    }
    for indicator in &switched_off {
        world
            .opencti
            .append_indicator_update(&indicator.clone().with_detection(false));
    }
    for indicator in &revoked {
        world
            .opencti
            .append_indicator_update(&indicator.clone().with_revoked(true));
    }
    let source_refs: Vec<&Indicator> = sources.iter().collect();
    world
        .opencti
        .append_indicator_merge(&target.clone().with_score(80), &source_refs);
    let last = world.opencti.append_marking();
    world.opencti.trim_before(&last);
    let before = app.received().len();
    // OpenCTI's API is failing when the replay ends: the pass waits it out.
    world.graphql.set_bad_gateway(true);

    bridge.restart();
    bridge.until("the lookup to fail and be retried", WAIT, || {
        bridge
            .log_text()
            .contains("reconciliation: OpenCTI lookup failed, retrying")
    });
    world.graphql.set_bad_gateway(false);
    let gone: BTreeSet<String> = deleted
        .iter()
        .chain(&switched_off)
        .chain(&revoked)
        .chain(&sources)
        .map(|i| i.stix_id.clone())
        .collect();
    bridge.until("a REMOVE for each indicator gone in the gap", WAIT, || {
        gone.is_subset(&removed_ids(&app))
    });
    bridge.until("the pass to finish", WAIT, || {
        bridge.log_text().contains("reconciliation finished")
    });
    // Anything removed by mistake would arrive with the rest.
    bridge.until("the outbox to drain", WAIT, || {
        bridge.queued("indicators") == 0
    });
    std::thread::sleep(Duration::from_millis(1000));

    assert_eq!(removed_ids(&app), gone, "exactly the gone ones are removed");
    let updates = received_updates(&app);
    let mut active: Vec<&Indicator> = kept.iter().chain(&edited).collect();
    active.push(&target);
    for id in ids(&active) {
        assert!(
            !updates[&id].contains(&"REMOVE".to_owned()),
            "{id} is still in OpenCTI and was removed: {:?}",
            updates[&id]
        );
    }
    let catalog = &bridge.inspect()["catalog"];
    assert_eq!(catalog["active"], active.len(), "{catalog}");
    assert!(app.received().len() > before);
    // One batched request covered every lookup (fewer than 50 candidates), retried once
    // per failure: never one request per indicator.
    assert!(
        world.graphql.indicator_lookups() >= gone.len(),
        "each unrefreshed indicator was looked up"
    );
    let lookups = world
        .graphql
        .requests()
        .iter()
        .filter(|r| {
            let query = r.query.as_deref().unwrap_or_default();
            query.starts_with("query ReconcileIndicators(") && r.status == 200
        })
        .count();
    assert_eq!(lookups, 1, "one successful batched request");
    assert_eq!(bridge.queued("dead"), 0);

    // The pass is not repeated at the next start: it was recorded as finished.
    let finished = |bridge: &Bridge| bridge.log_text().matches("reconciliation finished").count();
    let passes = finished(&bridge);
    bridge.restart();
    bridge.wait_subscribed(WAIT);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(finished(&bridge), passes);
}

#[test]
fn the_reconcile_command_asks_the_daemon_and_prints_what_it_found() {
    let mut world = Scene::new();
    let app = TestApp::subscribe(world.bus.manage_port, &["stix2/indicator"]);
    let indicators = world.created(6);
    let out = reconcile(&world, &[]);
    assert!(!out.status.success(), "no daemon: a clear error");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("reconcile asks the running bridge"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut bridge = Bridge::start(world.env());
    bridge.wait_subscribed(WAIT);
    bridge.until("every indicator delivered", WAIT, || {
        bridge.inspect()["catalog"]["active"] == 6 && bridge.queued("indicators") == 0
    });
    // OpenCTI lost two without a stream event (a restored database, say), and turned
    // detection off for a third behind the stream's back.
    world.opencti.remove_object(&indicators[0].stix_id);
    world.opencti.remove_object(&indicators[1].stix_id);
    let mut off = world.opencti.object(&indicators[2].stix_id).unwrap();
    off["extensions"]
        .as_object_mut()
        .unwrap()
        .values_mut()
        .for_each(|ext| {
            if ext.get("detection").is_some() {
                ext["detection"] = Value::Bool(false);
            }
        });
    world.opencti.put_object(off);

    let out = reconcile(&world, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("checked 6 active indicator(s)") && stdout.contains("3 REMOVE(s) queued"),
        "{stdout}"
    );
    assert!(
        stdout.contains("deleted 2") && stdout.contains("detection_off 1"),
        "{stdout}"
    );
    assert!(stdout.contains(&indicators[0].stix_id), "{stdout}");
    let gone = ids(&[&indicators[0], &indicators[1], &indicators[2]]);
    bridge.until("the REMOVEs at the subscriber", WAIT, || {
        removed_ids(&app) == gone
    });

    // Again: only the three still active are checked, and nothing more is removed.
    let out = reconcile(&world, &["--json"]);
    assert!(out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["checked"].clone(), report["removed"].clone()),
        (3.into(), 0.into())
    );

    // OpenCTI failing: the command says so and exits 1 instead of waiting forever.
    world.graphql.set_bad_gateway(true);
    let out = reconcile(&world, &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("stopped early") && stderr.contains("502"),
        "{stderr}"
    );
    world.graphql.set_bad_gateway(false);
    assert!(bridge.running());
    assert_eq!(removed_ids(&app), gone);
}
