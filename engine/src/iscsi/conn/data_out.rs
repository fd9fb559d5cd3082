//! Write data: immediate data, unsolicited and solicited Data-Out, and the R2Ts that ask
//! for the rest; once all has arrived the executor goes on.

use proto::pdu::{self, RejectReason, TargetPdu, BHS_LEN, RESERVED_TAG};
use proto::scsi::sense::{Asc, Sense};

use super::mirror::mirror_pr;
use super::{encode_lun, task_ctx, Conn, DataOutState, Out, Phase, Task};
use crate::disk::bufpool::{AlignedBuf, BufPool};
use crate::registry::Registry;
use crate::scsi;

impl Conn {
    /// After data arrived (or an R2T completed): solicit more, or run the command.
    pub(super) fn progress_write(
        &mut self,
        idx: u32,
        reg: &Registry,
        pool: &mut BufPool,
        out: &mut Out,
    ) {
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
            let Some(mut ctx) = task_ctx(&self.phase, self.session_id, t, reg, pool) else {
                return;
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

    pub(super) fn data_out(
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
}

/// Copies Data-Out bytes at `offset` into the task's buffer (bytes past what the command
/// needs are counted but dropped: the residual reports them).
/// Immediate data in a lent buffer: taken as the task's data buffer when it is exactly that
/// buffer's contents, else copied like any data (and the lent buffer pooled).
pub(super) fn adopt_data(
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

pub(super) fn accept_data(t: &mut Task, st: &mut DataOutState, offset: u32, data: &[u8]) {
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
