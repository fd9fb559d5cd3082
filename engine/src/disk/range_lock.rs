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
//!
//! A write whose local side is done but whose answer waits for the peer is *parked*
//! ([`RangeGuard::park`]): it still keeps other writes out, but a resync's region copy
//! ([`RangeLock::lock_for_copy`]) may read under it, since its data is final. Why: while
//! the peer is away in `suspend` mode, such writes are held until a resync has copied
//! their regions; a copy that waited for them waited forever (the failover rig: a new
//! primary answered nothing, its resync at 0% for good).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Ranges held at once per LUN: a bound far above queue depth x sessions in practice.
const MAX_HELD: usize = 65_536;

/// One held range: `[start, end)` in blocks, its guard's id, and whether it is parked.
#[derive(Debug, Clone, Copy)]
struct Held {
    start: u64,
    end: u64,
    id: u64,
    parked: bool,
}

impl Held {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
}

#[derive(Debug, Default)]
pub struct RangeLock {
    held: Mutex<Vec<Held>>,
    next_id: AtomicU64,
    /// Ranges of WRITE ATOMIC commands in flight: readers must not see them half done.
    atomic: Mutex<Vec<(u64, u64, u64)>>,
    atomic_active: AtomicU64,
    /// Drains waiting for the whole LUN ([`RangeLock::drain`]): while any does, no new range
    /// is granted, so the writes already running are the last before it.
    draining: AtomicU32,
    /// Ranges released since [`RangeLock::track_writes`] (a snapshot staged while writes go
    /// on, snapshot/staging.rs).
    track: WriteTrack,
}

/// Ranges tracked at most: beyond, the staging is given up (the cut clones the whole
/// file under its hold, as without staging). 16 MiB of memory per LUN at most.
const TRACKED_MAX: usize = 1 << 20;

/// The block ranges written since tracking started. Why a range is noted when its guard
/// is released, and the flag read after: a write released before tracking started was
/// complete before the staging clone began (so the clone has it), and one released after
/// is noted; no barrier is needed for writes in flight when tracking starts.
#[derive(Debug, Default)]
struct WriteTrack {
    on: std::sync::atomic::AtomicBool,
    overflowed: std::sync::atomic::AtomicBool,
    ranges: Mutex<Vec<(u64, u64)>>,
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
        let released = h.iter().position(|r| r.id == self.id).map(|pos| {
            let r = h.swap_remove(pos);
            (r.start, r.end)
        });
        drop(h);
        // After the write it guarded is complete (see WriteTrack).
        if let Some((start, end)) = released {
            self.lock.note_written(start, end);
        }
        if self.atomic {
            let mut a = self.lock.atomic.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(pos) = a.iter().position(|&(_, _, id)| id == self.id) {
                a.swap_remove(pos);
            }
            self.lock.atomic_active.fetch_sub(1, Ordering::Release);
        }
    }
}

impl RangeGuard {
    /// The holder's own I/O is done and its data final; it only waits for the peer (its
    /// ack, or, while the peer is away, the resync that copies its region). Writes still
    /// wait for the range; a resync's copy no longer does (see the module docs). For good:
    /// a parked range is never written again by its holder.
    pub fn park(&self) {
        let mut h = self.lock.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = h.iter_mut().find(|r| r.id == self.id) {
            r.parked = true;
        }
    }
}

impl RangeLock {
    /// Takes `[start, end)` if nothing overlapping is held.
    pub fn try_lock(self: &Arc<Self>, start: u64, end: u64) -> Option<RangeGuard> {
        self.try_lock_if(start, end, |_| true)
    }

    /// Takes `[start, end)` unless an overlapping range `blocks` (a predicate on it).
    fn try_lock_if(
        self: &Arc<Self>,
        start: u64,
        end: u64,
        blocks: impl Fn(&Held) -> bool,
    ) -> Option<RangeGuard> {
        if self.draining.load(Ordering::Acquire) > 0 {
            return None;
        }
        self.grant_if(start, end, blocks)
    }

    fn grant_if(
        self: &Arc<Self>,
        start: u64,
        end: u64,
        blocks: impl Fn(&Held) -> bool,
    ) -> Option<RangeGuard> {
        debug_assert!(start < end, "empty range");
        let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if h.len() >= MAX_HELD || h.iter().any(|r| r.overlaps(start, end) && blocks(r)) {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        h.push(Held {
            start,
            end,
            id,
            parked: false,
        });
        Some(RangeGuard {
            lock: Arc::clone(self),
            id,
            atomic: false,
        })
    }

    /// For a resync's copy of `[start, end)`: waits (polling every `poll`) only for
    /// overlapping ranges that are not parked, then holds it against writes as
    /// [`lock_waiting`](Self::lock_waiting) does. A parked write's data is final, so the
    /// copy carries it; its range stays held, so no other write changes the region under
    /// the copy. A background thread only.
    pub fn lock_for_copy(
        self: &Arc<Self>,
        start: u64,
        end: u64,
        poll: std::time::Duration,
    ) -> RangeGuard {
        self.wait_if(start, end, poll, |r| !r.parked)
    }

    /// Waits for `[start, end)` (polling every `poll`). For background threads only
    /// (resync, verify, sanitize): a core thread never blocks, it retries from its loop.
    pub fn lock_waiting(
        self: &Arc<Self>,
        start: u64,
        end: u64,
        poll: std::time::Duration,
    ) -> RangeGuard {
        self.wait_if(start, end, poll, |_| true)
    }

    /// Polls [`try_lock_if`](Self::try_lock_if) every `poll` until it succeeds.
    fn wait_if(
        self: &Arc<Self>,
        start: u64,
        end: u64,
        poll: std::time::Duration,
        blocks: impl Fn(&Held) -> bool,
    ) -> RangeGuard {
        loop {
            if let Some(g) = self.try_lock_if(start, end, &blocks) {
                return g;
            }
            std::thread::sleep(poll);
        }
    }

    /// Holds `[0, end)` (a whole LUN) once every range held now is released, granting no
    /// new range meanwhile (writes retry from their loops), or gives up after `timeout`
    /// (`None`: something held its range that long, a peer that stopped answering for
    /// instance). A snapshot's cut: when it returns, every write that started before it
    /// has finished, and none runs until the guard drops. A background thread only.
    pub fn drain(
        self: &Arc<Self>,
        end: u64,
        poll: std::time::Duration,
        timeout: std::time::Duration,
    ) -> Option<RangeGuard> {
        self.draining.fetch_add(1, Ordering::AcqRel);
        let start = std::time::Instant::now();
        let got = loop {
            if let Some(g) = self.grant_if(0, end.max(1), |_| true) {
                break Some(g);
            }
            if start.elapsed() >= timeout {
                break None;
            }
            std::thread::sleep(poll);
        };
        // Held or given up: the whole range keeps every write out by itself from here.
        self.draining.fetch_sub(1, Ordering::AcqRel);
        got
    }

    /// Starts (or restarts, forgetting what was noted) tracking the ranges written from
    /// now on: every guard released from here is noted (reads under a range too: that only
    /// clones a range again), and [`note_written`](Self::note_written) adds writes made
    /// without a guard (the secondary's applies).
    pub fn track_writes(&self) {
        let mut r = self.track.ranges.lock().unwrap_or_else(|p| p.into_inner());
        r.clear();
        self.track.overflowed.store(false, Ordering::SeqCst);
        self.track.on.store(true, Ordering::SeqCst);
    }

    /// Stops tracking and forgets what was noted.
    pub fn stop_tracking(&self) {
        self.track.on.store(false, Ordering::SeqCst);
        self.track
            .ranges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Whether writes are being tracked.
    pub fn tracking(&self) -> bool {
        self.track.on.load(Ordering::SeqCst)
    }

    /// Notes `[start, end)` (blocks) written, once the write is complete, if tracking.
    pub fn note_written(&self, start: u64, end: u64) {
        if !self.track.on.load(Ordering::SeqCst) || self.track.overflowed.load(Ordering::Relaxed) {
            return;
        }
        let mut r = self.track.ranges.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() >= TRACKED_MAX {
            self.track.overflowed.store(true, Ordering::Relaxed);
            r.clear();
            return;
        }
        r.push((start, end));
    }

    /// How many ranges were noted (before merging).
    pub fn written_count(&self) -> usize {
        self.track
            .ranges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Takes the ranges noted so far, sorted and merged, and goes on tracking; `None` if
    /// more than the bound were written (what was written is unknown).
    pub fn take_written(&self) -> Option<Vec<(u64, u64)>> {
        let mut v =
            std::mem::take(&mut *self.track.ranges.lock().unwrap_or_else(|p| p.into_inner()));
        if self.track.overflowed.load(Ordering::Relaxed) {
            return None;
        }
        v.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        Some(merged)
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
    fn writes_released_while_tracking_are_noted_merged_and_the_rest_not() {
        let l = Arc::new(RangeLock::default());
        let before = l.try_lock(100, 108).unwrap();
        drop(l.try_lock(0, 8).unwrap());
        l.track_writes();
        // In flight when tracking started, released after: noted.
        drop(before);
        drop(l.try_lock(8, 16).unwrap());
        drop(l.try_lock(4, 10).unwrap());
        l.note_written(200, 201);
        assert_eq!(l.written_count(), 4);
        assert_eq!(
            l.take_written(),
            Some(vec![(4, 16), (100, 108), (200, 201)])
        );
        // Taking goes on tracking, from nothing.
        drop(l.try_lock(50, 51).unwrap());
        assert_eq!(l.take_written(), Some(vec![(50, 51)]));
        l.stop_tracking();
        drop(l.try_lock(60, 61).unwrap());
        assert_eq!(l.take_written(), Some(vec![]));
    }

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
    fn a_copy_waits_for_running_writes_but_not_for_parked_ones() {
        let l = Arc::new(RangeLock::default());
        let w = l.try_lock(0, 8).unwrap();
        let copy = std::thread::scope(|s| {
            let waiting = s.spawn(|| l.lock_for_copy(0, 16, std::time::Duration::from_micros(50)));
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert!(!waiting.is_finished(), "the write's I/O still runs");
            // Done here, waiting for the peer: a held write waits for this very copy.
            w.park();
            waiting.join().unwrap()
        });
        assert!(l.try_lock(4, 5).is_none(), "parked: still no other write");
        assert!(l.try_lock(12, 13).is_none(), "the copy keeps writes out");
        drop((w, copy));
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn a_drain_waits_for_running_writes_and_grants_no_new_one() {
        use std::time::Duration;
        let l = Arc::new(RangeLock::default());
        let running = l.try_lock(100, 108).unwrap();
        std::thread::scope(|s| {
            let cut = s.spawn(|| l.drain(1000, Duration::from_micros(50), Duration::from_secs(10)));
            while l.draining.load(Ordering::Acquire) == 0 {
                std::thread::yield_now();
            }
            assert!(
                l.try_lock(0, 8).is_none(),
                "no new write while a drain waits"
            );
            assert!(!cut.is_finished(), "the running write is not done");
            drop(running);
            let g = cut
                .join()
                .unwrap()
                .expect("drained once the write finished");
            assert!(l.try_lock(500, 501).is_none(), "the cut holds the LUN");
            drop(g);
        });
        assert!(l.try_lock(0, 8).is_some(), "writes go on after the cut");
        // A range held past the timeout fails the drain, and writes go on.
        let stuck = l.try_lock(0, 8).unwrap();
        assert!(l
            .drain(1000, Duration::from_micros(50), Duration::from_millis(20))
            .is_none());
        drop(stuck);
        assert!(l.try_lock(0, 8).is_some());
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
