//! The task table and a SCSI command's life: its start (unit attentions, the executor),
//! the steps the executor asks for, disk completions and parked retries.

use proto::pdu::{self, RejectReason, BHS_LEN};
use proto::scsi::sense::Sense;

use super::data_out::{accept_data, adopt_data};
use super::mirror::mirror;
use super::{decode_lun, task_ctx, Conn, DataOutState, ImmData, IoReq, Out, Phase, Task};
use crate::config::CacheMode;
use crate::disk::bufpool::BufPool;
use crate::iscsi::login::SessionKind;
use crate::registry::Registry;
use crate::scsi::{self, ExecCtx, ScsiTask, Step};

impl Conn {
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

    pub(super) fn free_task(&mut self, idx: u32, pool: &mut BufPool) {
        self.answering = 0;
        if let Some(t) = self.tasks.get_mut(idx as usize).and_then(|t| t.take()) {
            if let Some(b) = t.scsi.buf {
                pool.put(b);
            }
            self.free_tasks.push(idx);
        }
    }

    pub(super) fn find_task(&self, itt: u32) -> Option<u32> {
        self.tasks
            .iter()
            .position(|t| t.as_ref().is_some_and(|t| t.itt == itt))
            .map(|i| i as u32)
    }

    pub(super) fn scsi_command(
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
        if s.view_gen != reg.view_gen() {
            s.follow_reload(reg);
        }
        let Some(entry) = s.entry.as_deref() else {
            return;
        };
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
        let mut ctx = ExecCtx::new(
            reg,
            entry,
            (lun_index, lun_id),
            pool,
            self.session_id,
            &s.nexus,
        );
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
            takes_bytes: match step {
                Step::NeedData(n) => n,
                _ => 0,
            },
            scsi: scsi_task,
            data_out: None,
            io_inflight: 0,
            aborted: false,
            deferred: None,
            rep_inflight: 0,
            held: None,
            rep_failed: false,
            mirrored: None,
            kind: crate::metrics::CmdKind::of(c.cdb()[0]),
            arrived: self.metrics.is_some().then(std::time::Instant::now),
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

    pub(super) fn apply_step(
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
                    mark_allocation(reg, lun, op);
                    out.io.push(IoReq { task: idx, lun, op });
                    mirror(reg, t, idx, lun, op, out);
                }
            }
            Step::IoAt(lun, op) => {
                if let Some(Some(t)) = self.tasks.get_mut(idx as usize) {
                    t.io_inflight += 1;
                    mark_allocation(reg, lun, op);
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
        let Some(mut ctx) = task_ctx(&self.phase, self.session_id, t, reg, pool) else {
            return;
        };
        let step = scsi::io_done(&mut t.scsi, res, &mut ctx);
        self.apply_step(idx, step, reg, pool, out);
    }

    /// Whether tasks wait for a range lock (the reactor then polls instead of sleeping).
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Retries parked tasks, oldest first (`slow`: those waiting for a timer tick).
    pub fn retry_waiting(&mut self, reg: &Registry, pool: &mut BufPool, out: &mut Out) {
        self.retry_list(false, reg, pool, out);
    }

    pub(super) fn retry_list(
        &mut self,
        slow: bool,
        reg: &Registry,
        pool: &mut BufPool,
        out: &mut Out,
    ) {
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
            let Some(mut ctx) = task_ctx(&self.phase, self.session_id, t, reg, pool) else {
                return;
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

    /// Pointer to the buffer of a task, for the reactor's SQE (valid while I/O is in flight).
    pub fn task_buf_ptr(&mut self, idx: u32) -> Option<(*mut u8, usize)> {
        let t = self.tasks.get_mut(idx as usize)?.as_mut()?;
        let b = t.scsi.buf.as_mut()?;
        Some((b.as_mut_ptr(), b.len()))
    }
}

/// Before a write or an allocation can reach the file, whichever driver issues it: once it
/// is acknowledged, no read may take its chunks for holes (disk/alloc_map.rs). A punch
/// clears them only once done (scsi/completion.rs).
fn mark_allocation(reg: &Registry, lun: usize, op: scsi::IoOp) {
    let Some(l) = reg.luns.get(lun) else { return };
    match op {
        scsi::IoOp::Write { offset, len, .. } => l.alloc.mark_data(offset, u64::from(len)),
        scsi::IoOp::Fallocate { offset, len, mode } if mode & libc::FALLOC_FL_PUNCH_HOLE == 0 => {
            l.alloc.mark_data(offset, len)
        }
        _ => {}
    }
}
