//! Unit attention conditions that one I_T nexus causes for the others (LUN reset, mode
//! parameter changes, later reservation changes), shared across core threads.
//!
//! A LUN keeps a short log of events, each with a monotonically increasing epoch and the
//! session that caused it. Each session remembers the last epoch it has seen per LUN and,
//! before running a command, collects the events it has not seen and did not cause. The
//! fast path is one atomic load per command.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use proto::scsi::sense::Asc;

/// Events kept per LUN. A session further behind than this sees the newest events only,
/// which is what a target with a bounded UA queue does (SAM-5 allows reporting the most
/// important one).
const LOG_LEN: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Event {
    epoch: u64,
    /// The session id that caused it.
    origin: u64,
    asc: Asc,
    /// Only for the I_T nexus with this tag (reservation events name their nexus).
    only: Option<u64>,
    /// For state changes (mode parameters): a tag of the state after the change. Such
    /// events coalesce: a nexus is told only if the state now differs from the one it knew,
    /// so a parameter set and reset while it was idle raises nothing.
    state: Option<u64>,
}

/// What one session has seen of one LUN's events.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    epoch: u64,
    state: u64,
}

#[derive(Debug, Default)]
pub struct UaLog {
    latest: AtomicU64,
    events: Mutex<VecDeque<Event>>,
}

impl UaLog {
    /// Records an event for every session except `origin` (0, which no session has, means
    /// every session).
    pub fn raise(&self, origin: u64, asc: Asc) {
        self.push(origin, asc, None, None);
    }

    /// Records an event for the one I_T nexus tagged `nexus`.
    pub fn raise_to(&self, nexus: u64, asc: Asc) {
        self.push(0, asc, None, Some(nexus));
    }

    /// Records a state change (the state after it is tagged `state`).
    pub fn raise_state_change(&self, origin: u64, asc: Asc, state: u64) {
        self.push(origin, asc, Some(state), None);
    }

    fn push(&self, origin: u64, asc: Asc, state: Option<u64>, only: Option<u64>) {
        let mut ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let epoch = self.latest.load(Ordering::Acquire) + 1;
        if ev.len() == LOG_LEN {
            ev.pop_front();
        }
        ev.push_back(Event {
            epoch,
            origin,
            asc,
            state,
            only,
        });
        self.latest.store(epoch, Ordering::Release);
    }

    /// Where a new session starts: it sees nothing that happened before, and knows the
    /// state tagged `state`.
    pub fn start(&self, state: u64) -> Seen {
        Seen {
            epoch: self.latest.load(Ordering::Acquire),
            state,
        }
    }

    /// Appends to `out` what `session` (of the nexus tagged `nexus`) has not seen and did
    /// not cause, and advances `seen`.
    pub fn collect(&self, session: u64, nexus: u64, seen: &mut Seen, out: &mut Vec<Asc>) {
        if self.latest.load(Ordering::Acquire) == seen.epoch {
            return;
        }
        let ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let from = seen.epoch;
        // The last state change made by someone else, not superseded by one of ours.
        let mut foreign: Option<(u64, Asc)> = None;
        for e in ev.iter().filter(|e| e.epoch > from) {
            seen.epoch = e.epoch;
            if e.only.is_some_and(|n| n != nexus) {
                continue;
            }
            match e.state {
                Some(st) if e.origin == session => {
                    seen.state = st;
                    foreign = None;
                }
                Some(st) => foreign = Some((st, e.asc)),
                None if e.origin != session && !out.contains(&e.asc) => out.push(e.asc),
                None => {}
            }
        }
        if let Some((st, asc)) = foreign {
            if st != seen.state && !out.contains(&asc) {
                out.push(asc);
            }
            seen.state = st;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_undone_while_idle_raises_nothing_but_a_real_change_does() {
        let log = UaLog::default();
        let (mut a, mut b) = (log.start(0), log.start(0));
        log.raise_state_change(1, Asc::MODE_PARAMETERS_CHANGED, 5);
        log.raise_state_change(1, Asc::MODE_PARAMETERS_CHANGED, 0);
        let mut out = Vec::new();
        log.collect(2, 0, &mut b, &mut out);
        assert!(out.is_empty(), "net state unchanged: no UA");
        log.raise_state_change(1, Asc::MODE_PARAMETERS_CHANGED, 7);
        log.collect(2, 0, &mut b, &mut out);
        assert_eq!(out, vec![Asc::MODE_PARAMETERS_CHANGED]);
        out.clear();
        log.collect(1, 0, &mut a, &mut out);
        assert!(out.is_empty(), "the cause is not told");
        // B changes it back: A, which last set 7, must hear about it.
        log.raise_state_change(2, Asc::MODE_PARAMETERS_CHANGED, 0);
        log.collect(1, 0, &mut a, &mut out);
        assert_eq!(out, vec![Asc::MODE_PARAMETERS_CHANGED]);
    }

    #[test]
    fn others_see_it_once_and_the_cause_does_not() {
        let log = UaLog::default();
        let (mut seen_a, mut seen_b) = (log.start(0), log.start(0));
        log.raise(1, Asc::MODE_PARAMETERS_CHANGED);
        let mut out = Vec::new();
        log.collect(1, 0, &mut seen_a, &mut out);
        assert!(out.is_empty());
        log.collect(2, 0, &mut seen_b, &mut out);
        assert_eq!(out, vec![Asc::MODE_PARAMETERS_CHANGED]);
        out.clear();
        log.collect(2, 0, &mut seen_b, &mut out);
        assert!(out.is_empty(), "reported once");
        log.raise_to(7, Asc::RESERVATIONS_PREEMPTED);
        log.collect(2, 0, &mut seen_b, &mut out);
        assert!(out.is_empty(), "addressed to another nexus");
        let mut seen_c = Seen { epoch: 0, state: 0 };
        log.collect(3, 7, &mut seen_c, &mut out);
        assert!(out.contains(&Asc::RESERVATIONS_PREEMPTED));
    }
}
