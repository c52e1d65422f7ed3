//! What the store keeps, and how it is laid out in sled.
//!
//! Everything lives in one sled tree, whose log sled recovers as a prefix after a crash.
//! A commit (items + stream position, conditions + their `REMOVE`s) is plain inserts in
//! an order that makes every prefix safe (see `Store::commit_locked`); a move to the dead
//! letters and a requeue, rare, are single `apply_batch`es, recovered all-or-nothing.
//! Keys start with a one-byte tag; queue and dead-letter
//! keys continue with a big-endian `u64` sequence number, so key order is arrival order.

use serde::{Deserialize, Serialize};

/// Tag of metadata keys (format version, stream position, cached ids).
pub(crate) const TAG_META: u8 = 0x00;
/// Tag of dead letters.
pub(crate) const TAG_DEAD: u8 = 0x03;
/// Tag of the indicator catalog (format 2): `0x04` + the STIX id.
pub(crate) const TAG_CATALOG: u8 = 0x04;
/// Tag of the conditions of reconciliation `REMOVE`s (format 4): `0x06` + the sequence
/// number of the `REMOVE` in the indicator queue.
pub(crate) const TAG_CONDITION: u8 = 0x06;

pub(crate) const META_FORMAT_VERSION: &[u8] = b"\x00format_version";
pub(crate) const META_STREAM_POSITION: &[u8] = b"\x00stream_position";

/// One of the outboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")] // for JSON; bincode stores the variant index
pub enum Queue {
    /// OpenCTI → Threat Bus: indicators in stream order.
    Indicators,
    /// Threat Bus → OpenCTI: sightings, delivered concurrently.
    Sightings,
    /// Threat Bus → OpenCTI: indicators other apps published (format 3), created or
    /// patched in OpenCTI one at a time.
    Imports,
}

impl Queue {
    pub const ALL: [Queue; 3] = [Queue::Indicators, Queue::Sightings, Queue::Imports];

    pub(crate) fn tag(self) -> u8 {
        match self {
            Queue::Indicators => 0x01,
            Queue::Sightings => 0x02,
            // 0x03 is the dead letters, 0x04 the catalog, 0x06 removal conditions.
            Queue::Imports => 0x05,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Queue::Indicators => "indicators",
            Queue::Sightings => "sightings",
            Queue::Imports => "imports",
        }
    }

    pub fn parse(name: &str) -> Option<Queue> {
        match name {
            "indicators" => Some(Queue::Indicators),
            "sightings" => Some(Queue::Sightings),
            "imports" => Some(Queue::Imports),
            _ => None,
        }
    }
}

impl std::fmt::Display for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The record around every queued payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// When the bridge received the item (ms since the Unix epoch).
    pub received_at_ms: u64,
    /// Failed delivery attempts so far.
    pub attempts: u32,
    /// Not to be tried before this instant (ms since the Unix epoch); 0 = at once.
    pub next_attempt_ms: u64,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
    /// The original JSON, byte for byte.
    pub payload: Vec<u8>,
}

impl Envelope {
    pub fn new(payload: Vec<u8>, received_at_ms: u64) -> Self {
        Envelope {
            received_at_ms,
            attempts: 0,
            next_attempt_ms: 0,
            last_error: None,
            payload,
        }
    }
}

/// An item that can never be delivered, parked with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The queue it came from, and goes back to on requeue.
    pub queue: Queue,
    /// Its key in that queue, or `None` when it was parked on arrival.
    pub original_key: Option<u64>,
    /// When it was parked (ms since the Unix epoch).
    pub dead_at_ms: u64,
    /// Why it was parked, in words an operator can act on.
    pub reason: String,
    pub envelope: Envelope,
}

/// A queued item as the drainers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub key: u64,
    pub envelope: Envelope,
}

/// A dead letter with its key in the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadItem {
    pub key: u64,
    pub letter: DeadLetter,
}

pub(crate) fn item_key(tag: u8, seq: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = tag;
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// The sequence number of a 9-byte item key, or `None` for any other shape.
pub(crate) fn key_seq(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(1..9)?.try_into().ok()?;
    (key.len() == 9).then(|| u64::from_be_bytes(bytes))
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, bincode::Error> {
    bincode::serialize(value)
}

pub(crate) fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, bincode::Error> {
    bincode::deserialize(bytes)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
