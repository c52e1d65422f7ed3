//! OpenCTI stream → durable indicator outbox, in events per second.
//!
//! `cargo bench --bench stream` replays N realistic 6.x indicator `create` events (about
//! 1.7 KB each) from the OpenCTI test double and prints, in the same run:
//! - baseline: the transport alone (`StreamClient`, events parsed and dropped);
//! - the stream reader: events mapped, batched and committed to the store with the
//!   position, timed until the store's position reaches the last event and a final flush
//!   made it durable.
//!
//! Figures, not assertions: this machine is shared and noisy.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use opencti_threatbus::admin::Status;
use opencti_threatbus::config::Secret;
use opencti_threatbus::metrics::Metrics;
use opencti_threatbus::opencti::{StreamClient, StreamConfig};
use opencti_threatbus::pipeline::stream::{ReaderConfig, StreamReader};
use opencti_threatbus::retry::RetryPolicy;
use opencti_threatbus::store::{Queue, Store, StoreOptions};
use support::opencti::{Indicator, OpenCti};

const EVENTS: usize = 50_000;
const TARGET: f64 = 20_000.0;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let double = OpenCti::start();
    double.set_heartbeat_interval(Duration::from_secs(3600));
    let start_id = double.append_raw("heartbeat", "\"seed\"");
    let mut bytes = 0usize;
    let mut last = String::new();
    for i in 0..EVENTS {
        let ind = Indicator::ipv4(&format!(
            "10.{}.{}.{}",
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        ));
        last = double.append_indicator_create(&ind);
        bytes += 1700;
    }
    println!(
        "stream benchmark: {EVENTS} indicator create events (~{} MB) from the OpenCTI double",
        bytes / 1_000_000
    );
    let config = StreamConfig {
        base_url: double.base_url(),
        token: Secret::new("bench"),
        live_stream_id: Some("live".into()),
        listen_delete: true,
        no_dependencies: true,
        with_inferences: false,
        ssl_verify: true,
    };

    let transport = runtime.block_on(transport_only(&config, &start_id));
    let reader = runtime.block_on(reader(&config, &start_id, &last));
    println!("{:<44} {:>12}", "", "events/s");
    println!(
        "{:<44} {:>12.0}",
        "baseline: transport only (parse, drop)", transport
    );
    println!("{:<44} {:>12.0}", "stream reader → durable outbox", reader);
    println!(
        "reader / transport: {:.2}   target ≥ {TARGET:.0} events/s: {}",
        reader / transport,
        if reader >= TARGET { "met" } else { "NOT met" }
    );
}

async fn transport_only(config: &StreamConfig, start_id: &str) -> f64 {
    let client = StreamClient::new(config).expect("client");
    let started = Instant::now();
    let mut stream = client.connect(start_id, None).await.expect("connect");
    let mut n = 0;
    while n < EVENTS {
        match stream.next().await {
            Some(Ok(event)) if event.event == "create" => n += 1,
            Some(Ok(_)) => {}
            other => panic!("stream ended early: {other:?}"),
        }
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn reader(config: &StreamConfig, start_id: &str, last: &str) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), &StoreOptions::default()).expect("store");
    drop(store.set_position(start_id).expect("position"));
    let store = Arc::new(store);
    let reader = StreamReader::new(
        StreamClient::new(config).expect("client"),
        Arc::clone(&store),
        ReaderConfig {
            forward_all_iocs: false,
            indicator_limit: u64::MAX,
            stream_timeout: Duration::from_secs(60),
            live: true,
            first_start_from: "0-0".into(),
            first_start_recover: None,
            retry: RetryPolicy {
                initial: Duration::from_millis(50),
                max: Duration::from_secs(1),
                multiplier: 2.0,
            },
            auth_retry: Duration::from_secs(1),
        },
        Arc::new(Status::default()),
        Arc::new(Metrics::default()),
    )
    .expect("reader");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let task = tokio::spawn(reader.run(stopped));
    while store.position().expect("position").as_deref() != Some(last) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    store.flush().expect("flush");
    let elapsed = started.elapsed();
    assert_eq!(
        store.len(Queue::Indicators),
        EVENTS as u64,
        "every indicator queued"
    );
    let _ = stop.send(true);
    let _ = task.await;
    EVENTS as f64 / elapsed.as_secs_f64()
}
