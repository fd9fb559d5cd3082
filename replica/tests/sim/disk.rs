//! A node's disks: the data (page cache and stable storage), the metadata file and the
//! running marker.

use super::*;

/// What a process crash keeps (disk and page cache); a power loss keeps only `durable`
/// and the metadata on stable storage.
pub(super) struct Disk {
    /// The machine (for a power cut).
    pub(super) id: NodeId,
    pub(super) volatile: Vec<u8>,
    pub(super) durable: Vec<u8>,
    /// The metadata record a start reads now.
    pub(super) meta: Meta,
    /// The last record known on stable storage, while a newer one's rename may not be
    /// (its directory's sync failed, or the power failed before it): a power loss may
    /// bring it back.
    pub(super) meta_synced: Option<Meta>,
    /// The running marker, and the boot it was written in.
    pub(super) marker: Option<u64>,
    pub(super) boot: u64,
    /// Metadata writes fail, and where (a broken disk fails the same way each time).
    pub(super) meta_fails: Option<MetaFailure>,
    /// The power fails during the next metadata write; whether the rename is done by then.
    pub(super) power_cut: Option<bool>,
    /// Data writes fail with ENOSPC (a thin LUN's file system is full); the metadata, which
    /// is rewritten in place, still persists.
    pub(super) data_full: bool,
}

/// Where a metadata write fails (engine: meta_file.rs `write_meta`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MetaFailure {
    /// Writing or syncing the new record into `<meta>.tmp` fails: the record stays.
    Tmp,
    /// The exchange is done and the directory's sync fails: the caller hears of a failure,
    /// yet a start reads the new record, and a power loss may bring back the old one.
    DirSync,
}

/// The power failed in the middle of a metadata write on machine `.0`: its process stops
/// there (the step unwinds to `Sim::step`), nothing after the write runs, nothing is told.
pub(super) struct PowerCut(pub(super) NodeId);

impl Disk {
    /// Writes the metadata record the engine's way (`write_meta`): the new bytes into
    /// `<meta>.tmp`, synced, exchanged with the record (renameat2 RENAME_EXCHANGE), then
    /// the directory synced; success is reported only after that sync. So the record a
    /// start reads is always a whole one, synced before it was renamed in: a record that
    /// fails its checksum at start cannot come from this order (only from the medium, and
    /// the engine refuses to start on it), and is not modelled. What can happen:
    /// - a failure before the exchange: nothing changes;
    /// - a failure of the directory's sync: reported, yet the new record is in place (a
    ///   start reads it), and a power loss may bring back the old one;
    /// - the power fails in the middle: the caller is never told; the old record, or the
    ///   new one if the exchange was done and the journal kept it.
    ///
    /// Returns whether the write reported success.
    pub(super) fn write_meta(&mut self, m: Meta) -> bool {
        if let Some(renamed) = self.power_cut.take() {
            if renamed {
                self.replace_unsynced(m);
            }
            std::panic::panic_any(PowerCut(self.id));
        }
        match self.meta_fails {
            Some(MetaFailure::Tmp) => false,
            Some(MetaFailure::DirSync) => {
                self.replace_unsynced(m);
                false
            }
            None => {
                self.meta = m;
                self.meta_synced = None;
                true
            }
        }
    }

    fn replace_unsynced(&mut self, m: Meta) {
        let old = std::mem::replace(&mut self.meta, m);
        self.meta_synced.get_or_insert(old);
    }

    /// The machine lost power: the page cache is gone, and the journal kept the last
    /// unsynced rename (`keep_last`) or not.
    pub(super) fn power_lost(&mut self, keep_last: bool) {
        self.volatile = self.durable.clone();
        self.boot += 1;
        if let Some(synced) = self.meta_synced.take() {
            if !keep_last {
                self.meta = synced;
            }
        }
    }
}

pub(super) fn persist(disk: &mut Disk, lun: &mut PairLun, intent: &IntentLog) -> bool {
    if !disk.write_meta(lun.meta_for_disk(&intent.durable_regions())) {
        return false;
    }
    lun.mark_persisted();
    true
}
