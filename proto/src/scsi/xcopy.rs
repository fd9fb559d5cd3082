//! EXTENDED COPY (LID1, SPC-4 section 6.4) parameter lists and RECEIVE COPY RESULTS data.
//!
//! ESXi's datamover (VAAI XCOPY) clones by sending block-to-block segments of 4-16 MiB
//! between LUNs identified by their NAA designators. Parsing is pure; the copy itself runs
//! as chunked io_uring reads and writes in the engine (engine/src/scsi/).

use crate::pdu::{be16, be32, be64};
use crate::scsi::sense::{Asc, Sense, SenseKey};

/// Copy manager limits, reported by RECEIVE COPY RESULTS (OPERATING PARAMETERS).
pub const MAX_TARGET_DESCRIPTORS: u16 = 2;
pub const MAX_SEGMENT_DESCRIPTORS: u16 = 1;
pub const MAX_DESCRIPTOR_LIST_BYTES: u32 = 1024;
/// One segment may move 65535 blocks (its NUMBER OF BLOCKS field): 32 MiB at 512 bytes.
pub const MAX_SEGMENT_BYTES: u32 = 65535 * 512;
/// Bytes moved per read/write step: bounds buffer memory and keeps each I/O short.
pub const CHUNK_BYTES: u32 = 1 << 20;

const HEADER_LEN: usize = 16;
const TARGET_DESC_LEN: usize = 32;
const B2B_SEGMENT_LEN: usize = 28;
const ID_DESCRIPTOR: u8 = 0xE4;
const BLOCK_TO_BLOCK: u8 = 0x02;

/// A parsed copy request: where each segment reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyList {
    pub list_id: u8,
    /// LIST ID USAGE: 0 and 1 hold the status for RECEIVE COPY RESULTS.
    pub hold: bool,
    /// Designators (NAA, 16 bytes or shorter) of the target descriptors, in order.
    pub targets: Vec<Vec<u8>>,
    pub segments: Vec<Segment>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub src: u16,
    pub dst: u16,
    pub blocks: u32,
    pub src_lba: u64,
    pub dst_lba: u64,
}

/// Sense key COPY ABORTED (0Ah) with the given ASC (SPC-4 section 6.4.3 lists them).
pub fn copy_aborted(asc: Asc) -> Sense {
    Sense::new(SenseKey::CopyAborted, asc)
}

/// UNREACHABLE COPY TARGET (08/04).
pub const UNREACHABLE_COPY_TARGET: Asc = Asc(0x08, 0x04);
/// COPY TARGET DEVICE NOT REACHABLE (0D/02).
pub const COPY_TARGET_NOT_REACHABLE: Asc = Asc(0x0D, 0x02);

/// Parses an LID1 parameter list. Errors are the sense data SPC-4 asks for.
pub fn parse(p: &[u8]) -> Result<CopyList, Sense> {
    if p.len() < HEADER_LEN {
        return Err(Sense::parameter_list_length_error());
    }
    let tdl = be16(p, 2) as usize;
    let sdl = be32(p, 8) as usize;
    let inline = be32(p, 12) as usize;
    // Lengths first: a list we cannot hold, or one longer than what was sent.
    if tdl + sdl > MAX_DESCRIPTOR_LIST_BYTES as usize || HEADER_LEN + tdl + sdl + inline > p.len() {
        return Err(Sense::parameter_list_length_error());
    }
    if inline != 0 {
        return Err(Sense::invalid_field_in_parameter_list(12, None));
    }
    if !tdl.is_multiple_of(TARGET_DESC_LEN) {
        return Err(Sense::parameter_list_length_error());
    }
    let n_targets = tdl / TARGET_DESC_LEN;
    if n_targets > MAX_TARGET_DESCRIPTORS as usize {
        return Err(Sense::illegal_request(Asc(0x26, 0x06))); // TOO MANY TARGET DESCRIPTORS
    }
    let mut targets = Vec::with_capacity(n_targets);
    for (i, d) in p[HEADER_LEN..HEADER_LEN + tdl]
        .chunks_exact(TARGET_DESC_LEN)
        .enumerate()
    {
        if d[0] != ID_DESCRIPTOR {
            // UNSUPPORTED TARGET DESCRIPTOR TYPE CODE
            return Err(Sense::illegal_request(Asc(0x26, 0x07))
                .with_field_pointer(field(HEADER_LEN + i * TARGET_DESC_LEN)));
        }
        if d[1] & 0x1f != 0 {
            // Only direct-access block devices can be copied between.
            return Err(Sense::invalid_field_in_parameter_list(
                (HEADER_LEN + i * TARGET_DESC_LEN + 1) as u16,
                None,
            ));
        }
        let len = (d[7] as usize).min(20);
        targets.push(d[8..8 + len].to_vec());
    }
    let segs = &p[HEADER_LEN + tdl..HEADER_LEN + tdl + sdl];
    let mut segments = Vec::new();
    let mut at = 0;
    while at < segs.len() {
        if segs.len() - at < 4 {
            return Err(Sense::parameter_list_length_error());
        }
        if segments.len() == MAX_SEGMENT_DESCRIPTORS as usize {
            return Err(Sense::illegal_request(Asc(0x26, 0x08))); // TOO MANY SEGMENT DESCRIPTORS
        }
        let d = &segs[at..];
        if d[0] != BLOCK_TO_BLOCK {
            // UNSUPPORTED SEGMENT DESCRIPTOR TYPE CODE
            return Err(Sense::illegal_request(Asc(0x26, 0x09)));
        }
        let dlen = be16(d, 2) as usize + 4;
        if dlen != B2B_SEGMENT_LEN || d.len() < B2B_SEGMENT_LEN {
            return Err(Sense::parameter_list_length_error());
        }
        segments.push(Segment {
            src: be16(d, 4),
            dst: be16(d, 6),
            blocks: be16(d, 10) as u32,
            src_lba: be64(d, 12),
            dst_lba: be64(d, 20),
        });
        at += dlen;
    }
    Ok(CopyList {
        list_id: p[0],
        hold: (p[1] >> 3) & 0x03 <= 1,
        targets,
        segments,
    })
}

fn field(byte: usize) -> crate::scsi::sense::FieldPointer {
    crate::scsi::sense::FieldPointer {
        cdb: false,
        byte: byte as u16,
        bit: None,
    }
}

/// RECEIVE COPY RESULTS, OPERATING PARAMETERS (SPC-3 section 6.18.5).
pub fn operating_parameters() -> Vec<u8> {
    let implemented = [BLOCK_TO_BLOCK, ID_DESCRIPTOR];
    let mut v = vec![0u8; 44];
    v[0..4].copy_from_slice(&((40 + implemented.len()) as u32).to_be_bytes());
    v[4] = 0x01; // SNLID: list ids are per I_T nexus
    v[8..10].copy_from_slice(&MAX_TARGET_DESCRIPTORS.to_be_bytes());
    v[10..12].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
    v[12..16].copy_from_slice(&MAX_DESCRIPTOR_LIST_BYTES.to_be_bytes());
    v[16..20].copy_from_slice(&MAX_SEGMENT_BYTES.to_be_bytes());
    // Inline data, held data, stream transfer: none.
    v[36..38].copy_from_slice(&1u16.to_be_bytes()); // total concurrent copies
    v[38] = 1; // maximum concurrent copies
    v[39] = 9; // data segment granularity: 2^9 bytes
    v[43] = implemented.len() as u8;
    v.extend_from_slice(&implemented);
    v
}

/// The held outcome of a copy, for COPY STATUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyResult {
    pub ok: bool,
    pub segments_done: u16,
    pub bytes: u64,
}

/// RECEIVE COPY RESULTS, COPY STATUS (SPC-3 section 6.18.3).
pub fn copy_status(r: &CopyResult) -> Vec<u8> {
    let mut v = vec![0u8; 12];
    v[0..4].copy_from_slice(&8u32.to_be_bytes());
    v[4] = if r.ok { 0x00 } else { 0x01 };
    v[5..7].copy_from_slice(&r.segments_done.to_be_bytes());
    // TRANSFER COUNT UNITS 1 = kibibytes, so 32-bit counts never overflow.
    v[7] = 0x01;
    v[8..12].copy_from_slice(&((r.bytes >> 10).min(u32::MAX as u64) as u32).to_be_bytes());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(targets: &[[u8; 16]], segs: &[Segment], extra_len: i32) -> Vec<u8> {
        let mut p = vec![0u8; 16];
        p[0] = 1;
        p[1] = 2 << 3;
        p[2..4].copy_from_slice(&((targets.len() * 32) as u16).to_be_bytes());
        p[8..12].copy_from_slice(&((segs.len() * 28) as u32).to_be_bytes());
        for t in targets {
            let mut d = [0u8; 32];
            d[0] = 0xE4;
            d[4] = 1;
            d[5] = 3;
            d[7] = 16;
            d[8..24].copy_from_slice(t);
            d[30] = 2; // block size 512
            p.extend_from_slice(&d);
        }
        for s in segs {
            let mut d = [0u8; 28];
            d[0] = 0x02;
            d[2..4].copy_from_slice(&0x18u16.to_be_bytes());
            d[4..6].copy_from_slice(&s.src.to_be_bytes());
            d[6..8].copy_from_slice(&s.dst.to_be_bytes());
            d[10..12].copy_from_slice(&(s.blocks as u16).to_be_bytes());
            d[12..20].copy_from_slice(&s.src_lba.to_be_bytes());
            d[20..28].copy_from_slice(&s.dst_lba.to_be_bytes());
            p.extend_from_slice(&d);
        }
        let n = (p.len() as i32 + extra_len) as usize;
        p.resize(n, 0);
        p
    }

    const SEG: Segment = Segment {
        src: 0,
        dst: 0,
        blocks: 2048,
        src_lba: 0,
        dst_lba: 4096,
    };

    #[test]
    fn esxi_style_list_parses() {
        let c = parse(&list(&[[0x60; 16]], &[SEG], 0)).unwrap();
        assert_eq!(c.targets, vec![vec![0x60; 16]]);
        assert_eq!(c.segments, vec![SEG]);
        assert!(!c.hold, "LIST ID USAGE 2 discards the status");
    }

    #[test]
    fn limits_and_types_answer_the_spc_sense() {
        let asc = |r: Result<CopyList, Sense>| r.unwrap_err().asc;
        assert_eq!(
            asc(parse(&list(&[[0x60; 16]], &[SEG], -1))),
            Asc::PARAMETER_LIST_LENGTH_ERROR
        );
        assert_eq!(
            asc(parse(&list(&[[0x60; 16]; 3], &[SEG], 0))),
            Asc(0x26, 0x06)
        );
        assert_eq!(
            asc(parse(&list(&[[0x60; 16]], &[SEG, SEG], 0))),
            Asc(0x26, 0x08)
        );
        let mut bad = list(&[[0x60; 16]], &[SEG], 0);
        bad[16] = 0xE0;
        assert_eq!(asc(parse(&bad)), Asc(0x26, 0x07));
        let mut bad = list(&[[0x60; 16]], &[SEG], 0);
        bad[48] = 0x03;
        assert_eq!(asc(parse(&bad)), Asc(0x26, 0x09));
    }

    #[test]
    fn operating_parameters_report_the_limits() {
        let v = operating_parameters();
        assert_eq!(
            u32::from_be_bytes([v[0], v[1], v[2], v[3]]) as usize,
            v.len() - 4
        );
        assert_eq!(u16::from_be_bytes([v[8], v[9]]), MAX_TARGET_DESCRIPTORS);
        assert_eq!(u16::from_be_bytes([v[10], v[11]]), MAX_SEGMENT_DESCRIPTORS);
    }
}
