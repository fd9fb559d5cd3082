//! Timers, faults, operator commands, the invariants and the run itself.

use super::*;

impl Sim {
    /// Timers of node `n` (engine: `check_timeouts`, the keeper's cooling, a secondary's
    /// read timeout on a silent control connection, the manager).
    pub(super) fn tick(&mut self, n: NodeId) {
        if !self.up(n) || self.nodes[n].paused {
            return;
        }
        if self.nodes[n].lease_lost {
            // Its controller sees the peer's heartbeats again and gives the role up, some
            // time after the process runs again: meanwhile it still says primary.
            if self.rng.gen_bool(0.3) {
                trace!(self, "node {n}: its controller demotes it (lease lost)");
                self.demote(n);
            }
        }
        let now = self.now;
        let p = self.nodes[n].proc_.as_ref().expect("up");
        if p.mirror.mirroring() && p.parts.shards.iter().any(|s| s.overdue(now, TIMEOUT_MS)) {
            self.peer_lost(n, "no acknowledgement within replica_timeout_ms");
        }
        self.cool_intents(n);
        self.drain_done(n);
        self.keepalive_expires(n);
        self.verify_tick(n);
        for id in 0..self.conns.len() {
            let c = &self.conns[id];
            if c.to == n
                && c.kind == ConnKind::Control
                && !c.closed_to
                && now.saturating_sub(c.last_heard_ms) > QUIET_MS
            {
                trace!(self, "node {n}: closes a silent control connection {id}");
                close_end(&mut self.conns, id, false, now);
            }
        }
        self.manager_tick(n);
    }

    /// A demoted node whose writes are all answered within the drain ends its round.
    pub(super) fn drain_done(&mut self, n: NodeId) {
        let now = self.now;
        let Some(p) = self.nodes[n].proc_.as_mut() else {
            return;
        };
        let draining = p
            .demoted_at
            .is_some_and(|t| now.saturating_sub(t) <= TIMEOUT_MS + 2_000);
        if p.primary || !draining || !p.writes.is_empty() {
            return;
        }
        p.demoted_at = None;
        if self.with_mirror(n, |m, port| m.end_term(port)) == Some(true) {
            trace!(self, "node {n}: demoted, every write answered: round ended");
        }
    }

    /// Forgets write-intent regions nobody wrote for a while, each only while no write to
    /// it is in flight (engine: `cool_intents` under the range lock).
    pub(super) fn cool_intents(&mut self, n: NodeId) {
        let now = self.now;
        let p = self.nodes[n].proc_.as_ref().expect("up");
        if now.saturating_sub(p.last_cool_ms) < INTENT_COOL_MS {
            return;
        }
        let idle = p.parts.intent.idle_regions();
        let busy: Vec<u64> = idle
            .iter()
            .copied()
            .filter(|&r| self.range_busy(n, (r * REGION, REGION)))
            .collect();
        let node = &mut self.nodes[n];
        let p = node.proc_.as_mut().expect("up");
        p.last_cool_ms = now;
        let mut forgot = false;
        for r in idle {
            if !busy.contains(&r) {
                p.parts.intent.forget(r);
                forgot = true;
            }
        }
        if forgot {
            persist(&mut node.disk, &mut p.parts.lun, &p.parts.intent);
        }
    }

    pub(super) fn advance(&mut self, ms: u64) {
        self.now += ms;
        for n in 0..2 {
            self.tick(n);
        }
    }

    pub(super) fn fault(&mut self) {
        let n = self.rng.gen_range(0..2);
        // An admin command to a paused daemon waits for it: not issued meanwhile.
        // A primary that lost its lease is demoted by its controller, not by an operator.
        let admin = !self.nodes[n].paused && !self.nodes[n].lease_lost;
        match self.rng.gen_range(0..125) {
            0..=14 => {
                self.partitioned = !self.partitioned;
                let on = if self.partitioned { "on" } else { "healed" };
                trace!(self, "partition {on}");
            }
            15..=27 if self.up(n) => {
                self.nodes[n].paused = !self.nodes[n].paused;
                let what = if self.nodes[n].paused {
                    "paused"
                } else {
                    "resumed"
                };
                trace!(self, "node {n}: {what}");
                // Half the time a paused primary's peer takes over (the deadtime passes
                // while it is paused; it can do nothing meanwhile anyway).
                if self.nodes[n].paused && self.rng.gen_bool(0.5) {
                    self.lease_takeover(Self::other(n));
                }
            }
            28..=37 => self.crash(n, false),
            38..=42 => self.crash(n, true),
            43..=62 => self.restart(n),
            63..=64 => {
                let d = &mut self.nodes[n].disk;
                d.data_full = !d.data_full;
                let what = if d.data_full { "full" } else { "has room" };
                trace!(self, "node {n}: data disk {what}");
            }
            65..=67 => {
                let fails = match self.rng.gen_bool(0.5) {
                    true => MetaFailure::Tmp,
                    false => MetaFailure::DirSync,
                };
                let d = &mut self.nodes[n].disk;
                d.meta_fails = if d.meta_fails.is_some() {
                    None
                } else {
                    Some(fails)
                };
                trace!(self, "node {n}: metadata writes fail: {:?}", d.meta_fails);
            }
            68..=77 if admin => self.demote(n),
            78..=92 if admin && self.operator_may_promote(n) => {
                self.promote(n, false);
            }
            93..=99 if admin && self.is_primary(n) => self.outdate_peer(n),
            100..=109 => self.cut_one(),
            110..=114 => self.hold_backlog(),
            116..=119 if admin => {
                let repair = self.rng.gen_bool(0.5);
                self.verify(n, repair);
            }
            120..=121 => {
                // A quiet spell: the faults stop for a while and the pair resyncs while
                // the initiator writes on (what verify compares in sync needs).
                self.heal_all();
                self.calm_steps = self.rng.gen_range(100..300);
                trace!(self, "quiet spell of {} steps", self.calm_steps);
            }
            122..=124 if admin => self.resolve(n),
            115 => {
                let renamed = self.rng.gen_bool(0.5);
                self.nodes[n].disk.power_cut = Some(renamed);
                trace!(
                    self,
                    "node {n}: the power will fail in its next metadata write"
                );
            }
            _ => {}
        }
    }

    /// Restarts a stopped daemon; a node configured primary waits for the link (it asks the
    /// peer first, and an unreachable peer would let it start as a second primary).
    pub(super) fn restart(&mut self, n: NodeId) {
        if self.up(n) {
            return;
        }
        let o = Self::other(n);
        // The peer was promoted or changed data alone (as `status` last showed it, running
        // or not): this node's start asks it first, so it waits until it can.
        let peer = &self.nodes[o];
        if self.nodes[n].config_primary
            && !self.reachable(o)
            && (peer.seen_primary || peer.seen_peer_outdated)
        {
            return;
        }
        self.start(n);
    }

    /// What the operator sees of node `n` in `status` (kept while it is down): its role and
    /// its record in memory, which a transition changes before it persists it.
    pub(super) fn note_status(&mut self, n: NodeId) {
        let node = &mut self.nodes[n];
        if let Some(p) = &node.proc_ {
            node.seen_primary = p.primary;
            node.seen_peer_outdated = p.parts.lun.meta().flags.peer_outdated;
        }
    }

    /// The invariants that hold at every step.
    pub(super) fn check(&mut self) {
        for n in 0..2 {
            self.note_status(n);
        }
        // A primary that lost its lease takes writes it can never answer GOOD: it holds
        // them (its peer refuses them) until its demotion fails them.
        let answering = self
            .writers()
            .into_iter()
            .filter(|&n| !self.nodes[n].lease_lost)
            .count();
        if answering > 1 && !self.forced {
            self.fail("two nodes take writes");
        }
        self.check_equal_when_quiet();
    }

    /// A quiet, synced pair holds equal copies.
    pub(super) fn check_equal_when_quiet(&mut self) {
        let [a, b] = [0, 1];
        let (pa, pb) = match (&self.nodes[a].proc_, &self.nodes[b].proc_) {
            (Some(pa), Some(pb)) => (pa, pb),
            _ => return,
        };
        let (p, s) = if pa.primary { (a, b) } else { (b, a) };
        let (pp, ps) = if pa.primary { (pa, pb) } else { (pb, pa) };
        // A primary that lost its lease still believes it mirrors (it was paused when its
        // peer took over): its copy is the old one, and not the pair's any more.
        let quiet = pp.primary
            && !self.nodes[p].lease_lost
            && !ps.primary
            && pp.mirror.mirroring()
            && matches!(&pp.manager, Manager::Running { run, .. } if run.watching())
            && pp.writes.is_empty()
            && pp.parts.lun.state() == SyncState::UpToDate
            && ps.parts.lun.state() == SyncState::UpToDate
            && self.conns.iter().all(|c| {
                c.to_secondary.iter().all(|(_, f)| matches!(f, Frame::Fin))
                    && c.to_primary.iter().all(|(_, f)| matches!(f, Frame::Fin))
            });
        if !quiet {
            return;
        }
        self.stats.equal_checks += 1;
        let (dp, ds) = (&self.nodes[p].disk.volatile, &self.nodes[s].disk.volatile);
        if let Some(at) = (0..SIZE as usize).find(|&i| dp[i] != ds[i]) {
            self.fail(&format!(
                "both UpToDate and quiet, but the copies differ at byte {at} (region {}): primary node {p} holds write {}, secondary node {s} write {}",
                at as u64 / REGION,
                sector_value(dp, at / SECTOR as usize),
                sector_value(ds, at / SECTOR as usize)
            ));
        }
    }

    /// One step; a power cut in the middle of a metadata write ends it there (`PowerCut`).
    pub(super) fn step(&mut self) {
        self.calm_steps = self.calm_steps.saturating_sub(1);
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.act()));
        if let Err(payload) = stepped {
            match payload.downcast::<PowerCut>() {
                Ok(cut) => self.power_cut(cut.0),
                Err(other) => std::panic::resume_unwind(other),
            }
        }
        self.check();
    }

    fn act(&mut self) {
        match self.rng.gen_range(0..100) {
            0..=34 => self.initiator_write(),
            35..=69 => {
                let ready = self.deliverable();
                if ready.is_empty() {
                    let ms = self.rng.gen_range(1..20);
                    self.advance(ms);
                } else if self.calm_steps > 0 {
                    // A quiet link keeps up with the writes: whatever has arrived is taken.
                    for (id, to_secondary) in ready {
                        self.deliver(id, to_secondary);
                    }
                } else {
                    let (id, to_secondary) = ready[self.rng.gen_range(0..ready.len())];
                    self.deliver(id, to_secondary);
                }
            }
            70..=89 => {
                let ms = self.rng.gen_range(1..60);
                self.advance(ms);
            }
            _ if self.calm_steps > 0 => {
                // A quiet spell: stopped daemons come back, the operator verifies the
                // primary now and then, writes go on.
                for n in 0..2 {
                    self.restart(n);
                }
                if let (Some(&n), true) = (self.writers().first(), self.rng.gen_bool(0.2)) {
                    let repair = self.rng.gen_bool(0.5);
                    self.verify(n, repair);
                }
                // The failover rig's sigstop: the primary of a pair in sync stops for longer
                // than the deadtime, its peer takes over, and it runs again still saying
                // primary until its controller demotes it.
                let writers = self.writers();
                if let ([o], true) = (writers.as_slice(), self.rng.gen_bool(0.05)) {
                    let o = *o;
                    self.nodes[o].paused = true;
                    trace!(self, "node {o}: paused");
                    self.lease_takeover(Self::other(o));
                    self.nodes[o].paused = false;
                    trace!(self, "node {o}: resumed");
                }
            }
            _ => {
                if self.rng.gen_bool(0.01) && self.partitioned && self.up(1) && !self.forced {
                    // The split-brain scenario: an operator forces a promotion during a
                    // partition, with the old primary alive.
                    if self.is_primary(0) {
                        self.forced = true;
                        self.promote(1, true);
                    }
                } else {
                    self.fault();
                }
            }
        }
    }

    /// Every fault ends (the network, paused processes, the disks); crashed daemons are
    /// restarted by `settle` or the restart fault.
    fn heal_all(&mut self) {
        self.partitioned = false;
        self.heal_cuts();
        for n in 0..2 {
            self.nodes[n].paused = false;
            self.nodes[n].disk.meta_fails = None;
            self.nodes[n].disk.power_cut = None;
            self.nodes[n].disk.data_full = false;
        }
    }

    /// Heals every fault, lets the pair converge without new writes, and checks the end.
    pub(super) fn settle(&mut self) {
        self.heal_all();
        for _ in 0..2000 {
            for n in 0..2 {
                self.restart(n);
            }
            if self.writers().is_empty() {
                // The rules hold here too: a node is promoted only where they allow it.
                // As an operator would: the other node when one refuses (its data is
                // unusable: an unfinished resync into it).
                for n in 0..2 {
                    if self.up(n) && self.operator_may_promote(n) && self.promote(n, false) {
                        break;
                    }
                }
            }
            if self.split_visible() {
                // The operator resolves it: the node that serves keeps its data (node 0's
                // if both do).
                let victim = if self.is_primary(0) { 1 } else { 0 };
                self.resolve_split_brain(victim);
            }
            let ready = self.deliverable();
            if let Some(&(id, to_secondary)) = ready.first() {
                self.deliver(id, to_secondary);
            } else {
                self.advance(10);
            }
            self.check();
            if self.stats.equal_checks > 0 && self.is_quiet_synced() {
                break;
            }
        }
        // Progress: once the faults stop, the pair settles by itself (one writer, in sync,
        // idle), unless it waits for the operator: no writer, and the rules let the
        // operator promote neither node (a split brain, or both nodes' records say the
        // other is behind), which `resolve` settles. Found the resync that waited for held
        // writes while they waited for it (the failover rig's hang).
        // A forced promotion (`promote --force`, the split-brain scenario) is such a case
        // too: its data may be refused as a resync source until the operator resolves.
        let needs_operator = self.forced || self.writers().is_empty();
        if !self.is_quiet_synced() && !needs_operator {
            self.fail("the faults stopped, and the pair never settled (one writer, in sync, idle)");
        }
        for n in self.writers() {
            self.now_serving(n);
        }
    }

    pub(super) fn is_quiet_synced(&self) -> bool {
        let w = self.writers();
        w.len() == 1
            && self.nodes[w[0]].proc_.as_ref().is_some_and(|p| {
                matches!(&p.manager, Manager::Running { run, .. } if run.watching())
                    && p.writes.is_empty()
            })
    }

    pub(super) fn run(&mut self, steps: usize) {
        trace!(self, "seed {} policy {:?}", self.seed, self.policy);
        for _ in 0..steps {
            self.step();
        }
        self.settle();
    }
}
