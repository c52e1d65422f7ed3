//! Many indicators in one GraphQL request: what gap reconciliation asks OpenCTI.
//!
//! No schema version has a "these ids" query for indicators that all three share
//! (`indicators(filters:)` changed shape between 5.12 and 6.x), but every version has
//! `indicator(id: String!)`, which takes a STIX id as well as an internal one. So one
//! request carries up to [`LOOKUP_BATCH`] aliased `indicator` fields, `i0` … `iN`, one
//! variable each: valid against 5.12.33, 6.0.5 and 6.9.28 (`tests/graphql_documents.rs`).

use serde_json::{Map, Value};

use super::graphql::{GraphqlClient, GraphqlError};
use crate::stix::reconcile::IndicatorState;

/// Ids per request. OpenCTI resolves each alias with its own search: 50 keeps one request
/// well under its 30 s timeout on a loaded platform, while 1,000 active indicators still
/// take only 20 requests.
pub const LOOKUP_BATCH: usize = 50;

/// Operation name of the lookup document (logged by OpenCTI, and by the test double).
pub const LOOKUP_OPERATION: &str = "ReconcileIndicators";

/// The lookup document for `count` ids (`$id0` … as `i0: indicator(id: $id0)` …).
pub fn lookup_document(count: usize) -> String {
    let mut variables = Vec::with_capacity(count);
    let mut fields = String::new();
    for n in 0..count {
        variables.push(format!("$id{n}: String!"));
        fields.push_str(&format!(
            "  i{n}: indicator(id: $id{n}) {{\n    id\n    standard_id\n    revoked\n    x_opencti_detection\n  }}\n"
        ));
    }
    format!(
        "query {LOOKUP_OPERATION}({}) {{\n{fields}}}\n",
        variables.join(", ")
    )
}

/// The variables of [`lookup_document`] for `ids`.
pub fn lookup_variables(ids: &[String]) -> Value {
    let map: Map<String, Value> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| (format!("id{n}"), Value::from(id.as_str())))
        .collect();
    Value::Object(map)
}

/// Reads the answer to a lookup of `count` ids: one entry per id, in order, `None` where
/// OpenCTI has no such indicator.
pub fn parse_lookup(
    data: &Map<String, Value>,
    count: usize,
) -> Result<Vec<Option<IndicatorState>>, GraphqlError> {
    (0..count)
        .map(|n| {
            let alias = format!("i{n}");
            match data.get(&alias) {
                None => Err(GraphqlError::Other {
                    message: format!("{LOOKUP_OPERATION} returned no {alias}"),
                }),
                Some(Value::Null) => Ok(None),
                Some(Value::Object(indicator)) => {
                    let standard_id = indicator
                        .get("standard_id")
                        .and_then(Value::as_str)
                        .ok_or_else(|| GraphqlError::Other {
                            message: format!("{LOOKUP_OPERATION}: {alias} has no standard_id"),
                        })?;
                    Ok(Some(IndicatorState {
                        standard_id: standard_id.to_owned(),
                        revoked: indicator.get("revoked").and_then(Value::as_bool) == Some(true),
                        detection: indicator
                            .get("x_opencti_detection")
                            .and_then(Value::as_bool),
                    }))
                }
                Some(other) => Err(GraphqlError::Other {
                    message: format!("{LOOKUP_OPERATION}: {alias} is not an object: {other}"),
                }),
            }
        })
        .collect()
}

impl GraphqlClient {
    /// What OpenCTI holds for each of `ids` (at most [`LOOKUP_BATCH`] make sense in one
    /// call), in order.
    pub async fn lookup_indicators(
        &self,
        ids: &[String],
    ) -> Result<Vec<Option<IndicatorState>>, GraphqlError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let data = self
            .execute(&lookup_document(ids.len()), lookup_variables(ids))
            .await?;
        parse_lookup(&data, ids.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_document_aliases_one_field_per_id() {
        let document = lookup_document(2);
        assert!(document.starts_with("query ReconcileIndicators($id0: String!, $id1: String!) {"));
        assert!(document.contains("i1: indicator(id: $id1)"));
        assert_eq!(
            lookup_variables(&["a".into(), "b".into()]),
            json!({"id0": "a", "id1": "b"})
        );
    }

    #[test]
    fn answers_are_read_in_order_and_null_is_not_found() {
        let data = json!({
            "i0": {"id": "x", "standard_id": "indicator--a", "revoked": false, "x_opencti_detection": true},
            "i1": null,
            "i2": {"id": "y", "standard_id": "indicator--c", "revoked": true, "x_opencti_detection": null},
        });
        let parsed = parse_lookup(data.as_object().unwrap(), 3).unwrap();
        assert_eq!(parsed[0].as_ref().unwrap().detection, Some(true));
        assert!(parsed[1].is_none());
        assert!(parsed[2].as_ref().unwrap().revoked);
        assert_eq!(parsed[2].as_ref().unwrap().detection, None);
        assert!(
            parse_lookup(data.as_object().unwrap(), 4).is_err(),
            "a missing alias is an error"
        );
    }
}
