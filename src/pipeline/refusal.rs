//! What the drainers towards OpenCTI do with an item OpenCTI refused (a validation error, a
//! missing reference): the same rule for sightings and imported indicators. The item is
//! retried later with the shared backoff, since a refusal can be transient (a referenced
//! object not created yet), and dead-lettered with OpenCTI's message once it has been
//! refused `max_attempts` times.

use crate::metrics::QueueCounters;
use crate::retry::RetryPolicy;
use crate::store::{now_ms, Queue, Store, StoreError};

/// One refusal of the item `key` of `queue`, its `attempts`-th. `what` names the item in
/// the log ("sighting", "imported indicator").
#[allow(clippy::too_many_arguments)] // one rule, its inputs spelled out at each call
pub(crate) fn refused(
    store: &Store,
    counters: &QueueCounters,
    queue: Queue,
    key: u64,
    attempts: u32,
    max_attempts: u32,
    retry: &RetryPolicy,
    message: &str,
    what: &str,
) -> Result<(), StoreError> {
    if attempts >= max_attempts {
        store.reschedule(queue, key, 0, message)?;
        let reason = format!("OpenCTI refused it {attempts} times: {message}");
        tracing::error!(key, %reason, "{what} dead-lettered");
        store.dead_letter(queue, key, &reason)?;
        counters.dead.inc();
    } else {
        let next = now_ms() + retry.delay_after(attempts).as_millis() as u64;
        store.reschedule(queue, key, next, message)?;
        counters.retried.inc();
        tracing::warn!(key, attempts, error = %message, "{what} refused by OpenCTI; will retry");
    }
    Ok(())
}
