//! Buffered writes done inline on the core thread instead of through io_uring.
//!
//! Why: ext4 has no non-blocking buffered write (`RWF_NOWAIT` answers EOPNOTSUPP), so
//! io_uring punts every buffered write to an io-wq worker thread: two context switches per
//! write (core thread to worker and back), which measured as most of the daemon's CPU per
//! 4 KiB write (`perf`: over half the samples in `finish_task_switch`, under 5 % copying
//! the data). Copying 4-128 KiB into the page cache on the core thread costs a few
//! microseconds instead.
//!
//! The risk is blocking the core thread, and with it every connection it owns: a buffered
//! write sleeps when the kernel throttles dirty pages (`balance_dirty_pages`, pauses up to
//! 200 ms) or waits for a page under writeback. So each inline write is timed; one that took
//! longer than [`SLOW_WRITE_US`] sends the next [`BACKOFF_MS`] of writes back through
//! io_uring, where a throttled worker stalls only its own command. Only plain writes in
//! `writeback` cache mode come here: FUA writes and flushes wait for the disk by design,
//! and O_DIRECT writes to allocated blocks are already asynchronous in io_uring.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::config::CacheMode;

/// A write slower than this was throttled or waited for I/O: the page cache copy itself
/// takes microseconds even for the largest command (MAX_XFER_BYTES).
pub const SLOW_WRITE_US: u64 = 2_000;
/// Writes reach the page cache in pieces of at most this size. Why: the page cache sizes a
/// new folio after the write that creates it, and on Linux 6.16 to 6.18 ext4 walks every
/// buffer head of a folio on each write into it (fixed upstream by "ext4: avoid tail walks
/// for cached large-folio writes"), so after one 1 MiB write a 4 KiB overwrite of that
/// range cost 18 µs of CPU instead of 2 (measured: 46K vs 320K IOPS at queue depth 32).
/// 16 KiB pieces bound that walk to four buffer heads for a few extra system calls on
/// large writes.
pub const CHUNK_BYTES: u32 = 16 << 10;
/// How long writes go through io_uring after a slow one.
pub const BACKOFF_MS: u64 = 100;

/// `write_all_at` in [`CHUNK_BYTES`] pieces, for the blocking writers (the secondary's
/// apply threads, resync, SANITIZE) so that they too leave small folios behind.
pub fn write_all_chunked(f: &std::fs::File, data: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut off = offset;
    for c in data.chunks(CHUNK_BYTES as usize) {
        f.write_all_at(c, off)?;
        off += c.len() as u64;
    }
    Ok(())
}

/// pwrite(2) of `len` bytes at `offset` in [`CHUNK_BYTES`] pieces; returns what an io_uring
/// CQE would: the bytes written (short if a piece was short; the caller writes the rest, or
/// meets the error, next time), or -errno if nothing was written.
///
/// # Safety
/// `ptr..ptr + len` must be readable memory that stays valid for the call, and `fd` an open
/// file descriptor.
pub unsafe fn pwrite_chunked(fd: RawFd, ptr: *const u8, len: u32, offset: u64) -> i32 {
    let Ok(off) = libc::off_t::try_from(offset) else {
        return -libc::EINVAL;
    };
    let mut done: u32 = 0;
    let mut res = 0;
    while done < len {
        let n = (len - done).min(CHUNK_BYTES);
        // SAFETY: done + n <= len, so the chunk lies inside the caller's buffer.
        let w = unsafe {
            libc::pwrite(
                fd,
                ptr.add(done as usize).cast(),
                n as usize,
                off + done as libc::off_t,
            )
        };
        if w < 0 {
            res = -std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            break;
        }
        // 0 <= w <= n: a short write ends this call like a short CQE would.
        done += w as u32;
        if (w as u32) < n {
            break;
        }
    }
    if done > 0 {
        done as i32
    } else {
        res
    }
}

#[derive(Debug)]
pub struct InlineWrites {
    /// Writes go through io_uring until then.
    backoff_until: Option<Instant>,
    /// Counters for status and tests: inline writes, and slow ones that started a backoff.
    pub inline_count: u64,
    pub slow_count: u64,
}

impl Default for InlineWrites {
    fn default() -> Self {
        Self::new()
    }
}

impl InlineWrites {
    pub fn new() -> Self {
        InlineWrites {
            backoff_until: None,
            inline_count: 0,
            slow_count: 0,
        }
    }

    /// Whether a plain write to a LUN in `cache` mode should be done inline now.
    pub fn allowed(&self, cache: CacheMode) -> bool {
        cache == CacheMode::Writeback
            && self
                .backoff_until
                .is_none_or(|until| Instant::now() >= until)
    }

    /// pwrite(2) of `len` bytes at `offset`; returns what an io_uring CQE would (bytes
    /// written, or -errno), and starts a backoff if it was slow.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be readable memory that stays valid for the call, and `fd` an
    /// open file descriptor.
    pub unsafe fn pwrite(&mut self, fd: RawFd, ptr: *const u8, len: u32, offset: u64) -> i32 {
        let started = Instant::now();
        // SAFETY: the caller's contract is ours.
        let res = unsafe { pwrite_chunked(fd, ptr, len, offset) };
        self.inline_count += 1;
        let took = started.elapsed();
        if took > Duration::from_micros(SLOW_WRITE_US) {
            self.slow_count += 1;
            self.backoff_until = Some(Instant::now() + Duration::from_millis(BACKOFF_MS));
            tracing::debug!(
                took_us = took.as_micros() as u64,
                "slow inline write: back to io_uring for a while"
            );
        }
        res
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::path::PathBuf;

    /// A fresh empty file (read-write) in a scratch directory of its own.
    pub(crate) fn scratch_file(tag: &str) -> (PathBuf, PathBuf, std::fs::File) {
        let dir = std::env::temp_dir().join(format!("twinsan-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (dir, path, f)
    }

    #[test]
    fn writes_land_and_errors_come_back_as_negative_errno() {
        let (dir, path, f) = scratch_file("inline");
        let mut w = InlineWrites::new();
        assert!(w.allowed(CacheMode::Writeback));
        assert!(!w.allowed(CacheMode::Direct));
        // More than two chunks, to cross the chunk boundaries.
        let data: Vec<u8> = (0..40960u32).map(|i| (i % 251) as u8).collect();
        // SAFETY: data outlives the call; f is open.
        let n = unsafe { w.pwrite(f.as_raw_fd(), data.as_ptr(), 40960, 4096) };
        assert_eq!(n, 40960);
        let mut back = Vec::new();
        std::fs::File::open(&path)
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back.len(), 4096 + 40960);
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert_eq!(&back[4096..], &data[..]);
        // A read-only fd: EBADF, as a CQE would carry it.
        let ro = std::fs::File::open(&path).unwrap();
        // SAFETY: as above.
        let e = unsafe { w.pwrite(ro.as_raw_fd(), data.as_ptr(), 512, 0) };
        assert_eq!(e, -libc::EBADF);
        assert_eq!(w.inline_count, 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_slow_write_sends_writes_back_to_io_uring_for_a_while() {
        let mut w = InlineWrites::new();
        w.backoff_until = Some(Instant::now() + Duration::from_millis(BACKOFF_MS));
        assert!(!w.allowed(CacheMode::Writeback));
        w.backoff_until = Some(Instant::now() - Duration::from_millis(1));
        assert!(w.allowed(CacheMode::Writeback));
    }
}
