//! Group commit: many writers, one `fsync`.
//!
//! Writers apply their batch to sled (visible at once, durable only after a flush) and then
//! register a waiter here. A single flusher thread waits until the oldest waiter is
//! `interval` old or `max_items` items are pending, takes every waiter registered so far, calls
//! `flush()` once and wakes them all. A waiter registered before the flush began has its
//! writes covered by that flush, because it registered only after applying them.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::StoreError;

type FlushResult = Result<(), StoreError>;

/// Resolves once the writes it was handed out for are on disk.
#[must_use = "a write is only durable once its Durable handle resolves"]
pub struct Durable {
    rx: oneshot::Receiver<FlushResult>,
    /// The outcome, once `is_done` has seen it.
    outcome: Option<FlushResult>,
}

impl Durable {
    fn new(rx: oneshot::Receiver<FlushResult>) -> Self {
        Durable { rx, outcome: None }
    }

    /// Waits (async) until the writes are durable.
    pub async fn wait(self) -> FlushResult {
        match self.outcome {
            Some(outcome) => outcome,
            None => self.rx.await.unwrap_or(Err(StoreError::Closed)),
        }
    }

    /// Waits (blocking the thread) until the writes are durable.
    pub fn wait_blocking(self) -> FlushResult {
        match self.outcome {
            Some(outcome) => outcome,
            None => self.rx.blocking_recv().unwrap_or(Err(StoreError::Closed)),
        }
    }

    /// Whether the flush that covers these writes has finished (successfully or not);
    /// `wait` then returns at once with its outcome.
    pub fn is_done(&mut self) -> bool {
        if self.outcome.is_none() {
            self.outcome = match self.rx.try_recv() {
                Ok(outcome) => Some(outcome),
                Err(oneshot::error::TryRecvError::Empty) => None,
                Err(oneshot::error::TryRecvError::Closed) => Some(Err(StoreError::Closed)),
            };
        }
        self.outcome.is_some()
    }
}

#[derive(Default)]
struct Pending {
    waiters: Vec<oneshot::Sender<FlushResult>>,
    items: usize,
    oldest: Option<Instant>,
    closing: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A poisoned lock only means another thread panicked while holding it; the
        // waiter list is still consistent, so keep going rather than cascade the panic.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The flusher thread and the queue of writers waiting for it.
pub(crate) struct GroupCommit {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl GroupCommit {
    pub(crate) fn start(db: sled::Db, interval: Duration, max_items: usize) -> Self {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("store-flush".into())
            .spawn(move || flush_loop(&worker, &db, interval, max_items.max(1)))
            .ok();
        GroupCommit {
            shared,
            thread: Mutex::new(thread),
        }
    }

    /// Registers a waiter for writes already applied; `items` counts towards `max_items`.
    pub(crate) fn register(&self, items: usize) -> Durable {
        let (tx, rx) = oneshot::channel();
        let mut pending = self.shared.lock();
        if pending.closing {
            let _ = tx.send(Err(StoreError::Closed));
            return Durable::new(rx);
        }
        pending.waiters.push(tx);
        pending.items += items;
        pending.oldest.get_or_insert_with(Instant::now);
        drop(pending);
        self.shared.wake.notify_one();
        Durable::new(rx)
    }

    /// Flushes what is pending, stops the thread. Later registrations fail with `Closed`.
    pub(crate) fn stop(&self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.stop();
    }
}

fn flush_loop(shared: &Shared, db: &sled::Db, interval: Duration, max_items: usize) {
    loop {
        let waiters = {
            let mut pending = shared.lock();
            loop {
                if pending.closing || pending.items >= max_items {
                    break;
                }
                match pending.oldest {
                    None => pending = shared.wake.wait(pending).unwrap_or_else(|p| p.into_inner()),
                    Some(oldest) => {
                        let due = oldest + interval;
                        let now = Instant::now();
                        if now >= due {
                            break;
                        }
                        pending = shared
                            .wake
                            .wait_timeout(pending, due - now)
                            .map(|(guard, _)| guard)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                }
            }
            let closing = pending.closing;
            let waiters = std::mem::take(&mut pending.waiters);
            pending.items = 0;
            pending.oldest = None;
            if closing && waiters.is_empty() {
                drop(pending);
                // Writes that registered no waiter (none do today) still reach the disk.
                let _ = db.flush();
                return;
            }
            waiters
        };
        let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
        for waiter in waiters {
            let _ = waiter.send(result.clone().map_err(StoreError::Flush));
        }
    }
}
