//! OpenCTI, the stream side: the live-stream transport (SSE over HTTP).
//!
//! [`stream`] opens one connection at a time and yields its events; what to do with them
//! (the stream position, dependency events, reconnecting with backoff, gap detection) is
//! the pipeline's job.
pub mod stream;

pub use stream::{
    compare_event_ids, parse_connected, Connected, EventId, EventStream, SseEvent, StreamClient,
    StreamConfig, StreamError,
};
