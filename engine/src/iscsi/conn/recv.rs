//! Received bytes to PDUs: framing, digests, lent receive buffers, CmdSN order, and each
//! PDU to the room that handles it.

use proto::pdu::{
    self, frame_len, parse_initiator, split_frame, InitiatorPdu, RejectReason, TargetPdu, BHS_LEN,
};
use proto::seq::CmdSnPlace;

use super::{Conn, Held, ImmData, Out, Phase, Received, LEND_MIN_BYTES, MAX_HELD_COMMANDS};
use crate::disk::bufpool::{AlignedBuf, BufPool};
use crate::iscsi::login::{LoginDone, SessionKind};
use crate::registry::Registry;

impl Conn {
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
}
