//! A disk operation finished: the command's next operation, or its reply.

use proto::scsi::sense::{Asc, Sense, SenseFormat, SenseKey};

use super::extended_copy::{task_flag_written, WRITE_PENDING};
use super::locking::begin;
use super::{
    ctx_lun, with_format, ExecCtx, IoOp, Reply, ReplyData, ScsiTask, Stage, Step, PUNCH_HOLE,
};

/// Maps a failed disk operation to sense data.
pub(super) fn io_error(errno: i32, writing: bool) -> Sense {
    match errno {
        // A thin LUN whose file system is full: SBC-3 section 4.7.3.6.
        libc::ENOSPC | libc::EDQUOT => Sense::new(
            SenseKey::DataProtect,
            Asc::SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
        ),
        libc::EROFS => Sense::write_protected(),
        _ if writing => Sense::medium_error(Asc::WRITE_ERROR),
        _ => Sense::medium_error(Asc::UNRECOVERED_READ_ERROR),
    }
}

/// A disk operation finished with `res` (bytes transferred, or -errno).
pub fn io_done(task: &mut ScsiTask, res: i32, ctx: &mut ExecCtx) -> Step {
    let fmt = task.sense_format.unwrap_or(SenseFormat::Fixed);
    let bs = ctx_lun(ctx).map(|l| l.block_size).unwrap_or(512);
    let transfer = task.transfer;
    let fail = |res: i32, writing: bool, offset: u64| {
        // At most 10 lines a second: a full file system fails every write (log_limit.rs).
        static DISK_ERRORS: crate::log_limit::LogLimit = crate::log_limit::LogLimit::new(10);
        if let Some(suppressed) = DISK_ERRORS.allow() {
            tracing::warn!(errno = -res, offset, writing, suppressed, "disk I/O failed");
        }
        Step::Done(Reply::check(if res == 0 {
            io_error(libc::EIO, writing)
        } else {
            io_error(-res, writing)
        }))
    };
    let step = match std::mem::take(&mut task.stage) {
        Stage::Read {
            offset,
            len,
            done,
            transfer,
        } => {
            if res <= 0 {
                fail(res, false, offset)
            } else {
                let done = done + res as u32;
                if done < len {
                    task.stage = Stage::Read {
                        offset,
                        len,
                        done,
                        transfer,
                    };
                    Step::Io(IoOp::Read {
                        offset: offset + done as u64,
                        buf_off: done,
                        len: len - done,
                    })
                } else {
                    Step::Done(
                        Reply {
                            data: ReplyData::Buf(len as usize),
                            ..Reply::good()
                        }
                        .transfer(transfer),
                    )
                }
            }
        }
        Stage::Writing {
            offset,
            len,
            done,
            fua,
            flush_after,
            transfer,
        } => {
            if res <= 0 {
                fail(res, true, offset)
            } else {
                let done = done + res as u32;
                if done < len {
                    task.stage = Stage::Writing {
                        offset,
                        len,
                        done,
                        fua,
                        flush_after,
                        transfer,
                    };
                    Step::Io(IoOp::Write {
                        offset: offset + done as u64,
                        buf_off: done,
                        len: len - done,
                        fua,
                    })
                } else if flush_after && !fua {
                    task.stage = Stage::Flushing { transfer };
                    Step::Io(IoOp::Flush)
                } else {
                    Step::Done(Reply::good().transfer(transfer))
                }
            }
        }
        Stage::Flushing { transfer } => {
            if res < 0 {
                fail(res, true, 0)
            } else if transfer > 0 {
                Step::Done(Reply::good().transfer(transfer))
            } else {
                Step::Done(Reply::good())
            }
        }
        Stage::VerifyRead {
            offset,
            len,
            done,
            one_block,
        } => {
            if res <= 0 {
                fail(res, false, offset)
            } else {
                let done = done + res as u32;
                let data_len = if one_block { bs } else { len };
                if done < len {
                    task.stage = Stage::VerifyRead {
                        offset,
                        len,
                        done,
                        one_block,
                    };
                    Step::Io(IoOp::Read {
                        offset: offset + done as u64,
                        buf_off: data_len + done,
                        len: len - done,
                    })
                } else {
                    let Some(buf) = task.buf.as_deref() else {
                        return Step::Done(Reply::check(Sense::internal_target_failure()));
                    };
                    let (given, medium) = buf.split_at(data_len as usize);
                    let mismatch = if one_block {
                        medium[..len as usize]
                            .chunks(bs as usize)
                            .enumerate()
                            .find_map(|(i, blk)| {
                                blk.iter()
                                    .zip(given)
                                    .position(|(a, b)| a != b)
                                    .map(|p| i * bs as usize + p)
                            })
                    } else {
                        given
                            .iter()
                            .zip(&medium[..len as usize])
                            .position(|(a, b)| a != b)
                    };
                    match mismatch {
                        // SBC-3 section 5.29: INFORMATION is the offset of the first miscompare.
                        Some(at) => Step::Done(Reply::check(Sense::miscompare(at as u64))),
                        None => Step::Done(Reply::good()),
                    }
                }
            }
        }
        Stage::CawRead {
            offset,
            n,
            done,
            fua,
        } => {
            if res <= 0 {
                fail(res, false, offset)
            } else {
                let done = done + res as u32;
                if done < n {
                    task.stage = Stage::CawRead {
                        offset,
                        n,
                        done,
                        fua,
                    };
                    Step::Io(IoOp::Read {
                        offset: offset + done as u64,
                        buf_off: 2 * n + done,
                        len: n - done,
                    })
                } else {
                    let Some(buf) = task.buf.as_deref() else {
                        return Step::Done(Reply::check(Sense::internal_target_failure()));
                    };
                    let (verify, medium) =
                        (&buf[..n as usize], &buf[2 * n as usize..3 * n as usize]);
                    match verify.iter().zip(medium).position(|(a, b)| a != b) {
                        // SBC-3 section 5.3: nothing is written; INFORMATION = first miscompare offset.
                        Some(at) => Step::Done(Reply::check(Sense::miscompare(at as u64))),
                        None => {
                            task.stage = Stage::Writing {
                                offset,
                                len: n,
                                done: 0,
                                fua,
                                flush_after: false,
                                transfer: 0,
                            };
                            Step::Io(IoOp::Write {
                                offset,
                                buf_off: n,
                                len: n,
                                fua,
                            })
                        }
                    }
                }
            }
        }
        Stage::OrRead {
            offset,
            n,
            done,
            fua,
        } => {
            if res <= 0 {
                fail(res, false, offset)
            } else {
                let done = done + res as u32;
                if done < n {
                    task.stage = Stage::OrRead {
                        offset,
                        n,
                        done,
                        fua,
                    };
                    Step::Io(IoOp::Read {
                        offset: offset + done as u64,
                        buf_off: n + done,
                        len: n - done,
                    })
                } else {
                    let Some(buf) = task.buf.as_deref_mut() else {
                        return Step::Done(Reply::check(Sense::internal_target_failure()));
                    };
                    let (data, medium) = buf.split_at_mut(n as usize);
                    for (m, d) in medium[..n as usize].iter_mut().zip(data.iter()) {
                        *m |= *d;
                    }
                    // Write the ORed blocks back from the second half of the buffer.
                    task.stage = Stage::Writing {
                        offset,
                        len: n,
                        done: 0,
                        fua,
                        flush_after: false,
                        transfer: 0,
                    };
                    Step::Io(IoOp::Write {
                        offset,
                        buf_off: n,
                        len: n,
                        fua,
                    })
                }
            }
        }
        Stage::WsFill {
            offset,
            remaining,
            chunk,
            fua,
        } => {
            if res <= 0 {
                fail(res, true, offset)
            } else {
                // Partial writes resume at a block boundary of the repeated pattern.
                let wrote = (res as u64 / bs as u64) * bs as u64;
                let wrote = if wrote == 0 { res as u64 } else { wrote };
                let remaining = remaining.saturating_sub(wrote);
                if remaining == 0 {
                    Step::Done(Reply::good())
                } else {
                    let offset = offset + wrote;
                    task.stage = Stage::WsFill {
                        offset,
                        remaining,
                        chunk,
                        fua,
                    };
                    Step::Io(IoOp::Write {
                        offset,
                        buf_off: 0,
                        len: (chunk as u64).min(remaining) as u32,
                        fua,
                    })
                }
            }
        }
        Stage::Falloc { offset, len, mode } => {
            if res < 0 {
                fail(res, true, offset)
            } else {
                if mode == PUNCH_HOLE {
                    punched(task, ctx, offset, len);
                }
                Step::Done(Reply::good())
            }
        }
        Stage::Copy(mut j) => {
            // Reads and writes alternate; a completion is a read when nothing of the current
            // chunk has been written yet (done counts written bytes).
            let n = (j.chunk as u64).min(j.remaining) as u32;
            if res <= 0 {
                tracing::warn!(errno = -res, "EXTENDED COPY I/O failed");
                if !j.hold {
                    Step::Done(Reply::check(proto::scsi::xcopy::copy_aborted(
                        proto::scsi::xcopy::COPY_TARGET_NOT_REACHABLE,
                    )))
                } else {
                    ctx.reg.hold_copy_result(
                        ctx.session_id,
                        j.list_id,
                        proto::scsi::xcopy::CopyResult {
                            ok: false,
                            segments_done: 0,
                            bytes: j.done,
                        },
                    );
                    Step::Done(Reply::check(proto::scsi::xcopy::copy_aborted(
                        proto::scsi::xcopy::COPY_TARGET_NOT_REACHABLE,
                    )))
                }
            } else if (res as u32) < n {
                // Short transfers only happen at EOF or on a full file system: give up cleanly.
                Step::Done(Reply::check(io_error(libc::EIO, true)))
            } else if !task_flag_written(&j) {
                let (dst, dst_off) = (j.dst, j.dst_off);
                j.done |= WRITE_PENDING;
                task.stage = Stage::Copy(j);
                Step::IoAt(
                    dst,
                    IoOp::Write {
                        offset: dst_off,
                        buf_off: 0,
                        len: n,
                        fua: false,
                    },
                )
            } else {
                j.done = (j.done & !WRITE_PENDING) + n as u64;
                j.remaining -= n as u64;
                j.src_off += n as u64;
                j.dst_off += n as u64;
                if j.remaining == 0 {
                    if j.hold {
                        ctx.reg.hold_copy_result(
                            ctx.session_id,
                            j.list_id,
                            proto::scsi::xcopy::CopyResult {
                                ok: true,
                                segments_done: 1,
                                bytes: j.done,
                            },
                        );
                    }
                    Step::Done(Reply::good())
                } else {
                    let (src, off, len) =
                        (j.src, j.src_off, (j.chunk as u64).min(j.remaining) as u32);
                    task.stage = Stage::Copy(j);
                    Step::IoAt(
                        src,
                        IoOp::Read {
                            offset: off,
                            buf_off: 0,
                            len,
                        },
                    )
                }
            }
        }
        Stage::Unmapping { ranges, next } => {
            if res < 0 {
                fail(res, true, ranges.get(next).map(|r| r.0).unwrap_or(0))
            } else {
                if let Some(&(offset, len)) = ranges.get(next) {
                    punched(task, ctx, offset, len);
                }
                task.stage = Stage::Unmapping {
                    ranges,
                    next: next + 1,
                };
                begin(task)
            }
        }
        other => {
            debug_assert!(false, "io_done in stage {other:?}");
            Step::Done(Reply::check(Sense::internal_target_failure()))
        }
    };
    let _ = transfer;
    with_format(step, fmt)
}

/// A punch of `[offset, offset + len)` completed: the chunks it covers whole read as zeros
/// from now on. The task still holds its range lock, so no write to them is in flight
/// (disk/alloc_map.rs). The task counts the bytes for `twinsan_scsi_unmapped_bytes_total`.
fn punched(task: &mut ScsiTask, ctx: &ExecCtx, offset: u64, len: u64) {
    task.unmapped = task.unmapped.saturating_add(len);
    if let Some(l) = ctx_lun(ctx) {
        l.alloc.mark_hole(offset, len);
    }
}
