//! A task's answer: Data-In PDUs (from the task's buffer in place when large) and the SCSI
//! Response with its status, sense data and residual.

use proto::pdu::{self, Residual, TargetPdu};
use proto::scsi::sense::SenseFormat;

use super::{encode_lun, status, Conn, Out, Phase, SEND_IN_PLACE_MIN_BYTES};
use crate::disk::bufpool::BufPool;
use crate::scsi::{self, ReplyData};

impl Conn {
    /// Sends the final response of task `idx` and frees it.
    pub(super) fn finish(
        &mut self,
        idx: u32,
        reply: scsi::Reply,
        pool: &mut BufPool,
        out: &mut Out,
    ) {
        let Some(Some(t)) = self.tasks.get_mut(idx as usize) else {
            return;
        };
        if t.aborted {
            return;
        }
        if t.rep_inflight > 0 {
            // Protocol C: GOOD only once the peer has it too. The data here is final: a
            // resync may copy the range meanwhile (a write held while the peer is away is
            // answered only after the resync copied it).
            t.scsi.park_range();
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
        let takes_bytes = t.takes_bytes;
        let (kind, arrived, lun_index) = (t.kind, t.arrived, t.lun);
        let unmapped = t.scsi.unmapped_bytes();
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
            ReplyData::Zeros(n) => {
                let z = crate::scsi::zeros();
                &z[..(*n).min(z.len())]
            }
        };
        let produced = data.len() as u32;
        // Residuals compare the expected length with what the command would transfer.
        let transfer = reply
            .transfer_bytes
            .unwrap_or(if read_dir || takes_bytes == 0 {
                produced
            } else {
                takes_bytes
            });
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
        if let Some((m, core)) = &self.metrics {
            let bytes = match (good, read_dir) {
                (false, _) => 0,
                (true, true) => sendable.len() as u64,
                (true, false) => u64::from(transfer),
            };
            m.finished(
                *core,
                crate::metrics::Finished {
                    lun: lun_index,
                    kind,
                    bytes,
                    unmapped,
                    sense_key: reply.sense.as_ref().map(|s| s.key.code()),
                    latency: arrived.map(|t| t.elapsed()).unwrap_or_default(),
                },
            );
        }
        // Data from the task's buffer goes out in place when large (the buffer is held in
        // the send queue until it has); inline data and short reads are copied.
        let in_place = good
            && matches!(reply.data, ReplyData::Buf(_) | ReplyData::Zeros(_))
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
                    out.send_refs.push(crate::net::sendq::SendRef {
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
}
