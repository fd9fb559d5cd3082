//! Role changes: the start of a configured primary, promotion and its refusals, demotion,
//! and the operator's `outdate-peer` and `resolve --discard-local`.

use super::*;

impl Replication {
    /// `role = "primary"` in the configuration is the role to start in, not an order to
    /// make a second primary: after a failover the old primary is typically restarted with
    /// its unchanged configuration while the peer serves as primary, with newer data. So,
    /// like `twinsan promote`, the start asks the peer first (before any initiator is
    /// served): if it answers as primary, this node starts as secondary and resyncs from
    /// it. A peer that does not answer (down, unreachable, wrong key) does not stop the
    /// start: then writes are tracked until it returns, as after any peer loss. Bounded by
    /// the connect timeout (`replica_timeout_ms`) and `HANDSHAKE_TIMEOUT`.
    pub(super) fn check_start_as_primary(&self, reg: &Registry) {
        // Our own data first: a resync into this node that did not finish (or a
        // `resolve --discard-local`) left it unusable, whatever the peer says.
        let unusable = self.live_luns().find(|l| l.pair().unusable_as_primary());
        let why = if let Some(l) = unusable {
            Some(format!(
                "configured primary, but lun {:016x} here holds outdated or inconsistent data \
                 (an unfinished resync into it): started as secondary; it resyncs from the \
                 peer (`twinsan promote --force` serves it anyway)",
                l.key
            ))
        } else {
            match self.connect(LINK_NONE) {
                Ok((_stream, _rbuf, hellos)) => self.peer_forbids_primary(&hellos),
                // With a fence command and no witness, nothing would stop this node from
                // fencing a peer that was promoted meanwhile and holds newer data: then
                // only a peer that answers lets it start as primary.
                Err(e) if reg.config.failover.is_some() => Some(format!(
                    "configured primary, but the peer is not reachable at start ({e}): \
                     started as secondary; with automatic failover the controller promotes \
                     this node once the rules allow (or `twinsan promote` by hand)"
                )),
                Err(e) => {
                    tracing::info!(peer = %self.cfg.address, error = %e, "peer not reachable at start: starting as primary");
                    None
                }
            }
        };
        let Some(why) = why else { return };
        tracing::error!("{why}");
        reg.set_role(Role::Secondary);
        // `set_role` records the role through `reg.replication`, which is not set yet.
        self.note_role(false);
        self.apply_fenced.store(false, Ordering::Release);
        *self.start_note.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// Why the peer that sent `hellos` at our start must stay the source: it is primary,
    /// or it holds newer data than ours for some LUN (it was promoted while we were away
    /// and restarted since as secondary).
    pub(super) fn peer_forbids_primary(&self, hellos: &[LunHello]) -> Option<String> {
        let peer = format!("the peer {} ({})", self.cfg.name, self.cfg.address);
        if hellos.iter().any(|h| h.flags.primary) {
            return Some(format!(
                "configured primary, but {peer} is primary: started as secondary to avoid two \
                 primaries; this node resyncs from it (to switch over: `twinsan demote` there, \
                 then `twinsan promote` here)"
            ));
        }
        for l in &self.luns {
            let Some(h) = hellos.iter().find(|h| h.lun_key == l.key) else {
                continue;
            };
            let ahead = l.pair().peer_is_ahead_at_start(h);
            if let Some(d) = ahead {
                return Some(format!(
                    "configured primary, but {peer} holds newer data for lun {:016x} ({d:?}): \
                     started as secondary; promote it, or `twinsan promote` here once the \
                     data is settled",
                    l.key
                ));
            }
        }
        None
    }

    /// Why `twinsan promote` (without `--force`) must not make this node primary now, if it
    /// must not: the peer is primary and still connected (two primaries would both take
    /// writes: a split brain made on purpose), or a LUN's data here is not usable (a resync
    /// into it is unfinished, or it was given up with `resolve --discard-local`). A peer
    /// that was just killed closes its links within moments: they are waited for briefly.
    pub fn promote_refusal(&self) -> Option<String> {
        let t = Instant::now();
        while self.primary_links.load(Ordering::Acquire) > 0 {
            if t.elapsed() >= PROMOTE_WAIT {
                return Some(
                    "the peer is primary and connected: demote it first (or, if it is \
                     unreachable for initiators but its replica link still stands, promote --force)"
                        .into(),
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // The peer may be primary without a control connection to us yet (it has just
        // started, or is between two resync attempts): ask it, as a start does. Found by
        // the simulation: a promote right after the primary's start made two primaries. An
        // unreachable peer is the operator's call (bounded by the connect timeout).
        if let Ok((_s, _rbuf, hellos)) = self.connect(LINK_NONE) {
            if hellos.iter().any(|h| h.flags.primary) {
                return Some(
                    "the peer is primary: demote it first (or, if it is unreachable for \
                     initiators but its replica link still stands, promote --force)"
                        .into(),
                );
            }
        }
        for l in self.live_luns() {
            if l.pair().blocks_promotion() {
                return Some(format!(
                    "lun {:016x} holds outdated or inconsistent data (an unfinished resync into \
                     it, or resolve --discard-local); promote --force serves it anyway",
                    l.key
                ));
            }
        }
        None
    }

    /// Before this node becomes primary: no message from the old primary is applied from
    /// now on (its connections close), and the ones being applied finish first. Bounded by
    /// one write's time; returns whether the apply side went quiet.
    pub fn fence_for_promotion(&self) -> bool {
        self.apply_fenced.store(true, Ordering::SeqCst);
        // For good: a later demotion must not let them apply again (ApplyGate says why).
        // Taken for writing, this waits for the messages being applied under it.
        self.apply_gate
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .close_all_accepted();
        let t = Instant::now();
        while self.applying.load(Ordering::SeqCst) > 0 {
            if t.elapsed() >= PROMOTE_WAIT {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// After a demotion, with initiators refused already: waits (up to `timeout`) until
    /// the writes that were running finished, each mirrored and answered. Returns whether
    /// they did.
    pub fn drain_after_demotion(&self, reg: &Registry, timeout: Duration) -> bool {
        let t = Instant::now();
        loop {
            let quiet = reg.luns.iter().all(|l| l.ranges.held() == 0)
                && self.links.iter().all(|l| {
                    l.pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_empty()
                });
            if quiet {
                // The round ends with the term: the idle links closing later (the new
                // primary crashing, say) is no loss to record (Mirror::end_term says why).
                if !self.is_primary() && self.with_mirror(|m, port| m.end_term(port)) {
                    tracing::info!("demoted: every write answered; replica links closed");
                }
                return true;
            }
            if t.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Records the node's role in every LUN's metadata (a role change: promote or demote),
    /// so that a crash is known at the next start to have been a primary's.
    pub fn note_role(&self, primary: bool) {
        if !primary {
            self.apply_fenced.store(false, Ordering::Release);
            // What it holds, and what would complete without the peer, fails now
            // (Mirror::demoted says why).
            self.with_mirror(|m, port| m.demoted(port));
        }
        if primary {
            // Promoted on purpose: the note about the start no longer describes the node.
            *self.start_note.lock().unwrap_or_else(|p| p.into_inner()) = None;
            self.new_term_reconnects();
        }
        for l in &self.luns {
            let mut p = l.pair();
            let persist = p.set_role(primary);
            if let Err(e) = l.persist_if(&mut p, persist) {
                tracing::error!(path = %l.meta_path.display(), error = %e, "cannot record the role");
            }
        }
    }

    /// On a promotion: a node that was demoted while mirroring still has `peer_up` set and
    /// its old data links, but its control connection closed with the demotion, so the
    /// peer sees no primary and would let itself be promoted too (two primaries). The new
    /// term starts like a start: links reset, writes tracked until the manager has spoken
    /// with the peer again (its connection is what keeps the peer from promoting).
    pub(super) fn new_term_reconnects(&self) {
        match self.with_mirror(|m, port| m.new_term(port)) {
            NewTerm::Idle => {}
            NewTerm::Reconnect => {
                tracing::info!("promoted: reconnecting to the peer for the new term");
            }
            NewTerm::PeerLost => {
                tracing::warn!(
                    reason = "promoted with mirrored writes of the last term unanswered",
                    mode = ?self.cfg.on_peer_loss,
                    "replication peer lost"
                );
            }
        }
    }

    /// `twinsan resolve --discard-local`, on the split-brain victim (a secondary): its data
    /// is marked outdated and inconsistent, so the primary overwrites it with a full resync
    /// at the next connection. Refused on a primary (it would discard the data it serves).
    pub fn discard_local(&self) -> Result<(), String> {
        if self.is_primary() {
            return Err("this node is primary: demote it first".into());
        }
        for l in &self.luns {
            let mut p = l.pair();
            let persist = p.discard_local();
            l.persist_if(&mut p, persist)
                .map_err(|e| format!("cannot persist {}: {e}", l.meta_path.display()))?;
        }
        tracing::warn!("local data discarded on operator request: the peer will overwrite it");
        Ok(())
    }

    /// `twinsan outdate-peer`: the operator vouches the peer is stale; suspended I/O goes on.
    /// Returns false when a LUN's record could not be persisted: that LUN stays frozen.
    pub fn outdate_peer(&self) -> bool {
        self.with_mirror(|m, port| m.operator_outdate(port))
    }
}
