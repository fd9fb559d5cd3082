//! One core's fds of the LUN slots (registry.rs), registered as io_uring fixed files at the
//! slots' indexes, so a disk SQE names its LUN by index (`types::Fixed`) with no lookup.
//!
//! Why a sparse table of every slot up front: a LUN a reload adds is then one
//! `register_files_update` on this core's next tick, and the command path never checks
//! anything. A removed LUN's slot is emptied the same way; io_uring keeps the file alive
//! for operations already in flight.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;

use io_uring::IoUring;

use crate::lun::Lun;
use crate::registry::{Registry, MAX_LUNS};

pub struct LunFiles {
    /// By slot; `None` for a slot not filled yet or a removed LUN.
    files: Vec<Option<File>>,
    /// The registry's `files_gen` that `files` reflects.
    gen: u64,
    /// Slots filled at start (the spill helper has fds for those only).
    at_start: usize,
}

impl LunFiles {
    /// Registers the sparse table and installs every LUN filled so far; any failure fails
    /// the start.
    pub fn register(ring: &IoUring, reg: &Registry) -> std::io::Result<LunFiles> {
        // Kernels before 5.19 have no sparse registration: an array of -1 does the same.
        if ring
            .submitter()
            .register_files_sparse(MAX_LUNS as u32)
            .is_err()
        {
            ring.submitter().register_files(&[-1; MAX_LUNS])?;
        }
        let mut me = LunFiles {
            files: (0..MAX_LUNS).map(|_| None).collect(),
            gen: reg.files_gen.load(Ordering::Acquire),
            at_start: reg.luns.len(),
        };
        for (i, lun) in reg.luns.iter().enumerate() {
            me.update(ring, i, lun)?;
        }
        Ok(me)
    }

    /// Installs or removes slot `i`'s fd as its LUN wants.
    fn update(&mut self, ring: &IoUring, i: usize, lun: &Lun) -> std::io::Result<()> {
        let Some(slot) = self.files.get_mut(i) else {
            return Ok(());
        };
        match (lun.is_removed(), slot.is_some()) {
            (false, false) => {
                let f = lun
                    .open_fd()
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                ring.submitter()
                    .register_files_update(i as u32, &[f.as_raw_fd()])?;
                *slot = Some(f);
            }
            (true, true) => {
                ring.submitter().register_files_update(i as u32, &[-1])?;
                *slot = None;
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether a reload changed the slots since the last sync (one atomic load, on the tick).
    pub fn stale(&self, reg: &Registry) -> bool {
        reg.files_gen.load(Ordering::Acquire) != self.gen
    }

    /// Follows a reload: installs the fds of new LUNs, removes those of removed ones, then
    /// tells the reload (`files_acks`) which generation core `core` now serves. A LUN this
    /// core cannot open is logged; its commands here fail (EBADF) rather than the core.
    pub fn sync(&mut self, ring: &IoUring, reg: &Registry, core: usize) {
        let gen = reg.files_gen.load(Ordering::Acquire);
        for (i, lun) in reg.luns.iter().enumerate() {
            if let Err(e) = self.update(ring, i, lun) {
                tracing::error!(core, lun = i, path = %lun.path.display(), error = %e, "cannot install or remove a LUN's fd after a reload");
            }
        }
        self.gen = gen;
        if let Some(ack) = reg.files_acks.get().and_then(|a| a.get(core)) {
            ack.store(gen, Ordering::Release);
        }
    }

    /// Slot `lun`'s fd, or -1 (EBADF for whoever uses it) when it has none.
    pub fn raw_fd(&self, lun: usize) -> RawFd {
        self.files
            .get(lun)
            .and_then(|f| f.as_ref())
            .map_or(-1, |f| f.as_raw_fd())
    }

    /// Whether the spill helper has an fd for slot `lun` (those filled at start).
    pub fn spillable(&self, lun: usize) -> bool {
        lun < self.at_start
    }

    /// Copies of the fds of the slots filled at start, for the spill helper.
    pub fn clone_at_start(&self) -> std::io::Result<Vec<File>> {
        let mut own = Vec::with_capacity(self.at_start);
        for f in self.files.iter().take(self.at_start).flatten() {
            own.push(f.try_clone()?);
        }
        Ok(own)
    }
}
