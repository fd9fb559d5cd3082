//! One iSCSI connection (and, since we negotiate MaxConnections=1, its session), as a
//! state machine with no I/O of its own: received bytes go in; bytes to send and disk I/O
//! requests come out; disk completions go back in. The core's reactor does the I/O.
//!
//! This file holds the connection's state, its tasks and what it hands the reactor, and
//! the PDU senders. The rooms, each adding to `impl Conn`:
//!
//! - `recv`: received bytes to PDUs (and lent receive buffers), CmdSN order, dispatch.
//! - `session`: login to full feature, NOP, text, the tick (timeouts, pings), shutdown.
//! - `tasks`: the task table, a SCSI command's start and the steps that follow it.
//! - `data_out`: immediate data, Data-Out PDUs and R2Ts.
//! - `response`: a task's Data-In and SCSI Response.
//! - `tmf`: task management functions and aborts.
//! - `mirror`: a task's changes queued for the peer, and the peer's acknowledgements.
//! - `addressing`: the LUN field and I_T nexus tags.

use std::net::SocketAddr;
use std::sync::Arc;

use proto::pdu::{
    self, frame_len, Digests, InitiatorPdu, RejectReason, TargetPdu, TargetSns, BHS_LEN,
};
use proto::scsi::sense::Asc;
use proto::seq::CmdWindow;

use crate::disk::bufpool::{AlignedBuf, MAX_BUF_BYTES};
use crate::iscsi::login::{LoginPhase, SessionKind};
use crate::registry::Registry;
use crate::scsi::{self, ScsiTask, Step};

mod addressing;
mod data_out;
mod mirror;
mod recv;
mod response;
mod session;
mod tasks;
mod tmf;

pub use addressing::{decode_lun, encode_lun, nexus_tag};

/// SCSI status codes (SAM-5), from `proto`.
pub use proto::scsi::status;

/// The largest data segment we accept during login (RFC 7143 section 11.12.5 keeps login
/// PDUs at 8192 bytes until MaxRecvDataSegmentLength is negotiated).
const LOGIN_MAX_DATA_BYTES: usize = 8192;
/// Commands held for a CmdSN gap at most: a window's worth is all a correct initiator sends.
const MAX_HELD_COMMANDS: usize = 1024;
/// A write whose immediate data is its whole transfer and at least this long takes the
/// receive buffer it arrived in as its data buffer instead of a copy (see `on_recv_lent`).
/// Why: copying 128 KiB out of the receive buffer was a third of a core's time per 128 KiB
/// write once the page-cache copy had moved to the spill helper (`perf`, memmove).
pub const LEND_MIN_BYTES: usize = 32 << 10;

/// A read's Data-In segment at least this long goes out from the task's buffer instead of a
/// copy in the send queue (sendq.rs); shorter ones cost less to copy than an iovec.
pub const SEND_IN_PLACE_MIN_BYTES: usize = 16 << 10;

/// What [`Conn::on_recv`] did with the bytes it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes consumed from the front.
    pub used_bytes: usize,
    /// It stopped before a whole PDU of this many bytes that should be lent: a write whose
    /// immediate data is its whole transfer. The caller hands exactly that PDU over with
    /// [`Conn::on_recv_lent`] and then calls `on_recv` again for what follows it.
    pub lend_bytes: Option<usize>,
}

/// Immediate data of a SCSI command: borrowed from the receive buffer (copied into the
/// task's buffer), or a lent receive buffer narrowed to the data (taken as the task's buffer).
enum ImmData<'a> {
    Borrowed(&'a [u8]),
    Lent(AlignedBuf),
}

impl ImmData<'_> {
    fn len(&self) -> usize {
        match self {
            ImmData::Borrowed(d) => d.len(),
            ImmData::Lent(b) => b.len(),
        }
    }
}

/// A disk operation the reactor submits for a task.
#[derive(Debug, Clone, Copy)]
pub struct IoReq {
    pub task: u32,
    /// Index into the registry's LUN list (and the core's fixed-file table).
    pub lun: usize,
    pub op: scsi::IoOp,
}

/// What the connection asks of the reactor after each event.
#[derive(Default)]
pub struct Out {
    /// Bytes to append to the socket's send queue.
    pub send: Vec<u8>,
    /// Data segments sent from task buffers in place, spliced into `send` (sendq.rs).
    pub send_refs: Vec<crate::net::sendq::SendRef>,
    /// The buffers `send_refs` point into, each released once the first `.0` bytes of
    /// `send` (and the refs before that point) have gone out.
    pub send_holds: Vec<(usize, AlignedBuf)>,
    pub io: Vec<IoReq>,
    /// Close once everything queued so far has been sent.
    pub close_after_send: bool,
    /// Close now (protocol violation that makes the stream untrustworthy).
    pub close_now: bool,
    /// Operations to mirror to the peer; `token` holds the task index (the reactor adds
    /// the connection's slot).
    pub rep: Vec<crate::replication::RepReq>,
    /// Byte ranges (LUN, offset, length) of commands that failed here after mirroring a
    /// change: the peer may hold what this node does not (`replication::mirror`, `diverged`).
    pub diverged: Vec<(usize, u64, u64)>,
}

/// Write data still to arrive for a task.
struct DataOutState {
    /// Bytes the initiator will send (Expected Data Transfer Length).
    expected_bytes: u32,
    /// Bytes the command needs (from the CDB); data past this is received and dropped.
    needed_bytes: u32,
    received_bytes: u32,
    /// Offset up to which data has been solicited or was allowed unsolicited.
    solicited_to: u32,
    /// Outstanding R2T: (TTT, offset, length, next expected DataSN).
    r2t: Option<(u32, u32, u32, u32)>,
    r2t_sn: u32,
    /// Next DataSN expected in the unsolicited sequence.
    unsolicited_data_sn: u32,
    unsolicited_open: bool,
    /// The command needs no data (a READ sent with the W bit, VERIFY without BYTCHK, a
    /// refused partial-block write): consume what the initiator sends and drop it.
    discard: bool,
}

struct Task {
    itt: u32,
    lun_id: u64,
    lun: usize,
    edtl: u32,
    read_dir: bool,
    /// Data-Out bytes the command takes (a parameter list's length from its CDB): what
    /// its residual counts against when its reply does not say otherwise. Why: an UNMAP
    /// that took its whole list was answered with an underflow of the list's length.
    takes_bytes: u32,
    scsi: ScsiTask,
    data_out: Option<DataOutState>,
    io_inflight: u32,
    aborted: bool,
    /// The step to take once discarded Data-Out has all arrived.
    deferred: Option<Step>,
    /// Mirrored operations not yet acknowledged by the peer.
    rep_inflight: u32,
    /// The final reply, held until the peer acknowledged every mirrored operation.
    held: Option<scsi::Reply>,
    rep_failed: bool,
    /// The byte range (LUN, start, end) of the changes mirrored for this command.
    mirrored: Option<(usize, u64, u64)>,
    /// What the metrics count it as, and when it arrived (read only when metrics are
    /// served: the clock read is a visible share of a 4 KiB read's cost).
    kind: crate::metrics::CmdKind,
    arrived: Option<std::time::Instant>,
}

/// A command that arrived ahead of a CmdSN gap, with its immediate data.
struct Held {
    cmd_sn: u32,
    pdu: InitiatorPdu,
    data: Vec<u8>,
}

struct Session {
    kind: SessionKind,
    /// The I_T nexus (initiator port name + our target port) reservations are keyed by.
    nexus: proto::scsi::pr::Nexus,
    /// A stable tag of `nexus` for unit attentions addressed to it.
    nexus_tag: u64,
    /// Index of the target in the registry (normal sessions).
    target: usize,
    /// The target as of [`Session::view_gen`] (session.rs `follow_reload` renews it).
    entry: Option<Arc<crate::registry::TargetEntry>>,
    /// The registry's view generation `entry` and `luns` reflect.
    view_gen: u64,
    window: CmdWindow,
    params: proto::login::negotiate::SessionParams,
    /// Per mapped LUN: (LUN id, registry index, last UA epoch seen, pending UAs).
    luns: Vec<LunView>,
}

struct LunView {
    id: u64,
    index: usize,
    ua_seen: crate::scsi::unit_attention::Seen,
    pending_ua: Vec<Asc>,
}

enum Phase {
    Login(Box<LoginPhase>),
    Full(Box<Session>),
}

pub struct Conn {
    pub session_id: u64,
    peer: SocketAddr,
    /// Our end of the connection (what SendTargets advertises behind a wildcard listen).
    local: Option<SocketAddr>,
    phase: Phase,
    digests: Digests,
    stat_sn: u32,
    tasks: Vec<Option<Task>>,
    free_tasks: Vec<u32>,
    held: Vec<Held>,
    next_ttt: u32,
    /// Tasks parked on a range lock, retried by the reactor (FIFO).
    waiting: Vec<u32>,
    /// 1 while a task's final response is being framed (it is freed right after).
    answering: u32,
    /// Tasks waiting for something slow (a sanitize), retried on the timer tick.
    waiting_slow: Vec<u32>,
    /// TMF responses that wait for aborted tasks' in-flight I/O to finish.
    deferred_tmf: Vec<(u32, u8)>,
    last_rx_ms: u64,
    ping: Option<(u32, u64)>,
    started_ms: u64,
    pub closing: bool,
    /// Whether this session was already subtracted from the registry's session count.
    counted_out: bool,
    /// Set by a newer login of the same initiator, ISID and target (reinstatement): this
    /// session closes at the next tick, its I_T nexus already lost.
    reinstated: Arc<std::sync::atomic::AtomicBool>,
    /// The counters this connection's commands go into, and its core (the one writer).
    metrics: Option<(Arc<crate::metrics::Metrics>, usize)>,
}

impl Conn {
    pub fn new(reg: &Registry, peer: SocketAddr, local: Option<SocketAddr>, now_ms: u64) -> Self {
        let session_id = reg.new_session_id();
        Conn {
            session_id,
            peer,
            local,
            phase: Phase::Login(Box::new(LoginPhase::new(reg, peer))),
            digests: Digests::default(),
            stat_sn: 0,
            tasks: Vec::new(),
            free_tasks: Vec::new(),
            held: Vec::new(),
            next_ttt: 1,
            deferred_tmf: Vec::new(),
            waiting: Vec::new(),
            answering: 0,
            waiting_slow: Vec::new(),
            last_rx_ms: now_ms,
            ping: None,
            started_ms: now_ms,
            closing: false,
            counted_out: false,
            reinstated: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            metrics: None,
        }
    }

    /// Counts this connection's answered commands into `metrics` as core `core`'s (the
    /// thread that owns this connection and calls its methods).
    pub fn count_into(&mut self, metrics: Arc<crate::metrics::Metrics>, core: usize) {
        self.metrics = Some((metrics, core));
    }

    /// Largest PDU (all segments) we may receive now: the reactor sizes its buffer by it.
    pub fn max_pdu_bytes(&self) -> usize {
        BHS_LEN + 1024 + 8 + self.max_recv_data_bytes() + 4
    }

    /// The total length of the PDU whose header starts `buf`, once the header is there;
    /// None before that or for a header on_recv will refuse (it closes the connection).
    pub fn frame_bytes(&self, buf: &[u8]) -> Option<usize> {
        let bhs: &[u8; BHS_LEN] = buf.get(..BHS_LEN)?.try_into().ok()?;
        frame_len(bhs, self.digests, self.max_recv_data_bytes())
            .ok()
            .map(|f| f.total_len_bytes)
    }

    fn max_recv_data_bytes(&self) -> usize {
        match &self.phase {
            Phase::Login(_) => LOGIN_MAX_DATA_BYTES,
            Phase::Full(s) => s.params.target_mrdsl_bytes as usize,
        }
    }

    fn sns(&mut self) -> TargetSns {
        // Commands in the target: tasks not yet answered, and those held for a CmdSN gap.
        let live =
            (self.tasks.len() - self.free_tasks.len()).saturating_sub(self.answering as usize);
        let busy = (live + self.held.len()) as u32;
        let (exp, max) = match &mut self.phase {
            Phase::Full(s) => {
                s.window.open_for(busy);
                (s.window.exp_cmd_sn(), s.window.max_cmd_sn())
            }
            Phase::Login(l) => (l.exp_cmd_sn(), l.exp_cmd_sn()),
        };
        TargetSns {
            stat_sn: self.stat_sn,
            exp_cmd_sn: exp,
            max_cmd_sn: max,
        }
    }

    /// Sends a PDU that carries a StatSN and advances it (RFC 7143 section 4.2.2.2).
    fn send_status_pdu(
        &mut self,
        out: &mut Out,
        mk: impl FnOnce(TargetSns) -> TargetPdu,
        data: &[u8],
    ) {
        let sns = self.sns();
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let bhs = mk(sns).encode_bhs();
        pdu::write_pdu(&mut out.send, &bhs, data, self.digests);
    }

    /// Sends a PDU whose StatSN field is informational (R2T, unsolicited NOP-In, Reject).
    fn send_plain_pdu(
        &mut self,
        out: &mut Out,
        mk: impl FnOnce(TargetSns) -> TargetPdu,
        data: &[u8],
    ) {
        let bhs = mk(self.sns()).encode_bhs();
        pdu::write_pdu(&mut out.send, &bhs, data, self.digests);
    }

    fn reject(&mut self, out: &mut Out, reason: RejectReason, bhs: &[u8; BHS_LEN]) {
        tracing::debug!(peer = %self.peer, ?reason, opcode = bhs[0] & 0x3f, "rejecting PDU");
        // RFC 7143 section 11.17: a Reject carries StatSN and advances it like a response.
        self.send_status_pdu(
            out,
            |sns| TargetPdu::Reject {
                reason,
                data_sn: 0,
                sns,
            },
            bhs,
        );
    }
}

// The task buffer limit also bounds one command's transfer length.
const _: () = assert!(MAX_BUF_BYTES >= 16 << 20);

#[allow(dead_code)]
fn _assert_send() {
    fn is_send<T: Send>() {}
    is_send::<Arc<Registry>>();
}

/// The SCSI layer's context for task `t`'s command, or None outside the full feature phase.
/// Why one function: every path that runs a SCSI step (a new command's data, a completed
/// I/O, a retry) builds the same view of the session and LUN.
fn task_ctx<'a>(
    phase: &'a Phase,
    session_id: u64,
    t: &Task,
    reg: &'a Registry,
    pool: &'a mut crate::disk::bufpool::BufPool,
) -> Option<crate::scsi::ExecCtx<'a>> {
    let Phase::Full(s) = phase else { return None };
    let lun = (t.lun != usize::MAX).then_some(t.lun);
    Some(crate::scsi::ExecCtx::new(
        reg,
        s.entry.as_deref()?,
        (lun, t.lun_id),
        pool,
        session_id,
        &s.nexus,
    ))
}
