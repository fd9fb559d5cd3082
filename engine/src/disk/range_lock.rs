//! Per-LUN block range locks, shared by every core.
//!
//! Writes hold the range they modify while their I/O is in flight, so operations that must
//! be atomic against other writes (COMPARE AND WRITE, ORWRITE, WRITE ATOMIC, EXTENDED COPY
//! destinations) never interleave with an overlapping write, and overlapping writes apply in
//! one order (what the replica link needs to keep both nodes identical). Non-overlapping
//! writes never wait for each other.
//!
//! A caller that cannot get its range does not block its core thread (the holder may be a
//! write on that very core, completed only by the same event loop): it gets `None` and
//! retries later.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Ranges held at once per LUN: a bound far above queue depth x sessions in practice.
const MAX_HELD: usize = 65_536;

#[derive(Debug, Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64, u64)>>,
    next_id: AtomicU64,
    /// Ranges of WRITE ATOMIC commands in flight: readers must not see them half done.
    atomic: Mutex<Vec<(u64, u64, u64)>>,
    atomic_active: AtomicU64,
}

/// A held range `[start, end)` in blocks; released when dropped.
#[derive(Debug)]
pub struct RangeGuard {
    lock: Arc<RangeLock>,
    id: u64,
    atomic: bool,
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut h = self.lock.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pos) = h.iter().position(|&(_, _, id)| id == self.id) {
            h.swap_remove(pos);
        }
        drop(h);
        if self.atomic {
            let mut a = self.lock.atomic.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(pos) = a.iter().position(|&(_, _, id)| id == self.id) {
                a.swap_remove(pos);
            }
            self.lock.atomic_active.fetch_sub(1, Ordering::Release);
        }
    }
}

impl RangeLock {
    /// Takes `[start, end)` if nothing overlapping is held.
    pub fn try_lock(self: &Arc<Self>, start: u64, end: u64) -> Option<RangeGuard> {
        debug_assert!(start < end, "empty range");
        let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if h.len() >= MAX_HELD || h.iter().any(|&(s, e, _)| s < end && start < e) {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        h.push((start, end, id));
        Some(RangeGuard {
            lock: Arc::clone(self),
            id,
            atomic: false,
        })
    }

    /// Waits for `[start, end)` (polling every `poll`). For background threads only
    /// (resync, verify, sanitize): a core thread never blocks, it retries from its loop.
    pub fn lock_waiting(
        self: &Arc<Self>,
        start: u64,
        end: u64,
        poll: std::time::Duration,
    ) -> RangeGuard {
        loop {
            if let Some(g) = self.try_lock(start, end) {
                return g;
            }
            std::thread::sleep(poll);
        }
    }

    /// Like [`try_lock`](Self::try_lock), and readers of the range wait until it is released.
    pub fn try_lock_atomic(self: &Arc<Self>, start: u64, end: u64) -> Option<RangeGuard> {
        let mut g = self.try_lock(start, end)?;
        self.atomic_active.fetch_add(1, Ordering::Acquire);
        self.atomic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((start, end, g.id));
        g.atomic = true;
        Some(g)
    }

    /// Whether a read of `[start, end)` may run now. One atomic load when no WRITE ATOMIC
    /// is in flight, which is nearly always.
    pub fn readable(&self, start: u64, end: u64) -> bool {
        if self.atomic_active.load(Ordering::Acquire) == 0 {
            return true;
        }
        !self
            .atomic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|&(s, e, _)| s < end && start < e)
    }

    /// Number of ranges held (for tests and metrics).
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_ranges_exclude_and_disjoint_ones_do_not() {
        let l = Arc::new(RangeLock::default());
        let a = l.try_lock(0, 8).unwrap();
        assert!(l.try_lock(7, 9).is_none(), "overlap must wait");
        let b = l.try_lock(8, 16).expect("adjacent ranges do not overlap");
        drop(a);
        let c = l.try_lock(0, 8).expect("released on drop");
        assert_eq!(l.held(), 2);
        drop((b, c));
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn readers_wait_only_for_atomic_writes() {
        let l = Arc::new(RangeLock::default());
        let w = l.try_lock(0, 8).unwrap();
        assert!(l.readable(0, 8), "ordinary writes do not block readers");
        let a = l.try_lock_atomic(16, 24).unwrap();
        assert!(!l.readable(20, 21));
        assert!(l.readable(8, 16));
        drop(a);
        assert!(l.readable(20, 21));
        drop(w);
    }
}
