//! Task management functions (RFC 7143 section 11.5): aborts and resets, answered once the
//! aborted tasks' I/O has finished.

use proto::pdu::{self, TargetPdu};
use proto::scsi::sense::Asc;

use super::{decode_lun, Conn, Out, Phase};
use crate::disk::bufpool::BufPool;
use crate::registry::Registry;

/// TMF response codes (RFC 7143 section 11.6.1).
mod tmf_response {
    pub const FUNCTION_COMPLETE: u8 = 0;
    pub const TASK_DOES_NOT_EXIST: u8 = 1;
    pub const LUN_DOES_NOT_EXIST: u8 = 2;
    /// RFC 7143 section 11.6.1: TASK REASSIGN below ErrorRecoveryLevel 2.
    pub const REASSIGNMENT_NOT_SUPPORTED: u8 = 4;
    pub const NOT_SUPPORTED: u8 = 5;
}

impl Conn {
    pub(super) fn tmf(
        &mut self,
        t: &pdu::TmfRequest,
        reg: &Registry,
        pool: &mut BufPool,
        out: &mut Out,
    ) {
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
        if self.aborted_unfinished() && response == tmf_response::FUNCTION_COMPLETE {
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

    pub(super) fn abort(&mut self, idx: u32, pool: &mut BufPool) {
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

    /// Whether an aborted task still has an effect on its way: its disk I/O, or its copy to
    /// the peer (a write is over only once both are; an answer before the peer's ack let
    /// the initiator take a change for gone that could still land on the other node).
    fn aborted_unfinished(&self) -> bool {
        self.tasks
            .iter()
            .flatten()
            .any(|x| x.aborted && (x.io_inflight > 0 || x.rep_inflight > 0))
    }

    pub(super) fn flush_deferred_tmf(&mut self, out: &mut Out) {
        if self.aborted_unfinished() {
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
}
