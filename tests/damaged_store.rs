//! A damaged store, through the daemon binary: indicators are queued while Threat Bus is
//! away, the bridge stops, the store is damaged (cut to half, scattered blocks garbled,
//! files deleted), and the next start moves it aside (kept, never deleted), says what was
//! lost, and delivers every indicator that was undelivered before the damage, read again
//! from the stream at the checkpoint file's low watermark. `on_damaged_store: stop` exits 1
//! with what to do; clean restarts and `kill -9` are never taken for damage.

mod support;

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use support::bridge::{store_position, Bridge, BridgeEnv};
use support::opencti::{Indicator, OpenCti};
use support::threatbus::{unused_port, TestApp, ThreatBus};

const WAIT: Duration = Duration::from_secs(90);
/// Enough indicators for sled to spread them over several pages of its log.
const QUEUED: usize = 400;

struct World {
    opencti: OpenCti,
    dir: tempfile::TempDir,
    ids: Vec<String>,
}

impl World {
    fn new() -> World {
        let opencti = OpenCti::start();
        let dir = tempfile::tempdir().unwrap();
        // A bridge that has run before: a stored position at the stream's first event.
        let seed = opencti.append_marking();
        store_position(&dir.path().join("data"), &seed);
        World {
            opencti,
            dir,
            ids: Vec::new(),
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn env(&self, manage_port: u16) -> BridgeEnv {
        BridgeEnv::new(&self.opencti.base_url(), manage_port, &self.data())
    }

    fn append(&mut self, n: usize) {
        for _ in 0..n {
            let i = self.ids.len();
            let indicator = Indicator::ipv4(&format!("10.9.{}.{}", i / 256, i % 256));
            self.opencti.append_indicator_create(&indicator);
            self.ids.push(indicator.stix_id);
        }
    }

    /// Queues `QUEUED` indicators with Threat Bus away, then stops the bridge cleanly.
    fn queue_with_threatbus_away(&mut self) {
        let mut bridge = Bridge::start(self.env(unused_port()));
        bridge.wait_healthy(WAIT);
        self.append(QUEUED);
        bridge.until("every indicator queued", WAIT, || {
            bridge.queued("indicators") == QUEUED as u64
        });
        assert_eq!(bridge.terminate(Duration::from_secs(20)), Some(0));
    }

    fn damaged_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.data())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("store.damaged-"))
            })
            .collect()
    }
}

fn indicator_ids(app: &TestApp) -> HashSet<String> {
    app.received()
        .into_iter()
        .filter(|(suffix, _)| suffix == "indicator")
        .filter_map(|(_, body)| {
            let v: Value = serde_json::from_str(&body).ok()?;
            Some(v["id"].as_str()?.to_string())
        })
        .collect()
}

/// Starts Threat Bus, a subscriber and the bridge on the damaged store, and checks that
/// it was moved aside, reported, and that every queued indicator arrives.
fn recovers_from(damage: impl FnOnce(&Path)) {
    let mut world = World::new();
    world.queue_with_threatbus_away();
    damage(&world.data().join("store"));

    let bus = ThreatBus::start();
    let app = TestApp::subscribe(bus.manage_port, &["stix2/indicator"]);
    let mut bridge = Bridge::start(world.env(bus.manage_port));
    bridge.wait_healthy(WAIT);
    let wanted: HashSet<String> = world.ids.iter().cloned().collect();
    bridge.until("every undelivered indicator at Threat Bus", WAIT, || {
        indicator_ids(&app).is_superset(&wanted)
    });
    let log = bridge.log_text();
    // Shown with --nocapture: which check found the damage.
    for line in log.lines().filter(|l| l.contains("DAMAGED STORE")) {
        eprintln!("{line}");
    }
    assert!(
        log.contains("DAMAGED STORE"),
        "the damage is reported:\n{}",
        bridge.log_tail(40)
    );
    assert_eq!(
        log.matches("DAMAGED STORE").count(),
        1,
        "reported once, at the start"
    );
    let damaged = world.damaged_dirs();
    assert_eq!(damaged.len(), 1, "the damaged store is kept: {damaged:?}");
    assert!(damaged[0].is_dir());
    // Healthy again: a fresh store, drained by confirmed deliveries.
    bridge.until("the fresh store drained", WAIT, || {
        bridge.queued("indicators") == 0
    });
}

fn store_db(store: &Path) -> PathBuf {
    store.join("db")
}

#[test]
fn a_store_cut_to_half_is_rebuilt_and_every_indicator_delivered() {
    recovers_from(|store| {
        let db = store_db(store);
        let len = std::fs::metadata(&db).unwrap().len();
        let file = OpenOptions::new().write(true).open(&db).unwrap();
        file.set_len(len / 2).unwrap();
        file.sync_all().unwrap();
    });
}

#[test]
fn a_store_with_garbled_blocks_is_rebuilt_and_every_indicator_delivered() {
    recovers_from(|store| {
        let db = store_db(store);
        let len = std::fs::metadata(&db).unwrap().len();
        let mut file = OpenOptions::new().write(true).open(&db).unwrap();
        // Scattered 4 KiB blocks over the whole file, the first and the last included.
        let mut noise = 0x9e37_79b9_u32;
        let blocks = len / 4096;
        for i in 0..=8 {
            let block = blocks * i / 8;
            let garbage: Vec<u8> = (0..4096)
                .map(|_| {
                    noise ^= noise << 13;
                    noise ^= noise >> 17;
                    noise ^= noise << 5;
                    noise as u8
                })
                .collect();
            file.seek(SeekFrom::Start(
                (block * 4096).min(len.saturating_sub(4096)),
            ))
            .unwrap();
            file.write_all(&garbage).unwrap();
        }
        file.sync_all().unwrap();
    });
}

#[test]
fn a_store_with_files_deleted_is_rebuilt_and_every_indicator_delivered() {
    recovers_from(|store| {
        // sled keeps its log in `db` and snapshots in `snap.*`; `conf` stays.
        for entry in std::fs::read_dir(store).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name == "db" || name.starts_with("snap.") {
                std::fs::remove_file(&path).unwrap();
            }
        }
    });
}

#[test]
fn on_damaged_store_stop_exits_1_with_what_to_do() {
    let mut world = World::new();
    world.queue_with_threatbus_away();
    let db = store_db(&world.data().join("store"));
    let len = std::fs::metadata(&db).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&db)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let env = world
        .env(unused_port())
        .set("BRIDGE_ON_DAMAGED_STORE", "stop");
    let mut bridge = Bridge::start(env);
    let deadline = std::time::Instant::now() + WAIT;
    while bridge.running() {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            bridge.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The exit status was reaped by `running`; the child handle keeps it.
    assert_eq!(bridge.terminate(Duration::from_secs(1)), Some(1));
    let log = bridge.log_text();
    assert!(log.contains("is damaged"), "{log}");
    assert!(log.contains("move it aside"), "{log}");
    assert!(log.contains("on_damaged_store: rebuild"), "{log}");
    assert!(world.damaged_dirs().is_empty(), "stop touches nothing");
    assert!(world.data().join("store").join("db").exists());
}

#[test]
fn clean_restarts_and_kill_9_are_not_damage() {
    let mut world = World::new();
    let bus = ThreatBus::start();
    let app = TestApp::subscribe(bus.manage_port, &["stix2/indicator"]);
    let mut bridge = Bridge::start(world.env(bus.manage_port));
    // kill -9 while indicators are being read and delivered, a few times over.
    let seed = std::process::id() as u64;
    for round in 0..4u64 {
        world.append(150);
        let pause = 50 + (seed.wrapping_mul(round + 7) % 700);
        std::thread::sleep(Duration::from_millis(pause));
        bridge.restart();
    }
    // And clean stops and starts.
    for _ in 0..2 {
        bridge.wait_subscribed(WAIT);
        assert_eq!(bridge.terminate(Duration::from_secs(20)), Some(0));
        bridge = Bridge::start(world.env(bus.manage_port));
    }
    let wanted: HashSet<String> = world.ids.iter().cloned().collect();
    bridge.until("every indicator at Threat Bus", WAIT, || {
        indicator_ids(&app).is_superset(&wanted)
    });
    let log = bridge.log_text();
    assert!(!log.contains("DAMAGED STORE"), "{}", bridge.log_tail(60));
    assert!(world.damaged_dirs().is_empty());
}
