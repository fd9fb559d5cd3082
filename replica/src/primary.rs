//! The sans-I/O replication state machine of one LUN on the primary.
//!
//! Inputs are method calls (`submit_write`, `local_done`, `peer_ack`, `persisted`, `tick`, ...), each
//! returning the [`Action`]s the engine must carry out. No clocks (`now_ms` is passed in), no I/O, no
//! threads; randomness comes from a seed. See the crate docs for the call sequences.
//!
//! # Why writes can complete
//! A write is completed `Good` only if its local write succeeded and either the peer acked it, or the
//! *persisted* metadata records the peer as outdated and covers the write's regions in its bitmap.
//! This is asserted at every completion.
//!
//! # Region sets
//! - `out_of_sync`: regions that may differ from the peer and must be copied by a resync.
//! - `hot`: write-intent regions, kept in the persisted bitmap while writes may be in flight or not
//!   yet flushed on both nodes (an LRU of at most `hot_regions_max` idle regions, so a stream of writes
//!   to one region persists the metadata once, not once per write, like DRBD's activity log).
//!
//! The persisted bitmap is always a superset of `out_of_sync ∪ {regions with writes in flight}`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::bitmap::{Bitmap, BitmapError, WriteIntent};
use crate::genid::{decide, Decision, GenFlags, GenIds};
use crate::meta::{Meta, MetaFlags};
use crate::wire::{AckStatus, LunHello, Message, DATA_BYTES_MAX};

/// Engine-chosen id of one I/O (a write or a flush). Ids at or above [`INTERNAL_ID_BASE`] are reserved.
pub type OpId = u64;

/// Ids from here on are the state machine's own (internal flushes); engines must use smaller ids.
pub const INTERNAL_ID_BASE: OpId = 1 << 63;

/// What to do when the peer stops answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerLossPolicy {
    /// Freeze I/O until the peer returns or an operator (or fence handler) outdates it.
    Suspend,
    /// Record the peer as outdated, bump the generation, and go on alone.
    Degrade,
}

/// Configuration of one LUN's primary state machine.
#[derive(Clone, Debug)]
pub struct PrimaryConfig {
    /// How long the peer may leave a request unanswered (or stay away) before peer-loss handling.
    pub replica_timeout_ms: u64,
    /// What peer loss does.
    pub on_peer_loss: PeerLossPolicy,
    /// Bitmap region size (must match the metadata).
    pub region_bytes: u64,
    /// LUN size (must match the metadata).
    pub size_bytes: u64,
    /// Idle write-intent regions kept hot before the least recently used are evicted.
    pub hot_regions_max: usize,
    /// Regions being copied at once by a resync.
    pub resync_regions_inflight_max: usize,
    /// Persist resync progress after this many regions were copied.
    pub resync_persist_every_regions: u64,
    /// Writes and flushes in flight at once (including ones held while frozen).
    pub ops_inflight_max: usize,
    /// How often to flush both nodes so that hot regions become evictable.
    pub flush_interval_ms: u64,
}

impl PrimaryConfig {
    /// Defaults for a LUN of `size_bytes` with 1 MiB regions.
    pub fn new(size_bytes: u64) -> PrimaryConfig {
        PrimaryConfig {
            replica_timeout_ms: 2_000,
            on_peer_loss: PeerLossPolicy::Suspend,
            region_bytes: crate::bitmap::REGION_BYTES_DEFAULT,
            size_bytes,
            hot_regions_max: 256,
            resync_regions_inflight_max: 4,
            resync_persist_every_regions: 64,
            ops_inflight_max: 4096,
            flush_interval_ms: 1_000,
        }
    }
}

/// Outcome reported to the initiator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// GOOD status.
    Good,
    /// The local I/O failed (CHECK CONDITION, medium error).
    Error,
}

/// Why the peer's connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefuseReason {
    /// [`decide`] said the peer cannot be brought up to date from us.
    Decision(Decision),
    /// The peer's LUN has a different size or region size.
    Geometry,
}

/// What a region read for resync found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegionRead {
    /// The region's bytes (exactly the region's length).
    Data(Vec<u8>),
    /// The region is a hole (reads as zeros): the peer punches it instead of receiving zeros.
    Hole,
    /// The local read failed: the resync is aborted (the region stays dirty).
    Failed,
}

/// What the engine must do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Issue the local write of op `id` (its regions' intent is durable).
    SubmitLocalWrite {
        /// The op.
        id: OpId,
    },
    /// Issue a local flush (fdatasync) for op `id`; answer with `local_done`.
    SubmitLocalFlush {
        /// The op (may be internal, >= [`INTERNAL_ID_BASE`]).
        id: OpId,
    },
    /// Send `Message::Write` for op `id` with its buffer, framed with sequence `seq`.
    ReplicateWrite {
        /// The op.
        id: OpId,
        /// Frame sequence to use (acks name it).
        seq: u64,
        /// LUN.
        lun_key: u64,
        /// Byte offset.
        offset_bytes: u64,
        /// Byte length of the buffer.
        len_bytes: u64,
        /// FUA.
        fua: bool,
    },
    /// Send this message framed with sequence `seq`.
    SendToPeer {
        /// Frame sequence.
        seq: u64,
        /// The message.
        msg: Message,
    },
    /// Durably write this metadata (tmp + fsync + rename), then call `persisted(version)`.
    PersistMeta {
        /// Version to report back.
        version: u64,
        /// The metadata.
        meta: Meta,
    },
    /// Report the op's outcome to the initiator (and release its range lock).
    Complete {
        /// The op.
        id: OpId,
        /// Outcome.
        status: Completion,
    },
    /// Stop accepting new I/O on this LUN.
    Freeze,
    /// Resume accepting I/O.
    Thaw,
    /// Drop the peer connection (it stopped acking or failed a request); `peer_disconnected` is implied.
    DisconnectPeer,
    /// Refuse the peer that just connected: disconnect it and tell the operator.
    PeerRefused {
        /// Why.
        reason: RefuseReason,
    },
    /// A resync started with this many dirty regions.
    StartResync {
        /// Dirty regions to copy.
        regions: u64,
    },
    /// Take the range lock on the region (waiting for writes in flight), read it, and call
    /// `resync_region_read`. Keep the lock until `UnlockRegion`.
    ReadRegionForResync {
        /// Region index.
        region: u64,
        /// Its byte offset.
        offset_bytes: u64,
        /// Its byte length.
        len_bytes: u64,
    },
    /// Release the region lock taken for `ReadRegionForResync`.
    UnlockRegion {
        /// Region index.
        region: u64,
    },
    /// The resync finished: both nodes hold the same data and generation.
    ResyncFinished,
    /// The resync stopped because a local region read failed.
    ResyncAborted {
        /// The region that could not be read.
        region: u64,
    },
}

/// Caller contract violations.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrimaryError {
    /// The byte range is empty, past the end of the LUN, or over the wire payload limit.
    #[error("bad range offset={offset_bytes} len={len_bytes}")]
    BadRange {
        /// Offset.
        offset_bytes: u64,
        /// Length.
        len_bytes: u64,
    },
    /// The op id is already in flight.
    #[error("op id {0} already in flight")]
    DuplicateId(OpId),
    /// The op id is in the reserved internal range.
    #[error("op id {0} is reserved")]
    ReservedId(OpId),
    /// Too many ops in flight.
    #[error("too many ops in flight")]
    TooManyOps,
    /// The configuration does not match the metadata, or is out of range.
    #[error("configuration does not match the metadata: {0}")]
    BadConfig(&'static str),
    /// Bad geometry.
    #[error(transparent)]
    Geometry(#[from] BitmapError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpKind {
    Write {
        offset_bytes: u64,
        len_bytes: u64,
        fua: bool,
    },
    Flush,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Local {
    NotStarted,
    Pending,
    Done { ok: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    /// Not issued yet (waiting for the intent to be durable, or held while frozen).
    NotSent,
    Sent {
        seq: u64,
    },
    Acked,
    /// The peer was absent: the op's regions are in `out_of_sync`.
    Skipped,
}

#[derive(Debug)]
struct Op {
    kind: OpKind,
    local: Local,
    peer: Peer,
    /// Metadata version that must be durable before the op is issued.
    waiting_version: Option<u64>,
    /// For flushes: the regions whose writes this flush makes durable on both nodes.
    flush_regions: Vec<u64>,
}

#[derive(Clone, Copy, Debug)]
enum PeerOp {
    Write(OpId),
    Flush(OpId),
    Resync { region: u64 },
    Done { gen: GenIds },
}

#[derive(Debug)]
enum Link {
    Down { since_ms: u64 },
    Up,
}

#[derive(Debug, Default)]
struct Resync {
    cursor: u64,
    reading: BTreeSet<u64>,
    sending: BTreeSet<u64>,
    done_sent: bool,
    copied_since_persist: u64,
}

/// The primary's replication state machine for one LUN.
#[derive(Debug)]
pub struct Primary {
    config: PrimaryConfig,
    lun_key: u64,
    gen: GenIds,
    flags: MetaFlags,
    out_of_sync: Bitmap,
    /// Hot region → last use (a logical clock), for LRU eviction.
    hot: BTreeMap<u64, u64>,
    hot_clock: u64,
    intent: WriteIntent,
    ops: BTreeMap<OpId, Op>,
    held: VecDeque<OpId>,
    next_internal_id: OpId,
    /// Regions written (non-FUA) and acked by both, not yet covered by a flush of both.
    unflushed: BTreeSet<u64>,
    internal_flush: Option<OpId>,
    last_flush_ms: u64,
    persisted: Meta,
    persisted_version: u64,
    persist_inflight: Option<(u64, Meta)>,
    persist_wanted: bool,
    next_version: u64,
    /// Version of the persist that records the degrade; completions relying on it wait for it.
    degrade_version: Option<u64>,
    link: Link,
    next_seq: u64,
    peer_ops: BTreeMap<u64, (PeerOp, u64)>,
    frozen: bool,
    resync: Option<Resync>,
    /// Regions whose resync read is outstanding after the resync was torn down: unlock on arrival.
    stale_reads: BTreeSet<u64>,
    rng: u64,
}

trait ResyncIdle {
    fn is_none_or_idle(&self) -> bool;
}

impl ResyncIdle for Option<&Resync> {
    fn is_none_or_idle(&self) -> bool {
        match self {
            Some(resync) => resync.reading.is_empty() && resync.sending.is_empty(),
            None => true,
        }
    }
}

impl Primary {
    /// Starts the state machine from persisted metadata (a new LUN's, or after a restart or crash).
    ///
    /// Every region in the persisted bitmap is treated as out of sync: it covers any write that was
    /// in flight when this node last stopped. The peer starts disconnected. `seed` must be fresh
    /// randomness on every start (it draws new generation ids).
    pub fn new(
        config: PrimaryConfig,
        meta: Meta,
        seed: u64,
        now_ms: u64,
    ) -> Result<Primary, PrimaryError> {
        if meta.size_bytes != config.size_bytes || meta.region_bytes != config.region_bytes {
            return Err(PrimaryError::BadConfig("size or region size"));
        }
        if config.replica_timeout_ms == 0
            || config.ops_inflight_max == 0
            || config.resync_regions_inflight_max == 0
            || config.resync_persist_every_regions == 0
        {
            return Err(PrimaryError::BadConfig("zero limit"));
        }
        if meta.flags.inconsistent {
            return Err(PrimaryError::BadConfig(
                "an inconsistent LUN cannot be primary",
            ));
        }
        let intent = WriteIntent::new(config.size_bytes, config.region_bytes)?;
        let mut flags = meta.flags;
        flags.primary = true;
        Ok(Primary {
            lun_key: meta.lun_key,
            gen: meta.gen,
            flags,
            out_of_sync: meta.bitmap.clone(),
            hot: BTreeMap::new(),
            hot_clock: 0,
            intent,
            ops: BTreeMap::new(),
            held: VecDeque::new(),
            next_internal_id: INTERNAL_ID_BASE,
            unflushed: BTreeSet::new(),
            internal_flush: None,
            last_flush_ms: now_ms,
            persisted: meta,
            persisted_version: 0,
            persist_inflight: None,
            persist_wanted: false,
            next_version: 1,
            degrade_version: None,
            link: Link::Down { since_ms: now_ms },
            next_seq: 1,
            peer_ops: BTreeMap::new(),
            frozen: false,
            resync: None,
            stale_reads: BTreeSet::new(),
            rng: seed ^ 0x9e37_79b9_7f4a_7c15,
            config,
        })
    }

    /// Our hello entry for this LUN.
    pub fn lun_hello(&self) -> LunHello {
        LunHello {
            lun_key: self.lun_key,
            size_bytes: self.config.size_bytes,
            region_bytes: self.config.region_bytes,
            gen: self.gen,
            flags: GenFlags {
                outdated: self.flags.outdated,
                inconsistent: self.flags.inconsistent,
                primary: true,
                crashed: false,
            },
        }
    }

    /// Current generation ids (in memory; may be ahead of the persisted ones).
    pub fn gen(&self) -> GenIds {
        self.gen
    }

    /// Whether new I/O is frozen.
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Whether the peer is recorded (in memory) as outdated.
    pub fn is_degraded(&self) -> bool {
        self.flags.peer_outdated
    }

    /// Whether the peer link is up (connected and accepted).
    pub fn is_connected(&self) -> bool {
        matches!(self.link, Link::Up)
    }

    /// Whether a resync is running.
    pub fn is_resyncing(&self) -> bool {
        self.resync.is_some()
    }

    /// Regions that must still be copied to the peer.
    pub fn out_of_sync(&self) -> &Bitmap {
        &self.out_of_sync
    }

    /// Ops in flight (including held ones).
    pub fn ops_in_flight(&self) -> usize {
        self.ops.len()
    }

    /// The last metadata reported durable.
    pub fn persisted_meta(&self) -> &Meta {
        &self.persisted
    }

    fn next_random(&mut self) -> [u8; 8] {
        // splitmix64: generation ids must be unique, not secret.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)).to_le_bytes()
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    // ---------------------------------------------------------------- I/O submission

    /// A WRITE arrived (under the engine's range lock for `[offset, offset+len)`).
    pub fn submit_write(
        &mut self,
        id: OpId,
        offset_bytes: u64,
        len_bytes: u64,
        fua: bool,
        now_ms: u64,
    ) -> Result<Vec<Action>, PrimaryError> {
        let end = offset_bytes.checked_add(len_bytes);
        let past_end = match end {
            Some(end) => end > self.config.size_bytes,
            None => true,
        };
        if len_bytes == 0 || len_bytes > DATA_BYTES_MAX as u64 || past_end {
            return Err(PrimaryError::BadRange {
                offset_bytes,
                len_bytes,
            });
        }
        self.admit(id)?;
        let mut actions = Vec::new();
        self.ops.insert(
            id,
            Op {
                kind: OpKind::Write {
                    offset_bytes,
                    len_bytes,
                    fua,
                },
                local: Local::NotStarted,
                peer: Peer::NotSent,
                waiting_version: None,
                flush_regions: Vec::new(),
            },
        );
        self.start_or_hold(id, now_ms, &mut actions);
        Ok(actions)
    }

    /// A SYNCHRONIZE CACHE arrived: completes once both nodes flushed (or the peer is outdated).
    pub fn submit_flush(&mut self, id: OpId, now_ms: u64) -> Result<Vec<Action>, PrimaryError> {
        self.admit(id)?;
        let mut actions = Vec::new();
        self.insert_flush(id);
        self.start_or_hold(id, now_ms, &mut actions);
        Ok(actions)
    }

    fn admit(&self, id: OpId) -> Result<(), PrimaryError> {
        if id >= INTERNAL_ID_BASE {
            return Err(PrimaryError::ReservedId(id));
        }
        if self.ops.contains_key(&id) {
            return Err(PrimaryError::DuplicateId(id));
        }
        if self.ops.len() >= self.config.ops_inflight_max {
            return Err(PrimaryError::TooManyOps);
        }
        Ok(())
    }

    fn insert_flush(&mut self, id: OpId) {
        let op = Op {
            kind: OpKind::Flush,
            local: Local::NotStarted,
            peer: Peer::NotSent,
            waiting_version: None,
            flush_regions: Vec::new(),
        };
        self.ops.insert(id, op);
    }

    fn start_or_hold(&mut self, id: OpId, now_ms: u64, actions: &mut Vec<Action>) {
        if self.frozen {
            self.held.push_back(id);
        } else {
            self.start_op(id, now_ms, actions);
        }
    }

    /// Starts an op: makes its intent durable first if needed, then issues it.
    fn start_op(&mut self, id: OpId, now_ms: u64, actions: &mut Vec<Action>) {
        let Some(op) = self.ops.get(&id) else { return };
        match op.kind {
            OpKind::Write {
                offset_bytes,
                len_bytes,
                ..
            } => {
                self.intent.begin(offset_bytes, len_bytes);
                let regions: Vec<u64> = self.intent.regions_of(offset_bytes, len_bytes).collect();
                for region in regions {
                    self.hot_clock += 1;
                    self.hot.insert(region, self.hot_clock);
                }
                // Covered now AND by the write already in flight: that snapshot predates this op and
                // lands later, so it must not be the one that drops the regions.
                let inflight_covers = match &self.persist_inflight {
                    Some((_, meta)) => meta.bitmap.covers(offset_bytes, len_bytes),
                    None => true,
                };
                if !self.persisted.bitmap.covers(offset_bytes, len_bytes) || !inflight_covers {
                    let version = self.request_persist(actions);
                    if let Some(op) = self.ops.get_mut(&id) {
                        op.waiting_version = Some(version);
                    }
                    return;
                }
            }
            OpKind::Flush => {
                // The flush covers what was written and acked before it was issued.
                let regions = std::mem::take(&mut self.unflushed).into_iter().collect();
                if let Some(op) = self.ops.get_mut(&id) {
                    op.flush_regions = regions;
                }
            }
        }
        self.issue_op(id, now_ms, actions);
    }

    /// Issues the local and peer parts of an op whose intent is durable.
    fn issue_op(&mut self, id: OpId, now_ms: u64, actions: &mut Vec<Action>) {
        let link_up = self.is_connected();
        let seq = if link_up { Some(self.take_seq()) } else { None };
        let lun_key = self.lun_key;
        let Some(op) = self.ops.get_mut(&id) else {
            return;
        };
        assert_eq!(op.local, Local::NotStarted);
        op.waiting_version = None;
        op.local = Local::Pending;
        match op.kind {
            OpKind::Write {
                offset_bytes,
                len_bytes,
                fua,
            } => {
                actions.push(Action::SubmitLocalWrite { id });
                if let Some(seq) = seq {
                    op.peer = Peer::Sent { seq };
                    actions.push(Action::ReplicateWrite {
                        id,
                        seq,
                        lun_key,
                        offset_bytes,
                        len_bytes,
                        fua,
                    });
                    self.peer_ops.insert(seq, (PeerOp::Write(id), now_ms));
                } else {
                    op.peer = Peer::Skipped;
                    self.out_of_sync.mark(offset_bytes, len_bytes);
                }
            }
            OpKind::Flush => {
                actions.push(Action::SubmitLocalFlush { id });
                if let Some(seq) = seq {
                    op.peer = Peer::Sent { seq };
                    actions.push(Action::SendToPeer {
                        seq,
                        msg: Message::Flush { lun_key },
                    });
                    self.peer_ops.insert(seq, (PeerOp::Flush(id), now_ms));
                } else {
                    op.peer = Peer::Skipped;
                    for region in std::mem::take(&mut op.flush_regions) {
                        self.out_of_sync.set(region);
                    }
                }
            }
        }
    }

    // ---------------------------------------------------------------- completions from the engine

    /// The local part of op `id` finished (`ok == false`: I/O error).
    pub fn local_done(&mut self, id: OpId, ok: bool) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(op) = self.ops.get_mut(&id) else {
            return actions;
        };
        if op.local != Local::Pending {
            return actions;
        }
        op.local = Local::Done { ok };
        if !ok {
            if let OpKind::Write {
                offset_bytes,
                len_bytes,
                ..
            } = op.kind
            {
                // The peer may hold the new data while we do not: reconcile the region later.
                self.out_of_sync.mark(offset_bytes, len_bytes);
            }
        }
        self.try_complete(id, &mut actions);
        if !ok {
            self.ensure_resync(&mut actions);
        }
        actions
    }

    /// Metadata `version` is durable.
    pub fn persisted(&mut self, version: u64, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some((inflight, _)) = &self.persist_inflight else {
            return actions;
        };
        if *inflight != version {
            return actions;
        }
        let Some((_, meta)) = self.persist_inflight.take() else {
            return actions;
        };
        assert!(version > self.persisted_version);
        self.persisted = meta;
        self.persisted_version = version;
        if self.persist_wanted {
            // Emitted first, so requests made below queue behind it instead of racing it.
            self.persist_wanted = false;
            self.emit_persist(&mut actions);
        }
        if self
            .degrade_version
            .is_some_and(|degrade| degrade <= version)
        {
            self.degrade_version = None;
            if self.frozen {
                self.thaw(now_ms, &mut actions);
            }
        }
        let ready: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, op)| op.waiting_version.is_some_and(|wanted| wanted <= version))
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            if let Some(OpKind::Write {
                offset_bytes,
                len_bytes,
                ..
            }) = self.ops.get(&id).map(|op| op.kind)
            {
                assert!(
                    self.persisted.bitmap.covers(offset_bytes, len_bytes),
                    "intent not durable"
                );
            }
            self.issue_op(id, now_ms, &mut actions);
        }
        self.try_complete_all(&mut actions);
        actions
    }

    // ---------------------------------------------------------------- the peer

    /// The peer (after hello and authentication) reports this state for our LUN, and its own dirty
    /// bitmap if it sent one (regions where it may differ: its crashed-primary tail).
    pub fn peer_connected(
        &mut self,
        peer: &LunHello,
        peer_dirty: Option<&Bitmap>,
        now_ms: u64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.is_connected() {
            // A new connection replaces the old one: whatever was in flight on it is lost.
            self.on_peer_lost(now_ms, &mut actions);
        }
        if peer.size_bytes != self.config.size_bytes
            || peer.region_bytes != self.config.region_bytes
        {
            actions.push(Action::PeerRefused {
                reason: RefuseReason::Geometry,
            });
            return actions;
        }
        let local_flags = GenFlags {
            outdated: self.flags.outdated,
            inconsistent: false,
            primary: true,
            crashed: false,
        };
        let decision = decide(&self.gen, local_flags, &peer.gen, peer.flags);
        match decision {
            Decision::InSync | Decision::SyncSourceBitmap => {}
            Decision::SyncSourceFull => self.out_of_sync.set_all(),
            Decision::InitialSync {
                source_is_local: true,
            } => {
                // Name the new data's generation; the bitmap id JUST_CREATED says "since blank".
                let random = self.next_random();
                self.gen.bump(random);
                self.out_of_sync.set_all();
            }
            other => {
                actions.push(Action::PeerRefused {
                    reason: RefuseReason::Decision(other),
                });
                return actions;
            }
        }
        if let Some(dirty) = peer_dirty {
            if self.out_of_sync.union_with(dirty).is_err() {
                actions.push(Action::PeerRefused {
                    reason: RefuseReason::Geometry,
                });
                return actions;
            }
        }
        self.link = Link::Up;
        self.last_flush_ms = now_ms;
        // Ops the peer missed while away: if no degrade was decided, they still need its ack.
        if !self.flags.peer_outdated {
            let resend: Vec<OpId> = self
                .ops
                .iter()
                .filter(|(_, op)| op.peer == Peer::Skipped)
                .map(|(id, _)| *id)
                .collect();
            for id in resend {
                self.resend(id, now_ms, &mut actions);
            }
        }
        if self.frozen && self.degrade_version.is_none() {
            self.thaw(now_ms, &mut actions);
        }
        let needs_resync = self.out_of_sync.dirty_count() > 0
            || self.gen.bitmap != 0
            || self.flags.peer_outdated
            || peer.flags.inconsistent;
        if needs_resync {
            self.resync = Some(Resync::default());
            actions.push(Action::StartResync {
                regions: self.out_of_sync.dirty_count(),
            });
            // Record the merged bits, so a crash now does not forget the peer's dirty regions.
            self.request_persist(&mut actions);
            self.pump_resync(now_ms, &mut actions);
        }
        actions
    }

    fn resend(&mut self, id: OpId, now_ms: u64, actions: &mut Vec<Action>) {
        let seq = self.take_seq();
        let lun_key = self.lun_key;
        let Some(op) = self.ops.get_mut(&id) else {
            return;
        };
        op.peer = Peer::Sent { seq };
        match op.kind {
            OpKind::Write {
                offset_bytes,
                len_bytes,
                fua,
            } => {
                actions.push(Action::ReplicateWrite {
                    id,
                    seq,
                    lun_key,
                    offset_bytes,
                    len_bytes,
                    fua,
                });
                self.peer_ops.insert(seq, (PeerOp::Write(id), now_ms));
            }
            OpKind::Flush => {
                actions.push(Action::SendToPeer {
                    seq,
                    msg: Message::Flush { lun_key },
                });
                self.peer_ops.insert(seq, (PeerOp::Flush(id), now_ms));
            }
        }
    }

    /// The peer connection is gone.
    pub fn peer_disconnected(&mut self, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        self.on_peer_lost(now_ms, &mut actions);
        self.check_timeouts(now_ms, &mut actions);
        actions
    }

    fn on_peer_lost(&mut self, since_ms: u64, actions: &mut Vec<Action>) {
        if !self.is_connected() {
            return;
        }
        self.link = Link::Down { since_ms };
        self.peer_ops.clear();
        // Everything the peer has not acked, or acked but may not have made durable, may be missing
        // on it now.
        for op in self.ops.values_mut() {
            if let (
                Peer::Acked,
                OpKind::Write {
                    offset_bytes,
                    len_bytes,
                    fua: false,
                },
            ) = (op.peer, op.kind)
            {
                // Acked but only in the peer's volatile cache (it is not yet in `unflushed`, which
                // is filled at completion): the peer may lose it.
                self.out_of_sync.mark(offset_bytes, len_bytes);
            }
            if let Peer::Sent { .. } = op.peer {
                op.peer = Peer::Skipped;
                if let OpKind::Write {
                    offset_bytes,
                    len_bytes,
                    ..
                } = op.kind
                {
                    self.out_of_sync.mark(offset_bytes, len_bytes);
                }
            }
            if op.kind == OpKind::Flush && op.peer != Peer::Acked {
                for region in &op.flush_regions {
                    self.out_of_sync.set(*region);
                }
            }
        }
        for region in std::mem::take(&mut self.unflushed) {
            self.out_of_sync.set(region);
        }
        if let Some(resync) = self.resync.take() {
            for region in resync.sending {
                actions.push(Action::UnlockRegion { region });
            }
            self.stale_reads.extend(resync.reading);
        }
    }

    /// The peer answered the frame with sequence `seq`. Stale or unknown sequences are ignored.
    pub fn peer_ack(&mut self, seq: u64, status: AckStatus, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some((peer_op, _)) = self.peer_ops.remove(&seq) else {
            return actions;
        };
        if status != AckStatus::Ok {
            // A peer that cannot apply our writes is as good as gone: its copy is now behind.
            actions.push(Action::DisconnectPeer);
            self.on_peer_lost(now_ms, &mut actions);
            self.check_timeouts(now_ms, &mut actions);
            return actions;
        }
        match peer_op {
            PeerOp::Write(id) | PeerOp::Flush(id) => {
                if let Some(op) = self.ops.get_mut(&id) {
                    assert_eq!(op.peer, Peer::Sent { seq });
                    op.peer = Peer::Acked;
                }
                self.try_complete(id, &mut actions);
            }
            PeerOp::Resync { region } => {
                if let Some(resync) = self.resync.as_mut() {
                    assert!(resync.sending.remove(&region));
                    resync.copied_since_persist += 1;
                    // The region lock was held from the read until now, so no write slipped in.
                    self.out_of_sync.clear(region);
                    actions.push(Action::UnlockRegion { region });
                    if resync.copied_since_persist >= self.config.resync_persist_every_regions {
                        resync.copied_since_persist = 0;
                        self.request_persist(&mut actions);
                    }
                }
                self.pump_resync(now_ms, &mut actions);
            }
            PeerOp::Done { gen } => {
                let idle = self.resync.as_ref().is_none_or_idle();
                assert!(idle, "ResyncDone acked with region copies in flight");
                // The target adopted `gen` durably before acking; now retire our bitmap id.
                self.gen = gen;
                self.flags.peer_outdated = false;
                self.resync = None;
                self.request_persist(&mut actions);
                actions.push(Action::ResyncFinished);
                // Regions dirtied meanwhile (a local error) start another round.
                self.ensure_resync(&mut actions);
            }
        }
        actions
    }

    /// The engine read a region for resync (it holds the region's lock).
    pub fn resync_region_read(
        &mut self,
        region: u64,
        read: RegionRead,
        now_ms: u64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let reading = self
            .resync
            .as_mut()
            .is_some_and(|resync| resync.reading.remove(&region));
        if !reading {
            if self.stale_reads.remove(&region) {
                actions.push(Action::UnlockRegion { region });
            }
            return actions;
        }
        let (offset_bytes, len_bytes) = self.out_of_sync.region_range(region);
        let msg = match read {
            RegionRead::Data(data) if data.len() as u64 == len_bytes => Message::ResyncData {
                lun_key: self.lun_key,
                offset_bytes,
                data,
            },
            RegionRead::Hole => Message::WriteZeroes {
                lun_key: self.lun_key,
                offset_bytes,
                len_bytes,
                unmap: true,
            },
            RegionRead::Data(_) | RegionRead::Failed => {
                actions.push(Action::UnlockRegion { region });
                actions.push(Action::ResyncAborted { region });
                if let Some(resync) = self.resync.take() {
                    self.stale_reads.extend(resync.reading);
                    for region in resync.sending {
                        actions.push(Action::UnlockRegion { region });
                    }
                }
                // Acks of resync data already sent are now unknown sequences and will be ignored.
                self.peer_ops.retain(|_, (op, _)| {
                    !matches!(op, PeerOp::Resync { .. } | PeerOp::Done { .. })
                });
                return actions;
            }
        };
        let seq = self.take_seq();
        if let Some(resync) = self.resync.as_mut() {
            resync.sending.insert(region);
        }
        self.peer_ops
            .insert(seq, (PeerOp::Resync { region }, now_ms));
        actions.push(Action::SendToPeer { seq, msg });
        actions
    }

    /// An operator (or a fence handler, or the witness) declared the peer outdated: go on alone.
    pub fn operator_outdate_peer(&mut self, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        if !self.is_connected() && !self.flags.peer_outdated {
            if !self.frozen {
                self.frozen = true;
                actions.push(Action::Freeze);
            }
            self.degrade(&mut actions);
        }
        self.check_timeouts(now_ms, &mut actions);
        actions
    }

    /// Time passed: peer timeouts, periodic flushes, resync pacing.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        self.check_timeouts(now_ms, &mut actions);
        if self.is_connected()
            && self.internal_flush.is_none()
            && !self.unflushed.is_empty()
            && now_ms.saturating_sub(self.last_flush_ms) >= self.config.flush_interval_ms
            && self.ops.len() < self.config.ops_inflight_max
        {
            let id = self.next_internal_id;
            self.next_internal_id += 1;
            self.internal_flush = Some(id);
            self.last_flush_ms = now_ms;
            self.insert_flush(id);
            self.start_or_hold(id, now_ms, &mut actions);
        }
        self.pump_resync(now_ms, &mut actions);
        actions
    }

    fn check_timeouts(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        if self.is_connected() {
            let oldest = self.peer_ops.values().map(|(_, sent_ms)| *sent_ms).min();
            if let Some(sent_ms) = oldest {
                if now_ms.saturating_sub(sent_ms) >= self.config.replica_timeout_ms {
                    actions.push(Action::DisconnectPeer);
                    self.on_peer_lost(sent_ms, actions);
                }
            }
        }
        if let Link::Down { since_ms } = self.link {
            let expired = now_ms.saturating_sub(since_ms) >= self.config.replica_timeout_ms;
            if expired && !self.flags.peer_outdated && !self.frozen {
                self.frozen = true;
                actions.push(Action::Freeze);
                if self.config.on_peer_loss == PeerLossPolicy::Degrade {
                    self.degrade(actions);
                }
            }
        }
    }

    /// Records the peer as outdated with a bumped generation; completions wait for it to be durable.
    fn degrade(&mut self, actions: &mut Vec<Action>) {
        assert!(!self.is_connected());
        assert!(!self.flags.peer_outdated);
        let random = self.next_random();
        self.gen.bump(random);
        self.flags.peer_outdated = true;
        for region in self.intent.regions().collect::<Vec<_>>() {
            self.out_of_sync.set(region);
        }
        let version = self.request_persist(actions);
        self.degrade_version = Some(version);
    }

    fn thaw(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        assert!(self.frozen);
        self.frozen = false;
        actions.push(Action::Thaw);
        while let Some(id) = self.held.pop_front() {
            self.start_op(id, now_ms, actions);
        }
    }

    // ---------------------------------------------------------------- resync

    fn ensure_resync(&mut self, actions: &mut Vec<Action>) {
        if self.is_connected() && self.resync.is_none() && self.out_of_sync.dirty_count() > 0 {
            self.resync = Some(Resync::default());
            actions.push(Action::StartResync {
                regions: self.out_of_sync.dirty_count(),
            });
        }
    }

    fn pump_resync(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        if !self.is_connected() {
            return;
        }
        let Some(resync) = self.resync.as_mut() else {
            return;
        };
        if resync.done_sent {
            // Regions dirtied after ResyncDone was sent go to the next round (see `ensure_resync`).
            return;
        }
        let limit = self.config.resync_regions_inflight_max;
        // Each region is considered at most once per pump: bounded even if everything is in flight.
        let mut scanned = 0u64;
        while resync.reading.len() + resync.sending.len() < limit
            && scanned < self.out_of_sync.regions()
        {
            let next = self
                .out_of_sync
                .next_dirty(resync.cursor)
                .or_else(|| self.out_of_sync.next_dirty(0));
            let Some(region) = next else { break };
            resync.cursor = region + 1;
            scanned += 1;
            if resync.reading.contains(&region)
                || resync.sending.contains(&region)
                || self.stale_reads.contains(&region)
            {
                continue;
            }
            resync.reading.insert(region);
            let (offset_bytes, len_bytes) = self.out_of_sync.region_range(region);
            actions.push(Action::ReadRegionForResync {
                region,
                offset_bytes,
                len_bytes,
            });
        }
        let idle = resync.reading.is_empty() && resync.sending.is_empty();
        if idle && !resync.done_sent && self.out_of_sync.dirty_count() == 0 {
            resync.done_sent = true;
            let mut gen = self.gen;
            gen.resync_done_source();
            let seq = self.take_seq();
            self.peer_ops.insert(seq, (PeerOp::Done { gen }, now_ms));
            actions.push(Action::SendToPeer {
                seq,
                msg: Message::ResyncDone {
                    lun_key: self.lun_key,
                    gen,
                },
            });
        }
    }

    // ---------------------------------------------------------------- persistence

    /// The metadata as it should be persisted now.
    fn meta_now(&self) -> Meta {
        let mut bitmap = self.out_of_sync.clone();
        for region in self.hot.keys() {
            bitmap.set(*region);
        }
        Meta {
            lun_key: self.lun_key,
            size_bytes: self.config.size_bytes,
            region_bytes: self.config.region_bytes,
            gen: self.gen,
            flags: self.flags,
            bitmap,
        }
    }

    /// Asks for the current state to be persisted; returns the version that will contain it.
    fn request_persist(&mut self, actions: &mut Vec<Action>) -> u64 {
        if self.persist_inflight.is_some() {
            // One write at a time; the next one (emitted on completion) will include today's state.
            self.persist_wanted = true;
            return self.next_version;
        }
        self.emit_persist(actions)
    }

    fn emit_persist(&mut self, actions: &mut Vec<Action>) -> u64 {
        assert!(self.persist_inflight.is_none());
        let version = self.next_version;
        self.next_version += 1;
        let meta = self.meta_now();
        self.persist_inflight = Some((version, meta.clone()));
        actions.push(Action::PersistMeta { version, meta });
        version
    }

    // ---------------------------------------------------------------- completion

    fn try_complete_all(&mut self, actions: &mut Vec<Action>) {
        let ids: Vec<OpId> = self.ops.keys().copied().collect();
        for id in ids {
            self.try_complete(id, actions);
        }
    }

    fn try_complete(&mut self, id: OpId, actions: &mut Vec<Action>) {
        let Some(op) = self.ops.get(&id) else { return };
        let Local::Done { ok } = op.local else { return };
        let covered_by_record = match op.kind {
            OpKind::Write {
                offset_bytes,
                len_bytes,
                ..
            } => {
                self.persisted.flags.peer_outdated
                    && self.persisted.bitmap.covers(offset_bytes, len_bytes)
            }
            OpKind::Flush => self.persisted.flags.peer_outdated,
        };
        let status = match op.peer {
            Peer::Acked => Completion::Good,
            Peer::Skipped if covered_by_record => Completion::Good,
            // The peer part is still out (or the peer is away and no durable record excuses it).
            Peer::NotSent | Peer::Sent { .. } | Peer::Skipped => return,
        };
        let status = if ok { status } else { Completion::Error };
        let Some(op) = self.ops.remove(&id) else {
            return;
        };
        if status == Completion::Good {
            // The invariant this whole machine exists for.
            assert!(
                op.peer == Peer::Acked || covered_by_record,
                "completing a write the peer may not have"
            );
        }
        match op.kind {
            OpKind::Write {
                offset_bytes,
                len_bytes,
                fua,
            } => {
                self.intent.end(offset_bytes, len_bytes);
                if op.peer == Peer::Acked && !fua && ok && self.is_connected() {
                    self.unflushed
                        .extend(self.intent.regions_of(offset_bytes, len_bytes));
                }
            }
            OpKind::Flush => {
                if !ok || op.peer != Peer::Acked {
                    // Not durable on both: keep the regions hot until a later flush.
                    self.unflushed.extend(op.flush_regions.iter().copied());
                }
            }
        }
        if id >= INTERNAL_ID_BASE {
            if self.internal_flush == Some(id) {
                self.internal_flush = None;
            }
        } else {
            actions.push(Action::Complete { id, status });
        }
        self.evict_hot();
    }

    /// Drops least recently used idle hot regions beyond the limit. Lazy: the persisted bitmap
    /// keeps them until the next persist, which only costs an extra copy after a crash.
    fn evict_hot(&mut self) {
        if self.hot.len() <= self.config.hot_regions_max {
            return;
        }
        let flushing: BTreeSet<u64> = self
            .ops
            .values()
            .flat_map(|op| op.flush_regions.iter().copied())
            .collect();
        let mut idle: Vec<(u64, u64)> = self
            .hot
            .iter()
            .filter(|(region, _)| {
                !self.intent.is_active(**region)
                    && !self.unflushed.contains(region)
                    && !flushing.contains(region)
            })
            .map(|(region, used)| (*used, *region))
            .collect();
        idle.sort_unstable();
        let excess = self.hot.len() - self.config.hot_regions_max;
        for (_, region) in idle.into_iter().take(excess) {
            self.hot.remove(&region);
        }
    }
}
