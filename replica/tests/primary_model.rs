//! Deterministic simulation of the primary state machine against a fake engine, disk, metadata
//! store, network and secondary. Seeded RNG, simulated time, no threads.
//!
//! Invariants checked:
//! - no write completed Good is lost: at the end, every sector of both nodes holds the data of the
//!   last write completed Good over it, or of a later write that never completed Good (which may or
//!   may not have landed);
//! - after the final resync the two LUNs are byte-identical (also checked at quiet moments when a
//!   resync finishes);
//! - a Good completion without the peer's ack happens only under a persisted `peer_outdated` record
//!   covering the write, and never while frozen;
//! - after the secondary was promoted and wrote on its own (split brain), the primary never accepts
//!   it again, and when both sides moved on, `decide` says `SplitBrain`.
//!
//! `SIM_SEEDS` (default 2000), `SIM_SEED_BASE` (default 0) and `SIM_STEPS` (default 400) scale the
//! run; `SIM_SEED` runs one seed; `SIM_TRACE=1 SIM_REGION=n` traces the events touching region n.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use replica::genid::{decide, Decision, GenFlags, GenIds};
use replica::primary::{
    Action, Completion, OpId, PeerLossPolicy, Primary, PrimaryConfig, RefuseReason, RegionRead,
};
use replica::wire::{self, AckStatus, LunHello, Message};
use replica::Meta;

const REGION: u64 = 4096;
const REGIONS: u64 = 32;
const SIZE: u64 = REGION * REGIONS;
const SECTOR: u64 = 512;
const SECTORS: usize = (SIZE / SECTOR) as usize;
const LUN_KEY: u64 = 0xfeed;
const TIMEOUT_MS: u64 = 100;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Holder {
    Write(OpId),
    Region(u64),
}

struct WriteInfo {
    offset: u64,
    len: u64,
    value: u8,
    fua: bool,
}

enum LocalIo {
    Write(OpId),
    Flush(OpId),
}

struct Conn {
    to_peer: VecDeque<(u64, u64, Message)>,
    to_primary: VecDeque<(u64, u64, AckStatus)>,
    /// The peer stopped processing (hung): nothing is delivered until the connection is dropped.
    stalled: bool,
}

struct Secondary {
    durable: Vec<u8>,
    volatile: Vec<u8>,
    gen: GenIds,
    inconsistent: bool,
    up: bool,
    /// Promoted by an operator during a partition (split brain scenario).
    promoted: bool,
    still_primary: bool,
}

impl Secondary {
    fn hello(&self) -> LunHello {
        LunHello {
            lun_key: LUN_KEY,
            size_bytes: SIZE,
            region_bytes: REGION,
            gen: self.gen,
            flags: GenFlags {
                outdated: false,
                inconsistent: self.inconsistent,
                primary: self.still_primary,
                crashed: false,
            },
        }
    }

    fn apply(&mut self, msg: &Message, rng: &mut StdRng) -> AckStatus {
        match msg {
            Message::Write {
                offset_bytes,
                fua,
                data,
                ..
            } => {
                if rng.gen_bool(0.002) {
                    return AckStatus::IoError(5);
                }
                let range = *offset_bytes as usize..*offset_bytes as usize + data.len();
                self.volatile[range.clone()].copy_from_slice(data);
                if *fua {
                    self.durable[range].copy_from_slice(data);
                }
            }
            Message::WriteZeroes {
                offset_bytes,
                len_bytes,
                unmap,
                ..
            } => {
                assert!(*unmap);
                self.inconsistent = true;
                let range = *offset_bytes as usize..(*offset_bytes + *len_bytes) as usize;
                self.volatile[range.clone()].fill(0);
                self.durable[range].fill(0);
            }
            Message::ResyncData {
                offset_bytes, data, ..
            } => {
                // A resync target is inconsistent (durably) until ResyncDone.
                self.inconsistent = true;
                let range = *offset_bytes as usize..*offset_bytes as usize + data.len();
                self.volatile[range.clone()].copy_from_slice(data);
                self.durable[range].copy_from_slice(data);
            }
            Message::Flush { .. } => self.durable.copy_from_slice(&self.volatile),
            Message::ResyncDone { gen, .. } => {
                self.gen = *gen;
                self.inconsistent = false;
            }
            other => panic!("unexpected message to secondary: {other:?}"),
        }
        AckStatus::Ok
    }
}

struct Sim {
    seed: u64,
    rng: StdRng,
    now: u64,
    config: PrimaryConfig,
    primary: Primary,
    disk: Vec<u8>,
    meta_store: Meta,
    pending_persist: Option<(u64, Meta, u64)>,
    local_q: Vec<(u64, LocalIo)>,
    writes: BTreeMap<OpId, WriteInfo>,
    next_id: OpId,
    locks: Vec<(Holder, u64, u64)>,
    lock_waiters: VecDeque<(Holder, u64, u64)>,
    conn: Option<Conn>,
    secondary: Secondary,
    frozen: bool,
    seq_to_write: BTreeMap<u64, OpId>,
    peer_acked: BTreeSet<OpId>,
    allowed: Vec<Vec<u8>>,
    queue: VecDeque<Action>,
    // split brain bookkeeping
    split_brain: bool,
    primary_gen_at_partition: GenIds,
    split_detected: bool,
    stats: Stats,
}

#[derive(Default, Debug, Clone, Copy)]
struct Stats {
    good: u64,
    errors: u64,
    resyncs_finished: u64,
    identical_checks: u64,
    primary_crashes: u64,
    peer_crashes: u64,
    disconnects: u64,
    degrades: u64,
    split_brains: u64,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut config = PrimaryConfig::new(SIZE);
        config.region_bytes = REGION;
        config.replica_timeout_ms = TIMEOUT_MS;
        config.on_peer_loss = if rng.gen_bool(0.5) {
            PeerLossPolicy::Degrade
        } else {
            PeerLossPolicy::Suspend
        };
        config.hot_regions_max = rng.gen_range(0..6);
        config.resync_regions_inflight_max = rng.gen_range(1..4);
        config.resync_persist_every_regions = rng.gen_range(1..8);
        config.ops_inflight_max = 64;
        config.flush_interval_ms = rng.gen_range(20..200);
        let meta = Meta::new(LUN_KEY, SIZE, REGION).expect("meta");
        let primary = Primary::new(config.clone(), meta.clone(), rng.gen(), 0).expect("primary");
        Sim {
            seed,
            now: 0,
            config,
            primary,
            disk: vec![0; SIZE as usize],
            meta_store: meta,
            pending_persist: None,
            local_q: Vec::new(),
            writes: BTreeMap::new(),
            next_id: 1,
            locks: Vec::new(),
            lock_waiters: VecDeque::new(),
            conn: None,
            secondary: Secondary {
                durable: vec![0; SIZE as usize],
                volatile: vec![0; SIZE as usize],
                gen: GenIds::BLANK,
                inconsistent: false,
                up: true,
                promoted: false,
                still_primary: false,
            },
            frozen: false,
            seq_to_write: BTreeMap::new(),
            peer_acked: BTreeSet::new(),
            allowed: vec![vec![0]; SECTORS],
            queue: VecDeque::new(),
            split_brain: false,
            primary_gen_at_partition: GenIds::BLANK,
            split_detected: false,
            stats: Stats::default(),
            rng,
        }
    }

    fn trace(&self, what: impl FnOnce() -> String) {
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!("t={} {}", self.now, what());
        }
    }

    fn touches(offset: u64, len: u64) -> bool {
        let region: u64 = std::env::var("SIM_REGION")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX);
        offset / REGION <= region && region <= (offset + len - 1) / REGION
    }

    fn touch_region(&self) -> u64 {
        std::env::var("SIM_REGION")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn ctx(&self) -> String {
        format!("seed {} t={}ms", self.seed, self.now)
    }

    fn apply(&mut self, actions: Vec<Action>) {
        self.queue.extend(actions);
        while let Some(action) = self.queue.pop_front() {
            self.handle(action);
        }
        self.grant_locks();
    }

    fn send(&mut self, seq: u64, msg: Message) {
        // Every message goes through the real codec.
        let mut frame = Vec::new();
        wire::encode(&msg, seq, &mut frame);
        let (decoded, decoded_seq, used) =
            wire::decode_one(&frame).expect("decode").expect("complete");
        assert_eq!((decoded_seq, used), (seq, frame.len()));
        assert_eq!(decoded, msg);
        let due = self.now + self.rng.gen_range(0..4);
        if let Some(conn) = self.conn.as_mut() {
            let due = conn
                .to_peer
                .back()
                .map_or(due, |(last, _, _)| due.max(*last));
            conn.to_peer.push_back((due, seq, decoded));
        }
    }

    fn handle(&mut self, action: Action) {
        match &action {
            Action::ReplicateWrite {
                id,
                seq,
                offset_bytes,
                len_bytes,
                ..
            } if Self::touches(*offset_bytes, *len_bytes) => {
                self.trace(|| format!("replicate id={id} seq={seq} v={}", self.writes[id].value))
            }
            Action::Complete { id, status }
                if self
                    .writes
                    .get(id)
                    .is_some_and(|w| Self::touches(w.offset, w.len)) =>
            {
                self.trace(|| format!("complete id={id} {status:?} v={}", self.writes[id].value))
            }
            Action::SendToPeer {
                seq,
                msg: Message::ResyncData { offset_bytes, .. },
            } if Self::touches(*offset_bytes, 1) => self.trace(|| format!("resync-data seq={seq}")),
            Action::SendToPeer {
                seq,
                msg: Message::WriteZeroes { offset_bytes, .. },
            } if Self::touches(*offset_bytes, 1) => self.trace(|| format!("resync-zero seq={seq}")),
            Action::SendToPeer {
                msg: Message::ResyncDone { gen, .. },
                ..
            } => self.trace(|| format!("resync-done {gen:?}")),
            Action::PersistMeta { version, meta } => self.trace(|| {
                format!(
                    "persist v{version} gen={:?} flags={:?} dirty={}",
                    meta.gen,
                    meta.flags,
                    meta.bitmap.is_dirty(
                        std::env::var("SIM_REGION")
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0)
                    )
                )
            }),
            Action::Freeze
            | Action::Thaw
            | Action::DisconnectPeer
            | Action::PeerRefused { .. }
            | Action::StartResync { .. }
            | Action::ResyncFinished => self.trace(|| format!("{action:?}")),
            _ => {}
        }
        match action {
            Action::SubmitLocalWrite { id } => {
                let due = self.now + self.rng.gen_range(0..5);
                self.local_q.push((due, LocalIo::Write(id)));
            }
            Action::SubmitLocalFlush { id } => {
                let due = self.now + self.rng.gen_range(0..5);
                self.local_q.push((due, LocalIo::Flush(id)));
            }
            Action::ReplicateWrite {
                id,
                seq,
                lun_key,
                offset_bytes,
                len_bytes,
                fua,
            } => {
                let info = &self.writes[&id];
                assert_eq!(
                    (lun_key, offset_bytes, len_bytes, fua),
                    (LUN_KEY, info.offset, info.len, info.fua)
                );
                let data = vec![info.value; len_bytes as usize];
                self.seq_to_write.insert(seq, id);
                self.send(
                    seq,
                    Message::Write {
                        lun_key,
                        offset_bytes,
                        fua,
                        data,
                    },
                );
            }
            Action::SendToPeer { seq, msg } => self.send(seq, msg),
            Action::PersistMeta { version, meta } => {
                assert!(
                    self.pending_persist.is_none(),
                    "{}: two persists in flight",
                    self.ctx()
                );
                let mut bytes = Vec::new();
                meta.encode(&mut bytes);
                let decoded = Meta::decode(&bytes).expect("meta round trip");
                assert_eq!(decoded, meta);
                let due = self.now + self.rng.gen_range(0..8);
                self.pending_persist = Some((version, decoded, due));
            }
            Action::Complete { id, status } => self.complete(id, status),
            Action::Freeze => {
                assert!(!self.frozen);
                self.frozen = true;
            }
            Action::Thaw => {
                assert!(self.frozen);
                self.frozen = false;
            }
            Action::DisconnectPeer => {
                self.conn = None;
                self.stats.disconnects += 1;
            }
            Action::PeerRefused { reason } => {
                self.conn = None;
                assert!(self.split_brain, "{}: peer refused without a split brain: {reason:?} primary={:?} secondary={:?} incons={}", self.ctx(), self.primary.gen(), self.secondary.gen, self.secondary.inconsistent);
                self.split_detected = true;
                if self.primary.gen().current != self.primary_gen_at_partition.current
                    && self.secondary.gen.current != self.primary_gen_at_partition.current
                {
                    assert_eq!(
                        reason,
                        RefuseReason::Decision(Decision::SplitBrain),
                        "{}: both moved on but not a split brain",
                        self.ctx()
                    );
                    self.stats.split_brains += 1;
                }
            }
            Action::StartResync { .. } => {}
            Action::ReadRegionForResync {
                region,
                offset_bytes,
                len_bytes,
            } => {
                assert_eq!((offset_bytes, len_bytes), (region * REGION, REGION));
                self.lock_waiters.push_back((
                    Holder::Region(region),
                    offset_bytes,
                    offset_bytes + len_bytes,
                ));
            }
            Action::UnlockRegion { region } => self.unlock(Holder::Region(region)),
            Action::ResyncFinished => {
                self.stats.resyncs_finished += 1;
                self.check_identical_if_quiet();
            }
            Action::ResyncAborted { region } => {
                panic!("{}: resync aborted at {region}", self.ctx())
            }
        }
    }

    fn complete(&mut self, id: OpId, status: Completion) {
        let write = self.writes.remove(&id);
        let acked = self.peer_acked.remove(&id);
        if status == Completion::Good {
            self.stats.good += 1;
            // Flush acks are not tracked per id; the state machine asserts the same rule for them.
            if !acked && write.is_some() {
                let persisted = self.primary.persisted_meta();
                assert!(
                    persisted.flags.peer_outdated,
                    "{}: Good without ack or outdated record",
                    self.ctx()
                );
                if let Some(write) = &write {
                    assert!(
                        persisted.bitmap.covers(write.offset, write.len),
                        "{}: not covered",
                        self.ctx()
                    );
                }
                assert!(
                    !self.frozen,
                    "{}: Good without peer ack while frozen",
                    self.ctx()
                );
            }
        } else {
            self.stats.errors += 1;
        }
        if let Some(write) = write {
            self.unlock(Holder::Write(id));
            if status == Completion::Good {
                // Writes still queued or in flight over these sectors are ordered after this one (range
                // lock) and may still land.
                for sector in write.offset / SECTOR..(write.offset + write.len) / SECTOR {
                    let start = sector * SECTOR;
                    let mut allowed = vec![write.value];
                    allowed.extend(
                        self.writes
                            .values()
                            .filter(|other| {
                                other.offset <= start && start < other.offset + other.len
                            })
                            .map(|other| other.value),
                    );
                    self.allowed[sector as usize] = allowed;
                }
            }
        }
    }

    fn unlock(&mut self, holder: Holder) {
        let before = self.locks.len();
        self.locks.retain(|(held, _, _)| *held != holder);
        assert_eq!(
            before,
            self.locks.len() + 1,
            "{}: unlock of {holder:?} not held",
            self.ctx()
        );
    }

    /// FIFO range locks: a request is granted when it overlaps no held lock and no earlier waiter.
    fn grant_locks(&mut self) {
        loop {
            let mut granted = None;
            for (index, (_, start, end)) in self.lock_waiters.iter().enumerate() {
                let overlaps = |(_, s, e): &(Holder, u64, u64)| *s < *end && *start < *e;
                if !self.locks.iter().any(overlaps)
                    && !self.lock_waiters.iter().take(index).any(overlaps)
                {
                    granted = Some(index);
                    break;
                }
            }
            let Some(index) = granted else { return };
            let Some((holder, start, end)) = self.lock_waiters.remove(index) else {
                return;
            };
            self.locks.push((holder, start, end));
            let actions = match holder {
                Holder::Write(id) => {
                    let info = &self.writes[&id];
                    let (offset, len, fua) = (info.offset, info.len, info.fua);
                    self.primary
                        .submit_write(id, offset, len, fua, self.now)
                        .expect("submit")
                }
                Holder::Region(region) => {
                    let data = self.disk[start as usize..end as usize].to_vec();
                    let read = if data.iter().all(|byte| *byte == 0) && self.rng.gen_bool(0.5) {
                        RegionRead::Hole
                    } else {
                        RegionRead::Data(data)
                    };
                    self.primary.resync_region_read(region, read, self.now)
                }
            };
            self.queue.extend(actions);
            while let Some(action) = self.queue.pop_front() {
                self.handle(action);
            }
        }
    }

    fn new_write(&mut self) {
        let id = self.next_id;
        self.next_id += 1;
        let sectors = SIZE / SECTOR;
        let first = self.rng.gen_range(0..sectors);
        let count = self.rng.gen_range(1..=16).min(sectors - first);
        let value = self.rng.gen_range(1..=255u8);
        let fua = self.rng.gen_bool(0.2);
        let (offset, len) = (first * SECTOR, count * SECTOR);
        for sector in first..first + count {
            self.allowed[sector as usize].push(value);
        }
        self.writes.insert(
            id,
            WriteInfo {
                offset,
                len,
                value,
                fua,
            },
        );
        self.lock_waiters
            .push_back((Holder::Write(id), offset, offset + len));
        self.grant_locks();
    }

    fn new_flush(&mut self) {
        let id = self.next_id;
        self.next_id += 1;
        let actions = self.primary.submit_flush(id, self.now).expect("flush");
        self.apply(actions);
    }

    fn deliver(&mut self) {
        // Local I/O.
        let mut index = 0;
        while index < self.local_q.len() {
            if self.local_q[index].0 > self.now {
                index += 1;
                continue;
            }
            let (_, io) = self.local_q.remove(index);
            let (id, ok) = match io {
                LocalIo::Write(id) => {
                    let ok = !self.rng.gen_bool(0.003);
                    let info = &self.writes[&id];
                    if Self::touches(info.offset, info.len) {
                        self.trace(|| {
                            format!("local land id={id} ok={ok} v={}", self.writes[&id].value)
                        });
                    }
                    if ok {
                        let info = &self.writes[&id];
                        self.disk[info.offset as usize..(info.offset + info.len) as usize]
                            .fill(info.value);
                    }
                    (id, ok)
                }
                LocalIo::Flush(id) => (id, true),
            };
            let actions = self.primary.local_done(id, ok);
            self.apply(actions);
        }
        // Metadata.
        if self
            .pending_persist
            .as_ref()
            .is_some_and(|(_, _, due)| *due <= self.now)
        {
            if let Some((version, meta, _)) = self.pending_persist.take() {
                self.meta_store = meta;
                let actions = self.primary.persisted(version, self.now);
                self.apply(actions);
            }
        }
        // Network, primary → secondary (in order), and the secondary's acks.
        while let Some(conn) = self.conn.as_mut() {
            if conn.stalled || conn.to_peer.front().is_none_or_due(self.now) {
                break;
            }
            let Some((_, seq, msg)) = conn.to_peer.pop_front() else {
                break;
            };
            let status = self.secondary.apply(&msg, &mut self.rng);
            if let Message::Write {
                offset_bytes, data, ..
            } = &msg
            {
                if Self::touches(*offset_bytes, data.len() as u64) {
                    self.trace(|| format!("secondary applies seq={seq} v={}", data[0]));
                }
            }
            if let Message::ResyncData {
                offset_bytes, data, ..
            } = &msg
            {
                if Self::touches(*offset_bytes, data.len() as u64) {
                    self.trace(|| {
                        format!(
                            "secondary applies resync seq={seq} v={}",
                            data[(self.touch_region() * REGION - offset_bytes) as usize]
                        )
                    });
                }
            }
            let due = self.now + self.rng.gen_range(0..6);
            if let Some(conn) = self.conn.as_mut() {
                let due = conn
                    .to_primary
                    .back()
                    .map_or(due, |(last, _, _)| due.max(*last));
                conn.to_primary.push_back((due, seq, status));
            }
        }
        while let Some(conn) = self.conn.as_mut() {
            if conn.to_primary.front().is_none_or_due(self.now) {
                break;
            }
            let Some((_, seq, status)) = conn.to_primary.pop_front() else {
                break;
            };
            // The codec again, for acks.
            let mut frame = Vec::new();
            wire::encode(&Message::Ack { seq, status }, 0, &mut frame);
            let decoded = wire::decode_one(&frame)
                .expect("ack decode")
                .expect("complete");
            assert_eq!(decoded.0, Message::Ack { seq, status });
            if status == AckStatus::Ok {
                if let Some(id) = self.seq_to_write.remove(&seq) {
                    self.peer_acked.insert(id);
                }
            }
            let actions = self.primary.peer_ack(seq, status, self.now);
            self.apply(actions);
        }
    }

    fn connect(&mut self) {
        assert!(self.conn.is_none());
        self.secondary.up = true;
        self.conn = Some(Conn {
            to_peer: VecDeque::new(),
            to_primary: VecDeque::new(),
            stalled: false,
        });
        let hello = self.secondary.hello();
        // The secondary makes the same decision from its side; it must mirror ours.
        let ours = decide(
            &self.primary.gen(),
            self.primary.lun_hello().flags,
            &hello.gen,
            hello.flags,
        );
        let theirs = decide(
            &hello.gen,
            hello.flags,
            &self.primary.gen(),
            self.primary.lun_hello().flags,
        );
        match ours {
            Decision::InitialSync { .. } => assert_eq!(
                theirs,
                Decision::InitialSync {
                    source_is_local: false
                }
            ),
            other => assert_eq!(
                theirs,
                other.mirrored(),
                "{}: asymmetric decision",
                self.ctx()
            ),
        }
        self.trace(|| {
            format!(
                "connect ours={ours:?} primary={:?} secondary={:?}",
                self.primary.gen(),
                hello.gen
            )
        });
        let actions = self.primary.peer_connected(&hello, None, self.now);
        self.apply(actions);
        if self.split_brain && self.conn.is_some() {
            panic!("{}: split brain silently accepted ({ours:?})", self.ctx());
        }
    }

    fn disconnect(&mut self) {
        self.trace(|| "disconnect".into());
        self.conn = None;
        self.seq_to_write.clear();
        self.stats.disconnects += 1;
        let actions = self.primary.peer_disconnected(self.now);
        self.apply(actions);
    }

    fn crash_primary(&mut self) {
        self.trace(|| "CRASH primary".into());
        self.stats.primary_crashes += 1;
        // In-flight local writes may or may not have reached the disk.
        for (_, io) in std::mem::take(&mut self.local_q) {
            if let LocalIo::Write(id) = io {
                if self.rng.gen_bool(0.5) {
                    let info = &self.writes[&id];
                    self.disk[info.offset as usize..(info.offset + info.len) as usize]
                        .fill(info.value);
                }
            }
        }
        // A metadata write in flight may have been renamed into place or not.
        if let Some((_, meta, _)) = self.pending_persist.take() {
            if self.rng.gen_bool(0.5) {
                self.meta_store = meta;
            }
        }
        let meta = Meta::decode(&{
            let mut bytes = Vec::new();
            self.meta_store.encode(&mut bytes);
            bytes
        })
        .expect("meta");
        self.conn = None;
        self.writes.clear();
        self.locks.clear();
        self.lock_waiters.clear();
        self.seq_to_write.clear();
        self.peer_acked.clear();
        self.frozen = false;
        self.primary =
            Primary::new(self.config.clone(), meta, self.rng.gen(), self.now).expect("restart");
    }

    fn crash_peer(&mut self) {
        self.trace(|| "CRASH peer".into());
        self.stats.peer_crashes += 1;
        if self.conn.is_some() {
            self.disconnect();
        }
        self.secondary
            .volatile
            .copy_from_slice(&self.secondary.durable);
        self.secondary.up = false;
    }

    /// The operator promotes the secondary during a partition; it writes on its own.
    fn promote_secondary(&mut self) {
        if self.conn.is_some() {
            self.disconnect();
        }
        self.split_brain = true;
        self.primary_gen_at_partition = self.primary.gen();
        let mut random = [0u8; 8];
        self.rng.fill(&mut random);
        self.secondary.gen.bump(random);
        self.secondary.promoted = true;
        self.secondary.still_primary = self.rng.gen_bool(0.3);
        self.secondary.up = true;
        let offset = self.rng.gen_range(0..SIZE / SECTOR) * SECTOR;
        let value = self.rng.gen();
        self.secondary.volatile[offset as usize..(offset + SECTOR) as usize].fill(value);
        self.secondary
            .durable
            .copy_from_slice(&self.secondary.volatile);
    }

    fn quiet(&self) -> bool {
        self.primary.ops_in_flight() == 0
            && self.local_q.is_empty()
            && self.pending_persist.is_none()
            && self.locks.is_empty()
            && self.lock_waiters.is_empty()
            && self
                .conn
                .as_ref()
                .is_some_and(|conn| conn.to_peer.is_empty() && conn.to_primary.is_empty())
    }

    fn check_identical_if_quiet(&mut self) {
        if self.quiet() && !self.split_brain && self.primary.out_of_sync().dirty_count() == 0 {
            self.stats.identical_checks += 1;
            if let Some(offset) =
                (0..SIZE as usize).find(|i| self.disk[*i] != self.secondary.volatile[*i])
            {
                panic!("{}: LUNs differ at byte {offset} after resync", self.ctx());
            }
        }
    }

    fn step(&mut self, faults: bool) {
        self.now += self.rng.gen_range(0..=5);
        self.deliver();
        let roll: f64 = self.rng.gen();
        if !self.frozen
            && self.writes.len() < 16
            && roll < 0.4
            && !(self.split_brain && self.split_detected)
        {
            self.new_write();
        } else if roll < 0.43 && !self.frozen && !self.split_detected {
            self.new_flush();
        }
        if faults {
            let fault: f64 = self.rng.gen();
            let connected = self.conn.is_some();
            if connected && fault < 0.006 {
                self.disconnect();
            } else if connected && fault < 0.008 {
                if let Some(conn) = self.conn.as_mut() {
                    conn.stalled = true;
                }
            } else if fault < 0.0105 {
                self.crash_peer();
            } else if fault < 0.0125 {
                self.crash_primary();
            } else if !self.split_brain
                && !self.secondary.inconsistent
                && fault < 0.0130
                && self.rng.gen_bool(0.5)
            {
                self.promote_secondary();
            } else if self.frozen && fault < 0.03 {
                let actions = self.primary.operator_outdate_peer(self.now);
                self.stats.degrades += 1;
                self.apply(actions);
            }
        }
        if self.conn.is_none()
            && self.secondary.up
            && !self.split_detected
            && self.rng.gen_bool(0.03)
        {
            self.connect();
        }
        if self.conn.is_none() && !self.secondary.up && self.rng.gen_bool(0.02) {
            self.secondary.up = true;
        }
        let actions = self.primary.tick(self.now);
        self.apply(actions);
    }

    fn run(&mut self, steps: usize) {
        for _ in 0..steps {
            self.step(true);
        }
        // Quiesce: no new faults; reconnect and let everything settle.
        self.secondary.up = true;
        if self.split_brain && !self.split_detected && self.conn.is_none() {
            self.connect();
        }
        for _ in 0..20_000 {
            if self.split_detected {
                break;
            }
            if self.conn.is_none() {
                self.connect();
            }
            self.now += 1;
            self.deliver();
            let actions = self.primary.tick(self.now);
            self.apply(actions);
            if self.quiet()
                && !self.primary.is_resyncing()
                && self.primary.out_of_sync().dirty_count() == 0
            {
                break;
            }
        }
        self.check_final();
    }

    fn check_final(&mut self) {
        let check = |name: &str, data: &[u8], allowed: &[Vec<u8>], ctx: &str| {
            for (sector, values) in allowed.iter().enumerate() {
                let bytes = &data[sector * SECTOR as usize..(sector + 1) * SECTOR as usize];
                for byte in bytes {
                    assert!(
                        values.contains(byte),
                        "{ctx}: {name} sector {sector} holds {byte}, allowed {values:?}"
                    );
                }
            }
        };
        let ctx = self.ctx();
        check("primary", &self.disk, &self.allowed, &ctx);
        if self.split_brain {
            assert!(self.split_detected, "{ctx}: split brain never detected");
            return;
        }
        assert!(
            self.quiet(),
            "{ctx}: did not settle: ops={} local={} persist={:?} locks={:?} waiters={:?} conn={} frozen={} resyncing={} dirty={} primary={:?}",
            self.primary.ops_in_flight(),
            self.local_q.len(),
            self.pending_persist.as_ref().map(|p| p.0),
            self.locks,
            self.lock_waiters,
            self.conn.as_ref().map_or("none".to_string(), |c| format!("{}/{}/{}", c.to_peer.len(), c.to_primary.len(), c.stalled)),
            self.frozen,
            self.primary.is_resyncing(),
            self.primary.out_of_sync().dirty_count(),
            self.primary,
        );
        assert!(!self.frozen, "{ctx}: still frozen");
        assert!(
            !self.primary.is_resyncing() && self.primary.out_of_sync().dirty_count() == 0,
            "{ctx}: resync unfinished"
        );
        if let Some(offset) =
            (0..SIZE as usize).find(|i| self.disk[*i] != self.secondary.volatile[*i])
        {
            panic!(
                "{ctx}: LUNs differ after final resync at byte {offset} (region {}): primary {} secondary {} durable {}",
                offset as u64 / REGION,
                self.disk[offset],
                self.secondary.volatile[offset],
                self.secondary.durable[offset]
            );
        }
        check("secondary", &self.secondary.volatile, &self.allowed, &ctx);
        assert_eq!(
            self.secondary.gen,
            self.primary.gen(),
            "{ctx}: generations differ after resync"
        );
        self.stats.identical_checks += 1;
    }
}

trait DueExt {
    fn is_none_or_due(&self, now: u64) -> bool;
}

impl<T, U> DueExt for Option<&(u64, T, U)> {
    /// True when there is nothing to deliver yet (empty, or the front is not due).
    fn is_none_or_due(&self, now: u64) -> bool {
        match self {
            Some((due, _, _)) => *due > now,
            None => true,
        }
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[test]
fn simulation() {
    let steps = env("SIM_STEPS", 400) as usize;
    let seeds: Vec<u64> = match std::env::var("SIM_SEED")
        .ok()
        .and_then(|value| value.parse().ok())
    {
        Some(seed) => vec![seed],
        None => {
            let base = env("SIM_SEED_BASE", 0);
            (base..base + env("SIM_SEEDS", 2000)).collect()
        }
    };
    let mut total = Stats::default();
    for seed in &seeds {
        let mut sim = Sim::new(*seed);
        sim.run(steps);
        let stats = sim.stats;
        total.good += stats.good;
        total.errors += stats.errors;
        total.resyncs_finished += stats.resyncs_finished;
        total.identical_checks += stats.identical_checks;
        total.primary_crashes += stats.primary_crashes;
        total.peer_crashes += stats.peer_crashes;
        total.disconnects += stats.disconnects;
        total.degrades += stats.degrades;
        total.split_brains += stats.split_brains;
    }
    println!("{} seeds x {steps} steps: {total:?}", seeds.len());
    // The run must actually exercise the interesting paths.
    assert!(total.good > 0 && total.resyncs_finished > 0 && total.identical_checks > 0);
    if seeds.len() >= 500 {
        assert!(total.primary_crashes > 0 && total.peer_crashes > 0 && total.split_brains > 0);
    }
}
