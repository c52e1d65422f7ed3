//! Where the stream may be resumed from (SPEC §2.2), as a pure state machine.
//!
//! OpenCTI sends the dependencies of an event (its marking, its author) as separate events
//! carrying **the same SSE id** as the event itself. Resuming from that id would skip the
//! event, so the position only advances past complete events. A heartbeat id may advance
//! it only while no dependency is pending: OpenCTI can send a heartbeat carrying id X
//! between the dependencies of X and X itself.

use std::cmp::Ordering;

use crate::opencti::stream::compare_event_ids as compare_ids;

/// What kind of SSE event an id came with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventRole {
    /// A data event (create/update/delete/merge) that is not a dependency.
    Complete,
    /// `origin.referer == "dependencies"`: the event with this id is still to come.
    Dependency,
    /// Heartbeats, metrics and anything else without data.
    Heartbeat,
}

#[derive(Debug, Clone, Default)]
pub struct Checkpoint {
    position: Option<String>,
    pending_dependency: Option<String>,
}

impl Checkpoint {
    pub fn new(stored: Option<String>) -> Self {
        Checkpoint {
            position: stored,
            pending_dependency: None,
        }
    }

    /// The last position that is safe to resume from.
    pub fn position(&self) -> Option<&str> {
        self.position.as_deref()
    }

    /// A new connection starts: dependencies of the old one will be re-sent.
    pub fn reset_connection(&mut self) {
        self.pending_dependency = None;
    }

    /// Feeds one event's id; returns the new position when it advances.
    pub fn observe(&mut self, id: Option<&str>, role: EventRole) -> Option<String> {
        let id = id?;
        match role {
            EventRole::Dependency => {
                self.pending_dependency = Some(id.to_string());
                None
            }
            EventRole::Heartbeat if self.pending_dependency.is_some() => None,
            EventRole::Heartbeat => self.advance(id),
            EventRole::Complete => {
                self.pending_dependency = None;
                self.advance(id)
            }
        }
    }

    fn advance(&mut self, id: &str) -> Option<String> {
        // Never backwards: a resume point only moves forward in the stream.
        let forward = match self.position.as_deref() {
            None => true,
            Some(current) => compare_ids(id, current) == Some(Ordering::Greater),
        };
        if forward {
            self.position = Some(id.to_string());
            self.position.clone()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_hold_the_position_until_their_event() {
        let mut c = Checkpoint::new(Some("100-0".into()));
        assert_eq!(c.observe(Some("200-0"), EventRole::Dependency), None);
        assert_eq!(c.observe(Some("200-0"), EventRole::Dependency), None);
        assert_eq!(c.position(), Some("100-0"));
        assert_eq!(
            c.observe(Some("200-0"), EventRole::Complete),
            Some("200-0".into())
        );
    }

    #[test]
    fn a_heartbeat_between_dependencies_and_their_event_does_not_advance() {
        let mut c = Checkpoint::new(Some("100-0".into()));
        c.observe(Some("200-0"), EventRole::Dependency);
        assert_eq!(c.observe(Some("200-0"), EventRole::Heartbeat), None);
        assert_eq!(c.observe(Some("250-0"), EventRole::Heartbeat), None);
        assert_eq!(c.position(), Some("100-0"));
        c.observe(Some("200-0"), EventRole::Complete);
        assert_eq!(
            c.observe(Some("250-0"), EventRole::Heartbeat),
            Some("250-0".into())
        );
    }

    #[test]
    fn heartbeats_advance_when_nothing_is_pending() {
        let mut c = Checkpoint::new(None);
        assert_eq!(
            c.observe(Some("5-0"), EventRole::Heartbeat),
            Some("5-0".into())
        );
        assert_eq!(c.observe(None, EventRole::Heartbeat), None);
    }

    #[test]
    fn the_position_never_moves_backwards() {
        let mut c = Checkpoint::new(Some("1709287215731-1".into()));
        assert_eq!(
            c.observe(Some("1709287215731-0"), EventRole::Complete),
            None
        );
        assert_eq!(c.observe(Some("999-0"), EventRole::Heartbeat), None);
        assert_eq!(c.observe(Some("garbage"), EventRole::Complete), None);
        assert_eq!(
            c.observe(Some("1709287215731-2"), EventRole::Complete),
            Some("1709287215731-2".into())
        );
        // numeric, not lexicographic
        let mut c = Checkpoint::new(Some("99-0".into()));
        assert_eq!(
            c.observe(Some("100-0"), EventRole::Complete),
            Some("100-0".into())
        );
    }

    #[test]
    fn a_new_connection_forgets_pending_dependencies() {
        let mut c = Checkpoint::new(Some("1-0".into()));
        c.observe(Some("2-0"), EventRole::Dependency);
        c.reset_connection();
        assert_eq!(
            c.observe(Some("3-0"), EventRole::Heartbeat),
            Some("3-0".into())
        );
    }
}
