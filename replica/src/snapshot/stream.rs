//! The diff stream between two snapshots (`twinsan snapshot diff` / `apply`), sans-I/O.
//!
//! A stream is the magic `TWSNDIFF` then records. Every record is
//! `type: u16, flags: u16, body_len: u32, body, crc32c: u32` (little endian; the checksum
//! covers type, flags, length and body), so a reader checks each record before using it
//! and can step over one it does not know: a record whose flags have [`OPTIONAL`] set may be
//! skipped; an unknown record without it is refused (it changes what the data means). The
//! first record is the header, which binds the stream to its base: the snapshot id it
//! starts from (`from_guid`, 0 for a full stream) and the one it produces. The last is the
//! end record with the totals, so a cut-off stream is detected. Holes stay holes: ranges
//! that became zeros travel as zero records, never as bytes.

use crate::snapshot::{SnapshotName, NAME_BYTES_MAX};

/// The first 8 bytes of every stream.
pub const MAGIC: [u8; 8] = *b"TWSNDIFF";
/// The format this code writes; it reads this one.
pub const VERSION: u16 = 1;
/// Largest body of a record: a data record carries at most 1 MiB.
pub const BODY_BYTES_MAX: usize = (1 << 20) + 16;
/// Data bytes per data record (the writer's choice; the reader accepts up to the body bound).
pub const DATA_BYTES_PER_RECORD: usize = 1 << 20;
/// Flag: a reader that does not know this record type may skip it.
pub const OPTIONAL: u16 = 1;
/// Bytes around each body: type, flags, length before; checksum after.
pub const RECORD_OVERHEAD_BYTES: usize = 12;

const T_HEADER: u16 = 1;
const T_DATA: u16 = 2;
const T_ZERO: u16 = 3;
const T_END: u16 = 4;

/// What the stream is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Logical block size of the LUN.
    pub block_size: u32,
    /// Size of the LUN.
    pub size_bytes: u64,
    /// The snapshot the stream applies to (0: a full stream, applied to nothing).
    pub from_guid: u64,
    /// The snapshot it produces.
    pub to_guid: u64,
    /// The produced snapshot's name.
    pub to_name: SnapshotName,
    /// When that snapshot was cut.
    pub created_unix_ms: u64,
}

/// Totals, in the end record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Data records.
    pub data_records: u64,
    /// Bytes in them.
    pub data_bytes: u64,
    /// Zero records.
    pub zero_records: u64,
    /// Bytes they zero.
    pub zero_bytes: u64,
}

/// One record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// The header (first).
    Header(Header),
    /// Bytes at an offset.
    Data {
        /// Byte offset.
        offset: u64,
        /// The bytes.
        bytes: &'a [u8],
    },
    /// A range that reads as zeros (deallocated where applied).
    Zero {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// The end, with the totals of the records before it.
    End(Totals),
    /// A record this reader does not know, marked optional: skipped.
    Skipped {
        /// Its type.
        kind: u16,
    },
}

/// Why a stream is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// Not a twinsan diff stream.
    #[error("not a twinsan snapshot diff stream (bad magic)")]
    BadMagic,
    /// A record's checksum does not match: the stream was damaged.
    #[error("record {index}: checksum mismatch (the stream is damaged)")]
    BadChecksum {
        /// Record number from 0.
        index: u64,
    },
    /// A record longer than any this format writes.
    #[error("record {index}: {len} bytes, more than the format allows")]
    TooLong {
        /// Record number.
        index: u64,
        /// Its length.
        len: u32,
    },
    /// A record this reader does not know, not marked optional.
    #[error("record {index}: type {kind} is unknown and not optional (a newer twinsan wrote it)")]
    Unknown {
        /// Record number.
        index: u64,
        /// Its type.
        kind: u16,
    },
    /// A record whose body does not parse.
    #[error("record {index}: malformed {what}")]
    Malformed {
        /// Record number.
        index: u64,
        /// What.
        what: &'static str,
    },
    /// A newer format version.
    #[error("stream format version {0} (this twinsan reads {VERSION})")]
    Version(u16),
    /// The records do not follow the format's order, or cross the LUN's end.
    #[error("record {index}: {what}")]
    Order {
        /// Record number.
        index: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// The stream ends before its end record, or the totals differ.
    #[error("the stream is incomplete: {0}")]
    Truncated(&'static str),
}

fn put_record(kind: u16, flags: u16, body: &[u8], out: &mut Vec<u8>) {
    assert!(body.len() <= BODY_BYTES_MAX, "records are bounded");
    let start = out.len();
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Writes a stream record by record into `out` (the caller drains `out` as it likes).
#[derive(Debug)]
pub struct Writer {
    size_bytes: u64,
    totals: Totals,
}

impl Writer {
    /// Starts a stream: the magic and the header.
    pub fn start(h: &Header, out: &mut Vec<u8>) -> Writer {
        out.extend_from_slice(&MAGIC);
        let mut b = Vec::with_capacity(48 + NAME_BYTES_MAX);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&h.block_size.to_le_bytes());
        for v in [h.size_bytes, h.from_guid, h.to_guid, h.created_unix_ms] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let name = h.to_name.as_str().as_bytes();
        b.push(name.len() as u8);
        b.extend_from_slice(name);
        put_record(T_HEADER, 0, &b, out);
        Writer {
            size_bytes: h.size_bytes,
            totals: Totals::default(),
        }
    }

    /// Bytes at `offset` (at most [`DATA_BYTES_PER_RECORD`]).
    pub fn data(&mut self, offset: u64, bytes: &[u8], out: &mut Vec<u8>) {
        assert!(
            bytes.len() <= DATA_BYTES_PER_RECORD,
            "split data into records"
        );
        assert!(
            offset + bytes.len() as u64 <= self.size_bytes,
            "inside the LUN"
        );
        let mut b = Vec::with_capacity(8 + bytes.len());
        b.extend_from_slice(&offset.to_le_bytes());
        b.extend_from_slice(bytes);
        put_record(T_DATA, 0, &b, out);
        self.totals.data_records += 1;
        self.totals.data_bytes += bytes.len() as u64;
    }

    /// `len` bytes at `offset` read as zeros.
    pub fn zero(&mut self, offset: u64, len: u64, out: &mut Vec<u8>) {
        assert!(offset + len <= self.size_bytes, "inside the LUN");
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&offset.to_le_bytes());
        b[8..].copy_from_slice(&len.to_le_bytes());
        put_record(T_ZERO, 0, &b, out);
        self.totals.zero_records += 1;
        self.totals.zero_bytes += len;
    }

    /// Ends the stream; returns its totals.
    pub fn finish(self, out: &mut Vec<u8>) -> Totals {
        let t = self.totals;
        let mut b = Vec::with_capacity(32);
        for v in [t.data_records, t.data_bytes, t.zero_records, t.zero_bytes] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        put_record(T_END, 0, &b, out);
        t
    }
}

/// Reads a stream record by record, checking each and the order of all.
#[derive(Debug, Default)]
pub struct Reader {
    magic_seen: bool,
    index: u64,
    header: Option<Header>,
    totals: Totals,
    ended: bool,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Reader {
    /// A reader at the start of a stream.
    pub fn new() -> Reader {
        Reader::default()
    }

    /// The header, once read.
    pub fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }

    /// Whether the end record was read (and the totals matched).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The next record in `bytes`, and how many bytes it used; `Ok(None)`: more bytes are
    /// needed (none are used).
    pub fn next<'a>(
        &mut self,
        bytes: &'a [u8],
    ) -> Result<Option<(Record<'a>, usize)>, StreamError> {
        let mut used = 0;
        if !self.magic_seen {
            if bytes.len() < MAGIC.len() {
                return Ok(None);
            }
            if bytes[..MAGIC.len()] != MAGIC {
                return Err(StreamError::BadMagic);
            }
            used = MAGIC.len();
        }
        let rest = &bytes[used..];
        if rest.len() < 8 {
            return Ok(None);
        }
        let index = self.index;
        let kind = u16::from_le_bytes([rest[0], rest[1]]);
        let flags = u16::from_le_bytes([rest[2], rest[3]]);
        let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len as usize > BODY_BYTES_MAX {
            return Err(StreamError::TooLong { index, len });
        }
        let total = 8 + len as usize + 4;
        if rest.len() < total {
            return Ok(None);
        }
        let crc = u32::from_le_bytes([
            rest[total - 4],
            rest[total - 3],
            rest[total - 2],
            rest[total - 1],
        ]);
        if crc32c::crc32c(&rest[..total - 4]) != crc {
            return Err(StreamError::BadChecksum { index });
        }
        let body = &rest[8..total - 4];
        let record = self.parse(index, kind, flags, body)?;
        self.magic_seen = true;
        self.index += 1;
        Ok(Some((record, used + total)))
    }

    fn parse<'a>(
        &mut self,
        index: u64,
        kind: u16,
        flags: u16,
        body: &'a [u8],
    ) -> Result<Record<'a>, StreamError> {
        let malformed = |what| StreamError::Malformed { index, what };
        let order = |what| StreamError::Order { index, what };
        if self.ended {
            return Err(order("a record after the end record"));
        }
        if self.header.is_none() && kind != T_HEADER {
            return Err(order("the first record is not the header"));
        }
        let size = self.header.as_ref().map_or(0, |h| h.size_bytes);
        let inside = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|e| e <= size);
        match kind {
            T_HEADER => {
                if self.header.is_some() {
                    return Err(order("a second header"));
                }
                if body.len() < 2 + 4 + 32 + 1 {
                    return Err(malformed("header"));
                }
                let version = u16::from_le_bytes([body[0], body[1]]);
                if version != VERSION {
                    return Err(StreamError::Version(version));
                }
                let block_size = u32::from_le_bytes([body[2], body[3], body[4], body[5]]);
                let name_len = usize::from(body[38]);
                let name = body
                    .get(39..39 + name_len)
                    .and_then(|n| std::str::from_utf8(n).ok())
                    .and_then(|n| SnapshotName::parse(n).ok())
                    .ok_or_else(|| malformed("header name"))?;
                let h = Header {
                    block_size,
                    size_bytes: u64_at(body, 6),
                    from_guid: u64_at(body, 14),
                    to_guid: u64_at(body, 22),
                    created_unix_ms: u64_at(body, 30),
                    to_name: name,
                };
                if h.block_size == 0 || !h.size_bytes.is_multiple_of(u64::from(h.block_size)) {
                    return Err(malformed("header geometry"));
                }
                self.header = Some(h.clone());
                Ok(Record::Header(h))
            }
            T_DATA => {
                if body.len() < 8 {
                    return Err(malformed("data record"));
                }
                let offset = u64_at(body, 0);
                let bytes = &body[8..];
                if !inside(offset, bytes.len() as u64) {
                    return Err(order("data beyond the LUN's end"));
                }
                self.totals.data_records += 1;
                self.totals.data_bytes += bytes.len() as u64;
                Ok(Record::Data { offset, bytes })
            }
            T_ZERO => {
                if body.len() != 16 {
                    return Err(malformed("zero record"));
                }
                let (offset, len) = (u64_at(body, 0), u64_at(body, 8));
                if !inside(offset, len) {
                    return Err(order("zeros beyond the LUN's end"));
                }
                self.totals.zero_records += 1;
                self.totals.zero_bytes += len;
                Ok(Record::Zero { offset, len })
            }
            T_END => {
                if body.len() != 32 {
                    return Err(malformed("end record"));
                }
                let t = Totals {
                    data_records: u64_at(body, 0),
                    data_bytes: u64_at(body, 8),
                    zero_records: u64_at(body, 16),
                    zero_bytes: u64_at(body, 24),
                };
                if t != self.totals {
                    return Err(StreamError::Truncated(
                        "the end record's totals differ from the records read",
                    ));
                }
                self.ended = true;
                Ok(Record::End(t))
            }
            other if flags & OPTIONAL != 0 => Ok(Record::Skipped { kind: other }),
            other => Err(StreamError::Unknown { index, kind: other }),
        }
    }
}

/// The fuzz target's body (and the corpus replay's): `data` read as a stream, fed to the
/// reader in pieces whose size the first byte picks, must never panic; a stream that reads
/// to its end record, written again from its records, gives the same bytes (the format has
/// one encoding).
pub fn fuzz(data: &[u8]) {
    let Some((&step, bytes)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut r = Reader::new();
    let mut fed = 0;
    let mut at = 0;
    let mut out = Vec::new();
    let mut w: Option<Writer> = None;
    loop {
        match r.next(&bytes[at..fed]) {
            Ok(Some((rec, used))) => {
                at += used;
                match rec {
                    Record::Header(h) => w = Some(Writer::start(&h, &mut out)),
                    Record::Data { offset, bytes } if bytes.len() <= DATA_BYTES_PER_RECORD => {
                        if let Some(w) = w.as_mut() {
                            w.data(offset, bytes, &mut out);
                        }
                    }
                    Record::Zero { offset, len } => {
                        if let Some(w) = w.as_mut() {
                            w.zero(offset, len, &mut out);
                        }
                    }
                    Record::End(_) => {
                        if let Some(w) = w.take() {
                            w.finish(&mut out);
                            assert_eq!(out[..], bytes[..at], "a stream re-encodes to itself");
                        }
                        return;
                    }
                    // An optional record the writer never makes: no canonical form to check.
                    _ => w = None,
                }
            }
            Ok(None) if fed == bytes.len() => return,
            Ok(None) => fed = (fed + step).min(bytes.len()),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            block_size: 512,
            size_bytes: 1 << 20,
            from_guid: 7,
            to_guid: 9,
            to_name: SnapshotName::parse("daily-1").unwrap(),
            created_unix_ms: 1234,
        }
    }

    fn sample() -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer::start(&header(), &mut out);
        w.data(4096, &[1, 2, 3, 4], &mut out);
        w.zero(8192, 65536, &mut out);
        w.finish(&mut out);
        out
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<String>, StreamError> {
        let mut r = Reader::new();
        let mut at = 0;
        let mut seen = Vec::new();
        while let Some((rec, used)) = r.next(&bytes[at..])? {
            seen.push(format!("{rec:?}"));
            at += used;
        }
        if !r.ended() {
            return Err(StreamError::Truncated("no end record"));
        }
        Ok(seen)
    }

    proptest::proptest! {
        /// Valid streams of random records read back, in pieces of any size, as written;
        /// any byte changed, or any bytes at all, never panic the reader.
        #[test]
        fn streams_round_trip_and_damage_never_panics(
            records in proptest::collection::vec((0u64..1 << 19, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600), proptest::prelude::any::<bool>()), 0..8),
            step in 1u8..255,
            flip in proptest::prelude::any::<(usize, u8)>(),
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let mut out = Vec::new();
            let mut w = Writer::start(&header(), &mut out);
            for (offset, bytes, zero) in &records {
                if *zero {
                    w.zero(*offset, bytes.len() as u64, &mut out);
                } else {
                    w.data(*offset, bytes, &mut out);
                }
            }
            w.finish(&mut out);
            let mut input = vec![step];
            input.extend_from_slice(&out);
            fuzz(&input);
            proptest::prop_assert_eq!(read_all(&out).unwrap().len(), records.len() + 2);
            let mut bad = input.clone();
            let i = 1 + flip.0 % out.len();
            bad[i] ^= flip.1 | 1;
            fuzz(&bad);
            proptest::prop_assert!(read_all(&bad[1..]).is_err());
            fuzz(&junk);
        }
    }

    #[test]
    fn a_stream_reads_back_as_written() {
        let s = read_all(&sample()).unwrap();
        assert_eq!(s.len(), 4);
        assert!(s[0].contains("daily-1") && s[0].contains("from_guid: 7"));
        assert!(s[1].contains("offset: 4096"));
        assert!(s[2].contains("len: 65536"));
    }

    #[test]
    fn every_damaged_byte_and_every_cut_is_detected() {
        let good = sample();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(read_all(&bad).is_err(), "a flip at byte {i} went unnoticed");
        }
        for cut in 0..good.len() {
            assert!(
                read_all(&good[..cut]).is_err(),
                "a cut at {cut} went unnoticed"
            );
        }
    }

    #[test]
    fn unknown_records_are_skipped_only_when_optional() {
        let good = sample();
        // An optional record of a future type, inserted before the end record.
        let end_len = 8 + 32 + 4;
        let (head, end) = good.split_at(good.len() - end_len);
        let mut opt = head.to_vec();
        put_record(99, OPTIONAL, b"future", &mut opt);
        opt.extend_from_slice(end);
        let s = read_all(&opt).unwrap();
        assert!(s.iter().any(|r| r.contains("Skipped { kind: 99 }")));
        let mut req = head.to_vec();
        put_record(99, 0, b"future", &mut req);
        req.extend_from_slice(end);
        assert!(matches!(
            read_all(&req),
            Err(StreamError::Unknown { kind: 99, .. })
        ));
    }

    #[test]
    fn ranges_beyond_the_lun_and_misordered_records_are_refused() {
        let mut out = MAGIC.to_vec();
        put_record(T_DATA, 0, &[0; 12], &mut out);
        assert!(matches!(read_all(&out), Err(StreamError::Order { .. })));
        let mut out = Vec::new();
        let _w = Writer::start(&header(), &mut out);
        let mut body = Vec::new();
        body.extend_from_slice(&((1u64 << 20) - 8).to_le_bytes());
        body.extend_from_slice(&16u64.to_le_bytes());
        put_record(T_ZERO, 0, &body, &mut out);
        assert!(matches!(read_all(&out), Err(StreamError::Order { .. })));
    }
}
