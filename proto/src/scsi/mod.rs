//! SCSI: CDB decoding, sense data, INQUIRY/VPD/mode page builders.
