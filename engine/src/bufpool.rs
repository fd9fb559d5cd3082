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
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
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
        Self { ptr, cap, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the logical length; bytes beyond the previous length keep whatever a previous
    /// user left (callers fill them before reading: disk reads or Data-Out copies).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "length beyond capacity");
        self.len = len;
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len bytes, initialised (alloc_zeroed), and
        // uniquely owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in Deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
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

    /// Returns a buffer for reuse.
    pub fn put(&mut self, buf: AlignedBuf) {
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
}
