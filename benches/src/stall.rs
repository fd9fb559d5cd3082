//! Where a run stalled: the longest interval in which no command completed anywhere in
//! the bench, and the outages of `--reconnect` (from a connection failure to the first
//! command completed after it, in any session).
//!
//! Completions are recorded in a bitmap of 1 ms buckets shared by all sessions: a session
//! marks the bucket of each completion, mostly with a plain load (the bucket is already
//! marked), so the hot path writes a shared cache line about once per millisecond rather
//! than once per command. The longest stall is then read off the bitmap with a resolution
//! of 1 ms. Outages are rare and recorded exactly, under a mutex.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Words per lazily allocated chunk of the bitmap (8 KiB, 65.536 s of buckets).
const CHUNK_WORDS: usize = 1024;
const CHUNK_MS: u64 = CHUNK_WORDS as u64 * 64;
/// The bitmap covers this long after the timeline's base (24 h, 1,319 chunk pointers):
/// completions later than that are not recorded, and the stall is computed over the
/// covered part only.
pub const HORIZON_MS: u64 = 24 * 3600 * 1000;
const CHUNKS: usize = HORIZON_MS.div_ceil(CHUNK_MS) as usize;

/// Completion times and outages of one run, shared by its sessions.
pub struct Timeline {
    base: Instant,
    chunks: Box<[OnceLock<Box<[AtomicU64]>>]>,
    /// A hint for the hot path: an outage waits for its first completion.
    outage_open: AtomicBool,
    outages: Mutex<OutageLog>,
}

impl Timeline {
    /// A timeline whose bucket 0 starts at `base` (before the run starts).
    pub fn new(base: Instant) -> Self {
        Self {
            base,
            chunks: (0..CHUNKS).map(|_| OnceLock::new()).collect(),
            outage_open: AtomicBool::new(false),
            outages: Mutex::new(OutageLog::default()),
        }
    }

    fn since_base(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.base)
    }

    fn ms_of(&self, t: Instant) -> u64 {
        self.since_base(t).as_millis().min(u64::MAX as u128) as u64
    }

    /// A command completed (with GOOD status) at `now`.
    pub fn completed(&self, now: Instant) {
        let ms = self.ms_of(now);
        if ms < HORIZON_MS {
            let words = self.chunks[(ms / CHUNK_MS) as usize]
                .get_or_init(|| (0..CHUNK_WORDS).map(|_| AtomicU64::new(0)).collect());
            let w = &words[((ms % CHUNK_MS) / 64) as usize];
            let bit = 1u64 << (ms % 64);
            // Most completions land in a bucket already marked: loading first keeps the
            // line shared between cores instead of writing it at every completion.
            if w.load(Ordering::Relaxed) & bit == 0 {
                w.fetch_or(bit, Ordering::Relaxed);
            }
        }
        if self.outage_open.load(Ordering::Relaxed) {
            if let Ok(mut log) = self.outages.lock() {
                log.completed(self.since_base(now));
                self.outage_open.store(log.is_open(), Ordering::Relaxed);
            }
        }
    }

    /// A session found its connection lost at `at`.
    pub fn connection_failed(&self, at: Instant) {
        if let Ok(mut log) = self.outages.lock() {
            log.connection_failed(self.since_base(at));
            self.outage_open.store(log.is_open(), Ordering::Relaxed);
        }
    }

    /// The longest interval in `[start, end]` without a completion, in whole ms.
    pub fn stall_max_ms(&self, start: Instant, end: Instant) -> u64 {
        let from = self.ms_of(start).min(HORIZON_MS - 1);
        let to = self.ms_of(end).clamp(from, HORIZON_MS - 1);
        let words: Vec<u64> = (0..=to / 64)
            .map(|w| {
                let (c, i) = (
                    (w / CHUNK_WORDS as u64) as usize,
                    (w % CHUNK_WORDS as u64) as usize,
                );
                self.chunks[c]
                    .get()
                    .map_or(0, |words| words[i].load(Ordering::Relaxed))
            })
            .collect();
        longest_gap_ms(&words, from, to)
    }

    /// The outages, their start times made relative to `run_start`.
    pub fn outages(&self, run_start: Instant) -> Vec<Outage> {
        let offset = self.since_base(run_start);
        let Ok(log) = self.outages.lock() else {
            return Vec::new();
        };
        log.outages
            .iter()
            .map(|o| Outage {
                start: o.start.saturating_sub(offset),
                ..o.clone()
            })
            .collect()
    }
}

/// The longest interval without a completion between bucket `from_ms` (the run's start)
/// and bucket `to_ms` (its end), given `words`, a bitmap of 1 ms buckets in which a
/// command completed (bit `b % 64` of word `b / 64`; buckets past its end are empty).
/// The interval between completions in buckets `a` and `b` counts as `b - a` ms, so the
/// result is exact to within a millisecond; the run's start and end bound the first and
/// last intervals (a run that never completes anything stalled for all of it).
pub fn longest_gap_ms(words: &[u64], from_ms: u64, to_ms: u64) -> u64 {
    let mut prev = from_ms;
    let mut longest = 0;
    let mut w = from_ms / 64;
    while w * 64 <= to_ms {
        let mut bits = words.get(w as usize).copied().unwrap_or(0);
        while bits != 0 {
            let b = w * 64 + bits.trailing_zeros() as u64;
            bits &= bits - 1;
            if b < from_ms || b > to_ms {
                continue;
            }
            longest = longest.max(b - prev);
            prev = b;
        }
        w += 1;
    }
    longest.max(to_ms.saturating_sub(prev))
}

/// One outage: from the first connection failure while none was open to the first
/// command completed (in any session) after it. Times are offsets from a base instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outage {
    pub start: Duration,
    /// From `start` to the first completion after it; None if none came.
    pub first_io_after: Option<Duration>,
    /// Connections found lost during the outage (one per session, or more if a
    /// session's new connection failed again before anything completed).
    pub connection_failures: u32,
}

/// The outages of a run, as a state machine fed failures and completions in time order
/// (a failure joins the outage still waiting for its first completion; a completion
/// closes it).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OutageLog {
    pub outages: Vec<Outage>,
}

impl OutageLog {
    pub fn is_open(&self) -> bool {
        self.outages
            .last()
            .is_some_and(|o| o.first_io_after.is_none())
    }

    pub fn connection_failed(&mut self, at: Duration) {
        match self.outages.last_mut() {
            Some(o) if o.first_io_after.is_none() => o.connection_failures += 1,
            _ => self.outages.push(Outage {
                start: at,
                first_io_after: None,
                connection_failures: 1,
            }),
        }
    }

    /// A completion at `at`. One timed before the outage began (its session took the
    /// time, then another session reported the failure first) does not end it.
    pub fn completed(&mut self, at: Duration) {
        if let Some(o) = self.outages.last_mut() {
            if o.first_io_after.is_none() && at > o.start {
                o.first_io_after = Some(at - o.start);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(buckets: &[u64]) -> Vec<u64> {
        let mut w = vec![0u64; 4];
        for &b in buckets {
            w[(b / 64) as usize] |= 1 << (b % 64);
        }
        w
    }

    #[test]
    fn longest_gap_between_completions_and_at_the_edges() {
        // Completions in every bucket: 1 ms apart.
        let all: Vec<u64> = (0..=200).collect();
        assert_eq!(longest_gap_ms(&bitmap(&all), 0, 200), 1);
        // A hole of 100 ms in the middle (buckets 50..=149 empty): 49 -> 150.
        let holed: Vec<u64> = (0..50).chain(150..=200).collect();
        assert_eq!(longest_gap_ms(&bitmap(&holed), 0, 200), 101);
        // Nothing completed at all: the whole run is one stall.
        assert_eq!(longest_gap_ms(&[], 10, 210), 200);
        // The run's start to the first completion, and the last to its end.
        assert_eq!(longest_gap_ms(&bitmap(&[40, 41, 42]), 10, 50), 30);
        assert_eq!(longest_gap_ms(&bitmap(&[10, 11, 12]), 10, 90), 78);
        // Completions outside the window do not shorten a stall inside it.
        assert_eq!(longest_gap_ms(&bitmap(&[5, 100, 180, 250]), 20, 200), 80);
        // A window inside one bucket.
        assert_eq!(longest_gap_ms(&bitmap(&[7]), 7, 7), 0);
    }

    #[test]
    fn timeline_marks_buckets_and_measures_the_stall() {
        let base = Instant::now();
        let t = Timeline::new(base);
        let at = |ms: u64| base + Duration::from_millis(ms);
        for ms in (0..300).chain(800..1000) {
            t.completed(at(ms));
            t.completed(at(ms) + Duration::from_micros(500));
        }
        assert_eq!(t.stall_max_ms(at(0), at(1000)), 501);
        // Beyond the first chunk of the bitmap.
        t.completed(at(CHUNK_MS + 5));
        assert_eq!(
            t.stall_max_ms(at(CHUNK_MS), at(CHUNK_MS + 10)),
            5,
            "from the start to the completion at +5"
        );
        // Past the horizon nothing is recorded, and nothing panics.
        t.completed(at(HORIZON_MS + 5));
        assert!(t.stall_max_ms(at(0), at(HORIZON_MS + 10)) >= HORIZON_MS - CHUNK_MS - 10);
    }

    #[test]
    fn outage_from_failure_to_the_first_completion_after_it() {
        let ms = Duration::from_millis;
        let mut log = OutageLog::default();
        log.completed(ms(5));
        assert!(log.outages.is_empty(), "a completion alone is no outage");
        log.connection_failed(ms(1000));
        assert!(log.is_open());
        // Other sessions lose theirs too before anything completes: the same outage.
        log.connection_failed(ms(1010));
        // Timed before the failure (another session's): does not end it.
        log.completed(ms(999));
        assert!(log.is_open());
        log.completed(ms(1700));
        assert!(!log.is_open());
        log.completed(ms(1800));
        // A later failure is a new outage, never closed here.
        log.connection_failed(ms(3000));
        assert_eq!(
            log.outages,
            vec![
                Outage {
                    start: ms(1000),
                    first_io_after: Some(ms(700)),
                    connection_failures: 2,
                },
                Outage {
                    start: ms(3000),
                    first_io_after: None,
                    connection_failures: 1,
                },
            ]
        );
    }

    #[test]
    fn timeline_outages_are_relative_to_the_run_start() {
        let base = Instant::now();
        let t = Timeline::new(base);
        let at = |ms: u64| base + Duration::from_millis(ms);
        t.completed(at(100));
        t.connection_failed(at(1100));
        t.completed(at(1600));
        let o = t.outages(at(100));
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].start, Duration::from_millis(1000));
        assert_eq!(o[0].first_io_after, Some(Duration::from_millis(500)));
    }
}
