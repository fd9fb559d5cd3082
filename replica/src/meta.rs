//! Per-LUN replication metadata, stored beside the backing file (`lun0.img` → `lun0.img.meta`).
//!
//! This module only encodes and decodes; the engine writes the file with tmp + fsync + rename + fsync
//! of the directory, so a crash leaves either the old or the new metadata, never a mix.
//!
//! # Durability contract
//! The pair state machine ([`crate::pair::PairLun`]) hands the driver what to store with
//! [`PairLun::meta_for_disk`](crate::pair::PairLun::meta_for_disk) and is told once it is
//! durable. It relies on:
//! - **Before a local or peer write is issued**, every region it touches is set in the persisted
//!   bitmap (as a write-intent, "hot" region). A crashed primary's unacknowledged tail is therefore
//!   always inside the persisted bitmap, and is reconciled when the peer returns.
//! - **Before a write is completed without the peer's ack**, the persisted metadata records
//!   `peer_outdated = true` with the bumped generation, and its regions are set in the persisted
//!   bitmap. So when either node comes back, [`crate::genid::decide`] sees that this node moved on and
//!   the bitmap says what to copy.
//! - **Before the peer is told a resync is done**, nothing; **after** the peer acked `ResyncDone`
//!   (the target persists its adopted ids before acking), the source persists its retired bitmap id and
//!   `peer_outdated = false`. A crash in between leaves both at the same `current`, which is `InSync`.
//! - Clearing bits is always lazy: a stale set bit only costs an extra region copy.

use crate::bitmap::{le_u32, le_u64, Bitmap, BitmapError};
use crate::genid::GenIds;

const MAGIC: [u8; 4] = *b"TWMT";
const VERSION: u8 = 1;
/// magic(4) version(1) flags(1) reserved(2) lun_key(8) size(8) region(8) gen(32) bitmap_len(4).
const HEADER_BYTES: usize = 68;
const CRC_BYTES: usize = 4;
/// Largest encoded metadata: the header, the largest bitmap (2 MiB of bits) and slack.
pub const META_BYTES_MAX: usize = HEADER_BYTES + (1 << 21) + 64 + CRC_BYTES;

const FLAG_OUTDATED: u8 = 1 << 0;
const FLAG_INCONSISTENT: u8 = 1 << 1;
const FLAG_PRIMARY: u8 = 1 << 2;
const FLAG_PEER_OUTDATED: u8 = 1 << 3;
const FLAG_CRASHED: u8 = 1 << 4;
const FLAG_INTENT_LOG: u8 = 1 << 5;
const FLAGS_KNOWN: u8 = FLAG_OUTDATED
    | FLAG_INCONSISTENT
    | FLAG_PRIMARY
    | FLAG_PEER_OUTDATED
    | FLAG_CRASHED
    | FLAG_INTENT_LOG;

/// Why metadata could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetaError {
    /// Not a metadata file.
    #[error("bad metadata magic")]
    BadMagic,
    /// A metadata version we do not know.
    #[error("unsupported metadata version {0}")]
    BadVersion(u8),
    /// Unknown flags or reserved bytes set.
    #[error("reserved bits set in metadata")]
    ReservedBits,
    /// Length does not match the header, or is over the limit.
    #[error("metadata has {got} bytes, expected {expected}")]
    BadLength {
        /// Bytes given.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// The checksum does not match.
    #[error("metadata checksum mismatch")]
    BadChecksum,
    /// The embedded bitmap is invalid.
    #[error("metadata bitmap: {0}")]
    Bitmap(#[from] BitmapError),
    /// The bitmap's geometry differs from the LUN's.
    #[error("bitmap geometry does not match the LUN")]
    GeometryMismatch,
}

/// The persistent state flags of a LUN.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MetaFlags {
    /// This node's data is known to be behind the peer's.
    pub outdated: bool,
    /// This node's data is a partial copy (resync target not finished).
    pub inconsistent: bool,
    /// This node was primary when the metadata was written.
    pub primary: bool,
    /// The peer is recorded as outdated: this node completes writes without it (degraded).
    pub peer_outdated: bool,
    /// This node stopped uncleanly and has not completed a resync since (see
    /// `GenFlags::crashed`).
    pub crashed: bool,
    /// The bitmap also holds the write-intent regions: every region a write may have been
    /// issued to is set before the write is (metadata written by an engine with a
    /// write-intent log). Without it, a crash leaves no record of the in-flight regions.
    pub intent_log: bool,
}

/// The replication metadata of one LUN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Stable id of the LUN, identical on both nodes.
    pub lun_key: u64,
    /// LUN size.
    pub size_bytes: u64,
    /// Region size of the bitmap.
    pub region_bytes: u64,
    /// Generation ids.
    pub gen: GenIds,
    /// State flags.
    pub flags: MetaFlags,
    /// Regions that may differ from the peer (out of sync, or with writes possibly in flight).
    pub bitmap: Bitmap,
}

impl Meta {
    /// Metadata for a blank, new LUN.
    pub fn new(lun_key: u64, size_bytes: u64, region_bytes: u64) -> Result<Meta, MetaError> {
        Ok(Meta {
            lun_key,
            size_bytes,
            region_bytes,
            gen: GenIds::BLANK,
            flags: MetaFlags::default(),
            bitmap: Bitmap::new(size_bytes, region_bytes)?,
        })
    }

    /// The metadata of the same LUN grown to `size_bytes` (an online or offline grow: the
    /// new space is a hole on both nodes, so its regions start clean).
    pub fn grow(&mut self, size_bytes: u64) -> Result<(), MetaError> {
        self.bitmap.grow(size_bytes)?;
        self.size_bytes = size_bytes;
        Ok(())
    }

    /// Appends the versioned, checksummed encoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        assert_eq!(self.bitmap.size_bytes(), self.size_bytes);
        assert_eq!(self.bitmap.region_bytes(), self.region_bytes);
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        let flags = (u8::from(self.flags.outdated) * FLAG_OUTDATED)
            | (u8::from(self.flags.inconsistent) * FLAG_INCONSISTENT)
            | (u8::from(self.flags.primary) * FLAG_PRIMARY)
            | (u8::from(self.flags.peer_outdated) * FLAG_PEER_OUTDATED)
            | (u8::from(self.flags.crashed) * FLAG_CRASHED)
            | (u8::from(self.flags.intent_log) * FLAG_INTENT_LOG);
        out.push(flags);
        out.extend_from_slice(&[0; 2]);
        for value in [self.lun_key, self.size_bytes, self.region_bytes] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        for value in [
            self.gen.current,
            self.gen.bitmap,
            self.gen.history[0],
            self.gen.history[1],
        ] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        let bitmap_len = self.bitmap.encoded_len();
        out.extend_from_slice(&(bitmap_len as u32).to_le_bytes());
        debug_assert_eq!(out.len() - start, HEADER_BYTES);
        self.bitmap.encode(out);
        let crc = crc32c::crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
        assert!(out.len() - start <= META_BYTES_MAX);
    }

    /// Strictly decodes metadata: the whole input must be exactly one record.
    pub fn decode(bytes: &[u8]) -> Result<Meta, MetaError> {
        if bytes.len() < HEADER_BYTES + CRC_BYTES || bytes.len() > META_BYTES_MAX {
            return Err(MetaError::BadLength {
                got: bytes.len(),
                expected: HEADER_BYTES + CRC_BYTES,
            });
        }
        if bytes[0..4] != MAGIC {
            return Err(MetaError::BadMagic);
        }
        if bytes[4] != VERSION {
            return Err(MetaError::BadVersion(bytes[4]));
        }
        let flags = bytes[5];
        if flags & !FLAGS_KNOWN != 0 || bytes[6..8] != [0; 2] {
            return Err(MetaError::ReservedBits);
        }
        let bitmap_len = le_u32(&bytes[64..68]) as usize;
        let expected = HEADER_BYTES + bitmap_len + CRC_BYTES;
        if bytes.len() != expected {
            return Err(MetaError::BadLength {
                got: bytes.len(),
                expected,
            });
        }
        let (body, crc) = bytes.split_at(expected - CRC_BYTES);
        if crc32c::crc32c(body) != le_u32(crc) {
            return Err(MetaError::BadChecksum);
        }
        let field = |index: usize| le_u64(&bytes[8 + index * 8..16 + index * 8]);
        let bitmap = Bitmap::decode(&body[HEADER_BYTES..])?;
        let meta = Meta {
            lun_key: field(0),
            size_bytes: field(1),
            region_bytes: field(2),
            gen: GenIds {
                current: field(3),
                bitmap: field(4),
                history: [field(5), field(6)],
            },
            flags: MetaFlags {
                outdated: flags & FLAG_OUTDATED != 0,
                inconsistent: flags & FLAG_INCONSISTENT != 0,
                primary: flags & FLAG_PRIMARY != 0,
                peer_outdated: flags & FLAG_PEER_OUTDATED != 0,
                crashed: flags & FLAG_CRASHED != 0,
                intent_log: flags & FLAG_INTENT_LOG != 0,
            },
            bitmap,
        };
        if meta.bitmap.size_bytes() != meta.size_bytes
            || meta.bitmap.region_bytes() != meta.region_bytes
        {
            return Err(MetaError::GeometryMismatch);
        }
        Ok(meta)
    }

    /// The metadata file path for a backing file path (`lun0.img` → `lun0.img.meta`).
    pub fn path_for(backing: &std::path::Path) -> std::path::PathBuf {
        let mut name = backing.as_os_str().to_owned();
        name.push(".meta");
        std::path::PathBuf::from(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Meta {
        let mut meta = Meta::new(42, 64 << 20, 1 << 20).unwrap();
        meta.gen = GenIds {
            current: 9,
            bitmap: 8,
            history: [7, 6],
        };
        meta.flags.peer_outdated = true;
        meta.flags.primary = true;
        meta.flags.crashed = true;
        meta.flags.intent_log = true;
        meta.bitmap.mark(3 << 20, 5);
        meta
    }

    #[test]
    fn round_trip_and_damage() {
        let meta = sample();
        let mut bytes = Vec::new();
        meta.encode(&mut bytes);
        assert_eq!(Meta::decode(&bytes).unwrap(), meta);
        for index in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[index] ^= 0x01;
            assert!(Meta::decode(&bad).is_err(), "flip at {index} accepted");
        }
        assert!(Meta::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn path_for_appends_suffix() {
        assert_eq!(
            Meta::path_for(std::path::Path::new("/d/lun0.img")),
            std::path::PathBuf::from("/d/lun0.img.meta")
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Meta::decode(&bytes);
        }
    }
}
