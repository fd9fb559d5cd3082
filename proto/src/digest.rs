//! iSCSI header and data digests: CRC32C (RFC 7143 section 13.1, Castagnoli polynomial).
//!
//! On the wire the 32-bit digest is stored little-endian, which is how every initiator
//! (Linux, libiscsi, ESXi) interoperates in practice: the CRC register is transmitted
//! least significant byte first (RFC 7143 appendix B.4 gives the test vectors).

/// CRC32C of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// CRC32C continued over a second buffer, for a data segment held in two pieces.
pub fn crc32c_append(crc: u32, bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, bytes)
}

/// The 4 wire bytes of a digest.
pub fn to_wire(crc: u32) -> [u8; 4] {
    crc.to_le_bytes()
}

/// Reads a digest from its 4 wire bytes.
pub fn from_wire(bytes: [u8; 4]) -> u32 {
    u32::from_le_bytes(bytes)
}

/// Digest of a data segment including its pad bytes (the pad is covered by the digest).
pub fn data_digest(data: &[u8]) -> u32 {
    let pad = crate::pdu::pad_len(data.len());
    crc32c_append(crc32c(data), &[0u8; 3][..pad])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7143 appendix B.4: 32 bytes of zeros.
    #[test]
    fn rfc_vector_zeros() {
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(to_wire(0x8a91_36aa), [0xaa, 0x36, 0x91, 0x8a]);
    }

    /// RFC 7143 appendix B.4: 32 bytes of 0xff, and an incrementing pattern.
    #[test]
    fn rfc_vector_ones_and_increasing() {
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&inc), 0x46dd_794e);
    }

    #[test]
    fn padded_digest_covers_pad() {
        assert_eq!(data_digest(b"abc"), crc32c(b"abc\0"));
        assert_eq!(data_digest(b"abcd"), crc32c(b"abcd"));
    }
}
