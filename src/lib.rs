//! opencti-threatbus: a restart-safe, at-least-once bridge between OpenCTI and Threat Bus.
//!
//! Data flows in two directions through one durable store:
//!
//! ```text
//!  OpenCTI /stream (SSE) ─► pipeline::stream ─► store: indicators ─► pipeline::to_bus ─────► Threat Bus
//!  Threat Bus (ZeroMQ)   ─► pipeline::intake ─► store: sightings  ─► pipeline::to_opencti ─► OpenCTI GraphQL
//! ```
//!
//! - [`config`]: the YAML file plus environment overrides, validated before anything starts.
//! - [`store`]: the sled outbox: queues, dead letters, stream position, group commit.
//! - [`retry`]: the backoff policy every retry loop shares (pipelines, registration, link).
//! - [`opencti`]: the live-stream transport (SSE): one connection, its events, nothing more;
//!   the GraphQL client, registration and the connector state pings carry (reset → replay).
//! - [`stix`]: pure mapping of stream events to indicators, and validation of sightings.
//! - [`threatbus`]: the Threat Bus link (ZeroMQ): subscription, heartbeats, publish, receive.
//! - [`daemon`]: the `run` command: wires the store, the admin socket and the pipelines.
//! - [`admin`]: the Unix socket through which the maintenance commands reach the daemon.
//! - [`inspect`]: the `inspect-queue` report, and [`maintenance`]: the other commands.
//! - [`logging`]: log level and format from the configuration; [`metrics`]: Prometheus counters.
pub mod admin;
pub mod config;
pub mod daemon;
pub mod inspect;
pub mod logging;
pub mod maintenance;
pub mod metrics;
pub mod opencti;
pub mod pipeline;
pub mod retry;
pub mod stix;
pub mod store;
pub mod threatbus;
