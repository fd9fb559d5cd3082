//! `twinsan verify [--repair]` on the primary (engine: verify.rs): each region's digest
//! compared with the peer's over a connection of its own, one region at a time under the
//! region's range lock.

use super::*;

/// A verify running on a primary.
pub(super) struct Verify {
    pub(super) conn: ConnId,
    pub(super) repair: bool,
    /// The region compared next, or now.
    pub(super) region: u64,
    /// The region's request is on its way (its range locked until the answer): this node's
    /// digest, and the mirroring round it was taken in if the pair was in sync then.
    pub(super) awaiting: Option<([u8; 32], Option<u64>)>,
    pub(super) differing: Vec<u64>,
}

/// A region's digest (engine: SHA-256 of the region; here FNV-1a, enough to compare).
pub(super) fn region_digest(data: &[u8], region: u64) -> [u8; 32] {
    let at = (region * REGION) as usize;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in &data[at..at + REGION as usize] {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut d = [0u8; 32];
    d[..8].copy_from_slice(&h.to_le_bytes());
    d
}

impl Sim {
    /// The operator runs `verify` (`--repair`: differing regions are resynced) on node `n`.
    /// The engine refuses it on a secondary and fails it when the peer cannot be reached.
    pub(super) fn verify(&mut self, n: NodeId, repair: bool) {
        let Some(p) = self.nodes[n].proc_.as_ref() else {
            return;
        };
        if !p.primary {
            trace!(self, "node {n}: verify refused: it runs on the primary");
            return;
        }
        if p.verify.is_some() {
            return; // The operator waits for the one running.
        }
        let Some(conn) = self.connect(n, ConnKind::Control) else {
            trace!(self, "node {n}: verify failed: peer unreachable");
            return;
        };
        trace!(
            self,
            "node {n}: verify{} (connection {conn})",
            if repair { " --repair" } else { "" }
        );
        self.stats.verifies += 1;
        self.nodes[n].proc_.as_mut().expect("up").verify = Some(Verify {
            conn,
            repair,
            region: 0,
            awaiting: None,
            differing: Vec::new(),
        });
    }

    /// The mirroring round node `n` is in sync in, if it is: the round's copy is complete
    /// and acknowledged (UpToDate, pinging), and its control connection stands at both
    /// ends (the secondary that took the completion has not crashed or closed it since).
    fn in_sync_round(&self, n: NodeId) -> Option<u64> {
        let p = self.nodes[n].proc_.as_ref()?;
        let (conn, run) = self.manager_run(n)?;
        if !run.watching() {
            return None;
        }
        let round = run.round()?;
        let c = &self.conns[conn];
        let stands = p.mirror.round_stands(round)
            && p.parts.lun.state() == SyncState::UpToDate
            && !c.closed_from
            && !c.closed_to;
        (stands && !self.forced).then_some(round)
    }

    /// The range `range` is locked by node `n`'s verify (its request on its way).
    pub(super) fn verify_locks(&self, n: NodeId, range: (u64, u64)) -> bool {
        self.nodes[n]
            .proc_
            .as_ref()
            .and_then(|p| p.verify.as_ref())
            .is_some_and(|v| v.awaiting.is_some() && overlaps(range, (v.region * REGION, REGION)))
    }

    /// One look of node `n`'s verify: the next region is locked (engine: `lock_waiting`,
    /// which waits for every write there, parked or not, and for a copy of it), digested
    /// here and asked of the peer; after the last one, the verify ends.
    pub(super) fn verify_tick(&mut self, n: NodeId) {
        let Some(p) = self.nodes[n].proc_.as_ref() else {
            return;
        };
        let Some(v) = p.verify.as_ref() else { return };
        if v.awaiting.is_some() {
            return;
        }
        if v.region == REGIONS {
            return self.verify_done(n);
        }
        let (conn, region) = (v.conn, v.region);
        let range = (region * REGION, REGION);
        let copying = self.copy_locked(n).is_some_and(|c| overlaps(range, c));
        if copying
            || p.writes
                .values()
                .any(|w| overlaps(range, (w.offset, w.len)))
        {
            return;
        }
        let digest = region_digest(&self.nodes[n].disk.volatile, region);
        let in_sync = self.in_sync_round(n);
        let request = Message::VerifyRequest {
            lun_key: LUN_KEY,
            region,
        };
        self.send_control(n, conn, request);
        if let Some(v) = self.nodes[n].proc_.as_mut().and_then(|p| p.verify.as_mut()) {
            v.awaiting = Some((digest, in_sync));
        }
    }

    /// The peer's digest of the region asked on connection `id`. A region that differs
    /// while the pair was in sync, from before the request to its answer, is a lost or
    /// misplaced write: no write to it ran here meanwhile, and every earlier one was
    /// applied there before it was answered.
    pub(super) fn verify_reply(&mut self, id: ConnId, digest: [u8; 32]) {
        let n = self.conns[id].from;
        let in_sync_now = self.in_sync_round(n);
        let Some(v) = self.nodes[n].proc_.as_mut().and_then(|p| p.verify.as_mut()) else {
            return;
        };
        if v.conn != id {
            return;
        }
        let Some((local, in_sync)) = v.awaiting.take() else {
            return;
        };
        let region = v.region;
        v.region += 1;
        if local == digest {
            self.stats.verified_in_sync += u64::from(in_sync.is_some() && in_sync == in_sync_now);
            return;
        }
        v.differing.push(region);
        if in_sync.is_some() && in_sync == in_sync_now {
            self.fail(&format!(
                "verify: region {region} differs on node {n} and its peer, in sync all along"
            ));
        }
    }

    /// The verify's connection closed before the end: it fails (engine: an error from
    /// `recv`), marking nothing.
    pub(super) fn verify_failed(&mut self, n: NodeId, id: ConnId) {
        let Some(p) = self.nodes[n].proc_.as_mut() else {
            return;
        };
        if p.verify.as_ref().is_some_and(|v| v.conn == id) {
            p.verify = None;
            trace!(self, "node {n}: verify failed: its connection closed");
        }
    }

    /// Every region compared: with `--repair`, the differing ones are marked (persisted)
    /// and the peer declared lost, so the manager's next resync copies them.
    fn verify_done(&mut self, n: NodeId) {
        let node = &mut self.nodes[n];
        let Some(p) = node.proc_.as_mut() else { return };
        let Some(v) = p.verify.take() else { return };
        trace!(
            self,
            "node {n}: verify: {} regions differ {:?}",
            v.differing.len(),
            v.differing
        );
        let repair = v.repair && !v.differing.is_empty();
        if repair {
            let node = &mut self.nodes[n];
            let p = node.proc_.as_mut().expect("up");
            if p.parts
                .lun
                .mark_regions(v.differing.iter().copied())
                .needed()
                && !persist(&mut node.disk, &mut p.parts.lun, &p.parts.intent)
            {
                trace!(self, "node {n}: verify --repair: cannot persist the marks");
                close_end(&mut self.conns, v.conn, true, self.now);
                return;
            }
        }
        close_end(&mut self.conns, v.conn, true, self.now);
        if repair {
            self.peer_lost(n, "verify found differing regions");
        }
    }
}
