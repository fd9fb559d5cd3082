//! A backing file's allocation: blocking changes for the threads that work outside the
//! io_uring cores (the secondary's apply, SANITIZE): deallocate (punch) or zero a range;
//! and where the file holds data (SEEK_DATA / SEEK_HOLE).

use std::fs::File;
use std::os::fd::AsRawFd;

/// Deallocates `[offset, offset + len)`: it reads as zeros and takes no blocks (thin).
pub fn punch(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    fallocate(
        f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Zeroes `[offset, offset + len)`, keeping (or allocating) its blocks.
pub fn zero_range(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    fallocate(
        f,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

fn fallocate(f: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    let (offset, len) = match (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
        (Ok(o), Ok(l)) => (o, l),
        _ => return Err(std::io::ErrorKind::InvalidInput.into()),
    };
    // SAFETY: fallocate on a valid open fd owned by `f`; no memory is passed.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset, len) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The next offset at or after `offset` in a data (`data = true`) or hole region of `f`, or
/// `None` past the end: SEEK_DATA / SEEK_HOLE. Uses no file position that a read or write
/// relies on (every I/O here is positioned), so any fd of the file will do.
pub fn seek(f: &File, offset: u64, data: bool) -> Option<u64> {
    let whence = if data {
        libc::SEEK_DATA
    } else {
        libc::SEEK_HOLE
    };
    let offset = libc::off_t::try_from(offset).ok()?;
    // SAFETY: lseek on a valid fd owned by `f`; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset, whence) };
    u64::try_from(r).ok()
}

/// The extents of `f` below `size` that hold data, as `(offset, len)`, in order.
pub fn data_extents(f: &File, size: u64) -> DataExtents<'_> {
    DataExtents { f, pos: 0, size }
}

/// See [`data_extents`].
pub struct DataExtents<'a> {
    f: &'a File,
    pos: u64,
    size: u64,
}

impl Iterator for DataExtents<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let start = seek(self.f, self.pos, true).filter(|&s| s < self.size)?;
        let end = seek(self.f, start, false)
            .unwrap_or(self.size)
            .min(self.size);
        if end <= start {
            // A file system that answers nonsense: stop rather than loop.
            self.pos = self.size;
            return None;
        }
        self.pos = end;
        Some((start, end - start))
    }
}
