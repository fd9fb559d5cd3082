//! Where a file's bytes are on the device (FS_IOC_FIEMAP), for a diff between two reflink
//! clones: a range both clones map to the same physical blocks is shared by the file
//! system, so its content is the same in both and need not be read (what makes a diff cost
//! the size of the change, not the data both snapshots hold).

use std::fs::File;
use std::os::fd::AsRawFd;

/// `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// Write the file's dirty pages back first, so delayed allocations have addresses.
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
/// Extents whose physical address says nothing reliable: unknown, delayed allocation,
/// encoded, encrypted, not block-aligned, inline in metadata, a packed tail.
const FIEMAP_EXTENT_ADDRESS_UNRELIABLE: u32 = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400;

/// Extents asked for per call.
const BATCH: usize = 256;
/// The most extents read for one file: beyond it the caller compares content instead
/// (a file this fragmented is better read than mapped: 32 bytes of memory per extent).
pub const EXTENTS_MAX: usize = 1 << 22;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct Request {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [RawExtent; BATCH],
}

/// One mapped extent whose address can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
    /// Allocated but never written (reads as zeros).
    pub unwritten: bool,
}

/// The extents of `f` in `[0, size)`, in logical order, leaving out those whose address
/// is unreliable. An error (FIEMAP unsupported, more than [`EXTENTS_MAX`]) means: compare.
pub fn extents(f: &File, size: u64) -> std::io::Result<Vec<Extent>> {
    extents_noting_unreliable(f, size).map(|(out, _)| out)
}

/// Whether `a` and `b` are known to hold the same bytes in `[0, size)` because the file
/// system maps them alike: every extent of either is shared by both (the same physical
/// bytes in the same written state), so holes are holes in both. True right after one was
/// cloned from the other; a write to either since (even of the same bytes) makes it false.
/// False too when it cannot tell (FIEMAP unsupported, an extent of unreliable address).
pub fn mapped_alike(a: &File, b: &File, size: u64) -> bool {
    let (Ok((ea, false)), Ok((eb, false))) = (
        extents_noting_unreliable(a, size),
        extents_noting_unreliable(b, size),
    ) else {
        return false;
    };
    let bytes = |e: &[Extent]| e.iter().map(|x| x.len).sum::<u64>();
    let both: u64 = shared(&ea, &eb).iter().map(|(s, e)| e - s).sum();
    both == bytes(&ea) && both == bytes(&eb)
}

/// [`extents`], and whether any extent was left out for its unreliable address.
fn extents_noting_unreliable(f: &File, size: u64) -> std::io::Result<(Vec<Extent>, bool)> {
    let mut unreliable = false;
    let mut out = Vec::new();
    walk(f, size, FIEMAP_FLAG_SYNC, |e| {
        unreliable |= e.flags & FIEMAP_EXTENT_ADDRESS_UNRELIABLE != 0;
        if e.flags & FIEMAP_EXTENT_ADDRESS_UNRELIABLE == 0 && e.length > 0 {
            out.push(Extent {
                logical: e.logical,
                physical: e.physical,
                len: e.length,
                unwritten: e.flags & FIEMAP_EXTENT_UNWRITTEN != 0,
            });
        }
        out.len() <= EXTENTS_MAX
    })?;
    Ok((out, unreliable))
}

/// Where `f`'s extents start in `[0, size)` (every extent, whatever its address says: the
/// count is what matters), without writing the file back first (so, unlike [`extents`],
/// it costs no I/O). Err beyond [`EXTENTS_MAX`].
pub fn extent_starts(f: &File, size: u64) -> std::io::Result<Vec<u64>> {
    let mut out = Vec::new();
    walk(f, size, 0, |e| {
        out.push(e.logical);
        out.len() <= EXTENTS_MAX
    })?;
    Ok(out)
}

/// Calls `each` for every extent of `f` in `[0, size)`, in logical order, asking FIEMAP
/// with `flags`, until `each` says stop (then Err: too many extents).
fn walk(
    f: &File,
    size: u64,
    flags: u32,
    mut each: impl FnMut(&RawExtent) -> bool,
) -> std::io::Result<()> {
    let mut start = 0u64;
    while start < size {
        let mut req = Request {
            start,
            length: size - start,
            flags,
            mapped_extents: 0,
            extent_count: BATCH as u32,
            reserved: 0,
            extents: [RawExtent::default(); BATCH],
        };
        // SAFETY: `req` is a `struct fiemap` followed by room for `extent_count` extents,
        // as the ioctl expects; the kernel writes at most that many, and the fd is open
        // for the whole call.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP as _, &mut req) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mapped = (req.mapped_extents as usize).min(BATCH);
        if mapped == 0 {
            break;
        }
        let mut last = false;
        for e in &req.extents[..mapped] {
            last |= e.flags & FIEMAP_EXTENT_LAST != 0;
            start = start.max(e.logical.saturating_add(e.length));
            if !each(e) {
                return Err(std::io::Error::other(format!(
                    "more than {EXTENTS_MAX} extents"
                )));
            }
        }
        if last {
            break;
        }
    }
    Ok(())
}

/// The byte ranges `[start, end)` where `a` and `b` (each in logical order) map the same
/// offsets to the same physical bytes in the same written state: their content is equal
/// there. Sorted, disjoint, adjacent ones merged.
pub fn shared(a: &[Extent], b: &[Extent]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (x, y) = (&a[i], &b[j]);
        let (x_end, y_end) = (x.logical + x.len, y.logical + y.len);
        let lo = x.logical.max(y.logical);
        let hi = x_end.min(y_end);
        // The same physical byte at `lo` in both: the whole overlap is the same blocks.
        let same = lo < hi
            && x.unwritten == y.unwritten
            && x.physical.checked_add(lo - x.logical) == y.physical.checked_add(lo - y.logical);
        if same {
            match out.last_mut() {
                Some(last) if last.1 == lo => last.1 = hi,
                _ => out.push((lo, hi)),
            }
        }
        if x_end <= y_end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(logical: u64, physical: u64, len: u64) -> Extent {
        Extent {
            logical,
            physical,
            len,
            unwritten: false,
        }
    }

    #[test]
    fn only_the_same_offsets_on_the_same_blocks_are_shared() {
        // a: [0, 100) at 1000, [100, 200) at 5000. b shares [0, 60), then was rewritten
        // [60, 100) elsewhere, and shares [100, 150) of a's second extent.
        let a = [e(0, 1000, 100), e(100, 5000, 100)];
        let b = [
            e(0, 1000, 60),
            e(60, 9000, 40),
            e(100, 5000, 50),
            e(150, 7000, 50),
        ];
        assert_eq!(shared(&a, &b), vec![(0, 60), (100, 150)]);
        // The same physical bytes at another offset are not the same content there.
        assert_eq!(shared(&[e(0, 1000, 100)], &[e(50, 1000, 100)]), vec![]);
        // Adjacent shared pieces merge.
        let b = [e(0, 1000, 40), e(40, 1040, 60)];
        assert_eq!(shared(&[e(0, 1000, 100)], &b), vec![(0, 100)]);
        // Unwritten in one, written in the other: different content.
        let mut u = e(0, 1000, 100);
        u.unwritten = true;
        assert_eq!(shared(&[u], &[e(0, 1000, 100)]), vec![]);
        assert_eq!(shared(&[], &b), vec![]);
    }
}
