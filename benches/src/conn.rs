//! One iSCSI initiator connection over a non-blocking `TcpStream`: framing, sequence
//! numbers, login (with optional CHAP) and synchronous helper commands.
//!
//! The socket is non-blocking and driven by `poll(2)`, so one thread can keep many
//! commands in flight while Data-Out and Data-In stream in both directions without the
//! two ends blocking each other on full socket buffers.

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use proto::login::chap::ChapInitiator;
use proto::login::text::{encode_text, parse_text, TextPair};
use proto::pdu::{
    self, initiator, opcode, parse_target, Digests, LoginStage, TargetView, BHS_LEN, RESERVED_TAG,
};
use proto::seq::{sn_le, sn_lt};

/// MaxRecvDataSegmentLength we declare.
pub const OUR_MRDSL: u32 = 256 * 1024;
const RBUF_BYTES: usize = 4 << 20;
/// Most slices handed to one `writev` (Linux allows 1024; 64 covers 21 queued PDUs).
const MAX_IOVECS: usize = 64;

/// One piece of the send queue: bytes staged in `wbuf` (headers, small data), or a range
/// of a shared buffer sent in place. Why: copying every 128 KiB write's data into the send
/// buffer was a `memmove` per write on the harness's CPU, which on a small machine is the
/// target's CPU too.
enum Seg {
    Staged(Range<usize>),
    Shared(Arc<[u8]>, Range<usize>),
}

impl Seg {
    fn len(&self) -> usize {
        match self {
            Seg::Staged(r) | Seg::Shared(_, r) => r.len(),
        }
    }
}

/// A connection that can no longer carry PDUs: the peer closed it, reset it, or the
/// socket failed. Typed apart from protocol errors because `--reconnect` recovers from
/// exactly these (by logging in again), while a malformed PDU stays fatal.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("connection closed by target")]
    Closed,
    #[error("connection closed by target while sending")]
    ClosedWhileSending,
    /// The I/O error is part of the message (not a `source`), so that it shows also where
    /// the error is printed without its chain (`--reconnect`'s log lines).
    #[error("{op}: {err}")]
    Io {
        op: &'static str,
        err: std::io::Error,
    },
}

/// Operational parameters in force after login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Largest data segment we may send (the target's MaxRecvDataSegmentLength).
    pub target_mrdsl: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub digests: Digests,
}

impl Default for Params {
    /// RFC 7143 defaults.
    fn default() -> Self {
        Self {
            target_mrdsl: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            immediate_data: true,
            initial_r2t: true,
            digests: Digests::default(),
        }
    }
}

/// The operational keys we offer.
pub fn offered_keys(digest: bool, immediate_data: bool) -> Vec<TextPair> {
    let d = if digest { "CRC32C,None" } else { "None" };
    let imm = if immediate_data { "Yes" } else { "No" };
    vec![
        TextPair::new("HeaderDigest", d),
        TextPair::new("DataDigest", d),
        TextPair::new("MaxRecvDataSegmentLength", OUR_MRDSL.to_string()),
        TextPair::new("MaxBurstLength", (1u32 << 20).to_string()),
        TextPair::new("FirstBurstLength", (256u32 << 10).to_string()),
        TextPair::new("ImmediateData", imm),
        TextPair::new("InitialR2T", "No"),
        TextPair::new("MaxOutstandingR2T", "1"),
        TextPair::new("DataPDUInOrder", "Yes"),
        TextPair::new("DataSequenceInOrder", "Yes"),
        TextPair::new("ErrorRecoveryLevel", "0"),
        TextPair::new("MaxConnections", "1"),
        TextPair::new("DefaultTime2Wait", "0"),
        TextPair::new("DefaultTime2Retain", "0"),
    ]
}

/// Applies the target's answers (and declarations) to `p`, starting from RFC defaults
/// for keys it did not answer. We offered MaxBurstLength 1 MiB and FirstBurstLength 256 KiB.
pub fn apply_answers(p: &mut Params, answers: &[TextPair]) -> Result<()> {
    let num = |v: &str| -> Result<u32> {
        v.parse::<u32>()
            .map_err(|_| anyhow!("target answered a bad number {v:?}"))
    };
    for a in answers {
        match a.key.as_str() {
            "MaxRecvDataSegmentLength" => p.target_mrdsl = num(&a.value)?.clamp(512, 16_777_215),
            "MaxBurstLength" => p.max_burst = num(&a.value)?,
            "FirstBurstLength" => p.first_burst = num(&a.value)?,
            "ImmediateData" => p.immediate_data = a.value == "Yes",
            "InitialR2T" => p.initial_r2t = a.value == "Yes",
            "HeaderDigest" => p.digests.header = a.value == "CRC32C",
            "DataDigest" => p.digests.data = a.value == "CRC32C",
            "MaxConnections" | "ErrorRecoveryLevel" | "DataPDUInOrder" | "DataSequenceInOrder"
                if a.value == "Reject" || a.value == "NotUnderstood" =>
            {
                bail!("target refused {}={}", a.key, a.value);
            }
            _ => {}
        }
    }
    p.first_burst = p.first_burst.min(p.max_burst);
    Ok(())
}

/// A parsed PDU; its data segment stays in the receive buffer until the next read.
#[derive(Debug, Clone)]
pub struct Pdu {
    pub v: TargetView,
    pub bhs: [u8; BHS_LEN],
    pub data: Range<usize>,
}

/// Human text for a status-class/detail pair of a failed login.
pub fn login_status_text(class: u8, detail: u8) -> &'static str {
    match (class, detail) {
        (1, _) => "redirection",
        (2, 0x01) => "authentication failure",
        (2, 0x02) => "authorization failure",
        (2, 0x03) => "target not found",
        (2, 0x04) => "target removed",
        (2, 0x07) => "missing parameter",
        (2, 0x0a) => "session does not exist",
        (2, _) => "initiator error",
        (3, _) => "target error",
        _ => "unknown status",
    }
}

/// Sense key of UNIT ATTENTION (SPC-5): the command was not run, the target reports an
/// event (a reset, a failover's changed access state) and the command may be retried.
pub const SENSE_KEY_UNIT_ATTENTION: u8 = 0x06;

/// (sense key, ASC, ASCQ) of a CHECK CONDITION's iSCSI data segment (a 2-byte length,
/// then fixed or descriptor format sense); None when there is none or it is unparsable.
pub fn parse_sense(seg: &[u8]) -> Option<(u8, u8, u8)> {
    let len = (u16::from_be_bytes([*seg.first()?, *seg.get(1)?]) as usize).min(seg.len() - 2);
    let s = &seg[2..2 + len];
    match s.first().map(|b| b & 0x7f) {
        Some(0x70 | 0x71) if s.len() >= 14 => Some((s[2] & 0x0f, s[12], s[13])),
        Some(0x72 | 0x73) if s.len() >= 4 => Some((s[1] & 0x0f, s[2], s[3])),
        _ => None,
    }
}

/// Describes the sense data of a CHECK CONDITION (the iSCSI data segment: a 2-byte
/// length, then fixed or descriptor format sense).
pub fn describe_sense(seg: &[u8]) -> String {
    if seg.len() < 2 {
        return "no sense data".into();
    }
    let Some((key, asc, ascq)) = parse_sense(seg) else {
        let len = (u16::from_be_bytes([seg[0], seg[1]]) as usize).min(seg.len() - 2);
        return format!("unparsed sense {:02x?}", &seg[2..2 + len]);
    };
    const KEYS: [&str; 16] = [
        "NO SENSE",
        "RECOVERED ERROR",
        "NOT READY",
        "MEDIUM ERROR",
        "HARDWARE ERROR",
        "ILLEGAL REQUEST",
        "UNIT ATTENTION",
        "DATA PROTECT",
        "BLANK CHECK",
        "VENDOR SPECIFIC",
        "COPY ABORTED",
        "ABORTED COMMAND",
        "RESERVED",
        "VOLUME OVERFLOW",
        "MISCOMPARE",
        "COMPLETED",
    ];
    format!("{} ASC/ASCQ {asc:02x}/{ascq:02x}", KEYS[key as usize])
}

/// READ(16) / WRITE(16) CDB.
pub fn rw16(write: bool, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = if write { 0x8a } else { 0x88 };
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// An UNMAP parameter list with one block descriptor (SBC-4 5.32.2): 8 header bytes, 16
/// per descriptor.
pub const UNMAP_PARAM_BYTES: usize = 24;

pub fn unmap_param_list(lba: u64, blocks: u32) -> [u8; UNMAP_PARAM_BYTES] {
    let mut p = [0u8; UNMAP_PARAM_BYTES];
    // UNMAP DATA LENGTH (the bytes after it) and BLOCK DESCRIPTOR DATA LENGTH.
    p[0..2].copy_from_slice(&((UNMAP_PARAM_BYTES - 2) as u16).to_be_bytes());
    p[2..4].copy_from_slice(&16u16.to_be_bytes());
    p[8..16].copy_from_slice(&lba.to_be_bytes());
    p[16..20].copy_from_slice(&blocks.to_be_bytes());
    p
}

/// UNMAP(10) with a parameter list of `len` bytes.
pub fn unmap10(len: u16) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x42;
    c[7..9].copy_from_slice(&len.to_be_bytes());
    c
}

/// Result of a synchronous command.
pub struct SyncResult {
    pub status: u8,
    pub data: Vec<u8>,
    pub sense: String,
}

pub struct Conn {
    sock: TcpStream,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    /// Staged bytes; `segs` says in which order they go out, between shared ranges.
    wbuf: Vec<u8>,
    segs: VecDeque<Seg>,
    /// Bytes of the front segment already sent.
    front_sent: usize,
    digests: Digests,
    pub params: Params,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub lun: u64,
    pub last_rx: Instant,
    sync_itt: u32,
    /// Offer ImmediateData=Yes at login (default); No sends all write data as Data-Out.
    pub offer_immediate_data: bool,
    /// Caps each login exchange and synchronous command (None: 15 s per login exchange,
    /// 30 s per command). A reconnect sets it: a login that hangs on a half-dead portal
    /// must give way to the next attempt instead of using up the reconnect budget.
    pub exchange_timeout: Option<Duration>,
}

impl Conn {
    pub fn connect(addr: &str, lun: u64) -> Result<Self> {
        let sock = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        Self::over(sock, lun)
    }

    /// Like [`Conn::connect`], giving up on each resolved address after `timeout`: a
    /// portal whose address moved away drops SYNs silently, and the kernel's own connect
    /// timeout (minutes) would hide the moment it comes back.
    pub fn connect_timeout(addr: &str, lun: u64, timeout: Duration) -> Result<Self> {
        let mut last: Option<std::io::Error> = None;
        for a in addr
            .to_socket_addrs()
            .with_context(|| format!("resolving {addr}"))?
        {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(sock) => return Self::over(sock, lun),
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) => Err(e).with_context(|| format!("connecting to {addr}")),
            None => bail!("{addr} resolves to no address"),
        }
    }

    fn over(sock: TcpStream, lun: u64) -> Result<Self> {
        sock.set_nodelay(true)?;
        sock.set_nonblocking(true)?;
        Ok(Self {
            sock,
            rbuf: vec![0u8; RBUF_BYTES],
            rstart: 0,
            rend: 0,
            wbuf: Vec::with_capacity(1 << 20),
            segs: VecDeque::new(),
            front_sent: 0,
            digests: Digests::default(),
            params: Params::default(),
            cmd_sn: 1,
            exp_stat_sn: 0,
            exp_cmd_sn: 1,
            max_cmd_sn: 1,
            lun,
            last_rx: Instant::now(),
            sync_itt: 0x8000_0000,
            offer_immediate_data: true,
            exchange_timeout: None,
        })
    }

    /// Closes both directions now (errors ignored: the connection is being abandoned), so
    /// a target that still listens sees the end at once rather than when this is dropped.
    pub fn shutdown(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        self.segs.clear();
        self.front_sent = 0;
        self.wbuf.clear();
        self.rstart = 0;
        self.rend = 0;
    }

    /// The receive buffer, for reading a PDU's data range.
    pub fn rbuf(&self) -> &[u8] {
        &self.rbuf
    }

    pub fn digests(&self) -> Digests {
        self.digests
    }

    /// Queues one PDU for sending (its data copied).
    pub fn queue(&mut self, bhs: &[u8; BHS_LEN], data: &[u8]) {
        let start = self.wbuf.len();
        pdu::write_pdu(&mut self.wbuf, bhs, data, self.digests);
        self.stage_from(start);
    }

    /// Queues one PDU whose data segment is `buf[range]`, sent from `buf` in place.
    pub fn queue_shared(&mut self, bhs: &[u8; BHS_LEN], buf: &Arc<[u8]>, range: Range<usize>) {
        let start = self.wbuf.len();
        pdu::write_pdu_head(&mut self.wbuf, bhs, range.len(), self.digests);
        self.stage_from(start);
        if !range.is_empty() {
            let start = self.wbuf.len();
            pdu::write_pdu_tail(&mut self.wbuf, &buf[range.clone()], self.digests);
            self.segs.push_back(Seg::Shared(Arc::clone(buf), range));
            self.stage_from(start);
        }
    }

    /// Queues the staged bytes from `start` to the end of `wbuf`, merged into the last
    /// segment when that one is staged too.
    fn stage_from(&mut self, start: usize) {
        let end = self.wbuf.len();
        if start == end {
            return;
        }
        if let Some(Seg::Staged(r)) = self.segs.back_mut() {
            if r.end == start {
                r.end = end;
                return;
            }
        }
        self.segs.push_back(Seg::Staged(start..end));
    }

    pub fn pending_tx(&self) -> bool {
        !self.segs.is_empty()
    }

    /// Sends what the socket takes now. Returns whether anything was sent.
    pub fn flush(&mut self) -> Result<bool, TransportError> {
        let mut progress = false;
        while !self.segs.is_empty() {
            let mut iov: [IoSlice; MAX_IOVECS] = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n_iov = 0;
            for (i, seg) in self.segs.iter().take(MAX_IOVECS).enumerate() {
                let skip = if i == 0 { self.front_sent } else { 0 };
                let bytes = match seg {
                    Seg::Staged(r) => &self.wbuf[r.start + skip..r.end],
                    Seg::Shared(b, r) => &b[r.start + skip..r.end],
                };
                iov[i] = IoSlice::new(bytes);
                n_iov = i + 1;
            }
            match self.sock.write_vectored(&iov[..n_iov]) {
                Ok(0) => return Err(TransportError::ClosedWhileSending),
                Ok(mut n) => {
                    progress = true;
                    while n > 0 {
                        let Some(front) = self.segs.front() else {
                            break;
                        };
                        let left = front.len() - self.front_sent;
                        if n < left {
                            self.front_sent += n;
                            break;
                        }
                        n -= left;
                        self.front_sent = 0;
                        self.segs.pop_front();
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(err) => {
                    return Err(TransportError::Io {
                        op: "sending to target",
                        err,
                    })
                }
            }
        }
        // Staged bytes are only ever appended; the buffer restarts once all are sent, and
        // is compacted when a send queue that never empties has left 1 MiB of sent bytes
        // in front (so it cannot grow without bound).
        if self.segs.is_empty() {
            self.wbuf.clear();
        } else {
            let first_staged = self.segs.iter().find_map(|s| match s {
                Seg::Staged(r) => Some(r.start),
                Seg::Shared(..) => None,
            });
            let sent_front = first_staged.unwrap_or(self.wbuf.len());
            if sent_front > 1 << 20 {
                self.wbuf.drain(..sent_front);
                for seg in self.segs.iter_mut() {
                    if let Seg::Staged(r) = seg {
                        *r = r.start - sent_front..r.end - sent_front;
                    }
                }
            }
        }
        Ok(progress)
    }

    /// Reads what the socket has now. Returns whether anything arrived.
    pub fn fill(&mut self) -> Result<bool, TransportError> {
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        } else if self.rbuf.len() - self.rend < (OUR_MRDSL as usize + 1024) {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        loop {
            match self.sock.read(&mut self.rbuf[self.rend..]) {
                Ok(0) => return Err(TransportError::Closed),
                Ok(n) => {
                    self.rend += n;
                    self.last_rx = Instant::now();
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(err) => {
                    return Err(TransportError::Io {
                        op: "receiving from target",
                        err,
                    })
                }
            }
        }
    }

    /// Waits until the socket is readable (or writable, when we have bytes to send).
    pub fn wait(&self, timeout: Duration) {
        let mut events = libc::POLLIN;
        if self.pending_tx() {
            events |= libc::POLLOUT;
        }
        let mut fd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut fd, 1, ms) };
    }

    /// The next complete PDU in the receive buffer, if any; updates sequence numbers.
    pub fn next_pdu(&mut self) -> Result<Option<Pdu>> {
        if self.rend - self.rstart < BHS_LEN {
            return Ok(None);
        }
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&self.rbuf[self.rstart..self.rstart + BHS_LEN]);
        let frame = pdu::frame_len(&bhs, self.digests, OUR_MRDSL as usize)
            .map_err(|e| anyhow!("bad PDU from target: {e}"))?;
        if self.rend - self.rstart < frame.total_len_bytes {
            return Ok(None);
        }
        let whole = &self.rbuf[self.rstart..self.rstart + frame.total_len_bytes];
        pdu::split_frame(whole, &frame, self.digests)
            .map_err(|e| anyhow!("bad PDU from target: {e}"))?;
        let start =
            self.rstart + BHS_LEN + frame.ahs_len_bytes + if self.digests.header { 4 } else { 0 };
        self.rstart += frame.total_len_bytes;
        let v = parse_target(&bhs);
        self.note_sns(&v);
        Ok(Some(Pdu {
            v,
            bhs,
            data: start..start + frame.data_len_bytes,
        }))
    }

    fn note_sns(&mut self, v: &TargetView) {
        if v.opcode == opcode::LOGIN_RESPONSE {
            return; // login handles its own
        }
        // MaxCmdSN and ExpCmdSN only move forward (RFC 7143 section 4.2.2.1).
        if sn_le(v.exp_cmd_sn.wrapping_sub(1), v.max_cmd_sn)
            || v.max_cmd_sn.wrapping_add(1) == v.exp_cmd_sn
        {
            if sn_lt(self.max_cmd_sn, v.max_cmd_sn) {
                self.max_cmd_sn = v.max_cmd_sn;
            }
            if sn_lt(self.exp_cmd_sn, v.exp_cmd_sn) {
                self.exp_cmd_sn = v.exp_cmd_sn;
            }
        }
        let carries_stat_sn = match v.opcode {
            opcode::SCSI_RESPONSE
            | opcode::LOGOUT_RESPONSE
            | opcode::REJECT
            | opcode::ASYNC_MESSAGE
            | opcode::TASK_MGMT_RESPONSE
            | opcode::TEXT_RESPONSE => true,
            opcode::DATA_IN => v.flags & 0x01 != 0,
            opcode::NOP_IN => v.itt != RESERVED_TAG,
            _ => false,
        };
        if carries_stat_sn && sn_le(self.exp_stat_sn, v.stat_sn) {
            self.exp_stat_sn = v.stat_sn.wrapping_add(1);
        }
    }

    /// May a non-immediate command be sent now (CmdSN inside the target's window)?
    pub fn window_open(&self) -> bool {
        sn_le(self.cmd_sn, self.max_cmd_sn)
    }

    /// Blocks (via poll) until a PDU arrives or `deadline` passes; answers NOP-In pings.
    pub fn recv_blocking(&mut self, deadline: Instant) -> Result<Pdu> {
        loop {
            self.flush()?;
            if let Some(p) = self.next_pdu()? {
                if p.v.opcode == opcode::NOP_IN && p.v.ttt != RESERVED_TAG {
                    self.answer_nop(&p);
                    continue;
                }
                return Ok(p);
            }
            if !self.fill()? {
                let now = Instant::now();
                if now >= deadline {
                    bail!("timed out waiting for the target");
                }
                self.wait((deadline - now).min(Duration::from_millis(200)));
            }
        }
    }

    /// Queues the NOP-Out that answers a target's ping.
    pub fn answer_nop(&mut self, p: &Pdu) {
        let b = initiator::nop_out(
            p.v.lun,
            RESERVED_TAG,
            p.v.ttt,
            self.cmd_sn,
            self.exp_stat_sn,
        );
        self.queue(&b, &[]);
    }

    /// Sends everything queued, blocking.
    pub fn flush_blocking(&mut self, deadline: Instant) -> Result<()> {
        while self.pending_tx() {
            if !self.flush()? {
                if Instant::now() >= deadline {
                    bail!("timed out sending to the target");
                }
                self.wait(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    fn login_exchange(
        &mut self,
        isid: [u8; 6],
        transit: bool,
        csg: LoginStage,
        nsg: LoginStage,
        pairs: &[TextPair],
    ) -> Result<(TargetView, Vec<TextPair>)> {
        let data = encode_text(pairs);
        let b = initiator::login(
            transit,
            csg,
            nsg,
            isid,
            0,
            0,
            self.cmd_sn,
            self.exp_stat_sn,
            data.len() as u32,
        );
        self.queue(&b, &data);
        let deadline = Instant::now() + self.exchange_timeout.unwrap_or(Duration::from_secs(15));
        self.flush_blocking(deadline)?;
        let p = self.recv_blocking(deadline)?;
        if p.v.opcode != opcode::LOGIN_RESPONSE {
            bail!("expected a Login Response, got opcode {:#04x}", p.v.opcode);
        }
        if p.v.status_class != 0 {
            bail!(
                "login refused: status {:02x}{:02x} ({})",
                p.v.status_class,
                p.v.status_detail,
                login_status_text(p.v.status_class, p.v.status_detail)
            );
        }
        self.exp_stat_sn = p.v.stat_sn.wrapping_add(1);
        self.exp_cmd_sn = p.v.exp_cmd_sn;
        self.max_cmd_sn = p.v.max_cmd_sn;
        let answers = parse_text(&self.rbuf[p.data.clone()])
            .map_err(|e| anyhow!("bad login text from target: {e}"))?;
        Ok((p.v, answers))
    }

    /// Logs in a normal session to `target`; with `chap`, authenticates first.
    pub fn login(
        &mut self,
        initiator_name: &str,
        target: &str,
        isid: [u8; 6],
        digest: bool,
        chap: Option<&ChapInitiator>,
    ) -> Result<()> {
        use LoginStage::*;
        let transit_to =
            |v: &TargetView| -> Option<u8> { (v.flags & 0x80 != 0).then_some(v.flags & 0x03) };
        let names = vec![
            TextPair::new("InitiatorName", initiator_name),
            TextPair::new("TargetName", target),
            TextPair::new("SessionType", "Normal"),
        ];
        let mut security = names.clone();
        // With mutual CHAP only CHAP will do: the point is to authenticate the target.
        let mutual = chap.is_some_and(|c| c.is_mutual());
        security.push(TextPair::new(
            "AuthMethod",
            match chap {
                Some(_) if mutual => "CHAP",
                Some(_) => "CHAP,None",
                None => "None",
            },
        ));
        let (mut v, answers) =
            self.login_exchange(isid, chap.is_none(), Security, Operational, &security)?;
        if let Some(chap) = chap {
            let method = answers
                .iter()
                .find(|p| p.key == "AuthMethod")
                .map(|p| p.value.as_str());
            if method == Some("CHAP") {
                let (_, a) = self.login_exchange(
                    isid,
                    false,
                    Security,
                    Security,
                    &[TextPair::new("CHAP_A", "5")],
                )?;
                let get = |k: &str| {
                    a.iter()
                        .find(|p| p.key == k)
                        .map(|p| p.value.clone())
                        .ok_or_else(|| anyhow!("target sent no {k}"))
                };
                let resp = chap
                    .respond(&get("CHAP_A")?, &get("CHAP_I")?, &get("CHAP_C")?)
                    .map_err(|e| anyhow!("CHAP: {e}"))?;
                let (v2, a2) = self.login_exchange(isid, true, Security, Operational, &resp)?;
                let get2 = |k: &str| a2.iter().find(|p| p.key == k).map(|p| p.value.as_str());
                chap.verify_target(get2("CHAP_N"), get2("CHAP_R"))
                    .map_err(|e| anyhow!("mutual CHAP: {e}"))?;
                v = v2;
            } else if method == Some("None") && !mutual {
                // The target asks for no authentication although we have credentials:
                // allowed (we offered None), but worth knowing.
                eprintln!("twinsan bench: note: {target} requires no CHAP (AuthMethod=None)");
            } else {
                bail!("target chose AuthMethod {method:?}");
            }
        }
        // Target may stay in the security stage for a round; nudge it on.
        let mut rounds = 0;
        while transit_to(&v).is_none() && (v.flags >> 2) & 0x03 == 0 {
            rounds += 1;
            if rounds > 4 {
                bail!("target does not leave the security stage");
            }
            v = self
                .login_exchange(isid, true, Security, Operational, &[])?
                .0;
        }
        if transit_to(&v) == Some(3) {
            // Target went straight to full feature phase: RFC defaults apply.
            self.params = Params::default();
            return self.finish_login(v);
        }
        let (mut v, answers) = self.login_exchange(
            isid,
            true,
            Operational,
            FullFeature,
            &offered_keys(digest, self.offer_immediate_data),
        )?;
        let mut params = Params::default();
        apply_answers(&mut params, &answers)?;
        let mut rounds = 0;
        while transit_to(&v) != Some(3) {
            rounds += 1;
            if rounds > 4 {
                bail!("target does not move to full feature phase");
            }
            let (v2, a2) = self.login_exchange(isid, true, Operational, FullFeature, &[])?;
            apply_answers(&mut params, &a2)?;
            v = v2;
        }
        self.params = params;
        self.finish_login(v)
    }

    fn finish_login(&mut self, _v: TargetView) -> Result<()> {
        self.digests = self.params.digests;
        Ok(())
    }

    /// Runs one command to completion (no data out). For probing and setup.
    pub fn command_sync(&mut self, cdb: &[u8], read_len: u32) -> Result<SyncResult> {
        self.command_sync_data(cdb, read_len, &[])
    }

    /// Runs one command to completion, sending `out` as immediate data (parameter lists
    /// such as UNMAP's: they fit the first burst by far).
    pub fn command_sync_data(
        &mut self,
        cdb: &[u8],
        read_len: u32,
        out: &[u8],
    ) -> Result<SyncResult> {
        if !out.is_empty()
            && (!self.params.immediate_data
                || out.len() > self.params.first_burst.min(self.params.target_mrdsl) as usize)
        {
            bail!(
                "{} bytes of data-out do not fit the negotiated immediate data",
                out.len()
            );
        }
        let deadline = Instant::now() + self.exchange_timeout.unwrap_or(Duration::from_secs(30));
        while !self.window_open() {
            let p = self.recv_blocking(deadline)?;
            let _ = p;
        }
        self.sync_itt = self.sync_itt.wrapping_add(1) | 0x8000_0000;
        let itt = self.sync_itt;
        let b = initiator::scsi_command(
            self.lun,
            itt,
            self.cmd_sn,
            self.exp_stat_sn,
            read_len > 0,
            !out.is_empty(),
            read_len.max(out.len() as u32),
            cdb,
            out.len() as u32,
        );
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.queue(&b, out);
        let mut data = vec![0u8; read_len as usize];
        loop {
            let p = self.recv_blocking(deadline)?;
            match p.v.opcode {
                opcode::DATA_IN if p.v.itt == itt => {
                    let off = p.v.buffer_offset as usize;
                    let seg = &self.rbuf[p.data.clone()];
                    if off + seg.len() <= data.len() {
                        data[off..off + seg.len()].copy_from_slice(seg);
                    }
                    if p.v.flags & 0x01 != 0 {
                        return Ok(SyncResult {
                            status: p.v.status,
                            data,
                            sense: String::new(),
                        });
                    }
                }
                opcode::SCSI_RESPONSE if p.v.itt == itt => {
                    if p.v.byte2 != 0 {
                        bail!("iSCSI response {:#04x} (target failure)", p.v.byte2);
                    }
                    let sense = if p.v.status == 2 {
                        describe_sense(&self.rbuf[p.data.clone()])
                    } else {
                        String::new()
                    };
                    return Ok(SyncResult {
                        status: p.v.status,
                        data,
                        sense,
                    });
                }
                opcode::REJECT => bail!("target rejected our command (reason {:#04x})", p.v.byte2),
                opcode::ASYNC_MESSAGE => {
                    eprintln!("twinsan bench: async message event {}", p.bhs[36])
                }
                op => bail!("unexpected PDU opcode {op:#04x} while waiting for a command"),
            }
        }
    }

    /// TEST UNIT READY until GOOD (clears the unit attentions a new I_T nexus gets).
    pub fn until_ready(&mut self) -> Result<()> {
        let mut last = String::new();
        for _ in 0..10 {
            let r = self.command_sync(&[0u8; 6], 0)?;
            if r.status == 0 {
                return Ok(());
            }
            last = r.sense;
        }
        bail!("TEST UNIT READY keeps failing: {last}")
    }

    /// READ CAPACITY(16): (capacity in bytes, logical block size).
    pub fn read_capacity(&mut self) -> Result<(u64, u32)> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9e;
        cdb[1] = 0x10;
        cdb[13] = 32;
        let r = self.command_sync(&cdb, 32)?;
        if r.status != 0 {
            bail!(
                "READ CAPACITY(16) failed with status {:#04x}: {}",
                r.status,
                r.sense
            );
        }
        let last = u64::from_be_bytes(r.data[0..8].try_into().unwrap());
        let bl = u32::from_be_bytes(r.data[8..12].try_into().unwrap());
        if bl == 0 || !bl.is_multiple_of(512) {
            bail!("target reports block size {bl}");
        }
        let bytes = last
            .checked_add(1)
            .and_then(|blocks| blocks.checked_mul(bl as u64))
            .ok_or_else(|| {
                anyhow!("target reports an impossible capacity (last LBA {last}, {bl}-byte blocks)")
            })?;
        Ok((bytes, bl))
    }

    /// Logout (close session) and wait for the answer; PDUs for other tasks are dropped.
    pub fn logout(&mut self) -> Result<()> {
        let itt = 0x7fff_fff0;
        let b = initiator::logout(itt, self.cmd_sn, self.exp_stat_sn);
        self.queue(&b, &[]);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let p = self.recv_blocking(deadline)?;
            if p.v.opcode == opcode::LOGOUT_RESPONSE {
                if p.v.byte2 != 0 {
                    bail!("logout response {}", p.v.byte2);
                }
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests;
