//! Progress of a long background job (verify, sanitize) for `status` and the terminal:
//! bytes done of a total, the rate so far and the time left at that rate
//! (`replica::pair::Progress` estimates it, as for a resync).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use replica::pair::{Progress, ETA_UNKNOWN};

/// A job's counters: written by the job's thread, read by `status` without a lock.
#[derive(Debug)]
pub struct Job {
    started: Instant,
    total_bytes: AtomicU64,
    done_bytes: AtomicU64,
}

impl Job {
    pub fn new(total_bytes: u64) -> Job {
        Job {
            started: Instant::now(),
            total_bytes: AtomicU64::new(total_bytes),
            done_bytes: AtomicU64::new(0),
        }
    }

    /// `n` more bytes done.
    pub fn advance(&self, n: u64) {
        self.done_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// `(done, total)` bytes.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.done_bytes.load(Ordering::Relaxed),
            self.total_bytes.load(Ordering::Relaxed),
        )
    }

    /// "42.0% 812.3 MiB/s eta 8s" (eta unknown until something is done).
    pub fn summary(&self) -> String {
        let (done, total) = self.counts();
        let elapsed_ms = self.started.elapsed().as_millis() as u64;
        summary(done, total, elapsed_ms)
    }
}

/// The summary of `done` of `total` bytes after `elapsed_ms`.
pub fn summary(done: u64, total: u64, elapsed_ms: u64) -> String {
    let p = Progress {
        total_bytes: total,
        done_bytes: done,
        started_ms: 0,
        heard_eta_ms: ETA_UNKNOWN,
    };
    let (done, total, eta_ms) = p.estimate(elapsed_ms);
    let percent = if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    let rate = done as f64 / (1 << 20) as f64 / (elapsed_ms.max(1) as f64 / 1000.0);
    let eta = match eta_ms {
        ETA_UNKNOWN => "unknown".to_string(),
        ms => format!("{:.0}s", ms as f64 / 1000.0),
    };
    format!("{percent:.1}% {rate:.1} MiB/s eta {eta}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_gives_percent_rate_and_time_left() {
        // A quarter of 400 MiB in 2 s: 50 MiB/s, 6 s left.
        assert_eq!(
            summary(100 << 20, 400 << 20, 2000),
            "25.0% 50.0 MiB/s eta 6s"
        );
        assert_eq!(summary(0, 400 << 20, 10), "0.0% 0.0 MiB/s eta unknown");
        assert_eq!(summary(0, 0, 10), "100.0% 0.0 MiB/s eta unknown");
    }
}
