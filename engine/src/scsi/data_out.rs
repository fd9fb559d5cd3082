//! All write data (or a parameter list) of a command has arrived: lock and write, compare,
//! or apply the parameters.

use proto::scsi::cdb::Command;
use proto::scsi::sense::{Asc, Sense, SenseFormat};

use super::extended_copy::plan_copy;
use super::locking::{lock_on, lock_then, lock_then_mode};
use super::provisioning::parse_unmap;
use super::reservations::pr_out;
use super::sanitize::{parse_overwrite, start_sanitize};
use super::{
    ctx_lun, lun_info, with_format, ExecCtx, IoOp, Reply, ScsiTask, Stage, Step, PUNCH_HOLE,
    ZERO_RANGE,
};

/// All write data has arrived.
pub fn data_ready(task: &mut ScsiTask, ctx: &mut ExecCtx) -> Step {
    let fmt = task.sense_format.unwrap_or(SenseFormat::Fixed);
    let Some(lun) = ctx_lun(ctx) else {
        return Step::Done(Reply::check(Sense::lun_not_supported()));
    };
    let bs = lun.block_size as u64;
    let step = match std::mem::take(&mut task.stage) {
        Stage::WriteData {
            offset,
            len,
            fua,
            flush_after,
            transfer,
            atomic,
        } => {
            let (lba, blocks) = (offset / bs, (len as u64).div_ceil(bs));
            lock_then_mode(
                task,
                ctx,
                lba,
                blocks,
                atomic,
                Stage::Writing {
                    offset,
                    len,
                    done: 0,
                    fua,
                    flush_after,
                    transfer,
                },
            )
        }
        Stage::CawData { lba, n, fua } => lock_then(
            task,
            ctx,
            lba,
            n as u64 / bs,
            Stage::CawRead {
                offset: lba * bs,
                n,
                done: 0,
                fua,
            },
        ),
        Stage::OrData { lba, n, fua } => lock_then(
            task,
            ctx,
            lba,
            n as u64 / bs,
            Stage::OrRead {
                offset: lba * bs,
                n,
                done: 0,
                fua,
            },
        ),
        Stage::WsData {
            lba,
            blocks,
            unmap,
            to_end,
        } => {
            let offset = lba * bs;
            let len = blocks * bs;
            let zeros = task
                .buf
                .as_deref()
                .is_none_or(|b| b.iter().all(|&x| x == 0));
            let fua = !lun.mode_state().wce;
            let _ = to_end;
            let then = if unmap && lun.thin {
                // UNMAP=1 deallocates (as LIO and libiscsi's UnmapUntilEnd expect, whatever
                // the pattern); LBPRZ=1 says the blocks then read as zeros.
                Stage::Falloc {
                    offset,
                    len,
                    mode: PUNCH_HOLE,
                }
            } else if zeros {
                Stage::Falloc {
                    offset,
                    len,
                    mode: ZERO_RANGE,
                }
            } else {
                // Repeat the block through a chunk buffer, written as many times as needed.
                let chunk = (len.min(1 << 20) as usize / bs as usize) * bs as usize;
                let mut buf = ctx.pool.get(chunk);
                if let Some(one) = task.buf.take() {
                    for c in buf.chunks_mut(bs as usize) {
                        c.copy_from_slice(&one[..bs as usize]);
                    }
                    ctx.pool.put(one);
                }
                task.buf = Some(buf);
                Stage::WsFill {
                    offset,
                    remaining: len,
                    chunk: chunk as u32,
                    fua,
                }
            };
            lock_then(task, ctx, lba, blocks, then)
        }
        Stage::UnmapData { len } => match parse_unmap(
            lun,
            task.buf
                .as_deref()
                .map(|b| &b[..(len as usize).min(b.len())])
                .unwrap_or(&[]),
        ) {
            Err(s) => Step::Done(Reply::check(s)),
            Ok(ranges) if ranges.is_empty() => Step::Done(Reply::good()),
            Ok(ranges) => {
                let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
                let hi = ranges.iter().map(|r| r.0 + r.1).max().unwrap_or(0);
                let bytes: Vec<(u64, u64)> =
                    ranges.iter().map(|&(l, n)| (l * bs, n * bs)).collect();
                lock_then(
                    task,
                    ctx,
                    lo,
                    hi - lo,
                    Stage::Unmapping {
                        ranges: bytes,
                        next: 0,
                    },
                )
            }
        },
        Stage::PrOutData {
            cmd:
                Command::PersistentReserveOut {
                    action,
                    scope,
                    pr_type,
                    param_len,
                },
            len,
        } => {
            let p = task
                .buf
                .as_deref()
                .map(|b| &b[..(len as usize).min(b.len())])
                .unwrap_or(&[]);
            pr_out(lun, ctx, action, scope, pr_type, p, param_len)
        }
        Stage::SanitizeData { len, immed } => {
            let p = task
                .buf
                .as_deref()
                .map(|b| &b[..(len as usize).min(b.len())])
                .unwrap_or(&[]);
            match parse_overwrite(p, bs as usize) {
                Err(s) => Step::Done(Reply::check(s)),
                Ok(kind) => start_sanitize(task, ctx, kind, immed),
            }
        }
        Stage::XcopyData { len } => {
            let params = task
                .buf
                .as_deref()
                .map(|b| &b[..(len as usize).min(b.len())])
                .unwrap_or(&[]);
            match plan_copy(ctx, params) {
                Err(s) => Step::Done(Reply::check(s)),
                Ok(None) => Step::Done(Reply::good()),
                Ok(Some((job, dst_lba, blocks))) => {
                    let chunk = job.chunk as usize;
                    if let Some(b) = task.buf.take() {
                        ctx.pool.put(b);
                    }
                    task.buf = Some(ctx.pool.get(chunk));
                    lock_on(
                        task,
                        ctx,
                        job.dst,
                        dst_lba,
                        blocks,
                        Stage::Copy(Box::new(job)),
                    )
                }
            }
        }
        Stage::VerifyData {
            offset,
            len,
            one_block,
        } => {
            let data_len = if one_block { bs as u32 } else { len };
            task.stage = Stage::VerifyRead {
                offset,
                len,
                done: 0,
                one_block,
            };
            Step::Io(IoOp::Read {
                offset,
                buf_off: data_len,
                len,
            })
        }
        Stage::ModeSelect {
            ten_byte,
            pf,
            sp,
            len,
        } => {
            let params = task
                .buf
                .as_deref()
                .map(|b| &b[..(len as usize).min(b.len())])
                .unwrap_or(&[]);
            let mut state = lun.mode.lock().unwrap_or_else(|p| p.into_inner());
            let before = *state;
            match proto::scsi::mode::mode_select(
                &lun_info(lun),
                &mut state,
                pf,
                sp,
                params,
                ten_byte,
            ) {
                Ok(()) => {
                    if *state != before {
                        drop(state);
                        // SPC-4 section 6.11: other nexuses learn of the change by UA.
                        lun.ua.raise_state_change(
                            ctx.session_id,
                            Asc::MODE_PARAMETERS_CHANGED,
                            lun.mode_tag(),
                        );
                    }
                    Step::Done(Reply::good())
                }
                Err(s) => Step::Done(Reply::check(s)),
            }
        }
        other => {
            debug_assert!(false, "data_ready in stage {other:?}");
            Step::Done(Reply::check(Sense::internal_target_failure()))
        }
    };
    with_format(step, fmt)
}
