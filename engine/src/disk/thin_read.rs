//! Reads that skip what a LUN's allocation map says is a hole (alloc_map.rs): the chunks
//! that hold no data are zero-filled in the task's buffer, and only the others are read
//! from the file, one run after the other. Every read a core issues passes here (READ's
//! data that is not all hole, VERIFY's medium, COMPARE AND WRITE and ORWRITE, EXTENDED
//! COPY's source), so the SCSI layer still sees one completion of the whole length.

use io_uring::{opcode, squeue, types};

use super::alloc_map::AllocMap;

/// How a read of `[offset, offset + len)` is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPlan {
    /// All of it from the file (the common case: data, one map lookup).
    File,
    /// All of it is zeros: no file I/O.
    Zeros,
    /// Holes and data both: a [`SplitRead`].
    Split,
}

/// Chooses how to serve a read.
pub fn plan(map: &AllocMap, offset: u64, len: u32) -> ReadPlan {
    let len = u64::from(len);
    let hole = map.hole_len(offset, len);
    if hole >= len {
        ReadPlan::Zeros
    } else if hole == 0 && map.data_len(offset, len) >= len {
        ReadPlan::File
    } else {
        ReadPlan::Split
    }
}

/// One read served in pieces: `pos` bytes of it are done.
#[derive(Debug)]
pub struct SplitRead {
    /// The connection slot and task it belongs to (the reactor's keys).
    pub slot: usize,
    pub task: u32,
    /// Registry index of the LUN read.
    pub lun: usize,
    offset: u64,
    buf_off: u32,
    len: u32,
    pos: u32,
}

/// The next file read of a split read: `len` bytes at `offset` into the task's buffer at
/// `buf_off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileRead {
    pub offset: u64,
    pub buf_off: u32,
    pub len: u32,
}

impl SplitRead {
    pub fn new(slot: usize, task: u32, lun: usize, offset: u64, buf_off: u32, len: u32) -> Self {
        SplitRead {
            slot,
            task,
            lun,
            offset,
            buf_off,
            len,
            pos: 0,
        }
    }

    /// The whole read's length: what its single completion reports.
    pub fn total_len(&self) -> u32 {
        self.len
    }

    /// Zero-fills the hole from the current position on (through `zero(buf_off, len)`)
    /// and returns the next run to read from the file, or `None` once all is done. The
    /// map is asked again at every step: a chunk written meanwhile is read from the file
    /// (either answer is right for a read that races a write).
    pub fn advance(&mut self, map: &AllocMap, mut zero: impl FnMut(u32, u32)) -> Option<FileRead> {
        while self.pos < self.len {
            let at = self.offset + u64::from(self.pos);
            let rest = self.len - self.pos;
            let hole = map.hole_len(at, u64::from(rest)) as u32;
            if hole > 0 {
                zero(self.buf_off + self.pos, hole);
                self.pos += hole;
                continue;
            }
            // Never zero bytes (a run past the map's end reads from the file, which then
            // answers as it would have).
            let data = (map.data_len(at, u64::from(rest)) as u32).clamp(1, rest);
            return Some(FileRead {
                offset: at,
                buf_off: self.buf_off + self.pos,
                len: data,
            });
        }
        None
    }

    /// `n` bytes of the last file read arrived (fewer than asked is a short read: the
    /// rest is asked again by the next [`SplitRead::advance`]).
    pub fn file_read_done(&mut self, n: u32) {
        debug_assert!(n > 0 && self.pos + n <= self.len, "a read within its range");
        self.pos = (self.pos + n).min(self.len);
    }
}

/// Zero-fills `len` bytes at `buf_off` of a task buffer at `base` of `cap` bytes.
///
/// # Safety
/// `base..base + cap` is one writable allocation that nothing else reads or writes while
/// the returned closure is used.
pub unsafe fn zero_in(base: *mut u8, cap: usize) -> impl FnMut(u32, u32) {
    move |buf_off, len| {
        assert!(
            buf_off as usize + len as usize <= cap,
            "zeros beyond the buffer"
        );
        // SAFETY: buf_off + len <= cap (asserted), and base..base + cap is writable and
        // ours (the caller's contract).
        unsafe { std::ptr::write_bytes(base.add(buf_off as usize), 0, len as usize) };
    }
}

/// The SQE of one file read of a split read, into the task buffer at `base` of `cap`
/// bytes, tagged `user_data`.
///
/// # Safety
/// `base..base + cap` is one writable allocation that stays valid, and is neither read
/// nor written by anything else, until the read's completion arrives.
pub unsafe fn sqe(
    file: types::Fixed,
    base: *mut u8,
    cap: usize,
    f: FileRead,
    user_data: u64,
) -> squeue::Entry {
    assert!(
        f.buf_off as usize + f.len as usize <= cap,
        "a read part beyond its buffer"
    );
    // SAFETY: buf_off + len <= cap (asserted): the pointer stays inside the allocation.
    let ptr = unsafe { base.add(f.buf_off as usize) };
    opcode::Read::new(file, ptr, f.len)
        .offset(f.offset)
        .build()
        .user_data(user_data)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1024;

    #[test]
    fn holes_are_zeroed_and_only_data_runs_are_read() {
        let map = AllocMap::new(64 * K);
        map.mark_data(8 * K, 4 * K); // chunk 2
        map.mark_data(20 * K, 8 * K); // chunks 5 and 6
        assert_eq!(plan(&map, 0, 8 * 1024), ReadPlan::Zeros);
        assert_eq!(plan(&map, 8 * K, 4 * 1024), ReadPlan::File);
        assert_eq!(plan(&map, 4 * K, 28 * 1024), ReadPlan::Split);
        // 4 KiB .. 32 KiB into the buffer at 512.
        let mut r = SplitRead::new(0, 1, 0, 4 * K, 512, 28 * 1024);
        let mut zeroed = Vec::new();
        let first = r.advance(&map, |b, l| zeroed.push((b, l)));
        assert_eq!(zeroed, vec![(512, 4096)]);
        assert_eq!(
            first,
            Some(FileRead {
                offset: 8 * K,
                buf_off: 512 + 4096,
                len: 4096
            })
        );
        // A short read asks for the rest of the run again.
        r.file_read_done(1000);
        let again = r.advance(&map, |_, _| panic!("no hole before the rest of the run"));
        assert_eq!(again.map(|f| (f.offset, f.len)), Some((8 * K + 1000, 3096)));
        r.file_read_done(3096);
        zeroed.clear();
        let second = r.advance(&map, |b, l| zeroed.push((b, l)));
        assert_eq!(zeroed, vec![(512 + 8192, 8192)]);
        assert_eq!(second.map(|f| (f.offset, f.len)), Some((20 * K, 8192)));
        r.file_read_done(8192);
        zeroed.clear();
        assert_eq!(r.advance(&map, |b, l| zeroed.push((b, l))), None);
        assert_eq!(zeroed, vec![(512 + 24576, 4096)], "the tail hole");
        assert_eq!(r.total_len(), 28 * 1024);
    }

    #[test]
    fn a_chunk_written_during_the_read_is_read_from_the_file() {
        let map = AllocMap::new(64 * K);
        map.mark_data(0, 4 * K);
        let mut r = SplitRead::new(0, 1, 0, 0, 0, 16 * 1024);
        let f = r.advance(&map, |_, _| {}).expect("data first");
        assert_eq!(f.len, 4096);
        map.mark_data(4 * K, 4 * K);
        r.file_read_done(4096);
        let f = r.advance(&map, |_, _| panic!("no longer a hole"));
        assert_eq!(f.map(|f| (f.offset, f.len)), Some((4 * K, 4096)));
    }
}
