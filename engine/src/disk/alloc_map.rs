//! Which parts of a LUN may hold data: one bit per chunk, shared by every core, so a read
//! of a range nobody wrote is answered with zeros without touching the backing file or the
//! page cache (a hole read through the page cache costs more CPU than a read of data, and
//! leaves zeroed pages behind).
//!
//! A clear bit is a promise: the chunk reads as zeros. A set bit promises nothing (the file
//! may hold a hole there too). The rules that keep the promise:
//! - a write sets the bits of every chunk it touches *before* it is issued, so once it is
//!   acknowledged every later read sees them set ([`AllocMap::mark_data`]);
//! - only a deallocation that has completed clears bits, and only of chunks it covers
//!   whole, while the caller holds the range lock that keeps every overlapping write out
//!   ([`AllocMap::mark_hole`]): no write to such a chunk can be in flight then.
//!
//! A read racing an overlapping write may see either, as SBC allows. Memory is bounded:
//! chunks grow with the LUN so that no map holds more than [`MAX_CHUNKS`] bits (8 MiB for
//! any size; 1 MiB chunks at 64 TiB).
//!
//! A LUN grown online (`twinsan reload`) keeps the map built for its old size: everything
//! past the map's end counts as data (a set bit, which promises nothing), so reads there go
//! to the file. Correct, and only as fast as an unmapped LUN until the next start rebuilds
//! the map at the new size.

use std::sync::atomic::{AtomicU64, Ordering};

/// Most chunks per LUN: 2^26 bits = 8 MiB of map.
pub const MAX_CHUNKS: u64 = 1 << 26;
/// Smallest chunk: a page, the unit the file system allocates in.
pub const MIN_CHUNK_BYTES: u64 = 4096;

/// The allocation map of one LUN (see the module docs).
#[derive(Debug)]
pub struct AllocMap {
    size_bytes: u64,
    chunk_shift: u32,
    chunks: u64,
    words: Box<[AtomicU64]>,
}

impl AllocMap {
    /// A map of a LUN of `size_bytes` where nothing holds data yet.
    pub fn new(size_bytes: u64) -> AllocMap {
        let per_chunk = size_bytes.div_ceil(MAX_CHUNKS).max(MIN_CHUNK_BYTES);
        let chunk_shift = per_chunk.next_power_of_two().trailing_zeros();
        let chunks = size_bytes.div_ceil(1 << chunk_shift);
        assert!(chunks <= MAX_CHUNKS, "the chunk size bounds the map");
        let words = (0..chunks.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        AllocMap {
            size_bytes,
            chunk_shift,
            chunks,
            words,
        }
    }

    /// A map built from where the backing file holds data: `data_ranges` yields
    /// `(offset, len)` of every allocated extent (SEEK_DATA / SEEK_HOLE at start).
    pub fn from_extents(
        size_bytes: u64,
        data_ranges: impl IntoIterator<Item = (u64, u64)>,
    ) -> Self {
        let map = AllocMap::new(size_bytes);
        for (offset, len) in data_ranges {
            map.mark_data(offset, len);
        }
        map
    }

    /// Bytes per chunk.
    pub fn chunk_bytes(&self) -> u64 {
        1 << self.chunk_shift
    }

    /// Bytes the map says may hold data (whole chunks).
    pub fn data_bytes(&self) -> u64 {
        let set: u64 = self
            .words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        (set << self.chunk_shift).min(self.size_bytes)
    }

    /// Chunks `[first, end)` touched by `[offset, offset + len)`, clamped to the LUN.
    fn touched(&self, offset: u64, len: u64) -> (u64, u64) {
        let end = offset.saturating_add(len).min(self.size_bytes);
        if len == 0 || offset >= end {
            return (0, 0);
        }
        (
            offset >> self.chunk_shift,
            ((end - 1) >> self.chunk_shift) + 1,
        )
    }

    /// Chunks `[first, end)` that `[offset, offset + len)` covers whole (the last chunk
    /// of the LUN counts as whole when the range reaches the LUN's end).
    fn covered(&self, offset: u64, len: u64) -> (u64, u64) {
        let end = offset.saturating_add(len).min(self.size_bytes);
        if offset >= end {
            return (0, 0);
        }
        let first = offset.div_ceil(self.chunk_bytes());
        let last_end = if end == self.size_bytes {
            self.chunks
        } else {
            end >> self.chunk_shift
        };
        (first, last_end.max(first))
    }

    fn is_set(&self, chunk: u64) -> bool {
        let w = self.words[(chunk / 64) as usize].load(Ordering::Acquire);
        w & (1 << (chunk % 64)) != 0
    }

    /// A write to `[offset, offset + len)` is about to be issued: its chunks may hold data
    /// from now on. Call it before the write can reach the file.
    pub fn mark_data(&self, offset: u64, len: u64) {
        let (first, end) = self.touched(offset, len);
        self.update(first, end, true);
    }

    /// `[offset, offset + len)` was deallocated (a completed punch): the chunks it covers
    /// whole read as zeros. The caller holds the range lock over the range, so no write to
    /// those chunks is in flight (see the module docs).
    pub fn mark_hole(&self, offset: u64, len: u64) {
        let (first, end) = self.covered(offset, len);
        self.update(first, end, false);
    }

    fn update(&self, first: u64, end: u64, set: bool) {
        let mut c = first;
        while c < end {
            let word = (c / 64) as usize;
            let lo = c % 64;
            let n = (end - c).min(64 - lo);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << lo
            };
            let w = &self.words[word];
            // Skip the atomic read-modify-write when nothing changes (a rewrite of data):
            // the word's cache line is shared by every core's writes.
            let cur = w.load(Ordering::Relaxed);
            if set && cur & mask != mask {
                w.fetch_or(mask, Ordering::AcqRel);
            } else if !set && cur & mask != 0 {
                w.fetch_and(!mask, Ordering::AcqRel);
            }
            c += n;
        }
    }

    /// The first chunk at or after `from` (below `end`) whose bit is `set`, or `end`.
    fn next_with(&self, from: u64, end: u64, set: bool) -> u64 {
        let mut c = from;
        while c < end {
            let word = self.words[(c / 64) as usize].load(Ordering::Acquire);
            let bits = if set { word } else { !word } >> (c % 64);
            if bits != 0 {
                return (c + u64::from(bits.trailing_zeros())).min(end);
            }
            c = (c / 64 + 1) * 64;
        }
        end
    }

    /// How many bytes from `offset` (at most `len`) certainly read as zeros.
    pub fn hole_len(&self, offset: u64, len: u64) -> u64 {
        self.run_len(offset, len, false)
    }

    /// How many bytes from `offset` (at most `len`) lie in chunks that may hold data.
    pub fn data_len(&self, offset: u64, len: u64) -> u64 {
        self.run_len(offset, len, true)
    }

    fn run_len(&self, offset: u64, len: u64, data: bool) -> u64 {
        let wanted_end = offset.saturating_add(len);
        if data && offset >= self.size_bytes {
            // Past the map (a LUN grown online): data, as a set bit would say.
            return len;
        }
        let end = wanted_end.min(self.size_bytes);
        if offset >= end {
            return 0;
        }
        let first = offset >> self.chunk_shift;
        if self.is_set(first) != data {
            return 0;
        }
        let last = (end - 1) >> self.chunk_shift;
        let stop = self.next_with(first + 1, last + 1, !data);
        let run_end = (stop << self.chunk_shift).min(end);
        if data && run_end == self.size_bytes {
            // A data run that reaches the map's end goes on past it (see the module docs).
            return wanted_end - offset;
        }
        run_end - offset
    }

    /// The LUN size the map was built for: past it everything counts as data.
    pub fn covered_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Whether all of `[offset, offset + len)` reads as zeros.
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        len > 0
            && offset.saturating_add(len) <= self.size_bytes
            && self.hole_len(offset, len) == len
    }

    /// The first offset at or after `offset` that may hold data (the start of its chunk,
    /// or `offset` itself inside one), or `None` if nothing after it may.
    /// Past the map's end (a LUN grown online), `offset` itself.
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        if offset >= self.size_bytes {
            return Some(offset);
        }
        let first = offset >> self.chunk_shift;
        let c = self.next_with(first, self.chunks, true);
        (c < self.chunks).then(|| (c << self.chunk_shift).max(offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1024;

    #[test]
    fn past_the_end_of_a_map_is_data_for_a_lun_grown_online() {
        let m = AllocMap::new(64 * K);
        assert!(
            !m.is_hole(60 * K, 8 * K),
            "the part past the map may hold data"
        );
        assert_eq!(m.hole_len(60 * K, 8 * K), 4 * K);
        assert_eq!(m.data_len(64 * K, 8 * K), 8 * K);
        m.mark_data(56 * K, 8 * K);
        assert_eq!(
            m.data_len(56 * K, 16 * K),
            16 * K,
            "a run to the end goes on past it"
        );
        assert_eq!(m.next_data(100 * K), Some(100 * K));
        assert_eq!(m.covered_bytes(), 64 * K);
    }

    #[test]
    fn a_fresh_map_is_all_hole_and_a_write_marks_every_chunk_it_touches() {
        let m = AllocMap::new(64 * K);
        assert_eq!(m.chunk_bytes(), 4 * K);
        assert!(m.is_hole(0, 64 * K));
        assert_eq!(m.next_data(0), None);
        // 512 bytes straddling the 8 KiB boundary touch chunks 1 and 2.
        m.mark_data(8 * K - 256, 512);
        assert_eq!(m.hole_len(0, 64 * K), 4 * K);
        assert_eq!(m.data_len(4 * K, 60 * K), 8 * K);
        assert_eq!(m.hole_len(12 * K, 52 * K), 52 * K);
        assert_eq!(m.next_data(0), Some(4 * K));
        assert_eq!(m.next_data(6 * K), Some(6 * K), "inside a data chunk");
        assert_eq!(m.next_data(12 * K), None);
        assert!(!m.is_hole(0, 5 * K));
        assert_eq!(m.data_bytes(), 8 * K);
    }

    #[test]
    fn only_chunks_a_deallocation_covers_whole_become_holes() {
        let m = AllocMap::new(64 * K);
        m.mark_data(0, 64 * K);
        // 4 KiB .. 14 KiB covers chunks 1 and 2 whole, chunk 3 only in part.
        m.mark_hole(4 * K, 10 * K);
        assert_eq!(m.data_len(0, 64 * K), 4 * K);
        assert_eq!(m.hole_len(4 * K, 60 * K), 8 * K);
        assert_eq!(m.data_len(12 * K, 52 * K), 52 * K);
        // Less than a chunk clears nothing.
        m.mark_hole(20 * K + 512, 3 * K);
        assert_eq!(m.data_len(20 * K, 4 * K), 4 * K);
    }

    #[test]
    fn the_last_short_chunk_is_whole_when_a_range_reaches_the_end() {
        // 10 KiB: chunks of 4 KiB, the last one 2 KiB long.
        let m = AllocMap::new(10 * K);
        m.mark_data(9 * K, 512);
        assert_eq!(m.data_len(8 * K, 2 * K), 2 * K);
        m.mark_hole(8 * K, 2 * K);
        assert!(m.is_hole(0, 10 * K));
        // Ranges past the end are clamped.
        assert_eq!(m.hole_len(8 * K, 100 * K), 2 * K);
        assert_eq!(m.hole_len(10 * K, 4 * K), 0);
    }

    #[test]
    fn runs_cross_word_boundaries() {
        // 200 chunks: several 64-bit words.
        let m = AllocMap::new(200 * 4 * K);
        m.mark_data(60 * 4 * K, 10 * 4 * K); // chunks 60..70
        m.mark_data(130 * 4 * K, 4 * K); // chunk 130
        assert_eq!(m.hole_len(0, 200 * 4 * K), 60 * 4 * K);
        assert_eq!(m.data_len(60 * 4 * K, 140 * 4 * K), 10 * 4 * K);
        assert_eq!(m.hole_len(70 * 4 * K, 130 * 4 * K), 60 * 4 * K);
        assert_eq!(m.next_data(70 * 4 * K), Some(130 * 4 * K));
        m.mark_hole(0, 200 * 4 * K);
        assert_eq!(m.next_data(0), None);
        assert_eq!(m.data_bytes(), 0);
    }

    #[test]
    fn memory_stays_bounded_for_a_64_tib_lun() {
        let size = 64 * K * K * K * K;
        let m = AllocMap::new(size);
        assert_eq!(m.chunk_bytes(), K * K);
        assert!(m.words.len() as u64 * 8 <= MAX_CHUNKS / 8);
        m.mark_data(size - 1, 1);
        assert_eq!(m.next_data(0), Some(size - K * K));
    }

    #[test]
    fn from_extents_marks_what_the_file_holds() {
        let m = AllocMap::from_extents(64 * K, [(0, 4 * K), (32 * K, 1)]);
        assert_eq!(m.data_len(0, 64 * K), 4 * K);
        assert_eq!(m.next_data(4 * K), Some(32 * K));
        assert_eq!(m.data_bytes(), 8 * K);
    }

    /// Against a model: one bool per chunk, random marks, every query compared.
    #[test]
    fn agrees_with_a_model_under_random_operations() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let chunks = 300u64;
        let size = chunks * 4 * K - 1536; // a short last chunk
        let m = AllocMap::new(size);
        let mut model = vec![false; chunks as usize];
        for _ in 0..5_000 {
            let off = rng.gen_range(0..size);
            let len = rng.gen_range(1..=(size - off).min(40 * 4 * K));
            let (a, b) = (off / (4 * K), (off + len - 1) / (4 * K));
            if rng.gen_bool(0.5) {
                m.mark_data(off, len);
                model[a as usize..=b as usize].fill(true);
            } else {
                m.mark_hole(off, len);
                let first = off.div_ceil(4 * K);
                let end = if off + len == size {
                    chunks
                } else {
                    (off + len) / (4 * K)
                };
                for c in first..end.max(first) {
                    model[c as usize] = false;
                }
            }
            let q = rng.gen_range(0..size);
            let qlen = rng.gen_range(1..=(size - q));
            let qend = q + qlen;
            let first = q / (4 * K);
            let data = model[first as usize];
            let mut c = first;
            while c < chunks && c * 4 * K < qend && model[c as usize] == data {
                c += 1;
            }
            let run = (c * 4 * K).min(qend) - q;
            if data {
                assert_eq!((m.data_len(q, qlen), m.hole_len(q, qlen)), (run, 0));
            } else {
                assert_eq!((m.hole_len(q, qlen), m.data_len(q, qlen)), (run, 0));
            }
            let next = (first..chunks)
                .find(|&c| model[c as usize])
                .map(|c| (c * 4 * K).max(q));
            assert_eq!(m.next_data(q), next);
        }
    }
}
