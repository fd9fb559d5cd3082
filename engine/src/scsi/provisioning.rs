//! Logical block provisioning (SBC-3 section 4.7): UNMAP parameter lists and GET LBA
//! STATUS. WRITE SAME's punch or zeroing runs as a `Stage::Falloc` (data_out.rs).

use proto::scsi::sense::Sense;

use super::{check_range, lun_info};
use crate::lun::Lun;

/// GET LBA STATUS descriptors starting at `lba`: chunks the allocation map holds for holes
/// are deallocated without asking the file system (disk/alloc_map.rs); elsewhere
/// SEEK_DATA / SEEK_HOLE give the exact extents.
pub(super) fn lba_status(lun: &Lun, lba: u64, alloc_len: u32) -> Vec<u8> {
    const MAX_DESCRIPTORS: usize = 64;
    let bs = lun.block_size as u64;
    let size = lun.size_bytes();
    let room = ((alloc_len as usize).saturating_sub(8) / 16).clamp(1, MAX_DESCRIPTORS);
    let mut descs: Vec<(u64, u64, u8)> = Vec::new();
    let mut pos = lba * bs;
    while pos < size && descs.len() < room {
        // Past the map's end of a LUN grown online, the file alone knows (alloc_map.rs).
        let past_map =
            (lun.alloc.covered_bytes() < size).then(|| lun.alloc.covered_bytes().max(pos));
        let data_at = match lun.alloc.next_data(pos).or(past_map) {
            Some(from) => lun.seek(from, true).unwrap_or(size).min(size),
            None => size,
        };
        let (end, status) = if data_at <= pos {
            (lun.seek(pos, false).unwrap_or(size).min(size), 0u8)
        } else {
            (data_at, 1u8)
        };
        // Round to whole blocks: a block partly in data counts as mapped.
        let start_lba = pos / bs;
        let mut end_lba = if status == 0 {
            end.div_ceil(bs)
        } else {
            end / bs
        };
        if end_lba <= start_lba {
            end_lba = start_lba + 1;
        }
        descs.push((start_lba, end_lba - start_lba, status));
        pos = end_lba * bs;
    }
    let mut v = vec![0u8; 8];
    v[0..4].copy_from_slice(&((4 + 16 * descs.len()) as u32).to_be_bytes());
    for (l, n, st) in descs {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&l.to_be_bytes());
        d[8..12].copy_from_slice(&(n.min(u32::MAX as u64) as u32).to_be_bytes());
        d[12] = st;
        v.extend_from_slice(&d);
    }
    v
}

/// UNMAP parameter list (SBC-3 section 5.28.2) to block ranges.
pub(super) fn parse_unmap(lun: &Lun, p: &[u8]) -> Result<Vec<(u64, u64)>, Sense> {
    let i = lun_info(lun);
    if p.len() < 8 {
        return Err(Sense::parameter_list_length_error());
    }
    let desc_len = u16::from_be_bytes([p[2], p[3]]) as usize;
    let body = &p[8..];
    let n = desc_len.min(body.len()) / 16;
    if n > i.max_unmap_descriptors as usize {
        return Err(Sense::invalid_field_in_parameter_list(2, None));
    }
    let mut out = Vec::with_capacity(n);
    let mut total: u64 = 0;
    for d in body.chunks_exact(16).take(n) {
        let mut l = [0u8; 8];
        l.copy_from_slice(&d[0..8]);
        let lba = u64::from_be_bytes(l);
        let blocks = u32::from_be_bytes([d[8], d[9], d[10], d[11]]) as u64;
        check_range(lun, lba, blocks)?;
        total += blocks;
        if blocks > 0 {
            out.push((lba, blocks));
        }
    }
    if total > i.max_unmap_blocks as u64 {
        return Err(Sense::invalid_field_in_parameter_list(8, None));
    }
    Ok(out)
}
