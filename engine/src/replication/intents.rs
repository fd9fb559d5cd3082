//! The write-intent keeper: persists the regions writers ask for (one metadata write for
//! all asked meanwhile) and cools regions nobody wrote for a while (`replica::intent`).

use super::*;

impl Replication {
    /// Whether a write to `[offset, offset + len)` of LUN `lun` may be issued now: on the
    /// primary, every region it touches must be in the persisted write-intent log first.
    /// `false`: the regions are asked for; retry shortly (with the range lock released).
    ///
    /// `Err(errno)` once the metadata file has failed to take the log for
    /// [`INTENT_PERSIST_WAIT_MS`]: the write fails with that error's sense (MEDIUM ERROR, or
    /// SPACE ALLOCATION FAILED on a full file system) instead of waiting without end, which
    /// an initiator sees as a hung LUN (ESXi aborts and retries, then declares the path
    /// dead). Writes to regions already recorded go on.
    pub fn write_intent_ready(&self, lun: usize, offset: u64, len: u64) -> Result<bool, i32> {
        let Some(l) = self.luns.get(lun) else {
            return Ok(true);
        };
        if l.intent.load().ready(offset, len) {
            return Ok(true);
        }
        let since = l.intent_failing_since_ms.load(Ordering::Acquire);
        if since != 0 && now_ms(&self.epoch).saturating_sub(since) >= INTENT_PERSIST_WAIT_MS {
            return Err(l.intent_errno.load(Ordering::Acquire));
        }
        *self.intent_asked.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.intent_cv.notify_one();
        Ok(false)
    }

    /// The write-intent keeper: persists wanted regions (one metadata write for everything
    /// asked meanwhile) and cools idle ones (intent.rs).
    pub(super) fn keep_intents(self: Arc<Self>) {
        let mut last_cool = Instant::now();
        loop {
            {
                let asked = self.intent_asked.lock().unwrap_or_else(|p| p.into_inner());
                let (mut asked, _) = self
                    .intent_cv
                    .wait_timeout_while(asked, Duration::from_millis(INTENT_POLL_MS), |a| !*a)
                    .unwrap_or_else(|p| p.into_inner());
                *asked = false;
            }
            let mut failed = false;
            for l in &self.luns {
                let wanted = l.intent.load().take_wanted();
                if wanted.is_empty() {
                    continue;
                }
                let mut m = l.pair();
                let mut all = l.intent.load().durable_regions();
                all.extend_from_slice(&wanted);
                match l.persist_with(&mut m, &all) {
                    Ok(()) => {
                        l.intent.load().made_durable(&wanted);
                        l.intent_failing_since_ms.store(0, Ordering::Release);
                    }
                    Err(e) => {
                        let errno = e.raw_os_error().unwrap_or(libc::EIO);
                        l.intent_errno.store(errno, Ordering::Release);
                        // Never 0 (which means "not failing"), even in the first millisecond.
                        let now = now_ms(&self.epoch).max(1);
                        let _ = l.intent_failing_since_ms.compare_exchange(
                            0,
                            now,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        );
                        // Writes to these regions wait: issuing them unrecorded could lose
                        // track of a divergence after a crash.
                        // Retried every INTENT_POLL_MS while writes ask: at most one line a
                        // second (log_limit.rs).
                        static FAILED: crate::log_limit::LogLimit =
                            crate::log_limit::LogLimit::new(1);
                        if let Some(suppressed) = FAILED.allow() {
                            tracing::error!(lun = l.key, error = %e, suppressed, "cannot persist the write-intent log; writes to new regions wait, and fail after {INTENT_PERSIST_WAIT_MS} ms");
                        }
                        l.intent.load().want_again(&wanted);
                        failed = true;
                    }
                }
            }
            if last_cool.elapsed() >= Duration::from_millis(INTENT_COOL_MS) {
                last_cool = Instant::now();
                self.cool_intents();
            }
            if failed {
                // Every waiting write asks again at once: retry at the poll period, not in
                // a loop of failing metadata writes.
                std::thread::sleep(Duration::from_millis(INTENT_POLL_MS));
            }
        }
    }

    /// Forgets write-intent regions nobody wrote during the last period, each under its
    /// range lock (so no write to it is in flight), and persists the result.
    pub(super) fn cool_intents(&self) {
        let Some(reg) = self.registry() else { return };
        for (i, l) in self.luns.iter().enumerate() {
            let Some(lun) = reg.luns.get(i) else { continue };
            let per = l.intent.load().region_bytes();
            let bs = u64::from(lun.block_size);
            let mut forgot = 0usize;
            for r in l.intent.load().idle_regions() {
                let (lo, hi) = ((r * per) / bs, ((r + 1) * per).div_ceil(bs));
                if let Some(guard) = lun.ranges.try_lock(lo, hi) {
                    l.intent.load().forget(r);
                    drop(guard);
                    forgot += 1;
                }
            }
            if forgot > 0 {
                let mut m = l.pair();
                if let Err(e) = l.persist(&mut m) {
                    // The old, larger set stays on disk: only a longer resync after a crash.
                    tracing::warn!(lun = l.key, error = %e, "cannot persist the cooled write-intent log");
                }
            }
        }
    }
}
