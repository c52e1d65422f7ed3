//! Exponential backoff with jitter for every retry loop (the `backoff` crate, never giving up:
//! an outage of days must lose nothing, SPEC §2.8).
//!
//! Two policies come from the configuration. [`RetryPolicy::from_config`] spaces the
//! attempts of one item that was refused (`bridge.retry_*`). [`RetryPolicy::probe`] spaces
//! the probes of a peer that is down: one request at a time, each failure one step, capped
//! at `bridge.probe_max_ms`, so that the first probe after the peer's return comes within
//! that cap, however long the outage was.

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

    /// The probes of a peer that is down: the same growth, capped at `bridge.probe_max_ms`
    /// (and never longer than `bridge.retry_max_ms`).
    pub fn probe(bridge: &BridgeConfig) -> Self {
        let max = bridge.retry_max.min(bridge.probe_max);
        RetryPolicy {
            initial: bridge.retry_initial.min(max),
            max,
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

/// One retry loop's state. Every delay lies within `policy.max`, jitter included: the
/// cap is a promise (how soon after a peer's return the bridge notices it).
pub struct Backoff {
    inner: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(policy: RetryPolicy) -> Self {
        // The crate jitters around its interval (±JITTER), so its interval stops where the
        // top of the jitter reaches the cap: delays at the cap spread over
        // [max·(1−J)/(1+J), max] instead of piling up at the cap.
        let max_interval = policy.max.div_f64(1.0 + JITTER);
        let initial = policy.initial.min(max_interval);
        Backoff {
            inner: ExponentialBackoff {
                current_interval: initial,
                initial_interval: initial,
                randomization_factor: JITTER,
                multiplier: policy.multiplier,
                max_interval,
                max_elapsed_time: None,
                ..ExponentialBackoff::default()
            },
            max: policy.max,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        // `None` only comes with a max_elapsed_time, which is never set.
        let delay = self.inner.next_backoff().unwrap_or(self.max);
        // Rounding of the jitter must not break the promise.
        delay.min(self.max)
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
    fn no_delay_exceeds_the_cap_jitter_included() {
        let mut b = Backoff::new(RetryPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(5),
            multiplier: 2.0,
        });
        let delays: Vec<Duration> = (0..1000).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(5)));
        // Still jittered at the cap: not all the same.
        let at_cap = &delays[100..];
        assert!(at_cap.iter().any(|d| *d < Duration::from_millis(4500)));
        assert!(at_cap.iter().any(|d| *d > Duration::from_millis(4500)));
    }

    #[test]
    fn probes_are_capped_by_probe_max_and_retry_max() {
        let mut bridge = BridgeConfig::with_data_dir("/tmp");
        let probe = RetryPolicy::probe(&bridge);
        assert_eq!(probe.max, crate::config::DEFAULT_PROBE_MAX);
        assert_eq!(probe.initial, bridge.retry_initial);
        bridge.retry_max = Duration::from_secs(1);
        assert_eq!(RetryPolicy::probe(&bridge).max, Duration::from_secs(1));
        bridge.probe_max = Duration::from_millis(100);
        let probe = RetryPolicy::probe(&bridge);
        assert_eq!(
            (probe.initial, probe.max),
            (Duration::from_millis(100), Duration::from_millis(100))
        );
    }

    /// A loop that probes a peer (sleep the next delay, try once) on tokio's paused clock:
    /// the first probe after the peer's return comes within the cap, whatever the outage.
    /// This is the stream reconnect's and the organization lookup's loop.
    #[tokio::test(start_paused = true)]
    async fn a_probe_loop_notices_the_return_within_the_cap_after_any_outage() {
        let cap = crate::config::DEFAULT_PROBE_MAX;
        for outage in [
            Duration::from_secs(30),
            Duration::from_secs(600),
            Duration::from_secs(7200),
        ] {
            let start = tokio::time::Instant::now();
            let back = start + outage;
            let mut b = Backoff::new(RetryPolicy {
                initial: Duration::from_millis(500),
                max: cap,
                multiplier: 2.0,
            });
            let mut probes = 0u32;
            while tokio::time::Instant::now() < back {
                probes += 1;
                tokio::time::sleep(b.next_delay()).await;
            }
            let noticed = tokio::time::Instant::now() - back;
            assert!(noticed <= cap, "{outage:?}: noticed after {noticed:?}");
            // One probe at a time, and no faster than the cap's lower jitter bound.
            let slowest =
                outage.as_secs_f64() / (cap.as_secs_f64() * (1.0 - JITTER) / (1.0 + JITTER));
            assert!(
                f64::from(probes) <= slowest + 10.0,
                "{outage:?}: {probes} probes"
            );
        }
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
