//! A small peer speaking the Threat Bus ZeroMQ app protocol (`threatbus/README.md` beside
//! the spec), for fast tests and benchmarks that do not need the real (Python, ~700
//! messages/s) Threat Bus.
//!
//! Like the `threatbus-zmq` plugin it binds three sockets on 127.0.0.1 (free ports):
//! - **manage** (REP): `subscribe` answers a fresh random 32-letter `[a-z]` p2p topic and
//!   the data ports; `heartbeat`/`unsubscribe` answer `success` for a known p2p topic and
//!   `error` otherwise; a missing or empty `topic` or an unknown `action` is an
//!   `unknown request`; non-JSON or a non-integer `snapshot` is an `error` (README §3).
//! - **pub** (Threat Bus → apps): frames `"<p2p_topic><suffix> <json>"`. It is an XPUB, so
//!   the fake sees the apps' SUB subscriptions arrive and [`FakeBus::wait_subscribers`] can
//!   wait until an app really receives (no slow-joiner loss); on the wire it is a PUB.
//! - **sub** (apps → Threat Bus): a SUB subscribed to `stix2/` and
//!   `threatbus/snapshotenvelope`, so an app's XPUB gets the `\x01stix2/` frame on connect.
//!
//! Every STIX 2.1 indicator or sighting received (routed by the JSON `type`, as Threat Bus
//! does, not by the frame's topic) goes to every subscription whose topic prefix matches
//! `stix2/<type>`, once per matching prefix, the sender included (README §4 "Fan-out").
//! Unlike Threat Bus the JSON is relayed byte for byte, not re-serialized. Snapshots are
//! not emulated: a `snapshot` in `subscribe` is validated and ignored, and snapshot
//! envelopes are recorded but not delivered. Heartbeats are not required (neither are
//! they by Threat Bus).
//!
//! All sockets live on one thread; the API talks to it over an inproc PUSH/PULL pair.
//! HWMs are 0 (unlimited) everywhere, so nothing is dropped under a burst. Stops on drop.

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Frames read from one socket before the thread looks at the others.
const BATCH: usize = 1024;

/// What apps sent, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// STIX 2.1 indicators received (and relayed).
    pub indicators: usize,
    /// STIX 2.1 sightings received (and relayed).
    pub sightings: usize,
    /// `threatbus/snapshotenvelope` frames received (not relayed).
    pub snapshot_envelopes: usize,
    /// Frames dropped as Threat Bus drops them (not JSON, not STIX 2.1, another type).
    pub dropped: usize,
}

struct Subscription {
    p2p_topic: String,
    /// The topics the app subscribed to (prefixes of `stix2/indicator`, `stix2/sighting`).
    prefixes: Vec<String>,
}

#[derive(Default)]
struct State {
    subscriptions: Vec<Subscription>,
    /// p2p topics the apps' SUB sockets subscribed on our XPUB (their data path is up).
    connected: HashSet<String>,
    received: Vec<String>,
    counts: Counts,
    /// Frames written on the pub socket.
    sent: usize,
}

impl State {
    fn knows(&self, p2p_topic: &str) -> bool {
        self.subscriptions.iter().any(|s| s.p2p_topic == p2p_topic)
    }

    fn connected_topics(&self) -> Vec<String> {
        self.subscriptions
            .iter()
            .filter(|s| self.connected.contains(&s.p2p_topic))
            .map(|s| s.p2p_topic.clone())
            .collect()
    }

    /// `<p2p><suffix>` for every subscription with a prefix of `bus_topic`, once per
    /// matching prefix (a list holding `stix2` and `stix2/indicator` gets it twice).
    fn routes(&self, bus_topic: &str, suffix: &str) -> Vec<String> {
        let mut heads = Vec::new();
        for subscription in &self.subscriptions {
            for prefix in &subscription.prefixes {
                if bus_topic.starts_with(prefix.as_str()) {
                    heads.push(format!("{}{suffix}", subscription.p2p_topic));
                }
            }
        }
        heads
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running fake. See the module documentation.
pub struct FakeBus {
    manage_port: u16,
    pub_port: u16,
    sub_port: u16,
    shared: Arc<Shared>,
    /// Commands to the socket thread (PUSH is not thread-safe: behind a mutex).
    commands: Mutex<zmq::Socket>,
    thread: Option<JoinHandle<()>>,
    _context: zmq::Context,
}

const CMD_SIGHTING: &[u8] = b"sighting";
const CMD_ALL: &[u8] = b"all";
const CMD_STOP: &[u8] = b"stop";

impl FakeBus {
    /// Binds the three sockets on free 127.0.0.1 ports and starts serving.
    pub fn start() -> FakeBus {
        let context = zmq::Context::new();
        let bind = |kind: zmq::SocketType| -> (zmq::Socket, u16) {
            let socket = context.socket(kind).expect("a ZeroMQ socket");
            socket.set_linger(0).unwrap();
            socket.set_sndhwm(0).unwrap();
            socket.set_rcvhwm(0).unwrap();
            socket
                .bind("tcp://127.0.0.1:*")
                .expect("binding a free port");
            let endpoint = socket.get_last_endpoint().unwrap().unwrap();
            let port = endpoint.rsplit(':').next().unwrap().parse().unwrap();
            (socket, port)
        };
        let (manage, manage_port) = bind(zmq::REP);
        let (publisher, pub_port) = bind(zmq::XPUB);
        let (subscriber, sub_port) = bind(zmq::SUB);
        subscriber.set_subscribe(b"stix2/").unwrap();
        subscriber
            .set_subscribe(b"threatbus/snapshotenvelope")
            .unwrap();

        let endpoint = format!("inproc://fakebus-{}", uuid::Uuid::new_v4());
        let pull = context.socket(zmq::PULL).unwrap();
        pull.set_rcvhwm(0).unwrap();
        pull.bind(&endpoint).unwrap();
        let push = context.socket(zmq::PUSH).unwrap();
        push.set_sndhwm(0).unwrap();
        push.set_linger(0).unwrap();
        push.connect(&endpoint).unwrap();

        let shared = Arc::new(Shared::default());
        let worker = Worker {
            manage,
            publisher,
            subscriber,
            commands: pull,
            shared: Arc::clone(&shared),
            pub_port,
            sub_port,
        };
        let thread = std::thread::Builder::new()
            .name("fakebus".into())
            .spawn(move || worker.run())
            .expect("spawning the fake bus thread");
        FakeBus {
            manage_port,
            pub_port,
            sub_port,
            shared,
            commands: Mutex::new(push),
            thread: Some(thread),
            _context: context,
        }
    }

    /// The management (REP) port: what an app is configured with.
    pub fn manage_port(&self) -> u16 {
        self.manage_port
    }

    /// The port apps' SUB sockets connect to (Threat Bus → apps).
    pub fn pub_port(&self) -> u16 {
        self.pub_port
    }

    /// The port apps' PUB/XPUB sockets connect to (apps → Threat Bus).
    pub fn sub_port(&self) -> u16 {
        self.sub_port
    }

    /// The p2p topics of the current subscriptions, oldest first.
    pub fn subscribers(&self) -> Vec<String> {
        let state = self.shared.lock();
        state
            .subscriptions
            .iter()
            .map(|s| s.p2p_topic.clone())
            .collect()
    }

    /// The p2p topics of the subscriptions whose app's SUB has subscribed on our pub
    /// socket: what is published to them from now on reaches them.
    pub fn connected_subscribers(&self) -> Vec<String> {
        self.shared.lock().connected_topics()
    }

    /// Waits until at least `n` subscriptions exist and their apps' SUB sockets are
    /// connected (see [`FakeBus::connected_subscribers`]); returns their p2p topics.
    /// Panics after `timeout`.
    pub fn wait_subscribers(&self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            let topics = state.connected_topics();
            if topics.len() >= n {
                return topics;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "fake Threat Bus: {} of {n} connected subscribers after {timeout:?} \
                 ({} subscriptions)",
                topics.len(),
                state.subscriptions.len()
            );
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Delivers `json` as a sighting from another app: `<p2p>sighting <json>` to every
    /// subscription with a prefix of `stix2/sighting`. Returns at once (the socket thread
    /// writes it, in call order).
    pub fn publish_sighting(&self, json: &str) {
        self.command(&[CMD_SIGHTING, b"", json.as_bytes()]);
    }

    /// Sends `<p2p><suffix> <json>` once to every subscription, whatever it subscribed to
    /// (e.g. `snapshotrequest`, or a suffix Threat Bus never sends).
    pub fn publish_to_all(&self, suffix: &str, json: &str) {
        self.command(&[CMD_ALL, suffix.as_bytes(), json.as_bytes()]);
    }

    /// Frames written on the pub socket so far (relays and publishes).
    pub fn sent(&self) -> usize {
        self.shared.lock().sent
    }

    /// Every frame apps sent (`"<topic> <json>"`), in arrival order.
    pub fn received(&self) -> Vec<String> {
        self.shared.lock().received.clone()
    }

    /// What apps sent, by kind.
    pub fn counts(&self) -> Counts {
        self.shared.lock().counts
    }

    /// Waits until apps sent at least `n` frames; returns them. Panics after `timeout`.
    pub fn wait_received(&self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        while state.received.len() < n {
            let now = Instant::now();
            assert!(
                now < deadline,
                "fake Threat Bus: {} of {n} frames received after {timeout:?}",
                state.received.len()
            );
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.received.clone()
    }

    fn command(&self, frames: &[&[u8]]) {
        let push = self.commands.lock().unwrap_or_else(|e| e.into_inner());
        push.send_multipart(frames, 0)
            .expect("handing a command to the fake bus thread");
    }
}

impl Drop for FakeBus {
    fn drop(&mut self) {
        self.command(&[CMD_STOP]);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The socket thread.
struct Worker {
    manage: zmq::Socket,
    publisher: zmq::Socket,
    subscriber: zmq::Socket,
    commands: zmq::Socket,
    shared: Arc<Shared>,
    pub_port: u16,
    sub_port: u16,
}

impl Worker {
    fn run(self) {
        loop {
            let mut items = [
                self.commands.as_poll_item(zmq::POLLIN),
                self.manage.as_poll_item(zmq::POLLIN),
                self.subscriber.as_poll_item(zmq::POLLIN),
                self.publisher.as_poll_item(zmq::POLLIN),
            ];
            if zmq::poll(&mut items, 1000).is_err() {
                continue;
            }
            let readable: Vec<bool> = items.iter().map(zmq::PollItem::is_readable).collect();
            if readable[3] {
                self.read_subscriptions();
            }
            if readable[1] {
                self.manage();
            }
            if readable[2] {
                self.relay();
            }
            if readable[0] && !self.run_commands() {
                return;
            }
        }
    }

    /// The apps' SUB subscriptions on our XPUB: `\x01<p2p>` / `\x00<p2p>`.
    fn read_subscriptions(&self) {
        let mut changed = false;
        let mut state = self.shared.lock();
        while let Ok(frame) = self.publisher.recv_bytes(zmq::DONTWAIT) {
            let topic = String::from_utf8_lossy(frame.get(1..).unwrap_or_default()).into_owned();
            match frame.first() {
                Some(1) => changed |= state.connected.insert(topic),
                Some(0) => changed |= state.connected.remove(&topic),
                _ => {}
            }
        }
        drop(state);
        if changed {
            self.shared.changed.notify_all();
        }
    }

    fn manage(&self) {
        let Ok(request) = self.manage.recv_bytes(zmq::DONTWAIT) else {
            return;
        };
        let reply = self.answer(&request);
        let _ = self.manage.send(reply.to_string().as_bytes(), 0);
    }

    /// One management request, answered as `threatbus_zmq` 2022.5.16 does.
    fn answer(&self, request: &[u8]) -> Value {
        let error = json!({"status": "error"});
        let unknown = json!({"status": "unknown request"});
        let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(request) else {
            return error;
        };
        // `int(msg.get("snapshot", 0))`, for every action.
        let snapshot_ok = match request.get("snapshot") {
            None => true,
            Some(Value::Number(_) | Value::Bool(_)) => true,
            Some(Value::String(s)) => s.trim().parse::<i64>().is_ok(),
            Some(_) => false,
        };
        if !snapshot_ok {
            return error;
        }
        let topic = request.get("topic");
        let truthy = match topic {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::String(s)) => !s.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
            Some(Value::Number(n)) => n.as_f64() != Some(0.0),
            Some(Value::Bool(true)) => true,
        };
        let action = request.get("action").and_then(Value::as_str);
        if !truthy || !matches!(action, Some("subscribe" | "heartbeat" | "unsubscribe")) {
            return unknown;
        }
        let topic = topic.unwrap_or(&Value::Null);
        let mut state = self.shared.lock();
        let reply = match action {
            Some("subscribe") => {
                let prefixes: Option<Vec<String>> = match topic {
                    Value::String(s) => Some(vec![s.clone()]),
                    Value::Array(items) => items
                        .iter()
                        .map(|t| t.as_str().map(str::to_owned))
                        .collect(),
                    _ => None,
                };
                match prefixes {
                    Some(prefixes) => {
                        let p2p_topic = random_p2p_topic();
                        state.subscriptions.push(Subscription {
                            p2p_topic: p2p_topic.clone(),
                            prefixes,
                        });
                        json!({
                            "topic": p2p_topic,
                            "pub_port": self.pub_port,
                            "sub_port": self.sub_port,
                            "status": "success",
                        })
                    }
                    None => error,
                }
            }
            Some("heartbeat") => match topic.as_str() {
                Some(t) if state.knows(t) => json!({"status": "success"}),
                _ => error,
            },
            _ => match topic.as_str() {
                Some(t) if state.knows(t) => {
                    state.subscriptions.retain(|s| s.p2p_topic != t);
                    json!({"status": "success"})
                }
                _ => error,
            },
        };
        drop(state);
        self.shared.changed.notify_all();
        reply
    }

    /// What apps sent: recorded, and indicators/sightings fanned out.
    fn relay(&self) {
        let mut state = self.shared.lock();
        for _ in 0..BATCH {
            let Ok(frame) = self.subscriber.recv_bytes(zmq::DONTWAIT) else {
                break;
            };
            let text = String::from_utf8_lossy(&frame).into_owned();
            let (topic, body) = text.split_once(' ').unwrap_or((&text, ""));
            let kind = if topic.starts_with("stix2/") {
                stix21_type(body)
            } else {
                None
            };
            match kind {
                Some(kind @ ("indicator" | "sighting")) => {
                    if kind == "indicator" {
                        state.counts.indicators += 1;
                    } else {
                        state.counts.sightings += 1;
                    }
                    for head in state.routes(&format!("stix2/{kind}"), kind) {
                        let mut out = Vec::with_capacity(head.len() + 1 + body.len());
                        out.extend_from_slice(head.as_bytes());
                        out.push(b' ');
                        out.extend_from_slice(body.as_bytes());
                        if self.publisher.send(out, 0).is_ok() {
                            state.sent += 1;
                        }
                    }
                }
                _ if topic == "threatbus/snapshotenvelope" => state.counts.snapshot_envelopes += 1,
                _ => state.counts.dropped += 1,
            }
            state.received.push(text);
        }
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Returns false on stop.
    fn run_commands(&self) -> bool {
        let mut state = self.shared.lock();
        while let Ok(frames) = self.commands.recv_multipart(zmq::DONTWAIT) {
            let body = frames.get(2).map(Vec::as_slice).unwrap_or_default();
            let heads = match frames.first().map(Vec::as_slice) {
                Some(CMD_SIGHTING) => state.routes("stix2/sighting", "sighting"),
                Some(CMD_ALL) => {
                    let suffix = String::from_utf8_lossy(&frames[1]);
                    state
                        .subscriptions
                        .iter()
                        .map(|s| format!("{}{suffix}", s.p2p_topic))
                        .collect()
                }
                _ => return false,
            };
            for head in heads {
                let mut out = Vec::with_capacity(head.len() + 1 + body.len());
                out.extend_from_slice(head.as_bytes());
                out.push(b' ');
                out.extend_from_slice(body);
                if self.publisher.send(out, 0).is_ok() {
                    state.sent += 1;
                }
            }
        }
        true
    }
}

/// The STIX `type` of a STIX **2.1** object (`spec_version: "2.1"`): what Threat Bus routes
/// by. `None` for anything it would drop as undecodable or STIX 2.0.
fn stix21_type(json: &str) -> Option<&'static str> {
    let value: Value = serde_json::from_str(json).ok()?;
    if value.get("spec_version").and_then(Value::as_str) != Some("2.1") {
        return None;
    }
    match value.get("type").and_then(Value::as_str)? {
        "indicator" => Some("indicator"),
        "sighting" => Some("sighting"),
        _ => Some("other"),
    }
}

/// 32 random `[a-z]` characters, like `rand_string(32)` in the plugin (std's randomly
/// keyed SipHash as the source: no `rand` dependency).
fn random_p2p_topic() -> String {
    let keys = RandomState::new();
    (0..32u8)
        .map(|i| {
            let mut hasher = keys.build_hasher();
            hasher.write_u8(i);
            char::from(b'a' + (hasher.finish() % 26) as u8)
        })
        .collect()
}
