//! The stream reader (`pipeline::stream`) in process, against the OpenCTI double and a real
//! store: what reaches the indicator outbox, where the position goes, how it resumes.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use opencti_threatbus::admin::Status;
use opencti_threatbus::metrics::Metrics;
use opencti_threatbus::pipeline::stream::{ReaderConfig, StreamReader};
use opencti_threatbus::store::{Queue, Store, StoreOptions};
use serde_json::Value;
use support::opencti::{organization, tlp_marking, Indicator, OpenCti, Then};
use support::reader::{reader_config, stream_client, TOKEN};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(15);

struct Running {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

fn start(double: &OpenCti, config: ReaderConfig, prepare: impl FnOnce(&Store)) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    prepare(&store);
    let store = Arc::new(store);
    let metrics = Arc::new(Metrics::default());
    let client = stream_client(double);
    let reader = StreamReader::new(
        client,
        Arc::clone(&store),
        config,
        Arc::new(Status::default()),
        Arc::clone(&metrics),
    )
    .unwrap();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(async move { reader.run(stopped).await.unwrap() });
    Running {
        store,
        metrics,
        stop,
        task,
        _dir: dir,
    }
}

impl Running {
    async fn stop(self) -> Arc<Store> {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the reader stops")
            .unwrap();
        self.store
    }
}

/// A stream that already has history, and a stored position at its first event: a bridge
/// that has been running, not a first start (and no gap).
fn with_history(double: &OpenCti) -> String {
    double.append_marking()
}

fn resume_at(position: String) -> impl FnOnce(&Store) {
    move |s: &Store| drop(s.set_position(&position).unwrap())
}

fn items(store: &Store) -> Vec<Value> {
    store
        .scan(Queue::Indicators, None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|i| serde_json::from_slice(&i.envelope.payload).unwrap())
        .collect()
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn summary(v: &Value) -> (String, Option<String>) {
    (
        v["id"].as_str().unwrap().to_string(),
        v["x_threatbus_update"].as_str().map(str::to_string),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn indicator_events_reach_the_outbox_in_order_with_the_position() {
    let double = OpenCti::start();
    double.require_token(TOKEN);
    let history = with_history(&double);
    let run = start(&double, reader_config(1000), resume_at(history.clone()));

    let a = Indicator::ipv4("198.51.100.1");
    let mut b = Indicator::domain("evil.example").with_detection(false);
    let org = organization("ACME CERT", 1_706_000_000_000);
    let marking = tlp_marking("TLP:GREEN", 1_706_000_000_000);
    double.append_dependency_then(&[marking, org], Then::Create(&a));
    double.append_indicator_create(&b); // detection off: filtered
    b = b.with_detection(true);
    double.append_indicator_update(&b); // now on: EDIT
    double.append_indicator_delete(&a); // REMOVE
    let last =
        double.append_indicator_create(&Indicator::ipv4("198.51.100.2").with_detection(false));

    until("the position to reach the last event", || {
        run.store.position().unwrap().as_deref() == Some(last.as_str())
    })
    .await;
    let got: Vec<_> = items(&run.store).iter().map(summary).collect();
    assert_eq!(
        got,
        vec![
            (a.stix_id.clone(), None),
            (b.stix_id.clone(), Some("EDIT".into())),
            (a.stix_id.clone(), Some("REMOVE".into())),
        ]
    );
    let first = &double.requests()[0];
    assert_eq!(first.header("last-event-id"), Some(history.as_str()));
    assert!(first.query_param("recover").is_none());
    assert_eq!(
        first.header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_start_replays_the_current_state_then_follows_live() {
    let double = OpenCti::start();
    let gone = Indicator::ipv4("198.51.100.10");
    let mut changed = Indicator::ipv4("198.51.100.11").with_detection(false);
    double.append_indicator_create(&gone);
    double.append_indicator_create(&changed);
    changed = changed.with_detection(true);
    double.append_indicator_update(&changed);
    double.append_indicator_delete(&gone);
    let run = start(&double, reader_config(1000), |_| {});
    until("the replayed state", || {
        run.store.len(Queue::Indicators) == 1
    })
    .await;
    let live = Indicator::ipv4("198.51.100.12");
    let live_id = double.append_indicator_create(&live);
    until("the live event", || {
        run.store.position().unwrap().as_deref() == Some(live_id.as_str())
    })
    .await;
    // The current state only: the deleted one is not replayed, the changed one is.
    let got: Vec<_> = items(&run.store).iter().map(summary).collect();
    assert_eq!(
        got,
        vec![
            (changed.stix_id.clone(), None),
            (live.stix_id.clone(), None)
        ]
    );
    // Like pycti: from 0-0 with a recover date.
    let first = &double.requests()[0];
    assert_eq!(first.header("last-event-id"), Some("0-0"));
    assert!(
        first.query_param("recover").is_some(),
        "first start replays in recover mode"
    );
    let store = run.stop().await;
    assert_eq!(
        store.meta("stream_recover_until").unwrap(),
        None,
        "the replay is over once live"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_during_the_replay_keeps_replaying() {
    let double = OpenCti::start();
    for i in 0..5 {
        double.append_indicator_create(&Indicator::ipv4(&format!("198.18.0.{i}")));
    }
    // A previous run stopped mid-replay: its position is a replay id, and the recover date
    // it used is stored.
    let run = start(&double, reader_config(1000), |s| {
        drop(s.set_position("1700000000000-0").unwrap());
        drop(
            s.set_meta("stream_recover_until", "2099-01-01T00:00:00.000Z")
                .unwrap(),
        );
    });
    until("a connection", || double.request_count() >= 1).await;
    let first = &double.requests()[0];
    assert_eq!(first.header("last-event-id"), Some("1700000000000-0"));
    assert_eq!(
        first.query_param("recover").as_deref(),
        Some("2099-01-01T00:00:00.000Z")
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_connection_resumes_from_the_position_without_replaying() {
    let double = OpenCti::start();
    let run = start(
        &double,
        reader_config(10_000),
        resume_at(with_history(&double)),
    );
    let mut last = String::new();
    for i in 0..50 {
        last = double.append_indicator_create(&Indicator::ipv4(&format!("10.0.0.{i}")));
    }
    until("50 indicators", || run.store.len(Queue::Indicators) == 50).await;
    until("the position", || {
        run.store.position().unwrap().as_deref() == Some(last.as_str())
    })
    .await;
    double.cut_connections();
    for i in 50..100 {
        double.append_indicator_create(&Indicator::ipv4(&format!("10.0.1.{i}")));
    }
    until("100 indicators", || run.store.len(Queue::Indicators) == 100).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        run.store.len(Queue::Indicators),
        100,
        "nothing replayed twice"
    );
    let requests = double.requests();
    assert!(requests.len() >= 2, "it reconnected");
    let resumed = requests[1].header("last-event-id").unwrap().to_string();
    assert!(
        opencti_threatbus::opencti::compare_event_ids(&resumed, &last)
            != Some(std::cmp::Ordering::Less),
        "resumed from {resumed}, before the last stored event {last}"
    );
    assert!(
        requests[1].query_param("recover").is_none(),
        "a resume is not a replay"
    );
    assert!(run.metrics.stream_reconnects.get() >= 1);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gap_on_a_live_stream_reconnects_in_recover_mode() {
    let double = OpenCti::start();
    let old = Indicator::ipv4("192.0.2.1");
    double.append_indicator_create(&old);
    let changed = Indicator::ipv4("192.0.2.2");
    let kept = double.append_indicator_create(&changed);
    // The bridge was down while OpenCTI trimmed its stream past our position.
    double.trim_before(&kept);
    double.remove_object(&old.stix_id);
    let stale = "1000-0";
    let run = start(&double, reader_config(1000), |s| {
        drop(s.set_position(stale).unwrap())
    });
    until("a recover connection", || {
        double
            .requests()
            .iter()
            .any(|r| r.query_param("recover").is_some())
    })
    .await;
    until("the replayed state", || {
        items(&run.store)
            .iter()
            .any(|v| v["id"] == changed.stix_id.as_str())
    })
    .await;
    let requests = double.requests();
    assert!(requests[0].query_param("recover").is_none());
    let recover = requests
        .iter()
        .find(|r| r.query_param("recover").is_some())
        .unwrap();
    assert_eq!(
        recover.header("last-event-id"),
        Some(stale),
        "recover from the stored position"
    );
    assert_eq!(run.metrics.stream_gaps.get(), 1);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unauthorized_is_retried_slowly_then_recovers() {
    let double = OpenCti::start();
    double.fail_next(401, 2);
    let run = start(
        &double,
        reader_config(1000),
        resume_at(with_history(&double)),
    );
    let id = double.append_indicator_create(&Indicator::ipv4("203.0.113.9"));
    until("the indicator after two refusals", || {
        run.store.position().unwrap().as_deref() == Some(id.as_str())
    })
    .await;
    let times: Vec<Instant> = double.requests().iter().map(|r| r.at).collect();
    assert!(times.len() >= 3);
    for pair in times.windows(2).take(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(350),
            "401 retried too fast: {:?}",
            pair[1] - pair[0]
        );
    }
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_outbox_pauses_the_stream_and_loses_nothing() {
    let double = OpenCti::start();
    let run = start(&double, reader_config(10), resume_at(with_history(&double)));
    let mut expected = Vec::new();
    for i in 0..40 {
        let ind = Indicator::ipv4(&format!("172.16.0.{i}"));
        expected.push(ind.stix_id.clone());
        double.append_indicator_create(&ind);
    }
    until("the outbox to fill", || {
        run.store.len(Queue::Indicators) >= 10
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        run.store.len(Queue::Indicators) <= 10 + 512,
        "paused near the limit"
    );
    // Drain like the Threat Bus drainer would, and collect what went through, in order.
    let mut seen = Vec::new();
    let deadline = Instant::now() + WAIT;
    while seen.len() < 40 {
        assert!(
            Instant::now() < deadline,
            "only {} of 40 came through",
            seen.len()
        );
        for item in run.store.scan(Queue::Indicators, None, 5).unwrap() {
            let v: Value = serde_json::from_slice(&item.envelope.payload).unwrap();
            seen.push(v["id"].as_str().unwrap().to_string());
            run.store.ack(Queue::Indicators, item.key).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(seen, expected);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dependency_events_and_heartbeats_among_them_never_advance_the_position() {
    let double = OpenCti::start();
    let history = with_history(&double);
    // Slow, so the reader commits between the dependencies and their event; a heartbeat
    // carrying the event's id comes in between too, as OpenCTI can send one.
    double.set_event_delay(Duration::from_millis(150));
    double.set_heartbeat_inside_dependencies(true);
    let run = start(&double, reader_config(1000), resume_at(history.clone()));
    let indicator = Indicator::ipv4("192.0.2.77");
    let deps = [
        tlp_marking("TLP:GREEN", 1_700_000_000_000),
        organization("ACME", 1_700_000_000_000),
    ];
    let id = double.append_dependency_then(&deps, Then::Create(&indicator));
    let deadline = Instant::now() + WAIT;
    let mut positions = vec![];
    loop {
        let position = run.store.position().unwrap();
        if positions.last() != Some(&position) {
            positions.push(position.clone());
        }
        if position.as_deref() == Some(id.as_str()) {
            // Read from sled after the position: an item written in the position's batch
            // (or before) is visible now; one left to a later batch (the bug) comes at
            // least one event delay later. Not `len()`: that counter is bumped just after
            // the batch is applied, so it can lag the position by an instant.
            let queued = run.store.scan(Queue::Indicators, None, 10).unwrap().len();
            assert_eq!(
                queued, 1,
                "the position reached {id} before its event was stored: {positions:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never reached {id}: {positions:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn silence_past_the_stream_timeout_means_reconnect() {
    let double = OpenCti::start();
    double.set_heartbeat_interval(Duration::from_secs(3600));
    let history = with_history(&double);
    let mut config = reader_config(1000);
    config.stream_timeout = Duration::from_millis(300);
    let run = start(&double, config, resume_at(history));
    until("a reconnection after silence", || {
        double.request_count() >= 3
    })
    .await;
    assert!(run.metrics.stream_reconnects.get() >= 2);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_live_stream_is_retried_slowly_until_started() {
    let double = OpenCti::start();
    let history = with_history(&double);
    double.stop_live_stream("live");
    let run = start(&double, reader_config(1000), resume_at(history));
    until("two refused connections", || double.request_count() >= 2).await;
    let times: Vec<Instant> = double.requests().iter().map(|r| r.at).collect();
    assert!(
        times[1] - times[0] >= Duration::from_millis(350),
        "410 retried too fast"
    );
    double.start_live_stream("live");
    let id = double.append_indicator_create(&Indicator::ipv4("203.0.113.10"));
    until("the stream once started", || {
        run.store.position().unwrap().as_deref() == Some(id.as_str())
    })
    .await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_in_a_row_at_one_position_are_counted_until_it_moves() {
    let double = OpenCti::start();
    double.require_token(TOKEN);
    // No heartbeat moves the position meanwhile: only the event below does.
    double.set_heartbeat_interval(Duration::from_secs(600));
    let history = with_history(&double);
    double.fail_next(502, 4);
    let run = start(&double, reader_config(1000), resume_at(history));
    until("four failures in a row at the stored position", || {
        run.metrics.stream_repeated_failures.get() == 4
    })
    .await;
    double.append_indicator_create(&Indicator::ipv4("198.51.100.77"));
    until("the count to clear once the position moves", || {
        run.metrics.stream_repeated_failures.get() == 0
    })
    .await;
    let store = run.stop().await;
    assert_eq!(items(&store).len(), 1);
}
