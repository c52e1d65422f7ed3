//! The OpenCTI live stream: one HTTP connection to `/stream` or `/stream/{id}`, read as
//! server-sent events (SPEC §3 "Stream").
//!
//! This is the transport only. [`StreamClient::connect`] opens one connection and hands back
//! an [`EventStream`]; it never retries, never sleeps and never follows OpenCTI into a loop.
//! The caller owns the position, the reconnection loop, the backoff and the silence watchdog.
//!
//! What is sent follows pycti's `ListenStream` (`opencti_connector_helper.py`) and its SSE
//! client (`filigran_sseclient`):
//!
//! - `GET {url}/stream` or `GET {url}/stream/{live_stream_id}`;
//! - `Authorization: Bearer {token}`, `Accept: text/event-stream`, `Cache-Control: no-cache`;
//! - `Last-Event-ID: {position}` (left out when the position is empty);
//! - the options as headers with the values `true` / `false`: `listen-delete`,
//!   `no-dependencies`, `with-inferences`;
//! - `?recover={iso date}` as a query parameter when the caller asks for recovery.
//!
//! Wire facts the parser relies on (see `tests/fixtures/opencti/stream-sample*.txt`): the
//! first event is `connected`, without an `id:` line; every later event of a 6.x server
//! carries an id, and dependency events share the id of the event they precede; a 4.x
//! server sends heartbeats without an id. Each event's id is therefore reported exactly as
//! sent ([`SseEvent::id`] is `None` without an `id:` line) instead of the "last event id"
//! that a browser's `EventSource` would carry over from the previous event.

use std::cmp::Ordering;
use std::fmt;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::Stream;
use futures_util::StreamExt;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};

use crate::config::{Config, Secret};

/// How long establishing the TCP (and TLS) connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`StreamClient::connect`] waits for the response head by default. OpenCTI sends
/// it before any replay or recovery starts, so this only has to cover authentication.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of `bridge.max_event_bytes`, the largest event the bridge accepts. One OpenCTI
/// event is one `data:` line of JSON; a big report or container can take megabytes, so this
/// is generous, but it bounds the memory a broken or hostile server can make the bridge
/// hold (the parser never buffers more than this plus one chunk).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;
/// How much of an oversized event's data its dead letter keeps: the start of OpenCTI's JSON
/// names the object (type, id, name), which is what an operator needs to find it, without
/// letting one bad event put megabytes into the store.
pub const POISON_PREFIX_BYTES: usize = 64 * 1024;
/// How much of an error response's body goes into [`StreamError::HttpStatus`].
const BODY_EXCERPT_BYTES: usize = 512;
/// How long reading that excerpt may take.
const BODY_EXCERPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a connection could not be opened, or why an open stream stopped.
///
/// No variant ever holds the token: the messages are safe to log as they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The request cannot be built: the base URL is not a URL, the token or the position
    /// holds characters HTTP headers cannot carry, or the HTTP client (TLS) cannot start.
    #[error("cannot build the stream request: {reason}")]
    Setup { reason: String },

    /// 401 or 403: the token is wrong or lacks the capability. OpenCTI also answers 401 for
    /// a live stream id that does not exist or that this user may not read.
    #[error(
        "OpenCTI refused the stream (HTTP {status}): check opencti.token, the user's \
         capabilities and connector.live_stream_id"
    )]
    Unauthorized { status: u16 },

    /// 410: the live stream exists but is stopped (start it again in OpenCTI).
    #[error("the live stream is stopped or gone (HTTP 410)")]
    Gone,

    /// 404: nothing serves a stream at that URL (wrong opencti.url or path prefix).
    #[error("no stream at this URL (HTTP 404): check opencti.url")]
    NotFound,

    /// Any other status than 200 (5xx while OpenCTI starts or fails, 429, a proxy's answer).
    #[error("OpenCTI answered HTTP {status}: {body_excerpt}")]
    HttpStatus { status: u16, body_excerpt: String },

    /// The network failed: connect, TLS, timeout waiting for the response, a reset or cut
    /// connection while reading.
    #[error("stream transport failed: {message}")]
    Transport { message: String },

    /// The server answered, but not with an event stream: another content type (a login or
    /// front-end page), an undecodable `connected` event, an id that is not `<ms>-<seq>`.
    #[error("not a valid OpenCTI event stream: {0}")]
    Protocol(String),

    /// One event cannot be used (invalid UTF-8, over `bridge.max_event_bytes`). Unlike the
    /// other variants this does not end the stream: the events after it keep coming.
    #[error("{0}")]
    Poison(Box<PoisonEvent>),

    /// The server closed the stream cleanly. OpenCTI never ends a stream on its own, so
    /// this is reported like an error: reconnect.
    #[error("the stream ended (the server closed the connection)")]
    Ended,
}

impl StreamError {
    fn transport(error: &(dyn std::error::Error + 'static)) -> Self {
        StreamError::Transport {
            message: error_chain(error),
        }
    }
}

/// The error and its sources, `: `-separated (reqwest puts the useful part, "connection
/// refused", in a source).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// What a connection needs from the configuration.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// `opencti.url`, e.g. `https://opencti.example.org` (a path prefix is kept).
    pub base_url: String,
    /// `opencti.token`, sent as `Authorization: Bearer …`.
    pub token: Secret,
    /// `connector.live_stream_id`: `/stream/{id}` when set, the raw `/stream` otherwise.
    pub live_stream_id: Option<String>,
    /// `connector.live_stream_listen_delete` → header `listen-delete`.
    pub listen_delete: bool,
    /// `connector.live_stream_no_dependencies` → header `no-dependencies`.
    pub no_dependencies: bool,
    /// `connector.live_stream_with_inferences` → header `with-inferences`.
    pub with_inferences: bool,
    /// `opencti.ssl_verify`: `false` accepts any certificate.
    pub ssl_verify: bool,
}

impl StreamConfig {
    pub fn from_config(config: &Config) -> Self {
        StreamConfig {
            base_url: config.opencti.url.clone(),
            token: config.opencti.token.clone(),
            live_stream_id: config
                .connector
                .live_stream_id
                .clone()
                .filter(|id| !id.trim().is_empty()),
            listen_delete: config.connector.live_stream_listen_delete,
            no_dependencies: config.connector.live_stream_no_dependencies,
            with_inferences: config.connector.live_stream_with_inferences,
            ssl_verify: config.opencti.ssl_verify,
        }
    }
}

/// Opens connections to the stream. Built once; [`connect`](Self::connect) as often as the
/// caller decides.
pub struct StreamClient {
    http: reqwest::Client,
    url: reqwest::Url,
    authorization: HeaderValue,
    token: Secret,
    listen_delete: HeaderValue,
    no_dependencies: HeaderValue,
    with_inferences: HeaderValue,
    response_timeout: Duration,
    max_event_bytes: usize,
}

impl fmt::Debug for StreamClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamClient")
            .field("url", &self.url.as_str())
            .field("token", &self.token)
            .field("listen_delete", &self.listen_delete)
            .field("no_dependencies", &self.no_dependencies)
            .field("with_inferences", &self.with_inferences)
            .field("response_timeout", &self.response_timeout)
            .field("max_event_bytes", &self.max_event_bytes)
            .finish()
    }
}

fn bool_header(value: bool) -> HeaderValue {
    HeaderValue::from_static(if value { "true" } else { "false" })
}

impl StreamClient {
    pub fn new(cfg: &StreamConfig) -> Result<Self, StreamError> {
        let url = stream_url(&cfg.base_url, cfg.live_stream_id.as_deref())?;
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", cfg.token.expose()))
            .map_err(|_| StreamError::Setup {
                reason: "opencti.token holds characters that an HTTP header cannot carry"
                    .to_owned(),
            })?;
        authorization.set_sensitive(true);
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .danger_accept_invalid_certs(!cfg.ssl_verify)
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_keepalive(Duration::from_secs(30))
            .tcp_nodelay(true)
            .user_agent(concat!("opencti-threatbus/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| StreamError::Setup {
                reason: format!("cannot start the HTTP client: {}", error_chain(&e)),
            })?;
        Ok(StreamClient {
            http,
            url,
            authorization,
            token: cfg.token.clone(),
            listen_delete: bool_header(cfg.listen_delete),
            no_dependencies: bool_header(cfg.no_dependencies),
            with_inferences: bool_header(cfg.with_inferences),
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        })
    }

    /// How long [`connect`](Self::connect) waits for the response head
    /// ([`DEFAULT_RESPONSE_TIMEOUT`] unless changed).
    pub fn set_response_timeout(&mut self, timeout: Duration) {
        self.response_timeout = timeout;
    }

    /// The largest event a connection accepts (`bridge.max_event_bytes`,
    /// [`DEFAULT_MAX_EVENT_BYTES`] unless changed): a larger one is reported as
    /// [`StreamError::Poison`], keeping only its first [`POISON_PREFIX_BYTES`].
    pub fn set_max_event_bytes(&mut self, max_event_bytes: usize) {
        self.max_event_bytes = max_event_bytes;
    }

    /// The stream URL, without the `recover` query.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// Opens one connection. `last_event_id` goes in `Last-Event-ID` (left out when empty);
    /// `recover` (an ISO date) adds the `recover` query parameter.
    ///
    /// Resolves once the response head is in: a stream only after a 200 with an event-stream
    /// content type, an error for any other answer. Never retries.
    pub async fn connect(
        &self,
        last_event_id: &str,
        recover: Option<&str>,
    ) -> Result<EventStream, StreamError> {
        let mut url = self.url.clone();
        if let Some(date) = recover {
            url.query_pairs_mut().append_pair("recover", date);
        }
        let mut request = self
            .http
            .get(url)
            .header(AUTHORIZATION, self.authorization.clone())
            .header(ACCEPT, HeaderValue::from_static("text/event-stream"))
            .header(CACHE_CONTROL, HeaderValue::from_static("no-cache"))
            .header("listen-delete", self.listen_delete.clone())
            .header("no-dependencies", self.no_dependencies.clone())
            .header("with-inferences", self.with_inferences.clone());
        if !last_event_id.is_empty() {
            let value = HeaderValue::from_str(last_event_id).map_err(|_| StreamError::Setup {
                reason: format!("the stream position {last_event_id:?} is not a valid header"),
            })?;
            request = request.header("Last-Event-ID", value);
        }
        tracing::debug!(
            url = %self.url,
            last_event_id,
            recover = recover.unwrap_or(""),
            "opening the OpenCTI stream"
        );
        let response = match tokio::time::timeout(self.response_timeout, request.send()).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => return Err(StreamError::transport(&e)),
            Err(_) => {
                return Err(StreamError::Transport {
                    message: format!(
                        "no response from {} within {} s",
                        self.url,
                        self.response_timeout.as_secs_f32()
                    ),
                })
            }
        };
        let status = response.status().as_u16();
        match status {
            200 => {}
            401 | 403 => return Err(StreamError::Unauthorized { status }),
            404 => return Err(StreamError::NotFound),
            410 => return Err(StreamError::Gone),
            _ => {
                let body_excerpt = body_excerpt(response, &self.token).await;
                return Err(StreamError::HttpStatus {
                    status,
                    body_excerpt,
                });
            }
        }
        if let Some(content_type) = response.headers().get(CONTENT_TYPE) {
            let is_event_stream = content_type
                .to_str()
                .map(|ct| {
                    ct.trim_start()
                        .to_ascii_lowercase()
                        .starts_with("text/event-stream")
                })
                .unwrap_or(false);
            if !is_event_stream {
                return Err(StreamError::Protocol(format!(
                    "HTTP 200 with content type {:?} instead of text/event-stream (is opencti.url \
                     the platform's base URL?)",
                    String::from_utf8_lossy(content_type.as_bytes())
                )));
            }
        }
        Ok(EventStream::with_max_event_bytes(
            response.bytes_stream(),
            self.max_event_bytes,
        ))
    }
}

/// `{base}/stream` or `{base}/stream/{id}`, keeping any path prefix of the base URL.
fn stream_url(base: &str, live_stream_id: Option<&str>) -> Result<reqwest::Url, StreamError> {
    let setup = |reason: String| StreamError::Setup { reason };
    let mut url = reqwest::Url::parse(base.trim())
        .map_err(|e| setup(format!("opencti.url {base:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(setup(format!("opencti.url {base:?} is not an http(s) URL")));
    }
    url.set_query(None);
    url.set_fragment(None);
    {
        let mut segments = url
            .path_segments_mut()
            .map_err(|()| setup(format!("opencti.url {base:?} cannot have a path")))?;
        segments.pop_if_empty().push("stream");
        if let Some(id) = live_stream_id {
            segments.push(id);
        }
    }
    Ok(url)
}

/// The start of an error response's body, as one line of printable text with the token
/// masked, read for at most [`BODY_EXCERPT_TIMEOUT`].
async fn body_excerpt(response: reqwest::Response, token: &Secret) -> String {
    let mut bytes = Vec::new();
    let mut body = response.bytes_stream();
    let read = async {
        while let Some(Ok(chunk)) = body.next().await {
            bytes.extend_from_slice(&chunk);
            if bytes.len() >= BODY_EXCERPT_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(BODY_EXCERPT_TIMEOUT, read).await;
    bytes.truncate(BODY_EXCERPT_BYTES);
    let text: String = String::from_utf8_lossy(&bytes)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if !token.expose().is_empty() && text.contains(token.expose()) {
        text = text.replace(token.expose(), "***");
    }
    text
}

/// One server-sent event, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The value of this event's own `id:` line; `None` without one (OpenCTI's `connected`,
    /// 4.x heartbeats). An empty `id:` line also gives `None`.
    pub id: Option<String>,
    /// The `event:` line; `message` without one, as the SSE standard says.
    pub event: String,
    /// The `data:` lines, joined with `\n` (OpenCTI sends one line of JSON).
    pub data: String,
}

/// One complete event the parser could not turn into an [`SseEvent`]: what is left of it
/// for a dead letter, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event {} ({event}, {size} bytes) cannot be used: {reason}", id.as_deref().unwrap_or("without id"))]
pub struct PoisonEvent {
    /// Its `id:` line, as for [`SseEvent::id`] (`None` also when the id itself is invalid).
    pub id: Option<String>,
    /// Its `event:` line (lossy UTF-8), `message` without one.
    pub event: String,
    /// Its `data:` lines as received (not valid UTF-8, perhaps), at most
    /// [`POISON_PREFIX_BYTES`] of them when the event was over the limit.
    pub data: Vec<u8>,
    /// The bytes of its lines, all of them, also those dropped.
    pub size: usize,
    /// Why it cannot be used.
    pub reason: String,
}

/// The events of one connection.
///
/// Yields `Ok(event)` for each complete event, and `Err(StreamError::Poison)` for a
/// complete event that cannot be used; both go on. When the connection ends it yields one
/// other `Err`: [`StreamError::Transport`] for a failure or a cut connection,
/// [`StreamError::Ended`] for a clean close. Then it yields `None` for good. A partial
/// event at the cut is dropped.
pub struct EventStream {
    inner: Pin<Box<dyn Stream<Item = Result<SseEvent, StreamError>> + Send>>,
}

impl fmt::Debug for EventStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EventStream")
    }
}

impl EventStream {
    /// Parses any stream of byte chunks, e.g. a file's bytes in a test, exactly as an HTTP
    /// body is parsed, with the default event limit ([`DEFAULT_MAX_EVENT_BYTES`]).
    pub fn from_byte_stream<S, B, E>(bytes: S) -> Self
    where
        S: Stream<Item = Result<B, E>> + Send + 'static,
        B: AsRef<[u8]>,
        E: std::error::Error + 'static,
    {
        Self::with_max_event_bytes(bytes, DEFAULT_MAX_EVENT_BYTES)
    }

    /// [`from_byte_stream`](Self::from_byte_stream) with an event over `max_event_bytes`
    /// reported as [`StreamError::Poison`] (and never held in memory whole).
    pub fn with_max_event_bytes<S, B, E>(bytes: S, max_event_bytes: usize) -> Self
    where
        S: Stream<Item = Result<B, E>> + Send + 'static,
        B: AsRef<[u8]>,
        E: std::error::Error + 'static,
    {
        EventStream {
            inner: Box::pin(Decoder {
                body: Box::pin(bytes),
                parser: Parser::new(max_event_bytes),
                done: false,
            }),
        }
    }
}

impl Stream for EventStream {
    type Item = Result<SseEvent, StreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// Byte chunks in, events out; fused after the first error that ends the connection.
struct Decoder<S> {
    body: Pin<Box<S>>,
    parser: Parser,
    done: bool,
}

impl<S, B, E> Stream for Decoder<S>
where
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
    E: std::error::Error + 'static,
{
    type Item = Result<SseEvent, StreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.parser.next_event() {
                Some(Ok(event)) => return Poll::Ready(Some(Ok(event))),
                Some(Err(poison)) => {
                    return Poll::Ready(Some(Err(StreamError::Poison(Box::new(poison)))))
                }
                None => {}
            }
            match this.body.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => this.parser.push(chunk.as_ref()),
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(StreamError::transport(&e))));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(StreamError::Ended)));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// An incremental parser of the `text/event-stream` format (WHATWG HTML, "Server-sent
/// events"): lines end in CRLF, LF or CR; a leading BOM is skipped; `:` starts a comment; a
/// blank line dispatches the event; `retry:` and unknown fields are ignored.
///
/// Each chunk is copied once into the buffer; each event costs its `data`, `event` and `id`
/// strings and nothing else. Consumed bytes are dropped when the next chunk comes in, so
/// the buffer holds at most one partial line plus one chunk, and a partial line is never
/// held beyond the event limit: past it, the rest of the line is dropped as it arrives.
///
/// One event that cannot be used (invalid UTF-8, over the limit) never stops the parser: it
/// is reported as a [`PoisonEvent`] at the blank line that ends it, and parsing goes on.
struct Parser {
    buf: Vec<u8>,
    /// The first byte not yet consumed.
    pos: usize,
    /// `buf[pos..scanned]` holds no line terminator: the next search starts at `scanned`.
    scanned: usize,
    /// The last line ended with a CR: a LF right after it belongs to it.
    skip_lf: bool,
    /// The start of the stream was checked for a byte order mark.
    bom_checked: bool,
    /// The current line went over the limit: its bytes are dropped up to its end.
    discarding: Option<Discard>,
    /// The event being read.
    current: Pending,
}

/// What the line being dropped is.
#[derive(Clone, Copy)]
enum Discard {
    /// A comment: nothing of the event, not counted.
    Comment,
    /// A field of the event: counted in its size.
    Field,
}

/// The fields of the event being read, and what is wrong with it so far.
struct Pending {
    /// `bridge.max_event_bytes`: the most bytes (lines without terminators, comments
    /// aside) one event may have.
    max_bytes: usize,
    id: Option<String>,
    event: Option<String>,
    data: Vec<u8>,
    has_data: bool,
    /// Bytes of the event's lines so far.
    size: usize,
    /// Over `max_bytes`: `data` holds only a prefix of [`POISON_PREFIX_BYTES`].
    oversized: bool,
    /// Why the event cannot be used (the first reason found).
    poison: Option<String>,
}

/// What a complete event turned out to be.
type Dispatched = Result<SseEvent, PoisonEvent>;

const BOM: &[u8] = b"\xEF\xBB\xBF";

impl Parser {
    fn new(max_event_bytes: usize) -> Self {
        Parser {
            buf: Vec::new(),
            pos: 0,
            scanned: 0,
            skip_lf: false,
            bom_checked: false,
            discarding: None,
            current: Pending::new(max_event_bytes),
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            self.scanned = 0;
        } else if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.scanned -= self.pos;
            self.pos = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete event in the buffer, if any: a usable one, or a poisoned one.
    fn next_event(&mut self) -> Option<Dispatched> {
        if !self.bom_checked {
            let available = &self.buf[self.pos..];
            if available.len() < BOM.len() && BOM.starts_with(available) {
                return None;
            }
            if available.starts_with(BOM) {
                self.pos += BOM.len();
                self.scanned = self.pos;
            }
            self.bom_checked = true;
        }
        loop {
            if self.skip_lf {
                if self.pos == self.buf.len() {
                    return None;
                }
                if self.buf[self.pos] == b'\n' {
                    self.pos += 1;
                    self.scanned = self.pos;
                }
                self.skip_lf = false;
            }
            if let Some(discard) = self.discarding {
                // The rest of an over-long line: count it, keep nothing.
                let found = find_line_end(&self.buf[self.pos..]);
                let end = found.map_or(self.buf.len(), |offset| self.pos + offset);
                if matches!(discard, Discard::Field) {
                    self.current.size = self.current.size.saturating_add(end - self.pos);
                }
                self.pos = end;
                self.scanned = end;
                // No end yet: wait for more of the line.
                found?;
                self.skip_lf = self.buf[end] == b'\r';
                self.pos = end + 1;
                self.scanned = self.pos;
                self.discarding = None;
                continue;
            }
            let Some(offset) = find_line_end(&self.buf[self.scanned..]) else {
                self.scanned = self.buf.len();
                let partial = &self.buf[self.pos..];
                let comment = partial.first() == Some(&b':');
                let room = if comment || self.current.oversized {
                    self.current.max_bytes
                } else {
                    self.current.max_bytes.saturating_sub(self.current.size)
                };
                if partial.len() > room {
                    // Bounded memory: what of this line the event may keep is kept now,
                    // the rest is dropped as it arrives.
                    self.discarding = Some(if comment {
                        Discard::Comment
                    } else {
                        self.current.field(partial, false);
                        Discard::Field
                    });
                    self.pos = self.buf.len();
                    self.scanned = self.pos;
                }
                return None;
            };
            let end = self.scanned + offset;
            let start = self.pos;
            self.skip_lf = self.buf[end] == b'\r';
            self.pos = end + 1;
            self.scanned = self.pos;
            if end == start {
                if let Some(event) = self.current.dispatch() {
                    return Some(event);
                }
                continue;
            }
            let line = &self.buf[start..end];
            if line[0] != b':' {
                self.current.field(line, true);
            }
        }
    }
}

impl Pending {
    fn new(max_bytes: usize) -> Self {
        Pending {
            max_bytes,
            id: None,
            event: None,
            data: Vec::new(),
            has_data: false,
            size: 0,
            oversized: false,
            poison: None,
        }
    }

    fn poison(&mut self, reason: impl FnOnce() -> String) {
        if self.poison.is_none() {
            self.poison = Some(reason());
        }
    }

    /// One field line (not a comment), or (`complete == false`) the start of one too long
    /// to be held, whose rest is dropped.
    fn field(&mut self, line: &[u8], complete: bool) {
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        self.size = self.size.saturating_add(line.len());
        if !self.oversized && self.size > self.max_bytes {
            self.oversized = true;
            self.data.truncate(POISON_PREFIX_BYTES);
        }
        match field {
            b"id" | b"event" if !complete => {
                // Only `data` may be cut: a cut id or name would be a different one.
                self.id = None;
                self.poison(|| "its id or event name is over the limit".to_owned());
            }
            b"data" => {
                if self.has_data {
                    self.push_data(b"\n");
                }
                self.push_data(value);
                self.has_data = true;
            }
            b"event" => {
                self.event = Some(String::from_utf8_lossy(value).into_owned());
                if std::str::from_utf8(value).is_err() {
                    self.poison(|| "its event name is not valid UTF-8".to_owned());
                }
            }
            b"id" if !value.contains(&0) => match std::str::from_utf8(value) {
                Ok(id) => self.id = (!id.is_empty()).then(|| id.to_owned()),
                Err(_) => {
                    self.id = None;
                    self.poison(|| "its id is not valid UTF-8".to_owned());
                }
            },
            _ => {}
        }
    }

    /// Appends to `data`; once over the limit, only up to the dead letter's prefix.
    fn push_data(&mut self, bytes: &[u8]) {
        if self.oversized {
            let room = POISON_PREFIX_BYTES.saturating_sub(self.data.len());
            self.data.extend_from_slice(&bytes[..bytes.len().min(room)]);
        } else {
            self.data.extend_from_slice(bytes);
        }
    }

    /// A blank line: the event collected so far, unless it had no `data:` line (which the
    /// standard says to drop; a poisoned event without data has nothing to keep either).
    fn dispatch(&mut self) -> Option<Dispatched> {
        let done = std::mem::replace(self, Pending::new(self.max_bytes));
        if !done.has_data {
            return None;
        }
        let event = done
            .event
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "message".to_owned());
        let mut reason = done.poison;
        if done.oversized {
            reason = Some(format!(
                "{} bytes, over bridge.max_event_bytes ({}); the dead letter keeps the first {} \
                 bytes of its data",
                done.size,
                done.max_bytes,
                done.data.len()
            ));
        }
        let data = match (reason, String::from_utf8(done.data)) {
            (None, Ok(data)) => data,
            (None, Err(e)) => {
                let at = e.utf8_error().valid_up_to();
                return Some(Err(PoisonEvent {
                    id: done.id,
                    event,
                    size: done.size,
                    reason: format!("its data is not valid UTF-8 (byte {at})"),
                    data: e.into_bytes(),
                }));
            }
            (Some(reason), data) => {
                return Some(Err(PoisonEvent {
                    id: done.id,
                    event,
                    size: done.size,
                    reason,
                    data: data.map_or_else(|e| e.into_bytes(), String::into_bytes),
                }))
            }
        };
        Some(Ok(SseEvent {
            id: done.id,
            event,
            data,
        }))
    }
}

/// The index of the first CR or LF. Eight bytes at a time: the stream is mostly long
/// `data:` lines, and this runs in unoptimised test builds too.
fn find_line_end(bytes: &[u8]) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    const LF: u64 = LO * b'\n' as u64;
    const CR: u64 = LO * b'\r' as u64;
    let mut words = bytes.chunks_exact(8);
    let mut offset = 0;
    for word in &mut words {
        let mut array = [0u8; 8];
        array.copy_from_slice(word);
        let w = u64::from_le_bytes(array);
        let lf = w ^ LF;
        let cr = w ^ CR;
        let found = (lf.wrapping_sub(LO) & !lf | cr.wrapping_sub(LO) & !cr) & HI;
        if found != 0 {
            return word
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')
                .map(|i| offset + i);
        }
        offset += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&b| b == b'\n' || b == b'\r')
        .map(|i| offset + i)
}

/// A Redis stream id, `<milliseconds>-<sequence>`, as OpenCTI uses for SSE ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub millis: u64,
    pub seq: u64,
}

impl EventId {
    /// `0-0`, before every event.
    pub const ZERO: EventId = EventId { millis: 0, seq: 0 };
}

impl FromStr for EventId {
    type Err = StreamError;

    /// Exactly `<digits>-<digits>`, each fitting in a `u64`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || StreamError::Protocol(format!("{s:?} is not a stream id <ms>-<seq>"));
        let (millis, seq) = s.split_once('-').ok_or_else(invalid)?;
        let number = |part: &str| -> Result<u64, StreamError> {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            part.parse().map_err(|_| invalid())
        };
        Ok(EventId {
            millis: number(millis)?,
            seq: number(seq)?,
        })
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.millis, self.seq)
    }
}

/// Orders two stream ids numerically (milliseconds, then sequence); `None` if either is not
/// `<ms>-<seq>`.
pub fn compare_event_ids(a: &str, b: &str) -> Option<Ordering> {
    let a: EventId = a.parse().ok()?;
    let b: EventId = b.parse().ok()?;
    Some(a.cmp(&b))
}

/// The `connected` event: what the server's stream holds at connection time. Fields a
/// server version does not send are `None` (4.x sends no `firstEventId`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Connected {
    /// The newest event in the stream.
    pub last_event_id: Option<String>,
    /// The oldest event still retained: a position before it means events were trimmed.
    pub first_event_id: Option<String>,
    pub first_event_date: Option<String>,
    pub last_event_date: Option<String>,
    /// Events retained in the stream.
    pub stream_size: Option<u64>,
    pub connection_id: Option<String>,
}

/// Decodes the `data` of a `connected` event. Unknown keys are ignored; a key of the wrong
/// type is an error.
pub fn parse_connected(data: &str) -> Result<Connected, StreamError> {
    let value: serde_json::Value = serde_json::from_str(data)
        .map_err(|e| StreamError::Protocol(format!("connected event: {e}")))?;
    let object = value
        .as_object()
        .ok_or_else(|| StreamError::Protocol("connected event: not a JSON object".to_owned()))?;
    let text = |key: &str| -> Result<Option<String>, StreamError> {
        match object.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(StreamError::Protocol(format!(
                "connected event: {key} is not a string"
            ))),
        }
    };
    let stream_size = match object.get("streamSize") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        Some(_) => None,
    };
    Ok(Connected {
        last_event_id: text("lastEventId")?,
        first_event_id: text("firstEventId")?,
        first_event_date: text("firstEventDate")?,
        last_event_date: text("lastEventDate")?,
        stream_size,
        connection_id: text("connectionId")?,
    })
}

#[cfg(test)]
mod tests;
