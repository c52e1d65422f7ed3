//! The Threat Bus side: the ZeroMQ app protocol of the `threatbus-zmq` plugin
//! (`threatbus/README.md` beside the spec; SPEC §3 "Threat Bus link").
//!
//! - [`manage`]: the management REQ/REP client (subscribe, heartbeat, unsubscribe).
//! - [`Link`]: the long-running link: subscription with heartbeats and re-subscription,
//!   an XPUB to publish indicators and a SUB receiving sightings and echoes, on std
//!   threads bridged to tokio by channels.
mod io;
mod link;
pub mod manage;

pub use link::{Incoming, Link, LinkConfig, LinkError, LinkHandle, LinkState, Publisher};
pub use manage::{ManageClient, ManageError, Subscription};
