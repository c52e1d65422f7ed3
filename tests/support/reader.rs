//! The stream reader as the in-process tests run it: its configuration with short retry
//! delays, and a client for the OpenCTI double's live stream `live`.

use std::time::Duration;

use opencti_threatbus::config::Secret;
use opencti_threatbus::opencti::{StreamClient, StreamConfig};
use opencti_threatbus::pipeline::stream::ReaderConfig;
use opencti_threatbus::retry::RetryPolicy;

use super::opencti::OpenCti;

/// The token the in-process reader tests present to the double.
pub const TOKEN: &str = "t0ken-for-the-double";

/// A reader on a live stream with an indicator outbox of `limit`, retrying quickly.
pub fn reader_config(limit: u64) -> ReaderConfig {
    ReaderConfig {
        forward_all_iocs: false,
        indicator_limit: limit,
        stream_timeout: Duration::from_secs(30),
        live: true,
        first_start_from: "0-0".into(),
        first_start_recover: None,
        retry: RetryPolicy {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            multiplier: 2.0,
        },
        auth_retry: Duration::from_millis(400),
        // As the daemon: bridge.flush_interval_ms.
        linger: Duration::from_millis(10),
    }
}

/// A client of `double`'s live stream `live`, with [`TOKEN`].
pub fn stream_client(double: &OpenCti) -> StreamClient {
    StreamClient::new(&StreamConfig {
        base_url: double.base_url(),
        token: Secret::new(TOKEN),
        live_stream_id: Some("live".into()),
        listen_delete: true,
        no_dependencies: true,
        with_inferences: false,
        ssl_verify: true,
    })
    .expect("a stream client")
}
