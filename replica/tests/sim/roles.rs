//! Starts, role changes and crashes (engine: `Replication::start`, roles.rs).

use super::*;

impl Sim {
    /// Starts node `n`'s daemon (engine: `Replication::start`, `check_start_as_primary`).
    pub(super) fn start(&mut self, n: NodeId) {
        let node = &mut self.nodes[n];
        let marker = match node.disk.marker {
            None => Marker::Absent,
            Some(b) if b == node.disk.boot => Marker::SameBoot,
            Some(_) => Marker::OtherBoot,
        };
        let volatile = node.disk.volatile.clone();
        let allocated = |per: u64| {
            (0..REGIONS)
                .filter(|r| {
                    let at = (r * per) as usize;
                    volatile[at..at + per as usize].iter().any(|&b| b != 0)
                })
                .collect()
        };
        let (mut lun, persist_needed, note) = PairLun::open(
            node.disk.meta.clone(),
            marker,
            node.config_primary,
            allocated,
        );
        let intent = IntentLog::new(SIZE, REGION);
        if persist_needed.needed() && !persist(&mut node.disk, &mut lun, &intent) {
            // The daemon does not start without its record; tried again later.
            return;
        }
        node.disk.marker = Some(node.disk.boot);
        let primary = node.config_primary;
        node.proc_ = Some(Proc {
            primary,
            mirror: Mirror::new(self.policy),
            parts: Parts {
                lun,
                intent,
                shards: (0..CORES).map(|_| LinkShard::default()).collect(),
                links: vec![None; CORES],
                answers: Vec::new(),
            },
            manager: Manager::Idle { next_try_ms: 0 },
            next_seq: 1,
            writes: BTreeMap::new(),
            last_cool_ms: self.now,
            gate: ApplyGate::default(),
            fenced: primary,
            demoted_at: None,
            verify: None,
        });
        trace!(
            self,
            "node {n}: started ({note:?}, configured {})",
            if primary { "primary" } else { "secondary" }
        );
        if primary {
            self.check_start_as_primary(n);
        }
        if self.is_primary(n) {
            self.now_serving(n);
        }
    }

    pub(super) fn check_start_as_primary(&mut self, n: NodeId) {
        let o = Self::other(n);
        let p = self.nodes[n].proc_.as_ref().expect("started");
        let unusable = p.parts.lun.unusable_as_primary();
        let forbids = !unusable
            && self.reachable(o)
            && self.nodes[o].proc_.as_ref().is_some_and(|q| {
                q.primary || {
                    let h = q.parts.hello(q.primary);
                    p.parts.lun.peer_is_ahead_at_start(&h).is_some()
                }
            });
        if unusable || forbids {
            trace!(
                self,
                "node {n}: starts as secondary (unusable {unusable}, peer forbids {forbids})"
            );
            self.set_role(n, false);
        }
    }

    /// Records the role (engine: `Registry::set_role` → `note_role`).
    pub(super) fn set_role(&mut self, n: NodeId, primary: bool) {
        let node = &mut self.nodes[n];
        let Some(p) = node.proc_.as_mut() else { return };
        if p.primary == primary {
            return; // Registry::set_role: nothing happens unless the role changes.
        }
        p.primary = primary;
        if !primary {
            p.fenced = false;
            node.lease_lost = false;
        }
        let persist_needed = p.parts.lun.set_role(primary);
        if persist_needed.needed() {
            persist(&mut node.disk, &mut p.parts.lun, &p.parts.intent);
        }
        if primary {
            let t = self.with_mirror(n, |m, port| m.new_term(port));
            if t == Some(NewTerm::PeerLost) {
                self.stats.losses += 1;
            }
        }
    }

    /// Node `n` starts serving: it must hold every acknowledged write.
    pub(super) fn now_serving(&mut self, n: NodeId) {
        if self.forced {
            return;
        }
        if let Err(e) = self.model.holds(&self.nodes[n].disk.volatile) {
            self.fail(&format!(
                "node {n} serves, but an acknowledged write is lost: {e}"
            ));
        }
    }

    pub(super) fn demote(&mut self, n: NodeId) {
        if !self.is_primary(n) {
            return;
        }
        trace!(self, "node {n}: demote");
        self.set_role(n, false);
        // Engine: `note_role(false)` → `Mirror::demoted`.
        self.with_mirror(n, |m, port| m.demoted(port));
        if let Some(p) = self.nodes[n].proc_.as_mut() {
            p.demoted_at = Some(self.now);
        }
        self.drain_done(n);
    }

    /// The failover controller's takeover from a paused primary, guarded by the witness
    /// (engine: `Action::Promote` with `Guard::Witness`, then `Action::OutdatePeer`): node
    /// `n`, secondary and UpToDate, is promoted without asking the peer (it is silent) and
    /// records it outdated. Only under the Suspend policy (the witness's: a primary that
    /// loses its peer holds writes until its lease lets it go on alone) and only before the
    /// paused primary recorded its peer outdated (then its peer is the one behind, and the
    /// witness's record says so). From here on the old primary can answer nothing alone,
    /// and when it runs again it still says primary until its controller demotes it: what
    /// the failover rig's sigstop scenario does, and where a connection answered in that
    /// window once made a false split brain.
    pub(super) fn lease_takeover(&mut self, n: NodeId) {
        let o = Self::other(n);
        let ready = self.policy == PeerLossPolicy::Suspend
            && !self.forced
            && self.up(n)
            && !self.nodes[n].paused
            && !self.is_primary(n)
            // The controller's `promotable`: usable and known current (UpToDate).
            && self.nodes[n].proc_.as_ref().is_some_and(|p| {
                !p.parts.lun.blocks_promotion() && p.parts.lun.state() == SyncState::UpToDate
            })
            && self.up(o)
            && self.nodes[o].paused
            && self.is_primary(o)
            && !self.nodes[o].seen_peer_outdated;
        if !ready {
            return;
        }
        trace!(
            self,
            "node {n}: takes over from the paused node {o} (lease)"
        );
        self.nodes[o].lease_lost = true;
        self.stats.lease_takeovers += 1;
        if let Some(p) = self.nodes[n].proc_.as_mut() {
            p.fenced = true;
            p.gate.close_all_accepted();
        }
        self.set_role(n, true);
        self.stats.promotions += 1;
        self.now_serving(n);
        self.outdate_peer(n);
    }

    /// `twinsan promote` (engine: admin `promote` → `promote_refusal`, `fence_for_promotion`,
    /// `set_role`). Returns whether it was accepted.
    pub(super) fn promote(&mut self, n: NodeId, force: bool) -> bool {
        let Some(p) = self.nodes[n].proc_.as_ref() else {
            return false;
        };
        if !p.primary && !force {
            // Counted until this end closes (engine: `primary_links`, until the apply thread
            // ends): a primary that closed its end still counts until the FIN arrives.
            let primary_connected = self
                .conns
                .iter()
                .any(|c| c.to == n && c.kind == ConnKind::Control && !c.closed_to);
            // The tool asks the peer too (a primary without a control connection yet).
            let o = Self::other(n);
            let peer_primary = self.reachable(o) && self.is_primary(o);
            if primary_connected || peer_primary || p.parts.lun.blocks_promotion() {
                trace!(
                    self,
                    "node {n}: promote refused (primary connected {primary_connected})"
                );
                return false;
            }
        }
        trace!(
            self,
            "node {n}: promote{} (peer record {:?})",
            if force { " --force" } else { "" },
            self.nodes[Self::other(n)].disk.meta.flags
        );
        if let Some(p) = self.nodes[n].proc_.as_mut() {
            p.fenced = true;
            p.gate.close_all_accepted();
        }
        let was = self.is_primary(n);
        self.set_role(n, true);
        if !was {
            self.stats.promotions += 1;
            self.now_serving(n);
        }
        true
    }

    /// A process crash (the page cache survives) or a power loss of machine `n` (its
    /// daemon running or not).
    pub(super) fn crash(&mut self, n: NodeId, power_loss: bool) {
        if !self.up(n) {
            if power_loss {
                trace!(self, "node {n}: power loss (daemon down)");
                self.lose_power(n);
            }
            return;
        }
        trace!(
            self,
            "node {n}: {}",
            if power_loss { "power loss" } else { "crash" }
        );
        self.nodes[n].proc_ = None;
        self.nodes[n].lease_lost = false;
        self.nodes[n].paused = false;
        let now = self.now;
        for c in &mut self.conns {
            let primary_end = c.from == n;
            if c.from != n && c.to != n {
                continue;
            }
            if power_loss {
                // Nothing more leaves the machine. The survivor notices: a secondary by
                // keepalive (apply_conn sets it), a primary's data link by an overdue ack
                // or the reset its next send meets once the peer is back, and the primary's
                // resync or verify connection waiting for an answer by its keepalive
                // (link_io.rs `bound_control_waits`; without it the manager waited for
                // good, and seed 26 never settled).
                if primary_end {
                    c.closed_from = true;
                    c.to_secondary.clear();
                    c.to_primary.clear();
                    c.to_secondary.push_back((now + 3 * TIMEOUT_MS, Frame::Fin));
                } else {
                    c.closed_to = true;
                    c.to_primary.clear();
                    c.to_secondary.clear();
                    c.to_primary.push_back((now + 3 * TIMEOUT_MS, Frame::Fin));
                }
            } else {
                if primary_end && !c.closed_from {
                    c.closed_from = true;
                    c.to_secondary.push_back((now + 1, Frame::Fin));
                } else if !primary_end && !c.closed_to {
                    c.closed_to = true;
                    c.to_primary.push_back((now + 1, Frame::Fin));
                }
            }
        }
        if power_loss {
            self.lose_power(n);
        } else {
            self.stats.crashes += 1;
        }
    }

    /// Machine `n` lost power: unflushed writes are gone, and a metadata rename not yet
    /// on stable storage may be undone.
    fn lose_power(&mut self, n: NodeId) {
        let keep_last = self.rng.gen_bool(0.5);
        self.stats.unsynced_renames += u64::from(self.nodes[n].disk.meta_synced.is_some());
        self.nodes[n].disk.power_lost(keep_last);
        self.stats.power_losses += 1;
        self.model.power_loss();
    }

    /// The power failed in the middle of a metadata write of machine `n` (`Disk::write_meta`
    /// chose what is on disk): its daemon, if it ran, stopped there. The operator's last
    /// `status` is of that moment, the record being written already in memory (else a node
    /// that died recording its peer outdated looked in sync: the operator promoted the peer,
    /// and the two split, seed 779968).
    pub(super) fn power_cut(&mut self, n: NodeId) {
        trace!(self, "node {n}: the power fails during a metadata write");
        self.note_status(n);
        self.stats.power_cuts += 1;
        self.crash(n, true);
    }
}
