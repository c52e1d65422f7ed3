//! Indicators from other Threat Bus apps → OpenCTI: the pure part (no I/O, no clock).
//!
//! Two steps, each a plain function the import drainer calls:
//!
//! 1. [`ImportIndicator::from_stix`]: a STIX 2.1 indicator received on `stix2/indicator`
//!    becomes the typed input OpenCTI needs, or an [`ImportError`] (a dead letter with
//!    its reason). Threat Bus's own checks ([`validate_indicator`]) come first.
//! 2. [`plan_import`]: given what OpenCTI holds for that STIX id now (the fields of the
//!    import lookup document, as JSON, or nothing), decide between creating it, patching
//!    only the fields that changed, or writing nothing ([`ImportPlan`]).
//!
//! This follows the original Python connector (`_handle_indicator` in the OpenCTI
//! connectors repository, `stream/threatbus/src/connector.py`): look the indicator up
//! by its STIX id, write only when it adds something, ignore `REMOVE`. Where it differs,
//! it is stricter about "adds something" (the original compared OpenCTI's GraphQL shape
//! with the STIX one, so labels or timestamp spellings alone caused a write each time).
//!
//! ## When something is written (the diff rules)
//!
//! - **`REMOVE` is ignored** ([`NoWrite::Remove`]), as the original did: another app
//!   saying it stopped matching an indicator is no reason to delete or revoke
//!   intelligence in OpenCTI. For the same reason an incoming `revoked: true` is ignored
//!   ([`NoWrite::Revoked`]).
//! - **Unknown to OpenCTI → create** it with its STIX id (`stix_id`), `created` and
//!   `modified` kept, so that the same version arriving again finds it and writes nothing.
//! - **Known → only a newer `modified` can write.** Equal or older ([`NoWrite::NotNewer`])
//!   is the same version again (a re-delivery, an echo relayed by another app) or one
//!   OpenCTI has since superseded: never written. Compared in milliseconds, the precision
//!   OpenCTI stores, so `.123456Z` vs `.123Z` is the same version.
//! - **Newer → patch only the fields that differ** ([`diff_indicator`]): `name` (only when
//!   the app set one: a name derived from the pattern never overwrites), `description`,
//!   `pattern` and `pattern_type` (the same STIX id with a new pattern: OpenCTI then
//!   derives a new standard id and keeps the old one among its STIX ids), `valid_from`,
//!   `valid_until`, `confidence`. Timestamps are compared as instants (milliseconds),
//!   never as text. **An absent (or null, or empty) incoming field never overwrites**
//!   what OpenCTI holds. Nothing differs → [`NoWrite::NothingNew`]: no empty update ever
//!   reaches OpenCTI's stream.
//! - **Labels are read but not written**: OpenCTI resolves `objectLabel` values only to
//!   labels that already exist and refuses the whole write otherwise
//!   (`MISSING_REFERENCE_ERROR`), which would dead-letter an indicator for a label.
//!   Writing them needs `labelAdd` first (later work). The original did not write them
//!   either (it passed `labels` where pycti expects `objectLabel`).
//! - `modified` is not patched: OpenCTI stamps its own on every update, which is newer
//!   than the imported version, so the next copy of that version writes nothing.

use serde_json::{Map, Value};

use super::{get_present, validate_indicator, IndicatorError, Operation, Timestamp};

/// OpenCTI's `name` needs at least two characters (`minLength: 2`, `not-blank`).
const MIN_NAME_CHARS: usize = 2;

/// What OpenCTI calls the observable when it cannot tell (and what the original sent).
pub const UNKNOWN_OBSERVABLE_TYPE: &str = "Unknown";

/// A Threat Bus indicator as OpenCTI's `indicatorAdd` wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportIndicator {
    /// The STIX id (`indicator--…`): `stix_id` on create, the lookup key, kept by OpenCTI.
    pub stix_id: String,
    /// The app's `name`, or else the pattern (readable in OpenCTI's lists, where the
    /// original's fallback, the STIX id, was not).
    pub name: String,
    /// The app set `name` itself (only then may it overwrite OpenCTI's).
    pub name_given: bool,
    pub pattern: String,
    pub pattern_type: String,
    pub pattern_version: Option<String>,
    pub description: Option<String>,
    pub valid_from: Option<Timestamp>,
    pub valid_until: Option<Timestamp>,
    /// STIX `labels` (not written yet, see the module documentation).
    pub labels: Vec<String>,
    /// 0–100.
    pub confidence: Option<u8>,
    pub created: Option<Timestamp>,
    /// Required by [`validate_indicator`]: the version, compared with OpenCTI's.
    pub modified: Timestamp,
    /// `revoked: true` from the app (ignored, see [`NoWrite::Revoked`]).
    pub revoked: bool,
    /// `x_threatbus_update`: create, EDIT or REMOVE.
    pub operation: Operation,
    /// `x_opencti_main_observable_type` for create: derived from a `stix` pattern's first
    /// object type when it is a well-known one, else [`UNKNOWN_OBSERVABLE_TYPE`].
    pub main_observable_type: String,
}

/// Why a Threat Bus indicator cannot be imported (dead-lettered with this reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// It fails the checks Threat Bus applies to indicators ([`validate_indicator`]).
    #[error("{0}")]
    Indicator(#[from] IndicatorError),
    /// `x_threatbus_update` is neither absent, `EDIT` nor `REMOVE`.
    #[error("x_threatbus_update {found} is not one Threat Bus defines (EDIT, REMOVE)")]
    UnknownUpdate { found: String },
    /// A property that must be a string (`name`, `description`, …) is something else.
    #[error("{field} must be a string, found {found}")]
    NotAString { field: &'static str, found: String },
    /// `labels` is not a list of strings.
    #[error("labels must be a list of strings, found {found}")]
    Labels { found: String },
    /// `confidence` is not an integer from 0 to 100.
    #[error("confidence must be an integer from 0 to 100, found {found}")]
    Confidence { found: String },
    /// `revoked` is not a boolean.
    #[error("revoked must be a boolean, found {found}")]
    Revoked { found: String },
}

impl ImportIndicator {
    /// Reads an indicator received from Threat Bus (already known to be `type:
    /// indicator`). Never panics, whatever the input.
    pub fn from_stix(indicator: &Value) -> Result<ImportIndicator, ImportError> {
        validate_indicator(indicator)?;
        // validate_indicator checked it is an object with these present.
        let Some(obj) = indicator.as_object() else {
            return Err(IndicatorError::NotAnObject.into());
        };
        let operation = Operation::from_threatbus_update(obj.get(super::X_THREATBUS_UPDATE))
            .ok_or_else(|| ImportError::UnknownUpdate {
                found: obj
                    .get(super::X_THREATBUS_UPDATE)
                    .map_or_else(String::new, Value::to_string),
            })?;
        let text = |field: &'static str| optional_text(obj, field);
        let stix_id = text("id")?.unwrap_or_default();
        let pattern = text("pattern")?.unwrap_or_default();
        let pattern_type = text("pattern_type")?.unwrap_or_default();
        let given_name = text("name")?.filter(|n| n.trim().chars().count() >= MIN_NAME_CHARS);
        let name_given = given_name.is_some();
        let name = given_name.unwrap_or_else(|| pattern.clone());
        let timestamp = |field: &str| {
            get_present(obj, field)
                .and_then(Value::as_str)
                .and_then(|t| Timestamp::parse(t).ok())
        };
        let Some(modified) = timestamp("modified") else {
            // validate_indicator requires it; kept as an error, not a panic.
            return Err(IndicatorError::Missing { field: "modified" }.into());
        };
        let main_observable_type = if pattern_type == "stix" {
            main_observable_type(&pattern)
        } else {
            UNKNOWN_OBSERVABLE_TYPE
        };
        Ok(ImportIndicator {
            stix_id,
            name,
            name_given,
            pattern_version: text("pattern_version")?,
            description: text("description")?,
            valid_from: timestamp("valid_from"),
            valid_until: timestamp("valid_until"),
            labels: labels(obj)?,
            confidence: confidence(obj)?,
            created: timestamp("created"),
            modified,
            revoked: revoked(obj)?,
            operation,
            main_observable_type: main_observable_type.to_owned(),
            pattern,
            pattern_type,
        })
    }

    /// Why this indicator is never written whatever OpenCTI holds (`REMOVE`, revoked),
    /// so that intake can skip it before queueing.
    pub fn ignored(&self) -> Option<NoWrite> {
        if self.operation == Operation::Remove {
            Some(NoWrite::Remove)
        } else if self.revoked {
            Some(NoWrite::Revoked)
        } else {
            None
        }
    }
}

/// A string property: absent, null or blank is `None` (never overwrites anything).
fn optional_text(
    obj: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, ImportError> {
    match get_present(obj, field) {
        None => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ImportError::NotAString {
            field,
            found: other.to_string(),
        }),
    }
}

fn labels(obj: &Map<String, Value>) -> Result<Vec<String>, ImportError> {
    let Some(value) = get_present(obj, "labels") else {
        return Ok(Vec::new());
    };
    let bad = || ImportError::Labels {
        found: value.to_string(),
    };
    value
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|label| label.as_str().map(str::to_owned).ok_or_else(bad))
        .collect()
}

fn confidence(obj: &Map<String, Value>) -> Result<Option<u8>, ImportError> {
    match get_present(obj, "confidence") {
        None => Ok(None),
        Some(value) => value
            .as_u64()
            .filter(|c| *c <= 100)
            .and_then(|c| u8::try_from(c).ok())
            .map(Some)
            .ok_or_else(|| ImportError::Confidence {
                found: value.to_string(),
            }),
    }
}

fn revoked(obj: &Map<String, Value>) -> Result<bool, ImportError> {
    match get_present(obj, "revoked") {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(ImportError::Revoked {
            found: other.to_string(),
        }),
    }
}

/// OpenCTI's observable type for the first object type of a STIX pattern, for the
/// types whose mapping is certain; anything else is [`UNKNOWN_OBSERVABLE_TYPE`], which
/// every OpenCTI version accepts (a wrong type would be refused and dead-lettered).
fn main_observable_type(pattern: &str) -> &'static str {
    let object_type = pattern
        .trim_start_matches(['[', '(', ' '])
        .split(':')
        .next()
        .unwrap_or_default()
        .trim();
    match object_type {
        "ipv4-addr" => "IPv4-Addr",
        "ipv6-addr" => "IPv6-Addr",
        "domain-name" => "Domain-Name",
        "url" => "Url",
        "email-addr" => "Email-Addr",
        "mac-addr" => "Mac-Addr",
        "file" => "StixFile",
        _ => UNKNOWN_OBSERVABLE_TYPE,
    }
}

// ---------------------------------------------------------------------------------------
// The decision

/// One field to write with OpenCTI's field patch (`EditInput`, operation `replace`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldChange {
    /// `name`: only ever from a name the app set.
    Name(String),
    /// `description`.
    Description(String),
    /// `pattern`: the same STIX id now matches something else.
    Pattern(String),
    /// `pattern_type` (`stix`, `sigma`, …).
    PatternType(String),
    /// `valid_from`.
    ValidFrom(Timestamp),
    /// `valid_until`.
    ValidUntil(Timestamp),
    /// `confidence`.
    Confidence(u8),
}

impl FieldChange {
    /// OpenCTI's attribute name (`EditInput.key`).
    pub fn key(&self) -> &'static str {
        match self {
            FieldChange::Name(_) => "name",
            FieldChange::Description(_) => "description",
            FieldChange::Pattern(_) => "pattern",
            FieldChange::PatternType(_) => "pattern_type",
            FieldChange::ValidFrom(_) => "valid_from",
            FieldChange::ValidUntil(_) => "valid_until",
            FieldChange::Confidence(_) => "confidence",
        }
    }

    /// The new value as OpenCTI takes it (`EditInput.value` is a list of these);
    /// timestamps as OpenCTI writes them (UTC, milliseconds).
    pub fn value(&self) -> Value {
        match self {
            FieldChange::Name(s)
            | FieldChange::Description(s)
            | FieldChange::Pattern(s)
            | FieldChange::PatternType(s) => Value::from(s.as_str()),
            FieldChange::ValidFrom(t) | FieldChange::ValidUntil(t) => {
                Value::from(t.to_rfc3339_millis())
            }
            FieldChange::Confidence(c) => Value::from(*c),
        }
    }
}

/// Why nothing is written to OpenCTI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoWrite {
    /// `x_threatbus_update: REMOVE` from another app: ignored, like the original.
    Remove,
    /// `revoked: true` from another app: ignored, like `REMOVE`.
    Revoked,
    /// OpenCTI holds this version or a newer one (`modified`, in milliseconds).
    NotNewer,
    /// Newer, but nothing it carries differs from what OpenCTI holds.
    NothingNew,
}

impl NoWrite {
    /// A short, stable name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            NoWrite::Remove => "remove",
            NoWrite::Revoked => "revoked",
            NoWrite::NotNewer => "not_newer",
            NoWrite::NothingNew => "nothing_new",
        }
    }
}

/// What to do with one imported indicator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportPlan {
    /// OpenCTI has no indicator with this STIX id: `indicatorAdd`.
    Create,
    /// Patch these fields (never empty) of the indicator with internal id `id`.
    Patch {
        id: String,
        changes: Vec<FieldChange>,
    },
    /// Write nothing.
    NoWrite(NoWrite),
}

/// Why what OpenCTI answered cannot be planned against.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The indicator OpenCTI returned has no internal `id` to patch.
    #[error("OpenCTI returned the indicator without its internal id")]
    ExistingWithoutId,
}

/// Decides between create, patch and nothing (rules in the module documentation).
/// `existing` is what the import lookup returned for `incoming.stix_id` (`None`: OpenCTI
/// has none).
pub fn plan_import(
    incoming: &ImportIndicator,
    existing: Option<&Value>,
) -> Result<ImportPlan, PlanError> {
    if let Some(reason) = incoming.ignored() {
        return Ok(ImportPlan::NoWrite(reason));
    }
    let Some(existing) = existing.filter(|e| !e.is_null()) else {
        return Ok(ImportPlan::Create);
    };
    let id = existing
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .ok_or(PlanError::ExistingWithoutId)?;
    // No (readable) `modified` in OpenCTI: the incoming version counts as newer.
    let newer = existing_timestamp(existing, "modified")
        .is_none_or(|held| incoming.modified.unix_millis() > held.unix_millis());
    if !newer {
        return Ok(ImportPlan::NoWrite(NoWrite::NotNewer));
    }
    let changes = diff_indicator(existing, incoming);
    if changes.is_empty() {
        return Ok(ImportPlan::NoWrite(NoWrite::NothingNew));
    }
    Ok(ImportPlan::Patch {
        id: id.to_owned(),
        changes,
    })
}

/// The fields of `incoming` that differ from `existing` (OpenCTI's GraphQL shape), in a
/// fixed order; empty when it adds nothing. Absent incoming fields are never changes.
/// Does not look at `modified` (that is [`plan_import`]'s gate).
pub fn diff_indicator(existing: &Value, incoming: &ImportIndicator) -> Vec<FieldChange> {
    let mut changes = Vec::new();
    let held_text = |field: &str| {
        existing
            .get(field)
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
    };
    let mut text_change = |field: &str, new: Option<&String>, make: fn(String) -> FieldChange| {
        if let Some(new) = new {
            if held_text(field) != Some(new.as_str()) {
                changes.push(make(new.clone()));
            }
        }
    };
    text_change(
        "name",
        Some(&incoming.name).filter(|_| incoming.name_given),
        FieldChange::Name,
    );
    text_change(
        "description",
        incoming.description.as_ref(),
        FieldChange::Description,
    );
    text_change("pattern", Some(&incoming.pattern), FieldChange::Pattern);
    text_change(
        "pattern_type",
        Some(&incoming.pattern_type),
        FieldChange::PatternType,
    );
    let same_instant = |field: &str, new: Timestamp| {
        existing_timestamp(existing, field)
            .is_some_and(|held| held.unix_millis() == new.unix_millis())
    };
    if let Some(new) = incoming
        .valid_from
        .filter(|t| !same_instant("valid_from", *t))
    {
        changes.push(FieldChange::ValidFrom(new));
    }
    if let Some(new) = incoming
        .valid_until
        .filter(|t| !same_instant("valid_until", *t))
    {
        changes.push(FieldChange::ValidUntil(new));
    }
    if let Some(new) = incoming.confidence {
        if existing.get("confidence").and_then(Value::as_u64) != Some(u64::from(new)) {
            changes.push(FieldChange::Confidence(new));
        }
    }
    changes
}

fn existing_timestamp(existing: &Value, field: &str) -> Option<Timestamp> {
    existing
        .get(field)
        .and_then(Value::as_str)
        .and_then(|t| Timestamp::parse(t).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ID: &str = "indicator--8e2e2d2b-17d4-4cbf-938f-98ee46b3cd3f";

    fn stix(extra: Value) -> Value {
        let mut indicator = json!({
            "type": "indicator",
            "spec_version": "2.1",
            "id": ID,
            "created": "2024-03-01T10:00:00Z",
            "modified": "2024-03-01T10:00:00Z",
            "pattern": "[ipv4-addr:value = '203.0.113.7']",
            "pattern_type": "stix",
            "valid_from": "2024-03-01T10:00:00Z",
        });
        if let (Some(obj), Some(extra)) = (indicator.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                obj.insert(k.clone(), v.clone());
            }
        }
        indicator
    }

    fn import(extra: Value) -> ImportIndicator {
        ImportIndicator::from_stix(&stix(extra)).unwrap()
    }

    /// What OpenCTI returns after importing `stix(json!({}))` (its own spellings).
    fn held() -> Value {
        json!({
            "id": "5b0a4c37-2d1e-4f0a-9d4b-0a1b2c3d4e5f",
            "standard_id": "indicator--0b0e3c4d-5e6f-5a7b-8c9d-0e1f2a3b4c5d",
            "modified": "2024-03-01T10:00:00.000Z",
            "revoked": false,
            "name": "[ipv4-addr:value = '203.0.113.7']",
            "description": null,
            "pattern": "[ipv4-addr:value = '203.0.113.7']",
            "pattern_type": "stix",
            "valid_from": "2024-03-01T10:00:00.000Z",
            "valid_until": "2024-04-01T10:00:00.000Z",
            "confidence": 50,
        })
    }

    #[test]
    fn a_minimal_indicator_is_named_after_its_pattern() {
        let indicator = import(json!({}));
        assert_eq!(indicator.stix_id, ID);
        assert_eq!(indicator.name, "[ipv4-addr:value = '203.0.113.7']");
        assert!(!indicator.name_given);
        assert_eq!(indicator.main_observable_type, "IPv4-Addr");
        assert_eq!(indicator.operation, Operation::Create);
        assert_eq!(indicator.ignored(), None);
        let named = import(json!({"name": "C2 server", "labels": ["c2"], "confidence": 80}));
        assert_eq!((named.name.as_str(), named.name_given), ("C2 server", true));
        assert_eq!(named.labels, vec!["c2".to_owned()]);
        assert_eq!(named.confidence, Some(80));
        // A one-character name would be refused by OpenCTI: the pattern is used instead.
        assert!(!import(json!({"name": "x"})).name_given);
    }

    #[test]
    fn observable_types_are_derived_only_when_certain() {
        assert_eq!(
            main_observable_type("[domain-name:value = 'a.example']"),
            "Domain-Name"
        );
        assert_eq!(
            main_observable_type("([file:hashes.MD5 = 'x'])"),
            "StixFile"
        );
        assert_eq!(main_observable_type("[x-custom:value = 'x']"), "Unknown");
        let sigma = import(json!({"pattern_type": "sigma", "pattern": "title: x"}));
        assert_eq!(sigma.main_observable_type, "Unknown");
    }

    #[test]
    fn invalid_indicators_are_typed_errors() {
        let cases = [
            (json!({"confidence": 101}), "confidence"),
            (json!({"confidence": "high"}), "confidence"),
            (json!({"labels": "c2"}), "labels"),
            (json!({"labels": [1]}), "labels"),
            (json!({"description": 5}), "description"),
            (json!({"revoked": "yes"}), "revoked"),
            (
                json!({"x_threatbus_update": "DELETE"}),
                "x_threatbus_update",
            ),
            (json!({"pattern": "ipv4-addr:value = '1'"}), "STIX pattern"),
            (json!({"modified": null}), "modified"),
        ];
        for (extra, expected) in cases {
            let error = ImportIndicator::from_stix(&stix(extra.clone())).unwrap_err();
            assert!(error.to_string().contains(expected), "{extra}: {error}");
        }
        assert!(matches!(
            ImportIndicator::from_stix(&json!([])),
            Err(ImportError::Indicator(IndicatorError::NotAnObject))
        ));
    }

    #[test]
    fn remove_and_revoked_are_never_written() {
        let remove = import(json!({"x_threatbus_update": "REMOVE"}));
        assert_eq!(remove.ignored(), Some(NoWrite::Remove));
        assert_eq!(
            plan_import(&remove, None),
            Ok(ImportPlan::NoWrite(NoWrite::Remove))
        );
        assert_eq!(
            plan_import(&remove, Some(&held())),
            Ok(ImportPlan::NoWrite(NoWrite::Remove))
        );
        let revoked = import(json!({"revoked": true, "modified": "2025-01-01T00:00:00Z"}));
        assert_eq!(
            plan_import(&revoked, Some(&held())),
            Ok(ImportPlan::NoWrite(NoWrite::Revoked))
        );
        // EDIT is an ordinary import.
        let edit = import(json!({"x_threatbus_update": "EDIT"}));
        assert_eq!(plan_import(&edit, None), Ok(ImportPlan::Create));
    }

    #[test]
    fn unknown_indicators_are_created() {
        assert_eq!(
            plan_import(&import(json!({})), None),
            Ok(ImportPlan::Create)
        );
        assert_eq!(
            plan_import(&import(json!({})), Some(&Value::Null)),
            Ok(ImportPlan::Create)
        );
    }

    #[test]
    fn the_same_or_an_older_version_writes_nothing() {
        // The same instant spelled differently, and sub-millisecond digits OpenCTI drops.
        for modified in [
            "2024-03-01T10:00:00Z",
            "2024-03-01T11:00:00+01:00",
            "2024-03-01T10:00:00.000400Z",
        ] {
            let same = import(json!({"modified": modified, "description": "changed"}));
            assert_eq!(
                plan_import(&same, Some(&held())),
                Ok(ImportPlan::NoWrite(NoWrite::NotNewer)),
                "{modified}"
            );
        }
        let older = import(
            json!({"modified": "2024-02-01T00:00:00Z", "created": "2024-02-01T00:00:00Z", "valid_from": "2024-02-01T00:00:00Z"}),
        );
        assert_eq!(
            plan_import(&older, Some(&held())),
            Ok(ImportPlan::NoWrite(NoWrite::NotNewer))
        );
    }

    #[test]
    fn a_newer_version_that_adds_nothing_writes_nothing() {
        // Absent fields (valid_until, confidence, name) never count; timestamps are
        // compared as instants.
        let newer = import(
            json!({"modified": "2024-03-02T00:00:00Z", "valid_from": "2024-03-01T10:00:00.000Z"}),
        );
        assert_eq!(diff_indicator(&held(), &newer), Vec::new());
        assert_eq!(
            plan_import(&newer, Some(&held())),
            Ok(ImportPlan::NoWrite(NoWrite::NothingNew))
        );
        // Labels are not written (see the module documentation), so they add nothing.
        let labelled = import(json!({"modified": "2024-03-02T00:00:00Z", "labels": ["new"]}));
        assert_eq!(
            plan_import(&labelled, Some(&held())),
            Ok(ImportPlan::NoWrite(NoWrite::NothingNew))
        );
    }

    #[test]
    fn a_newer_version_patches_exactly_what_differs() {
        let changed = import(json!({
            "modified": "2024-03-02T00:00:00Z",
            "name": "C2 server",
            "description": "seen by Zeek",
            "pattern": "[ipv4-addr:value = '203.0.113.8']",
            "valid_until": "2024-05-01T10:00:00Z",
            "confidence": 90,
        }));
        let plan = plan_import(&changed, Some(&held())).unwrap();
        let ImportPlan::Patch { id, changes } = plan else {
            panic!("expected a patch, got {plan:?}");
        };
        assert_eq!(id, "5b0a4c37-2d1e-4f0a-9d4b-0a1b2c3d4e5f");
        let keys: Vec<&str> = changes.iter().map(FieldChange::key).collect();
        assert_eq!(
            keys,
            [
                "name",
                "description",
                "pattern",
                "valid_until",
                "confidence"
            ]
        );
        assert_eq!(changes[3].value(), json!("2024-05-01T10:00:00.000Z"));
        assert_eq!(changes[4].value(), json!(90));
    }

    #[test]
    fn a_derived_name_never_overwrites_and_missing_modified_counts_as_older() {
        let mut held = held();
        held["name"] = json!("Named by an analyst");
        held["modified"] = Value::Null;
        let incoming = import(json!({"pattern": "[ipv4-addr:value = '203.0.113.9']"}));
        let Ok(ImportPlan::Patch { changes, .. }) = plan_import(&incoming, Some(&held)) else {
            panic!("expected a patch");
        };
        assert_eq!(
            changes,
            vec![FieldChange::Pattern(
                "[ipv4-addr:value = '203.0.113.9']".into()
            )]
        );
        held["id"] = Value::Null;
        assert_eq!(
            plan_import(&incoming, Some(&held)),
            Err(PlanError::ExistingWithoutId)
        );
    }
}
