//! Synchronous replication to the peer (DRBD's protocol C; ARCHITECTURE.md sections 3-4).
//!
//! Primary: each core hands every write, zeroing and flush to its own link (a writer and a
//! reader thread around one TCP connection to the peer), and the write completes only when
//! the local I/O and the peer's ack are both done. The link thread answers over a crossbeam
//! channel and wakes the core through an eventfd read the core keeps in its io_uring.
//! When the peer stops answering for `replica_timeout_ms`, every LUN is marked "peer
//! outdated" with a bumped generation id and a dirty bitmap covering every unacknowledged
//! write, persisted before any write is completed without the peer (`degrade`), or I/O
//! stays frozen until the peer returns or an operator outdates it (`suspend`). A manager
//! thread reconnects, decides the resync direction from the generation ids, copies the
//! dirty regions (each under the LUN's range lock, so no write to it runs meanwhile), and
//! resumes mirroring.
//!
//! Secondary: an apply server takes the link, authenticates it with the pre-shared key, and
//! applies writes with positioned I/O straight from its receive buffer, acking every
//! `ACK_BATCH` messages or before it would block (after fdatasync for FUA and flush).
//! Link threads of core k on either node keep off core k's CPU (affinity.rs).
//!
//! Write intents: before a write is issued, its regions are in the persisted metadata
//! (intent.rs; `keep_intents` writes it), so a crashed primary's resync covers exactly them.
//!
//! Not yet here (docs/limitations.md): the rejoining crashed primary's log is not sent to the
//! new primary (that resync compares every region), and the secondary applies with one
//! blocking thread per link rather than on its io_uring cores.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rand::RngCore;
use replica::auth::{Role as AuthRole, Transcript};
use replica::intent::IntentLog;
use replica::meta::Meta;
use replica::pair::{
    Admit, ApplyGate, LinkShard, Marker, Mirror, NewTerm, PairLun, PeerLossPolicy, Pending,
    Persist, PlanRefusal, Port, ResyncPlan, SourceRun, SourceStep, SourceTimers, StartNote,
    SyncState,
};
use replica::wire::{self, AckStatus, Frame, LunHello, Message, LINK_NONE};

use crate::config::{OnPeerLoss, PeerConfig, Role};
use crate::registry::Registry;
pub use snapshots::SnapLink;

mod apply;
mod failover_view;
mod intents;
mod link_io;
mod meta_file;
mod mirror;
mod reconfig;
mod resync;
mod roles;
mod snapshots;
mod status;
pub use status::{PairFigures, PairLunFigures};
mod verify;

use link_io::*;
use meta_file::*;
use resync::allocated_regions;

/// A mirrored write's bytes.
#[derive(Debug)]
pub enum RepData {
    /// A copy: the task's buffer may change before the ack (WRITE SAME fills it chunk by
    /// chunk, EXTENDED COPY reads the next chunk into it).
    Copied(Vec<u8>),
    /// The issuing task's own buffer, framed by the link writer without a copy. Why: the
    /// copy (and its allocation and cross-thread free) was a tenth of the primary core
    /// thread's time at 4 KiB and queue depth 32 (perf, 2026-12-02).
    Lent(LentBytes),
}

/// Bytes the core lends to its link writer: a pointer into a task's buffer.
///
/// The contract, from [`LentBytes::new`]: the bytes stay allocated and unchanged until
/// the core has received the request's [`RepDone`] (the task keeps its buffer while
/// `rep_inflight > 0`, the connection slot stays while any task has a mirror in flight,
/// and the reactor leaks its buffers rather than free them if it is torn down with
/// mirrors in flight). Only the link writer reads them, and only before it records the
/// request as pending (`to_frame`), which is before anyone can answer it: an ack needs
/// the frame sent, and peer loss answers only what is recorded pending; requests the
/// writer drops unread (degraded) are answered after it let go of them.
pub struct LentBytes {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

impl std::fmt::Debug for LentBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LentBytes({} bytes)", self.len)
    }
}

// SAFETY: the pointer is read on one other thread (the link writer) under the contract
// above, which keeps the bytes alive and unchanged meanwhile; nothing writes through it.
unsafe impl Send for LentBytes {}

impl LentBytes {
    /// # Safety
    /// `bytes` must stay allocated and unchanged until the core receives the [`RepDone`]
    /// of the request that carries them (see the type's contract).
    pub unsafe fn new(bytes: &[u8]) -> LentBytes {
        LentBytes {
            ptr: std::ptr::NonNull::from(bytes).cast(),
            len: bytes.len(),
        }
    }
}

impl RepData {
    pub fn len(&self) -> usize {
        match self {
            RepData::Copied(v) => v.len(),
            RepData::Lent(l) => l.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// # Safety
    /// For [`RepData::Lent`]: only on the link writer, before the request is recorded as
    /// pending (the contract of [`LentBytes`]).
    unsafe fn bytes(&self) -> &[u8] {
        match self {
            RepData::Copied(v) => v,
            // SAFETY: the caller reads before the request can be answered, and the core
            // keeps the bytes allocated and unchanged until then (LentBytes::new).
            RepData::Lent(l) => unsafe { std::slice::from_raw_parts(l.ptr.as_ptr(), l.len) },
        }
    }
}

/// One mirrored operation.
#[derive(Debug)]
pub enum RepOp {
    Write {
        offset: u64,
        data: RepData,
        fua: bool,
    },
    Zero {
        offset: u64,
        len: u64,
        unmap: bool,
    },
    Flush,
    /// The LUN's persistent reservation state changed (encoded `PrState`, and its
    /// `Lun::pr_snapshot` version).
    PrState {
        state: Vec<u8>,
        version: u64,
    },
}

/// A core's request: `token` names the task (slot and task index) for the answer.
#[derive(Debug)]
pub struct RepReq {
    pub token: u64,
    pub lun: usize,
    pub op: RepOp,
}

/// The answer: `ok` is false only when the operation must fail (the peer failed it while
/// connected; a lost peer is handled by degrading, which answers ok).
#[derive(Debug, Clone, Copy)]
pub struct RepDone {
    pub token: u64,
    pub ok: bool,
}

/// What a core keeps: where to send requests, where answers come back, and the eventfd
/// that wakes its ring when answers are waiting.
pub struct CoreLink {
    pub req_tx: Sender<RepReq>,
    pub done_rx: Receiver<RepDone>,
    pub bell: Arc<crate::net::doorbell::Doorbell>,
}

pub struct RepLun {
    pub key: u64,
    /// The LUN's size: the peer's must be the same, and nothing is applied beyond it. It
    /// grows online ([`Replication::grow_lun`]).
    size_bytes: AtomicU64,
    /// Bytes per bitmap region (fixed when the metadata was created).
    region_bytes: u64,
    /// The pair record: metadata, sync state, resync progress. Every decision about it is
    /// `replica::pair`'s; this driver persists what it says and carries out the I/O.
    pub pair: Mutex<PairLun>,
    meta_path: PathBuf,
    /// Read-only (a snapshot export): never persisted, never replicated.
    local_only: bool,
    backing: PathBuf,
    /// Regions writes may be issued to (`replica::intent`); persisted with every metadata
    /// write. Replaced by a larger one when the LUN grows ([`Replication::grow_lun`]), with
    /// no write in flight.
    intent: arc_swap::ArcSwap<IntentLog>,
    /// On a secondary: the (origin, version) of the reservation state applied last.
    pr_applied: Mutex<(u64, u64)>,
    /// The LUN's allocation map (disk/alloc_map.rs): what the apply writes and punches
    /// keeps it current here too, so that reads after a promotion never take data for holes.
    alloc: Arc<crate::disk::alloc_map::AllocMap>,
    /// When (ms since `Replication::epoch`, never 0) the write-intent log first failed to
    /// persist, 0 while it persists; and that failure's errno.
    intent_failing_since_ms: AtomicU64,
    intent_errno: std::sync::atomic::AtomicI32,
    /// Bytes of data resyncs copied to the peer from this node, ever (holes count nothing):
    /// `twinsan_pair_resync_copied_bytes_total`, whose rate is the resync's.
    resync_copied_bytes: AtomicU64,
    /// The LUN's range lock: what the apply side writes is noted there while a snapshot's
    /// clone is staged (snapshot/staging.rs), as the primary's writes are by their guards.
    ranges: Arc<crate::disk::range_lock::RangeLock>,
    block_bytes: u64,
}

/// The replicated LUNs, at their registry slots (a LUN's index here is its slot there):
/// filled at start and by reloads that add LUNs, in slot order, never emptied (a removed
/// LUN keeps its record, unused). Why slots and not a Vec behind a lock: the cores, the link
/// threads and the apply side index it on every mirrored write.
pub struct RepLuns {
    slots: Box<[std::sync::OnceLock<RepLun>]>,
    /// Slots filled: `0..len`, contiguous.
    len: AtomicUsize,
}

impl RepLuns {
    fn new() -> RepLuns {
        RepLuns {
            slots: (0..crate::registry::MAX_LUNS)
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            len: AtomicUsize::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, index: usize) -> Option<&RepLun> {
        if index >= self.len() {
            return None;
        }
        self.slots.get(index)?.get()
    }

    pub fn iter(&self) -> impl Iterator<Item = &RepLun> {
        self.into_iter()
    }

    /// Fills slot `index`, which must be the next one (the registry's slot of the same LUN).
    fn install(&self, index: usize, l: RepLun) -> std::io::Result<()> {
        // One installer at a time: the start, then reloads under the registry's reload lock.
        if index != self.len() {
            return Err(std::io::Error::other(format!(
                "replication slot {index} is not the next one ({}): the registry and the replication disagree",
                self.len()
            )));
        }
        let Some(slot) = self.slots.get(index) else {
            return Err(std::io::Error::other(format!(
                "more than {} replicated LUNs",
                crate::registry::MAX_LUNS
            )));
        };
        slot.set(l)
            .map_err(|_| std::io::Error::other(format!("replication slot {index} is taken")))?;
        self.len.store(index + 1, Ordering::Release);
        Ok(())
    }
}

impl std::ops::Index<usize> for RepLuns {
    type Output = RepLun;
    fn index(&self, index: usize) -> &RepLun {
        match self.get(index) {
            Some(l) => l,
            None => panic!("replicated LUN {index} of {} indexed", self.len()),
        }
    }
}

impl<'a> IntoIterator for &'a RepLuns {
    type Item = &'a RepLun;
    type IntoIter = std::iter::FilterMap<
        std::slice::Iter<'a, std::sync::OnceLock<RepLun>>,
        fn(&'a std::sync::OnceLock<RepLun>) -> Option<&'a RepLun>,
    >;
    /// The filled slots, without an allocation (the intent keeper walks them every poll).
    fn into_iter(self) -> Self::IntoIter {
        let len = self.len();
        self.slots[..len]
            .iter()
            .filter_map(std::sync::OnceLock::get)
    }
}

impl RepLun {
    /// The replication metadata `lun` opens with, read from its file or new (created for
    /// a LUN never replicated before, with regions of `region_bytes`), grown to the LUN's
    /// size if the LUN grew meanwhile; and whether it grew. Writes nothing.
    fn load_meta(lun: &crate::lun::Lun, region_bytes: u64) -> std::io::Result<(Meta, bool)> {
        let meta_path = Meta::path_for(&lun.path);
        let mut meta = match std::fs::read(&meta_path) {
            Ok(b) => Meta::decode(&b)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", meta_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Meta::new(lun.naa_id, lun.size_bytes(), region_bytes)
                    .map_err(|e| std::io::Error::other(e.to_string()))?
            }
            Err(e) => return Err(e),
        };
        if meta.lun_key != lun.naa_id || meta.size_bytes > lun.size_bytes() {
            return Err(std::io::Error::other(format!(
                "{}: metadata belongs to another LUN or a larger size ({} bytes, the LUN has {})",
                meta_path.display(),
                meta.size_bytes,
                lun.size_bytes()
            )));
        }
        // A LUN grown while this node was down (or stopped between growing its file and
        // its metadata): the new space is a hole, nothing in it is out of sync.
        let grown = meta.size_bytes < lun.size_bytes();
        if grown {
            meta.grow(lun.size_bytes())
                .map_err(|e| std::io::Error::other(format!("{}: {e}", meta_path.display())))?;
        }
        Ok((meta, grown))
    }

    /// Loads (or creates) the replication metadata of `lun` for a node in role `primary`,
    /// and marks the LUN running (the crash check of the next start). `region_bytes`: the
    /// region size of metadata created now.
    fn open(lun: &crate::lun::Lun, region_bytes: u64, primary: bool) -> std::io::Result<RepLun> {
        let meta_path = Meta::path_for(&lun.path);
        let (meta, grown) = Self::load_meta(lun, region_bytes)?;
        let marker = running_marker(&lun.path);
        let marker_state = match (marker.exists(), same_boot(&marker)) {
            (false, _) => Marker::Absent,
            (true, true) => Marker::SameBoot,
            (true, false) => Marker::OtherBoot,
        };
        let (pair, persist, note) = PairLun::open(meta, marker_state, primary, |per| {
            allocated_regions(lun, per)
        });
        let path = lun.path.display();
        let rebooted = matches!(
            note,
            StartNote::UncleanLogged { rebooted: true, .. }
                | StartNote::UncleanUnlogged { rebooted: true, .. }
        );
        if rebooted {
            tracing::warn!(path = %path, "the machine restarted since this LUN was last open: every region will be resynced");
        }
        match note {
            StartNote::Clean => {}
            StartNote::UncleanLogged { regions, .. } => {
                tracing::warn!(path = %path, regions, "unclean shutdown: the write-intent regions will be resynced");
            }
            StartNote::UncleanUnlogged { regions, .. } => {
                tracing::warn!(path = %path, regions, "unclean shutdown without a write-intent log: allocated regions marked for resync");
            }
        }
        // A read-only LUN (a snapshot export) is not replicated (`Replication::unreplicated`):
        // its record stays in memory, and nothing is written beside the clone it serves.
        let local_only = lun.read_only;
        if (persist.needed() || grown) && !local_only {
            write_meta(&meta_path, pair.meta())?;
        }
        if !local_only {
            let mut f = File::create(&marker)?;
            f.write_all(boot_id().as_bytes())?;
            f.sync_all()?;
        }
        let region_bytes = pair.region_bytes();
        Ok(RepLun {
            size_bytes: AtomicU64::new(lun.size_bytes()),
            region_bytes,
            intent: arc_swap::ArcSwap::from_pointee(IntentLog::new(lun.size_bytes(), region_bytes)),
            pr_applied: Mutex::new((0, 0)),
            alloc: Arc::clone(&lun.alloc),
            intent_failing_since_ms: AtomicU64::new(0),
            intent_errno: std::sync::atomic::AtomicI32::new(0),
            resync_copied_bytes: AtomicU64::new(0),
            ranges: Arc::clone(&lun.ranges),
            block_bytes: u64::from(lun.block_size).max(1),
            key: lun.naa_id,
            pair: Mutex::new(pair),
            meta_path,
            backing: lun.path.clone(),
            local_only,
        })
    }

    /// The LUN's size now (it grows online).
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    /// The pair record, locked (a panic elsewhere does not make it unreadable).
    pub fn pair(&self) -> std::sync::MutexGuard<'_, PairLun> {
        self.pair.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> SyncState {
        self.pair().state()
    }

    /// Bytes per bitmap region.
    fn region_bytes(&self) -> u64 {
        self.region_bytes
    }

    /// Persists the record with every durable write-intent region set in the bitmap on disk.
    fn persist(&self, p: &mut PairLun) -> std::io::Result<()> {
        self.persist_with(p, &self.intent.load().durable_regions())
    }

    /// Persists the record with `regions` also set in the bitmap on disk (the memory copy
    /// keeps only what is really out of sync).
    fn persist_with(&self, p: &mut PairLun, regions: &[u64]) -> std::io::Result<()> {
        if !self.local_only {
            write_meta(&self.meta_path, &p.meta_for_disk(regions))?;
        }
        p.mark_persisted();
        Ok(())
    }

    /// Records `regions` out of sync, persisted before it returns: the next resync copies
    /// them (verify's repair, a rollback the peer did not follow).
    fn mark_out_of_sync(&self, regions: impl IntoIterator<Item = u64>) -> std::io::Result<()> {
        let mut p = self.pair();
        let persist = p.mark_regions(regions);
        self.persist_if(&mut p, persist)
    }

    /// Persists the record if `persist` says so.
    fn persist_if(&self, p: &mut PairLun, persist: Persist) -> std::io::Result<()> {
        if persist.needed() {
            self.persist(p)
        } else {
            Ok(())
        }
    }
}

struct LinkShared {
    /// What this link sent that the peer has not acknowledged (its own lock: acks on one
    /// link never wait for another).
    pending: Mutex<LinkShard>,
    done_tx: Sender<RepDone>,
    bell: Arc<crate::net::doorbell::Doorbell>,
    /// Set when the link must drop its connection (peer declared lost).
    reset: AtomicBool,
    /// From a mirrored operation's send to the peer's ack, recorded by the link's reader
    /// (`twinsan_pair_replica_ack_seconds`): the core threads never touch it.
    ack_latency: crate::metrics::Histogram,
}

pub struct Replication {
    cfg: PeerConfig,
    node_id: String,
    reg: std::sync::Weak<Registry>,
    pub luns: RepLuns,
    /// `mirror.mirroring()`, readable without the lock (the link writer's fast path).
    peer_up: AtomicBool,
    links: Vec<LinkShared>,
    /// The pair-wide coordinator (`replica::pair::Mirror`): its lock serializes the
    /// peer-loss transition, recording writes made alone, and the resync switch-over.
    mirror: Mutex<Mirror>,
    /// Control connections open from a peer that is primary (on a secondary): promoting
    /// this node meanwhile would make two primaries.
    primary_links: AtomicUsize,
    epoch: Instant,
    next_seq: AtomicU64,
    /// The CPU each core thread is pinned to (empty when unknown): link threads keep off it.
    core_cpus: Vec<usize>,
    /// Set (and `intent_cv` notified) when a writer wants write-intent regions persisted.
    intent_asked: Mutex<bool>,
    intent_cv: std::sync::Condvar,
    /// Why this node started in another role than its configuration says (for `status`).
    start_note: Mutex<Option<String>>,
    /// Set while this node is (or is becoming) primary: the apply side takes no more
    /// messages from a peer that still thinks it is primary (its links may outlive our
    /// promotion: `promote --force`, a healed partition).
    apply_fenced: AtomicBool,
    /// Messages being applied right now (a promotion waits for them).
    applying: AtomicUsize,
    /// The replica protocol version of a peer that speaks another one than ours (0: none
    /// seen since the last successful handshake): logged once, shown by `status`.
    peer_wire_version: AtomicU8,
    /// On a secondary: replica connections in accept order, and which may still apply
    /// (`replica::pair::ApplyGate`). Each message is applied under the read lock, so
    /// raising the gate (`supersede_older`) waits for the ones being applied.
    apply_gate: std::sync::RwLock<ApplyGate>,
    /// This process's instance id, the `origin` of the reservation snapshots it sends.
    instance: u64,
    /// Writes made without the peer are answered only before this (`boot_clock_ms`): the
    /// failover lease's end, set by the failover driver; no end without failover.
    alone_until_ms: AtomicU64,
    /// The `twinsan verify` running now, for `status` (one at a time).
    verify_run: Mutex<Option<Arc<verify::VerifyRun>>>,
}

/// The coordinator's view of this driver: the LUN records behind their locks and files,
/// the links' shards, their reset flags and answer channels.
struct EnginePort<'a> {
    rep: &'a Replication,
}

impl Port for EnginePort<'_> {
    fn lun_count(&self) -> usize {
        self.rep.luns.len()
    }

    fn update_lun(&mut self, i: usize, f: &mut dyn FnMut(&mut PairLun) -> Persist) -> bool {
        let Some(l) = self.rep.luns.get(i) else {
            return false;
        };
        let mut p = l.pair();
        let persist = f(&mut p);
        match l.persist_if(&mut p, persist) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(lun = l.key, error = %e, "cannot persist the replication metadata");
                false
            }
        }
    }

    fn drain_links(&mut self) -> Vec<(usize, Pending)> {
        let mut waiting = Vec::new();
        for (core, l) in self.rep.links.iter().enumerate() {
            let drained = l.pending.lock().unwrap_or_else(|p| p.into_inner()).drain();
            waiting.extend(drained.into_iter().map(|p| (core, p)));
        }
        waiting
    }

    fn links_idle(&mut self) -> bool {
        self.rep.links.iter().all(|l| {
            l.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
        })
    }

    fn reset_links(&mut self) {
        for l in &self.rep.links {
            l.reset.store(true, Ordering::Release);
        }
    }

    fn answer(&mut self, core: usize, token: u64, ok: bool) {
        if let Some(l) = self.rep.links.get(core) {
            let _ = l.done_tx.send(RepDone { token, ok });
            l.bell.ring();
        }
    }

    fn random(&mut self) -> [u8; 8] {
        random8()
    }

    fn alone_until_ms(&self) -> u64 {
        self.rep.alone_until_ms.load(Ordering::Acquire)
    }

    fn now_ms(&self) -> u64 {
        crate::failover::boot_clock_ms()
    }
}

/// Write-intent regions no write touched for this long are forgotten (persisted as clean),
/// so a crash resyncs what was recently written, not everything ever written.
const INTENT_COOL_MS: u64 = 5000;

/// The keeper's longest sleep when nobody asks (retries a failed persist at this period).
const INTENT_POLL_MS: u64 = 100;

/// How long a write waits for its write-intent record while the metadata cannot be
/// written before it fails (write_intent_ready): well inside an initiator's command
/// timeout (ESXi's ATS heartbeat gives up after 8 s).
const INTENT_PERSIST_WAIT_MS: u64 = 2000;

/// Bytes of queued requests one link write may carry.
const LINK_BATCH_BYTES: usize = 1 << 20;

/// How long a link writer polls its empty queue (yielding the CPU to any other runnable
/// thread) before it blocks. Why: waking a blocked writer is a futex wake from the core
/// thread to another CPU, which on a virtual machine is an inter-processor interrupt and a
/// VM exit; `perf` put 7% of the primary's core thread in that one wake-up at 200K
/// mirrored writes per second, when the writer slept only a few microseconds at a time.
const LINK_POLL_US: u64 = 50;

/// How long a link send waits without progress before the writer looks at the ack
/// deadlines (`replica_timeout_ms`, at least 100 ms) again.
const SEND_POLL: Duration = Duration::from_millis(50);

/// How often the manager looks for a lost peer to reconnect and resync.
const RECONNECT_MS: u64 = 500;

/// The longest wait between resync attempts that keep failing.
const RESYNC_RETRY_MAX_MS: u64 = 30_000;

/// How often the primary pings an idle peer (the watch after a resync round).
const PING_INTERVAL: Duration = Duration::from_millis(500);

/// How long `promote` waits for the control connection of a peer that just went away or
/// was demoted to close (a demoted primary notices within one PING_INTERVAL).
const PROMOTE_WAIT: Duration = Duration::from_millis(2000);

/// How often a resync tells the sync target how far it has come.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Largest data per resync message.
const RESYNC_CHUNK_BYTES: usize = 1 << 20;

/// The first bytes of a resync, always sent as data (see `SourceRun::begin`).
const HEAD_CHUNK_BYTES: u64 = 4096;

/// Frames we read at most while waiting for one (handshake): bounds a hostile peer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for one answer on the control connection (link_io.rs `bound_control_waits`):
/// above the slowest honest answer, a resync's final flush of the target's dirty page cache
/// (bounded by the kernel's dirty limit: seconds to tens of seconds on a slow disk).
const CONTROL_ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

fn now_ms(epoch: &Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

fn random8() -> [u8; 8] {
    let mut b = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

/// The raw fd of a core's eventfd, for its io_uring read.
pub fn efd_raw(l: &CoreLink) -> RawFd {
    l.bell.raw_fd()
}

impl Replication {
    /// Loads (or creates) every LUN's replication metadata, starts the apply server, and
    /// returns one link per core for the reactors.
    pub fn start(
        reg: &Arc<Registry>,
        cores: usize,
        core_cpus: Vec<usize>,
    ) -> std::io::Result<(Arc<Replication>, Vec<CoreLink>)> {
        let cfg = reg
            .config
            .peer
            .clone()
            .ok_or_else(|| std::io::Error::other("no [peer] configured"))?;
        let node_id = format!("{}", cfg.listen);
        let luns = RepLuns::new();
        let primary = reg.role() == Role::Primary;
        for (i, lun) in reg.luns.iter().enumerate() {
            luns.install(i, RepLun::open(lun, cfg.region_bytes, primary)?)?;
        }
        let mut links = Vec::new();
        let mut core_links = Vec::new();
        let mut req_rxs = Vec::new();
        for _ in 0..cores {
            // Bounded by construction, not by the channel: a request is sent only for a
            // task in flight (at most one mirrored operation per task at a time, a task's
            // reply held until its answer), and a core holds at most MAX_CONNS_PER_CORE x
            // queue_depth tasks; each request gets exactly one answer. A channel bound
            // would add a failure mode and no limit: a full `done` channel would block the
            // link thread that answers under the coordinator's lock, while the core waits
            // for that lock (`diverged`): a deadlock; and crossbeam allocates a bounded
            // channel's slots up front (4096 x 1024 of them per core).
            let (req_tx, req_rx) = crossbeam_channel::unbounded();
            let (done_tx, done_rx) = crossbeam_channel::unbounded();
            let bell = Arc::new(crate::net::doorbell::Doorbell::new()?);
            links.push(LinkShared {
                pending: Mutex::new(LinkShard::default()),
                done_tx,
                bell: Arc::clone(&bell),
                reset: AtomicBool::new(false),
                ack_latency: Default::default(),
            });
            core_links.push(CoreLink {
                req_tx,
                done_rx,
                bell,
            });
            req_rxs.push(req_rx);
        }
        let policy = match cfg.on_peer_loss {
            OnPeerLoss::Degrade => PeerLossPolicy::Degrade,
            OnPeerLoss::Suspend => PeerLossPolicy::Suspend,
        };
        let rep = Arc::new(Replication {
            cfg,
            node_id,
            reg: Arc::downgrade(reg),
            luns,
            peer_up: AtomicBool::new(false),
            links,
            mirror: Mutex::new(Mirror::new(policy)),
            primary_links: AtomicUsize::new(0),
            epoch: Instant::now(),
            next_seq: AtomicU64::new(1),
            core_cpus,
            intent_asked: Mutex::new(false),
            intent_cv: std::sync::Condvar::new(),
            start_note: Mutex::new(None),
            apply_fenced: AtomicBool::new(reg.role() == Role::Primary),
            applying: AtomicUsize::new(0),
            peer_wire_version: AtomicU8::new(0),
            apply_gate: std::sync::RwLock::new(ApplyGate::default()),
            instance: u64::from_le_bytes(random8()),
            alone_until_ms: AtomicU64::new(u64::MAX),
            verify_run: Mutex::new(None),
        });
        if reg.role() == Role::Primary {
            rep.check_start_as_primary(reg);
        }
        // A primary that restarts finds its peer state on disk; until the manager has
        // spoken with the peer, writes are tracked in the bitmap (never acked unmirrored
        // unless the peer is recorded outdated: suspend otherwise).
        let listener = TcpListener::bind(rep.cfg.listen)?;
        {
            let rep = Arc::clone(&rep);
            std::thread::Builder::new()
                .name("twinsan-replica-server".into())
                .spawn(move || rep.serve(listener))?;
        }
        for (core, rx) in req_rxs.into_iter().enumerate() {
            let rep = Arc::clone(&rep);
            std::thread::Builder::new()
                .name(format!("twinsan-link{core}"))
                .spawn(move || rep.link_writer(core, rx))?;
        }
        {
            let rep = Arc::clone(&rep);
            std::thread::Builder::new()
                .name("twinsan-replica-manager".into())
                .spawn(move || rep.manage())?;
        }
        {
            let rep = Arc::clone(&rep);
            std::thread::Builder::new()
                .name("twinsan-intent".into())
                .spawn(move || rep.keep_intents())?;
        }
        Ok((rep, core_links))
    }

    /// Runs `f` on the coordinator, under its lock, with this driver as its port; keeps
    /// `peer_up` equal to its view.
    fn with_mirror<R>(&self, f: impl FnOnce(&mut Mirror, &mut dyn Port) -> R) -> R {
        let mut m = self.mirror.lock().unwrap_or_else(|p| p.into_inner());
        let r = f(&mut m, &mut EnginePort { rep: self });
        // Written only when it changes: the link writers read it on every batch, and a
        // store per batch would move its cache line between their CPUs.
        if self.peer_up.load(Ordering::Relaxed) != m.mirroring() {
            self.peer_up.store(m.mirroring(), Ordering::Release);
        }
        r
    }

    fn registry(&self) -> Option<Arc<Registry>> {
        self.reg.upgrade()
    }

    fn is_primary(&self) -> bool {
        self.registry().is_some_and(|r| r.role() == Role::Primary)
    }

    /// Moves the calling link thread off the CPU of the core thread it works for
    /// (affinity.rs says why).
    fn keep_off_core(&self, core: usize) {
        if let Some(&cpu) = self.core_cpus.get(core) {
            if let Err(e) = crate::net::affinity::keep_off_cpu(cpu) {
                tracing::debug!(core, cpu, error = %e, "link thread placement failed");
            }
        }
    }

    fn lun_by_key(&self, key: u64) -> Option<usize> {
        self.luns.iter().position(|l| l.key == key)
    }
}
