//! The connector state in OpenCTI (issue 9, item 1), through the daemon binary: every ping
//! carries the stream position in pycti's shape; a reset on the connector's page makes the
//! bridge replay the current state from the first-start position, a changed state makes it
//! resume there, and neither loses a queued item; our own state echoed back, a failing
//! ping and a state ahead of the store change nothing.
//!
//! The GraphQL double answers pings as OpenCTI does (stores the state, answers it back;
//! after a reset answers `''` once) and validates every document against the 6.9.28 schema.
//! Pings every second (`CONNECTOR_PING_INTERVAL_S`); the stream double's heartbeats are
//! slowed down so that a replay stays in force until the test appends a live event.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use support::bridge::{store_position, Bridge, BridgeEnv, CONNECTOR_ID, TOKEN};
use support::opencti::{ms_from_iso, Indicator, OpenCti, RecordedRequest};
use support::opencti_graphql::GraphqlDouble;
use support::proxy::Proxy;
use support::threatbus::{unused_port, TestApp, ThreatBus};

const WAIT: Duration = Duration::from_secs(60);

struct World {
    opencti: OpenCti,
    graphql: GraphqlDouble,
    dir: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        let graphql = GraphqlDouble::new(TOKEN);
        let opencti = OpenCti::start_with_graphql(graphql.clone());
        // No heartbeat (with its `<now>` id) ends a replay behind the test's back.
        opencti.set_heartbeat_interval(Duration::from_secs(200));
        World {
            opencti,
            graphql,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A bridge that ran before: its stored position is `position`.
    fn ran_before(&self, position: &str) {
        store_position(&self.data_dir(), position);
    }

    fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// A bridge whose Threat Bus is at `manage_port` (nothing there: indicators stay queued).
    fn bridge(&self, manage_port: u16) -> Bridge {
        let env = BridgeEnv::new(&self.opencti.base_url(), manage_port, &self.data_dir())
            .set("CONNECTOR_PING_INTERVAL_S", "1")
            .set("CONNECTOR_STREAM_TIMEOUT_S", "600");
        let mut bridge = Bridge::start(env);
        bridge.wait_healthy(WAIT);
        bridge
    }

    /// The states the pings carried, parsed (every one must be a JSON string).
    fn ping_states(&self) -> Vec<Value> {
        self.graphql
            .pings()
            .into_iter()
            .map(|(id, state)| {
                assert_eq!(id, CONNECTOR_ID);
                let state = state.expect("every ping carries a state");
                serde_json::from_str(&state).expect("the state is JSON")
            })
            .collect()
    }

    fn stream_requests(&self) -> Vec<RecordedRequest> {
        self.opencti.requests()
    }

    /// Waits for a ping, sent after the first `after` pings, carrying exactly `state`.
    fn until_ping(&self, bridge: &Bridge, after: usize, state: Value) {
        bridge.until(&format!("a ping carrying {state}"), WAIT, || {
            self.ping_states().iter().skip(after).any(|s| *s == state)
        });
    }

    /// Waits until `n` more pings were answered after the first `after`.
    fn until_pings(&self, bridge: &Bridge, after: usize, n: usize) {
        bridge.until(&format!("{n} more pings"), WAIT, || {
            self.graphql.pings().len() >= after + n
        });
    }
}

fn last_event_id(request: &RecordedRequest) -> Option<&str> {
    request.header("last-event-id")
}

fn event_ms(id: &str) -> u64 {
    id.split('-').next().unwrap().parse().unwrap()
}

/// Counts how often the log says `what`.
fn log_count(bridge: &Bridge, what: &str) -> usize {
    bridge.log_text().matches(what).count()
}

#[test]
fn a_reset_in_opencti_replays_the_current_state_and_keeps_every_queued_item() {
    let world = World::new();
    // History: A and B were delivered before the stored position, C comes after it.
    let a = Indicator::ipv4("10.9.0.1");
    let b = Indicator::ipv4("10.9.0.2");
    let c = Indicator::ipv4("10.9.0.3");
    world.opencti.append_indicator_create(&a);
    world.opencti.append_indicator_create(&b);
    let seed = world.opencti.append_marking();
    world.ran_before(&seed);
    let c_id = world.opencti.append_indicator_create(&c);

    // Threat Bus is there, but the bridge cannot reach it yet: what it reads stays queued.
    let bus = ThreatBus::start();
    let proxy = Proxy::start(bus.manage_port);
    proxy.block();
    let app = TestApp::subscribe(bus.manage_port, &["stix2/indicator"]);
    let bridge = world.bridge(proxy.port);
    bridge.until("C queued", WAIT, || bridge.queued("indicators") == 1);
    world.until_ping(
        &bridge,
        0,
        json!({"start_from": c_id, "recover_until": null}),
    );
    let first = &world.stream_requests()[0];
    assert_eq!(last_event_id(first), Some(seed.as_str()));
    assert_eq!(first.query_param("recover"), None);

    // The operator resets the state on the connector's page.
    world.graphql.reset_connector_state(CONNECTOR_ID);
    bridge.until("the stream to be opened again", WAIT, || {
        world.stream_requests().len() >= 2
    });
    let second = world.stream_requests()[1].clone();
    assert_eq!(
        last_event_id(&second),
        Some("0-0"),
        "a reset starts from the first-start position"
    );
    let recover = second
        .query_param("recover")
        .expect("a reset replays: the request has a recover date");
    assert!(
        ms_from_iso(&recover).expect("an ISO date") >= event_ms(&c_id),
        "the recover date ({recover}) is the time of the reset, after C ({c_id})"
    );
    // The replay (A, B, C as they are now) joins the C that was still queued.
    bridge.until("the replay queued next to C", WAIT, || {
        bridge.queued("indicators") == 4
    });
    // The connector's page shows the replay while it is in force.
    let pings = world.graphql.pings().len();
    bridge.until("a ping showing the replay in force", WAIT, || {
        world
            .ping_states()
            .iter()
            .skip(pings)
            .any(|s| s["recover_until"] == recover.as_str())
    });

    // Reset again while that replay is still in force: it starts over.
    world.graphql.reset_connector_state(CONNECTOR_ID);
    bridge.until("the stream to be opened a third time", WAIT, || {
        world.stream_requests().len() >= 3
    });
    let third = world.stream_requests()[2].clone();
    assert_eq!(last_event_id(&third), Some("0-0"));
    let recover2 = third.query_param("recover").expect("a recover date");
    assert!(ms_from_iso(&recover2) >= ms_from_iso(&recover));
    bridge.until("the second replay queued too", WAIT, || {
        bridge.queued("indicators") == 7
    });
    let pings = world.graphql.pings().len();
    bridge.until("a ping showing the new replay", WAIT, || {
        world.ping_states().iter().skip(pings).any(|s| {
            s["recover_until"] == recover2.as_str() && s["start_from"].as_str() != Some("0-0")
        })
    });
    assert!(world
        .ping_states()
        .iter()
        .all(|s| s["start_from"].is_string() && s.as_object().unwrap().len() == 2));

    // A live event after the recover date ends the replay: the page shows no date any more.
    let d = Indicator::ipv4("10.9.0.4");
    let d_id = world.opencti.append_indicator_create(&d);
    let pings = world.graphql.pings().len();
    world.until_ping(
        &bridge,
        pings,
        json!({"start_from": d_id, "recover_until": null}),
    );
    assert_eq!(
        world.stream_requests().len(),
        3,
        "our own state answered back is no change: no further reconnect"
    );
    assert_eq!(log_count(&bridge, "connector state reset in OpenCTI"), 2);

    // Threat Bus reachable: everything queued is delivered, the replayed A and B included.
    proxy.unblock();
    bridge.until("the outbox to drain", WAIT, || {
        bridge.queued("indicators") == 0
    });
    let ids: HashSet<String> = app
        .wait_for(8, WAIT)
        .into_iter()
        .filter(|(suffix, _)| suffix == "indicator")
        .map(|(_, body)| {
            let v: Value = serde_json::from_str(&body).unwrap();
            v["id"].as_str().unwrap().to_owned()
        })
        .collect();
    for indicator in [&a, &b, &c, &d] {
        assert!(
            ids.contains(&indicator.stix_id),
            "{} reached Threat Bus",
            indicator.name
        );
    }
    assert_eq!(bridge.queued("dead"), 0);
}

#[test]
fn a_state_changed_in_opencti_restarts_the_stream_from_it() {
    let world = World::new();
    let seed = world.opencti.append_marking();
    world.ran_before(&seed);
    let e1 = world
        .opencti
        .append_indicator_create(&Indicator::ipv4("10.8.0.1"));
    world
        .opencti
        .append_indicator_create(&Indicator::ipv4("10.8.0.2"));
    let e3 = world
        .opencti
        .append_indicator_create(&Indicator::ipv4("10.8.0.3"));
    let bridge = world.bridge(unused_port());
    bridge.until("three indicators queued", WAIT, || {
        bridge.queued("indicators") == 3
    });
    world.until_ping(&bridge, 0, json!({"start_from": e3, "recover_until": null}));
    assert_eq!(world.stream_requests().len(), 1);

    // OpenCTI holds an older position: resume from it (what follows is read again).
    world.graphql.set_connector_state(
        CONNECTOR_ID,
        &json!({"start_from": e1, "recover_until": null}).to_string(),
    );
    bridge.until("the stream to be opened again", WAIT, || {
        world.stream_requests().len() >= 2
    });
    let second = world.stream_requests()[1].clone();
    assert_eq!(last_event_id(&second), Some(e1.as_str()));
    assert_eq!(second.query_param("recover"), None);
    bridge.until(
        "E2 and E3 read again, next to the queued three",
        WAIT,
        || bridge.queued("indicators") == 5,
    );
    let pings = world.graphql.pings().len();
    world.until_ping(
        &bridge,
        pings,
        json!({"start_from": e3, "recover_until": null}),
    );

    // A state with a recover date (pycti's shape): resume there in recover mode.
    let until = support::opencti::iso_from_ms(world.opencti.now_ms());
    world.graphql.set_connector_state(
        CONNECTOR_ID,
        &json!({"start_from": seed, "recover_until": until}).to_string(),
    );
    bridge.until("the stream to be opened a third time", WAIT, || {
        world.stream_requests().len() >= 3
    });
    let third = world.stream_requests()[2].clone();
    assert_eq!(last_event_id(&third), Some(seed.as_str()));
    assert_eq!(
        third.query_param("recover").as_deref(),
        Some(until.as_str())
    );
    bridge.until(
        "the three indicators replayed, next to the five",
        WAIT,
        || bridge.queued("indicators") == 8,
    );

    // Our own state answered back is no change.
    let pings = world.graphql.pings().len();
    world.until_pings(&bridge, pings, 3);
    assert_eq!(world.stream_requests().len(), 3);
    assert_eq!(log_count(&bridge, "connector state changed in OpenCTI"), 2);
    assert_eq!(bridge.queued("dead"), 0);
}

#[test]
fn our_own_state_answered_back_changes_nothing() {
    let world = World::new();
    let seed = world.opencti.append_marking();
    world.ran_before(&seed);
    let e1 = world
        .opencti
        .append_indicator_create(&Indicator::ipv4("10.7.0.1"));
    let bridge = world.bridge(unused_port());
    bridge.until("E1 queued", WAIT, || bridge.queued("indicators") == 1);
    let expected = json!({"start_from": e1, "recover_until": null});
    world.until_ping(&bridge, 0, expected.clone());
    let pings = world.graphql.pings().len();
    world.until_pings(&bridge, pings, 4);

    assert_eq!(world.stream_requests().len(), 1, "never reconnected");
    // Every ping carried the position it had (the seed, then E1), in pycti's shape.
    for state in world.ping_states() {
        assert!(
            state == json!({"start_from": seed, "recover_until": null}) || state == expected,
            "{state}"
        );
    }
    // The platform holds it (what the connector's page shows).
    let held: Value =
        serde_json::from_str(&world.graphql.connector_state(CONNECTOR_ID).unwrap()).unwrap();
    assert_eq!(held, expected);
    assert_eq!(log_count(&bridge, "connector state reset"), 0);
    assert_eq!(log_count(&bridge, "connector state changed"), 0);
    assert_eq!(bridge.queued("indicators"), 1);
}

#[test]
fn a_first_start_shows_its_replay_until_it_is_over() {
    let world = World::new();
    let a = Indicator::ipv4("10.6.0.1");
    world.opencti.append_indicator_create(&a);
    let bridge = world.bridge(unused_port());
    bridge.until("A replayed", WAIT, || bridge.queued("indicators") == 1);
    let first = world.stream_requests()[0].clone();
    assert_eq!(last_event_id(&first), Some("0-0"));
    let recover = first.query_param("recover").expect("first start replays");
    bridge.until("a ping showing the replay", WAIT, || {
        world.ping_states().iter().any(|s| {
            s["recover_until"] == recover.as_str() && s["start_from"].as_str() != Some("0-0")
        })
    });
    let d_id = world
        .opencti
        .append_indicator_create(&Indicator::ipv4("10.6.0.2"));
    let pings = world.graphql.pings().len();
    world.until_ping(
        &bridge,
        pings,
        json!({"start_from": d_id, "recover_until": null}),
    );
    assert_eq!(world.stream_requests().len(), 1);
}

#[test]
fn a_failing_ping_changes_nothing() {
    let world = World::new();
    let seed = world.opencti.append_marking();
    world.ran_before(&seed);
    let e1 = world
        .opencti
        .append_indicator_create(&Indicator::ipv4("10.5.0.1"));
    let bridge = world.bridge(unused_port());
    world.until_ping(&bridge, 0, json!({"start_from": e1, "recover_until": null}));

    // OpenCTI behind a failing proxy: HTTP 502.
    world.graphql.set_bad_gateway(true);
    let failed = |world: &World| {
        world
            .graphql
            .requests()
            .iter()
            .filter(|r| r.status == 502)
            .count()
    };
    bridge.until("three pings answered 502", WAIT, || failed(&world) >= 3);
    // The data flow goes on meanwhile.
    let e2 = world
        .opencti
        .append_indicator_create(&Indicator::ipv4("10.5.0.2"));
    bridge.until("E2 queued", WAIT, || bridge.queued("indicators") == 2);

    // The connector deleted in OpenCTI: pings answered with an error, no connector.
    world.graphql.set_bad_gateway(false);
    world.graphql.forget_connector(CONNECTOR_ID);
    let pings = world.graphql.pings().len();
    world.until_pings(&bridge, pings, 3);
    assert!(world.graphql.connector_state(CONNECTOR_ID).is_none());

    assert_eq!(world.stream_requests().len(), 1, "never reconnected");
    assert!(log_count(&bridge, "pinging OpenCTI failed") >= 6);
    assert_eq!(log_count(&bridge, "connector state reset"), 0);
    let e3 = world
        .opencti
        .append_indicator_create(&Indicator::ipv4("10.5.0.3"));
    bridge.until("E3 queued", WAIT, || bridge.queued("indicators") == 3);
    assert_eq!(
        bridge.inspect()["stream_position"].as_str(),
        Some(e3.as_str()),
        "the position went on from where it was"
    );
    let _ = e2;
}

#[test]
fn a_state_ahead_of_the_store_is_ignored() {
    let world = World::new();
    let seed = world.opencti.append_marking();
    world.ran_before(&seed);
    let e1 = world
        .opencti
        .append_indicator_create(&Indicator::ipv4("10.4.0.1"));
    let bridge = world.bridge(unused_port());
    let ours = json!({"start_from": e1, "recover_until": null});
    world.until_ping(&bridge, 0, ours.clone());

    // A platform whose state lies past what the bridge has read (e.g. its store was
    // restored from an older backup): jumping there would skip events never read.
    let ahead = format!("{}-0", event_ms(&e1) + 86_400_000);
    world.graphql.set_connector_state(
        CONNECTOR_ID,
        &json!({"start_from": ahead, "recover_until": null}).to_string(),
    );
    bridge.until(
        "the platform to hold the bridge's state again",
        WAIT,
        || {
            world
                .graphql
                .connector_state(CONNECTOR_ID)
                .and_then(|s| serde_json::from_str::<Value>(&s).ok())
                == Some(ours.clone())
        },
    );
    bridge.until("the log to say why", WAIT, || {
        log_count(&bridge, "ahead of the stored stream position") == 1
    });
    assert_eq!(world.stream_requests().len(), 1, "never reconnected");

    // The events after the stored position are still read.
    let e2 = world
        .opencti
        .append_indicator_create(&Indicator::ipv4("10.4.0.2"));
    bridge.until("E2 queued", WAIT, || bridge.queued("indicators") == 2);
    assert_eq!(
        bridge.inspect()["stream_position"].as_str(),
        Some(e2.as_str())
    );
    assert_eq!(world.stream_requests().len(), 1);
}
