//! The simulated network: TCP-like connections between the primary and the secondary,
//! and what each end does with what arrives.

use super::*;

/// What travels on a connection: a framed message with its sequence, or the end of the
/// stream (FIN after the data sent before it).
#[derive(Clone, Debug)]
pub(super) enum Frame {
    Msg(u64, Message),
    Fin,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ConnKind {
    Data(usize),
    Control,
}

pub(super) struct Conn {
    /// The primary that connected, and the secondary that accepted.
    pub(super) from: NodeId,
    pub(super) to: NodeId,
    pub(super) kind: ConnKind,
    /// Frames toward the secondary and toward the primary, with their arrival time.
    pub(super) to_secondary: VecDeque<(u64, Frame)>,
    pub(super) to_primary: VecDeque<(u64, Frame)>,
    /// Closed at each end (a closed end sends nothing more and drops what arrives).
    pub(super) closed_from: bool,
    pub(super) closed_to: bool,
    /// The secondary's side of it (the shipped `ApplyConn`: its accept number, whether a
    /// resync began on it, what each message does).
    pub(super) apply: ApplyConn,
    pub(super) last_heard_ms: u64,
    /// This connection alone is cut, toward the secondary, toward the primary, or both,
    /// while the others between the same nodes work (`Sim::cut_one` says what that is);
    /// since when. Its frames wait (TCP retransmits them) and arrive once it heals.
    pub(super) cut_to_secondary: bool,
    pub(super) cut_to_primary: bool,
    pub(super) cut_since_ms: u64,
}

impl Conn {
    /// Whether neither end can still send or receive anything on it.
    fn gone(&self) -> bool {
        self.closed_from
            && self.closed_to
            && self.to_secondary.is_empty()
            && self.to_primary.is_empty()
    }
}

/// Closes one end of a connection: a FIN follows whatever that end sent before.
pub(super) fn close_end(conns: &mut [Conn], id: ConnId, primary_end: bool, now: u64) {
    let c = &mut conns[id];
    if primary_end && !c.closed_from {
        c.closed_from = true;
        c.to_secondary.push_back((now + 1, Frame::Fin));
    } else if !primary_end && !c.closed_to {
        c.closed_to = true;
        c.to_primary.push_back((now + 1, Frame::Fin));
    }
}

impl Sim {
    /// A frame's time on the wire: mostly a LAN's, sometimes a congested link's, now and
    /// then longer than `replica_timeout_ms` (a loss is declared while frames are still on
    /// their way, and they arrive afterwards). In a quiet spell a round trip stays well
    /// within the timeout.
    pub(super) fn delay(&mut self) -> u64 {
        if self.calm_steps > 0 {
            return match self.rng.gen_range(0..100) {
                0..=84 => self.rng.gen_range(0..3),
                _ => self.rng.gen_range(20..TIMEOUT_MS / 3),
            };
        }
        match self.rng.gen_range(0..100) {
            0..=84 => self.rng.gen_range(0..3),
            85..=97 => self.rng.gen_range(20..150),
            _ => self.rng.gen_range(150..2 * TIMEOUT_MS),
        }
    }

    /// Connects a replica connection from primary `n` to the peer (engine: `connect` and the
    /// peer's `serve`/`apply_conn` handshake). None: unreachable or refused.
    pub(super) fn connect(&mut self, n: NodeId, kind: ConnKind) -> Option<ConnId> {
        let o = Self::other(n);
        if !self.reachable(o) {
            return None;
        }
        let q = self.nodes[o].proc_.as_mut().expect("reachable");
        let accept_id = q.gate.accept();
        if q.primary {
            // "refusing replica connection: this node is primary too".
            trace!(self, "node {o}: refuses a replica connection: primary too");
            return None;
        }
        if kind == ConnKind::Control {
            let h = self.nodes[n].proc_.as_ref()?.parts.hello(true);
            let node = &mut self.nodes[o];
            let q = node.proc_.as_mut().expect("reachable");
            if q.parts.lun.primary_connected(&h).needed() {
                persist(&mut node.disk, &mut q.parts.lun, &q.parts.intent);
            }
        }
        self.conns.push(Conn {
            from: n,
            to: o,
            kind,
            to_secondary: VecDeque::new(),
            to_primary: VecDeque::new(),
            closed_from: false,
            closed_to: false,
            apply: ApplyConn::new(accept_id, kind == ConnKind::Control),
            last_heard_ms: self.now,
            cut_to_secondary: false,
            cut_to_primary: false,
            cut_since_ms: 0,
        });
        Some(self.conns.len() - 1)
    }

    /// Cuts one connection (or heals it, if it is cut), in one direction or both, while the
    /// others between the same nodes work. Why this is real: a flow is lost alone when a
    /// stateful firewall or NAT on the replica path forgets its state (an idle data link
    /// outlives a conntrack timeout; a failover of the firewall pair), or when the bond
    /// member its hash chose fails; a one-way loss when a rule or a fiber fails in one
    /// direction. What was sent waits, as TCP retransmits it, and arrives after the heal; a
    /// new connection (another port) is not affected (`reachable` stays true), so this
    /// models a lost flow, not a down path that new flows might hash onto too.
    pub(super) fn cut_one(&mut self) {
        let live: Vec<ConnId> = (0..self.conns.len())
            .filter(|&id| !self.conns[id].gone())
            .collect();
        let Some(&id) = live.get(self.rng.gen_range(0..live.len().max(1))) else {
            return;
        };
        let way = self.rng.gen_range(0..5);
        let now = self.now;
        let c = &mut self.conns[id];
        if c.cut_to_secondary || c.cut_to_primary {
            c.cut_to_secondary = false;
            c.cut_to_primary = false;
            trace!(self, "connection {id} heals");
            return;
        }
        c.cut_to_secondary = way != 0;
        c.cut_to_primary = way != 1;
        c.cut_since_ms = now;
        self.stats.cuts += 1;
        trace!(
            self,
            "connection {id} ({:?}, node {} -> {}) cut{}",
            self.conns[id].kind,
            self.conns[id].from,
            self.conns[id].to,
            match way {
                0 => " toward the primary",
                1 => " toward the secondary",
                _ => "",
            }
        );
    }

    /// A connection the primary gave up on (its end closed: a peer loss reset its links,
    /// the process crashed or was demoted) still has frames on their way: they are held up
    /// (its path is down, as for `cut_one`) and arrive after newer connections' frames,
    /// once it heals. This is how the engine sees a message twice, or out of its time: TCP
    /// never duplicates nor reorders within a connection, and the primary never sends a
    /// frame again on another connection, but the regions of the writes it gave up on are
    /// copied again by the next resync, so the same bytes arrive on two connections in
    /// either order; and a frame of an old round may land after a newer round's write to
    /// the same region. The secondary's gate (accept numbering) and the resync's copy
    /// behind it must make that harmless; sequence numbers are only echoed in acks.
    pub(super) fn hold_backlog(&mut self) {
        let given_up: Vec<ConnId> = (0..self.conns.len())
            .filter(|&id| {
                let c = &self.conns[id];
                c.closed_from
                    && !c.closed_to
                    && !c.cut_to_secondary
                    && c.to_secondary
                        .iter()
                        .any(|(_, f)| matches!(f, Frame::Msg(..)))
            })
            .collect();
        let Some(&id) = given_up.get(self.rng.gen_range(0..given_up.len().max(1))) else {
            return;
        };
        let c = &mut self.conns[id];
        c.cut_to_secondary = true;
        c.cut_since_ms = self.now;
        self.stats.held_backlogs += 1;
        trace!(self, "connection {id}: its backlog is held up");
    }

    /// Heals every cut connection.
    pub(super) fn heal_cuts(&mut self) {
        for c in &mut self.conns {
            c.cut_to_secondary = false;
            c.cut_to_primary = false;
        }
    }

    /// The secondary's TCP keepalive (engine: `apply_conn` sets it; 11 s with the default
    /// 2 s timeout, so 5.5 timeouts here) ends a connection cut both ways on which it has
    /// nothing unacknowledged (with data unacknowledged TCP retransmits instead, for many
    /// minutes, and keepalive does not probe). Its end closes: what still arrives is
    /// dropped, and the primary hears of it (the reset, at its next send) after the heal.
    pub(super) fn keepalive_expires(&mut self, n: NodeId) {
        let now = self.now;
        for id in 0..self.conns.len() {
            let c = &self.conns[id];
            let idle = c.to_primary.iter().all(|(_, f)| matches!(f, Frame::Fin));
            if c.to == n
                && c.cut_to_secondary
                && c.cut_to_primary
                && !c.closed_to
                && idle
                && now.saturating_sub(c.cut_since_ms) > KEEPALIVE_MS
            {
                trace!(self, "node {n}: keepalive ends the cut connection {id}");
                close_end(&mut self.conns, id, false, now);
            }
        }
    }

    /// Connections with a frame that can arrive now: (conn, toward the secondary).
    pub(super) fn deliverable(&self) -> Vec<(ConnId, bool)> {
        let mut out = Vec::new();
        if self.partitioned {
            return out;
        }
        for (id, c) in self.conns.iter().enumerate() {
            let ready = |q: &VecDeque<(u64, Frame)>, to: NodeId| {
                q.front().is_some_and(|(at, _)| *at <= self.now) && !self.nodes[to].paused
            };
            if ready(&c.to_secondary, c.to) && !c.cut_to_secondary {
                out.push((id, true));
            }
            if ready(&c.to_primary, c.from) && !c.cut_to_primary {
                out.push((id, false));
            }
        }
        out
    }

    pub(super) fn deliver(&mut self, id: ConnId, to_secondary: bool) {
        let c = &mut self.conns[id];
        let frame = if to_secondary {
            c.to_secondary.pop_front()
        } else {
            c.to_primary.pop_front()
        };
        let Some((_, frame)) = frame else { return };
        if to_secondary {
            if c.closed_to {
                return;
            }
            c.last_heard_ms = self.now;
            match frame {
                Frame::Fin => {
                    let now = self.now;
                    close_end(&mut self.conns, id, false, now);
                }
                Frame::Msg(seq, msg) => self.secondary_apply(id, seq, msg),
            }
        } else {
            if c.closed_from {
                return;
            }
            match frame {
                Frame::Fin => self.primary_conn_ended(id),
                Frame::Msg(_, Message::Ack { seq, status }) => self.primary_ack(id, seq, status),
                Frame::Msg(_, Message::VerifyDigest { digest, .. }) => {
                    self.verify_reply(id, digest)
                }
                Frame::Msg(..) => {}
            }
        }
    }

    /// The secondary takes one message (engine: `apply_conn`): through its gate, applied,
    /// answered.
    pub(super) fn secondary_apply(&mut self, id: ConnId, seq: u64, msg: Message) {
        let frame = WireFrame::Other(msg);
        if !self.secondary_admits(id, &frame) {
            return;
        }
        let Some(reply) = self.secondary_applies(id, seq, frame) else {
            return;
        };
        // Acks travel in frames of their own numbered 0; a digest in its request's number.
        let frame_seq = if matches!(reply, Message::Ack { .. }) {
            0
        } else {
            seq
        };
        let at = self.now + self.delay();
        let c = &mut self.conns[id];
        if !c.closed_to {
            c.to_primary.push_back((at, Frame::Msg(frame_seq, reply)));
        }
    }

    /// Whether the secondary's gate lets connection `id`'s `frame` be applied; a connection
    /// it refuses closes.
    fn secondary_admits(&mut self, id: ConnId, frame: &WireFrame<'_>) -> bool {
        let n = self.conns[id].to;
        let accept_id = self.conns[id].apply.id();
        let now = self.now;
        // A frame of a connection given up on, behind a newer resync's control connection.
        let stale = self.conns[id].closed_from
            && self.conns.iter().any(|c| {
                c.to == n && c.kind == ConnKind::Control && c.apply.id() > accept_id && !c.closed_to
            });
        self.stats.stale_frames += u64::from(stale);
        let Some(q) = self.nodes[n].proc_.as_mut() else {
            return false;
        };
        if self.conns[id].apply.supersedes(frame) {
            q.gate.supersede_older(accept_id);
            trace!(
                self,
                "node {n}: a resync on conn {id} supersedes older connections"
            );
        }
        let q = self.nodes[n].proc_.as_mut().expect("up");
        let admit = self.conns[id].apply.admit(&q.gate, q.fenced);
        if admit == Admit::Apply {
            return true;
        }
        if self.conns[id].apply.admit(&q.gate, false) == Admit::Superseded {
            self.stats.superseded += 1;
        }
        trace!(self, "node {n}: closes connection {id} ({admit:?})");
        close_end(&mut self.conns, id, false, now);
        false
    }

    /// Applies `frame` on the secondary as the shipped `ApplyConn::plan` says; returns its
    /// answer (none: not running).
    fn secondary_applies(&mut self, id: ConnId, seq: u64, frame: WireFrame<'_>) -> Option<Message> {
        let n = self.conns[id].to;
        let accept_id = self.conns[id].apply.id();
        let plan = self.conns[id]
            .apply
            .plan(frame, |key| (key == LUN_KEY).then_some((0, SIZE)));
        let node = &mut self.nodes[n];
        let q = node.proc_.as_mut()?;
        let disk = &mut node.disk;
        let status = match plan {
            Apply::Answer(status) => status,
            Apply::Refused(why) => {
                trace!(self, "node {n}: refuses a message: {why}");
                AckStatus::Refused
            }
            Apply::Change(Change {
                offset, op, resync, ..
            }) => {
                if resync && q.parts.lun.resync_data_arriving().needed() {
                    persist(disk, &mut q.parts.lun, &q.parts.intent);
                }
                let at = offset as usize..(offset + op.len()) as usize;
                match op {
                    ChangeOp::Write { .. } if disk.data_full => AckStatus::NoSpace,
                    ChangeOp::Write { data, fua } => {
                        trace!(
                            self,
                            "node {n}: applies {} {} at {offset} (conn {id}, accepted {accept_id})",
                            if resync { "resync data" } else { "write" },
                            sector_value(&data, 0)
                        );
                        disk.volatile[at.clone()].copy_from_slice(&data);
                        if fua {
                            disk.durable[at].copy_from_slice(&data);
                        }
                        AckStatus::Ok
                    }
                    ChangeOp::Punch { .. } | ChangeOp::ZeroRange { .. } => {
                        disk.volatile[at].fill(0);
                        AckStatus::Ok
                    }
                }
            }
            Apply::Flush { .. } => {
                disk.durable.copy_from_slice(&disk.volatile);
                AckStatus::Ok
            }
            Apply::Complete { gen, .. } => {
                // Everything copied is on stable storage before the source forgets it.
                disk.durable.copy_from_slice(&disk.volatile);
                let _ = q.parts.lun.resync_done_target(&gen);
                if persist(disk, &mut q.parts.lun, &q.parts.intent) {
                    q.parts.lun.resync_target_recorded();
                    AckStatus::Ok
                } else {
                    AckStatus::IoError(5)
                }
            }
            // The simulation has no reservations to store (engine: `PrState::decode`, then
            // the LUN's state replaced if the snapshot is newer).
            Apply::StorePr { .. } => AckStatus::Ok,
            // Snapshots are not modelled here: replica::snapshot's own tests walk every
            // outcome of every step of a cut.
            Apply::Snapshot { .. } | Apply::FollowSnapshots { .. } => AckStatus::Ok,
            // Answered with the digest itself (engine: `region_digest` of the file).
            Apply::Digest { region, .. } => {
                return Some(Message::VerifyDigest {
                    lun_key: LUN_KEY,
                    region,
                    digest: region_digest(&disk.volatile, region),
                });
            }
            Apply::Progress {
                done_bytes,
                total_bytes,
                eta_ms,
                ..
            } => {
                q.parts.lun.progress_heard(done_bytes, total_bytes, eta_ms);
                AckStatus::Ok
            }
        };
        Some(Message::Ack { seq, status })
    }

    /// An ack reaches the primary: a data link's (engine: `link_reader`) or the manager's.
    pub(super) fn primary_ack(&mut self, id: ConnId, seq: u64, status: AckStatus) {
        let n = self.conns[id].from;
        match self.conns[id].kind {
            ConnKind::Data(core) => {
                let Some(p) = self.nodes[n].proc_.as_mut() else {
                    return;
                };
                let out = p.parts.shards[core].take_acks([(seq, status)]);
                for token in out.answered {
                    self.peer_side_done(n, token, true, false);
                }
                if out.peer_failed.is_some() {
                    self.peer_lost(n, "the peer failed a mirrored write");
                }
            }
            ConnKind::Control => self.manager_ack(n, id, seq, status),
        }
    }

    /// The peer closed a connection (or the primary's end saw it die).
    pub(super) fn primary_conn_ended(&mut self, id: ConnId) {
        let n = self.conns[id].from;
        let now = self.now;
        close_end(&mut self.conns, id, true, now);
        match self.conns[id].kind {
            ConnKind::Data(core) => {
                let Some(p) = self.nodes[n].proc_.as_mut() else {
                    return;
                };
                if p.parts.links[core] == Some(id) {
                    p.parts.links[core] = None;
                    self.peer_lost(n, "link closed");
                }
            }
            ConnKind::Control => {
                if self.manager_conn(n) == Some(id) {
                    self.manager_abort(n, "control connection closed");
                }
                self.verify_failed(n, id);
            }
        }
    }
}
