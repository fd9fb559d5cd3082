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
use replica::genid::{decide, Decision, GenFlags};
use replica::meta::Meta;
use replica::wire::{self, AckStatus, Frame, LunHello, Message, LINK_NONE};

use crate::config::{OnPeerLoss, PeerConfig, Role};
use crate::intent::IntentLog;
use crate::registry::Registry;

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
    pub bell: Arc<crate::doorbell::Doorbell>,
}

/// Per-LUN synchronization state, for status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SyncState {
    UpToDate = 0,
    /// The peer is outdated: writes complete locally and are tracked in the bitmap.
    PeerOutdated = 1,
    SyncSource = 2,
    SyncTarget = 3,
    SplitBrain = 4,
    /// Suspended: I/O waits for the peer or for `twinsan outdate-peer`.
    Suspended = 5,
    /// The peer is unreachable and the data may be behind (secondary view).
    Unknown = 6,
}

impl SyncState {
    fn from_u8(v: u8) -> SyncState {
        match v {
            0 => SyncState::UpToDate,
            1 => SyncState::PeerOutdated,
            2 => SyncState::SyncSource,
            3 => SyncState::SyncTarget,
            4 => SyncState::SplitBrain,
            5 => SyncState::Suspended,
            _ => SyncState::Unknown,
        }
    }
}

pub struct RepLun {
    pub key: u64,
    /// The LUN's size: the peer's must be the same, and nothing is applied beyond it.
    size_bytes: u64,
    pub meta: Mutex<Meta>,
    meta_path: PathBuf,
    backing: PathBuf,
    state: AtomicU8,
    pub resync_total_bytes: AtomicU64,
    pub resync_done_bytes: AtomicU64,
    resync_started_ms: AtomicU64,
    /// On a sync target: the source's estimate of the time left (ResyncProgress).
    resync_eta_ms: AtomicU64,
    /// Regions writes may be issued to (intent.rs); persisted with every metadata write.
    intent: IntentLog,
    /// This node crashed under metadata without a write-intent log (an older version): the
    /// next resync must compare every region, as nothing names the in-flight ones.
    crash_unlogged: AtomicBool,
    /// On a secondary: the (origin, version) of the reservation state applied last.
    pr_applied: Mutex<(u64, u64)>,
    /// When (ms since `Replication::epoch`, never 0) the write-intent log first failed to
    /// persist, 0 while it persists; and that failure's errno.
    intent_failing_since_ms: AtomicU64,
    intent_errno: std::sync::atomic::AtomicI32,
}

impl RepLun {
    pub fn state(&self) -> SyncState {
        SyncState::from_u8(self.state.load(Ordering::Acquire))
    }
    fn set_state(&self, s: SyncState) {
        self.state.store(s as u8, Ordering::Release);
    }
    /// Bytes per bitmap region (fixed when the metadata was created).
    fn region_bytes(&self) -> u64 {
        self.meta
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .bitmap
            .region_bytes()
    }

    /// Persists `m` with every durable write-intent region set in the bitmap on disk.
    fn persist(&self, m: &Meta) -> std::io::Result<()> {
        self.persist_with(m, &self.intent.durable_regions())
    }

    /// Persists `m` with `regions` also set in the bitmap on disk (the memory copy keeps
    /// only what is really out of sync).
    fn persist_with(&self, m: &Meta, regions: &[u64]) -> std::io::Result<()> {
        let mut disk = m.clone();
        disk.flags.intent_log = true;
        for &r in regions {
            disk.bitmap.set(r);
        }
        write_meta(&self.meta_path, &disk)
    }
}

struct Pending {
    token: u64,
    lun: usize,
    offset: u64,
    len: u64,
    sent_ms: u64,
}

struct LinkShared {
    pending: Mutex<HashMap<u64, Pending>>,
    done_tx: Sender<RepDone>,
    bell: Arc<crate::doorbell::Doorbell>,
    /// Set when the link must drop its connection (peer declared lost).
    reset: AtomicBool,
}

pub struct Replication {
    cfg: PeerConfig,
    node_id: String,
    reg: std::sync::Weak<Registry>,
    pub luns: Vec<RepLun>,
    /// Writes are mirrored to the peer (false: peer lost, or resync not finished).
    peer_up: AtomicBool,
    links: Vec<LinkShared>,
    /// Serializes the peer-loss transition, degraded marking, and the resync switch-over.
    transition: Mutex<()>,
    /// Completions held back in `suspend` mode: (core, token).
    suspended: Mutex<Vec<(usize, u64)>>,
    outdate_requested: AtomicBool,
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
    /// On a secondary: the number of the last replica connection accepted. Accept order
    /// is the primary's connect order (it connects a resync's control connection, and
    /// only once that is authenticated its new data links).
    conn_ids: AtomicU64,
    /// On a secondary: connections numbered below this apply nothing more. Each message
    /// is applied under the read lock, so raising it (`supersede_older`) waits for the
    /// ones being applied.
    apply_gate: std::sync::RwLock<u64>,
    /// This process's instance id, the `origin` of the reservation snapshots it sends.
    instance: u64,
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

/// `recv_timeout`, after polling for up to [`LINK_POLL_US`] with `sched_yield` between
/// tries: a thread that shares its CPU with others (the secondary's apply thread on a
/// one-machine pair) lets them run, and one alone on its CPU spins briefly.
fn recv_polling<T>(
    rx: &Receiver<T>,
    timeout: Duration,
) -> Result<T, crossbeam_channel::RecvTimeoutError> {
    let start = Instant::now();
    loop {
        match rx.try_recv() {
            Ok(r) => return Ok(r),
            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                return Err(crossbeam_channel::RecvTimeoutError::Disconnected)
            }
            Err(crossbeam_channel::TryRecvError::Empty) => {}
        }
        if start.elapsed() >= Duration::from_micros(LINK_POLL_US) {
            return rx.recv_timeout(timeout);
        }
        std::thread::yield_now();
    }
}
/// How long a link send waits without progress before the writer looks at the ack
/// deadlines (`replica_timeout_ms`, at least 100 ms) again.
const SEND_POLL: Duration = Duration::from_millis(50);
/// How often the manager looks for a lost peer to reconnect and resync.
const RECONNECT_MS: u64 = 500;
/// The longest wait between resync attempts that keep failing.
const RESYNC_RETRY_MAX_MS: u64 = 30_000;
/// How often the primary pings an idle peer (watch_peer).
const PING_INTERVAL: Duration = Duration::from_millis(500);
/// How long `promote` waits for the control connection of a peer that just went away or
/// was demoted to close (a demoted primary notices within one PING_INTERVAL).
const PROMOTE_WAIT: Duration = Duration::from_millis(2000);
/// `ResyncProgress::eta_ms` when there is no estimate yet (nothing copied).
const ETA_UNKNOWN: u64 = u64::MAX;
/// How often a resync tells the sync target how far it has come.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Largest data per resync message.
const RESYNC_CHUNK_BYTES: usize = 1 << 20;
/// The first bytes of a resync, always sent as data (see `copy_all`).
const HEAD_CHUNK_BYTES: u64 = 4096;
/// Frames we read at most while waiting for one (handshake): bounds a hostile peer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Extra passes over regions dirtied again during a resync before it gives up (and retries
/// later): each pass is only what failed behind the last one.
const RESYNC_PASSES_MAX: u32 = 4;

fn now_ms(epoch: &Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

fn random8() -> [u8; 8] {
    let mut b = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

/// Writes one framed message.
fn send(stream: &mut TcpStream, msg: &Message, seq: u64, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.clear();
    wire::encode(msg, seq, buf);
    stream.write_all(buf)
}

/// Received replica-link bytes not yet decoded: buf[start..]. Why a start offset: a read
/// brings many messages (a batch of 4 KiB writes is 64 KiB), and removing each decoded
/// message from the front of a Vec moved the rest of the batch every time.
#[derive(Debug, Default)]
pub struct RxBuf {
    /// Zeroed once and reused: only buf[start..end] holds data.
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// The secondary sends its acks after at most this many applied messages (and always
/// before it would block for more). Why 16: each ack write on a one-machine pair also runs
/// the loopback delivery and wakes the primary's ack reader; 8 cost 12% of replicated 4 KiB
/// IOPS at queue depth 32 against 16 (2026-12-03, `ab` alternation, 8 runs each: 176K
/// against 197K, ratio to standalone 0.60 against 0.65), and the whole queue depth (32)
/// made the pair run in lock-step bursts (0.33-0.68).
const ACK_BATCH: usize = 16;

/// Bytes asked of the socket per read, at least.
const RX_READ_BYTES: usize = 256 << 10;

impl RxBuf {
    /// The next complete message, if one is buffered.
    fn next(&mut self) -> std::io::Result<Option<(Message, u64)>> {
        Ok(self.next_ref()?.map(|(frame, seq)| match frame {
            Frame::Write(w) => (
                Message::Write {
                    lun_key: w.lun_key,
                    offset_bytes: w.offset_bytes,
                    fua: w.fua,
                    data: w.data.to_vec(),
                },
                seq,
            ),
            Frame::Other(m) => (m, seq),
        }))
    }

    /// The next complete message, a write's data borrowed from the buffer.
    fn next_ref(&mut self) -> std::io::Result<Option<(Frame<'_>, u64)>> {
        match wire::decode_one_ref(&self.buf[self.start..self.end]) {
            Ok(Some((frame, seq, used))) => {
                self.start += used;
                if self.start == self.end {
                    // Nothing buffered after it: the next read may start at the front
                    // (the frame's bytes stay valid until then).
                    self.start = 0;
                    self.end = 0;
                }
                Ok(Some((frame, seq)))
            }
            Ok(None) => Ok(None),
            // The typed error rides along: the handshake tells a peer of another version
            // from a broken one (`note_wire_version`).
            Err(e) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
    }

    /// One blocking read from `stream`, straight into the buffer.
    fn fill(&mut self, stream: &mut impl Read) -> std::io::Result<()> {
        if self.buf.len() - self.end < RX_READ_BYTES {
            // Only the partial message after the decoded ones moves, then room is made
            // (a resync message can be larger than one read).
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() - self.end < RX_READ_BYTES {
                self.buf.resize(self.end + RX_READ_BYTES, 0);
            }
        }
        match stream.read(&mut self.buf[self.end..])? {
            0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                self.end += n;
                Ok(())
            }
        }
    }
}

/// Reads one framed message (blocking), with `rbuf` as carry-over between calls.
fn recv(stream: &mut TcpStream, rbuf: &mut RxBuf) -> std::io::Result<(Message, u64)> {
    loop {
        if let Some(m) = rbuf.next()? {
            return Ok(m);
        }
        rbuf.fill(stream)?;
    }
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
        let mut luns = Vec::new();
        for lun in &reg.luns {
            let meta_path = Meta::path_for(&lun.path);
            let meta = match std::fs::read(&meta_path) {
                Ok(b) => Meta::decode(&b)
                    .map_err(|e| std::io::Error::other(format!("{}: {e}", meta_path.display())))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Meta::new(lun.naa_id, lun.size_bytes, cfg.region_bytes)
                        .map_err(|e| std::io::Error::other(e.to_string()))?
                }
                Err(e) => return Err(e),
            };
            if meta.size_bytes != lun.size_bytes || meta.lun_key != lun.naa_id {
                return Err(std::io::Error::other(format!(
                    "{}: metadata belongs to another LUN or size",
                    meta_path.display()
                )));
            }
            let mut meta = meta;
            // A crash leaves the marker: writes in flight then (the unacknowledged tail) may
            // be on this node only. Without a persisted write-intent log, treat every
            // allocated region as possibly different, so the next resync covers the tail.
            let marker = running_marker(&lun.path);
            // The machine rebooted since (power loss, kernel crash), not just the process:
            // the page cache went with it, so writes acknowledged here (or mirrored here)
            // since the last flush may be missing anywhere, not only in the write-intent
            // regions. Only a copy of every region makes the two nodes equal again.
            let rebooted = marker.exists() && !same_boot(&marker);
            if rebooted {
                tracing::warn!(path = %lun.path.display(), "the machine restarted since this LUN was last open: every region will be resynced");
            }
            let crash_unlogged = marker.exists() && (!meta.flags.intent_log || rebooted);
            if marker.exists() && meta.flags.intent_log {
                // The bitmap on disk holds the write-intent regions: exactly where writes
                // may have been in flight. They stay set until a resync copies them.
                tracing::warn!(path = %lun.path.display(), regions = meta.bitmap.dirty_count(), "unclean shutdown: the write-intent regions will be resynced");
            } else if marker.exists() {
                let per = meta.bitmap.region_bytes();
                let regions = allocated_regions(lun, per);
                tracing::warn!(path = %lun.path.display(), regions = regions.len(), "unclean shutdown without a write-intent log: allocated regions marked for resync");
                for r in regions {
                    meta.bitmap.set(r);
                }
            }
            if marker.exists() {
                // This node may become the sync target (after a failover), and the peer
                // does not know our write-intent regions: tell it at the next connect, so
                // that its resync compares every region (see `resync`). As the sync source
                // our own bitmap suffices. A secondary originates no writes: what it applied
                // alone is in the primary's dirty bitmap already (an unacknowledged mirror
                // marks its region).
                meta.flags.crashed |= meta.flags.primary || rebooted;
            }
            // The role we start in, for the crash check above at the next start.
            let primary = reg.role() == Role::Primary;
            if marker.exists() || meta.flags.primary != primary || !meta.flags.intent_log {
                meta.flags.primary = primary;
                meta.flags.intent_log = true;
                write_meta(&meta_path, &meta)?;
            }
            {
                let mut f = File::create(&marker)?;
                f.write_all(boot_id().as_bytes())?;
                f.sync_all()?;
            }
            let state = if meta.flags.peer_outdated {
                SyncState::PeerOutdated
            } else {
                SyncState::Unknown
            };
            let intent = IntentLog::new(meta.size_bytes, meta.bitmap.region_bytes());
            luns.push(RepLun {
                size_bytes: lun.size_bytes,
                intent,
                crash_unlogged: AtomicBool::new(crash_unlogged),
                pr_applied: Mutex::new((0, 0)),
                intent_failing_since_ms: AtomicU64::new(0),
                intent_errno: std::sync::atomic::AtomicI32::new(0),
                key: lun.naa_id,
                meta: Mutex::new(meta),
                meta_path,
                backing: lun.path.clone(),
                state: AtomicU8::new(state as u8),
                resync_total_bytes: AtomicU64::new(0),
                resync_done_bytes: AtomicU64::new(0),
                resync_started_ms: AtomicU64::new(0),
                resync_eta_ms: AtomicU64::new(0),
            });
        }
        let mut links = Vec::new();
        let mut core_links = Vec::new();
        let mut req_rxs = Vec::new();
        for _ in 0..cores {
            let (req_tx, req_rx) = crossbeam_channel::unbounded();
            let (done_tx, done_rx) = crossbeam_channel::unbounded();
            let bell = Arc::new(crate::doorbell::Doorbell::new()?);
            links.push(LinkShared {
                pending: Mutex::new(HashMap::new()),
                done_tx,
                bell: Arc::clone(&bell),
                reset: AtomicBool::new(false),
            });
            core_links.push(CoreLink {
                req_tx,
                done_rx,
                bell,
            });
            req_rxs.push(req_rx);
        }
        let rep = Arc::new(Replication {
            cfg,
            node_id,
            reg: Arc::downgrade(reg),
            luns,
            peer_up: AtomicBool::new(false),
            links,
            transition: Mutex::new(()),
            suspended: Mutex::new(Vec::new()),
            outdate_requested: AtomicBool::new(false),
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
            conn_ids: AtomicU64::new(0),
            apply_gate: std::sync::RwLock::new(0),
            instance: u64::from_le_bytes(random8()),
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

    fn registry(&self) -> Option<Arc<Registry>> {
        self.reg.upgrade()
    }

    /// `role = "primary"` in the configuration is the role to start in, not an order to
    /// make a second primary: after a failover the old primary is typically restarted with
    /// its unchanged configuration while the peer serves as primary, with newer data. So,
    /// like `twinsan promote`, the start asks the peer first (before any initiator is
    /// served): if it answers as primary, this node starts as secondary and resyncs from
    /// it. A peer that does not answer (down, unreachable, wrong key) does not stop the
    /// start: then writes are tracked until it returns, as after any peer loss. Bounded by
    /// the connect timeout (`replica_timeout_ms`) and `HANDSHAKE_TIMEOUT`.
    fn check_start_as_primary(&self, reg: &Registry) {
        // Our own data first: a resync into this node that did not finish (or a
        // `resolve --discard-local`) left it unusable, whatever the peer says.
        let unusable = self.luns.iter().find(|l| {
            let m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
            m.flags.inconsistent || m.flags.outdated
        });
        let why = if let Some(l) = unusable {
            Some(format!(
                "configured primary, but lun {:016x} here holds outdated or inconsistent data \
                 (an unfinished resync into it): started as secondary; it resyncs from the \
                 peer (`twinsan promote --force` serves it anyway)",
                l.key
            ))
        } else {
            match self.connect(LINK_NONE) {
                Ok((_stream, _rbuf, hellos)) => self.peer_forbids_primary(&hellos),
                Err(e) => {
                    tracing::info!(peer = %self.cfg.address, error = %e, "peer not reachable at start: starting as primary");
                    None
                }
            }
        };
        let Some(why) = why else { return };
        tracing::error!("{why}");
        reg.set_role(Role::Secondary);
        // `set_role` records the role through `reg.replication`, which is not set yet.
        self.note_role(false);
        self.apply_fenced.store(false, Ordering::Release);
        *self.start_note.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// Why the peer that sent `hellos` at our start must stay the source: it is primary,
    /// or it holds newer data than ours for some LUN (it was promoted while we were away
    /// and restarted since as secondary).
    fn peer_forbids_primary(&self, hellos: &[LunHello]) -> Option<String> {
        let peer = format!("the peer {} ({})", self.cfg.name, self.cfg.address);
        if hellos.iter().any(|h| h.flags.primary) {
            return Some(format!(
                "configured primary, but {peer} is primary: started as secondary to avoid two \
                 primaries; this node resyncs from it (to switch over: `twinsan demote` there, \
                 then `twinsan promote` here)"
            ));
        }
        for l in &self.luns {
            let Some(h) = hellos.iter().find(|h| h.lun_key == l.key) else {
                continue;
            };
            let m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
            let ours = GenFlags {
                outdated: m.flags.outdated,
                inconsistent: m.flags.inconsistent,
                primary: true,
                crashed: m.flags.crashed,
            };
            let d = decide(&m.gen, ours, &h.gen, h.flags);
            if matches!(
                d,
                Decision::SyncTargetBitmap | Decision::SyncTargetFull | Decision::SplitBrain
            ) {
                return Some(format!(
                    "configured primary, but {peer} holds newer data for lun {:016x} ({d:?}): \
                     started as secondary; promote it, or `twinsan promote` here once the \
                     data is settled",
                    l.key
                ));
            }
        }
        None
    }

    /// The whole LUN `index` changed outside the mirrored write path (SANITIZE): every
    /// region is marked dirty and the peer is declared outdated, so the manager reconnects
    /// and copies them (holes as deallocations). The caller still holds the LUN's range
    /// lock, so the copy waits for it and sees the final data.
    pub fn lun_rewritten(&self, index: usize, why: &str) {
        if let Err(e) = self.mark_lun_dirty(index) {
            tracing::error!(lun = index, error = %e, "cannot record the rewritten LUN");
        }
        self.peer_lost(why);
    }

    /// Marks every region of LUN `index` dirty, durably: before a change outside the
    /// mirrored write path (SANITIZE) begins, so that a crash in its middle still resyncs
    /// the whole LUN (the write-intent log knows nothing of it).
    pub fn mark_lun_dirty(&self, index: usize) -> std::io::Result<()> {
        let Some(l) = self.luns.get(index) else {
            return Ok(());
        };
        let mut m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
        let regions = m.bitmap.regions();
        for r in 0..regions {
            m.bitmap.set(r);
        }
        l.persist(&m)
    }

    /// Records the node's role in every LUN's metadata (a role change: promote or demote),
    /// so that a crash is known at the next start to have been a primary's.
    /// Why `twinsan promote` (without `--force`) must not make this node primary now, if it
    /// must not: the peer is primary and still connected (two primaries would both take
    /// writes: a split brain made on purpose), or a LUN's data here is not usable (a resync
    /// into it is unfinished, or it was given up with `resolve --discard-local`). A peer
    /// that was just killed closes its links within moments: they are waited for briefly.
    pub fn promote_refusal(&self) -> Option<String> {
        let t = Instant::now();
        while self.primary_links.load(Ordering::Acquire) > 0 {
            if t.elapsed() >= PROMOTE_WAIT {
                return Some(
                    "the peer is primary and connected: demote it first (or, if it is \
                     unreachable for initiators but its replica link still stands, promote --force)"
                        .into(),
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for l in &self.luns {
            let m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
            if l.state() == SyncState::SyncTarget || m.flags.inconsistent || m.flags.outdated {
                return Some(format!(
                    "lun {:016x} holds outdated or inconsistent data (an unfinished resync into \
                     it, or resolve --discard-local); promote --force serves it anyway",
                    l.key
                ));
            }
        }
        None
    }

    /// On a secondary, when a primary's control connection arrives: every LUN for which it
    /// holds newer data is recorded outdated here before any resync starts, so that a
    /// promotion of this node while the resync is still on its way (to this LUN, or to
    /// one before it) is refused instead of serving stale data. The resync's completion
    /// clears it.
    fn note_primary_ahead(&self, hellos: &[LunHello]) {
        for l in &self.luns {
            let Some(h) = hellos.iter().find(|h| h.lun_key == l.key) else {
                continue;
            };
            let mut m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
            let ours = GenFlags {
                outdated: m.flags.outdated,
                inconsistent: m.flags.inconsistent,
                primary: false,
                crashed: m.flags.crashed,
            };
            let behind = matches!(
                decide(&m.gen, ours, &h.gen, h.flags),
                Decision::SyncTargetBitmap
                    | Decision::SyncTargetFull
                    | Decision::InitialSync {
                        source_is_local: false
                    }
            );
            if behind && !m.flags.outdated {
                m.flags.outdated = true;
                if let Err(e) = l.persist(&m) {
                    tracing::error!(lun = l.key, error = %e, "cannot record this node outdated");
                }
            }
        }
    }

    /// This node's copy of LUN `key` can no longer be trusted anywhere (a failed fsync may
    /// have dropped written pages): recorded like a crash, so the primary's next resync
    /// copies every region into it.
    fn distrust_local(&self, key: u64, why: &str) {
        let Some(i) = self.lun_by_key(key) else {
            return;
        };
        let l = &self.luns[i];
        let mut m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
        m.flags.crashed = true;
        tracing::error!(
            lun = key,
            reason = why,
            "local copy distrusted: the next resync copies every region"
        );
        if let Err(e) = l.persist(&m) {
            tracing::error!(lun = key, error = %e, "cannot record the distrusted copy");
        }
    }

    /// Before this node becomes primary: no message from the old primary is applied from
    /// now on (its connections close), and the ones being applied finish first. Bounded by
    /// one write's time; returns whether the apply side went quiet.
    pub fn fence_for_promotion(&self) -> bool {
        self.apply_fenced.store(true, Ordering::SeqCst);
        let t = Instant::now();
        while self.applying.load(Ordering::SeqCst) > 0 {
            if t.elapsed() >= PROMOTE_WAIT {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// After a demotion, with initiators refused already: waits (up to `timeout`) until
    /// the writes that were running finished, each mirrored and answered. Returns whether
    /// they did.
    pub fn drain_after_demotion(&self, reg: &Registry, timeout: Duration) -> bool {
        let t = Instant::now();
        loop {
            let quiet = reg.luns.iter().all(|l| l.ranges.held() == 0)
                && self.links.iter().all(|l| {
                    l.pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_empty()
                });
            if quiet {
                return true;
            }
            if t.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn note_role(&self, primary: bool) {
        if !primary {
            self.apply_fenced.store(false, Ordering::Release);
        }
        if primary {
            // Promoted on purpose: the note about the start no longer describes the node.
            *self.start_note.lock().unwrap_or_else(|p| p.into_inner()) = None;
            self.new_term_reconnects();
        }
        for l in &self.luns {
            let mut m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
            if m.flags.primary != primary {
                m.flags.primary = primary;
                if let Err(e) = l.persist(&m) {
                    tracing::error!(path = %l.meta_path.display(), error = %e, "cannot record the role");
                }
            }
        }
    }

    /// On a promotion: a node that was demoted while mirroring still has `peer_up` set and
    /// its old data links, but its control connection closed with the demotion, so the
    /// peer sees no primary and would let itself be promoted too (two primaries). The new
    /// term starts like a start: links reset, writes tracked until the manager has spoken
    /// with the peer again (its connection is what keeps the peer from promoting).
    fn new_term_reconnects(&self) {
        let unanswered = {
            let _t = self.transition.lock().unwrap_or_else(|p| p.into_inner());
            if !self.peer_up.load(Ordering::Acquire) {
                return;
            }
            let unanswered = self.links.iter().any(|l| {
                !l.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_empty()
            });
            if !unanswered {
                self.peer_up.store(false, Ordering::Release);
                for l in &self.links {
                    l.reset.store(true, Ordering::Release);
                }
            }
            unanswered
        };
        if unanswered {
            // Writes of the last term the peer never answered (a demotion that did not
            // drain): recorded and completed as for any lost peer.
            self.peer_lost("promoted with mirrored writes of the last term unanswered");
        } else {
            tracing::info!("promoted: reconnecting to the peer for the new term");
        }
    }

    fn is_primary(&self) -> bool {
        self.registry().is_some_and(|r| r.role() == Role::Primary)
    }

    fn hello(&self, link: u16) -> Message {
        let primary = self.is_primary();
        let luns = self
            .luns
            .iter()
            .map(|l| {
                let m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
                LunHello {
                    lun_key: l.key,
                    size_bytes: m.size_bytes,
                    region_bytes: m.region_bytes,
                    gen: m.gen,
                    flags: GenFlags {
                        outdated: m.flags.outdated,
                        inconsistent: m.flags.inconsistent,
                        primary,
                        crashed: m.flags.crashed,
                    },
                }
            })
            .collect();
        Message::Hello {
            node_id: self.node_id.clone(),
            luns,
            link,
        }
    }

    /// Mutual challenge-response over the pre-shared key. We announce this connection as
    /// our link `link`; returns the peer's LUNs and the link number it announced.
    fn handshake(
        &self,
        s: &mut TcpStream,
        rbuf: &mut RxBuf,
        role: AuthRole,
        link: u16,
    ) -> std::io::Result<(Vec<LunHello>, u16)> {
        s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let mut wbuf = Vec::new();
        let mut nonce = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let bad = |what: &str| {
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, what.to_string())
        };
        send(s, &self.hello(link), 0, &mut wbuf)?;
        send(s, &Message::AuthChallenge { nonce }, 0, &mut wbuf)?;
        let hello = recv(s, rbuf).inspect_err(|e| self.note_wire_version(e))?;
        let (peer_id, peer_luns, peer_link) = match hello.0 {
            Message::Hello {
                node_id,
                luns,
                link,
            } => (node_id, luns, link),
            _ => return Err(bad("expected hello")),
        };
        let peer_nonce = match recv(s, rbuf)?.0 {
            Message::AuthChallenge { nonce } => nonce,
            _ => return Err(bad("expected challenge")),
        };
        let t = match role {
            AuthRole::Initiator => Transcript {
                initiator_id: self.node_id.clone(),
                acceptor_id: peer_id.clone(),
                initiator_nonce: nonce,
                acceptor_nonce: peer_nonce,
            },
            AuthRole::Acceptor => Transcript {
                initiator_id: peer_id.clone(),
                acceptor_id: self.node_id.clone(),
                initiator_nonce: peer_nonce,
                acceptor_nonce: nonce,
            },
        };
        let mac = t
            .mac(&self.cfg.psk, role)
            .map_err(|e| bad(&e.to_string()))?;
        send(s, &Message::AuthResponse { mac }, 0, &mut wbuf)?;
        let peer_mac = match recv(s, rbuf)?.0 {
            Message::AuthResponse { mac } => mac,
            _ => return Err(bad("expected auth response")),
        };
        let peer_role = match role {
            AuthRole::Initiator => AuthRole::Acceptor,
            AuthRole::Acceptor => AuthRole::Initiator,
        };
        if let Err(e) = t.verify(&self.cfg.psk, peer_role, &peer_mac) {
            tracing::error!(peer = %peer_id, error = %e, "replica link authentication failed (wrong pre-shared key?)");
            return Err(bad("authentication failed"));
        }
        s.set_read_timeout(None)?;
        self.peer_wire_version.store(0, Ordering::Relaxed);
        Ok((peer_luns, peer_link))
    }

    /// A peer whose first frame carries another protocol version runs another twinsan
    /// version: nothing will mirror until both nodes run the same one. Said once, loudly
    /// (the connection is retried every half second), and kept for `status`.
    fn note_wire_version(&self, e: &std::io::Error) {
        let theirs = match e
            .get_ref()
            .and_then(|i| i.downcast_ref::<wire::WireError>())
        {
            Some(wire::WireError::BadVersion(v)) => *v,
            _ => return,
        };
        if self.peer_wire_version.swap(theirs, Ordering::Relaxed) != theirs {
            tracing::error!(
                peer_version = theirs,
                our_version = wire::VERSION,
                "the peer speaks another replica protocol version: run the same twinsan \
                 version on both nodes; nothing is mirrored until then"
            );
        }
    }

    /// Moves the calling link thread off the CPU of the core thread it works for
    /// (affinity.rs says why).
    fn keep_off_core(&self, core: usize) {
        if let Some(&cpu) = self.core_cpus.get(core) {
            if let Err(e) = crate::affinity::keep_off_cpu(cpu) {
                tracing::debug!(core, cpu, error = %e, "link thread placement failed");
            }
        }
    }

    fn lun_by_key(&self, key: u64) -> Option<usize> {
        self.luns.iter().position(|l| l.key == key)
    }

    // ---------------------------------------------------------------- secondary

    fn serve(self: Arc<Self>, listener: TcpListener) {
        // Connections still authenticating cost a thread and a receive buffer each, for up
        // to the handshake's timeouts: a bounded number of them (our peer opens one link
        // per core and a control connection, one at a time each).
        let max_unauthenticated = self.links.len() * 2 + 8;
        let unauthenticated = Arc::new(AtomicUsize::new(0));
        for stream in listener.incoming().flatten() {
            if unauthenticated.load(Ordering::Acquire) >= max_unauthenticated {
                tracing::warn!(peer = ?stream.peer_addr().ok(), max_unauthenticated, "too many replica connections authenticating: refusing one");
                continue;
            }
            unauthenticated.fetch_add(1, Ordering::AcqRel);
            let conn_id = self.conn_ids.fetch_add(1, Ordering::AcqRel) + 1;
            let rep = Arc::clone(&self);
            let count = Arc::clone(&unauthenticated);
            let spawned = std::thread::Builder::new()
                .name("twinsan-replica-apply".into())
                .spawn(move || {
                    let peer = stream.peer_addr().ok();
                    if let Err(e) = rep.apply_conn(stream, conn_id, Authenticating::new(count)) {
                        tracing::info!(?peer, error = %e, "replica connection ended");
                    }
                });
            if spawned.is_err() {
                unauthenticated.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    fn apply_conn(
        &self,
        mut s: TcpStream,
        conn_id: u64,
        authenticating: Authenticating,
    ) -> std::io::Result<()> {
        let _ = s.set_nodelay(true);
        // A primary that lost power never closes its links: keepalive ends them (and their
        // threads) within about 11 s instead of never.
        if let Err(e) = keep_alive(&s) {
            tracing::debug!(error = %e, "replica link keepalive unavailable");
        }
        let mut rbuf = RxBuf::default();
        let (peer_hellos, peer_link) =
            self.handshake(&mut s, &mut rbuf, AuthRole::Acceptor, LINK_NONE)?;
        drop(authenticating);
        if self.is_primary() {
            // Two primaries would both accept writes: refuse, loudly (split-brain guard).
            tracing::error!("refusing replica connection: this node is primary too");
            return Err(std::io::Error::other("both nodes are primary"));
        }
        if peer_link != LINK_NONE {
            // On a one-machine pair the peer's core thread for this link runs there.
            self.keep_off_core(usize::from(peer_link));
        }
        // Counted down however the connection ends (error, EOF, panic).
        struct Open<'a>(&'a AtomicUsize);
        impl Drop for Open<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _open = (peer_link == LINK_NONE).then(|| {
            // The primary's control connection (a resync, then pings every PING_INTERVAL
            // while it stays primary; verify): while it is open a primary is there
            // (promote_refusal). Silence means the primary is gone or cut off, and the
            // connection must not go on counting. Data links may idle forever and close
            // only with the primary's process: they do not count.
            self.primary_links.fetch_add(1, Ordering::AcqRel);
            Open(&self.primary_links)
        });
        if peer_link == LINK_NONE {
            self.note_primary_ahead(&peer_hellos);
            let quiet = Duration::from_millis(self.cfg.replica_timeout_ms.max(1000) * 2);
            s.set_read_timeout(Some(quiet))?;
        }
        let mut files: HashMap<usize, File> = HashMap::new();
        let mut acks = Vec::new();
        let mut pending_acks = 0usize;
        let mut superseded_older = false;
        loop {
            // Acks go out in one write just before we would block for more input: one
            // syscall per batch of applied messages, not per message.
            let (frame, seq) = match rbuf.next_ref()? {
                Some(m) => m,
                None => {
                    if !acks.is_empty() {
                        s.write_all(&acks)?;
                        acks.clear();
                        pending_acks = 0;
                    }
                    rbuf.fill(&mut s)?;
                    continue;
                }
            };
            if peer_link == LINK_NONE
                && !superseded_older
                && matches!(
                    frame,
                    Frame::Other(
                        Message::ResyncData { .. }
                            | Message::ResyncProgress { .. }
                            | Message::WriteZeroes { .. }
                            | Message::ResyncDone { .. }
                    )
                )
            {
                self.supersede_older(conn_id);
                superseded_older = true;
            }
            // Counted before the fence is read, so a promotion that set the fence either
            // stops this message or waits for it (fence_for_promotion).
            self.applying.fetch_add(1, Ordering::SeqCst);
            struct Applying<'a>(&'a AtomicUsize);
            impl Drop for Applying<'_> {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let _applying = Applying(&self.applying);
            if self.apply_fenced.load(Ordering::SeqCst) {
                tracing::warn!(
                    "this node is primary now: closing the old primary's replica connection"
                );
                return Err(std::io::Error::other("this node was promoted"));
            }
            let gate = self.apply_gate.read().unwrap_or_else(|p| p.into_inner());
            // Again under the gate: waiting for it (a resync raising it) may have taken
            // longer than a promotion waits for the messages being applied.
            if self.apply_fenced.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("this node was promoted"));
            }
            if conn_id < *gate {
                tracing::warn!(
                    "closing a replica connection from before the primary's current resync: \
                     what it still carries is stale"
                );
                return Err(std::io::Error::other("superseded by a newer resync"));
            }
            let msg = match frame {
                // The hot path: straight from the receive buffer to the file.
                Frame::Write(w) => Err(self.apply(
                    &mut files,
                    w.lun_key,
                    (w.offset_bytes, w.data.len() as u64),
                    |f| {
                        crate::inline_write::write_all_chunked(f, w.data, w.offset_bytes)?;
                        if w.fua {
                            f.sync_data()?;
                        }
                        Ok(())
                    },
                )),
                Frame::Other(m) => Ok(m),
            };
            let status = match msg {
                Err(status) => status,
                Ok(Message::ResyncData {
                    lun_key,
                    offset_bytes,
                    data,
                }) => {
                    if let Some(i) = self.lun_by_key(lun_key) {
                        let l = &self.luns[i];
                        if l.state() != SyncState::SyncTarget {
                            // Inconsistent until the resync completes: persist that first.
                            let mut m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
                            m.flags.inconsistent = true;
                            let _ = l.persist(&m);
                            l.set_state(SyncState::SyncTarget);
                        }
                    }
                    self.apply(
                        &mut files,
                        lun_key,
                        (offset_bytes, data.len() as u64),
                        |f| {
                            // Zero chunks are holes on the primary: keep them holes here too.
                            if data.iter().all(|&b| b == 0) {
                                punch(f, offset_bytes, data.len() as u64)
                            } else {
                                crate::inline_write::write_all_chunked(f, &data, offset_bytes)
                            }
                        },
                    )
                }
                Ok(Message::WriteZeroes {
                    lun_key,
                    offset_bytes,
                    len_bytes,
                    unmap,
                }) => self.apply(&mut files, lun_key, (offset_bytes, len_bytes), |f| {
                    if unmap {
                        punch(f, offset_bytes, len_bytes)
                    } else {
                        zero_range(f, offset_bytes, len_bytes)
                    }
                }),
                Ok(Message::Flush { lun_key }) => {
                    let status = self.apply(&mut files, lun_key, (0, 0), |f| f.sync_data());
                    if status != AckStatus::Ok {
                        self.distrust_local(lun_key, "a flush failed");
                    }
                    status
                }
                Ok(Message::ResyncDone { lun_key, gen }) => match self.lun_by_key(lun_key) {
                    None => AckStatus::Refused,
                    Some(i) => 'done: {
                        let l = &self.luns[i];
                        // Everything copied (and punched) must be on stable storage before
                        // the source forgets which regions it copied.
                        let synced = match files.get(&i) {
                            Some(f) => f.sync_data(),
                            None => File::open(&l.backing).and_then(|f| f.sync_data()),
                        };
                        if let Err(e) = synced {
                            self.distrust_local(lun_key, "the resync's flush failed");
                            break 'done AckStatus::IoError(e.raw_os_error().unwrap_or(libc::EIO));
                        }
                        let mut m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
                        m.gen.resync_done_target(&gen);
                        m.flags.inconsistent = false;
                        m.flags.outdated = false;
                        // Every region now equals the source's: a tail from a crash is gone.
                        m.flags.crashed = false;
                        m.bitmap.clear_all();
                        match l.persist(&m) {
                            Ok(()) => {
                                l.set_state(SyncState::UpToDate);
                                // The next resync's progress starts from its own plan.
                                l.resync_total_bytes.store(0, Ordering::Relaxed);
                                tracing::info!(lun = l.key, "resync complete: up to date");
                                AckStatus::Ok
                            }
                            Err(e) => AckStatus::IoError(e.raw_os_error().unwrap_or(libc::EIO)),
                        }
                    }
                },
                Ok(Message::PrState {
                    lun_key,
                    origin,
                    version,
                    state,
                }) => {
                    match (self.lun_by_key(lun_key), self.registry()) {
                        (Some(i), Some(reg)) => match proto::scsi::pr::PrState::decode(&state) {
                            Ok(st) => {
                                // Checked and applied under one lock: PR snapshots arrive on
                                // every core's link, and an older one (overtaken on another
                                // link) must not replace a newer state.
                                let mut applied = self.luns[i]
                                    .pr_applied
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner());
                                if pr_snapshot_supersedes(*applied, (origin, version)) {
                                    *applied = (origin, version);
                                    let lun = &reg.luns[i];
                                    lun.with_pr(|cur| *cur = st.clone());
                                    match lun.persist_pr(&st) {
                                        Ok(()) => AckStatus::Ok,
                                        Err(e) => AckStatus::IoError(
                                            e.raw_os_error().unwrap_or(libc::EIO),
                                        ),
                                    }
                                } else {
                                    AckStatus::Ok
                                }
                            }
                            Err(_) => AckStatus::Refused,
                        },
                        _ => AckStatus::Refused,
                    }
                }
                Ok(Message::VerifyRequest { lun_key, region }) => {
                    let reply = match self.lun_by_key(lun_key) {
                        Some(i) => {
                            let region_bytes = self.luns[i]
                                .meta
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .bitmap
                                .region_bytes();
                            region_digest(&self.luns[i].backing, region, region_bytes).map(
                                |digest| Message::VerifyDigest {
                                    lun_key,
                                    region,
                                    digest,
                                },
                            )
                        }
                        None => Err(std::io::Error::other("unknown LUN")),
                    };
                    match reply {
                        Ok(m) => {
                            wire::encode(&m, seq, &mut acks);
                            continue;
                        }
                        Err(e) => AckStatus::IoError(e.raw_os_error().unwrap_or(libc::EIO)),
                    }
                }
                Ok(Message::ResyncProgress {
                    lun_key,
                    done_bytes,
                    total_bytes,
                    eta_ms,
                }) => match self.lun_by_key(lun_key) {
                    Some(i) => {
                        let l = &self.luns[i];
                        l.resync_total_bytes.store(total_bytes, Ordering::Relaxed);
                        l.resync_done_bytes.store(done_bytes, Ordering::Relaxed);
                        l.resync_eta_ms.store(eta_ms, Ordering::Relaxed);
                        AckStatus::Ok
                    }
                    None => AckStatus::Refused,
                },
                Ok(Message::Ping { .. }) => AckStatus::Ok,
                _ => AckStatus::Refused,
            };
            // Not held while acks are written: a stale connection's write may block on a
            // peer that stopped reading, and a resync waits for this lock.
            drop(gate);
            wire::encode(&Message::Ack { seq, status }, 0, &mut acks);
            pending_acks += 1;
            if pending_acks >= ACK_BATCH {
                // Do not hold early acks until a whole read's worth of writes is applied:
                // the primary's queue depth is only refilled as acks arrive.
                s.write_all(&acks)?;
                acks.clear();
                pending_acks = 0;
            }
        }
    }

    /// On a secondary, when a resync (control connection `conn_id`) starts changing data:
    /// every connection accepted before it belongs to a mirroring round the primary gave
    /// up on (it reset its links, recorded their unacknowledged writes dirty, and this
    /// resync copies those regions). What such a connection still carries (the socket
    /// buffers of a node that was paused, or of a partition that healed) must not land
    /// after the copy: the copies would differ while both sides say UpToDate. Waits for
    /// the messages being applied now; the old connections close at their next message.
    fn supersede_older(&self, conn_id: u64) {
        let mut gate = self.apply_gate.write().unwrap_or_else(|p| p.into_inner());
        *gate = (*gate).max(conn_id);
    }

    /// Runs `f` on LUN `key`'s backing file if `[offset, offset + len)` lies inside the LUN
    /// (a peer configured with a larger LUN must not grow ours).
    fn apply(
        &self,
        files: &mut HashMap<usize, File>,
        key: u64,
        (offset, len): (u64, u64),
        f: impl FnOnce(&File) -> std::io::Result<()>,
    ) -> AckStatus {
        let Some(i) = self.lun_by_key(key) else {
            return AckStatus::Refused;
        };
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.luns[i].size_bytes)
        {
            tracing::error!(
                lun = key,
                offset,
                len,
                size = self.luns[i].size_bytes,
                "peer sent an operation beyond the LUN: refused"
            );
            return AckStatus::Refused;
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = files.entry(i) {
            match OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.luns[i].backing)
            {
                Ok(file) => {
                    slot.insert(file);
                }
                Err(e) => return AckStatus::IoError(e.raw_os_error().unwrap_or(libc::EIO)),
            }
        }
        let Some(file) = files.get(&i) else {
            return AckStatus::Refused;
        };
        match f(file) {
            Ok(()) => AckStatus::Ok,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => AckStatus::NoSpace,
            Err(e) => AckStatus::IoError(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    // ---------------------------------------------------------------- primary links

    fn connect(&self, link: u16) -> std::io::Result<(TcpStream, RxBuf, Vec<LunHello>)> {
        let mut s = TcpStream::connect_timeout(
            &self.cfg.address,
            Duration::from_millis(self.cfg.replica_timeout_ms),
        )?;
        let _ = s.set_nodelay(true);
        let mut rbuf = RxBuf::default();
        let (hellos, _) = self.handshake(&mut s, &mut rbuf, AuthRole::Initiator, link)?;
        Ok((s, rbuf, hellos))
    }

    fn link_writer(self: Arc<Self>, core: usize, rx: Receiver<RepReq>) {
        self.keep_off_core(core);
        let link = &self.links[core];
        let mut stream: Option<TcpStream> = None;
        let mut wbuf = Vec::new();
        let mut batch: Vec<(u64, Pending)> = Vec::new();
        loop {
            let req = match recv_polling(&rx, Duration::from_millis(50)) {
                Ok(r) => Some(r),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            };
            self.check_timeouts();
            if link.reset.swap(false, Ordering::AcqRel) {
                if let Some(s) = stream.take() {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            }
            let Some(mut req) = req else { continue };
            if !self.peer_up.load(Ordering::Acquire) {
                match self.degraded(core, req) {
                    None => continue,
                    // Mirroring resumed meanwhile: send it like any other.
                    Some(r) => req = r,
                }
            }
            if stream.is_none() {
                let connected = self
                    .connect(u16::try_from(core).unwrap_or(LINK_NONE))
                    .and_then(|(s, rbuf, h)| {
                        // Sends give up waiting now and then (send_watched says why).
                        s.set_write_timeout(Some(SEND_POLL))?;
                        Ok((s, rbuf, h))
                    });
                match connected {
                    Ok((s, rbuf, _)) => {
                        if let Ok(r) = s.try_clone() {
                            let rep = Arc::clone(&self);
                            let _ = std::thread::Builder::new()
                                .name(format!("twinsan-link{core}-rx"))
                                .spawn(move || rep.link_reader(core, r, rbuf));
                        }
                        stream = Some(s);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "replica link connect failed");
                        self.peer_lost("connect failed");
                        if let Some(r) = self.degraded(core, req) {
                            // Only if the peer came back in between; retry from the top.
                            let _ = self.links[core].done_tx.send(RepDone {
                                token: r.token,
                                ok: false,
                            });
                            self.links[core].bell.ring();
                        }
                        continue;
                    }
                }
            }
            wbuf.clear();
            batch.clear();
            let sent_ms = now_ms(&self.epoch);
            // More requests already queued go out in the same write (bounded batch).
            let mut next = Some(req);
            while let Some(req) = next.take() {
                let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                // Lent bytes are read here, before the request is pending (LentBytes).
                let (offset, len) = self.to_frame(req.lun, req.op, seq, &mut wbuf);
                batch.push((
                    seq,
                    Pending {
                        token: req.token,
                        lun: req.lun,
                        offset,
                        len,
                        sent_ms,
                    },
                ));
                if wbuf.len() < LINK_BATCH_BYTES && self.peer_up.load(Ordering::Acquire) {
                    next = rx.try_recv().ok();
                }
            }
            // Recorded before the bytes leave: an ack can only follow the write. Under the
            // transition lock: a peer loss since the check above drained `pending` already,
            // and what it did not see must be recorded like any write while the peer is away
            // (nothing would ever answer it otherwise).
            {
                let t = self.transition.lock().unwrap_or_else(|p| p.into_inner());
                if self.peer_up.load(Ordering::Acquire) {
                    link.pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(batch.drain(..));
                } else {
                    for (_, p) in batch.drain(..) {
                        let range = (p.len > 0).then_some((p.offset, p.len));
                        self.degraded_range(&t, core, p.token, p.lun, range);
                    }
                    continue;
                }
            }
            let sent = stream.as_mut().map(|s| self.send_watched(s, &wbuf));
            if let Some(Err(e)) = sent {
                tracing::debug!(core, error = %e, "replica link send failed");
                stream = None;
                self.peer_lost("send failed");
            }
        }
    }

    /// Writes all of `bytes` to the link, checking the acknowledgement deadlines whenever
    /// the socket makes no progress for [`SEND_POLL`] (its write timeout). Why: a hung
    /// peer stops reading, the socket buffers fill and a plain blocking write would hold
    /// the link writer, the one thread that notices late acks, forever; and a write timeout
    /// alone restarts with every partial write. Fails once the peer is declared lost.
    fn send_watched(&self, s: &mut TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            match s.write(bytes) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    self.check_timeouts();
                    if !self.peer_up.load(Ordering::Acquire) {
                        return Err(e);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Appends the frame of a mirrored operation to `wbuf`; returns the byte range it
    /// covers. Called by the link writer only, before the request is recorded as pending.
    fn to_frame(&self, lun: usize, op: RepOp, seq: u64, wbuf: &mut Vec<u8>) -> (u64, u64) {
        let key = self.luns[lun].key;
        let (msg, offset, len) = match op {
            RepOp::Write { offset, data, fua } => {
                // SAFETY: this is the link writer, and the request is not pending yet.
                let bytes = unsafe { data.bytes() };
                let write = wire::WriteRef {
                    lun_key: key,
                    offset_bytes: offset,
                    fua,
                    data: bytes,
                };
                wire::encode_write(&write, seq, wbuf);
                return (offset, bytes.len() as u64);
            }
            RepOp::Zero { offset, len, unmap } => (
                Message::WriteZeroes {
                    lun_key: key,
                    offset_bytes: offset,
                    len_bytes: len,
                    unmap,
                },
                offset,
                len,
            ),
            RepOp::Flush => (Message::Flush { lun_key: key }, 0, 0),
            RepOp::PrState { state, version } => (
                Message::PrState {
                    lun_key: key,
                    origin: self.instance,
                    version,
                    state,
                },
                0,
                0,
            ),
        };
        wire::encode(&msg, seq, wbuf);
        (offset, len)
    }

    fn link_reader(self: Arc<Self>, core: usize, mut s: TcpStream, mut rbuf: RxBuf) {
        self.keep_off_core(core);
        let link = &self.links[core];
        // Acks are taken a read's worth at a time: one lock of the pending map and one
        // wake-up of the core thread per read, not per ack.
        let mut acks: Vec<(u64, AckStatus)> = Vec::new();
        loop {
            let ended = loop {
                match rbuf.next() {
                    Ok(Some((Message::Ack { seq, status }, _))) => acks.push((seq, status)),
                    Ok(Some(_)) => {}
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            };
            // A write or zeroing the peer could not store (out of space, I/O error,
            // refused) leaves the nodes different: it stays pending and the peer is
            // declared lost below, so the range is recorded in the dirty bitmap and the
            // write completes on this node alone, as DRBD's detach does, instead of
            // failing with both copies silently different (and status saying UpToDate).
            let mut peer_failed_data: Option<(AckStatus, u64)> = None;
            if !acks.is_empty() {
                let done: Vec<(Pending, AckStatus)> = {
                    let mut pending = link.pending.lock().unwrap_or_else(|p| p.into_inner());
                    acks.drain(..)
                        .filter_map(|(seq, status)| match pending.get(&seq) {
                            // Any failure detaches the peer: a failed flush may have lost
                            // its pages, a refused reservation leaves its state different.
                            Some(p) if status != AckStatus::Ok => {
                                peer_failed_data.get_or_insert((status, p.offset));
                                None
                            }
                            _ => pending.remove(&seq).map(|p| (p, status)),
                        })
                        .collect()
                };
                for (p, status) in &done {
                    let ok = *status == AckStatus::Ok;
                    if !ok {
                        tracing::error!(
                            ?status,
                            lun = p.lun,
                            offset = p.offset,
                            "peer failed a mirrored write"
                        );
                    }
                    let _ = link.done_tx.send(RepDone { token: p.token, ok });
                }
                if !done.is_empty() {
                    link.bell.ring();
                }
            }
            if let Some((status, offset)) = peer_failed_data {
                tracing::error!(
                    ?status,
                    offset,
                    "the peer failed a mirrored write: declaring it lost, this node goes on alone"
                );
                self.peer_lost("the peer failed a mirrored write");
            }
            let failed = match ended {
                Some(e) => Some(e),
                None => rbuf.fill(&mut s).err(),
            };
            if failed.is_some() {
                if self.peer_up.load(Ordering::Acquire) {
                    self.peer_lost("link closed");
                }
                return;
            }
        }
    }

    fn check_timeouts(&self) {
        if !self.peer_up.load(Ordering::Acquire) {
            return;
        }
        let now = now_ms(&self.epoch);
        let late = self.links.iter().any(|l| {
            l.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .any(|p| now.saturating_sub(p.sent_ms) > self.cfg.replica_timeout_ms)
        });
        if late {
            self.peer_lost("no acknowledgement within replica_timeout_ms");
        }
    }

    /// The peer is gone: record it outdated (bumped generation, bitmap covering every
    /// unacknowledged write) durably, then complete the waiting writes (degrade) or hold
    /// them (suspend).
    fn peer_lost(&self, why: &str) {
        let _t = self.transition.lock().unwrap_or_else(|p| p.into_inner());
        if !self.peer_up.swap(false, Ordering::AcqRel) {
            return;
        }
        tracing::warn!(reason = why, mode = ?self.cfg.on_peer_loss, "replication peer lost");
        for l in &self.links {
            l.reset.store(true, Ordering::Release);
        }
        let mut waiting: Vec<(usize, Pending)> = Vec::new();
        for (core, l) in self.links.iter().enumerate() {
            for (_, p) in l.pending.lock().unwrap_or_else(|p| p.into_inner()).drain() {
                waiting.push((core, p));
            }
        }
        for (i, lun) in self.luns.iter().enumerate() {
            let mut m = lun.meta.lock().unwrap_or_else(|p| p.into_inner());
            for (_, p) in waiting.iter().filter(|(_, p)| p.lun == i && p.len > 0) {
                m.bitmap.mark(p.offset, p.len);
            }
            if !m.flags.peer_outdated {
                m.flags.peer_outdated = true;
                m.gen.bump(random8());
            }
            if let Err(e) = lun.persist(&m) {
                // Without this record nothing may be acked without the peer: stay frozen.
                tracing::error!(error = %e, "cannot persist replication metadata; I/O stays suspended");
                lun.set_state(SyncState::Suspended);
                continue;
            }
            lun.set_state(match self.cfg.on_peer_loss {
                OnPeerLoss::Degrade => SyncState::PeerOutdated,
                OnPeerLoss::Suspend => SyncState::Suspended,
            });
        }
        for (core, p) in waiting {
            self.complete_degraded(core, p.token, p.lun);
        }
    }

    /// A request while the peer is away: mark its regions (durably, when new) and answer.
    /// Returns the request if mirroring resumed meanwhile (the caller sends it).
    fn degraded(&self, core: usize, req: RepReq) -> Option<RepReq> {
        let _t = self.transition.lock().unwrap_or_else(|p| p.into_inner());
        if self.peer_up.load(Ordering::Acquire) {
            return Some(req);
        }
        let range = match &req.op {
            RepOp::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
            RepOp::Zero { offset, len, .. } => Some((*offset, *len)),
            RepOp::Flush | RepOp::PrState { .. } => None,
        };
        self.degraded_range(&_t, core, req.token, req.lun, range);
        None
    }

    /// Records `range` of LUN `lun` (if any) as changed while the peer is away, durably
    /// when new, and answers request `token` (degrade) or holds it (suspend). Runs in the
    /// same critical section (`_transition`) as the check that found the peer away: a
    /// resync completing in between would otherwise miss this write.
    fn degraded_range(
        &self,
        _transition: &std::sync::MutexGuard<'_, ()>,
        core: usize,
        token: u64,
        lun_index: usize,
        range: Option<(u64, u64)>,
    ) {
        let lun = &self.luns[lun_index];
        if let Some((off, len)) = range {
            let mut m = lun.meta.lock().unwrap_or_else(|p| p.into_inner());
            // Covered regions alone are not a record: after a restart they are the
            // write-intent regions, and the peer is not yet recorded outdated (nor the
            // generation bumped) until this write makes it so.
            if !m.bitmap.covers(off, len) || !m.flags.peer_outdated {
                m.bitmap.mark(off, len);
                if !m.flags.peer_outdated {
                    m.flags.peer_outdated = true;
                    m.gen.bump(random8());
                }
                if let Err(e) = lun.persist(&m) {
                    tracing::error!(error = %e, "cannot persist the dirty bitmap; failing the write");
                    let _ = self.links[core].done_tx.send(RepDone { token, ok: false });
                    self.links[core].bell.ring();
                    return;
                }
            }
        }
        self.complete_degraded(core, token, lun_index);
    }

    fn complete_degraded(&self, core: usize, token: u64, lun: usize) {
        let suspend = self.cfg.on_peer_loss == OnPeerLoss::Suspend
            && !self.outdate_requested.load(Ordering::Acquire);
        if suspend || self.luns[lun].state() == SyncState::Suspended {
            self.suspended
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((core, token));
            return;
        }
        let _ = self.links[core].done_tx.send(RepDone { token, ok: true });
        self.links[core].bell.ring();
    }

    fn release_suspended(&self) {
        let held = std::mem::take(&mut *self.suspended.lock().unwrap_or_else(|p| p.into_inner()));
        for (core, token) in held {
            let _ = self.links[core].done_tx.send(RepDone { token, ok: true });
            self.links[core].bell.ring();
        }
    }

    /// `twinsan resolve --discard-local`, on the split-brain victim (a secondary): its data
    /// is marked outdated and inconsistent, so the primary overwrites it with a full resync
    /// at the next connection. Refused on a primary (it would discard the data it serves).
    pub fn discard_local(&self) -> Result<(), String> {
        if self.is_primary() {
            return Err("this node is primary: demote it first".into());
        }
        for l in &self.luns {
            let mut m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
            m.flags.outdated = true;
            m.flags.inconsistent = true;
            // Our own changes may sit where the peer has holes: compare every region.
            m.flags.crashed = true;
            l.persist(&m)
                .map_err(|e| format!("cannot persist {}: {e}", l.meta_path.display()))?;
            l.set_state(SyncState::Unknown);
        }
        tracing::warn!("local data discarded on operator request: the peer will overwrite it");
        Ok(())
    }

    /// `twinsan outdate-peer`: the operator vouches the peer is stale; suspended I/O goes on.
    pub fn outdate_peer(&self) {
        self.outdate_requested.store(true, Ordering::Release);
        for l in &self.luns {
            if l.state() == SyncState::Suspended {
                l.set_state(SyncState::PeerOutdated);
            }
        }
        self.release_suspended();
    }

    // ---------------------------------------------------------------- resync

    fn manage(self: Arc<Self>) {
        let mut retry_ms = RECONNECT_MS;
        loop {
            std::thread::sleep(Duration::from_millis(retry_ms));
            if self.peer_up.load(Ordering::Acquire) || !self.is_primary() {
                continue;
            }
            match self.connect(LINK_NONE) {
                Ok((s, rbuf, hellos)) => match self.resync(s, rbuf, &hellos) {
                    Ok(()) => retry_ms = RECONNECT_MS,
                    Err(e) => {
                        // A peer that keeps failing the resync (out of space, a bad disk,
                        // a split brain) is retried less and less often, not every 500 ms.
                        retry_ms = (retry_ms * 2).min(RESYNC_RETRY_MAX_MS);
                        tracing::warn!(error = %e, retry_ms, "resync interrupted");
                    }
                },
                Err(e) => tracing::debug!(error = %e, "peer not reachable"),
            }
        }
    }

    fn resync(
        &self,
        mut s: TcpStream,
        mut rbuf: RxBuf,
        hellos: &[LunHello],
    ) -> std::io::Result<()> {
        let Some(reg) = self.registry() else {
            return Ok(());
        };
        let mut wbuf = Vec::new();
        let mut plans: Vec<(usize, Vec<u64>, bool)> = Vec::new();
        for (i, l) in self.luns.iter().enumerate() {
            let Some(h) = hellos.iter().find(|h| h.lun_key == l.key) else {
                tracing::error!(lun = l.key, "peer does not have this LUN");
                return Err(std::io::Error::other("LUN missing on peer"));
            };
            let region_bytes = l.region_bytes();
            if h.size_bytes != l.size_bytes || h.region_bytes != region_bytes {
                // A smaller peer could not hold our data (after a failover initiators would
                // see the LUN shrink); a different region size would make bitmaps disagree.
                tracing::error!(
                    lun = l.key,
                    size_bytes = l.size_bytes,
                    peer_size_bytes = h.size_bytes,
                    region_bytes,
                    peer_region_bytes = h.region_bytes,
                    "the peer's LUN differs in size or region size: not mirroring to it (fix the configs)"
                );
                return Err(std::io::Error::other(
                    "LUN size or region size differs on peer",
                ));
            }
            let (gen, flags) = {
                let m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
                (
                    m.gen,
                    GenFlags {
                        outdated: m.flags.outdated,
                        inconsistent: m.flags.inconsistent,
                        primary: true,
                        crashed: m.flags.crashed,
                    },
                )
            };
            // A peer that ran `twinsan resolve --discard-local` gave its data up: copy all.
            // (Outdated and inconsistent alone is a resync into it that was interrupted:
            // the generation ids still say where it stands.)
            let discarded =
                h.flags.outdated && h.flags.inconsistent && h.flags.crashed && !h.flags.primary;
            let d = if discarded {
                Decision::SyncSourceFull
            } else {
                decide(&gen, flags, &h.gen, h.flags)
            };
            let regions = {
                let m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
                let per = m.bitmap.region_bytes();
                match d {
                    Decision::InSync => m.bitmap.iter_dirty().collect::<Vec<_>>(),
                    Decision::SyncSourceBitmap => m.bitmap.iter_dirty().collect(),
                    // Every region, but only allocated ones travel as data: a hole
                    // goes as a deallocation (copy_region), so a thin LUN stays thin on
                    // the peer, and whatever the peer's file held there before (a reused
                    // image, a lost metadata file) does not survive as a difference.
                    Decision::InitialSync {
                        source_is_local: true,
                    }
                    | Decision::SyncSourceFull => {
                        (0..reg.luns[i].size_bytes.div_ceil(per)).collect()
                    }
                    Decision::SplitBrain => {
                        l.set_state(SyncState::SplitBrain);
                        tracing::error!(lun = l.key, local = ?gen, peer = ?h.gen, "SPLIT BRAIN: both nodes changed the data; not resolved automatically");
                        return Err(std::io::Error::other("split brain"));
                    }
                    other => {
                        tracing::error!(lun = l.key, decision = ?other, local = ?gen, peer = ?h.gen, "peer has newer or unrelated data: refusing to sync from here");
                        return Err(std::io::Error::other("refusing resync"));
                    }
                }
            };
            // A peer that crashed as primary since its last resync may hold writes nobody
            // acknowledged, in regions only its own write-intent log names: compare every
            // region (holes travel as small WriteZeroes, see `copy_region`). Our own crash
            // is in our bitmap (the write-intent regions), unless it predates the log.
            let regions = if h.flags.crashed || l.crash_unlogged.load(Ordering::Acquire) {
                let per = l.region_bytes();
                tracing::warn!(
                    lun = l.key,
                    local_crashed = flags.crashed,
                    peer_crashed = h.flags.crashed,
                    "a node stopped uncleanly: resync covers every region"
                );
                (0..reg.luns[i].size_bytes.div_ceil(per)).collect()
            } else {
                regions
            };
            plans.push((i, regions, matches!(d, Decision::InitialSync { .. })));
        }
        // Mirror new writes from now on: a region copy and a write to the same region are
        // serialized by the range lock, so one pass over what is dirty now suffices (writes
        // during the resync reach the peer directly instead of dirtying regions again).
        {
            let _t = self.transition.lock().unwrap_or_else(|p| p.into_inner());
            self.peer_up.store(true, Ordering::Release);
        }
        let r = self.copy_all(&reg, &mut s, &mut rbuf, &mut wbuf, plans);
        if r.is_ok() {
            for l in &self.luns {
                l.crash_unlogged.store(false, Ordering::Release);
            }
        }
        match &r {
            // Whatever was not copied stays dirty; stop mirroring to a half-synced peer.
            Err(e) => self.peer_lost(&format!("resync failed: {e}")),
            Ok(()) => self.watch_peer(&mut s, &mut rbuf),
        }
        let _ = s.shutdown(std::net::Shutdown::Both);
        r
    }

    /// While mirroring, pings the peer over the resync connection every [`PING_INTERVAL`]
    /// and waits up to `replica_timeout_ms` for each answer. Why: the data links only
    /// carry writes, so an idle pair would not notice a dead or hung peer until the next
    /// write (status would say "mirroring" meanwhile); and this connection tells the peer
    /// that a primary is there (its `promote` refuses to make a second one). Returns when
    /// the peer is lost or this node stops being primary (which closes the connection).
    fn watch_peer(&self, s: &mut TcpStream, rbuf: &mut RxBuf) {
        let timeout = Duration::from_millis(self.cfg.replica_timeout_ms);
        if s.set_read_timeout(Some(timeout)).is_err() || s.set_write_timeout(Some(timeout)).is_err()
        {
            return;
        }
        let mut wbuf = Vec::new();
        let watching = || self.peer_up.load(Ordering::Acquire) && self.is_primary();
        while watching() {
            std::thread::sleep(PING_INTERVAL);
            if !watching() {
                return;
            }
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            let ping = Message::Ping {
                now_ms: now_ms(&self.epoch),
            };
            let answer = send(s, &ping, seq, &mut wbuf).and_then(|()| recv(s, rbuf));
            match answer {
                Ok((Message::Ack { seq: acked, status }, _))
                    if acked == seq && status == AckStatus::Ok => {}
                other => {
                    if watching() {
                        tracing::warn!(answer = ?other.map(|(m, _)| m), "the peer did not answer a ping");
                        self.peer_lost("the peer stopped answering pings");
                    }
                    return;
                }
            }
        }
    }

    /// How far the resync of `l` has come and its estimate of the time left, as `status`
    /// prints them here; the sync target prints what it last heard.
    fn resync_progress(&self, l: &RepLun) -> (u64, u64, u64) {
        let total = l.resync_total_bytes.load(Ordering::Relaxed);
        let done = l.resync_done_bytes.load(Ordering::Relaxed).min(total);
        let elapsed_ms = now_ms(&self.epoch)
            .saturating_sub(l.resync_started_ms.load(Ordering::Relaxed))
            .max(1);
        // Nothing copied yet: no rate to extrapolate from (ETA_UNKNOWN).
        let eta_ms = match done {
            0 => ETA_UNKNOWN,
            _ => {
                u64::try_from(u128::from(total - done) * u128::from(elapsed_ms) / u128::from(done))
                    .unwrap_or(ETA_UNKNOWN)
            }
        };
        (done, total, eta_ms)
    }

    /// Tells the sync target how far the resync of `l` has come (its `status` shows it).
    fn send_progress(
        &self,
        s: &mut TcpStream,
        rbuf: &mut RxBuf,
        wbuf: &mut Vec<u8>,
        l: &RepLun,
    ) -> std::io::Result<()> {
        let (done_bytes, total_bytes, eta_ms) = self.resync_progress(l);
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let progress = Message::ResyncProgress {
            lun_key: l.key,
            done_bytes,
            total_bytes,
            eta_ms,
        };
        send(s, &progress, seq, wbuf)?;
        expect_ok(recv(s, rbuf)?.0, "resync progress")
    }

    fn copy_all(
        &self,
        reg: &Registry,
        s: &mut TcpStream,
        rbuf: &mut RxBuf,
        wbuf: &mut Vec<u8>,
        plans: Vec<(usize, Vec<u64>, bool)>,
    ) -> std::io::Result<()> {
        let started = Instant::now();
        let mut copied: u64 = 0;
        for (i, planned, initial) in plans {
            let l = &self.luns[i];
            let region_bytes = l.region_bytes();
            // Everything planned plus everything dirty (the bitmap only shrinks from here).
            // The plan goes into the bitmap, durably, first: a full or initial copy that is
            // interrupted must resume with what it did not copy yet, not from a bitmap that
            // never named it.
            let mut regions = planned;
            {
                let mut m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
                let mut fresh = 0;
                for &r in &regions {
                    fresh += usize::from(m.bitmap.set(r));
                }
                if fresh > 0 {
                    l.persist(&m)?;
                }
                regions.extend(m.bitmap.iter_dirty());
            }
            regions.sort_unstable();
            regions.dedup();
            l.set_state(SyncState::SyncSource);
            l.resync_total_bytes
                .store(regions.len() as u64 * region_bytes, Ordering::Relaxed);
            l.resync_done_bytes.store(0, Ordering::Relaxed);
            l.resync_started_ms
                .store(now_ms(&self.epoch), Ordering::Relaxed);
            tracing::info!(
                lun = l.key,
                regions = regions.len(),
                initial,
                "resync started"
            );
            let file = File::open(&l.backing)?;
            // The target marks itself inconsistent on the first ResyncData: send the start
            // of the first region as data even if it is a hole, before any hole region goes
            // as WriteZeroes (which the target cannot tell from a mirrored write).
            if let Some(&first) = regions.first() {
                let lun = &reg.luns[i];
                let start = first * region_bytes;
                let end = start + (lun.size_bytes - start).min(HEAD_CHUNK_BYTES);
                let bs = lun.block_size as u64;
                let _guard = lun.ranges.lock_waiting(
                    start / bs,
                    end.div_ceil(bs),
                    Duration::from_micros(200),
                );
                copied += self.copy_range(s, rbuf, wbuf, &file, l, start, end)?;
            }
            self.send_progress(s, rbuf, wbuf, l)?;
            let mut progress_sent = Instant::now();
            // Passes until the bitmap is clean: a region can be dirtied again behind the
            // pass (a mirrored write the peer failed, a write that failed here after being
            // mirrored), and the peer may only hear "done" when it holds everything.
            let mut pass = regions;
            let mut passes = 0;
            let gen = loop {
                for region in pass {
                    if !self.peer_up.load(Ordering::Acquire) {
                        return Err(std::io::Error::other("the peer was lost during the resync"));
                    }
                    copied += self.copy_region(
                        s,
                        rbuf,
                        wbuf,
                        &file,
                        &reg.luns[i],
                        l,
                        region,
                        region_bytes,
                    )?;
                    l.resync_done_bytes
                        .fetch_add(region_bytes, Ordering::Relaxed);
                    let due = Duration::from_secs_f64(
                        copied as f64 / self.cfg.resync_rate_bytes_per_s as f64,
                    );
                    // The rate's pause comes in slices with progress between them: a large
                    // region at a low rate pauses longer than the target waits on a
                    // silent control connection (twice replica_timeout_ms).
                    loop {
                        if progress_sent.elapsed() >= PROGRESS_INTERVAL {
                            self.send_progress(s, rbuf, wbuf, l)?;
                            progress_sent = Instant::now();
                        }
                        match due.checked_sub(started.elapsed()) {
                            Some(wait) if !wait.is_zero() => {
                                std::thread::sleep(wait.min(PROGRESS_INTERVAL));
                            }
                            _ => break,
                        }
                    }
                }
                // Under the transition lock: a peer loss either happened before (and its
                // record stands: no completion) or comes after the completion is persisted
                // (and records the peer outdated again).
                let _t = self.transition.lock().unwrap_or_else(|p| p.into_inner());
                if !self.peer_up.load(Ordering::Acquire) {
                    return Err(std::io::Error::other("the peer was lost during the resync"));
                }
                let mut m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
                let dirty: Vec<u64> = m.bitmap.iter_dirty().collect();
                if dirty.is_empty() {
                    if initial || m.gen.current == 0 {
                        m.gen.bump(random8());
                    }
                    m.gen.resync_done_source();
                    m.flags.peer_outdated = false;
                    m.flags.crashed = false;
                    l.persist(&m)?;
                    break m.gen;
                }
                passes += 1;
                if passes > RESYNC_PASSES_MAX {
                    return Err(std::io::Error::other(format!(
                        "{} regions keep getting dirty during the resync",
                        dirty.len()
                    )));
                }
                l.resync_total_bytes
                    .fetch_add(dirty.len() as u64 * region_bytes, Ordering::Relaxed);
                pass = dirty;
            };
            // Reservations changed while the peer was away were not mirrored: the peer
            // takes the current state before it is declared up to date.
            let (pr, version) = reg.luns[i].pr_snapshot();
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            send(
                s,
                &Message::PrState {
                    lun_key: l.key,
                    origin: self.instance,
                    version,
                    state: pr,
                },
                seq,
                wbuf,
            )?;
            expect_ok(recv(s, rbuf)?.0, "resync reservations")?;
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            send(
                s,
                &Message::ResyncDone {
                    lun_key: l.key,
                    gen,
                },
                seq,
                wbuf,
            )?;
            match recv(s, rbuf)?.0 {
                Message::Ack {
                    status: AckStatus::Ok,
                    ..
                } => {}
                other => {
                    return Err(std::io::Error::other(format!(
                        "peer refused resync completion: {other:?}"
                    )))
                }
            }
            l.set_state(SyncState::UpToDate);
            tracing::info!(
                lun = l.key,
                copied_bytes = copied,
                "resync complete; mirroring"
            );
        }
        let _t = self.transition.lock().unwrap_or_else(|p| p.into_inner());
        if !self.peer_up.load(Ordering::Acquire) {
            // Held writes were recorded by the loss; they stay held (suspend) until the
            // next resync or `outdate-peer`.
            return Err(std::io::Error::other("the peer was lost during the resync"));
        }
        self.outdate_requested.store(false, Ordering::Release);
        self.release_suspended();
        Ok(())
    }

    /// Copies one region under its range lock (no write to it runs meanwhile) and clears
    /// its bit once the peer acknowledged it. Returns the bytes sent.
    #[allow(clippy::too_many_arguments)]
    fn copy_region(
        &self,
        s: &mut TcpStream,
        rbuf: &mut RxBuf,
        wbuf: &mut Vec<u8>,
        file: &File,
        lun: &crate::lun::Lun,
        l: &RepLun,
        region: u64,
        region_bytes: u64,
    ) -> std::io::Result<u64> {
        let bs = lun.block_size as u64;
        let start = region * region_bytes;
        let end = (start + region_bytes).min(lun.size_bytes);
        let _guard =
            lun.ranges
                .lock_waiting(start / bs, end.div_ceil(bs), Duration::from_micros(200));
        let hole = lun.seek(start, true).is_none_or(|d| d >= end);
        let sent = if hole {
            // Nothing allocated here: the peer deallocates the range (and reads zeros).
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            send(
                s,
                &Message::WriteZeroes {
                    lun_key: l.key,
                    offset_bytes: start,
                    len_bytes: end - start,
                    unmap: true,
                },
                seq,
                wbuf,
            )?;
            expect_ok(recv(s, rbuf)?.0, "resync hole")?;
            0
        } else {
            self.copy_range(s, rbuf, wbuf, file, l, start, end)?
        };
        let mut m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
        m.bitmap.clear(region);
        Ok(sent)
    }

    /// Sends `start..end` of the source file as ResyncData chunks, each acknowledged.
    /// The caller holds the range lock (or, for the head chunk, the data is rewritten under
    /// it by the region copy that follows).
    #[allow(clippy::too_many_arguments)]
    fn copy_range(
        &self,
        s: &mut TcpStream,
        rbuf: &mut RxBuf,
        wbuf: &mut Vec<u8>,
        file: &File,
        l: &RepLun,
        start: u64,
        end: u64,
    ) -> std::io::Result<u64> {
        let mut off = start;
        let mut sent = 0;
        while off < end {
            let n = ((end - off) as usize).min(RESYNC_CHUNK_BYTES);
            let mut data = vec![0u8; n];
            file.read_exact_at(&mut data, off)?;
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            send(
                s,
                &Message::ResyncData {
                    lun_key: l.key,
                    offset_bytes: off,
                    data,
                },
                seq,
                wbuf,
            )?;
            expect_ok(recv(s, rbuf)?.0, "resync data")?;
            off += n as u64;
            sent += n as u64;
        }
        Ok(sent)
    }

    /// `twinsan verify`: compares every region's SHA-256 with the peer's, online (each region
    /// is hashed under its range lock, so no write to it runs meanwhile). Differing regions are
    /// reported; with `repair` they are marked dirty and copied by a resync (the peer is
    /// declared outdated so the manager reconnects and copies them).
    pub fn verify(&self, repair: bool) -> Result<String, String> {
        use std::fmt::Write as _;
        if !self.is_primary() {
            return Err("verify runs on the primary".into());
        }
        let Some(reg) = self.registry() else {
            return Err("shutting down".into());
        };
        let (mut s, mut rbuf, _) = self
            .connect(LINK_NONE)
            .map_err(|e| format!("peer unreachable: {e}"))?;
        let mut wbuf = Vec::new();
        let mut report = String::new();
        let mut differing_total = 0u64;
        for (i, l) in self.luns.iter().enumerate() {
            let lun = &reg.luns[i];
            let region_bytes = l.region_bytes();
            let regions = lun.size_bytes.div_ceil(region_bytes);
            let mut differing = Vec::new();
            for region in 0..regions {
                let bs = lun.block_size as u64;
                let (start, end) = (
                    region * region_bytes,
                    ((region + 1) * region_bytes).min(lun.size_bytes),
                );
                let _guard = lun.ranges.lock_waiting(
                    start / bs,
                    end.div_ceil(bs),
                    Duration::from_micros(200),
                );
                let local =
                    region_digest(&l.backing, region, region_bytes).map_err(|e| e.to_string())?;
                let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                send(
                    &mut s,
                    &Message::VerifyRequest {
                        lun_key: l.key,
                        region,
                    },
                    seq,
                    &mut wbuf,
                )
                .map_err(|e| e.to_string())?;
                match recv(&mut s, &mut rbuf).map_err(|e| e.to_string())?.0 {
                    Message::VerifyDigest { digest, .. } if digest == local => {}
                    Message::VerifyDigest { .. } => differing.push(region),
                    other => {
                        return Err(format!("peer could not digest region {region}: {other:?}"))
                    }
                }
            }
            let _ = writeln!(
                report,
                "lun {:016x}: {} regions compared, {} differ{}",
                l.key,
                regions,
                differing.len(),
                if differing.is_empty() {
                    String::new()
                } else {
                    format!(": {differing:?}")
                }
            );
            if repair && !differing.is_empty() {
                let mut m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
                for &r in &differing {
                    m.bitmap.set(r);
                }
                l.persist(&m).map_err(|e| e.to_string())?;
            }
            differing_total += differing.len() as u64;
        }
        let _ = s.shutdown(std::net::Shutdown::Both);
        if repair && differing_total > 0 {
            // Copy them now: the manager's next connection resyncs the dirty regions.
            self.peer_lost("verify found differing regions");
            let _ = writeln!(report, "differing regions marked for resync");
        }
        Ok(report)
    }

    /// A clean stop: no write is in flight any more, so the crash marker goes.
    pub fn clean_shutdown(&self) {
        for l in &self.luns {
            let m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
            // Nothing is in flight any more: no write-intent region needs to survive.
            if l.persist_with(&m, &[]).is_ok() {
                let _ = std::fs::remove_file(running_marker(&l.backing));
            }
        }
    }

    /// Status lines for `twinsan status`.
    pub fn status(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let up = self.peer_up.load(Ordering::Acquire);
        let link = if !self.is_primary() {
            // A secondary's own peer_up says nothing: whether a primary is there does.
            if self.primary_links.load(Ordering::Acquire) > 0 {
                "primary connected, receiving its writes"
            } else {
                "no primary connected"
            }
        } else if up {
            "connected, mirroring"
        } else {
            "not mirroring"
        };
        let _ = writeln!(
            s,
            "peer: {} at {} ({link})",
            self.cfg.name, self.cfg.address
        );
        let theirs = self.peer_wire_version.load(Ordering::Relaxed);
        if theirs != 0 {
            let _ = writeln!(
                s,
                "note: the peer speaks replica protocol version {theirs}, this node {}: \
                 run the same twinsan version on both nodes",
                wire::VERSION
            );
        }
        if let Some(note) = self
            .start_note
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = writeln!(s, "note: {note}");
        }
        for l in &self.luns {
            let m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
            let mut line = format!(
                "replica lun {:016x}: {:?} gen current={:016x} bitmap={:016x} dirty={} bytes",
                l.key,
                l.state(),
                m.gen.current,
                m.gen.bitmap,
                m.bitmap.dirty_bytes()
            );
            let progress = match l.state() {
                SyncState::SyncSource => Some(self.resync_progress(l)),
                // Only while the source is connected: an interrupted resync's last
                // figures would look like one going on.
                SyncState::SyncTarget if self.primary_links.load(Ordering::Acquire) > 0 => Some((
                    l.resync_done_bytes.load(Ordering::Relaxed),
                    l.resync_total_bytes.load(Ordering::Relaxed),
                    l.resync_eta_ms.load(Ordering::Relaxed),
                )),
                _ => None,
            };
            // A target that has not heard the source's plan yet (an older primary, or the
            // first region still on its way) says so rather than 0%.
            if let Some((done, total, eta_ms)) = progress.filter(|&(_, total, _)| total > 0) {
                let eta = match eta_ms {
                    ETA_UNKNOWN => "unknown".to_string(),
                    ms => format!("{:.0}s", ms as f64 / 1000.0),
                };
                let _ = write!(
                    line,
                    " resync {:.1}% eta {eta}",
                    done.min(total) as f64 * 100.0 / total as f64,
                );
            }
            let _ = writeln!(s, "{line}");
        }
        s
    }

    /// A command failed on this node (out of space, an I/O error) after its change to
    /// `[offset, offset + len)` of LUN `lun` was mirrored: the peer may have stored what
    /// this node did not, and the copies differ there. The range goes into the dirty
    /// bitmap and the peer is declared lost, so the resync that follows at once makes the
    /// peer's range equal to ours again (as `verify --repair` does). While the peer is
    /// away already, the degraded path recorded the range.
    pub fn diverged(&self, lun: usize, offset: u64, len: u64) {
        if !self.peer_up.load(Ordering::Acquire) || len == 0 {
            return;
        }
        let Some(l) = self.luns.get(lun) else { return };
        {
            let mut m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
            m.bitmap.mark(offset, len);
            if let Err(e) = l.persist(&m) {
                tracing::error!(error = %e, "cannot persist the dirty bitmap");
            }
        }
        tracing::warn!(
            lun = l.key,
            offset,
            len,
            "a mirrored command failed on this node: resyncing its range to the peer"
        );
        self.peer_lost("a mirrored command failed on this node");
    }

    /// Whether writes to LUN `lun` are mirrored (or tracked) by this node.
    pub fn replicates(&self) -> bool {
        // Not the role: initiators' writes reach only a primary, but a write that was
        // running when the node was demoted is still mirrored (drain_after_demotion).
        true
    }

    /// Whether a write to `[offset, offset + len)` of LUN `lun` may be issued now: on the
    /// primary, every region it touches must be in the persisted write-intent log first.
    /// `false`: the regions are asked for; retry shortly (with the range lock released).
    ///
    /// `Err(errno)` once the metadata file has failed to take the log for
    /// [`INTENT_PERSIST_WAIT_MS`]: the write fails with that error's sense (MEDIUM ERROR, or
    /// SPACE ALLOCATION FAILED on a full file system) instead of waiting without end, which
    /// an initiator sees as a hung LUN (ESXi aborts and retries, then declares the path
    /// dead). Writes to regions already recorded go on.
    pub fn write_intent_ready(&self, lun: usize, offset: u64, len: u64) -> Result<bool, i32> {
        let Some(l) = self.luns.get(lun) else {
            return Ok(true);
        };
        if l.intent.ready(offset, len) {
            return Ok(true);
        }
        let since = l.intent_failing_since_ms.load(Ordering::Acquire);
        if since != 0 && now_ms(&self.epoch).saturating_sub(since) >= INTENT_PERSIST_WAIT_MS {
            return Err(l.intent_errno.load(Ordering::Acquire));
        }
        *self.intent_asked.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.intent_cv.notify_one();
        Ok(false)
    }

    /// The write-intent keeper: persists wanted regions (one metadata write for everything
    /// asked meanwhile) and cools idle ones (intent.rs).
    fn keep_intents(self: Arc<Self>) {
        let mut last_cool = Instant::now();
        loop {
            {
                let asked = self.intent_asked.lock().unwrap_or_else(|p| p.into_inner());
                let (mut asked, _) = self
                    .intent_cv
                    .wait_timeout_while(asked, Duration::from_millis(INTENT_POLL_MS), |a| !*a)
                    .unwrap_or_else(|p| p.into_inner());
                *asked = false;
            }
            let mut failed = false;
            for l in &self.luns {
                let wanted = l.intent.take_wanted();
                if wanted.is_empty() {
                    continue;
                }
                let m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
                let mut all = l.intent.durable_regions();
                all.extend_from_slice(&wanted);
                match l.persist_with(&m, &all) {
                    Ok(()) => {
                        l.intent.made_durable(&wanted);
                        l.intent_failing_since_ms.store(0, Ordering::Release);
                    }
                    Err(e) => {
                        let errno = e.raw_os_error().unwrap_or(libc::EIO);
                        l.intent_errno.store(errno, Ordering::Release);
                        // Never 0 (which means "not failing"), even in the first millisecond.
                        let now = now_ms(&self.epoch).max(1);
                        let _ = l.intent_failing_since_ms.compare_exchange(
                            0,
                            now,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        );
                        // Writes to these regions wait: issuing them unrecorded could lose
                        // track of a divergence after a crash.
                        // Retried every INTENT_POLL_MS while writes ask: at most one line a
                        // second (log_limit.rs).
                        static FAILED: crate::log_limit::LogLimit =
                            crate::log_limit::LogLimit::new(1);
                        if let Some(suppressed) = FAILED.allow() {
                            tracing::error!(lun = l.key, error = %e, suppressed, "cannot persist the write-intent log; writes to new regions wait, and fail after {INTENT_PERSIST_WAIT_MS} ms");
                        }
                        l.intent.want_again(&wanted);
                        failed = true;
                    }
                }
            }
            if last_cool.elapsed() >= Duration::from_millis(INTENT_COOL_MS) {
                last_cool = Instant::now();
                self.cool_intents();
            }
            if failed {
                // Every waiting write asks again at once: retry at the poll period, not in
                // a loop of failing metadata writes.
                std::thread::sleep(Duration::from_millis(INTENT_POLL_MS));
            }
        }
    }

    /// Forgets write-intent regions nobody wrote during the last period, each under its
    /// range lock (so no write to it is in flight), and persists the result.
    fn cool_intents(&self) {
        let Some(reg) = self.registry() else { return };
        for (i, l) in self.luns.iter().enumerate() {
            let Some(lun) = reg.luns.get(i) else { continue };
            let per = l.intent.region_bytes();
            let bs = u64::from(lun.block_size);
            let mut forgot = 0usize;
            for r in l.intent.idle_regions() {
                let (lo, hi) = ((r * per) / bs, ((r + 1) * per).div_ceil(bs));
                if let Some(guard) = lun.ranges.try_lock(lo, hi) {
                    l.intent.forget(r);
                    drop(guard);
                    forgot += 1;
                }
            }
            if forgot > 0 {
                let m = l.meta.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = l.persist(&m) {
                    // The old, larger set stays on disk: only a longer resync after a crash.
                    tracing::warn!(lun = l.key, error = %e, "cannot persist the cooled write-intent log");
                }
            }
        }
    }
}

/// `lun0.img.running`: present while a daemon serves the LUN with replication.
/// Whether reservation snapshot `next` (origin, version) replaces the one applied last:
/// a newer version from the same primary instance, or anything from another instance (a
/// new primary, or the same one restarted: its versions start again).
fn pr_snapshot_supersedes(applied: (u64, u64), next: (u64, u64)) -> bool {
    applied.0 != next.0 || next.1 > applied.1
}

/// Counts a replica connection as authenticating until dropped (also by a panic's unwind).
struct Authenticating(Arc<AtomicUsize>);

impl Authenticating {
    /// Takes over one count already added by the acceptor.
    fn new(count: Arc<AtomicUsize>) -> Self {
        Authenticating(count)
    }
}

impl Drop for Authenticating {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// TCP keepalive on a replica socket: first probe after 5 s idle, then every 2 s, given up
/// after 3 unanswered probes.
fn keep_alive(s: &TcpStream) -> std::io::Result<()> {
    let fd = s.as_raw_fd();
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 5),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 2),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ] {
        let v: libc::c_int = value;
        // SAFETY: `fd` is a live socket owned by `s`; the option value is a c_int on our
        // stack whose size we pass.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// This boot's id (Linux: a random UUID per boot); empty when unknown.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Whether the running marker was written during this boot (an unknown boot counts as
/// another: the safe answer, a full resync).
fn same_boot(marker: &std::path::Path) -> bool {
    let now = boot_id();
    !now.is_empty() && std::fs::read_to_string(marker).is_ok_and(|then| then.trim() == now)
}

fn running_marker(backing: &std::path::Path) -> PathBuf {
    let mut p = backing.as_os_str().to_owned();
    p.push(".running");
    PathBuf::from(p)
}

/// SHA-256 of one region of a backing file (the last region may be short).
fn region_digest(
    path: &std::path::Path,
    region: u64,
    region_bytes: u64,
) -> std::io::Result<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let f = File::open(path)?;
    let size = f.metadata()?.len();
    let start = region.saturating_mul(region_bytes);
    let end = start.saturating_add(region_bytes).min(size);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; RESYNC_CHUNK_BYTES];
    let mut off = start;
    while off < end {
        let n = ((end - off) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], off)?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(h.finalize().into())
}

/// Regions holding data (SEEK_DATA), for the first sync of a thin LUN.
/// Replaces the metadata file atomically and durably: a temporary file, synced, renamed
/// over the old one, and the directory synced so the rename survives a crash.
/// Replaces the metadata file atomically: the new bytes go into `<path>.tmp`, which is
/// synced and then exchanged with `path` (renameat2 RENAME_EXCHANGE), so the old copy
/// becomes the next `.tmp`. Why an exchange and an overwrite in place rather than
/// create-truncate-rename: both files keep their blocks, so once they exist no metadata
/// write needs new blocks. On a thin LUN whose file system filled up, the dirty bitmap
/// and the write-intent log must still persist (or writes to new regions would wait
/// forever); data writes then fail with SPACE ALLOCATION FAILED, as without a peer.
fn write_meta(path: &std::path::Path, m: &Meta) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileExt;
    let mut bytes = Vec::new();
    m.encode(&mut bytes);
    let tmp = path.with_extension("meta.tmp");
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&tmp)?;
        f.write_all_at(&bytes, 0)?;
        if f.metadata()?.len() > bytes.len() as u64 {
            f.set_len(bytes.len() as u64)?;
        }
        f.sync_all()?;
    }
    let c = |p: &std::path::Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (from, to) = (c(&tmp)?, c(path)?);
    // SAFETY: both are NUL-terminated paths that live across the call; renameat2 only
    // reads them.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // No metadata yet (the first write), or a file system without exchange.
            Some(libc::ENOENT) | Some(libc::EINVAL) => std::fs::rename(&tmp, path)?,
            _ => return Err(e),
        }
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// An Ack with status Ok, or an error naming `what`.
fn expect_ok(m: Message, what: &str) -> std::io::Result<()> {
    match m {
        Message::Ack {
            status: AckStatus::Ok,
            ..
        } => Ok(()),
        other => Err(std::io::Error::other(format!(
            "peer failed {what}: {other:?}"
        ))),
    }
}

fn allocated_regions(lun: &crate::lun::Lun, region_bytes: u64) -> Vec<u64> {
    let mut v: Vec<u64> = Vec::new();
    let mut pos = 0;
    while pos < lun.size_bytes {
        let Some(start) = lun.seek(pos, true).filter(|&s| s < lun.size_bytes) else {
            break;
        };
        let end = lun
            .seek(start, false)
            .unwrap_or(lun.size_bytes)
            .min(lun.size_bytes);
        if end <= start {
            break;
        }
        for r in start / region_bytes..end.div_ceil(region_bytes) {
            if v.last() != Some(&r) {
                v.push(r);
            }
        }
        pos = end;
    }
    v
}

fn punch(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    fallocate(
        f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

fn zero_range(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    fallocate(
        f,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

fn fallocate(f: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a valid open fd; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The raw fd of a core's eventfd, for its io_uring read.
pub fn efd_raw(l: &CoreLink) -> RawFd {
    l.bell.raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out at most `step` bytes per read, like a socket under load.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.bytes.len().min(self.step).min(out.len());
            out[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    #[test]
    fn an_overtaken_reservation_snapshot_does_not_replace_a_newer_one() {
        let applied = (7, 5);
        assert!(
            !pr_snapshot_supersedes(applied, (7, 4)),
            "older, other link"
        );
        assert!(!pr_snapshot_supersedes(applied, (7, 5)), "the same again");
        assert!(pr_snapshot_supersedes(applied, (7, 6)));
        assert!(pr_snapshot_supersedes(applied, (9, 1)), "a new primary");
    }

    #[test]
    fn link_receive_decodes_every_message_in_order_however_the_bytes_arrive() {
        // Small writes, acks, and one message larger than a read, so that partial messages
        // are carried over and moved at every position.
        let mut msgs = Vec::new();
        for i in 0..200u64 {
            let len = if i == 77 {
                3 * RX_READ_BYTES
            } else {
                512 * (1 + i as usize % 9)
            };
            msgs.push(Message::Write {
                lun_key: 7,
                offset_bytes: i * 4096,
                fua: i % 5 == 0,
                data: (0..len).map(|b| (b as u64 ^ i) as u8).collect(),
            });
            msgs.push(Message::Ack {
                seq: i,
                status: AckStatus::Ok,
            });
        }
        let mut wire_bytes = Vec::new();
        for (seq, m) in msgs.iter().enumerate() {
            wire::encode(m, seq as u64, &mut wire_bytes);
        }
        for step in [1usize, 1000, 4096, 65_537, 1 << 20] {
            let mut src = Trickle {
                bytes: &wire_bytes,
                step,
            };
            let mut rx = RxBuf::default();
            let mut got = Vec::new();
            while got.len() < msgs.len() {
                match rx.next().unwrap() {
                    Some(m) => got.push(m),
                    None => rx.fill(&mut src).unwrap(),
                }
            }
            for (seq, (m, (g, gseq))) in msgs.iter().zip(&got).enumerate() {
                assert_eq!((m, seq as u64), (g, *gseq), "step {step}");
            }
            assert!(rx.next().unwrap().is_none());
            // The stream is exhausted: the next read reports the peer gone.
            assert!(rx.fill(&mut src).is_err());
        }
    }
}
