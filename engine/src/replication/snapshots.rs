//! The pair's side of snapshots: whether the peer can take the same cut, the primary's
//! requests to it, and the secondary performing them and following the primary's list.

use super::*;
use replica::snapshot::{reconcile, Follow, PeerView, SnapOp, SnapshotName};

/// A connection to the peer for one snapshot operation.
pub struct SnapLink {
    s: TcpStream,
    rbuf: RxBuf,
    wbuf: Vec<u8>,
}

impl Drop for SnapLink {
    fn drop(&mut self) {
        let _ = self.s.shutdown(std::net::Shutdown::Both);
    }
}

impl Replication {
    /// Whether the peer holds the same data as this node for every LUN of `luns` now, so
    /// that a cut taken here now is taken there at the same write.
    pub fn snapshot_peer_view(&self, luns: &[usize]) -> PeerView {
        if !self.peer_up.load(Ordering::Acquire) {
            return PeerView::Apart("the peer is not connected".into());
        }
        for &i in luns {
            match self.luns.get(i).map(RepLun::state) {
                Some(SyncState::UpToDate) => {}
                Some(other) => {
                    return PeerView::Apart(format!("LUN {:016x} is {other:?}", self.luns[i].key))
                }
                None => return PeerView::Apart("the LUN is not replicated".into()),
            }
        }
        PeerView::InSync
    }

    /// Opens an authenticated connection to the peer for snapshot requests.
    pub fn snapshot_link(&self) -> std::io::Result<SnapLink> {
        let (s, rbuf, _) = self.connect(LINK_NONE)?;
        Ok(SnapLink {
            s,
            rbuf,
            wbuf: Vec::new(),
        })
    }

    /// The connection kept in `slot`, opened if there is none (a cut's steps share one).
    pub fn snapshot_link_in<'a>(
        &self,
        slot: &'a mut Option<SnapLink>,
    ) -> std::io::Result<&'a mut SnapLink> {
        match slot {
            Some(link) => Ok(link),
            None => self.snapshot_link().map(|l| slot.insert(l)),
        }
    }

    /// One request on a connection of its own (a delete, a rollback).
    pub fn snapshot_request_once(
        &self,
        lun: usize,
        op: SnapOp,
        guid: u64,
        name: &SnapshotName,
    ) -> std::io::Result<()> {
        self.snapshot_request(&mut self.snapshot_link()?, lun, op, guid, name)
    }

    /// Asks the peer for `op` on snapshot `guid` of LUN `lun` and waits for its Ok.
    pub fn snapshot_request(
        &self,
        link: &mut SnapLink,
        lun: usize,
        op: SnapOp,
        guid: u64,
        name: &SnapshotName,
    ) -> std::io::Result<()> {
        let l = self
            .luns
            .get(lun)
            .ok_or_else(|| std::io::Error::other("the LUN is not replicated"))?;
        let msg = Message::Snapshot {
            lun_key: l.key,
            op,
            guid,
            name: name.clone(),
        };
        self.request(
            &mut link.s,
            &mut link.rbuf,
            &mut link.wbuf,
            &msg,
            "snapshot",
        )
    }

    /// Asks the peer to make LUN `lun` durable (a flush), and waits for it.
    pub fn snapshot_flush(&self, link: &mut SnapLink, lun: usize) -> std::io::Result<()> {
        let l = self
            .luns
            .get(lun)
            .ok_or_else(|| std::io::Error::other("the LUN is not replicated"))?;
        let msg = Message::Flush { lun_key: l.key };
        self.request(&mut link.s, &mut link.rbuf, &mut link.wbuf, &msg, "flush")
    }

    /// Sends every LUN's committed snapshots to a peer that just connected, which follows
    /// them (reconcile). A failure only delays that to the next connection.
    pub(super) fn send_snapshot_lists(
        &self,
        reg: &Registry,
        s: &mut TcpStream,
        rbuf: &mut RxBuf,
    ) -> std::io::Result<()> {
        let mut wbuf = Vec::new();
        for (i, l) in self.luns.iter().enumerate() {
            if self.unreplicated(i) {
                continue;
            }
            let guids: Vec<u64> = {
                let st = reg.luns[i].snaps.lock().unwrap_or_else(|p| p.into_inner());
                st.committed().map(|e| e.guid).collect()
            };
            let msg = Message::SnapshotList {
                lun_key: l.key,
                guids,
            };
            self.request(s, rbuf, &mut wbuf, &msg, "snapshot list")?;
        }
        Ok(())
    }

    /// On the secondary: performs a snapshot step the primary orders.
    pub(super) fn apply_snapshot(
        &self,
        lun: usize,
        op: SnapOp,
        guid: u64,
        name: &SnapshotName,
    ) -> AckStatus {
        let Some(reg) = self.registry() else {
            return AckStatus::Refused;
        };
        match crate::snapshot::apply_step(&reg.luns[lun], op, guid, name) {
            Ok(()) => AckStatus::Ok,
            Err(e) => {
                tracing::error!(lun = self.luns[lun].key, ?op, error = %e, "snapshot step failed");
                AckStatus::IoError(libc::EIO)
            }
        }
    }

    /// On the secondary: keeps exactly the primary's committed snapshots of LUN `lun`.
    pub(super) fn follow_snapshots(&self, lun: usize, guids: &[u64]) -> AckStatus {
        let Some(reg) = self.registry() else {
            return AckStatus::Refused;
        };
        let l = &reg.luns[lun];
        let mut st = l.snaps.lock().unwrap_or_else(|p| p.into_inner());
        let mut status = AckStatus::Ok;
        for f in reconcile(guids, &st.listed()) {
            let r = match f {
                Follow::Commit(g) => st.commit(g),
                Follow::Drop(g) => st.remove(g),
                Follow::Missing(g) => {
                    tracing::warn!(lun = self.luns[lun].key, guid = format!("{g:016x}"), "the primary holds a snapshot this node never took (it was apart at the cut)");
                    Ok(())
                }
            };
            if let Err(e) = r {
                tracing::error!(lun = self.luns[lun].key, error = %e, "could not follow the primary's snapshots");
                status = AckStatus::IoError(libc::EIO);
            }
        }
        status
    }

    /// Marks every region of LUN `lun` out of sync and drops the peer, so that the next
    /// resync copies the whole LUN from this node (after a rollback the nodes may differ).
    pub fn resync_whole(&self, lun: usize, why: &str) {
        let Some(l) = self.luns.get(lun) else {
            return;
        };
        let _ = self.resync_ranges(lun, [(0, l.size_bytes())], why);
    }

    /// Bytes of LUN `lun` this node holds out of sync with the peer (its dirty regions):
    /// what a resync still has to copy.
    pub fn out_of_sync_bytes(&self, lun: usize) -> u64 {
        self.luns
            .get(lun)
            .map_or(0, |l| l.pair().meta().bitmap.dirty_bytes())
    }

    /// Marks the regions under `ranges` (offset, length in bytes) of LUN `lun` out of sync
    /// and drops the peer, so that the resync that follows copies them from this node: they
    /// changed outside the mirrored write path (a stream applied, a rollback). Err if the
    /// record could not be persisted (the peer is dropped all the same).
    pub fn resync_ranges(
        &self,
        lun: usize,
        ranges: impl IntoIterator<Item = (u64, u64)>,
        why: &str,
    ) -> std::io::Result<()> {
        let Some(l) = self.luns.get(lun) else {
            return Ok(());
        };
        let region = l.region_bytes();
        let regions = ranges
            .into_iter()
            .filter(|&(_, len)| len > 0)
            .flat_map(|(off, len)| off / region..(off + len).div_ceil(region));
        let r = l.mark_out_of_sync(regions);
        if let Err(e) = &r {
            tracing::error!(lun = l.key, error = %e, "cannot record the LUN out of sync");
        }
        self.peer_lost(why);
        r
    }
}
