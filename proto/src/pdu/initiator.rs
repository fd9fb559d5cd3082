//! Initiator-side PDU building, for our own initiator (`twinsan bench`) and for tests.

use super::*;

/// A SCSI Command BHS with a CDB of at most 16 bytes.
#[allow(clippy::too_many_arguments)]
pub fn scsi_command(
    lun: u64,
    itt: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
    read: bool,
    write: bool,
    edtl: u32,
    cdb: &[u8],
    data_len: u32,
) -> [u8; BHS_LEN] {
    assert!(cdb.len() <= 16, "CDBs over 16 bytes need an AHS");
    let mut b = [0u8; BHS_LEN];
    b[0] = opcode::SCSI_COMMAND;
    b[1] = 0x80 | (read as u8) << 6 | (write as u8) << 5 | 0x01; // simple task
    put_dsl(&mut b, data_len);
    put64(&mut b, 8, lun);
    put32(&mut b, 16, itt);
    put32(&mut b, 20, edtl);
    put32(&mut b, 24, cmd_sn);
    put32(&mut b, 28, exp_stat_sn);
    b[32..32 + cdb.len()].copy_from_slice(cdb);
    b
}

/// Marks a SCSI Command BHS (from `scsi_command`, which sets F) as followed by
/// unsolicited Data-Out PDUs. RFC 7143 section 11.3.4: F = 1 on a write says that no
/// unsolicited Data-Out follows, and a target then solicits the rest with R2Ts; an
/// initiator that sends its first burst partly as Data-Out (InitialR2T=No) must clear it.
pub fn unsolicited_data_follows(bhs: &mut [u8; BHS_LEN]) {
    debug_assert_eq!(bhs[0] & 0x3f, opcode::SCSI_COMMAND);
    bhs[1] &= !0x80;
}

/// A Data-Out BHS.
#[allow(clippy::too_many_arguments)]
pub fn data_out(
    final_: bool,
    lun: u64,
    itt: u32,
    ttt: u32,
    exp_stat_sn: u32,
    data_sn: u32,
    offset: u32,
    data_len: u32,
) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = opcode::DATA_OUT;
    b[1] = (final_ as u8) << 7;
    put_dsl(&mut b, data_len);
    put64(&mut b, 8, lun);
    put32(&mut b, 16, itt);
    put32(&mut b, 20, ttt);
    put32(&mut b, 28, exp_stat_sn);
    put32(&mut b, 36, data_sn);
    put32(&mut b, 40, offset);
    b
}

/// A Task Management Function Request BHS (RFC 7143 section 11.5), sent immediate:
/// `function` 1 is ABORT TASK (of `referenced_tag`, issued at `ref_cmd_sn`).
pub fn task_mgmt(
    function: u8,
    lun: u64,
    itt: u32,
    referenced_tag: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
    ref_cmd_sn: u32,
) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = 0x40 | opcode::TASK_MGMT_REQUEST;
    b[1] = 0x80 | (function & 0x7f);
    put64(&mut b, 8, lun);
    put32(&mut b, 16, itt);
    put32(&mut b, 20, referenced_tag);
    put32(&mut b, 24, cmd_sn);
    put32(&mut b, 28, exp_stat_sn);
    put32(&mut b, 32, ref_cmd_sn);
    b
}

/// A Login Request BHS.
#[allow(clippy::too_many_arguments)]
pub fn login(
    transit: bool,
    csg: LoginStage,
    nsg: LoginStage,
    isid: [u8; 6],
    tsih: u16,
    itt: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
    data_len: u32,
) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = 0x40 | opcode::LOGIN_REQUEST;
    b[1] = (transit as u8) << 7 | csg.bits() << 2 | if transit { nsg.bits() } else { 0 };
    put_dsl(&mut b, data_len);
    b[8..14].copy_from_slice(&isid);
    put16(&mut b, 14, tsih);
    put32(&mut b, 16, itt);
    put32(&mut b, 24, cmd_sn);
    put32(&mut b, 28, exp_stat_sn);
    b
}

/// A Logout Request BHS (close session).
pub fn logout(itt: u32, cmd_sn: u32, exp_stat_sn: u32) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = 0x40 | opcode::LOGOUT_REQUEST;
    b[1] = 0x80;
    put32(&mut b, 16, itt);
    put32(&mut b, 24, cmd_sn);
    put32(&mut b, 28, exp_stat_sn);
    b
}

/// A NOP-Out BHS.
/// A NOP-Out. Answering a ping (`ttt` not 0xffffffff), `lun` must be the NOP-In's LUN
/// (RFC 7143 section 11.18.2); otherwise it is sent as given (0 is customary).
pub fn nop_out(lun: u64, itt: u32, ttt: u32, cmd_sn: u32, exp_stat_sn: u32) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = 0x40 | opcode::NOP_OUT;
    b[1] = 0x80;
    put64(&mut b, 8, lun);
    put32(&mut b, 16, itt);
    put32(&mut b, 20, ttt);
    put32(&mut b, 24, cmd_sn);
    put32(&mut b, 28, exp_stat_sn);
    b
}
