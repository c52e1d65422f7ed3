//! The GraphQL part of the OpenCTI test double: `POST /graphql`.
//!
//! Like OpenCTI, it validates every request (document and variables) against a real
//! schema (`relay.schema.graphql` of 6.9.28 by default) with apollo-compiler and answers
//! HTTP 200 with `errors` when it is invalid (OpenCTI's `httpResponsePlugin` forces 200;
//! [`GraphqlDouble::set_validation_status`] emulates a stock server's 400 instead). It
//! then executes the operations the bridge uses against in-memory state, with the error
//! shapes of OpenCTI (`extensions: { code, data }` in 6.x, plus `name` in 5.x, top-level
//! `name`/`data` in 4.x: [`ErrorStyle`]):
//!
//! - `stixDomainObjects` (organizations by name), `organizationAdd` (upsert by name);
//! - `stixSightingRelationshipAdd`: every input recorded, upsert by `stix_id`, posts
//!   counted per `stix_id`; an unknown `fromId`/`toId`/`createdBy` is answered with
//!   `MISSING_REFERENCE_ERROR` (unless [`GraphqlDouble::accept_any_from_id`]);
//! - `registerConnector`, `pingConnector` (recorded): like OpenCTI, a ping stores the state
//!   it carries and answers it back, except the first ping after
//!   [`GraphqlDouble::reset_connector_state`] (OpenCTI's `resetStateConnector`: state `''`
//!   and a reset flag, which that ping clears, answering `''` without storing) or
//!   [`GraphqlDouble::set_connector_state`] (answers the state set there);
//!   [`GraphqlDouble::forget_connector`] deletes the connector (pings then fail);
//! - `indicator(id)` (seeded with [`GraphqlDouble::seed_indicator`], or created below),
//!   found by internal id, `standard_id` or any of `x_opencti_stix_ids`;
//! - `indicatorAdd`: stored like OpenCTI does (a standard id of its own, the input's
//!   `stix_id` kept in `x_opencti_stix_ids`; the same pattern again upserts into the
//!   existing indicator); a `stix` pattern without a value is refused with
//!   `FUNCTIONAL_ERROR`, as OpenCTI's syntax check does;
//! - `indicatorFieldPatch`: `replace` of single-valued attributes, `modified` stamped
//!   "now", a new pattern gets a new standard id (the old one joins the STIX ids); every
//!   input recorded ([`GraphqlDouble::indicator_patches`]), writes counted per STIX id
//!   ([`GraphqlDouble::indicator_writes`]).
//!
//! A bad or missing `Authorization: Bearer <token>` is answered as OpenCTI does: HTTP 200,
//! `AUTH_REQUIRED` for every root field. Faults: [`GraphqlDouble::set_bad_gateway`],
//! [`GraphqlDouble::fail_next`], [`GraphqlDouble::set_latency`],
//! [`GraphqlDouble::set_auth_failure`], and, on a standalone server from [`start`],
//! [`GraphqlServer::set_down`] (really stops listening: connection refused).
//!
//! [`router`] mounts it into any axum server; [`start`] runs it alone on 127.0.0.1.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use apollo_compiler::ast;
use apollo_compiler::executable::{Field, Selection, SelectionSet};
use apollo_compiler::request::coerce_variable_values;
use apollo_compiler::response::{GraphQLError, JsonMap};
use apollo_compiler::validation::Valid;
use apollo_compiler::{ExecutableDocument, Schema};
use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Map, Value};

use opencti_threatbus::stix::Timestamp;

/// The schema the double validates against unless told otherwise.
pub const DEFAULT_SCHEMA_VERSION: &str = "6.9.28";

/// The shared `opencti` reference folder: `OPENCTI_SHARED_DIR`, or `../shared/opencti`
/// beside the checkout.
pub fn shared_opencti_dir() -> PathBuf {
    match std::env::var_os("OPENCTI_SHARED_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/opencti"),
    }
}

/// The relay schema of one OpenCTI version, parsed once per test binary. Panics with a
/// clear message when the file is missing: the tests need it, they never skip.
pub fn schema(version: &str) -> Arc<Valid<Schema>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Valid<Schema>>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(schema) = cache.get(version) {
        return schema.clone();
    }
    let path = shared_opencti_dir()
        .join("schema")
        .join(version)
        .join("relay.schema.graphql");
    let sdl = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the OpenCTI {version} schema at {}: {e} \
             (set OPENCTI_SHARED_DIR to the shared `opencti` reference folder)",
            path.display()
        )
    });
    let schema = Arc::new(
        Schema::parse_and_validate(sdl, &path)
            .unwrap_or_else(|e| panic!("OpenCTI {version} schema: {}", e.errors)),
    );
    cache.insert(version.to_owned(), schema.clone());
    schema
}

/// Which OpenCTI generation's error shape the double answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorStyle {
    /// ≥ 6: `extensions: { code, data }`.
    #[default]
    V6,
    /// 5.x: `extensions: { code, name, data }`.
    V5,
    /// 4.x (apollo-errors): top-level `name` (`MissingReferenceError`, `AuthRequired`, …)
    /// and `data: { reason, http_status, category }`.
    V4,
}

/// An organization the double knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Organization {
    pub id: String,
    pub standard_id: String,
    pub name: String,
    pub description: Option<String>,
}

/// A sighting relationship as the double stores it (after upserts).
#[derive(Debug, Clone, PartialEq)]
pub struct SightingRecord {
    /// Internal id (a UUID), stable across upserts.
    pub id: String,
    /// `stix_id` when one was given, else `sighting--<uuid>`.
    pub standard_id: String,
    pub stix_id: Option<String>,
    pub from_id: String,
    pub to_id: String,
    pub created_by: Option<String>,
    pub first_seen: Option<String>,
    pub last_seen: Option<String>,
    pub attribute_count: Option<i64>,
    pub confidence: Option<i64>,
    pub x_opencti_negative: Option<bool>,
    pub update: Option<bool>,
    /// The last input received for it, as sent.
    pub input: Value,
}

/// One HTTP request that reached `POST /graphql`.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The `Authorization` header was `Bearer <expected token>`.
    pub authorized: bool,
    pub query: Option<String>,
    pub operation_name: Option<String>,
    pub variables: Value,
    /// The HTTP status answered.
    pub status: u16,
    /// The JSON answered (`Null` when the body was not JSON).
    pub response: Value,
}

#[derive(Default)]
struct State {
    organizations: Vec<Organization>,
    indicators: Vec<Value>,
    accept_any_from_id: bool,
    sightings: Vec<SightingRecord>,
    /// `stix_id` → index in `sightings` (upserts must not scan: benchmarks post 10⁴+).
    sighting_index: HashMap<String, usize>,
    sighting_posts: Vec<Value>,
    posts_per_stix_id: HashMap<String, usize>,
    registrations: Vec<Value>,
    pings: Vec<(String, Option<String>)>,
    connector_states: HashMap<String, Option<String>>,
    /// Connectors whose next ping answers the stored state instead of storing its own
    /// (OpenCTI's `connector_state_reset` flag).
    connector_state_reset: std::collections::HashSet<String>,
    requests: Vec<RecordedRequest>,
    bad_gateway: bool,
    fail_next: VecDeque<u16>,
    latency: Duration,
    auth_failure: bool,
    error_style: ErrorStyle,
    validation_status: Option<u16>,
    indicator_lookups: usize,
    /// Every `indicatorAdd` input that reached execution.
    indicator_adds: Vec<Value>,
    /// Every `indicatorFieldPatch` call that reached execution: `(id, input)`.
    indicator_patches: Vec<(String, Value)>,
    /// Creates and patches per STIX id (each of the indicator's ids at write time).
    indicator_writes: HashMap<String, usize>,
    /// Sighting requests being answered right now, and the most at once since the last
    /// reset (pings and registrations aside: they are not the drainer's).
    in_flight: usize,
    max_in_flight: usize,
}

struct Inner {
    schema: Arc<Valid<Schema>>,
    schema_version: String,
    token: String,
    state: Mutex<State>,
    /// Documents that passed validation, by their text: validation depends on the text and
    /// the schema only, and parsing and validating each request again cost about half of
    /// the double's CPU per request (the bridge sends the same few documents every time).
    valid_documents: Mutex<HashMap<String, Arc<Valid<ExecutableDocument>>>>,
    /// Where `indicator(id:)` looks after the seeded indicators: the stream double's
    /// "database" when both run on one address (see [`GraphqlDouble::set_indicator_source`]).
    indicator_source: Mutex<Option<IndicatorSource>>,
}

/// Answers `indicator(id:)` with the GraphQL shape of an indicator the platform holds.
pub type IndicatorSource = Arc<dyn Fn(&str) -> Option<Value> + Send + Sync>;

/// Distinct valid documents remembered at most (the bridge sends a handful).
const DOCUMENT_CACHE_LIMIT: usize = 64;

/// The double's state and configuration; cheap to clone (shared).
#[derive(Clone)]
pub struct GraphqlDouble {
    inner: Arc<Inner>,
}

/// An error OpenCTI's resolvers raise, before it is shaped by [`ErrorStyle`].
struct OpenCtiError {
    /// ≥ 5 code, e.g. `MISSING_REFERENCE_ERROR`.
    code: &'static str,
    message: String,
    data: Map<String, Value>,
}

impl OpenCtiError {
    fn new(code: &'static str, message: impl Into<String>, data: Value) -> Self {
        let mut map = match data {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        let (http_status, genre) = match code {
            "AUTH_REQUIRED" => (401, "TECHNICAL"),
            "FORBIDDEN_ACCESS" => (403, "TECHNICAL"),
            "MISSING_REFERENCE_ERROR" => (404, "BUSINESS"),
            "FUNCTIONAL_ERROR" => (400, "BUSINESS"),
            "DATABASE_ERROR" => (500, "TECHNICAL"),
            _ => (500, "BUSINESS"),
        };
        map.insert("http_status".into(), json!(http_status));
        map.insert("genre".into(), json!(genre));
        OpenCtiError {
            code,
            message: message.into(),
            data: map,
        }
    }

    fn auth_required() -> Self {
        Self::new(
            "AUTH_REQUIRED",
            "You must be logged in to do this.",
            json!({}),
        )
    }

    fn missing_reference(unresolved: Vec<String>) -> Self {
        Self::new(
            "MISSING_REFERENCE_ERROR",
            "Element(s) not found",
            json!({ "unresolvedIds": unresolved, "doc_code": "ELEMENT_NOT_FOUND" }),
        )
    }

    /// The error object in `style`, at `path` and `locations`.
    fn to_json(&self, style: ErrorStyle, path: &[&str], locations: Value) -> Value {
        match style {
            ErrorStyle::V6 => json!({
                "message": self.message,
                "locations": locations,
                "path": path,
                "extensions": { "code": self.code, "data": self.data },
            }),
            ErrorStyle::V5 => json!({
                "message": self.message,
                "locations": locations,
                "path": path,
                "extensions": { "code": self.code, "name": self.code, "data": self.data },
            }),
            ErrorStyle::V4 => {
                let (name, message, reason) = match self.code {
                    "AUTH_REQUIRED" => ("AuthRequired", self.message.as_str(), None),
                    "FORBIDDEN_ACCESS" => ("ForbiddenAccess", self.message.as_str(), None),
                    "MISSING_REFERENCE_ERROR" => (
                        "MissingReferenceError",
                        "Element not found",
                        Some("Missing reference to handle creation"),
                    ),
                    "FUNCTIONAL_ERROR" => (
                        "FunctionalError",
                        "Business validation",
                        Some(self.message.as_str()),
                    ),
                    "DATABASE_ERROR" => (
                        "DatabaseError",
                        "A database error has occurred",
                        Some(self.message.as_str()),
                    ),
                    _ => (
                        "UnknownError",
                        "An unknown error has occurred",
                        Some(self.message.as_str()),
                    ),
                };
                let mut data = self.data.clone();
                data.remove("genre");
                data.remove("doc_code");
                data.insert(
                    "category".into(),
                    json!(if self.code == "AUTH_REQUIRED" {
                        "technical"
                    } else {
                        "business"
                    }),
                );
                if let Some(reason) = reason {
                    data.insert("reason".into(), json!(reason));
                }
                json!({
                    "message": message,
                    "name": name,
                    "time_thrown": "2021-05-04T10:00:00.000Z",
                    "data": data,
                    "locations": locations,
                    "path": path,
                })
            }
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl GraphqlDouble {
    /// A double expecting `Authorization: Bearer <token>`, validating against 6.9.28.
    pub fn new(token: &str) -> Self {
        Self::with_schema_version(token, DEFAULT_SCHEMA_VERSION)
    }

    /// A double validating against another OpenCTI version's schema (`5.12.33`, `6.0.5`).
    pub fn with_schema_version(token: &str, version: &str) -> Self {
        GraphqlDouble {
            inner: Arc::new(Inner {
                schema: schema(version),
                schema_version: version.to_owned(),
                token: token.to_owned(),
                state: Mutex::new(State::default()),
                valid_documents: Mutex::default(),
                indicator_source: Mutex::default(),
            }),
        }
    }

    pub fn schema_version(&self) -> &str {
        &self.inner.schema_version
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    // --- seeding -----------------------------------------------------------------------

    /// Indicators not seeded here are looked up in `source` (the stream double installs
    /// its stored objects, so the API and the stream agree on what OpenCTI holds).
    pub fn set_indicator_source(&self, source: IndicatorSource) {
        *self
            .inner
            .indicator_source
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// `indicator(id:)` requests answered so far (each alias of a batched lookup counts).
    pub fn indicator_lookups(&self) -> usize {
        self.state().indicator_lookups
    }

    /// Adds an indicator (a JSON object with at least `id` and `standard_id`; the fields
    /// of the `indicator` query are answered from it). Sightings may then point at either id.
    pub fn seed_indicator(&self, indicator: Value) {
        let mut indicator = indicator;
        if let Some(object) = indicator.as_object_mut() {
            object.insert("__typename".into(), json!("Indicator"));
            object.entry("entity_type").or_insert(json!("Indicator"));
        }
        self.state().indicators.push(indicator);
    }

    /// Adds a realistic indicator with this STIX id; returns it (its `id` is a fresh UUID).
    pub fn seed_indicator_with_standard_id(&self, standard_id: &str) -> Value {
        let indicator = json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "standard_id": standard_id,
            "entity_type": "Indicator",
            "created": "2024-03-01T10:00:00.000Z",
            "modified": "2024-03-01T10:00:00.000Z",
            "revoked": false,
            "confidence": 80,
            "name": "203.0.113.7",
            "description": null,
            "pattern": "[ipv4-addr:value = '203.0.113.7']",
            "pattern_type": "stix",
            "pattern_version": "2.1",
            "indicator_types": ["malicious-activity"],
            "valid_from": "2024-03-01T10:00:00.000Z",
            "valid_until": "2025-03-01T10:00:00.000Z",
            "x_opencti_score": 75,
            "x_opencti_detection": true,
            "x_opencti_main_observable_type": "IPv4-Addr",
            "createdBy": null,
            "objectMarking": [],
            "objectLabel": [],
        });
        self.seed_indicator(indicator.clone());
        indicator
    }

    /// The indicator OpenCTI holds under this internal id, standard id or other STIX id.
    pub fn indicator(&self, id: &str) -> Option<Value> {
        self.state().indicator_by_any_id(id).cloned()
    }

    /// Every `indicatorAdd` input that reached execution, in order.
    pub fn indicator_adds(&self) -> Vec<Value> {
        self.state().indicator_adds.clone()
    }

    /// Every `indicatorFieldPatch` call that reached execution: `(id, input)`.
    pub fn indicator_patches(&self) -> Vec<(String, Value)> {
        self.state().indicator_patches.clone()
    }

    /// Creates and patches that reached the indicator with this STIX id (0 if none).
    pub fn indicator_writes(&self, stix_id: &str) -> usize {
        self.state()
            .indicator_writes
            .get(stix_id)
            .copied()
            .unwrap_or(0)
    }

    /// Adds an organization; returns its internal id.
    pub fn seed_organization(&self, name: &str, description: Option<&str>) -> String {
        self.state()
            .add_organization(name, description.map(str::to_owned))
            .id
    }

    /// Accept any `fromId` in `stixSightingRelationshipAdd` (default: only seeded objects).
    pub fn accept_any_from_id(&self, accept: bool) {
        self.state().accept_any_from_id = accept;
    }

    // --- faults ------------------------------------------------------------------------

    /// Answer every request with 502 Bad Gateway, like a reverse proxy in front of a
    /// stopped OpenCTI. (To refuse connections, see [`GraphqlServer::set_down`].)
    pub fn set_bad_gateway(&self, on: bool) {
        self.state().bad_gateway = on;
    }

    /// Answer the next `n` requests with HTTP `status` (e.g. 503, 429) before anything else.
    pub fn fail_next(&self, n: usize, status: u16) {
        self.state()
            .fail_next
            .extend(std::iter::repeat_n(status, n));
    }

    /// The most sighting requests answered at once since the last [`reset_max_in_flight`]
    /// (the latency is part of answering: set one to see concurrency).
    ///
    /// [`reset_max_in_flight`]: GraphqlDouble::reset_max_in_flight
    pub fn max_in_flight(&self) -> usize {
        self.state().max_in_flight
    }

    pub fn reset_max_in_flight(&self) {
        let mut state = self.state();
        state.max_in_flight = state.in_flight;
    }

    /// Wait this long before answering each request.
    pub fn set_latency(&self, latency: Duration) {
        self.state().latency = latency;
    }

    /// Refuse every token, as OpenCTI does for a bad one (HTTP 200, `AUTH_REQUIRED`).
    pub fn set_auth_failure(&self, on: bool) {
        self.state().auth_failure = on;
    }

    /// The error shape (OpenCTI generation) of the answers.
    pub fn set_error_style(&self, style: ErrorStyle) {
        self.state().error_style = style;
    }

    /// The HTTP status of answers to invalid documents or variables: `None` = 200 like
    /// OpenCTI (default), `Some(400)` like a stock GraphQL server.
    pub fn set_validation_status(&self, status: Option<u16>) {
        self.state().validation_status = status;
    }

    // --- inspection --------------------------------------------------------------------

    pub fn organizations(&self) -> Vec<Organization> {
        self.state().organizations.clone()
    }

    /// The stored sighting relationships (one per `stix_id`).
    pub fn sightings(&self) -> Vec<SightingRecord> {
        self.state().sightings.clone()
    }

    /// How many sighting relationships are stored (cheap: for polling).
    pub fn sighting_count(&self) -> usize {
        self.state().sightings.len()
    }

    /// Every `stixSightingRelationshipAdd` input that reached execution, in order.
    pub fn sighting_posts(&self) -> Vec<Value> {
        self.state().sighting_posts.clone()
    }

    /// How many `stixSightingRelationshipAdd` inputs reached execution (cheap).
    pub fn sighting_post_count(&self) -> usize {
        self.state().sighting_posts.len()
    }

    /// How many times a sighting with this `stix_id` was posted (successfully or not).
    pub fn post_count(&self, stix_id: &str) -> usize {
        self.state()
            .posts_per_stix_id
            .get(stix_id)
            .copied()
            .unwrap_or(0)
    }

    /// Every `registerConnector` input.
    pub fn registrations(&self) -> Vec<Value> {
        self.state().registrations.clone()
    }

    /// Every `pingConnector` call: `(id, state)`.
    pub fn pings(&self) -> Vec<(String, Option<String>)> {
        self.state().pings.clone()
    }

    /// The state OpenCTI holds for connector `id` (`None`: not registered, or null).
    pub fn connector_state(&self, id: &str) -> Option<String> {
        self.state().connector_states.get(id).cloned().flatten()
    }

    /// What an operator's *Reset state* on the connector's page does (OpenCTI's
    /// `resetStateConnector`): the state becomes `''` and the next ping, instead of storing
    /// the state it carries, clears the reset flag and answers `''`.
    pub fn reset_connector_state(&self, id: &str) {
        let mut state = self.state();
        state
            .connector_states
            .insert(id.to_owned(), Some(String::new()));
        state.connector_state_reset.insert(id.to_owned());
    }

    /// A platform that answers the next ping with `connector_state` rather than the state
    /// the ping carries (a state changed in OpenCTI: e.g. written through the API while
    /// the reset flag was set, or a restored database that still held it); later pings
    /// store what they carry again.
    pub fn set_connector_state(&self, id: &str, connector_state: &str) {
        let mut state = self.state();
        state
            .connector_states
            .insert(id.to_owned(), Some(connector_state.to_owned()));
        state.connector_state_reset.insert(id.to_owned());
    }

    /// Deletes connector `id`, as from its page: pings then fail (`No connector found`)
    /// until it registers again.
    pub fn forget_connector(&self, id: &str) {
        let mut state = self.state();
        state.connector_states.remove(id);
        state.connector_state_reset.remove(id);
    }

    /// Every HTTP request to `POST /graphql`.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state().requests.clone()
    }

    pub fn request_count(&self) -> usize {
        self.state().requests.len()
    }
}

impl State {
    fn add_organization(&mut self, name: &str, description: Option<String>) -> Organization {
        let organization = Organization {
            id: uuid::Uuid::new_v4().to_string(),
            standard_id: format!("identity--{}", uuid::Uuid::new_v4()),
            name: name.to_owned(),
            description,
        };
        self.organizations.push(organization.clone());
        organization
    }

    fn organization_by_any_id(&self, id: &str) -> Option<&Organization> {
        self.organizations
            .iter()
            .find(|o| o.id == id || o.standard_id == id)
    }

    fn indicator_index(&self, id: &str) -> Option<usize> {
        self.indicators.iter().position(|i| {
            i["id"].as_str() == Some(id)
                || i["standard_id"].as_str() == Some(id)
                || strings(i.get("x_opencti_stix_ids")).iter().any(|s| s == id)
        })
    }

    fn indicator_by_any_id(&self, id: &str) -> Option<&Value> {
        self.indicator_index(id)
            .map(|index| &self.indicators[index])
    }

    /// One more write on the indicator at `index`, counted under each of its STIX ids.
    fn count_indicator_write(&mut self, index: usize) {
        let indicator = &self.indicators[index];
        let mut ids = strings(indicator.get("x_opencti_stix_ids"));
        ids.extend(strings(indicator.get("standard_id")));
        for id in ids {
            *self.indicator_writes.entry(id).or_default() += 1;
        }
    }

    fn knows(&self, id: &str) -> bool {
        self.organization_by_any_id(id).is_some() || self.indicator_by_any_id(id).is_some()
    }
}

fn organization_json(organization: &Organization) -> Value {
    json!({
        "__typename": "Organization",
        "id": organization.id,
        "standard_id": organization.standard_id,
        "entity_type": "Organization",
        "parent_types": ["Basic-Object", "Stix-Object", "Stix-Core-Object", "Stix-Domain-Object", "Identity"],
        "name": organization.name,
        "description": organization.description,
    })
}

fn sighting_json(sighting: &SightingRecord) -> Value {
    json!({
        "__typename": "StixSightingRelationship",
        "id": sighting.id,
        "standard_id": sighting.standard_id,
        "entity_type": "stix-sighting-relationship",
        "parent_types": ["basic-relationship", "stix-relationship"],
        "first_seen": sighting.first_seen,
        "last_seen": sighting.last_seen,
        "attribute_count": sighting.attribute_count,
        "confidence": sighting.confidence,
    })
}

/// `axum::Router` serving `POST /graphql` from `state`; mount it into another server with
/// `Router::merge`.
pub fn router(state: GraphqlDouble) -> Router {
    Router::new()
        .route("/graphql", post(handle))
        .with_state(state)
}

async fn handle(
    AxumState(double): AxumState<GraphqlDouble>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let sighting = request
        .get("query")
        .and_then(Value::as_str)
        .is_some_and(|q| q.contains("stixSightingRelationshipAdd"));
    let latency = {
        let mut state = double.state();
        if sighting {
            state.in_flight += 1;
            state.max_in_flight = state.max_in_flight.max(state.in_flight);
        }
        state.latency
    };
    if !latency.is_zero() {
        sleep_precisely(latency).await;
    }
    let authorized = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", double.inner.token));
    let (status, answer) = double.answer(authorized, &request);
    let mut state = double.state();
    if sighting {
        state.in_flight -= 1;
    }
    state.requests.push(RecordedRequest {
        authorized,
        query: request
            .get("query")
            .and_then(Value::as_str)
            .map(str::to_owned),
        operation_name: request
            .get("operationName")
            .and_then(Value::as_str)
            .map(str::to_owned),
        variables: request.get("variables").cloned().unwrap_or(Value::Null),
        status: status.as_u16(),
        response: match &answer {
            Answer::Json(v) => v.clone(),
            Answer::Text(_) => Value::Null,
        },
    });
    drop(state);
    match answer {
        Answer::Json(value) => (
            status,
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            value.to_string(),
        )
            .into_response(),
        Answer::Text(text) => {
            let mut response = (status, text).into_response();
            if status == StatusCode::TOO_MANY_REQUESTS {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            }
            response
        }
    }
}

/// Waits `latency`, to within tens of µs. tokio's timer ticks in whole milliseconds, and
/// a `tokio::time::sleep` of 1 ms took 2.4 ms on average here (measured: 382 sequential
/// requests/s at "1 ms"): so all but the last 2 ms are slept on the timer, and the rest on
/// a blocking thread (nanosleep), which never holds one for more than 2 ms.
async fn sleep_precisely(latency: Duration) {
    const TIMER_SLACK: Duration = Duration::from_millis(2);
    let deadline = std::time::Instant::now() + latency;
    if latency > TIMER_SLACK {
        tokio::time::sleep(latency - TIMER_SLACK).await;
    }
    let rest = deadline.saturating_duration_since(std::time::Instant::now());
    if !rest.is_zero() {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
    }
}

enum Answer {
    Json(Value),
    Text(String),
}

fn proxy_page(status: StatusCode) -> String {
    let line = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    format!(
        "<html>\r\n<head><title>{line}</title></head>\r\n<body>\r\n<center><h1>{line}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    )
}

/// A request-level error (no `data`), as Apollo Server shapes it.
fn request_error(message: impl Into<String>, code: &str, locations: Value) -> Value {
    let mut error = json!({ "message": message.into(), "extensions": { "code": code } });
    if locations.as_array().is_some_and(|l| !l.is_empty()) {
        error["locations"] = locations;
    }
    error
}

fn graphql_error_json(error: &GraphQLError) -> Value {
    serde_json::to_value(error).unwrap_or_else(|e| json!({ "message": e.to_string() }))
}

impl GraphqlDouble {
    fn answer(&self, authorized: bool, request: &Value) -> (StatusCode, Answer) {
        let (style, validation_status, auth_failure) = {
            let mut state = self.state();
            if state.bad_gateway {
                return (
                    StatusCode::BAD_GATEWAY,
                    Answer::Text(proxy_page(StatusCode::BAD_GATEWAY)),
                );
            }
            if let Some(status) = state.fail_next.pop_front() {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return (status, Answer::Text(proxy_page(status)));
            }
            (
                state.error_style,
                state
                    .validation_status
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .unwrap_or(StatusCode::OK),
                state.auth_failure,
            )
        };

        let Some(query) = request.get("query").and_then(Value::as_str) else {
            return (
                StatusCode::BAD_REQUEST,
                Answer::Json(json!({ "errors": [request_error(
                    "GraphQL operations must contain a non-empty `query` or a `persistedQuery` extension.",
                    "BAD_REQUEST",
                    Value::Null,
                )] })),
            );
        };
        let invalid =
            |errors: Vec<Value>| (validation_status, Answer::Json(json!({ "errors": errors })));

        let document = match self.valid_document(query) {
            Ok(document) => document,
            Err(errors) => return invalid(errors),
        };
        let document = &*document;
        let schema = &self.inner.schema;
        let operation_name = request.get("operationName").and_then(Value::as_str);
        let operation = match document.operations.get(operation_name) {
            Ok(operation) => operation,
            Err(e) => {
                return invalid(vec![request_error(
                    e.message().to_string(),
                    "OPERATION_RESOLUTION_FAILURE",
                    Value::Null,
                )])
            }
        };
        let raw_variables = match request.get("variables") {
            None | Some(Value::Null) => JsonMap::new(),
            Some(value) => match serde_json::from_value::<JsonMap>(value.clone()) {
                Ok(map) => map,
                Err(_) => {
                    return invalid(vec![request_error(
                        "`variables` in a POST body should be provided as an object.",
                        "BAD_REQUEST",
                        Value::Null,
                    )])
                }
            },
        };
        let variables = match coerce_variable_values(schema, operation, &raw_variables) {
            Ok(coerced) => {
                let map: &JsonMap = &coerced;
                serde_json::to_value(map).unwrap_or(Value::Null)
            }
            Err(e) => {
                let json = graphql_error_json(&e.to_graphql_error(&document.sources));
                return invalid(vec![request_error(
                    json["message"].as_str().unwrap_or("invalid variables"),
                    "BAD_USER_INPUT",
                    json["locations"].clone(),
                )]);
            }
        };

        // Execution: one root field after the other (mutations run serially anyway).
        let mut data = Map::new();
        let mut errors = Vec::new();
        let is_mutation = operation.operation_type == ast::OperationType::Mutation;
        for selection in &operation.selection_set.selections {
            let Selection::Field(field) = selection else {
                errors.push(request_error(
                    "the test double only supports fields at the root",
                    "UNSUPPORTED_ERROR",
                    Value::Null,
                ));
                continue;
            };
            let key = field.response_key().as_str();
            let locations = field
                .location()
                .and_then(|span| span.line_column(&document.sources))
                .map(|lc| json!([{ "line": lc.line, "column": lc.column }]))
                .unwrap_or(json!([]));
            let result = if !authorized || auth_failure {
                Err(OpenCtiError::auth_required())
            } else {
                let arguments = field_arguments(field, &variables);
                let source = self
                    .inner
                    .indicator_source
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let mut state = self.state();
                if is_mutation {
                    state.mutation(field.name.as_str(), &arguments)
                } else {
                    state.query(field.name.as_str(), &arguments, source.as_ref())
                }
            };
            match result {
                Ok(value) => {
                    let projected = self.project(document, &field.selection_set, &value);
                    data.insert(key.to_owned(), projected);
                }
                Err(error) => {
                    data.insert(key.to_owned(), Value::Null);
                    errors.push(error.to_json(style, &[key], locations));
                }
            }
        }
        let mut body = Map::new();
        if !errors.is_empty() {
            body.insert("errors".into(), Value::Array(errors));
        }
        body.insert("data".into(), Value::Object(data));
        (StatusCode::OK, Answer::Json(Value::Object(body)))
    }

    /// The request's document, parsed and validated against the schema like graphql-js
    /// does (syntax errors first), or the errors to answer. Valid ones are remembered.
    fn valid_document(&self, query: &str) -> Result<Arc<Valid<ExecutableDocument>>, Vec<Value>> {
        let cached = self
            .inner
            .valid_documents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(query)
            .cloned();
        if let Some(document) = cached {
            return Ok(document);
        }
        if let Err(e) = ast::Document::parse(query, "request.graphql") {
            return Err(e
                .errors
                .iter()
                .map(|d| {
                    let json = graphql_error_json(&d.to_json());
                    let message = json["message"].as_str().unwrap_or_default();
                    let message = message.strip_prefix("syntax error: ").unwrap_or(message);
                    request_error(
                        format!("Syntax Error: {message}"),
                        "GRAPHQL_PARSE_FAILED",
                        json["locations"].clone(),
                    )
                })
                .collect());
        }
        let document =
            ExecutableDocument::parse_and_validate(&self.inner.schema, query, "request.graphql")
                .map_err(|e| {
                    e.errors
                        .iter()
                        .map(|d| {
                            let json = graphql_error_json(&d.to_json());
                            request_error(
                                json["message"].as_str().unwrap_or("invalid document"),
                                "GRAPHQL_VALIDATION_FAILED",
                                json["locations"].clone(),
                            )
                        })
                        .collect::<Vec<_>>()
                })?;
        let document = Arc::new(document);
        let mut cache = self
            .inner
            .valid_documents
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if cache.len() < DOCUMENT_CACHE_LIMIT {
            cache.insert(query.to_owned(), Arc::clone(&document));
        }
        Ok(document)
    }

    /// The response value of `value` for `selection_set` (aliases, `__typename`, inline
    /// fragments and fragment spreads with type conditions).
    fn project(&self, document: &ExecutableDocument, set: &SelectionSet, value: &Value) -> Value {
        match value {
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|item| self.project(document, set, item))
                    .collect(),
            ),
            Value::Object(object) if !set.selections.is_empty() => {
                let mut out = Map::new();
                self.collect(document, set, object, &mut out);
                Value::Object(out)
            }
            other => other.clone(),
        }
    }

    fn collect(
        &self,
        document: &ExecutableDocument,
        set: &SelectionSet,
        object: &Map<String, Value>,
        out: &mut Map<String, Value>,
    ) {
        let typename = object
            .get("__typename")
            .and_then(Value::as_str)
            .unwrap_or_default();
        for selection in &set.selections {
            match selection {
                Selection::Field(field) => {
                    let value = if field.name == "__typename" {
                        json!(typename)
                    } else {
                        let raw = object.get(field.name.as_str()).unwrap_or(&Value::Null);
                        self.project(document, &field.selection_set, raw)
                    };
                    merge(out, field.response_key().as_str(), value);
                }
                Selection::InlineFragment(fragment) => {
                    if fragment
                        .type_condition
                        .as_ref()
                        .is_none_or(|condition| self.applies(condition, typename))
                    {
                        self.collect(document, &fragment.selection_set, object, out);
                    }
                }
                Selection::FragmentSpread(spread) => {
                    if let Some(fragment) = document.fragments.get(&spread.fragment_name) {
                        if self.applies(fragment.type_condition(), typename) {
                            self.collect(document, &fragment.selection_set, object, out);
                        }
                    }
                }
            }
        }
    }

    fn applies(&self, condition: &str, typename: &str) -> bool {
        condition == typename || self.inner.schema.is_subtype(condition, typename)
    }
}

fn merge(out: &mut Map<String, Value>, key: &str, value: Value) {
    match (out.get_mut(key), value) {
        (Some(Value::Object(existing)), Value::Object(more)) => {
            for (k, v) in more {
                merge(existing, &k, v);
            }
        }
        (_, value) => {
            out.insert(key.to_owned(), value);
        }
    }
}

/// The field's arguments as JSON, variables substituted (already coerced).
fn field_arguments(field: &Field, variables: &Value) -> Map<String, Value> {
    field
        .arguments
        .iter()
        .map(|argument| {
            (
                argument.name.to_string(),
                ast_value(&argument.value, variables),
            )
        })
        .collect()
}

fn ast_value(value: &ast::Value, variables: &Value) -> Value {
    match value {
        ast::Value::Null => Value::Null,
        ast::Value::Enum(name) => json!(name.as_str()),
        ast::Value::Variable(name) => variables.get(name.as_str()).cloned().unwrap_or(Value::Null),
        ast::Value::String(text) => json!(text),
        ast::Value::Float(f) => f.try_to_f64().map(|f| json!(f)).unwrap_or(Value::Null),
        ast::Value::Int(i) => i
            .as_str()
            .parse::<i64>()
            .map(|i| json!(i))
            .unwrap_or(Value::Null),
        ast::Value::Boolean(b) => json!(b),
        ast::Value::List(items) => {
            Value::Array(items.iter().map(|v| ast_value(v, variables)).collect())
        }
        ast::Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(name, v)| (name.to_string(), ast_value(v, variables)))
                .collect(),
        ),
    }
}

/// A stand-in for OpenCTI's STIX pattern syntax check: every comparison operator is
/// followed by a value (a quoted literal, a number, a boolean…), so `[ipv4-addr:value = ]`
/// is refused although the bridge's light check lets it through.
fn stix_pattern_has_value(pattern: &str) -> bool {
    let comparisons: Vec<&str> = pattern
        .split('[')
        .skip(1)
        .filter_map(|c| c.split(']').next())
        .collect();
    !comparisons.is_empty()
        && comparisons.iter().all(|comparison| {
            let value = comparison
                .rsplit(['=', '>', '<'])
                .next()
                .unwrap_or_default()
                .trim();
            !value.is_empty()
        })
}

fn string_arg<'a>(arguments: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    arguments.get(name).and_then(Value::as_str)
}

/// A list-or-single input value as strings (GraphQL input coercion allows both).
fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

impl State {
    fn query(
        &mut self,
        field: &str,
        arguments: &Map<String, Value>,
        source: Option<&IndicatorSource>,
    ) -> Result<Value, OpenCtiError> {
        match field {
            "stixDomainObjects" => {
                let types = strings(arguments.get("types"));
                let wants_organizations = types.is_empty()
                    || types.iter().any(|t| {
                        matches!(
                            t.as_str(),
                            "Organization" | "Identity" | "Stix-Domain-Object"
                        )
                    });
                let mut names = Vec::new();
                if let Some(filters) = arguments.get("filters").and_then(|f| f.get("filters")) {
                    for filter in filters.as_array().map(Vec::as_slice).unwrap_or_default() {
                        let keys = strings(filter.get("key"));
                        if keys.iter().any(|k| k == "name") {
                            names.extend(strings(filter.get("values")));
                        } else {
                            return Err(OpenCtiError::new(
                                "UNSUPPORTED_ERROR",
                                format!("the test double only filters on name, not {keys:?}"),
                                json!({}),
                            ));
                        }
                    }
                }
                let first = arguments
                    .get("first")
                    .and_then(Value::as_u64)
                    .unwrap_or(500) as usize;
                let edges: Vec<Value> = if wants_organizations {
                    self.organizations
                        .iter()
                        .filter(|o| {
                            names.is_empty()
                                || names.iter().any(|n| n.eq_ignore_ascii_case(&o.name))
                        })
                        .take(first)
                        .map(|o| json!({ "node": organization_json(o), "cursor": o.id }))
                        .collect()
                } else {
                    Vec::new()
                };
                Ok(json!({
                    "edges": edges,
                    "pageInfo": { "hasNextPage": false, "hasPreviousPage": false, "globalCount": edges.len() },
                }))
            }
            "indicator" => {
                let id = string_arg(arguments, "id").unwrap_or_default();
                self.indicator_lookups += 1;
                Ok(self
                    .indicator_by_any_id(id)
                    .cloned()
                    .or_else(|| source.and_then(|source| source(id)))
                    .unwrap_or(Value::Null))
            }
            other => Err(OpenCtiError::new(
                "UNSUPPORTED_ERROR",
                format!("the test double does not implement Query.{other}"),
                json!({}),
            )),
        }
    }

    fn mutation(
        &mut self,
        field: &str,
        arguments: &Map<String, Value>,
    ) -> Result<Value, OpenCtiError> {
        let input = arguments.get("input").cloned().unwrap_or(Value::Null);
        match field {
            "registerConnector" => {
                self.registrations.push(input.clone());
                let id = input["id"].as_str().unwrap_or_default().to_owned();
                let state = self
                    .connector_states
                    .entry(id.clone())
                    .or_insert(None)
                    .clone();
                Ok(json!({
                    "__typename": "Connector",
                    "id": id,
                    "name": input["name"],
                    "connector_type": input["type"],
                    "connector_scope": input["scope"],
                    "connector_state": state,
                    "connector_user_id": "88ec0c6a-13ce-5e39-b486-354fe4a7084f",
                }))
            }
            "pingConnector" => {
                let id = string_arg(arguments, "id").unwrap_or_default().to_owned();
                let state = string_arg(arguments, "state").map(str::to_owned);
                self.pings.push((id.clone(), state.clone()));
                let Some(stored) = self.connector_states.get_mut(&id) else {
                    return Err(OpenCtiError::new(
                        "FUNCTIONAL_ERROR",
                        "No connector found with the specified ID",
                        json!({ "id": id }),
                    ));
                };
                if self.connector_state_reset.remove(&id) {
                    // OpenCTI clears the flag and keeps the state it holds.
                } else if state.is_some() {
                    *stored = state;
                }
                Ok(json!({ "__typename": "Connector", "id": id, "connector_state": stored }))
            }
            "organizationAdd" => {
                let name = input["name"].as_str().unwrap_or_default().to_owned();
                // OpenCTI derives an identity's standard id from its name: adding an
                // existing name returns (upserts) the existing organization.
                let existing = self
                    .organizations
                    .iter()
                    .find(|o| o.name.eq_ignore_ascii_case(&name))
                    .cloned();
                let organization = match existing {
                    Some(organization) => organization,
                    None => self
                        .add_organization(&name, input["description"].as_str().map(str::to_owned)),
                };
                Ok(organization_json(&organization))
            }
            "stixSightingRelationshipAdd" => self.add_sighting(input),
            "indicatorAdd" => self.add_indicator(input),
            "indicatorFieldPatch" => {
                let id = string_arg(arguments, "id").unwrap_or_default().to_owned();
                self.patch_indicator(id, input)
            }
            other => Err(OpenCtiError::new(
                "UNSUPPORTED_ERROR",
                format!("the test double does not implement Mutation.{other}"),
                json!({}),
            )),
        }
    }

    fn add_indicator(&mut self, input: Value) -> Result<Value, OpenCtiError> {
        self.indicator_adds.push(input.clone());
        let text = |key: &str| input.get(key).and_then(Value::as_str).map(str::to_owned);
        let pattern = text("pattern").unwrap_or_default();
        let pattern_type = text("pattern_type").unwrap_or_default();
        // The `name` constraint (minLength 2, not blank) of every version.
        if text("name").is_none_or(|n| n.trim().chars().count() < 2) {
            return Err(OpenCtiError::new(
                "ERR_GRAPHQL_CONSTRAINT_VALIDATION",
                "Variable \"$input\" got invalid value; Expected type \"name_String_NotNull_minLength_2\"",
                json!({ "field": "name" }),
            ));
        }
        if pattern_type == "stix" && !stix_pattern_has_value(&pattern) {
            return Err(OpenCtiError::new(
                "FUNCTIONAL_ERROR",
                "Indicator of type stix is not correctly formatted.",
                json!({ "pattern": pattern }),
            ));
        }
        let stix_id = text("stix_id");
        // OpenCTI derives an indicator's standard id from its pattern: the same pattern
        // again is an upsert into that indicator, which keeps the new STIX id too.
        let same_pattern = self
            .indicators
            .iter()
            .position(|i| i["pattern"].as_str() == Some(pattern.as_str()));
        let index = match same_pattern {
            Some(index) => {
                if let Some(stix_id) = &stix_id {
                    let indicator = &mut self.indicators[index];
                    let mut ids = strings(indicator.get("x_opencti_stix_ids"));
                    if indicator["standard_id"].as_str() != Some(stix_id) && !ids.contains(stix_id)
                    {
                        ids.push(stix_id.clone());
                    }
                    indicator["x_opencti_stix_ids"] = json!(ids);
                }
                index
            }
            None => {
                let now = Timestamp::now().to_rfc3339_millis();
                let standard_id = format!("indicator--{}", uuid::Uuid::new_v4());
                let stix_ids: Vec<String> = stix_id.into_iter().collect();
                let field = |key: &str| input.get(key).cloned().unwrap_or(Value::Null);
                let or_now = |key: &str| text(key).map_or(json!(now), |t| json!(t));
                self.indicators.push(json!({
                    "__typename": "Indicator",
                    "id": uuid::Uuid::new_v4().to_string(),
                    "standard_id": standard_id,
                    "x_opencti_stix_ids": stix_ids,
                    "entity_type": "Indicator",
                    "created": or_now("created"),
                    "modified": or_now("modified"),
                    "revoked": input.get("revoked").and_then(Value::as_bool).unwrap_or(false),
                    "confidence": field("confidence"),
                    "name": field("name"),
                    "description": field("description"),
                    "pattern": pattern,
                    "pattern_type": pattern_type,
                    "pattern_version": field("pattern_version"),
                    "indicator_types": field("indicator_types"),
                    "valid_from": or_now("valid_from"),
                    "valid_until": field("valid_until"),
                    "x_opencti_score": field("x_opencti_score"),
                    "x_opencti_detection": input.get("x_opencti_detection").and_then(Value::as_bool).unwrap_or(false),
                    "x_opencti_main_observable_type": field("x_opencti_main_observable_type"),
                    "createdBy": null,
                    "objectMarking": [],
                    "objectLabel": [],
                }));
                self.indicators.len() - 1
            }
        };
        self.count_indicator_write(index);
        Ok(self.indicators[index].clone())
    }

    fn patch_indicator(&mut self, id: String, input: Value) -> Result<Value, OpenCtiError> {
        self.indicator_patches.push((id.clone(), input.clone()));
        let Some(index) = self.indicator_index(&id) else {
            return Err(OpenCtiError::new(
                "FUNCTIONAL_ERROR",
                "Cant find element to update",
                json!({ "id": id }),
            ));
        };
        // Counted before applying: an empty or refused patch is a write attempt too.
        self.count_indicator_write(index);
        const EDITABLE: &[&str] = &[
            "name",
            "description",
            "pattern",
            "pattern_type",
            "pattern_version",
            "valid_from",
            "valid_until",
            "confidence",
            "revoked",
            "x_opencti_score",
            "x_opencti_detection",
        ];
        let edits = input.as_array().cloned().unwrap_or_default();
        let mut updated = self.indicators[index].clone();
        for edit in &edits {
            let key = edit["key"].as_str().unwrap_or_default();
            let operation = edit["operation"].as_str().unwrap_or("replace");
            if !EDITABLE.contains(&key) {
                return Err(OpenCtiError::new(
                    "FUNCTIONAL_ERROR",
                    format!("the test double cannot edit {key}"),
                    json!({ "key": key }),
                ));
            }
            if operation != "replace" {
                return Err(OpenCtiError::new(
                    "UNSUPPORTED_ERROR",
                    format!("the test double only supports replace, not {operation}"),
                    json!({ "key": key }),
                ));
            }
            let value = edit["value"].get(0).cloned().unwrap_or(Value::Null);
            if key == "pattern" && updated["pattern"] != value {
                // OpenCTI derives a new standard id; the old one stays a STIX id.
                let old = updated["standard_id"].clone();
                let mut ids = strings(updated.get("x_opencti_stix_ids"));
                ids.extend(strings(Some(&old)));
                updated["x_opencti_stix_ids"] = json!(ids);
                updated["standard_id"] = json!(format!("indicator--{}", uuid::Uuid::new_v4()));
            }
            updated[key] = value;
        }
        if let Some(pattern) = updated["pattern"].as_str() {
            if updated["pattern_type"] == "stix" && !stix_pattern_has_value(pattern) {
                return Err(OpenCtiError::new(
                    "FUNCTIONAL_ERROR",
                    "Indicator of type stix is not correctly formatted.",
                    json!({ "pattern": pattern }),
                ));
            }
        }
        updated["modified"] = json!(Timestamp::now().to_rfc3339_millis());
        self.indicators[index] = updated;
        Ok(self.indicators[index].clone())
    }

    fn add_sighting(&mut self, input: Value) -> Result<Value, OpenCtiError> {
        self.sighting_posts.push(input.clone());
        let text = |key: &str| input.get(key).and_then(Value::as_str).map(str::to_owned);
        let stix_id = text("stix_id");
        if let Some(stix_id) = &stix_id {
            *self.posts_per_stix_id.entry(stix_id.clone()).or_default() += 1;
        }
        let from_id = text("fromId").unwrap_or_default();
        let to_id = text("toId").unwrap_or_default();
        let created_by = text("createdBy");
        let mut unresolved = Vec::new();
        if !self.accept_any_from_id && !self.knows(&from_id) {
            unresolved.push(from_id.clone());
        }
        if !self.knows(&to_id) {
            unresolved.push(to_id.clone());
        }
        if let Some(created_by) = &created_by {
            if self.organization_by_any_id(created_by).is_none() {
                unresolved.push(created_by.clone());
            }
        }
        if !unresolved.is_empty() {
            return Err(OpenCtiError::missing_reference(unresolved));
        }
        let first_seen = text("first_seen");
        let last_seen = text("last_seen");
        if let (Some(first), Some(last)) = (&first_seen, &last_seen) {
            let parse = |t: &str| Timestamp::parse(t).ok();
            if let (Some(first), Some(last)) = (parse(first), parse(last)) {
                if first > last {
                    return Err(OpenCtiError::new(
                        "DATABASE_ERROR",
                        "You cant create a relation with last_seen less than first_seen",
                        json!({ "from": from_id, "to": to_id }),
                    ));
                }
            }
        }
        let record_fields = |id: String, standard_id: String| SightingRecord {
            id,
            standard_id,
            stix_id: stix_id.clone(),
            from_id: from_id.clone(),
            to_id: to_id.clone(),
            created_by: created_by.clone(),
            first_seen: first_seen.clone(),
            last_seen: last_seen.clone(),
            attribute_count: input.get("attribute_count").and_then(Value::as_i64),
            confidence: input.get("confidence").and_then(Value::as_i64),
            x_opencti_negative: input.get("x_opencti_negative").and_then(Value::as_bool),
            update: input.get("update").and_then(Value::as_bool),
            input: input.clone(),
        };
        let existing = stix_id
            .as_ref()
            .and_then(|stix_id| self.sighting_index.get(stix_id).copied());
        let record = match existing {
            Some(index) => {
                let old = &self.sightings[index];
                let updated = record_fields(old.id.clone(), old.standard_id.clone());
                self.sightings[index] = updated.clone();
                updated
            }
            None => {
                let id = uuid::Uuid::new_v4().to_string();
                let standard_id = stix_id
                    .clone()
                    .unwrap_or_else(|| format!("sighting--{}", uuid::Uuid::new_v4()));
                let created = record_fields(id, standard_id);
                if let Some(stix_id) = &stix_id {
                    self.sighting_index
                        .insert(stix_id.clone(), self.sightings.len());
                }
                self.sightings.push(created.clone());
                created
            }
        };
        Ok(sighting_json(&record))
    }
}

// ---------------------------------------------------------------------------------------
// Standalone server
// ---------------------------------------------------------------------------------------

enum Control {
    SetDown(bool, std::sync::mpsc::Sender<()>),
    Stop,
}

/// The double served alone on 127.0.0.1 (a free port) by a runtime on its own thread.
/// Stops on drop.
pub struct GraphqlServer {
    addr: SocketAddr,
    double: GraphqlDouble,
    control: tokio::sync::mpsc::UnboundedSender<Control>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts `double` on a free 127.0.0.1 port.
pub fn start(double: GraphqlDouble) -> GraphqlServer {
    let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .unwrap_or_else(|e| panic!("cannot bind the GraphQL double: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("no local address: {e}"));
    let (control, commands) = tokio::sync::mpsc::unbounded_channel();
    let app = router(double.clone());
    let thread = std::thread::Builder::new()
        .name("opencti-graphql-double".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("runtime: {e}"));
            runtime.block_on(serve(listener, addr, app, commands));
        })
        .unwrap_or_else(|e| panic!("cannot spawn the GraphQL double thread: {e}"));
    GraphqlServer {
        addr,
        double,
        control,
        thread: Some(thread),
    }
}

/// A non-blocking listening socket. std sets `SO_REUSEADDR` on Unix listeners, so the
/// same port can be bound again right after [`GraphqlServer::set_down`].
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

type Running = (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
);

fn run(listener: std::net::TcpListener, app: Router) -> Running {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => panic!("listener: {e}"),
        };
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await;
    });
    (stop, task)
}

async fn shutdown(running: Running) {
    let (stop, task) = running;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
}

async fn serve(
    listener: std::net::TcpListener,
    addr: SocketAddr,
    app: Router,
    mut commands: tokio::sync::mpsc::UnboundedReceiver<Control>,
) {
    let mut running = Some(run(listener, app.clone()));
    while let Some(command) = commands.recv().await {
        match command {
            Control::SetDown(true, done) => {
                if let Some(current) = running.take() {
                    shutdown(current).await;
                }
                let _ = done.send(());
            }
            Control::SetDown(false, done) => {
                if running.is_none() {
                    let mut attempt = 0;
                    let listener = loop {
                        match bind(addr) {
                            Ok(listener) => break listener,
                            Err(_) if attempt < 50 => {
                                attempt += 1;
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            Err(e) => panic!("cannot listen on {addr} again: {e}"),
                        }
                    };
                    running = Some(run(listener, app.clone()));
                }
                let _ = done.send(());
            }
            Control::Stop => break,
        }
    }
    if let Some(current) = running.take() {
        shutdown(current).await;
    }
}

impl GraphqlServer {
    /// `http://127.0.0.1:<port>` (the OpenCTI `url`; the client appends `/graphql`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn double(&self) -> &GraphqlDouble {
        &self.double
    }

    /// `true`: stop listening (new connections are refused, idle ones closed; returns once
    /// the port is closed). `false`: listen again on the same port.
    pub fn set_down(&self, down: bool) {
        let (done, wait) = std::sync::mpsc::channel();
        if self.control.send(Control::SetDown(down, done)).is_ok() {
            let _ = wait.recv_timeout(Duration::from_secs(15));
        }
    }
}

impl Drop for GraphqlServer {
    fn drop(&mut self) {
        let _ = self.control.send(Control::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
