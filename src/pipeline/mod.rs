//! The tasks that move data, each between one source and one sink:
//!
//! - [`stream`]: OpenCTI stream → indicator outbox (with the resume position).
//! - [`to_opencti`]: sighting outbox → OpenCTI sighting relationships.
//! - [`to_bus`]: indicator outbox → Threat Bus, confirmed by echo.
//! - [`intake`]: Threat Bus subscription → sighting outbox (and echoes → `to_bus`).
//!
//! [`checkpoint`] holds the position rules and [`retry`] the backoff they share.
pub mod checkpoint;
pub mod intake;
pub mod retry;
pub mod stream;
pub mod to_bus;
pub mod to_opencti;
