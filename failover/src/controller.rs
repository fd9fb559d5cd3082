//! The failover controller of one node: when to promote, demote, hold the VIP, and let
//! frozen writes go on without the peer. Sans-I/O, as quinn-proto: events in with `now`
//! (ticks, the peer's heartbeats, the replica's state, the witness's replies, a fence
//! command's result, operator commands), actions out ([`Controller::poll_action`]), and
//! [`Controller::poll_timeout`] says when to call back.
//!
//! The rules (ARCHITECTURE.md section 5):
//! - A secondary takes over only when its data is UpToDate and the peer is silent on every
//!   heartbeat path for `deadtime_ms` (or hands over cleanly), and only with the witness's
//!   lease (guard `Witness`) or after the fence command succeeded (guard `Fence`). Without
//!   either (guard `Manual`) only clean handovers happen by themselves.
//! - A primary renews the lease every `keepalive_ms`. It keeps serving while it holds the
//!   lease or hears the peer; reaching neither, it drops the VIP and demotes before its
//!   lease can run out at the witness, so the peer's takeover never meets a second writer.
//! - Writes frozen because the peer stopped acknowledging go on only once the peer is
//!   recorded outdated: by the witness (a grant with `alone`) or by the fence command.
//!   Writes made alone are allowed until [`Controller::alone_until_ms`]: the driver checks
//!   that deadline on its write path, so a primary that was paused (SIGSTOP, a frozen VM)
//!   cannot acknowledge a write alone after its lease ran out, even before this machine
//!   runs again.

use std::collections::VecDeque;

use crate::wire::{Heartbeat, LeaseOp, LeaseReply, LeaseRequest, Refusal};
use crate::NodeId;

/// Most heartbeat paths (the dedicated link, the client network, one spare).
pub const MAX_PATHS: usize = 4;
/// Lease requests remembered while unanswered (older ones are forgotten: their replies,
/// if they come, are ignored, which only delays a grant).
const MAX_OUTSTANDING: usize = 16;
/// Notes kept for the driver to log (the oldest are dropped beyond this).
const MAX_NOTES: usize = 64;

/// The heartbeat timings, as the seed's Heartbeat named them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    /// How often a heartbeat goes out on each path (and the lease is renewed).
    pub keepalive_ms: u64,
    /// Silence on every path for this long: the peer is dead.
    pub deadtime_ms: u64,
    /// A heartbeat later than this after the previous one on its path is logged.
    pub warntime_ms: u64,
    /// After a start, how long the peer may stay unheard before it is taken for dead.
    pub initdead_ms: u64,
}

impl Timings {
    /// The witness's lease: as long as the deadtime, so that when a dead primary's peer
    /// notices (after `deadtime_ms` of silence) the lease the primary last renewed has run
    /// out at the witness too, and the takeover does not wait for it.
    pub fn lease_ms(&self) -> u64 {
        self.deadtime_ms
    }

    /// How much earlier than the witness a holder takes its lease for ended: it counts from
    /// its request's send time (before the witness's receive time), less this margin for
    /// the two clocks' rates (a quarter of the lease, far above any real drift).
    pub fn lease_margin_ms(&self) -> u64 {
        self.lease_ms() / 4
    }

    /// Checks the relations the rules rely on.
    pub fn check(&self) -> Result<(), String> {
        if self.keepalive_ms == 0 {
            return Err("keepalive_ms must be at least 1".into());
        }
        if self.deadtime_ms < 3 * self.keepalive_ms {
            return Err(format!(
                "deadtime_ms ({}) must be at least 3 x keepalive_ms ({}): one lost or late \
                 heartbeat must not look like a dead peer",
                self.deadtime_ms, self.keepalive_ms
            ));
        }
        if self.warntime_ms < self.keepalive_ms || self.warntime_ms >= self.deadtime_ms {
            return Err(format!(
                "warntime_ms ({}) must be between keepalive_ms ({}) and deadtime_ms ({})",
                self.warntime_ms, self.keepalive_ms, self.deadtime_ms
            ));
        }
        if self.initdead_ms < self.deadtime_ms {
            return Err(format!(
                "initdead_ms ({}) must be at least deadtime_ms ({})",
                self.initdead_ms, self.deadtime_ms
            ));
        }
        // The primary renews every keepalive and must hold a valid lease between two
        // renewals even when one reply is lost.
        if self.lease_ms() - self.lease_margin_ms() < 2 * self.keepalive_ms {
            return Err("deadtime_ms must leave room for two lease renewals".into());
        }
        Ok(())
    }
}

/// What makes a takeover safe when the peer is silent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guard {
    /// The witness's lease (quorum of three).
    Witness,
    /// The fence command, which must make the peer unable to write (power it off, cut it
    /// off its disks or clients) and succeed only then.
    Fence,
    /// Neither: a silent peer is never taken over (the operator promotes by hand).
    Manual,
}

/// This node's controller configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node.
    pub node: NodeId,
    /// Heartbeat paths (1..=MAX_PATHS).
    pub paths: usize,
    pub timings: Timings,
    pub guard: Guard,
    /// A recovered preferred node takes its role back once in sync (default false).
    pub auto_failback: bool,
    /// This node is the configured primary: it is preferred when both are secondary.
    pub preferred: bool,
}

/// What the replica layer says about this node (the driver reports it after every change).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaView {
    /// This node serves as primary.
    pub primary: bool,
    /// Every LUN's data here is UpToDate (no unfinished resync into it, not outdated).
    pub promotable: bool,
    /// Primary only: the peer is connected and every LUN is in sync with it.
    pub in_sync: bool,
    /// Primary only: writes are held because the peer stopped acknowledging and is not
    /// recorded outdated yet (and no resync is bringing it back: then they wait for it).
    pub frozen: bool,
}

/// What the driver must do, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this heartbeat on its path.
    Heartbeat(Heartbeat),
    /// Send this request to the witness.
    Witness(LeaseRequest),
    /// Run the fence command against the peer; report with [`Controller::fence_done`].
    Fence,
    /// Become primary for every LUN (close the old primary's links first), then report the
    /// new [`ReplicaView`].
    Promote,
    /// The peer is recorded outdated (witness or fence): frozen writes go on alone, until
    /// [`Controller::alone_until_ms`].
    OutdatePeer,
    /// Become secondary (new commands refused, running ones drained), then report.
    Demote,
    /// Add the VIP, or renew its lifetime.
    AddVip,
    /// Remove the VIP (always before a demotion).
    RemoveVip,
    /// Gratuitous ARP burst for the VIP.
    Announce,
    /// Tickle-ACK the old primary's sessions (their 4-tuples came over the replica link).
    Tickle,
}

/// Something worth a log line; the driver logs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// A heartbeat came `gap_ms` after the previous one on `path` (over warntime).
    LateHeartbeat { path: u8, gap_ms: u64 },
    /// The peer went silent on every path.
    PeerSilent,
    /// The peer is heard again.
    PeerBack,
    /// This node took over, and why.
    TookOver(&'static str),
    /// This node gave up serving, and why.
    GaveUp(&'static str),
    /// The witness refused a request.
    Refused(Refusal),
    /// The peer is silent and nothing may decide a takeover (no witness, no fence command).
    NoGuard,
    /// The fence command failed.
    FenceFailed,
    /// The engine refused a promotion (the peer answered as primary).
    PromotionRefused,
}

/// An operator command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operator {
    /// Hand over to the peer (primary) and do not take over (either role) until
    /// `takeover`.
    Standby,
    /// Take over from a primary that is in sync (it hands over), or clear standby.
    Takeover,
}

/// What `twinsan status` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub primary: bool,
    /// Per path: ms since the last heartbeat from the peer (None: never heard).
    pub path_age_ms: Vec<Option<u64>>,
    pub peer_alive: bool,
    /// This node holds the lease for this many more ms.
    pub lease_left_ms: Option<u64>,
    /// The holder as the witness last said.
    pub lease_holder: Option<NodeId>,
    /// The node the witness last said was outdated.
    pub witness_outdated: Option<NodeId>,
    pub vip_held: bool,
    pub standby: bool,
    /// When (ms) and why this node last took over.
    pub last_takeover: Option<(u64, &'static str)>,
    /// When (ms) and why it last gave up serving.
    pub last_give_up: Option<(u64, &'static str)>,
}

#[derive(Clone, Copy, Debug)]
struct Outstanding {
    id: u64,
    sent_ms: u64,
    /// Only a granted Acquire is a lease: the witness also answers Query and Release
    /// with "granted", and those grant nothing.
    op: LeaseOp,
    alone: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fencing {
    Idle,
    Running,
    /// Failed: retried from this time.
    RetryAt(u64),
    /// Done: the peer was fenced (until it is heard again).
    Done,
}

/// One node's failover controller.
#[derive(Debug)]
pub struct Controller {
    cfg: Config,
    started_ms: u64,
    heard_ms: [Option<u64>; MAX_PATHS],
    peer: Option<Heartbeat>,
    /// The sequence number of the heartbeat `peer` came from.
    peer_seq: Option<u64>,
    peer_was_alive: bool,
    replica: ReplicaView,
    /// Set when Promote or Demote went out; cleared by the next replica report.
    role_change_pending: bool,
    lease_until_ms: Option<u64>,
    lease_holder: Option<NodeId>,
    witness_outdated: Option<NodeId>,
    /// The witness's record epoch from its last reply.
    witness_epoch: u64,
    /// The epoch at which this node last claimed its peer in sync (`peer_in_sync`) while
    /// the record named the peer outdated: until the epoch moves on, such a claim may still
    /// land at the witness (late, or replayed after its restart) and clear the record, so
    /// the next alone request asks for a new epoch (`renew_alone`).
    in_sync_claimed_at: Option<u64>,
    outstanding: VecDeque<Outstanding>,
    next_request_id: u64,
    next_beat_ms: u64,
    next_ask_ms: u64,
    fencing: Fencing,
    /// Writes alone are allowed until then (the lease's end; u64::MAX once fenced).
    alone_until_ms: u64,
    vip_held: bool,
    next_vip_ms: u64,
    standby: bool,
    release_pending: bool,
    /// A promotion is under way (`Some(alone)`: with the peer recorded outdated).
    after_promotion: Option<bool>,
    /// The latest `now` seen.
    last_step_ms: u64,
    /// When the witness last answered (any answer).
    last_witness_reply_ms: Option<u64>,
    /// No takeover before this (a promotion was just refused).
    no_takeover_until_ms: u64,
    /// A lease was granted since the start.
    ever_leased: bool,
    /// Since when the replica has reported frozen writes.
    frozen_since_ms: Option<u64>,
    wants_takeover_until_ms: Option<u64>,
    last_takeover: Option<(u64, &'static str)>,
    last_give_up: Option<(u64, &'static str)>,
    no_guard_noted: bool,
    actions: VecDeque<Action>,
    notes: VecDeque<Note>,
}

impl Controller {
    /// A controller started at `now_ms`, whose lease request ids start at `request_id_base`
    /// (the wall clock in microseconds: they must increase across restarts, see
    /// [`LeaseRequest::request_id`]).
    pub fn new(cfg: Config, replica: ReplicaView, now_ms: u64, request_id_base: u64) -> Controller {
        assert!(cfg.paths >= 1 && cfg.paths <= MAX_PATHS);
        debug_assert!(cfg.timings.check().is_ok());
        Controller {
            cfg,
            started_ms: now_ms,
            heard_ms: [None; MAX_PATHS],
            peer: None,
            peer_seq: None,
            peer_was_alive: false,
            replica,
            role_change_pending: false,
            lease_until_ms: None,
            lease_holder: None,
            witness_outdated: None,
            witness_epoch: 0,
            in_sync_claimed_at: None,
            outstanding: VecDeque::new(),
            next_request_id: request_id_base,
            next_beat_ms: now_ms,
            next_ask_ms: now_ms,
            fencing: Fencing::Idle,
            alone_until_ms: 0,
            vip_held: false,
            next_vip_ms: now_ms,
            standby: false,
            release_pending: false,
            frozen_since_ms: None,
            ever_leased: false,
            after_promotion: None,
            no_takeover_until_ms: 0,
            last_step_ms: now_ms,
            last_witness_reply_ms: None,
            wants_takeover_until_ms: None,
            last_takeover: None,
            last_give_up: None,
            no_guard_noted: false,
            actions: VecDeque::new(),
            notes: VecDeque::new(),
        }
    }

    /// The next action, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next note to log.
    pub fn poll_note(&mut self) -> Option<Note> {
        self.notes.pop_front()
    }

    /// When to call [`Controller::handle_timeout`] next (ms, the driver's clock).
    pub fn poll_timeout(&self) -> u64 {
        let t = &self.cfg.timings;
        let mut candidates = vec![self.next_beat_ms];
        if self.cfg.guard == Guard::Witness {
            // A spurious wake when no lease is wanted costs one check.
            candidates.push(self.next_ask_ms);
        }
        if self.replica.primary {
            candidates.push(self.next_vip_ms);
        }
        candidates.extend(self.lease_until_ms);
        candidates.push(match self.last_heard() {
            Some(last) => last + t.deadtime_ms,
            None => self.started_ms + t.initdead_ms,
        });
        candidates.extend(self.frozen_since_ms.map(|since| since + t.deadtime_ms));
        if let Fencing::RetryAt(r) = self.fencing {
            candidates.push(r);
        }
        candidates.extend(self.wants_takeover_until_ms);
        candidates.push(self.no_takeover_until_ms);
        // Deadlines already passed were acted on at the last step; the next heartbeat is
        // always ahead of it.
        candidates
            .into_iter()
            .filter(|&at| at > self.last_step_ms)
            .min()
            .unwrap_or(self.next_beat_ms)
    }

    /// Until when (ms) this node may acknowledge a write made without its peer. The driver
    /// checks it on the write path and holds (freezes) such writes after it.
    pub fn alone_until_ms(&self) -> u64 {
        match self.cfg.guard {
            Guard::Witness => self.alone_until_ms,
            // The fence made the peer unable to write, or the operator outdated it: no
            // lease can end.
            Guard::Fence | Guard::Manual => u64::MAX,
        }
    }

    /// Timers.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.step(now_ms);
    }

    /// An authenticated, fresh heartbeat from the peer, with its sequence number: any
    /// heartbeat proves the peer alive on its path, but only a newer one than the last
    /// says what the peer is (one delayed on the other path must not undo news).
    pub fn heartbeat(&mut self, now_ms: u64, seq: u64, beat: Heartbeat) {
        let path = usize::from(beat.path);
        if path >= self.cfg.paths {
            return;
        }
        if let Some(prev) = self.heard_ms[path] {
            let gap_ms = now_ms.saturating_sub(prev);
            if gap_ms > self.cfg.timings.warntime_ms {
                self.note(Note::LateHeartbeat {
                    path: beat.path,
                    gap_ms,
                });
            }
        }
        self.heard_ms[path] = Some(now_ms);
        if self.peer_seq.is_some_and(|last| seq <= last) {
            self.step(now_ms);
            return;
        }
        self.peer_seq = Some(seq);
        self.peer = Some(beat);
        if beat.primary && beat.in_sync && self.witness_outdated == Some(self.cfg.node) {
            // The primary says this node is in sync: its next renewal clears the record.
            self.witness_outdated = None;
        }
        if self.fencing == Fencing::Done {
            // A fenced peer that talks again was restarted: a later loss fences anew.
            self.fencing = Fencing::Idle;
        }
        self.step(now_ms);
    }

    /// The replica layer's state changed (or a role change this controller asked for is
    /// done).
    pub fn replica(&mut self, now_ms: u64, view: ReplicaView) {
        let was_primary = self.replica.primary;
        if view.frozen != self.replica.frozen || self.frozen_since_ms.is_none() {
            self.frozen_since_ms = view.frozen.then_some(now_ms);
        }
        self.replica = view;
        self.role_change_pending = false;
        if self.cfg.guard == Guard::Witness && view.primary && view.in_sync && !view.frozen {
            // The alone period ended: writing alone again takes a new grant (one that
            // outdates the peer after the in-sync claim), never a leftover of the old one.
            self.alone_until_ms = 0;
        }
        if !view.primary {
            self.alone_until_ms = 0;
            if self.vip_held {
                // Demoted by the operator: the address goes too.
                self.vip_held = false;
                self.actions.push_back(Action::RemoveVip);
            }
            if was_primary {
                // So the peer need not wait for the lease to run out.
                self.release_pending = true;
            }
        }
        if view.primary && !was_primary {
            self.wants_takeover_until_ms = None;
        }
        if let Some(alone) = self.after_promotion.take() {
            if view.primary {
                self.promoted(now_ms, alone);
            } else {
                // Refused (the peer answered as primary): not again for a deadtime, by
                // when its heartbeats say what it is. A lease taken for it goes back at
                // the next step.
                self.alone_until_ms = 0;
                self.no_takeover_until_ms = now_ms + self.cfg.timings.deadtime_ms;
                self.note(Note::PromotionRefused);
            }
        }
        self.step(now_ms);
    }

    /// The fence command finished.
    pub fn fence_done(&mut self, now_ms: u64, ok: bool) {
        if ok {
            self.fencing = Fencing::Done;
            if self.replica.primary {
                self.alone_until_ms = u64::MAX;
                self.actions.push_back(Action::OutdatePeer);
            }
        } else {
            self.note(Note::FenceFailed);
            self.fencing = Fencing::RetryAt(now_ms + self.cfg.timings.deadtime_ms);
        }
        self.step(now_ms);
    }

    /// An operator command; `Err` says why it was refused.
    pub fn operator(&mut self, now_ms: u64, op: Operator) -> Result<&'static str, &'static str> {
        let alive = self.peer_alive(now_ms);
        let answer = match op {
            Operator::Standby if self.replica.primary => {
                let peer_ready = alive && self.peer.is_some_and(|p| p.promotable && !p.standby);
                if !peer_ready {
                    return Err(
                        "the peer is not alive and UpToDate: standby would leave no primary",
                    );
                }
                self.standby = true;
                self.give_up(now_ms, "standby (operator)");
                "handing over to the peer; this node stays standby until `twinsan takeover`"
            }
            Operator::Standby => {
                self.standby = true;
                "standby: this node will not take over until `twinsan takeover`"
            }
            Operator::Takeover if self.replica.primary => {
                self.standby = false;
                "already primary"
            }
            Operator::Takeover => {
                self.standby = false;
                if !self.promotable() {
                    self.step(now_ms);
                    return Ok(
                        "standby cleared, but this node's data is not UpToDate: it takes \
                               over only once a resync made it so",
                    );
                }
                if alive && self.peer.is_some_and(|p| p.primary) {
                    if !self.peer.is_some_and(|p| p.in_sync) {
                        return Err(
                            "the primary is not in sync with this node: wait for the resync",
                        );
                    }
                    self.wants_takeover_until_ms = Some(now_ms + 4 * self.cfg.timings.deadtime_ms);
                    "asked the primary to hand over"
                } else {
                    "standby cleared: this node takes over when the rules allow"
                }
            }
        };
        self.step(now_ms);
        Ok(answer)
    }

    /// What `twinsan status` shows.
    pub fn status(&self, now_ms: u64) -> Status {
        Status {
            primary: self.replica.primary,
            path_age_ms: self.heard_ms[..self.cfg.paths]
                .iter()
                .map(|h| h.map(|t| now_ms.saturating_sub(t)))
                .collect(),
            peer_alive: self.peer_alive(now_ms),
            lease_left_ms: self
                .lease_until_ms
                .filter(|&u| u > now_ms)
                .map(|u| u - now_ms),
            lease_holder: self.lease_holder,
            witness_outdated: self.witness_outdated,
            vip_held: self.vip_held,
            standby: self.standby,
            last_takeover: self.last_takeover,
            last_give_up: self.last_give_up,
        }
    }

    // ------------------------------------------------------------------ the decisions

    fn step(&mut self, now_ms: u64) {
        self.last_step_ms = self.last_step_ms.max(now_ms);
        if self.lease_until_ms.is_some_and(|u| u <= now_ms) {
            self.lease_until_ms = None;
        }
        if self.wants_takeover_until_ms.is_some_and(|u| u <= now_ms) {
            self.wants_takeover_until_ms = None;
        }
        let alive = self.peer_alive(now_ms);
        if alive != self.peer_was_alive {
            self.note(if alive {
                Note::PeerBack
            } else {
                Note::PeerSilent
            });
            self.peer_was_alive = alive;
        }
        if now_ms >= self.next_beat_ms {
            self.send_beats();
            self.next_beat_ms = now_ms + self.cfg.timings.keepalive_ms;
        }
        if self.cfg.guard == Guard::Witness {
            self.ask_witness(now_ms, alive);
        }
        if self.role_change_pending {
            return;
        }
        if self.replica.primary {
            self.as_primary(now_ms, alive);
        } else {
            self.as_secondary(now_ms, alive);
        }
    }

    fn as_primary(&mut self, now_ms: u64, alive: bool) {
        let peer = self.peer.filter(|_| alive);
        let lease = self.lease_until_ms.is_some();
        if self.standby {
            return self.give_up(now_ms, "standby (operator)");
        }
        if !self.replica.promotable {
            // The handshake found the peer's data newer (it took over while this node was
            // away): it must serve, and resync this node.
            return self.give_up(now_ms, "the peer holds newer data");
        }
        if peer.is_some_and(|p| p.wants_takeover && p.promotable && !p.primary)
            && self.replica.in_sync
        {
            return self.give_up(
                now_ms,
                "the peer asked to take over (takeover or auto_failback)",
            );
        }
        if self.cfg.guard == Guard::Witness {
            if !lease && peer.is_some_and(|p| p.primary) {
                return self.give_up(
                    now_ms,
                    "the peer is primary too and this node holds no lease",
                );
            }
            // Cut off the clients' network (where the witness is) while the peer is not:
            // the clients cannot reach this node either, so the role goes where they can.
            if !lease
                && !self.witness_ok()
                && peer.is_some_and(|p| p.witness_ok && p.promotable && !p.standby)
            {
                return self.give_up(
                    now_ms,
                    "the peer reaches the witness (the clients' network) and this node does not",
                );
            }
            if !lease && !alive {
                let never_served = self.last_heard().is_none() && !self.ever_leased;
                if never_served && now_ms < self.started_ms + self.cfg.timings.initdead_ms {
                    // Just started: neither heard yet. Serve nothing (no address; writes
                    // alone are frozen anyway) until one answers or initdead passes.
                    return;
                }
                return self.give_up(
                    now_ms,
                    "neither the peer nor the witness reachable: lease ended",
                );
            }
        }
        if now_ms >= self.next_vip_ms || !self.vip_held {
            // Added with a short lifetime and renewed while this node may serve: a node
            // that stops renewing (killed, frozen) loses the address by itself.
            self.next_vip_ms = now_ms + self.cfg.timings.keepalive_ms;
            self.actions.push_back(Action::AddVip);
            if !self.vip_held {
                self.actions.push_back(Action::Announce);
            }
            self.vip_held = true;
        }
        // Fence when the writes froze: the peer is silent (past initdead after a start, so
        // a peer that is still starting is not shot) or heard but not acknowledging (the
        // replica link is cut: DRBD's resource-and-stonith fences then too).
        let t = &self.cfg.timings;
        let silent_long =
            !alive && (self.last_heard().is_some() || now_ms >= self.started_ms + t.initdead_ms);
        // Heard but frozen for a deadtime: not a link that is still connecting.
        let frozen_long = self
            .frozen_since_ms
            .is_some_and(|since| now_ms >= since + t.deadtime_ms);
        if self.replica.frozen && self.cfg.guard == Guard::Fence && (frozen_long || silent_long) {
            match self.fencing {
                Fencing::Idle => self.start_fence(),
                Fencing::RetryAt(t) if now_ms >= t => self.start_fence(),
                _ => {}
            }
        }
        if !self.replica.frozen && self.fencing == Fencing::Done && alive {
            self.fencing = Fencing::Idle;
        }
    }

    fn as_secondary(&mut self, now_ms: u64, alive: bool) {
        if self.vip_held {
            self.vip_held = false;
            self.actions.push_back(Action::RemoveVip);
        }
        if self.release_pending && self.cfg.guard == Guard::Witness {
            self.release_pending = false;
            self.lease_until_ms = None;
            let req = self.request(now_ms, LeaseOp::Release, false);
            self.actions.push_back(Action::Witness(req));
        }
        let Some(why) = self.takeover_reason(now_ms, alive) else {
            if self.lease_until_ms.is_some() && self.cfg.guard == Guard::Witness {
                // A grant that came after the reason to take over went (the peer spoke
                // again): give it back, so the lease does not stand in anyone's way.
                self.lease_until_ms = None;
                let req = self.request(now_ms, LeaseOp::Release, false);
                self.actions.push_back(Action::Witness(req));
            }
            return;
        };
        let silent = why == SILENT;
        match self.cfg.guard {
            // The takeover happens on the grant (`lease_reply`); `ask_witness` asks.
            Guard::Witness => {
                if self.lease_until_ms.is_some() && !silent {
                    self.take_over(now_ms, why, false);
                }
            }
            Guard::Fence if silent => match self.fencing {
                Fencing::Done => self.take_over(now_ms, why, true),
                Fencing::Idle => self.start_fence(),
                Fencing::RetryAt(t) if now_ms >= t => self.start_fence(),
                _ => {}
            },
            Guard::Fence | Guard::Manual if !silent => self.take_over(now_ms, why, false),
            Guard::Fence | Guard::Manual => {
                if !self.no_guard_noted {
                    self.no_guard_noted = true;
                    self.note(Note::NoGuard);
                }
            }
        }
    }

    /// Why this secondary should become primary now, if it should.
    fn takeover_reason(&self, now_ms: u64, alive: bool) -> Option<&'static str> {
        if self.standby || !self.promotable() || now_ms < self.no_takeover_until_ms {
            return None;
        }
        if !alive {
            let gone = self.last_heard().is_some()
                || now_ms >= self.started_ms + self.cfg.timings.initdead_ms;
            return gone.then_some(SILENT);
        }
        let peer = self.peer?;
        if peer.primary {
            return None;
        }
        // Both secondary: the peer handed over, or nobody serves.
        if peer.standby {
            return Some("the peer handed over (standby)");
        }
        // Only the witness's lease makes "the peer cannot serve" safe to act on: without
        // it, a heartbeat in flight from a peer that has just become UpToDate (or was
        // promoted by hand) would make two primaries; then only the preferred node takes.
        if !peer.promotable && self.cfg.guard == Guard::Witness {
            return Some("the peer cannot serve (not UpToDate)");
        }
        if self.wants_takeover_until_ms.is_some() {
            return Some("takeover asked here; the primary handed over");
        }
        if peer.wants_takeover {
            return None;
        }
        if self.cfg.guard == Guard::Witness && self.witness_ok() != peer.witness_ok {
            // Only the node that reaches the witness (the clients' network) can serve.
            return self
                .witness_ok()
                .then_some("the peer cannot reach the witness");
        }
        // The configured primary, or node 0 when neither or both are.
        let mine = if self.cfg.preferred != peer.preferred {
            self.cfg.preferred
        } else {
            self.cfg.node.0 == 0
        };
        mine.then_some("both nodes secondary: the preferred one serves")
    }

    fn take_over(&mut self, now_ms: u64, why: &'static str, alone: bool) {
        self.role_change_pending = true;
        self.last_takeover = Some((now_ms, why));
        self.note(Note::TookOver(why));
        // The rest (outdate, VIP, ARP, tickles) once the replica reports the promotion
        // done: a promotion the engine refuses (the peer answered as primary) must leave
        // no address behind.
        self.actions.push_back(Action::Promote);
        self.after_promotion = Some(alone);
    }

    /// The replica reports this node primary after `take_over`.
    fn promoted(&mut self, now_ms: u64, alone: bool) {
        if alone {
            if self.cfg.guard != Guard::Witness {
                self.alone_until_ms = u64::MAX;
            }
            self.actions.push_back(Action::OutdatePeer);
        }
        self.vip_held = true;
        self.next_vip_ms = now_ms + self.cfg.timings.keepalive_ms;
        self.actions.push_back(Action::AddVip);
        self.actions.push_back(Action::Announce);
        self.actions.push_back(Action::Tickle);
        self.send_beats();
    }

    fn give_up(&mut self, now_ms: u64, why: &'static str) {
        if !self.replica.primary || self.role_change_pending {
            return;
        }
        self.role_change_pending = true;
        self.last_give_up = Some((now_ms, why));
        self.note(Note::GaveUp(why));
        self.alone_until_ms = 0;
        // The address first: nothing may reach this node as the VIP once it stops serving.
        self.vip_held = false;
        self.actions.push_back(Action::RemoveVip);
        self.actions.push_back(Action::Demote);
    }

    fn start_fence(&mut self) {
        self.fencing = Fencing::Running;
        self.actions.push_back(Action::Fence);
    }

    fn send_beats(&mut self) {
        let wants = self.wants_takeover_until_ms.is_some()
            || (self.cfg.auto_failback && self.cfg.preferred && !self.replica.primary);
        for path in 0..self.cfg.paths {
            self.actions.push_back(Action::Heartbeat(Heartbeat {
                path: path as u8,
                primary: self.replica.primary,
                promotable: self.promotable(),
                in_sync: self.replica.primary && self.replica.in_sync,
                standby: self.standby,
                wants_takeover: wants && !self.standby,
                frozen: self.replica.primary && self.replica.frozen,
                preferred: self.cfg.preferred,
                witness_ok: self.witness_ok(),
            }));
        }
    }

    /// This node heard the witness within the last deadtime (as of the last step).
    fn witness_ok(&self) -> bool {
        self.last_witness_reply_ms
            .is_some_and(|t| self.last_step_ms < t + self.cfg.timings.deadtime_ms)
    }

    /// UpToDate as far as this node knows: its replica says so, and the witness did not
    /// say its peer wrote without it (then the peer, if alive, should serve instead).
    fn promotable(&self) -> bool {
        self.replica.promotable && self.witness_outdated != Some(self.cfg.node)
    }

    fn last_heard(&self) -> Option<u64> {
        self.heard_ms.iter().flatten().copied().max()
    }

    fn peer_alive(&self, now_ms: u64) -> bool {
        self.last_heard()
            .is_some_and(|t| now_ms < t + self.cfg.timings.deadtime_ms)
    }

    fn note(&mut self, n: Note) {
        if self.notes.len() == MAX_NOTES {
            self.notes.pop_front();
        }
        self.notes.push_back(n);
    }
}

const SILENT: &str = "the peer was silent on every path for deadtime_ms";

mod witness_lease;

#[cfg(test)]
mod tests;
