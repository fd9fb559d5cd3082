//! EXTENDED COPY (LID1): a parameter list resolved against the session's target into a
//! copy job; the job then runs chunk by chunk in `Stage::Copy` (completion.rs). The
//! parameter list format and results are in proto::scsi::xcopy.

use proto::scsi::sense::Sense;

use super::{check_range, check_writable, CopyJob, ExecCtx};

/// Marks (in `CopyJob::done`'s top bit) that the current chunk's write is in flight.
pub(super) const WRITE_PENDING: u64 = 1 << 63;

pub(super) fn task_flag_written(j: &CopyJob) -> bool {
    j.done & WRITE_PENDING != 0
}

/// Resolves an EXTENDED COPY list against this target's LUNs. `Ok(None)`: nothing to copy.
pub(super) fn plan_copy(
    ctx: &ExecCtx,
    params: &[u8],
) -> Result<Option<(CopyJob, u64, u64)>, Sense> {
    use proto::scsi::xcopy::{copy_aborted, COPY_TARGET_NOT_REACHABLE, UNREACHABLE_COPY_TARGET};
    let list = proto::scsi::xcopy::parse(params)?;
    // Copy targets are LUNs of the session's own target, found by their NAA designator:
    // a copy never reaches a LUN the initiator could not address itself.
    let resolve = |i: u16| -> Result<usize, Sense> {
        let id = list
            .targets
            .get(i as usize)
            .ok_or_else(|| copy_aborted(COPY_TARGET_NOT_REACHABLE))?;
        ctx.target
            .luns
            .iter()
            .map(|&(_, idx)| idx)
            .find(|&idx| {
                proto::scsi::inquiry::naa_designator(ctx.reg.luns[idx].naa_id).as_slice()
                    == id.as_slice()
            })
            .ok_or_else(|| copy_aborted(UNREACHABLE_COPY_TARGET))
    };
    let Some(seg) = list.segments.first().copied() else {
        return Ok(None);
    };
    let (src, dst) = (resolve(seg.src)?, resolve(seg.dst)?);
    let (s, d) = (&ctx.reg.luns[src], &ctx.reg.luns[dst]);
    if s.block_size != d.block_size {
        return Err(copy_aborted(COPY_TARGET_NOT_REACHABLE));
    }
    let blocks = seg.blocks as u64;
    if check_range(s, seg.src_lba, blocks).is_err() || check_range(d, seg.dst_lba, blocks).is_err()
    {
        // Out-of-range segments abort the copy (SPC-4 6.4.3: not LBA OUT OF RANGE).
        return Err(copy_aborted(COPY_TARGET_NOT_REACHABLE));
    }
    check_writable(d)?;
    if blocks == 0 {
        return Ok(None);
    }
    let bs = s.block_size as u64;
    let job = CopyJob {
        src,
        dst,
        src_off: seg.src_lba * bs,
        dst_off: seg.dst_lba * bs,
        remaining: blocks * bs,
        chunk: proto::scsi::xcopy::CHUNK_BYTES,
        done: 0,
        list_id: list.list_id,
        hold: list.hold,
    };
    Ok(Some((job, seg.dst_lba, blocks)))
}
