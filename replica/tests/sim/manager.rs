//! The primary's manager (engine: resync.rs): reconnect, plan, then the shipped
//! [`SourceRun`] says every step of the round and of the watch after it; this driver performs
//! them on the simulated control connection and disk, as the engine's does on its own.

use super::*;

impl Sim {
    pub(super) fn manager_conn(&self, n: NodeId) -> Option<ConnId> {
        match self.nodes[n].proc_.as_ref()?.manager {
            Manager::Idle { .. } => None,
            Manager::Running { conn, .. } => Some(conn),
        }
    }

    /// The run of node `n`'s manager, if one is on.
    pub(super) fn manager_run(&self, n: NodeId) -> Option<(ConnId, &SourceRun)> {
        match &self.nodes[n].proc_.as_ref()?.manager {
            Manager::Idle { .. } => None,
            Manager::Running { conn, run, .. } => Some((*conn, run)),
        }
    }

    /// The range node `n`'s resync copy on its way holds locked (until its ack).
    pub(super) fn copy_locked(&self, n: NodeId) -> Option<(u64, u64)> {
        match &self.nodes[n].proc_.as_ref()?.manager {
            Manager::Running {
                run, seq: Some(_), ..
            } => run.copy_in_flight(REGION).map(|(_, o, l)| (o, l)),
            _ => None,
        }
    }

    /// The resync or the watch failed: the peer is lost (whatever was not copied stays
    /// dirty), the control connection closes, the manager retries later.
    pub(super) fn manager_abort(&mut self, n: NodeId, why: &str) {
        trace!(self, "node {n}: manager stops: {why}");
        self.manager_close(n);
        self.peer_lost(n, why);
    }

    /// The control connection closes and the manager waits to retry (engine: `resync`
    /// returns to `manage`).
    fn manager_close(&mut self, n: NodeId) {
        if let Some(c) = self.manager_conn(n) {
            let now = self.now;
            close_end(&mut self.conns, c, true, now);
        }
        if let Some(p) = self.nodes[n].proc_.as_mut() {
            p.manager = Manager::Idle {
                next_try_ms: self.now + RECONNECT_MS,
            };
        }
    }

    pub(super) fn send_control(&mut self, n: NodeId, conn: ConnId, msg: Message) -> u64 {
        let p = self.nodes[n].proc_.as_mut().expect("up");
        let seq = p.next_seq;
        p.next_seq += 1;
        let at = self.now + self.delay();
        if !self.conns[conn].closed_from {
            self.conns[conn]
                .to_secondary
                .push_back((at, Frame::Msg(seq, msg)));
        }
        seq
    }

    /// One look of the manager (engine: `manage`, `resync`, `watch_peer`).
    pub(super) fn manager_tick(&mut self, n: NodeId) {
        let Some(p) = self.nodes[n].proc_.as_ref() else {
            return;
        };
        if self.nodes[n].paused {
            return;
        }
        match p.manager {
            Manager::Idle { next_try_ms } => {
                if p.primary && !p.mirror.mirroring() && self.now >= next_try_ms {
                    self.manager_connect(n);
                }
            }
            Manager::Running { .. } => self.manager_steps(n),
        }
    }

    pub(super) fn manager_connect(&mut self, n: NodeId) {
        let o = Self::other(n);
        // The engine's handshake exchanges the hellos before an acceptor that is primary
        // refuses the connection: the connector plans with that hello all the same (the
        // failover rig's sigstop met it: a frozen old primary's first answer after SIGCONT).
        let acceptor_primary = self.reachable(o) && self.is_primary(o);
        let conn = match self.connect(n, ConnKind::Control) {
            Some(conn) => Some(conn),
            None if acceptor_primary => None,
            None => {
                if let Some(p) = self.nodes[n].proc_.as_mut() {
                    p.manager = Manager::Idle {
                        next_try_ms: self.now + RECONNECT_MS,
                    };
                }
                return;
            }
        };
        let hello = {
            let q = self.nodes[o].proc_.as_ref().expect("connected");
            q.parts.hello(q.primary)
        };
        let p = self.nodes[n].proc_.as_mut().expect("up");
        let local = p.parts.hello(true);
        let planned = p.parts.lun.plan_resync(&hello);
        trace!(
            self,
            "node {n}: control connection: local {local:?}, peer {hello:?}"
        );
        let plan = match planned {
            Ok(plan) => plan,
            Err(refusal) => {
                if refusal == PlanRefusal::PeerAlsoPrimary {
                    self.stats.both_primary += 1;
                }
                if refusal == PlanRefusal::SplitBrain {
                    self.stats.split_brains += 1;
                    if !self.forced {
                        self.fail("a split brain without a forced promotion");
                    }
                    // `status` shows it: the operator may resolve it now.
                    self.split_seen = true;
                }
                trace!(self, "node {n}: resync refused: {refusal:?}");
                let now = self.now;
                if let Some(conn) = conn {
                    close_end(&mut self.conns, conn, true, now);
                }
                self.nodes[n].proc_.as_mut().expect("up").manager = Manager::Idle {
                    next_try_ms: self.now + 4 * RECONNECT_MS,
                };
                return;
            }
        };
        // Resolved only by the operator: the peer's data given up (`resolve --discard-local`,
        // in memory at least: a command whose persist failed still takes effect there).
        let f = hello.flags;
        let discarded = f.outdated && f.inconsistent && f.crashed && !f.primary;
        if self.nodes.iter().all(|node| node.diverged) && !discarded {
            self.fail(&format!(
                "both nodes wrote as primaries (split brain), yet a resync was planned: {plan:?}"
            ));
        }
        let Some(conn) = conn else {
            self.fail(&format!(
                "a resync was planned to a peer that is primary too: {plan:?}"
            ));
        };
        let run = Box::new(SourceRun::new(vec![(0, plan)], SOURCE_TIMERS, self.now));
        self.nodes[n].proc_.as_mut().expect("up").manager = Manager::Running {
            conn,
            run,
            seq: None,
        };
        self.manager_steps(n);
    }

    /// Performs the run's steps until one waits for the peer, a lock or the clock.
    fn manager_steps(&mut self, n: NodeId) {
        // Bounded: each step either waits or moves the run on, and a round has few steps
        // between two waits (begin, a pass's end, the finish).
        for _ in 0..16 {
            let p = self.nodes[n].proc_.as_mut().expect("up");
            let (primary, mirroring) = (p.primary, p.mirror.mirroring());
            let now = self.now;
            let Manager::Running { conn, run, seq } = &mut p.manager else {
                return;
            };
            let conn = *conn;
            if run.watching() && !(primary && mirroring) {
                // watch_peer returns (demoted, or the peer lost elsewhere): the control
                // connection closes.
                return self.manager_close(n);
            }
            let step = match (run.in_flight(), *seq) {
                // Performed; its answer is awaited (or overdue).
                (Some(_), Some(_)) => run.next(now, mirroring),
                // Handed out, not performed yet: try again.
                (Some(step), None) => step.clone(),
                (None, _) => run.next(now, mirroring),
            };
            if !self.manager_step(n, conn, step) {
                return;
            }
        }
    }

    /// Performs `step`; returns whether the next step may follow at once.
    fn manager_step(&mut self, n: NodeId, conn: ConnId, step: SourceStep) -> bool {
        let now = self.now;
        let msg = match step {
            SourceStep::Wait { .. } | SourceStep::Over => return false,
            SourceStep::Stop(why) => {
                self.manager_abort(n, &why.to_string());
                return false;
            }
            SourceStep::Open { .. } => Message::ResyncProgress {
                lun_key: LUN_KEY,
                done_bytes: 0,
                total_bytes: 0,
                eta_ms: 0,
            },
            SourceStep::Begin { .. } => return self.manager_begin(n),
            SourceStep::CopyHead { offset, len, .. } => {
                if self.copy_blocked(n, (offset, len)) {
                    return false; // The range lock: wait for the writes running there.
                }
                trace!(self, "node {n}: copies head {len} bytes at {offset}");
                Message::ResyncData {
                    lun_key: LUN_KEY,
                    offset_bytes: offset,
                    data: self.nodes[n].disk.volatile[offset as usize..(offset + len) as usize]
                        .to_vec(),
                }
            }
            SourceStep::CopyRegion { region, .. } => {
                let (offset, len) = (region * REGION, REGION);
                if self.copy_blocked(n, (offset, len)) {
                    return false;
                }
                trace!(self, "node {n}: copies region {region} (conn {conn})");
                let data =
                    self.nodes[n].disk.volatile[offset as usize..(offset + len) as usize].to_vec();
                if data.iter().all(|&b| b == 0) {
                    Message::WriteZeroes {
                        lun_key: LUN_KEY,
                        offset_bytes: offset,
                        len_bytes: len,
                        unmap: true,
                    }
                } else {
                    Message::ResyncData {
                        lun_key: LUN_KEY,
                        offset_bytes: offset,
                        data,
                    }
                }
            }
            SourceStep::Progress { .. } => {
                let p = self.nodes[n].proc_.as_ref().expect("up");
                let (done_bytes, total_bytes, eta_ms) = p.parts.lun.source_progress(now);
                Message::ResyncProgress {
                    lun_key: LUN_KEY,
                    done_bytes,
                    total_bytes,
                    eta_ms,
                }
            }
            SourceStep::EndPass { .. } => return self.manager_end_pass(n),
            // The simulation has no reservations: an empty state, as a LUN without any.
            SourceStep::Reservations { .. } => Message::PrState {
                lun_key: LUN_KEY,
                origin: n as u64,
                version: 0,
                state: Vec::new(),
            },
            SourceStep::Completion { gen, .. } => Message::ResyncDone {
                lun_key: LUN_KEY,
                gen,
            },
            SourceStep::Finish => return self.manager_finish(n),
            SourceStep::Ping => Message::Ping { now_ms: now },
        };
        let sent = self.send_control(n, conn, msg);
        if let Manager::Running { seq, .. } = &mut self.nodes[n].proc_.as_mut().expect("up").manager
        {
            *seq = Some(sent);
        }
        false
    }

    /// The LUN's resync begins on its record; the plan is persisted first if it must be.
    fn manager_begin(&mut self, n: NodeId) -> bool {
        let now = self.now;
        let node = &mut self.nodes[n];
        let p = node.proc_.as_mut().expect("up");
        let Manager::Running { run, .. } = &mut p.manager else {
            return false;
        };
        let persist_needed = run.begin(&mut p.parts.lun, now);
        trace!(self, "node {n}: resync round {:?} begins", run.round());
        if persist_needed.needed() && !persist(&mut node.disk, &mut p.parts.lun, &p.parts.intent) {
            self.manager_abort(n, "cannot persist the resync plan");
            return false;
        }
        true
    }

    /// The pass is over: the run decides under the coordinator (its round must stand).
    fn manager_end_pass(&mut self, n: NodeId) -> bool {
        let random = self.rng.gen();
        let node = &mut self.nodes[n];
        let p = node.proc_.as_mut().expect("up");
        let Manager::Running { run, .. } = &mut p.manager else {
            return false;
        };
        match run.end_pass(&p.mirror, &mut p.parts.lun, random) {
            Ok(persist_needed) => {
                if persist_needed.needed()
                    && !persist(&mut node.disk, &mut p.parts.lun, &p.parts.intent)
                {
                    self.manager_abort(n, "cannot persist the completion's ids");
                    return false;
                }
                true
            }
            Err(why) => {
                self.manager_abort(n, &why.to_string());
                false
            }
        }
    }

    /// Every LUN is in sync: held completions go out, and the run watches the peer.
    fn manager_finish(&mut self, n: NodeId) -> bool {
        let now = self.now;
        let Some(mut manager) = self.nodes[n]
            .proc_
            .as_mut()
            .map(|p| std::mem::replace(&mut p.manager, Manager::Idle { next_try_ms: 0 }))
        else {
            return false;
        };
        let Manager::Running { run, .. } = &mut manager else {
            unreachable!("finishing a run");
        };
        let round = run.round();
        let finished = self.with_mirror(n, |m, port| run.finish(m, port, now));
        if let Some(p) = self.nodes[n].proc_.as_mut() {
            p.manager = manager;
        }
        match finished {
            Some(Ok(())) => {
                self.stats.resyncs += 1;
                trace!(self, "node {n}: resync round {round:?} complete");
                true
            }
            Some(Err(why)) => {
                self.manager_abort(n, &why.to_string());
                false
            }
            None => false,
        }
    }

    pub(super) fn manager_ack(&mut self, n: NodeId, id: ConnId, seq: u64, status: AckStatus) {
        let now = self.now;
        let node = &mut self.nodes[n];
        let Some(p) = node.proc_.as_mut() else {
            return;
        };
        let Manager::Running {
            conn,
            run,
            seq: awaited,
        } = &mut p.manager
        else {
            return;
        };
        if *conn != id || *awaited != Some(seq) {
            return;
        }
        if status != AckStatus::Ok {
            return self.manager_abort(n, "the peer failed a resync step");
        }
        *awaited = None;
        let step = run.in_flight().cloned().expect("an awaited step");
        match step {
            // A node demoted since it planned starts no round (Mirror::start_round says why).
            SourceStep::Open { .. } => match run.opened(&mut p.mirror) {
                Ok(round) => trace!(self, "node {n}: resync round {round} opened"),
                Err(why) => return self.manager_abort(n, &why.to_string()),
            },
            SourceStep::CopyHead { len, .. } => run.sent(now, len),
            SourceStep::CopyRegion { region, .. } => {
                let offset = (region * REGION) as usize;
                let data = &node.disk.volatile[offset..offset + REGION as usize];
                let bytes = if data.iter().all(|&b| b == 0) {
                    0
                } else {
                    REGION
                };
                run.region_sent(&mut p.parts.lun, bytes);
            }
            SourceStep::Completion { .. } => {
                match run.completion_acked(&p.mirror, &mut p.parts.lun) {
                    Ok(persist_needed) => {
                        // A failure only costs a longer resync next time.
                        if persist_needed.needed() {
                            persist(&mut node.disk, &mut p.parts.lun, &p.parts.intent);
                        }
                    }
                    Err(why) => return self.manager_abort(n, &why.to_string()),
                }
            }
            _ => run.sent(now, 0),
        }
        self.manager_steps(n);
    }
}
