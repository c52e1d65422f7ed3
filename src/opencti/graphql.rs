//! The OpenCTI GraphQL client: connector registration and ping, the connector's
//! organization, sighting relationships, and indicator reads (SPEC §3 "Sightings to
//! OpenCTI", "Registration").
//!
//! Every document sent is one of the constants below; [`all_documents`] lists them and
//! the `*_variables` functions build the variables, so that `tests/graphql_documents.rs`
//! validates exactly what goes on the wire against the OpenCTI 5.12.33, 6.0.5 and 6.9.28
//! schemas. The documents are those of `opencti/queries-minimal/`: only fields and input
//! fields that exist in all three versions.
//!
//! Failures are classified into [`GraphqlError`] variants, from which the drainer decides
//! between retrying and dead-lettering. OpenCTI answers HTTP 200 with an `errors` array for
//! every GraphQL-level failure (its `httpResponsePlugin` forces the status), including an
//! invalid document or a bad token; a stock GraphQL server answers 400 for an invalid
//! document. Both are handled by [`classify_response`].
//!
//! The token is only ever in the `Authorization` header, marked sensitive; it is never
//! formatted into a log line or an error.

use std::fmt;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use serde_json::{json, Map, Value};

use crate::config::{ConnectorConfig, OpenCtiConfig};
use crate::stix::{sighting_times_utc, Sighting, Timestamp};

/// Whole-request timeout (connect, send, wait for and read the answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of the TCP (and TLS) connection alone.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `RegisterConnectorInput.type`: the bridge is a stream connector.
pub const CONNECTOR_TYPE: &str = "STREAM";
/// `RegisterConnectorInput.scope`.
pub const CONNECTOR_SCOPE: &str = "threatbus";

/// How much of an unexpected response body goes into an error message.
const BODY_SNIPPET_CHARS: usize = 300;

// ---------------------------------------------------------------------------------------
// Documents (from opencti/queries-minimal/, valid against 5.12.33, 6.0.5 and 6.9.28)
// ---------------------------------------------------------------------------------------

/// `registerConnector`, sent once at start.
pub const REGISTER_CONNECTOR: &str = r#"mutation RegisterConnector($input: RegisterConnectorInput) {
  registerConnector(input: $input) {
    id
    connector_state
    connector_user_id
  }
}
"#;

/// `pingConnector`, sent every `connector.ping_interval_s` (40 s) with the connector state.
pub const PING_CONNECTOR: &str = r#"mutation PingConnector($id: ID!, $state: String) {
  pingConnector(id: $id, state: $state) {
    id
    connector_state
  }
}
"#;

/// Looks an organization up by name (`FilterGroup`, the filter format of OpenCTI ≥ 5.12).
pub const ORGANIZATION_BY_NAME: &str = r#"query StixDomainObjects($types: [String], $filters: FilterGroup, $first: Int) {
  stixDomainObjects(types: $types, filters: $filters, first: $first) {
    edges {
      node {
        id
        standard_id
        entity_type
        ... on Identity {
          name
        }
      }
    }
  }
}
"#;

/// Creates the connector's organization (OpenCTI upserts it by name if it exists).
pub const ORGANIZATION_ADD: &str = r#"mutation OrganizationAdd($input: OrganizationAddInput!) {
  organizationAdd(input: $input) {
    id
    standard_id
    entity_type
    parent_types
  }
}
"#;

/// Creates (or, through `stix_id`, upserts) one sighting relationship.
pub const SIGHTING_ADD: &str = r#"mutation StixSightingRelationshipAdd($input: StixSightingRelationshipAddInput!) {
  stixSightingRelationshipAdd(input: $input) {
    id
    standard_id
    entity_type
    parent_types
  }
}
"#;

/// Reads an indicator, for OpenCTI 4.x updates that carry only a patch.
pub const INDICATOR: &str = r#"query Indicator($id: String!) {
  indicator(id: $id) {
    id
    standard_id
    entity_type
    created
    modified
    revoked
    confidence
    name
    description
    pattern
    pattern_type
    pattern_version
    indicator_types
    valid_from
    valid_until
    x_opencti_score
    x_opencti_detection
    x_opencti_main_observable_type
    createdBy {
      id
      standard_id
    }
    objectMarking {
      standard_id
      definition
    }
    objectLabel {
      value
    }
  }
}
"#;

/// Every document the client can send, by operation name.
pub fn all_documents() -> Vec<(&'static str, &'static str)> {
    let mut documents = vec![
        ("RegisterConnector", REGISTER_CONNECTOR),
        ("PingConnector", PING_CONNECTOR),
        ("StixDomainObjects", ORGANIZATION_BY_NAME),
        ("OrganizationAdd", ORGANIZATION_ADD),
        ("StixSightingRelationshipAdd", SIGHTING_ADD),
        ("Indicator", INDICATOR),
    ];
    documents.extend(super::indicator_import::import_documents());
    documents
}

// ---------------------------------------------------------------------------------------
// Variables (pure: the client and the schema test build them the same way)
// ---------------------------------------------------------------------------------------

/// What `registerConnector` announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorRegistration {
    /// `connector.id` (a UUIDv4).
    pub id: String,
    /// `connector.name`.
    pub name: String,
}

impl ConnectorRegistration {
    pub fn from_config(connector: &ConnectorConfig) -> Self {
        ConnectorRegistration {
            id: connector.id.to_string(),
            name: connector.name.clone(),
        }
    }
}

/// `registerConnector` variables: exactly what pycti 6.0.5 sends (all of its fields exist
/// in 5.12.33, 6.0.5 and 6.9.28); the 6.9 additions (`auto_update`,
/// `enrichment_resolution`, `listen_callback_uri`) are left out.
pub fn register_connector_variables(registration: &ConnectorRegistration) -> Value {
    json!({
        "input": {
            "id": registration.id,
            "name": registration.name,
            "type": CONNECTOR_TYPE,
            "scope": [CONNECTOR_SCOPE],
            "auto": false,
            "only_contextual": false,
            "playbook_compatible": false,
        }
    })
}

/// `pingConnector` variables. `state` is the connector state as a JSON string, in pycti's
/// shape `{"start_from": …, "recover_until": …}` ([`super::connector_state`]).
pub fn ping_connector_variables(id: &str, state: Option<&str>) -> Value {
    json!({ "id": id, "state": state })
}

/// `stixDomainObjects` variables looking an organization up by exact name.
pub fn organization_by_name_variables(name: &str) -> Value {
    json!({
        "types": ["Organization"],
        "filters": {
            "mode": "and",
            "filters": [{ "key": "name", "values": [name] }],
            "filterGroups": [],
        },
        "first": 10,
    })
}

/// `organizationAdd` variables.
pub fn organization_add_variables(name: &str, description: &str) -> Value {
    json!({
        "input": {
            "name": name,
            "description": description,
            "update": false,
        }
    })
}

/// One Threat Bus sighting as OpenCTI's `StixSightingRelationshipAddInput` wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SightingInput {
    /// The Threat Bus sighting's own id (`sighting--…`): the relationship's `stix_id`, so
    /// that a re-delivery upserts the same relationship instead of adding another.
    pub stix_id: String,
    /// `fromId`: the sighted object's STIX id (OpenCTI resolves standard ids).
    pub from_id: String,
    /// `toId` and `createdBy`: the connector's organization (internal id).
    pub organization_id: String,
    /// UTC, `…Z`.
    pub first_seen: String,
    /// UTC, `…Z`.
    pub last_seen: String,
    /// `count`, or 1.
    pub attribute_count: u32,
    /// `connector.confidence_level`.
    pub confidence: u8,
}

impl SightingInput {
    /// Builds the input for `sighting`; `received_at` is when the bridge received it (the
    /// last fallback of `first_seen`/`last_seen`).
    pub fn from_sighting(
        sighting: &Sighting,
        organization_id: &str,
        confidence: u8,
        received_at: Timestamp,
    ) -> Self {
        let (first_seen, last_seen) = sighting_times_utc(sighting, received_at);
        SightingInput {
            stix_id: sighting.id.clone(),
            from_id: sighting.sighting_of_ref.clone(),
            organization_id: organization_id.to_owned(),
            first_seen,
            last_seen,
            attribute_count: sighting.attribute_count(),
            confidence,
        }
    }
}

/// `stixSightingRelationshipAdd` variables. `update: true` (valid in all three schemas)
/// makes an upsert through `stix_id` write the values sent, which are the same on a
/// re-delivery.
pub fn sighting_add_variables(input: &SightingInput) -> Value {
    json!({
        "input": {
            "stix_id": input.stix_id,
            "fromId": input.from_id,
            "toId": input.organization_id,
            "createdBy": input.organization_id,
            "first_seen": input.first_seen,
            "last_seen": input.last_seen,
            "attribute_count": input.attribute_count,
            "x_opencti_negative": false,
            "confidence": input.confidence,
            "update": true,
        }
    })
}

/// `indicator` variables: an internal id or a STIX id.
pub fn indicator_variables(id: &str) -> Value {
    json!({ "id": id })
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Why a GraphQL call failed, classified for the retry decision (see [`is_retryable`]).
///
/// [`is_retryable`]: GraphqlError::is_retryable
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphqlError {
    /// OpenCTI could not be reached or did not answer in time (connection refused or
    /// reset, DNS, TLS, timeout): retry forever with backoff.
    #[error("OpenCTI unreachable: {message}")]
    Transport { message: String },
    /// OpenCTI (or a proxy in front of it) is overloaded or failing: HTTP 5xx, 408 or
    /// 429. Retry with backoff.
    #[error("OpenCTI answered HTTP {status}: {message}")]
    Server { status: u16, message: String },
    /// The token was refused or lacks a capability: HTTP 401/403, or a GraphQL error such
    /// as `AUTH_REQUIRED` or `FORBIDDEN_ACCESS`. Retry slowly and log loudly: it needs
    /// an operator, and nothing is lost meanwhile.
    #[error("OpenCTI refused the request (authentication or permission): {message}")]
    Auth {
        /// The HTTP status when it said so (401/403), `None` for a GraphQL error.
        status: Option<u16>,
        message: String,
    },
    /// OpenCTI does not know an object the request refers to (`MISSING_REFERENCE_ERROR`),
    /// e.g. a sighting of an indicator it never had. Permanent, unless the object
    /// arrives later: dead letter after a few attempts.
    #[error("OpenCTI does not know a referenced object: {message}")]
    MissingReference { message: String },
    /// The request itself is invalid: the document or the variables do not match the
    /// schema (`GRAPHQL_VALIDATION_FAILED`, `BAD_USER_INPUT`, a stock server's HTTP 400),
    /// or OpenCTI rejected the input (`FUNCTIONAL_ERROR`, `VALIDATION_ERROR`). Permanent:
    /// dead letter after a few attempts.
    #[error("OpenCTI rejected the request as invalid: {message}")]
    Validation { message: String },
    /// Anything else (an unexpected answer, an internal or database error, a lock
    /// timeout): retry with backoff.
    #[error("OpenCTI request failed: {message}")]
    Other { message: String },
}

impl GraphqlError {
    /// Worth trying again later: everything but [`MissingReference`] and [`Validation`].
    ///
    /// [`MissingReference`]: GraphqlError::MissingReference
    /// [`Validation`]: GraphqlError::Validation
    pub fn is_retryable(&self) -> bool {
        !self.is_permanent()
    }

    /// The same request will fail the same way: a dead-letter candidate.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            GraphqlError::MissingReference { .. } | GraphqlError::Validation { .. }
        )
    }

    /// An authentication or permission problem: retry slowly and tell the operator.
    pub fn is_auth(&self) -> bool {
        matches!(self, GraphqlError::Auth { .. })
    }

    /// A short, stable name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            GraphqlError::Transport { .. } => "transport",
            GraphqlError::Server { .. } => "server",
            GraphqlError::Auth { .. } => "auth",
            GraphqlError::MissingReference { .. } => "missing_reference",
            GraphqlError::Validation { .. } => "validation",
            GraphqlError::Other { .. } => "other",
        }
    }
}

/// Why a [`GraphqlClient`] cannot be built (a configuration problem, found at start).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientBuildError {
    /// The token cannot be sent in an HTTP header (control characters, non-ASCII…).
    #[error(
        "opencti.token (OPENCTI_TOKEN) contains characters that cannot be sent in an HTTP header"
    )]
    TokenNotAHeaderValue,
    /// The HTTP client could not be set up (TLS backend).
    #[error("cannot set up the HTTP client for OpenCTI: {0}")]
    Http(String),
}

/// GraphQL error codes (normalized: upper case, letters and digits only) meaning an
/// authentication or permission failure. OpenCTI ≥ 5 puts them in `extensions.code`
/// (`AUTH_REQUIRED`, …), 4.x in the error's `name` (`AuthRequired`, …); `UNAUTHENTICATED`
/// and `FORBIDDEN` are Apollo's stock codes.
const AUTH_CODES: &[&str] = &[
    "AUTHREQUIRED",
    "AUTHFAILURE",
    "FORBIDDENACCESS",
    "OTPREQUIRED",
    "OTPREQUIREDACTIVATION",
    "PASSWORDCHANGEREQUIRED",
    "LTSREQUIREDACTIVATION",
    "UNAUTHENTICATED",
    "FORBIDDEN",
];

/// Codes meaning a missing reference: `MISSING_REFERENCE_ERROR` (≥ 5),
/// `MissingReferenceError` (4.x), and the `doc_code` `ELEMENT_NOT_FOUND` OpenCTI 6.x adds
/// to its data.
const MISSING_REFERENCE_CODES: &[&str] = &["MISSINGREFERENCEERROR", "ELEMENTNOTFOUND"];

/// Codes meaning the request is invalid as sent.
const VALIDATION_CODES: &[&str] = &[
    // Apollo Server / graphql-js
    "GRAPHQLVALIDATIONFAILED",
    "GRAPHQLPARSEFAILED",
    "BADUSERINPUT",
    "BADREQUEST",
    "OPERATIONRESOLUTIONFAILURE",
    // graphql-constraint-directive (OpenCTI's input constraints)
    "ERRGRAPHQLCONSTRAINTVALIDATION",
    // OpenCTI (≥ 5 `VALIDATION_ERROR`, 4.x `ValidationError`, …)
    "VALIDATIONERROR",
    "FUNCTIONALERROR",
    "UNSUPPORTEDERROR",
    "ALREADYDELETEDERROR",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorKind {
    Auth,
    MissingReference,
    Validation,
    Other,
}

/// Turns an HTTP answer from `POST /graphql` into the response's `data`, or a classified
/// error. Public so that canned answers can be tested without a server.
pub fn classify_response(status: u16, body: &[u8]) -> Result<Map<String, Value>, GraphqlError> {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let errors = json
        .as_ref()
        .and_then(|v| v.get("errors"))
        .and_then(Value::as_array)
        .filter(|errors| !errors.is_empty());
    match status {
        200..=299 => {
            if let Some(errors) = errors {
                return Err(classify_errors(errors));
            }
            match json {
                Some(Value::Object(mut object)) => match object.remove("data") {
                    Some(Value::Object(data)) => Ok(data),
                    _ => Err(GraphqlError::Other {
                        message: format!(
                            "HTTP {status} without data nor errors: {}",
                            snippet(body)
                        ),
                    }),
                },
                _ => Err(GraphqlError::Other {
                    message: format!(
                        "HTTP {status} with a body that is not a GraphQL response: {}",
                        snippet(body)
                    ),
                }),
            }
        }
        401 | 403 => Err(GraphqlError::Auth {
            status: Some(status),
            message: match errors {
                Some(errors) => describe_errors(errors),
                None => format!("HTTP {status}: {}", snippet(body)),
            },
        }),
        408 | 429 | 500..=599 => Err(GraphqlError::Server {
            status,
            message: match errors {
                Some(errors) => describe_errors(errors),
                None => snippet(body),
            },
        }),
        // A stock GraphQL server (Apollo without OpenCTI's plugin, graphql-js, …) rejects
        // an invalid document or invalid variables with 400 (some with 422).
        400 | 422 => Err(match errors {
            Some(errors) => match classify_errors(errors) {
                GraphqlError::Other { message } => GraphqlError::Validation {
                    message: format!("HTTP {status}: {message}"),
                },
                classified => classified,
            },
            None => GraphqlError::Validation {
                message: format!("HTTP {status}: {}", snippet(body)),
            },
        }),
        _ => Err(GraphqlError::Other {
            message: format!("unexpected HTTP {status}: {}", snippet(body)),
        }),
    }
}

/// Classifies a non-empty GraphQL `errors` array. An authentication error wins (the
/// operator must act); otherwise the answer is permanent only if every error is.
fn classify_errors(errors: &[Value]) -> GraphqlError {
    let kinds: Vec<ErrorKind> = errors.iter().map(classify_error).collect();
    let message = describe_errors(errors);
    let kind = if kinds.contains(&ErrorKind::Auth) {
        ErrorKind::Auth
    } else if kinds.contains(&ErrorKind::Other) {
        ErrorKind::Other
    } else if kinds.contains(&ErrorKind::MissingReference) {
        ErrorKind::MissingReference
    } else {
        ErrorKind::Validation
    };
    match kind {
        ErrorKind::Auth => GraphqlError::Auth {
            status: None,
            message,
        },
        ErrorKind::MissingReference => GraphqlError::MissingReference { message },
        ErrorKind::Validation => GraphqlError::Validation { message },
        ErrorKind::Other => GraphqlError::Other { message },
    }
}

fn classify_error(error: &Value) -> ErrorKind {
    for code in error_codes(error) {
        let normalized = normalize_code(code);
        if AUTH_CODES.contains(&normalized.as_str()) {
            return ErrorKind::Auth;
        }
        if MISSING_REFERENCE_CODES.contains(&normalized.as_str()) {
            return ErrorKind::MissingReference;
        }
        if VALIDATION_CODES.contains(&normalized.as_str()) {
            return ErrorKind::Validation;
        }
    }
    // No known code: a server without codes. graphql-js's own messages are stable.
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_ascii_lowercase();
    if message.contains("you must be logged in") {
        ErrorKind::Auth
    } else if message.starts_with("element not found")
        || message.starts_with("element(s) not found")
    {
        ErrorKind::MissingReference
    } else if message.starts_with("cannot query field")
        || message.starts_with("unknown argument")
        || message.starts_with("unknown type")
        || message.starts_with("syntax error")
        || (message.starts_with("variable \"$")
            && (message.contains("got invalid value") || message.contains("of required type")))
        || (message.starts_with("field \"") && message.contains("argument"))
    {
        ErrorKind::Validation
    } else {
        ErrorKind::Other
    }
}

/// The places where OpenCTI versions and other servers put an error's code, most
/// specific first.
fn error_codes(error: &Value) -> Vec<&str> {
    const PATHS: &[&[&str]] = &[
        &["extensions", "code"],
        &["extensions", "name"],
        &["name"],
        &["code"],
        &["extensions", "data", "doc_code"],
        &["data", "doc_code"],
    ];
    PATHS
        .iter()
        .filter_map(|path| {
            path.iter()
                .try_fold(error, |value, key| value.get(*key))
                .and_then(Value::as_str)
        })
        .collect()
}

fn normalize_code(code: &str) -> String {
    code.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

/// `CODE: message (reason) [unresolved: …]` for each error, joined with `; `.
fn describe_errors(errors: &[Value]) -> String {
    let described: Vec<String> = errors.iter().map(describe_error).collect();
    truncate(&described.join("; "), 4 * BODY_SNIPPET_CHARS)
}

fn describe_error(error: &Value) -> String {
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("(no message)");
    let mut text = match error_codes(error).first() {
        Some(code) => format!("{code}: {message}"),
        None => message.to_owned(),
    };
    let data = error
        .pointer("/extensions/data")
        .or_else(|| error.get("data"));
    if let Some(data) = data {
        if let Some(reason) = data.get("reason").and_then(Value::as_str) {
            if reason != message {
                text.push_str(&format!(" ({reason})"));
            }
        }
        if let Some(ids) = data.get("unresolvedIds").and_then(Value::as_array) {
            let ids: Vec<&str> = ids.iter().filter_map(Value::as_str).collect();
            if !ids.is_empty() {
                text.push_str(&format!(" [unresolved: {}]", ids.join(", ")));
            }
        }
    }
    text
}

/// The start of a body, on one line, for an error message.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.is_empty() {
        "(empty body)".to_owned()
    } else {
        truncate(&one_line, BODY_SNIPPET_CHARS)
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// A transport failure, described through its whole source chain ("error sending
/// request" alone says nothing) and without the URL.
fn transport_error(error: reqwest::Error) -> GraphqlError {
    let timeout = error.is_timeout();
    let error = error.without_url();
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    if timeout && !message.contains("timed out") {
        message.push_str(" (timed out)");
    }
    GraphqlError::Transport { message }
}

// ---------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------

/// What `registerConnector` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredConnector {
    pub id: String,
    /// The state OpenCTI keeps for the connector (pycti's `start_from`/`recover_until`).
    pub connector_state: Option<String>,
    /// The user the connector acts as (OpenCTI ≥ 5).
    pub connector_user_id: Option<String>,
}

/// A client for `POST {opencti.url}/graphql`. Cheap to clone (one connection pool).
#[derive(Clone)]
pub struct GraphqlClient {
    http: reqwest::Client,
    endpoint: String,
}

impl fmt::Debug for GraphqlClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GraphqlClient")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl GraphqlClient {
    /// A client with the default timeouts ([`REQUEST_TIMEOUT`], [`CONNECT_TIMEOUT`]);
    /// `opencti.ssl_verify: false` accepts any certificate.
    pub fn new(config: &OpenCtiConfig) -> Result<Self, ClientBuildError> {
        Self::with_timeouts(config, REQUEST_TIMEOUT, CONNECT_TIMEOUT)
    }

    /// Like [`new`](Self::new) with other timeouts (tests).
    pub fn with_timeouts(
        config: &OpenCtiConfig,
        request_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<Self, ClientBuildError> {
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", config.token.expose()))
            .map_err(|_| ClientBuildError::TokenNotAHeaderValue)?;
        authorization.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, authorization);
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!("opencti-threatbus/", env!("CARGO_PKG_VERSION")))
            .timeout(request_timeout)
            .connect_timeout(connect_timeout)
            .danger_accept_invalid_certs(!config.ssl_verify)
            .build()
            .map_err(|e| ClientBuildError::Http(e.without_url().to_string()))?;
        Ok(GraphqlClient {
            http,
            endpoint: format!("{}/graphql", config.url.trim_end_matches('/')),
        })
    }

    /// `{opencti.url}/graphql`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sends one document and returns the response's `data`.
    pub async fn execute(
        &self,
        document: &str,
        variables: Value,
    ) -> Result<Map<String, Value>, GraphqlError> {
        let body = json!({ "query": document, "variables": variables });
        let response = self
            .http
            .post(&self.endpoint)
            .json(&body)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(transport_error)?;
        let result = classify_response(status, &bytes);
        if let Err(error) = &result {
            tracing::debug!(status, kind = error.kind(), %error, "OpenCTI GraphQL call failed");
        }
        result
    }

    /// `registerConnector` (type STREAM, scope threatbus).
    pub async fn register_connector(
        &self,
        registration: &ConnectorRegistration,
    ) -> Result<RegisteredConnector, GraphqlError> {
        let data = self
            .execute(
                REGISTER_CONNECTOR,
                register_connector_variables(registration),
            )
            .await?;
        let connector = object_field(&data, "registerConnector")?;
        Ok(RegisteredConnector {
            id: string_field(connector, "registerConnector", "id")?,
            connector_state: optional_string(connector, "connector_state"),
            connector_user_id: optional_string(connector, "connector_user_id"),
        })
    }

    /// `pingConnector`; returns the connector state OpenCTI holds (null or empty after a
    /// reset from the UI). An answer without the connector is an error, never a null
    /// state: the caller would take that for a reset and replay the whole stream.
    pub async fn ping_connector(
        &self,
        id: &str,
        state: Option<String>,
    ) -> Result<Option<String>, GraphqlError> {
        let data = self
            .execute(
                PING_CONNECTOR,
                ping_connector_variables(id, state.as_deref()),
            )
            .await?;
        let connector = object_field(&data, "pingConnector")?;
        Ok(optional_string(connector, "connector_state"))
    }

    /// The internal id of the organization named exactly `name`, if OpenCTI has one.
    pub async fn find_organization(&self, name: &str) -> Result<Option<String>, GraphqlError> {
        let data = self
            .execute(ORGANIZATION_BY_NAME, organization_by_name_variables(name))
            .await?;
        let edges = data
            .get("stixDomainObjects")
            .and_then(|c| c.get("edges"))
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let nodes: Vec<(&str, &str)> = edges
            .iter()
            .filter_map(|edge| {
                let node = edge.get("node")?;
                Some((
                    node.get("id")?.as_str()?,
                    node.get("name").and_then(Value::as_str).unwrap_or_default(),
                ))
            })
            .collect();
        // The search may be fuzzy: prefer the exact name, then the same name in another case.
        let found = nodes
            .iter()
            .find(|(_, n)| *n == name)
            .or_else(|| nodes.iter().find(|(_, n)| n.eq_ignore_ascii_case(name)))
            .map(|(id, _)| (*id).to_owned());
        Ok(found)
    }

    /// The internal id of the organization named `name`, created with `description` when
    /// OpenCTI has none.
    pub async fn get_or_create_organization(
        &self,
        name: &str,
        description: &str,
    ) -> Result<String, GraphqlError> {
        if let Some(id) = self.find_organization(name).await? {
            return Ok(id);
        }
        let data = self
            .execute(
                ORGANIZATION_ADD,
                organization_add_variables(name, description),
            )
            .await?;
        let organization = object_field(&data, "organizationAdd")?;
        let id = string_field(organization, "organizationAdd", "id")?;
        tracing::info!(organization = name, id = %id, "created the connector's organization in OpenCTI");
        Ok(id)
    }

    /// Creates (or upserts, by `stix_id`) the sighting relationship; returns its internal id.
    pub async fn create_sighting(&self, input: &SightingInput) -> Result<String, GraphqlError> {
        let data = self
            .execute(SIGHTING_ADD, sighting_add_variables(input))
            .await?;
        let relationship = object_field(&data, "stixSightingRelationshipAdd")?;
        string_field(relationship, "stixSightingRelationshipAdd", "id")
    }

    /// The indicator with this internal or STIX id (the fields of [`INDICATOR`], as OpenCTI
    /// returns them), or `None` if OpenCTI has none.
    pub async fn read_indicator(&self, id: &str) -> Result<Option<Value>, GraphqlError> {
        let mut data = self.execute(INDICATOR, indicator_variables(id)).await?;
        Ok(match data.remove("indicator") {
            Some(Value::Null) | None => None,
            Some(indicator) => Some(indicator),
        })
    }
}

fn object_field<'a>(
    data: &'a Map<String, Value>,
    field: &str,
) -> Result<&'a Map<String, Value>, GraphqlError> {
    data.get(field)
        .and_then(Value::as_object)
        .ok_or_else(|| GraphqlError::Other {
            message: format!("{field} returned no object"),
        })
}

fn string_field(
    object: &Map<String, Value>,
    operation: &str,
    field: &str,
) -> Result<String, GraphqlError> {
    object
        .get(field)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| GraphqlError::Other {
            message: format!("{operation} returned no {field}"),
        })
}

fn optional_string(object: &Map<String, Value>, field: &str) -> Option<String> {
    object.get(field).and_then(Value::as_str).map(str::to_owned)
}

#[cfg(test)]
mod tests;
