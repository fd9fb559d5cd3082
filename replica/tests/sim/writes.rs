//! The primary's write path: the initiator's writes, their write intents, the link
//! writers, and the coordinator's answers.

use super::*;

impl Sim {
    // ------------------------------------------------------------------ the coordinator

    /// Runs `f` on node `n`'s coordinator with the node as its port, then delivers the
    /// answers it gave.
    pub(super) fn with_mirror<R>(
        &mut self,
        n: NodeId,
        f: impl FnOnce(&mut Mirror, &mut dyn Port) -> R,
    ) -> Option<R> {
        let random = self.rng.gen();
        let node = &mut self.nodes[n];
        let p = node.proc_.as_mut()?;
        let mut port = SimPort {
            disk: &mut node.disk,
            parts: &mut p.parts,
            conns: &mut self.conns,
            now: self.now,
            random,
        };
        let r = f(&mut p.mirror, &mut port);
        self.take_answers(n);
        Some(r)
    }

    pub(super) fn peer_lost(&mut self, n: NodeId, why: &str) {
        if self.with_mirror(n, |m, port| m.peer_lost(port)) == Some(true) {
            trace!(self, "node {n}: peer lost ({why})");
            self.stats.losses += 1;
        }
    }

    pub(super) fn take_answers(&mut self, n: NodeId) {
        let Some(p) = self.nodes[n].proc_.as_mut() else {
            return;
        };
        let answers = std::mem::take(&mut p.parts.answers);
        for (_, token, ok) in answers {
            // An answer the coordinator gives is a completion without the peer.
            self.peer_side_done(n, token, ok, true);
        }
    }

    pub(super) fn peer_side_done(&mut self, n: NodeId, token: u64, ok: bool, alone: bool) {
        let Some(p) = self.nodes[n].proc_.as_mut() else {
            return;
        };
        let Some(w) = p.writes.get_mut(&token) else {
            // Every command is answered once: in the engine the token names a task slot
            // that a later command reuses, and a second answer (a duplicate or stale ack
            // taken for a pending one, a held completion released twice) would complete
            // that other command.
            self.fail(&format!("node {n}: command {token} answered twice"));
        };
        w.peer = Some(ok);
        if !w.local_done {
            return;
        }
        let Some(w) = p.writes.remove(&token) else {
            return;
        };
        if !ok || !w.local_ok {
            self.stats.failed += 1;
            trace!(self, "node {n}: write {} failed", w.id);
            return;
        }
        // Only a write the other node does not have diverges (one its ack answered is on
        // both).
        if alone && self.forced && self.writers().len() > 1 {
            self.nodes[n].diverged = true;
        }
        self.stats.good += 1;
        trace!(
            self,
            "node {n}: write {} GOOD{}",
            w.id,
            if alone { " alone" } else { "" }
        );
        for s in sectors(w.offset, w.len) {
            self.model.good(s, w.id, w.fua);
        }
    }

    /// The nodes that take writes now.
    pub(super) fn writers(&self) -> Vec<NodeId> {
        (0..2).filter(|&n| self.is_primary(n)).collect()
    }

    /// Whether a write to `range` on node `n` must wait: an overlapping write is in flight
    /// (the range lock), or the manager is copying the region.
    pub(super) fn range_busy(&self, n: NodeId, range: (u64, u64)) -> bool {
        let Some(p) = self.nodes[n].proc_.as_ref() else {
            return true;
        };
        let copying = self.copy_locked(n).is_some_and(|c| overlaps(range, c));
        copying
            || self.verify_locks(n, range)
            || p.writes
                .values()
                .any(|w| overlaps(range, (w.offset, w.len)))
    }

    /// Whether the resync's copy of `range` must wait (engine: `RangeLock::lock_for_copy`):
    /// only for writes whose local I/O still runs. A write done here that waits for the
    /// peer is parked: its data is final, and while the peer is away such a write is
    /// answered only once this very copy has carried its region (waiting for it was a
    /// deadlock: the copy stalled for good).
    pub(super) fn copy_blocked(&self, n: NodeId, range: (u64, u64)) -> bool {
        let Some(p) = self.nodes[n].proc_.as_ref() else {
            return true;
        };
        // A verify comparing the region holds its lock until the peer's answer.
        self.verify_locks(n, range)
            || p.writes
                .values()
                .any(|w| !w.local_done && overlaps(range, (w.offset, w.len)))
    }

    /// Makes the write-intent regions of `range` durable (engine: `write_intent_ready` and
    /// the keeper's group commit). False: the metadata cannot be written; the write fails.
    pub(super) fn intent_ready(&mut self, n: NodeId, range: (u64, u64)) -> bool {
        let node = &mut self.nodes[n];
        let Some(p) = node.proc_.as_mut() else {
            return false;
        };
        if p.parts.intent.ready(range.0, range.1) {
            return true;
        }
        let wanted = p.parts.intent.take_wanted();
        let mut all = p.parts.intent.durable_regions();
        all.extend_from_slice(&wanted);
        if !node.disk.write_meta(p.parts.lun.meta_for_disk(&all)) {
            p.parts.intent.want_again(&wanted);
            return false;
        }
        p.parts.intent.made_durable(&wanted);
        true
    }

    pub(super) fn initiator_write(&mut self) {
        let writers = self.writers();
        let Some(&n) = writers.get(self.rng.gen_range(0..writers.len().max(1))) else {
            return;
        };
        if self.nodes[n].paused {
            return;
        }
        // Half the writes go to a hot spot (two regions), as VMFS heartbeats and metadata do:
        // rewrites of one sector across a peer loss and a resync are what ordering bugs need.
        let sector = if self.rng.gen_bool(0.5) {
            self.rng.gen_range(0..2 * REGION / SECTOR)
        } else {
            self.rng.gen_range(0..SECTORS as u64)
        };
        let count = self.rng.gen_range(1..=4).min(SECTORS as u64 - sector);
        let range = (sector * SECTOR, count * SECTOR);
        if self.range_busy(n, range) {
            return;
        }
        if !self.intent_ready(n, range) {
            self.stats.failed += 1;
            return;
        }
        let id = self.next_write;
        self.next_write += 1;
        let fua = self.rng.gen_bool(0.2);
        let mut data = vec![0u8; range.1 as usize];
        for chunk in data.chunks_mut(SECTOR as usize) {
            for word in chunk.chunks_mut(4) {
                word.copy_from_slice(&id.to_le_bytes());
            }
        }
        let disk = &mut self.nodes[n].disk;
        let local_ok = !disk.data_full;
        let at = range.0 as usize..(range.0 + range.1) as usize;
        if local_ok {
            disk.volatile[at.clone()].copy_from_slice(&data);
            if fua {
                disk.durable[at].copy_from_slice(&data);
            }
        }
        for s in sectors(range.0, range.1) {
            self.model.issue(s, id);
        }
        let token = self.next_token;
        self.next_token += 1;
        let core = self.rng.gen_range(0..CORES);
        trace!(
            self,
            "node {n}: write {id} at sector {sector} x{count} core {core}"
        );
        let p = self.nodes[n].proc_.as_mut().expect("writer is up");
        p.writes.insert(
            token,
            Write {
                id,
                offset: range.0,
                len: range.1,
                fua,
                local_done: true,
                local_ok,
                peer: None,
            },
        );
        self.mirror_write(n, core, token, range, data, fua);
        if !local_ok {
            // The local write failed after its change was mirrored (engine: the reactor's
            // `diverged`): the peer may hold what this node does not.
            let lost = self.with_mirror(n, |m, port| m.diverged(port, 0, range.0, range.1));
            if lost == Some(true) {
                trace!(
                    self,
                    "node {n}: write {id} failed here after mirroring: peer lost"
                );
                self.stats.losses += 1;
            }
        }
    }

    /// The link writer of `core` (engine: `link_writer`).
    pub(super) fn mirror_write(
        &mut self,
        n: NodeId,
        core: usize,
        token: u64,
        range: (u64, u64),
        data: Vec<u8>,
        fua: bool,
    ) {
        let mirroring = self.nodes[n]
            .proc_
            .as_ref()
            .is_some_and(|p| p.mirror.mirroring());
        if !mirroring {
            self.with_mirror(n, |m, port| m.alone(port, core, token, 0, Some(range)));
            return;
        }
        if self.nodes[n].proc_.as_ref().expect("up").parts.links[core].is_none() {
            match self.connect(n, ConnKind::Data(core)) {
                Some(c) => self.nodes[n].proc_.as_mut().expect("up").parts.links[core] = Some(c),
                None => {
                    self.peer_lost(n, "connect failed");
                    self.with_mirror(n, |m, port| m.alone(port, core, token, 0, Some(range)));
                    return;
                }
            }
        }
        let p = self.nodes[n].proc_.as_mut().expect("up");
        let seq = p.next_seq;
        p.next_seq += 1;
        let conn = p.parts.links[core].expect("connected");
        let mut shard = std::mem::take(&mut p.parts.shards[core]);
        let pending = Pending {
            token,
            lun: 0,
            offset: range.0,
            len: range.1,
            sent_ms: self.now,
            sent_ns: 0,
        };
        let now = self.now;
        let send = self
            .with_mirror(n, |m, port| {
                m.sending(port, &mut shard, core, [(seq, pending)])
            })
            .unwrap_or(false);
        if let Some(p) = self.nodes[n].proc_.as_mut() {
            p.parts.shards[core] = shard;
        }
        if send {
            let at = now + self.delay();
            let msg = Message::Write {
                lun_key: LUN_KEY,
                offset_bytes: range.0,
                fua,
                data,
            };
            if !self.conns[conn].closed_from {
                self.conns[conn]
                    .to_secondary
                    .push_back((at, Frame::Msg(seq, msg)));
            }
        }
    }
}
