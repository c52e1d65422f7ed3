//! The connector state OpenCTI keeps for a stream connector, in pycti's shape
//! (`{"start_from": "<stream id>", "recover_until": "<ISO date>" | null}`), and what a
//! `pingConnector` answer says about it.
//!
//! pycti (`PingAlive.ping`, `pycti/connector/opencti_connector_helper.py`) sends its state
//! with every ping and takes the platform's answer whenever it differs from what it sent.
//! OpenCTI's `pingConnector` stores the state it is sent and answers it back, except right
//! after an operator reset the state on the connector's page (`resetStateConnector` sets it
//! to `''` and a reset flag; the next ping clears the flag, keeps `''` and answers it). So:
//!
//! - the answer equals what was sent: **unchanged** (our own echo);
//! - the answer is null or empty: **reset**: start over like a first start;
//! - anything else: **changed**: the stream reader decides whether it may resume there
//!   (never ahead of its own stored position: the store is the source of truth).
//!
//! The reader publishes its state on a `watch` channel ([`channel`]); the registration task
//! pings with it and hands what the answer asks for back through a second one.

use serde_json::{json, Value};
use tokio::sync::watch;

/// The state as the platform shows it: where the stream resumes and, while a replay is in
/// force, the date it replays up to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorState {
    pub start_from: String,
    pub recover_until: Option<String>,
}

impl ConnectorState {
    /// The JSON string sent as `pingConnector(state:)`. Both keys are always there, as in
    /// pycti; `recover_until` is null once the replay is over (pycti keeps the date forever
    /// and lets OpenCTI ignore it).
    pub fn to_json(&self) -> String {
        json!({ "start_from": self.start_from, "recover_until": self.recover_until }).to_string()
    }

    /// Reads a state the platform holds. pycti's older keys (`connectorLastEventId`,
    /// `connectorStartTime`) are read too, as pycti does; a `recover_until` of `false`,
    /// `no`, `none` (any case) or null means no replay, as in pycti's `ListenStream`.
    pub fn parse(text: &str) -> Result<ConnectorState, StateError> {
        let value: Value = serde_json::from_str(text).map_err(|e| StateError::NotJson {
            reason: e.to_string(),
        })?;
        Self::from_value(&value)
    }

    fn from_value(value: &Value) -> Result<ConnectorState, StateError> {
        let object = value.as_object().ok_or(StateError::NotAnObject)?;
        let start_from = object
            .get("connectorLastEventId")
            .or_else(|| object.get("start_from"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or(StateError::NoStartFrom)?
            .to_owned();
        let recover_until = match object
            .get("connectorStartTime")
            .or_else(|| object.get("recover_until"))
        {
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(Value::String(s))
                if s.is_empty()
                    || ["false", "no", "none"]
                        .iter()
                        .any(|n| s.eq_ignore_ascii_case(n)) =>
            {
                None
            }
            Some(Value::String(s)) => {
                crate::stix::Timestamp::parse(s)
                    .map_err(|_| StateError::BadRecoverDate { value: s.clone() })?;
                Some(s.clone())
            }
            Some(other) => {
                return Err(StateError::BadRecoverDate {
                    value: other.to_string(),
                })
            }
        };
        Ok(ConnectorState {
            start_from,
            recover_until,
        })
    }
}

/// Why a state from the platform cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("the connector state is not JSON: {reason}")]
    NotJson { reason: String },
    #[error("the connector state is not a JSON object")]
    NotAnObject,
    #[error("the connector state has no start_from")]
    NoStartFrom,
    #[error("the connector state's recover_until is not a date: {value}")]
    BadRecoverDate { value: String },
}

/// What a `pingConnector` answer means, compared with the state the ping sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PingVerdict {
    /// The platform answered what it was sent.
    Unchanged,
    /// The state was reset in OpenCTI (null or empty).
    Reset,
    /// The platform holds another state.
    Changed(ConnectorState),
    /// Another state, but one that cannot be used: logged and ignored.
    Unreadable(StateError),
}

/// Classifies the answer `answered` to a ping that sent `sent`.
pub fn classify(sent: &ConnectorState, answered: Option<&str>) -> PingVerdict {
    let Some(text) = answered.map(str::trim).filter(|t| !t.is_empty()) else {
        return PingVerdict::Reset;
    };
    // pycti sends `json.dumps(None)` after its own reset (`null`); pycti's `get_state`
    // reads an empty object as no state too.
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Null) => PingVerdict::Reset,
        Ok(Value::Object(object)) if object.is_empty() => PingVerdict::Reset,
        Ok(value) => match ConnectorState::from_value(&value) {
            Ok(state) if state == *sent => PingVerdict::Unchanged,
            Ok(state) => PingVerdict::Changed(state),
            Err(error) => PingVerdict::Unreadable(error),
        },
        Err(e) => PingVerdict::Unreadable(StateError::NotJson {
            reason: e.to_string(),
        }),
    }
}

/// What the registration task asks the stream reader to do after a ping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateRequest {
    /// Start over from the first-start position and recover date: a full replay.
    Reset,
    /// Resume from this state, unless it lies ahead of the stored position.
    Resume(ConnectorState),
}

/// The stream reader's end: publishes its state, receives requests.
pub struct ReaderSide {
    pub state: watch::Sender<ConnectorState>,
    pub requests: watch::Receiver<Option<StateRequest>>,
}

/// The registration task's end: reads the state to send, hands requests over.
pub struct PingSide {
    pub state: watch::Receiver<ConnectorState>,
    pub requests: watch::Sender<Option<StateRequest>>,
}

/// A connected pair; `initial` is what a ping sends until the reader publishes.
pub fn channel(initial: ConnectorState) -> (ReaderSide, PingSide) {
    let (state_tx, state_rx) = watch::channel(initial);
    let (requests_tx, requests_rx) = watch::channel(None);
    (
        ReaderSide {
            state: state_tx,
            requests: requests_rx,
        },
        PingSide {
            state: state_rx,
            requests: requests_tx,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(from: &str, until: Option<&str>) -> ConnectorState {
        ConnectorState {
            start_from: from.into(),
            recover_until: until.map(Into::into),
        }
    }

    #[test]
    fn the_state_is_sent_in_pyctis_shape() {
        let sent = state("1709287215731-0", Some("2024-03-01T10:00:00.000Z"));
        let value: Value = serde_json::from_str(&sent.to_json()).unwrap();
        assert_eq!(
            value,
            json!({"start_from": "1709287215731-0", "recover_until": "2024-03-01T10:00:00.000Z"})
        );
        let live = state("1709287215731-0", None);
        let value: Value = serde_json::from_str(&live.to_json()).unwrap();
        assert_eq!(
            value,
            json!({"start_from": "1709287215731-0", "recover_until": null})
        );
    }

    #[test]
    fn our_own_echo_is_unchanged_whatever_its_formatting() {
        let sent = state("1709287215731-0", Some("2024-03-01T10:00:00.000Z"));
        assert_eq!(
            classify(&sent, Some(&sent.to_json())),
            PingVerdict::Unchanged
        );
        let reformatted =
            r#"{ "recover_until" : "2024-03-01T10:00:00.000Z", "start_from": "1709287215731-0" }"#;
        assert_eq!(classify(&sent, Some(reformatted)), PingVerdict::Unchanged);
        let live = state("5-0", None);
        // pycti's way of saying "no recover" is the same as ours.
        assert_eq!(
            classify(
                &live,
                Some(r#"{"start_from": "5-0", "recover_until": "False"}"#)
            ),
            PingVerdict::Unchanged
        );
    }

    #[test]
    fn null_or_empty_means_reset() {
        let sent = state("1709287215731-0", None);
        for answer in [
            None,
            Some(""),
            Some("  "),
            Some("null"),
            Some("{}"),
            Some("{ }"),
        ] {
            assert_eq!(classify(&sent, answer), PingVerdict::Reset, "{answer:?}");
        }
    }

    #[test]
    fn another_state_is_a_change() {
        let sent = state("1709287215731-0", None);
        assert_eq!(
            classify(
                &sent,
                Some(r#"{"start_from": "1709287000000-0", "recover_until": null}"#)
            ),
            PingVerdict::Changed(state("1709287000000-0", None))
        );
        assert_eq!(
            classify(
                &sent,
                Some(
                    r#"{"start_from": "1709287215731-0", "recover_until": "2024-03-01T10:00:00Z"}"#
                )
            ),
            PingVerdict::Changed(state("1709287215731-0", Some("2024-03-01T10:00:00Z")))
        );
        // pycti's backward-compatible keys.
        assert_eq!(
            classify(
                &sent,
                Some(
                    r#"{"connectorLastEventId": "1-0", "connectorStartTime": "2024-03-01T10:00:00Z"}"#
                )
            ),
            PingVerdict::Changed(state("1-0", Some("2024-03-01T10:00:00Z")))
        );
    }

    #[test]
    fn an_unusable_state_is_reported_not_applied() {
        let sent = state("1-0", None);
        for (answer, error) in [
            ("not json", None),
            ("[1, 2]", Some(StateError::NotAnObject)),
            (r#"{"recover_until": null}"#, Some(StateError::NoStartFrom)),
            (
                r#"{"start_from": "1-0", "recover_until": "yesterday"}"#,
                Some(StateError::BadRecoverDate {
                    value: "yesterday".into(),
                }),
            ),
        ] {
            match classify(&sent, Some(answer)) {
                PingVerdict::Unreadable(found) => {
                    if let Some(error) = error {
                        assert_eq!(found, error, "{answer}");
                    }
                }
                other => panic!("{answer}: {other:?}"),
            }
        }
    }
}
