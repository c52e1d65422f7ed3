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
//! - [`stix`]: pure mapping of stream events to Threat Bus indicators, and of Threat Bus
//!   messages (sightings, echoes) back; STIX 2.1 checks and RFC 3339 timestamps.
pub mod config;
pub mod stix;
