//! The stream reader and the free-space watermark, in process: on a disk below
//! `bridge.min_free_mb` the reader does not even connect (a first burst could be the write
//! that fills the disk, which sled does not survive), and says why. (The pause and resume
//! on a real small filesystem are in `full_disk.rs`.)

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use opencti_threatbus::admin::Status;
use opencti_threatbus::metrics::Metrics;
use opencti_threatbus::pipeline::stream::StreamReader;
use opencti_threatbus::store::disk_space::DiskSpace;
use opencti_threatbus::store::{Queue, Store, StoreOptions};
use support::opencti::{Indicator, OpenCti};
use support::reader::{reader_config, stream_client, TOKEN};
use tokio::sync::watch;

#[tokio::test]
async fn a_disk_below_the_watermark_keeps_the_reader_from_connecting() {
    let double = OpenCti::start();
    double.require_token(TOKEN);
    for n in 0..10 {
        double.append_indicator_create(&Indicator::ipv4(&format!("10.0.0.{n}")));
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), &StoreOptions::default()).unwrap());
    let metrics = Arc::new(Metrics::default());
    let status = Arc::new(Status::default());
    let client = stream_client(&double);
    let config = reader_config(1_000);
    // More free space than any disk has: always below the watermark.
    let disk = Arc::new(DiskSpace::new(dir.path(), u64::MAX));
    let reader = StreamReader::new(
        client,
        Arc::clone(&store),
        config,
        Arc::clone(&status),
        Arc::clone(&metrics),
    )
    .unwrap()
    .with_disk_space(disk);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(async move { reader.run(stopped).await.unwrap() });
    let deadline = Instant::now() + Duration::from_secs(15);
    while !status
        .get("stream")
        .is_some_and(|s| s.starts_with("paused: disk nearly full ("))
    {
        assert!(
            Instant::now() < deadline,
            "status: {:?}",
            status.get("stream")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metrics.stream_paused_disk.get(), 1);
    assert_eq!(
        double.request_count(),
        0,
        "no connection while the disk is full"
    );
    assert_eq!(store.len(Queue::Indicators), 0);
    // It still stops at once when asked.
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the reader stops while paused")
        .unwrap();
}
