//! One line per outage, not one per failed attempt (SPEC §7: "outage started/ended").
//!
//! While a peer is down the bridge tries again every few seconds (`bridge.probe_max_ms`);
//! a warning per attempt is hundreds of lines an hour saying the same thing. [`OutageLog`]
//! says when an outage starts, reminds at long intervals while it lasts, and says how long
//! it was when it ends; the attempts in between are for debug logs. Pure: the caller
//! passes the time, so the tests need no clock.

use std::time::{Duration, Instant};

/// How often a lasting outage is mentioned again: often enough that whoever reads the
/// log now sees it is still going on, rarely enough to stay a dozen lines an hour.
pub const REMIND_EVERY: Duration = Duration::from_secs(300);

/// What to say about one failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The first of an outage: a warning.
    Started,
    /// Still down, `REMIND_EVERY` after the last line: a warning with the figures.
    StillDown { down_for: Duration, failures: u32 },
    /// Nothing new: debug only.
    Quiet,
}

/// An outage that ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    pub down_for: Duration,
    pub failures: u32,
}

struct Current {
    since: Instant,
    failures: u32,
    last_said: Instant,
}

#[derive(Default)]
pub struct OutageLog {
    current: Option<Current>,
}

impl OutageLog {
    /// An attempt failed at `now`.
    pub fn failed(&mut self, now: Instant) -> Failure {
        let Some(current) = &mut self.current else {
            self.current = Some(Current {
                since: now,
                failures: 1,
                last_said: now,
            });
            return Failure::Started;
        };
        current.failures = current.failures.saturating_add(1);
        if now.saturating_duration_since(current.last_said) >= REMIND_EVERY {
            current.last_said = now;
            return Failure::StillDown {
                down_for: now.saturating_duration_since(current.since),
                failures: current.failures,
            };
        }
        Failure::Quiet
    }

    /// An attempt succeeded at `now`: the outage, if there was one, is over.
    pub fn succeeded(&mut self, now: Instant) -> Option<Ended> {
        self.current.take().map(|current| Ended {
            down_for: now.saturating_duration_since(current.since),
            failures: current.failures,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_one_warning_reminders_at_long_intervals_and_one_end() {
        let start = Instant::now();
        let mut log = OutageLog::default();
        assert_eq!(log.succeeded(start), None, "no outage, nothing to end");
        assert_eq!(log.failed(start), Failure::Started);
        // Attempts every 5 s for two hours: quiet but for a reminder every 5 minutes.
        let mut reminders = Vec::new();
        for i in 1..=(2 * 3600 / 5) {
            let now = start + Duration::from_secs(5 * i);
            match log.failed(now) {
                Failure::Quiet => {}
                Failure::StillDown { down_for, failures } => reminders.push((down_for, failures)),
                Failure::Started => panic!("a second start within one outage at {i}"),
            }
        }
        assert_eq!(reminders.len(), 24, "one reminder per 5 minutes of 2 hours");
        assert_eq!(reminders[0], (REMIND_EVERY, 61));
        let end = start + Duration::from_secs(2 * 3600 + 1);
        assert_eq!(
            log.succeeded(end),
            Some(Ended {
                down_for: Duration::from_secs(2 * 3600 + 1),
                failures: 1 + 2 * 3600 / 5,
            })
        );
        // The next failure starts a new outage.
        assert_eq!(log.failed(end), Failure::Started);
    }
}
