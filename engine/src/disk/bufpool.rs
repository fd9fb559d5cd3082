//! Aligned I/O buffers, pooled per core so the steady state does not allocate per I/O.
//!
//! O_DIRECT needs buffers aligned to the device's logical block size; we align everything
//! to 4096 so one pool serves both cache modes.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Alignment of every buffer: the largest logical block size we support.
pub const ALIGN_BYTES: usize = 4096;
/// Smallest size class; a 4 KiB random I/O is the common case.
const MIN_CLASS_BYTES: usize = 4096;
/// Largest buffer the pool hands out: bounds the memory one command can pin.
pub const MAX_BUF_BYTES: usize = 32 << 20;
/// Buffers kept per size class; more are freed back to the allocator.
const KEEP_PER_CLASS: usize = 64;

/// A heap buffer aligned to [`ALIGN_BYTES`], owned by one core.
///
/// It may be narrowed to a window that starts `head` bytes into the allocation (see
/// [`AlignedBuf::narrow`]): a receive buffer handed to a task as its data buffer, so that a
/// large write's data is not copied out of the buffer it was received into. A narrowed
/// buffer is not aligned, so it serves buffered I/O only.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    /// Where the window starts in the allocation; 0 unless narrowed.
    head: usize,
    len: usize,
}

// SAFETY: AlignedBuf uniquely owns its allocation (like Vec<u8>); moving it to another
// thread moves that ownership.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(cap: usize) -> Self {
        assert!(
            cap > 0 && cap.is_multiple_of(ALIGN_BYTES),
            "capacity must be a non-zero multiple of the alignment"
        );
        let layout = Layout::from_size_align(cap, ALIGN_BYTES)
            .expect("capacity and alignment are valid by the assertion above");
        // SAFETY: layout has non-zero size (asserted above).
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self {
            ptr,
            cap,
            head: 0,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes in the whole allocation (also of a narrowed buffer).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Whether the window starts at the allocation, i.e. is aligned to [`ALIGN_BYTES`].
    pub fn is_aligned(&self) -> bool {
        self.head == 0
    }

    /// Sets the logical length; bytes beyond the previous length keep whatever a previous
    /// user left (callers fill them before reading: disk reads or Data-Out copies).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap - self.head, "length beyond capacity");
        self.len = len;
    }

    /// Narrows the window to `len` bytes starting `start` bytes into the current window.
    pub fn narrow(&mut self, start: usize, len: usize) {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "window outside the buffer"
        );
        self.head += start;
        self.len = len;
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: head <= cap (narrow keeps the window inside), so this stays inside (or one
        // past the end of) the allocation.
        unsafe { self.ptr.as_ptr().add(self.head) }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= head + len bytes, initialised (alloc_zeroed), and
        // uniquely owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(self.head), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in Deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(self.head), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout =
            Layout::from_size_align(self.cap, ALIGN_BYTES).expect("validated at construction");
        // SAFETY: ptr came from alloc_zeroed with this exact layout and is freed once.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// A per-core pool of power-of-two size classes.
#[derive(Default)]
pub struct BufPool {
    classes: Vec<Vec<AlignedBuf>>,
}

fn class_of(len: usize) -> (usize, usize) {
    let size = len.max(MIN_CLASS_BYTES).next_power_of_two();
    let idx = (size / MIN_CLASS_BYTES).trailing_zeros() as usize;
    (idx, size)
}

impl BufPool {
    pub fn new() -> Self {
        Self::default()
    }

    /// A buffer of logical length `len` (at most [`MAX_BUF_BYTES`]).
    pub fn get(&mut self, len: usize) -> AlignedBuf {
        assert!(len <= MAX_BUF_BYTES, "buffer request over the pool limit");
        let (idx, size) = class_of(len);
        let mut b = self
            .classes
            .get_mut(idx)
            .and_then(|c| c.pop())
            .unwrap_or_else(|| AlignedBuf::new(size));
        b.set_len(len);
        b
    }

    /// Returns a buffer for reuse (a narrowed one whole again).
    pub fn put(&mut self, mut buf: AlignedBuf) {
        buf.head = 0;
        let (idx, size) = class_of(buf.capacity());
        if size != buf.capacity() {
            return; // not one of ours; drop it
        }
        if self.classes.len() <= idx {
            self.classes.resize_with(idx + 1, Vec::new);
        }
        if self.classes[idx].len() < KEEP_PER_CLASS {
            self.classes[idx].push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_reused() {
        let mut p = BufPool::new();
        let mut b = p.get(5000);
        assert_eq!(b.as_mut_ptr() as usize % ALIGN_BYTES, 0);
        assert_eq!((b.len(), b.capacity()), (5000, 8192));
        b[4999] = 7;
        let addr = b.as_mut_ptr() as usize;
        p.put(b);
        let mut c = p.get(8000);
        assert_eq!(
            c.as_mut_ptr() as usize,
            addr,
            "same class reuses the buffer"
        );
        assert_eq!(c.len(), 8000);
    }

    #[test]
    fn a_narrowed_buffer_is_a_window_and_comes_back_whole() {
        let mut p = BufPool::new();
        let mut b = p.get(16384);
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i % 251) as u8;
        }
        let base = b.as_mut_ptr() as usize;
        b.narrow(48, 8192);
        assert_eq!((b.len(), b.capacity()), (8192, 16384));
        assert!(!b.is_aligned());
        assert_eq!(b.as_mut_ptr() as usize, base + 48);
        assert_eq!(b[0], 48);
        assert_eq!(b[8191], ((48 + 8191) % 251) as u8);
        // Narrowing again is relative to the window.
        b.narrow(2, 10);
        assert_eq!(b[0], 50);
        p.put(b);
        let mut c = p.get(16384);
        assert_eq!(c.as_mut_ptr() as usize, base);
        assert!(c.is_aligned());
        assert_eq!(c.len(), 16384);
    }

    #[test]
    #[should_panic(expected = "window outside the buffer")]
    fn a_window_cannot_reach_past_the_buffer() {
        let mut b = BufPool::new().get(4096);
        b.narrow(4000, 97);
    }
}
