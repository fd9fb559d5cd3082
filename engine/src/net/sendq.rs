//! A connection's send queue: bytes the connection framed, and data segments sent straight
//! from the task buffers they were read into.
//!
//! Why: copying a read's data into the send buffer behind its Data-In header was a quarter
//! of the daemon's time per 128 KiB read (`perf`: `memmove` 27%). Now a large Data-In
//! segment is queued as a reference into the task's buffer, which the queue holds (`Hold`)
//! until every byte before the hold point has gone out, and the socket gets the pieces with
//! one `sendmsg` of up to [`MAX_IOV`] iovecs.

use std::collections::VecDeque;

use crate::disk::bufpool::AlignedBuf;

/// iovecs per sendmsg, a bound on the work of one submission.
pub const MAX_IOV: usize = 64;

/// A data segment to send from a task's buffer instead of a copy: `len` bytes at `ptr`, to
/// go out after the first `at` bytes of the `Out::send` it came with.
#[derive(Debug, Clone, Copy)]
pub struct SendRef {
    pub at: usize,
    pub ptr: *const u8,
    pub len: usize,
}

// SAFETY: `ptr` points into a buffer that the same Out (and then the send queue) holds until
// the bytes have been sent; only the kernel reads them.
unsafe impl Send for SendRef {}

enum Seg {
    Bytes(Vec<u8>),
    Ref(SendRef),
    /// A buffer that `Ref`s before it point into; released when it reaches the front.
    Hold(AlignedBuf),
}

impl Seg {
    fn len(&self) -> usize {
        match self {
            Seg::Bytes(v) => v.len(),
            Seg::Ref(r) => r.len,
            Seg::Hold(_) => 0,
        }
    }
}

pub struct SendQueue {
    segs: VecDeque<Seg>,
    /// Bytes of the front segment already sent.
    head_sent: usize,
    /// Segments covered by the sendmsg in flight: they must not change until it completes.
    in_flight: usize,
    /// The iovecs and message header of that sendmsg (boxed: the kernel reads them until
    /// it completes, and the queue may move meanwhile).
    iov: Box<[libc::iovec; MAX_IOV]>,
    msg: Box<libc::msghdr>,
}

impl Default for SendQueue {
    fn default() -> Self {
        SendQueue {
            segs: VecDeque::new(),
            head_sent: 0,
            in_flight: 0,
            iov: Box::new(
                [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; MAX_IOV],
            ),
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            msg: Box::new(unsafe { std::mem::zeroed() }),
        }
    }
}

// SAFETY: the raw pointers inside point into buffers the queue itself holds (see SendRef).
unsafe impl Send for SendQueue {}

impl SendQueue {
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// Appends what a connection produced: `bytes`, with `refs` spliced in where their `at`
    /// says, and `holds` (each at a position after the refs into it) kept until sent.
    pub fn push(&mut self, bytes: Vec<u8>, refs: Vec<SendRef>, holds: Vec<(usize, AlignedBuf)>) {
        if refs.is_empty() && holds.is_empty() {
            self.push_vec(bytes);
            return;
        }
        // Splice points in order; at one position a ref comes before a hold.
        let mut events: Vec<(usize, u8, Seg)> = refs
            .into_iter()
            .map(|r| (r.at, 0, Seg::Ref(r)))
            .chain(holds.into_iter().map(|(at, b)| (at, 1, Seg::Hold(b))))
            .collect();
        events.sort_by_key(|(at, kind, _)| (*at, *kind));
        let mut from = 0;
        for (at, _, seg) in events {
            let to = at.clamp(from, bytes.len());
            self.push_slice(&bytes[from..to]);
            from = to;
            if seg.len() > 0 || matches!(seg, Seg::Hold(_)) {
                self.segs.push_back(seg);
            }
        }
        self.push_slice(&bytes[from..]);
    }

    /// Appends a whole byte vector, moving it in when it cannot join the last segment.
    fn push_vec(&mut self, v: Vec<u8>) {
        if v.is_empty() {
            return;
        }
        if self.last_is_free_bytes() {
            self.push_slice(&v);
        } else {
            self.segs.push_back(Seg::Bytes(v));
        }
    }

    fn last_is_free_bytes(&self) -> bool {
        self.segs.len() > self.in_flight && matches!(self.segs.back(), Some(Seg::Bytes(_)))
    }

    /// Appends bytes, into the last segment when it is bytes the kernel is not reading.
    fn push_slice(&mut self, b: &[u8]) {
        if b.is_empty() {
            return;
        }
        if self.last_is_free_bytes() {
            if let Some(Seg::Bytes(v)) = self.segs.back_mut() {
                v.extend_from_slice(b);
                return;
            }
        }
        self.segs.push_back(Seg::Bytes(b.to_vec()));
    }

    /// Releases the holds (and drops empty segments) at the front, into `release`.
    fn release_front(&mut self, release: &mut impl FnMut(AlignedBuf)) {
        while let Some(front) = self.segs.front() {
            if front.len() > self.head_sent {
                return;
            }
            if let Some(Seg::Hold(b)) = self.segs.pop_front() {
                release(b);
            }
            self.head_sent = 0;
        }
    }

    /// The message header for a sendmsg of what to send next (from the front, skipping
    /// holds), marking those segments in flight. It and the memory it points to stay valid
    /// and unchanged until [`SendQueue::sent`].
    pub fn prepare_msg(&mut self) -> *const libc::msghdr {
        debug_assert_eq!(self.in_flight, 0, "one sendmsg at a time");
        let (n, covered) = fill(&self.segs, self.head_sent, &mut self.iov);
        self.in_flight = covered;
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = n as _;
        &*self.msg
    }

    /// The sendmsg in flight sent `sent` bytes (or none went out: `sent` 0 after an error):
    /// drops what went out, releasing holds that are now at the front into `release`.
    pub fn sent(&mut self, mut sent: usize, release: &mut impl FnMut(AlignedBuf)) {
        self.in_flight = 0;
        self.release_front(release);
        while let Some(front) = self.segs.front() {
            let left = front.len() - self.head_sent;
            if sent < left {
                self.head_sent += sent;
                break;
            }
            sent -= left;
            self.head_sent = 0;
            self.segs.pop_front();
            self.release_front(release);
        }
        debug_assert_eq!(sent, 0, "sent more than was queued");
    }

    /// Everything queued, as the bytes a socket would carry, in order; the held buffers go
    /// to `release`. For in-process tests and tools that drive a connection without a
    /// socket.
    pub fn drain_to_vec(&mut self, release: &mut impl FnMut(AlignedBuf)) -> Vec<u8> {
        debug_assert_eq!(self.in_flight, 0, "no sendmsg in flight");
        let mut wire = Vec::new();
        for s in &self.segs {
            match s {
                Seg::Bytes(v) => wire.extend_from_slice(v),
                Seg::Ref(r) => {
                    // SAFETY: a ref points into a buffer that a later hold of this queue
                    // keeps alive and unchanged until it is released below (SendRef's
                    // contract).
                    let bytes = unsafe { std::slice::from_raw_parts(r.ptr, r.len) };
                    wire.extend_from_slice(bytes);
                }
                Seg::Hold(_) => {}
            }
        }
        let skip = self.head_sent.min(wire.len());
        wire.drain(..skip);
        self.clear(release);
        wire
    }

    /// Drops everything (the connection is gone), releasing the held buffers.
    pub fn clear(&mut self, release: &mut impl FnMut(AlignedBuf)) {
        debug_assert_eq!(self.in_flight, 0, "no sendmsg in flight");
        for s in self.segs.drain(..) {
            if let Seg::Hold(b) = s {
                release(b);
            }
        }
        self.head_sent = 0;
    }
}

/// Fills `iov` from `segs` (the first with `head_sent` bytes already gone), skipping holds;
/// returns the iovecs filled and how many segments they cover.
fn fill(
    segs: &VecDeque<Seg>,
    head_sent: usize,
    iov: &mut [libc::iovec; MAX_IOV],
) -> (usize, usize) {
    let mut n = 0;
    let mut covered = 0;
    for (i, s) in segs.iter().enumerate() {
        if n == MAX_IOV {
            break;
        }
        covered = i + 1;
        let skip = if i == 0 { head_sent } else { 0 };
        let (ptr, len) = match s {
            Seg::Bytes(v) => (v.as_ptr(), v.len()),
            Seg::Ref(r) => (r.ptr, r.len),
            Seg::Hold(_) => continue,
        };
        if len <= skip {
            continue;
        }
        iov[n] = libc::iovec {
            // SAFETY: skip < len, so the pointer stays inside the segment.
            iov_base: unsafe { ptr.add(skip) } as *mut libc::c_void,
            iov_len: len - skip,
        };
        n += 1;
    }
    (n, covered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::bufpool::BufPool;

    /// The iovecs of the next sendmsg.
    fn iovs(q: &mut SendQueue) -> Vec<libc::iovec> {
        let m = q.prepare_msg();
        // SAFETY: prepare_msg returns a header over the queue's own iovec array.
        unsafe { std::slice::from_raw_parts((*m).msg_iov, (*m).msg_iovlen).to_vec() }
    }

    /// Sends everything queued, at most `chunk` bytes per "sendmsg", and returns the bytes in
    /// the order the socket would have seen them, and how many buffers were released.
    fn drain(q: &mut SendQueue, chunk: usize) -> (Vec<u8>, usize) {
        let mut wire = Vec::new();
        let mut released = 0;
        while !q.is_empty() {
            let iov = iovs(q);
            let mut budget = chunk;
            let mut sent = 0;
            for v in &iov {
                let take = v.iov_len.min(budget);
                // SAFETY: the queue handed out these iovecs over memory it holds.
                let bytes = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, take) };
                wire.extend_from_slice(bytes);
                budget -= take;
                sent += take;
            }
            q.sent(sent, &mut |_| released += 1);
        }
        (wire, released)
    }

    #[test]
    fn referenced_data_goes_out_in_place_between_the_bytes_and_buffers_come_back() {
        let mut pool = BufPool::new();
        for chunk in [1, 7, 100, 5000, 1 << 20] {
            let mut q = SendQueue::default();
            let mut buf = pool.get(3000);
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            // "H1" + 1000 data bytes + "T1" + "H2" + 2000 data bytes + "T2", the buffer held
            // after the last tail; then plain bytes from a later Out.
            let bytes = b"H1T1H2T2".to_vec();
            let p = buf.as_ptr();
            let refs = vec![
                SendRef {
                    at: 2,
                    ptr: p,
                    len: 1000,
                },
                SendRef {
                    at: 6,
                    // SAFETY: 1000 < 3000, inside the buffer.
                    ptr: unsafe { p.add(1000) },
                    len: 2000,
                },
            ];
            q.push(bytes, refs, vec![(8, buf)]);
            q.push(b"status".to_vec(), Vec::new(), Vec::new());
            let (wire, released) = drain(&mut q, chunk);
            let data: Vec<u8> = (0..3000).map(|i| (i % 251) as u8).collect();
            let mut want = b"H1".to_vec();
            want.extend_from_slice(&data[..1000]);
            want.extend_from_slice(b"T1H2");
            want.extend_from_slice(&data[1000..]);
            want.extend_from_slice(b"T2status");
            assert_eq!(wire, want, "chunk {chunk}");
            assert_eq!(released, 1);
        }
    }

    #[test]
    fn bytes_queued_while_a_send_is_in_flight_do_not_move_what_the_kernel_reads() {
        let mut q = SendQueue::default();
        q.push(b"first".to_vec(), Vec::new(), Vec::new());
        let iov = iovs(&mut q);
        assert_eq!(iov.len(), 1);
        let base = iov[0].iov_base;
        // Appended while in flight: a new segment, the first one is left alone.
        q.push(b"second".to_vec(), Vec::new(), Vec::new());
        assert_eq!(q.segs.len(), 2);
        // A short send, then the rest.
        q.sent(2, &mut |_| {});
        let iov = iovs(&mut q);
        assert_eq!(iov.len(), 2);
        // SAFETY: the first segment did not move: same allocation, 2 bytes in.
        assert_eq!(iov[0].iov_base, unsafe { (base as *mut u8).add(2) }
            as *mut _);
        q.sent(3 + 6, &mut |_| {});
        assert!(q.is_empty());
    }

    #[test]
    fn clearing_a_dead_connection_releases_its_buffers() {
        let mut pool = BufPool::new();
        let mut q = SendQueue::default();
        let buf = pool.get(4096);
        let r = SendRef {
            at: 1,
            ptr: buf.as_ptr(),
            len: 4096,
        };
        q.push(b"HT".to_vec(), vec![r], vec![(2, buf)]);
        let mut released = 0;
        q.clear(&mut |_| released += 1);
        assert_eq!(released, 1);
        assert!(q.is_empty());
    }
}
