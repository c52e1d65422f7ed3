//! OpenCTI stream → durable indicator outbox, in events per second.
//!
//! `cargo bench --bench stream` replays N realistic 6.x indicator `create` events (about
//! 1.7 KB each) from the OpenCTI test double and prints, in the same run:
//! - baseline: the transport alone (`StreamClient`, events parsed and dropped);
//! - the stream reader: events mapped, batched and committed to the store with the
//!   position, timed until the store's position reaches the last event and a final flush
//!   made it durable. Since format 4 the indicator catalog is written where indicators are
//!   told to Threat Bus, not here (its cost on the drain side: `cargo bench --bench store`);
//! - the SSE parser alone, in memory: the project's own (`EventStream`) next to the
//!   `eventsource-stream` crate on the same chunks of the 6.x sample session
//!   (`tests/fixtures/opencti/stream-sample.txt`, repeated), the reason the parser is ours.
//!
//! `cargo bench --bench stream -- parsers` runs only the parser comparison.
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
    // `cargo bench --bench stream -- parsers`: only the in-memory parser comparison.
    if std::env::args().any(|a| a == "parsers") {
        runtime.block_on(parsers());
        return;
    }
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
    runtime.block_on(parsers());
}

/// The 6.x sample session after its `connected` event, repeated to `PARSER_EVENTS` events
/// and cut into `PARSER_CHUNK`-byte chunks, as a socket hands them over.
const SAMPLE: &str = include_str!("../tests/fixtures/opencti/stream-sample.txt");
const PARSER_EVENTS: usize = 200_000;
const PARSER_CHUNK: usize = 16 * 1024;

type Chunks = Vec<Result<Vec<u8>, std::io::Error>>;

fn sample_chunks() -> (Chunks, usize, usize) {
    let body = SAMPLE
        .split_once("\n\n")
        .map(|(_connected, rest)| rest)
        .expect("the sample starts with a connected event");
    let per_copy = body.matches("\nevent: ").count() + usize::from(body.starts_with("event: "));
    let copies = PARSER_EVENTS.div_ceil(per_copy);
    let bytes = body.repeat(copies).into_bytes();
    let chunks = bytes.chunks(PARSER_CHUNK).map(|c| Ok(c.to_vec())).collect();
    (chunks, copies * per_copy, bytes.len())
}

/// Events per second through each parser, best of 3 alternating rounds.
async fn parsers() {
    use eventsource_stream::Eventsource;
    let (mut ours_best, mut theirs_best) = (0.0_f64, 0.0_f64);
    let mut total = (0, 0);
    for _ in 0..3 {
        let (chunks, events, bytes) = sample_chunks();
        total = (events, bytes);
        let started = Instant::now();
        let mut stream = opencti_threatbus::opencti::EventStream::from_byte_stream(
            futures_util::stream::iter(chunks),
        );
        let mut n = 0;
        while let Some(Ok(_)) = stream.next().await {
            n += 1;
        }
        assert_eq!(n, events, "our parser saw every event");
        ours_best = ours_best.max(n as f64 / started.elapsed().as_secs_f64());

        let (chunks, events, _) = sample_chunks();
        let started = Instant::now();
        let mut stream = futures_util::stream::iter(chunks).eventsource();
        let mut n = 0;
        while let Some(Ok(_)) = stream.next().await {
            n += 1;
        }
        assert_eq!(n, events, "eventsource-stream saw every event");
        theirs_best = theirs_best.max(n as f64 / started.elapsed().as_secs_f64());
    }
    println!(
        "\nSSE parser alone, in memory: {} events ({} MB) of the 6.x sample in {} KiB chunks",
        total.0,
        total.1 / 1_000_000,
        PARSER_CHUNK / 1024
    );
    println!("{:<44} {:>12}", "", "events/s");
    println!(
        "{:<44} {:>12.0}",
        "this project's parser (EventStream)", ours_best
    );
    println!("{:<44} {:>12.0}", "eventsource-stream 0.2", theirs_best);
    println!("ours / eventsource-stream: {:.1}x", ours_best / theirs_best);
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

/// The stream reader from `start_id` to `last`, as the daemon runs it.
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
            // The daemon's default (bridge.flush_interval_ms).
            linger: Duration::from_millis(10),
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
