//! `twinsan verify`: per-region digests compared with the peer's, online.

use super::*;

/// SHA-256 of one region of a LUN's backing file (the last region may be short). A region
/// the allocation map holds for a hole is not read: its digest is that of zeros.
pub(super) fn region_digest(l: &RepLun, region: u64) -> std::io::Result<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let region_bytes = l.region_bytes();
    let start = region.saturating_mul(region_bytes);
    let end = start.saturating_add(region_bytes).min(l.size_bytes());
    if l.alloc.is_hole(start, end.saturating_sub(start)) {
        return Ok(zeros_digest(end.saturating_sub(start)));
    }
    let f = File::open(&l.backing)?;
    let end = end.min(f.metadata()?.len());
    let mut h = Sha256::new();
    let mut buf = vec![0u8; RESYNC_CHUNK_BYTES];
    let mut off = start;
    while off < end {
        let n = ((end - off) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], off)?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(h.finalize().into())
}

/// SHA-256 of `len` zero bytes, computed once per length (a pair has two: the region size
/// and the last region's).
fn zeros_digest(len: u64) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    /// Lengths remembered: more than a pair of LUN geometries needs.
    const REMEMBERED: usize = 8;
    static KNOWN: Mutex<Vec<(u64, [u8; 32])>> = Mutex::new(Vec::new());
    let mut known = KNOWN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(&(_, d)) = known.iter().find(|(n, _)| *n == len) {
        return d;
    }
    let mut h = Sha256::new();
    let mut left = len;
    while left > 0 {
        let z = crate::scsi::zeros();
        let n = left.min(z.len() as u64) as usize;
        h.update(&z[..n]);
        left -= n as u64;
    }
    let d: [u8; 32] = h.finalize().into();
    if known.len() == REMEMBERED {
        known.remove(0);
    }
    known.push((len, d));
    d
}

/// A verify in progress: bytes of LUN space compared, and regions found differing.
#[derive(Debug)]
pub(super) struct VerifyRun {
    job: crate::progress::Job,
    differing: AtomicU64,
}

/// Clears the running verify however `verify` returns.
struct Running<'a>(&'a Mutex<Option<Arc<VerifyRun>>>);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Replication {
    /// The `status` line of the verify running now: "verify: P% R MiB/s eta Ts, N
    /// regions differ so far".
    pub(super) fn verify_status(&self) -> Option<String> {
        let run = self
            .verify_run
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        Some(format!(
            "verify: {}, {} regions differ so far",
            run.job.summary(),
            run.differing.load(Ordering::Relaxed)
        ))
    }

    /// `twinsan verify`: compares every region's SHA-256 with the peer's, online (each region
    /// is hashed under its range lock, so no write to it runs meanwhile). Differing regions are
    /// reported; with `repair` they are marked dirty and copied by a resync (the peer is
    /// declared outdated so the manager reconnects and copies them).
    pub fn verify(&self, repair: bool) -> Result<String, String> {
        use std::fmt::Write as _;
        if !self.is_primary() {
            return Err("verify runs on the primary".into());
        }
        let Some(reg) = self.registry() else {
            return Err("shutting down".into());
        };
        let total: u64 = self
            .luns
            .iter()
            .enumerate()
            .filter(|&(i, _)| !self.unreplicated(i))
            .map(|(_, l)| l.size_bytes())
            .sum();
        let run = Arc::new(VerifyRun {
            job: crate::progress::Job::new(total),
            differing: AtomicU64::new(0),
        });
        {
            let mut slot = self.verify_run.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_some() {
                return Err("a verify is running already (see `twinsan status`)".into());
            }
            *slot = Some(Arc::clone(&run));
        }
        let _running = Running(&self.verify_run);
        let (mut s, mut rbuf, _) = self
            .connect(LINK_NONE)
            .map_err(|e| format!("peer unreachable: {e}"))?;
        let mut wbuf = Vec::new();
        let mut report = String::new();
        let mut differing_total = 0u64;
        for (i, l) in self.luns.iter().enumerate() {
            if self.unreplicated(i) {
                continue;
            }
            let lun = &reg.luns[i];
            let region_bytes = l.region_bytes();
            let regions = lun.size_bytes().div_ceil(region_bytes);
            let mut differing = Vec::new();
            for region in 0..regions {
                let bs = lun.block_size as u64;
                let (start, end) = (
                    region * region_bytes,
                    ((region + 1) * region_bytes).min(lun.size_bytes()),
                );
                let _guard = lun.ranges.lock_waiting(
                    start / bs,
                    end.div_ceil(bs),
                    Duration::from_micros(200),
                );
                let local = region_digest(l, region).map_err(|e| e.to_string())?;
                let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                send(
                    &mut s,
                    &Message::VerifyRequest {
                        lun_key: l.key,
                        region,
                    },
                    seq,
                    &mut wbuf,
                )
                .map_err(|e| e.to_string())?;
                run.job.advance(end - start);
                match recv(&mut s, &mut rbuf).map_err(|e| e.to_string())?.0 {
                    Message::VerifyDigest { digest, .. } if digest == local => {}
                    Message::VerifyDigest { .. } => {
                        differing.push(region);
                        run.differing.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        return Err(format!("peer could not digest region {region}: {other:?}"))
                    }
                }
            }
            let _ = writeln!(
                report,
                "lun {:016x}: {} regions compared, {} differ{}",
                l.key,
                regions,
                differing.len(),
                if differing.is_empty() {
                    String::new()
                } else {
                    format!(": {differing:?}")
                }
            );
            if repair && !differing.is_empty() {
                l.mark_out_of_sync(differing.iter().copied())
                    .map_err(|e| e.to_string())?;
            }
            differing_total += differing.len() as u64;
        }
        let _ = s.shutdown(std::net::Shutdown::Both);
        if repair && differing_total > 0 {
            // Copy them now: the manager's next connection resyncs the dirty regions.
            self.peer_lost("verify found differing regions");
            let _ = writeln!(report, "differing regions marked for resync");
        }
        Ok(report)
    }
}
