//! The secondary's gate on the primary's connections: which connection's messages may still
//! change data here.
//!
//! A secondary that was paused (a frozen VM) or cut off and came back still holds, in its
//! socket buffers, writes the primary gave up on when it declared the peer lost (it recorded
//! their regions dirty, and its next resync copies them). Those late writes must not land
//! after the resync's copy of their region, or the copies differ while both say UpToDate.
//! So connections are numbered in accept order (the primary connects a resync's control
//! connection, and only once it is authenticated its new data links), and the first change
//! a resync makes closes every connection accepted before it.

use crate::wire::Message;

/// Accept order and the oldest connection whose messages are still applied.
#[derive(Debug, Default)]
pub struct ApplyGate {
    accepted: u64,
    oldest_admitted: u64,
}

/// Whether a message may be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Apply it.
    Apply,
    /// This node is primary now (promoted, or promoting): the old primary's connections
    /// close; nothing of theirs is applied.
    Promoted,
    /// The connection belongs to a mirroring round a newer resync replaced: it closes.
    Superseded,
}

impl ApplyGate {
    /// Numbers a new connection (accept order).
    pub fn accept(&mut self) -> u64 {
        self.accepted += 1;
        self.accepted
    }

    /// The resync on control connection `conn_id` starts changing data: connections
    /// accepted before it apply nothing more. The driver raises it once the messages being
    /// applied now have finished.
    pub fn supersede_older(&mut self, conn_id: u64) {
        self.oldest_admitted = self.oldest_admitted.max(conn_id);
    }

    /// This node is being promoted: every connection accepted so far belongs to the old
    /// primary and applies nothing more, even after a later demotion. Why: the promotion's
    /// fence closed them only at their next message; one that stayed quiet until this node
    /// was demoted again applied the old primary's stale writes (a resync's completion
    /// among them) over what this node wrote as primary (found by the simulation).
    pub fn close_all_accepted(&mut self) {
        self.oldest_admitted = self.accepted + 1;
    }

    /// Whether a message of connection `conn_id` may be applied, on a node that is
    /// (`fenced`) or is not being promoted.
    pub fn admit(&self, conn_id: u64, fenced: bool) -> Admit {
        if fenced {
            Admit::Promoted
        } else if conn_id < self.oldest_admitted {
            Admit::Superseded
        } else {
            Admit::Apply
        }
    }
}

/// Whether `msg`, on the primary's control connection, is a resync's change (the point from
/// which older connections must apply nothing more).
pub fn resync_change(msg: &Message) -> bool {
    matches!(
        msg,
        Message::ResyncData { .. }
            | Message::ResyncProgress { .. }
            | Message::WriteZeroes { .. }
            | Message::ResyncDone { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resync_closes_every_connection_accepted_before_it() {
        let mut gate = ApplyGate::default();
        let old_link = gate.accept();
        let control = gate.accept();
        let new_link = gate.accept();
        assert_eq!(gate.admit(old_link, false), Admit::Apply);
        gate.supersede_older(control);
        assert_eq!(gate.admit(old_link, false), Admit::Superseded);
        assert_eq!(gate.admit(control, false), Admit::Apply);
        assert_eq!(gate.admit(new_link, false), Admit::Apply);
        // A promotion closes them all.
        assert_eq!(gate.admit(new_link, true), Admit::Promoted);
        // A promotion closes every connection accepted before it, for good.
        let mut fenced = ApplyGate::default();
        let before = fenced.accept();
        fenced.close_all_accepted();
        let after = fenced.accept();
        assert_eq!(fenced.admit(before, false), Admit::Superseded);
        assert_eq!(fenced.admit(after, false), Admit::Apply);
        // An older resync's connection never lowers the gate again.
        gate.supersede_older(old_link);
        assert_eq!(gate.admit(old_link, false), Admit::Superseded);
    }

    #[test]
    fn only_resync_changes_supersede() {
        assert!(resync_change(&Message::ResyncDone {
            lun_key: 1,
            gen: Default::default()
        }));
        assert!(!resync_change(&Message::Ping { now_ms: 1 }));
        assert!(!resync_change(&Message::Flush { lun_key: 1 }));
    }
}
