//! The management client: Threat Bus's REQ/REP endpoint (`threatbus/README.md` §3).
//!
//! One JSON request, one JSON reply, on a **fresh REQ socket per request** with LINGER 0,
//! as the upstream apps do. A REQ socket whose reply never came is stuck in its
//! send/receive state machine; throwing it away is simpler than ZMQ_REQ_RELAXED, and
//! LINGER 0 makes sure an unanswered request neither blocks the context's termination nor
//! reaches a Threat Bus that comes up later.
//!
//! Heartbeats are client-side only: Threat Bus stores no timestamps and never expires a
//! subscription. `{"status": "error"}` to a heartbeat means it no longer knows the p2p
//! topic, i.e. it restarted; no reply means it is down or unreachable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Reply timeout of a subscribe request (as the upstream OpenCTI connector).
pub const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Reply timeout of a heartbeat or unsubscribe request (as the upstream OpenCTI connector).
pub const SHORT_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a waiting request checks its cancel flag.
const CANCEL_CHECK: Duration = Duration::from_millis(50);

/// What the management endpoint answered to a subscribe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The p2p topic: it names the subscription in heartbeat and unsubscribe, and it is
    /// the ZeroMQ prefix of everything Threat Bus sends to this subscriber.
    pub topic: String,
    /// Threat Bus's PUB port (Threat Bus → apps): connect a SUB here.
    pub pub_port: u16,
    /// Threat Bus's SUB port (apps → Threat Bus): connect a PUB/XPUB here.
    pub sub_port: u16,
}

/// Everything a management request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    /// No reply within the timeout: Threat Bus is down, unreachable or overloaded.
    #[error("no reply from Threat Bus at {endpoint} to {action} within {timeout:?}")]
    Timeout {
        action: &'static str,
        endpoint: String,
        timeout: Duration,
    },
    /// Threat Bus answered with a status other than `success` (for a subscribe; for a
    /// heartbeat or unsubscribe: other than `success` or `error`).
    #[error("Threat Bus rejected the {action} request: status {status:?}")]
    Rejected {
        action: &'static str,
        status: String,
    },
    /// The reply was not the JSON object the protocol defines.
    #[error("unexpected reply from Threat Bus to {action} ({reason}): {reply}")]
    BadReply {
        action: &'static str,
        reason: String,
        reply: String,
    },
    /// A ZeroMQ call failed (creating, configuring or using the REQ socket).
    #[error("ZeroMQ error on the management socket: {0}")]
    Zmq(#[from] zmq::Error),
    /// The request was abandoned because the link is shutting down.
    #[error("the {action} request was cancelled")]
    Cancelled { action: &'static str },
}

/// A client of one Threat Bus management endpoint.
#[derive(Clone)]
pub struct ManageClient {
    context: zmq::Context,
    endpoint: String,
    ipv6: bool,
    cancel: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for ManageClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManageClient")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// `tcp://host:port`, with an IPv6 literal put in brackets.
pub fn tcp_endpoint(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("tcp://[{host}]:{port}")
    } else {
        format!("tcp://{host}:{port}")
    }
}

/// Whether sockets connecting to `host` need ZMQ_IPV6 (only for IPv6 literals: enabling it
/// for a name could resolve `localhost` to `::1` while Threat Bus listens on 127.0.0.1).
pub(crate) fn needs_ipv6(host: &str) -> bool {
    host.contains(':')
}

impl ManageClient {
    /// A client for the management endpoint `host:port`, creating its sockets in `context`.
    pub fn new(context: zmq::Context, host: &str, port: u16) -> Self {
        ManageClient {
            context,
            endpoint: tcp_endpoint(host, port),
            ipv6: needs_ipv6(host),
            cancel: None,
        }
    }

    /// The same client, whose pending requests give up with [`ManageError::Cancelled`]
    /// (within ~50 ms) once `cancel` is set: the link's shutdown must not wait out a 5 s
    /// subscribe timeout.
    pub fn with_cancel(mut self, cancel: Arc<AtomicBool>) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// `tcp://host:port` of the management socket.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Subscribes to `topics` (prefix matches on `stix2/indicator` / `stix2/sighting`; don't
    /// list overlapping prefixes, or messages arrive twice) and asks for a snapshot of the
    /// last `snapshot_days` days (0: none).
    pub fn subscribe(
        &self,
        topics: &[String],
        snapshot_days: u32,
    ) -> Result<Subscription, ManageError> {
        const ACTION: &str = "subscribe";
        let reply = self.request(
            ACTION,
            &json!({"action": ACTION, "topic": topics, "snapshot": snapshot_days}),
            SUBSCRIBE_TIMEOUT,
        )?;
        let status = status(ACTION, &reply)?;
        if status != "success" {
            return Err(ManageError::Rejected {
                action: ACTION,
                status: status.to_owned(),
            });
        }
        let bad = |reason: &str| ManageError::BadReply {
            action: ACTION,
            reason: reason.to_owned(),
            reply: reply.to_string(),
        };
        let topic = reply
            .get("topic")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| bad("no topic"))?;
        let port = |key: &str| {
            reply
                .get(key)
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(&format!("no valid {key}")))
        };
        Ok(Subscription {
            topic: topic.to_owned(),
            pub_port: port("pub_port")?,
            sub_port: port("sub_port")?,
        })
    }

    /// `Ok(true)`: Threat Bus knows the subscription. `Ok(false)` (`{"status": "error"}`):
    /// it does not (any more), i.e. it restarted: subscribe again.
    pub fn heartbeat(&self, topic: &str) -> Result<bool, ManageError> {
        self.topic_request("heartbeat", topic)
    }

    /// `Ok(true)`: removed. `Ok(false)` (`{"status": "error"}`): Threat Bus did not know the
    /// topic (already removed, or Threat Bus restarted since).
    pub fn unsubscribe(&self, topic: &str) -> Result<bool, ManageError> {
        self.topic_request("unsubscribe", topic)
    }

    fn topic_request(&self, action: &'static str, topic: &str) -> Result<bool, ManageError> {
        let reply = self.request(
            action,
            &json!({"action": action, "topic": topic}),
            SHORT_TIMEOUT,
        )?;
        match status(action, &reply)? {
            "success" => Ok(true),
            "error" => Ok(false),
            other => Err(ManageError::Rejected {
                action,
                status: other.to_owned(),
            }),
        }
    }

    /// Sends one request on a fresh REQ socket and waits up to `timeout` for the reply.
    fn request(
        &self,
        action: &'static str,
        request: &Value,
        timeout: Duration,
    ) -> Result<Value, ManageError> {
        let socket = self.context.socket(zmq::REQ)?;
        // LINGER 0: an unanswered request must not be delivered later or hold up the
        // context's termination.
        socket.set_linger(0)?;
        if self.ipv6 {
            socket.set_ipv6(true)?;
        }
        socket.connect(&self.endpoint)?;
        let timed_out = || ManageError::Timeout {
            action,
            endpoint: self.endpoint.clone(),
            timeout,
        };
        // Without ZMQ_IMMEDIATE, connect() attaches the pipe at once, so the request is
        // queued even before the TCP connection exists (and goes out once Threat Bus comes
        // up, if that happens within the timeout). DONTWAIT only guards against a surprise.
        match socket.send(request.to_string().as_bytes(), zmq::DONTWAIT) {
            Ok(()) => {}
            Err(zmq::Error::EAGAIN) => return Err(timed_out()),
            Err(e) => return Err(e.into()),
        }
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
            {
                return Err(ManageError::Cancelled { action });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(timed_out());
            }
            let slice = if self.cancel.is_some() {
                (deadline - now).min(CANCEL_CHECK)
            } else {
                deadline - now
            };
            // Round up so that a sub-millisecond remainder does not spin.
            let slice_ms = i64::try_from(slice.as_millis()).unwrap_or(i64::MAX).max(1);
            if socket.poll(zmq::POLLIN, slice_ms)? > 0 {
                break;
            }
        }
        let reply = socket.recv_bytes(zmq::DONTWAIT)?;
        serde_json::from_slice(&reply).map_err(|e| ManageError::BadReply {
            action,
            reason: format!("not JSON: {e}"),
            reply: String::from_utf8_lossy(&reply).into_owned(),
        })
    }
}

/// The reply's `status` string.
fn status<'a>(action: &'static str, reply: &'a Value) -> Result<&'a str, ManageError> {
    reply
        .get("status")
        .and_then(Value::as_str)
        .ok_or_else(|| ManageError::BadReply {
            action,
            reason: "no status".to_owned(),
            reply: reply.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A REP server on a free port answering each request with the next canned reply.
    fn fake_server(replies: Vec<&'static str>) -> (u16, std::thread::JoinHandle<Vec<Value>>) {
        let context = zmq::Context::new();
        let socket = context.socket(zmq::REP).unwrap();
        socket.set_linger(0).unwrap();
        socket.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = socket.get_last_endpoint().unwrap().unwrap();
        let port = endpoint.rsplit(':').next().unwrap().parse().unwrap();
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for reply in replies {
                let request = socket.recv_bytes(0).unwrap();
                seen.push(serde_json::from_slice(&request).unwrap());
                socket.send(reply, 0).unwrap();
            }
            seen
        });
        (port, handle)
    }

    fn client(port: u16) -> ManageClient {
        ManageClient::new(zmq::Context::new(), "127.0.0.1", port)
    }

    #[test]
    fn subscribe_sends_the_documented_request_and_parses_the_reply() {
        let (port, server) = fake_server(vec![
            r#"{"topic": "hkonisxprdopcohvaoyebgycuirqckhj", "pub_port": 13371, "sub_port": 13372, "status": "success"}"#,
        ]);
        let topics = vec!["stix2/sighting".to_owned(), "stix2/indicator".to_owned()];
        let sub = client(port).subscribe(&topics, 3).unwrap();
        assert_eq!(
            sub,
            Subscription {
                topic: "hkonisxprdopcohvaoyebgycuirqckhj".into(),
                pub_port: 13371,
                sub_port: 13372
            }
        );
        let seen = server.join().unwrap();
        assert_eq!(
            seen[0],
            json!({"action": "subscribe", "topic": ["stix2/sighting", "stix2/indicator"], "snapshot": 3})
        );
    }

    #[test]
    fn heartbeat_and_unsubscribe_map_success_and_error() {
        let (port, server) = fake_server(vec![
            r#"{"status": "success"}"#,
            r#"{"status": "error"}"#,
            r#"{"status": "success"}"#,
            r#"{"status": "unknown request"}"#,
        ]);
        let c = client(port);
        assert!(c.heartbeat("abc").unwrap());
        assert!(!c.heartbeat("abc").unwrap());
        assert!(c.unsubscribe("abc").unwrap());
        assert!(matches!(
            c.unsubscribe("abc"),
            Err(ManageError::Rejected { status, .. }) if status == "unknown request"
        ));
        let seen = server.join().unwrap();
        assert_eq!(seen[0], json!({"action": "heartbeat", "topic": "abc"}));
        assert_eq!(seen[2], json!({"action": "unsubscribe", "topic": "abc"}));
    }

    #[test]
    fn bad_replies_are_typed() {
        let (port, server) = fake_server(vec![
            "not json",
            r#"{"status": "error"}"#,
            r#"{"status": "success", "pub_port": 1, "sub_port": 2}"#,
            r#"{"status": "success", "topic": "t", "pub_port": 70000, "sub_port": 2}"#,
            r#"{"topic": "t"}"#,
        ]);
        let c = client(port);
        let topics = vec!["stix2".to_owned()];
        assert!(matches!(
            c.heartbeat("x"),
            Err(ManageError::BadReply { .. })
        ));
        assert!(matches!(
            c.subscribe(&topics, 0),
            Err(ManageError::Rejected { status, .. }) if status == "error"
        ));
        assert!(matches!(
            c.subscribe(&topics, 0),
            Err(ManageError::BadReply { .. })
        ));
        assert!(matches!(
            c.subscribe(&topics, 0),
            Err(ManageError::BadReply { .. })
        ));
        assert!(matches!(
            c.heartbeat("x"),
            Err(ManageError::BadReply { .. })
        ));
        server.join().unwrap();
    }

    #[test]
    fn no_server_times_out_and_cancel_cuts_the_wait() {
        // A port nobody listens on: bind and drop a listener.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let started = Instant::now();
        assert!(matches!(
            client(port).heartbeat("x"),
            Err(ManageError::Timeout { .. })
        ));
        let took = started.elapsed();
        assert!(
            took >= SHORT_TIMEOUT && took < SHORT_TIMEOUT * 2,
            "{took:?}"
        );

        let cancel = Arc::new(AtomicBool::new(false));
        let c = client(port).with_cancel(Arc::clone(&cancel));
        let started = Instant::now();
        let waiter = std::thread::spawn(move || c.subscribe(&["stix2".to_owned()], 0));
        std::thread::sleep(Duration::from_millis(200));
        cancel.store(true, Ordering::Relaxed);
        assert!(matches!(
            waiter.join().unwrap(),
            Err(ManageError::Cancelled { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn ipv6_literals_are_bracketed() {
        assert_eq!(tcp_endpoint("::1", 5), "tcp://[::1]:5");
        assert_eq!(tcp_endpoint("[::1]", 5), "tcp://[::1]:5");
        assert_eq!(tcp_endpoint("tb.example", 5), "tcp://tb.example:5");
    }
}
