//! The primary's manager: reconnect, plan, copy, complete, watch (engine: resync.rs).

use super::*;

impl Sim {
    pub(super) fn manager_conn(&self, n: NodeId) -> Option<ConnId> {
        match self.nodes[n].proc_.as_ref()?.manager {
            Manager::Idle { .. } => None,
            Manager::Opening { conn, .. }
            | Manager::Copying { conn, .. }
            | Manager::Done { conn, .. }
            | Manager::Watching { conn, .. } => Some(conn),
        }
    }

    /// The resync or the watch failed: the peer is lost (whatever was not copied stays
    /// dirty), the control connection closes, the manager retries later.
    pub(super) fn manager_abort(&mut self, n: NodeId, why: &str) {
        trace!(self, "node {n}: manager stops: {why}");
        if let Some(c) = self.manager_conn(n) {
            let now = self.now;
            close_end(&mut self.conns, c, true, now);
        }
        if let Some(p) = self.nodes[n].proc_.as_mut() {
            p.manager = Manager::Idle {
                next_try_ms: self.now + RECONNECT_MS,
            };
        }
        self.peer_lost(n, why);
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

    /// One look of the manager (engine: `manage`, `resync`, `copy_lun`, `watch_peer`).
    pub(super) fn manager_tick(&mut self, n: NodeId) {
        let Some(p) = self.nodes[n].proc_.as_ref() else {
            return;
        };
        if self.nodes[n].paused {
            return;
        }
        let primary = p.primary;
        let mirroring = p.mirror.mirroring();
        match &p.manager {
            Manager::Idle { next_try_ms } => {
                if primary && !mirroring && self.now >= *next_try_ms {
                    self.manager_connect(n);
                }
            }
            Manager::Opening { sent_ms, .. } => {
                if self.now.saturating_sub(*sent_ms) > TIMEOUT_MS {
                    self.manager_abort(n, "the peer did not answer the resync's start");
                }
            }
            Manager::Copying { awaiting: None, .. } => self.copy_next(n),
            Manager::Copying { .. } | Manager::Done { .. } => {}
            Manager::Watching {
                conn,
                round,
                next_ping_ms,
                awaiting,
            } => {
                let (conn, round, next_ping_ms) = (*conn, *round, *next_ping_ms);
                let awaiting = *awaiting;
                if !primary || !mirroring {
                    // watch_peer returns: the control connection closes.
                    let now = self.now;
                    close_end(&mut self.conns, conn, true, now);
                    self.nodes[n].proc_.as_mut().expect("up").manager = Manager::Idle {
                        next_try_ms: self.now + RECONNECT_MS,
                    };
                } else if let Some((_, sent)) = awaiting {
                    if self.now.saturating_sub(sent) > TIMEOUT_MS {
                        self.manager_abort(n, "the peer stopped answering pings");
                    }
                } else if self.now >= next_ping_ms {
                    let seq = self.send_control(n, conn, Message::Ping { now_ms: self.now });
                    self.nodes[n].proc_.as_mut().expect("up").manager = Manager::Watching {
                        conn,
                        round,
                        next_ping_ms: self.now + PING_MS,
                        awaiting: Some((seq, self.now)),
                    };
                }
            }
        }
    }

    pub(super) fn manager_connect(&mut self, n: NodeId) {
        let Some(conn) = self.connect(n, ConnKind::Control) else {
            if let Some(p) = self.nodes[n].proc_.as_mut() {
                p.manager = Manager::Idle {
                    next_try_ms: self.now + RECONNECT_MS,
                };
            }
            return;
        };
        let o = Self::other(n);
        let hello = {
            let q = self.nodes[o].proc_.as_ref().expect("connected");
            q.parts.lun.hello(q.primary)
        };
        trace!(
            self,
            "node {n}: control connection: local {:?}, peer {:?}",
            self.nodes[n]
                .proc_
                .as_ref()
                .expect("up")
                .parts
                .lun
                .hello(true),
            hello
        );
        let planned = self.nodes[n]
            .proc_
            .as_mut()
            .expect("up")
            .parts
            .lun
            .plan_resync(&hello);
        let plan = match planned {
            Ok(plan) => plan,
            Err(refusal) => {
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
                close_end(&mut self.conns, conn, true, now);
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
        // The first resync change goes out before anything is mirrored on the new data
        // links (engine: `open_round`): see `Sim::begin_round`.
        let seq = self.send_control(
            n,
            conn,
            Message::ResyncProgress {
                lun_key: LUN_KEY,
                done_bytes: 0,
                total_bytes: 0,
                eta_ms: 0,
            },
        );
        self.nodes[n].proc_.as_mut().expect("up").manager = Manager::Opening {
            conn,
            plan,
            seq,
            sent_ms: self.now,
        };
    }

    /// The peer acknowledged the resync's first change, so it applies nothing more of the
    /// connections accepted before this round's control connection: only now may writes
    /// be mirrored on the round's new data links. Why: a write mirrored on a new link
    /// could be applied before that change, and a stale write of an older round's link
    /// (the primary gave up on it; a copy of its region with its data was acknowledged
    /// before the loss, so the region is clean) then landed over it: the copies differed
    /// while both said UpToDate (seed 618664).
    fn begin_round(&mut self, n: NodeId, conn: ConnId, plan: ResyncPlan) {
        let round = self.with_mirror(n, |m, _| m.start_round()).expect("up");
        let now = self.now;
        let node = &mut self.nodes[n];
        let p = node.proc_.as_mut().expect("up");
        let (regions, persist_needed) = p.parts.lun.begin_resync(&plan, now);
        trace!(
            self,
            "node {n}: resync round {round}: {} regions ({:?})",
            regions.len(),
            plan.decision
        );
        let p = self.nodes[n].proc_.as_mut().expect("up");
        p.manager = Manager::Copying {
            conn,
            round,
            initial: plan.initial,
            queue: regions.into(),
            passes: 0,
            awaiting: None,
            head_sent: false,
        };
        if persist_needed.needed() {
            let node = &mut self.nodes[n];
            let p = node.proc_.as_mut().expect("up");
            if !persist(&mut node.disk, &mut p.parts.lun, &p.parts.intent) {
                self.manager_abort(n, "cannot persist the resync plan");
            }
        }
    }

    /// Copies the next region, or ends the pass (engine: `copy_lun`, `copy_region`).
    pub(super) fn copy_next(&mut self, n: NodeId) {
        let p = self.nodes[n].proc_.as_ref().expect("up");
        let Manager::Copying {
            conn,
            round,
            initial,
            ref queue,
            passes,
            head_sent,
            ..
        } = p.manager
        else {
            return;
        };
        if !p.mirror.mirroring() {
            return self.manager_abort(n, "the peer was lost during the resync");
        }
        if let Some(&region) = queue.front() {
            let (offset, len) = if head_sent {
                (region * REGION, REGION)
            } else {
                (region * REGION, HEAD_BYTES)
            };
            if self.copy_blocked(n, (offset, len)) {
                return; // The range lock: wait for the writes running there.
            }
            let data =
                self.nodes[n].disk.volatile[offset as usize..(offset + len) as usize].to_vec();
            let msg = if data.iter().all(|&b| b == 0) && head_sent {
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
            };
            let seq = self.send_control(n, conn, msg);
            trace!(
                self,
                "node {n}: copies {len} bytes at {offset} (conn {conn})"
            );
            if let Manager::Copying {
                awaiting,
                head_sent: head,
                ..
            } = &mut self.nodes[n].proc_.as_mut().expect("up").manager
            {
                *awaiting = Some(Chunk {
                    offset,
                    len,
                    seq,
                    region: head_sent.then_some(region),
                });
                *head = true;
            }
            return;
        }
        self.end_pass(n, conn, round, initial, passes);
    }

    /// The pass is over: complete only if the round still stands (the coordinator's lock).
    fn end_pass(&mut self, n: NodeId, conn: ConnId, round: u64, initial: bool, passes: u32) {
        let random = self.rng.gen();
        let node = &mut self.nodes[n];
        let p = node.proc_.as_mut().expect("up");
        if !p.mirror.round_stands(round) {
            return self.manager_abort(n, "the peer was lost during the resync");
        }
        match p.parts.lun.end_pass(initial, passes, random) {
            PassEnd::Complete {
                gen,
                persist: persist_needed,
            } => {
                if persist_needed.needed()
                    && !persist(&mut node.disk, &mut p.parts.lun, &p.parts.intent)
                {
                    return self.manager_abort(n, "cannot persist the completion's ids");
                }
                let seq = self.send_control(
                    n,
                    conn,
                    Message::ResyncDone {
                        lun_key: LUN_KEY,
                        gen,
                    },
                );
                self.nodes[n].proc_.as_mut().expect("up").manager =
                    Manager::Done { conn, round, seq };
            }
            PassEnd::Again(dirty) => {
                if let Manager::Copying { queue, passes, .. } = &mut p.manager {
                    *queue = dirty.into();
                    *passes += 1;
                }
            }
            PassEnd::GiveUp { .. } => self.manager_abort(n, "regions keep getting dirty"),
        }
    }

    pub(super) fn manager_ack(&mut self, n: NodeId, id: ConnId, seq: u64, status: AckStatus) {
        if self.manager_conn(n) != Some(id) {
            return;
        }
        if status != AckStatus::Ok {
            return self.manager_abort(n, "the peer failed a resync step");
        }
        let p = self.nodes[n].proc_.as_mut().expect("up");
        if let Manager::Opening { seq: s, .. } = p.manager {
            if s == seq {
                let Manager::Opening { conn, plan, .. } =
                    std::mem::replace(&mut p.manager, Manager::Idle { next_try_ms: 0 })
                else {
                    unreachable!("matched above");
                };
                return self.begin_round(n, conn, plan);
            }
            return;
        }
        match &mut p.manager {
            Manager::Copying {
                queue, awaiting, ..
            } => {
                if let Some(copy) = awaiting.filter(|c| c.seq == seq) {
                    // Still under the range lock: a write to the region after this is mirrored.
                    if let Some(region) = copy.region {
                        p.parts.lun.region_copied(region);
                        queue.pop_front();
                    }
                    *awaiting = None;
                }
            }
            Manager::Done {
                conn,
                round,
                seq: s,
            } if *s == seq => {
                let (conn, round) = (*conn, *round);
                if !p.mirror.round_stands(round) {
                    return self.manager_abort(n, "the peer was lost during the resync");
                }
                let node = &mut self.nodes[n];
                let p = node.proc_.as_mut().expect("up");
                if p.parts.lun.completion_acknowledged().needed() {
                    persist(&mut node.disk, &mut p.parts.lun, &p.parts.intent);
                }
                p.parts.lun.crash_covered();
                let synced = self.with_mirror(n, |m, port| m.round_synced(port, round));
                if synced != Some(true) {
                    return self.manager_abort(n, "the peer was lost during the resync");
                }
                self.stats.resyncs += 1;
                trace!(self, "node {n}: resync round {round} complete");
                self.nodes[n].proc_.as_mut().expect("up").manager = Manager::Watching {
                    conn,
                    round,
                    next_ping_ms: self.now + PING_MS,
                    awaiting: None,
                };
            }
            Manager::Watching { awaiting, .. } if awaiting.is_some_and(|(s, _)| s == seq) => {
                *awaiting = None;
            }
            _ => {}
        }
    }
}
