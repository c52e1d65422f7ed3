//! The command line as an operator uses it: `inspect-queue` on an empty store, a filled one
//! (with dead letters) and against a running daemon; maintenance commands; exit codes.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use opencti_threatbus::store::{Queue, Store, StoreOptions};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_opencti-threatbus");

fn cli(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .unwrap()
}

fn inspect_json(dir: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "inspect-queue",
        "--json",
        "--data-dir",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = cli(&args);
    assert!(
        out.status.success(),
        "inspect-queue failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn queue<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == name)
        .unwrap()
}

fn new_store(dir: &Path) -> Store {
    Store::open(dir, &StoreOptions::default()).unwrap()
}

#[test]
fn inspect_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    new_store(dir.path()).close().unwrap();
    let report = inspect_json(dir.path(), &[]);
    assert_eq!(report["source"], "store");
    assert_eq!(report["stream_position"], Value::Null);
    for name in ["indicators", "sightings", "dead"] {
        assert_eq!(queue(&report, name)["count"], 0, "{name}");
        assert_eq!(queue(&report, name)["oldest_age_ms"], Value::Null);
    }
    assert_eq!(report["items"].as_array().unwrap().len(), 0);

    let out = cli(&["inspect-queue", "--data-dir", dir.path().to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert!(
        text.contains("Stream position: none (first start)"),
        "{text}"
    );
    assert!(text.contains("read from the stopped store"), "{text}");
}

fn fill(store: &Store) {
    let indicators = (0..3)
        .map(|i| format!(r#"{{"type":"indicator","id":"indicator--{i}","pattern":"[ipv4-addr:value = '10.0.0.{i}']"}}"#).into_bytes())
        .collect();
    store
        .enqueue(Queue::Indicators, indicators, Some("1709287215731-0"))
        .unwrap()
        .wait_blocking()
        .unwrap();
    let sightings = (0..2)
        .map(|i| {
            format!(
                r#"{{"type":"sighting","id":"sighting--{i}","sighting_of_ref":"indicator--0"}}"#
            )
            .into_bytes()
        })
        .collect();
    store
        .enqueue(Queue::Sightings, sightings, None)
        .unwrap()
        .wait_blocking()
        .unwrap();
    store
        .reschedule(
            Queue::Indicators,
            0,
            u64::MAX / 2,
            "echo not seen within 10s",
        )
        .unwrap();
    assert!(store
        .dead_letter(Queue::Sightings, 1, "OpenCTI: Element not found")
        .unwrap());
    store
        .park(
            Queue::Sightings,
            b"not json at all".to_vec(),
            "not a STIX 2.1 sighting".into(),
        )
        .unwrap()
        .wait_blocking()
        .unwrap();
    store.flush().unwrap();
}

#[test]
fn inspect_a_filled_store_with_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    fill(&store);
    store.close().unwrap();
    drop(store);

    let report = inspect_json(dir.path(), &[]);
    assert_eq!(report["stream_position"], "1709287215731-0");
    assert_eq!(queue(&report, "indicators")["count"], 3);
    assert_eq!(queue(&report, "indicators")["retrying"], 1);
    assert_eq!(queue(&report, "sightings")["count"], 1);
    assert_eq!(queue(&report, "dead")["count"], 2);
    let items = report["items"].as_array().unwrap();
    assert_eq!(items.len(), 3 + 1 + 2);
    let first = &items[0];
    assert_eq!(first["queue"], "indicators");
    assert_eq!(first["attempts"], 1);
    assert_eq!(first["last_error"], "echo not seen within 10s");
    assert!(first["next_attempt_in_ms"].as_u64().unwrap() > 0);
    assert_eq!(
        first["summary"],
        "indicator--0 [ipv4-addr:value = '10.0.0.0']"
    );
    let dead: Vec<&Value> = items.iter().filter(|i| i["queue"] == "dead").collect();
    assert_eq!(dead[0]["dead_reason"], "OpenCTI: Element not found");
    assert_eq!(dead[0]["origin"], "sightings #1");
    assert_eq!(dead[1]["origin"], "sightings (on arrival)");

    // --queue and --limit narrow the listing, not the counts.
    let report = inspect_json(dir.path(), &["--queue", "indicators", "--limit", "2"]);
    let items = report["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert!(items.iter().all(|i| i["queue"] == "indicators"));
    assert_eq!(queue(&report, "dead")["count"], 2);

    let out = cli(&["inspect-queue", "--data-dir", dir.path().to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("reason: OpenCTI: Element not found"),
        "{text}"
    );
    assert!(
        text.contains("last error: echo not seen within 10s"),
        "{text}"
    );
}

#[test]
fn requeue_and_purge_dead_letters_offline() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    fill(&store);
    drop(store);
    let d = dir.path().to_str().unwrap();

    let out = cli(&["purge-dead", "--data-dir", d]);
    assert_eq!(out.status.code(), Some(2), "purging everything needs --all");

    let out = cli(&["requeue-dead", "--data-dir", d, "--id", "0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "requeued 1 dead letter(s)\n"
    );
    let report = inspect_json(dir.path(), &[]);
    assert_eq!(queue(&report, "sightings")["count"], 2);
    assert_eq!(queue(&report, "dead")["count"], 1);

    let out = cli(&["purge-dead", "--data-dir", d, "--all"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "purged 1 dead letter(s)\n"
    );
    assert_eq!(queue(&inspect_json(dir.path(), &[]), "dead")["count"], 0);
}

#[test]
fn a_store_in_use_is_reported_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let _held = new_store(dir.path());
    let out = cli(&["inspect-queue", "--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another process"), "{err}");
}

#[test]
fn a_store_from_a_newer_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    new_store(dir.path()).close().unwrap();
    {
        // Layout from migrations/0001-initial.md: the format version key in the outbox tree.
        // sled lets go of its lock a moment after the drop (sled#1289): wait for it.
        let deadline = Instant::now() + Duration::from_secs(5);
        let db = loop {
            match sled::open(dir.path().join("store")) {
                Ok(db) => break db,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        };
        let tree = db.open_tree("outbox").unwrap();
        tree.insert(b"\x00format_version", &99u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let err = Store::open(dir.path(), &StoreOptions::default())
        .err()
        .expect("must be refused");
    assert!(
        matches!(
            err,
            opencti_threatbus::store::StoreError::NewerFormat {
                found: 99,
                supported: opencti_threatbus::store::CURRENT_FORMAT,
                ..
            }
        ),
        "{err}"
    );
    let out = cli(&["inspect-queue", "--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("format version 99")
            && err.contains(&format!(
                "supports up to version {}",
                opencti_threatbus::store::CURRENT_FORMAT
            )),
        "{err}"
    );
}

#[test]
fn inspect_without_a_store_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = cli(&["inspect-queue", "--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("there is no store"));
}

#[test]
fn bad_configuration_exits_2_naming_the_key() {
    let out = cli(&["run", "--config", "/nonexistent/config.yml"]);
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN)
        .arg("run")
        .env_clear()
        .envs(daemon_env(Path::new("/tmp/unused")))
        .env("CONNECTOR_ID", "not-a-uuid")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("connector.id") && err.contains("CONNECTOR_ID"),
        "{err}"
    );
    assert!(!err.contains("s3cr3t-token"), "the token leaked: {err}");
    assert_eq!(cli(&["no-such-command"]).status.code(), Some(2));
}

/// A complete configuration through the environment, pointing at nothing that listens.
fn daemon_env(data_dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("OPENCTI_URL", "http://127.0.0.1:9".into()),
        ("OPENCTI_TOKEN", "s3cr3t-token".into()),
        (
            "CONNECTOR_ID",
            "4ef4ea3a-2b5f-4b7c-9d43-3f4f2b1c9a10".into(),
        ),
        ("CONNECTOR_TYPE", "STREAM".into()),
        ("CONNECTOR_NAME", "Threat Bus".into()),
        ("CONNECTOR_SCOPE", "threatbus".into()),
        ("CONNECTOR_CONFIDENCE_LEVEL", "80".into()),
        ("CONNECTOR_LOG_LEVEL", "info".into()),
        ("CONNECTOR_ENTITY_NAME", "Threat Bus".into()),
        ("CONNECTOR_ENTITY_DESCRIPTION", "test".into()),
        ("THREATBUS_ZMQ_HOST", "127.0.0.1".into()),
        ("THREATBUS_ZMQ_PORT", "9".into()),
        ("BRIDGE_DATA_DIR", data_dir.to_str().unwrap().into()),
    ]
}

fn start_daemon(dir: &Path, extra_env: &[(&str, String)]) -> Child {
    Command::new(BIN)
        .arg("run")
        .env_clear()
        .envs(daemon_env(dir))
        .envs(extra_env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::null()) // never read: a full pipe would block the daemon
        .spawn()
        .unwrap()
}

fn wait_healthy(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = cli(&["health", "--data-dir", dir.to_str().unwrap()]);
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "daemon never became healthy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn inspect_and_maintain_through_a_running_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    fill(&store);
    drop(store);
    let d = dir.path().to_str().unwrap();
    assert_eq!(
        cli(&["health", "--data-dir", d]).status.code(),
        Some(1),
        "no daemon yet"
    );

    let mut daemon = start_daemon(dir.path(), &[]);
    wait_healthy(dir.path());
    let report = inspect_json(dir.path(), &[]);
    assert_eq!(report["source"], "daemon");
    assert_eq!(report["stream_position"], "1709287215731-0");
    assert_eq!(queue(&report, "dead")["count"], 2);

    let out = cli(&[
        "requeue-dead",
        "--data-dir",
        d,
        "--queue",
        "sightings",
        "--id",
        "0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "requeued 1 dead letter(s)\n"
    );
    assert_eq!(queue(&inspect_json(dir.path(), &[]), "dead")["count"], 1);

    // SIGTERM: flush, exit 0 within 10 s (SPEC §2.10); the store is then readable offline.
    let started = Instant::now();
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let status = wait_with_timeout(&mut daemon, Duration::from_secs(10));
    assert_eq!(
        status,
        Some(0),
        "daemon did not exit 0 within 10 s of SIGTERM"
    );
    eprintln!("daemon stopped {:?} after SIGTERM", started.elapsed());
    assert!(
        !dir.path().join("admin.sock").exists(),
        "socket left behind"
    );
    let report = inspect_json(dir.path(), &[]);
    assert_eq!(report["source"], "store");
    assert_eq!(queue(&report, "dead")["count"], 1);
}

fn wait_with_timeout(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    None
}

#[test]
fn the_daemon_serves_prometheus_metrics_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    fill(&store);
    drop(store);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut daemon = start_daemon(
        dir.path(),
        &[
            ("CONNECTOR_EXPOSE_METRICS", "true".to_string()),
            ("CONNECTOR_METRICS_PORT", port.to_string()),
        ],
    );
    wait_healthy(dir.path());
    let body = http_get(port, "/metrics");
    // What Prometheus sends: it prefers OpenMetrics, and gets it.
    let openmetrics = http_get_accepting(
        port,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
    );
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert_eq!(
        wait_with_timeout(&mut daemon, Duration::from_secs(10)),
        Some(0)
    );
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(
        body.contains("opencti_threatbus_queue_depth{queue=\"indicators\"} 3"),
        "{body}"
    );
    assert!(
        body.contains("opencti_threatbus_queue_depth{queue=\"dead\"} 2"),
        "{body}"
    );
    assert!(
        body.contains("# TYPE opencti_threatbus_delivered_total counter"),
        "{body}"
    );
    assert!(
        body.contains("opencti_threatbus_stream_lag_seconds"),
        "{body}"
    );
    assert!(
        body.contains("\r\nContent-Type: text/plain; version=0.0.4"),
        "{body}"
    );

    assert!(openmetrics.starts_with("HTTP/1.1 200 OK"), "{openmetrics}");
    assert!(
        openmetrics.contains("\r\nContent-Type: application/openmetrics-text; version=1.0.0"),
        "{openmetrics}"
    );
    // The same samples; only the family's `# TYPE` line drops `_total`, as OpenMetrics wants.
    for line in [
        "opencti_threatbus_queue_depth{queue=\"indicators\"} 3",
        "opencti_threatbus_queue_depth{queue=\"dead\"} 2",
        "# TYPE opencti_threatbus_delivered counter",
        "opencti_threatbus_delivered_total{queue=\"indicators\"} 0",
    ] {
        assert!(openmetrics.contains(line), "{line:?} in {openmetrics}");
    }
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
}

fn http_get(port: u16, path: &str) -> String {
    http_get_accepting(port, path, None)
}

fn http_get_accepting(port: u16, path: &str, accept: Option<&str>) -> String {
    use std::io::{Read, Write};
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            write!(
                stream,
                "GET {path} HTTP/1.1\r\nHost: localhost\r\n{accept}\r\n"
            )
            .unwrap();
            let mut body = String::new();
            stream.read_to_string(&mut body).unwrap();
            return body;
        }
        assert!(Instant::now() < deadline, "metrics port never opened");
        std::thread::sleep(Duration::from_millis(50));
    }
}
