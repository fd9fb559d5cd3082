//! Before a command changes blocks: the range lock, the write-intent log and the node's
//! role. A task that cannot go on yet is parked and tries again ([`retry`]); once locked,
//! its stage begins.

use proto::scsi::sense::{Asc, Sense, SenseFormat};

use super::completion::io_error;
use super::{
    ctx_lun, with_format, ExecCtx, IoOp, Reply, ReplyData, ScsiTask, Stage, Step, PUNCH_HOLE,
};

/// Whether the write-intent log lets a write to these blocks of registry LUN `lun` be
/// issued now (`replication/intents.rs`); when not, the caller drops its range lock and retries.
/// `Err(errno)`: the metadata has not been writable for a while (the write fails).
fn intent_ready(ctx: &ExecCtx, lun: usize, lba: u64, blocks: u64) -> Result<bool, i32> {
    let Some(rep) = ctx.reg.replication.get() else {
        return Ok(true);
    };
    let bs = u64::from(ctx.reg.luns[lun].block_size);
    rep.write_intent_ready(
        lun,
        lba.saturating_mul(bs),
        blocks.max(1).saturating_mul(bs),
    )
}

/// Takes the range lock for `then`, or parks the task until it is free.
pub(super) fn lock_then(
    task: &mut ScsiTask,
    ctx: &ExecCtx,
    lba: u64,
    blocks: u64,
    then: Stage,
) -> Step {
    lock_then_mode(task, ctx, lba, blocks, false, then)
}

/// A modifying command that was admitted while this node was primary but reaches its
/// range lock (the moment before it changes anything) after a demotion: refused like any
/// command on a secondary, so the initiator retries it on the new primary instead of it
/// landing here after `demote` has drained (twinsan promote on the peer may follow at once).
fn demoted_meanwhile(ctx: &ExecCtx) -> Option<Step> {
    (ctx.reg.role() == crate::config::Role::Secondary).then(|| {
        Step::Done(Reply::check(Sense::not_ready(
            Asc::LOGICAL_UNIT_NOT_ACCESSIBLE_STANDBY,
        )))
    })
}

pub(super) fn lock_then_mode(
    task: &mut ScsiTask,
    ctx: &ExecCtx,
    lba: u64,
    blocks: u64,
    atomic: bool,
    then: Stage,
) -> Step {
    let Some(lun) = ctx_lun(ctx) else {
        return Step::Done(Reply::check(Sense::lun_not_supported()));
    };
    if let Some(refused) = demoted_meanwhile(ctx) {
        return refused;
    }
    let end = lba + blocks.max(1);
    let got = if atomic {
        lun.ranges.try_lock_atomic(lba, end)
    } else {
        lun.ranges.try_lock(lba, end)
    };
    // Checked under the range lock: the write-intent keeper forgets a region only while
    // holding its lock (intent.rs).
    let ready = match (&got, ctx.lun) {
        (Some(_), Some(i)) => intent_ready(ctx, i, lba, blocks),
        _ => Ok(true),
    };
    let got = match ready {
        Ok(ready) => got.filter(|_| ready),
        Err(errno) => return Step::Done(Reply::check(io_error(errno, true))),
    };
    match got {
        Some(g) => {
            task.guard = Some(g);
            task.stage = then;
            begin(task)
        }
        None => {
            task.stage = Stage::Lock {
                lba,
                blocks,
                atomic,
                then: Box::new(then),
            };
            Step::Wait
        }
    }
}

/// Like [`lock_then`] for a range of another LUN (EXTENDED COPY destinations).
pub(super) fn lock_on(
    task: &mut ScsiTask,
    ctx: &ExecCtx,
    lun: usize,
    lba: u64,
    blocks: u64,
    then: Stage,
) -> Step {
    if let Some(refused) = demoted_meanwhile(ctx) {
        return refused;
    }
    let got = ctx.reg.luns[lun].ranges.try_lock(lba, lba + blocks.max(1));
    let got = match got.as_ref().map(|_| intent_ready(ctx, lun, lba, blocks)) {
        Some(Err(errno)) => return Step::Done(Reply::check(io_error(errno, true))),
        Some(Ok(false)) => None,
        _ => got,
    };
    match got {
        Some(g) => {
            task.guard = Some(g);
            task.stage = then;
            begin(task)
        }
        None => {
            task.stage = Stage::LockOn {
                lun,
                lba,
                blocks,
                then: Box::new(then),
            };
            Step::Wait
        }
    }
}

/// A parked task tries again.
pub fn retry(task: &mut ScsiTask, ctx: &mut ExecCtx) -> Step {
    let fmt = task.sense_format.unwrap_or(SenseFormat::Fixed);
    match std::mem::take(&mut task.stage) {
        Stage::Lock {
            lba,
            blocks,
            atomic,
            then,
        } => with_format(lock_then_mode(task, ctx, lba, blocks, atomic, *then), fmt),
        Stage::LockOn {
            lun,
            lba,
            blocks,
            then,
        } => with_format(lock_on(task, ctx, lun, lba, blocks, *then), fmt),
        Stage::SanitizeWait => match ctx_lun(ctx) {
            Some(l) if l.sanitize.active() => {
                task.stage = Stage::SanitizeWait;
                Step::WaitSlow
            }
            Some(l) => match l.sanitize.failed() {
                None => Step::Done(Reply::good()),
                Some(errno) => with_format(Step::Done(Reply::check(io_error(errno, true))), fmt),
            },
            None => Step::Done(Reply::check(Sense::lun_not_supported())),
        },
        Stage::ReadBlocked {
            lba,
            blocks,
            offset,
            len,
            transfer,
        } => {
            let lun = ctx_lun(ctx).filter(|l| l.ranges.readable(lba, lba + blocks.max(1)));
            if let Some(l) = lun {
                if l.alloc.is_hole(offset, u64::from(len)) {
                    // Nothing written there (or unmapped since): zeros from the shared
                    // buffer, with no file read and no page cache (alloc_map.rs).
                    return Step::Done(
                        Reply {
                            data: ReplyData::Zeros(len as usize),
                            ..Reply::good()
                        }
                        .transfer(transfer),
                    );
                }
                task.buf = Some(ctx.pool.get(len as usize));
                task.stage = Stage::Read {
                    offset,
                    len,
                    done: 0,
                    transfer,
                };
                Step::Io(IoOp::Read {
                    offset,
                    buf_off: 0,
                    len,
                })
            } else {
                task.stage = Stage::ReadBlocked {
                    lba,
                    blocks,
                    offset,
                    len,
                    transfer,
                };
                Step::Wait
            }
        }
        other => {
            task.stage = other;
            Step::Wait
        }
    }
}

/// The first operation of a (locked) stage.
pub(super) fn begin(task: &mut ScsiTask) -> Step {
    match task.stage {
        Stage::Writing {
            offset, len, fua, ..
        } => Step::Io(IoOp::Write {
            offset,
            buf_off: 0,
            len,
            fua,
        }),
        Stage::CawRead { offset, n, .. } => Step::Io(IoOp::Read {
            offset,
            buf_off: 2 * n,
            len: n,
        }),
        Stage::OrRead { offset, n, .. } => Step::Io(IoOp::Read {
            offset,
            buf_off: n,
            len: n,
        }),
        Stage::WsFill {
            offset,
            remaining,
            chunk,
            fua,
        } => Step::Io(IoOp::Write {
            offset,
            buf_off: 0,
            len: (chunk as u64).min(remaining) as u32,
            fua,
        }),
        Stage::Falloc { offset, len, mode } => Step::Io(IoOp::Fallocate { offset, len, mode }),
        Stage::Copy(ref j) => Step::IoAt(
            j.src,
            IoOp::Read {
                offset: j.src_off,
                buf_off: 0,
                len: (j.chunk as u64).min(j.remaining) as u32,
            },
        ),
        Stage::Unmapping { ref ranges, next } => match ranges.get(next) {
            Some(&(offset, len)) => Step::Io(IoOp::Fallocate {
                offset,
                len,
                mode: PUNCH_HOLE,
            }),
            None => Step::Done(Reply::good()),
        },
        _ => {
            debug_assert!(false, "begin in stage {:?}", task.stage);
            Step::Done(Reply::check(Sense::internal_target_failure()))
        }
    }
}
