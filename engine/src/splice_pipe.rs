//! Large write data moved from the socket to the file through a pipe (splice(2)), so that
//! the core thread never copies it.
//!
//! Why: for a large buffered write the data used to be copied twice, from the socket into
//! our receive buffer (on the core thread) and from there into the page cache (on the core,
//! or on the spill helper). `perf` on 128 KiB writes at queue depth 16 put the first copy at
//! about a third of the core thread's time (`_copy_to_iter`), on the CPU that, on a small
//! machine, a local initiator shares with it. `splice` from a TCP socket into a pipe only
//! takes references to the socket buffer's pages; `splice` from the pipe into the file does
//! the one copy into the page cache, where the write is done (often on the helper's CPU).
//!
//! Only the data segment of a whole-transfer WRITE travels this way (conn.rs decides), and
//! only once all of it is already in the socket (`FIONREAD`), so the core thread never
//! blocks. Anything that needs the bytes in memory (a mirror to the peer, O_DIRECT, FUA, a
//! command that turns out not to be a plain write) reads them out of the pipe first
//! ([`Piped::read_rest_into`]): the pipe is an optimisation, never the only copy of a
//! decision.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A data segment at least this long may be spliced; shorter ones cost less to copy than
/// the extra system calls.
pub const SPLICE_MIN_BYTES: usize = 64 << 10;
/// A data segment at most this long may be spliced: it must fit the pipe even if every
/// socket buffer fragment takes a pipe slot of its own (4 KiB each, at worst).
pub const SPLICE_MAX_BYTES: usize = PIPE_BYTES / 2;
/// Capacity asked for each pipe (F_SETPIPE_SZ); the default of 64 KiB would hold too little.
const PIPE_BYTES: usize = 1 << 20;
/// Empty pipes kept for reuse per core: creating one is two system calls, and a core has at
/// most a queue of large writes in flight.
const MAX_POOLED_PIPES: usize = 64;
/// Pipes per core in all (pooled, or holding a write's data), a hard bound: two fds each,
/// and every connection's large writes in flight could otherwise take a pair each until the
/// process runs out of fds. Past it, writes are received into memory as before.
pub const MAX_LIVE_PIPES: usize = 256;
/// After pipes could not be made (fd or pipe-buffer limits), how long before trying again.
const RETRY_AFTER_MS: u64 = 1000;

/// A pipe's two ends, counted in its pool's live pipes until dropped.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    live: Arc<AtomicUsize>,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pipe {
    fn new(live: &Arc<AtomicUsize>) -> std::io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        live.fetch_add(1, Ordering::Relaxed);
        let pipe = Pipe {
            read,
            write,
            live: Arc::clone(live),
        };
        // SAFETY: a plain fcntl on an fd we own.
        let got = unsafe {
            libc::fcntl(
                pipe.write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_BYTES as libc::c_int,
            )
        };
        if got < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if (got as usize) < PIPE_BYTES {
            return Err(std::io::Error::other("pipe smaller than asked"));
        }
        Ok(pipe)
    }
}

/// Empty pipes of one core thread.
#[derive(Debug, Default)]
pub struct PipePool {
    free: Vec<Pipe>,
    /// Pipes of this pool alive now, wherever they are.
    live: Arc<AtomicUsize>,
    /// Pipes could not be made (fd limit, pipe-user-pages limits): not before then.
    retry_at: Option<Instant>,
    /// Data segments spliced so far, for status and tests.
    pub spliced_count: u64,
}

impl PipePool {
    /// An empty pipe, or None when none can be had now (the caller receives the usual way).
    pub fn get(&mut self) -> Option<Pipe> {
        if let Some(p) = self.free.pop() {
            return Some(p);
        }
        if self.live.load(Ordering::Relaxed) >= MAX_LIVE_PIPES
            || self.retry_at.is_some_and(|t| Instant::now() < t)
        {
            return None;
        }
        match Pipe::new(&self.live) {
            Ok(p) => Some(p),
            Err(e) => {
                if self.retry_at.is_none() {
                    tracing::info!(error = %e, "no pipes for spliced writes: large writes are received into memory for now");
                }
                self.retry_at = Some(Instant::now() + Duration::from_millis(RETRY_AFTER_MS));
                None
            }
        }
    }

    /// Pipes of this pool alive now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Takes back a pipe that is known to be empty.
    pub fn put(&mut self, p: Pipe) {
        if self.free.len() < MAX_POOLED_PIPES {
            self.free.push(p);
        }
    }
}

/// Bytes waiting in the socket's receive queue.
pub fn socket_readable_bytes(sock: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer we pass.
    if unsafe { libc::ioctl(sock, libc::FIONREAD, &mut n) } != 0 {
        return 0;
    }
    n.max(0) as usize
}

/// A data segment held in a pipe: `len` bytes, of which the first `at` have been written
/// out already.
#[derive(Debug)]
pub struct Piped {
    pipe: Pipe,
    len: u32,
    at: u32,
}

/// What [`Piped::from_socket`] could not do.
pub enum SpliceShort {
    /// Nothing was moved: receive the usual way. The pipe goes back to the pool.
    Nothing(Pipe),
    /// Part of the segment is in the pipe (the socket had less than FIONREAD said, or an
    /// error came midway): read it out into memory and receive the rest the usual way.
    Partial(Piped),
}

impl Piped {
    /// Moves `len` bytes from `sock` into `pipe` without copying them.
    pub fn from_socket(pipe: Pipe, sock: RawFd, len: u32) -> Result<Piped, SpliceShort> {
        let mut moved: u32 = 0;
        while moved < len {
            // Never ask for more than the socket holds: on a blocking socket, a splice that
            // finds nothing at all waits for data (tcp_splice_read), and the core thread
            // must not.
            let avail = socket_readable_bytes(sock).min((len - moved) as usize);
            if avail == 0 {
                break;
            }
            // SAFETY: plain splice between two fds we hold; no user memory is involved.
            // SPLICE_F_NONBLOCK: never wait for room in the pipe (it has room for
            // SPLICE_MAX_BYTES in any fragmentation).
            let n = unsafe {
                libc::splice(
                    sock,
                    std::ptr::null_mut(),
                    pipe.write.as_raw_fd(),
                    std::ptr::null_mut(),
                    avail,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            };
            if n <= 0 {
                break;
            }
            moved += n as u32;
        }
        match moved {
            0 => Err(SpliceShort::Nothing(pipe)),
            m if m == len => Ok(Piped { pipe, len, at: 0 }),
            m => Err(SpliceShort::Partial(Piped {
                pipe,
                len: m,
                at: 0,
            })),
        }
    }

    /// The segment's whole length.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the segment is empty (never, for one made by [`Self::from_socket`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes already written out from the front.
    pub fn at(&self) -> u32 {
        self.at
    }

    /// Whether everything has been written out (the pipe is empty and can be reused).
    pub fn is_drained(&self) -> bool {
        self.at == self.len
    }

    /// The empty pipe, for the pool; None while bytes remain in it.
    pub fn into_empty_pipe(self) -> Option<Pipe> {
        self.is_drained().then_some(self.pipe)
    }

    /// Writes what is left to `fd` at `offset` (the file position of the first byte left),
    /// the one copy into the page cache. Returns what a CQE would carry: the bytes written
    /// (short on a short write; the rest stays in the pipe for the next call) or a negative
    /// errno.
    pub fn write_rest_to(&mut self, fd: RawFd, offset: u64) -> i32 {
        let Ok(mut off) = libc::loff_t::try_from(offset) else {
            return -libc::EINVAL;
        };
        let mut done: u32 = 0;
        while self.at < self.len {
            // SAFETY: splice between a pipe and a file we hold; `off` is a valid loff_t the
            // kernel advances.
            let n = unsafe {
                libc::splice(
                    self.pipe.read.as_raw_fd(),
                    std::ptr::null_mut(),
                    fd,
                    &mut off,
                    // In pieces, like every inline write (inline_write.rs CHUNK_BYTES): one
                    // splice of the whole segment would leave a large folio behind.
                    (self.len - self.at).min(crate::inline_write::CHUNK_BYTES) as usize,
                    libc::SPLICE_F_MOVE,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO);
                if e == libc::EINTR {
                    continue;
                }
                return if done > 0 { done as i32 } else { -e };
            }
            if n == 0 {
                break;
            }
            self.at += n as u32;
            done += n as u32;
        }
        done as i32
    }

    /// Reads what is left into `buf[at..len]` (the bytes' own place in the segment), leaving
    /// the pipe empty.
    pub fn read_rest_into(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        let end = self.len as usize;
        let Some(dst) = buf.get_mut(self.at as usize..end) else {
            return Err(std::io::Error::other("buffer shorter than the piped data"));
        };
        let mut got = 0;
        while got < dst.len() {
            let rest = &mut dst[got..];
            // SAFETY: `rest` is a valid, writable slice of rest.len() bytes.
            let n = unsafe {
                libc::read(
                    self.pipe.read.as_raw_fd(),
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            got += n as usize;
        }
        self.at = self.len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        // Room for a whole segment in the receiving socket (accepted sockets inherit it).
        socket2::SockRef::from(&l)
            .set_recv_buffer_size(4 << 20)
            .unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    fn wait_readable(s: &TcpStream, n: usize) {
        for _ in 0..2000 {
            if socket_readable_bytes(s.as_raw_fd()) >= n {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("data never arrived");
    }

    #[test]
    fn a_segment_goes_from_the_socket_to_the_file_byte_for_byte_and_leaves_what_follows() {
        let (mut tx, rx) = pair();
        let data = pattern(128 << 10);
        tx.write_all(&data).unwrap();
        tx.write_all(b"next header").unwrap();
        wait_readable(&rx, data.len() + 11);
        let mut pool = PipePool::default();
        let pipe = pool.get().expect("pipes available");
        let mut piped = match Piped::from_socket(pipe, rx.as_raw_fd(), data.len() as u32) {
            Ok(p) => p,
            Err(_) => panic!("all the data was there"),
        };
        let (dir, path, f) = crate::inline_write::tests::scratch_file("splice");
        assert_eq!(piped.write_rest_to(f.as_raw_fd(), 4096), data.len() as i32);
        assert!(piped.is_drained());
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[4096..], &data[..]);
        assert!(on_disk[..4096].iter().all(|&b| b == 0));
        // The bytes after the segment are still in the socket, in order.
        let mut rest = [0u8; 11];
        (&rx).read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"next header");
        pool.put(piped.into_empty_pipe().expect("drained"));
        assert!(pool.get().is_some());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_segment_read_back_into_memory_lands_at_its_own_offsets() {
        let (mut tx, rx) = pair();
        let data = pattern(100 << 10);
        tx.write_all(&data).unwrap();
        wait_readable(&rx, data.len());
        let pipe = PipePool::default().get().unwrap();
        let Ok(mut piped) = Piped::from_socket(pipe, rx.as_raw_fd(), data.len() as u32) else {
            panic!("all the data was there");
        };
        let mut buf = vec![0u8; data.len()];
        piped.read_rest_into(&mut buf).unwrap();
        assert_eq!(buf, data);
        assert!(piped.is_drained());
        // A buffer too short is refused, not overrun.
        let (mut tx2, rx2) = pair();
        tx2.write_all(&data).unwrap();
        wait_readable(&rx2, data.len());
        let Ok(mut p2) = Piped::from_socket(
            PipePool::default().get().unwrap(),
            rx2.as_raw_fd(),
            data.len() as u32,
        ) else {
            panic!("all the data was there");
        };
        assert!(p2.read_rest_into(&mut [0u8; 10]).is_err());
    }

    #[test]
    fn pipes_are_bounded_and_counted_until_dropped() {
        let mut pool = PipePool::default();
        let mut held = Vec::new();
        while let Some(p) = pool.get() {
            held.push(p);
            assert!(held.len() <= MAX_LIVE_PIPES, "the bound holds");
        }
        assert_eq!(held.len(), MAX_LIVE_PIPES);
        assert_eq!(pool.live(), MAX_LIVE_PIPES);
        held.pop();
        assert_eq!(pool.live(), MAX_LIVE_PIPES - 1);
        assert!(pool.get().is_some(), "a dropped pipe makes room");
        drop(held);
        let again = pool.get().expect("room again");
        pool.put(again);
        assert_eq!(pool.live(), 1, "only the pooled pipe is left");
    }

    #[test]
    fn a_socket_with_less_than_asked_gives_what_it_has_and_never_blocks() {
        let (mut tx, rx) = pair();
        tx.write_all(&pattern(1000)).unwrap();
        wait_readable(&rx, 1000);
        let pipe = PipePool::default().get().unwrap();
        match Piped::from_socket(pipe, rx.as_raw_fd(), 64 << 10) {
            Err(SpliceShort::Partial(p)) => assert_eq!(p.len(), 1000),
            _ => panic!("expected a partial splice"),
        }
        let (_tx3, rx3) = pair();
        let pipe = PipePool::default().get().unwrap();
        assert!(matches!(
            Piped::from_socket(pipe, rx3.as_raw_fd(), 4096),
            Err(SpliceShort::Nothing(_))
        ));
    }
}
