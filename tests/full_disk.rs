//! Full disk (issue 8 item 3), for real: the data dir on a small tmpfs, mounted in a private
//! mount namespace. Each test re-executes this test binary under `unshare -m` (the mount
//! then vanishes with the namespace, whatever happens); a machine where that is impossible
//! fails the test loudly — CI runs as root, so a skip would hide a broken setup.
//!
//! The bridge binary runs between the OpenCTI stream double (many large indicators) and
//! the real Threat Bus, which is away at first: the outbox can only grow.

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::bridge::{Bridge, BridgeEnv, BIN, TOKEN};
use support::opencti::{Indicator, OpenCti};
use support::opencti_graphql::GraphqlDouble;
use support::threatbus::{TestApp, ThreatBus};

/// Set in the re-executed child: it runs inside the private mount namespace.
const INSIDE: &str = "FULL_DISK_INSIDE_NAMESPACE";
const WAIT: Duration = Duration::from_secs(120);
/// Indicators on the stream: ~3 KB each, kept twice by the store (queue and catalog):
/// several times the small filesystem.
const INDICATORS: usize = 20_000;
const DESCRIPTION_BYTES: usize = 2_000;

/// Runs `name` again in a private mount namespace; returns false when already inside it.
fn reexec_in_namespace(name: &str) -> bool {
    if std::env::var_os(INSIDE).is_some() {
        return false;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private"])
        .arg(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1")
        .output()
        .unwrap_or_else(|e| {
            panic!("FULL-DISK TEST CANNOT RUN: `unshare` is not available ({e}); it needs util-linux and root")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "the full-disk test failed inside its mount namespace ({}); see its output above",
        out.status
    );
    assert!(
        stdout.contains("1 passed"),
        "the full-disk test did not run inside its mount namespace:\n{stdout}"
    );
    true
}

/// A tmpfs of `size` mounted on `path` (inside the private namespace).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size}"))
            .arg("tmpfs")
            .arg(path)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "FULL-DISK TEST CANNOT RUN: mounting a tmpfs failed (root needed): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o"])
            .arg(format!("remount,size={size}"))
            .arg(&self.path)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "remounting the tmpfs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a bridge still being killed may hold files open.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// `health`, healthy or not: (exit success, the JSON it printed).
fn health(data_dir: &Path) -> Option<(bool, Value)> {
    let out = Command::new(BIN)
        .args(["health", "--data-dir"])
        .arg(data_dir)
        .env_clear()
        .output()
        .expect("health");
    if out.status.success() {
        return serde_json::from_slice(&out.stdout).ok().map(|v| (true, v));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let json = stderr.split_once("unhealthy: ")?.1.trim();
    serde_json::from_str(json).ok().map(|v| (false, v))
}

fn stream_state(data_dir: &Path) -> String {
    health(data_dir)
        .and_then(|(_, h)| h["components"]["stream"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

struct World {
    opencti: OpenCti,
    bus: ThreatBus,
    expected: HashSet<String>,
    _dir: tempfile::TempDir,
    fs: Tmpfs,
}

impl World {
    fn new() -> World {
        let opencti = OpenCti::start_with_graphql(GraphqlDouble::new(TOKEN));
        let mut bus = ThreatBus::start();
        // Away from the start: the outbox can only grow.
        bus.kill();
        let dir = tempfile::tempdir().unwrap();
        let fs = Tmpfs::mount(&dir.path().join("data"), "40m");
        let mut expected = HashSet::new();
        let description = "x".repeat(DESCRIPTION_BYTES);
        for n in 0..INDICATORS {
            let ip = format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255);
            let indicator = Indicator::ipv4(&ip).with_description(&description);
            opencti.append_indicator_create(&indicator);
            expected.insert(indicator.stix_id);
        }
        World {
            opencti,
            bus,
            expected,
            _dir: dir,
            fs,
        }
    }

    /// The bridge's data dir is the tmpfs itself: its log (beside it) is not on it.
    fn env(&self, min_free_mb: u64) -> BridgeEnv {
        BridgeEnv::new(
            &self.opencti.base_url(),
            self.bus.manage_port,
            &self.fs.path,
        )
        .set("BRIDGE_MIN_FREE_MB", min_free_mb.to_string())
        // (16 MB: the reader pauses below it, sightings are dropped below 4 MB.)
        .set("CONNECTOR_LOG_LEVEL", "info")
        .set("BRIDGE_PROBE_MAX_MS", "1000")
        .set("BRIDGE_INFLIGHT_WINDOW", "500")
    }

    /// Threat Bus comes: an app subscribes before the bridge's next probe finds it.
    fn bus_comes(&mut self) -> TestApp {
        self.bus.restart();
        TestApp::subscribe(self.bus.manage_port, &["stix2/indicator"])
    }

    fn delivered(&self, app: &TestApp) -> HashSet<String> {
        app.received()
            .into_iter()
            .filter(|(suffix, _)| suffix == "indicator")
            .filter_map(|(_, body)| {
                let v: Value = serde_json::from_str(&body).ok()?;
                v["id"].as_str().map(str::to_owned)
            })
            .collect()
    }
}

fn free_mb(path: &Path) -> u64 {
    opencti_threatbus::store::disk_space::free_bytes(path).unwrap() / (1024 * 1024)
}

/// The reader pauses at the watermark, long before ENOSPC; health says why; delivering
/// makes room inside sled's file (the filesystem's free space does not rise) and reading
/// resumes by itself; a bigger filesystem lets the rest through; nothing is lost.
#[test]
fn pauses_before_the_disk_fills_and_resumes_by_itself() {
    if reexec_in_namespace("pauses_before_the_disk_fills_and_resumes_by_itself") {
        return;
    }
    let mut world = World::new();
    let mut bridge = Bridge::start(world.env(16));
    let data = world.fs.path.clone();
    wait_until(
        &mut bridge,
        "the reader pauses for disk space",
        WAIT,
        || stream_state(&data).starts_with("paused: disk nearly full"),
    );
    let queued_at_pause = bridge.queued("indicators");
    println!(
        "paused with {queued_at_pause} indicators queued, {} MB free",
        free_mb(&data)
    );
    assert!(queued_at_pause > 0 && queued_at_pause < INDICATORS as u64);
    // It stays paused and alive: nothing more is read while Threat Bus is away.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        bridge.running(),
        "the bridge exited:\n{}",
        bridge.log_tail(60)
    );
    let (healthy, h) = health(&data).expect("health answers while paused");
    assert!(
        healthy,
        "a paused bridge is healthy (it waits by design): {h}"
    );
    assert!(
        h["components"]["disk"]
            .as_str()
            .unwrap()
            .contains("MB free"),
        "{h}"
    );
    assert!(
        stream_state(&data).starts_with("paused: disk nearly full"),
        "{h}"
    );
    let report = bridge.inspect();
    assert!(
        report.to_string().contains("disk nearly full"),
        "inspect-queue says why the stream is paused: {report}"
    );
    assert!(!bridge.log_text().contains("No space left on device"));

    // Threat Bus comes: delivered items free space inside sled's file, and the reader
    // reads on although the filesystem's free space does not grow.
    let app = world.bus_comes();
    wait_until(
        &mut bridge,
        "reading resumed on a still small disk",
        WAIT,
        || world.delivered(&app).len() as u64 > queued_at_pause + 1_000,
    );
    // The filesystem grows: the rest goes through without a pause.
    world.fs.resize("800m");
    wait_until(
        &mut bridge,
        "every indicator delivered",
        Duration::from_secs(300),
        || world.delivered(&app).is_superset(&world.expected),
    );
    assert!(!bridge.log_text().contains("No space left on device"));
    assert_eq!(bridge.terminate(Duration::from_secs(10)), Some(0));
}

/// Polls `done` until it holds; fails if the bridge exits first or after `limit`, with the
/// whole bridge log (a tail hid how the disk had filled in an earlier failure).
fn wait_until(bridge: &mut Bridge, what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            bridge.running(),
            "the bridge exited while waiting for {what}:\n{}",
            bridge.log_text()
        );
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; bridge log:\n{}",
            bridge.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// With the watermark off, sled meets ENOSPC: the daemon says DISK FULL and exits 1 (never
/// alive and idle). Restarted with the watermark on the same full disk (0 bytes free: sled
/// cannot even open the store, it writes at open), it does not crash-loop: it stays up,
/// `health` says unhealthy (disk full), and once the filesystem grows it opens the store
/// the first run left (consistent) and delivers everything, nothing lost.
#[test]
fn enospc_exits_and_the_restart_waits_for_room() {
    if reexec_in_namespace("enospc_exits_and_the_restart_waits_for_room") {
        return;
    }
    let mut world = World::new();
    let mut bridge = Bridge::start(world.env(0));
    let deadline = Instant::now() + WAIT;
    while bridge.running() {
        assert!(
            Instant::now() < deadline,
            "sled never failed (or the bridge never exited) on a full disk:\n{}",
            bridge.log_tail(60)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = bridge.log_text();
    assert!(log.contains("DISK FULL"), "{}", bridge.log_tail(60));
    println!("first run ended with {} MB free", free_mb(&world.fs.path));

    // The container restarts it into the same full disk, now with the watermark on.
    let mut bridge = Bridge::start(world.env(16));
    let data = world.fs.path.clone();
    wait_until(
        &mut bridge,
        "health says the disk is full",
        WAIT,
        || matches!(health(&data), Some((false, h)) if h["unhealthy"].to_string().contains("disk full")),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        bridge.running(),
        "the restart exited:\n{}",
        bridge.log_tail(60)
    );
    let app = world.bus_comes();
    world.fs.resize("800m");
    wait_until(
        &mut bridge,
        "every indicator delivered",
        Duration::from_secs(300),
        || world.delivered(&app).is_superset(&world.expected),
    );
    assert_eq!(bridge.terminate(Duration::from_secs(10)), Some(0));
}
