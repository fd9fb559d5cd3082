//! A snapshot's clone made before the cut, while writes go on, so that the cut's hold does
//! not last as long as cloning the whole file does.
//!
//! Why: XFS clones a file extent by extent and locks it meanwhile; a LUN fragmented by
//! scattered writes after earlier snapshots (87,580 extents after 53K random 4 KiB writes)
//! took 0.8-1.4 s to clone, all of it with writes held (docs/performance.md, 2026-12-08).
//! Here the clone is made piece by piece (FICLONERANGE, each piece locking the file only
//! for its own extents) while every write released meanwhile is noted by the LUN's range
//! lock; passes clone again what was written, until little is left. Under the hold the cut
//! clones only what was written since the last pass ([`finish`]) and names the file.
//! Anything that goes wrong leaves no staging: the cut then clones the whole file under its
//! hold, as it always did.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::lun::Lun;
use crate::snapshot::reflink::clone_range;

/// Bytes cloned per call while staging: each call locks the file (reads and writes wait
/// in the kernel) for as long as cloning its extents takes, so pieces are small (8 MiB of
/// a file fragmented to 87,580 extents per GiB: about 700 extents, milliseconds).
const PIECE_BYTES: u64 = 8 << 20;
/// Extents cloned per call at most while staging: XFS's clone time, and so the pause it
/// causes, goes with the extents a piece holds, not its bytes (a piece of a file fragmented
/// by random 4 KiB writes holds hundreds in 8 MiB; of a file written sequentially, one).
const PIECE_EXTENTS: usize = 256;
/// Passes over what was written during the previous one, at most.
const CATCH_UP_PASSES: usize = 4;
/// Stop catching up once no more ranges than this were written during a pass: the hold
/// clones them (a few thousand single-block clones take milliseconds).
const FINAL_RANGES_MAX: usize = 1024;

/// The staging file of `lun`: beside its snapshots' clones.
pub fn staging_path(lun: &Lun) -> PathBuf {
    crate::snapshot::store::snapshot_dir(&lun.path).join("staging.img")
}

/// Clones `lun` into its staging file while writes go on (see the module docs). On
/// failure nothing is staged.
pub fn stage(lun: &Lun) -> Result<(), String> {
    let r = stage_inner(lun);
    if r.is_err() {
        drop_staging(lun);
    }
    r
}

fn stage_inner(lun: &Lun) -> Result<(), String> {
    let started = std::time::Instant::now();
    let live = File::open(&lun.path).map_err(|e| e.to_string())?;
    let size = lun.size_bytes();
    let path = staging_path(lun);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    // Before the first piece is cloned: every write released from here is noted.
    lun.ranges.track_writes();
    let dest = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    dest.set_len(size)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // Mapped once, before: writes meanwhile only add extents here and there. Without a
    // map (no FIEMAP), pieces are cut by bytes alone.
    let starts = crate::disk::fiemap::extent_starts(&live, size).unwrap_or_default();
    let planned = pieces(&starts, size);
    for &(off, len) in &planned {
        clone_piece(&live, &dest, off, len, size)?;
    }
    // Written out now, while writes go on: the hold's own sync then has little left.
    dest.sync_all()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let whole_ms = started.elapsed().as_millis();
    let mut passes = 0;
    for _ in 0..CATCH_UP_PASSES {
        if lun.ranges.written_count() <= FINAL_RANGES_MAX {
            break;
        }
        let ranges = lun
            .ranges
            .take_written()
            .ok_or("too many writes during staging")?;
        clone_ranges(lun, &live, &dest, &ranges, size)?;
        passes += 1;
    }
    tracing::info!(lun = %lun.path.display(), pieces = planned.len(), extents = starts.len(), whole_ms, passes, total_ms = started.elapsed().as_millis(), left = lun.ranges.written_count(), "snapshot clone staged");
    Ok(())
}

/// The pieces `(offset, length)` staging clones, in order, covering `[0, size)`: at most
/// [`PIECE_BYTES`] each, and ended early before the extent that would make one hold more
/// than [`PIECE_EXTENTS`] (`starts`: where the file's extents start, ascending; extents
/// start on file-system blocks, so the pieces stay aligned as FICLONERANGE wants).
fn pieces(starts: &[u64], size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let mut end = off + PIECE_BYTES.min(size - off);
        let first = starts.partition_point(|&s| s < off);
        let within = starts[first..].partition_point(|&s| s < end);
        if within > PIECE_EXTENTS {
            // Strictly above `off`: the starts ascend and the first is at or above it.
            end = starts[first + PIECE_EXTENTS];
        }
        debug_assert!(end > off);
        out.push((off, end - off));
        off = end;
    }
    out
}

/// Under the cut's hold (no write in flight): clones again what was written since the last
/// pass, makes the staging file durable and returns its path; `None` when nothing usable is
/// staged (the caller clones the whole file).
pub fn finish(lun: &Lun) -> Option<PathBuf> {
    if !lun.ranges.tracking() {
        return None;
    }
    let r = finish_inner(lun);
    lun.ranges.stop_tracking();
    match r {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(lun = %lun.path.display(), error = %e, "the staged clone could not be finished: the cut clones the whole file");
            drop_staging(lun);
            None
        }
    }
}

fn finish_inner(lun: &Lun) -> Result<PathBuf, String> {
    let path = staging_path(lun);
    let live = File::open(&lun.path).map_err(|e| e.to_string())?;
    let dest = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let size = lun.size_bytes();
    let staged = dest.metadata().map_err(|e| e.to_string())?.len();
    if staged != size {
        return Err(format!(
            "the LUN is {size} bytes, the staging file {staged} (grown meanwhile)"
        ));
    }
    let ranges = lun
        .ranges
        .take_written()
        .ok_or("too many writes since staging")?;
    clone_ranges(lun, &live, &dest, &ranges, size)?;
    tracing::info!(lun = %lun.path.display(), ranges = ranges.len(), "staged clone finished under the hold");
    dest.sync_all()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// Forgets any staging of `lun` (a cut that ended without using it).
pub fn drop_staging(lun: &Lun) {
    lun.ranges.stop_tracking();
    let _ = std::fs::remove_file(staging_path(lun));
}

/// Clones the block ranges `ranges` (sorted, merged) of `live` into `dest` again, rounded
/// out to the file system's block.
fn clone_ranges(
    lun: &Lun,
    live: &File,
    dest: &File,
    ranges: &[(u64, u64)],
    size: u64,
) -> Result<(), String> {
    let fs_block = live
        .metadata()
        .map(|m| m.blksize().max(512))
        .unwrap_or(4096);
    let bs = u64::from(lun.block_size);
    let mut last_end = 0u64;
    for &(s, e) in ranges {
        let start = (s.saturating_mul(bs) / fs_block * fs_block).max(last_end);
        let end = e
            .saturating_mul(bs)
            .div_ceil(fs_block)
            .saturating_mul(fs_block)
            .min(size);
        if start >= end {
            continue;
        }
        clone_piece(live, dest, start, end - start, size)?;
        last_end = end;
    }
    Ok(())
}

/// Clones `[off, off + len)`; a piece that ends at the file's end is asked "to the end"
/// (FICLONERANGE wants block-aligned lengths otherwise). The piece's dirty pages are
/// written back first, without the file's lock: the clone writes back what is still dirty
/// while it holds the lock, and under random writes that was most of the pause it caused
/// (a 307 ms stall at 16 MiB pieces without this step, 2026-12-08).
fn clone_piece(live: &File, dest: &File, off: u64, len: u64, size: u64) -> Result<(), String> {
    let len = if off + len >= size { 0 } else { len };
    write_back(live, off, len);
    clone_range(live, dest, off, len).map_err(|e| format!("cloning bytes at {off}: {e}"))
}

/// Writes back the dirty pages of `[off, off + len)` (`len` 0: to the end) and waits for
/// them. Not a durability step (the clone's own sync is): only a shorter clone. A failure
/// only leaves the clone more to write back.
fn write_back(f: &File, off: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: sync_file_range reads and writes no memory of ours; the fd is open for the
    // duration of the call.
    let _ = unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            flags,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pieces cover the file once, in order, each within both bounds.
    fn check(starts: &[u64], size: u64) -> Vec<(u64, u64)> {
        let p = pieces(starts, size);
        let mut at = 0;
        for &(off, len) in &p {
            assert_eq!(off, at, "a gap or an overlap at {off}");
            assert!(len > 0 && len <= PIECE_BYTES);
            let held = starts
                .iter()
                .filter(|&&s| s >= off && s < off + len)
                .count();
            assert!(
                held <= PIECE_EXTENTS,
                "{held} extents in the piece at {off}"
            );
            at = off + len;
        }
        assert_eq!(at, size);
        p
    }

    #[test]
    fn a_sequential_file_is_cloned_in_pieces_of_the_byte_bound() {
        let size = 100 << 20;
        let p = check(&[0, 40 << 20], size);
        assert_eq!(p.len(), (size / PIECE_BYTES + 1) as usize);
        // No map (FIEMAP unsupported): the same.
        assert_eq!(check(&[], size), p);
    }

    #[test]
    fn a_fragmented_file_is_cloned_in_pieces_of_the_extent_bound() {
        // One extent every 8 KiB: 1,024 extents per 8 MiB.
        let size = 64 << 20;
        let starts: Vec<u64> = (0..size / 8192).map(|i| i * 8192).collect();
        let p = check(&starts, size);
        assert!(p.iter().all(|&(_, len)| len == PIECE_EXTENTS as u64 * 8192));
        // Fragmented in one place only: small pieces there, large ones elsewhere.
        let mut starts: Vec<u64> = (0..2048).map(|i| (16 << 20) + i * 4096).collect();
        starts.insert(0, 0);
        let p = check(&starts, size);
        assert!(p.iter().any(|&(_, len)| len == PIECE_BYTES));
        assert!(p.iter().any(|&(_, len)| len <= PIECE_EXTENTS as u64 * 4096));
    }
}
