//! Every GraphQL document the client can send, with variables built by the client's own
//! functions, validates against the OpenCTI 5.12.33, 6.0.5 and 6.9.28 schemas
//! (`opencti/schema/<version>/relay.schema.graphql` in the shared reference folder, found
//! through `OPENCTI_SHARED_DIR` or `../shared/opencti`). A missing schema is a failure,
//! never a skip.

use std::path::PathBuf;

use apollo_compiler::request::coerce_variable_values;
use apollo_compiler::response::JsonMap;
use apollo_compiler::validation::Valid;
use apollo_compiler::{ExecutableDocument, Schema};
use serde_json::Value;

use opencti_threatbus::opencti::connector_state::ConnectorState;
use opencti_threatbus::opencti::graphql::{
    all_documents, indicator_variables, organization_add_variables, organization_by_name_variables,
    ping_connector_variables, register_connector_variables, sighting_add_variables,
    ConnectorRegistration, SightingInput,
};
use opencti_threatbus::opencti::indicator_import::{
    import_target_variables, indicator_add_variables, indicator_patch_variables,
    IMPORT_ADD_OPERATION, IMPORT_PATCH_OPERATION, IMPORT_TARGET_OPERATION,
};
use opencti_threatbus::stix::import::{FieldChange, ImportIndicator};
use opencti_threatbus::stix::{sighting_from_value, Timestamp};

const VERSIONS: [&str; 3] = ["5.12.33", "6.0.5", "6.9.28"];

fn shared_opencti_dir() -> PathBuf {
    match std::env::var_os("OPENCTI_SHARED_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/opencti"),
    }
}

fn load_schema(version: &str) -> Valid<Schema> {
    let path = shared_opencti_dir()
        .join("schema")
        .join(version)
        .join("relay.schema.graphql");
    let sdl = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the OpenCTI {version} schema at {}: {e}\n\
             Set OPENCTI_SHARED_DIR to the shared `opencti` reference folder \
             (the one holding schema/<version>/relay.schema.graphql).",
            path.display()
        )
    });
    Schema::parse_and_validate(sdl, &path).unwrap_or_else(|e| {
        panic!(
            "the OpenCTI {version} schema does not validate:\n{}",
            e.errors
        )
    })
}

/// Realistic variables for each document, built by the functions the client uses.
fn example_variables(operation: &str) -> Option<Value> {
    let registration = ConnectorRegistration {
        id: "a0c3d1e2-1111-4222-8333-944455556666".to_owned(),
        name: "Threat Bus".to_owned(),
    };
    let indicator = "indicator--c7d3e1b2-6a6c-5a4e-9b8f-0d7e4c3a2b1f";
    Some(match operation {
        "RegisterConnector" => register_connector_variables(&registration),
        // The state exactly as the bridge serializes it (pycti's shape).
        "PingConnector" => ping_connector_variables(
            &registration.id,
            Some(
                &ConnectorState {
                    start_from: "1709287215731-0".to_owned(),
                    recover_until: Some("2024-03-01T10:00:00.000Z".to_owned()),
                }
                .to_json(),
            ),
        ),
        "StixDomainObjects" => organization_by_name_variables("Threat Bus"),
        "OrganizationAdd" => organization_add_variables("Threat Bus", "Threat Bus bridge"),
        "StixSightingRelationshipAdd" => {
            let sighting = sighting_from_value(&serde_json::json!({
                "type": "sighting",
                "spec_version": "2.1",
                "id": "sighting--65184b15-a91d-4ee2-b023-efd239ddb72b",
                "created": "2024-01-02T03:05:00Z",
                "modified": "2024-01-02T03:05:00Z",
                "first_seen": "2024-01-02T03:04:00Z",
                "last_seen": "2024-01-02T03:05:00Z",
                "count": 4,
                "sighting_of_ref": indicator,
                "x_threatbus_source": "VAST"
            }))
            .unwrap_or_else(|e| panic!("{e}"));
            let received =
                Timestamp::parse("2024-01-02T03:05:01Z").unwrap_or_else(|e| panic!("{e}"));
            let input = SightingInput::from_sighting(
                &sighting,
                "7b0e4a3c-2f5d-4e61-8a9b-0c1d2e3f4a5b",
                50,
                received,
            );
            sighting_add_variables(&input)
        }
        "Indicator" => indicator_variables(indicator),
        IMPORT_TARGET_OPERATION => import_target_variables(indicator),
        IMPORT_ADD_OPERATION => indicator_add_variables(&import_example()),
        IMPORT_PATCH_OPERATION => {
            let until = Timestamp::parse("2024-06-01T00:00:00Z").unwrap_or_else(|e| panic!("{e}"));
            indicator_patch_variables(
                "7b0e4a3c-2f5d-4e61-8a9b-0c1d2e3f4a5b",
                &[
                    FieldChange::Name("C2 server".into()),
                    FieldChange::Description("seen by Zeek".into()),
                    FieldChange::Pattern("[ipv4-addr:value = '203.0.113.8']".into()),
                    FieldChange::PatternType("stix".into()),
                    FieldChange::ValidFrom(until),
                    FieldChange::ValidUntil(until),
                    FieldChange::Confidence(90),
                ],
            )
        }
        _ => return None,
    })
}

/// An indicator from another Threat Bus app with every field the import sends.
fn import_example() -> ImportIndicator {
    ImportIndicator::from_stix(&serde_json::json!({
        "type": "indicator",
        "spec_version": "2.1",
        "id": "indicator--8e2e2d2b-17d4-4cbf-938f-98ee46b3cd3f",
        "created": "2024-03-01T10:00:00Z",
        "modified": "2024-03-01T10:00:00Z",
        "name": "C2 server",
        "description": "seen by Zeek",
        "pattern": "[ipv4-addr:value = '203.0.113.7']",
        "pattern_type": "stix",
        "pattern_version": "2.1",
        "valid_from": "2024-03-01T10:00:00Z",
        "valid_until": "2024-06-01T10:00:00Z",
        "confidence": 80,
        "labels": ["c2"],
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The problems of one document with its variables against one schema, as text.
fn check(schema: &Valid<Schema>, name: &str, document: &str, variables: &Value) -> Vec<String> {
    let doc =
        match ExecutableDocument::parse_and_validate(schema, document, format!("{name}.graphql")) {
            Ok(doc) => doc,
            Err(e) => return vec![format!("document: {}", e.errors)],
        };
    let operation = match doc.operations.get(Some(name)) {
        Ok(op) => op,
        Err(_) => return vec![format!("the document has no operation named {name}")],
    };
    let map: JsonMap = match serde_json::from_value(variables.clone()) {
        Ok(map) => map,
        Err(e) => return vec![format!("variables are not a JSON object: {e}")],
    };
    match coerce_variable_values(schema, operation, &map) {
        Ok(_) => Vec::new(),
        Err(e) => vec![format!("variables {variables}: {}", e.message())],
    }
}

#[test]
fn every_document_and_its_variables_validate_against_all_schemas() {
    let documents = all_documents();
    assert!(!documents.is_empty());
    let mut failures = Vec::new();
    for version in VERSIONS {
        let schema = load_schema(version);
        for (name, document) in &documents {
            let Some(variables) = example_variables(name) else {
                failures.push(format!("{name}: no example variables in this test"));
                continue;
            };
            for problem in check(&schema, name, document, &variables) {
                failures.push(format!("OpenCTI {version}, {name}: {problem}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The check itself catches what it must: an unknown field, a wrong variable, a missing
/// required input field (so a passing run above means something).
#[test]
fn the_check_rejects_invalid_documents_and_variables() {
    let schema = load_schema("6.0.5");
    let documents = all_documents();
    let (name, sighting_add) = documents
        .iter()
        .find(|(name, _)| *name == "StixSightingRelationshipAdd")
        .copied()
        .unwrap_or_else(|| panic!("no StixSightingRelationshipAdd document"));
    let good = example_variables(name).unwrap_or_else(|| panic!("no variables"));
    assert!(check(&schema, name, sighting_add, &good).is_empty());

    let bogus_field = sighting_add.replace("parent_types", "parent_types\n    bogus_field");
    let problems = check(&schema, name, &bogus_field, &good);
    assert!(
        problems.iter().any(|p| p.contains("bogus_field")),
        "{problems:?}"
    );

    let mut missing_count = good.clone();
    if let Some(input) = missing_count["input"].as_object_mut() {
        input.remove("attribute_count");
    }
    let problems = check(&schema, name, sighting_add, &missing_count);
    assert!(
        problems.iter().any(|p| p.contains("attribute_count")),
        "{problems:?}"
    );

    let mut to_ids = good.clone();
    to_ids["input"]["toIds"] = serde_json::json!(["x"]);
    let problems = check(&schema, name, sighting_add, &to_ids);
    assert!(problems.iter().any(|p| p.contains("toIds")), "{problems:?}");

    // A 6.9-only input field is refused by 6.0.5.
    let mut newer = good;
    newer["input"]["x_opencti_modified_at"] = serde_json::json!("2024-01-02T03:05:00Z");
    let problems = check(&schema, name, sighting_add, &newer);
    assert!(
        problems.iter().any(|p| p.contains("x_opencti_modified_at")),
        "{problems:?}"
    );
}

/// The batched indicator lookup of gap reconciliation is built per batch size: every size
/// from one id to a full batch validates, variables included, against all three schemas.
#[test]
fn the_batched_indicator_lookup_validates_at_every_size() {
    use opencti_threatbus::opencti::indicator_lookup::{
        lookup_document, lookup_variables, LOOKUP_BATCH, LOOKUP_OPERATION,
    };
    let mut failures = Vec::new();
    for version in VERSIONS {
        let schema = load_schema(version);
        for count in [1, 2, 7, LOOKUP_BATCH] {
            let ids: Vec<String> = (0..count)
                .map(|n| format!("indicator--c7d3e1b2-6a6c-5a4e-9b8f-{n:012x}"))
                .collect();
            let problems = check(
                &schema,
                LOOKUP_OPERATION,
                &lookup_document(count),
                &lookup_variables(&ids),
            );
            for problem in problems {
                failures.push(format!("OpenCTI {version}, {count} ids: {problem}"));
            }
        }
        // One variable short is refused: the check is not blind to the variables.
        let short = lookup_variables(&["indicator--a".to_owned()]);
        assert!(
            !check(&schema, LOOKUP_OPERATION, &lookup_document(2), &short).is_empty(),
            "a missing $id1 must be refused by {version}"
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The import documents are checked for real: a wrong input field, a wrong edit
/// operation, a missing required input field and an unknown selected field are refused by
/// every version.
#[test]
fn the_check_rejects_invalid_import_documents_and_variables() {
    let documents = all_documents();
    let document = |name: &str| {
        documents
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, d)| *d)
            .unwrap_or_else(|| panic!("{name} is not in all_documents()"))
    };
    let add = document(IMPORT_ADD_OPERATION);
    let patch = document(IMPORT_PATCH_OPERATION);
    let good_add = indicator_add_variables(&import_example());
    let good_patch =
        example_variables(IMPORT_PATCH_OPERATION).unwrap_or_else(|| panic!("no variables"));
    for version in VERSIONS {
        let schema = load_schema(version);
        assert!(check(&schema, IMPORT_ADD_OPERATION, add, &good_add).is_empty());

        // `labels` is STIX's name; OpenCTI's input field is `objectLabel`.
        let mut wrong_field = good_add.clone();
        wrong_field["input"]["labels"] = serde_json::json!(["c2"]);
        let problems = check(&schema, IMPORT_ADD_OPERATION, add, &wrong_field);
        assert!(
            problems.iter().any(|p| p.contains("labels")),
            "{version}: {problems:?}"
        );

        let mut no_pattern = good_add.clone();
        if let Some(input) = no_pattern["input"].as_object_mut() {
            input.remove("pattern");
        }
        let problems = check(&schema, IMPORT_ADD_OPERATION, add, &no_pattern);
        assert!(
            problems.iter().any(|p| p.contains("pattern")),
            "{version}: {problems:?}"
        );

        let mut wrong_operation = good_patch.clone();
        wrong_operation["input"][0]["operation"] = serde_json::json!("set");
        let problems = check(&schema, IMPORT_PATCH_OPERATION, patch, &wrong_operation);
        assert!(
            !problems.is_empty(),
            "{version}: operation \"set\" must be refused"
        );

        let mut wrong_edit_field = good_patch.clone();
        wrong_edit_field["input"][0]["field"] = serde_json::json!("name");
        let problems = check(&schema, IMPORT_PATCH_OPERATION, patch, &wrong_edit_field);
        assert!(
            problems.iter().any(|p| p.contains("field")),
            "{version}: {problems:?}"
        );

        let bogus = patch.replace("x_opencti_stix_ids", "x_opencti_stix_ids\n    bogus_field");
        let problems = check(&schema, IMPORT_PATCH_OPERATION, &bogus, &good_patch);
        assert!(
            problems.iter().any(|p| p.contains("bogus_field")),
            "{version}: {problems:?}"
        );
    }
    // A 6.9-only input field is refused by 5.12.33 and 6.0.5.
    let mut newer = good_add;
    newer["input"]["x_opencti_modified_at"] = serde_json::json!("2024-03-01T10:00:00Z");
    for version in ["5.12.33", "6.0.5"] {
        let problems = check(&load_schema(version), IMPORT_ADD_OPERATION, add, &newer);
        assert!(
            problems.iter().any(|p| p.contains("x_opencti_modified_at")),
            "{version}: {problems:?}"
        );
    }
}
