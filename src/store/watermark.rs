//! The low watermark: a stream resume point at or before every indicator not yet delivered.
//!
//! Queue items do not carry the stream position they were read at, so the store remembers,
//! in memory, the resume point in force *before* each commit that added indicators, next to
//! the first key of that commit. Once the drainer has settled every key below a commit's
//! successor, the commit is forgotten. The watermark is the oldest resume point among the
//! commits still holding undelivered items (the current one when the queue is empty).
//! Resuming the stream there after losing the store reads every undelivered indicator
//! again: at-least-once, with duplicates bounded by what was delivered since.

use std::cmp::Ordering;
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::opencti::stream::compare_event_ids;

/// Where the stream resumes: the `Last-Event-ID` and the recover date in force with it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// `None`: from the first-start position (a full replay), like a new data directory.
    pub position: Option<String>,
    /// The replay (recover mode) in force at that position, if any: a replay id resumed
    /// without it would be read as a raw stream time.
    pub recover_until: Option<String>,
}

impl Resume {
    /// Whichever of two resume points re-reads more. An id that cannot be compared makes
    /// the answer a full replay: unknown must never mean "skip".
    fn older(self, other: Resume) -> Resume {
        let recover_until = self.recover_until.clone().or(other.recover_until.clone());
        let position = match (self.position, other.position) {
            (Some(a), Some(b)) => match compare_event_ids(&a, &b) {
                Some(Ordering::Greater) => Some(b),
                Some(_) => Some(a),
                None => None,
            },
            _ => None,
        };
        Resume {
            position,
            recover_until,
        }
    }
}

/// Commits remembered at most: past it, neighbours are merged ([`Watermarks::coarsen`]).
/// An entry is ~90 bytes (key, `Resume`, the position's heap text); without a bound, a
/// Threat Bus outage with one event per commit would keep one per queued indicator (1M
/// entries ≈ 90 MB, each walked by `low` every second). 4096 entries: ~370 KB.
const MAX_COMMITS: usize = 4096;

/// The per-commit resume points of the indicator queue (in key order).
#[derive(Debug, Default)]
pub(crate) struct Watermarks {
    /// (first key of a commit, resume point before it).
    commits: VecDeque<(u64, Resume)>,
    /// The resume point after the last commit.
    current: Resume,
    /// Keys a commit spans at least before the next one is remembered apart (0 until the
    /// list was first coarsened).
    stride: u64,
}

impl Watermarks {
    /// At open: `head` is the oldest queued indicator, whose origin is `carried` (the
    /// checkpoint file's watermark, or a full replay when there is none).
    pub(crate) fn new(current: Resume, head: Option<u64>, carried: Resume) -> Self {
        let mut commits = VecDeque::new();
        if let Some(head) = head {
            commits.push_back((head, carried));
        }
        Watermarks {
            commits,
            current,
            stride: 0,
        }
    }

    /// A commit added `items` indicators from key `first` on, and moved the position to
    /// `position` (if given) with `recover_until` in force.
    pub(crate) fn on_commit(
        &mut self,
        first: u64,
        items: usize,
        position: Option<&str>,
        recover_until: Option<String>,
    ) {
        if items > 0 {
            // The resume point before the batch, with the replay the batch was read in.
            let mut before = self.current.clone();
            before.recover_until = before.recover_until.or(recover_until.clone());
            self.push(first, before);
        }
        if let Some(position) = position {
            self.current.position = Some(position.to_string());
        }
        self.current.recover_until = recover_until;
    }

    /// Items added with no stream position of their own (dead letters requeued): until
    /// they are delivered, only a full replay is sure to read them again.
    pub(crate) fn on_unpositioned(&mut self, key: u64) {
        self.push(key, Resume::default());
    }

    fn push(&mut self, first: u64, before: Resume) {
        if let Some((last, resume)) = self.commits.back_mut() {
            if first.saturating_sub(*last) < self.stride {
                // Joins the last commit: its first key, the older of the two resume points.
                *resume = std::mem::take(resume).older(before);
                return;
            }
        }
        self.commits.push_back((first, before));
        if self.commits.len() > MAX_COMMITS {
            self.coarsen();
        }
    }

    /// Halves the list: each pair of neighbours becomes one commit with the first key and
    /// the older resume point, still at or before every item either covered. Only coarser:
    /// a merged commit is settled once the head passes both, so a replay after a damage may
    /// read up to one merged span more again. From then on a commit starting within the
    /// average span of the last one joins it, so old and new entries stay equally fine and
    /// the cost stays amortized O(1).
    fn coarsen(&mut self) {
        let mut pairs = std::mem::take(&mut self.commits).into_iter();
        while let Some((first, resume)) = pairs.next() {
            let resume = match pairs.next() {
                Some((_, next)) => resume.older(next),
                None => resume,
            };
            self.commits.push_back((first, resume));
        }
        if let (Some(front), Some(back)) = (self.commits.front(), self.commits.back()) {
            let span = (back.0 - front.0) / self.commits.len() as u64;
            self.stride = self.stride.max(span);
        }
    }

    /// The watermark, given the oldest indicator still queued (`None`: the queue is empty).
    pub(crate) fn low(&mut self, head: Option<u64>) -> Resume {
        let Some(head) = head else {
            self.commits.clear();
            return self.current.clone();
        };
        // A commit is settled once the next one starts at or below the head.
        while self.commits.len() >= 2 && self.commits[1].0 <= head {
            self.commits.pop_front();
        }
        let mut low = self.current.clone();
        for (_, resume) in &self.commits {
            low = resume.clone().older(low);
        }
        low
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(position: &str) -> Resume {
        Resume {
            position: Some(position.into()),
            recover_until: None,
        }
    }

    #[test]
    fn the_watermark_is_the_position_before_the_oldest_undelivered_commit() {
        let mut w = Watermarks::new(at("10-0"), None, Resume::default());
        w.on_commit(0, 3, Some("20-0"), None); // keys 0..3 read after 10-0
        w.on_commit(3, 2, Some("30-0"), None); // keys 3..5 read after 20-0
        w.on_commit(5, 0, Some("40-0"), None); // a heartbeat
        assert_eq!(w.low(Some(0)), at("10-0"));
        assert_eq!(w.low(Some(2)), at("10-0"));
        assert_eq!(w.low(Some(3)), at("20-0"));
        assert_eq!(w.low(Some(4)), at("20-0"));
        assert_eq!(w.low(None), at("40-0"));
    }

    #[test]
    fn a_position_moved_backwards_lowers_the_watermark() {
        let mut w = Watermarks::new(at("50-0"), None, Resume::default());
        w.on_commit(0, 1, Some("60-0"), None);
        w.on_commit(1, 0, Some("5-0"), None); // connector state moved back
        w.on_commit(1, 1, Some("7-0"), None);
        assert_eq!(w.low(Some(0)), at("5-0"));
    }

    #[test]
    fn items_of_unknown_origin_mean_a_full_replay() {
        let mut w = Watermarks::new(at("50-0"), Some(7), Resume::default());
        assert_eq!(w.low(Some(7)).position, None);
        let mut w = Watermarks::new(at("50-0"), None, Resume::default());
        w.on_commit(0, 1, Some("60-0"), None);
        w.on_unpositioned(1);
        assert_eq!(w.low(Some(1)).position, None);
        assert_eq!(w.low(None), at("60-0"));
    }

    #[test]
    fn many_small_commits_are_merged_never_skipped() {
        // Key k is read after position (k + 1): one indicator per commit, nothing delivered.
        let mut w = Watermarks::new(at("1-0"), None, Resume::default());
        let n = 100_000u64;
        for k in 0..n {
            w.on_commit(k, 1, Some(&format!("{}-0", k + 2)), None);
        }
        assert!(
            w.commits.len() <= MAX_COMMITS,
            "{} entries",
            w.commits.len()
        );
        for head in [0, 1, 4_095, 50_000, n - 1] {
            let low = w.low(Some(head)).position.expect("a position");
            let ms: u64 = low.split_once('-').expect("an id").0.parse().expect("ms");
            // At or before the head's own resume point (safe), and not far before (useful).
            assert!(ms <= head + 1, "head {head}: {low}");
            assert!(
                ms + 8 * n / MAX_COMMITS as u64 >= head,
                "head {head}: {low}"
            );
        }
    }

    #[test]
    fn the_replay_in_force_goes_with_the_watermark() {
        let mut w = Watermarks::new(Resume::default(), None, Resume::default());
        let until = Some("2024-03-01T10:00:00.000Z".to_string());
        w.on_commit(0, 0, None, until.clone());
        w.on_commit(0, 2, Some("1709287000000-0"), until.clone());
        w.on_commit(2, 1, Some("1709290000000-0"), None);
        let low = w.low(Some(1));
        assert_eq!((low.position, low.recover_until), (None, until));
    }
}
