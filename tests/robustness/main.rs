//! Randomized robustness (issue 8 item 6): every parser that reads bytes from outside the
//! process — the SSE stream, Threat Bus frames, stream events, sightings, snapshot requests,
//! imported indicators, timestamps, the configuration — is fed generated input, mostly
//! valid-looking structures with mutations (wrong types, huge numbers, deep nesting, odd
//! unicode), and must answer every input with a value or a typed error: never a panic,
//! never a hang. Each property runs at least 10,000 cases.
//!
//! Hangs: every case runs under [`guard::guarded`] (a worker thread with a generous
//! deadline), and every input is bounded in size, so a case that does not finish is a
//! loop, not slowness.
//!
//! Failure persistence stays on: proptest writes a `*.proptest-regressions` file next to
//! the failing module, to be committed with the fix, so the case replays first for good.

mod config;
mod guard;
mod json;
mod sse;
mod stix;
