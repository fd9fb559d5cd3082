//! Liveness of the core threads, for the service manager's watchdog.
//!
//! Each core thread counts its timer ticks (every 250 ms while its loop turns, busy or
//! idle). The daemon's main thread keeps systemd's watchdog (`WATCHDOG=1`) only while every
//! core has ticked since its last look: a core wedged in a system call or a loop stops
//! the pings, and systemd restarts the daemon. A timer thread that pinged whatever the
//! cores do would hide exactly the failures the watchdog is for.

use std::sync::atomic::{AtomicU64, Ordering};

/// Tick counters, one per core thread.
pub struct CoreBeats {
    beats: Vec<AtomicU64>,
}

impl CoreBeats {
    pub fn new(cores: usize) -> CoreBeats {
        CoreBeats {
            beats: (0..cores).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Called by core `core` from its loop. Relaxed: only progress is read, not data.
    pub fn beat(&self, core: usize) {
        if let Some(b) = self.beats.get(core) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> Vec<u64> {
        self.beats
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }
}

/// The watchdog's view: which cores made progress between two looks.
pub struct Liveness {
    last: Vec<u64>,
}

impl Liveness {
    pub fn new(beats: &CoreBeats) -> Liveness {
        Liveness {
            last: beats.snapshot(),
        }
    }

    /// The cores that have not ticked since the previous call (empty: all alive).
    pub fn stalled(&mut self, beats: &CoreBeats) -> Vec<usize> {
        let now = beats.snapshot();
        let stalled = now
            .iter()
            .zip(&self.last)
            .enumerate()
            .filter(|(_, (n, l))| n == l)
            .map(|(i, _)| i)
            .collect();
        self.last = now;
        stalled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_core_that_stops_ticking_is_named_until_it_ticks_again() {
        let b = CoreBeats::new(3);
        let mut l = Liveness::new(&b);
        // Nobody ticked since the first look.
        assert_eq!(l.stalled(&b), vec![0, 1, 2]);
        b.beat(0);
        b.beat(1);
        b.beat(2);
        assert!(l.stalled(&b).is_empty());
        b.beat(0);
        b.beat(2);
        b.beat(2);
        assert_eq!(l.stalled(&b), vec![1]);
        b.beat(1);
        b.beat(0);
        b.beat(2);
        assert!(l.stalled(&b).is_empty());
    }

    #[test]
    fn a_beat_for_an_unknown_core_is_ignored() {
        let b = CoreBeats::new(1);
        b.beat(7);
        let mut l = Liveness::new(&b);
        b.beat(0);
        assert!(l.stalled(&b).is_empty());
    }
}
