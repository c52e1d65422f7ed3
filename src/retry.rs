//! Exponential backoff with jitter for every retry loop (the `backoff` crate, never giving up:
//! an outage of days must lose nothing, SPEC §2.8).

use std::time::Duration;

use backoff::backoff::Backoff as _;
use backoff::ExponentialBackoff;

use crate::config::BridgeConfig;

/// ±30 % jitter keeps many bridges (or many sightings) from retrying in lockstep.
const JITTER: f64 = 0.3;

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
}

impl RetryPolicy {
    pub fn from_config(bridge: &BridgeConfig) -> Self {
        RetryPolicy {
            initial: bridge.retry_initial,
            max: bridge.retry_max,
            multiplier: bridge.retry_multiplier,
        }
    }

    /// The delay before attempt `attempts + 1` of an item that failed `attempts` times,
    /// without jitter: for per-item schedules stored in the outbox.
    pub fn delay_after(&self, attempts: u32) -> Duration {
        let factor = self
            .multiplier
            .powi(attempts.saturating_sub(1).min(64) as i32);
        let ms = (self.initial.as_millis() as f64 * factor).min(self.max.as_millis() as f64);
        Duration::from_millis(ms as u64)
    }
}

/// One retry loop's state.
pub struct Backoff {
    inner: ExponentialBackoff,
}

impl Backoff {
    pub fn new(policy: RetryPolicy) -> Self {
        Backoff {
            inner: ExponentialBackoff {
                current_interval: policy.initial,
                initial_interval: policy.initial,
                randomization_factor: JITTER,
                multiplier: policy.multiplier,
                max_interval: policy.max,
                max_elapsed_time: None,
                ..ExponentialBackoff::default()
            },
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        // `None` only comes with a max_elapsed_time, which is never set.
        self.inner.next_backoff().unwrap_or(self.inner.max_interval)
    }

    /// After a success: the next failure starts again from the initial delay.
    pub fn reset(&mut self) {
        self.inner.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            multiplier: 2.0,
        }
    }

    #[test]
    fn delays_grow_to_the_cap_and_never_stop() {
        let mut b = Backoff::new(policy());
        let delays: Vec<Duration> = (0..40).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(70) && delays[0] <= Duration::from_millis(130));
        assert!(delays[5] > delays[0]);
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(2600)));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(130));
    }

    #[test]
    fn per_item_delays_follow_the_attempt_count() {
        let p = policy();
        assert_eq!(p.delay_after(1), Duration::from_millis(100));
        assert_eq!(p.delay_after(2), Duration::from_millis(200));
        assert_eq!(p.delay_after(4), Duration::from_millis(800));
        assert_eq!(p.delay_after(30), Duration::from_secs(2));
        assert_eq!(p.delay_after(u32::MAX), Duration::from_secs(2));
    }
}
