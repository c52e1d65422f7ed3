//! The Threat Bus link against the real, pinned Threat Bus (see `tests/support/threatbus.rs`).

mod support;

use std::time::{Duration, Instant};

use opencti_threatbus::stix::{classify_bus_message, BusMessage};
use opencti_threatbus::threatbus::{Incoming, Link, LinkConfig, LinkError, LinkHandle, LinkState};
use support::threatbus::{
    heartbeat_status, indicator_frame, raw_subscribe, sample_indicator, sample_sighting, stix_id,
    unused_port, TestApp, ThreatBus,
};
use tokio::sync::{mpsc, watch};

const READY_TIMEOUT: Duration = Duration::from_secs(15);
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(20);

fn config(manage_port: u16) -> LinkConfig {
    LinkConfig {
        heartbeat_interval: Duration::from_secs(1),
        retry_initial: Duration::from_millis(100),
        retry_max: Duration::from_millis(500),
        ..LinkConfig::new("127.0.0.1", manage_port)
    }
}

async fn wait_state(
    state: &mut watch::Receiver<LinkState>,
    what: &str,
    timeout: Duration,
    done: impl Fn(&LinkState) -> bool,
) -> LinkState {
    let result = tokio::time::timeout(timeout, state.wait_for(|s| done(s)))
        .await
        .map(|r| r.map(|s| s.clone()));
    match result {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => panic!("the link ended while waiting for {what}"),
        Err(_) => panic!("no {what} within {timeout:?}; state: {:?}", *state.borrow()),
    }
}

/// Waits for `Ready` and returns its topic and generation.
async fn wait_ready(state: &mut watch::Receiver<LinkState>) -> (String, u64) {
    match wait_state(state, "Ready", READY_TIMEOUT, |s| {
        matches!(s, LinkState::Ready { .. })
    })
    .await
    {
        LinkState::Ready { topic, generation } => (topic, generation),
        _ => unreachable!(),
    }
}

async fn start_ready(
    config: LinkConfig,
) -> (LinkHandle, mpsc::UnboundedReceiver<Incoming>, String, u64) {
    let (link, incoming) = Link::start(config).expect("starting the link");
    let (topic, generation) = wait_ready(&mut link.state()).await;
    assert_eq!(link.current_topic().as_deref(), Some(topic.as_str()));
    (link, incoming, topic, generation)
}

/// Receives `n` messages of the kind `pick` accepts (ignoring the others).
async fn receive<T>(
    incoming: &mut mpsc::UnboundedReceiver<Incoming>,
    n: usize,
    pick: impl Fn(Incoming) -> Option<T>,
) -> Vec<T> {
    let deadline = tokio::time::Instant::now() + MESSAGE_TIMEOUT;
    let mut picked = Vec::with_capacity(n);
    while picked.len() < n {
        match tokio::time::timeout_at(deadline, incoming.recv()).await {
            Ok(Some(message)) => picked.extend(pick(message)),
            Ok(None) => panic!("the incoming channel closed after {} of {n}", picked.len()),
            Err(_) => panic!(
                "{} of {n} messages within {MESSAGE_TIMEOUT:?}",
                picked.len()
            ),
        }
    }
    picked
}

fn indicator_ids(message: Incoming) -> Option<String> {
    match message {
        Incoming::Indicator(json) => Some(stix_id(&json)),
        _ => None,
    }
}

/// (a) Publish N indicators: another app receives them all in order, and so does the link
/// itself (the echo, re-serialized by Threat Bus).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_indicators_reach_apps_in_order_and_echo_back() {
    const N: usize = 200;
    let bus = ThreatBus::start();
    let app = TestApp::subscribe(bus.manage_port, &["stix2/indicator"]);
    let (link, mut incoming, _topic, generation) = start_ready(config(bus.manage_port)).await;

    let indicators: Vec<_> = (0..N).map(|_| sample_indicator()).collect();
    let ids: Vec<String> = indicators
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    // Several batches in flight at once: queued in call order.
    let pending: Vec<_> = indicators
        .chunks(50)
        .map(|chunk| link.publish(chunk.iter().map(indicator_frame).collect()))
        .collect();
    for result in pending {
        assert_eq!(result.await.expect("published"), generation);
    }

    let received = app.wait_for(N, MESSAGE_TIMEOUT);
    assert!(received.iter().all(|(suffix, _)| suffix == "indicator"));
    let received_ids: Vec<String> = received.iter().map(|(_, json)| stix_id(json)).collect();
    assert_eq!(received_ids, ids, "the other app got them all, in order");

    let echoes = receive(&mut incoming, N, |m| match m {
        Incoming::Indicator(json) => Some(json),
        _ => None,
    })
    .await;
    let echo_ids: Vec<String> = echoes.iter().map(|json| stix_id(json)).collect();
    assert_eq!(
        echo_ids, ids,
        "the link got its own indicators back, in order"
    );
    // Re-serialized (not byte-identical), but the echo key still matches what was sent.
    assert_ne!(echoes[0], indicators[0].to_string());
    let sent_key = opencti_threatbus::stix::indicator_echo_key(&indicators[0]).unwrap();
    match classify_bus_message("indicator", &echoes[0]) {
        BusMessage::Indicator {
            echo_key: Some(key),
        } => assert_eq!(key, sent_key),
        other => panic!("echo classified as {other:?}"),
    }
    assert_eq!(link.shutdown().await, None);
}

/// (b) Sightings another app publishes arrive as `Incoming::Sighting`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sightings_from_other_apps_arrive() {
    let bus = ThreatBus::start();
    let (link, mut incoming, _topic, _) = start_ready(config(bus.manage_port)).await;
    let mut app = TestApp::subscribe(bus.manage_port, &["stix2/sighting"]);
    let indicator_id = sample_indicator()["id"].as_str().unwrap().to_owned();
    let sightings: Vec<_> = (0..5).map(|_| sample_sighting(&indicator_id)).collect();
    for sighting in &sightings {
        app.publish_sighting(&sighting.to_string());
    }
    let received = receive(&mut incoming, sightings.len(), |m| match m {
        Incoming::Sighting(json) => Some(json),
        other => panic!("unexpected {other:?}"),
    })
    .await;
    for (json, sent) in received.iter().zip(&sightings) {
        match classify_bus_message("sighting", json) {
            BusMessage::Sighting(s) => {
                assert_eq!(s.id, sent["id"].as_str().unwrap());
                assert_eq!(s.sighting_of_ref, indicator_id);
                assert_eq!(s.source.as_deref(), Some("VAST"));
            }
            other => panic!("sighting classified as {other:?}: {json}"),
        }
    }
    link.shutdown().await;
}

/// (c) Threat Bus killed and restarted on the same ports: the link notices, re-subscribes
/// with a higher generation, and publishing works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threatbus_restart_is_survived_with_a_new_generation() {
    let mut bus = ThreatBus::start();
    let (link, mut incoming, topic1, generation1) = start_ready(config(bus.manage_port)).await;
    let mut state = link.state();

    bus.kill();
    let down = wait_state(&mut state, "Down/Connecting", Duration::from_secs(5), |s| {
        !matches!(s, LinkState::Ready { .. })
    })
    .await;
    eprintln!("after the kill: {down:?}");
    assert!(matches!(
        link.publish(vec![indicator_frame(&sample_indicator())])
            .await,
        Err(LinkError::NotReady)
    ));

    bus.restart();
    let started = Instant::now();
    let (topic2, generation2) = wait_ready(&mut state).await;
    eprintln!("ready again {:?} after the restart", started.elapsed());
    assert!(generation2 > generation1, "{generation2} > {generation1}");
    assert_ne!(topic2, topic1, "a new p2p topic");
    assert_eq!(heartbeat_status(bus.manage_port, &topic2), "success");

    let indicator = sample_indicator();
    let generation = link
        .publish(vec![indicator_frame(&indicator)])
        .await
        .expect("publishing after the restart");
    assert_eq!(generation, generation2);
    let echo = receive(&mut incoming, 1, indicator_ids).await;
    assert_eq!(echo[0], indicator["id"].as_str().unwrap());
    link.shutdown().await;
}

/// (d) The p2p topic a previous run left behind is unsubscribed at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_topic_is_unsubscribed_at_start() {
    let bus = ThreatBus::start();
    let stale = raw_subscribe(bus.manage_port, &["stix2/sighting", "stix2/indicator"], 0)["topic"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(heartbeat_status(bus.manage_port, &stale), "success");
    let config = LinkConfig {
        stale_topic: Some(stale.clone()),
        ..config(bus.manage_port)
    };
    let (link, _incoming, topic, _) = start_ready(config).await;
    assert_ne!(topic, stale);
    assert_eq!(heartbeat_status(bus.manage_port, &stale), "error");
    assert_eq!(heartbeat_status(bus.manage_port, &topic), "success");

    // A stale topic Threat Bus does not know (answered `error`) is no obstacle either.
    let config = LinkConfig {
        stale_topic: Some(stale.clone()),
        ..self::config(bus.manage_port)
    };
    let (other, _incoming2, _, _) = start_ready(config).await;
    other.shutdown().await;
    link.shutdown().await;
}

/// (e) Shutdown unsubscribes, quickly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_unsubscribes() {
    let bus = ThreatBus::start();
    let (link, _incoming, topic, _) = start_ready(config(bus.manage_port)).await;
    let started = Instant::now();
    let left_behind = link.shutdown().await;
    let took = started.elapsed();
    eprintln!("shutdown took {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(left_behind, None);
    assert_eq!(heartbeat_status(bus.manage_port, &topic), "error");
}

/// (e) Shutdown returns within 3 s with Threat Bus gone, and reports the topic it could not
/// unsubscribe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_with_threatbus_gone() {
    let mut bus = ThreatBus::start();
    let (link, _incoming, topic, _) = start_ready(config(bus.manage_port)).await;
    // Something written and not yet flushed must not hold the shutdown up either.
    link.publish(vec![indicator_frame(&sample_indicator()); 100])
        .await
        .expect("published");
    bus.kill();
    let started = Instant::now();
    let left_behind = link.shutdown().await;
    let took = started.elapsed();
    eprintln!("shutdown with Threat Bus killed took {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(left_behind, Some(topic));
}

/// Shutdown while still trying to subscribe (nothing listens) does not wait out the 5 s
/// subscribe timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_connecting_is_bounded() {
    let (link, _incoming) = Link::start(config(unused_port())).expect("starting the link");
    let mut state = link.state();
    let down = wait_state(&mut state, "Down", Duration::from_secs(8), |s| {
        matches!(s, LinkState::Down { .. })
    })
    .await;
    eprintln!("with nothing listening: {down:?}");
    assert!(matches!(
        link.publish(vec![indicator_frame(&sample_indicator())])
            .await,
        Err(LinkError::NotReady)
    ));
    let started = Instant::now();
    assert_eq!(link.shutdown().await, None);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");
}

/// Another app asking for a snapshot reaches the link as `SnapshotRequest`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_requests_are_delivered() {
    let bus = ThreatBus::start();
    let (link, mut incoming, _topic, _) = start_ready(config(bus.manage_port)).await;
    let _app = TestApp::subscribe_with_snapshot(bus.manage_port, &["stix2/indicator"], 3);
    let requests = receive(&mut incoming, 1, |m| match m {
        Incoming::SnapshotRequest(json) => Some(json),
        _ => None,
    })
    .await;
    let request: serde_json::Value = serde_json::from_str(&requests[0]).unwrap();
    assert_eq!(request["type"], "snapshotrequest");
    assert_eq!(request["snapshot"], 3 * 86_400);
    assert!(matches!(
        classify_bus_message("snapshotrequest", &requests[0]),
        BusMessage::SnapshotRequest
    ));
    link.shutdown().await;
}

/// Throughput of `publish` into the real Threat Bus (run with `--ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn publish_throughput() {
    const N: usize = 20_000;
    let bus = ThreatBus::start();
    let (link, mut incoming, _topic, _) = start_ready(config(bus.manage_port)).await;
    let frames: Vec<String> = (0..N)
        .map(|_| indicator_frame(&sample_indicator()))
        .collect();

    // One frame per call, all in flight, then awaited.
    let started = Instant::now();
    let pending: Vec<_> = frames[..N / 2]
        .iter()
        .map(|f| link.publish(vec![f.clone()]))
        .collect();
    for p in pending {
        p.await.expect("published");
    }
    let single = started.elapsed();
    // Batches of 100.
    let started = Instant::now();
    let pending: Vec<_> = frames[N / 2..]
        .chunks(100)
        .map(|c| link.publish(c.to_vec()))
        .collect();
    for p in pending {
        p.await.expect("published");
    }
    let batched = started.elapsed();
    // One frame per call, each awaited before the next (the round-trip latency).
    const SEQUENTIAL: usize = 2_000;
    let started = Instant::now();
    for f in &frames[..SEQUENTIAL] {
        link.publish(vec![f.clone()]).await.expect("published");
    }
    let sequential = started.elapsed();
    eprintln!(
        "publish: {SEQUENTIAL} awaited one by one in {sequential:?} ({:.0}/s)",
        SEQUENTIAL as f64 / sequential.as_secs_f64()
    );
    eprintln!(
        "publish: {} single-frame calls in {single:?} ({:.0}/s); {} frames in batches of 100 in {batched:?} ({:.0}/s)",
        N / 2,
        (N / 2) as f64 / single.as_secs_f64(),
        N / 2,
        (N / 2) as f64 / batched.as_secs_f64()
    );
    let started = Instant::now();
    let mut echoes = 0;
    while echoes < N + SEQUENTIAL {
        match tokio::time::timeout(Duration::from_secs(30), incoming.recv()).await {
            Ok(Some(Incoming::Indicator(_))) => echoes += 1,
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    eprintln!(
        "echoes: {echoes} of {} in {:?} ({:.0}/s relayed by Threat Bus)",
        N + SEQUENTIAL,
        started.elapsed(),
        echoes as f64 / started.elapsed().as_secs_f64()
    );
    link.shutdown().await;
    drop(bus);
}
