//! OpenCTI: the live-stream transport (SSE over HTTP) and the GraphQL API client.
//!
//! [`stream`] opens one connection at a time and yields its events; what to do with them
//! (the stream position, dependency events, reconnecting with backoff, gap detection) is
//! the pipeline's job. [`graphql`] sends the few documents the bridge needs and classifies
//! every failure as retryable, permanent or an authentication problem; [`registration`]
//! keeps the connector listed in OpenCTI and carries its [`connector_state`] (the stream
//! position, in pycti's shape) with every ping; [`indicator_lookup`] asks about many
//! indicators in one request (gap reconciliation); [`indicator_import`] creates or patches
//! indicators other Threat Bus apps publish.
pub mod connector_state;
pub mod graphql;
pub mod indicator_import;
pub mod indicator_lookup;
pub mod registration;
pub mod stream;

pub use stream::{
    compare_event_ids, parse_connected, Connected, EventId, EventStream, SseEvent, StreamClient,
    StreamConfig, StreamError,
};
