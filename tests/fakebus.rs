//! The fake Threat Bus (`tests/support/fakebus.rs`) speaks the protocol the bridge's link
//! expects: management answers as `threatbus-zmq` gives them, the link becomes Ready,
//! receives what the fake publishes, and gets its own indicators back (fan-out).

mod support;

use std::time::Duration;

use opencti_threatbus::threatbus::{Incoming, Link, LinkConfig, LinkState};
use serde_json::json;
use support::fakebus::{Counts, FakeBus};
use support::threatbus::{
    indicator_frame, manage_request, sample_indicator, sample_sighting, TestApp,
};
use tokio::sync::mpsc;

const TIMEOUT: Duration = Duration::from_secs(10);

async fn next(incoming: &mut mpsc::UnboundedReceiver<Incoming>) -> Incoming {
    tokio::time::timeout(TIMEOUT, incoming.recv())
        .await
        .expect("a message from the fake bus in time")
        .expect("the link's incoming channel is open")
}

#[tokio::test]
async fn the_link_gets_ready_receives_sightings_and_its_own_indicators_back() {
    let bus = FakeBus::start();
    let (link, mut incoming) =
        Link::start(LinkConfig::new("127.0.0.1", bus.manage_port())).expect("starting the link");
    let mut state = link.state();
    let ready = tokio::time::timeout(
        TIMEOUT,
        state.wait_for(|s| matches!(s, LinkState::Ready { .. })),
    )
    .await
    .expect("Ready in time")
    .expect("the link runs")
    .clone();
    let LinkState::Ready { topic, .. } = ready else {
        unreachable!()
    };
    assert_eq!(topic.len(), 32);
    assert!(topic.bytes().all(|b| b.is_ascii_lowercase()), "{topic}");
    assert_eq!(bus.wait_subscribers(1, TIMEOUT), vec![topic.clone()]);

    // Threat Bus → the bridge: a sighting from another app, byte for byte.
    let sighting = sample_sighting("indicator--3d63fc4d-ba50-4892-be4d-f3a44fdc4461").to_string();
    bus.publish_sighting(&sighting);
    assert_eq!(next(&mut incoming).await, Incoming::Sighting(sighting));

    // The bridge → Threat Bus → the bridge: the echo of its own indicator.
    let indicator = sample_indicator();
    let frame = indicator_frame(&indicator);
    link.publish(vec![frame.clone()])
        .await
        .expect("published on a ready link");
    assert_eq!(
        next(&mut incoming).await,
        Incoming::Indicator(indicator.to_string())
    );
    assert_eq!(bus.received(), vec![frame]);
    assert_eq!(
        bus.counts(),
        Counts {
            indicators: 1,
            ..Counts::default()
        }
    );

    // Other suffixes reach every subscriber.
    bus.publish_to_all("snapshotrequest", r#"{"type": "snapshotrequest"}"#);
    assert_eq!(
        next(&mut incoming).await,
        Incoming::SnapshotRequest(r#"{"type": "snapshotrequest"}"#.into())
    );

    // A clean shutdown unsubscribes.
    assert_eq!(link.shutdown().await, None, "nothing left behind");
    assert!(bus.subscribers().is_empty());
}

#[test]
fn management_answers_as_threat_bus_does() {
    let bus = FakeBus::start();
    let port = bus.manage_port();
    let ask = |request: serde_json::Value| {
        manage_request(port, &request, TIMEOUT).expect("a reply from the fake bus")
    };
    let reply = ask(json!({"action": "subscribe", "topic": ["stix2/sighting"], "snapshot": 0}));
    assert_eq!(reply["status"], "success");
    assert_eq!(reply["pub_port"], bus.pub_port());
    assert_eq!(reply["sub_port"], bus.sub_port());
    let topic = reply["topic"].as_str().unwrap().to_owned();
    let other = ask(json!({"action": "subscribe", "topic": "stix2"}));
    assert_ne!(other["topic"], reply["topic"]);
    assert_eq!(bus.subscribers().len(), 2);

    let status = |request: serde_json::Value| ask(request)["status"].as_str().unwrap().to_owned();
    assert_eq!(
        status(json!({"action": "heartbeat", "topic": topic})),
        "success"
    );
    assert_eq!(
        status(json!({"action": "heartbeat", "topic": "nope"})),
        "error"
    );
    assert_eq!(status(json!({"action": "heartbeat"})), "unknown request");
    assert_eq!(
        status(json!({"action": "dance", "topic": "x"})),
        "unknown request"
    );
    assert_eq!(
        status(json!({"action": "subscribe", "topic": []})),
        "unknown request"
    );
    assert_eq!(
        status(json!({"action": "subscribe", "topic": "stix2", "snapshot": "x"})),
        "error"
    );
    let garbage = {
        let context = zmq::Context::new();
        let socket = context.socket(zmq::REQ).unwrap();
        socket.set_linger(0).unwrap();
        socket.connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
        socket.send("not json", 0).unwrap();
        assert!(socket.poll(zmq::POLLIN, 5000).unwrap() > 0);
        socket.recv_string(0).unwrap().unwrap()
    };
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&garbage).unwrap(),
        json!({"status": "error"})
    );
    assert_eq!(
        status(json!({"action": "unsubscribe", "topic": topic})),
        "success"
    );
    assert_eq!(
        status(json!({"action": "unsubscribe", "topic": topic})),
        "error"
    );
    assert_eq!(
        status(json!({"action": "heartbeat", "topic": topic})),
        "error"
    );
    assert_eq!(
        bus.subscribers(),
        vec![other["topic"].as_str().unwrap().to_owned()]
    );
}

#[test]
fn fan_out_follows_the_subscribed_prefixes_and_includes_the_sender() {
    let bus = FakeBus::start();
    // A list holding `stix2` and `stix2/indicator` gets indicators twice (README §3).
    let both = TestApp::subscribe(bus.manage_port(), &["stix2", "stix2/indicator"]);
    let mut sightings = TestApp::subscribe(bus.manage_port(), &["stix2/sighting"]);
    bus.wait_subscribers(2, TIMEOUT);

    let indicator = sample_indicator().to_string();
    sightings.publish("stix2/indicator", &indicator);
    let sighting = sample_sighting("indicator--3d63fc4d-ba50-4892-be4d-f3a44fdc4461").to_string();
    sightings.publish_sighting(&sighting);
    // Not STIX 2.1, or not JSON: dropped, as Threat Bus drops them.
    sightings.publish("stix2/indicator", r#"{"type": "indicator", "id": "x"}"#);
    sightings.publish("stix2/indicator", "not json");
    bus.wait_received(4, TIMEOUT);

    let to_both = both.wait_for(3, TIMEOUT);
    assert_eq!(
        to_both,
        vec![
            ("indicator".to_owned(), indicator.clone()),
            ("indicator".to_owned(), indicator),
            ("sighting".to_owned(), sighting.clone()),
        ]
    );
    assert_eq!(
        sightings.wait_for(1, TIMEOUT),
        vec![("sighting".to_owned(), sighting)]
    );
    assert_eq!(
        bus.counts(),
        Counts {
            indicators: 1,
            sightings: 1,
            snapshot_envelopes: 0,
            dropped: 2,
        }
    );
    assert_eq!(bus.sent(), 4);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(both.received().len(), 3, "nothing more arrived");
    assert_eq!(sightings.received().len(), 1, "nothing more arrived");
}
