//! opencti-threatbus: a restart-safe, at-least-once bridge between OpenCTI and Threat Bus.
//!
//! Data flows in two directions through one durable store:
//!
//! ```text
//!  OpenCTI /stream (SSE) ──► pipeline::stream ──► store (indicators) ──► pipeline::to_bus ──► Threat Bus
//!  Threat Bus (ZeroMQ)   ──► pipeline::intake ──► store (sightings)  ──► pipeline::to_opencti ──► OpenCTI GraphQL
//! ```
//!
//! - [`config`]: the YAML file plus environment overrides, validated before anything starts.
//! - [`store`]: the sled outbox: queues, dead letters, stream position, group commit.
pub mod admin;
pub mod config;
pub mod daemon;
pub mod inspect;
pub mod logging;
pub mod maintenance;
pub mod store;
