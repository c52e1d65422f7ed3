//! Indicators from other Threat Bus apps → OpenCTI: the GraphQL part (issue 7 item 4).
//!
//! Three documents, each valid with its variables against 5.12.33, 6.0.5 and 6.9.28
//! (`tests/graphql_documents.rs`), and the client calls the import drainer makes after
//! [`plan_import`](crate::stix::import::plan_import) decided:
//!
//! - [`IMPORT_TARGET`]: `indicator(id:)` by STIX id, with exactly the fields the diff
//!   reads. OpenCTI resolves the id against `standard_id` and `x_opencti_stix_ids`, so an
//!   indicator created with `stix_id` is found by it even though OpenCTI derives its own
//!   standard id from the pattern.
//! - [`IMPORT_ADD`]: `indicatorAdd(input: IndicatorAddInput!)` with `stix_id`, the same
//!   input type in all three versions (the 6.9 additions are not sent). `update: false`,
//!   as the original connector (pycti's default): it is only sent when the lookup found
//!   nothing, and if OpenCTI upserts it into an indicator with the same pattern, that
//!   indicator's fields are not overwritten.
//! - [`IMPORT_PATCH`]: `indicatorFieldPatch(id: ID!, input: [EditInput!]!)`, one `replace`
//!   per changed field. 5.12.33 declares the argument `[EditInput]!`, 6.0.5 and 6.9.28
//!   `[EditInput!]!`; a `[EditInput!]!` variable is allowed in both positions, so the
//!   document is valid everywhere. It is preferred over the generic
//!   `stixDomainObjectEdit(id:).fieldPatch` (same `[EditInput]!` in all three) because
//!   OpenCTI runs its indicator-specific checks there.

use serde_json::{json, Map, Value};

use super::graphql::{GraphqlClient, GraphqlError};
use crate::stix::import::{FieldChange, ImportIndicator};

/// Operation name of [`IMPORT_TARGET`].
pub const IMPORT_TARGET_OPERATION: &str = "IndicatorImportTarget";
/// Operation name of [`IMPORT_ADD`].
pub const IMPORT_ADD_OPERATION: &str = "IndicatorImportAdd";
/// Operation name of [`IMPORT_PATCH`].
pub const IMPORT_PATCH_OPERATION: &str = "IndicatorImportPatch";

/// What OpenCTI holds for one STIX id: the fields [`diff_indicator`] compares.
///
/// [`diff_indicator`]: crate::stix::import::diff_indicator
pub const IMPORT_TARGET: &str = r#"query IndicatorImportTarget($id: String!) {
  indicator(id: $id) {
    id
    standard_id
    x_opencti_stix_ids
    modified
    revoked
    name
    description
    pattern
    pattern_type
    valid_from
    valid_until
    confidence
  }
}
"#;

/// Creates the indicator with its STIX id.
pub const IMPORT_ADD: &str = r#"mutation IndicatorImportAdd($input: IndicatorAddInput!) {
  indicatorAdd(input: $input) {
    id
    standard_id
    x_opencti_stix_ids
  }
}
"#;

/// Writes only the changed fields.
pub const IMPORT_PATCH: &str = r#"mutation IndicatorImportPatch($id: ID!, $input: [EditInput!]!) {
  indicatorFieldPatch(id: $id, input: $input) {
    id
    standard_id
    x_opencti_stix_ids
  }
}
"#;

/// The import documents, by operation name (listed in `graphql::all_documents`).
pub fn import_documents() -> [(&'static str, &'static str); 3] {
    [
        (IMPORT_TARGET_OPERATION, IMPORT_TARGET),
        (IMPORT_ADD_OPERATION, IMPORT_ADD),
        (IMPORT_PATCH_OPERATION, IMPORT_PATCH),
    ]
}

/// [`IMPORT_TARGET`] variables.
pub fn import_target_variables(stix_id: &str) -> Value {
    json!({ "id": stix_id })
}

/// [`IMPORT_ADD`] variables. Absent optional fields are left out (not sent as null), so
/// OpenCTI applies its own defaults; timestamps as OpenCTI writes them (UTC, ms).
pub fn indicator_add_variables(indicator: &ImportIndicator) -> Value {
    let mut input = Map::new();
    input.insert("stix_id".into(), json!(indicator.stix_id));
    input.insert("name".into(), json!(indicator.name));
    input.insert("pattern".into(), json!(indicator.pattern));
    input.insert("pattern_type".into(), json!(indicator.pattern_type));
    input.insert(
        "x_opencti_main_observable_type".into(),
        json!(indicator.main_observable_type),
    );
    if let Some(version) = &indicator.pattern_version {
        input.insert("pattern_version".into(), json!(version));
    }
    if let Some(description) = &indicator.description {
        input.insert("description".into(), json!(description));
    }
    let timestamps = [
        ("valid_from", indicator.valid_from),
        ("valid_until", indicator.valid_until),
        ("created", indicator.created),
        ("modified", Some(indicator.modified)),
    ];
    for (key, value) in timestamps {
        if let Some(value) = value {
            input.insert(key.into(), json!(value.to_rfc3339_millis()));
        }
    }
    if let Some(confidence) = indicator.confidence {
        input.insert("confidence".into(), json!(confidence));
    }
    input.insert("update".into(), json!(false));
    json!({ "input": input })
}

/// [`IMPORT_PATCH`] variables: one `replace` per change.
pub fn indicator_patch_variables(id: &str, changes: &[FieldChange]) -> Value {
    let input: Vec<Value> = changes
        .iter()
        .map(|change| {
            json!({
                "key": change.key(),
                "value": [change.value()],
                "operation": "replace",
            })
        })
        .collect();
    json!({ "id": id, "input": input })
}

/// An indicator OpenCTI holds, as [`IMPORT_TARGET`] read it.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportTarget {
    /// Internal id (what [`IMPORT_PATCH`] takes).
    pub id: String,
    pub standard_id: String,
    /// The selected fields as OpenCTI returned them: the `existing` of `plan_import`.
    pub fields: Value,
}

/// The indicator a create or a patch wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenIndicator {
    /// Internal id.
    pub id: String,
    /// OpenCTI's standard id: derived from the pattern, so usually not the imported STIX
    /// id; the stream will publish the indicator under this one.
    pub standard_id: String,
    /// The other STIX ids OpenCTI keeps for it (the imported one among them when it is
    /// not the standard id).
    pub stix_ids: Vec<String>,
}

/// Reads [`IMPORT_TARGET`]'s answer.
pub fn parse_import_target(
    data: &Map<String, Value>,
) -> Result<Option<ImportTarget>, GraphqlError> {
    match data.get("indicator") {
        None => Err(other(format!(
            "{IMPORT_TARGET_OPERATION} returned no indicator field"
        ))),
        Some(Value::Null) => Ok(None),
        Some(fields @ Value::Object(object)) => Ok(Some(ImportTarget {
            id: required(object, IMPORT_TARGET_OPERATION, "id")?,
            standard_id: required(object, IMPORT_TARGET_OPERATION, "standard_id")?,
            fields: fields.clone(),
        })),
        Some(found) => Err(other(format!(
            "{IMPORT_TARGET_OPERATION}: indicator is not an object: {found}"
        ))),
    }
}

/// Reads the answer of [`IMPORT_ADD`] (`field` `indicatorAdd`) or [`IMPORT_PATCH`]
/// (`indicatorFieldPatch`).
pub fn parse_written(
    data: &Map<String, Value>,
    field: &str,
) -> Result<WrittenIndicator, GraphqlError> {
    let object = data
        .get(field)
        .and_then(Value::as_object)
        .ok_or_else(|| other(format!("{field} returned no object")))?;
    Ok(WrittenIndicator {
        id: required(object, field, "id")?,
        standard_id: required(object, field, "standard_id")?,
        stix_ids: object
            .get("x_opencti_stix_ids")
            .and_then(Value::as_array)
            .map(|ids| {
                ids.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

fn required(
    object: &Map<String, Value>,
    operation: &str,
    field: &str,
) -> Result<String, GraphqlError> {
    object
        .get(field)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| other(format!("{operation} returned no {field}")))
}

fn other(message: String) -> GraphqlError {
    GraphqlError::Other { message }
}

impl GraphqlClient {
    /// What OpenCTI holds for this STIX id, or `None` if it has no such indicator.
    pub async fn read_import_target(
        &self,
        stix_id: &str,
    ) -> Result<Option<ImportTarget>, GraphqlError> {
        let data = self
            .execute(IMPORT_TARGET, import_target_variables(stix_id))
            .await?;
        parse_import_target(&data)
    }

    /// `indicatorAdd` with the indicator's STIX id.
    pub async fn create_indicator(
        &self,
        indicator: &ImportIndicator,
    ) -> Result<WrittenIndicator, GraphqlError> {
        let data = self
            .execute(IMPORT_ADD, indicator_add_variables(indicator))
            .await?;
        parse_written(&data, "indicatorAdd")
    }

    /// `indicatorFieldPatch` of `changes` on the indicator with internal id `id`. An
    /// empty `changes` sends nothing and is refused as [`GraphqlError::Validation`]:
    /// `plan_import` never asks for it, and OpenCTI must never see an empty update.
    pub async fn patch_indicator(
        &self,
        id: &str,
        changes: &[FieldChange],
    ) -> Result<WrittenIndicator, GraphqlError> {
        if changes.is_empty() {
            return Err(GraphqlError::Validation {
                message: "no field to patch (an empty update is never sent)".to_owned(),
            });
        }
        let data = self
            .execute(IMPORT_PATCH, indicator_patch_variables(id, changes))
            .await?;
        parse_written(&data, "indicatorFieldPatch")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stix::Timestamp;

    fn indicator() -> ImportIndicator {
        ImportIndicator::from_stix(&json!({
            "type": "indicator",
            "spec_version": "2.1",
            "id": "indicator--8e2e2d2b-17d4-4cbf-938f-98ee46b3cd3f",
            "created": "2024-03-01T10:00:00Z",
            "modified": "2024-03-01T10:00:00.5Z",
            "pattern": "[ipv4-addr:value = '203.0.113.7']",
            "pattern_type": "stix",
            "valid_from": "2024-03-01T10:00:00Z",
            "confidence": 70,
        }))
        .unwrap()
    }

    #[test]
    fn create_sends_the_stix_id_and_leaves_absent_fields_out() {
        let variables = indicator_add_variables(&indicator());
        let input = &variables["input"];
        assert_eq!(
            input["stix_id"],
            "indicator--8e2e2d2b-17d4-4cbf-938f-98ee46b3cd3f"
        );
        assert_eq!(input["name"], "[ipv4-addr:value = '203.0.113.7']");
        assert_eq!(input["x_opencti_main_observable_type"], "IPv4-Addr");
        assert_eq!(input["modified"], "2024-03-01T10:00:00.500Z");
        assert_eq!(input["confidence"], 70);
        assert_eq!(input["update"], false);
        for absent in ["description", "valid_until", "pattern_version"] {
            assert!(input.get(absent).is_none(), "{absent} must be left out");
        }
    }

    #[test]
    fn a_patch_replaces_each_changed_field() {
        let until = Timestamp::parse("2024-05-01T10:00:00Z").unwrap();
        let variables = indicator_patch_variables(
            "internal-1",
            &[
                FieldChange::Description("d".into()),
                FieldChange::ValidUntil(until),
            ],
        );
        assert_eq!(
            variables,
            json!({"id": "internal-1", "input": [
                {"key": "description", "value": ["d"], "operation": "replace"},
                {"key": "valid_until", "value": ["2024-05-01T10:00:00.000Z"], "operation": "replace"},
            ]})
        );
    }

    #[test]
    fn answers_are_read_or_refused() {
        let found =
            json!({"indicator": {"id": "i", "standard_id": "indicator--s", "modified": null}});
        let target = parse_import_target(found.as_object().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            (target.id.as_str(), target.standard_id.as_str()),
            ("i", "indicator--s")
        );
        let none = json!({"indicator": null});
        assert_eq!(parse_import_target(none.as_object().unwrap()), Ok(None));
        let no_id = json!({"indicator": {"standard_id": "indicator--s"}});
        assert!(parse_import_target(no_id.as_object().unwrap()).is_err());

        let written = json!({"indicatorAdd": {"id": "i", "standard_id": "indicator--s", "x_opencti_stix_ids": ["indicator--a"]}});
        let written = parse_written(written.as_object().unwrap(), "indicatorAdd").unwrap();
        assert_eq!(written.stix_ids, vec!["indicator--a".to_owned()]);
        let null = json!({"indicatorAdd": null});
        assert!(parse_written(null.as_object().unwrap(), "indicatorAdd").is_err());
    }
}
