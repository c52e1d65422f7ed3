//! The real Threat Bus (inmem backbone + zmq app plugin) for integration tests, and a
//! small ZeroMQ test app speaking its protocol (`threatbus/README.md` beside the spec).
//!
//! - [`ThreatBus::start`] runs the pinned `threatbus` on three free loopback ports (passed
//!   through Dynaconf env vars), in a fresh temp dir so no stray `.env` is read, with its
//!   output in a file there (the tail is printed when a test fails). It is ready once the
//!   manage port answers a heartbeat. A port clash does not make Threat Bus exit (README
//!   §1), so the log is checked for `Address already in use`.
//! - [`TestApp`] subscribes through the manage port, collects what arrives on its SUB
//!   (RCVHWM=0) in a background thread, and publishes sightings through an XPUB that
//!   waits for Threat Bus's subscription first (slow joiner).

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const CLASH: &str = "Address already in use";

/// The `threatbus` executable: `$THREATBUS_BIN`, else the venv `scripts/test.sh` creates.
pub fn threatbus_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("THREATBUS_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.exists(),
            "THREATBUS_BIN={} does not exist: run scripts/test.sh to create the Threat Bus venv",
            bin.display()
        );
        return bin;
    }
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-threatbus/bin/threatbus");
    assert!(
        bin.exists(),
        "Threat Bus not found: THREATBUS_BIN is unset and {} does not exist. \
         Run scripts/test.sh (it creates the venv and exports THREATBUS_BIN).",
        bin.display()
    );
    bin
}

/// The Threat Bus config file: `$THREATBUS_CONFIG`, else `../shared/threatbus/config.yaml`.
pub fn threatbus_config() -> PathBuf {
    let config = std::env::var_os("THREATBUS_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/threatbus/config.yaml")
        });
    assert!(
        config.exists(),
        "Threat Bus config {} not found: set THREATBUS_CONFIG or run scripts/test.sh",
        config.display()
    );
    config
}

/// Three distinct free TCP ports on 127.0.0.1 (held together while picking, so distinct).
pub fn free_ports() -> [u16; 3] {
    let listeners: Vec<_> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port"))
        .collect();
    let port = |i: usize| listeners[i].local_addr().unwrap().port();
    [port(0), port(1), port(2)]
}

/// One free TCP port nobody listens on.
pub fn unused_port() -> u16 {
    free_ports()[0]
}

/// A running Threat Bus; SIGKILLed on drop.
pub struct ThreatBus {
    pub manage_port: u16,
    pub pub_port: u16,
    pub sub_port: u16,
    dir: tempfile::TempDir,
    log_path: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl ThreatBus {
    /// Starts Threat Bus on free ports and waits until its manage port answers.
    pub fn start() -> ThreatBus {
        let [manage_port, pub_port, sub_port] = free_ports();
        let dir = tempfile::tempdir().expect("creating a temp dir for Threat Bus");
        let log_path = dir.path().join("threatbus.log");
        let mut bus = ThreatBus {
            manage_port,
            pub_port,
            sub_port,
            dir,
            log_path,
            child: None,
            starts: 0,
        };
        bus.spawn();
        bus
    }

    /// SIGKILLs Threat Bus (all its state, i.e. the subscriptions, is lost).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.assert_no_clash();
    }

    /// Kills Threat Bus if it runs and starts it again on the same ports.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The process id of the running Threat Bus (for CPU accounting in the benches).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Everything Threat Bus printed (all runs).
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log_path) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let tail: VecDeque<&str> = log.lines().fold(VecDeque::new(), |mut acc, line| {
            if acc.len() == lines {
                acc.pop_front();
            }
            acc.push_back(line);
            acc
        });
        tail.into_iter().collect::<Vec<_>>().join("\n")
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("opening the Threat Bus log");
        let mut command = Command::new(threatbus_bin());
        command
            .arg("-c")
            .arg(threatbus_config())
            // A fresh dir: Dynaconf would read a `.env` in the cwd.
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log file handle"))
            .stderr(log)
            .env("PYTHONUNBUFFERED", "1");
        // Dynaconf reads every THREATBUS_* variable as configuration: pass only ours
        // (scripts/test.sh exports THREATBUS_BIN / _CONFIG / _PYTHON for the tests).
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("THREATBUS_") {
                command.env_remove(key);
            }
        }
        command
            .env(
                "THREATBUS_PLUGINS__APPS__ZMQ__MANAGE",
                self.manage_port.to_string(),
            )
            .env(
                "THREATBUS_PLUGINS__APPS__ZMQ__PUB",
                self.pub_port.to_string(),
            )
            .env(
                "THREATBUS_PLUGINS__APPS__ZMQ__SUB",
                self.sub_port.to_string(),
            );
        let child = command.spawn().expect("spawning threatbus");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            self.assert_no_clash();
            if !self.is_running() {
                self.fail("Threat Bus exited before it became ready");
            }
            let probe = json!({"action": "heartbeat", "topic": "readiness-probe"});
            if manage_request(self.manage_port, &probe, Duration::from_millis(200)).is_some() {
                // The pub/sub workers bind before the manage worker starts, so a clash on
                // them is already in the log by now.
                self.assert_no_clash();
                eprintln!(
                    "Threat Bus (start #{}) ready on manage {} / pub {} / sub {} after {:?}",
                    self.starts,
                    self.manage_port,
                    self.pub_port,
                    self.sub_port,
                    started.elapsed()
                );
                return;
            }
            if started.elapsed() > READY_TIMEOUT {
                self.fail("Threat Bus did not answer on its manage port in time");
            }
        }
    }

    fn assert_no_clash(&self) {
        if self.log().contains(CLASH) {
            self.fail("Threat Bus could not bind its ports (another process holds one)");
        }
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}\n--- Threat Bus log ({}) ---\n{}\n---",
            self.log_path.display(),
            self.log_tail(60)
        );
    }
}

impl Drop for ThreatBus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- Threat Bus log tail ({}) ---\n{}\n---",
                self.log_path.display(),
                self.log_tail(40)
            );
        }
    }
}

/// One management request on a fresh REQ socket (LINGER 0); `None` if no reply in time.
pub fn manage_request(port: u16, request: &Value, timeout: Duration) -> Option<Value> {
    let context = zmq::Context::new();
    let socket = context.socket(zmq::REQ).unwrap();
    socket.set_linger(0).unwrap();
    socket.connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
    socket.send(request.to_string().as_bytes(), 0).unwrap();
    let timeout_ms = i64::try_from(timeout.as_millis()).unwrap();
    if socket.poll(zmq::POLLIN, timeout_ms).unwrap() == 0 {
        return None;
    }
    let reply = socket.recv_bytes(0).unwrap();
    Some(serde_json::from_slice(&reply).expect("a JSON reply"))
}

/// The `status` Threat Bus answers to a heartbeat on `topic` (`"success"` / `"error"`).
pub fn heartbeat_status(manage_port: u16, topic: &str) -> String {
    let reply = manage_request(
        manage_port,
        &json!({"action": "heartbeat", "topic": topic}),
        Duration::from_secs(2),
    )
    .expect("a heartbeat reply");
    reply["status"].as_str().unwrap().to_owned()
}

/// A p2p subscription made directly through the manage port.
pub fn raw_subscribe(manage_port: u16, topics: &[&str], snapshot_days: u32) -> Value {
    let reply = manage_request(
        manage_port,
        &json!({"action": "subscribe", "topic": topics, "snapshot": snapshot_days}),
        Duration::from_secs(5),
    )
    .expect("a subscribe reply");
    assert_eq!(reply["status"], "success", "subscribe reply: {reply}");
    reply
}

/// One message a [`TestApp`] received: topic suffix and JSON.
pub type Received = (String, String);

#[derive(Default)]
struct Inbox {
    messages: Mutex<Vec<Received>>,
    arrived: Condvar,
}

/// A minimal Threat Bus app: one subscription, a background SUB reader, an XPUB for sending.
pub struct TestApp {
    pub topic: String,
    manage_port: u16,
    sub_port: u16,
    context: zmq::Context,
    inbox: Arc<Inbox>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    xpub: Option<zmq::Socket>,
}

impl TestApp {
    /// Subscribes to `topics` (no snapshot) and starts collecting.
    pub fn subscribe(manage_port: u16, topics: &[&str]) -> TestApp {
        TestApp::subscribe_with_snapshot(manage_port, topics, 0)
    }

    /// Subscribes to `topics`, asking for a snapshot of `snapshot_days`.
    pub fn subscribe_with_snapshot(manage_port: u16, topics: &[&str], days: u32) -> TestApp {
        let reply = raw_subscribe(manage_port, topics, days);
        let topic = reply["topic"].as_str().unwrap().to_owned();
        let pub_port = reply["pub_port"].as_u64().unwrap();
        let sub_port = u16::try_from(reply["sub_port"].as_u64().unwrap()).unwrap();
        let context = zmq::Context::new();
        let sub = context.socket(zmq::SUB).unwrap();
        sub.set_linger(0).unwrap();
        sub.set_rcvhwm(0).unwrap();
        sub.set_subscribe(topic.as_bytes()).unwrap();
        sub.connect(&format!("tcp://127.0.0.1:{pub_port}")).unwrap();
        let inbox = Arc::new(Inbox::default());
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (inbox, stop, topic) = (Arc::clone(&inbox), Arc::clone(&stop), topic.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if sub.poll(zmq::POLLIN, 100).unwrap() == 0 {
                        continue;
                    }
                    let frame = String::from_utf8(sub.recv_bytes(0).unwrap()).unwrap();
                    let (head, body) = frame.split_once(' ').unwrap_or((&frame, ""));
                    let suffix = head.strip_prefix(&topic).unwrap_or(head).to_owned();
                    inbox
                        .messages
                        .lock()
                        .unwrap()
                        .push((suffix, body.to_owned()));
                    inbox.arrived.notify_all();
                }
            })
        };
        TestApp {
            topic,
            manage_port,
            sub_port,
            context,
            inbox,
            stop,
            reader: Some(reader),
            xpub: None,
        }
    }

    /// How many messages arrived so far (without copying them).
    pub fn count(&self) -> usize {
        self.inbox.messages.lock().unwrap().len()
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.inbox.messages.lock().unwrap().clone()
    }

    /// Waits until at least `n` messages arrived; panics after `timeout`.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        let mut messages = self.inbox.messages.lock().unwrap();
        while messages.len() < n {
            let now = Instant::now();
            assert!(
                now < deadline,
                "test app {}: {} of {n} messages after {timeout:?}",
                self.topic,
                messages.len()
            );
            messages = self
                .inbox
                .arrived
                .wait_timeout(messages, deadline - now)
                .unwrap()
                .0;
        }
        messages.clone()
    }

    /// Sends `"stix2/sighting <json>"` to Threat Bus.
    pub fn publish_sighting(&mut self, json: &str) {
        self.publish("stix2/sighting", json);
    }

    /// Sends `"<topic> <json>"` (one frame) through an XPUB that first waited for Threat
    /// Bus's `stix2/` subscription (a PUB would lose the first frames: slow joiner).
    pub fn publish(&mut self, topic: &str, json: &str) {
        if self.xpub.is_none() {
            let xpub = self.context.socket(zmq::XPUB).unwrap();
            xpub.set_linger(1000).unwrap();
            xpub.set_sndhwm(0).unwrap();
            xpub.connect(&format!("tcp://127.0.0.1:{}", self.sub_port))
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                assert!(
                    Instant::now() < deadline,
                    "Threat Bus did not subscribe on the test app's XPUB"
                );
                if xpub.poll(zmq::POLLIN, 100).unwrap() > 0
                    && xpub.recv_bytes(0).unwrap() == b"\x01stix2/"
                {
                    break;
                }
            }
            self.xpub = Some(xpub);
        }
        let xpub = self.xpub.as_ref().unwrap();
        xpub.send(format!("{topic} {json}").as_bytes(), 0).unwrap();
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let _ = manage_request(
            self.manage_port,
            &json!({"action": "unsubscribe", "topic": self.topic}),
            Duration::from_millis(500),
        );
    }
}

/// A STIX 2.1 indicator Threat Bus accepts (README §5), with a fresh UUID v4 id.
pub fn sample_indicator() -> Value {
    let id = format!("indicator--{}", uuid::Uuid::new_v4());
    json!({
        "type": "indicator",
        "spec_version": "2.1",
        "id": id,
        "created": "2024-01-02T03:04:05.000Z",
        "modified": "2024-01-02T03:04:05.000Z",
        "name": "bad domain evil.example",
        "pattern": "[domain-name:value = 'evil.example']",
        "pattern_type": "stix",
        "valid_from": "2024-01-02T03:04:05Z",
        "x_opencti_detection": true,
        "x_threatbus_update": "EDIT"
    })
}

/// The frame the bridge publishes for `indicator`.
pub fn indicator_frame(indicator: &Value) -> String {
    format!("stix2/indicator {indicator}")
}

/// A STIX 2.1 sighting of `sighting_of_ref` as a Threat Bus app (e.g. VAST) sends it.
pub fn sample_sighting(sighting_of_ref: &str) -> Value {
    let id = format!("sighting--{}", uuid::Uuid::new_v4());
    json!({
        "type": "sighting",
        "spec_version": "2.1",
        "id": id,
        "created": "2024-01-02T03:05:00Z",
        "modified": "2024-01-02T03:05:00Z",
        "last_seen": "2024-01-02T03:05:00Z",
        "sighting_of_ref": sighting_of_ref,
        "x_threatbus_sighting_context": {"ts": "2024-01-02T03:05:00Z", "uid": "C1"},
        "x_threatbus_source": "VAST"
    })
}

/// The `id` of a JSON object given as text.
pub fn stix_id(json: &str) -> String {
    let value: Value = serde_json::from_str(json).expect("JSON from Threat Bus");
    value["id"].as_str().expect("an id").to_owned()
}
