//! Crash test, after sled's own: a child process writes to the store and reports every
//! write it was told is durable; the parent SIGKILLs it at random instants (during open
//! too), reopens the store and checks that
//! - every batch the child saw confirmed is there, complete and in order,
//! - the outbox holds what a prefix of the writes gives (no hole, in order; a batch cut by
//!   the kill is written again by the next life), and the stream position never points
//!   past a missing item,
//! - every confirmed sighting (a second writer sharing the group commit) is there.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use opencti_threatbus::store::{Queue, Store, StoreOptions};

const CHILD_ENV: &str = "STORE_CRASH_CHILD_DIR";
const ROUNDS: usize = 60;

fn options() -> StoreOptions {
    StoreOptions {
        flush_interval: Duration::from_millis(2),
        flush_max_items: 200,
        ..StoreOptions::default()
    }
}

/// The child's workload; a no-op unless the parent started this binary as its child.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let store = std::sync::Arc::new(Store::open(Path::new(&dir), &options()).unwrap());
    println!("OPEN");
    let sightings = {
        let store = std::sync::Arc::clone(&store);
        std::thread::spawn(move || write_sightings(&store))
    };
    write_indicators(&store);
    sightings.join().unwrap();
}

fn write_indicators(store: &Store) {
    let mut batch: u64 = store
        .position()
        .unwrap()
        .map_or(0, |p| p.trim_end_matches("-0").parse().unwrap());
    let mut pending = std::collections::VecDeque::new();
    loop {
        batch += 1;
        let size = 1 + (batch * 7919 % 13) as usize;
        let payloads = (0..size)
            .map(|j| format!("{batch}:{j}:{size}:{}", "x".repeat(200)).into_bytes())
            .collect();
        let durable = store
            .enqueue(Queue::Indicators, payloads, Some(&format!("{batch}-0")))
            .unwrap();
        pending.push_back((batch, durable));
        // Pipelined like the stream reader: a window of unconfirmed batches.
        while pending.len() > 8 || pending.front_mut().is_some_and(|(_, d)| d.is_done()) {
            let (b, d) = pending.pop_front().unwrap();
            d.wait_blocking().unwrap();
            println!("DURABLE {b}");
        }
    }
}

fn write_sightings(store: &Store) {
    let mut n = store.len(Queue::Sightings);
    loop {
        let durable = store
            .enqueue(Queue::Sightings, vec![format!("s:{n}").into_bytes()], None)
            .unwrap();
        durable.wait_blocking().unwrap();
        println!("SIGHTING {n}");
        n += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
}

struct Confirmed {
    batches: BTreeSet<u64>,
    sightings: BTreeSet<u64>,
}

#[test]
fn confirmed_writes_survive_sigkill_at_random_instants() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = seed();
    eprintln!("crash test seed: {rng}");
    let mut confirmed = Confirmed {
        batches: BTreeSet::new(),
        sightings: BTreeSet::new(),
    };
    let mut killed_during_open = 0;
    for round in 0..ROUNDS {
        // Mostly short lives (many kills during open and early writes), some long ones.
        let life = match next(&mut rng) % 10 {
            0 => 800 + next(&mut rng) % 700,
            1..=3 => next(&mut rng) % 15,
            _ => next(&mut rng) % 250,
        };
        let opened = run_child_and_kill(dir.path(), Duration::from_millis(life), &mut confirmed);
        if !opened {
            killed_during_open += 1;
        }
        verify(dir.path(), &confirmed, round);
    }
    eprintln!(
        "{ROUNDS} rounds, {killed_during_open} killed before the store was open, {} batches and {} sightings confirmed",
        confirmed.batches.len(),
        confirmed.sightings.len()
    );
    assert!(
        confirmed.batches.len() > 100,
        "the child wrote too little to prove anything"
    );
    assert!(killed_during_open > 0, "no kill landed during open");
}

/// Returns whether the child had opened the store before it was killed.
fn run_child_and_kill(dir: &Path, life: Duration, confirmed: &mut Confirmed) -> bool {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + life;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap();
    let mut opened = false;
    for line in rx.try_iter() {
        // libtest prints "test crash_child ... " before the test writes its first line.
        if line.ends_with("OPEN") {
            opened = true;
        } else if let Some(b) = line.strip_prefix("DURABLE ") {
            confirmed.batches.insert(b.parse().unwrap());
        } else if let Some(s) = line.strip_prefix("SIGHTING ") {
            confirmed.sightings.insert(s.parse().unwrap());
        }
    }
    opened
}

fn verify(dir: &Path, confirmed: &Confirmed, round: usize) {
    let store = Store::open(dir, &options())
        .unwrap_or_else(|e| panic!("round {round}: the store does not reopen after SIGKILL: {e}"));
    let position: u64 = store
        .position()
        .unwrap()
        .map_or(0, |p| p.trim_end_matches("-0").parse().unwrap());

    // Indicators. A commit is ordered plain writes, items before the position, and sled
    // recovers a prefix of its log: a crash can leave the first items of a batch without
    // its position, and the next life (like the stream reader) writes that batch again
    // after them. So the outbox is runs of batches, each run in order with no hole, each
    // starting at the batch after a position the store held, only its end torn; the
    // position never points past the last complete batch of the last run.
    let mut runs: Vec<(u64, u64)> = Vec::new(); // (first batch, last complete batch)
    let mut expected: Option<(u64, usize)> = None; // the next item if the run goes on
    for item in store.scan(Queue::Indicators, None, usize::MAX).unwrap() {
        let text = String::from_utf8(item.envelope.payload).unwrap();
        let mut parts = text.split(':');
        let b: u64 = parts.next().unwrap().parse().unwrap();
        let j: usize = parts.next().unwrap().parse().unwrap();
        let size: usize = parts.next().unwrap().parse().unwrap();
        if expected != Some((b, j)) {
            // A new run: the start of a batch no later than the one after the last
            // complete batch so far (a life resumes at a position the store held).
            let resumable = runs.last().map_or(1, |(_, complete)| complete + 1);
            assert!(
                j == 0 && b <= resumable,
                "round {round}: item {b}:{j} after {expected:?}: a hole or items out of order (runs {runs:?})"
            );
            runs.push((b, b - 1));
        }
        let run = runs.last_mut().unwrap();
        expected = if j + 1 == size {
            run.1 = b;
            Some((b + 1, 0))
        } else {
            Some((b, j + 1))
        };
    }
    let (first, complete) = runs.last().copied().unwrap_or((1, 0));
    assert!(
        position <= complete,
        "round {round}: the stream position {position} points past the last complete batch {complete}"
    );
    assert!(
        position + 1 >= first,
        "round {round}: the stream position {position} is older than the last run (from batch {first}) resumed at"
    );
    if let Some(max) = confirmed.batches.last() {
        assert!(
            *max <= position,
            "round {round}: confirmed batch {max} lost (position {position})"
        );
    }
    // Sightings: 0..n contiguous, and every confirmed one present.
    let present: Vec<u64> = store
        .scan(Queue::Sightings, None, usize::MAX)
        .unwrap()
        .iter()
        .map(|i| {
            String::from_utf8_lossy(&i.envelope.payload)[2..]
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        present.iter().copied().eq(0..present.len() as u64),
        "round {round}: sightings not contiguous"
    );
    if let Some(max) = confirmed.sightings.last() {
        assert!(
            (*max as usize) < present.len(),
            "round {round}: confirmed sighting {max} lost"
        );
    }
    assert_eq!(store.len(Queue::Sightings), present.len() as u64);
    store.close().unwrap();
}

fn seed() -> u64 {
    std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

/// xorshift64: enough randomness for kill instants, and reproducible from the seed.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
