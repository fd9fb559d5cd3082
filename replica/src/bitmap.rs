//! Region bitmaps: which regions of a LUN may differ from the peer, and which have writes in flight.
//!
//! A region is a fixed, power-of-two sized slice of the LUN (default 1 MiB). One bit per region keeps
//! the bitmap of a 16 TiB LUN at 2 MiB, small enough to persist whole in the LUN's metadata file.

/// Default region size: 1 MiB.
pub const REGION_BYTES_DEFAULT: u64 = 1 << 20;
/// Smallest region: one 4 KiB block (smaller regions would only grow the bitmap).
pub const REGION_BYTES_MIN: u64 = 4096;
/// Largest region: 1 GiB.
pub const REGION_BYTES_MAX: u64 = 1 << 30;
/// Most regions one bitmap may have: keeps the encoded bitmap at or under 2 MiB.
pub const REGIONS_MAX: u64 = 1 << 24;

const MAGIC: [u8; 4] = *b"TWBM";
const VERSION: u8 = 1;
/// magic(4) version(1) reserved(3) size_bytes(8) region_bytes(8) regions(8).
const HEADER_BYTES: usize = 32;
const CRC_BYTES: usize = 4;

/// Why a bitmap could not be built or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BitmapError {
    /// Region size not a power of two within the limits.
    #[error("region size {0} bytes is not a power of two in [4 KiB, 1 GiB]")]
    BadRegionSize(u64),
    /// LUN too large (or empty) for one bitmap at this region size.
    #[error("LUN of {size_bytes} bytes needs {regions} regions, limit is 1..={REGIONS_MAX}")]
    TooManyRegions {
        /// LUN size.
        size_bytes: u64,
        /// Regions it would need.
        regions: u64,
    },
    /// A LUN never shrinks: its regions would lose their bits.
    #[error(
        "a bitmap for {size_bytes} bytes cannot cover {new_size_bytes} bytes (LUNs only grow)"
    )]
    Shrink {
        /// Covered now.
        size_bytes: u64,
        /// Asked for.
        new_size_bytes: u64,
    },
    /// Encoded bitmap shorter or longer than its header says.
    #[error("encoded bitmap has {got} bytes, expected {expected}")]
    BadLength {
        /// Bytes given.
        got: usize,
        /// Bytes the header implies.
        expected: usize,
    },
    /// Not a bitmap.
    #[error("bad bitmap magic")]
    BadMagic,
    /// A bitmap version we do not know.
    #[error("unsupported bitmap version {0}")]
    BadVersion(u8),
    /// Reserved bytes or bits past the last region were set.
    #[error("reserved bits set in bitmap")]
    ReservedBits,
    /// The checksum does not match.
    #[error("bitmap checksum mismatch")]
    BadChecksum,
}

/// One bit per region of a LUN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    size_bytes: u64,
    region_bytes: u64,
    regions: u64,
    words: Vec<u64>,
    dirty: u64,
}

/// Checks a (size, region) pair and returns the region count.
pub fn region_count(size_bytes: u64, region_bytes: u64) -> Result<u64, BitmapError> {
    if !region_bytes.is_power_of_two()
        || !(REGION_BYTES_MIN..=REGION_BYTES_MAX).contains(&region_bytes)
    {
        return Err(BitmapError::BadRegionSize(region_bytes));
    }
    let regions = size_bytes.div_ceil(region_bytes);
    if regions == 0 || regions > REGIONS_MAX {
        return Err(BitmapError::TooManyRegions {
            size_bytes,
            regions,
        });
    }
    Ok(regions)
}

/// The regions `[first, last]` a byte range touches, or `None` for an empty range. The range is
/// clamped to the LUN (callers validate ranges; clamping keeps a bad range from indexing out).
fn region_span(
    size_bytes: u64,
    region_bytes: u64,
    offset_bytes: u64,
    len_bytes: u64,
) -> Option<(u64, u64)> {
    if len_bytes == 0 || offset_bytes >= size_bytes {
        return None;
    }
    let end_bytes = offset_bytes.saturating_add(len_bytes).min(size_bytes);
    Some((offset_bytes / region_bytes, (end_bytes - 1) / region_bytes))
}

impl Bitmap {
    /// An all-clean bitmap for a LUN of `size_bytes` with regions of `region_bytes`.
    pub fn new(size_bytes: u64, region_bytes: u64) -> Result<Bitmap, BitmapError> {
        let regions = region_count(size_bytes, region_bytes)?;
        let words = vec![0u64; regions.div_ceil(64) as usize];
        Ok(Bitmap {
            size_bytes,
            region_bytes,
            regions,
            words,
            dirty: 0,
        })
    }

    /// Covers a LUN grown to `size_bytes` (at least the current size): the regions it had
    /// keep their bits, the new ones are clean (a grown LUN's new space is a hole on both
    /// nodes). A last region that was short now reaches further: its bit still says
    /// whether it may differ, which covers the longer span too (the new bytes are equal).
    pub fn grow(&mut self, size_bytes: u64) -> Result<(), BitmapError> {
        if size_bytes < self.size_bytes {
            return Err(BitmapError::Shrink {
                size_bytes: self.size_bytes,
                new_size_bytes: size_bytes,
            });
        }
        let regions = region_count(size_bytes, self.region_bytes)?;
        self.words.resize(regions.div_ceil(64) as usize, 0);
        self.regions = regions;
        self.size_bytes = size_bytes;
        Ok(())
    }

    /// LUN size this bitmap covers.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Bytes per region.
    pub fn region_bytes(&self) -> u64 {
        self.region_bytes
    }

    /// Number of regions (bits).
    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// The regions `[first, last]` that the byte range touches (`None` if empty or past the end).
    pub fn span(&self, offset_bytes: u64, len_bytes: u64) -> Option<(u64, u64)> {
        region_span(self.size_bytes, self.region_bytes, offset_bytes, len_bytes)
    }

    /// The byte range `(offset, len)` of a region (the last one may be short).
    pub fn region_range(&self, region: u64) -> (u64, u64) {
        assert!(
            region < self.regions,
            "region {region} out of {}",
            self.regions
        );
        let offset_bytes = region * self.region_bytes;
        (
            offset_bytes,
            self.region_bytes.min(self.size_bytes - offset_bytes),
        )
    }

    /// Marks every region the byte range touches. Returns how many were newly set.
    pub fn mark(&mut self, offset_bytes: u64, len_bytes: u64) -> u64 {
        let Some((first, last)) = self.span(offset_bytes, len_bytes) else {
            return 0;
        };
        (first..=last).filter(|region| self.set(*region)).count() as u64
    }

    /// Sets one region's bit; returns whether it was clean before.
    pub fn set(&mut self, region: u64) -> bool {
        assert!(
            region < self.regions,
            "region {region} out of {}",
            self.regions
        );
        let word = &mut self.words[(region / 64) as usize];
        let mask = 1u64 << (region % 64);
        let was_clean = *word & mask == 0;
        *word |= mask;
        self.dirty += u64::from(was_clean);
        was_clean
    }

    /// Clears one region's bit; returns whether it was dirty before.
    pub fn clear(&mut self, region: u64) -> bool {
        assert!(
            region < self.regions,
            "region {region} out of {}",
            self.regions
        );
        let word = &mut self.words[(region / 64) as usize];
        let mask = 1u64 << (region % 64);
        let was_dirty = *word & mask != 0;
        *word &= !mask;
        self.dirty -= u64::from(was_dirty);
        was_dirty
    }

    /// Whether a region is dirty (regions past the end are reported clean).
    pub fn is_dirty(&self, region: u64) -> bool {
        region < self.regions && self.words[(region / 64) as usize] & (1u64 << (region % 64)) != 0
    }

    /// Whether every region the byte range touches is dirty.
    pub fn covers(&self, offset_bytes: u64, len_bytes: u64) -> bool {
        match self.span(offset_bytes, len_bytes) {
            Some((first, last)) => (first..=last).all(|region| self.is_dirty(region)),
            None => true,
        }
    }

    /// Number of dirty regions.
    pub fn dirty_count(&self) -> u64 {
        self.dirty
    }

    /// Bytes in dirty regions (what a resync would copy).
    pub fn dirty_bytes(&self) -> u64 {
        let mut bytes = self.dirty * self.region_bytes;
        // The last region may be short.
        let last = self.regions - 1;
        if self.is_dirty(last) {
            bytes -= self.region_bytes - self.region_range(last).1;
        }
        bytes
    }

    /// Marks every region.
    pub fn set_all(&mut self) {
        for region in 0..self.regions {
            self.set(region);
        }
    }

    /// Clears every region.
    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|word| *word = 0);
        self.dirty = 0;
    }

    /// The first dirty region at or after `from`.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        if from >= self.regions {
            return None;
        }
        let mut index = (from / 64) as usize;
        let mut word = self.words[index] & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                return Some(index as u64 * 64 + u64::from(word.trailing_zeros()));
            }
            index += 1;
            word = *self.words.get(index)?;
        }
    }

    /// Iterates over the dirty regions in ascending order.
    pub fn iter_dirty(&self) -> impl Iterator<Item = u64> + '_ {
        let mut next = self.next_dirty(0);
        std::iter::from_fn(move || {
            let region = next?;
            next = self.next_dirty(region + 1);
            Some(region)
        })
    }

    /// Sets every bit that is set in `other`. Both must describe the same geometry.
    pub fn union_with(&mut self, other: &Bitmap) -> Result<(), BitmapError> {
        if other.size_bytes != self.size_bytes || other.region_bytes != self.region_bytes {
            return Err(BitmapError::BadLength {
                got: other.words.len(),
                expected: self.words.len(),
            });
        }
        let mut dirty = 0u64;
        for (word, theirs) in self.words.iter_mut().zip(&other.words) {
            *word |= theirs;
            dirty += u64::from(word.count_ones());
        }
        self.dirty = dirty;
        Ok(())
    }

    /// Length of [`Bitmap::encode`]'s output for this geometry.
    pub fn encoded_len(&self) -> usize {
        HEADER_BYTES + self.regions.div_ceil(8) as usize + CRC_BYTES
    }

    /// Appends the versioned, checksummed encoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&self.size_bytes.to_le_bytes());
        out.extend_from_slice(&self.region_bytes.to_le_bytes());
        out.extend_from_slice(&self.regions.to_le_bytes());
        let bit_bytes = self.regions.div_ceil(8) as usize;
        for (index, word) in self.words.iter().enumerate() {
            let bytes = word.to_le_bytes();
            let take = bit_bytes.saturating_sub(index * 8).min(8);
            out.extend_from_slice(&bytes[..take]);
        }
        let crc = crc32c::crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(out.len() - start, self.encoded_len());
    }

    /// Strictly decodes an encoded bitmap: the whole input must be exactly one bitmap.
    pub fn decode(bytes: &[u8]) -> Result<Bitmap, BitmapError> {
        if bytes.len() < HEADER_BYTES + CRC_BYTES {
            return Err(BitmapError::BadLength {
                got: bytes.len(),
                expected: HEADER_BYTES + CRC_BYTES,
            });
        }
        if bytes[0..4] != MAGIC {
            return Err(BitmapError::BadMagic);
        }
        if bytes[4] != VERSION {
            return Err(BitmapError::BadVersion(bytes[4]));
        }
        if bytes[5..8] != [0; 3] {
            return Err(BitmapError::ReservedBits);
        }
        let size_bytes = le_u64(&bytes[8..16]);
        let region_bytes = le_u64(&bytes[16..24]);
        let regions = le_u64(&bytes[24..32]);
        // Geometry is validated before its sizes are trusted for slicing.
        let expected_regions = region_count(size_bytes, region_bytes)?;
        if regions != expected_regions {
            return Err(BitmapError::TooManyRegions {
                size_bytes,
                regions,
            });
        }
        let bit_bytes = regions.div_ceil(8) as usize;
        let expected = HEADER_BYTES + bit_bytes + CRC_BYTES;
        if bytes.len() != expected {
            return Err(BitmapError::BadLength {
                got: bytes.len(),
                expected,
            });
        }
        let (body, crc) = bytes.split_at(expected - CRC_BYTES);
        if crc32c::crc32c(body) != le_u32(crc) {
            return Err(BitmapError::BadChecksum);
        }
        let mut bitmap = Bitmap::new(size_bytes, region_bytes)?;
        let bits = &body[HEADER_BYTES..];
        for (index, chunk) in bits.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            bitmap.words[index] = u64::from_le_bytes(word);
        }
        let tail_bits = regions % 64;
        if tail_bits != 0 {
            let last = bitmap.words.len() - 1;
            if bitmap.words[last] >> tail_bits != 0 {
                return Err(BitmapError::ReservedBits);
            }
        }
        bitmap.dirty = bitmap
            .words
            .iter()
            .map(|word| u64::from(word.count_ones()))
            .sum();
        Ok(bitmap)
    }
}

pub(crate) fn le_u64(bytes: &[u8]) -> u64 {
    let mut array = [0u8; 8];
    array.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(array)
}

pub(crate) fn le_u32(bytes: &[u8]) -> u32 {
    let mut array = [0u8; 4];
    array.copy_from_slice(&bytes[..4]);
    u32::from_le_bytes(array)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn mark_touches_every_region_of_a_range() {
        let mut bitmap = Bitmap::new(10 << 20, REGION_BYTES_DEFAULT).unwrap();
        assert_eq!(bitmap.mark((1 << 20) - 1, 2), 2);
        assert!(bitmap.is_dirty(0) && bitmap.is_dirty(1) && !bitmap.is_dirty(2));
        assert_eq!(bitmap.mark(0, 1), 0);
        assert_eq!(bitmap.dirty_count(), 2);
        assert_eq!(bitmap.iter_dirty().collect::<Vec<_>>(), vec![0, 1]);
        assert!(bitmap.clear(0));
        assert!(!bitmap.clear(0));
        assert_eq!(bitmap.dirty_bytes(), 1 << 20);
        assert_eq!(bitmap.mark(0, 0), 0);
    }

    #[test]
    fn a_grown_bitmap_keeps_its_bits_and_adds_clean_regions() {
        let mut bitmap = Bitmap::new(3 * 4096 + 100, 4096).unwrap();
        bitmap.mark(0, 1);
        bitmap.mark(3 * 4096, 1);
        bitmap.grow(200 * 4096).unwrap();
        assert_eq!(bitmap.regions(), 200);
        assert_eq!(bitmap.size_bytes(), 200 * 4096);
        assert_eq!(bitmap.iter_dirty().collect::<Vec<_>>(), vec![0, 3]);
        // The once-short last region is whole now.
        assert_eq!(bitmap.dirty_bytes(), 2 * 4096);
        bitmap.mark(199 * 4096, 4096);
        assert!(bitmap.is_dirty(199));
        assert!(matches!(bitmap.grow(4096), Err(BitmapError::Shrink { .. })));
        assert_eq!(bitmap.regions(), 200, "a refused shrink changes nothing");
    }

    #[test]
    fn short_last_region() {
        let mut bitmap = Bitmap::new(3 * 4096 + 100, 4096).unwrap();
        assert_eq!(bitmap.regions(), 4);
        bitmap.mark(3 * 4096, 1);
        assert_eq!(bitmap.dirty_bytes(), 100);
        assert_eq!(bitmap.region_range(3), (3 * 4096, 100));
        // Ranges past the end are clamped, not indexed.
        assert_eq!(bitmap.mark(u64::MAX - 1, 10), 0);
    }

    #[test]
    fn geometry_limits() {
        assert_eq!(
            Bitmap::new(1 << 20, 1000),
            Err(BitmapError::BadRegionSize(1000))
        );
        assert!(matches!(
            Bitmap::new(0, 4096),
            Err(BitmapError::TooManyRegions { .. })
        ));
        assert!(matches!(
            Bitmap::new(u64::MAX, 4096),
            Err(BitmapError::TooManyRegions { .. })
        ));
        assert!(Bitmap::new(16 << 40, REGION_BYTES_DEFAULT).is_ok());
    }

    #[test]
    fn decode_rejects_damage() {
        let mut bitmap = Bitmap::new(100 * 4096, 4096).unwrap();
        bitmap.mark(5 * 4096, 3 * 4096);
        let mut bytes = Vec::new();
        bitmap.encode(&mut bytes);
        assert_eq!(Bitmap::decode(&bytes).unwrap(), bitmap);
        for index in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[index] ^= 0x10;
            assert!(Bitmap::decode(&bad).is_err(), "flip at {index} accepted");
        }
        assert!(Bitmap::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(Bitmap::decode(&long).is_err());
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(size in 1u64..(1 << 24), shift in 12u32..16, marks in proptest::collection::vec((0u64..(1 << 24), 0u64..(1 << 18)), 0..20)) {
            let mut bitmap = Bitmap::new(size, 1 << shift).unwrap();
            for (offset, len) in marks {
                bitmap.mark(offset, len);
            }
            let mut bytes = Vec::new();
            bitmap.encode(&mut bytes);
            prop_assert_eq!(bytes.len(), bitmap.encoded_len());
            let decoded = Bitmap::decode(&bytes).unwrap();
            prop_assert_eq!(decoded.iter_dirty().count() as u64, bitmap.dirty_count());
            prop_assert_eq!(decoded, bitmap);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Bitmap::decode(&bytes);
        }
    }
}
