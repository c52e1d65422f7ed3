//! Importing indicators from other Threat Bus apps into OpenCTI: the client calls of
//! `opencti::indicator_import` and the decision of `stix::import`, against the GraphQL
//! double (which validates every request against the OpenCTI 5.12.33, 6.0.5 and 6.9.28
//! schemas), as the import drainer will chain them: look up, plan, then create, patch or
//! write nothing.

mod support;

use std::time::Duration;

use serde_json::{json, Value};

use opencti_threatbus::config::{OpenCtiConfig, Secret};
use opencti_threatbus::opencti::graphql::{GraphqlClient, GraphqlError};
use opencti_threatbus::opencti::indicator_import::WrittenIndicator;
use opencti_threatbus::stix::import::{
    plan_import, FieldChange, ImportIndicator, ImportPlan, NoWrite,
};
use support::opencti_graphql::{start, GraphqlDouble, GraphqlServer};

const TOKEN: &str = "2b4f3a5e-7c1d-4e8f-9a0b-c1d2e3f4a5b6";
const VERSIONS: [&str; 3] = ["5.12.33", "6.0.5", "6.9.28"];
const ID: &str = "indicator--8e2e2d2b-17d4-4cbf-938f-98ee46b3cd3f";

fn server(version: &str) -> GraphqlServer {
    start(GraphqlDouble::with_schema_version(TOKEN, version))
}

fn client(server: &GraphqlServer) -> GraphqlClient {
    let config = OpenCtiConfig {
        url: server.base_url(),
        token: Secret::new(TOKEN),
        ssl_verify: true,
    };
    GraphqlClient::with_timeouts(&config, Duration::from_secs(10), Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// An indicator as another app publishes it, with `extra` properties on top.
fn stix(extra: Value) -> ImportIndicator {
    let mut indicator = json!({
        "type": "indicator",
        "spec_version": "2.1",
        "id": ID,
        "created": "2024-03-01T10:00:00Z",
        "modified": "2024-03-01T10:00:00Z",
        "pattern": "[ipv4-addr:value = '203.0.113.7']",
        "pattern_type": "stix",
        "valid_from": "2024-03-01T10:00:00Z",
        "confidence": 60,
    });
    for (key, value) in extra.as_object().cloned().unwrap_or_default() {
        indicator[key] = value;
    }
    ImportIndicator::from_stix(&indicator).unwrap_or_else(|e| panic!("{e}"))
}

/// What the import drainer will do with one indicator: look up, plan, write.
async fn import(
    client: &GraphqlClient,
    indicator: &ImportIndicator,
) -> Result<Outcome, GraphqlError> {
    let target = client.read_import_target(&indicator.stix_id).await?;
    let plan = plan_import(indicator, target.as_ref().map(|t| &t.fields))
        .unwrap_or_else(|e| panic!("{e}"));
    Ok(match plan {
        ImportPlan::Create => Outcome::Created(client.create_indicator(indicator).await?),
        ImportPlan::Patch { id, changes } => {
            let keys = changes.iter().map(FieldChange::key).collect();
            client.patch_indicator(&id, &changes).await?;
            Outcome::Patched(keys)
        }
        ImportPlan::NoWrite(reason) => Outcome::Nothing(reason),
    })
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Created(WrittenIndicator),
    Patched(Vec<&'static str>),
    Nothing(NoWrite),
}

/// Every request the double answered passed its schema validation and raised no error.
fn assert_all_requests_clean(server: &GraphqlServer, version: &str) {
    for request in server.double().requests() {
        assert_eq!(request.status, 200, "{version}: {request:?}");
        assert!(
            request.response.get("errors").is_none(),
            "{version}: {:?} answered {}",
            request.operation_name,
            request.response
        );
    }
}

/// No request failed the double's schema validation (other errors may be expected).
fn assert_all_requests_schema_valid(server: &GraphqlServer, version: &str) {
    for request in server.double().requests() {
        let errors = request.response.get("errors").and_then(Value::as_array);
        for error in errors.map(Vec::as_slice).unwrap_or_default() {
            let code = error.pointer("/extensions/code").and_then(Value::as_str);
            assert!(
                !matches!(
                    code,
                    Some("GRAPHQL_VALIDATION_FAILED" | "BAD_USER_INPUT" | "GRAPHQL_PARSE_FAILED")
                ),
                "{version}: {:?} failed validation: {error}",
                request.operation_name
            );
        }
    }
}

#[tokio::test]
async fn new_changed_unchanged_and_remove_against_every_schema() {
    for version in VERSIONS {
        let server = server(version);
        let double = server.double().clone();
        let client = client(&server);

        // New: created with its STIX id kept, found by it afterwards.
        let first = stix(json!({}));
        let Outcome::Created(written) = import(&client, &first).await.unwrap() else {
            panic!("{version}: a new indicator must be created");
        };
        assert!(written.stix_ids.contains(&ID.to_owned()) || written.standard_id == ID);
        let held = double
            .indicator(ID)
            .unwrap_or_else(|| panic!("{version}: not stored"));
        assert_eq!(held["name"], "[ipv4-addr:value = '203.0.113.7']");
        assert_eq!(held["x_opencti_main_observable_type"], "IPv4-Addr");
        assert_eq!(held["modified"], "2024-03-01T10:00:00.000Z");
        assert_eq!(double.indicator_writes(ID), 1);
        let add = &double.indicator_adds()[0];
        assert_eq!(add["stix_id"], ID);
        assert_eq!(add["update"], false);

        // The same version again (a re-delivery, an echo relayed by another app): nothing.
        assert_eq!(
            import(&client, &first).await.unwrap(),
            Outcome::Nothing(NoWrite::NotNewer)
        );
        // Newer but adding nothing (absent fields, the same instants spelled otherwise).
        let unchanged = stix(json!({
            "modified": "2024-03-02T00:00:00Z",
            "valid_from": "2024-03-01T11:00:00+01:00",
            "confidence": null,
        }));
        assert_eq!(
            import(&client, &unchanged).await.unwrap(),
            Outcome::Nothing(NoWrite::NothingNew)
        );
        assert_eq!(
            double.indicator_writes(ID),
            1,
            "{version}: unchanged ones write nothing"
        );

        // Changed: only what differs is patched, including a new pattern for the STIX id.
        let changed = stix(json!({
            "modified": "2024-03-03T00:00:00Z",
            "description": "seen by Zeek",
            "pattern": "[ipv4-addr:value = '203.0.113.8']",
            "valid_until": "2024-06-01T00:00:00Z",
        }));
        assert_eq!(
            import(&client, &changed).await.unwrap(),
            Outcome::Patched(vec!["description", "pattern", "valid_until"])
        );
        let held = double
            .indicator(ID)
            .unwrap_or_else(|| panic!("{version}: lost by its STIX id"));
        assert_eq!(held["description"], "seen by Zeek");
        assert_eq!(held["pattern"], "[ipv4-addr:value = '203.0.113.8']");
        assert_eq!(held["valid_until"], "2024-06-01T00:00:00.000Z");
        assert_eq!(held["confidence"], 60, "{version}: untouched fields stay");
        assert_eq!(double.indicator_writes(ID), 2);
        let patches = double.indicator_patches();
        assert_eq!(patches.len(), 1);
        assert_eq!(patches[0].1.as_array().map(Vec::len), Some(3));

        // That version again, after OpenCTI stamped its own `modified`: nothing.
        assert_eq!(
            import(&client, &changed).await.unwrap(),
            Outcome::Nothing(NoWrite::NotNewer)
        );
        // REMOVE from another app: ignored, OpenCTI keeps the indicator.
        let remove =
            stix(json!({"modified": "2030-01-01T00:00:00Z", "x_threatbus_update": "REMOVE"}));
        assert_eq!(
            import(&client, &remove).await.unwrap(),
            Outcome::Nothing(NoWrite::Remove)
        );
        assert!(double.indicator(ID).is_some());
        assert_eq!(
            double.indicator_writes(ID),
            2,
            "{version}: no write beyond create + patch"
        );
        assert_eq!(double.indicator_adds().len(), 1);
        assert_all_requests_clean(&server, version);
    }
}

/// OpenCTI refuses what the bridge's light pattern check lets through: a permanent
/// error (a dead-letter candidate) carrying OpenCTI's message.
#[tokio::test]
async fn a_rejected_input_is_permanent_with_opencti_message() {
    for version in VERSIONS {
        let server = server(version);
        let client = client(&server);
        let bad = stix(json!({"pattern": "[ipv4-addr:value = ]"}));
        let error = import(&client, &bad).await.unwrap_err();
        assert!(error.is_permanent(), "{version}: {error:?}");
        assert!(
            matches!(error, GraphqlError::Validation { .. }),
            "{version}: {error:?}"
        );
        assert!(
            error.to_string().contains("not correctly formatted"),
            "{error}"
        );
        assert!(server.double().indicator(ID).is_none());
        assert_all_requests_schema_valid(&server, version);
    }
}

#[tokio::test]
async fn patch_edge_cases_and_outages() {
    let server = server("6.9.28");
    let double = server.double().clone();
    let client = client(&server);

    // An empty patch never reaches OpenCTI.
    let before = double.request_count();
    let error = client.patch_indicator("anything", &[]).await.unwrap_err();
    assert!(error.is_permanent());
    assert_eq!(double.request_count(), before);

    // A patch of an indicator OpenCTI does not have is refused, permanently.
    let error = client
        .patch_indicator(
            "5b0a4c37-2d1e-4f0a-9d4b-0a1b2c3d4e5f",
            &[FieldChange::Confidence(10)],
        )
        .await
        .unwrap_err();
    assert!(error.is_permanent(), "{error:?}");

    // OpenCTI down behind its proxy: retryable, and nothing was written.
    double.set_bad_gateway(true);
    let error = import(&client, &stix(json!({}))).await.unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    double.set_bad_gateway(false);
    assert!(matches!(
        import(&client, &stix(json!({}))).await,
        Ok(Outcome::Created(_))
    ));
    assert_eq!(double.indicator_writes(ID), 1);

    // Another app's indicator with the pattern of one OpenCTI already has: OpenCTI
    // upserts (its standard id comes from the pattern), and the new STIX id finds it.
    let other_id = "indicator--1f0e2d3c-4b5a-4697-8877-665544332211";
    let mut same_pattern = stix(json!({"modified": "2024-03-05T00:00:00Z"}));
    same_pattern.stix_id = other_id.to_owned();
    assert!(matches!(
        import(&client, &same_pattern).await,
        Ok(Outcome::Created(_))
    ));
    let target = client.read_import_target(other_id).await.unwrap();
    let original = client.read_import_target(ID).await.unwrap();
    assert_eq!(target.map(|t| t.id), original.map(|t| t.id));
    assert_all_requests_schema_valid(&server, "6.9.28");
}
