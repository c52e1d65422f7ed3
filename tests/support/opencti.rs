//! A test double of OpenCTI's stream endpoints, `GET /stream` and `GET /stream/{id}`, that
//! speaks the real wire format (see `tests/fixtures/opencti/stream-sample*.txt`) and
//! follows the server's rules (`sseMiddleware.js`, `redis.ts`, OpenCTI 6.x):
//!
//! - First `event: connected` without an id line, with `lastEventId`, `firstEventId`,
//!   `firstEventDate`, `lastEventDate`, `streamSize`, `connectionId`.
//! - Then the retained events after the start position, exclusive (Redis `XREAD`
//!   semantics on `<ms>-<seq>`), in order; then new events as the test appends them.
//!   The start comes from the `from` query parameter, else a `from` header, else
//!   `Last-Event-ID`; `0`/`0-0` is the beginning, `<ms>-<seq>` an id, an ISO date `<ms>-0`.
//!   Without any, the connection starts at the end of the log (live only).
//! - An event appended with [`OpenCti::append_dependency_then`] is one Redis entry: on a
//!   live stream its dependency events go out first, all with the entry's id and
//!   `origin.referer = "dependencies"`; a dependency already sent on the same connection
//!   is not sent again (OpenCTI's per-connection cache). The raw `/stream` sends the entry
//!   itself only, never dependencies. (OpenCTI sends referenced objects as dependencies
//!   even with `no-dependencies: true`: that header only drops relationships, which this
//!   double does not model. It is recorded, not acted on.)
//! - Live streams honour `listen-delete: false` (no delete events) and `with-inferences`
//!   (inferred objects only with `true`); the raw `/stream` sends everything.
//! - `recover=<date>` (query, or `recover` / `recover-date` header) on a live stream, when
//!   the date is after the start: replays the current state of every object whose
//!   `updated_at` lies between the start and that date, inclusive, oldest first, as
//!   `create` events with `origin.referer = "init"`, ids `<updated_at ms>-0` and no
//!   `type`/`scope`/`event_id` keys; then goes live after `<recover ms>-0`. A recover
//!   without a start position is answered 500, as OpenCTI does. The raw `/stream` ignores
//!   `recover`.
//! - A heartbeat every [`OpenCti::set_heartbeat_interval`] (default 5 s), with an id:
//!   the id of the last event the connection processed, or — by default, as OpenCTI 6.x
//!   does after an idle Redis read — `<now>-0` when nothing was processed since the last
//!   heartbeat (see [`HeartbeatIds`]). Its data is the id's time as a JSON string. Each
//!   heartbeat is followed by a `consumer_metrics` event with the same id (6.9.18+; can be
//!   turned off).
//!
//! Test controls: trim the log ([`OpenCti::trim_before`]), cut or cleanly end the open
//! connections, answer a status for the next connections, require a token, stop a live
//! stream (410), slow the answers down, put a heartbeat between an entry's dependency
//! events and its event, and read every request's headers and query.
//!
//! The double runs on 127.0.0.1 on a free port in a runtime thread of its own, so blocking
//! tests can use it too, and stops on drop. Every method is synchronous and quick, except
//! the `wait_*` helpers (which block) and the `until_*` ones (which are async).
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State as AppState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// The OpenCTI extension of every STIX object OpenCTI sends.
pub const OCTI_EXT: &str = "extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba";
/// The MITRE extension OpenCTI adds to indicators.
const MITRE_EXT: &str = "extension-definition--322b8f77-262a-4cb8-a915-1e441e00329b";
/// The user the double's events come from (as in the samples).
const USER_ID: &str = "88ec0c6a-13ce-5e39-b486-354fe4a7084f";
const DAY_MS: u64 = 86_400_000;
/// Frames are gathered into body chunks of about this size when no delay is set.
const CHUNK_BYTES: usize = 32 * 1024;
/// Log entries taken from the shared state per lock.
const BATCH_ENTRIES: usize = 512;

/// Which id a heartbeat carries when the connection processed no event since the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatIds {
    /// `<now>-0`, as OpenCTI 6.x: after a Redis read that found nothing, the stream's "last
    /// event id" becomes the current time. (Default.)
    NowWhenIdle,
    /// Always the id of the last event the connection processed (or its start position).
    LastEvent,
}

/// A Redis stream id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Id {
    ms: u64,
    seq: u64,
}

impl Id {
    const ZERO: Id = Id { ms: 0, seq: 0 };

    fn parse(s: &str) -> Option<Id> {
        let (ms, seq) = s.split_once('-')?;
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return None;
        }
        Some(Id {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// An indicator as a test describes it; the double turns it into OpenCTI's STIX 2.1 form
/// (6.x: the OpenCTI fields in the extension [`OCTI_EXT`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Indicator {
    /// `indicator--<uuid>`.
    pub stix_id: String,
    /// OpenCTI's internal id (the extension's `id`).
    pub internal_id: String,
    pub name: String,
    pub pattern: String,
    pub pattern_type: String,
    pub main_observable_type: String,
    /// Goes to the extension's `observable_values` when set.
    pub observable_value: Option<String>,
    pub detection: bool,
    pub score: u64,
    pub revoked: bool,
    pub confidence: u64,
    pub description: Option<String>,
    pub indicator_types: Vec<String>,
    /// The author's STIX id (e.g. from [`organization`]).
    pub created_by_ref: Option<String>,
    pub object_marking_refs: Vec<String>,
    /// An inferred object: live streams send it only with `with-inferences: true`.
    pub is_inferred: bool,
}

impl Indicator {
    /// An indicator with a new id, detection on, score 50.
    pub fn new(name: &str, pattern: &str, main_observable_type: &str) -> Self {
        Indicator {
            stix_id: format!("indicator--{}", uuid::Uuid::new_v4()),
            internal_id: uuid::Uuid::new_v4().to_string(),
            name: name.to_owned(),
            pattern: pattern.to_owned(),
            pattern_type: "stix".to_owned(),
            main_observable_type: main_observable_type.to_owned(),
            observable_value: None,
            detection: true,
            score: 50,
            revoked: false,
            confidence: 100,
            description: None,
            indicator_types: vec!["malicious-activity".to_owned()],
            created_by_ref: None,
            object_marking_refs: Vec::new(),
            is_inferred: false,
        }
    }

    /// `[ipv4-addr:value = '<ip>']`.
    pub fn ipv4(ip: &str) -> Self {
        let mut indicator = Indicator::new(ip, &format!("[ipv4-addr:value = '{ip}']"), "IPv4-Addr");
        indicator.observable_value = Some(ip.to_owned());
        indicator
    }

    /// `[domain-name:value = '<domain>']`.
    pub fn domain(domain: &str) -> Self {
        let mut indicator = Indicator::new(
            domain,
            &format!("[domain-name:value = '{domain}']"),
            "Domain-Name",
        );
        indicator.observable_value = Some(domain.to_owned());
        indicator
    }

    pub fn with_detection(mut self, detection: bool) -> Self {
        self.detection = detection;
        self
    }

    pub fn with_score(mut self, score: u64) -> Self {
        self.score = score;
        self
    }

    pub fn with_revoked(mut self, revoked: bool) -> Self {
        self.revoked = revoked;
        self
    }

    pub fn with_description(mut self, description: &str) -> Self {
        self.description = Some(description.to_owned());
        self
    }

    pub fn with_author(mut self, stix_id: &str) -> Self {
        self.created_by_ref = Some(stix_id.to_owned());
        self
    }

    pub fn with_marking(mut self, stix_id: &str) -> Self {
        self.object_marking_refs.push(stix_id.to_owned());
        self
    }

    pub fn with_inferred(mut self, inferred: bool) -> Self {
        self.is_inferred = inferred;
        self
    }
}

/// The event an entry of [`OpenCti::append_dependency_then`] ends with.
#[derive(Debug, Clone, Copy)]
pub enum Then<'a> {
    Create(&'a Indicator),
    Update(&'a Indicator),
    Delete(&'a Indicator),
    Raw { event: &'a str, data: &'a str },
}

/// A TLP marking definition as OpenCTI sends it (`TLP:CLEAR`, `TLP:GREEN`, `TLP:AMBER`,
/// `TLP:RED` have their standard ids; any other name gets a new one), last updated at
/// `updated_ms`.
pub fn tlp_marking(name: &str, updated_ms: u64) -> Value {
    let id = match name {
        "TLP:WHITE" | "TLP:CLEAR" => "613f2e26-407d-48c7-9eca-b8e91df99dc9".to_owned(),
        "TLP:GREEN" => "34098fce-860f-48ae-8e50-ebd3cc5e41da".to_owned(),
        "TLP:AMBER" => "f88d31f6-486f-44da-b317-01333bde0b82".to_owned(),
        "TLP:RED" => "5e57c739-391a-4eb3-b6be-7d15ca92d5ed".to_owned(),
        _ => uuid::Uuid::new_v4().to_string(),
    };
    let at = iso_from_ms(updated_ms);
    json!({
        "id": format!("marking-definition--{id}"),
        "spec_version": "2.1",
        "type": "marking-definition",
        "extensions": {
            OCTI_EXT: {
                "extension_type": "property-extension",
                "id": uuid::Uuid::new_v4().to_string(),
                "type": "Marking-Definition",
                "created_at": at,
                "updated_at": at,
                "is_inferred": false,
                "creator_ids": [USER_ID],
                "order": 2,
                "color": "#2e7d32"
            }
        },
        "created": at,
        "modified": at,
        "name": name,
        "definition_type": "TLP"
    })
}

/// An organization (an author) as OpenCTI sends it, last updated at `updated_ms`.
pub fn organization(name: &str, updated_ms: u64) -> Value {
    let at = iso_from_ms(updated_ms);
    json!({
        "id": format!("identity--{}", uuid::Uuid::new_v4()),
        "spec_version": "2.1",
        "type": "identity",
        "extensions": {
            OCTI_EXT: {
                "extension_type": "property-extension",
                "id": uuid::Uuid::new_v4().to_string(),
                "type": "Organization",
                "created_at": at,
                "updated_at": at,
                "is_inferred": false,
                "creator_ids": [USER_ID]
            }
        },
        "created": at,
        "modified": at,
        "revoked": false,
        "confidence": 100,
        "lang": "en",
        "name": name,
        "identity_class": "organization"
    })
}

/// One request the double received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// `/stream` or `/stream/{id}`.
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    /// Header names in lower case, values as received (lossy UTF-8).
    pub headers: Vec<(String, String)>,
    /// When the request arrived.
    pub at: std::time::Instant,
}

impl RecordedRequest {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of a query parameter, decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        query_pairs(self.query.as_deref())
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }
}

/// What one frame of an entry is, for the per-connection filters.
#[derive(Debug, Clone)]
enum Kind {
    /// A dependency: skipped on the raw stream and when already sent on the connection.
    Dependency { stix_id: String },
    /// The entry's event.
    Main {
        stix_id: String,
        delete: bool,
        inferred: bool,
    },
    /// Sent as is, everywhere.
    Raw,
}

#[derive(Debug, Clone)]
struct Frame {
    kind: Kind,
    /// The whole SSE event, `id:` line included.
    bytes: Bytes,
}

/// One Redis stream entry.
#[derive(Debug, Clone)]
struct Entry {
    id: Id,
    frames: Vec<Frame>,
}

/// An object in the "database": what recovery replays.
#[derive(Debug, Clone)]
struct Stored {
    stix: Value,
    created_ms: u64,
    updated_ms: u64,
}

/// Everything the test controls and the connections read.
struct State {
    log: VecDeque<Entry>,
    /// The newest id ever appended (kept when trimmed away).
    last_id: Option<Id>,
    /// No appended id may be at or below this: the highest `<now>-0` heartbeat id issued.
    id_floor: Id,
    clock_ms: Option<u64>,
    objects: HashMap<String, Stored>,
    requests: Vec<RecordedRequest>,
    statuses: VecDeque<(u16, String)>,
    token: Option<String>,
    stopped: HashSet<String>,
    heartbeat: Duration,
    heartbeat_ids: HeartbeatIds,
    consumer_metrics: bool,
    heartbeat_inside_dependencies: bool,
    event_delay: Duration,
    response_delay: Duration,
    open: usize,
}

impl State {
    fn now_ms(&self) -> u64 {
        self.clock_ms.unwrap_or_else(wall_ms)
    }

    fn next_id(&mut self) -> Id {
        let now = self.now_ms();
        let floor = self.last_id.map_or(self.id_floor, |l| l.max(self.id_floor));
        let id = if now > floor.ms {
            Id { ms: now, seq: 0 }
        } else {
            Id {
                ms: floor.ms,
                seq: floor.seq + 1,
            }
        };
        self.last_id = Some(id);
        id
    }

    fn connected_json(&self) -> String {
        let first = self.log.front().map(|e| e.id);
        let last = self.log.back().map(|e| e.id).or(self.last_id);
        let first = first.or(last).unwrap_or(Id::ZERO);
        let last = last.unwrap_or(Id::ZERO);
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Connected {
            last_event_id: String,
            first_event_id: String,
            first_event_date: String,
            last_event_date: String,
            stream_size: usize,
            connection_id: String,
        }
        to_json(&Connected {
            last_event_id: last.to_string(),
            first_event_id: first.to_string(),
            first_event_date: iso_from_ms(first.ms),
            last_event_date: iso_from_ms(last.ms),
            stream_size: self.log.len(),
            connection_id: uuid::Uuid::new_v4().to_string(),
        })
    }

    /// Up to [`BATCH_ENTRIES`] entries after `cursor`, oldest first.
    fn entries_after(&self, cursor: Id) -> Vec<Entry> {
        let start = self.log.partition_point(|e| e.id <= cursor);
        self.log
            .range(start..)
            .take(BATCH_ENTRIES)
            .cloned()
            .collect()
    }

    fn stored(&self, stix_id: &str) -> &Stored {
        self.objects
            .get(stix_id)
            .unwrap_or_else(|| panic!("the double has no object {stix_id}: create it first"))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Control {
    cut: u64,
    end: u64,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every change of the log.
    log_version: watch::Sender<u64>,
    control: watch::Sender<Control>,
    /// Requests received so far.
    requests: watch::Sender<usize>,
    /// Connections currently streaming.
    open: watch::Sender<usize>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The double. See the module documentation.
pub struct OpenCti {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl OpenCti {
    /// Starts the double on a free port of 127.0.0.1.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Starts the double serving the stream and, on the same address, `POST /graphql`
    /// answered by `graphql` (the bridge has one `opencti.url` for both).
    pub fn start_with_graphql(graphql: super::opencti_graphql::GraphqlDouble) -> Self {
        Self::start_with(Some(graphql))
    }

    fn start_with(graphql: Option<super::opencti_graphql::GraphqlDouble>) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                log: VecDeque::new(),
                last_id: None,
                id_floor: Id::ZERO,
                clock_ms: None,
                objects: HashMap::new(),
                requests: Vec::new(),
                statuses: VecDeque::new(),
                token: None,
                stopped: HashSet::new(),
                heartbeat: Duration::from_secs(5),
                heartbeat_ids: HeartbeatIds::NowWhenIdle,
                consumer_metrics: true,
                heartbeat_inside_dependencies: false,
                event_delay: Duration::ZERO,
                response_delay: Duration::ZERO,
                open: 0,
            }),
            log_version: watch::channel(0).0,
            control: watch::channel(Control::default()).0,
            requests: watch::channel(0).0,
            open: watch::channel(0).0,
        });
        let (shutdown, stop) = oneshot::channel::<()>();
        let mut app = Router::new()
            .route("/stream", get(raw_stream))
            .route("/stream/{id}", get(live_stream))
            .with_state(Arc::clone(&shared));
        if let Some(graphql) = graphql {
            let database = Arc::clone(&shared);
            graphql.set_indicator_source(Arc::new(move |id| {
                let state = database.lock();
                state.objects.values().find_map(|stored| {
                    let stix = &stored.stix;
                    let internal = stix["extensions"][OCTI_EXT]["id"].as_str();
                    let matches = stix["id"].as_str() == Some(id) || internal == Some(id);
                    (matches && stix["type"] == "indicator").then(|| graphql_indicator(stix))
                })
            }));
            app = app.merge(super::opencti_graphql::router(graphql));
        }
        let thread = std::thread::Builder::new()
            .name("opencti-double".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the double's runtime");
                runtime.block_on(async move {
                    // TCP_NODELAY, as OpenCTI's Node.js server (`noDelay` defaults to true
                    // since Node 18): with Nagle's algorithm a live event written while the
                    // previous one is unacknowledged waits for the client's delayed ACK
                    // (up to ~40 ms on Linux).
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("tokio listener")
                        .tap_io(|tcp| {
                            if let Err(e) = tcp.set_nodelay(true) {
                                eprintln!("OpenCTI double: TCP_NODELAY: {e}");
                            }
                        });
                    tokio::select! {
                        result = axum::serve(listener, app) => {
                            if let Err(e) = result {
                                eprintln!("OpenCTI double: server failed: {e}");
                            }
                        }
                        _ = stop => {}
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .expect("the double's thread");
        OpenCti {
            shared,
            addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:<port>`: what goes into `opencti.url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    // ----- the event log -----

    /// Appends `create` of an indicator (and stores it for recovery). Returns the event id.
    pub fn append_indicator_create(&self, indicator: &Indicator) -> String {
        self.append_dependency_then(&[], Then::Create(indicator))
    }

    /// Appends `update` of an indicator created before: the new state, `context.patch` /
    /// `reverse_patch` / `changes` computed against the stored state. Returns the event id.
    pub fn append_indicator_update(&self, indicator: &Indicator) -> String {
        self.append_dependency_then(&[], Then::Update(indicator))
    }

    /// Appends `delete` of an indicator created before (the data is its last state) and
    /// removes it from what recovery replays. Returns the event id.
    pub fn append_indicator_delete(&self, indicator: &Indicator) -> String {
        self.append_dependency_then(&[], Then::Delete(indicator))
    }

    /// Appends `merge`: `sources` are merged into `target` (both created before). The data
    /// is the target's new state; `context` has `patch`, `reverse_patch` and `sources` (the
    /// merged-away objects, which get no delete event and leave the stored state).
    pub fn append_indicator_merge(&self, target: &Indicator, sources: &[&Indicator]) -> String {
        let mut state = self.shared.lock();
        let id = state.next_id();
        let now = id.ms;
        let previous = state.stored(&target.stix_id).clone();
        let current = indicator_stix(&state, target, previous.created_ms, now);
        let mut source_objects = Vec::new();
        for source in sources {
            let stored = state
                .objects
                .remove(&source.stix_id)
                .unwrap_or_else(|| panic!("merge source {} was never created", source.stix_id));
            source_objects.push(stored.stix);
        }
        let names: Vec<String> = sources.iter().map(|s| format!("`{}`", s.name)).collect();
        let context = json!({
            "patch": json_diff(&previous.stix, &current),
            "reverse_patch": json_diff(&current, &previous.stix),
            "sources": source_objects,
        });
        let data = user_event(
            "merge",
            &format!("merges Indicator {} in `{}`", names.join(", "), target.name),
            &current,
            Some(&context),
            now,
        );
        state.objects.insert(
            target.stix_id.clone(),
            Stored {
                stix: current,
                created_ms: previous.created_ms,
                updated_ms: now,
            },
        );
        let frames = vec![Frame {
            kind: Kind::Main {
                stix_id: target.stix_id.clone(),
                delete: false,
                inferred: target.is_inferred,
            },
            bytes: frame_bytes(Some(id), "merge", &data),
        }];
        self.push(state, Entry { id, frames })
    }

    /// Appends one entry: the `dependencies` (STIX objects, e.g. [`tlp_marking`],
    /// [`organization`]) as `create` events with `origin.referer = "dependencies"`, then
    /// `then`, all under one id, which is returned. The dependencies are stored for recovery.
    pub fn append_dependency_then(&self, dependencies: &[Value], then: Then<'_>) -> String {
        let mut state = self.shared.lock();
        let id = state.next_id();
        let mut frames = Vec::new();
        for object in dependencies {
            let stix_id = object["id"]
                .as_str()
                .expect("a dependency needs a STIX id")
                .to_owned();
            let data = system_event(object, &create_message(object), "dependencies");
            frames.push(Frame {
                kind: Kind::Dependency {
                    stix_id: stix_id.clone(),
                },
                bytes: frame_bytes(Some(id), "create", &data),
            });
            store_object(&mut state, object.clone(), id.ms);
        }
        frames.push(main_frame(&mut state, id, then));
        self.push(state, Entry { id, frames })
    }

    /// Appends the `create` of a TLP:CLEAR marking (no indicator): history that a stored
    /// position can point at, so that a test's bridge is one that ran before. Returns its id.
    pub fn append_marking(&self) -> String {
        let marking = tlp_marking("TLP:CLEAR", 1_700_000_000_000);
        let data = json!({"version": "4", "type": "create", "data": marking, "origin": {}});
        self.append_raw("create", &data.to_string())
    }

    /// Appends an event with any name and data (sent verbatim on both endpoints, one
    /// `data:` line per line of `data`). Returns its id.
    pub fn append_raw(&self, event: &str, data: &str) -> String {
        let mut state = self.shared.lock();
        let id = state.next_id();
        let frame = main_frame(&mut state, id, Then::Raw { event, data });
        self.push(
            state,
            Entry {
                id,
                frames: vec![frame],
            },
        )
    }

    /// Appends an event whose `data:` line is `data` byte for byte — invalid UTF-8, or
    /// megabytes, as a broken or hostile server could send (one `data:` line per line of
    /// `data`). Returns its id.
    pub fn append_raw_bytes(&self, event: &str, data: &[u8]) -> String {
        let mut state = self.shared.lock();
        let id = state.next_id();
        let mut bytes = format!("id: {id}\nevent: {event}\n").into_bytes();
        for line in data.split(|&b| b == b'\n') {
            bytes.extend_from_slice(b"data: ");
            bytes.extend_from_slice(line);
            bytes.push(b'\n');
        }
        bytes.push(b'\n');
        let frame = Frame {
            kind: Kind::Raw,
            bytes: Bytes::from(bytes),
        };
        self.push(
            state,
            Entry {
                id,
                frames: vec![frame],
            },
        )
    }

    fn push(&self, mut state: MutexGuard<'_, State>, entry: Entry) -> String {
        let id = entry.id.to_string();
        state.log.push_back(entry);
        drop(state);
        self.shared.log_version.send_modify(|v| *v += 1);
        id
    }

    /// Puts an object in the "database" only (no stream event): recovery replays it.
    /// Its `updated_at` (OpenCTI extension) decides when; the current time without one.
    pub fn put_object(&self, stix: Value) {
        let mut state = self.shared.lock();
        let now = state.now_ms();
        store_object(&mut state, stix, now);
    }

    /// Removes an object from the "database" only (no stream event).
    pub fn remove_object(&self, stix_id: &str) {
        self.shared.lock().objects.remove(stix_id);
    }

    /// The stored STIX object (the state recovery would replay), if any.
    pub fn object(&self, stix_id: &str) -> Option<Value> {
        self.shared
            .lock()
            .objects
            .get(stix_id)
            .map(|s| s.stix.clone())
    }

    /// Drops the retained entries with an id below `id` (Redis `XTRIM MINID`):
    /// `firstEventId` moves up, resuming before it silently skips what was trimmed.
    pub fn trim_before(&self, id: &str) {
        let id = Id::parse(id).unwrap_or_else(|| panic!("trim_before: {id:?} is not <ms>-<seq>"));
        let mut state = self.shared.lock();
        while state.log.front().is_some_and(|e| e.id < id) {
            state.log.pop_front();
        }
        drop(state);
        self.shared.log_version.send_modify(|v| *v += 1);
    }

    /// The retained entries' ids, oldest first.
    pub fn event_ids(&self) -> Vec<String> {
        self.shared
            .lock()
            .log
            .iter()
            .map(|e| e.id.to_string())
            .collect()
    }

    /// The newest id appended, if any.
    pub fn last_event_id(&self) -> Option<String> {
        self.shared.lock().last_id.map(|id| id.to_string())
    }

    /// The oldest retained id, if any.
    pub fn first_event_id(&self) -> Option<String> {
        self.shared.lock().log.front().map(|e| e.id.to_string())
    }

    // ----- time -----

    /// Freezes the double's clock at `ms` (epoch milliseconds): event ids, `updated_at`,
    /// heartbeat ids use it from now on. Ids still never go backwards.
    pub fn set_clock_ms(&self, ms: u64) {
        self.shared.lock().clock_ms = Some(ms);
    }

    /// Moves the clock forward (freezing it first at the wall-clock time if it ran free).
    pub fn advance_clock(&self, by: Duration) {
        let mut state = self.shared.lock();
        let now = state.now_ms();
        state.clock_ms = Some(now + by.as_millis() as u64);
    }

    /// The double's current time in epoch milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.shared.lock().now_ms()
    }

    // ----- connections -----

    /// Cuts every open stream mid-way: the response body fails, the client sees a broken
    /// connection (not a clean end).
    pub fn cut_connections(&self) {
        self.shared.control.send_modify(|c| c.cut += 1);
    }

    /// Ends every open stream cleanly (the body finishes, as after a server shutdown).
    pub fn end_connections(&self) {
        self.shared.control.send_modify(|c| c.end += 1);
    }

    /// The next `count` requests are answered with `status` and an empty body (as OpenCTI's
    /// `res.status(n).end()`), e.g. 401, 403, 410, 500, 502.
    pub fn fail_next(&self, status: u16, count: usize) {
        self.fail_next_with_body(status, count, "");
    }

    /// Like [`fail_next`](Self::fail_next), with a body (a proxy's error page, say).
    pub fn fail_next_with_body(&self, status: u16, count: usize, body: &str) {
        let mut state = self.shared.lock();
        let answer = (status, body.to_owned());
        state.statuses.extend(std::iter::repeat_n(answer, count));
    }

    /// Requests without `Authorization: Bearer <token>` are answered 401.
    pub fn require_token(&self, token: &str) {
        self.shared.lock().token = Some(token.to_owned());
    }

    /// `/stream/{id}` answers 410 ("This live stream is stopped") until started again.
    pub fn stop_live_stream(&self, id: &str) {
        self.shared.lock().stopped.insert(id.to_owned());
    }

    pub fn start_live_stream(&self, id: &str) {
        self.shared.lock().stopped.remove(id);
    }

    /// The heartbeat period of connections opened from now on (default 5 s).
    pub fn set_heartbeat_interval(&self, every: Duration) {
        self.shared.lock().heartbeat = every;
    }

    /// Which id an idle heartbeat carries (default [`HeartbeatIds::NowWhenIdle`]).
    pub fn set_heartbeat_ids(&self, ids: HeartbeatIds) {
        self.shared.lock().heartbeat_ids = ids;
    }

    /// Whether each heartbeat is followed by `consumer_metrics` (default true, 6.9.18+).
    pub fn set_consumer_metrics(&self, on: bool) {
        self.shared.lock().consumer_metrics = on;
    }

    /// When on, an entry whose dependency events were sent gets a heartbeat with its id
    /// between those and its own event — which OpenCTI does whenever its heartbeat timer
    /// fires while it resolves dependencies (SPEC §2.2).
    pub fn set_heartbeat_inside_dependencies(&self, on: bool) {
        self.shared.lock().heartbeat_inside_dependencies = on;
    }

    /// A pause after each event sent (OpenCTI's per-connection `delay`): slow streams.
    pub fn set_event_delay(&self, delay: Duration) {
        self.shared.lock().event_delay = delay;
    }

    /// A pause before the response head: slow answers.
    pub fn set_response_delay(&self, delay: Duration) {
        self.shared.lock().response_delay = delay;
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// The last request received.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.shared.lock().requests.last().cloned()
    }

    pub fn request_count(&self) -> usize {
        self.shared.lock().requests.len()
    }

    /// Streams currently open (connected event sent, not yet closed).
    pub fn open_connections(&self) -> usize {
        self.shared.lock().open
    }

    /// Blocks until `n` requests arrived; false on timeout.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> bool {
        wait_blocking(&self.shared.requests, timeout, |v| *v >= n)
    }

    /// Blocks until exactly `n` streams are open; false on timeout.
    pub fn wait_open_connections(&self, n: usize, timeout: Duration) -> bool {
        wait_blocking(&self.shared.open, timeout, |v| *v == n)
    }

    /// Waits until `n` requests arrived.
    pub async fn until_requests(&self, n: usize) {
        let mut rx = self.shared.requests.subscribe();
        let _ = rx.wait_for(|v| *v >= n).await;
    }

    /// Waits until exactly `n` streams are open.
    pub async fn until_open_connections(&self, n: usize) {
        let mut rx = self.shared.open.subscribe();
        let _ = rx.wait_for(|v| *v == n).await;
    }
}

impl Drop for OpenCti {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn wait_blocking<T>(tx: &watch::Sender<T>, timeout: Duration, ok: impl Fn(&T) -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if ok(&tx.borrow()) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ----- building events -----

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("JSON")
}

fn user_origin() -> Value {
    json!({
        "socket": "query",
        "ip": "::ffff:172.18.0.1",
        "user_id": USER_ID,
        "group_ids": ["2ff1a5ef-2a4b-4b7a-9f3c-1d7c3c2b6a51"],
        "organization_ids": [],
        "user_metadata": {},
        "referer": "http://localhost:8080/dashboard/observations/indicators"
    })
}

/// An event a user caused, keys in the order of the sample.
fn user_event(kind: &str, message: &str, data: &Value, context: Option<&Value>, at: u64) -> String {
    #[derive(Serialize)]
    struct UserEvent<'a> {
        version: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
        scope: &'a str,
        message: &'a str,
        origin: Value,
        data: &'a Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        context: Option<&'a Value>,
        event_id: String,
    }
    to_json(&UserEvent {
        version: "4",
        kind,
        scope: "external",
        message,
        origin: user_origin(),
        data,
        context,
        event_id: format!("{at}-0"),
    })
}

/// A dependency or recovery event: no `type`, `scope`, `event_id`.
fn system_event(data: &Value, message: &str, referer: &str) -> String {
    #[derive(Serialize)]
    struct SystemEvent<'a> {
        data: &'a Value,
        message: &'a str,
        origin: Value,
        version: &'a str,
    }
    to_json(&SystemEvent {
        data,
        message,
        origin: json!({ "referer": referer }),
        version: "4",
    })
}

/// `creates a Indicator `name`` (OpenCTI's grammar).
fn create_message(stix: &Value) -> String {
    let kind = stix["extensions"][OCTI_EXT]["type"]
        .as_str()
        .unwrap_or("Stix-Object");
    let name = stix["name"]
        .as_str()
        .or_else(|| stix["id"].as_str())
        .unwrap_or("");
    format!("creates a {kind} `{name}`")
}

/// `id: …\nevent: …\ndata: …\n\n`, one `data:` line per line of `data`.
fn frame_bytes(id: Option<Id>, event: &str, data: &str) -> Bytes {
    let mut text = String::with_capacity(data.len() + event.len() + 48);
    if let Some(id) = id {
        text.push_str("id: ");
        text.push_str(&id.to_string());
        text.push('\n');
    }
    text.push_str("event: ");
    text.push_str(event);
    text.push('\n');
    for line in data.split('\n') {
        text.push_str("data: ");
        text.push_str(line);
        text.push('\n');
    }
    text.push('\n');
    Bytes::from(text)
}

fn updated_ms_of(stix: &Value) -> Option<u64> {
    stix["extensions"][OCTI_EXT]["updated_at"]
        .as_str()
        .and_then(ms_from_iso)
}

fn store_object(state: &mut State, stix: Value, fallback_ms: u64) {
    let Some(stix_id) = stix["id"].as_str().map(str::to_owned) else {
        panic!("a stored object needs a STIX id: {stix}");
    };
    let updated_ms = updated_ms_of(&stix).unwrap_or(fallback_ms);
    let created_ms = stix["extensions"][OCTI_EXT]["created_at"]
        .as_str()
        .and_then(ms_from_iso)
        .unwrap_or(updated_ms);
    state.objects.insert(
        stix_id,
        Stored {
            stix,
            created_ms,
            updated_ms,
        },
    );
}

/// The 6.x STIX form of an indicator, as in `stream-sample.txt`.
/// A stored STIX indicator as OpenCTI's GraphQL API shows it (the fields the bridge's
/// documents select; the rest are answered null by the projection).
fn graphql_indicator(stix: &Value) -> Value {
    let ext = &stix["extensions"][OCTI_EXT];
    json!({
        "__typename": "Indicator",
        "id": ext["id"],
        "standard_id": stix["id"],
        "entity_type": "Indicator",
        "created": stix["created"],
        "modified": stix["modified"],
        "revoked": stix["revoked"].as_bool().unwrap_or(false),
        "confidence": stix["confidence"],
        "name": stix["name"],
        "description": stix["description"],
        "pattern": stix["pattern"],
        "pattern_type": stix["pattern_type"],
        "valid_from": stix["valid_from"],
        "valid_until": stix["valid_until"],
        "x_opencti_score": ext["score"],
        "x_opencti_detection": ext["detection"],
        "x_opencti_main_observable_type": ext["main_observable_type"],
        "objectMarking": [],
        "objectLabel": [],
    })
}

fn indicator_stix(state: &State, ind: &Indicator, created_ms: u64, updated_ms: u64) -> Value {
    let created = iso_from_ms(created_ms);
    let updated = iso_from_ms(updated_ms);
    let mut ext = json!({
        "extension_type": "property-extension",
        "id": ind.internal_id,
        "type": "Indicator",
        "created_at": created,
        "updated_at": updated,
        "is_inferred": ind.is_inferred,
        "creator_ids": [USER_ID],
        "detection": ind.detection,
        "score": ind.score,
        "main_observable_type": ind.main_observable_type,
    });
    if let Some(author) = ind
        .created_by_ref
        .as_ref()
        .and_then(|id| state.objects.get(id))
    {
        let author_ext = &author.stix["extensions"][OCTI_EXT];
        ext["created_by_ref_id"] = author_ext["id"].clone();
        ext["created_by_ref_type"] = author_ext["type"].clone();
    }
    if let Some(value) = &ind.observable_value {
        ext["observable_values"] = json!([{ "type": ind.main_observable_type, "value": value }]);
    }
    let mut stix = json!({
        "id": ind.stix_id,
        "spec_version": "2.1",
        "type": "indicator",
        "extensions": {
            OCTI_EXT: ext,
            MITRE_EXT: { "extension_type": "property-extension" }
        },
        "created": created,
        "modified": updated,
        "revoked": ind.revoked,
        "confidence": ind.confidence,
        "lang": "en",
        "name": ind.name,
        "pattern": ind.pattern,
        "pattern_type": ind.pattern_type,
        "valid_from": created,
        "valid_until": iso_from_ms(created_ms + 90 * DAY_MS),
    });
    if !ind.object_marking_refs.is_empty() {
        stix["object_marking_refs"] = json!(ind.object_marking_refs);
    }
    if let Some(author) = &ind.created_by_ref {
        stix["created_by_ref"] = json!(author);
    }
    if let Some(description) = &ind.description {
        stix["description"] = json!(description);
    }
    if !ind.indicator_types.is_empty() {
        stix["indicator_types"] = json!(ind.indicator_types);
    }
    stix
}

/// The entry's own event, its stored state updated.
fn main_frame(state: &mut State, id: Id, then: Then<'_>) -> Frame {
    let now = id.ms;
    match then {
        Then::Create(ind) => {
            let stix = indicator_stix(state, ind, now, now);
            let data = user_event(
                "create",
                &format!("creates a Indicator `{}`", ind.name),
                &stix,
                None,
                now,
            );
            state.objects.insert(
                ind.stix_id.clone(),
                Stored {
                    stix,
                    created_ms: now,
                    updated_ms: now,
                },
            );
            main(ind, false, frame_bytes(Some(id), "create", &data))
        }
        Then::Update(ind) => {
            let previous = state.stored(&ind.stix_id).clone();
            let current = indicator_stix(state, ind, previous.created_ms, now);
            let changes = changes(&previous.stix, &current);
            let message = changes
                .first()
                .map(|c| {
                    format!(
                        "replaces `{}` in `{}`",
                        c["new"][0].to_string().trim_matches('"'),
                        c["field"].as_str().unwrap_or("")
                    )
                })
                .unwrap_or_else(|| format!("updates Indicator `{}`", ind.name));
            let context = json!({
                "patch": json_diff(&previous.stix, &current),
                "reverse_patch": json_diff(&current, &previous.stix),
                "changes": changes,
            });
            let data = user_event("update", &message, &current, Some(&context), now);
            state.objects.insert(
                ind.stix_id.clone(),
                Stored {
                    stix: current,
                    created_ms: previous.created_ms,
                    updated_ms: now,
                },
            );
            main(ind, false, frame_bytes(Some(id), "update", &data))
        }
        Then::Delete(ind) => {
            let previous = state
                .objects
                .remove(&ind.stix_id)
                .unwrap_or_else(|| panic!("delete of {} which was never created", ind.stix_id));
            let data = user_event(
                "delete",
                &format!("deletes a Indicator `{}`", ind.name),
                &previous.stix,
                None,
                now,
            );
            main(ind, true, frame_bytes(Some(id), "delete", &data))
        }
        Then::Raw { event, data } => Frame {
            kind: Kind::Raw,
            bytes: frame_bytes(Some(id), event, data),
        },
    }
}

fn main(ind: &Indicator, delete: bool, bytes: Bytes) -> Frame {
    Frame {
        kind: Kind::Main {
            stix_id: ind.stix_id.clone(),
            delete,
            inferred: ind.is_inferred,
        },
        bytes,
    }
}

/// OpenCTI's `changes` list (6.9+): one per changed field a user would see.
fn changes(previous: &Value, current: &Value) -> Vec<Value> {
    let fields = [
        (
            "/extensions/".to_owned() + OCTI_EXT + "/detection",
            "Is detected",
        ),
        ("/extensions/".to_owned() + OCTI_EXT + "/score", "Score"),
        ("/revoked".to_owned(), "Revoked"),
        ("/name".to_owned(), "Name"),
        ("/pattern".to_owned(), "Pattern"),
        ("/description".to_owned(), "Description"),
        ("/confidence".to_owned(), "Confidence"),
    ];
    fields
        .iter()
        .filter_map(|(path, field)| {
            let before = previous.pointer(path);
            let after = current.pointer(path);
            (before != after).then(|| {
                json!({
                    "field": field,
                    "previous": before.map(|v| vec![v.clone()]).unwrap_or_default(),
                    "new": after.map(|v| vec![v.clone()]).unwrap_or_default(),
                })
            })
        })
        .collect()
}

/// A JSON Patch (RFC 6902) turning `from` into `to`: objects compared key by key, anything
/// else replaced whole.
fn json_diff(from: &Value, to: &Value) -> Vec<Value> {
    fn escape(key: &str) -> String {
        key.replace('~', "~0").replace('/', "~1")
    }
    fn walk(path: &str, from: &Value, to: &Value, ops: &mut Vec<Value>) {
        match (from, to) {
            (Value::Object(a), Value::Object(b)) => {
                for (key, old) in a {
                    let child = format!("{path}/{}", escape(key));
                    match b.get(key) {
                        Some(new) => walk(&child, old, new, ops),
                        None => ops.push(json!({ "op": "remove", "path": child })),
                    }
                }
                for (key, new) in b {
                    if !a.contains_key(key) {
                        let child = format!("{path}/{}", escape(key));
                        ops.push(json!({ "op": "add", "path": child, "value": new }));
                    }
                }
            }
            _ if from != to => {
                ops.push(json!({ "op": "replace", "path": path, "value": to }));
            }
            _ => {}
        }
    }
    let mut ops = Vec::new();
    walk("", from, to, &mut ops);
    ops
}

// ----- serving -----

async fn raw_stream(
    AppState(shared): AppState<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    serve(shared, None, query, headers).await
}

async fn live_stream(
    AppState(shared): AppState<Arc<Shared>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    serve(shared, Some(id), query, headers).await
}

/// Percent-decoded `name=value` pairs, leniently (as Express does).
fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = |b: u8| (b as char).to_digit(16);
                    match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                        (Some(hi), Some(lo)) => {
                            out.push((hi * 16 + lo) as u8);
                            i += 2;
                        }
                        _ => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(name), decode(value))
        })
        .collect()
}

fn status(code: u16) -> Response {
    status_with_body(code, String::new())
}

fn status_with_body(code: u16, body: String) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .body(Body::from(body))
        .expect("a response")
}

/// A start or recover parameter: `0`/`0-0`, `<ms>-<seq>`, or an ISO date.
fn parse_position(param: Option<&str>) -> Option<Id> {
    let param = param?.trim();
    if param.is_empty() {
        return None;
    }
    if param == "0" || param == "0-0" {
        return Some(Id::ZERO);
    }
    if param.split('-').count() == 2 {
        return Id::parse(param);
    }
    ms_from_iso(param).map(|ms| Id { ms, seq: 0 })
}

/// A recovery event: its id, the whole SSE event, the STIX id.
type InitEvent = (Id, Bytes, String);

/// Per-connection settings, read once at the start.
struct Plan {
    live: bool,
    listen_delete: bool,
    with_inferences: bool,
    heartbeat: Duration,
    heartbeat_ids: HeartbeatIds,
    consumer_metrics: bool,
    heartbeat_inside_dependencies: bool,
    event_delay: Duration,
    /// Recovery: the `init` events to send before going live.
    recovery: Option<Vec<InitEvent>>,
    /// Where the live part starts (exclusive).
    cursor: Id,
    /// The connection's "last event id" before anything is sent.
    last_event_id: Option<Id>,
}

async fn serve(
    shared: Arc<Shared>,
    live_id: Option<String>,
    query: Option<String>,
    headers: HeaderMap,
) -> Response {
    let recorded = RecordedRequest {
        at: std::time::Instant::now(),
        path: match &live_id {
            Some(id) => format!("/stream/{id}"),
            None => "/stream".to_owned(),
        },
        query: query.clone(),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    let response_delay = {
        let mut state = shared.lock();
        state.requests.push(recorded);
        let n = state.requests.len();
        shared.requests.send_replace(n);
        state.response_delay
    };
    if !response_delay.is_zero() {
        tokio::time::sleep(response_delay).await;
    }
    let params = query_pairs(query.as_deref());
    let param = |name: &str| -> Option<String> {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .or_else(|| {
                headers
                    .get(name)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            })
    };
    let header_text = |name: &str| -> Option<String> {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };

    let mut state = shared.lock();
    if let Some((code, body)) = state.statuses.pop_front() {
        return status_with_body(code, body);
    }
    if let Some(token) = &state.token {
        let expected = format!("Bearer {token}");
        if header_text("authorization").as_deref() != Some(expected.as_str()) {
            return status(401);
        }
    }
    if live_id
        .as_ref()
        .is_some_and(|id| state.stopped.contains(id))
    {
        return status(410);
    }
    let start_param = param("from").or_else(|| header_text("last-event-id"));
    let start = parse_position(start_param.as_deref());
    let live = live_id.is_some();
    let recover = if live {
        let param = param("recover").or_else(|| header_text("recover-date"));
        parse_position(param.as_deref())
    } else {
        None
    };
    if recover.is_some() && start.is_none() {
        // OpenCTI: "Recovery mode is only possible with a start date."
        return status(500);
    }
    let flag = |name: &str, value: &str| param(name).as_deref() == Some(value);
    let listen_delete = !flag("listen-delete", "false");
    let with_inferences = flag("with-inferences", "true");

    let recovery = match (recover, start) {
        (Some(until), Some(from)) if until.ms > from.ms => {
            let mut objects: Vec<&Stored> = state
                .objects
                .values()
                .filter(|o| o.updated_ms >= from.ms && o.updated_ms <= until.ms)
                .filter(|o| {
                    with_inferences || o.stix["extensions"][OCTI_EXT]["is_inferred"] != true
                })
                .collect();
            objects.sort_by(|a, b| {
                (a.updated_ms, a.stix["id"].as_str()).cmp(&(b.updated_ms, b.stix["id"].as_str()))
            });
            let replay: Vec<InitEvent> = objects
                .into_iter()
                .map(|o| {
                    let id = Id {
                        ms: o.updated_ms,
                        seq: 0,
                    };
                    let data = system_event(&o.stix, &create_message(&o.stix), "init");
                    let stix_id = o.stix["id"].as_str().unwrap_or_default().to_owned();
                    (id, frame_bytes(Some(id), "create", &data), stix_id)
                })
                .collect();
            Some((replay, until.ms))
        }
        _ => None,
    };
    let (recovery, cursor) = match recovery {
        Some((replay, until_ms)) => (
            Some(replay),
            Id {
                ms: until_ms,
                seq: 0,
            },
        ),
        None => (
            None,
            start.unwrap_or_else(|| state.log.back().map_or(Id::ZERO, |e| e.id)),
        ),
    };
    let plan = Plan {
        live,
        listen_delete,
        with_inferences,
        heartbeat: state.heartbeat,
        heartbeat_ids: state.heartbeat_ids,
        consumer_metrics: state.consumer_metrics,
        heartbeat_inside_dependencies: state.heartbeat_inside_dependencies,
        event_delay: state.event_delay,
        recovery,
        cursor,
        last_event_id: start,
    };
    let connected = frame_bytes(None, "connected", &state.connected_json());
    state.open += 1;
    shared.open.send_replace(state.open);
    drop(state);

    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let mut control = shared.control.subscribe();
    let started = *control.borrow_and_update();
    let log = shared.log_version.subscribe();
    tokio::spawn(async move {
        let open = OpenGuard(Arc::clone(&shared));
        let mut connection = Connection {
            shared,
            tx,
            control,
            started,
            log,
            plan,
            recovering: false,
            pending: Vec::new(),
            sent: HashSet::new(),
            processed_since_heartbeat: false,
            next_heartbeat: Instant::now(),
        };
        connection.next_heartbeat = Instant::now() + connection.plan.heartbeat;
        connection.pending.extend_from_slice(&connected);
        let _ = connection.run().await;
        drop(open);
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache, no-transform")
        .header(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")
        .body(Body::from_stream(body))
        .expect("a response")
}

/// Counts the connection as open while it lives.
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.open -= 1;
        self.0.open.send_replace(state.open);
    }
}

/// Why a connection stops writing.
enum Stop {
    /// The client went away.
    Gone,
    /// `cut_connections`: fail the body.
    Cut,
    /// `end_connections`: finish the body.
    End,
}

struct Connection {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    control: watch::Receiver<Control>,
    /// The controls when the connection started: a later cut or end stops it.
    started: Control,
    log: watch::Receiver<u64>,
    plan: Plan,
    /// Replaying the database: heartbeats carry the last replayed id, never `<now>-0`.
    recovering: bool,
    /// Bytes gathered for the next body chunk.
    pending: Vec<u8>,
    /// STIX ids sent on this connection (OpenCTI's per-connection cache).
    sent: HashSet<String>,
    processed_since_heartbeat: bool,
    next_heartbeat: Instant,
}

impl Connection {
    async fn run(&mut self) -> Result<(), Stop> {
        let result = self.stream().await;
        match result {
            Err(Stop::Cut) => {
                let _ = self.flush().await;
                let _ = self
                    .tx
                    .send(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "cut by the test",
                    )))
                    .await;
            }
            Err(Stop::End) => {
                let _ = self.flush().await;
            }
            _ => {}
        }
        result
    }

    async fn stream(&mut self) -> Result<(), Stop> {
        self.flush().await?;
        if let Some(replay) = self.plan.recovery.take() {
            self.recovering = true;
            for (id, bytes, stix_id) in replay {
                self.check().await?;
                if self.sent.contains(&stix_id) {
                    continue;
                }
                self.send_event(id, &bytes).await?;
                self.sent.insert(stix_id);
            }
            self.flush().await?;
            self.recovering = false;
        }
        loop {
            self.log.borrow_and_update();
            let batch = self.shared.lock().entries_after(self.plan.cursor);
            if batch.is_empty() {
                self.idle().await?;
                continue;
            }
            for entry in batch {
                self.check().await?;
                self.send_entry(&entry).await?;
                self.plan.cursor = entry.id;
                self.plan.last_event_id = Some(entry.id);
                self.processed_since_heartbeat = true;
            }
            self.flush().await?;
        }
    }

    /// Caught up: wait for new events, the next heartbeat, a control or the client leaving.
    async fn idle(&mut self) -> Result<(), Stop> {
        enum Wake {
            Log,
            Heartbeat,
            Control,
            Gone,
        }
        let wake = tokio::select! {
            _ = self.log.changed() => Wake::Log,
            _ = tokio::time::sleep_until(self.next_heartbeat) => Wake::Heartbeat,
            _ = self.control.changed() => Wake::Control,
            _ = self.tx.closed() => Wake::Gone,
        };
        match wake {
            Wake::Log => Ok(()),
            Wake::Heartbeat => self.heartbeat().await,
            Wake::Control => self.control_stop(),
            Wake::Gone => Err(Stop::Gone),
        }
    }

    /// A cut or end asked for since the connection started stops it.
    fn control_stop(&mut self) -> Result<(), Stop> {
        let now = *self.control.borrow_and_update();
        if now.cut > self.started.cut {
            Err(Stop::Cut)
        } else if now.end > self.started.end {
            Err(Stop::End)
        } else {
            Ok(())
        }
    }

    /// Between two events: a due heartbeat, a control.
    async fn check(&mut self) -> Result<(), Stop> {
        if self.control.has_changed().unwrap_or(false) {
            self.control_stop()?;
        }
        if Instant::now() >= self.next_heartbeat {
            self.heartbeat().await?;
        }
        Ok(())
    }

    async fn send_entry(&mut self, entry: &Entry) -> Result<(), Stop> {
        let mut dependencies_sent = false;
        for frame in &entry.frames {
            match &frame.kind {
                Kind::Dependency { stix_id } => {
                    if !self.plan.live || self.sent.contains(stix_id) {
                        continue;
                    }
                    self.send_event(entry.id, &frame.bytes).await?;
                    self.sent.insert(stix_id.clone());
                    dependencies_sent = true;
                }
                Kind::Main {
                    stix_id,
                    delete,
                    inferred,
                } => {
                    if self.plan.live
                        && ((*delete && !self.plan.listen_delete)
                            || (*inferred && !self.plan.with_inferences))
                    {
                        continue;
                    }
                    if dependencies_sent && self.plan.heartbeat_inside_dependencies {
                        self.send_heartbeat(entry.id).await?;
                        // The timer fired while OpenCTI was still resolving: time passes.
                        if !self.plan.event_delay.is_zero() {
                            tokio::time::sleep(self.plan.event_delay).await;
                        }
                    }
                    self.send_event(entry.id, &frame.bytes).await?;
                    self.sent.insert(stix_id.clone());
                }
                Kind::Raw => self.send_event(entry.id, &frame.bytes).await?,
            }
        }
        Ok(())
    }

    async fn send_event(&mut self, id: Id, bytes: &[u8]) -> Result<(), Stop> {
        self.plan.last_event_id = Some(id);
        self.pending.extend_from_slice(bytes);
        if !self.plan.event_delay.is_zero() {
            self.flush().await?;
            tokio::time::sleep(self.plan.event_delay).await;
        } else if self.pending.len() >= CHUNK_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn heartbeat(&mut self) -> Result<(), Stop> {
        let idle = !self.processed_since_heartbeat && !self.recovering;
        let id = match (self.plan.heartbeat_ids, idle) {
            (HeartbeatIds::NowWhenIdle, true) => {
                let mut state = self.shared.lock();
                let now = Id {
                    ms: state.now_ms(),
                    seq: 0,
                };
                let id = self.plan.last_event_id.map_or(now, |last| last.max(now));
                state.id_floor = state.id_floor.max(id);
                Some(id)
            }
            _ => self.plan.last_event_id,
        };
        self.processed_since_heartbeat = false;
        self.next_heartbeat = Instant::now() + self.plan.heartbeat;
        match id {
            Some(id) => {
                self.plan.last_event_id = Some(id);
                self.send_heartbeat(id).await
            }
            None => Ok(()),
        }
    }

    async fn send_heartbeat(&mut self, id: Id) -> Result<(), Stop> {
        let date = format!("\"{}\"", iso_from_ms(id.ms));
        self.pending
            .extend_from_slice(&frame_bytes(Some(id), "heartbeat", &date));
        if self.plan.consumer_metrics {
            self.pending.extend_from_slice(&frame_bytes(
                Some(id),
                "consumer_metrics",
                r#"{"deliveryRate":0,"processingRate":0,"resolutionRate":0,"productionRate":0.42,"timeLag":0,"estimatedOutOfDepth":0}"#,
            ));
        }
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), Stop> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.pending));
        self.tx.send(Ok(chunk)).await.map_err(|_| Stop::Gone)
    }
}

// ----- dates -----

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `2024-03-01T10:00:15.712Z`, as JavaScript's `toISOString`.
pub fn iso_from_ms(ms: u64) -> String {
    let days = (ms / DAY_MS) as i64;
    let rest = ms % DAY_MS;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3_600_000,
        rest / 60_000 % 60,
        rest / 1000 % 60,
        rest % 1000
    )
}

/// Epoch milliseconds of `YYYY-MM-DD[THH:MM[:SS[.fff]]][Z|±HH:MM|±HHMM]` (UTC without a
/// zone); `None` for anything else.
pub fn ms_from_iso(s: &str) -> Option<u64> {
    let s = s.trim();
    let num = |part: &str| -> Option<u32> {
        (!part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
            .then(|| part.parse().ok())
            .flatten()
    };
    let date = s.get(..10)?;
    let (y, rest) = date.split_once('-')?;
    let (mo, d) = rest.split_once('-')?;
    let (y, mo, d) = (num(y)? as i64, num(mo)?, num(d)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let mut ms = days_from_civil(y, mo, d) * DAY_MS as i64;
    let mut rest = &s[10..];
    if let Some(time) = rest.strip_prefix('T').or_else(|| rest.strip_prefix(' ')) {
        let end = time.find(['Z', '+', '-']).unwrap_or(time.len());
        let (clock, zone) = time.split_at(end);
        let (clock, fraction) = clock.split_once('.').unwrap_or((clock, ""));
        let mut parts = clock.split(':');
        let h = num(parts.next()?)?;
        let mi = num(parts.next()?)?;
        let sec = parts.next().map(num).unwrap_or(Some(0))?;
        if parts.next().is_some() || h > 23 || mi > 59 || sec > 60 {
            return None;
        }
        let frac_ms = if fraction.is_empty() {
            0
        } else {
            let digits: String = fraction.chars().chain("000".chars()).take(3).collect();
            num(&digits)?
        };
        ms += (h as i64 * 3600 + mi as i64 * 60 + sec as i64) * 1000 + frac_ms as i64;
        rest = zone;
    }
    match rest {
        "" | "Z" => {}
        zone => {
            let sign = match zone.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let zone = zone[1..].replace(':', "");
            if zone.len() != 4 {
                return None;
            }
            let offset = num(&zone[..2])? as i64 * 60 + num(&zone[2..])? as i64;
            ms -= sign * offset * 60_000;
        }
    }
    u64::try_from(ms).ok()
}
