//! REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35).
//!
//! [`SUPPORTED_OPCODES`] lists every command [`super::cdb::decode`] understands, with
//! the CDB usage bitmap (which CDB bits the device server looks at). The engine filters
//! it down to what it actually implements and hands the result to
//! [`report_supported_opcodes`].

use super::cdb::op;
use super::sense::Sense;

/// One supported command (or one service action of an opcode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OpcodeInfo {
    pub opcode: u8,
    /// `Some` for every entry of an opcode that has service actions.
    pub service_action: Option<u16>,
    /// CDB USAGE DATA; its length is the CDB length. Byte 0 is the opcode and, for
    /// service-action opcodes, the service action sits in its usual place.
    pub cdb_usage: &'static [u8],
    /// NOMINAL COMMAND PROCESSING TIMEOUT in seconds (0 = not specified).
    pub nominal_timeout_s: u32,
    /// RECOMMENDED COMMAND TIMEOUT in seconds (0 = not specified).
    pub recommended_timeout_s: u32,
}

/// Usage bitmap of the CONTROL byte: NACA and LINK are checked (both rejected).
const CTL: u8 = 0x07;

const fn entry(opcode: u8, service_action: Option<u16>, cdb_usage: &'static [u8]) -> OpcodeInfo {
    OpcodeInfo {
        opcode,
        service_action,
        cdb_usage,
        nominal_timeout_s: 1,
        recommended_timeout_s: 30,
    }
}

const fn sa(opcode: u8, service_action: u8, cdb_usage: &'static [u8]) -> OpcodeInfo {
    entry(opcode, Some(service_action as u16), cdb_usage)
}

const fn plain(opcode: u8, cdb_usage: &'static [u8]) -> OpcodeInfo {
    entry(opcode, None, cdb_usage)
}

/// Every command the decoder handles, sorted by (opcode, service action).
pub static SUPPORTED_OPCODES: &[OpcodeInfo] = &[
    plain(op::TEST_UNIT_READY, &[0x00, 0, 0, 0, 0, CTL]),
    plain(op::REQUEST_SENSE, &[0x03, 0x01, 0, 0, 0xFF, CTL]),
    plain(op::READ_6, &[0x08, 0x1F, 0xFF, 0xFF, 0xFF, CTL]),
    plain(op::WRITE_6, &[0x0A, 0x1F, 0xFF, 0xFF, 0xFF, CTL]),
    plain(op::INQUIRY, &[0x12, 0x03, 0xFF, 0xFF, 0xFF, CTL]),
    plain(op::MODE_SELECT_6, &[0x15, 0x11, 0, 0, 0xFF, CTL]),
    plain(op::RESERVE_6, &[0x16, 0x1F, 0, 0, 0, CTL]),
    plain(op::RELEASE_6, &[0x17, 0x1F, 0, 0, 0, CTL]),
    plain(op::MODE_SENSE_6, &[0x1A, 0x08, 0xFF, 0xFF, 0xFF, CTL]),
    plain(op::START_STOP_UNIT, &[0x1B, 0x01, 0, 0x0F, 0xF7, CTL]),
    plain(op::PREVENT_ALLOW, &[0x1E, 0, 0, 0, 0x03, CTL]),
    plain(
        op::READ_CAPACITY_10,
        &[0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, CTL],
    ),
    plain(
        op::READ_10,
        &[0x28, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, CTL],
    ),
    plain(
        op::WRITE_10,
        &[0x2A, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, CTL],
    ),
    plain(
        op::WRITE_VERIFY_10,
        &[0x2E, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, CTL],
    ),
    plain(
        op::VERIFY_10,
        &[0x2F, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, CTL],
    ),
    plain(
        op::PRE_FETCH_10,
        &[0x34, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, CTL],
    ),
    plain(
        op::SYNC_CACHE_10,
        &[0x35, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, CTL],
    ),
    plain(
        op::READ_DEFECT_DATA_10,
        &[0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, CTL],
    ),
    plain(
        op::WRITE_SAME_10,
        &[0x41, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, CTL],
    ),
    plain(op::UNMAP, &[0x42, 0x01, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, CTL]),
    sa(
        op::SANITIZE,
        0x01,
        &[0x48, 0xA1, 0, 0, 0, 0, 0, 0xFF, 0xFF, CTL],
    ),
    sa(
        op::SANITIZE,
        0x02,
        &[0x48, 0xA2, 0, 0, 0, 0, 0, 0xFF, 0xFF, CTL],
    ),
    sa(
        op::SANITIZE,
        0x03,
        &[0x48, 0xA3, 0, 0, 0, 0, 0, 0xFF, 0xFF, CTL],
    ),
    sa(
        op::SANITIZE,
        0x1F,
        &[0x48, 0xBF, 0, 0, 0, 0, 0, 0xFF, 0xFF, CTL],
    ),
    plain(
        op::MODE_SELECT_10,
        &[0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, CTL],
    ),
    plain(op::RESERVE_10, &[0x56, 0x12, 0, 0, 0, 0, 0, 0, 0, CTL]),
    plain(op::RELEASE_10, &[0x57, 0x12, 0, 0, 0, 0, 0, 0, 0, CTL]),
    plain(
        op::MODE_SENSE_10,
        &[0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, CTL],
    ),
    sa(
        op::PR_IN,
        0x00,
        &[0x5E, 0x00, 0, 0, 0, 0, 0, 0xFF, 0xFF, CTL],
    ),
    sa(
        op::PR_IN,
        0x01,
        &[0x5E, 0x01, 0, 0, 0, 0, 0, 0xFF, 0xFF, CTL],
    ),
    sa(
        op::PR_IN,
        0x02,
        &[0x5E, 0x02, 0, 0, 0, 0, 0, 0xFF, 0xFF, CTL],
    ),
    sa(
        op::PR_IN,
        0x03,
        &[0x5E, 0x03, 0, 0, 0, 0, 0, 0xFF, 0xFF, CTL],
    ),
    sa(
        op::PR_OUT,
        0x00,
        &[0x5F, 0x00, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, CTL],
    ),
    sa(
        op::PR_OUT,
        0x01,
        &[0x5F, 0x01, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, CTL],
    ),
    sa(
        op::PR_OUT,
        0x02,
        &[0x5F, 0x02, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, CTL],
    ),
    sa(
        op::PR_OUT,
        0x03,
        &[0x5F, 0x03, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, CTL],
    ),
    sa(
        op::PR_OUT,
        0x04,
        &[0x5F, 0x04, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, CTL],
    ),
    sa(
        op::PR_OUT,
        0x05,
        &[0x5F, 0x05, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, CTL],
    ),
    sa(
        op::PR_OUT,
        0x06,
        &[0x5F, 0x06, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, CTL],
    ),
    sa(
        op::PR_OUT,
        0x07,
        &[0x5F, 0x07, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, CTL],
    ),
    sa(
        op::PR_OUT,
        0x08,
        &[0x5F, 0x08, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, CTL],
    ),
    sa(
        op::EXTENDED_COPY,
        op::SA_EXTENDED_COPY_LID1,
        &[
            0x83, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, CTL,
        ],
    ),
    sa(
        op::RECEIVE_COPY_RESULTS,
        0x00,
        &[
            0x84, 0x00, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, CTL,
        ],
    ),
    sa(
        op::RECEIVE_COPY_RESULTS,
        0x01,
        &[
            0x84, 0x01, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, CTL,
        ],
    ),
    sa(
        op::RECEIVE_COPY_RESULTS,
        0x03,
        &[
            0x84, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, CTL,
        ],
    ),
    sa(
        op::RECEIVE_COPY_RESULTS,
        0x04,
        &[
            0x84, 0x04, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, CTL,
        ],
    ),
    plain(op::READ_16, &RW16_USAGE[0]),
    plain(
        op::COMPARE_AND_WRITE,
        &[
            0x89, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0x1F, CTL,
        ],
    ),
    plain(op::WRITE_16, &RW16_USAGE[1]),
    plain(op::ORWRITE_16, &RW16_USAGE[2]),
    plain(op::WRITE_VERIFY_16, &RW16_USAGE[3]),
    plain(op::VERIFY_16, &RW16_USAGE[4]),
    plain(op::PRE_FETCH_16, &RW16_USAGE[5]),
    plain(op::SYNC_CACHE_16, &RW16_USAGE[6]),
    plain(op::WRITE_SAME_16, &RW16_USAGE[7]),
    plain(
        op::WRITE_ATOMIC_16,
        &[
            0x9C, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x1F, CTL,
        ],
    ),
    sa(
        op::SERVICE_ACTION_IN_16,
        op::SA_READ_CAPACITY_16,
        &[
            0x9E, 0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x01, CTL,
        ],
    ),
    sa(
        op::SERVICE_ACTION_IN_16,
        op::SA_GET_LBA_STATUS,
        &[
            0x9E, 0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0,
            CTL,
        ],
    ),
    plain(
        op::REPORT_LUNS,
        &[0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, CTL],
    ),
    sa(
        op::MAINTENANCE_IN,
        op::SA_REPORT_TARGET_PORT_GROUPS,
        &[0xA3, 0xEA, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, CTL],
    ),
    sa(
        op::MAINTENANCE_IN,
        op::SA_REPORT_SUPPORTED_OPCODES,
        &[
            0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, CTL,
        ],
    ),
    sa(
        op::MAINTENANCE_IN,
        op::SA_REPORT_SUPPORTED_TMFS,
        &[0xA3, 0x0D, 0x80, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, CTL],
    ),
    plain(
        op::READ_12,
        &[
            0xA8, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, CTL,
        ],
    ),
    plain(
        op::WRITE_12,
        &[
            0xAA, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, CTL,
        ],
    ),
    plain(
        op::WRITE_VERIFY_12,
        &[
            0xAE, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, CTL,
        ],
    ),
    plain(
        op::VERIFY_12,
        &[
            0xAF, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, CTL,
        ],
    ),
    plain(
        op::READ_DEFECT_DATA_12,
        &[0xB7, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, CTL],
    ),
];

/// 16-byte read/write-family usage: LBA in 2..10, length in 10..14, group in 14.
const fn rw16(opcode: u8, byte1: u8) -> [u8; 16] {
    [
        opcode, byte1, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
        0x1F, CTL,
    ]
}

static RW16_USAGE: [[u8; 16]; 8] = [
    rw16(op::READ_16, 0xF8),
    rw16(op::WRITE_16, 0xF8),
    rw16(op::ORWRITE_16, 0xF8),
    rw16(op::WRITE_VERIFY_16, 0xF6),
    rw16(op::VERIFY_16, 0xF6),
    rw16(op::PRE_FETCH_16, 0x02),
    rw16(op::SYNC_CACHE_16, 0x02),
    rw16(op::WRITE_SAME_16, 0xF9),
];

/// [`SUPPORTED_OPCODES`] narrowed to the commands the engine implements. Derefs to
/// `[OpcodeInfo]`, so `&Filter` can be passed to [`report_supported_opcodes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    table: Vec<OpcodeInfo>,
}

impl Filter {
    /// Keeps the entries for which `implemented(opcode, service_action)` is true.
    pub fn new(implemented: impl Fn(u8, Option<u16>) -> bool) -> Self {
        Filter {
            table: SUPPORTED_OPCODES
                .iter()
                .filter(|e| implemented(e.opcode, e.service_action))
                .copied()
                .collect(),
        }
    }
}

impl std::ops::Deref for Filter {
    type Target = [OpcodeInfo];
    fn deref(&self) -> &[OpcodeInfo] {
        &self.table
    }
}

/// Reporting options (SPC-4 table 195).
const RO_ALL: u8 = 0;
const RO_OPCODE: u8 = 1;
const RO_OPCODE_SA: u8 = 2;
const RO_EITHER: u8 = 3;

/// Field pointer for a bad REPORTING OPTIONS / requested opcode combination.
fn bad_options() -> Sense {
    Sense::invalid_field_in_cdb(2, Some(2))
}

fn timeouts_descriptor(out: &mut Vec<u8>, e: &OpcodeInfo) {
    out.extend_from_slice(&0x000A_u16.to_be_bytes()); // DESCRIPTOR LENGTH
    out.push(0);
    out.push(0); // COMMAND SPECIFIC
    out.extend_from_slice(&e.nominal_timeout_s.to_be_bytes());
    out.extend_from_slice(&e.recommended_timeout_s.to_be_bytes());
}

/// Builds REPORT SUPPORTED OPERATION CODES parameter data from `table` (usually a
/// filtered [`SUPPORTED_OPCODES`]). The caller truncates to the ALLOCATION LENGTH.
///
/// `reporting_options` 0 lists all commands; 1 reports `req_opcode` (an opcode with
/// service actions is INVALID FIELD IN CDB); 2 reports `req_opcode`/`req_sa` (an
/// opcode without service actions is INVALID FIELD IN CDB); 3 reports either form.
/// Other values are INVALID FIELD IN CDB.
pub fn report_supported_opcodes(
    table: &[OpcodeInfo],
    rctd: bool,
    reporting_options: u8,
    req_opcode: u8,
    req_sa: u16,
) -> Result<Vec<u8>, Sense> {
    if reporting_options == RO_ALL {
        return Ok(all_commands(table, rctd));
    }
    let mut entries = table.iter().filter(|e| e.opcode == req_opcode).peekable();
    let has_sa = entries.peek().is_some_and(|e| e.service_action.is_some());
    let found = match reporting_options {
        RO_OPCODE => {
            if has_sa {
                return Err(bad_options());
            }
            entries.next()
        }
        RO_OPCODE_SA => {
            // An opcode we do not support at all is simply reported as unsupported.
            if !has_sa && entries.peek().is_some() {
                return Err(bad_options());
            }
            entries.find(|e| e.service_action == Some(req_sa))
        }
        RO_EITHER => {
            if has_sa {
                entries.find(|e| e.service_action == Some(req_sa))
            } else {
                entries.next()
            }
        }
        _ => return Err(bad_options()),
    };
    Ok(one_command(found, rctd))
}

fn all_commands(table: &[OpcodeInfo], rctd: bool) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    for e in table {
        out.push(e.opcode);
        out.push(0);
        out.extend_from_slice(&e.service_action.unwrap_or(0).to_be_bytes());
        out.push(0);
        let mut flags = 0;
        if rctd {
            flags |= 0x02; // CTDP
        }
        if e.service_action.is_some() {
            flags |= 0x01; // SERVACTV
        }
        out.push(flags);
        out.extend_from_slice(&(e.cdb_usage.len() as u16).to_be_bytes());
        if rctd {
            timeouts_descriptor(&mut out, e);
        }
    }
    let data_len = u32::try_from(out.len() - 4).unwrap_or(u32::MAX);
    if let Some(hdr) = out.get_mut(..4) {
        hdr.copy_from_slice(&data_len.to_be_bytes());
    }
    out
}

fn one_command(found: Option<&OpcodeInfo>, rctd: bool) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    match found {
        Some(e) => {
            // SUPPORT 011b: supported in conformance with a SCSI standard.
            out[1] = 0x03 | if rctd { 0x80 } else { 0 };
            out[2..4].copy_from_slice(&(e.cdb_usage.len() as u16).to_be_bytes());
            out.extend_from_slice(e.cdb_usage);
            if rctd {
                timeouts_descriptor(&mut out, e);
            }
        }
        // SUPPORT 001b: not supported; CDB SIZE 0 and no usage data.
        None => out[1] = 0x01,
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::cdb::{cdb_len, decode};
    use crate::scsi::sense::Asc;

    #[test]
    fn table_is_consistent_with_decoder() {
        let mut prev: Option<(u8, u16)> = None;
        for e in SUPPORTED_OPCODES {
            // Sorted and unique.
            let key = (e.opcode, e.service_action.unwrap_or(0));
            if let Some(p) = prev {
                assert!(p < key, "{e:?}");
            }
            prev = Some(key);
            assert_eq!(Some(e.cdb_usage.len()), cdb_len(e.opcode), "{e:?}");
            assert_eq!(e.cdb_usage[0], e.opcode);
            // An opcode either always or never has service actions.
            assert!(SUPPORTED_OPCODES
                .iter()
                .filter(|o| o.opcode == e.opcode)
                .all(|o| o.service_action.is_some() == e.service_action.is_some()));
            // A CDB with just the opcode and service action must decode, to the same
            // opcode and service action.
            let mut cdb = vec![0u8; e.cdb_usage.len()];
            cdb[0] = e.opcode;
            if let Some(sa) = e.service_action {
                cdb[1] = sa as u8;
            }
            let cmd = decode(&cdb).unwrap_or_else(|err| panic!("{e:?}: {err}"));
            assert_eq!(cmd.opcode(), e.opcode);
            assert_eq!(cmd.service_action(), e.service_action);
        }
    }

    #[test]
    fn all_commands_format() {
        let table = &SUPPORTED_OPCODES[..2];
        let d = report_supported_opcodes(table, false, 0, 0, 0).unwrap();
        assert_eq!(
            d,
            vec![0, 0, 0, 16, 0x00, 0, 0, 0, 0, 0x00, 0, 6, 0x03, 0, 0, 0, 0, 0x00, 0, 6]
        );
        let d = report_supported_opcodes(table, true, 0, 0, 0).unwrap();
        assert_eq!(&d[..4], &[0, 0, 0, 40]);
        assert_eq!(
            &d[4..24],
            &[0x00, 0, 0, 0, 0, 0x02, 0, 6, 0, 0x0A, 0, 0, 0, 0, 0, 1, 0, 0, 0, 30]
        );
    }

    /// Mirrors libiscsi's SERVACTV and OneCommand checks over the whole table.
    #[test]
    fn libiscsi_one_command_rules() {
        let all = report_supported_opcodes(SUPPORTED_OPCODES, false, 0, 0, 0).unwrap();
        let len = u32::from_be_bytes(all[..4].try_into().unwrap()) as usize;
        assert_eq!(len, all.len() - 4);
        for d in all[4..].chunks(8) {
            let (opcode, sa, servactv) = (d[0], u16::from_be_bytes([d[2], d[3]]), d[5] & 1 != 0);
            assert!(servactv || sa == 0);
            let r1 = report_supported_opcodes(SUPPORTED_OPCODES, false, 1, opcode, sa);
            let r2 = report_supported_opcodes(SUPPORTED_OPCODES, false, 2, opcode, sa);
            let (ok, err) = if servactv { (r2, r1) } else { (r1, r2) };
            assert_eq!(err.unwrap_err().asc, Asc::INVALID_FIELD_IN_CDB);
            let one = ok.unwrap();
            assert_eq!(one[1] & 0x07, 3);
            let cdb_size = u16::from_be_bytes([one[2], one[3]]);
            assert_eq!(cdb_size, u16::from_be_bytes([d[6], d[7]]));
            assert_eq!(one[4], opcode);
            assert_eq!(one.len(), 4 + usize::from(cdb_size));
        }
    }

    #[test]
    fn filter_narrows_table() {
        let f = Filter::new(|op, sa| op == 0x28 || (op == 0x9E && sa == Some(0x10)));
        assert_eq!(f.len(), 2);
        let d = report_supported_opcodes(&f, false, 0, 0, 0).unwrap();
        assert_eq!(&d[..4], &[0, 0, 0, 16]);
        assert_eq!(&d[4..12], &[0x28, 0, 0, 0, 0, 0, 0, 10]);
        assert_eq!(&d[12..20], &[0x9E, 0, 0, 0x10, 0, 1, 0, 16]);
        // GET LBA STATUS was filtered out, so it is reported as not supported.
        assert_eq!(
            report_supported_opcodes(&f, false, 2, 0x9E, 0x12).unwrap()[1],
            1
        );
    }

    #[test]
    fn one_command_rctd_and_unsupported() {
        let d = report_supported_opcodes(SUPPORTED_OPCODES, true, 2, 0x9E, 0x10).unwrap();
        assert_eq!(&d[..4], &[0, 0x83, 0, 16]);
        assert_eq!(&d[4..6], &[0x9E, 0x10]);
        assert_eq!(&d[20..22], &[0x00, 0x0A]);
        assert_eq!(d.len(), 4 + 16 + 12);
        // Unknown SA of a known opcode, and unknown opcode: SUPPORT 001b.
        assert_eq!(
            report_supported_opcodes(SUPPORTED_OPCODES, false, 2, 0x9E, 0x11).unwrap(),
            vec![0, 1, 0, 0]
        );
        assert_eq!(
            report_supported_opcodes(SUPPORTED_OPCODES, false, 1, 0x02, 0).unwrap(),
            vec![0, 1, 0, 0]
        );
        // Reporting options 3 accepts both kinds.
        assert_eq!(
            report_supported_opcodes(SUPPORTED_OPCODES, false, 3, 0x28, 0x55).unwrap()[1],
            3
        );
        assert_eq!(
            report_supported_opcodes(SUPPORTED_OPCODES, false, 3, 0x9E, 0x12).unwrap()[1],
            3
        );
        assert!(report_supported_opcodes(SUPPORTED_OPCODES, false, 4, 0, 0).is_err());
    }
}
