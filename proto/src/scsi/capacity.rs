//! READ CAPACITY (10) / (16) parameter data (SBC-3 §5.15, §5.16).

use super::lun_info::LunInfo;

/// READ CAPACITY (10) data (8 bytes). The RETURNED LOGICAL BLOCK ADDRESS saturates to
/// 0xFFFF_FFFF when the last LBA does not fit, telling the initiator to use the
/// 16-byte form.
pub fn read_capacity10(info: &LunInfo) -> [u8; 8] {
    let last = u32::try_from(info.last_lba()).unwrap_or(u32::MAX);
    let mut d = [0u8; 8];
    d[..4].copy_from_slice(&last.to_be_bytes());
    d[4..].copy_from_slice(&info.block_size.to_be_bytes());
    d
}

/// READ CAPACITY (16) data (32 bytes): no protection information, LBPME when thin,
/// LBPRZ as configured, LOWEST ALIGNED LBA 0.
pub fn read_capacity16(info: &LunInfo) -> [u8; 32] {
    let mut d = [0u8; 32];
    d[..8].copy_from_slice(&info.last_lba().to_be_bytes());
    d[8..12].copy_from_slice(&info.block_size.to_be_bytes());
    d[13] = info.physical_block_exp & 0x0F;
    if info.thin {
        d[14] |= 0x80; // LBPME
    }
    if info.lbprz {
        d[14] |= 0x40; // LBPRZ
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rc10_golden() {
        let i = LunInfo::new(512, 0x1000, 1, "s", "iqn.x");
        assert_eq!(read_capacity10(&i), [0, 0, 0x0F, 0xFF, 0, 0, 0x02, 0x00]);
    }

    #[test]
    fn rc10_saturates() {
        let i = LunInfo::new(4096, 1 << 33, 1, "s", "iqn.x");
        assert_eq!(&read_capacity10(&i)[..4], &[0xFF; 4]);
        let exact = LunInfo::new(4096, 1 << 32, 1, "s", "iqn.x");
        assert_eq!(&read_capacity10(&exact)[..4], &[0xFF; 4]);
        let below = LunInfo::new(4096, (1 << 32) - 1, 1, "s", "iqn.x");
        assert_eq!(&read_capacity10(&below)[..4], &[0xFF, 0xFF, 0xFF, 0xFE]);
    }

    #[test]
    fn rc16_golden() {
        let mut i = LunInfo::new(4096, 1 << 33, 1, "s", "iqn.x");
        i.physical_block_exp = 3;
        let d = read_capacity16(&i);
        assert_eq!(&d[..8], &((1u64 << 33) - 1).to_be_bytes());
        assert_eq!(&d[8..12], &[0, 0, 0x10, 0]);
        assert_eq!(&d[12..16], &[0x00, 0x03, 0xC0, 0x00]);
        assert_eq!(&d[16..], &[0u8; 16]);
        i.thin = false;
        i.lbprz = false;
        assert_eq!(read_capacity16(&i)[14], 0);
    }
}
