//! The Threat Bus side: the ZeroMQ app protocol of the `threatbus-zmq` plugin
//! (`threatbus/README.md` beside the spec; SPEC §3 "Threat Bus link").
//!
//! - [`manage`]: the management REQ/REP client (subscribe, heartbeat, unsubscribe).
//! - [`Link`]: the long-running link: subscription with heartbeats and re-subscription,
//!   an XPUB to publish indicators and a SUB receiving sightings and echoes, on std
//!   threads bridged to tokio by channels.
//!
//! The types both threads of the link share ([`Incoming`], [`LinkError`]) live here, so
//! that `io.rs` (the socket thread) and `link.rs` (the supervisor) depend on this module and
//! `link` on `io`, never the other way round.
mod io;
mod link;
pub mod manage;

pub use link::{Link, LinkConfig, LinkHandle, LinkState, Publisher};
pub use manage::{ManageClient, ManageError, Subscription};

/// One message from the link's subscription, by topic suffix, with its raw JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// `<p2p>indicator`: usually the echo of an indicator the bridge published itself.
    Indicator(String),
    /// `<p2p>sighting`.
    Sighting(String),
    /// `<p2p>snapshotrequest`: another app asked for a snapshot.
    SnapshotRequest(String),
    /// Any other suffix.
    Unknown { suffix: String, body: String },
}

/// Why a publish or the link's start failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The XPUB does not hold Threat Bus's subscription for these frames (not connected
    /// yet, re-subscribing, or Threat Bus went away): nothing was written.
    #[error("the Threat Bus link is not ready: nothing was published")]
    NotReady,
    /// The link was shut down (or its socket thread ended): nothing more can be published.
    #[error("the Threat Bus link is closed")]
    Closed,
    /// Writing a frame failed; frames before it in the batch may have been written.
    #[error("writing to Threat Bus failed: {0}")]
    Send(#[source] zmq::Error),
    /// The link's threads or wake-up socket could not be created.
    #[error("starting the Threat Bus link failed: {0}")]
    Start(#[source] std::io::Error),
}
