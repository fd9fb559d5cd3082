//! Whole-file clones that share blocks (FICLONE: XFS with reflink, btrfs): the snapshot
//! costs metadata only, whatever the LUN's size, and a later write to either file moves
//! only the block it writes.

use std::fs::File;
use std::os::fd::AsRawFd;

/// `_IOW(0x94, 9, int)` from linux/fs.h.
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Why a clone was not made.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// The file system cannot share blocks between files (ext4, tmpfs...).
    #[error("the file system holding the LUN cannot clone files (FICLONE: {0}); snapshots need XFS (mkfs.xfs -m reflink=1, the default) or btrfs under the LUN's directory (docs/snapshots.md)")]
    Unsupported(std::io::Error),
    /// Another failure (no space for the metadata, an I/O error...).
    #[error("cloning failed: {0}")]
    Io(std::io::Error),
}

/// Makes `dest` (open for writing, on the same file system) a clone of all of `src`: its
/// size and every byte. Dirty pages of `src` are written back first by the kernel, so the
/// clone holds every write completed before the call.
pub fn clone_file(src: &File, dest: &File) -> Result<(), CloneError> {
    // SAFETY: FICLONE takes the source fd as its integer argument and reads no memory of
    // ours; both fds are open for the duration of the call.
    let r = unsafe { libc::ioctl(dest.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    Err(match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EXDEV | libc::EINVAL) => {
            CloneError::Unsupported(e)
        }
        _ => CloneError::Io(e),
    })
}

/// `_IOW(0x94, 13, struct file_clone_range)` from linux/fs.h.
const FICLONERANGE: libc::c_ulong = 0x4020_940D;

#[repr(C)]
struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

/// Makes `[offset, offset + len)` of `dest` share the blocks of the same range of `src`
/// (holes included). `offset` and `len` must be multiples of the file system's block size,
/// except a `len` of 0, which means "to the end of `src`".
pub fn clone_range(src: &File, dest: &File, offset: u64, len: u64) -> Result<(), CloneError> {
    let arg = FileCloneRange {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset: offset,
        src_length: len,
        dest_offset: offset,
    };
    // SAFETY: FICLONERANGE reads one `struct file_clone_range` (our repr(C) copy of it)
    // and writes no memory of ours; both fds are open for the duration of the call.
    let r = unsafe { libc::ioctl(dest.as_raw_fd(), FICLONERANGE as _, &arg) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    Err(match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EXDEV) => CloneError::Unsupported(e),
        _ => CloneError::Io(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// On this machine's ext4 (and tmpfs) the clone is refused as unsupported, never as a
    /// generic failure: that is what tells the operator to move the LUN to XFS.
    #[test]
    fn a_file_system_without_reflink_says_so() {
        let dir = std::env::temp_dir().join(format!("twinsan-reflink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        File::create(dir.join("a"))
            .unwrap()
            .write_all(b"data")
            .unwrap();
        // The source is read, so it is opened for reading (EBADF otherwise).
        let a = File::open(dir.join("a")).unwrap();
        let b = File::create(dir.join("b")).unwrap();
        match clone_file(&a, &b) {
            Ok(()) => {
                // A reflink file system: the clone holds the bytes.
                assert_eq!(std::fs::read(dir.join("b")).unwrap(), b"data");
            }
            Err(CloneError::Unsupported(_)) => {}
            Err(e) => panic!("{e}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
