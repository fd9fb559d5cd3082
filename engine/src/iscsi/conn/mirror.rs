//! Replication glue: a task's changes (and reservation changes) queued for the peer, and
//! the peer's acknowledgements, which release the task's held reply.

use proto::scsi::sense::{Asc, Sense};

use super::{status, Conn, Out, Task};
use crate::disk::bufpool::BufPool;
use crate::registry::Registry;
use crate::scsi;

impl Conn {
    /// The peer acknowledged (or the link settled) one mirrored operation of task `idx`.
    pub fn on_rep_done(
        &mut self,
        idx: u32,
        ok: bool,
        reg: &Registry,
        pool: &mut BufPool,
        out: &mut Out,
    ) {
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
                // Never report a write that is on one node only. Failed because this node
                // was demoted meanwhile (Mirror::demoted): the standby answer, so that the
                // initiator retries it on the new primary; otherwise the peer could not
                // store it.
                scsi::Reply::check(if reg.role() == crate::config::Role::Secondary {
                    Sense::not_ready(Asc::LOGICAL_UNIT_NOT_ACCESSIBLE_STANDBY)
                } else {
                    Sense::medium_error(Asc::WRITE_ERROR)
                })
            } else {
                reply
            };
            self.finish(idx, reply, pool, out);
        }
    }
}

/// Queues the peer's copy of a modifying disk operation (protocol C), when this node
/// replicates. Reads are local only.
pub(super) fn mirror(
    reg: &Registry,
    t: &mut Task,
    idx: u32,
    lun: usize,
    op: scsi::IoOp,
    out: &mut Out,
) {
    use crate::replication::{LentBytes, RepData, RepOp, RepReq};
    // A node with a peer mirrors every change (the reactor hands it to the core's link);
    // decided by the configuration, so that a connection driven without the link (in
    // process, in tests) queues the same requests.
    if reg.config.peer.is_none() {
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
pub(super) fn mirror_pr(reg: &Registry, t: &mut Task, idx: u32, out: &mut Out) {
    use crate::replication::{RepOp, RepReq};
    if reg.config.peer.is_none() || t.lun == usize::MAX {
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
