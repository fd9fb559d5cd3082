//! The primary's pair-wide mirroring coordinator: whether writes are mirrored, what a lost
//! peer changes, which completions may go out without the peer and which are held, and
//! when a resync round may declare the peer up to date.
//!
//! Sharded as the engine runs it: each core's link keeps its unacknowledged operations in a
//! [`LinkShard`] (its own lock in the engine, so acks on one link never wait for another),
//! and one [`Mirror`] (the pair-wide lock) orders the transitions between "mirroring" and
//! "peer away" against every link. The driver hands its locks, files and sockets in as a
//! [`Port`]; the deterministic simulation implements the same trait over memory.

use std::collections::HashMap;

use super::{may_answer_alone, PairLun, PeerLossPolicy, Persist, SyncState};
use crate::wire::AckStatus;

/// An operation sent to the peer and not acknowledged yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    /// The driver's name for the initiator command it belongs to.
    pub token: u64,
    /// The LUN (index).
    pub lun: usize,
    /// The byte range it changes (`len` 0: a flush or a reservation change).
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// When it was sent (the driver's clock, ms).
    pub sent_ms: u64,
    /// The same on a finer clock (ns), for the driver's ack latency figures only (0 when
    /// the driver measures none): nothing here decides by it.
    pub sent_ns: u64,
}

/// One core's link to the peer: what it sent that the peer has not acknowledged.
#[derive(Debug, Default)]
pub struct LinkShard {
    pending: HashMap<u64, Pending>,
}

/// What a batch of acks did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AckOutcome {
    /// Tokens whose peer side is done (the driver completes them).
    pub answered: Vec<u64>,
    /// The peer failed an operation (out of space, an I/O error, a refusal): its status and
    /// offset. The operation stays pending, so the loss that must follow records its range.
    pub peer_failed: Option<(AckStatus, u64)>,
}

impl LinkShard {
    /// Nothing is waiting for the peer on this link.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether an operation on LUN `lun` (its index) waits for the peer on this link.
    pub fn holds_lun(&self, lun: usize) -> bool {
        self.pending.values().any(|p| p.lun == lun)
    }

    /// Operations waiting for the peer.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether an operation has waited longer than `timeout_ms` at `now_ms`.
    pub fn overdue(&self, now_ms: u64, timeout_ms: u64) -> bool {
        self.poll_timeout(timeout_ms)
            .is_some_and(|at_ms| now_ms >= at_ms)
    }

    /// When (the driver's clock, ms) the oldest operation becomes overdue, if any is
    /// pending: the driver sleeps no longer than this before calling [`Self::overdue`], so
    /// a silent peer is noticed at `timeout_ms`, not at the next poll after it.
    pub fn poll_timeout(&self, timeout_ms: u64) -> Option<u64> {
        self.pending
            .values()
            .map(|p| p.sent_ms.saturating_add(timeout_ms).saturating_add(1))
            .min()
    }

    /// Takes every pending operation (the peer is lost).
    pub fn drain(&mut self) -> Vec<Pending> {
        self.pending.drain().map(|(_, p)| p).collect()
    }

    /// Takes a batch of acks `(seq, status)`. Any failure detaches the peer: a failed write
    /// leaves the copies different, a failed flush may have lost its pages, a refused
    /// reservation leaves its state different. Why not fail the command instead: the local
    /// side succeeded, and the initiator would see an error while both copies silently
    /// differ (and status says UpToDate); DRBD's `detach` does the same.
    pub fn take_acks(&mut self, acks: impl IntoIterator<Item = (u64, AckStatus)>) -> AckOutcome {
        self.take_acks_observed(acks, |_| {})
    }

    /// [`Self::take_acks`], showing `acked` each operation the peer acknowledged as done
    /// (the driver's ack latency figures).
    pub fn take_acks_observed(
        &mut self,
        acks: impl IntoIterator<Item = (u64, AckStatus)>,
        mut acked: impl FnMut(&Pending),
    ) -> AckOutcome {
        let mut out = AckOutcome::default();
        for (seq, status) in acks {
            match self.pending.get(&seq) {
                Some(p) if status != AckStatus::Ok => {
                    out.peer_failed.get_or_insert((status, p.offset));
                }
                Some(_) => {
                    if let Some(p) = self.pending.remove(&seq) {
                        acked(&p);
                        out.answered.push(p.token);
                    }
                }
                // Stale (answered by a peer loss already) or never sent: nothing to do.
                None => {}
            }
        }
        out
    }

    fn insert(&mut self, seq: u64, p: Pending) {
        self.pending.insert(seq, p);
    }
}

/// What the coordinator needs from its driver. Every method runs while the driver holds the
/// coordinator's lock.
pub trait Port {
    /// Number of LUNs.
    fn lun_count(&self) -> usize;
    /// Changes LUN `i`'s record by `f` and, if `f` says so, persists it before returning.
    /// Returns whether the persist (if any) reached the disk.
    fn update_lun(&mut self, i: usize, f: &mut dyn FnMut(&mut PairLun) -> Persist) -> bool;
    /// Takes every link's pending operations, as `(core, pending)`.
    fn drain_links(&mut self) -> Vec<(usize, Pending)>;
    /// Whether no link has an operation waiting for the peer.
    fn links_idle(&mut self) -> bool;
    /// Every link drops its connection: a new round reconnects them.
    fn reset_links(&mut self);
    /// Completes the peer side of command `token` on core `core` (`ok`: it may succeed).
    fn answer(&mut self, core: usize, token: u64, ok: bool);
    /// Fresh randomness (new generation ids).
    fn random(&mut self) -> [u8; 8];
    /// Until when (`now_ms`'s clock) a write made without the peer may be answered: the
    /// failover lease's end (a primary paused past it must not answer one when it runs
    /// again, before its controller does). Without automatic failover: no end.
    fn alone_until_ms(&self) -> u64 {
        u64::MAX
    }
    /// The driver's clock for [`Port::alone_until_ms`].
    fn now_ms(&self) -> u64 {
        0
    }
}

/// What a promotion does to the mirroring of the last term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewTerm {
    /// Not mirroring: the manager connects as for any lost peer.
    Idle,
    /// Mirroring with nothing unanswered: links reset, the manager reconnects (its control
    /// connection is what keeps the peer from promoting itself).
    Reconnect,
    /// Writes of the last term were never answered (a demotion that did not drain):
    /// recorded and completed as for any lost peer.
    PeerLost,
}

/// The primary's pair-wide mirroring state (see the module docs).
#[derive(Debug)]
pub struct Mirror {
    policy: PeerLossPolicy,
    mirroring: bool,
    /// Bumped whenever mirroring starts: a resync may complete only in the round it started.
    round: u64,
    /// `twinsan outdate-peer` since the last completed resync.
    operator_outdated: bool,
    /// Completions held without the peer (suspend, or no record on disk): (core, token, lun).
    held: Vec<(usize, u64, usize)>,
    /// Demoted since the last promotion: nothing completes without the peer any more, and
    /// no resync round starts.
    demoted: bool,
}

impl Mirror {
    /// Not mirroring yet: until the manager has spoken with the peer, writes are recorded
    /// (and, under `Suspend`, held).
    pub fn new(policy: PeerLossPolicy) -> Mirror {
        Mirror {
            policy,
            mirroring: false,
            round: 0,
            operator_outdated: false,
            held: Vec::new(),
            demoted: false,
        }
    }

    /// This node was demoted: the completions it holds fail now, and so does every later
    /// one that would go out without the peer. Why: nothing mirrors them any more, and the
    /// next primary (the peer promoted, or started as the configured primary) overwrites
    /// this node's copy of them with its own; a held write released by this node's next
    /// term's resync was acknowledged with its data gone (replica sim seed 723625). Writes
    /// mirrored before the demotion still complete by their acks (they are on the peer).
    pub fn demoted(&mut self, port: &mut dyn Port) {
        self.demoted = true;
        for (core, token, _) in std::mem::take(&mut self.held) {
            port.answer(core, token, false);
        }
    }

    /// Whether writes are mirrored now.
    pub fn mirroring(&self) -> bool {
        self.mirroring
    }

    /// Completions held for the peer or an operator.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The peer is gone (a link closed or failed, an ack is overdue, a ping unanswered, a
    /// resync failed): every unanswered operation goes into its LUN's bitmap under a
    /// "peer outdated" record, persisted, and then completes alone or is held. Returns
    /// false if the peer was not being mirrored to (nothing to do).
    pub fn peer_lost(&mut self, port: &mut dyn Port) -> bool {
        if !self.mirroring {
            return false;
        }
        self.mirroring = false;
        port.reset_links();
        let waiting = port.drain_links();
        let policy = self.policy;
        for i in 0..port.lun_count() {
            let unanswered: Vec<(u64, u64)> = waiting
                .iter()
                .filter(|(_, p)| p.lun == i)
                .map(|(_, p)| (p.offset, p.len))
                .collect();
            let random = port.random();
            let recorded = port.update_lun(i, &mut |l| {
                l.peer_lost(unanswered.iter().copied(), random, policy)
            });
            port.update_lun(i, &mut |l| {
                l.peer_loss_recorded(recorded, policy);
                Persist::No
            });
        }
        for (core, p) in waiting {
            self.complete_alone(port, core, p.token, p.lun);
        }
        true
    }

    /// An operation of command `token` (core `core`, LUN `lun`, changing `range` if any)
    /// while the peer is away: its range is recorded (durably, when new) and it completes
    /// alone or is held. A record that cannot be persisted fails the command.
    pub fn alone(
        &mut self,
        port: &mut dyn Port,
        core: usize,
        token: u64,
        lun: usize,
        range: Option<(u64, u64)>,
    ) {
        if let Some(range) = range {
            let random = port.random();
            // A write that will be held is recorded without moving the generation on
            // (PairLun::record_held says why); one answered now, with it.
            let answerable = self.may_answer_now(port, lun);
            let recorded = port.update_lun(lun, &mut |l| {
                if answerable {
                    l.record_alone(range, random)
                } else {
                    l.record_held(range)
                }
            });
            if !recorded {
                port.answer(core, token, false);
                return;
            }
        }
        self.complete_alone(port, core, token, lun);
    }

    /// Whether a completion of LUN `lun` may go out without the peer now.
    fn may_answer_now(&self, port: &mut dyn Port, lun: usize) -> bool {
        let mut state = SyncState::Unknown;
        port.update_lun(lun, &mut |l| {
            state = l.state();
            Persist::No
        });
        let lease_holds = port.now_ms() < port.alone_until_ms();
        may_answer_alone(self.policy, self.operator_outdated, state) && lease_holds
    }

    fn complete_alone(&mut self, port: &mut dyn Port, core: usize, token: u64, lun: usize) {
        if self.demoted {
            port.answer(core, token, false);
        } else if self.may_answer_now(port, lun) {
            port.answer(core, token, true);
        } else {
            self.held.push((core, token, lun));
        }
    }

    /// A batch is about to leave on link `core` (whose shard the driver holds): recorded
    /// pending before the bytes leave (an ack can only follow the write), and `true`: send
    /// it. Not mirroring (a loss came since the driver looked): each is handled alone, and
    /// `false`: do not send.
    pub fn sending(
        &mut self,
        port: &mut dyn Port,
        shard: &mut LinkShard,
        core: usize,
        batch: impl IntoIterator<Item = (u64, Pending)>,
    ) -> bool {
        if self.mirroring {
            for (seq, p) in batch {
                shard.insert(seq, p);
            }
            return true;
        }
        for (_, p) in batch {
            let range = (p.len > 0).then_some((p.offset, p.len));
            self.alone(port, core, p.token, p.lun, range);
        }
        false
    }

    /// A resync is about to copy: writes are mirrored from now on (a region copy and a
    /// write to the same region are serialized by the range lock, so one pass over what is
    /// dirty suffices). Returns the round the resync belongs to, or `None` (nothing
    /// changes: the resync must stop) on a node demoted since its last promotion.
    ///
    /// Why: a demotion ends the round it finds ([`Mirror::end_term`], once drained), but a
    /// resync that connected as primary and was demoted before its round began (between
    /// the plan and the peer's answer to the round's first change) started one after it,
    /// and nothing ended that: the demoted node mirrored and completed the resync as a
    /// secondary, then took its control connection's close for a lost peer and recorded
    /// itself as having moved on (a new generation). The operator had promoted the other
    /// node meanwhile, as the rules allow once the old primary is demoted; its first write
    /// moved on from the same ids, and the next connection was a split brain without a
    /// forced promotion (replica sim seed 5138500).
    pub fn start_round(&mut self) -> Option<u64> {
        if self.demoted {
            return None;
        }
        self.mirroring = true;
        self.round += 1;
        Some(self.round)
    }

    /// The current round (the last one started; it stands while mirroring). A data link
    /// notes it when it connects: the link belongs to that round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// A data link of round `round` failed (its connect, a send, its reader): the peer is
    /// lost if that round still stands. A link of an older round says nothing about the
    /// current one. Why: a link whose connect straddled a loss and the next resync failed
    /// after the new round began, and ended that round at once (its writes recorded dirty
    /// and the resync restarted: harmless, but the round was lost).
    pub fn link_failed(&mut self, port: &mut dyn Port, round: u64) -> bool {
        self.round_stands(round) && self.peer_lost(port)
    }

    /// Whether round `round` still stands: a resync may record its completion only then (a
    /// loss before it stands recorded; a loss after it records the peer outdated again).
    pub fn round_stands(&self, round: u64) -> bool {
        self.mirroring && self.round == round
    }

    /// Every LUN of round `round` is in sync: held completions go out. Returns false (and
    /// keeps them held until the next resync or `outdate-peer`) if the round fell.
    pub fn round_synced(&mut self, port: &mut dyn Port, round: u64) -> bool {
        if !self.round_stands(round) {
            return false;
        }
        self.operator_outdated = false;
        // The peer holds everything now: every held completion may go.
        for (core, token, _) in std::mem::take(&mut self.held) {
            port.answer(core, token, true);
        }
        true
    }

    /// `twinsan outdate-peer`: the operator vouches the peer is stale; held I/O goes on,
    /// for each LUN whose record of what differs is on disk (written again if it failed).
    /// Returns whether every LUN's record is on disk (`false`: those LUNs stay frozen, and
    /// the operator must be told: run it again once the metadata disk works).
    pub fn operator_outdate(&mut self, port: &mut dyn Port) -> bool {
        self.operator_outdated = true;
        let mut all_recorded = true;
        for i in 0..port.lun_count() {
            let random = port.random();
            let recorded = port.update_lun(i, &mut |l| l.operator_outdated_peer(random));
            port.update_lun(i, &mut |l| {
                l.operator_outdate_recorded(recorded);
                Persist::No
            });
            all_recorded &= recorded;
        }
        for (core, token, lun) in std::mem::take(&mut self.held) {
            self.complete_alone(port, core, token, lun);
        }
        all_recorded
    }

    /// This node is promoted: a node demoted while mirroring still mirrors over its old data
    /// links, but its control connection closed with the demotion, so the peer sees no
    /// primary and would let itself be promoted too (two primaries). The new term starts
    /// like a start.
    ///
    /// Completions still held from the last term (a demotion that did not drain them: the
    /// peer was away under `Suspend`) fail now. Why: their data was on this node only, and
    /// while it was secondary the other node's resync may have overwritten it; released by
    /// this term's first synced round they were GOOD for data neither node held (replica
    /// sim seed 4166424).
    pub fn new_term(&mut self, port: &mut dyn Port) -> NewTerm {
        self.demoted = false;
        for (core, token, _) in std::mem::take(&mut self.held) {
            port.answer(core, token, false);
        }
        if !self.mirroring {
            return NewTerm::Idle;
        }
        if !port.links_idle() {
            self.peer_lost(port);
            return NewTerm::PeerLost;
        }
        self.mirroring = false;
        port.reset_links();
        NewTerm::Reconnect
    }

    /// This node was demoted and every write it was running is answered: the mirroring
    /// round ends without a loss (nothing is unanswered), its links close. Why: a demoted
    /// node that kept "mirroring" took the later close of those idle links (the new
    /// primary crashing, say) for a lost peer, and recorded itself as having moved on (a
    /// new generation) while a secondary: the next connection was a split brain that
    /// needed an operator (found by the simulation). Returns false, and changes nothing,
    /// while writes are unanswered (their ack or a loss still settles them).
    pub fn end_term(&mut self, port: &mut dyn Port) -> bool {
        if !self.mirroring || !port.links_idle() {
            return false;
        }
        self.mirroring = false;
        port.reset_links();
        true
    }

    /// A command failed on this node after its change to `[offset, offset + len)` of LUN
    /// `lun` was mirrored: the peer may hold what this node does not. The range is marked
    /// and the peer declared lost, so the resync that follows makes it equal again. Returns
    /// false if the peer was away already (the alone path recorded the range).
    pub fn diverged(&mut self, port: &mut dyn Port, lun: usize, offset: u64, len: u64) -> bool {
        if !self.mirroring || len == 0 {
            return false;
        }
        port.update_lun(lun, &mut |l| l.mark_range(offset, len));
        self.peer_lost(port)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::meta::Meta;
    use crate::pair::Marker;

    const REGION: u64 = 1 << 20;

    /// Two links, one LUN, a disk whose metadata writes fail on demand.
    pub(crate) struct TestPort {
        pub(crate) luns: Vec<PairLun>,
        shards: Vec<LinkShard>,
        persisted: Vec<Meta>,
        persist_fails: bool,
        resets: u32,
        pub(crate) answers: Vec<(usize, u64, bool)>,
        now_ms: u64,
        alone_until_ms: u64,
    }

    impl TestPort {
        pub(crate) fn new() -> TestPort {
            let meta = Meta::new(1, 16 * REGION, REGION).unwrap();
            let (lun, _, _) = PairLun::open(meta.clone(), Marker::Absent, true, |_| vec![]);
            TestPort {
                luns: vec![lun],
                shards: vec![LinkShard::default(), LinkShard::default()],
                persisted: vec![meta],
                persist_fails: false,
                resets: 0,
                answers: Vec::new(),
                now_ms: 0,
                alone_until_ms: u64::MAX,
            }
        }
    }

    impl Port for TestPort {
        fn lun_count(&self) -> usize {
            self.luns.len()
        }
        fn update_lun(&mut self, i: usize, f: &mut dyn FnMut(&mut PairLun) -> Persist) -> bool {
            if f(&mut self.luns[i]).needed() {
                if self.persist_fails {
                    return false;
                }
                self.persisted[i] = self.luns[i].meta_for_disk(&[]);
            }
            true
        }
        fn drain_links(&mut self) -> Vec<(usize, Pending)> {
            let mut v = Vec::new();
            for (core, s) in self.shards.iter_mut().enumerate() {
                v.extend(s.drain().into_iter().map(|p| (core, p)));
            }
            v
        }
        fn links_idle(&mut self) -> bool {
            self.shards.iter().all(LinkShard::is_empty)
        }
        fn reset_links(&mut self) {
            self.resets += 1;
        }
        fn answer(&mut self, core: usize, token: u64, ok: bool) {
            self.answers.push((core, token, ok));
        }
        fn random(&mut self) -> [u8; 8] {
            [7; 8]
        }
        fn alone_until_ms(&self) -> u64 {
            self.alone_until_ms
        }
        fn now_ms(&self) -> u64 {
            self.now_ms
        }
    }

    fn write(token: u64, region: u64, sent_ms: u64) -> Pending {
        Pending {
            token,
            lun: 0,
            offset: region * REGION,
            len: 4096,
            sent_ms,
            sent_ns: 0,
        }
    }

    fn send(m: &mut Mirror, port: &mut TestPort, core: usize, seq: u64, p: Pending) -> bool {
        let mut shard = std::mem::take(&mut port.shards[core]);
        let sent = m.sending(port, &mut shard, core, [(seq, p)]);
        port.shards[core] = shard;
        sent
    }

    #[test]
    fn a_link_of_an_older_round_does_not_end_the_current_one() {
        let mut port = TestPort::new();
        let mut m = Mirror::new(PeerLossPolicy::Degrade);
        let old = m.start_round().unwrap();
        // The link connects in round `old`; the peer is lost and a new round starts
        // before its connect fails.
        assert!(m.peer_lost(&mut port));
        let new = m.start_round().unwrap();
        assert_eq!(m.round(), new);
        assert!(
            !m.link_failed(&mut port, old),
            "a stale link's failure is not a loss"
        );
        assert!(m.round_stands(new));
        // A link of the current round that fails is.
        assert!(m.link_failed(&mut port, new));
        assert!(!m.mirroring());
    }

    #[test]
    fn a_lost_peer_records_every_unanswered_write_before_any_completes_alone() {
        let mut port = TestPort::new();
        let mut m = Mirror::new(PeerLossPolicy::Degrade);
        let round = m.start_round().unwrap();
        assert!(send(&mut m, &mut port, 0, 1, write(10, 2, 0)));
        assert!(send(&mut m, &mut port, 1, 2, write(11, 5, 0)));
        let out = port.shards[0].take_acks([(1, AckStatus::Ok)]);
        assert_eq!(out.answered, vec![10]);
        assert!(m.peer_lost(&mut port));
        assert!(!m.peer_lost(&mut port), "lost once");
        assert!(!m.round_stands(round));
        assert_eq!(port.resets, 1);
        // The unanswered write is on disk in the bitmap, under "peer outdated".
        let disk = &port.persisted[0];
        assert!(disk.flags.peer_outdated);
        assert_eq!(disk.bitmap.iter_dirty().collect::<Vec<_>>(), vec![5]);
        assert_eq!(port.answers, vec![(1, 11, true)]);
        // A batch that raced the loss is not sent: recorded and answered alone.
        assert!(!send(&mut m, &mut port, 0, 3, write(12, 7, 0)));
        assert!(port.persisted[0].bitmap.is_dirty(7));
        assert_eq!(port.answers.last(), Some(&(0, 12, true)));
        assert!(port.shards[0].is_empty());
    }

    #[test]
    fn no_write_is_answered_alone_after_the_failover_lease_ends() {
        // A primary paused past its lease runs again: the writes its cores take up before
        // its controller does must not complete without the peer.
        let mut port = TestPort::new();
        let mut m = Mirror::new(PeerLossPolicy::Suspend);
        m.start_round().unwrap();
        m.peer_lost(&mut port);
        port.alone_until_ms = 1000;
        port.now_ms = 900;
        m.operator_outdate(&mut port);
        m.alone(&mut port, 0, 1, 0, Some((0, 512)));
        assert_eq!(port.answers, vec![(0, 1, true)], "within the lease");
        port.now_ms = 1000;
        m.alone(&mut port, 0, 2, 0, Some((REGION, 512)));
        assert_eq!(port.answers.len(), 1, "held: the lease ended");
        assert_eq!(m.held(), 1);
        // A renewed lease (the controller outdates the peer again) releases it.
        port.alone_until_ms = 2000;
        m.operator_outdate(&mut port);
        assert_eq!(port.answers.last(), Some(&(0, 2, true)));
    }

    #[test]
    fn suspend_holds_completions_until_a_resync_round_or_the_operator() {
        let mut port = TestPort::new();
        let mut m = Mirror::new(PeerLossPolicy::Suspend);
        m.start_round().unwrap();
        assert!(send(&mut m, &mut port, 0, 1, write(10, 1, 0)));
        m.peer_lost(&mut port);
        m.alone(&mut port, 1, 11, 0, Some((3 * REGION, 512)));
        assert!(port.answers.is_empty());
        assert_eq!(m.held(), 2);
        // A round that falls before it is synced releases nothing.
        let round = m.start_round().unwrap();
        m.peer_lost(&mut port);
        assert!(!m.round_synced(&mut port, round));
        assert_eq!(m.held(), 2);
        let round = m.start_round().unwrap();
        assert!(m.round_synced(&mut port, round));
        assert_eq!(port.answers.len(), 2);
        // The operator's word releases them too.
        m.peer_lost(&mut port);
        m.alone(&mut port, 0, 12, 0, Some((0, 512)));
        assert_eq!(m.held(), 1);
        m.operator_outdate(&mut port);
        assert_eq!(m.held(), 0);
        assert_eq!(port.answers.last(), Some(&(0, 12, true)));
    }

    #[test]
    fn a_record_that_cannot_be_persisted_fails_the_write_and_freezes_the_lun() {
        let mut port = TestPort::new();
        let mut m = Mirror::new(PeerLossPolicy::Degrade);
        m.start_round().unwrap();
        assert!(send(&mut m, &mut port, 0, 1, write(10, 1, 0)));
        port.persist_fails = true;
        m.peer_lost(&mut port);
        assert_eq!(port.luns[0].state(), SyncState::Suspended);
        assert!(
            port.answers.is_empty(),
            "held: nothing on disk says the copies differ"
        );
        m.alone(&mut port, 0, 11, 0, Some((9 * REGION, 512)));
        assert_eq!(port.answers, vec![(0, 11, false)]);
    }

    #[test]
    fn the_operators_word_releases_nothing_until_its_record_is_on_disk() {
        // Replica sim seed 114720: a node promoted while its peer was away (never
        // mirroring, so its LUN had lost no peer: state Unknown) held its writes under
        // Suspend; `outdate-peer` could not persist its record, yet released them, and a
        // crash left no "peer outdated" on disk to keep the old primary from serving alone.
        let mut port = TestPort::new();
        let mut m = Mirror::new(PeerLossPolicy::Suspend);
        m.alone(&mut port, 0, 1, 0, Some((2 * REGION, 512)));
        assert_eq!(m.held(), 1);
        port.persist_fails = true;
        assert!(!m.operator_outdate(&mut port), "the operator is told");
        assert!(
            port.answers.is_empty(),
            "nothing on disk says the peer is stale"
        );
        assert_eq!(port.luns[0].state(), SyncState::Suspended);
        m.alone(&mut port, 1, 2, 0, Some((2 * REGION, 512)));
        assert_eq!(port.answers, vec![(1, 2, false)], "a later write fails");
        port.persist_fails = false;
        assert!(m.operator_outdate(&mut port));
        assert_eq!(port.answers, vec![(1, 2, false), (0, 1, true)]);
        assert!(port.persisted[0].flags.peer_outdated);
    }

    #[test]
    fn a_demotion_fails_what_it_holds_and_what_would_complete_alone() {
        let mut port = TestPort::new();
        let mut m = Mirror::new(PeerLossPolicy::Suspend);
        m.alone(&mut port, 0, 1, 0, Some((0, 512)));
        assert_eq!(m.held(), 1);
        // A write mirrored before the demotion, not acknowledged yet.
        m.start_round().unwrap();
        assert!(send(&mut m, &mut port, 1, 1, write(2, 3, 0)));
        m.demoted(&mut port);
        assert_eq!(port.answers, vec![(0, 1, false)], "never released later");
        assert_eq!(m.held(), 0);
        // Its peer is lost: no GOOD alone either.
        m.peer_lost(&mut port);
        assert_eq!(port.answers.last(), Some(&(1, 2, false)));
        // Promoted again: completions alone are possible again (under the usual rules).
        m.new_term(&mut port);
        m.operator_outdate(&mut port);
        m.alone(&mut port, 0, 3, 0, Some((0, 512)));
        assert_eq!(port.answers.last(), Some(&(0, 3, true)));
    }

    #[test]
    fn a_resync_demoted_before_its_round_began_starts_none() {
        // Replica sim seed 5138500: the manager had planned as primary and sent the
        // round's first change; the node was demoted (drained: no round to end) before the
        // peer answered. The round it started then mirrored on a secondary, and the close
        // of its control connection, taken for a lost peer, drew a new generation: the
        // peer, promoted meanwhile, moved on from the same ids (a split brain).
        let mut port = TestPort::new();
        let mut m = Mirror::new(PeerLossPolicy::Degrade);
        m.demoted(&mut port);
        assert!(!m.end_term(&mut port), "nothing to end yet");
        assert_eq!(m.start_round(), None, "the resync stops");
        assert!(!m.mirroring());
        let before = port.luns[0].meta().clone();
        assert!(!m.peer_lost(&mut port), "no peer to lose");
        assert_eq!(port.luns[0].meta().gen, before.gen, "no new generation");
        assert!(!port.luns[0].meta().flags.peer_outdated);
        assert_eq!(port.resets, 0);
        // Promoted again: the next resync starts its round.
        assert_eq!(m.new_term(&mut port), NewTerm::Idle);
        assert_eq!(m.start_round(), Some(1));
        assert!(m.mirroring());
    }

    #[test]
    fn a_promotion_while_mirroring_starts_a_new_round() {
        let mut port = TestPort::new();
        let mut m = Mirror::new(PeerLossPolicy::Degrade);
        assert_eq!(m.new_term(&mut port), NewTerm::Idle);
        m.start_round().unwrap();
        assert_eq!(m.new_term(&mut port), NewTerm::Reconnect);
        assert!(!m.mirroring());
        assert_eq!(port.resets, 1);
        m.start_round().unwrap();
        assert!(send(&mut m, &mut port, 1, 1, write(10, 4, 0)));
        assert_eq!(m.new_term(&mut port), NewTerm::PeerLost);
        assert!(port.persisted[0].bitmap.is_dirty(4));
    }

    #[test]
    fn a_promotion_fails_the_completions_held_from_the_last_term() {
        // Replica sim seed 4166424: writes held under Suspend when this node was demoted;
        // the other node, primary meanwhile, resynced this one over their regions. Released
        // by the next term's round they would have been GOOD with their data gone.
        let mut port = TestPort::new();
        let mut m = Mirror::new(PeerLossPolicy::Suspend);
        m.alone(&mut port, 0, 10, 0, Some((2 * REGION, 512)));
        assert_eq!(m.held(), 1);
        // Demoted (not drained), secondary for a while, then promoted again.
        assert_eq!(m.new_term(&mut port), NewTerm::Idle);
        assert_eq!(port.answers, vec![(0, 10, false)]);
        assert_eq!(m.held(), 0);
        let round = m.start_round().unwrap();
        assert!(m.round_synced(&mut port, round));
        assert_eq!(port.answers.len(), 1, "nothing answered twice");
    }

    #[test]
    fn a_drained_demotion_ends_the_round_without_a_loss() {
        let mut port = TestPort::new();
        let mut m = Mirror::new(PeerLossPolicy::Degrade);
        m.start_round().unwrap();
        assert!(send(&mut m, &mut port, 0, 1, write(10, 4, 0)));
        assert!(!m.end_term(&mut port), "a write is unanswered");
        assert!(m.mirroring());
        port.shards[0].take_acks([(1, AckStatus::Ok)]);
        let gen = port.luns[0].meta().gen;
        assert!(m.end_term(&mut port));
        assert!(!m.mirroring());
        // The links closing later is no loss: nothing recorded, the generation stays.
        assert!(!m.peer_lost(&mut port));
        assert_eq!(port.luns[0].meta().gen, gen);
        assert!(!port.luns[0].meta().flags.peer_outdated);
    }

    #[test]
    fn overdue_acks_and_failed_acks_are_found() {
        let mut shard = LinkShard::default();
        shard.insert(1, write(10, 1, 100));
        shard.insert(2, write(11, 2, 150));
        assert!(!shard.overdue(2100, 2000));
        assert!(shard.overdue(2101, 2000));
        assert_eq!(
            shard.poll_timeout(2000),
            Some(2101),
            "the oldest sets the deadline"
        );
        let out = shard.take_acks([(2, AckStatus::NoSpace), (9, AckStatus::Ok)]);
        assert_eq!(out.peer_failed, Some((AckStatus::NoSpace, 2 * REGION)));
        assert!(out.answered.is_empty());
        assert_eq!(
            shard.len(),
            2,
            "the failed write stays for the loss to record"
        );
    }

    #[test]
    fn only_acknowledged_operations_are_shown_to_the_observer() {
        let mut shard = LinkShard::default();
        shard.insert(
            1,
            Pending {
                sent_ns: 7,
                ..write(10, 1, 0)
            },
        );
        shard.insert(
            2,
            Pending {
                sent_ns: 8,
                ..write(11, 2, 0)
            },
        );
        shard.insert(
            3,
            Pending {
                sent_ns: 9,
                ..write(12, 3, 0)
            },
        );
        let mut seen = Vec::new();
        let out = shard.take_acks_observed(
            [
                (1, AckStatus::Ok),
                (2, AckStatus::NoSpace),
                (1, AckStatus::Ok),
                (5, AckStatus::Ok),
            ],
            |p| seen.push(p.sent_ns),
        );
        // A failed, a repeated and an unknown ack show nothing.
        assert_eq!(seen, vec![7]);
        assert_eq!(out.answered, vec![10]);
    }

    #[test]
    fn a_failure_here_after_mirroring_resyncs_its_range() {
        let mut port = TestPort::new();
        let mut m = Mirror::new(PeerLossPolicy::Degrade);
        assert!(
            !m.diverged(&mut port, 0, 0, 512),
            "not mirroring: recorded alone"
        );
        m.start_round().unwrap();
        assert!(m.diverged(&mut port, 0, 6 * REGION, 512));
        assert!(port.persisted[0].bitmap.is_dirty(6));
        assert!(!m.mirroring());
    }
}
