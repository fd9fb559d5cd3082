//! READ, WRITE, VERIFY and WRITE ATOMIC: the CDB field checks and the transfer limits.

use proto::scsi::cdb::Rw;
use proto::scsi::sense::Sense;

use super::lun_info;
use crate::disk::bufpool::MAX_BUF_BYTES;
use crate::lun::Lun;

/// Largest single READ/WRITE: MAXIMUM TRANSFER LENGTH in VPD B0 says the same.
pub const MAX_XFER_BYTES: usize = 8 << 20;
const _: () = assert!(
    MAX_XFER_BYTES * 2 <= MAX_BUF_BYTES,
    "VERIFY needs two transfers in one buffer"
);

/// Largest WRITE ATOMIC. Atomic toward every other command (range-locked, and overlapping
/// reads wait); written with RWF_DSYNC. Against power loss only each 4 KiB file-system
/// block is all-or-nothing (docs/limitations.md).
pub const MAX_ATOMIC_BYTES: u32 = 128 << 10;
/// Alignment and granularity of atomic writes: one page.
pub const ATOMIC_ALIGN_BYTES: u32 = 4096;

pub(super) fn check_atomic(lun: &Lun, rw: &Rw, boundary: u16) -> Result<(), Sense> {
    let i = lun_info(lun);
    if boundary != 0 {
        // No atomic boundary support (MAXIMUM ATOMIC BOUNDARY SIZE = 0).
        return Err(Sense::invalid_field_in_cdb(10, None));
    }
    let align = i.atomic_alignment_blocks.max(1) as u64;
    let gran = i.atomic_granularity_blocks.max(1);
    if rw.blocks > i.max_atomic_blocks
        || !rw.lba.is_multiple_of(align)
        || !rw.blocks.is_multiple_of(gran)
    {
        return Err(Sense::invalid_field_in_cdb(2, None));
    }
    Ok(())
}

/// RD/WR/VRPROTECT must be zero on a LUN without protection information (SBC-3 section
/// 4.22); DPO and FUA are honoured (MODE SENSE reports DPOFUA).
pub(super) fn check_rw_fields(rw: &Rw) -> Result<(), Sense> {
    if rw.protect != 0 {
        return Err(Sense::invalid_field_in_cdb(1, Some(7)));
    }
    if rw.blocks as usize > MAX_XFER_BYTES / 512 {
        // Over MAXIMUM TRANSFER LENGTH (SBC-3 section 6.5.3).
        return Err(Sense::invalid_field_in_cdb(7, None));
    }
    Ok(())
}
