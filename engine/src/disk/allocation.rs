//! Blocking changes to a backing file's allocation, for the threads that work outside the
//! io_uring cores (the secondary's apply, SANITIZE): deallocate (punch) or zero a range.

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
