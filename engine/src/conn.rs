//! One iSCSI connection (and, since we negotiate MaxConnections=1, its session), as a
//! state machine with no I/O of its own: received bytes go in; bytes to send and disk I/O
//! requests come out; disk completions go back in. The core's reactor does the I/O.

use std::net::SocketAddr;
use std::sync::Arc;

use proto::pdu::{
    self, frame_len, parse_initiator, split_frame, Digests, InitiatorPdu, RejectReason, Residual,
    TargetPdu, TargetSns, BHS_LEN, RESERVED_TAG,
};
use proto::scsi::sense::{Asc, Sense, SenseFormat};
use proto::seq::{CmdSnPlace, CmdWindow};

use crate::bufpool::{AlignedBuf, BufPool, MAX_BUF_BYTES};
use crate::config::CacheMode;
use crate::login::{LoginDone, LoginPhase, SessionKind};
use crate::registry::Registry;
use crate::scsi::{self, ExecCtx, ReplyData, ScsiTask, Step};

/// SCSI status codes (SAM-5).
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
}

/// TMF response codes (RFC 7143 section 11.6.1).
mod tmf_response {
    pub const FUNCTION_COMPLETE: u8 = 0;
    pub const TASK_DOES_NOT_EXIST: u8 = 1;
    pub const LUN_DOES_NOT_EXIST: u8 = 2;
    /// RFC 7143 section 11.6.1: TASK REASSIGN below ErrorRecoveryLevel 2.
    pub const REASSIGNMENT_NOT_SUPPORTED: u8 = 4;
    pub const NOT_SUPPORTED: u8 = 5;
}

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
    pub send_refs: Vec<crate::sendq::SendRef>,
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
    /// change: the peer may hold what this node does not (replication.rs `diverged`).
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
    window: CmdWindow,
    params: proto::login::negotiate::SessionParams,
    /// Per mapped LUN: (LUN id, registry index, last UA epoch seen, pending UAs).
    luns: Vec<LunView>,
}

struct LunView {
    id: u64,
    index: usize,
    ua_seen: crate::ua::Seen,
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
        }
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

    /// Consumes complete PDUs from `buf`. Stops early when the connection is closing, or
    /// before a PDU to be lent (see [`Received`]).
    pub fn on_recv(
        &mut self,
        buf: &[u8],
        reg: &Registry,
        pool: &mut BufPool,
        now_ms: u64,
        out: &mut Out,
    ) -> Received {
        let used = self.consume(buf, true, reg, pool, now_ms, out);
        let lend_bytes = (!self.closing)
            .then(|| self.frame_bytes(&buf[used..]))
            .flatten()
            .filter(|&total| buf.len() - used >= total && self.lendable(&buf[used..]));
        Received {
            used_bytes: used,
            lend_bytes,
        }
    }

    /// Whether the whole PDU at the start of `buf` is a write to lend its buffer to: a SCSI
    /// command with the F and W bits (RFC 7143 section 11.3.1) whose immediate data is its
    /// whole Expected Data Transfer Length, on a normal session that negotiated
    /// ImmediateData. Anything on_recv_lent then finds unusual goes the ordinary way.
    fn lendable(&self, buf: &[u8]) -> bool {
        let Phase::Full(s) = &self.phase else {
            return false;
        };
        let Some(bhs) = buf
            .get(..BHS_LEN)
            .and_then(|b| <&[u8; BHS_LEN]>::try_from(b).ok())
        else {
            return false;
        };
        let b = pdu::Bhs::new(bhs);
        let edtl = u32::from_be_bytes([bhs[20], bhs[21], bhs[22], bhs[23]]) as usize;
        s.kind == SessionKind::Normal
            && s.params.immediate_data
            && b.opcode() == pdu::opcode::SCSI_COMMAND
            && bhs[1] & 0xa0 == 0xa0
            && b.data_segment_len_bytes() >= LEND_MIN_BYTES
            && b.data_segment_len_bytes() == edtl
    }

    /// Takes one whole PDU that on_recv asked to lend, in a receive buffer narrowed to it.
    /// An in-order write command takes the buffer as its data buffer; anything else is
    /// consumed the ordinary way and the buffer goes back to the pool.
    pub fn on_recv_lent(
        &mut self,
        mut frame_buf: AlignedBuf,
        reg: &Registry,
        pool: &mut BufPool,
        now_ms: u64,
        out: &mut Out,
    ) {
        self.last_rx_ms = now_ms;
        if let Some((c, data_at, data_len)) = self.lent_command(&frame_buf) {
            frame_buf.narrow(data_at, data_len);
            if !c.immediate {
                if let Phase::Full(s) = &mut self.phase {
                    s.window.advance();
                }
            }
            self.scsi_command(&c, ImmData::Lent(frame_buf), reg, pool, out);
            self.run_held(reg, pool, out);
            return;
        }
        let used = self.consume(&frame_buf, false, reg, pool, now_ms, out);
        debug_assert!(
            self.closing || used == frame_buf.len(),
            "a lent PDU is whole"
        );
        pool.put(frame_buf);
    }

    /// The SCSI command in a lent frame and where its data is, if it is whole, well formed
    /// and next in CmdSN order (or immediate); None sends it the ordinary way.
    fn lent_command(&self, frame_buf: &[u8]) -> Option<(pdu::ScsiCommand, usize, usize)> {
        if self.closing {
            return None;
        }
        let bhs: [u8; BHS_LEN] = frame_buf.get(..BHS_LEN)?.try_into().ok()?;
        let frame = frame_len(&bhs, self.digests, self.max_recv_data_bytes()).ok()?;
        if frame.total_len_bytes != frame_buf.len() {
            return None;
        }
        let (ahs, data) = split_frame(frame_buf, &frame, self.digests).ok()?;
        let data_at = data.as_ptr() as usize - frame_buf.as_ptr() as usize;
        let InitiatorPdu::ScsiCommand(c) = parse_initiator(&bhs, ahs).ok()? else {
            return None;
        };
        let Phase::Full(s) = &self.phase else {
            return None;
        };
        if !c.immediate && s.window.place(c.cmd_sn) != CmdSnPlace::Next {
            return None;
        }
        Some((c, data_at, data.len()))
    }

    /// Consumes complete PDUs from `buf`, returning the bytes used; with `stop_to_lend`,
    /// stops before a whole PDU that should be lent.
    fn consume(
        &mut self,
        buf: &[u8],
        stop_to_lend: bool,
        reg: &Registry,
        pool: &mut BufPool,
        now_ms: u64,
        out: &mut Out,
    ) -> usize {
        self.last_rx_ms = now_ms;
        let mut used = 0;
        while !self.closing && buf.len() - used >= BHS_LEN {
            let mut bhs = [0u8; BHS_LEN];
            bhs.copy_from_slice(&buf[used..used + BHS_LEN]);
            let frame = match frame_len(&bhs, self.digests, self.max_recv_data_bytes()) {
                Ok(f) => f,
                Err(e) => {
                    // We cannot skip a segment we refuse to buffer: the stream is lost.
                    tracing::warn!(peer = %self.peer, error = %e, "dropping connection");
                    out.close_now = true;
                    self.closing = true;
                    return used;
                }
            };
            if buf.len() - used < frame.total_len_bytes {
                break;
            }
            let whole = &buf[used..used + frame.total_len_bytes];
            if stop_to_lend && self.lendable(whole) {
                break;
            }
            used += frame.total_len_bytes;
            let (ahs, data) = match split_frame(whole, &frame, self.digests) {
                Ok(x) => x,
                Err(e) => match e.reject_reason() {
                    Some(r) if matches!(e, pdu::PduError::DataDigest) => {
                        // At ErrorRecoveryLevel 0 nothing retransmits the PDU (no recovery
                        // R2T, no command retry): a command's CmdSN would stay a hole that
                        // stalls every later command, a Data-Out's task would wait forever.
                        // Session recovery is what ERL 0 has: reject, then close.
                        tracing::warn!(peer = %self.peer, "data digest error: closing the connection (ErrorRecoveryLevel 0)");
                        self.reject(out, r, &bhs);
                        out.close_after_send = true;
                        self.closing = true;
                        return used;
                    }
                    Some(r) => {
                        self.reject(out, r, &bhs);
                        continue;
                    }
                    None => {
                        tracing::warn!(peer = %self.peer, error = %e, "dropping connection");
                        out.close_now = true;
                        self.closing = true;
                        return used;
                    }
                },
            };
            match parse_initiator(&bhs, ahs) {
                Ok(p) => self.on_pdu(p, &bhs, data, reg, pool, out),
                Err(e) => match e.reject_reason() {
                    Some(r) if matches!(self.phase, Phase::Full(_)) => self.reject(out, r, &bhs),
                    _ => {
                        tracing::warn!(peer = %self.peer, error = %e, "bad PDU during login; dropping connection");
                        out.close_now = true;
                        self.closing = true;
                        return used;
                    }
                },
            }
        }
        used
    }

    fn on_pdu(
        &mut self,
        p: InitiatorPdu,
        bhs: &[u8; BHS_LEN],
        data: &[u8],
        reg: &Registry,
        pool: &mut BufPool,
        out: &mut Out,
    ) {
        if let Phase::Login(login) = &mut self.phase {
            let InitiatorPdu::LoginRequest(req) = p else {
                // RFC 7143 section 6.2: anything but Login during login is a protocol error.
                tracing::warn!(peer = %self.peer, "non-login PDU during login; dropping connection");
                out.close_now = true;
                self.closing = true;
                return;
            };
            let step = login.on_request(&req, data, reg, &mut self.stat_sn);
            out.send.extend_from_slice(&step.bytes);
            match step.done {
                Some(LoginDone::Failed) => {
                    out.close_after_send = true;
                    self.closing = true;
                }
                Some(LoginDone::Success(res)) => self.enter_full_feature(*res, reg),
                None => {}
            }
            return;
        }
        match p {
            InitiatorPdu::ScsiCommand(ref c) => {
                if !c.immediate && !self.in_order(c.cmd_sn, &p, data, out) {
                    return;
                }
                self.scsi_command(c, ImmData::Borrowed(data), reg, pool, out);
                self.run_held(reg, pool, out);
            }
            InitiatorPdu::DataOut(d) => self.data_out(&d, bhs, data, reg, pool, out),
            InitiatorPdu::NopOut(n) => {
                if !n.immediate && !self.in_order(n.cmd_sn, &p, data, out) {
                    return;
                }
                self.nop_out(&n, data, out);
                self.run_held(reg, pool, out);
            }
            InitiatorPdu::TmfRequest(t) => {
                if !t.immediate && !self.in_order(t.cmd_sn, &p, data, out) {
                    return;
                }
                self.tmf(&t, reg, pool, out);
                self.run_held(reg, pool, out);
            }
            InitiatorPdu::TextRequest(t) => {
                if !t.immediate && !self.in_order(t.cmd_sn, &p, data, out) {
                    return;
                }
                self.text(&t, data, reg, out);
            }
            InitiatorPdu::LogoutRequest(l) => {
                if !l.immediate && !self.in_order(l.cmd_sn, &p, data, out) {
                    return;
                }
                // Close-session and close-connection are the same for a one-connection
                // session; recovery is not offered at ERL 0 (response 2).
                let response = match l.reason {
                    pdu::LogoutReason::RemoveConnectionForRecovery => 2,
                    _ => 0,
                };
                self.send_status_pdu(
                    out,
                    |sns| TargetPdu::LogoutResponse {
                        itt: l.itt,
                        response,
                        time2wait: 0,
                        time2retain: 0,
                        sns,
                    },
                    &[],
                );
                if response == 0 {
                    out.close_after_send = true;
                    self.closing = true;
                }
            }
            InitiatorPdu::LoginRequest(_) => self.reject(out, RejectReason::ProtocolError, bhs),
            // ERL 0: no SNACK support (RFC 7143 section 11.16).
            InitiatorPdu::Snack(_) => self.reject(out, RejectReason::CommandNotSupported, bhs),
        }
    }

    /// CmdSN ordering for a non-immediate PDU. Returns true when it may run now (and the
    /// window has advanced past it); false when it was held or dropped.
    fn in_order(&mut self, cmd_sn: u32, p: &InitiatorPdu, data: &[u8], out: &mut Out) -> bool {
        let _ = out;
        let Phase::Full(s) = &mut self.phase else {
            return false;
        };
        match s.window.place(cmd_sn) {
            CmdSnPlace::Next => {
                s.window.advance();
                true
            }
            CmdSnPlace::Ahead => {
                if self.held.len() < MAX_HELD_COMMANDS
                    && !self.held.iter().any(|h| h.cmd_sn == cmd_sn)
                {
                    self.held.push(Held {
                        cmd_sn,
                        pdu: p.clone(),
                        data: data.to_vec(),
                    });
                }
                false
            }
            CmdSnPlace::Outside => {
                // RFC 7143 section 4.2.2.1: silently ignore commands outside the window.
                tracing::debug!(peer = %self.peer, cmd_sn, exp = s.window.exp_cmd_sn(), "CmdSN outside the window; ignored");
                false
            }
        }
    }

    /// Runs held commands whose turn has come.
    fn run_held(&mut self, reg: &Registry, pool: &mut BufPool, out: &mut Out) {
        loop {
            let Phase::Full(s) = &self.phase else { return };
            let exp = s.window.exp_cmd_sn();
            let Some(pos) = self.held.iter().position(|h| h.cmd_sn == exp) else {
                return;
            };
            let h = self.held.swap_remove(pos);
            if let Phase::Full(s) = &mut self.phase {
                s.window.advance();
            }
            match h.pdu {
                InitiatorPdu::ScsiCommand(c) => {
                    self.scsi_command(&c, ImmData::Borrowed(&h.data), reg, pool, out)
                }
                InitiatorPdu::NopOut(n) => self.nop_out(&n, &h.data, out),
                InitiatorPdu::TmfRequest(t) => self.tmf(&t, reg, pool, out),
                InitiatorPdu::TextRequest(t) => self.text(&t, &h.data, reg, out),
                InitiatorPdu::LogoutRequest(l) => {
                    self.send_status_pdu(
                        out,
                        |sns| TargetPdu::LogoutResponse {
                            itt: l.itt,
                            response: 0,
                            time2wait: 0,
                            time2retain: 0,
                            sns,
                        },
                        &[],
                    );
                    out.close_after_send = true;
                    self.closing = true;
                }
                _ => {}
            }
        }
    }

    fn enter_full_feature(&mut self, res: crate::login::LoginResult, reg: &Registry) {
        let luns = match reg.targets.get(res.target) {
            Some(t) if res.kind == SessionKind::Normal => t
                .luns
                .iter()
                .map(|&(id, index)| LunView {
                    id,
                    index,
                    ua_seen: reg.luns[index].ua.start(reg.luns[index].mode_tag()),
                    pending_ua: Vec::new(),
                })
                .collect(),
            _ => Vec::new(),
        };
        self.digests = Digests {
            header: res.params.header_digest,
            data: res.params.data_digest,
        };
        tracing::info!(peer = %self.peer, initiator = %res.initiator_name, target = %res.target_name, kind = ?res.kind, "login complete");
        reg.sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let window = CmdWindow::new(res.exp_cmd_sn, reg.config.queue_depth);
        let nexus = proto::scsi::pr::Nexus::new(
            &res.initiator_name,
            res.isid,
            crate::login::PORTAL_GROUP_TAG,
        );
        let nexus_tag = nexus_tag(&nexus);
        if res.kind == SessionKind::Normal {
            let key = (nexus.initiator.clone(), res.isid, res.target);
            if let Some(old) =
                reg.session_started(key, self.session_id, Arc::clone(&self.reinstated))
            {
                // RFC 7143 section 6.3.5: the old session is closed and its tasks end; its
                // I_T nexus is lost now, before this one can reserve anything (the old
                // connection, closing on its own core, no longer releases it).
                tracing::warn!(peer = %self.peer, initiator = %res.initiator_name, old_session = old, "session reinstatement: closing the old session");
                for &(_, index) in reg
                    .targets
                    .get(res.target)
                    .map(|t| &t.luns[..])
                    .unwrap_or(&[])
                {
                    let lun = &reg.luns[index];
                    if lun.pr_in_use() {
                        lun.with_pr(|st| proto::scsi::pr::nexus_lost(st, &nexus));
                    }
                }
            }
        }
        self.phase = Phase::Full(Box::new(Session {
            kind: res.kind,
            target: res.target,
            window,
            params: res.params,
            luns,
            nexus,
            nexus_tag,
        }));
    }

    fn nop_out(&mut self, n: &pdu::NopOut, data: &[u8], out: &mut Out) {
        if n.ttt != RESERVED_TAG {
            // The answer to our ping.
            if self.ping.is_some_and(|(ttt, _)| ttt == n.ttt) {
                self.ping = None;
            }
        }
        if n.itt != RESERVED_TAG {
            let lun = n.lun;
            let itt = n.itt;
            let max = self.max_send_data_bytes();
            let echo = &data[..data.len().min(max)];
            self.send_status_pdu(
                out,
                |sns| TargetPdu::NopIn {
                    lun,
                    itt,
                    ttt: RESERVED_TAG,
                    sns,
                    data_len: echo.len() as u32,
                },
                echo,
            );
        }
    }

    fn max_send_data_bytes(&self) -> usize {
        match &self.phase {
            Phase::Full(s) => s.params.initiator_mrdsl_bytes as usize,
            Phase::Login(_) => LOGIN_MAX_DATA_BYTES,
        }
    }

    fn text(&mut self, t: &pdu::TextRequest, data: &[u8], reg: &Registry, out: &mut Out) {
        let peer = self.peer;
        let Phase::Full(s) = &mut self.phase else {
            return;
        };
        let target = reg.targets.get(s.target).map(|t| t.cfg.name.clone());
        let reply = crate::login::text_reply(
            reg,
            peer,
            self.local,
            &s.nexus.initiator,
            s.kind,
            &mut s.params,
            target.as_deref(),
            data,
        );
        let (itt, lun) = (t.itt, t.lun);
        match reply {
            Some(mut reply) => {
                // One PDU: cut at a key boundary to what the initiator accepts.
                let max = self.max_send_data_bytes();
                if reply.len() > max {
                    let cut = reply[..max]
                        .iter()
                        .rposition(|&b| b == 0)
                        .map(|p| p + 1)
                        .unwrap_or(0);
                    reply.truncate(cut);
                }
                self.send_status_pdu(
                    out,
                    |sns| TargetPdu::TextResponse {
                        final_: true,
                        cont: false,
                        lun,
                        itt,
                        ttt: RESERVED_TAG,
                        sns,
                        data_len: reply.len() as u32,
                    },
                    &reply,
                );
            }
            None => {
                let mut bhs = [0u8; BHS_LEN];
                bhs[0] = pdu::opcode::TEXT_REQUEST;
                bhs[16..20].copy_from_slice(&itt.to_be_bytes());
                self.reject(out, RejectReason::ProtocolError, &bhs);
            }
        }
    }

    fn alloc_task(&mut self, t: Task) -> u32 {
        match self.free_tasks.pop() {
            Some(i) => {
                self.tasks[i as usize] = Some(t);
                i
            }
            None => {
                self.tasks.push(Some(t));
                (self.tasks.len() - 1) as u32
            }
        }
    }

    fn free_task(&mut self, idx: u32, pool: &mut BufPool) {
        self.answering = 0;
        if let Some(t) = self.tasks.get_mut(idx as usize).and_then(|t| t.take()) {
            if let Some(b) = t.scsi.buf {
                pool.put(b);
            }
            self.free_tasks.push(idx);
        }
    }

    fn find_task(&self, itt: u32) -> Option<u32> {
        self.tasks
            .iter()
            .position(|t| t.as_ref().is_some_and(|t| t.itt == itt))
            .map(|i| i as u32)
    }

    fn scsi_command(
        &mut self,
        c: &pdu::ScsiCommand,
        data: ImmData<'_>,
        reg: &Registry,
        pool: &mut BufPool,
        out: &mut Out,
    ) {
        let live_itt = self.find_task(c.itt).is_some();
        let Phase::Full(s) = &mut self.phase else {
            return;
        };
        if s.kind != SessionKind::Normal {
            // RFC 7143 section 4.4.1: a discovery session carries no SCSI commands.
            let mut bhs = [0u8; BHS_LEN];
            bhs[0] = pdu::opcode::SCSI_COMMAND;
            self.reject(out, RejectReason::ProtocolError, &bhs);
            return;
        }
        if live_itt {
            // RFC 7143 section 11.17: a reused ITT of a live task.
            let mut bhs = [0u8; BHS_LEN];
            bhs[0] = pdu::opcode::SCSI_COMMAND;
            bhs[16..20].copy_from_slice(&c.itt.to_be_bytes());
            self.reject(out, RejectReason::TaskInProgress, &bhs);
            return;
        }
        let lun_id = decode_lun(c.lun);
        let tag = s.nexus_tag;
        let view = s.luns.iter_mut().find(|l| l.id == lun_id);
        let lun_index = view.as_ref().map(|v| v.index);
        // Unit attentions other nexuses caused, collected before the command runs.
        let mut ua = None;
        if let Some(v) = view {
            reg.luns[v.index]
                .ua
                .collect(self.session_id, tag, &mut v.ua_seen, &mut v.pending_ua);
            if !v.pending_ua.is_empty() && !scsi::ua_exempt(c.cdb()) {
                let asc = v.pending_ua.remove(0);
                tracing::debug!(peer = %self.peer, initiator = %s.nexus.initiator, opcode = c.cdb()[0], ?asc, "reporting unit attention");
                ua = Some(asc);
            }
        }
        let target = &reg.targets[s.target];
        let mut ctx = ExecCtx {
            reg,
            target,
            lun: lun_index,
            lun_id,
            pool,
            session_id: self.session_id,
            nexus: &s.nexus,
            mirror_pr: Default::default(),
        };
        let (scsi_task, step) = match ua {
            Some(asc) => (
                ScsiTask::empty(),
                Step::Done(scsi::Reply::check(Sense::unit_attention(asc))),
            ),
            None => scsi::start(c.cdb(), c.expected_data_len_bytes, c.write, &mut ctx),
        };
        let task = Task {
            itt: c.itt,
            lun_id,
            lun: lun_index.unwrap_or(usize::MAX),
            edtl: c.expected_data_len_bytes,
            read_dir: c.read,
            scsi: scsi_task,
            data_out: None,
            io_inflight: 0,
            aborted: false,
            deferred: None,
            rep_inflight: 0,
            held: None,
            rep_failed: false,
            mirrored: None,
        };
        let idx = self.alloc_task(task);
        let expected = c.expected_data_len_bytes;
        // A command with the W bit whose CDB moves no data out still gets its data sent:
        // take it (and drop it) before answering, or the initiator's stream desyncs.
        let (step, discard) = match step {
            Step::NeedData(n) => (Step::NeedData(n), false),
            other if c.write && expected > 0 => {
                if let Some(Some(t)) = self.tasks.get_mut(idx as usize) {
                    t.deferred = Some(other);
                }
                (Step::NeedData(expected), true)
            }
            other => (other, false),
        };
        // Immediate data arrives with the command; hand it to the task as Data-Out would.
        match step {
            Step::NeedData(needed) => {
                let (first_burst, immediate_ok, initial_r2t) = match &self.phase {
                    Phase::Full(s) => (
                        s.params.first_burst_len_bytes,
                        s.params.immediate_data,
                        s.params.initial_r2t,
                    ),
                    Phase::Login(_) => (0, false, true),
                };
                if data.len() > 0 && !immediate_ok {
                    self.finish(
                        idx,
                        scsi::Reply::check(Sense::invalid_field_in_cdb(0, None)),
                        pool,
                        out,
                    );
                    return;
                }
                // Unsolicited data: immediate + (if InitialR2T=No) Data-Out up to
                // FirstBurstLength, unless F = 1 says none follows (RFC 7143 section
                // 11.3.4): then everything after the immediate data is solicited by R2T.
                let unsolicited = if initial_r2t || c.final_ {
                    data.len() as u32
                } else {
                    first_burst.min(expected).max(data.len() as u32)
                };
                let mut st = DataOutState {
                    expected_bytes: expected,
                    needed_bytes: needed,
                    received_bytes: 0,
                    solicited_to: unsolicited.min(expected),
                    r2t: None,
                    r2t_sn: 0,
                    unsolicited_data_sn: 0,
                    unsolicited_open: !initial_r2t && !c.final_,
                    discard,
                };
                // Only a buffered LUN can take a lent buffer: it is not aligned for O_DIRECT.
                let buffered = reg
                    .luns
                    .get(lun_index.unwrap_or(usize::MAX))
                    .is_some_and(|l| l.cache == CacheMode::Writeback);
                if let Some(Some(t)) = self.tasks.get_mut(idx as usize) {
                    match data {
                        ImmData::Borrowed(d) if !d.is_empty() => accept_data(t, &mut st, 0, d),
                        ImmData::Borrowed(_) => {}
                        ImmData::Lent(b) => adopt_data(t, &mut st, b, buffered, pool),
                    }
                    t.data_out = Some(st);
                }
                self.progress_write(idx, reg, pool, out);
            }
            other => self.apply_step(idx, other, reg, pool, out),
        }
    }

    /// After data arrived (or an R2T completed): solicit more, or run the command.
    fn progress_write(&mut self, idx: u32, reg: &Registry, pool: &mut BufPool, out: &mut Out) {
        let (max_burst, max_r2t) = match &self.phase {
            Phase::Full(s) => (s.params.max_burst_len_bytes, s.params.max_outstanding_r2t),
            Phase::Login(_) => return,
        };
        let _ = max_r2t; // one R2T at a time keeps ordering simple; enough for ImmediateData/FirstBurst hosts
        let Some(Some(t)) = self.tasks.get_mut(idx as usize) else {
            return;
        };
        let Some(st) = t.data_out.as_mut() else {
            return;
        };
        let wanted = st
            .expected_bytes
            .min(st.needed_bytes.max(st.received_bytes));
        if st.received_bytes >= st.needed_bytes.min(st.expected_bytes)
            && st.r2t.is_none()
            && !st.unsolicited_open
        {
            // All the data the command can get has arrived.
            t.data_out = None;
            if let Some(step) = t.deferred.take() {
                self.apply_step(idx, step, reg, pool, out);
                return;
            }
            let lun_id = t.lun_id;
            let lun = (t.lun != usize::MAX).then_some(t.lun);
            let Phase::Full(s) = &self.phase else { return };
            let target = &reg.targets[s.target];
            let mut ctx = ExecCtx {
                reg,
                target,
                lun,
                lun_id,
                pool,
                session_id: self.session_id,
                nexus: &s.nexus,
                mirror_pr: Default::default(),
            };
            let step = scsi::data_ready(&mut t.scsi, &mut ctx);
            if ctx.mirror_pr.get() {
                mirror_pr(reg, t, idx, out);
            }
            self.apply_step(idx, step, reg, pool, out);
            return;
        }
        if st.r2t.is_none() && !st.unsolicited_open && st.solicited_to < wanted {
            let offset = st.solicited_to;
            let len = (wanted - offset).min(max_burst);
            let ttt = self.next_ttt;
            self.next_ttt = self.next_ttt.wrapping_add(1).max(1);
            if self.next_ttt == RESERVED_TAG {
                self.next_ttt = 1;
            }
            st.r2t = Some((ttt, offset, len, 0));
            st.solicited_to = offset + len;
            let r2t_sn = st.r2t_sn;
            st.r2t_sn = st.r2t_sn.wrapping_add(1);
            let (itt, lun) = (t.itt, encode_lun(t.lun_id));
            self.send_plain_pdu(
                out,
                |sns| TargetPdu::R2t {
                    lun,
                    itt,
                    ttt,
                    r2t_sn,
                    buffer_offset: offset,
                    desired_len: len,
                    sns,
                },
                &[],
            );
        }
    }

    fn data_out(
        &mut self,
        d: &pdu::DataOut,
        bhs: &[u8; BHS_LEN],
        data: &[u8],
        reg: &Registry,
        pool: &mut BufPool,
        out: &mut Out,
    ) {
        let Some(idx) = self.find_task(d.itt) else {
            // Data for a task we do not know (aborted, or never sent): drop it. RFC 7143
            // section 11.7.4 lets the target silently discard data for terminated tasks.
            tracing::debug!(peer = %self.peer, itt = d.itt, "Data-Out for unknown task dropped");
            return;
        };
        let Some(Some(t)) = self.tasks.get_mut(idx as usize) else {
            return;
        };
        let Some(mut st) = t.data_out.take() else {
            self.reject(out, RejectReason::ProtocolError, bhs);
            return;
        };
        let end = d.buffer_offset as u64 + data.len() as u64;
        // Validate the sequence this PDU belongs to: an R2T's (TTT) or the unsolicited one.
        let valid = if d.ttt == RESERVED_TAG {
            let ok = st.unsolicited_open
                && d.data_sn == st.unsolicited_data_sn
                && end <= st.solicited_to as u64;
            if ok {
                st.unsolicited_data_sn += 1;
                if d.final_ {
                    st.unsolicited_open = false;
                }
            }
            ok
        } else {
            match st.r2t {
                Some((ttt, off, len, dsn))
                    if ttt == d.ttt
                        && d.data_sn == dsn
                        && d.buffer_offset >= off
                        && end <= (off + len) as u64 =>
                {
                    st.r2t = if d.final_ {
                        None
                    } else {
                        Some((ttt, off, len, dsn + 1))
                    };
                    true
                }
                _ => false,
            }
        };
        if !valid {
            // A DataSN/offset/TTT that does not fit: at ERL 0 the task cannot recover; reject
            // the PDU, fail the command, and keep the session (RFC 7143 section 7.1.4).
            t.data_out = None;
            self.reject(out, RejectReason::ProtocolError, bhs);
            let sense = Sense::aborted_command(Asc(0x0c, 0x0d));
            self.finish(idx, scsi::Reply::check(sense), pool, out);
            return;
        }
        accept_data(t, &mut st, d.buffer_offset, data);
        t.data_out = Some(st);
        self.progress_write(idx, reg, pool, out);
    }

    fn apply_step(
        &mut self,
        idx: u32,
        step: Step,
        reg: &Registry,
        pool: &mut BufPool,
        out: &mut Out,
    ) {
        match step {
            Step::Done(reply) => self.finish(idx, reply, pool, out),
            Step::Io(op) => {
                if let Some(Some(t)) = self.tasks.get_mut(idx as usize) {
                    t.io_inflight += 1;
                    let lun = t.lun;
                    out.io.push(IoReq { task: idx, lun, op });
                    mirror(reg, t, idx, lun, op, out);
                }
            }
            Step::IoAt(lun, op) => {
                if let Some(Some(t)) = self.tasks.get_mut(idx as usize) {
                    t.io_inflight += 1;
                    out.io.push(IoReq { task: idx, lun, op });
                    mirror(reg, t, idx, lun, op, out);
                }
            }
            Step::Wait => self.waiting.push(idx),
            Step::WaitSlow => self.waiting_slow.push(idx),
            Step::NeedData(_) => {
                // Only `start` may ask for data; a later request is an executor bug.
                debug_assert!(false, "NeedData after start");
                self.finish(
                    idx,
                    scsi::Reply::check(Sense::internal_target_failure()),
                    pool,
                    out,
                );
            }
        }
    }

    /// A disk operation of task `idx` completed with `res` (bytes or -errno).
    pub fn on_io_done(
        &mut self,
        idx: u32,
        res: i32,
        reg: &Registry,
        pool: &mut BufPool,
        out: &mut Out,
    ) {
        let Some(Some(t)) = self.tasks.get_mut(idx as usize) else {
            debug_assert!(false, "completion for a free task slot");
            return;
        };
        t.io_inflight -= 1;
        if t.aborted {
            if t.io_inflight == 0 && t.rep_inflight == 0 {
                self.free_task(idx, pool);
                self.flush_deferred_tmf(out);
            }
            return;
        }
        let lun_id = t.lun_id;
        let lun = (t.lun != usize::MAX).then_some(t.lun);
        let Phase::Full(s) = &self.phase else { return };
        let target = &reg.targets[s.target];
        let mut ctx = ExecCtx {
            reg,
            target,
            lun,
            lun_id,
            pool,
            session_id: self.session_id,
            nexus: &s.nexus,
            mirror_pr: Default::default(),
        };
        let step = scsi::io_done(&mut t.scsi, res, &mut ctx);
        self.apply_step(idx, step, reg, pool, out);
    }

    /// Sends the final response of task `idx` and frees it.
    fn finish(&mut self, idx: u32, reply: scsi::Reply, pool: &mut BufPool, out: &mut Out) {
        let Some(Some(t)) = self.tasks.get_mut(idx as usize) else {
            return;
        };
        if t.aborted {
            return;
        }
        if t.rep_inflight > 0 {
            // Protocol C: GOOD only once the peer has it too.
            t.held = Some(reply);
            return;
        }
        // This task's slot counts as free in the MaxCmdSN its own response carries (it is
        // freed right after): otherwise a full window would stay shut (sns).
        self.answering = 1;
        let Some(Some(t)) = self.tasks.get_mut(idx as usize) else {
            return;
        };
        if reply.status != status::GOOD {
            if let Some(range) = t.mirrored.take() {
                // Failed here (out of space, an I/O error) after the peer was sent the
                // change: the copies may differ in this range.
                out.diverged.push((range.0, range.1, range.2 - range.1));
            }
        }
        let (itt, edtl, lun, read_dir) = (t.itt, t.edtl, encode_lun(t.lun_id), t.read_dir);
        let sense_format = match t.lun {
            usize::MAX => SenseFormat::Fixed,
            _ => reply.sense_format,
        };
        // The buffer leaves the task while its bytes are framed, and goes back to the pool.
        let task_buf = t.scsi.buf.take();
        // The data the command produced (reads, INQUIRY...), cut to what the initiator expects.
        let data: &[u8] = match &reply.data {
            ReplyData::None => &[],
            ReplyData::Inline(v) => v,
            ReplyData::Buf(n) => task_buf
                .as_deref()
                .map(|b| &b[..(*n).min(b.len())])
                .unwrap_or(&[]),
        };
        let produced = data.len() as u32;
        // Residuals compare the expected length with what the command would transfer.
        let transfer = reply.transfer_bytes.unwrap_or(produced);
        let residual = Residual::of(edtl, transfer);
        let sendable = if read_dir {
            &data[..(produced.min(edtl)) as usize]
        } else {
            &[][..]
        };
        let max_seg = self.max_send_data_bytes().max(512);
        let max_burst = match &self.phase {
            Phase::Full(s) => s.params.max_burst_len_bytes.max(512) as usize,
            Phase::Login(_) => max_seg,
        };
        let good = reply.status == status::GOOD && reply.sense.is_none();
        // Data from the task's buffer goes out in place when large (the buffer is held in
        // the send queue until it has); inline data and short reads are copied.
        let in_place = good
            && matches!(reply.data, ReplyData::Buf(_))
            && sendable.len() >= SEND_IN_PLACE_MIN_BYTES;
        let mut data_sn = 0u32;
        if !sendable.is_empty() {
            let mut offset = 0usize;
            // Copy the slices out first: send_*_pdu borrows self mutably.
            let chunks: Vec<(usize, usize)> = {
                let mut v = Vec::new();
                while offset < sendable.len() {
                    let burst_left = max_burst - (offset % max_burst);
                    let n = (sendable.len() - offset).min(max_seg).min(burst_left);
                    v.push((offset, n));
                    offset += n;
                }
                v
            };
            let last = chunks.len() - 1;
            let mut buf = std::mem::take(&mut out.send);
            for (i, &(off, n)) in chunks.iter().enumerate() {
                let is_last = i == last;
                let end_of_burst = (off + n) % max_burst == 0;
                let with_status = is_last && good;
                let sns = self.sns();
                if with_status {
                    self.stat_sn = self.stat_sn.wrapping_add(1);
                }
                let bhs = TargetPdu::DataIn {
                    final_: is_last || end_of_burst,
                    ack: false,
                    lun,
                    itt,
                    status: with_status.then_some(status::GOOD),
                    residual: if with_status {
                        residual
                    } else {
                        Residual::None
                    },
                    data_sn,
                    buffer_offset: off as u32,
                    sns,
                    data_len: n as u32,
                }
                .encode_bhs();
                let seg = &sendable[off..off + n];
                if in_place {
                    pdu::write_pdu_head(&mut buf, &bhs, n, self.digests);
                    out.send_refs.push(crate::sendq::SendRef {
                        at: buf.len(),
                        ptr: seg.as_ptr(),
                        len: n,
                    });
                    pdu::write_pdu_tail(&mut buf, seg, self.digests);
                } else {
                    pdu::write_pdu(&mut buf, &bhs, seg, self.digests);
                }
                data_sn += 1;
            }
            let end = buf.len();
            out.send = buf;
            if good {
                if let Some(b) = task_buf {
                    if in_place {
                        // The refs point into this buffer's heap allocation, which moving
                        // the AlignedBuf does not move.
                        out.send_holds.push((end, b));
                    } else {
                        pool.put(b);
                    }
                }
                self.free_task(idx, pool);
                return;
            }
        }
        if let Some(b) = task_buf {
            pool.put(b);
        }
        let mut sense_buf = Vec::new();
        if let Some(sense) = &reply.sense {
            let bytes = sense.encode(sense_format);
            let s = bytes.as_slice();
            sense_buf.extend_from_slice(&(s.len() as u16).to_be_bytes());
            sense_buf.extend_from_slice(s);
        }
        let st = reply.status;
        self.send_status_pdu(
            out,
            |sns| TargetPdu::ScsiResponse {
                itt,
                status: st,
                response: 0,
                residual,
                exp_data_sn: data_sn,
                sns,
                data_len: sense_buf.len() as u32,
            },
            &sense_buf,
        );
        self.free_task(idx, pool);
    }

    fn tmf(&mut self, t: &pdu::TmfRequest, reg: &Registry, pool: &mut BufPool, out: &mut Out) {
        use pdu::TmfFunction::*;
        let Phase::Full(s) = &self.phase else { return };
        let lun_id = decode_lun(t.lun);
        let lun_index = s.luns.iter().find(|l| l.id == lun_id).map(|l| l.index);
        let exp_cmd_sn = s.window.exp_cmd_sn();
        let session_luns: Vec<usize> = s.luns.iter().map(|l| l.index).collect();
        let response = match t.function {
            AbortTask => match self.find_task(t.referenced_tag) {
                Some(idx) => {
                    self.abort(idx, pool);
                    tmf_response::FUNCTION_COMPLETE
                }
                // Not received yet (RefCmdSN not below ExpCmdSN): consider it done (RFC 7143
                // section 11.5.1); otherwise it already completed.
                None if !proto::seq::sn_lt(t.ref_cmd_sn, exp_cmd_sn) => {
                    tmf_response::FUNCTION_COMPLETE
                }
                None => tmf_response::TASK_DOES_NOT_EXIST,
            },
            AbortTaskSet | ClearTaskSet | LogicalUnitReset => match lun_index {
                None => tmf_response::LUN_DOES_NOT_EXIST,
                Some(index) => {
                    for idx in 0..self.tasks.len() as u32 {
                        if self.tasks[idx as usize]
                            .as_ref()
                            .is_some_and(|x| x.lun == index)
                        {
                            self.abort(idx, pool);
                        }
                    }
                    if t.function == LogicalUnitReset {
                        let lun = &reg.luns[index];
                        *lun.mode.lock().unwrap_or_else(|p| p.into_inner()) = Default::default();
                        lun.ua.raise_state_change(
                            self.session_id,
                            Asc::MODE_PARAMETERS_CHANGED,
                            lun.mode_tag(),
                        );
                        lun.with_pr(proto::scsi::pr::lun_reset);
                        // SAM-5 section 6.3.3: every I_T nexus, the issuer's included, is told.
                        lun.ua.raise(0, Asc::BUS_DEVICE_RESET);
                        self.held.clear();
                    }
                    tmf_response::FUNCTION_COMPLETE
                }
            },
            TargetWarmReset | TargetColdReset => {
                for idx in 0..self.tasks.len() as u32 {
                    self.abort(idx, pool);
                }
                for &index in &session_luns {
                    let lun = &reg.luns[index];
                    *lun.mode.lock().unwrap_or_else(|p| p.into_inner()) = Default::default();
                    lun.ua.raise(0, Asc::POWER_ON_RESET);
                    lun.with_pr(proto::scsi::pr::lun_reset);
                }
                self.held.clear();
                if t.function == TargetColdReset {
                    // A cold reset also ends every connection, ours included, after the answer.
                    out.close_after_send = true;
                    self.closing = true;
                }
                tmf_response::FUNCTION_COMPLETE
            }
            TaskReassign => tmf_response::REASSIGNMENT_NOT_SUPPORTED,
            ClearAca | Other(_) => tmf_response::NOT_SUPPORTED,
        };
        let waiting = self
            .tasks
            .iter()
            .flatten()
            .any(|x| x.aborted && x.io_inflight > 0);
        if waiting && response == tmf_response::FUNCTION_COMPLETE {
            // RFC 7143 section 4.2.3.3 (and SAM): answer only once the aborted tasks are gone.
            self.deferred_tmf.push((t.itt, response));
        } else {
            let itt = t.itt;
            self.send_status_pdu(
                out,
                |sns| TargetPdu::TmfResponse { itt, response, sns },
                &[],
            );
        }
    }

    fn abort(&mut self, idx: u32, pool: &mut BufPool) {
        self.waiting.retain(|&w| w != idx);
        self.waiting_slow.retain(|&w| w != idx);
        let Some(Some(t)) = self.tasks.get_mut(idx as usize) else {
            return;
        };
        if t.io_inflight > 0 || t.rep_inflight > 0 {
            // The buffer stays with the task until the kernel (and the link) is done with it.
            t.aborted = true;
        } else {
            self.free_task(idx, pool);
        }
    }

    fn flush_deferred_tmf(&mut self, out: &mut Out) {
        if self
            .tasks
            .iter()
            .flatten()
            .any(|x| x.aborted && x.io_inflight > 0)
        {
            return;
        }
        for (itt, response) in std::mem::take(&mut self.deferred_tmf) {
            self.send_status_pdu(
                out,
                |sns| TargetPdu::TmfResponse { itt, response, sns },
                &[],
            );
        }
    }

    /// Periodic work: slow waits, login timeout, target-initiated NOP-In pings and their timeout.
    pub fn on_tick(&mut self, reg: &Registry, pool: &mut BufPool, now_ms: u64, out: &mut Out) {
        if self.closing {
            return;
        }
        if self.reinstated.load(std::sync::atomic::Ordering::Acquire) {
            tracing::info!(peer = %self.peer, "closing a session its initiator reinstated");
            out.close_now = true;
            self.closing = true;
            return;
        }
        if !self.waiting_slow.is_empty() {
            self.retry_list(true, reg, pool, out);
        }
        let cfg = &reg.config;
        match &self.phase {
            Phase::Login(_) => {
                if now_ms.saturating_sub(self.started_ms) > cfg.login_timeout_ms {
                    tracing::info!(peer = %self.peer, "login timed out");
                    out.close_now = true;
                    self.closing = true;
                }
            }
            Phase::Full(_) => {
                if let Some((_, sent)) = self.ping {
                    if now_ms.saturating_sub(sent) > cfg.nop_timeout_ms {
                        tracing::warn!(peer = %self.peer, "no answer to NOP-In ping; dropping connection");
                        out.close_now = true;
                        self.closing = true;
                    }
                } else if now_ms.saturating_sub(self.last_rx_ms) > cfg.nop_interval_ms {
                    let ttt = self.next_ttt;
                    self.next_ttt = self.next_ttt.wrapping_add(1).max(1);
                    self.ping = Some((ttt, now_ms));
                    self.send_plain_pdu(
                        out,
                        |sns| TargetPdu::NopIn {
                            lun: 0,
                            itt: RESERVED_TAG,
                            ttt,
                            sns,
                            data_len: 0,
                        },
                        &[],
                    );
                }
            }
        }
    }

    /// The peer acknowledged (or the link settled) one mirrored operation of task `idx`.
    pub fn on_rep_done(&mut self, idx: u32, ok: bool, pool: &mut BufPool, out: &mut Out) {
        let Some(Some(t)) = self.tasks.get_mut(idx as usize) else {
            return;
        };
        t.rep_inflight = t.rep_inflight.saturating_sub(1);
        t.rep_failed |= !ok;
        if t.rep_inflight > 0 {
            return;
        }
        if t.aborted {
            if t.io_inflight == 0 {
                self.free_task(idx, pool);
                self.flush_deferred_tmf(out);
            }
            return;
        }
        if let Some(reply) = t.held.take() {
            let reply = if t.rep_failed && reply.status == status::GOOD {
                // The peer could not store it: never report a write that is on one node only.
                scsi::Reply::check(Sense::medium_error(Asc::WRITE_ERROR))
            } else {
                reply
            };
            self.finish(idx, reply, pool, out);
        }
    }

    /// Whether tasks wait for a range lock (the reactor then polls instead of sleeping).
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Retries parked tasks, oldest first (`slow`: those waiting for a timer tick).
    pub fn retry_waiting(&mut self, reg: &Registry, pool: &mut BufPool, out: &mut Out) {
        self.retry_list(false, reg, pool, out);
    }

    fn retry_list(&mut self, slow: bool, reg: &Registry, pool: &mut BufPool, out: &mut Out) {
        let parked = std::mem::take(if slow {
            &mut self.waiting_slow
        } else {
            &mut self.waiting
        });
        for idx in parked {
            let Some(Some(t)) = self.tasks.get_mut(idx as usize) else {
                continue;
            };
            if t.aborted {
                continue;
            }
            let lun_id = t.lun_id;
            let lun = (t.lun != usize::MAX).then_some(t.lun);
            let Phase::Full(s) = &self.phase else { return };
            let target = &reg.targets[s.target];
            let mut ctx = ExecCtx {
                reg,
                target,
                lun,
                lun_id,
                pool,
                session_id: self.session_id,
                nexus: &s.nexus,
                mirror_pr: Default::default(),
            };
            let step = scsi::retry(&mut t.scsi, &mut ctx);
            self.apply_step(idx, step, reg, pool, out);
        }
    }

    /// Whether disk I/O is still in flight (the reactor must not free buffers until it ends).
    pub fn io_inflight(&self) -> bool {
        self.tasks
            .iter()
            .flatten()
            .any(|t| t.io_inflight > 0 || t.rep_inflight > 0)
    }

    /// Marks every task aborted (connection going away) and frees what is idle. The I_T
    /// nexus is lost: its SPC-2 reservations go (persistent ones stay, SPC-4 5.12).
    pub fn shutdown(&mut self, reg: &Registry, pool: &mut BufPool) {
        self.closing = true;
        let reinstated = self.reinstated.load(std::sync::atomic::Ordering::Acquire);
        if let Phase::Full(s) = &self.phase {
            if !self.counted_out {
                reg.sessions
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                self.counted_out = true;
                if s.kind == SessionKind::Normal {
                    reg.session_ended(
                        &(s.nexus.initiator.clone(), s.nexus.isid, s.target),
                        self.session_id,
                    );
                }
            }
            for l in &s.luns {
                let lun = &reg.luns[l.index];
                // A reinstated session's nexus was lost at the new login: releasing again
                // now would take what the new session reserved since.
                if lun.pr_in_use() && !reinstated {
                    tracing::debug!(initiator = %s.nexus.initiator, isid = ?s.nexus.isid, "I_T nexus lost");
                    lun.with_pr(|st| proto::scsi::pr::nexus_lost(st, &s.nexus));
                }
            }
        }
        for idx in 0..self.tasks.len() as u32 {
            self.abort(idx, pool);
        }
    }

    /// Pointer to the buffer of a task, for the reactor's SQE (valid while I/O is in flight).
    pub fn task_buf_ptr(&mut self, idx: u32) -> Option<(*mut u8, usize)> {
        let t = self.tasks.get_mut(idx as usize)?.as_mut()?;
        let b = t.scsi.buf.as_mut()?;
        Some((b.as_mut_ptr(), b.len()))
    }
}

/// Queues the peer's copy of a modifying disk operation (protocol C), when this node
/// replicates. Reads are local only.
fn mirror(reg: &Registry, t: &mut Task, idx: u32, lun: usize, op: scsi::IoOp, out: &mut Out) {
    use crate::replication::{LentBytes, RepData, RepOp, RepReq};
    let Some(rep) = reg.replication.get() else {
        return;
    };
    if !rep.replicates() {
        return;
    }
    let rep_op = match op {
        scsi::IoOp::Write {
            offset,
            buf_off,
            len,
            fua,
        } => {
            let Some(buf) = t.scsi.buf.as_deref() else {
                return;
            };
            let (a, b) = (buf_off as usize, buf_off as usize + len as usize);
            let Some(data) = buf.get(a..b) else { return };
            let data = if scsi::buffer_is_final(&t.scsi) {
                // SAFETY: no later step of the command writes the buffer (buffer_is_final),
                // and the task keeps it until rep_inflight drops to 0, i.e. until the core
                // has this request's RepDone; the slot stays while any task has a mirror
                // in flight (io_inflight), and the reactor leaks rather than frees buffers
                // if torn down with mirrors out (Reactor's Drop).
                RepData::Lent(unsafe { LentBytes::new(data) })
            } else {
                RepData::Copied(data.to_vec())
            };
            RepOp::Write { offset, data, fua }
        }
        scsi::IoOp::Fallocate { offset, len, mode } => RepOp::Zero {
            offset,
            len,
            unmap: mode == scsi::PUNCH_HOLE,
        },
        scsi::IoOp::Flush => RepOp::Flush,
        scsi::IoOp::Read { .. } => return,
    };
    if let RepOp::Write {
        offset, ref data, ..
    } = rep_op
    {
        note_mirrored(t, lun, offset, data.len() as u64);
    }
    if let RepOp::Zero { offset, len, .. } = rep_op {
        note_mirrored(t, lun, offset, len);
    }
    t.rep_inflight += 1;
    out.rep.push(RepReq {
        token: idx as u64,
        lun,
        op: rep_op,
    });
}

/// Widens the task's mirrored range to cover `len` bytes at `offset` of `lun`.
fn note_mirrored(t: &mut Task, lun: usize, offset: u64, len: u64) {
    let end = offset.saturating_add(len);
    t.mirrored = Some(match t.mirrored {
        Some((l, start, stop)) if l == lun => (l, start.min(offset), stop.max(end)),
        _ => (lun, offset, end),
    });
}

/// Queues the LUN's new reservation state for the peer; the PERSISTENT RESERVE OUT that
/// changed it completes once the peer stored it.
fn mirror_pr(reg: &Registry, t: &mut Task, idx: u32, out: &mut Out) {
    use crate::replication::{RepOp, RepReq};
    let Some(rep) = reg.replication.get() else {
        return;
    };
    if !rep.replicates() || t.lun == usize::MAX {
        return;
    }
    let (state, version) = reg.luns[t.lun].pr_snapshot();
    t.rep_inflight += 1;
    out.rep.push(RepReq {
        token: idx as u64,
        lun: t.lun,
        op: RepOp::PrState { state, version },
    });
}

/// Copies Data-Out bytes at `offset` into the task's buffer (bytes past what the command
/// needs are counted but dropped: the residual reports them).
/// Immediate data in a lent buffer: taken as the task's data buffer when it is exactly that
/// buffer's contents, else copied like any data (and the lent buffer pooled).
fn adopt_data(
    t: &mut Task,
    st: &mut DataOutState,
    data: AlignedBuf,
    buffered: bool,
    pool: &mut BufPool,
) {
    let fits = t.scsi.buf.as_ref().is_some_and(|b| b.len() == data.len());
    if buffered && fits && !st.discard {
        st.received_bytes = st.received_bytes.saturating_add(data.len() as u32);
        if let Some(old) = t.scsi.buf.replace(data) {
            pool.put(old);
        }
        return;
    }
    accept_data(t, st, 0, &data);
    pool.put(data);
}

fn accept_data(t: &mut Task, st: &mut DataOutState, offset: u32, data: &[u8]) {
    st.received_bytes = st.received_bytes.saturating_add(data.len() as u32);
    if st.discard {
        return;
    }
    let Some(buf) = t.scsi.buf.as_mut() else {
        return;
    };
    let start = offset as usize;
    if start >= buf.len() {
        return;
    }
    let n = data.len().min(buf.len() - start);
    buf[start..start + n].copy_from_slice(&data[..n]);
}

/// LUN field to LUN id (SAM-5 section 4.7: peripheral (00b) and flat (01b) addressing).
pub fn decode_lun(field: u64) -> u64 {
    // One decoder for the whole target (SAM-5 single-level peripheral or flat space
    // addressing): a multi-level or other-method LUN names nothing we export, not LUN 0.
    proto::scsi::report_luns::decode_lun(field.to_be_bytes()).unwrap_or(u64::MAX)
}

/// LUN id to the LUN field we send back.
pub fn encode_lun(id: u64) -> u64 {
    if id == u64::MAX {
        return 0;
    }
    let id = id & 0x3fff;
    let hi = if id < 256 { 0 } else { 0x40 | (id >> 8) as u8 };
    u64::from_be_bytes([hi, id as u8, 0, 0, 0, 0, 0, 0])
}

/// A stable 64-bit tag of an I_T nexus (unit attentions addressed to one nexus carry it).
pub fn nexus_tag(n: &proto::scsi::pr::Nexus) -> u64 {
    crate::config::stable_hash(&[
        n.initiator.as_bytes(),
        &n.isid,
        &n.target_port.to_be_bytes(),
    ])
}

// The task buffer limit also bounds one command's transfer length.
const _: () = assert!(MAX_BUF_BYTES >= 16 << 20);

#[allow(dead_code)]
fn _assert_send() {
    fn is_send<T: Send>() {}
    is_send::<Arc<Registry>>();
}
