//! CDB decoding: raw command descriptor block bytes into a typed [`Command`].
//!
//! Only the shape of the CDB is checked here (length, known opcode and service action,
//! CONTROL byte, fields whose legal values do not depend on the logical unit). LBA
//! ranges, protection fields and transfer limits are left to the engine, which knows
//! the LUN; those fields are returned raw.

use super::sense::Sense;

/// CDB length implied by the opcode's group code (SAM-5 §5.2); `None` for the
/// reserved group 3 (and variable-length 0x7F) and the vendor-specific groups 6 and 7.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// Why a CDB could not be decoded. Each maps to sense data via [`CdbError::sense`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CdbError {
    /// No bytes at all.
    #[error("empty CDB")]
    Empty,
    /// Fewer bytes than the opcode's group requires.
    #[error(
        "CDB for opcode {opcode:#04x} is {actual_len_bytes} bytes, needs {expected_len_bytes}"
    )]
    Truncated {
        opcode: u8,
        expected_len_bytes: usize,
        actual_len_bytes: usize,
    },
    /// Opcode not implemented by this decoder.
    #[error("unsupported operation code {0:#04x}")]
    UnsupportedOpcode(u8),
    /// Known opcode, unknown service action.
    #[error("unsupported service action {service_action:#x} for opcode {opcode:#04x}")]
    UnsupportedServiceAction { opcode: u8, service_action: u16 },
    /// A field holds a value the device server rejects.
    #[error("invalid field in CDB at byte {byte}")]
    InvalidField { byte: u16, bit: Option<u8> },
}

impl CdbError {
    /// The CHECK CONDITION sense data for this error.
    pub fn sense(&self) -> Sense {
        match *self {
            // A short CDB cannot be parsed at all; there is no better ASC than this.
            CdbError::Empty | CdbError::Truncated { .. } => {
                Sense::illegal_request(super::sense::Asc::INVALID_FIELD_IN_CDB)
            }
            CdbError::UnsupportedOpcode(_) => Sense::invalid_opcode(),
            // Service action fields sit in bits 4..0 of byte 1 for every opcode we know.
            CdbError::UnsupportedServiceAction { .. } => Sense::invalid_field_in_cdb(1, Some(4)),
            CdbError::InvalidField { byte, bit } => Sense::invalid_field_in_cdb(byte, bit),
        }
    }
}

/// The CDB size of a read/write-family command, which tells the engine which CDB
/// offsets to use in field pointers and which opcode it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CdbSize {
    Six,
    Ten,
    Twelve,
    Sixteen,
}

impl CdbSize {
    /// Length of the CDB in bytes.
    pub fn len_bytes(self) -> usize {
        match self {
            CdbSize::Six => 6,
            CdbSize::Ten => 10,
            CdbSize::Twelve => 12,
            CdbSize::Sixteen => 16,
        }
    }
}

/// Fields shared by the read/write/verify family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Rw {
    pub lba: u64,
    /// TRANSFER LENGTH (or VERIFICATION LENGTH, NUMBER OF LOGICAL BLOCKS) in blocks.
    pub blocks: u32,
    /// RDPROTECT / WRPROTECT / VRPROTECT / ORPROTECT, raw 3 bits.
    pub protect: u8,
    pub dpo: bool,
    pub fua: bool,
    /// GROUP NUMBER, raw 5 bits.
    pub group: u8,
}

/// MODE SENSE (6) / (10) fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ModeSenseCdb {
    /// True for MODE SENSE (10).
    pub ten_byte: bool,
    /// Disable block descriptors.
    pub dbd: bool,
    /// Long LBA accepted (MODE SENSE (10) only).
    pub llbaa: bool,
    /// PAGE CONTROL: 0 current, 1 changeable, 2 default, 3 saved.
    pub pc: u8,
    pub page: u8,
    pub subpage: u8,
    pub alloc_len: u16,
}

/// START STOP UNIT fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct StartStop {
    pub immed: bool,
    pub power_condition_modifier: u8,
    pub power_condition: u8,
    pub no_flush: bool,
    pub loej: bool,
    pub start: bool,
}

/// PERSISTENT RESERVE IN service actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrInAction {
    ReadKeys = 0,
    ReadReservation = 1,
    ReportCapabilities = 2,
    ReadFullStatus = 3,
}

/// PERSISTENT RESERVE OUT service actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrOutAction {
    Register = 0,
    Reserve = 1,
    Release = 2,
    Clear = 3,
    Preempt = 4,
    PreemptAndAbort = 5,
    RegisterAndIgnoreExistingKey = 6,
    RegisterAndMove = 7,
    ReplaceLostReservation = 8,
}

/// SANITIZE service actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SanitizeAction {
    Overwrite = 0x01,
    BlockErase = 0x02,
    CryptoErase = 0x03,
    ExitFailureMode = 0x1F,
}

/// RECEIVE COPY RESULTS service actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CopyResultsAction {
    CopyStatus = 0x00,
    ReceiveData = 0x01,
    OperatingParameters = 0x03,
    FailedSegmentDetails = 0x04,
}

/// A decoded CDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    TestUnitReady,
    RequestSense {
        desc: bool,
        alloc_len: u8,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc_len: u16,
    },
    ModeSelect {
        ten_byte: bool,
        pf: bool,
        sp: bool,
        param_len: u16,
    },
    ModeSense(ModeSenseCdb),
    /// RESERVE (6) / (10); third-party reservations are rejected at decode.
    Reserve {
        ten_byte: bool,
    },
    /// RELEASE (6) / (10).
    Release {
        ten_byte: bool,
    },
    StartStopUnit(StartStop),
    PreventAllowMediumRemoval {
        /// PREVENT field: 0 allow, 1 prevent, 2/3 obsolete.
        prevent: u8,
    },
    ReadCapacity10,
    ReadCapacity16 {
        alloc_len: u32,
    },
    GetLbaStatus {
        lba: u64,
        alloc_len: u32,
    },
    Read {
        size: CdbSize,
        rw: Rw,
    },
    Write {
        size: CdbSize,
        rw: Rw,
    },
    Verify {
        size: CdbSize,
        rw: Rw,
        /// BYTCHK, 2 bits (SBC-4): 0 medium only, 1 compare, 3 compare one block.
        bytchk: u8,
    },
    WriteAndVerify {
        size: CdbSize,
        rw: Rw,
        bytchk: u8,
    },
    SynchronizeCache {
        size: CdbSize,
        immed: bool,
        lba: u64,
        blocks: u32,
        group: u8,
    },
    PreFetch {
        size: CdbSize,
        immed: bool,
        lba: u64,
        blocks: u32,
        group: u8,
    },
    ReadDefectData {
        size: CdbSize,
        req_plist: bool,
        req_glist: bool,
        format: u8,
        alloc_len: u32,
    },
    WriteSame {
        size: CdbSize,
        /// `protect` is WRPROTECT; `dpo`/`fua` are always false.
        rw: Rw,
        anchor: bool,
        unmap: bool,
        /// NDOB: no Data-Out buffer (WRITE SAME (16) only).
        ndob: bool,
    },
    Unmap {
        anchor: bool,
        group: u8,
        param_len: u16,
    },
    /// COMPARE AND WRITE; `rw.blocks` is NUMBER OF LOGICAL BLOCKS (one byte on the wire).
    CompareAndWrite(Rw),
    /// ORWRITE (16); `rw.protect` is ORPROTECT.
    OrWrite(Rw),
    /// WRITE ATOMIC (16); ATOMIC BOUNDARY is returned raw so the engine can reject it.
    WriteAtomic {
        rw: Rw,
        atomic_boundary: u16,
    },
    /// EXTENDED COPY (LID1).
    ExtendedCopy {
        param_len: u32,
    },
    ReceiveCopyResults {
        action: CopyResultsAction,
        list_id: u8,
        alloc_len: u32,
    },
    Sanitize {
        immed: bool,
        ause: bool,
        action: SanitizeAction,
        param_len: u16,
    },
    PersistentReserveIn {
        action: PrInAction,
        alloc_len: u16,
    },
    PersistentReserveOut {
        action: PrOutAction,
        scope: u8,
        pr_type: u8,
        param_len: u32,
    },
    ReportSupportedOpcodes {
        rctd: bool,
        reporting_options: u8,
        requested_opcode: u8,
        requested_service_action: u16,
        alloc_len: u32,
    },
    ReportSupportedTmfs {
        repd: bool,
        alloc_len: u32,
    },
    ReportTargetPortGroups {
        /// PARAMETER DATA FORMAT: 0 length-only header, 1 extended header.
        extended: bool,
        alloc_len: u32,
    },
    ReportLuns {
        select_report: u8,
        alloc_len: u32,
    },
}

/// Operation codes and service actions of the commands [`decode`] understands.
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const WRITE_VERIFY_10: u8 = 0x2E;
    pub const VERIFY_10: u8 = 0x2F;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNC_CACHE_10: u8 = 0x35;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const SANITIZE: u8 = 0x48;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const PR_IN: u8 = 0x5E;
    pub const PR_OUT: u8 = 0x5F;
    pub const EXTENDED_COPY: u8 = 0x83;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8A;
    pub const ORWRITE_16: u8 = 0x8B;
    pub const WRITE_VERIFY_16: u8 = 0x8E;
    pub const VERIFY_16: u8 = 0x8F;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNC_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const WRITE_ATOMIC_16: u8 = 0x9C;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const WRITE_VERIFY_12: u8 = 0xAE;
    pub const VERIFY_12: u8 = 0xAF;
    pub const READ_DEFECT_DATA_12: u8 = 0xB7;

    // Service actions.
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
    pub const SA_GET_LBA_STATUS: u8 = 0x12;
    pub const SA_REPORT_TARGET_PORT_GROUPS: u8 = 0x0A;
    pub const SA_REPORT_SUPPORTED_OPCODES: u8 = 0x0C;
    pub const SA_REPORT_SUPPORTED_TMFS: u8 = 0x0D;
    pub const SA_EXTENDED_COPY_LID1: u8 = 0x00;
}

impl Command {
    /// The operation code this command was decoded from.
    pub fn opcode(&self) -> u8 {
        use op::*;
        let sized = |size: &CdbSize, six: u8, ten: u8, twelve: u8, sixteen: u8| match size {
            CdbSize::Six => six,
            CdbSize::Ten => ten,
            CdbSize::Twelve => twelve,
            CdbSize::Sixteen => sixteen,
        };
        match self {
            Command::TestUnitReady => TEST_UNIT_READY,
            Command::RequestSense { .. } => REQUEST_SENSE,
            Command::Inquiry { .. } => INQUIRY,
            Command::ModeSelect { ten_byte, .. } => {
                if *ten_byte {
                    MODE_SELECT_10
                } else {
                    MODE_SELECT_6
                }
            }
            Command::ModeSense(m) => {
                if m.ten_byte {
                    MODE_SENSE_10
                } else {
                    MODE_SENSE_6
                }
            }
            Command::Reserve { ten_byte } => {
                if *ten_byte {
                    RESERVE_10
                } else {
                    RESERVE_6
                }
            }
            Command::Release { ten_byte } => {
                if *ten_byte {
                    RELEASE_10
                } else {
                    RELEASE_6
                }
            }
            Command::StartStopUnit(_) => START_STOP_UNIT,
            Command::PreventAllowMediumRemoval { .. } => PREVENT_ALLOW,
            Command::ReadCapacity10 => READ_CAPACITY_10,
            Command::ReadCapacity16 { .. } | Command::GetLbaStatus { .. } => SERVICE_ACTION_IN_16,
            Command::Read { size, .. } => sized(size, READ_6, READ_10, READ_12, READ_16),
            Command::Write { size, .. } => sized(size, WRITE_6, WRITE_10, WRITE_12, WRITE_16),
            Command::Verify { size, .. } => sized(size, 0, VERIFY_10, VERIFY_12, VERIFY_16),
            Command::WriteAndVerify { size, .. } => {
                sized(size, 0, WRITE_VERIFY_10, WRITE_VERIFY_12, WRITE_VERIFY_16)
            }
            Command::SynchronizeCache { size, .. } => {
                sized(size, 0, SYNC_CACHE_10, 0, SYNC_CACHE_16)
            }
            Command::PreFetch { size, .. } => sized(size, 0, PRE_FETCH_10, 0, PRE_FETCH_16),
            Command::ReadDefectData { size, .. } => {
                sized(size, 0, READ_DEFECT_DATA_10, READ_DEFECT_DATA_12, 0)
            }
            Command::WriteSame { size, .. } => sized(size, 0, WRITE_SAME_10, 0, WRITE_SAME_16),
            Command::Unmap { .. } => UNMAP,
            Command::CompareAndWrite(_) => COMPARE_AND_WRITE,
            Command::OrWrite(_) => ORWRITE_16,
            Command::WriteAtomic { .. } => WRITE_ATOMIC_16,
            Command::ExtendedCopy { .. } => EXTENDED_COPY,
            Command::ReceiveCopyResults { .. } => RECEIVE_COPY_RESULTS,
            Command::Sanitize { .. } => SANITIZE,
            Command::PersistentReserveIn { .. } => PR_IN,
            Command::PersistentReserveOut { .. } => PR_OUT,
            Command::ReportSupportedOpcodes { .. }
            | Command::ReportSupportedTmfs { .. }
            | Command::ReportTargetPortGroups { .. } => MAINTENANCE_IN,
            Command::ReportLuns { .. } => REPORT_LUNS,
        }
    }

    /// The service action, for opcodes that have them.
    pub fn service_action(&self) -> Option<u16> {
        let sa = match self {
            Command::ReadCapacity16 { .. } => op::SA_READ_CAPACITY_16,
            Command::GetLbaStatus { .. } => op::SA_GET_LBA_STATUS,
            Command::ReportSupportedOpcodes { .. } => op::SA_REPORT_SUPPORTED_OPCODES,
            Command::ReportSupportedTmfs { .. } => op::SA_REPORT_SUPPORTED_TMFS,
            Command::ReportTargetPortGroups { .. } => op::SA_REPORT_TARGET_PORT_GROUPS,
            Command::ExtendedCopy { .. } => op::SA_EXTENDED_COPY_LID1,
            Command::ReceiveCopyResults { action, .. } => *action as u8,
            Command::Sanitize { action, .. } => *action as u8,
            Command::PersistentReserveIn { action, .. } => *action as u8,
            Command::PersistentReserveOut { action, .. } => *action as u8,
            _ => return None,
        };
        Some(u16::from(sa))
    }
}

/// A CDB whose length has been checked against its opcode, with big-endian getters.
/// Getters use `get()` and fall back to zero, which cannot happen after the length
/// check but keeps the decoder free of panicking indexing.
struct Cdb<'a> {
    bytes: &'a [u8],
}

impl Cdb<'_> {
    fn u8(&self, at: usize) -> u8 {
        self.bytes.get(at).copied().unwrap_or(0)
    }

    fn bit(&self, at: usize, bit: u8) -> bool {
        self.u8(at) & (1 << bit) != 0
    }

    fn be<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(src) = self.bytes.get(at..at + N) {
            out.copy_from_slice(src);
        }
        out
    }

    fn u16(&self, at: usize) -> u16 {
        u16::from_be_bytes(self.be(at))
    }

    fn u32(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.be(at))
    }

    fn u64(&self, at: usize) -> u64 {
        u64::from_be_bytes(self.be(at))
    }

    /// Low five bits of byte 1: the service action of most service-action opcodes.
    fn service_action(&self) -> u8 {
        self.u8(1) & 0x1F
    }

    /// Byte 1 flags common to the read/write family.
    fn rw_flags(&self, lba: u64, blocks: u32, group_at: usize) -> Rw {
        Rw {
            lba,
            blocks,
            protect: self.u8(1) >> 5,
            dpo: self.bit(1, 4),
            fua: self.bit(1, 3),
            group: self.u8(group_at) & 0x1F,
        }
    }

    /// Read/write-family layout for 10/12/16-byte CDBs.
    fn rw(&self, size: CdbSize) -> Rw {
        match size {
            CdbSize::Six => Rw {
                lba: u64::from(u32::from_be_bytes([
                    0,
                    self.u8(1) & 0x1F,
                    self.u8(2),
                    self.u8(3),
                ])),
                // SBC-3: a TRANSFER LENGTH of zero in READ (6)/WRITE (6) means 256 blocks.
                blocks: match self.u8(4) {
                    0 => 256,
                    n => u32::from(n),
                },
                ..Rw::default()
            },
            CdbSize::Ten => self.rw_flags(u64::from(self.u32(2)), u32::from(self.u16(7)), 6),
            CdbSize::Twelve => self.rw_flags(u64::from(self.u32(2)), self.u32(6), 10),
            CdbSize::Sixteen => self.rw_flags(self.u64(2), self.u32(10), 14),
        }
    }

    /// (lba, blocks, group) for SYNCHRONIZE CACHE / PRE-FETCH / WRITE SAME layouts.
    fn lba_blocks_group(&self, size: CdbSize) -> (u64, u32, u8) {
        match size {
            CdbSize::Sixteen => (self.u64(2), self.u32(10), self.u8(14) & 0x1F),
            _ => (
                u64::from(self.u32(2)),
                u32::from(self.u16(7)),
                self.u8(6) & 0x1F,
            ),
        }
    }
}

fn invalid(byte: u16, bit: Option<u8>) -> CdbError {
    CdbError::InvalidField { byte, bit }
}

/// Decodes a CDB. Bytes past the opcode's CDB length (iSCSI always carries at least
/// 16) are ignored.
pub fn decode(cdb: &[u8]) -> Result<Command, CdbError> {
    use op::*;

    let opcode = *cdb.first().ok_or(CdbError::Empty)?;
    let len = cdb_len(opcode).ok_or(CdbError::UnsupportedOpcode(opcode))?;
    let bytes = cdb.get(..len).ok_or(CdbError::Truncated {
        opcode,
        expected_len_bytes: len,
        actual_len_bytes: cdb.len(),
    })?;
    let c = Cdb { bytes };

    // CONTROL byte: NACA (bit 2) needs ACA support we lack; LINK (bit 0) is obsolete.
    let control_at = len - 1;
    let control = c.u8(control_at);
    if control & 0x04 != 0 {
        return Err(invalid(control_at as u16, Some(2)));
    }
    if control & 0x01 != 0 {
        return Err(invalid(control_at as u16, Some(0)));
    }

    let cmd = match opcode {
        TEST_UNIT_READY => Command::TestUnitReady,
        REQUEST_SENSE => Command::RequestSense {
            desc: c.bit(1, 0),
            alloc_len: c.u8(4),
        },
        INQUIRY => {
            // CMDDT (bit 1) is obsolete; SPC-4 says a device server that does not
            // support it terminates the command.
            if c.bit(1, 1) {
                return Err(invalid(1, Some(1)));
            }
            let evpd = c.bit(1, 0);
            let page = c.u8(2);
            if !evpd && page != 0 {
                return Err(invalid(2, None));
            }
            Command::Inquiry {
                evpd,
                page,
                alloc_len: c.u16(3),
            }
        }
        MODE_SELECT_6 | MODE_SELECT_10 => {
            let ten_byte = opcode == MODE_SELECT_10;
            Command::ModeSelect {
                ten_byte,
                pf: c.bit(1, 4),
                sp: c.bit(1, 0),
                param_len: if ten_byte {
                    c.u16(7)
                } else {
                    u16::from(c.u8(4))
                },
            }
        }
        MODE_SENSE_6 | MODE_SENSE_10 => {
            let ten_byte = opcode == MODE_SENSE_10;
            Command::ModeSense(ModeSenseCdb {
                ten_byte,
                dbd: c.bit(1, 3),
                llbaa: ten_byte && c.bit(1, 4),
                pc: c.u8(2) >> 6,
                page: c.u8(2) & 0x3F,
                subpage: c.u8(3),
                alloc_len: if ten_byte {
                    c.u16(7)
                } else {
                    u16::from(c.u8(4))
                },
            })
        }
        RESERVE_6 | RELEASE_6 => {
            // Byte 1 bit 4 is the obsolete 3RDPTY; extents were never supported.
            if c.u8(1) & 0x1F != 0 {
                return Err(invalid(1, Some(4)));
            }
            if opcode == RESERVE_6 {
                Command::Reserve { ten_byte: false }
            } else {
                Command::Release { ten_byte: false }
            }
        }
        RESERVE_10 | RELEASE_10 => {
            // 3RDPTY (bit 4) and LONGID (bit 1): third-party reservations unsupported.
            if c.bit(1, 4) {
                return Err(invalid(1, Some(4)));
            }
            if c.bit(1, 1) {
                return Err(invalid(1, Some(1)));
            }
            if opcode == RESERVE_10 {
                Command::Reserve { ten_byte: true }
            } else {
                Command::Release { ten_byte: true }
            }
        }
        START_STOP_UNIT => Command::StartStopUnit(StartStop {
            immed: c.bit(1, 0),
            power_condition_modifier: c.u8(3) & 0x0F,
            power_condition: c.u8(4) >> 4,
            no_flush: c.bit(4, 2),
            loej: c.bit(4, 1),
            start: c.bit(4, 0),
        }),
        PREVENT_ALLOW => Command::PreventAllowMediumRemoval {
            prevent: c.u8(4) & 0x03,
        },
        READ_CAPACITY_10 => {
            // SBC-3: with PMI clear the LBA field must be zero.
            if !c.bit(8, 0) && c.u32(2) != 0 {
                return Err(invalid(2, None));
            }
            Command::ReadCapacity10
        }
        READ_6 => Command::Read {
            size: CdbSize::Six,
            rw: c.rw(CdbSize::Six),
        },
        WRITE_6 => Command::Write {
            size: CdbSize::Six,
            rw: c.rw(CdbSize::Six),
        },
        READ_10 | READ_12 | READ_16 => {
            let size = match opcode {
                READ_10 => CdbSize::Ten,
                READ_12 => CdbSize::Twelve,
                _ => CdbSize::Sixteen,
            };
            Command::Read {
                size,
                rw: c.rw(size),
            }
        }
        WRITE_10 | WRITE_12 | WRITE_16 => {
            let size = match opcode {
                WRITE_10 => CdbSize::Ten,
                WRITE_12 => CdbSize::Twelve,
                _ => CdbSize::Sixteen,
            };
            Command::Write {
                size,
                rw: c.rw(size),
            }
        }
        VERIFY_10 | VERIFY_12 | VERIFY_16 => {
            let size = match opcode {
                VERIFY_10 => CdbSize::Ten,
                VERIFY_12 => CdbSize::Twelve,
                _ => CdbSize::Sixteen,
            };
            // VERIFY has no FUA; bit 3 is reserved there.
            let rw = Rw {
                fua: false,
                ..c.rw(size)
            };
            Command::Verify {
                size,
                rw,
                bytchk: (c.u8(1) >> 1) & 0x03,
            }
        }
        WRITE_VERIFY_10 | WRITE_VERIFY_12 | WRITE_VERIFY_16 => {
            let size = match opcode {
                WRITE_VERIFY_10 => CdbSize::Ten,
                WRITE_VERIFY_12 => CdbSize::Twelve,
                _ => CdbSize::Sixteen,
            };
            let rw = Rw {
                fua: false,
                ..c.rw(size)
            };
            Command::WriteAndVerify {
                size,
                rw,
                bytchk: (c.u8(1) >> 1) & 0x03,
            }
        }
        SYNC_CACHE_10 | SYNC_CACHE_16 | PRE_FETCH_10 | PRE_FETCH_16 => {
            let size = if opcode == SYNC_CACHE_10 || opcode == PRE_FETCH_10 {
                CdbSize::Ten
            } else {
                CdbSize::Sixteen
            };
            let (lba, blocks, group) = c.lba_blocks_group(size);
            let immed = c.bit(1, 1);
            if opcode == SYNC_CACHE_10 || opcode == SYNC_CACHE_16 {
                Command::SynchronizeCache {
                    size,
                    immed,
                    lba,
                    blocks,
                    group,
                }
            } else {
                Command::PreFetch {
                    size,
                    immed,
                    lba,
                    blocks,
                    group,
                }
            }
        }
        READ_DEFECT_DATA_10 => Command::ReadDefectData {
            size: CdbSize::Ten,
            req_plist: c.bit(2, 4),
            req_glist: c.bit(2, 3),
            format: c.u8(2) & 0x07,
            alloc_len: u32::from(c.u16(7)),
        },
        READ_DEFECT_DATA_12 => Command::ReadDefectData {
            size: CdbSize::Twelve,
            req_plist: c.bit(1, 4),
            req_glist: c.bit(1, 3),
            format: c.u8(1) & 0x07,
            alloc_len: c.u32(6),
        },
        WRITE_SAME_10 | WRITE_SAME_16 => {
            let sixteen = opcode == WRITE_SAME_16;
            let size = if sixteen {
                CdbSize::Sixteen
            } else {
                CdbSize::Ten
            };
            let (lba, blocks, group) = c.lba_blocks_group(size);
            Command::WriteSame {
                size,
                rw: Rw {
                    lba,
                    blocks,
                    protect: c.u8(1) >> 5,
                    dpo: false,
                    fua: false,
                    group,
                },
                anchor: c.bit(1, 4),
                unmap: c.bit(1, 3),
                ndob: sixteen && c.bit(1, 0),
            }
        }
        UNMAP => Command::Unmap {
            anchor: c.bit(1, 0),
            group: c.u8(6) & 0x1F,
            param_len: c.u16(7),
        },
        COMPARE_AND_WRITE => {
            Command::CompareAndWrite(c.rw_flags(c.u64(2), u32::from(c.u8(13)), 14))
        }
        ORWRITE_16 => Command::OrWrite(c.rw(CdbSize::Sixteen)),
        WRITE_ATOMIC_16 => Command::WriteAtomic {
            rw: c.rw_flags(c.u64(2), u32::from(c.u16(12)), 14),
            atomic_boundary: c.u16(10),
        },
        EXTENDED_COPY => match c.service_action() {
            op::SA_EXTENDED_COPY_LID1 => Command::ExtendedCopy {
                param_len: c.u32(10),
            },
            sa => return Err(unsupported_sa(opcode, sa)),
        },
        RECEIVE_COPY_RESULTS => {
            let action = match c.service_action() {
                0x00 => CopyResultsAction::CopyStatus,
                0x01 => CopyResultsAction::ReceiveData,
                0x03 => CopyResultsAction::OperatingParameters,
                0x04 => CopyResultsAction::FailedSegmentDetails,
                sa => return Err(unsupported_sa(opcode, sa)),
            };
            Command::ReceiveCopyResults {
                action,
                list_id: c.u8(2),
                alloc_len: c.u32(10),
            }
        }
        SANITIZE => {
            // SBC-3 section 5.30: byte 1 bit 6 and bytes 2..=6 are reserved.
            if c.bit(1, 6) {
                return Err(CdbError::InvalidField {
                    byte: 1,
                    bit: Some(6),
                });
            }
            if let Some(b) = (2..=6).find(|&b| c.u8(b) != 0) {
                return Err(CdbError::InvalidField {
                    byte: b as u16,
                    bit: None,
                });
            }
            let action = match c.service_action() {
                0x01 => SanitizeAction::Overwrite,
                0x02 => SanitizeAction::BlockErase,
                0x03 => SanitizeAction::CryptoErase,
                0x1F => SanitizeAction::ExitFailureMode,
                sa => return Err(unsupported_sa(opcode, sa)),
            };
            Command::Sanitize {
                immed: c.bit(1, 7),
                ause: c.bit(1, 5),
                action,
                param_len: c.u16(7),
            }
        }
        PR_IN => {
            let action = match c.service_action() {
                0 => PrInAction::ReadKeys,
                1 => PrInAction::ReadReservation,
                2 => PrInAction::ReportCapabilities,
                3 => PrInAction::ReadFullStatus,
                sa => return Err(unsupported_sa(opcode, sa)),
            };
            Command::PersistentReserveIn {
                action,
                alloc_len: c.u16(7),
            }
        }
        PR_OUT => {
            let action = match c.service_action() {
                0 => PrOutAction::Register,
                1 => PrOutAction::Reserve,
                2 => PrOutAction::Release,
                3 => PrOutAction::Clear,
                4 => PrOutAction::Preempt,
                5 => PrOutAction::PreemptAndAbort,
                6 => PrOutAction::RegisterAndIgnoreExistingKey,
                7 => PrOutAction::RegisterAndMove,
                8 => PrOutAction::ReplaceLostReservation,
                sa => return Err(unsupported_sa(opcode, sa)),
            };
            Command::PersistentReserveOut {
                action,
                scope: c.u8(2) >> 4,
                pr_type: c.u8(2) & 0x0F,
                param_len: c.u32(5),
            }
        }
        SERVICE_ACTION_IN_16 => match c.service_action() {
            op::SA_READ_CAPACITY_16 => {
                // PMI is obsolete in SBC-4; with it clear the LBA must be zero (SBC-3).
                if !c.bit(14, 0) && c.u64(2) != 0 {
                    return Err(invalid(2, None));
                }
                Command::ReadCapacity16 {
                    alloc_len: c.u32(10),
                }
            }
            op::SA_GET_LBA_STATUS => Command::GetLbaStatus {
                lba: c.u64(2),
                alloc_len: c.u32(10),
            },
            sa => return Err(unsupported_sa(opcode, sa)),
        },
        MAINTENANCE_IN => match c.service_action() {
            op::SA_REPORT_SUPPORTED_OPCODES => Command::ReportSupportedOpcodes {
                rctd: c.bit(2, 7),
                reporting_options: c.u8(2) & 0x07,
                requested_opcode: c.u8(3),
                requested_service_action: c.u16(4),
                alloc_len: c.u32(6),
            },
            op::SA_REPORT_SUPPORTED_TMFS => Command::ReportSupportedTmfs {
                repd: c.bit(2, 7),
                alloc_len: c.u32(6),
            },
            op::SA_REPORT_TARGET_PORT_GROUPS => {
                let format = c.u8(1) >> 5;
                if format > 1 {
                    return Err(invalid(1, Some(7)));
                }
                Command::ReportTargetPortGroups {
                    extended: format == 1,
                    alloc_len: c.u32(6),
                }
            }
            sa => return Err(unsupported_sa(opcode, sa)),
        },
        REPORT_LUNS => Command::ReportLuns {
            select_report: c.u8(2),
            alloc_len: c.u32(6),
        },
        _ => return Err(CdbError::UnsupportedOpcode(opcode)),
    };
    Ok(cmd)
}

fn unsupported_sa(opcode: u8, sa: u8) -> CdbError {
    CdbError::UnsupportedServiceAction {
        opcode,
        service_action: u16::from(sa),
    }
}

#[cfg(test)]
mod tests;
