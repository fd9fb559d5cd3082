//! Sense data (SPC-4 §4.5): sense keys, additional sense codes, and the fixed (0x70)
//! and descriptor (0x72) encodings.

/// SENSE KEY field values (SPC-4 table 27).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SenseKey {
    NoSense = 0x0,
    RecoveredError = 0x1,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    BlankCheck = 0x8,
    VendorSpecific = 0x9,
    CopyAborted = 0xA,
    AbortedCommand = 0xB,
    VolumeOverflow = 0xD,
    Miscompare = 0xE,
    Completed = 0xF,
}

impl SenseKey {
    /// The 4-bit code as it appears on the wire.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Parses a 4-bit sense key; `None` for the reserved value 0xC and values > 0xF.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0x0 => Self::NoSense,
            0x1 => Self::RecoveredError,
            0x2 => Self::NotReady,
            0x3 => Self::MediumError,
            0x4 => Self::HardwareError,
            0x5 => Self::IllegalRequest,
            0x6 => Self::UnitAttention,
            0x7 => Self::DataProtect,
            0x8 => Self::BlankCheck,
            0x9 => Self::VendorSpecific,
            0xA => Self::CopyAborted,
            0xB => Self::AbortedCommand,
            0xD => Self::VolumeOverflow,
            0xE => Self::Miscompare,
            0xF => Self::Completed,
            _ => return None,
        })
    }
}

/// ADDITIONAL SENSE CODE and ADDITIONAL SENSE CODE QUALIFIER, as `(asc, ascq)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Asc(pub u8, pub u8);

impl Asc {
    pub const NO_ADDITIONAL_SENSE: Asc = Asc(0x00, 0x00);
    pub const LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE: Asc = Asc(0x04, 0x00);
    pub const LOGICAL_UNIT_NOT_READY_MANUAL_INTERVENTION: Asc = Asc(0x04, 0x03);
    pub const LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS: Asc = Asc(0x04, 0x1B);
    pub const LOGICAL_UNIT_NOT_ACCESSIBLE_TRANSITIONING: Asc = Asc(0x04, 0x0A);
    pub const LOGICAL_UNIT_NOT_ACCESSIBLE_STANDBY: Asc = Asc(0x04, 0x0B);
    pub const LOGICAL_UNIT_NOT_ACCESSIBLE_UNAVAILABLE: Asc = Asc(0x04, 0x0C);
    pub const WRITE_ERROR: Asc = Asc(0x0C, 0x00);
    pub const UNRECOVERED_READ_ERROR: Asc = Asc(0x11, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Asc = Asc(0x1A, 0x00);
    pub const MISCOMPARE_DURING_VERIFY: Asc = Asc(0x1D, 0x00);
    pub const INVALID_COMMAND_OPERATION_CODE: Asc = Asc(0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Asc = Asc(0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Asc = Asc(0x24, 0x00);
    pub const LOGICAL_UNIT_NOT_SUPPORTED: Asc = Asc(0x25, 0x00);
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Asc = Asc(0x26, 0x00);
    pub const INVALID_RELEASE_OF_PERSISTENT_RESERVATION: Asc = Asc(0x26, 0x04);
    pub const WRITE_PROTECTED: Asc = Asc(0x27, 0x00);
    pub const SPACE_ALLOCATION_FAILED_WRITE_PROTECT: Asc = Asc(0x27, 0x07);
    pub const POWER_ON_RESET: Asc = Asc(0x29, 0x00);
    pub const POWER_ON_OCCURRED: Asc = Asc(0x29, 0x01);
    pub const BUS_RESET_OCCURRED: Asc = Asc(0x29, 0x02);
    pub const BUS_DEVICE_RESET: Asc = Asc(0x29, 0x03);
    pub const I_T_NEXUS_LOSS_OCCURRED: Asc = Asc(0x29, 0x07);
    pub const MODE_PARAMETERS_CHANGED: Asc = Asc(0x2A, 0x01);
    pub const RESERVATIONS_PREEMPTED: Asc = Asc(0x2A, 0x03);
    pub const RESERVATIONS_RELEASED: Asc = Asc(0x2A, 0x04);
    pub const REGISTRATIONS_PREEMPTED: Asc = Asc(0x2A, 0x05);
    pub const ASYMMETRIC_ACCESS_STATE_CHANGED: Asc = Asc(0x2A, 0x06);
    pub const CAPACITY_DATA_CHANGED: Asc = Asc(0x2A, 0x09);
    pub const COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: Asc = Asc(0x2F, 0x00);
    pub const COMMANDS_CLEARED_BY_POWER_LOSS: Asc = Asc(0x2F, 0x01);
    pub const THIN_PROVISIONING_SOFT_THRESHOLD_REACHED: Asc = Asc(0x38, 0x07);
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Asc = Asc(0x39, 0x00);
    pub const MEDIUM_NOT_PRESENT: Asc = Asc(0x3A, 0x00);
    pub const MEDIUM_NOT_PRESENT_TRAY_CLOSED: Asc = Asc(0x3A, 0x01);
    pub const MEDIUM_NOT_PRESENT_TRAY_OPEN: Asc = Asc(0x3A, 0x02);
    pub const REPORTED_LUNS_DATA_CHANGED: Asc = Asc(0x3F, 0x0E);
    pub const INTERNAL_TARGET_FAILURE: Asc = Asc(0x44, 0x00);
    pub const INVALID_MESSAGE_ERROR: Asc = Asc(0x49, 0x00);
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: Asc = Asc(0x55, 0x04);
    pub const MEDIUM_REMOVAL_PREVENTED: Asc = Asc(0x53, 0x02);
    pub const SANITIZE_COMMAND_FAILED: Asc = Asc(0x31, 0x03);

    /// ADDITIONAL SENSE CODE.
    pub fn asc(self) -> u8 {
        self.0
    }

    /// ADDITIONAL SENSE CODE QUALIFIER.
    pub fn ascq(self) -> u8 {
        self.1
    }
}

/// Points at the offending field for ILLEGAL REQUEST (SPC-4 §4.5.2.4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FieldPointer {
    /// C/D: true when the field is in the CDB, false when in the parameter list.
    pub cdb: bool,
    /// Byte offset of the field in the CDB or parameter list.
    pub byte: u16,
    /// Most significant bit of the field (0..=7), when it is not the whole byte.
    pub bit: Option<u8>,
}

/// The three SENSE KEY SPECIFIC bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SenseKeySpecific {
    /// For ILLEGAL REQUEST: where the bad field is.
    Field(FieldPointer),
    /// For NOT READY (e.g. sanitize/format in progress): progress in 1/65536 units.
    Progress(u16),
}

impl SenseKeySpecific {
    /// Bytes as they appear at fixed-format offset 15 (with SKSV set).
    fn to_bytes(self) -> [u8; 3] {
        match self {
            SenseKeySpecific::Field(fp) => {
                let mut b0 = 0x80; // SKSV
                if fp.cdb {
                    b0 |= 0x40;
                }
                if let Some(bit) = fp.bit {
                    b0 |= 0x08 | (bit & 0x07); // BPV + BIT POINTER
                }
                let [hi, lo] = fp.byte.to_be_bytes();
                [b0, hi, lo]
            }
            SenseKeySpecific::Progress(p) => {
                let [hi, lo] = p.to_be_bytes();
                [0x80, hi, lo]
            }
        }
    }
}

/// Which sense data format to produce; chosen by the Control mode page D_SENSE bit
/// or the REQUEST SENSE DESC bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SenseFormat {
    /// Response code 0x70, 18 bytes.
    #[default]
    Fixed,
    /// Response code 0x72, header plus descriptors.
    Descriptor,
}

/// A CHECK CONDITION's sense data, in typed form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: Asc,
    /// INFORMATION field (e.g. the offset of the first miscompare).
    pub information: Option<u64>,
    /// SENSE KEY SPECIFIC field.
    pub key_specific: Option<SenseKeySpecific>,
}

/// Encoded sense bytes: at most 28 bytes in either format, so kept inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenseBytes {
    buf: [u8; SenseBytes::CAPACITY],
    len: u8,
}

impl SenseBytes {
    const CAPACITY: usize = 32;

    /// The encoded sense data.
    pub fn as_slice(&self) -> &[u8] {
        self.buf.get(..usize::from(self.len)).unwrap_or(&[])
    }
}

impl std::ops::Deref for SenseBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// Length of fixed-format sense data we produce (additional sense length 10).
const FIXED_LEN_BYTES: usize = 18;

impl Sense {
    /// Sense with no INFORMATION and no SENSE KEY SPECIFIC data.
    pub fn new(key: SenseKey, asc: Asc) -> Self {
        Sense {
            key,
            asc,
            information: None,
            key_specific: None,
        }
    }

    /// Adds an INFORMATION field.
    pub fn with_information(mut self, information: u64) -> Self {
        self.information = Some(information);
        self
    }

    /// Adds a field pointer (SENSE KEY SPECIFIC).
    /// Sets a PROGRESS INDICATION (in 1/65536ths), e.g. for a sanitize in progress.
    pub fn with_progress(mut self, progress: u16) -> Self {
        self.key_specific = Some(SenseKeySpecific::Progress(progress));
        self
    }

    pub fn with_field_pointer(mut self, fp: FieldPointer) -> Self {
        self.key_specific = Some(SenseKeySpecific::Field(fp));
        self
    }

    /// ILLEGAL REQUEST with the given ASC and no field pointer.
    pub fn illegal_request(asc: Asc) -> Self {
        Self::new(SenseKey::IllegalRequest, asc)
    }

    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
    pub fn invalid_opcode() -> Self {
        Self::illegal_request(Asc::INVALID_COMMAND_OPERATION_CODE)
    }

    /// ILLEGAL REQUEST, INVALID FIELD IN CDB, pointing at `byte` (and `bit`).
    pub fn invalid_field_in_cdb(byte: u16, bit: Option<u8>) -> Self {
        Self::illegal_request(Asc::INVALID_FIELD_IN_CDB).with_field_pointer(FieldPointer {
            cdb: true,
            byte,
            bit,
        })
    }

    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST, pointing at `byte` (and `bit`).
    pub fn invalid_field_in_parameter_list(byte: u16, bit: Option<u8>) -> Self {
        Self::illegal_request(Asc::INVALID_FIELD_IN_PARAMETER_LIST).with_field_pointer(
            FieldPointer {
                cdb: false,
                byte,
                bit,
            },
        )
    }

    /// ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR.
    pub fn parameter_list_length_error() -> Self {
        Self::illegal_request(Asc::PARAMETER_LIST_LENGTH_ERROR)
    }

    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub fn lba_out_of_range() -> Self {
        Self::illegal_request(Asc::LBA_OUT_OF_RANGE)
    }

    /// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (command to a LUN that does not exist).
    pub fn lun_not_supported() -> Self {
        Self::illegal_request(Asc::LOGICAL_UNIT_NOT_SUPPORTED)
    }

    /// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED.
    pub fn saving_parameters_not_supported() -> Self {
        Self::illegal_request(Asc::SAVING_PARAMETERS_NOT_SUPPORTED)
    }

    /// MISCOMPARE, MISCOMPARE DURING VERIFY OPERATION; INFORMATION is the byte offset
    /// of the first miscompare within the compared data (SBC-3 §5.2, §5.33).
    pub fn miscompare(offset_bytes: u64) -> Self {
        Self::new(SenseKey::Miscompare, Asc::MISCOMPARE_DURING_VERIFY)
            .with_information(offset_bytes)
    }

    /// DATA PROTECT, WRITE PROTECTED.
    pub fn write_protected() -> Self {
        Self::new(SenseKey::DataProtect, Asc::WRITE_PROTECTED)
    }

    /// UNIT ATTENTION with the given ASC.
    pub fn unit_attention(asc: Asc) -> Self {
        Self::new(SenseKey::UnitAttention, asc)
    }

    /// NOT READY with the given ASC.
    pub fn not_ready(asc: Asc) -> Self {
        Self::new(SenseKey::NotReady, asc)
    }

    /// NOT READY, MEDIUM NOT PRESENT.
    pub fn medium_not_present() -> Self {
        Self::not_ready(Asc::MEDIUM_NOT_PRESENT)
    }

    /// MEDIUM ERROR with the given ASC (e.g. `Asc::UNRECOVERED_READ_ERROR`).
    pub fn medium_error(asc: Asc) -> Self {
        Self::new(SenseKey::MediumError, asc)
    }

    /// HARDWARE ERROR, INTERNAL TARGET FAILURE.
    pub fn internal_target_failure() -> Self {
        Self::new(SenseKey::HardwareError, Asc::INTERNAL_TARGET_FAILURE)
    }

    /// ABORTED COMMAND with the given ASC.
    pub fn aborted_command(asc: Asc) -> Self {
        Self::new(SenseKey::AbortedCommand, asc)
    }

    /// Encodes as fixed (0x70) or descriptor (0x72) format sense data.
    pub fn encode(&self, format: SenseFormat) -> SenseBytes {
        let mut buf = [0u8; SenseBytes::CAPACITY];
        let len = match format {
            SenseFormat::Fixed => self.encode_fixed(&mut buf),
            SenseFormat::Descriptor => self.encode_descriptor(&mut buf),
        };
        SenseBytes {
            buf,
            // Both encodings are at most 28 bytes; the cast cannot truncate.
            len: len as u8,
        }
    }

    fn encode_fixed(&self, buf: &mut [u8; SenseBytes::CAPACITY]) -> usize {
        buf[0] = 0x70;
        // The fixed format's INFORMATION field is 4 bytes; SPC-4 says VALID stays 0
        // when the value does not fit.
        if let Some(info) = self.information.and_then(|i| u32::try_from(i).ok()) {
            buf[0] |= 0x80;
            buf[3..7].copy_from_slice(&info.to_be_bytes());
        }
        buf[2] = self.key.code();
        buf[7] = (FIXED_LEN_BYTES - 8) as u8;
        buf[12] = self.asc.asc();
        buf[13] = self.asc.ascq();
        if let Some(sks) = self.key_specific {
            buf[15..18].copy_from_slice(&sks.to_bytes());
        }
        FIXED_LEN_BYTES
    }

    fn encode_descriptor(&self, buf: &mut [u8; SenseBytes::CAPACITY]) -> usize {
        buf[0] = 0x72;
        buf[1] = self.key.code();
        buf[2] = self.asc.asc();
        buf[3] = self.asc.ascq();
        let mut at = 8;
        if let Some(info) = self.information {
            // Information descriptor (type 0x00, additional length 0x0A), VALID set.
            buf[at] = 0x00;
            buf[at + 1] = 0x0A;
            buf[at + 2] = 0x80;
            buf[at + 4..at + 12].copy_from_slice(&info.to_be_bytes());
            at += 12;
        }
        if let Some(sks) = self.key_specific {
            // Sense key specific descriptor (type 0x02, additional length 0x06).
            buf[at] = 0x02;
            buf[at + 1] = 0x06;
            buf[at + 4..at + 7].copy_from_slice(&sks.to_bytes());
            at += 8;
        }
        buf[7] = (at - 8) as u8;
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_invalid_field_in_cdb() {
        let s = Sense::invalid_field_in_cdb(2, None).encode(SenseFormat::Fixed);
        assert_eq!(
            s.as_slice(),
            &[0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0x00, 0, 0xC0, 0x00, 0x02]
        );
    }

    #[test]
    fn fixed_field_pointer_with_bit() {
        let s = Sense::invalid_field_in_parameter_list(0x123, Some(5)).encode(SenseFormat::Fixed);
        assert_eq!(&s[15..18], &[0x80 | 0x08 | 5, 0x01, 0x23]);
        assert_eq!(&s[12..14], &[0x26, 0x00]);
    }

    #[test]
    fn fixed_miscompare_sets_valid_and_info() {
        let s = Sense::miscompare(0x1234).encode(SenseFormat::Fixed);
        assert_eq!(s.len(), 18);
        assert_eq!(s[0], 0xF0);
        assert_eq!(s[2], 0x0E);
        assert_eq!(&s[3..7], &[0, 0, 0x12, 0x34]);
        assert_eq!(&s[12..14], &[0x1D, 0x00]);
        assert_eq!(s[15], 0); // no SKSV
    }

    #[test]
    fn fixed_info_too_large_clears_valid() {
        let s = Sense::miscompare(1 << 40).encode(SenseFormat::Fixed);
        assert_eq!(s[0], 0x70);
        assert_eq!(&s[3..7], &[0, 0, 0, 0]);
    }

    #[test]
    fn descriptor_plain() {
        let s = Sense::lba_out_of_range().encode(SenseFormat::Descriptor);
        assert_eq!(s.as_slice(), &[0x72, 0x05, 0x21, 0x00, 0, 0, 0, 0]);
    }

    #[test]
    fn descriptor_info_and_field_pointer() {
        let s = Sense::invalid_field_in_cdb(1, Some(7))
            .with_information(0x0102_0304_0506_0708)
            .encode(SenseFormat::Descriptor);
        assert_eq!(
            s.as_slice(),
            &[
                0x72, 0x05, 0x24, 0x00, 0, 0, 0, 20, // header
                0x00, 0x0A, 0x80, 0, 1, 2, 3, 4, 5, 6, 7, 8, // information
                0x02, 0x06, 0, 0, 0xCF, 0x00, 0x01, 0, // sense key specific
            ]
        );
    }

    #[test]
    fn sense_key_roundtrip() {
        for code in 0..=0xFF_u8 {
            if let Some(k) = SenseKey::from_code(code) {
                assert_eq!(k.code(), code);
            }
        }
        assert_eq!(SenseKey::from_code(0xC), None);
    }
}
