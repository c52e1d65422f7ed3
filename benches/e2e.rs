//! OpenCTI → Threat Bus end to end, against the real Threat Bus: is the bridge ever the
//! bottleneck, and what latency does an indicator see at a steady 500 events/s?
//!
//! `cargo bench --bench e2e` prints, in the same run:
//! 1. **baseline** (throughput): a plain Rust Threat Bus app — an XPUB with SNDHWM=0 that
//!    publishes only once Threat Bus's `\x01stix2/` subscription arrived — itself subscribed
//!    to `stix2/indicator`, publishes N indicators at once: the bridge's exact frames for the
//!    same OpenCTI events. A second app subscribed to `stix2/indicator` counts them. Threat
//!    Bus sends two copies of each (the echo and the counting app's), as for the bridge.
//! 2. **bridge** (throughput): the bridge binary (the release build under `cargo bench`),
//!    started with a stored position just before N indicator `create` events (detection
//!    on) retained by the OpenCTI double, and the same counting app; then the time until
//!    its outbox is empty (every echo confirmed).
//!    Baseline and bridge alternate for [`ROUNDS`] rounds, each run on a fresh Threat Bus;
//!    the headline is the median of the per-round ratios (the machine is shared and noisy).
//!    One more round, a diagnostic, runs with Threat Bus's threads on one CPU and this
//!    process, its apps and the bridge on another: the bridge cannot take CPU time (or
//!    caches) from Threat Bus there.
//! 3. **latency** at steady rates ([`PACES`]: 500/s, and 200/s where Threat Bus is far from
//!    saturation): the plain app publishing at that rate, then indicator creates appended
//!    to the double at that rate while a bridge runs; send or append → first arrival at
//!    the counting app. A second SSE client on the double measures the double's own share,
//!    and the bridge's CPU time and thread switches per indicator are read from `/proc`.
//!
//! `cargo bench --bench e2e -- latency` runs only the 500/s latency run (section 3), and
//! `E2E_PERF=<file>` records the bridge's CPU profile during it (`perf record --call-graph
//! dwarf` at 499 Hz or `E2E_PERF_HZ`, which itself costs the bridge ~20 % more CPU; read it
//! with `perf report -i <file>`): where the CPU time per indicator goes.
//! `E2E_BRIDGE_ENV="KEY=value …"` adds to or overrides the bridge's environment
//! ([`BRIDGE_SETTINGS`]) for an experiment.
//!
//! Rates are "first → last arrival at the counting app" for both the baseline and the
//! bridge (the steady relay rate, start-up excluded), and also "from the start" (baseline:
//! first send; bridge: process spawn). Figures, not assertions: Threat Bus (Python, one
//! core) is the expected bottleneck at ~600–1000 msg/s.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use opencti_threatbus::config::Secret;
use opencti_threatbus::opencti::{StreamClient, StreamConfig};
use opencti_threatbus::stix::{map_stream_value, StreamAction};
use opencti_threatbus::store::{Store, StoreOptions};
use serde_json::{json, Value};
use support::bridge::{Bridge, BridgeEnv, BIN, TOKEN};
use support::opencti::{tlp_marking, Indicator, OpenCti};
use support::opencti_graphql::GraphqlDouble;
use support::threatbus::{manage_request, raw_subscribe, sample_indicator, ThreatBus};

/// Indicators per throughput run (baseline and bridge alike).
const N: usize = 5_000;
/// Throughput rounds (baseline, then bridge, each on a fresh Threat Bus).
const ROUNDS: usize = 3;
/// The latency runs: messages per second, and how many.
const PACES: [(u64, usize); 2] = [(500, 10_000), (200, 2_000)];
/// The most messages of any latency run.
const MAX_PACED: usize = 10_000;
/// Longest wait for any one run to complete.
const WAIT: Duration = Duration::from_secs(120);
/// Target: the bridge relays at least this share of what Threat Bus relays for a plain app.
const TARGET_RATIO: f64 = 0.90;

/// Bridge settings on top of `BridgeEnv`'s (which shortens retries for the tests): the
/// production defaults for everything that paces forwarding, and `info` logging.
const BRIDGE_SETTINGS: &[(&str, &str)] = &[
    ("CONNECTOR_LOG_LEVEL", "info"),
    ("BRIDGE_INFLIGHT_WINDOW", "500"),
    ("BRIDGE_CONFIRM_TIMEOUT_MS", "10000"),
    ("BRIDGE_RETRY_INITIAL_MS", "500"),
    ("BRIDGE_RETRY_MAX_MS", "60000"),
    ("BRIDGE_FLUSH_INTERVAL_MS", "10"),
    ("BRIDGE_FLUSH_MAX_ITEMS", "1000"),
];

/// [`BRIDGE_SETTINGS`], then `E2E_BRIDGE_ENV` (`KEY=value` pairs separated by spaces) on
/// top: an experiment with a setting needs no rebuild, and the header line shows it.
fn bridge_settings() -> Vec<(String, String)> {
    let extra = std::env::var("E2E_BRIDGE_ENV").unwrap_or_default();
    let mut settings: Vec<(String, String)> = BRIDGE_SETTINGS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for pair in extra.split_whitespace() {
        let (key, value) = pair
            .split_once('=')
            .expect("E2E_BRIDGE_ENV holds KEY=value pairs separated by spaces");
        settings.retain(|(k, _)| k != key);
        settings.push((key.to_string(), value.to_string()));
    }
    settings
}

fn main() {
    let release = BIN.contains("/release/") && !cfg!(debug_assertions);
    println!("=== opencti-threatbus end-to-end benchmark: OpenCTI double → bridge → real Threat Bus → app ===");
    println!("command:        cargo bench --bench e2e");
    println!(
        "bridge binary:  {BIN} ({})",
        if release {
            "release build"
        } else {
            "NOT a release build: run it with cargo bench"
        }
    );
    println!(
        "Threat Bus:     {} -c {} (inmem backbone, zmq app plugin), a fresh process per run",
        support::threatbus::threatbus_bin().display(),
        support::threatbus::threatbus_config().display()
    );
    println!(
        "machine:        {} CPUs, load average {} at the start (shared: figures are noisy)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    let paces: Vec<String> = PACES
        .iter()
        .map(|(rate, count)| format!("{count} at {rate}/s"))
        .collect();
    println!(
        "N:              {N} indicators per throughput run, {ROUNDS} rounds (+1 pinned); latency runs: {}",
        paces.join(", ")
    );
    let settings: Vec<String> = bridge_settings()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "bridge env:     {} (BRIDGE_DATA_DIR: a temp dir per run)",
        settings.join(" ")
    );

    // The OpenCTI double, with N indicator creates after a seed event the bridge resumes at.
    let opencti = OpenCti::start_with_graphql(GraphqlDouble::new(TOKEN));
    let seed = opencti.append_raw(
        "create",
        &json!({"version": "4", "type": "create", "data": tlp_marking("TLP:CLEAR", 1_700_000_000_000), "origin": {}})
            .to_string(),
    );
    let batch: Vec<Indicator> = (0..N).map(|i| Indicator::ipv4(&ip(i))).collect();
    for indicator in &batch {
        opencti.append_indicator_create(indicator);
    }
    let burst = Payload::of(&opencti, &batch);
    // The baseline's paced run gets indicators of its own, same shape (a scratch double).
    let scratch = OpenCti::start();
    let paced_batch: Vec<Indicator> = (0..MAX_PACED)
        .map(|i| Indicator::ipv4(&ip(1_000_000 + i)))
        .collect();
    for indicator in &paced_batch {
        scratch.append_indicator_create(indicator);
    }
    let paced_payload = Payload::of(&scratch, &paced_batch);
    drop(scratch);
    println!(
        "payload:        the bridge's own frames for these create events (mapped by the crate's map_stream_value), {} bytes on average",
        burst.frames.iter().map(String::len).sum::<usize>() / N
    );
    println!();

    if std::env::args().any(|a| a == "latency") {
        println!("--- 3. latency at 500/s only (`-- latency`) ---");
        let (rate, count) = PACES[0];
        let bridge = bridge_paced(&opencti, rate, count, N);
        println!(
            "bridge at {rate}/s: CPU {:.0} µs and {:.1} thread switches per indicator, p99 {}",
            bridge.cpu_per_message.as_secs_f64() * 1e6,
            bridge.switches_per_message,
            ms(bridge.latency.percentiles.p99)
        );
        return;
    }
    println!("--- 1 + 2. throughput: {N} indicators, baseline then bridge, {ROUNDS} rounds ---");
    let mut rounds = Vec::new();
    for round in 1..=ROUNDS {
        rounds.push(throughput_round(
            &format!("round {round}"),
            &burst,
            &opencti,
            &seed,
            None,
        ));
    }
    // Diagnostic: the same with Threat Bus alone on one CPU, and this process, its apps and
    // the bridge on the other, so that the bridge cannot take CPU time from Threat Bus.
    // (CPU 0 and 1: any machine with two CPUs has them.)
    let pinned = (std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2)
        .then(|| {
            let pinned = pin_threads(std::process::id(), 1)
                .then(|| throughput_round("pinned round", &burst, &opencti, &seed, Some(0)));
            unpin_threads(std::process::id());
            pinned
        })
        .flatten();
    println!();
    println!("--- 3. latency at steady rates, fresh Threat Bus each run ---");
    let mut latencies = Vec::new();
    let mut next_ip = N;
    for (rate, count) in PACES {
        let baseline = baseline_paced(&paced_payload, rate, count);
        let bridge = bridge_paced(&opencti, rate, count, next_ip);
        next_ip += count;
        latencies.push((rate, count, baseline, bridge));
    }
    println!();

    summary(&rounds, pinned.as_ref(), &latencies);
}

fn summary(
    rounds: &[(BaselineRun, BridgeRun)],
    pinned: Option<&(BaselineRun, BridgeRun)>,
    latencies: &[(u64, usize, Latency, BridgeLatency)],
) {
    let row = |what: &str, values: Vec<f64>, precision: usize| {
        let cells: String = values
            .iter()
            .map(|v| format!(" {v:>8.precision$}"))
            .collect();
        println!(
            "{what:<56}{cells}  {:>8.precision$}",
            median(values.clone())
        );
    };
    println!("=== summary ===");
    let header: String = (1..=rounds.len())
        .map(|r| format!(" {:>8}", format!("round {r}")))
        .collect();
    let title = format!("throughput, msg/s (first → last arrival, N = {N})");
    println!("{title:<56}{header}  {:>8}", "median");
    row(
        "baseline: plain app → Threat Bus → counting app",
        rounds.iter().map(|(b, _)| b.app.rate()).collect(),
        0,
    );
    row(
        "baseline: plain app → Threat Bus → its own echo",
        rounds.iter().map(|(b, _)| b.echo.rate()).collect(),
        0,
    );
    row(
        "bridge: OpenCTI double → bridge → TB → counting app",
        rounds.iter().map(|(_, w)| w.app.rate()).collect(),
        0,
    );
    row(
        "bridge: spawn → outbox empty (all echoes confirmed)",
        rounds
            .iter()
            .map(|(_, w)| N as f64 / w.drained.as_secs_f64())
            .collect(),
        0,
    );
    let ratios: Vec<f64> = rounds
        .iter()
        .map(|(b, w)| w.app.rate() / b.app.rate())
        .collect();
    row("bridge / baseline (same round)", ratios.clone(), 2);
    row(
        "CPU % of one core: Threat Bus, baseline run",
        rounds.iter().map(|(b, _)| b.bus_cpu).collect(),
        0,
    );
    row(
        "CPU % of one core: Threat Bus, bridge run",
        rounds.iter().map(|(_, w)| w.bus_cpu).collect(),
        0,
    );
    row(
        "CPU % of one core: bridge",
        rounds.iter().map(|(_, w)| w.bridge_cpu).collect(),
        0,
    );
    row(
        "Threat Bus CPU ms per indicator, baseline run",
        rounds
            .iter()
            .map(|(b, _)| b.bus_cost.as_secs_f64() * 1e3)
            .collect(),
        2,
    );
    row(
        "Threat Bus CPU ms per indicator, bridge run",
        rounds
            .iter()
            .map(|(_, w)| w.bus_cost.as_secs_f64() * 1e3)
            .collect(),
        2,
    );
    let ratio = median(ratios);
    println!(
        "bridge / baseline, median: {ratio:.2}   target ≥ {TARGET_RATIO:.2}: {}",
        if ratio >= TARGET_RATIO {
            "met"
        } else {
            "NOT met"
        }
    );
    if let Some((b, w)) = pinned {
        println!(
            "diagnostic, Threat Bus alone on CPU 0 (bridge, apps on CPU 1): baseline {:.0}, bridge {:.0} msg/s, bridge / baseline {:.2}; Threat Bus CPU ms per indicator {:.2} / {:.2}",
            b.app.rate(),
            w.app.rate(),
            w.app.rate() / b.app.rate(),
            b.bus_cost.as_secs_f64() * 1e3,
            w.bus_cost.as_secs_f64() * 1e3
        );
    }
    println!("latency, to the first arrival at the counting app:");
    for (rate, count, baseline, bridge) in latencies {
        println!("  at {rate}/s, {count} messages:");
        baseline.print_row("    baseline: plain app send → counting app");
        bridge
            .latency
            .print_row("    bridge: append to the double → counting app");
        bridge
            .double
            .print("      of which double → a plain SSE client");
        println!(
            "    bridge: {:.0}% of one core, {:.0} µs CPU and {:.0} thread switches per indicator; Threat Bus {:.0}%",
            bridge.bridge_cpu,
            bridge.cpu_per_message.as_secs_f64() * 1e6,
            bridge.switches_per_message,
            bridge.bus_cpu
        );
    }
}

/// Frames as the bridge publishes them, and their STIX ids in stream order.
struct Payload {
    frames: Vec<String>,
    ids: Vec<String>,
}

impl Payload {
    fn of(opencti: &OpenCti, batch: &[Indicator]) -> Payload {
        Payload {
            frames: batch.iter().map(|i| bridge_frame(opencti, i)).collect(),
            ids: batch.iter().map(|i| i.stix_id.clone()).collect(),
        }
    }
}

/// One baseline run and one bridge run; with `pin_bus`, Threat Bus's threads go to that CPU.
fn throughput_round(
    label: &str,
    burst: &Payload,
    opencti: &OpenCti,
    seed: &str,
    pin_bus: Option<usize>,
) -> (BaselineRun, BridgeRun) {
    let pinning = match pin_bus {
        Some(cpu) => format!("; Threat Bus pinned to CPU {cpu}, the rest to CPU 1"),
        None => String::new(),
    };
    println!(
        "{label}, baseline (plain app, subscribed itself, publishes all {N} at once{pinning}):"
    );
    let baseline = baseline_burst(burst, pin_bus);
    println!(
        "{label}, bridge ({N} creates retained by the double, position just before them{pinning}):"
    );
    let bridge = bridge_burst(opencti, seed, &burst.ids, pin_bus);
    (baseline, bridge)
}

// ----- the baseline: a plain app -----

struct BaselineRun {
    app: Flow,
    echo: Flow,
    bus_cpu: f64,
    /// Threat Bus's CPU time per relayed indicator.
    bus_cost: Duration,
}

/// Threat Bus and two apps: the counting app, and the publisher (subscribed too).
fn plain_apps(pin_bus: Option<usize>) -> (ThreatBus, App, App, zmq::Socket) {
    let bus = start_bus(pin_bus);
    let counter = App::subscribe(bus.manage_port, &["stix2/indicator"]);
    let publisher = App::subscribe(bus.manage_port, &["stix2/indicator"]);
    let xpub = publisher.xpub();
    probe(&xpub, &[&counter, &publisher]);
    (bus, counter, publisher, xpub)
}

fn baseline_burst(burst: &Payload, pin_bus: Option<usize>) -> BaselineRun {
    let (bus, counter, publisher, xpub) = plain_apps(pin_bus);
    let cpu = Cpu::start(bus.pid());
    let started = Instant::now();
    for frame in &burst.frames {
        xpub.send(frame.as_bytes(), 0).expect("send");
    }
    let sent = started.elapsed();
    let arrived = counter.wait_for(N, WAIT) && publisher.wait_for(N, WAIT);
    assert!(
        arrived,
        "baseline: {} at the app, {} echoes of {N} after {WAIT:?}\n{}",
        counter.count(),
        publisher.count(),
        bus.log_tail(40)
    );
    let (bus_cpu, bus_cost) = (cpu.percent(), per_message(cpu.seconds()));
    std::thread::sleep(Duration::from_millis(200));
    let app = Flow::of(&counter.take(), &burst.ids);
    let echo = Flow::of(&publisher.take(), &burst.ids);
    println!(
        "  {N} frames written in {} (SNDHWM=0: queued client-side)",
        ms(sent)
    );
    app.print("  counting app", started, "first send");
    echo.print("  own echo", started, "first send");
    println!("  CPU, first send → last arrival: Threat Bus {bus_cpu:.0}% of one core");
    BaselineRun {
        app,
        echo,
        bus_cpu,
        bus_cost,
    }
}

fn baseline_paced(payload: &Payload, rate: u64, count: usize) -> Latency {
    println!(
        "baseline at {rate}/s: the plain app publishes {count} other frames of the same shape:"
    );
    let (_bus, counter, publisher, xpub) = plain_apps(None);
    let stamps = paced(rate, count, |i| {
        xpub.send(payload.frames[i].as_bytes(), 0).expect("send");
    });
    let arrived = counter.wait_for(count, WAIT) && publisher.wait_for(count, WAIT);
    assert!(arrived, "baseline, paced: {} at the app", counter.count());
    std::thread::sleep(Duration::from_millis(200));
    let latency = Latency::of(&counter.take(), &payload.ids[..count], &stamps);
    latency.print_detail("  send → arrival at the counting app");
    latency
}

// ----- the bridge -----

struct BridgeRun {
    app: Flow,
    drained: Duration,
    bus_cpu: f64,
    bus_cost: Duration,
    bridge_cpu: f64,
}

struct BridgeLatency {
    latency: Latency,
    double: Percentiles,
    bus_cpu: f64,
    bridge_cpu: f64,
    cpu_per_message: Duration,
    switches_per_message: f64,
}

/// Threat Bus and the counting app, its SUB connected.
fn bus_and_counter(pin_bus: Option<usize>) -> (ThreatBus, App) {
    let bus = start_bus(pin_bus);
    let counter = App::subscribe(bus.manage_port, &["stix2/indicator"]);
    probe(&counter.xpub(), &[&counter]);
    (bus, counter)
}

/// The environment of a bridge that has run before: its store holds `position` (as
/// `World::new` in `tests/e2e_indicators.rs`).
fn prepare_bridge(
    opencti: &OpenCti,
    bus: &ThreatBus,
    position: &str,
) -> (tempfile::TempDir, BridgeEnv) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    {
        let store = Store::open(&data, &StoreOptions::default()).expect("store");
        drop(store.set_position(position).expect("position"));
        store.close().expect("close the store");
    }
    let env = bridge_settings().into_iter().fold(
        BridgeEnv::new(&opencti.base_url(), bus.manage_port, &data),
        |env, (k, v)| env.set(&k, v),
    );
    (dir, env)
}

fn bridge_burst(
    opencti: &OpenCti,
    seed: &str,
    ids: &[String],
    pin_bus: Option<usize>,
) -> BridgeRun {
    let (bus, counter) = bus_and_counter(pin_bus);
    let (_dir, env) = prepare_bridge(opencti, &bus, seed);
    let bus_cpu = Cpu::start(bus.pid());
    let started = Instant::now();
    let mut bridge = Bridge::start(env);
    let bridge_cpu = Cpu::start(bridge.pid());
    wait_arrivals(&mut bridge, &counter, N);
    let bus_cost = per_message(bus_cpu.seconds());
    let (bus_cpu, bridge_cpu) = (bus_cpu.percent(), bridge_cpu.percent());
    let drained = wait_drained(&bridge, started);
    std::thread::sleep(Duration::from_millis(200));
    let app = Flow::of(&counter.take(), ids);
    app.print("  counting app", started, "bridge spawn");
    println!(
        "  outbox empty (all {N} confirmed by their echo) {} after the spawn; dead letters: {}",
        ms(drained),
        bridge.queued("dead")
    );
    println!(
        "  CPU, spawn → last arrival: Threat Bus {bus_cpu:.0}%, bridge {bridge_cpu:.0}% of one core"
    );
    stop(&mut bridge);
    BridgeRun {
        app,
        drained,
        bus_cpu,
        bus_cost,
        bridge_cpu,
    }
}

fn bridge_paced(opencti: &OpenCti, rate: u64, count: usize, first_ip: usize) -> BridgeLatency {
    println!(
        "bridge at {rate}/s: {count} indicator creates appended to the double while the bridge runs:"
    );
    println!("  included: the double's append and SSE write (an append wakes the open streams at once through a tokio watch channel; TCP_NODELAY; the 5 s heartbeat plays no part), the bridge (read, events lingering ≤ 5 ms to be committed together, written to the outbox, published), Threat Bus's relay, ZeroMQ to the app");
    let (bus, counter) = bus_and_counter(None);
    let from = opencti.last_event_id().expect("events before");
    let (_dir, env) = prepare_bridge(opencti, &bus, &from);
    let mut bridge = Bridge::start(env);
    // Warm up: the bridge is subscribed and forwarding once one indicator went through.
    opencti.append_indicator_create(&Indicator::ipv4("192.0.2.1"));
    wait_arrivals(&mut bridge, &counter, 1);
    counter.take();

    let batch: Vec<Indicator> = (first_ip..first_ip + count)
        .map(|i| Indicator::ipv4(&ip(i)))
        .collect();
    let ids: Vec<String> = batch.iter().map(|i| i.stix_id.clone()).collect();
    // A second SSE client on the same live stream: the double's own share of the latency.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let from = opencti.last_event_id().expect("events before");
    let observer = runtime.spawn(observe(opencti.base_url(), from, count));
    assert!(
        opencti.wait_open_connections(2, Duration::from_secs(10)),
        "the SSE observer did not connect"
    );

    let pid = bridge.pid().expect("the bridge runs");
    let threads = Threads::of(pid);
    let (bus_cpu, bridge_cpu) = (Cpu::start(bus.pid()), Cpu::start(Some(pid)));
    let profiler = std::env::var("E2E_PERF").ok().map(|out| {
        std::process::Command::new("perf")
            .args([
                "record",
                // DWARF unwinding: the release build keeps no frame pointers, so `-g`
                // alone yields stacks one frame deep.
                "--call-graph",
                "dwarf,32768",
                "-F",
                &std::env::var("E2E_PERF_HZ").unwrap_or_else(|_| "499".into()),
                "-o",
                &out,
                "-p",
                &pid.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("perf record (E2E_PERF)")
    });
    let stamps = paced(rate, count, |i| {
        opencti.append_indicator_create(&batch[i]);
    });
    wait_arrivals(&mut bridge, &counter, count);
    if let Some(mut profiler) = profiler {
        // SIGINT: perf writes its file and exits.
        unsafe { libc::kill(profiler.id() as i32, libc::SIGINT) };
        let _ = profiler.wait();
    }
    let (bus_cpu, bridge_cpu) = (bus_cpu.percent(), bridge_cpu.percent());
    let threads = Threads::of(pid).since(&threads);
    let drained = wait_drained(&bridge, stamps[0]);
    std::thread::sleep(Duration::from_millis(200));
    let latency = Latency::of(&counter.take(), &ids, &stamps);
    let seen = runtime
        .block_on(async { tokio::time::timeout(WAIT, observer).await })
        .expect("the SSE observer finished")
        .expect("the SSE observer did not panic");
    let index: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let double = Percentiles::of(
        seen.iter()
            .filter_map(|(at, id)| index.get(id.as_str()).map(|i| *at - stamps[*i]))
            .collect(),
    );
    latency.print_detail("  append → arrival at the counting app");
    double.print("  append → the double's SSE at a plain client");
    println!(
        "  outbox empty {} after the first append; CPU: Threat Bus {bus_cpu:.0}%, bridge {bridge_cpu:.0}% of one core",
        ms(drained)
    );
    println!(
        "  bridge threads (CPU, thread switches per indicator): {}",
        threads.describe(count)
    );
    stop(&mut bridge);
    BridgeLatency {
        latency,
        double,
        bus_cpu,
        bridge_cpu,
        cpu_per_message: threads.cpu() / count as u32,
        switches_per_message: threads.switches() as f64 / count as f64,
    }
}

/// A fresh Threat Bus; with `pin`, all its threads on that CPU (those it starts later
/// inherit it).
fn start_bus(pin: Option<usize>) -> ThreatBus {
    let bus = ThreatBus::start();
    if let (Some(cpu), Some(pid)) = (pin, bus.pid()) {
        assert!(pin_threads(pid, cpu), "pinning Threat Bus to CPU {cpu}");
    }
    bus
}

/// Puts every thread of `pid` on `cpu` alone.
fn pin_threads(pid: u32, cpu: usize) -> bool {
    set_affinity(pid, &[cpu])
}

/// Lets every thread of `pid` run on any CPU again.
fn unpin_threads(pid: u32) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    set_affinity(pid, &(0..cpus).collect::<Vec<_>>());
}

fn set_affinity(pid: u32, cpus: &[usize]) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET stays within it for
    // cpu < CPU_SETSIZE.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    let mut all = true;
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: `set` is a valid cpu_set_t of the size given.
        let done =
            unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        all &= done == 0;
    }
    all
}

/// SIGTERM; the harness SIGKILLs on drop anyway.
fn stop(bridge: &mut Bridge) {
    if bridge.terminate(Duration::from_secs(10)) != Some(0) {
        println!("  (the bridge did not exit cleanly on SIGTERM)");
    }
}

/// Calls `f(i)` for `i` in `0..n` at `rate` per second (catching up when late); returns
/// the instant just before each call.
fn paced(rate: u64, n: usize, mut f: impl FnMut(usize)) -> Vec<Instant> {
    let mut stamps = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let due = started + Duration::from_micros(i as u64 * 1_000_000 / rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        stamps.push(Instant::now());
        f(i);
    }
    stamps
}

/// Follows the double's live stream from `from` and stamps each `create` as it arrives.
async fn observe(base_url: String, from: String, n: usize) -> Vec<(Instant, String)> {
    let config = StreamConfig {
        base_url,
        token: Secret::new(TOKEN),
        live_stream_id: Some("live".into()),
        listen_delete: true,
        no_dependencies: true,
        with_inferences: false,
        ssl_verify: true,
    };
    let client = StreamClient::new(&config).expect("client");
    let mut stream = client.connect(&from, None).await.expect("connect");
    let mut seen = Vec::with_capacity(n);
    while seen.len() < n {
        match stream.next().await {
            Some(Ok(event)) if event.event == "create" => {
                let at = Instant::now();
                let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
                let id = data["data"]["id"].as_str().unwrap_or_default().to_owned();
                seen.push((at, id));
            }
            Some(Ok(_)) => {}
            other => panic!("the observer's stream ended early: {other:?}"),
        }
    }
    seen
}

/// Waits until `n` messages reached `app`; fails early if the bridge exits.
fn wait_arrivals(bridge: &mut Bridge, app: &App, n: usize) {
    let deadline = Instant::now() + WAIT;
    while !app.wait_for(n, Duration::from_millis(500)) {
        assert!(
            bridge.running() && Instant::now() < deadline,
            "{} of {n} at the app; bridge running: {}; log:\n{}",
            app.count(),
            bridge.running(),
            bridge.log_tail(60)
        );
    }
}

/// Polls the bridge's indicator outbox until it is empty; the time since `since`.
fn wait_drained(bridge: &Bridge, since: Instant) -> Duration {
    let deadline = Instant::now() + WAIT;
    loop {
        if bridge.queued("indicators") == 0 {
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the outbox did not drain\n{}",
            bridge.log_tail(60)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ----- a Threat Bus app that stamps arrivals -----

/// A frame as an app received it, and when.
type Arrival = (Instant, Vec<u8>);

/// One subscription with a SUB (RCVHWM=0) read by a thread that stamps each frame.
struct App {
    topic: String,
    manage_port: u16,
    sub_port: u16,
    context: zmq::Context,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl App {
    fn subscribe(manage_port: u16, topics: &[&str]) -> App {
        let reply = raw_subscribe(manage_port, topics, 0);
        let topic = reply["topic"].as_str().expect("p2p topic").to_owned();
        let pub_port = reply["pub_port"].as_u64().expect("pub port");
        let sub_port = u16::try_from(reply["sub_port"].as_u64().expect("sub port")).expect("port");
        let context = zmq::Context::new();
        let sub = context.socket(zmq::SUB).expect("SUB");
        sub.set_linger(0).expect("linger");
        sub.set_rcvhwm(0).expect("rcvhwm");
        sub.set_subscribe(topic.as_bytes()).expect("subscribe");
        sub.connect(&format!("tcp://127.0.0.1:{pub_port}"))
            .expect("connect");
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (arrivals, count, stop) =
                (Arc::clone(&arrivals), Arc::clone(&count), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut batch = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if sub.poll(zmq::POLLIN, 100).expect("poll") == 0 {
                        continue;
                    }
                    while let Ok(frame) = sub.recv_bytes(zmq::DONTWAIT) {
                        batch.push((Instant::now(), frame));
                    }
                    let n = batch.len();
                    arrivals.lock().expect("arrivals").append(&mut batch);
                    count.fetch_add(n, Ordering::Release);
                }
            })
        };
        App {
            topic,
            manage_port,
            sub_port,
            context,
            arrivals,
            count,
            stop,
            reader: Some(reader),
        }
    }

    /// An XPUB to Threat Bus's SUB (SNDHWM=0), once Threat Bus's `stix2/` subscription
    /// arrived on it (slow joiner).
    fn xpub(&self) -> zmq::Socket {
        let xpub = self.context.socket(zmq::XPUB).expect("XPUB");
        xpub.set_linger(1000).expect("linger");
        xpub.set_sndhwm(0).expect("sndhwm");
        xpub.connect(&format!("tcp://127.0.0.1:{}", self.sub_port))
            .expect("connect");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(
                Instant::now() < deadline,
                "Threat Bus did not subscribe on the XPUB"
            );
            if xpub.poll(zmq::POLLIN, 100).expect("poll") > 0
                && xpub.recv_bytes(0).expect("recv") == b"\x01stix2/"
            {
                return xpub;
            }
        }
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.count() < n {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Everything received so far, oldest first; starts counting from zero again.
    fn take(&self) -> Vec<Arrival> {
        let mut arrivals = self.arrivals.lock().expect("arrivals");
        self.count.store(0, Ordering::Release);
        std::mem::take(&mut *arrivals)
    }
}

impl Drop for App {
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

/// Makes sure every app's SUB is connected (receive-side slow joiner): publishes a probe
/// indicator until each got one, then clears what they received.
fn probe(xpub: &zmq::Socket, apps: &[&App]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !apps.iter().all(|app| app.count() > 0) {
        assert!(Instant::now() < deadline, "the probe never arrived");
        let frame = format!("stix2/indicator {}", sample_indicator());
        xpub.send(frame.as_bytes(), 0).expect("send the probe");
        for app in apps {
            app.wait_for(1, Duration::from_millis(500));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    for app in apps {
        app.take();
    }
}

// ----- figures -----

/// The expected indicators as they reached one app.
struct Flow {
    distinct: usize,
    duplicates: usize,
    in_order: bool,
    first: Instant,
    last: Instant,
    /// The longest time between two consecutive first arrivals.
    longest_gap: Duration,
}

impl Flow {
    fn of(arrivals: &[Arrival], ids: &[String]) -> Flow {
        let position: HashMap<&str, usize> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), i))
            .collect();
        let mut seen = HashSet::new();
        let (mut duplicates, mut in_order, mut previous) = (0, true, None);
        let (mut first, mut last) = (None, None);
        let mut longest_gap = Duration::ZERO;
        for (at, frame) in arrivals {
            let Some(index) = frame_id(frame).and_then(|id| position.get(id.as_str()).copied())
            else {
                continue;
            };
            if !seen.insert(index) {
                duplicates += 1;
                continue;
            }
            let index = Some(index);
            if index < previous {
                in_order = false;
            }
            previous = index;
            first.get_or_insert(*at);
            if let Some(last) = last {
                longest_gap = longest_gap.max(*at - last);
            }
            last = Some(*at);
        }
        let (Some(first), Some(last)) = (first, last) else {
            panic!("no expected indicator arrived");
        };
        Flow {
            distinct: seen.len(),
            duplicates,
            in_order,
            first,
            last,
            longest_gap,
        }
    }

    /// First → last arrival, per second.
    fn rate(&self) -> f64 {
        (self.distinct.saturating_sub(1)) as f64 / (self.last - self.first).as_secs_f64()
    }

    fn print(&self, who: &str, start: Instant, start_name: &str) {
        println!(
            "{who}: {} distinct ({} duplicates, order {}), first → last arrival {} → {:.0} msg/s; longest gap {}",
            self.distinct,
            self.duplicates,
            if self.in_order { "kept" } else { "NOT kept" },
            ms(self.last - self.first),
            self.rate(),
            ms(self.longest_gap)
        );
        println!(
            "{:w$}  {start_name} → first arrival {}, {start_name} → last arrival {} → {:.0} msg/s",
            "",
            ms(self.first - start),
            ms(self.last - start),
            self.distinct as f64 / (self.last - start).as_secs_f64(),
            w = who.len()
        );
    }
}

struct Percentiles {
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

impl Percentiles {
    /// Nearest-rank percentiles.
    fn of(mut values: Vec<Duration>) -> Percentiles {
        values.sort();
        let at = |p: usize| {
            let rank = (values.len() * p).div_ceil(100).max(1);
            values.get(rank - 1).copied().unwrap_or_default()
        };
        Percentiles {
            p50: at(50),
            p90: at(90),
            p99: at(99),
            max: values.last().copied().unwrap_or_default(),
        }
    }

    fn print(&self, what: &str) {
        println!("{what:<48} {}", self.row());
    }

    fn row(&self) -> String {
        format!(
            "p50 {:>8} | p90 {:>8} | p99 {:>8} | max {:>8}",
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.max)
        )
    }
}

/// Latency from a stamp per message to its first arrival at an app.
struct Latency {
    percentiles: Percentiles,
    arrived: usize,
    duplicates: usize,
    missing: usize,
    sent_rate: f64,
    arrival_rate: f64,
}

impl Latency {
    /// `ids[i]` was sent (or appended) at `stamps[i]`.
    fn of(arrivals: &[Arrival], ids: &[String], stamps: &[Instant]) -> Latency {
        let index: HashMap<&str, usize> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), i))
            .collect();
        let mut first: Vec<Option<Instant>> = vec![None; ids.len()];
        let mut duplicates = 0;
        for (at, frame) in arrivals {
            if let Some(i) = frame_id(frame).and_then(|id| index.get(id.as_str()).copied()) {
                if first[i].is_some() {
                    duplicates += 1;
                } else {
                    first[i] = Some(*at);
                }
            }
        }
        let latencies: Vec<Duration> = first
            .iter()
            .zip(stamps)
            .filter_map(|(arrived, sent)| arrived.map(|a| a - *sent))
            .collect();
        let arrived: Vec<Instant> = first.iter().flatten().copied().collect();
        let span = |times: &[Instant]| match (times.iter().min(), times.iter().max()) {
            (Some(lo), Some(hi)) if hi > lo => (times.len() - 1) as f64 / (*hi - *lo).as_secs_f64(),
            _ => 0.0,
        };
        Latency {
            arrived: latencies.len(),
            missing: ids.len() - latencies.len(),
            duplicates,
            sent_rate: span(stamps),
            arrival_rate: span(&arrived),
            percentiles: Percentiles::of(latencies),
        }
    }

    fn print_detail(&self, what: &str) {
        println!(
            "  sent at {:.0}/s; arrived {} ({} duplicates, {} missing) at {:.0}/s",
            self.sent_rate, self.arrived, self.duplicates, self.missing, self.arrival_rate
        );
        println!("{what:<48} {}", self.percentiles.row());
    }

    fn print_row(&self, what: &str) {
        println!(
            "{what:<48} {}   ({:.0}/s in, {:.0}/s out, {} of {})",
            self.percentiles.row(),
            self.sent_rate,
            self.arrival_rate,
            self.arrived,
            self.arrived + self.missing
        );
    }
}

/// CPU time and context switches of a process's threads, by thread name (numbered
/// siblings like `sled-io-3` grouped).
struct Threads(BTreeMap<String, (Duration, u64, usize)>);

impl Threads {
    fn of(pid: u32) -> Threads {
        let mut threads = BTreeMap::new();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Threads(threads);
        };
        for task in tasks.flatten() {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let name = stat[open + 1..close].trim_end_matches(|c: char| c.is_ascii_digit());
            let name = name.trim_end_matches(['-', '/']).to_owned();
            let cpu = cpu_of_stat(&stat).unwrap_or_default();
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let switches: u64 = status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
            let entry = threads.entry(name).or_insert((Duration::ZERO, 0, 0));
            entry.0 += Duration::from_secs_f64(cpu);
            entry.1 += switches;
            entry.2 += 1;
        }
        Threads(threads)
    }

    /// What happened between `before` and this snapshot.
    fn since(&self, before: &Threads) -> Threads {
        Threads(
            self.0
                .iter()
                .map(|(name, (cpu, switches, count))| {
                    let (cpu0, switches0, _) =
                        before
                            .0
                            .get(name)
                            .copied()
                            .unwrap_or((Duration::ZERO, 0, 0));
                    (
                        name.clone(),
                        (
                            cpu.saturating_sub(cpu0),
                            switches.saturating_sub(switches0),
                            *count,
                        ),
                    )
                })
                .collect(),
        )
    }

    fn cpu(&self) -> Duration {
        self.0.values().map(|(cpu, _, _)| *cpu).sum()
    }

    fn switches(&self) -> u64 {
        self.0.values().map(|(_, switches, _)| *switches).sum()
    }

    fn describe(&self, messages: usize) -> String {
        let mut busy: Vec<_> = self
            .0
            .iter()
            .filter(|(_, (cpu, _, _))| !cpu.is_zero())
            .collect();
        busy.sort_by_key(|(_, (cpu, _, _))| std::cmp::Reverse(*cpu));
        busy.iter()
            .map(|(name, (cpu, switches, count))| {
                let name = if *count > 1 {
                    format!("{name} ×{count}")
                } else {
                    (*name).clone()
                };
                format!(
                    "{name} {:.2} s / {:.1}",
                    cpu.as_secs_f64(),
                    *switches as f64 / messages as f64
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// CPU seconds spread over the N indicators of a throughput run.
fn per_message(seconds: f64) -> Duration {
    Duration::from_secs_f64(seconds.max(0.0) / N as f64)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// CPU time of a process over a wall-clock window.
struct Cpu {
    pid: Option<u32>,
    cpu: f64,
    at: Instant,
}

impl Cpu {
    fn start(pid: Option<u32>) -> Cpu {
        Cpu {
            pid,
            cpu: pid.and_then(cpu_seconds).unwrap_or(0.0),
            at: Instant::now(),
        }
    }

    /// CPU seconds used since the start.
    fn seconds(&self) -> f64 {
        self.pid.and_then(cpu_seconds).unwrap_or(0.0) - self.cpu
    }

    /// CPU time since the start, in percent of one core.
    fn percent(&self) -> f64 {
        100.0 * self.seconds() / self.at.elapsed().as_secs_f64()
    }
}

/// utime + stime of a process, all its threads, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_of_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime + stime from a `/proc/.../stat` line, in seconds.
fn cpu_of_stat(stat: &str) -> Option<f64> {
    // Fields after the command name in parentheses: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / hz.max(1) as f64)
}

fn load_average() -> String {
    std::fs::read_to_string(Path::new("/proc/loadavg"))
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn ip(i: usize) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

/// The frame the bridge publishes for `indicator`'s create event (the double's stored
/// STIX object, mapped by the crate, serialised as the stream reader stores it).
fn bridge_frame(opencti: &OpenCti, indicator: &Indicator) -> String {
    let stix = opencti.object(&indicator.stix_id).expect("created");
    let event = json!({"version": "4", "type": "create", "data": stix});
    match map_stream_value("create", event, false) {
        StreamAction::Publish(objects) if objects.len() == 1 => {
            format!(
                "stix2/indicator {}",
                serde_json::to_string(&objects[0]).expect("JSON")
            )
        }
        other => panic!("the bridge would not publish this create: {other:?}"),
    }
}

/// The STIX id of a frame Threat Bus sent (`<p2p><suffix> <json>`).
fn frame_id(frame: &[u8]) -> Option<String> {
    let space = frame.iter().position(|b| *b == b' ')?;
    let body: Value = serde_json::from_slice(&frame[space + 1..]).ok()?;
    body["id"].as_str().map(str::to_owned)
}
