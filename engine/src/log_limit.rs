//! A per-second cap on one kind of log line, shared by every core thread.
//!
//! Why: some failures repeat once per I/O. A thin LUN whose file system filled up answers
//! every write with SPACE ALLOCATION FAILED; logging each one (the integration test saw
//! 1,664 identical lines within 10 ms) floods the journal and costs the core threads more
//! than the failing I/O itself, at exactly the moment an administrator needs the log. The
//! first lines of each second are logged in full; the rest are counted, and the count is
//! reported with the next line that is logged.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

#[derive(Debug)]
pub struct LogLimit {
    per_second: u32,
    /// The second (since the process's first use of any limiter) `in_second` counts.
    second: AtomicU64,
    in_second: AtomicU32,
    suppressed: AtomicU64,
}

fn process_second() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

impl LogLimit {
    pub const fn new(per_second: u32) -> LogLimit {
        LogLimit {
            per_second,
            second: AtomicU64::new(0),
            in_second: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether this occurrence may be logged now; if so, with how many were suppressed
    /// since the last one logged.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(process_second())
    }

    /// [`LogLimit::allow`] at a given second. Concurrent callers may let a line or two
    /// more through at a second's boundary; the cap is for volume, not accounting.
    pub fn allow_at(&self, now_s: u64) -> Option<u64> {
        if self.second.swap(now_s, Ordering::Relaxed) != now_s {
            self.in_second.store(0, Ordering::Relaxed);
        }
        if self.in_second.fetch_add(1, Ordering::Relaxed) < self.per_second {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_each_second_and_reports_what_it_dropped() {
        let l = LogLimit::new(3);
        let first: Vec<_> = (0..10).map(|_| l.allow_at(5)).collect();
        assert_eq!(first[..3], [Some(0), Some(0), Some(0)]);
        assert!(first[3..].iter().all(Option::is_none));
        // The next second: logged again, with the 7 it held back.
        assert_eq!(l.allow_at(6), Some(7));
        assert_eq!(l.allow_at(6), Some(0));
    }

    #[test]
    fn a_quiet_limiter_logs_everything() {
        let l = LogLimit::new(3);
        for s in 0..100 {
            assert_eq!(l.allow_at(s), Some(0));
        }
    }
}
