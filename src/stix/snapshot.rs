//! Threat Bus snapshots (`threatbus/README.md` §6): the requests other apps' subscriptions
//! cause, and the envelopes that answer them. Pure: no I/O, no clock.
//!
//! A request arrives as `<p2p>snapshotrequest {"type": "snapshotrequest", "snapshot_type":
//! 1, "snapshot_id": "<uuid>", "snapshot": <seconds>}` (`threatbus.data.SnapshotRequest`,
//! `snapshot` is `int(timedelta.total_seconds())`). Each answer is one frame
//! `threatbus/snapshotenvelope {"type": "snapshotenvelope", "snapshot_type": 1,
//! "snapshot_id": "<uuid>", "body": {<indicator>}}`; Threat Bus hands only the body to the
//! requester, as an ordinary indicator.

use serde_json::{Map, Value};

use super::X_THREATBUS_UPDATE;

/// Topic of snapshot answers; Threat Bus's inbound SUB subscribes to it.
pub const SNAPSHOT_ENVELOPE_TOPIC: &str = "threatbus/snapshotenvelope";

/// What a snapshot asks for (`threatbus.data.MessageType`, its `auto()` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// `1`: indicators; answered from the bridge's catalog.
    Indicators,
    /// `2`: sightings; OpenCTI, not the bridge, holds sighting history.
    Sightings,
}

impl SnapshotKind {
    fn wire(self) -> u64 {
        match self {
            SnapshotKind::Indicators => 1,
            SnapshotKind::Sightings => 2,
        }
    }
}

/// One snapshot request from Threat Bus.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRequest {
    pub kind: SnapshotKind,
    /// Identifies the request; every answer carries it back.
    pub snapshot_id: String,
    /// How far back the requester wants intelligence, in seconds.
    pub window_s: u64,
}

/// Why a `snapshotrequest` message cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotRequestError {
    /// The body is not a JSON object.
    #[error("not a JSON object: {0}")]
    NotAnObject(String),
    /// `type` is not `"snapshotrequest"`.
    #[error("type must be \"snapshotrequest\", found {0}")]
    WrongType(String),
    /// `snapshot_type` is not a known message type.
    #[error("snapshot_type must be 1 (indicators) or 2 (sightings), found {0}")]
    SnapshotType(String),
    /// `snapshot_id` is missing or empty.
    #[error("snapshot_id must be a non-empty string, found {0}")]
    SnapshotId(String),
    /// `snapshot` (the window in seconds) is missing or not a non-negative number.
    #[error("snapshot (seconds) must be a non-negative number, found {0}")]
    Window(String),
}

/// Parses the body of a `snapshotrequest` message.
pub fn parse_snapshot_request(json: &str) -> Result<SnapshotRequest, SnapshotRequestError> {
    let value: Value =
        serde_json::from_str(json).map_err(|e| SnapshotRequestError::NotAnObject(e.to_string()))?;
    let obj = value
        .as_object()
        .ok_or_else(|| SnapshotRequestError::NotAnObject(value.to_string()))?;
    let found = |key: &str| obj.get(key).map_or("nothing".to_owned(), Value::to_string);
    if obj.get("type").and_then(Value::as_str) != Some("snapshotrequest") {
        return Err(SnapshotRequestError::WrongType(found("type")));
    }
    let kind = match obj.get("snapshot_type").and_then(Value::as_u64) {
        Some(1) => SnapshotKind::Indicators,
        Some(2) => SnapshotKind::Sightings,
        _ => return Err(SnapshotRequestError::SnapshotType(found("snapshot_type"))),
    };
    let snapshot_id = match obj.get("snapshot_id").and_then(Value::as_str) {
        Some(id) if !id.trim().is_empty() => id.to_owned(),
        _ => return Err(SnapshotRequestError::SnapshotId(found("snapshot_id"))),
    };
    // An integer on the wire; a float is accepted (and truncated) all the same.
    let window_s = match obj.get("snapshot") {
        Some(Value::Number(n)) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f as u64)
        }),
        _ => None,
    }
    .ok_or_else(|| SnapshotRequestError::Window(found("snapshot")))?;
    Ok(SnapshotRequest {
        kind,
        snapshot_id,
        window_s,
    })
}

/// The frame answering `request` with one indicator: `body` is the indicator as it was
/// queued for Threat Bus; it goes out as a create (`x_threatbus_update` removed), since
/// for the requester every snapshot item is new. `None` if `body` is not a JSON object.
pub fn snapshot_envelope_frame(request: &SnapshotRequest, body: &[u8]) -> Option<String> {
    let mut indicator: Map<String, Value> = serde_json::from_slice(body).ok()?;
    indicator.remove(X_THREATBUS_UPDATE);
    let envelope = serde_json::json!({
        "type": "snapshotenvelope",
        "snapshot_type": request.kind.wire(),
        "snapshot_id": request.snapshot_id,
        "body": Value::Object(indicator),
    });
    Some(format!("{SNAPSHOT_ENVELOPE_TOPIC} {envelope}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_threat_bus_sends_parses() {
        let request = parse_snapshot_request(
            r#"{"type": "snapshotrequest", "snapshot_type": 1, "snapshot_id": "6da23ea2-2ca0-43ad-bcff-5c9a4e1cddde", "snapshot": 259200}"#,
        )
        .unwrap();
        assert_eq!(
            request,
            SnapshotRequest {
                kind: SnapshotKind::Indicators,
                snapshot_id: "6da23ea2-2ca0-43ad-bcff-5c9a4e1cddde".into(),
                window_s: 259_200,
            }
        );
        let sightings = parse_snapshot_request(
            r#"{"type": "snapshotrequest", "snapshot_type": 2, "snapshot_id": "x", "snapshot": 86400.0}"#,
        )
        .unwrap();
        assert_eq!(sightings.kind, SnapshotKind::Sightings);
        assert_eq!(sightings.window_s, 86_400);
    }

    #[test]
    fn unusable_requests_say_why() {
        for (body, expected) in [
            ("nope", "not a JSON object"),
            ("[1]", "not a JSON object"),
            (r#"{"type": "indicator"}"#, "type must be"),
            (
                r#"{"type": "snapshotrequest", "snapshot_type": 3, "snapshot_id": "a", "snapshot": 1}"#,
                "snapshot_type",
            ),
            (
                r#"{"type": "snapshotrequest", "snapshot_type": 1, "snapshot_id": "", "snapshot": 1}"#,
                "snapshot_id",
            ),
            (
                r#"{"type": "snapshotrequest", "snapshot_type": 1, "snapshot_id": "a", "snapshot": -5}"#,
                "snapshot (seconds)",
            ),
            (
                r#"{"type": "snapshotrequest", "snapshot_type": 1, "snapshot_id": "a"}"#,
                "snapshot (seconds)",
            ),
        ] {
            let err = parse_snapshot_request(body).unwrap_err().to_string();
            assert!(err.contains(expected), "{body}: {err}");
        }
    }

    #[test]
    fn answers_are_creates_wrapped_in_an_envelope() {
        let request = SnapshotRequest {
            kind: SnapshotKind::Indicators,
            snapshot_id: "abc".into(),
            window_s: 10,
        };
        let body = br#"{"type":"indicator","id":"indicator--1","x_threatbus_update":"EDIT"}"#;
        let frame = snapshot_envelope_frame(&request, body).unwrap();
        let (topic, json) = frame.split_once(' ').unwrap();
        assert_eq!(topic, "threatbus/snapshotenvelope");
        let envelope: Value = serde_json::from_str(json).unwrap();
        assert_eq!(envelope["type"], "snapshotenvelope");
        assert_eq!(envelope["snapshot_type"], 1);
        assert_eq!(envelope["snapshot_id"], "abc");
        assert_eq!(envelope["body"]["id"], "indicator--1");
        assert!(envelope["body"].get("x_threatbus_update").is_none());
        assert_eq!(snapshot_envelope_frame(&request, b"[]"), None);
    }
}
