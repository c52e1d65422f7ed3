//! Classification of canned answers, in the shapes OpenCTI really sends.
//!
//! Shapes, from the OpenCTI sources (`opencti-platform/opencti-graphql`):
//! - ≥ 6.x `src/config/errors.ts`/`errors.js`: `new GraphQLError(message, { extensions:
//!   { code, data } })`, e.g. code `MISSING_REFERENCE_ERROR`, message `Element(s) not
//!   found`, data `{ http_status: 404, genre: "BUSINESS", unresolvedIds, doc_code:
//!   "ELEMENT_NOT_FOUND" }` (thrown by `inputResolveRefs` in `src/database/middleware.js`).
//! - 5.x `errors.js`: the same with `extensions: { code, name, data }`.
//! - 4.x `errors.js` (apollo-errors): top-level `name` (`MissingReferenceError`,
//!   `AuthRequired`, …), `data: { reason, http_status, category }`, `time_thrown`.
//! - `src/graphql/httpResponsePlugin.js` forces HTTP 200 whenever there are errors; a bad
//!   token leaves the context without a user, so the `@auth` directive throws
//!   `AUTH_REQUIRED` ("You must be logged in to do this.") for the field.

use super::*;
use serde_json::json;

fn body(value: Value) -> Vec<u8> {
    serde_json::to_vec(&value).unwrap_or_else(|e| panic!("{e}"))
}

fn classify(status: u16, value: Value) -> GraphqlError {
    match classify_response(status, &body(value)) {
        Ok(data) => panic!("expected an error, got data {data:?}"),
        Err(e) => e,
    }
}

fn classify_raw(status: u16, raw: &str) -> GraphqlError {
    match classify_response(status, raw.as_bytes()) {
        Ok(data) => panic!("expected an error, got data {data:?}"),
        Err(e) => e,
    }
}

const INDICATOR_ID: &str = "indicator--c7d3e1b2-6a6c-5a4e-9b8f-0d7e4c3a2b1f";

fn missing_reference_6x() -> Value {
    json!({
        "errors": [{
            "message": "Element(s) not found",
            "locations": [{"line": 2, "column": 3}],
            "path": ["stixSightingRelationshipAdd"],
            "extensions": {
                "code": "MISSING_REFERENCE_ERROR",
                "data": {
                    "http_status": 404,
                    "genre": "BUSINESS",
                    "unresolvedIds": [INDICATOR_ID],
                    "doc_code": "ELEMENT_NOT_FOUND"
                }
            }
        }],
        "data": {"stixSightingRelationshipAdd": null}
    })
}

#[test]
fn success_returns_data() {
    let data = classify_response(
        200,
        &body(json!({"data": {"stixSightingRelationshipAdd": {"id": "x"}}})),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(data["stixSightingRelationshipAdd"]["id"], "x");
    // An empty errors array is no error.
    assert!(classify_response(200, &body(json!({"errors": [], "data": {"a": 1}}))).is_ok());
}

#[test]
fn missing_reference_in_every_version() {
    let e = classify(200, missing_reference_6x());
    assert!(matches!(e, GraphqlError::MissingReference { .. }), "{e:?}");
    assert!(e.is_permanent() && !e.is_retryable());
    let text = e.to_string();
    assert!(text.contains("MISSING_REFERENCE_ERROR"), "{text}");
    assert!(text.contains(INDICATOR_ID), "{text}");

    // 5.x: code and name in extensions.
    let v5 = json!({"errors": [{
        "message": "Element(s) not found",
        "path": ["stixSightingRelationshipAdd"],
        "extensions": {"code": "MISSING_REFERENCE_ERROR", "name": "MISSING_REFERENCE_ERROR",
                       "data": {"http_status": 404, "genre": "BUSINESS"}}
    }], "data": {"stixSightingRelationshipAdd": null}});
    assert!(matches!(
        classify(200, v5),
        GraphqlError::MissingReference { .. }
    ));

    // 4.x (apollo-errors): top-level name and data.
    let v4 = json!({"errors": [{
        "message": "Element not found",
        "name": "MissingReferenceError",
        "time_thrown": "2021-05-04T10:00:00.000Z",
        "data": {"reason": "Missing reference to handle creation", "http_status": 404,
                 "category": "business"},
        "path": ["stixSightingRelationshipAdd"],
        "locations": [{"line": 2, "column": 3}]
    }], "data": {"stixSightingRelationshipAdd": null}});
    let e = classify(200, v4);
    assert!(matches!(e, GraphqlError::MissingReference { .. }), "{e:?}");
    assert!(e
        .to_string()
        .contains("Missing reference to handle creation"));

    // Only the doc_code, or only the message.
    let doc_code = json!({"errors": [{"message": "x", "extensions": {"data": {"doc_code": "ELEMENT_NOT_FOUND"}}}]});
    assert!(matches!(
        classify(200, doc_code),
        GraphqlError::MissingReference { .. }
    ));
    let message_only = json!({"errors": [{"message": "Element not found"}]});
    assert!(matches!(
        classify(200, message_only),
        GraphqlError::MissingReference { .. }
    ));
}

#[test]
fn bad_token_is_auth() {
    // What OpenCTI ≥ 6 answers for a bad token (HTTP 200).
    let v6 = json!({"errors": [{
        "message": "You must be logged in to do this.",
        "locations": [{"line": 2, "column": 3}],
        "path": ["stixSightingRelationshipAdd"],
        "extensions": {"code": "AUTH_REQUIRED", "data": {"http_status": 401, "genre": "TECHNICAL"}}
    }], "data": {"stixSightingRelationshipAdd": null}});
    let e = classify(200, v6);
    assert_eq!(
        e,
        GraphqlError::Auth {
            status: None,
            message: "AUTH_REQUIRED: You must be logged in to do this.".to_owned()
        }
    );
    assert!(e.is_retryable() && e.is_auth());

    let forbidden = json!({"errors": [{"message": "You are not allowed to do this.",
        "extensions": {"code": "FORBIDDEN_ACCESS", "data": {"http_status": 403, "genre": "TECHNICAL"}}}]});
    assert!(classify(200, forbidden).is_auth());
    let v4 = json!({"errors": [{"message": "You must be logged in to do this.", "name": "AuthRequired",
        "data": {"http_status": 401, "category": "technical"}}]});
    assert!(classify(200, v4).is_auth());
    let v4_forbidden = json!({"errors": [{"message": "You are not allowed to do this.", "name": "ForbiddenAccess"}]});
    assert!(classify(200, v4_forbidden).is_auth());
    let apollo =
        json!({"errors": [{"message": "nope", "extensions": {"code": "UNAUTHENTICATED"}}]});
    assert!(classify(200, apollo).is_auth());
    let otp = json!({"errors": [{"message": "You must validate your account with 2FA.",
        "extensions": {"code": "OTP_REQUIRED"}}]});
    assert!(classify(200, otp).is_auth());

    // HTTP statuses, e.g. from a proxy.
    assert_eq!(
        classify_raw(401, "Unauthorized"),
        GraphqlError::Auth {
            status: Some(401),
            message: "HTTP 401: Unauthorized".to_owned()
        }
    );
    assert!(matches!(
        classify_raw(403, ""),
        GraphqlError::Auth {
            status: Some(403),
            ..
        }
    ));
}

#[test]
fn validation_errors() {
    // OpenCTI: HTTP 200 (httpResponsePlugin) with Apollo's codes.
    let unknown_field = json!({"errors": [{
        "message": "Cannot query field \"bogus\" on type \"Indicator\".",
        "locations": [{"line": 3, "column": 5}],
        "extensions": {"code": "GRAPHQL_VALIDATION_FAILED"}
    }]});
    let e = classify(200, unknown_field.clone());
    assert!(matches!(e, GraphqlError::Validation { .. }), "{e:?}");
    assert!(e.is_permanent());
    let bad_input = json!({"errors": [{
        "message": "Variable \"$input\" got invalid value {}; Field \"attribute_count\" of required type \"Int!\" was not provided.",
        "extensions": {"code": "BAD_USER_INPUT"}
    }]});
    assert!(matches!(
        classify(200, bad_input),
        GraphqlError::Validation { .. }
    ));
    for code in [
        "GRAPHQL_PARSE_FAILED",
        "FUNCTIONAL_ERROR",
        "VALIDATION_ERROR",
        "ERR_GRAPHQL_CONSTRAINT_VALIDATION",
        "FunctionalError",
    ] {
        let v = json!({"errors": [{"message": "m", "extensions": {"code": code}}]});
        assert!(
            matches!(classify(200, v), GraphqlError::Validation { .. }),
            "{code}"
        );
    }

    // Stock servers: 400, with or without codes, or with no JSON at all.
    assert!(matches!(
        classify(400, unknown_field),
        GraphqlError::Validation { .. }
    ));
    let no_code =
        json!({"errors": [{"message": "Cannot query field \"bogus\" on type \"Query\"."}]});
    assert!(matches!(
        classify(400, no_code.clone()),
        GraphqlError::Validation { .. }
    ));
    // graphql-js's message is recognized without a code even with HTTP 200.
    assert!(matches!(
        classify(200, no_code),
        GraphqlError::Validation { .. }
    ));
    let odd = json!({"errors": [{"message": "something else"}]});
    assert!(matches!(
        classify(400, odd),
        GraphqlError::Validation { .. }
    ));
    assert!(matches!(
        classify_raw(400, "POST body missing."),
        GraphqlError::Validation { .. }
    ));
}

#[test]
fn server_statuses_are_retryable() {
    for status in [500, 502, 503, 504, 429, 408] {
        let e = classify_raw(
            status,
            "<html><body><h1>502 Bad Gateway</h1>\n</body></html>",
        );
        assert!(
            matches!(e, GraphqlError::Server { status: s, .. } if s == status),
            "{e:?}"
        );
        assert!(e.is_retryable() && !e.is_auth());
    }
    let e = classify_raw(502, "<html>\n  <h1>502   Bad Gateway</h1></html>");
    assert_eq!(
        e.to_string(),
        "OpenCTI answered HTTP 502: <html> <h1>502 Bad Gateway</h1></html>"
    );
}

#[test]
fn other_errors_are_retryable() {
    for code in [
        "LOCK_ERROR",
        "DATABASE_ERROR",
        "UNKNOWN_ERROR",
        "INTERNAL_SERVER_ERROR",
    ] {
        let v = json!({"errors": [{"message": "m", "extensions": {"code": code}}], "data": null});
        let e = classify(200, v);
        assert!(matches!(e, GraphqlError::Other { .. }), "{code}: {e:?}");
        assert!(e.is_retryable());
    }
    assert!(matches!(
        classify_raw(200, "<html>maintenance</html>"),
        GraphqlError::Other { .. }
    ));
    assert!(matches!(
        classify(200, json!({"data": null})),
        GraphqlError::Other { .. }
    ));
    assert!(matches!(
        classify_raw(404, "Cannot POST /graphql"),
        GraphqlError::Other { .. }
    ));
}

#[test]
fn several_errors() {
    let auth = json!({"message": "You must be logged in to do this.", "extensions": {"code": "AUTH_REQUIRED"}});
    let missing = missing_reference_6x()["errors"][0].clone();
    let validation = json!({"message": "m", "extensions": {"code": "GRAPHQL_VALIDATION_FAILED"}});
    let transient = json!({"message": "m", "extensions": {"code": "DATABASE_ERROR"}});
    let errors = |list: Vec<Value>| json!({ "errors": list });
    // Authentication wins.
    assert!(classify(200, errors(vec![missing.clone(), auth])).is_auth());
    // Permanent only if every error is.
    assert!(matches!(
        classify(200, errors(vec![validation.clone(), transient])),
        GraphqlError::Other { .. }
    ));
    let e = classify(200, errors(vec![validation, missing]));
    assert!(matches!(e, GraphqlError::MissingReference { .. }), "{e:?}");
    assert!(e.to_string().contains("; "));
}

#[test]
fn long_bodies_are_cut() {
    let long = "x".repeat(10_000);
    let e = classify_raw(503, &long);
    assert!(e.to_string().chars().count() < 400, "{e}");
}

fn sighting(json: Value) -> Sighting {
    crate::stix::sighting_from_value(&json).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn sighting_variables() {
    let s = sighting(json!({
        "type": "sighting", "spec_version": "2.1",
        "id": "sighting--65184b15-a91d-4ee2-b023-efd239ddb72b",
        "last_seen": "2024-01-02T04:05:00+01:00",
        "sighting_of_ref": INDICATOR_ID,
        "count": 3
    }));
    let received = Timestamp::parse("2030-01-01T00:00:00Z").unwrap_or_else(|e| panic!("{e}"));
    let input = SightingInput::from_sighting(&s, "org-internal-id", 75, received);
    assert_eq!(
        sighting_add_variables(&input),
        json!({"input": {
            "stix_id": "sighting--65184b15-a91d-4ee2-b023-efd239ddb72b",
            "fromId": INDICATOR_ID,
            "toId": "org-internal-id",
            "createdBy": "org-internal-id",
            "first_seen": "2024-01-02T03:05:00.000Z",
            "last_seen": "2024-01-02T03:05:00.000Z",
            "attribute_count": 3,
            "x_opencti_negative": false,
            "confidence": 75,
            "update": true
        }})
    );
    // No count: 1; no times: the receipt time.
    let s = sighting(json!({
        "type": "sighting", "spec_version": "2.1",
        "id": "sighting--65184b15-a91d-4ee2-b023-efd239ddb72b",
        "sighting_of_ref": INDICATOR_ID
    }));
    let input = SightingInput::from_sighting(&s, "o", 50, received);
    assert_eq!(input.attribute_count, 1);
    assert_eq!(input.first_seen, "2030-01-01T00:00:00.000Z");
    assert_eq!(input.last_seen, "2030-01-01T00:00:00.000Z");
}

#[test]
fn connector_variables() {
    let registration = ConnectorRegistration {
        id: "a0c3d1e2-1111-4222-8333-944455556666".to_owned(),
        name: "Threat Bus".to_owned(),
    };
    assert_eq!(
        register_connector_variables(&registration),
        json!({"input": {
            "id": "a0c3d1e2-1111-4222-8333-944455556666",
            "name": "Threat Bus",
            "type": "STREAM",
            "scope": ["threatbus"],
            "auto": false,
            "only_contextual": false,
            "playbook_compatible": false
        }})
    );
    assert_eq!(
        ping_connector_variables("i", None),
        json!({"id": "i", "state": null})
    );
    assert_eq!(
        ping_connector_variables("i", Some("{}")),
        json!({"id": "i", "state": "{}"})
    );
}

#[test]
fn client_never_shows_the_token() {
    let config = OpenCtiConfig {
        url: "http://127.0.0.1:9/".to_owned(),
        token: crate::config::Secret::new("very-secret-token-value"),
        ssl_verify: true,
    };
    let client = GraphqlClient::new(&config).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(client.endpoint(), "http://127.0.0.1:9/graphql");
    let debug = format!("{client:?}");
    assert!(!debug.contains("very-secret"), "{debug}");

    let bad = OpenCtiConfig {
        token: crate::config::Secret::new("line\nbreak-secret"),
        ..config
    };
    let error = GraphqlClient::new(&bad).map(|_| ()).unwrap_err();
    assert_eq!(error, ClientBuildError::TokenNotAHeaderValue);
    assert!(!error.to_string().contains("secret"));
}
