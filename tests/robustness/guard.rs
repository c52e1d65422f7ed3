//! Runs one case on its own thread with a deadline, so that a hang fails the property
//! (with the input, which proptest then shrinks) instead of stalling the test run.

use std::panic;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::Duration;

/// Far above what any bounded case needs even in a debug build on a loaded machine
/// (milliseconds): reaching it means the target loops. Not a performance check.
const DEADLINE: Duration = Duration::from_secs(20);

/// Number of cases per property: the issue asks for at least 10,000.
pub const CASES: u32 = 10_000;

/// A proptest configuration with [`CASES`] cases.
pub fn config() -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases: CASES,
        ..proptest::test_runner::Config::default()
    }
}

/// `f()`, run on a worker thread. A panic in `f` is re-raised here (so proptest sees it as
/// a failing case); no answer within [`DEADLINE`] panics as a hang. A hung worker is left
/// behind: nothing can stop it, and the process ends with the failed test anyway.
pub fn guarded<T, F>(what: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let worker = thread::Builder::new()
        .name(format!("robustness: {what}"))
        .spawn(move || {
            // The receiver is gone only after a timeout: nothing left to report to.
            let _ = tx.send(f());
        })
        .expect("a worker thread");
    match rx.recv_timeout(DEADLINE) {
        Ok(value) => {
            // It has sent its answer; joining only waits for it to return.
            let _ = worker.join();
            value
        }
        Err(RecvTimeoutError::Timeout) => {
            panic!("{what}: no answer within {DEADLINE:?}: the target hangs on this input")
        }
        Err(RecvTimeoutError::Disconnected) => match worker.join() {
            Err(payload) => panic::resume_unwind(payload),
            Ok(()) => unreachable!("the worker returned without sending its answer"),
        },
    }
}
