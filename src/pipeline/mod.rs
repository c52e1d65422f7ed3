//! The tasks that move data, each between one source and one sink:
//!
//! - [`stream`]: OpenCTI stream → indicator outbox (with the resume position).
//! - [`to_opencti`]: sighting outbox → OpenCTI sighting relationships.
//! - [`to_bus`]: indicator outbox → Threat Bus, confirmed by echo.
//! - [`intake`]: Threat Bus subscription → sighting and import outboxes (and echoes →
//!   `to_bus`, snapshot requests → `snapshot`).
//! - [`import`]: import outbox → indicators created or patched in OpenCTI.
//! - [`snapshot`]: Threat Bus snapshot requests → answers from the indicator catalog.
//! - [`reconcile`]: after a replay (or on request), active catalog indicators OpenCTI no
//!   longer has → `REMOVE`s in the indicator outbox.
//!
//! [`checkpoint`] holds the position rules, `refusal` what the two drainers towards
//! OpenCTI do with an item it refused, [`outage`] when an unreachable peer is worth a log
//! line; the backoff they share is [`crate::retry`].
pub mod checkpoint;
pub mod import;
pub mod intake;
pub mod outage;
pub mod reconcile;
mod refusal;
pub mod snapshot;
pub mod stream;
pub mod to_bus;
pub mod to_opencti;
