//! Threat Bus sightings (from Zeek, VAST, Suricata, …) on their way to OpenCTI.
//!
//! Threat Bus has already parsed them with the `stix2` library, but the bridge checks
//! again what OpenCTI needs, so that a bad item is dead-lettered with a precise reason
//! instead of failing at the API over and over.

use serde_json::{Map, Value};

use super::timestamp::{Timestamp, TimestampError};
use super::{check_stix_id, get_present, IdError};

/// STIX 2.1 caps `count` at this value.
pub const MAX_SIGHTING_COUNT: u64 = 999_999_999;

/// The parts of a STIX 2.1 Sighting the bridge forwards to OpenCTI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    /// `sighting--<uuid>`: becomes the relationship's `stix_id`, so that re-delivery
    /// upserts the same relationship instead of adding another.
    pub id: String,
    /// The sighted object, `<type>--<uuid>` (normally an indicator).
    pub sighting_of_ref: String,
    pub first_seen: Option<Timestamp>,
    pub last_seen: Option<Timestamp>,
    /// `count` when present (0..=999 999 999).
    pub count: Option<u32>,
    /// `x_threatbus_source` (e.g. `"VAST"`), for logs.
    pub source: Option<String>,
}

impl Sighting {
    /// OpenCTI's `attribute_count`: `count`, or 1 when the sighting has none.
    pub fn attribute_count(&self) -> u32 {
        self.count.unwrap_or(1)
    }
}

/// Why a Threat Bus message is not a usable STIX 2.1 sighting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SightingError {
    /// The payload is not JSON at all.
    #[error("sighting is not valid JSON: {0}")]
    Json(String),
    /// The payload is JSON but not an object.
    #[error("sighting is not a JSON object")]
    NotAnObject,
    /// `type` is missing or is not `"sighting"`.
    #[error("type must be \"sighting\", found {found}")]
    WrongType { found: String },
    /// `spec_version` is missing (STIX 2.0) or not `"2.1"`.
    #[error("spec_version must be \"2.1\", found {found}")]
    SpecVersion { found: String },
    /// `id` is missing or not `sighting--<uuid>`.
    #[error("id: {0}")]
    Id(IdError),
    /// `sighting_of_ref` is missing: there is nothing to attach the sighting to.
    #[error("sighting_of_ref is missing")]
    MissingSightingOfRef,
    /// `sighting_of_ref` is not a `<type>--<uuid>` identifier.
    #[error("sighting_of_ref: {0}")]
    SightingOfRef(IdError),
    /// `first_seen` or `last_seen` is not an RFC 3339 timestamp.
    #[error("{field} {value:?}: {error}")]
    Timestamp {
        field: &'static str,
        value: String,
        error: TimestampError,
    },
    /// `last_seen` is earlier than `first_seen` (STIX requires `last_seen >= first_seen`).
    #[error("last_seen {last_seen} is before first_seen {first_seen}")]
    LastSeenBeforeFirstSeen {
        first_seen: Timestamp,
        last_seen: Timestamp,
    },
    /// `count` is not an integer in 0..=999 999 999.
    #[error("count must be an integer in 0..=999999999, found {found}")]
    Count { found: String },
}

/// Parses and checks one sighting payload (the JSON after the topic in a Threat Bus frame).
pub fn parse_sighting(json: &str) -> Result<Sighting, SightingError> {
    let value: Value =
        serde_json::from_str(json).map_err(|e| SightingError::Json(e.to_string()))?;
    sighting_from_value(&value)
}

/// Like [`parse_sighting`] for an already parsed payload.
pub fn sighting_from_value(value: &Value) -> Result<Sighting, SightingError> {
    let obj = value.as_object().ok_or(SightingError::NotAnObject)?;
    match obj.get("type") {
        Some(Value::String(t)) if t == "sighting" => {}
        other => {
            return Err(SightingError::WrongType {
                found: describe(other),
            })
        }
    }
    match obj.get("spec_version") {
        Some(Value::String(v)) if v == "2.1" => {}
        other => {
            return Err(SightingError::SpecVersion {
                found: describe(other),
            })
        }
    }
    let id = check_stix_id(obj.get("id"), Some("sighting")).map_err(SightingError::Id)?;
    let sighting_of_ref = match get_present(obj, "sighting_of_ref") {
        None => return Err(SightingError::MissingSightingOfRef),
        reference => check_stix_id(reference, None).map_err(SightingError::SightingOfRef)?,
    };
    let first_seen = timestamp_field(obj, "first_seen")?;
    let last_seen = timestamp_field(obj, "last_seen")?;
    if let (Some(first_seen), Some(last_seen)) = (first_seen, last_seen) {
        if last_seen < first_seen {
            return Err(SightingError::LastSeenBeforeFirstSeen {
                first_seen,
                last_seen,
            });
        }
    }
    Ok(Sighting {
        id: id.to_owned(),
        sighting_of_ref: sighting_of_ref.to_owned(),
        first_seen,
        last_seen,
        count: count(obj)?,
        source: obj
            .get("x_threatbus_source")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

/// `first_seen` and `last_seen` for OpenCTI, in UTC with `Z` and millisecond precision.
/// Each falls back to the other, then to `received_at` (when the bridge got it), because
/// OpenCTI wants both and live matches often carry only `last_seen`.
pub fn sighting_times_utc(sighting: &Sighting, received_at: Timestamp) -> (String, String) {
    let first = sighting
        .first_seen
        .or(sighting.last_seen)
        .unwrap_or(received_at);
    let last = sighting
        .last_seen
        .or(sighting.first_seen)
        .unwrap_or(received_at);
    (first.to_rfc3339_millis(), last.to_rfc3339_millis())
}

fn timestamp_field(
    obj: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<Timestamp>, SightingError> {
    let Some(value) = get_present(obj, field) else {
        return Ok(None);
    };
    let text = value.as_str().ok_or_else(|| SightingError::Timestamp {
        field,
        value: value.to_string(),
        error: TimestampError::Syntax("not a string"),
    })?;
    Timestamp::parse(text)
        .map(Some)
        .map_err(|error| SightingError::Timestamp {
            field,
            value: text.to_owned(),
            error,
        })
}

fn count(obj: &Map<String, Value>) -> Result<Option<u32>, SightingError> {
    let Some(value) = get_present(obj, "count") else {
        return Ok(None);
    };
    value
        .as_u64()
        .filter(|n| *n <= MAX_SIGHTING_COUNT)
        .and_then(|n| u32::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| SightingError::Count {
            found: value.to_string(),
        })
}

fn describe(value: Option<&Value>) -> String {
    value.map_or_else(|| "nothing".to_owned(), Value::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The exact frame from threatbus/README.md §5, minus the topic.
    const README_SIGHTING: &str = r#"{"type": "sighting", "spec_version": "2.1", "id": "sighting--65184b15-a91d-4ee2-b023-efd239ddb72b", "created": "2024-01-02T03:05:00Z", "modified": "2024-01-02T03:05:00Z", "last_seen": "2024-01-02T03:05:00Z", "sighting_of_ref": "indicator--3d63fc4d-ba50-4892-be4d-f3a44fdc4461", "x_threatbus_sighting_context": {"ts": "2024-01-02T03:05:00Z", "uid": "C1"}, "x_threatbus_source": "VAST"}"#;

    fn base() -> Value {
        match serde_json::from_str(README_SIGHTING) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }

    fn with(changes: &[(&str, Value)]) -> Value {
        let mut v = base();
        for (key, value) in changes {
            v[*key] = value.clone();
        }
        v
    }

    fn without(key: &str) -> Value {
        let mut v = base();
        if let Some(map) = v.as_object_mut() {
            map.remove(key);
        }
        v
    }

    fn ts(text: &str) -> Timestamp {
        Timestamp::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn readme_frame_parses() {
        let s = parse_sighting(README_SIGHTING).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.id, "sighting--65184b15-a91d-4ee2-b023-efd239ddb72b");
        assert_eq!(
            s.sighting_of_ref,
            "indicator--3d63fc4d-ba50-4892-be4d-f3a44fdc4461"
        );
        assert_eq!(s.first_seen, None);
        assert_eq!(s.last_seen, Some(ts("2024-01-02T03:05:00Z")));
        assert_eq!(s.count, None);
        assert_eq!(s.attribute_count(), 1);
        assert_eq!(s.source.as_deref(), Some("VAST"));
        // first_seen falls back to last_seen.
        let received = ts("2030-01-01T00:00:00Z");
        assert_eq!(
            sighting_times_utc(&s, received),
            (
                "2024-01-02T03:05:00.000Z".to_owned(),
                "2024-01-02T03:05:00.000Z".to_owned()
            )
        );
    }

    #[test]
    fn missing_sighting_of_ref() {
        assert_eq!(
            sighting_from_value(&without("sighting_of_ref")),
            Err(SightingError::MissingSightingOfRef)
        );
        assert_eq!(
            sighting_from_value(&with(&[("sighting_of_ref", Value::Null)])),
            Err(SightingError::MissingSightingOfRef)
        );
        assert!(matches!(
            sighting_from_value(&with(&[("sighting_of_ref", json!("indicator--nope"))])),
            Err(SightingError::SightingOfRef(_))
        ));
        assert!(matches!(
            sighting_from_value(&with(&[("sighting_of_ref", json!(42))])),
            Err(SightingError::SightingOfRef(IdError::NotAString))
        ));
    }

    #[test]
    fn spec_version_must_be_2_1() {
        assert_eq!(
            sighting_from_value(&with(&[("spec_version", json!("2.0"))])),
            Err(SightingError::SpecVersion {
                found: "\"2.0\"".to_owned()
            })
        );
        assert_eq!(
            sighting_from_value(&without("spec_version")),
            Err(SightingError::SpecVersion {
                found: "nothing".to_owned()
            })
        );
    }

    #[test]
    fn type_and_id() {
        assert!(matches!(
            sighting_from_value(&with(&[("type", json!("indicator"))])),
            Err(SightingError::WrongType { .. })
        ));
        assert!(matches!(
            sighting_from_value(&with(&[(
                "id",
                json!("indicator--65184b15-a91d-4ee2-b023-efd239ddb72b")
            )])),
            Err(SightingError::Id(IdError::WrongType { .. }))
        ));
        assert!(matches!(
            sighting_from_value(&without("id")),
            Err(SightingError::Id(IdError::Missing))
        ));
        assert_eq!(
            sighting_from_value(&json!([1])),
            Err(SightingError::NotAnObject)
        );
        assert!(matches!(parse_sighting("{"), Err(SightingError::Json(_))));
    }

    #[test]
    fn last_seen_before_first_seen() {
        let v = with(&[
            ("first_seen", json!("2024-01-02T03:05:00Z")),
            ("last_seen", json!("2024-01-02T03:04:59.999Z")),
        ]);
        assert_eq!(
            sighting_from_value(&v),
            Err(SightingError::LastSeenBeforeFirstSeen {
                first_seen: ts("2024-01-02T03:05:00Z"),
                last_seen: ts("2024-01-02T03:04:59.999Z"),
            })
        );
        // Equal is fine; so is an offset that makes the order right in UTC.
        let equal = with(&[("first_seen", json!("2024-01-02T03:05:00Z"))]);
        assert!(sighting_from_value(&equal).is_ok());
        let offset = with(&[
            ("first_seen", json!("2024-01-02T04:04:00+01:00")),
            ("last_seen", json!("2024-01-02T03:05:00Z")),
        ]);
        assert!(sighting_from_value(&offset).is_ok());
    }

    #[test]
    fn offsets_are_converted_to_utc() {
        let v = with(&[
            ("first_seen", json!("2024-01-02T05:05:00.5+02:00")),
            ("last_seen", json!("2024-01-01T23:10:00-04:00")),
        ]);
        let s = sighting_from_value(&v).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            sighting_times_utc(&s, ts("2030-01-01T00:00:00Z")),
            (
                "2024-01-02T03:05:00.500Z".to_owned(),
                "2024-01-02T03:10:00.000Z".to_owned()
            )
        );
    }

    #[test]
    fn times_fall_back_to_receipt() {
        let mut v = without("last_seen");
        v["first_seen"] = json!("2024-01-02T03:00:00Z");
        let s = sighting_from_value(&v).unwrap_or_else(|e| panic!("{e}"));
        let received = ts("2030-01-01T00:00:00Z");
        assert_eq!(
            sighting_times_utc(&s, received).1,
            "2024-01-02T03:00:00.000Z"
        );

        let s = sighting_from_value(&without("last_seen")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            sighting_times_utc(&s, ts("2024-05-06T07:08:09.123456Z")),
            (
                "2024-05-06T07:08:09.123Z".to_owned(),
                "2024-05-06T07:08:09.123Z".to_owned()
            )
        );
    }

    #[test]
    fn bad_timestamps() {
        for bad in [json!("yesterday"), json!(17), json!("2024-01-02T03:05:00")] {
            assert!(matches!(
                sighting_from_value(&with(&[("last_seen", bad.clone())])),
                Err(SightingError::Timestamp {
                    field: "last_seen",
                    ..
                })
            ));
        }
    }

    #[test]
    fn count_limits() {
        let ok = |n: Value| sighting_from_value(&with(&[("count", n)])).map(|s| s.count);
        assert_eq!(ok(json!(0)), Ok(Some(0)));
        assert_eq!(ok(json!(7)), Ok(Some(7)));
        assert_eq!(ok(json!(999_999_999)), Ok(Some(999_999_999)));
        for bad in [json!(1_000_000_000), json!(-1), json!(1.5), json!("3")] {
            assert!(matches!(ok(bad), Err(SightingError::Count { .. })));
        }
        let s =
            sighting_from_value(&with(&[("count", json!(12))])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.attribute_count(), 12);
    }
}
