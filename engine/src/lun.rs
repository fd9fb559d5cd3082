//! A logical unit: its backing sparse file, identity, and the state every core shares
//! (mode parameters, unit attentions). Each core opens its own fd for the file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use thiserror::Error;

use crate::config::{derive_naa_id, CacheMode, LunConfig};
use crate::disk::alloc_map::AllocMap;
use crate::disk::range_lock::RangeLock;
use crate::scsi::unit_attention::UaLog;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use proto::scsi::mode::ModeState;
use proto::scsi::pr::PrState;

#[derive(Debug, Error)]
pub enum LunError {
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: the file is {actual} bytes, but the configured size is {configured}: refusing to shrink a LUN (data would be lost)")]
    WouldShrink {
        path: PathBuf,
        actual: u64,
        configured: u64,
    },
    #[error("{path}: in use by another process (another twinsan serving the same data?); refusing to serve it twice")]
    InUse { path: PathBuf },
    #[error("{path}: no size is configured and the file does not exist")]
    NoSize { path: PathBuf },
    #[error("{path}: persistent reservation state is unreadable ({reason}); move the file aside to start without it")]
    PrState { path: PathBuf, reason: String },
    #[error(transparent)]
    Snapshots(#[from] crate::snapshot::store::StoreError),
    #[error("more than {max} LUNs over the daemon's lifetime (removed LUNs keep their slot until a restart)")]
    TooMany { max: usize },
    #[error("{path}: the file size {size} is not a multiple of the block size {block_size}")]
    Misaligned {
        path: PathBuf,
        size: u64,
        block_size: u32,
    },
}

/// One LUN, shared by every core thread.
pub struct Lun {
    pub target_name: String,
    pub id: u64,
    pub path: PathBuf,
    /// Bytes; grows online (`twinsan reload`), never shrinks. Commands read it once each.
    size: AtomicU64,
    pub block_size: u32,
    /// Logical blocks per physical block, as a power of two (READ CAPACITY (16) LBPPBE).
    pub physical_block_exp: u8,
    pub read_only: bool,
    pub cache: CacheMode,
    pub thin: bool,
    pub serial: String,
    pub naa_id: u64,
    /// Mode parameters are per logical unit (SPC-4 allows per I_T nexus; one shared copy is
    /// what initiators expect from a disk): a MODE SELECT on any core changes them for all.
    pub mode: Mutex<ModeState>,
    pub ua: UaLog,
    /// Block ranges under modification (see range_lock.rs).
    pub ranges: Arc<RangeLock>,
    /// Which chunks may hold data (alloc_map.rs): reads of the others are zeros, answered
    /// without the file. Built from SEEK_DATA at start, kept by every write and punch.
    pub alloc: Arc<AllocMap>,
    /// An fd for metadata queries from any core (SEEK_DATA/SEEK_HOLE, fstat): these use
    /// no file position, so sharing it is safe.
    pub meta_fd: File,
    /// Raise THIN PROVISIONING SOFT THRESHOLD REACHED when the backing file system is
    /// fuller than this (percent), `None` to never.
    pub soft_threshold_percent: Option<u8>,
    /// A SANITIZE running in the background, if any.
    pub sanitize: crate::scsi::sanitize_job::Sanitize,
    /// Persistent reservations and SPC-2 reservations: one state per LUN, the single place
    /// the replica link mirrors to the peer.
    pub pr: Mutex<PrState>,
    /// Counts changes of `pr` as mirrored (pr_snapshot): the peer applies snapshots in
    /// this order, whichever core's link carried them.
    pub pr_version: AtomicU64,
    /// Whether any registration or reservation exists: commands on a LUN nobody reserved
    /// skip the lock entirely.
    pub pr_active: AtomicBool,
    /// Where APTPL state persists: beside the backing file.
    pub pr_path: PathBuf,
    /// Whether the soft threshold attention was raised and not yet re-armed.
    pub threshold_raised: AtomicBool,
    /// This LUN's snapshots on this node (snapshot/store.rs); locked by snapshot
    /// operations only, never on the data path.
    pub snaps: Mutex<crate::snapshot::store::Store>,
    /// Set when a reload removed the LUN: its slot is never reused (registry.rs), cores
    /// drop their fds for it, and the backing file stays where it is.
    removed: AtomicBool,
}

impl Lun {
    /// Creates the sparse backing file if missing (or grows it), and returns the LUN.
    pub fn create_or_open(target_name: &str, cfg: &LunConfig) -> Result<Self, LunError> {
        let io = |what: &'static str| {
            let path = cfg.path.clone();
            move |source| LunError::Io { path, what, source }
        };
        if let Some(dir) = cfg.path.parent() {
            std::fs::create_dir_all(dir).map_err(io("creating the data directory"))?;
        }
        let existing = match std::fs::metadata(&cfg.path) {
            Ok(m) => Some(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("reading metadata")(e)),
        };
        let size_bytes = match (existing, cfg.size_bytes) {
            (None, 0) => {
                return Err(LunError::NoSize {
                    path: cfg.path.clone(),
                })
            }
            (Some(actual), 0) => actual,
            (Some(actual), configured) if actual > configured => {
                return Err(LunError::WouldShrink {
                    path: cfg.path.clone(),
                    actual,
                    configured,
                })
            }
            (_, configured) => configured,
        };
        if size_bytes == 0 || size_bytes % cfg.block_size as u64 != 0 {
            return Err(LunError::Misaligned {
                path: cfg.path.clone(),
                size: size_bytes,
                block_size: cfg.block_size,
            });
        }
        if existing != Some(size_bytes) {
            set_file_len(&cfg.path, size_bytes, true)?;
            tracing::info!(path = %cfg.path.display(), size_bytes, "created sparse backing file");
        }
        let meta_fd = File::open(&cfg.path).map_err(io("opening the backing file"))?;
        // Held for the LUN's lifetime (released by the kernel when the process exits, even on
        // SIGKILL). Why: a second daemon started on the same data would serve the same blocks
        // with its own caches, reservations and replica state, and the two would corrupt each
        // other's writes; SO_REUSEPORT would even let it share the listening port silently.
        match meta_fd.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LunError::InUse {
                    path: cfg.path.clone(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io("locking the backing file")(e));
            }
        }
        let pr_path = pr_path_for(&cfg.path);
        let pr = match std::fs::read(&pr_path) {
            Ok(bytes) => {
                let mut st = PrState::decode(&bytes).map_err(|e| LunError::PrState {
                    path: pr_path.clone(),
                    reason: e.to_string(),
                })?;
                // A restart is a power cycle for the LUN (SPC-4 5.12.11).
                st.power_on();
                tracing::info!(path = %pr_path.display(), registrations = st.registrations().len(), "restored persistent reservations (APTPL)");
                st
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => PrState::default(),
            Err(e) => return Err(io("reading persistent reservation state")(e)),
        };
        let pr_active = AtomicBool::new(pr_in_use(&pr));
        let alloc = Arc::new(AllocMap::from_extents(
            size_bytes,
            crate::disk::allocation::data_extents(&meta_fd, size_bytes),
        ));
        tracing::debug!(path = %cfg.path.display(), data_bytes = alloc.data_bytes(), chunk_bytes = alloc.chunk_bytes(), "allocation map built");
        let snaps = crate::snapshot::store::Store::open(&cfg.path)?;
        snaps.remove_strays();
        let snaps = Mutex::new(snaps);
        Ok(Lun {
            snaps,
            alloc,
            ranges: Arc::new(RangeLock::default()),
            meta_fd,
            soft_threshold_percent: cfg.soft_threshold_percent,
            sanitize: Default::default(),
            pr: Mutex::new(pr),
            pr_version: AtomicU64::new(0),
            pr_active,
            pr_path,
            threshold_raised: AtomicBool::new(false),
            target_name: target_name.to_string(),
            id: cfg.id,
            path: cfg.path.clone(),
            size: AtomicU64::new(size_bytes),
            removed: AtomicBool::new(false),
            block_size: cfg.block_size,
            physical_block_exp: (cfg.physical_block_size / cfg.block_size).trailing_zeros() as u8,
            read_only: cfg.read_only,
            cache: cfg.cache,
            thin: cfg.thin,
            serial: cfg.serial.clone(),
            naa_id: derive_naa_id(target_name, cfg.id),
            mode: Mutex::new(ModeState::default()),
            ua: UaLog::default(),
        })
    }

    pub fn num_blocks(&self) -> u64 {
        self.size_bytes() / self.block_size as u64
    }

    pub fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Grows the LUN to `new_bytes`: the sparse file first (synced, so a crash after the
    /// initiators saw the new capacity cannot find the file shorter), then the size every
    /// command checks against, then CAPACITY DATA HAS CHANGED for every I_T nexus.
    pub fn grow(&self, new_bytes: u64) -> Result<(), LunError> {
        let old = self.size_bytes();
        if new_bytes < old {
            return Err(LunError::WouldShrink {
                path: self.path.clone(),
                actual: old,
                configured: new_bytes,
            });
        }
        if new_bytes == old {
            return Ok(());
        }
        if !new_bytes.is_multiple_of(self.block_size as u64) {
            return Err(LunError::Misaligned {
                path: self.path.clone(),
                size: new_bytes,
                block_size: self.block_size,
            });
        }
        set_file_len(&self.path, new_bytes, false)?;
        self.size.store(new_bytes, Ordering::Release);
        self.ua
            .raise(0, proto::scsi::sense::Asc::CAPACITY_DATA_CHANGED);
        tracing::info!(path = %self.path.display(), old_bytes = old, new_bytes, "LUN grown");
        Ok(())
    }

    /// Whether a reload removed it.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Marks the LUN removed and releases the backing file's lock, so the same file can be
    /// served again by a later reload (or another daemon) once every core closed its fd.
    pub fn mark_removed(&self) {
        self.removed.store(true, Ordering::Release);
        if let Err(e) = self.meta_fd.unlock() {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot unlock a removed LUN's file");
        }
    }

    /// Raises THIN PROVISIONING SOFT THRESHOLD REACHED for every nexus when the pool crosses
    /// the threshold upward (once; re-armed when usage drops back below it). Returns whether
    /// it raised the attention now.
    pub fn check_soft_threshold(&self) -> bool {
        let (Some(limit), true) = (self.soft_threshold_percent, self.thin) else {
            return false;
        };
        let Some(used) = self.pool_used_percent() else {
            return false;
        };
        if used >= limit {
            if !self.threshold_raised.swap(true, Ordering::AcqRel) {
                tracing::warn!(path = %self.path.display(), used_percent = used, limit_percent = limit, "thin provisioning soft threshold reached");
                self.ua.raise(
                    0,
                    proto::scsi::sense::Asc::THIN_PROVISIONING_SOFT_THRESHOLD_REACHED,
                );
                return true;
            }
        } else {
            self.threshold_raised.store(false, Ordering::Release);
        }
        false
    }

    /// Runs `f` on the reservation state, keeping the fast-path flag in step.
    pub fn with_pr<R>(&self, f: impl FnOnce(&mut PrState) -> R) -> R {
        let mut st = self.pr.lock().unwrap_or_else(|p| p.into_inner());
        let r = f(&mut st);
        self.pr_active.store(pr_in_use(&st), Ordering::Release);
        r
    }

    /// The reservation state, encoded, with its version: taken under the state's lock,
    /// so a later version is never an older state.
    pub fn pr_snapshot(&self) -> (Vec<u8>, u64) {
        self.with_pr(|st| {
            let version = self.pr_version.fetch_add(1, Ordering::Relaxed) + 1;
            (st.encode(), version)
        })
    }

    /// Whether commands must be checked against reservations.
    pub fn pr_in_use(&self) -> bool {
        self.pr_active.load(Ordering::Acquire)
    }

    /// Persists (APTPL) or removes the reservation state file. Written to a temporary file,
    /// synced and renamed, so a crash leaves the old or the new state, never a torn one.
    pub fn persist_pr(&self, st: &PrState) -> std::io::Result<()> {
        if !st.aptpl() {
            return match std::fs::remove_file(&self.pr_path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        crate::disk::durable::replace_file(&self.pr_path, &st.encode())
    }

    /// Bytes the backing file occupies on disk.
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.meta_fd
            .metadata()
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    }

    /// Percent of the backing file system's space in use.
    pub fn pool_used_percent(&self) -> Option<u8> {
        use std::os::fd::AsRawFd;
        // SAFETY: statvfs is plain data written by fstatvfs; the fd is valid for self's life.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above; fstatvfs only writes into `st`.
        if unsafe { libc::fstatvfs(self.meta_fd.as_raw_fd(), &mut st) } != 0 || st.f_blocks == 0 {
            return None;
        }
        let used = st.f_blocks.saturating_sub(st.f_bavail);
        Some((used as u128 * 100 / st.f_blocks as u128).min(100) as u8)
    }

    /// The next offset at or after `offset` in a data (`data = true`) or hole region, or
    /// `None` past the end: SEEK_DATA / SEEK_HOLE.
    pub fn seek(&self, offset: u64, data: bool) -> Option<u64> {
        crate::disk::allocation::seek(&self.meta_fd, offset, data)
    }

    /// The extents of the backing file that hold data, as `(offset, len)`.
    pub fn data_extents(&self) -> crate::disk::allocation::DataExtents<'_> {
        crate::disk::allocation::data_extents(&self.meta_fd, self.size_bytes())
    }

    /// Opens a new fd on the backing file for one core (each core owns its fds).
    pub fn open_fd(&self) -> Result<File, LunError> {
        open_backing(&self.path, self.cache, self.read_only)
    }

    /// A tag of the mode parameters, for coalescing MODE PARAMETERS CHANGED attentions.
    pub fn mode_tag(&self) -> u64 {
        let m = self.mode_state();
        m.d_sense as u64 | (m.swp as u64) << 1 | (m.wce as u64) << 2
    }

    /// A snapshot of the mode parameters (poisoning is harmless: the state is plain data).
    pub fn mode_state(&self) -> ModeState {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn pr_in_use(st: &PrState) -> bool {
    !st.registrations().is_empty() || st.reservation().is_some() || st.spc2_holder().is_some()
}

/// `lun0.img` keeps its reservations in `lun0.img.pr`.
pub fn pr_path_for(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".pr");
    PathBuf::from(p)
}

/// Sets the backing file's length (creating it if `create`), synced: set_len on a new or
/// shorter file creates a hole, thin by construction.
fn set_file_len(path: &Path, bytes: u64, create: bool) -> Result<(), LunError> {
    let io = |what: &'static str| {
        move |source| LunError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let f = OpenOptions::new()
        .create(create)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io("opening the backing file to size it"))?;
    f.set_len(bytes).map_err(io("sizing the backing file"))?;
    f.sync_all().map_err(io("syncing the sized backing file"))
}

fn open_backing(path: &Path, cache: CacheMode, read_only: bool) -> Result<File, LunError> {
    let mut o = OpenOptions::new();
    o.read(true).write(!read_only);
    if cache == CacheMode::Direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path).map_err(|source| LunError::Io {
        path: path.to_path_buf(),
        what: "opening the backing file",
        source,
    })
}
