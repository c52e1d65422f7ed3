//! The OpenCTI GraphQL client against the GraphQL test double (which validates every
//! request against a real OpenCTI schema and answers with OpenCTI's error shapes).

mod support;

use std::time::Duration;

use serde_json::{json, Value};

use opencti_threatbus::config::{OpenCtiConfig, Secret};
use opencti_threatbus::opencti::connector_state::{classify, ConnectorState, PingVerdict};
use opencti_threatbus::opencti::graphql::{
    ConnectorRegistration, GraphqlClient, GraphqlError, SightingInput, SIGHTING_ADD,
};
use opencti_threatbus::stix::{sighting_from_value, Timestamp};
use support::opencti_graphql::{start, ErrorStyle, GraphqlDouble, GraphqlServer};

const TOKEN: &str = "2b4f3a5e-7c1d-4e8f-9a0b-c1d2e3f4a5b6";
const INDICATOR: &str = "indicator--c7d3e1b2-6a6c-5a4e-9b8f-0d7e4c3a2b1f";
const SIGHTING_ID: &str = "sighting--65184b15-a91d-4ee2-b023-efd239ddb72b";

fn client(server: &GraphqlServer, token: &str) -> GraphqlClient {
    client_with_timeout(server, token, Duration::from_secs(10))
}

fn client_with_timeout(server: &GraphqlServer, token: &str, timeout: Duration) -> GraphqlClient {
    let config = OpenCtiConfig {
        url: server.base_url(),
        token: Secret::new(token),
        ssl_verify: true,
    };
    GraphqlClient::with_timeouts(&config, timeout, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn server() -> GraphqlServer {
    start(GraphqlDouble::new(TOKEN))
}

fn ts(text: &str) -> Timestamp {
    Timestamp::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn sighting_input(id: &str, of: &str, organization: &str) -> SightingInput {
    let sighting = sighting_from_value(&json!({
        "type": "sighting",
        "spec_version": "2.1",
        "id": id,
        "created": "2024-01-02T03:05:00Z",
        "modified": "2024-01-02T03:05:00Z",
        "first_seen": "2024-01-02T04:04:00+01:00",
        "last_seen": "2024-01-02T03:05:00.25Z",
        "count": 7,
        "sighting_of_ref": of,
        "x_threatbus_source": "VAST"
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    SightingInput::from_sighting(&sighting, organization, 65, ts("2030-01-01T00:00:00Z"))
}

fn expect_err<T: std::fmt::Debug>(result: Result<T, GraphqlError>) -> GraphqlError {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(error) => error,
    }
}

#[tokio::test]
async fn organization_get_or_create() {
    let server = server();
    let double = server.double();
    let client = client(&server, TOKEN);

    let id = client
        .get_or_create_organization("Threat Bus", "Threat Bus bridge")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let organizations = double.organizations();
    assert_eq!(organizations.len(), 1);
    assert_eq!(organizations[0].id, id);
    assert_eq!(organizations[0].name, "Threat Bus");
    assert_eq!(
        organizations[0].description.as_deref(),
        Some("Threat Bus bridge")
    );
    // A lookup by name, then the creation.
    let operations: Vec<Option<String>> = double
        .requests()
        .iter()
        .map(|r| r.query.as_deref().and_then(operation_of))
        .collect();
    assert_eq!(
        operations,
        vec![
            Some("StixDomainObjects".to_owned()),
            Some("OrganizationAdd".to_owned())
        ]
    );

    // The second call finds it and creates nothing.
    let again = client
        .get_or_create_organization("Threat Bus", "Threat Bus bridge")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again, id);
    assert_eq!(double.organizations().len(), 1);
    assert_eq!(double.request_count(), 3);

    // An organization that already exists in OpenCTI is found, not created.
    let seeded = double.seed_organization("Zeek sensors", None);
    let found = client
        .get_or_create_organization("Zeek sensors", "ignored")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(found, seeded);
    assert_eq!(double.organizations().len(), 2);
    assert_eq!(
        client
            .find_organization("Nobody")
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        None
    );
}

fn operation_of(query: &str) -> Option<String> {
    let rest = query
        .trim_start()
        .strip_prefix("query ")
        .or_else(|| query.trim_start().strip_prefix("mutation "))?;
    Some(rest.split(['(', ' ', '{']).next()?.to_owned())
}

#[tokio::test]
async fn sighting_is_created_with_every_field() {
    let server = server();
    let double = server.double();
    let indicator = double.seed_indicator_with_standard_id(INDICATOR);
    let client = client(&server, TOKEN);
    let organization = client
        .get_or_create_organization("Threat Bus", "Threat Bus bridge")
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let input = sighting_input(SIGHTING_ID, INDICATOR, &organization);
    let id = client
        .create_sighting(&input)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let sightings = double.sightings();
    assert_eq!(sightings.len(), 1);
    let s = &sightings[0];
    assert_eq!(s.id, id);
    assert_eq!(s.stix_id.as_deref(), Some(SIGHTING_ID));
    assert_eq!(s.standard_id, SIGHTING_ID);
    assert_eq!(s.from_id, INDICATOR);
    assert_eq!(s.to_id, organization);
    assert_eq!(s.created_by.as_deref(), Some(organization.as_str()));
    // UTC, with milliseconds.
    assert_eq!(s.first_seen.as_deref(), Some("2024-01-02T03:04:00.000Z"));
    assert_eq!(s.last_seen.as_deref(), Some("2024-01-02T03:05:00.250Z"));
    assert_eq!(s.attribute_count, Some(7));
    assert_eq!(s.confidence, Some(65));
    assert_eq!(s.x_opencti_negative, Some(false));
    assert_eq!(s.update, Some(true));
    assert_eq!(double.post_count(SIGHTING_ID), 1);

    // The internal id of the indicator is as good as its STIX id.
    let internal = indicator["id"].as_str().unwrap_or_default();
    let mut other = sighting_input(
        "sighting--0a2f6e4c-9a55-4c1e-8f7e-1b3e5d7c9a01",
        INDICATOR,
        &organization,
    );
    other.from_id = internal.to_owned();
    client
        .create_sighting(&other)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(double.sightings().len(), 2);
}

#[tokio::test]
async fn redelivery_upserts_by_stix_id() {
    let server = server();
    let double = server.double();
    double.seed_indicator_with_standard_id(INDICATOR);
    let organization = double.seed_organization("Threat Bus", None);
    let client = client(&server, TOKEN);

    let input = sighting_input(SIGHTING_ID, INDICATOR, &organization);
    let first = client
        .create_sighting(&input)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let second = client
        .create_sighting(&input)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first, second);
    assert_eq!(double.sightings().len(), 1);
    assert_eq!(double.post_count(SIGHTING_ID), 2);
    assert_eq!(double.sighting_posts().len(), 2);

    let other_id = "sighting--0a2f6e4c-9a55-4c1e-8f7e-1b3e5d7c9a01";
    let third = client
        .create_sighting(&sighting_input(other_id, INDICATOR, &organization))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(third, first);
    assert_eq!(double.sightings().len(), 2);
    assert_eq!(double.post_count(other_id), 1);
}

#[tokio::test]
async fn unknown_indicator_is_a_missing_reference() {
    let server = server();
    let double = server.double();
    let organization = double.seed_organization("Threat Bus", None);
    let client = client(&server, TOKEN);
    let input = sighting_input(SIGHTING_ID, INDICATOR, &organization);

    for style in [ErrorStyle::V6, ErrorStyle::V5, ErrorStyle::V4] {
        double.set_error_style(style);
        let error = expect_err(client.create_sighting(&input).await);
        assert!(
            matches!(error, GraphqlError::MissingReference { .. }),
            "{style:?}: {error:?}"
        );
        assert!(error.is_permanent() && !error.is_retryable());
    }
    double.set_error_style(ErrorStyle::V6);
    let error = expect_err(client.create_sighting(&input).await);
    assert!(error.to_string().contains(INDICATOR), "{error}");
    assert!(double.sightings().is_empty());
    assert_eq!(double.post_count(SIGHTING_ID), 4);

    // The double can accept any fromId.
    double.accept_any_from_id(true);
    client
        .create_sighting(&input)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(double.sightings().len(), 1);

    // An unknown organization is a missing reference too.
    let error = expect_err(
        client
            .create_sighting(&sighting_input(SIGHTING_ID, INDICATOR, "no-such-org"))
            .await,
    );
    assert!(matches!(error, GraphqlError::MissingReference { .. }));
}

#[tokio::test]
async fn bad_token_is_auth() {
    let server = server();
    let double = server.double();
    double.seed_indicator_with_standard_id(INDICATOR);
    let organization = double.seed_organization("Threat Bus", None);
    let input = sighting_input(SIGHTING_ID, INDICATOR, &organization);

    let wrong = client(&server, "not-the-token");
    for style in [ErrorStyle::V6, ErrorStyle::V5, ErrorStyle::V4] {
        double.set_error_style(style);
        let error = expect_err(wrong.create_sighting(&input).await);
        assert!(
            matches!(error, GraphqlError::Auth { status: None, .. }),
            "{style:?}: {error:?}"
        );
        assert!(error.is_auth() && error.is_retryable());
        assert!(!format!("{error} {error:?}").contains("not-the-token"));
    }
    double.set_error_style(ErrorStyle::V6);
    assert!(double.requests().iter().all(|r| !r.authorized));
    assert!(double.sightings().is_empty());

    // The right token, refused anyway (a revoked user).
    let right = client(&server, TOKEN);
    double.set_auth_failure(true);
    let error = expect_err(right.get_or_create_organization("Threat Bus", "x").await);
    assert!(error.is_auth(), "{error:?}");
    assert!(!format!("{error} {error:?}").contains(TOKEN));
    double.set_auth_failure(false);
    right
        .create_sighting(&input)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn gateway_and_overload_are_server_errors() {
    let server = server();
    let double = server.double();
    double.seed_indicator_with_standard_id(INDICATOR);
    let organization = double.seed_organization("Threat Bus", None);
    let client = client(&server, TOKEN);
    let input = sighting_input(SIGHTING_ID, INDICATOR, &organization);

    double.set_bad_gateway(true);
    let error = expect_err(client.create_sighting(&input).await);
    assert!(
        matches!(error, GraphqlError::Server { status: 502, .. }),
        "{error:?}"
    );
    assert!(error.is_retryable());
    double.set_bad_gateway(false);

    double.fail_next(1, 503);
    double.fail_next(1, 429);
    let error = expect_err(client.create_sighting(&input).await);
    assert!(
        matches!(error, GraphqlError::Server { status: 503, .. }),
        "{error:?}"
    );
    let error = expect_err(client.create_sighting(&input).await);
    assert!(
        matches!(error, GraphqlError::Server { status: 429, .. }),
        "{error:?}"
    );
    assert!(error.is_retryable());
    // Then it works again; nothing reached execution before.
    client
        .create_sighting(&input)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(double.post_count(SIGHTING_ID), 1);
}

#[tokio::test]
async fn down_is_transport_and_recovery_works() {
    let server = server();
    let double = server.double();
    double.seed_indicator_with_standard_id(INDICATOR);
    let organization = double.seed_organization("Threat Bus", None);
    let client = client(&server, TOKEN);
    let input = sighting_input(SIGHTING_ID, INDICATOR, &organization);
    // A pooled connection exists before the outage.
    client
        .create_sighting(&input)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    server.set_down(true);
    for _ in 0..2 {
        let error = expect_err(client.create_sighting(&input).await);
        assert!(matches!(error, GraphqlError::Transport { .. }), "{error:?}");
        assert!(error.is_retryable());
        assert!(!error.to_string().contains(TOKEN));
    }
    server.set_down(false);
    client
        .create_sighting(&input)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(double.post_count(SIGHTING_ID), 2);
}

#[tokio::test]
async fn slow_answer_is_a_transport_timeout() {
    let server = server();
    let double = server.double();
    let client = client_with_timeout(&server, TOKEN, Duration::from_millis(300));
    double.set_latency(Duration::from_millis(1500));
    let error = expect_err(client.find_organization("Threat Bus").await);
    assert!(matches!(error, GraphqlError::Transport { .. }), "{error:?}");
    assert!(error.to_string().contains("timed out"), "{error}");
    double.set_latency(Duration::ZERO);
    client
        .find_organization("Threat Bus")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn invalid_requests_are_validation_errors() {
    let server = server();
    let double = server.double();
    let client = client(&server, TOKEN);

    // OpenCTI answers 200 with GRAPHQL_VALIDATION_FAILED; a stock server 400.
    for status in [None, Some(400)] {
        double.set_validation_status(status);
        let error = expect_err(
            client
                .execute("query Bogus { bogusField { id } }", json!({}))
                .await,
        );
        assert!(
            matches!(error, GraphqlError::Validation { .. }),
            "{status:?}: {error:?}"
        );
        assert!(error.to_string().contains("bogusField"), "{error}");
        assert!(error.is_permanent());

        // Variables that do not match the schema: BAD_USER_INPUT.
        let error = expect_err(
            client
                .execute(SIGHTING_ADD, json!({ "input": { "fromId": INDICATOR } }))
                .await,
        );
        assert!(
            matches!(error, GraphqlError::Validation { .. }),
            "{status:?}: {error:?}"
        );

        // Not even GraphQL.
        let error = expect_err(client.execute("mutation {", json!({})).await);
        assert!(
            matches!(error, GraphqlError::Validation { .. }),
            "{status:?}: {error:?}"
        );
    }
    let statuses: Vec<u16> = double.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![200, 200, 200, 400, 400, 400]);
    assert!(double.sighting_posts().is_empty());
}

#[tokio::test]
async fn connector_registration_and_ping() {
    let server = server();
    let double = server.double();
    let client = client(&server, TOKEN);
    let registration = ConnectorRegistration {
        id: "a0c3d1e2-1111-4222-8333-944455556666".to_owned(),
        name: "Threat Bus".to_owned(),
    };

    // Ping before registering: OpenCTI's FunctionalError, permanent for that request.
    let error = expect_err(client.ping_connector(&registration.id, None).await);
    assert!(
        matches!(error, GraphqlError::Validation { .. }),
        "{error:?}"
    );

    let registered = client
        .register_connector(&registration)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(registered.id, registration.id);
    assert_eq!(registered.connector_state, None);
    assert!(registered.connector_user_id.is_some());
    assert_eq!(
        double.registrations(),
        vec![json!({
            "id": registration.id,
            "name": "Threat Bus",
            "type": "STREAM",
            "scope": ["threatbus"],
            "auto": false,
            "only_contextual": false,
            "playbook_compatible": false
        })]
    );

    let state = r#"{"start_from": "1709287215731-0"}"#;
    let answered = client
        .ping_connector(&registration.id, Some(state.to_owned()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(answered.as_deref(), Some(state));
    let answered = client
        .ping_connector(&registration.id, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(answered.as_deref(), Some(state));
    let pings = double.pings();
    assert_eq!(pings.len(), 3);
    assert_eq!(pings[1], (registration.id.clone(), Some(state.to_owned())));
    assert_eq!(pings[2], (registration.id.clone(), None));

    // Registering again returns the stored state.
    let again = client
        .register_connector(&registration)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.connector_state.as_deref(), Some(state));
}

/// A reset on the connector's page, as OpenCTI answers it: the next ping gets `''` back and
/// its own state is not stored; the ping after that is stored and answered as usual. The
/// bridge's verdicts on those answers follow.
#[tokio::test]
async fn a_reset_state_is_answered_once_then_pings_store_again() {
    let server = server();
    let double = server.double();
    let client = client(&server, TOKEN);
    let registration = ConnectorRegistration {
        id: "a0c3d1e2-1111-4222-8333-944455556666".to_owned(),
        name: "Threat Bus".to_owned(),
    };
    client
        .register_connector(&registration)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ours = ConnectorState {
        start_from: "1709287215731-0".to_owned(),
        recover_until: None,
    };
    let ping = |state: &ConnectorState| {
        let (client, id, json) = (client.clone(), registration.id.clone(), state.to_json());
        async move {
            client
                .ping_connector(&id, Some(json))
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        }
    };
    assert_eq!(
        classify(&ours, ping(&ours).await.as_deref()),
        PingVerdict::Unchanged
    );

    double.reset_connector_state(&registration.id);
    assert_eq!(ping(&ours).await.as_deref(), Some(""));
    assert_eq!(
        double.connector_state(&registration.id).as_deref(),
        Some("")
    );
    let restarted = ConnectorState {
        start_from: "0-0".to_owned(),
        recover_until: Some("2024-03-01T10:00:00.000Z".to_owned()),
    };
    assert_eq!(
        classify(&restarted, ping(&restarted).await.as_deref()),
        PingVerdict::Unchanged
    );

    let older = ConnectorState {
        start_from: "1709287000000-0".to_owned(),
        recover_until: None,
    };
    double.set_connector_state(&registration.id, &older.to_json());
    assert_eq!(
        classify(&ours, ping(&ours).await.as_deref()),
        PingVerdict::Changed(older)
    );
    assert_eq!(
        classify(&ours, ping(&ours).await.as_deref()),
        PingVerdict::Unchanged
    );

    // A deleted connector: the ping fails, it never reads as a reset.
    double.forget_connector(&registration.id);
    let error = expect_err(
        client
            .ping_connector(&registration.id, Some(ours.to_json()))
            .await,
    );
    assert!(
        matches!(error, GraphqlError::Validation { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn read_indicator_by_either_id() {
    let server = server();
    let double = server.double();
    let seeded = double.seed_indicator_with_standard_id(INDICATOR);
    let client = client(&server, TOKEN);

    let read = client
        .read_indicator(INDICATOR)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("indicator not found"));
    for field in [
        "id",
        "standard_id",
        "pattern",
        "pattern_type",
        "valid_from",
        "x_opencti_score",
        "x_opencti_detection",
        "x_opencti_main_observable_type",
        "revoked",
    ] {
        assert_eq!(read[field], seeded[field], "{field}");
    }
    assert_eq!(read["createdBy"], Value::Null);
    assert_eq!(read["objectLabel"], json!([]));
    // Only what the document selects.
    assert!(read.get("__typename").is_none());

    let internal = seeded["id"].as_str().unwrap_or_default();
    let by_internal = client
        .read_indicator(internal)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(by_internal.as_ref(), Some(&read));

    let missing = client
        .read_indicator("indicator--00000000-0000-4000-8000-000000000000")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(missing, None);
}

/// The whole flow against a double validating with each supported schema.
#[tokio::test]
async fn whole_flow_against_every_schema() {
    for version in ["5.12.33", "6.0.5", "6.9.28"] {
        let server = start(GraphqlDouble::with_schema_version(TOKEN, version));
        let double = server.double();
        assert_eq!(double.schema_version(), version);
        double.seed_indicator_with_standard_id(INDICATOR);
        let client = client(&server, TOKEN);
        let registration = ConnectorRegistration {
            id: "a0c3d1e2-1111-4222-8333-944455556666".to_owned(),
            name: "Threat Bus".to_owned(),
        };
        client
            .register_connector(&registration)
            .await
            .unwrap_or_else(|e| panic!("{version}: {e}"));
        client
            .ping_connector(&registration.id, Some("{}".to_owned()))
            .await
            .unwrap_or_else(|e| panic!("{version}: {e}"));
        let organization = client
            .get_or_create_organization("Threat Bus", "Threat Bus bridge")
            .await
            .unwrap_or_else(|e| panic!("{version}: {e}"));
        client
            .create_sighting(&sighting_input(SIGHTING_ID, INDICATOR, &organization))
            .await
            .unwrap_or_else(|e| panic!("{version}: {e}"));
        client
            .read_indicator(INDICATOR)
            .await
            .unwrap_or_else(|e| panic!("{version}: {e}"))
            .unwrap_or_else(|| panic!("{version}: no indicator"));
        assert_eq!(double.sightings().len(), 1, "{version}");
        assert!(
            double
                .requests()
                .iter()
                .all(|r| r.status == 200 && r.response.get("errors").is_none()),
            "{version}: {:?}",
            double.requests()
        );
    }
}
