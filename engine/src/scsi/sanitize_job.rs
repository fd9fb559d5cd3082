//! SANITIZE (SBC-3 section 5.30) as a background job per LUN.
//!
//! A sanitize rewrites (OVERWRITE) or deallocates (BLOCK ERASE) the whole medium. It runs
//! on its own thread, not a core thread, rate-limited so one LUN's sanitize cannot starve
//! the other LUNs sharing the pool; it survives task management resets and reconnects, as
//! SBC-3 requires. Meanwhile the LUN answers NOT READY, SANITIZE IN PROGRESS with a
//! progress indication. Erasure is guaranteed at the file level: what the host file system
//! and device keep below it (e.g. without discard) is the host administrator's concern.

use crate::disk::allocation::punch;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lun::Lun;

/// Throughput cap of a sanitize overwrite.
pub const RATE_BYTES_PER_S: u64 = 128 << 20;
const CHUNK_BYTES: usize = 1 << 20;

#[derive(Clone, PartialEq, Eq)]
pub enum Kind {
    /// Write the pattern (inverted between passes when `invert`) `count` times.
    Overwrite {
        pattern: Vec<u8>,
        invert: bool,
        count: u8,
    },
    BlockErase,
}

/// A summary, not the pattern's bytes: this goes into the log.
impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kind::Overwrite {
                pattern,
                invert,
                count,
            } => {
                let zeros = pattern.iter().all(|&b| b == 0);
                write!(
                    f,
                    "Overwrite {{ pattern: {} bytes{}, invert: {invert}, count: {count} }}",
                    pattern.len(),
                    if zeros { " of zeros" } else { "" }
                )
            }
            Kind::BlockErase => write!(f, "BlockErase"),
        }
    }
}

#[derive(Debug, Default)]
pub struct Sanitize {
    active: AtomicBool,
    /// Progress in 1/65536ths, for the sense-key-specific PROGRESS INDICATION.
    progress: AtomicU32,
    /// The errno of the last failed sanitize, if it failed.
    failed: Mutex<Option<i32>>,
    /// Bytes done of the running sanitize, for `status` (rate and time left).
    job: Mutex<Option<Arc<crate::progress::Job>>>,
}

impl Sanitize {
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    pub fn progress(&self) -> u16 {
        self.progress.load(Ordering::Relaxed).min(0xffff) as u16
    }

    pub fn failed(&self) -> Option<i32> {
        *self.failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// "42.0% 120.0 MiB/s eta 8s" while a sanitize runs.
    pub fn summary(&self) -> Option<String> {
        if !self.active() {
            return None;
        }
        let job = self.job.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Some(job.map_or_else(|| "starting".to_string(), |j| j.summary()))
    }

    fn start_job(&self, total_bytes: u64) -> Arc<crate::progress::Job> {
        let job = Arc::new(crate::progress::Job::new(total_bytes));
        *self.job.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&job));
        job
    }

    /// The sense-key-specific progress (1/65536ths) from the job's counts.
    fn note(&self, job: &crate::progress::Job) {
        let (done, total) = job.counts();
        let p = (u128::from(done) * 65536 / u128::from(total.max(1))).min(65535) as u32;
        self.progress.store(p, Ordering::Relaxed);
    }
}

/// What runs once the medium is rewritten, still under the whole-LUN range lock (no write
/// can slip in before it): replication uses it to send every region to the peer.
pub type AfterErase = Box<dyn FnOnce() + Send>;

/// Starts a sanitize of `lun`. Returns false if one is already running.
pub fn start(lun: Arc<Lun>, kind: Kind, after: Option<AfterErase>) -> bool {
    if lun.sanitize.active.swap(true, Ordering::AcqRel) {
        return false;
    }
    lun.sanitize.progress.store(0, Ordering::Relaxed);
    *lun.sanitize
        .failed
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = None;
    let spawned = std::thread::Builder::new()
        .name(format!("twinsan-sanitize-{}", lun.id))
        .spawn({
            let lun = Arc::clone(&lun);
            move || {
                let r = run(&lun, &kind, after);
                if let Err(e) = &r {
                    tracing::error!(path = %lun.path.display(), error = %e, "sanitize failed");
                } else {
                    tracing::info!(path = %lun.path.display(), ?kind, "sanitize complete");
                }
                *lun.sanitize
                    .failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) =
                    r.err().map(|e| e.raw_os_error().unwrap_or(libc::EIO));
                lun.sanitize.active.store(false, Ordering::Release);
            }
        });
    if spawned.is_err() {
        lun.sanitize.active.store(false, Ordering::Release);
        return false;
    }
    true
}

fn run(lun: &Lun, kind: &Kind, after: Option<AfterErase>) -> std::io::Result<()> {
    // Writes that were in flight when the sanitize began finish first; new ones are
    // refused (NOT READY) while it runs.
    let blocks = lun.num_blocks();
    let _guard = lun.ranges.lock_waiting(0, blocks, Duration::from_millis(1));
    let r = erase(lun, kind);
    // Also after a failure: a partial erase changed the medium too.
    if let Some(f) = after {
        f();
    }
    r
}

fn erase(lun: &Lun, kind: &Kind) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(&lun.path)?;
    let size = lun.size_bytes();
    match kind {
        Kind::BlockErase => {
            let job = lun.sanitize.start_job(size);
            punch(&f, 0, size)?;
            lun.alloc.mark_hole(0, size);
            job.advance(size);
            lun.sanitize.note(&job);
        }
        Kind::Overwrite {
            pattern,
            invert,
            count,
        } => {
            let passes = (*count).max(1) as usize;
            // A pass of zeros overwrites only the allocated extents, any other the whole
            // LUN (as below): the job's total, for the rate and the time left.
            let allocated: u64 = lun.data_extents().map(|e| e.1).sum();
            let total: u64 = (0..passes)
                .map(|pass| {
                    let flip = *invert && pass % 2 == 1;
                    let zeros = pattern.iter().all(|&b| (if flip { !b } else { b }) == 0);
                    if zeros {
                        allocated
                    } else {
                        size
                    }
                })
                .sum();
            let job = lun.sanitize.start_job(total);
            let mut pacer = Pacer {
                started: Instant::now(),
                written: 0,
            };
            for pass in 0..passes {
                let flip = *invert && pass % 2 == 1;
                let mut chunk = vec![0u8; CHUNK_BYTES];
                for (i, b) in chunk.iter_mut().enumerate() {
                    let p = pattern[i % pattern.len()];
                    *b = if flip { !p } else { p };
                }
                let zeros = chunk.iter().all(|&b| b == 0);
                // Zeros: only allocated extents ever held data. Overwrite them in place (a
                // punched hole alone would leave the old bytes on the disk below the file),
                // then deallocate them so the thin LUN stays thin; holes already read zeros.
                // Any other pattern is written over every block.
                let extents = if zeros {
                    lun.data_extents().collect()
                } else {
                    vec![(0, size)]
                };
                // Before the pattern reaches the file (disk/alloc_map.rs); the whole LUN is
                // locked, so the punches below clear what they cover safely.
                for &(start, len) in &extents {
                    lun.alloc.mark_data(start, len);
                }
                for &(start, len) in &extents {
                    let mut off = start;
                    while off < start + len {
                        let n = (start + len - off).min(CHUNK_BYTES as u64) as usize;
                        crate::disk::inline_write::write_all_chunked(&f, &chunk[..n], off)?;
                        off += n as u64;
                        pacer.wrote(n as u64);
                        job.advance(n as u64);
                        lun.sanitize.note(&job);
                    }
                }
                if zeros {
                    f.sync_data()?;
                    for &(start, len) in &extents {
                        punch(&f, start, len)?;
                        lun.alloc.mark_hole(start, len);
                    }
                }
            }
        }
    }
    // Sanitized data must not come back after a power loss.
    f.sync_data()
}

/// Keeps a sanitize at or below [`RATE_BYTES_PER_S`] on average.
struct Pacer {
    started: Instant,
    written: u64,
}

impl Pacer {
    fn wrote(&mut self, n: u64) {
        self.written += n;
        let due = Duration::from_secs_f64(self.written as f64 / RATE_BYTES_PER_S as f64);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}
