//! Addressing: the LUN field of a PDU, and the tag of an I_T nexus.

/// LUN field to LUN id (SAM-5 section 4.7: peripheral (00b) and flat (01b) addressing).
pub fn decode_lun(field: u64) -> u64 {
    // One decoder for the whole target (SAM-5 single-level peripheral or flat space
    // addressing): a multi-level or other-method LUN names nothing we export, not LUN 0.
    proto::scsi::report_luns::decode_lun(field.to_be_bytes()).unwrap_or(u64::MAX)
}

/// LUN id to the LUN field we send back.
pub fn encode_lun(id: u64) -> u64 {
    if id == u64::MAX {
        return 0;
    }
    let id = id & 0x3fff;
    let hi = if id < 256 { 0 } else { 0x40 | (id >> 8) as u8 };
    u64::from_be_bytes([hi, id as u8, 0, 0, 0, 0, 0, 0])
}

/// A stable 64-bit tag of an I_T nexus (unit attentions addressed to one nexus carry it).
pub fn nexus_tag(n: &proto::scsi::pr::Nexus) -> u64 {
    crate::config::stable_hash(&[
        n.initiator.as_bytes(),
        &n.isid,
        &n.target_port.to_be_bytes(),
    ])
}
