//! The bridge itself, as a child process: started with a complete configuration through
//! the environment, killed with SIGKILL, restarted, asked over its admin socket.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_opencti-threatbus");
pub const TOKEN: &str = "bridge-test-token";
/// The `connector.id` of every test bridge.
pub const CONNECTOR_ID: &str = "4ef4ea3a-2b5f-4b7c-9d43-3f4f2b1c9a10";

/// Stores `position` as the stream position of the (closed) store in `data_dir`, as a
/// bridge that ran before would have left it.
pub fn store_position(data_dir: &Path, position: &str) {
    use opencti_threatbus::store::{Store, StoreOptions};
    let store = Store::open(data_dir, &StoreOptions::default()).expect("open the store");
    drop(store.set_position(position).expect("store the position"));
    store.close().expect("close the store");
}

/// Environment for one bridge; `set` overrides or adds a variable.
#[derive(Clone)]
pub struct BridgeEnv {
    vars: BTreeMap<String, String>,
}

impl BridgeEnv {
    /// A bridge following `opencti_url`'s live stream `live`, subscribed to Threat Bus on
    /// `manage_port`, with short retry delays for tests.
    pub fn new(opencti_url: &str, manage_port: u16, data_dir: &Path) -> Self {
        let mut vars = BTreeMap::new();
        for (k, v) in [
            ("OPENCTI_URL", opencti_url.to_string()),
            ("OPENCTI_TOKEN", TOKEN.to_string()),
            ("CONNECTOR_ID", CONNECTOR_ID.to_string()),
            ("CONNECTOR_TYPE", "STREAM".into()),
            ("CONNECTOR_NAME", "Threat Bus".into()),
            ("CONNECTOR_SCOPE", "threatbus".into()),
            ("CONNECTOR_CONFIDENCE_LEVEL", "70".into()),
            ("CONNECTOR_LOG_LEVEL", "debug".into()),
            ("CONNECTOR_ENTITY_NAME", "Threat Bus Sensors".into()),
            (
                "CONNECTOR_ENTITY_DESCRIPTION",
                "sightings from the test".into(),
            ),
            ("CONNECTOR_LIVE_STREAM_ID", "live".into()),
            ("CONNECTOR_STREAM_TIMEOUT_S", "20".into()),
            ("THREATBUS_ZMQ_HOST", "127.0.0.1".into()),
            ("THREATBUS_ZMQ_PORT", manage_port.to_string()),
            ("BRIDGE_DATA_DIR", data_dir.display().to_string()),
            ("BRIDGE_RETRY_INITIAL_MS", "50".into()),
            ("BRIDGE_RETRY_MAX_MS", "1000".into()),
            ("BRIDGE_CONFIRM_TIMEOUT_MS", "3000".into()),
            ("BRIDGE_INFLIGHT_WINDOW", "100".into()),
        ] {
            vars.insert(k.to_string(), v);
        }
        BridgeEnv { vars }
    }

    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        self.vars.insert(key.to_string(), value.into());
        self
    }

    pub fn data_dir(&self) -> PathBuf {
        PathBuf::from(&self.vars["BRIDGE_DATA_DIR"])
    }
}

pub struct Bridge {
    env: BridgeEnv,
    child: Option<Child>,
    log: PathBuf,
    pub starts: usize,
}

impl Bridge {
    pub fn start(env: BridgeEnv) -> Bridge {
        let log = env.data_dir().with_extension("log");
        let mut bridge = Bridge {
            env,
            child: None,
            log,
            starts: 0,
        };
        bridge.spawn();
        bridge
    }

    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("bridge log");
        let child = Command::new(BIN)
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(&self.env.vars)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn the bridge");
        self.child = Some(child);
        self.starts += 1;
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// SIGTERM; the exit code if it exited within `limit`.
    pub fn terminate(&mut self, limit: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Whether the process is still running (it exits only on a fatal error).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// `inspect-queue --json`, through the admin socket when it runs.
    pub fn inspect(&self) -> serde_json::Value {
        let out = Command::new(BIN)
            .args(["inspect-queue", "--json", "--limit", "0", "--data-dir"])
            .arg(self.env.data_dir())
            .env_clear()
            .output()
            .expect("inspect-queue");
        assert!(
            out.status.success(),
            "inspect-queue failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("inspect-queue JSON")
    }

    /// Items in a queue (`indicators`, `sightings`, `dead`), from inspect-queue.
    pub fn queued(&self, queue: &str) -> u64 {
        let report = self.inspect();
        report["queues"]
            .as_array()
            .and_then(|qs| qs.iter().find(|q| q["queue"] == queue))
            .and_then(|q| q["count"].as_u64())
            .unwrap_or(0)
    }

    /// Waits until `health` answers (the daemon is up and serving its socket).
    pub fn wait_healthy(&mut self, limit: Duration) {
        self.wait_health("became healthy", limit, |_| true);
    }

    /// Waits until the running bridge reports its Threat Bus link ready (`health`): only
    /// then does Threat Bus route anything to it — what is published before is lost.
    pub fn wait_subscribed(&mut self, limit: Duration) {
        self.wait_health("subscribed", limit, |health| {
            health["components"]["threatbus"] == "ready"
        });
    }

    /// Polls `health` until it answers with what `accept` wants; fails if the bridge exits.
    fn wait_health(
        &mut self,
        what: &str,
        limit: Duration,
        accept: impl Fn(&serde_json::Value) -> bool,
    ) {
        let deadline = Instant::now() + limit;
        loop {
            let out = Command::new(BIN)
                .args(["health", "--data-dir"])
                .arg(self.env.data_dir())
                .env_clear()
                .output()
                .expect("health");
            if out.status.success() {
                let health = serde_json::from_slice(&out.stdout).unwrap_or_default();
                if accept(&health) {
                    return;
                }
            }
            assert!(self.running(), "the bridge exited:\n{}", self.log_tail(60));
            assert!(
                Instant::now() < deadline,
                "the bridge never {what}:\n{}",
                self.log_tail(60)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last `lines` lines the bridge logged (all runs), without the stream reader's
    /// reconnection chatter (tests that use no stream would see nothing else).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text
            .lines()
            .filter(|l| {
                !l.contains("opening the OpenCTI stream")
                    && !l.contains("cannot connect to the OpenCTI stream")
            })
            .collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Polls `done` until it holds; after `limit`, fails with the bridge's log.
    pub fn until(&self, what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; bridge log:\n{}",
                self.log_tail(80)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.kill9();
    }
}
