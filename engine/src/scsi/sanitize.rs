//! SANITIZE, the command side: the OVERWRITE parameter list and the start of a sanitize.
//! The erase itself runs in the background (crate::scsi::sanitize_job).

use proto::scsi::sense::{Asc, Sense};

use super::{ctx_lun, ExecCtx, Reply, ScsiTask, Stage, Step};

/// OVERWRITE parameter list (SBC-3 section 5.30.3).
pub(super) fn parse_overwrite(
    p: &[u8],
    bs: usize,
) -> Result<crate::scsi::sanitize_job::Kind, Sense> {
    if p.len() < 5 {
        return Err(Sense::parameter_list_length_error());
    }
    let count = p[0] & 0x1f;
    let invert = p[0] & 0x80 != 0;
    if count == 0 {
        return Err(Sense::invalid_field_in_parameter_list(0, Some(0)));
    }
    let plen = u16::from_be_bytes([p[2], p[3]]) as usize;
    if plen == 0 || plen > bs || 4 + plen != p.len() {
        return Err(Sense::invalid_field_in_parameter_list(2, None));
    }
    Ok(crate::scsi::sanitize_job::Kind::Overwrite {
        pattern: p[4..].to_vec(),
        invert,
        count,
    })
}

pub(super) fn start_sanitize(
    task: &mut ScsiTask,
    ctx: &ExecCtx,
    kind: crate::scsi::sanitize_job::Kind,
    immed: bool,
) -> Step {
    let Some(lun) = ctx_lun(ctx) else {
        return Step::Done(Reply::check(Sense::lun_not_supported()));
    };
    // A replicated LUN: the peer gets every region again once the erase is done, and
    // every region is recorded dirty before it starts (a crash in its middle).
    let after = match (ctx.reg.replication.get(), ctx.lun) {
        (Some(rep), Some(index)) => {
            if let Err(e) = rep.mark_lun_dirty(index) {
                tracing::error!(error = %e, "cannot record the LUN dirty before SANITIZE");
                return Step::Done(Reply::check(Sense::internal_target_failure()));
            }
            let rep = std::sync::Arc::clone(rep);
            Some(
                Box::new(move || rep.lun_rewritten(index, "SANITIZE rewrote the LUN"))
                    as crate::scsi::sanitize_job::AfterErase,
            )
        }
        _ => None,
    };
    if !crate::scsi::sanitize_job::start(std::sync::Arc::clone(lun), kind, after) {
        return Step::Done(Reply::check(Sense::not_ready(
            Asc::LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS,
        )));
    }
    if immed {
        return Step::Done(Reply::good());
    }
    task.stage = Stage::SanitizeWait;
    Step::WaitSlow
}
