//! iSCSI PDUs (RFC 7143 section 11): the 48-byte Basic Header Segment, additional header
//! segments, data segments with padding, and the optional CRC32C digests.
//!
//! Initiator PDUs are parsed once into [`InitiatorPdu`]; target PDUs are built from typed
//! structs by [`TargetPdu::encode_bhs`]. Framing ([`frame_len`]) tells a transport how many
//! bytes a PDU occupies before it tries to parse it, so partial reads never reach the parser.

use thiserror::Error;

use crate::digest;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// Largest data segment we accept from anyone, whatever was negotiated: 16 MiB - 1 is the
/// field's own limit; we cap lower so one PDU can never pin unbounded memory.
pub const MAX_DATA_SEGMENT_LEN: usize = 1 << 24;
/// The task tag that means "no task" (RFC 7143 section 11.1).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Initiator opcodes (RFC 7143 section 11.1.1).
pub mod opcode {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MGMT_REQUEST: u8 = 0x02;
    pub const LOGIN_REQUEST: u8 = 0x03;
    pub const TEXT_REQUEST: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQUEST: u8 = 0x06;
    pub const SNACK_REQUEST: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MESSAGE: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 section 11.17.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RejectReason {
    DataDigestError = 0x02,
    SnackReject = 0x03,
    ProtocolError = 0x04,
    CommandNotSupported = 0x05,
    ImmediateCommandReject = 0x06,
    TaskInProgress = 0x07,
    InvalidDataAck = 0x08,
    InvalidPduField = 0x09,
    LongOperationReject = 0x0a,
    WaitingForLogout = 0x0c,
}

/// Why bytes could not become a PDU. Each maps to a Reject reason or a dropped connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PduError {
    #[error("opcode {0:#04x} is not an initiator opcode")]
    UnknownOpcode(u8),
    #[error("data segment of {len} bytes exceeds the limit of {limit}")]
    DataSegmentTooLong { len: usize, limit: usize },
    #[error("header digest mismatch")]
    HeaderDigest,
    #[error("data digest mismatch")]
    DataDigest,
    #[error("invalid field: {0}")]
    InvalidField(&'static str),
    #[error("truncated PDU")]
    Truncated,
}

impl PduError {
    /// The Reject reason RFC 7143 asks for, or `None` when the connection must be dropped
    /// because framing can no longer be trusted (a header digest error at ERL 0).
    pub fn reject_reason(&self) -> Option<RejectReason> {
        match self {
            PduError::UnknownOpcode(_) => Some(RejectReason::CommandNotSupported),
            PduError::DataDigest => Some(RejectReason::DataDigestError),
            PduError::InvalidField(_) => Some(RejectReason::InvalidPduField),
            PduError::DataSegmentTooLong { .. } => Some(RejectReason::ProtocolError),
            PduError::HeaderDigest | PduError::Truncated => None,
        }
    }
}

/// Number of pad bytes that follow a segment of `len` bytes (segments are 4-byte aligned).
pub fn pad_len(len: usize) -> usize {
    (4 - (len % 4)) % 4
}

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// A view of a complete 48-byte BHS.
#[derive(Clone, Copy)]
pub struct Bhs<'a>(&'a [u8; BHS_LEN]);

impl<'a> Bhs<'a> {
    pub fn new(bytes: &'a [u8; BHS_LEN]) -> Self {
        Self(bytes)
    }
    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }
    pub fn total_ahs_len_bytes(&self) -> usize {
        self.0[4] as usize * 4
    }
    pub fn data_segment_len_bytes(&self) -> usize {
        (self.0[5] as usize) << 16 | (self.0[6] as usize) << 8 | self.0[7] as usize
    }
    pub fn itt(&self) -> u32 {
        be32(self.0, 16)
    }
    pub fn bytes(&self) -> &'a [u8; BHS_LEN] {
        self.0
    }
}

/// The digests negotiated for a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// The byte lengths of one framed PDU, computed from its BHS alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub ahs_len_bytes: usize,
    pub data_len_bytes: usize,
    /// BHS + AHS + header digest + padded data + data digest.
    pub total_len_bytes: usize,
}

/// Computes the full on-wire length of the PDU whose BHS is `bhs`, refusing data segments
/// longer than `max_data_len_bytes` (what we declared as MaxRecvDataSegmentLength, or a
/// login-phase limit). Refusing here, before reading the segment, bounds memory use.
pub fn frame_len(
    bhs: &[u8; BHS_LEN],
    digests: Digests,
    max_data_len_bytes: usize,
) -> Result<Frame, PduError> {
    let b = Bhs(bhs);
    let data_len = b.data_segment_len_bytes();
    let limit = max_data_len_bytes.min(MAX_DATA_SEGMENT_LEN);
    if data_len > limit {
        return Err(PduError::DataSegmentTooLong {
            len: data_len,
            limit,
        });
    }
    let ahs_len = b.total_ahs_len_bytes();
    let mut total = BHS_LEN + ahs_len + data_len + pad_len(data_len);
    if digests.header {
        total += 4;
    }
    if digests.data && data_len > 0 {
        total += 4;
    }
    Ok(Frame {
        ahs_len_bytes: ahs_len,
        data_len_bytes: data_len,
        total_len_bytes: total,
    })
}

/// Checks digests of a complete framed PDU (`pdu.len() == frame.total_len_bytes`) and
/// returns its AHS and data segment (without padding).
pub fn split_frame<'a>(
    pdu: &'a [u8],
    frame: &Frame,
    digests: Digests,
) -> Result<(&'a [u8], &'a [u8]), PduError> {
    if pdu.len() < frame.total_len_bytes {
        return Err(PduError::Truncated);
    }
    let hdr_end = BHS_LEN + frame.ahs_len_bytes;
    let mut at = hdr_end;
    if digests.header {
        let want = digest::from_wire([pdu[at], pdu[at + 1], pdu[at + 2], pdu[at + 3]]);
        if digest::crc32c(&pdu[..hdr_end]) != want {
            return Err(PduError::HeaderDigest);
        }
        at += 4;
    }
    let data = &pdu[at..at + frame.data_len_bytes];
    let padded = frame.data_len_bytes + pad_len(frame.data_len_bytes);
    if digests.data && frame.data_len_bytes > 0 {
        let d = at + padded;
        let want = digest::from_wire([pdu[d], pdu[d + 1], pdu[d + 2], pdu[d + 3]]);
        if digest::crc32c(&pdu[at..at + padded]) != want {
            return Err(PduError::DataDigest);
        }
    }
    Ok((&pdu[BHS_LEN..hdr_end], data))
}

/// Login stages (CSG/NSG field values, RFC 7143 section 11.12.3). The one stage type of
/// both the PDU layer and the login state machine (`login::target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LoginStage {
    /// SecurityNegotiation.
    Security = 0,
    /// LoginOperationalNegotiation.
    Operational = 1,
    /// FullFeaturePhase.
    FullFeature = 3,
}

impl LoginStage {
    /// Decodes the 2-bit field; 2 is reserved.
    pub fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0 => Some(LoginStage::Security),
            1 => Some(LoginStage::Operational),
            3 => Some(LoginStage::FullFeature),
            _ => None,
        }
    }

    fn parse_bits(bits: u8) -> Result<Self, PduError> {
        Self::from_bits(bits).ok_or(PduError::InvalidField("login stage 2 is reserved"))
    }

    /// The 2-bit field value.
    pub fn bits(self) -> u8 {
        self as u8
    }
}

/// SCSI Command (RFC 7143 section 11.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    pub task_attr: u8,
    pub lun: u64,
    pub itt: u32,
    pub expected_data_len_bytes: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    /// The CDB: the 16 bytes of the BHS, extended by an Extended CDB AHS if present.
    pub cdb: [u8; 32],
    pub cdb_len: usize,
}

impl ScsiCommand {
    pub fn cdb(&self) -> &[u8] {
        &self.cdb[..self.cdb_len]
    }
}

/// SCSI Data-Out (RFC 7143 section 11.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataOut {
    pub final_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
}

/// NOP-Out (RFC 7143 section 11.18).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Task management functions (RFC 7143 section 11.5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TmfFunction {
    AbortTask,
    AbortTaskSet,
    ClearAca,
    ClearTaskSet,
    LogicalUnitReset,
    TargetWarmReset,
    TargetColdReset,
    TaskReassign,
    /// A function code we do not know: answered "Task management function not supported".
    Other(u8),
}

impl TmfFunction {
    fn from_code(code: u8) -> Self {
        match code {
            1 => TmfFunction::AbortTask,
            2 => TmfFunction::AbortTaskSet,
            3 => TmfFunction::ClearAca,
            4 => TmfFunction::ClearTaskSet,
            5 => TmfFunction::LogicalUnitReset,
            6 => TmfFunction::TargetWarmReset,
            7 => TmfFunction::TargetColdReset,
            8 => TmfFunction::TaskReassign,
            c => TmfFunction::Other(c),
        }
    }
}

/// Task Management Function Request (RFC 7143 section 11.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TmfRequest {
    pub immediate: bool,
    pub function: TmfFunction,
    pub lun: u64,
    pub itt: u32,
    pub referenced_tag: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
}

/// Login Request (RFC 7143 section 11.12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub cont: bool,
    pub csg: LoginStage,
    pub nsg: LoginStage,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Text Request (RFC 7143 section 11.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Logout reasons (RFC 7143 section 11.14.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogoutReason {
    CloseSession,
    CloseConnection,
    RemoveConnectionForRecovery,
}

/// Logout Request (RFC 7143 section 11.14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    pub reason: LogoutReason,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// SNACK Request (RFC 7143 section 11.16). We run at ErrorRecoveryLevel 0, so a SNACK is
/// answered with a Reject; only the fields needed for that are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnackRequest {
    pub itt: u32,
}

/// Every PDU an initiator may send, parsed and typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitiatorPdu {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TmfRequest(TmfRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    Snack(SnackRequest),
}

/// AHS type of an Extended CDB (RFC 7143 section 11.3.5).
const AHS_EXTENDED_CDB: u8 = 1;

/// Parses a BHS (and its AHS) into a typed initiator PDU.
pub fn parse_initiator(bhs: &[u8; BHS_LEN], ahs: &[u8]) -> Result<InitiatorPdu, PduError> {
    let b = Bhs(bhs);
    let imm = b.immediate();
    let f = bhs[1] & 0x80 != 0;
    let lun = be64(bhs, 8);
    let itt = be32(bhs, 16);
    Ok(match b.opcode() {
        opcode::NOP_OUT => InitiatorPdu::NopOut(NopOut {
            immediate: imm,
            lun,
            itt,
            ttt: be32(bhs, 20),
            cmd_sn: be32(bhs, 24),
            exp_stat_sn: be32(bhs, 28),
        }),
        opcode::SCSI_COMMAND => {
            let mut cdb = [0u8; 32];
            cdb[..16].copy_from_slice(&bhs[32..48]);
            let mut cdb_len = 16;
            if !ahs.is_empty() {
                // AHS: 2-byte length, 1-byte type, then payload (RFC 7143 section 11.2.2).
                if ahs.len() < 4 {
                    return Err(PduError::InvalidField("AHS shorter than its header"));
                }
                let ahs_len = be16(ahs, 0) as usize;
                if ahs[2] == AHS_EXTENDED_CDB {
                    // The payload's first byte is reserved, then CDB bytes 16 onwards.
                    let extra = ahs_len.saturating_sub(1);
                    if extra == 0 || extra > 16 || ahs.len() < 4 + extra {
                        return Err(PduError::InvalidField("extended CDB AHS length"));
                    }
                    cdb[16..16 + extra].copy_from_slice(&ahs[4..4 + extra]);
                    cdb_len += extra;
                }
            }
            InitiatorPdu::ScsiCommand(ScsiCommand {
                immediate: imm,
                final_: f,
                read: bhs[1] & 0x40 != 0,
                write: bhs[1] & 0x20 != 0,
                task_attr: bhs[1] & 0x07,
                lun,
                itt,
                expected_data_len_bytes: be32(bhs, 20),
                cmd_sn: be32(bhs, 24),
                exp_stat_sn: be32(bhs, 28),
                cdb,
                cdb_len,
            })
        }
        opcode::TASK_MGMT_REQUEST => InitiatorPdu::TmfRequest(TmfRequest {
            immediate: imm,
            function: TmfFunction::from_code(bhs[1] & 0x7f),
            lun,
            itt,
            referenced_tag: be32(bhs, 20),
            cmd_sn: be32(bhs, 24),
            exp_stat_sn: be32(bhs, 28),
            ref_cmd_sn: be32(bhs, 32),
        }),
        opcode::LOGIN_REQUEST => {
            let transit = bhs[1] & 0x80 != 0;
            let cont = bhs[1] & 0x40 != 0;
            if transit && cont {
                return Err(PduError::InvalidField("login T and C bits both set"));
            }
            let mut isid = [0u8; 6];
            isid.copy_from_slice(&bhs[8..14]);
            InitiatorPdu::LoginRequest(LoginRequest {
                transit,
                cont,
                csg: LoginStage::parse_bits((bhs[1] >> 2) & 0x03)?,
                nsg: if transit {
                    LoginStage::parse_bits(bhs[1] & 0x03)?
                } else {
                    LoginStage::parse_bits((bhs[1] >> 2) & 0x03)?
                },
                version_max: bhs[2],
                version_min: bhs[3],
                isid,
                tsih: be16(bhs, 14),
                itt,
                cid: be16(bhs, 20),
                cmd_sn: be32(bhs, 24),
                exp_stat_sn: be32(bhs, 28),
            })
        }
        opcode::TEXT_REQUEST => {
            let cont = bhs[1] & 0x40 != 0;
            if f && cont {
                return Err(PduError::InvalidField("text F and C bits both set"));
            }
            InitiatorPdu::TextRequest(TextRequest {
                immediate: imm,
                final_: f,
                cont,
                lun,
                itt,
                ttt: be32(bhs, 20),
                cmd_sn: be32(bhs, 24),
                exp_stat_sn: be32(bhs, 28),
            })
        }
        opcode::DATA_OUT => InitiatorPdu::DataOut(DataOut {
            final_: f,
            lun,
            itt,
            ttt: be32(bhs, 20),
            exp_stat_sn: be32(bhs, 28),
            data_sn: be32(bhs, 36),
            buffer_offset: be32(bhs, 40),
        }),
        opcode::LOGOUT_REQUEST => InitiatorPdu::LogoutRequest(LogoutRequest {
            immediate: imm,
            reason: match bhs[1] & 0x7f {
                0 => LogoutReason::CloseSession,
                1 => LogoutReason::CloseConnection,
                2 => LogoutReason::RemoveConnectionForRecovery,
                _ => return Err(PduError::InvalidField("logout reason code")),
            },
            itt,
            cid: be16(bhs, 20),
            cmd_sn: be32(bhs, 24),
            exp_stat_sn: be32(bhs, 28),
        }),
        opcode::SNACK_REQUEST => InitiatorPdu::Snack(SnackRequest { itt }),
        op => return Err(PduError::UnknownOpcode(op)),
    })
}

/// The sequence numbers every target PDU carries in bytes 24..36.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetSns {
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Residual over/underflow reporting (RFC 7143 section 11.4.5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Residual {
    #[default]
    None,
    Underflow(u32),
    Overflow(u32),
}

impl Residual {
    /// Residual for a command that expected `expected` bytes and whose CDB moved `actual`.
    pub fn of(expected: u32, actual: u32) -> Self {
        use std::cmp::Ordering::*;
        match actual.cmp(&expected) {
            Equal => Residual::None,
            Less => Residual::Underflow(expected - actual),
            Greater => Residual::Overflow(actual - expected),
        }
    }
    fn flags(self) -> u8 {
        match self {
            Residual::None => 0,
            Residual::Overflow(_) => 0x04,
            Residual::Underflow(_) => 0x02,
        }
    }
    fn count(self) -> u32 {
        match self {
            Residual::None => 0,
            Residual::Overflow(n) | Residual::Underflow(n) => n,
        }
    }
}

/// Every PDU a target sends. Data segments travel beside the BHS (see [`TargetPdu::encode_bhs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPdu {
    NopIn {
        lun: u64,
        itt: u32,
        ttt: u32,
        sns: TargetSns,
        data_len: u32,
    },
    ScsiResponse {
        itt: u32,
        status: u8,
        response: u8,
        residual: Residual,
        exp_data_sn: u32,
        sns: TargetSns,
        data_len: u32,
    },
    TmfResponse {
        itt: u32,
        response: u8,
        sns: TargetSns,
    },
    LoginResponse {
        transit: bool,
        cont: bool,
        csg: LoginStage,
        nsg: LoginStage,
        version_max: u8,
        version_active: u8,
        isid: [u8; 6],
        tsih: u16,
        itt: u32,
        status_class: u8,
        status_detail: u8,
        sns: TargetSns,
        data_len: u32,
    },
    TextResponse {
        final_: bool,
        cont: bool,
        lun: u64,
        itt: u32,
        ttt: u32,
        sns: TargetSns,
        data_len: u32,
    },
    /// `status` is `Some` when the PDU carries the command's final status (S bit).
    DataIn {
        final_: bool,
        ack: bool,
        lun: u64,
        itt: u32,
        status: Option<u8>,
        residual: Residual,
        data_sn: u32,
        buffer_offset: u32,
        sns: TargetSns,
        data_len: u32,
    },
    LogoutResponse {
        itt: u32,
        response: u8,
        time2wait: u16,
        time2retain: u16,
        sns: TargetSns,
    },
    R2t {
        lun: u64,
        itt: u32,
        ttt: u32,
        r2t_sn: u32,
        buffer_offset: u32,
        desired_len: u32,
        sns: TargetSns,
    },
    AsyncMessage {
        lun: u64,
        event: u8,
        vcode: u8,
        params: [u16; 3],
        sns: TargetSns,
        data_len: u32,
    },
    /// The data segment is the rejected PDU's BHS.
    Reject {
        reason: RejectReason,
        data_sn: u32,
        sns: TargetSns,
    },
}

fn put_sns(b: &mut [u8; BHS_LEN], sns: TargetSns) {
    put32(b, 24, sns.stat_sn);
    put32(b, 28, sns.exp_cmd_sn);
    put32(b, 32, sns.max_cmd_sn);
}

fn put_dsl(b: &mut [u8; BHS_LEN], len: u32) {
    assert!(
        len as usize <= MAX_DATA_SEGMENT_LEN,
        "data segment length over the field's limit"
    );
    b[5] = (len >> 16) as u8;
    b[6] = (len >> 8) as u8;
    b[7] = len as u8;
}

impl TargetPdu {
    /// Builds the 48-byte BHS. The data segment (and its length in the BHS) is the caller's.
    pub fn encode_bhs(&self) -> [u8; BHS_LEN] {
        let mut b = [0u8; BHS_LEN];
        match *self {
            TargetPdu::NopIn {
                lun,
                itt,
                ttt,
                sns,
                data_len,
            } => {
                b[0] = opcode::NOP_IN;
                b[1] = 0x80;
                put_dsl(&mut b, data_len);
                put64(&mut b, 8, lun);
                put32(&mut b, 16, itt);
                put32(&mut b, 20, ttt);
                put_sns(&mut b, sns);
            }
            TargetPdu::ScsiResponse {
                itt,
                status,
                response,
                residual,
                exp_data_sn,
                sns,
                data_len,
            } => {
                b[0] = opcode::SCSI_RESPONSE;
                b[1] = 0x80 | residual.flags();
                b[2] = response;
                b[3] = status;
                put_dsl(&mut b, data_len);
                put32(&mut b, 16, itt);
                put_sns(&mut b, sns);
                put32(&mut b, 36, exp_data_sn);
                put32(&mut b, 44, residual.count());
            }
            TargetPdu::TmfResponse { itt, response, sns } => {
                b[0] = opcode::TASK_MGMT_RESPONSE;
                b[1] = 0x80;
                b[2] = response;
                put32(&mut b, 16, itt);
                put_sns(&mut b, sns);
            }
            TargetPdu::LoginResponse {
                transit,
                cont,
                csg,
                nsg,
                version_max,
                version_active,
                isid,
                tsih,
                itt,
                status_class,
                status_detail,
                sns,
                data_len,
            } => {
                b[0] = opcode::LOGIN_RESPONSE;
                b[1] = (transit as u8) << 7
                    | (cont as u8) << 6
                    | csg.bits() << 2
                    | if transit { nsg.bits() } else { 0 };
                b[2] = version_max;
                b[3] = version_active;
                put_dsl(&mut b, data_len);
                b[8..14].copy_from_slice(&isid);
                put16(&mut b, 14, tsih);
                put32(&mut b, 16, itt);
                put_sns(&mut b, sns);
                b[36] = status_class;
                b[37] = status_detail;
            }
            TargetPdu::TextResponse {
                final_,
                cont,
                lun,
                itt,
                ttt,
                sns,
                data_len,
            } => {
                b[0] = opcode::TEXT_RESPONSE;
                b[1] = (final_ as u8) << 7 | (cont as u8) << 6;
                put_dsl(&mut b, data_len);
                put64(&mut b, 8, lun);
                put32(&mut b, 16, itt);
                put32(&mut b, 20, ttt);
                put_sns(&mut b, sns);
            }
            TargetPdu::DataIn {
                final_,
                ack,
                lun,
                itt,
                status,
                residual,
                data_sn,
                buffer_offset,
                sns,
                data_len,
            } => {
                b[0] = opcode::DATA_IN;
                b[1] = (final_ as u8) << 7 | (ack as u8) << 6;
                if let Some(st) = status {
                    b[1] |= 0x01 | residual.flags();
                    b[3] = st;
                    put32(&mut b, 24, sns.stat_sn);
                    put32(&mut b, 44, residual.count());
                }
                put_dsl(&mut b, data_len);
                if ack {
                    put64(&mut b, 8, lun);
                }
                put32(&mut b, 16, itt);
                put32(&mut b, 20, RESERVED_TAG);
                put32(&mut b, 28, sns.exp_cmd_sn);
                put32(&mut b, 32, sns.max_cmd_sn);
                put32(&mut b, 36, data_sn);
                put32(&mut b, 40, buffer_offset);
            }
            TargetPdu::LogoutResponse {
                itt,
                response,
                time2wait,
                time2retain,
                sns,
            } => {
                b[0] = opcode::LOGOUT_RESPONSE;
                b[1] = 0x80;
                b[2] = response;
                put32(&mut b, 16, itt);
                put_sns(&mut b, sns);
                put16(&mut b, 40, time2wait);
                put16(&mut b, 42, time2retain);
            }
            TargetPdu::R2t {
                lun,
                itt,
                ttt,
                r2t_sn,
                buffer_offset,
                desired_len,
                sns,
            } => {
                b[0] = opcode::R2T;
                b[1] = 0x80;
                put64(&mut b, 8, lun);
                put32(&mut b, 16, itt);
                put32(&mut b, 20, ttt);
                put_sns(&mut b, sns);
                put32(&mut b, 36, r2t_sn);
                put32(&mut b, 40, buffer_offset);
                put32(&mut b, 44, desired_len);
            }
            TargetPdu::AsyncMessage {
                lun,
                event,
                vcode,
                params,
                sns,
                data_len,
            } => {
                b[0] = opcode::ASYNC_MESSAGE;
                b[1] = 0x80;
                put_dsl(&mut b, data_len);
                put64(&mut b, 8, lun);
                put32(&mut b, 16, RESERVED_TAG);
                put_sns(&mut b, sns);
                b[36] = event;
                b[37] = vcode;
                put16(&mut b, 38, params[0]);
                put16(&mut b, 40, params[1]);
                put16(&mut b, 42, params[2]);
            }
            TargetPdu::Reject {
                reason,
                data_sn,
                sns,
            } => {
                b[0] = opcode::REJECT;
                b[1] = 0x80;
                b[2] = reason as u8;
                put_dsl(&mut b, BHS_LEN as u32);
                put32(&mut b, 16, RESERVED_TAG);
                put_sns(&mut b, sns);
                put32(&mut b, 36, data_sn);
            }
        }
        b
    }
}

/// Appends one complete PDU (BHS, header digest, padded data, data digest) to `out`.
/// Used by transports that gather PDUs into a contiguous send buffer.
pub fn write_pdu(out: &mut Vec<u8>, bhs: &[u8; BHS_LEN], data: &[u8], digests: Digests) {
    write_pdu_head(out, bhs, data.len(), digests);
    out.extend_from_slice(data);
    write_pdu_tail(out, data, digests);
}

/// The bytes of a PDU before its data segment: the BHS and its header digest. With
/// [`write_pdu_tail`], lets a sender queue the data segment itself without copying it
/// (`writev`).
pub fn write_pdu_head(out: &mut Vec<u8>, bhs: &[u8; BHS_LEN], data_len: usize, digests: Digests) {
    debug_assert_eq!(
        Bhs(bhs).data_segment_len_bytes(),
        data_len,
        "BHS length must match data"
    );
    out.extend_from_slice(bhs);
    if digests.header {
        out.extend_from_slice(&digest::to_wire(digest::crc32c(bhs)));
    }
}

/// The bytes of a PDU after its data segment: the pad to 4 bytes and the data digest.
pub fn write_pdu_tail(out: &mut Vec<u8>, data: &[u8], digests: Digests) {
    if !data.is_empty() {
        let pad = pad_len(data.len());
        out.extend_from_slice(&[0u8; 3][..pad]);
        if digests.data {
            out.extend_from_slice(&digest::to_wire(digest::data_digest(data)));
        }
    }
}

/// Initiator-side PDU building, for our own initiator (`twinsan bench`) and for tests.
pub mod initiator;

/// A target PDU as an initiator sees it: just the fields an initiator acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetView {
    pub opcode: u8,
    pub flags: u8,
    /// LUN field (bytes 8..16): a NOP-In ping's must be echoed in the answer.
    pub lun: u64,
    pub byte2: u8,
    pub status: u8,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    /// Residual count for responses; Desired Data Transfer Length for R2T.
    pub word44: u32,
    pub status_class: u8,
    pub status_detail: u8,
    pub tsih: u16,
}

/// Parses a target PDU's BHS (initiator side).
pub fn parse_target(bhs: &[u8; BHS_LEN]) -> TargetView {
    TargetView {
        opcode: bhs[0] & 0x3f,
        flags: bhs[1],
        lun: be64(bhs, 8),
        byte2: bhs[2],
        status: bhs[3],
        itt: be32(bhs, 16),
        ttt: be32(bhs, 20),
        stat_sn: be32(bhs, 24),
        exp_cmd_sn: be32(bhs, 28),
        max_cmd_sn: be32(bhs, 32),
        data_sn: be32(bhs, 36),
        buffer_offset: be32(bhs, 40),
        word44: be32(bhs, 44),
        status_class: bhs[36],
        status_detail: bhs[37],
        tsih: be16(bhs, 14),
    }
}

#[cfg(test)]
mod tests;
