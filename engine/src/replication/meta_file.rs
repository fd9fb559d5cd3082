//! The metadata file beside each backing file, and the running marker that tells a crash
//! from a clean stop (and a machine restart from a process crash).

use super::*;

/// This boot's id (Linux: a random UUID per boot); empty when unknown.
pub(super) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Whether the running marker was written during this boot (an unknown boot counts as
/// another: the safe answer, a full resync).
pub(super) fn same_boot(marker: &std::path::Path) -> bool {
    let now = boot_id();
    !now.is_empty() && std::fs::read_to_string(marker).is_ok_and(|then| then.trim() == now)
}

/// `lun0.img.running`: present while a daemon serves the LUN with replication.
pub(super) fn running_marker(backing: &std::path::Path) -> PathBuf {
    let mut p = backing.as_os_str().to_owned();
    p.push(".running");
    PathBuf::from(p)
}

/// Replaces the metadata file atomically: the new bytes go into `<path>.tmp`, which is
/// synced and then exchanged with `path` (renameat2 RENAME_EXCHANGE), so the old copy
/// becomes the next `.tmp`. Why an exchange and an overwrite in place rather than
/// create-truncate-rename: both files keep their blocks, so once they exist no metadata
/// write needs new blocks. On a thin LUN whose file system filled up, the dirty bitmap
/// and the write-intent log must still persist (or writes to new regions would wait
/// forever); data writes then fail with SPACE ALLOCATION FAILED, as without a peer.
pub(super) fn write_meta(path: &std::path::Path, m: &Meta) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileExt;
    let mut bytes = Vec::new();
    m.encode(&mut bytes);
    let tmp = path.with_extension("meta.tmp");
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&tmp)?;
        f.write_all_at(&bytes, 0)?;
        if f.metadata()?.len() > bytes.len() as u64 {
            f.set_len(bytes.len() as u64)?;
        }
        f.sync_all()?;
    }
    let c = |p: &std::path::Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (from, to) = (c(&tmp)?, c(path)?);
    // SAFETY: both are NUL-terminated paths that live across the call; renameat2 only
    // reads them.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // No metadata yet (the first write), or a file system without exchange.
            Some(libc::ENOENT) | Some(libc::EINVAL) => std::fs::rename(&tmp, path)?,
            _ => return Err(e),
        }
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    File::open(dir)?.sync_all()?;
    Ok(())
}
