//! A node's disks: the data (page cache and stable storage), the metadata file and the
//! running marker.

use super::*;

/// What a process crash keeps (disk and page cache); a power loss keeps only `durable`
/// and the metadata.
pub(super) struct Disk {
    pub(super) volatile: Vec<u8>,
    pub(super) durable: Vec<u8>,
    pub(super) meta: Meta,
    /// The running marker, and the boot it was written in.
    pub(super) marker: Option<u64>,
    pub(super) boot: u64,
    /// Metadata writes fail (a full or broken disk).
    pub(super) meta_fails: bool,
    /// Data writes fail with ENOSPC (a thin LUN's file system is full); the metadata, which
    /// is rewritten in place, still persists.
    pub(super) data_full: bool,
}

pub(super) fn persist(disk: &mut Disk, lun: &mut PairLun, intent: &IntentLog) -> bool {
    if disk.meta_fails {
        return false;
    }
    disk.meta = lun.meta_for_disk(&intent.durable_regions());
    lun.mark_persisted();
    true
}
