//! The static description of a logical unit that the INQUIRY / VPD / capacity / mode
//! builders read. The engine owns one per LUN and passes it in.

/// What the SCSI data builders need to know about one logical unit.
///
/// All fields are public so the engine can adjust them after [`LunInfo::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunInfo {
    /// Logical block length in bytes.
    pub block_size: u32,
    /// Capacity in logical blocks.
    pub num_blocks: u64,
    /// LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT (READ CAPACITY (16) LBPPBE).
    pub physical_block_exp: u8,
    /// Unique 64-bit id; becomes the NAA 6 designator in VPD page 0x83 (see
    /// [`crate::scsi::inquiry::naa_designator`]).
    pub naa_id: u64,
    /// Unit serial number (VPD 0x80); at most 32 printable ASCII bytes are used.
    pub serial: String,
    /// T10 VENDOR IDENTIFICATION, space padded.
    pub vendor: [u8; 8],
    /// PRODUCT IDENTIFICATION, space padded.
    pub product: [u8; 16],
    /// PRODUCT REVISION LEVEL, space padded.
    pub revision: [u8; 4],
    /// iSCSI target name (IQN); used for the SCSI name string designators in VPD 0x83.
    pub target_name: String,
    /// Target portal group tag of the port the command arrived on.
    pub portal_group_tag: u16,
    /// RELATIVE TARGET PORT IDENTIFIER of that port (non-zero).
    pub relative_port_id: u16,
    /// Target port group of that port, when ALUA (REPORT TARGET PORT GROUPS) is
    /// implemented; sets TPGS = 01b (implicit) in the standard INQUIRY data.
    pub target_port_group: Option<u16>,
    /// Thin provisioned: LBPME, UNMAP and WRITE SAME with UNMAP are supported.
    pub thin: bool,
    /// Unmapped blocks read back as zeros.
    pub lbprz: bool,
    /// The LUN is write protected (reported by the WP bit in mode parameter headers).
    pub read_only: bool,
    /// EXTENDED COPY is supported (3PC bit).
    pub extended_copy: bool,
    /// MAXIMUM TRANSFER LENGTH in blocks (0 = no limit reported).
    pub max_xfer_blocks: u32,
    /// OPTIMAL TRANSFER LENGTH in blocks.
    pub opt_xfer_blocks: u32,
    /// OPTIMAL TRANSFER LENGTH GRANULARITY in blocks.
    pub opt_xfer_granularity_blocks: u16,
    /// MAXIMUM PREFETCH LENGTH in blocks.
    pub max_prefetch_blocks: u32,
    /// MAXIMUM UNMAP LBA COUNT (reported only when `thin`).
    pub max_unmap_blocks: u32,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT (reported only when `thin`).
    pub max_unmap_descriptors: u32,
    /// OPTIMAL UNMAP GRANULARITY in blocks.
    pub unmap_granularity_blocks: u32,
    /// UNMAP GRANULARITY ALIGNMENT in blocks; `Some` sets UGAVALID.
    pub unmap_granularity_alignment_blocks: Option<u32>,
    /// MAXIMUM WRITE SAME LENGTH in blocks (0 = no limit reported).
    pub max_write_same_blocks: u64,
    /// WSNZ: WRITE SAME with NUMBER OF LOGICAL BLOCKS 0 is rejected.
    pub write_same_no_zero: bool,
    /// MAXIMUM COMPARE AND WRITE LENGTH in blocks (0 = COMPARE AND WRITE unsupported).
    pub max_compare_write_blocks: u8,
    /// MAXIMUM ATOMIC TRANSFER LENGTH in blocks (0 = WRITE ATOMIC unsupported).
    pub max_atomic_blocks: u32,
    /// ATOMIC ALIGNMENT in blocks.
    pub atomic_alignment_blocks: u32,
    /// ATOMIC TRANSFER LENGTH GRANULARITY in blocks.
    pub atomic_granularity_blocks: u32,
}

impl LunInfo {
    /// A LUN with the given geometry and identity, and conservative defaults for the
    /// rest: thin with LBPRZ, 8 MiB max / 1 MiB optimal transfers, COMPARE AND WRITE of
    /// one block, no WRITE ATOMIC, no EXTENDED COPY, no ALUA, port 1 in portal group 1.
    pub fn new(
        block_size: u32,
        num_blocks: u64,
        naa_id: u64,
        serial: &str,
        target_name: &str,
    ) -> Self {
        let bs = u64::from(block_size.max(1));
        let blocks_in = |bytes: u64| u32::try_from((bytes / bs).max(1)).unwrap_or(u32::MAX);
        LunInfo {
            block_size,
            num_blocks,
            physical_block_exp: 0,
            naa_id,
            serial: serial.to_string(),
            vendor: *b"TWINSAN ",
            product: *b"TWINSAN DISK    ",
            revision: *b"0001",
            target_name: target_name.to_string(),
            portal_group_tag: 1,
            relative_port_id: 1,
            target_port_group: None,
            thin: true,
            lbprz: true,
            read_only: false,
            extended_copy: false,
            max_xfer_blocks: blocks_in(8 << 20),
            opt_xfer_blocks: blocks_in(1 << 20),
            opt_xfer_granularity_blocks: 1,
            max_prefetch_blocks: 0,
            // libiscsi accepts explicit limits up to 1M; keep within that.
            max_unmap_blocks: blocks_in(1 << 30).min(1 << 20),
            max_unmap_descriptors: 256,
            unmap_granularity_blocks: 1,
            unmap_granularity_alignment_blocks: None,
            max_write_same_blocks: u64::from(blocks_in(64 << 20)),
            write_same_no_zero: false,
            max_compare_write_blocks: 1,
            max_atomic_blocks: 0,
            atomic_alignment_blocks: 0,
            atomic_granularity_blocks: 0,
        }
    }

    /// Address of the last logical block (0 for an empty LUN).
    pub fn last_lba(&self) -> u64 {
        self.num_blocks.saturating_sub(1)
    }
}
