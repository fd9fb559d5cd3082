//! Self-describing blocks and the per-block expectation tracker of `--verify`.
//!
//! Every 512-byte sector written in verify mode carries:
//!
//! | bytes     | content                                              |
//! |-----------|------------------------------------------------------|
//! | 0..8      | magic `TWSNVRF1`                                     |
//! | 8..16     | sector number (byte offset / 512), little-endian     |
//! | 16..24    | write generation (globally increasing per ack log)   |
//! | 24..508   | filler derived from (sector, generation)             |
//! | 508..512  | CRC32C of bytes 0..508, little-endian                |
//!
//! The tracker holds, per I/O unit (`bs` bytes at a `bs`-aligned offset), the generation
//! of the last acknowledged write and the generation of a write that was sent but never
//! answered (either may be on disk). A unit is also "busy" while any command touches it, so
//! two in-flight commands never overlap and the expectation of a read is well defined.
//!
//! Unacknowledged writes: a write is acknowledged only by a GOOD answer to it. One whose
//! connection was lost, that failed, was answered BUSY, or was abandoned stays pending: it
//! may have reached the medium whole, in part (per sector) or not at all, so a read accepts
//! the acknowledged generation or any later one sent to the unit, until a write to the unit
//! is acknowledged. `--reconnect` sends such a write again unchanged (same data, same
//! generation, the unit still claimed): if the lost copy lands late, it writes the same
//! bytes, and the GOOD answer to the copy that was sent again acknowledges it.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{bail, Context};

pub const SECTOR: usize = 512;
/// Set in an expectation (acknowledged or pending) when that operation was an UNMAP: the
/// unit reads as zeros (a target with LBPRZ=1) rather than as a stamp of the generation.
/// Pending, it is sticky until a write is acknowledged: a lost UNMAP may have deallocated
/// the unit whatever was sent to it after.
pub const UNMAPPED: u64 = 1 << 63;
const MAGIC: &[u8; 8] = b"TWSNVRF1";
const STATE_MAGIC: &[u8; 8] = b"TWSNACK1";

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` (a multiple of 512 bytes) with sectors stamped for `first_sector` onwards.
pub fn stamp(buf: &mut [u8], first_sector: u64, gen: u64) {
    for (i, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
        let sector = first_sector + i as u64;
        s[0..8].copy_from_slice(MAGIC);
        s[8..16].copy_from_slice(&sector.to_le_bytes());
        s[16..24].copy_from_slice(&gen.to_le_bytes());
        let mut x = sector ^ gen.rotate_left(32);
        for w in s[24..504].chunks_exact_mut(8) {
            w.copy_from_slice(&splitmix(&mut x).to_le_bytes());
        }
        s[504..508].copy_from_slice(&(splitmix(&mut x) as u32).to_le_bytes());
        let crc = crc32c::crc32c(&s[..508]);
        s[508..512].copy_from_slice(&crc.to_le_bytes());
    }
}

/// What one sector turned out to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectorState {
    /// A valid stamp for this sector with this generation.
    Gen(u64),
    /// All zeros (never written, or a hole).
    Zero,
    /// Valid stamp, but for another sector (misdirected write or read).
    WrongSector(u64),
    /// Neither zeros nor a consistent stamp (torn or corrupt).
    Garbage,
}

/// Decodes one 512-byte sector expected at `sector`.
pub fn inspect(s: &[u8], sector: u64) -> SectorState {
    debug_assert_eq!(s.len(), SECTOR);
    if &s[0..8] != MAGIC {
        return if s.iter().all(|&b| b == 0) {
            SectorState::Zero
        } else {
            SectorState::Garbage
        };
    }
    let crc = u32::from_le_bytes([s[508], s[509], s[510], s[511]]);
    if crc32c::crc32c(&s[..508]) != crc {
        return SectorState::Garbage;
    }
    let at = u64::from_le_bytes(s[8..16].try_into().unwrap());
    if at != sector {
        return SectorState::WrongSector(at);
    }
    SectorState::Gen(u64::from_le_bytes(s[16..24].try_into().unwrap()))
}

/// A verification failure, described for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub sector: u64,
    pub expected: u64,
    pub alternative: u64,
    pub found: SectorState,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sector {} (byte {}): expected generation {}",
            self.sector,
            self.sector * SECTOR as u64,
            self.expected
        )?;
        if self.alternative != 0 {
            write!(
                f,
                " (or {}..={}: writes not acknowledged)",
                self.expected + 1,
                self.alternative
            )?;
        }
        match self.found {
            SectorState::Gen(g) => write!(f, ", found generation {g}"),
            SectorState::Zero => write!(f, ", found zeros"),
            SectorState::WrongSector(s) => write!(f, ", found the block of sector {s}"),
            SectorState::Garbage => write!(f, ", found unstamped or corrupt data"),
        }
    }
}

/// Checks a read buffer that starts at `first_sector` against generation `expected`, the
/// last acknowledged write. With `alternative` non-zero (the latest write sent but not
/// acknowledged: lost with a connection, or failed, e.g. out of space), any generation in
/// `expected + 1 ..= alternative` is accepted too. Why a range: a unit has one command at
/// a time and generations only grow, so a stamp for this sector in that range can only be
/// from a write issued after the acknowledged one; a failed write may have reached the
/// medium in part (SBC: its range is indeterminate), and a later failed write does not
/// undo it. Older generations, zeros or other sectors' stamps are lost or misplaced data.
/// `expected == 0` means "no acknowledged write in this ack log": the run does not know
/// what the LUN held before (zeros, another tool's data, an older run's stamps), so zeros,
/// unstamped data and any generation are accepted; only another sector's stamp (data
/// written or read at the wrong place) is a mismatch. Returns the first bad sector.
/// An [`UNMAPPED`] flag in either makes zeros acceptable too (an acknowledged UNMAP: only
/// zeros or a later generation; a pending one: zeros as well as the rest).
pub fn check(buf: &[u8], first_sector: u64, expected: u64, alternative: u64) -> Option<Mismatch> {
    let zeros_ok = (expected | alternative) & UNMAPPED != 0;
    let (acked, latest) = (expected & !UNMAPPED, alternative & !UNMAPPED);
    for (i, s) in buf.chunks_exact(SECTOR).enumerate() {
        let sector = first_sector + i as u64;
        let found = inspect(s, sector);
        let ok = match found {
            SectorState::Gen(g) => {
                expected == 0
                    || (g == acked && expected & UNMAPPED == 0)
                    || (g > acked && g <= latest)
            }
            SectorState::Zero => expected == 0 || zeros_ok,
            SectorState::Garbage => expected == 0,
            SectorState::WrongSector(_) => false,
        };
        if !ok {
            return Some(Mismatch {
                sector,
                expected,
                alternative,
                found,
            });
        }
    }
    None
}

/// Per-unit expectations, shared by all sessions.
pub struct Tracker {
    unit_bytes: u64,
    acked: Vec<AtomicU64>,
    pending: Vec<AtomicU64>,
    busy: Vec<AtomicBool>,
    next_gen: AtomicU64,
}

/// Most units a tracker follows: 17 bytes of memory each, so 2^28 units is 4.25 GiB
/// (1 TiB at --bs 4k, 16 TiB at 64k). Beyond, --size verifies a part of the LUN.
pub const MAX_UNITS: u64 = 1 << 28;

/// Refuses a tracker of `units` units (before anything is allocated).
pub fn check_units(units: u64, unit_bytes: u64) -> anyhow::Result<()> {
    if units > MAX_UNITS {
        bail!(
            "--verify over {units} blocks of {unit_bytes} bytes needs {} MiB of memory for \
             its expectations; at most {MAX_UNITS} blocks: use --size for a part of the LUN \
             or a larger --bs",
            (units * 17) >> 20
        );
    }
    Ok(())
}

impl Tracker {
    /// A tracker for `units` units of `unit_bytes` each, nothing known.
    pub fn new(unit_bytes: u64, units: u64) -> Self {
        let n = units as usize;
        Self {
            unit_bytes,
            acked: (0..n).map(|_| AtomicU64::new(0)).collect(),
            pending: (0..n).map(|_| AtomicU64::new(0)).collect(),
            busy: (0..n).map(|_| AtomicBool::new(false)).collect(),
            next_gen: AtomicU64::new(1),
        }
    }

    pub fn units(&self) -> u64 {
        self.acked.len() as u64
    }

    pub fn unit_bytes(&self) -> u64 {
        self.unit_bytes
    }

    /// Claims a unit for one command; false if another command holds it.
    pub fn try_claim(&self, unit: u64) -> bool {
        self.busy[unit as usize]
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    pub fn release(&self, unit: u64) {
        self.busy[unit as usize].store(false, Ordering::Release);
    }

    /// Starts a write of `unit`: returns its generation and records it as pending ("sent,
    /// outcome unknown"). A write sent again after a lost connection keeps this generation.
    pub fn begin_write(&self, unit: u64) -> u64 {
        let gen = self.next_gen.fetch_add(1, Ordering::Relaxed);
        let p = &self.pending[unit as usize];
        p.store(
            gen | (p.load(Ordering::Relaxed) & UNMAPPED),
            Ordering::Relaxed,
        );
        gen
    }

    /// Starts an UNMAP of `unit`: its generation, recorded pending (zeros may be found
    /// from now on, until a write is acknowledged).
    pub fn begin_unmap(&self, unit: u64) -> u64 {
        let gen = self.next_gen.fetch_add(1, Ordering::Relaxed);
        self.pending[unit as usize].store(gen | UNMAPPED, Ordering::Relaxed);
        gen
    }

    /// The target acknowledged the UNMAP of `gen` to `unit`: it reads as zeros now.
    pub fn ack_unmap(&self, unit: u64, gen: u64) {
        self.acked[unit as usize].store(gen | UNMAPPED, Ordering::Relaxed);
        self.pending[unit as usize].store(0, Ordering::Relaxed);
    }

    /// The target acknowledged the write of `gen` to `unit` with GOOD status: the only way
    /// a write becomes acknowledged. Every earlier write's data is overwritten by it, so
    /// nothing unacknowledged remains acceptable.
    pub fn ack_write(&self, unit: u64, gen: u64) {
        self.acked[unit as usize].store(gen, Ordering::Relaxed);
        self.pending[unit as usize].store(0, Ordering::Relaxed);
    }

    /// Units whose latest write was sent but never acknowledged (lost with a connection,
    /// failed, or abandoned): a read of one accepts the acknowledged data before it or any
    /// unacknowledged write's since, until a write to it is acknowledged.
    pub fn unacknowledged_units(&self) -> u64 {
        self.pending
            .iter()
            .filter(|p| p.load(Ordering::Relaxed) != 0)
            .count() as u64
    }

    /// (acknowledged, unacknowledged-but-sent) generations for `unit`.
    pub fn expect(&self, unit: u64) -> (u64, u64) {
        (
            self.acked[unit as usize].load(Ordering::Relaxed),
            self.pending[unit as usize].load(Ordering::Relaxed),
        )
    }

    /// Units with any known write, in order.
    pub fn known_units(&self) -> Vec<u64> {
        (0..self.units())
            .filter(|&u| self.expect(u) != (0, 0))
            .collect()
    }

    /// Saves the ack log: unit size, then (unit, acked, pending) for every known unit.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("tmp");
        {
            let f = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            let mut w = BufWriter::new(f);
            w.write_all(STATE_MAGIC)?;
            w.write_all(&self.unit_bytes.to_le_bytes())?;
            w.write_all(&self.units().to_le_bytes())?;
            w.write_all(&self.next_gen.load(Ordering::Relaxed).to_le_bytes())?;
            for u in self.known_units() {
                let (a, p) = self.expect(u);
                for x in [u, a, p] {
                    w.write_all(&x.to_le_bytes())?;
                }
            }
            w.flush()?;
            w.get_ref().sync_all()?;
        }
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    }

    /// Loads an ack log written by [`Tracker::save`].
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut r = BufReader::new(f);
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        if &magic != STATE_MAGIC {
            bail!("{} is not a twinsan bench ack log", path.display());
        }
        let mut word = || -> std::io::Result<u64> {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            Ok(u64::from_le_bytes(b))
        };
        let unit_bytes = word()?;
        let units = word()?;
        let next_gen = word()?;
        if unit_bytes == 0 || !unit_bytes.is_multiple_of(SECTOR as u64) {
            bail!("{}: corrupt header", path.display());
        }
        check_units(units, unit_bytes).with_context(|| path.display().to_string())?;
        let t = Tracker::new(unit_bytes, units);
        t.next_gen.store(next_gen.max(1), Ordering::Relaxed);
        loop {
            let u = match word() {
                Ok(u) => u,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e.into()),
            };
            let (a, p) = (word()?, word()?);
            if u >= units {
                bail!("{}: unit {u} out of range", path.display());
            }
            t.acked[u as usize].store(a, Ordering::Relaxed);
            t.pending[u as usize].store(p, Ordering::Relaxed);
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_then_check() {
        let mut b = vec![0u8; 4096];
        stamp(&mut b, 80, 7);
        assert_eq!(check(&b, 80, 7, 0), None);
        assert_eq!(
            check(&b, 80, 0, 0),
            None,
            "unknown history accepts any valid stamp"
        );
        assert_eq!(
            check(&b, 80, 6, 7),
            None,
            "the unacknowledged generation is accepted"
        );
        let m = check(&b, 80, 8, 0).unwrap();
        assert_eq!((m.sector, m.found), (80, SectorState::Gen(7)));
        // A write after the acknowledged one that failed, then a later one that failed too:
        // either may have landed.
        assert_eq!(check(&b, 80, 5, 9), None);
        // Older than the acknowledged write: the acknowledged data was lost.
        assert_eq!(check(&b, 80, 8, 9).unwrap().found, SectorState::Gen(7));
        // Newer than anything sent: not from this run's writes to the unit.
        assert_eq!(check(&b, 80, 3, 6).unwrap().found, SectorState::Gen(7));
        // Misdirected: read at another LBA.
        assert_eq!(
            check(&b, 88, 7, 0).unwrap().found,
            SectorState::WrongSector(80)
        );
        // One flipped byte in sector 3.
        b[3 * 512 + 100] ^= 0x10;
        let m = check(&b, 80, 7, 0).unwrap();
        assert_eq!((m.sector, m.found), (83, SectorState::Garbage));
        assert!(m.to_string().contains("corrupt"));
    }

    #[test]
    fn unknown_history_accepts_foreign_data_but_not_another_sectors_block() {
        // A unit whose only write failed (or that was never written) on a LUN that held
        // other data before: that data is not a mismatch, a block stamped for another
        // sector is (a write or read at the wrong place).
        let foreign = vec![0x5au8; 1024];
        assert_eq!(check(&foreign, 40, 0, 3), None);
        assert_eq!(check(&foreign, 40, 0, 0), None);
        assert_eq!(
            check(&foreign, 40, 2, 3).unwrap().found,
            SectorState::Garbage
        );
        let mut b = vec![0u8; 1024];
        stamp(&mut b, 96, 5);
        assert_eq!(
            check(&b, 40, 0, 0).unwrap().found,
            SectorState::WrongSector(96)
        );
    }

    fn block(unit: u64, gen: u64) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        stamp(&mut b, unit * 8, gen);
        b
    }

    /// --reconnect: a write in flight when its connection died may or may not have landed.
    /// Until it is acknowledged a read accepts the old data, the new, or a mix per sector;
    /// sent again with the same generation and answered GOOD, only the new.
    #[test]
    fn a_write_lost_with_its_connection_is_old_or_new_until_acknowledged() {
        let t = Tracker::new(4096, 8);
        assert!(t.try_claim(2));
        let g1 = t.begin_write(2);
        t.ack_write(2, g1);
        let g2 = t.begin_write(2);
        // The connection dies here: no answer, and the unit stays claimed for the re-send.
        let (acked, pending) = t.expect(2);
        assert_eq!((acked, pending), (g1, g2), "never counted as acknowledged");
        assert_eq!(t.unacknowledged_units(), 1);
        assert_eq!(
            check(&block(2, g1), 16, acked, pending),
            None,
            "did not land"
        );
        assert_eq!(check(&block(2, g2), 16, acked, pending), None, "landed");
        let mut torn = block(2, g1);
        torn[..2048].copy_from_slice(&block(2, g2)[..2048]);
        assert_eq!(check(&torn, 16, acked, pending), None, "landed in part");
        // Anything else is still a mismatch.
        assert_eq!(
            check(&vec![0u8; 4096], 16, acked, pending).unwrap().found,
            SectorState::Zero
        );
        assert_eq!(
            check(&block(2, g2 + 1), 16, acked, pending).unwrap().found,
            SectorState::Gen(g2 + 1),
            "newer than anything sent to the unit"
        );
        assert_eq!(
            check(&block(3, g2), 16, acked, pending).unwrap().found,
            SectorState::WrongSector(24)
        );
        // Sent again unchanged on the new connection, answered GOOD: now acknowledged, and
        // the old data would be a lost write.
        t.ack_write(2, g2);
        t.release(2);
        let (acked, pending) = t.expect(2);
        assert_eq!((acked, pending), (g2, 0));
        assert_eq!(t.unacknowledged_units(), 0);
        assert_eq!(check(&block(2, g2), 16, acked, pending), None);
        assert_eq!(
            check(&block(2, g1), 16, acked, pending).unwrap().found,
            SectorState::Gen(g1)
        );
    }

    /// A write never answered and then given up (the reconnect failed, the run ended) stays
    /// unacknowledged, also in the saved ack log; so do several in a row. Only an
    /// acknowledged write to the unit settles it.
    #[test]
    fn abandoned_writes_stay_unacknowledged_until_a_write_is_acknowledged() {
        let t = Tracker::new(4096, 8);
        assert!(t.try_claim(5));
        let g1 = t.begin_write(5);
        t.ack_write(5, g1);
        let g2 = t.begin_write(5);
        t.release(5); // abandoned
        assert!(t.try_claim(5), "another command may use the unit");
        let g3 = t.begin_write(5);
        t.release(5); // lost as well
        let (acked, pending) = t.expect(5);
        assert_eq!((acked, pending), (g1, g3));
        for g in [g1, g2, g3] {
            assert_eq!(check(&block(5, g), 40, acked, pending), None, "gen {g}");
        }
        let dir =
            std::env::temp_dir().join(format!("twinsan-bench-unacked-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("acks");
        t.save(&p).unwrap();
        let l = Tracker::load(&p).unwrap();
        assert_eq!(l.expect(5), (g1, g3));
        assert_eq!(l.unacknowledged_units(), 1);
        assert_eq!(l.known_units(), vec![5]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(l.try_claim(5));
        let g4 = l.begin_write(5);
        assert!(g4 > g3);
        l.ack_write(5, g4);
        assert_eq!(l.expect(5), (g4, 0));
        assert_eq!(l.unacknowledged_units(), 0);
        assert!(check(&block(5, g3), 40, g4, 0).is_some());
    }

    #[test]
    fn an_unmapped_unit_reads_as_zeros_or_a_later_write() {
        let t = Tracker::new(512, 4);
        let w = t.begin_write(1);
        t.ack_write(1, w);
        let u = t.begin_unmap(1);
        let mut b = vec![0u8; 512];
        let (e, p) = t.expect(1);
        assert!(check(&b, 1, e, p).is_none(), "pending: zeros may be found");
        stamp(&mut b, 1, w);
        assert!(check(&b, 1, e, p).is_none(), "or the data before it");
        t.ack_unmap(1, u);
        let (e, p) = t.expect(1);
        assert!(
            check(&b, 1, e, p).is_some(),
            "acknowledged: old data is lost data"
        );
        assert!(check(&[0u8; 512], 1, e, p).is_none());
        // A write after it, lost: zeros or its stamp.
        let w2 = t.begin_write(1);
        let (e, p) = t.expect(1);
        stamp(&mut b, 1, w2);
        assert!(check(&b, 1, e, p).is_none());
        assert!(check(&[0u8; 512], 1, e, p).is_none());
        stamp(&mut b, 1, w);
        assert!(check(&b, 1, e, p).is_some(), "older than the UNMAP");
        // A pending UNMAP stays possible under a later pending write, until an ack.
        let t = Tracker::new(512, 4);
        let w = t.begin_write(2);
        t.ack_write(2, w);
        t.begin_unmap(2);
        let w2 = t.begin_write(2);
        let (e, p) = t.expect(2);
        assert!(check(&[0u8; 512], 2, e, p).is_none());
        t.ack_write(2, w2);
        let (e, p) = t.expect(2);
        assert!(
            check(&[0u8; 512], 2, e, p).is_some(),
            "the write is acknowledged"
        );
    }

    #[test]
    fn zeros() {
        let b = vec![0u8; 1024];
        assert_eq!(check(&b, 0, 0, 0), None);
        assert_eq!(check(&b, 0, 3, 0).unwrap().found, SectorState::Zero);
        assert_eq!(inspect(&b[..512], 0), SectorState::Zero);
    }

    #[test]
    fn generations_differ_in_filler() {
        let mut a = vec![0u8; 512];
        let mut b = vec![0u8; 512];
        stamp(&mut a, 1, 1);
        stamp(&mut b, 1, 2);
        assert_ne!(a[24..508], b[24..508]);
    }

    #[test]
    fn tracker_lifecycle_and_state_file() {
        let t = Tracker::new(4096, 16);
        assert!(t.try_claim(3));
        assert!(!t.try_claim(3), "an in-flight unit cannot be claimed twice");
        let g1 = t.begin_write(3);
        assert_eq!(t.expect(3), (0, g1));
        t.ack_write(3, g1);
        t.release(3);
        assert_eq!(t.expect(3), (g1, 0));
        assert!(t.try_claim(3));
        let g2 = t.begin_write(3);
        assert!(g2 > g1);
        // Session died before the answer: both generations stay acceptable.
        t.release(3);
        assert_eq!(t.expect(3), (g1, g2));
        let g3 = t.begin_write(9);
        t.ack_write(9, g3);
        assert_eq!(t.known_units(), vec![3, 9]);

        let dir = std::env::temp_dir().join(format!("twinsan-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("acks");
        t.save(&p).unwrap();
        let l = Tracker::load(&p).unwrap();
        assert_eq!((l.unit_bytes(), l.units()), (4096, 16));
        assert_eq!(l.expect(3), (g1, g2));
        assert_eq!(l.expect(9), (g3, 0));
        assert_eq!(l.expect(0), (0, 0));
        assert!(
            l.begin_write(1) > g3,
            "generations keep increasing across processes"
        );
        std::fs::write(&p, b"nonsense").unwrap();
        assert!(Tracker::load(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
