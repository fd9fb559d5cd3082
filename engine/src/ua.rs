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
    /// The session id that caused it; `0` means "everyone, including the cause".
    origin: u64,
    asc: Asc,
}

#[derive(Debug, Default)]
pub struct UaLog {
    latest: AtomicU64,
    events: Mutex<VecDeque<Event>>,
}

impl UaLog {
    /// Records an event for every session except `origin` (0: for all sessions).
    pub fn raise(&self, origin: u64, asc: Asc) {
        let mut ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let epoch = self.latest.load(Ordering::Acquire) + 1;
        if ev.len() == LOG_LEN {
            ev.pop_front();
        }
        ev.push_back(Event { epoch, origin, asc });
        self.latest.store(epoch, Ordering::Release);
    }

    /// The current epoch: a new session starts here, seeing nothing that happened before.
    pub fn epoch(&self) -> u64 {
        self.latest.load(Ordering::Acquire)
    }

    /// Appends to `out` the events after `*seen` not caused by `session`, and advances `*seen`.
    pub fn collect(&self, session: u64, seen: &mut u64, out: &mut Vec<Asc>) {
        if self.latest.load(Ordering::Acquire) == *seen {
            return;
        }
        let ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let from = *seen;
        for e in ev.iter().filter(|e| e.epoch > from) {
            if e.origin != session && !out.contains(&e.asc) {
                out.push(e.asc);
            }
            *seen = e.epoch;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn others_see_it_once_and_the_cause_does_not() {
        let log = UaLog::default();
        let (mut seen_a, mut seen_b) = (log.epoch(), log.epoch());
        log.raise(1, Asc::MODE_PARAMETERS_CHANGED);
        let mut out = Vec::new();
        log.collect(1, &mut seen_a, &mut out);
        assert!(out.is_empty());
        log.collect(2, &mut seen_b, &mut out);
        assert_eq!(out, vec![Asc::MODE_PARAMETERS_CHANGED]);
        out.clear();
        log.collect(2, &mut seen_b, &mut out);
        assert!(out.is_empty(), "reported once");
    }
}
