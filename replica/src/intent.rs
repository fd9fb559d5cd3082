//! The write-intent log of a replicated LUN on the primary (DRBD's activity log, in regions).
//!
//! Contract: before a write is issued (locally or to the peer), every region it touches is
//! recorded in the persisted metadata bitmap. After a crash, that bitmap therefore names every
//! region where the two nodes may differ (the unacknowledged tail), and the next resync copies
//! those regions only instead of comparing the whole LUN.
//!
//! Writers only read atomics on the fast path: a region already *durable* costs two loads. A
//! write to a region that is not yet durable *wants* it and is retried later; the keeper thread
//! (the engine's replication driver) persists every wanted region in one metadata write (group commit) and then
//! marks them durable. Regions no write touched for a cooling period are forgotten again, each
//! under the LUN's range lock for that region, so no write to it is in flight: a writer checks
//! the log while holding its own range lock, so it either sees the region durable and keeps the
//! keeper out until it completes, or sees it forgotten and asks again.

use std::sync::atomic::{AtomicU64, Ordering};

/// Per-region bits of one LUN.
#[derive(Debug)]
pub struct IntentLog {
    region_bytes: u64,
    regions: u64,
    /// The persisted metadata covers these regions.
    durable: Vec<AtomicU64>,
    /// Asked for by writers, not yet durable.
    wanted: Vec<AtomicU64>,
    /// Written since the last cooling pass.
    touched: Vec<AtomicU64>,
}

fn bits(n: u64) -> Vec<AtomicU64> {
    (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
}

fn set(v: &[AtomicU64], r: u64) {
    let (w, b) = ((r / 64) as usize, 1u64 << (r % 64));
    // Test first: the common case (already set) stays a shared, read-only cache line.
    if v[w].load(Ordering::Relaxed) & b == 0 {
        v[w].fetch_or(b, Ordering::AcqRel);
    }
}

fn get(v: &[AtomicU64], r: u64) -> bool {
    v[(r / 64) as usize].load(Ordering::Acquire) & (1u64 << (r % 64)) != 0
}

fn collect(v: &[AtomicU64], mut keep: impl FnMut(u64, u64) -> u64) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, w) in v.iter().enumerate() {
        let word = keep(i as u64, w.load(Ordering::Acquire));
        for b in 0..64 {
            if word & (1 << b) != 0 {
                out.push(i as u64 * 64 + b);
            }
        }
    }
    out
}

impl IntentLog {
    /// A log for a LUN of `size_bytes` in regions of `region_bytes` (> 0), nothing durable.
    pub fn new(size_bytes: u64, region_bytes: u64) -> IntentLog {
        assert!(region_bytes > 0, "region size must be positive");
        let regions = size_bytes.div_ceil(region_bytes).max(1);
        IntentLog {
            region_bytes,
            regions,
            durable: bits(regions),
            wanted: bits(regions),
            touched: bits(regions),
        }
    }

    /// The regions `[offset, offset + len)` touches (at least the one holding `offset`).
    fn span(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        let last_byte = offset.saturating_add(len.max(1) - 1);
        let first = (offset / self.region_bytes).min(self.regions - 1);
        let last = (last_byte / self.region_bytes).min(self.regions - 1);
        first..=last
    }

    /// Whether a write to `[offset, offset + len)` may be issued now: every region it touches
    /// is durable. Otherwise the missing regions are wanted and the caller retries later.
    pub fn ready(&self, offset: u64, len: u64) -> bool {
        let mut ready = true;
        for r in self.span(offset, len) {
            set(&self.touched, r);
            if !get(&self.durable, r) {
                set(&self.wanted, r);
                ready = false;
            }
        }
        ready
    }

    /// Takes the wanted regions that are not durable yet (they stay wanted only if the
    /// caller fails to persist them and calls [`IntentLog::want_again`]).
    pub fn take_wanted(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.wanted.iter().enumerate() {
            let word = w.swap(0, Ordering::AcqRel) & !self.durable[i].load(Ordering::Acquire);
            for b in 0..64 {
                if word & (1 << b) != 0 {
                    out.push(i as u64 * 64 + b);
                }
            }
        }
        out
    }

    /// Puts regions back after a failed persist.
    pub fn want_again(&self, regions: &[u64]) {
        for &r in regions {
            set(&self.wanted, r);
        }
    }

    /// Marks regions durable: call only once the metadata naming them is on stable storage.
    pub fn made_durable(&self, regions: &[u64]) {
        for &r in regions {
            set(&self.durable, r);
        }
    }

    /// Every durable region.
    pub fn durable_regions(&self) -> Vec<u64> {
        collect(&self.durable, |_, w| w)
    }

    /// Durable regions no write touched since the last call; the touched marks restart.
    pub fn idle_regions(&self) -> Vec<u64> {
        let idle = collect(&self.durable, |i, w| {
            w & !self.touched[i as usize].load(Ordering::Acquire)
        });
        for t in &self.touched {
            t.store(0, Ordering::Release);
        }
        idle
    }

    /// Forgets one region. Call only while holding the LUN's range lock over the whole
    /// region (no write to it in flight); persist afterwards.
    pub fn forget(&self, region: u64) {
        let (w, b) = ((region / 64) as usize, 1u64 << (region % 64));
        self.durable[w].fetch_and(!b, Ordering::AcqRel);
    }

    /// Bytes per region.
    pub fn region_bytes(&self) -> u64 {
        self.region_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_waits_until_its_regions_are_durable() {
        let log = IntentLog::new(10 << 20, 1 << 20);
        // Spans regions 1 and 2.
        assert!(!log.ready((2 << 20) - 512, 1024));
        assert!(!log.ready((2 << 20) - 512, 1024));
        let wanted = log.take_wanted();
        assert_eq!(wanted, vec![1, 2]);
        assert!(log.take_wanted().is_empty(), "taken once");
        assert!(
            !log.ready((2 << 20) - 512, 1024),
            "not durable until persisted"
        );
        log.made_durable(&wanted);
        assert!(log.ready((2 << 20) - 512, 1024));
        assert!(log.ready(1 << 20, 4096));
        assert!(!log.ready(3 << 20, 4096));
        assert_eq!(log.durable_regions(), vec![1, 2]);
    }

    #[test]
    fn a_failed_persist_leaves_the_regions_wanted() {
        let log = IntentLog::new(4 << 20, 1 << 20);
        assert!(!log.ready(0, 4096));
        let w = log.take_wanted();
        log.want_again(&w);
        assert_eq!(log.take_wanted(), vec![0]);
    }

    #[test]
    fn only_regions_nobody_wrote_since_the_last_pass_cool_down() {
        let log = IntentLog::new(200 << 20, 1 << 20);
        for r in [0u64, 70, 130] {
            assert!(!log.ready(r << 20, 4096));
        }
        log.made_durable(&log.take_wanted());
        // All three were touched by the writes above.
        assert!(log.idle_regions().is_empty());
        assert!(log.ready(70 << 20, 4096));
        assert_eq!(log.idle_regions(), vec![0, 130]);
        log.forget(0);
        log.forget(130);
        assert_eq!(log.durable_regions(), vec![70]);
        assert!(
            !log.ready(0, 1),
            "a forgotten region must be asked for again"
        );
        // The last region of a LUN whose size is not a multiple of the region.
        let odd = IntentLog::new((3 << 20) + 5, 1 << 20);
        assert!(!odd.ready((3 << 20) + 4, 1));
        assert_eq!(odd.take_wanted(), vec![3]);
    }
}
