//! Mode parameters (SPC-4 §7.5, SBC-3 §6.4): the pages we report, MODE SENSE data
//! building and MODE SELECT parameter list parsing.
//!
//! Only three bits are changeable: Control D_SENSE and SWP, and Caching WCE. Saved
//! parameters are not supported (PS is never set; PC = saved and SP = 1 are rejected).

use super::cdb::ModeSenseCdb;
use super::lun_info::LunInfo;
use super::sense::{Sense, SenseFormat};

/// Per-LUN mode state that MODE SELECT can change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModeState {
    /// Control page D_SENSE: return descriptor-format sense data.
    pub d_sense: bool,
    /// Control page SWP: software write protect (the engine must reject writes).
    pub swp: bool,
    /// Caching page WCE: when clear the engine must make every write durable before
    /// completing it (as if FUA were set).
    pub wce: bool,
}

impl Default for ModeState {
    fn default() -> Self {
        ModeState {
            d_sense: false,
            swp: false,
            wce: true,
        }
    }
}

impl ModeState {
    /// The sense format D_SENSE selects.
    pub fn sense_format(&self) -> SenseFormat {
        if self.d_sense {
            SenseFormat::Descriptor
        } else {
            SenseFormat::Fixed
        }
    }

    /// Whether writes must fail with DATA PROTECT (configured read-only or SWP).
    pub fn write_protected(&self, info: &LunInfo) -> bool {
        info.read_only || self.swp
    }
}

/// PAGE CONTROL values (SPC-4 table 99).
const PC_CURRENT: u8 = 0;
const PC_CHANGEABLE: u8 = 1;
const PC_DEFAULT: u8 = 2;

const ALL_PAGES: u8 = 0x3F;
const ALL_SUBPAGES: u8 = 0xFF;

const PAGE_RW_ERROR_RECOVERY: u8 = 0x01;
const PAGE_DISCONNECT_RECONNECT: u8 = 0x02;
const PAGE_CACHING: u8 = 0x08;
const PAGE_CONTROL: u8 = 0x0A;
const SUBPAGE_CONTROL_EXTENSION: u8 = 0x01;
const PAGE_POWER_CONDITION: u8 = 0x1A;
const PAGE_INFORMATIONAL_EXCEPTIONS: u8 = 0x1C;

/// (page, subpage) pairs we implement, in the order MODE SENSE returns them.
const PAGES: [(u8, u8); 7] = [
    (PAGE_RW_ERROR_RECOVERY, 0),
    (PAGE_DISCONNECT_RECONNECT, 0),
    (PAGE_CACHING, 0),
    (PAGE_CONTROL, 0),
    (PAGE_CONTROL, SUBPAGE_CONTROL_EXTENSION),
    (PAGE_POWER_CONDITION, 0),
    (PAGE_INFORMATIONAL_EXCEPTIONS, 0),
];

// Bit positions of the changeable fields, as (page body offset, mask). Offsets count
// from the start of the page (byte 0 = page code).
const CACHING_WCE: (usize, u8) = (2, 0x04);
const CONTROL_D_SENSE: (usize, u8) = (2, 0x04);
const CONTROL_SWP: (usize, u8) = (4, 0x08);

/// Page length (bytes after the page header) of each page we implement.
fn page_len_bytes(page: u8, subpage: u8) -> usize {
    match (page, subpage) {
        (PAGE_RW_ERROR_RECOVERY, 0) => 0x0A,
        (PAGE_DISCONNECT_RECONNECT, 0) => 0x0E,
        (PAGE_CACHING, 0) => 0x12,
        (PAGE_CONTROL, 0) => 0x0A,
        (PAGE_CONTROL, SUBPAGE_CONTROL_EXTENSION) => 0x1C,
        (PAGE_POWER_CONDITION, 0) => 0x26,
        (PAGE_INFORMATIONAL_EXCEPTIONS, 0) => 0x0A,
        _ => 0,
    }
}

/// A zeroed page with its page code, subpage and length filled in; PS stays clear
/// because nothing is savable.
fn blank_page(page: u8, subpage: u8) -> Vec<u8> {
    let len = page_len_bytes(page, subpage);
    if subpage == 0 {
        let mut p = vec![0u8; 2 + len];
        p[0] = page;
        p[1] = len as u8;
        p
    } else {
        let mut p = vec![0u8; 4 + len];
        p[0] = 0x40 | page; // SPF
        p[1] = subpage;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p
    }
}

fn set(p: &mut [u8], (at, mask): (usize, u8), on: bool) {
    if let Some(b) = p.get_mut(at) {
        if on {
            *b |= mask;
        } else {
            *b &= !mask;
        }
    }
}

/// The page's current (or default, given the default state) values.
fn page_values(page: u8, subpage: u8, state: &ModeState) -> Vec<u8> {
    let mut p = blank_page(page, subpage);
    match (page, subpage) {
        (PAGE_CACHING, 0) => set(&mut p, CACHING_WCE, state.wce),
        (PAGE_CONTROL, 0) => {
            set(&mut p, CONTROL_D_SENSE, state.d_sense);
            set(&mut p, CONTROL_SWP, state.swp);
            // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering of SIMPLE tasks.
            p[3] = 0x10;
        }
        (PAGE_INFORMATIONAL_EXCEPTIONS, 0) => {
            // DEXCPT: we never report informational exceptions.
            p[2] = 0x08;
        }
        _ => {}
    }
    p
}

/// The page's changeable-bits mask (PC = changeable values).
fn page_mask(page: u8, subpage: u8) -> Vec<u8> {
    let mut p = blank_page(page, subpage);
    match (page, subpage) {
        (PAGE_CACHING, 0) => set(&mut p, CACHING_WCE, true),
        (PAGE_CONTROL, 0) => {
            set(&mut p, CONTROL_D_SENSE, true);
            set(&mut p, CONTROL_SWP, true);
        }
        _ => {}
    }
    p
}

/// Which pages a MODE SENSE page/subpage request selects, or the CDB byte at fault.
fn select_pages(page: u8, subpage: u8) -> Result<Vec<(u8, u8)>, Sense> {
    let selected: Vec<(u8, u8)> = if page == ALL_PAGES {
        match subpage {
            0x00 => PAGES.iter().copied().filter(|&(_, s)| s == 0).collect(),
            ALL_SUBPAGES => PAGES.to_vec(),
            _ => return Err(Sense::invalid_field_in_cdb(3, None)),
        }
    } else {
        if !PAGES.iter().any(|&(p, _)| p == page) {
            return Err(Sense::invalid_field_in_cdb(2, Some(5)));
        }
        PAGES
            .iter()
            .copied()
            .filter(|&(p, s)| p == page && (subpage == ALL_SUBPAGES || s == subpage))
            .collect()
    };
    if selected.is_empty() {
        return Err(Sense::invalid_field_in_cdb(3, None));
    }
    Ok(selected)
}

/// Builds MODE SENSE (6)/(10) parameter data (header, optional block descriptor,
/// pages). The caller truncates to the ALLOCATION LENGTH.
pub fn mode_sense(info: &LunInfo, state: &ModeState, cdb: &ModeSenseCdb) -> Result<Vec<u8>, Sense> {
    let pages = select_pages(cdb.page, cdb.subpage)?;
    let default_state = ModeState::default();
    let mut body = Vec::new();
    for (page, subpage) in pages {
        let bytes = match cdb.pc {
            PC_CURRENT => page_values(page, subpage, state),
            PC_CHANGEABLE => page_mask(page, subpage),
            PC_DEFAULT => page_values(page, subpage, &default_state),
            // Saved values: we keep none.
            _ => {
                return Err(Sense::saving_parameters_not_supported().with_field_pointer(
                    super::sense::FieldPointer {
                        cdb: true,
                        byte: 2,
                        bit: Some(7),
                    },
                ))
            }
        };
        body.extend_from_slice(&bytes);
    }

    let long_lba = cdb.ten_byte && cdb.llbaa;
    let descriptor = if cdb.dbd {
        Vec::new()
    } else {
        block_descriptor(info, long_lba)
    };

    let mut dsp = 0x10; // DPOFUA: DPO and FUA are honoured
    if state.write_protected(info) {
        dsp |= 0x80; // WP
    }

    let mut out = Vec::new();
    if cdb.ten_byte {
        let total = 8 + descriptor.len() + body.len();
        out.extend_from_slice(&u16::try_from(total - 2).unwrap_or(u16::MAX).to_be_bytes());
        out.push(0); // MEDIUM TYPE
        out.push(dsp);
        out.push(if long_lba && !descriptor.is_empty() {
            0x01
        } else {
            0
        }); // LONGLBA
        out.push(0);
        out.extend_from_slice(&(descriptor.len() as u16).to_be_bytes());
    } else {
        let total = 4 + descriptor.len() + body.len();
        // Our largest reply (all pages and subpages) is well under 256 bytes.
        out.push(u8::try_from(total - 1).unwrap_or(u8::MAX));
        out.push(0);
        out.push(dsp);
        out.push(descriptor.len() as u8);
    }
    out.extend_from_slice(&descriptor);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Short (8-byte) or long (16-byte) LBA mode parameter block descriptor.
fn block_descriptor(info: &LunInfo, long_lba: bool) -> Vec<u8> {
    if long_lba {
        let mut d = vec![0u8; 16];
        d[..8].copy_from_slice(&info.num_blocks.to_be_bytes());
        d[12..16].copy_from_slice(&info.block_size.to_be_bytes());
        d
    } else {
        let mut d = vec![0u8; 8];
        // SBC-3: a capacity too large for the field is reported as FFFF_FFFFh.
        let blocks = u32::try_from(info.num_blocks).unwrap_or(u32::MAX);
        d[..4].copy_from_slice(&blocks.to_be_bytes());
        d[5..8].copy_from_slice(&info.block_size.to_be_bytes()[1..]);
        d
    }
}

fn param_error(byte: usize, bit: Option<u8>) -> Sense {
    Sense::invalid_field_in_parameter_list(u16::try_from(byte).unwrap_or(u16::MAX), bit)
}

fn be_u32(bytes: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = bytes.len().min(4);
    if let (Some(dst), Some(src)) = (b.get_mut(4 - n..), bytes.get(..n)) {
        dst.copy_from_slice(src);
    }
    u32::from_be_bytes(b)
}

fn be_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = bytes.len().min(8);
    if let (Some(dst), Some(src)) = (b.get_mut(8 - n..), bytes.get(..n)) {
        dst.copy_from_slice(src);
    }
    u64::from_be_bytes(b)
}

/// Applies a MODE SELECT (6)/(10) parameter list (exactly the PARAMETER LIST LENGTH
/// bytes the initiator sent). All pages are validated before anything changes. The
/// caller compares `state` before and after to decide whether to raise MODE
/// PARAMETERS CHANGED for the other I_T nexuses.
///
/// Errors: SP = 1 → SAVING PARAMETERS NOT SUPPORTED; a truncated header, descriptor
/// or page → PARAMETER LIST LENGTH ERROR; an unknown page, a wrong page length, a
/// change to a bit that is not changeable, or a block descriptor that disagrees with
/// the LUN's geometry → INVALID FIELD IN PARAMETER LIST with a field pointer.
pub fn mode_select(
    info: &LunInfo,
    state: &mut ModeState,
    _pf: bool,
    sp: bool,
    params: &[u8],
    ten_byte: bool,
) -> Result<(), Sense> {
    if sp {
        return Err(Sense::saving_parameters_not_supported().with_field_pointer(
            super::sense::FieldPointer {
                cdb: true,
                byte: 1,
                bit: Some(0),
            },
        ));
    }
    // A zero-length parameter list is not an error: nothing to change (SPC-4 §6.11).
    if params.is_empty() {
        return Ok(());
    }
    let header_len = if ten_byte { 8 } else { 4 };
    let header = params
        .get(..header_len)
        .ok_or_else(Sense::parameter_list_length_error)?;
    let byte = |at: usize| header.get(at).copied().unwrap_or(0);
    let (medium_type_at, bd_len, long_lba) = if ten_byte {
        (
            2,
            usize::from(u16::from_be_bytes([byte(6), byte(7)])),
            byte(4) & 0x01 != 0,
        )
    } else {
        (1, usize::from(byte(3)), false)
    };
    if byte(medium_type_at) != 0 {
        return Err(param_error(medium_type_at, None));
    }
    let bd_len_at = if ten_byte { 6 } else { 3 };
    let expected_bd_len = if long_lba { 16 } else { 8 };
    if bd_len != 0 && bd_len != expected_bd_len {
        return Err(param_error(bd_len_at, None));
    }
    let bd = params
        .get(header_len..header_len + bd_len)
        .ok_or_else(Sense::parameter_list_length_error)?;
    if !bd.is_empty() {
        check_block_descriptor(info, bd, header_len, long_lba)?;
    }

    let mut next = *state;
    let mut at = header_len + bd_len;
    while at < params.len() {
        at = apply_page(params, at, state, &mut next)?;
    }
    *state = next;
    Ok(())
}

/// Validates a block descriptor at `base` in the parameter list: NUMBER OF LOGICAL
/// BLOCKS must be zero (no change) or the current capacity, and the block length must
/// match (we cannot reformat).
fn check_block_descriptor(
    info: &LunInfo,
    bd: &[u8],
    base: usize,
    long_lba: bool,
) -> Result<(), Sense> {
    let (blocks, current_blocks, len_at, block_len) = if long_lba {
        (
            be_u64(bd.get(..8).unwrap_or(&[])),
            info.num_blocks,
            12,
            be_u32(bd.get(12..16).unwrap_or(&[])),
        )
    } else {
        (
            u64::from(be_u32(bd.get(..4).unwrap_or(&[]))),
            u64::from(u32::try_from(info.num_blocks).unwrap_or(u32::MAX)),
            5,
            be_u32(bd.get(5..8).unwrap_or(&[])),
        )
    };
    if blocks != 0 && blocks != current_blocks {
        return Err(param_error(base, None));
    }
    if block_len != info.block_size {
        return Err(param_error(base + len_at, None));
    }
    Ok(())
}

/// Validates one page at `at` against the current values and changeable mask, records
/// its changeable bits in `next`, and returns the offset of the following page.
fn apply_page(
    params: &[u8],
    at: usize,
    current: &ModeState,
    next: &mut ModeState,
) -> Result<usize, Sense> {
    let b0 = params.get(at).copied().unwrap_or(0);
    // PS is reserved in MODE SELECT; libiscsi clears it, and ignoring it is harmless.
    let spf = b0 & 0x40 != 0;
    let page = b0 & 0x3F;
    let (subpage, len, hdr) = if spf {
        let h = params
            .get(at..at + 4)
            .ok_or_else(Sense::parameter_list_length_error)?;
        let (s, hi, lo) = (
            h.get(1).copied().unwrap_or(0),
            h.get(2).copied().unwrap_or(0),
            h.get(3).copied().unwrap_or(0),
        );
        (s, usize::from(u16::from_be_bytes([hi, lo])), 4)
    } else {
        let l = params
            .get(at + 1)
            .copied()
            .ok_or_else(Sense::parameter_list_length_error)?;
        (0, usize::from(l), 2)
    };
    if !PAGES.contains(&(page, subpage)) {
        return Err(param_error(at, Some(5)));
    }
    if len != page_len_bytes(page, subpage) {
        return Err(param_error(at + hdr - 1, None));
    }
    let got = params
        .get(at..at + hdr + len)
        .ok_or_else(Sense::parameter_list_length_error)?;
    let values = page_values(page, subpage, current);
    let mask = page_mask(page, subpage);
    for (i, ((g, v), m)) in got.iter().zip(&values).zip(&mask).enumerate().skip(hdr) {
        let bad = (g ^ v) & !m;
        if bad != 0 {
            let bit = 7 - bad.leading_zeros() as u8;
            return Err(param_error(at + i, Some(bit)));
        }
    }
    let has = |(off, m): (usize, u8)| got.get(off).is_some_and(|b| b & m != 0);
    match (page, subpage) {
        (PAGE_CACHING, 0) => next.wce = has(CACHING_WCE),
        (PAGE_CONTROL, 0) => {
            next.d_sense = has(CONTROL_D_SENSE);
            next.swp = has(CONTROL_SWP);
        }
        _ => {}
    }
    Ok(at + hdr + len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::sense::{Asc, SenseKey};

    fn info() -> LunInfo {
        LunInfo::new(512, 0x1_0000, 7, "s", "iqn.x")
    }

    fn sense6(pc: u8, page: u8, subpage: u8, dbd: bool) -> ModeSenseCdb {
        ModeSenseCdb {
            ten_byte: false,
            dbd,
            llbaa: false,
            pc,
            page,
            subpage,
            alloc_len: 255,
        }
    }

    #[test]
    fn control_page_golden() {
        let d = mode_sense(&info(), &ModeState::default(), &sense6(0, 0x0A, 0, true)).unwrap();
        assert_eq!(
            d,
            vec![
                15, 0, 0x10, 0, // header: length, medium, DPOFUA, no descriptor
                0x0A, 0x0A, 0x00, 0x10, 0x00, 0, 0, 0, 0, 0, 0, 0,
            ]
        );
    }

    #[test]
    fn block_descriptor_and_wp() {
        let st = ModeState {
            swp: true,
            ..ModeState::default()
        };
        let d = mode_sense(&info(), &st, &sense6(0, 0x08, 0, false)).unwrap();
        assert_eq!(&d[..4], &[3 + 8 + 20, 0, 0x90, 8]);
        assert_eq!(&d[4..12], &[0, 1, 0, 0, 0, 0, 0x02, 0x00]);
        assert_eq!(&d[12..16], &[0x08, 0x12, 0x04, 0x00]);
    }

    #[test]
    fn mode_sense10_long_lba() {
        let cdb = ModeSenseCdb {
            ten_byte: true,
            llbaa: true,
            ..sense6(0, 0x1C, 0, false)
        };
        let d = mode_sense(&info(), &ModeState::default(), &cdb).unwrap();
        assert_eq!(&d[..8], &[0, 6 + 16 + 12, 0, 0x10, 0x01, 0, 0, 16]);
        assert_eq!(&d[8..16], &0x1_0000u64.to_be_bytes());
        assert_eq!(&d[20..24], &512u32.to_be_bytes());
        assert_eq!(&d[24..28], &[0x1C, 0x0A, 0x08, 0x00]);
    }

    #[test]
    fn all_pages_lengths() {
        let d = mode_sense(&info(), &ModeState::default(), &sense6(0, 0x3F, 0, true)).unwrap();
        assert_eq!(usize::from(d[0]) + 1, d.len());
        // Walk the pages the way an initiator would.
        let mut at = 4;
        let mut seen = Vec::new();
        while at < d.len() {
            assert_eq!(d[at] & 0x40, 0, "no subpages for subpage 0x00");
            seen.push(d[at] & 0x3F);
            at += 2 + usize::from(d[at + 1]);
        }
        assert_eq!(at, d.len());
        assert_eq!(seen, vec![0x01, 0x02, 0x08, 0x0A, 0x1A, 0x1C]);

        let all = mode_sense(&info(), &ModeState::default(), &sense6(0, 0x3F, 0xFF, true)).unwrap();
        assert_eq!(all.len(), d.len() + 32);
        let ctl_all =
            mode_sense(&info(), &ModeState::default(), &sense6(0, 0x0A, 0xFF, true)).unwrap();
        assert_eq!(ctl_all.len(), 4 + 12 + 32);
        assert_eq!(&ctl_all[16..20], &[0x4A, 0x01, 0x00, 0x1C]);
    }

    #[test]
    fn changeable_and_saved() {
        let d = mode_sense(&info(), &ModeState::default(), &sense6(1, 0x0A, 0, true)).unwrap();
        assert_eq!(&d[4..12], &[0x0A, 0x0A, 0x04, 0x00, 0x08, 0, 0, 0]);
        let e = mode_sense(&info(), &ModeState::default(), &sense6(3, 0x0A, 0, true)).unwrap_err();
        assert_eq!(
            (e.key, e.asc),
            (
                SenseKey::IllegalRequest,
                Asc::SAVING_PARAMETERS_NOT_SUPPORTED
            )
        );
    }

    #[test]
    fn unknown_pages() {
        let e = mode_sense(&info(), &ModeState::default(), &sense6(0, 0x05, 0, true)).unwrap_err();
        assert_eq!(e, Sense::invalid_field_in_cdb(2, Some(5)));
        let e =
            mode_sense(&info(), &ModeState::default(), &sense6(0, 0x08, 0x02, true)).unwrap_err();
        assert_eq!(e, Sense::invalid_field_in_cdb(3, None));
        let e =
            mode_sense(&info(), &ModeState::default(), &sense6(0, 0x3F, 0x05, true)).unwrap_err();
        assert_eq!(e, Sense::invalid_field_in_cdb(3, None));
    }

    /// What libiscsi's set_swp sends: MODE SELECT (6) header + the Control page read
    /// back with SWP set.
    #[test]
    fn select_sets_swp_like_libiscsi() {
        let mut st = ModeState::default();
        let current = mode_sense(&info(), &st, &sense6(0, 0x0A, 0, true)).unwrap();
        let mut params = vec![0, 0, 0, 0];
        params.extend_from_slice(&current[4..]);
        params[4 + 4] |= 0x08;
        assert_eq!(
            mode_select(&info(), &mut st, true, false, &params, false),
            Ok(())
        );
        assert!(st.swp);
        assert!(st.write_protected(&info()));
        // Same again: accepted, and nothing else changed.
        assert_eq!(
            mode_select(&info(), &mut st, true, false, &params, false),
            Ok(())
        );
        assert_eq!(
            st,
            ModeState {
                swp: true,
                ..ModeState::default()
            }
        );
    }

    #[test]
    fn select_rejects_unchangeable_bits() {
        let mut st = ModeState::default();
        let mut params = vec![0, 0, 0, 0];
        params.extend_from_slice(&page_values(0x0A, 0, &st));
        params[4 + 5] |= 0x40; // TAS is not changeable
        let e = mode_select(&info(), &mut st, true, false, &params, false).unwrap_err();
        assert_eq!(e, Sense::invalid_field_in_parameter_list(9, Some(6)));
        assert_eq!(st, ModeState::default());
    }

    #[test]
    fn select_is_atomic_and_checks_lengths() {
        let mut st = ModeState::default();
        // Caching page clearing WCE, then a bad page: nothing may change.
        let mut params = vec![0, 0, 0, 0];
        let mut caching = page_values(0x08, 0, &st);
        caching[2] = 0;
        params.extend_from_slice(&caching);
        params.extend_from_slice(&[0x05, 0x02, 0, 0]);
        let e = mode_select(&info(), &mut st, true, false, &params, false).unwrap_err();
        assert_eq!(e, Sense::invalid_field_in_parameter_list(24, Some(5)));
        assert!(st.wce);

        // Truncated page.
        let e = mode_select(&info(), &mut st, true, false, &params[..10], false).unwrap_err();
        assert_eq!(e.asc, Asc::PARAMETER_LIST_LENGTH_ERROR);
        // Wrong page length.
        let e = mode_select(
            &info(),
            &mut st,
            true,
            false,
            &[0, 0, 0, 0, 0x08, 0x10],
            false,
        )
        .unwrap_err();
        assert_eq!(e, Sense::invalid_field_in_parameter_list(5, None));
        // SP.
        let e = mode_select(&info(), &mut st, true, true, &[], false).unwrap_err();
        assert_eq!(e.asc, Asc::SAVING_PARAMETERS_NOT_SUPPORTED);
        // Empty list.
        assert_eq!(
            mode_select(&info(), &mut st, true, false, &[], false),
            Ok(())
        );
    }

    #[test]
    fn select10_with_block_descriptor() {
        let mut st = ModeState::default();
        let mut params = vec![0, 0, 0, 0, 0, 0, 0, 8];
        params.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x02, 0x00]); // 0 blocks = no change
        let mut ctl = page_values(0x0A, 0, &st);
        ctl[2] |= 0x04;
        params.extend_from_slice(&ctl);
        assert_eq!(
            mode_select(&info(), &mut st, true, false, &params, true),
            Ok(())
        );
        assert!(st.d_sense);
        assert_eq!(st.sense_format(), SenseFormat::Descriptor);

        params[8 + 6] = 0x10; // block length 4096
        let e = mode_select(&info(), &mut st, true, false, &params, true).unwrap_err();
        assert_eq!(e, Sense::invalid_field_in_parameter_list(13, None));
    }
}
