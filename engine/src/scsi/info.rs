//! What a LUN reports about itself: identity and limits (INQUIRY, READ CAPACITY, the VPD
//! pages), REPORT LUNS, and the commands implemented (REPORT SUPPORTED OPERATION CODES).

use proto::scsi::cdb;
use proto::scsi::lun_info::LunInfo;
use proto::scsi::sense::Sense;

use super::read_write::{ATOMIC_ALIGN_BYTES, MAX_ATOMIC_BYTES, MAX_XFER_BYTES};
use super::{ExecCtx, Reply};
use crate::lun::Lun;

/// The identity and limits a LUN reports.
pub fn lun_info(lun: &Lun) -> LunInfo {
    let mut i = LunInfo::new(
        lun.block_size,
        lun.num_blocks(),
        lun.naa_id,
        &lun.serial,
        &lun.target_name,
    );
    i.thin = lun.thin;
    i.lbprz = lun.thin;
    i.read_only = lun.read_only;
    // EXTENDED COPY (LID1) is supported: the 3PC bit in standard INQUIRY says so.
    i.extended_copy = true;
    i.max_xfer_blocks = (MAX_XFER_BYTES / lun.block_size as usize) as u32;
    // From `physical_block_size` (4 KiB by default: the file-system block). See
    // docs/limitations.md for how it meets libiscsi's GetLBAStatus.UnmapSingle.
    i.physical_block_exp = lun.physical_block_exp;
    // Unmap in file-system blocks (4 KiB divides 1 MiB): smaller punches only zero.
    i.unmap_granularity_blocks = (4096 / lun.block_size).max(1);
    // WRITE SAME up to 16 MiB: large enough for ESXi's zeroing, small enough that one
    // command's pattern writes never stall a core for long.
    i.max_write_same_blocks = (16 << 20) / lun.block_size as u64;
    // WSNZ = 0: a zero-length WRITE SAME writes to the end of the LUN.
    i.write_same_no_zero = false;
    let page_blocks = (ATOMIC_ALIGN_BYTES / lun.block_size).max(1);
    i.max_atomic_blocks = (MAX_ATOMIC_BYTES / lun.block_size).max(1);
    i.atomic_alignment_blocks = page_blocks;
    i.atomic_granularity_blocks = page_blocks;
    i
}

/// Whether the engine implements an opcode / service action (for REPORT SUPPORTED
/// OPERATION CODES: we list exactly what `run` in dispatch.rs handles).
pub fn implemented(opcode: u8, service_action: Option<u16>) -> bool {
    use cdb::op::*;
    match opcode {
        TEST_UNIT_READY | REQUEST_SENSE | READ_6 | WRITE_6 | INQUIRY | MODE_SELECT_6
        | MODE_SENSE_6 | START_STOP_UNIT | READ_CAPACITY_10 | READ_10 | WRITE_10
        | WRITE_VERIFY_10 | VERIFY_10 | PRE_FETCH_10 | SYNC_CACHE_10 | MODE_SELECT_10
        | MODE_SENSE_10 | READ_16 | WRITE_16 | WRITE_VERIFY_16 | VERIFY_16 | PRE_FETCH_16
        | SYNC_CACHE_16 | REPORT_LUNS | READ_12 | WRITE_12 | WRITE_VERIFY_12 | VERIFY_12
        | PREVENT_ALLOW | WRITE_SAME_10 | WRITE_SAME_16 | UNMAP | COMPARE_AND_WRITE
        | ORWRITE_16 | WRITE_ATOMIC_16 | READ_DEFECT_DATA_10 | READ_DEFECT_DATA_12
        | EXTENDED_COPY => true,
        // OVERWRITE, BLOCK ERASE and EXIT FAILURE MODE; not CRYPTOGRAPHIC ERASE.
        SANITIZE => matches!(service_action, Some(0x01) | Some(0x02) | Some(0x1f)),
        RESERVE_6 | RELEASE_6 | RESERVE_10 | RELEASE_10 => true,
        // Every PR OUT service action but REPLACE LOST RESERVATION (8).
        PR_OUT => service_action.is_some_and(|sa| sa <= 7),
        RECEIVE_COPY_RESULTS => matches!(service_action, Some(0) | Some(3)),
        SERVICE_ACTION_IN_16 => matches!(service_action, Some(0x10) | Some(0x12)),
        PR_IN => service_action.is_some_and(|sa| sa <= 3),
        MAINTENANCE_IN => service_action == Some(0x0c),
        _ => false,
    }
}

pub(super) fn report_luns(ctx: &ExecCtx, select_report: u8, alloc_len: u32) -> Reply {
    if select_report > 2 {
        return Reply::check(Sense::invalid_field_in_cdb(2, None));
    }
    // SPC-4 section 6.33: an allocation length under 16 is an error.
    if alloc_len < 16 {
        return Reply::check(Sense::invalid_field_in_cdb(6, None));
    }
    // SELECT REPORT 01h asks for well-known logical units only: we have none.
    let ids: Vec<u64> = match select_report {
        1 => Vec::new(),
        _ => ctx.target.luns.iter().map(|&(id, _)| id).collect(),
    };
    Reply::data(
        proto::scsi::report_luns::report_luns(&ids),
        alloc_len as usize,
    )
}
