//! Diff streams between two snapshots' clones (`replica::snapshot::stream` is the format):
//! computing one, and applying one to a LUN's file.
//!
//! Only ranges that hold data in either clone are read (SEEK_DATA), and of those not the
//! ones both clones share on the device (FIEMAP, disk/fiemap.rs: reflink clones share every
//! block neither was written at since), so a diff reads what changed between the two
//! snapshots, not all they hold. The stream carries exactly the grains whose content
//! differs: data where the new content has bytes, a zero record where it reads as zeros (a
//! hole stays a hole where the stream is applied).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use replica::snapshot::stream::{Header, Reader, Record, Totals, Writer, DATA_BYTES_PER_RECORD};

use crate::disk::allocation::{punch, seek};

/// Bytes compared at once.
const WINDOW_BYTES: u64 = DATA_BYTES_PER_RECORD as u64;

/// The unit of comparison: a grain is sent whole or not at all.
fn grain_bytes(h: &Header) -> u64 {
    if h.size_bytes.is_multiple_of(4096) {
        4096
    } else {
        u64::from(h.block_size)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Grain {
    Same,
    Data,
    Zero,
}

/// Writes the stream that turns `from` (None: an empty LUN) into `to` to `out`.
pub fn write_diff(
    from: Option<&File>,
    to: &File,
    header: &Header,
    out: &mut impl Write,
) -> std::io::Result<Totals> {
    let size = header.size_bytes;
    let grain = grain_bytes(header);
    let mut buf = Vec::with_capacity(2 * DATA_BYTES_PER_RECORD);
    let mut w = Writer::start(header, &mut buf);
    let mut a = vec![0u8; WINDOW_BYTES as usize];
    let mut b = vec![0u8; WINDOW_BYTES as usize];
    let shared = from.map_or_else(Vec::new, |f| shared_ranges(f, to, size, grain));
    let mut off = 0u64;
    while off < size {
        let next = [Some(to), from]
            .into_iter()
            .flatten()
            .filter_map(|f| seek(f, off, true))
            .min();
        let Some(start) = next.filter(|&s| s < size) else {
            break;
        };
        // Windows start on a grain.
        let start = start - start % grain;
        let end = (start + WINDOW_BYTES).min(size);
        let n = (end - start) as usize;
        // What both clones share is the same in both: left as zeros in both buffers, it
        // compares equal without a read, and every record comes out as a full
        // comparison would make it (the stream does not depend on the extent layout, so a
        // resumed ship regenerates the same bytes).
        // A window with many small unshared pieces (scattered small writes) is read
        // whole: one read beats dozens of small ones, and compares the same.
        let sparse = unshared_pieces(start, end, &shared) > PIECES_PER_WINDOW_MAX;
        let skip: &[(u64, u64)] = if sparse { &[] } else { &shared };
        read_unshared(Some(to), start, &mut b[..n], skip)?;
        read_unshared(from, start, &mut a[..n], skip)?;
        let mut run: Option<(Grain, u64)> = None;
        let mut g = start;
        while g < end {
            let ge = (g + grain).min(end);
            let (i, j) = ((g - start) as usize, (ge - start) as usize);
            let kind = if a[i..j] == b[i..j] {
                Grain::Same
            } else if b[i..j].iter().all(|&x| x == 0) {
                Grain::Zero
            } else {
                Grain::Data
            };
            match run {
                Some((k, _)) if k == kind => {}
                _ => {
                    if let Some((k, s)) = run {
                        emit(&mut w, k, s, g, start, &b, &mut buf);
                    }
                    run = Some((kind, g));
                }
            }
            g = ge;
        }
        if let Some((k, s)) = run {
            emit(&mut w, k, s, end, start, &b, &mut buf);
        }
        out.write_all(&buf)?;
        buf.clear();
        off = end;
    }
    let t = w.finish(&mut buf);
    out.write_all(&buf)?;
    out.flush()?;
    Ok(t)
}

/// The whole grains the two clones share on the device, or none when that cannot be known
/// (no FIEMAP, too many extents): then every range is compared.
fn shared_ranges(from: &File, to: &File, size: u64, grain: u64) -> Vec<(u64, u64)> {
    use crate::disk::fiemap::{extents, shared};
    match (extents(from, size), extents(to, size)) {
        (Ok(a), Ok(b)) => shared(&a, &b)
            .into_iter()
            .map(|(s, e)| (s.div_ceil(grain) * grain, e - e % grain))
            .filter(|(s, e)| s < e)
            .collect(),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(error = %e, "no extent map: the diff compares all data");
            Vec::new()
        }
    }
}

fn emit(w: &mut Writer, k: Grain, s: u64, e: u64, base: u64, b: &[u8], out: &mut Vec<u8>) {
    match k {
        Grain::Same => {}
        Grain::Zero => w.zero(s, e - s, out),
        Grain::Data => w.data(s, &b[(s - base) as usize..(e - base) as usize], out),
    }
}

/// Above this many unshared pieces in a window, the window is read whole (measured on a
/// 1 GiB clone pair: 53K scattered 4 KiB changes read piecewise took as long as reading
/// it all, 64 MiB of clustered ones 0.8 s instead of 5-7 s; docs/performance.md).
const PIECES_PER_WINDOW_MAX: usize = 8;

/// How many separate ranges of `[start, end)` `shared` leaves uncovered.
fn unshared_pieces(start: u64, end: u64, shared: &[(u64, u64)]) -> usize {
    let mut pieces = 0;
    let mut at = start;
    for &(s, e) in &shared[shared.partition_point(|&(_, e)| e <= start)..] {
        if s >= end {
            break;
        }
        if s > at {
            pieces += 1;
        }
        at = e;
    }
    pieces + usize::from(at < end)
}

/// Reads `buf.len()` bytes at `offset` of `f` except where `shared` (sorted, disjoint)
/// covers them: zeros there, past the file's end, or for no file.
fn read_unshared(
    f: Option<&File>,
    offset: u64,
    buf: &mut [u8],
    shared: &[(u64, u64)],
) -> std::io::Result<()> {
    let end = offset + buf.len() as u64;
    let mut at = offset;
    let mut k = shared.partition_point(|&(_, e)| e <= offset);
    while at < end {
        let (next_shared, skip_to) = match shared.get(k) {
            Some(&(s, e)) if s < end => (s.max(at), e.min(end)),
            _ => (end, end),
        };
        if next_shared > at {
            let (i, j) = ((at - offset) as usize, (next_shared - offset) as usize);
            read_window(f, at, &mut buf[i..j])?;
        }
        if skip_to > next_shared {
            let (i, j) = ((next_shared - offset) as usize, (skip_to - offset) as usize);
            buf[i..j].fill(0);
        }
        at = skip_to.max(next_shared);
        k += 1;
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `offset` of `f`, zeros past its end or for no file.
fn read_window(f: Option<&File>, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    buf.fill(0);
    let Some(f) = f else { return Ok(()) };
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Why a stream was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Stream(#[from] replica::snapshot::stream::StreamError),
    #[error("reading the stream: {0}")]
    Read(std::io::Error),
    #[error("writing the LUN: {0}")]
    Write(std::io::Error),
    #[error("the stream ends before its end record (cut off?)")]
    Incomplete,
}

/// Reads the stream's header from `r`, and returns it with the reader state and the bytes
/// read past it.
pub fn read_header(r: &mut impl Read) -> Result<(Header, Reader, Vec<u8>), ApplyError> {
    let mut reader = Reader::new();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let got = match reader.next(&buf)? {
            Some((Record::Header(h), used)) => Some((h, used)),
            // The reader refuses anything else before the header.
            Some(_) => return Err(ApplyError::Incomplete),
            None => None,
        };
        if let Some((h, used)) = got {
            buf.drain(..used);
            return Ok((h, reader, buf));
        }
        let n = r.read(&mut chunk).map_err(ApplyError::Read)?;
        if n == 0 {
            return Err(ApplyError::Incomplete);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Applies the records after the header to `live`; `on_data(offset, len)` and
/// `on_zero(offset, len)` are told each change (the allocation map).
pub fn apply_records(
    mut reader: Reader,
    mut buf: Vec<u8>,
    r: &mut impl Read,
    live: &File,
    mut changed: impl FnMut(u64, u64, bool),
) -> Result<Totals, ApplyError> {
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let mut at = 0;
        while let Some((rec, used)) = reader.next(&buf[at..])? {
            match rec {
                Record::Data { offset, bytes } => {
                    live.write_all_at(bytes, offset)
                        .map_err(ApplyError::Write)?;
                    changed(offset, bytes.len() as u64, true);
                }
                Record::Zero { offset, len } => {
                    punch(live, offset, len).map_err(ApplyError::Write)?;
                    changed(offset, len, false);
                }
                Record::End(t) => return Ok(t),
                Record::Header(_) | Record::Skipped { .. } => {}
            }
            at += used;
        }
        buf.drain(..at);
        let n = r.read(&mut chunk).map_err(ApplyError::Read)?;
        if n == 0 {
            return Err(ApplyError::Incomplete);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replica::snapshot::SnapshotName;

    #[test]
    fn only_unshared_pieces_are_read_and_counted() {
        let shared = [(100, 200), (300, 350), (900, 1000)];
        assert_eq!(unshared_pieces(0, 1000, &shared), 3);
        assert_eq!(unshared_pieces(100, 200, &shared), 0);
        assert_eq!(unshared_pieces(150, 320, &shared), 1);
        assert_eq!(unshared_pieces(0, 50, &[]), 1);
        // The file holds 0xaa everywhere; shared ranges come back as zeros, unread.
        let dir = scratch("unshared");
        let p = dir.join("f");
        std::fs::write(&p, vec![0xaau8; 1000]).unwrap();
        let f = File::open(&p).unwrap();
        let mut buf = vec![1u8; 500];
        read_unshared(Some(&f), 50, &mut buf, &shared).unwrap();
        for (i, &b) in buf.iter().enumerate() {
            let at = 50 + i as u64;
            let is_shared = shared.iter().any(|&(s, e)| s <= at && at < e);
            assert_eq!(b, if is_shared { 0 } else { 0xaa }, "byte {at}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("twinsan-diff-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn file(dir: &std::path::Path, name: &str, size: u64) -> File {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(name))
            .unwrap();
        f.set_len(size).unwrap();
        f
    }

    /// diff(A, B) applied to a copy of A gives B byte for byte, and carries only what
    /// changed: the rewritten grains as data, the zeroed one as a zero record.
    #[test]
    fn a_diff_applied_to_its_base_reproduces_the_new_content() {
        let d = scratch("apply");
        let size = 8u64 << 20;
        let a = file(&d, "a", size);
        let b = file(&d, "b", size);
        let base = file(&d, "base", size);
        let pattern: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8 + 1).collect();
        for f in [&a, &b, &base] {
            f.write_all_at(&pattern, 1 << 20).unwrap();
            f.write_all_at(&pattern, 5 << 20).unwrap();
        }
        b.write_all_at(&[9u8; 4096], (1 << 20) + 4096).unwrap(); // changed
        b.write_all_at(&[0u8; 4096], 5 << 20).unwrap(); // zeroed
        b.write_all_at(&[7u8; 100], 7 << 20).unwrap(); // new (one grain)
        let h = Header {
            block_size: 512,
            size_bytes: size,
            from_guid: 1,
            to_guid: 2,
            to_name: SnapshotName::parse("b").unwrap(),
            created_unix_ms: 0,
        };
        let mut stream = Vec::new();
        let t = write_diff(Some(&a), &b, &h, &mut stream).unwrap();
        assert_eq!(t.data_bytes, 2 * 4096, "only the changed grains");
        assert_eq!((t.zero_records, t.zero_bytes), (1, 4096));
        let mut r = &stream[..];
        let (got, reader, rest) = read_header(&mut r).unwrap();
        assert_eq!(got, h);
        apply_records(reader, rest, &mut r, &base, |_, _, _| {}).unwrap();
        let (mut x, mut y) = (vec![0u8; size as usize], vec![0u8; size as usize]);
        b.read_exact_at(&mut x, 0).unwrap();
        base.read_exact_at(&mut y, 0).unwrap();
        assert!(x == y, "applied copy differs");
        // A full stream of B applied to an empty file gives B too.
        let empty = file(&d, "empty", size);
        let mut full = Vec::new();
        write_diff(None, &b, &h, &mut full).unwrap();
        let mut r = &full[..];
        let (_, reader, rest) = read_header(&mut r).unwrap();
        apply_records(reader, rest, &mut r, &empty, |_, _, _| {}).unwrap();
        empty.read_exact_at(&mut y, 0).unwrap();
        assert!(x == y, "full stream differs");
        // A stream cut before its end record is refused.
        let mut r = &stream[..stream.len() - 10];
        let (_, reader, rest) = read_header(&mut r).unwrap();
        assert!(apply_records(reader, rest, &mut r, &empty, |_, _, _| {}).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
