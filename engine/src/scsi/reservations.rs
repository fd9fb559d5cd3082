//! PERSISTENT RESERVE OUT once its parameter list has arrived. PERSISTENT RESERVE IN,
//! RESERVE and RELEASE answer at once (dispatch.rs); the rules are in proto::scsi::pr.

use super::{status, ExecCtx, Reply, Step};
use crate::lun::Lun;

/// Applies a PERSISTENT RESERVE OUT and its effects: unit attentions to the nexuses it
/// names, and the APTPL file when the persisted state changed.
pub(super) fn pr_out(
    lun: &Lun,
    ctx: &ExecCtx,
    action: proto::scsi::cdb::PrOutAction,
    scope: u8,
    pr_type: u8,
    params: &[u8],
    param_len: u32,
) -> Step {
    use proto::scsi::pr::PrOutError;
    let r = lun.with_pr(|st| {
        let r = proto::scsi::pr::pr_out(st, ctx.nexus, action, scope, pr_type, params, param_len);
        if let Ok(e) = &r {
            if e.persist {
                if let Err(err) = lun.persist_pr(st) {
                    // The change stands in memory; say loudly that it would not survive.
                    tracing::error!(path = %lun.pr_path.display(), error = %err, "cannot persist reservations (APTPL)");
                }
            }
        }
        r
    });
    match r {
        Ok(effect) => {
            if effect.changed {
                // The reservation state is one per LUN on the pair: the peer stores it too, so
                // initiators find the same reservations after a failover.
                ctx.mirror_pr.set(true);
            }
            for (nexus, asc) in &effect.unit_attentions {
                lun.ua.raise_to(crate::iscsi::conn::nexus_tag(nexus), *asc);
            }
            Step::Done(Reply::good())
        }
        Err(PrOutError::ReservationConflict) => Step::Done(Reply {
            status: status::RESERVATION_CONFLICT,
            ..Reply::good()
        }),
        Err(PrOutError::Sense(s)) => Step::Done(Reply::check(s)),
    }
}
