//! REPORT LUNS parameter data (SPC-4 §6.33) and LUN field encoding (SAM-5 §4.7).

/// Encodes a LUN as an 8-byte LUN field: peripheral device addressing for LUNs
/// below 256 (what initiators expect for small LUNs), flat space addressing below
/// 16384, and `None` above that (not addressable by single-level LUNs).
pub fn encode_lun(lun: u64) -> Option<[u8; 8]> {
    let mut out = [0u8; 8];
    match lun {
        0..=0xFF => out[1] = lun as u8,
        0x100..=0x3FFF => {
            out[0] = 0x40 | (lun >> 8) as u8;
            out[1] = lun as u8;
        }
        _ => return None,
    }
    Some(out)
}

/// Decodes a single-level LUN field (peripheral or flat space addressing); `None` for
/// other address methods or multi-level LUNs.
pub fn decode_lun(field: [u8; 8]) -> Option<u64> {
    let [b0, b1, rest @ ..] = field;
    if rest != [0u8; 6] {
        return None;
    }
    match b0 >> 6 {
        // Peripheral device addressing with BUS IDENTIFIER 0.
        0b00 if b0 == 0 => Some(u64::from(b1)),
        0b01 => Some((u64::from(b0 & 0x3F) << 8) | u64::from(b1)),
        _ => None,
    }
}

/// REPORT LUNS data listing `luns` in the order given. LUNs that [`encode_lun`]
/// cannot address are left out. SELECT REPORT and the ALLOCATION LENGTH are the
/// caller's: 00h/02h list these LUNs, 01h (well-known LUNs only) is an empty list.
pub fn report_luns(luns: &[u64]) -> Vec<u8> {
    let listed: Vec<[u8; 8]> = luns.iter().filter_map(|&l| encode_lun(l)).collect();
    let list_len_bytes = u32::try_from(listed.len() * 8).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(8 + listed.len() * 8);
    out.extend_from_slice(&list_len_bytes.to_be_bytes());
    out.extend_from_slice(&[0u8; 4]);
    for l in listed {
        out.extend_from_slice(&l);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_encoding() {
        assert_eq!(encode_lun(0), Some([0; 8]));
        assert_eq!(encode_lun(5), Some([0, 5, 0, 0, 0, 0, 0, 0]));
        assert_eq!(encode_lun(0x123), Some([0x41, 0x23, 0, 0, 0, 0, 0, 0]));
        assert_eq!(encode_lun(0x4000), None);
        for lun in [0u64, 1, 255, 256, 0x3FFF] {
            assert_eq!(decode_lun(encode_lun(lun).unwrap()), Some(lun));
        }
        assert_eq!(decode_lun([0x01, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(decode_lun([0, 1, 0, 0, 0, 0, 0, 1]), None);
    }

    #[test]
    fn report_golden() {
        let d = report_luns(&[0, 300, 1 << 20]);
        assert_eq!(
            d,
            vec![0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x41, 0x2C, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(report_luns(&[]), vec![0u8; 8]);
    }
}
