//! INQUIRY data: the standard page (SPC-4 §6.6.2) and the VPD pages (SPC-4 §7.8,
//! SBC-3 §6.6). Builders return the full page; the caller truncates to the
//! ALLOCATION LENGTH.

use super::lun_info::LunInfo;

/// VPD page codes this module can build, in ascending order (as page 0x00 lists them).
pub const SUPPORTED_VPD_PAGES: [u8; 6] = [
    VPD_SUPPORTED_PAGES,
    VPD_UNIT_SERIAL_NUMBER,
    VPD_DEVICE_IDENTIFICATION,
    VPD_BLOCK_LIMITS,
    VPD_BLOCK_DEVICE_CHARACTERISTICS,
    VPD_LOGICAL_BLOCK_PROVISIONING,
];

pub const VPD_SUPPORTED_PAGES: u8 = 0x00;
pub const VPD_UNIT_SERIAL_NUMBER: u8 = 0x80;
pub const VPD_DEVICE_IDENTIFICATION: u8 = 0x83;
pub const VPD_BLOCK_LIMITS: u8 = 0xB0;
pub const VPD_BLOCK_DEVICE_CHARACTERISTICS: u8 = 0xB1;
pub const VPD_LOGICAL_BLOCK_PROVISIONING: u8 = 0xB2;

/// IEEE company id used in our NAA designators. It is a made-up CID: its second
/// nibble has the X (local) bit set and the M bit clear, a value the IEEE never
/// assigns as an OUI, so it cannot collide with a real vendor's NAA names.
pub const NAA_COMPANY_ID: u32 = 0x2A_5E1D;

/// Version descriptors claimed in standard INQUIRY data: SAM-5, iSCSI, SPC-4, SBC-3
/// (each "no version claimed"), as libiscsi's VersionDescriptors test looks for.
const VERSION_DESCRIPTORS: [u16; 4] = [0x00A0, 0x0960, 0x0460, 0x04C0];

/// Length of the standard INQUIRY data we return (through the version descriptors
/// and the reserved bytes after them).
const STANDARD_LEN_BYTES: usize = 96;

/// Peripheral qualifier 000b (connected) / device type 00h (direct access block).
const PERIPHERAL_DISK: u8 = 0x00;

/// Standard INQUIRY data (96 bytes).
pub fn standard_inquiry(info: &LunInfo) -> Vec<u8> {
    let mut d = vec![0u8; STANDARD_LEN_BYTES];
    d[0] = PERIPHERAL_DISK;
    d[2] = 0x06; // VERSION: SPC-4
    d[3] = 0x10 | 0x02; // HISUP, RESPONSE DATA FORMAT 2
    d[4] = (STANDARD_LEN_BYTES - 5) as u8;
    let mut b5 = 0u8;
    if info.target_port_group.is_some() {
        b5 |= 0x10; // TPGS 01b: implicit ALUA only
    }
    if info.extended_copy {
        b5 |= 0x08; // 3PC
    }
    d[5] = b5;
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(&printable(&info.vendor));
    d[16..32].copy_from_slice(&printable(&info.product));
    d[32..36].copy_from_slice(&printable(&info.revision));
    for (i, v) in VERSION_DESCRIPTORS.iter().enumerate() {
        let at = 58 + 2 * i;
        d[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
    d
}

/// Replaces bytes SPC-4 §4.3.1 does not allow in ASCII fields with spaces.
fn printable<const N: usize>(field: &[u8; N]) -> [u8; N] {
    field.map(|b| if (0x20..=0x7E).contains(&b) { b } else { b' ' })
}

/// Builds VPD page `page`, or `None` when it is not supported (the caller then
/// answers INVALID FIELD IN CDB pointing at byte 2).
pub fn vpd_page(info: &LunInfo, page: u8) -> Option<Vec<u8>> {
    let body = match page {
        VPD_SUPPORTED_PAGES => SUPPORTED_VPD_PAGES.to_vec(),
        VPD_UNIT_SERIAL_NUMBER => serial_bytes(info),
        VPD_DEVICE_IDENTIFICATION => device_identification(info),
        VPD_BLOCK_LIMITS => block_limits(info),
        VPD_BLOCK_DEVICE_CHARACTERISTICS => block_device_characteristics(),
        VPD_LOGICAL_BLOCK_PROVISIONING => logical_block_provisioning(info),
        _ => return None,
    };
    let mut out = Vec::with_capacity(4 + body.len());
    out.push(PERIPHERAL_DISK);
    out.push(page);
    // Bodies are bounded (the longest is the IQN-bearing 0x83 page, and iSCSI names
    // are at most 223 bytes), so the page length always fits in two bytes.
    out.extend_from_slice(&u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    Some(out)
}

/// Serial number bytes: printable ASCII only, at most 32 bytes.
fn serial_bytes(info: &LunInfo) -> Vec<u8> {
    info.serial
        .bytes()
        .take(32)
        .map(|b| if (0x21..=0x7E).contains(&b) { b } else { b'_' })
        .collect()
}

/// The 16-byte NAA IEEE Registered Extended (NAA 6) name for a LUN:
/// NAA (4 bits) = 6, IEEE COMPANY ID (24 bits) = [`NAA_COMPANY_ID`],
/// VENDOR SPECIFIC IDENTIFIER (36 bits) = the top 36 bits of `naa_id`, and
/// VENDOR SPECIFIC IDENTIFIER EXTENSION (64 bits) = `naa_id`. Repeating the id keeps
/// the full value in the extension while the first 8 bytes still differ between LUNs.
pub fn naa_designator(naa_id: u64) -> [u8; 16] {
    let high = (6u64 << 60) | (u64::from(NAA_COMPANY_ID) << 36) | (naa_id >> 28);
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&high.to_be_bytes());
    out[8..].copy_from_slice(&naa_id.to_be_bytes());
    out
}

// Designation descriptor header fields (SPC-4 §7.8.6.1).
const PROTOCOL_ISCSI: u8 = 0x5;
const CODE_SET_BINARY: u8 = 0x1;
const CODE_SET_ASCII: u8 = 0x2;
const CODE_SET_UTF8: u8 = 0x3;
const ASSOC_LU: u8 = 0x0;
const ASSOC_TARGET_PORT: u8 = 0x1;
const ASSOC_TARGET_DEVICE: u8 = 0x2;
const TYPE_T10_VENDOR: u8 = 0x1;
const TYPE_NAA: u8 = 0x3;
const TYPE_RELATIVE_PORT: u8 = 0x4;
const TYPE_TARGET_PORT_GROUP: u8 = 0x5;
const TYPE_SCSI_NAME: u8 = 0x8;

/// Appends one designation descriptor. `piv` marks the PROTOCOL IDENTIFIER as valid
/// (only meaningful for port/device associations).
fn push_designator(out: &mut Vec<u8>, piv: bool, code_set: u8, assoc: u8, kind: u8, value: &[u8]) {
    let proto = if piv { PROTOCOL_ISCSI << 4 } else { 0 };
    out.push(proto | code_set);
    out.push(if piv { 0x80 } else { 0 } | (assoc << 4) | kind);
    out.push(0);
    out.push(u8::try_from(value.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(value.get(..usize::from(u8::MAX)).unwrap_or(value));
}

/// A SCSI name string: NUL terminated and padded to a multiple of 4 (SPC-4 §7.8.6.11).
fn scsi_name_string(name: &str) -> Vec<u8> {
    // iSCSI names are at most 223 bytes; cap so the descriptor length fits a byte.
    let mut v: Vec<u8> = name.bytes().take(251).collect();
    v.push(0);
    v.resize(v.len().div_ceil(4) * 4, 0);
    v
}

/// VPD 0x83 body.
fn device_identification(info: &LunInfo) -> Vec<u8> {
    let mut out = Vec::new();
    push_designator(
        &mut out,
        false,
        CODE_SET_BINARY,
        ASSOC_LU,
        TYPE_NAA,
        &naa_designator(info.naa_id),
    );
    // T10 vendor id: vendor (8) followed by the serial, which makes it unique.
    let mut t10 = printable(&info.vendor).to_vec();
    t10.extend_from_slice(&serial_bytes(info));
    push_designator(
        &mut out,
        false,
        CODE_SET_ASCII,
        ASSOC_LU,
        TYPE_T10_VENDOR,
        &t10,
    );
    push_designator(
        &mut out,
        true,
        CODE_SET_BINARY,
        ASSOC_TARGET_PORT,
        TYPE_RELATIVE_PORT,
        &[
            0,
            0,
            (info.relative_port_id >> 8) as u8,
            info.relative_port_id as u8,
        ],
    );
    if let Some(tpg) = info.target_port_group {
        push_designator(
            &mut out,
            true,
            CODE_SET_BINARY,
            ASSOC_TARGET_PORT,
            TYPE_TARGET_PORT_GROUP,
            &[0, 0, (tpg >> 8) as u8, tpg as u8],
        );
    }
    // SPC-4 / RFC 7143: the iSCSI target port name is "<name>,t,0x<TPGT in hex>".
    let port_name = format!("{},t,0x{:04x}", info.target_name, info.portal_group_tag);
    push_designator(
        &mut out,
        true,
        CODE_SET_UTF8,
        ASSOC_TARGET_PORT,
        TYPE_SCSI_NAME,
        &scsi_name_string(&port_name),
    );
    push_designator(
        &mut out,
        true,
        CODE_SET_UTF8,
        ASSOC_TARGET_DEVICE,
        TYPE_SCSI_NAME,
        &scsi_name_string(&info.target_name),
    );
    out
}

/// VPD 0xB0 body (page length 0x3C, SBC-3).
fn block_limits(info: &LunInfo) -> Vec<u8> {
    let mut b = vec![0u8; 0x3C];
    // `page_at` is the field's offset in the page; the body starts after the 4-byte header.
    let put32 = |b: &mut [u8], page_at: usize, v: u32| {
        b[page_at - 4..page_at].copy_from_slice(&v.to_be_bytes());
    };
    if info.write_same_no_zero {
        b[0] = 0x01; // WSNZ
    }
    b[1] = info.max_compare_write_blocks;
    b[2..4].copy_from_slice(&info.opt_xfer_granularity_blocks.to_be_bytes());
    put32(&mut b, 8, info.max_xfer_blocks);
    put32(&mut b, 12, info.opt_xfer_blocks);
    put32(&mut b, 16, info.max_prefetch_blocks);
    // libiscsi (BlockLimits): without UNMAP support both unmap limits must be zero.
    if info.thin {
        put32(&mut b, 20, info.max_unmap_blocks);
        put32(&mut b, 24, info.max_unmap_descriptors);
        put32(&mut b, 28, info.unmap_granularity_blocks);
        if let Some(align) = info.unmap_granularity_alignment_blocks {
            put32(&mut b, 32, 0x8000_0000 | (align & 0x7FFF_FFFF)); // UGAVALID
        }
    }
    b[32..40].copy_from_slice(&info.max_write_same_blocks.to_be_bytes()); // page 36..44
                                                                          // Atomic fields stay zero unless WRITE ATOMIC is supported (libiscsi WriteAtomic16 VPD).
    if info.max_atomic_blocks != 0 {
        put32(&mut b, 44, info.max_atomic_blocks);
        put32(&mut b, 48, info.atomic_alignment_blocks);
        put32(&mut b, 52, info.atomic_granularity_blocks);
    }
    b
}

/// VPD 0xB1 body: non-rotating medium, form factor not reported.
fn block_device_characteristics() -> Vec<u8> {
    let mut b = vec![0u8; 0x3C];
    b[0..2].copy_from_slice(&1u16.to_be_bytes()); // MEDIUM ROTATION RATE 1: solid state
                                                  // Page byte 7: WABEREQ = 01b, reads after SANITIZE BLOCK ERASE succeed (they return
                                                  // zeros: the blocks are deallocated and LBPRZ = 1). WACEREQ = 0: no CRYPTO ERASE.
    b[3] = 0x40;
    b
}

/// VPD 0xB2 body (no provisioning group descriptor, so 4 bytes).
fn logical_block_provisioning(info: &LunInfo) -> Vec<u8> {
    let mut b = vec![0u8; 4];
    if info.thin {
        b[1] = 0x80 | 0x40 | 0x20; // LBPU, LBPWS, LBPWS10
        b[2] = 0x02; // PROVISIONING TYPE: thin
    }
    if info.lbprz {
        // LBPRZ: bit 2 in SBC-3; the 3-bit field value 001b in SBC-4 is the same bits.
        b[1] |= 0x04;
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> LunInfo {
        LunInfo::new(
            512,
            2048,
            0x0123_4567_89AB_CDEF,
            "SN0001",
            "iqn.2024-01.org.example:t1",
        )
    }

    #[test]
    fn standard_golden_header() {
        let d = standard_inquiry(&info());
        assert_eq!(d.len(), 96);
        assert_eq!(&d[..8], &[0x00, 0x00, 0x06, 0x12, 91, 0x00, 0x00, 0x02]);
        assert_eq!(&d[8..16], b"TWINSAN ");
        assert_eq!(&d[16..32], b"TWINSAN DISK    ");
        assert_eq!(&d[32..36], b"0001");
        assert_eq!(
            &d[58..66],
            &[0x00, 0xA0, 0x09, 0x60, 0x04, 0x60, 0x04, 0xC0]
        );
        // libiscsi: ADDITIONAL LENGTH == size - 5.
        assert_eq!(usize::from(d[4]), d.len() - 5);
    }

    #[test]
    fn standard_tpgs_and_3pc() {
        let mut i = info();
        i.target_port_group = Some(1);
        i.extended_copy = true;
        i.vendor[0] = 0x01; // non-printable gets sanitized
        let d = standard_inquiry(&i);
        assert_eq!(d[5], 0x18);
        assert_eq!(d[8], b' ');
    }

    #[test]
    fn supported_pages_sorted_and_all_buildable() {
        let p = vpd_page(&info(), 0x00).unwrap();
        assert_eq!(
            p,
            vec![0x00, 0x00, 0x00, 6, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
        );
        let pages = &p[4..];
        assert!(pages.windows(2).all(|w| w[0] < w[1]));
        for &page in pages {
            let v = vpd_page(&info(), page).unwrap();
            assert_eq!(v[1], page);
            assert_eq!(usize::from(u16::from_be_bytes([v[2], v[3]])), v.len() - 4);
        }
        assert!(vpd_page(&info(), 0x86).is_none());
    }

    #[test]
    fn serial_page() {
        let p = vpd_page(&info(), 0x80).unwrap();
        assert_eq!(p, b"\x00\x80\x00\x06SN0001".to_vec());
    }

    #[test]
    fn naa_layout() {
        let n = naa_designator(0x0123_4567_89AB_CDEF);
        assert_eq!(n[0] >> 4, 6);
        // Company id straddles nibbles: 6 | 2A5E1D | ...
        assert_eq!(&n[..4], &[0x62, 0xA5, 0xE1, 0xD0]);
        assert_eq!(&n[8..], &0x0123_4567_89AB_CDEF_u64.to_be_bytes());
    }

    #[test]
    fn device_identification_golden() {
        let mut i = info();
        i.target_name = "iqn.x".into();
        i.portal_group_tag = 1;
        i.relative_port_id = 2;
        let p = vpd_page(&i, 0x83).unwrap();
        let body = &p[4..];
        // NAA, LU association.
        assert_eq!(&body[..4], &[0x01, 0x03, 0x00, 16]);
        assert_eq!(&body[4..20], &naa_designator(i.naa_id));
        // T10 vendor id: "TWINSAN " + "SN0001".
        assert_eq!(&body[20..24], &[0x02, 0x01, 0x00, 14]);
        assert_eq!(&body[24..38], b"TWINSAN SN0001");
        // Relative target port.
        assert_eq!(&body[38..46], &[0x51, 0x94, 0x00, 4, 0, 0, 0, 2]);
        // SCSI name string, target port: "iqn.x,t,0x0001" + NUL, padded to 16.
        assert_eq!(&body[46..50], &[0x53, 0x98, 0x00, 16]);
        assert_eq!(&body[50..66], b"iqn.x,t,0x0001\0\0");
        // SCSI name string, target device: "iqn.x" + NUL, padded to 8.
        assert_eq!(&body[66..70], &[0x53, 0xA8, 0x00, 8]);
        assert_eq!(&body[70..78], b"iqn.x\0\0\0");
        assert_eq!(body.len(), 78);
    }

    #[test]
    fn block_limits_thin_and_thick() {
        let mut i = info();
        i.max_atomic_blocks = 8;
        i.atomic_granularity_blocks = 2;
        i.unmap_granularity_alignment_blocks = Some(0);
        let p = vpd_page(&i, 0xB0).unwrap();
        // libiscsi BlockLimits: PageLength 0x3C and size == data[3] + 4.
        assert_eq!(p.len(), 64);
        assert_eq!(p[3], 0x3C);
        assert_eq!(p[5], 1); // MAXIMUM COMPARE AND WRITE LENGTH
        assert_eq!(&p[8..12], &(16384u32).to_be_bytes()); // 8 MiB / 512
        assert_eq!(&p[12..16], &(2048u32).to_be_bytes());
        assert_eq!(&p[20..24], &(1u32 << 20).to_be_bytes());
        assert_eq!(&p[24..28], &256u32.to_be_bytes());
        assert_eq!(&p[28..32], &1u32.to_be_bytes());
        assert_eq!(&p[32..36], &0x8000_0000u32.to_be_bytes());
        assert_eq!(&p[44..48], &8u32.to_be_bytes());
        assert_eq!(&p[52..56], &2u32.to_be_bytes());

        i.thin = false;
        i.max_atomic_blocks = 0;
        let p = vpd_page(&i, 0xB0).unwrap();
        assert_eq!(&p[20..36], &[0u8; 16]);
        assert_eq!(&p[44..64], &[0u8; 20]);
    }

    #[test]
    fn block_device_characteristics_golden() {
        let p = vpd_page(&info(), 0xB1).unwrap();
        assert_eq!(&p[..8], &[0x00, 0xB1, 0x00, 0x3C, 0x00, 0x01, 0x00, 0x40]);
        assert_eq!(p.len(), 64);
    }

    #[test]
    fn logical_block_provisioning_golden() {
        let p = vpd_page(&info(), 0xB2).unwrap();
        assert_eq!(p, vec![0x00, 0xB2, 0x00, 0x04, 0x00, 0xE4, 0x02, 0x00]);
        let mut i = info();
        i.thin = false;
        i.lbprz = false;
        assert_eq!(
            vpd_page(&i, 0xB2).unwrap(),
            vec![0x00, 0xB2, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00]
        );
    }
}
