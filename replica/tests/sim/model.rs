//! The initiator's view: which writes each sector may hold.

use super::*;

/// What the initiator may read back, per sector. A GOOD write without FUA sits in write-back
/// caches (WCE=1): a power loss may take it (SBC), so a power loss weakens the guarantee to
/// the last write that was durable when acknowledged (FUA).
pub(super) struct Model {
    /// The last GOOD write, and writes issued after it (which may have landed).
    pub(super) acked: Vec<u32>,
    pub(super) maybe: Vec<BTreeSet<u32>>,
    /// The last GOOD write with FUA, and every write issued per sector, in order.
    pub(super) durable: Vec<u32>,
    pub(super) issued: Vec<Vec<u32>>,
}

impl Model {
    pub(super) fn new() -> Model {
        Model {
            acked: vec![0; SECTORS],
            maybe: vec![BTreeSet::new(); SECTORS],
            durable: vec![0; SECTORS],
            issued: vec![Vec::new(); SECTORS],
        }
    }

    pub(super) fn issue(&mut self, s: usize, id: u32) {
        self.maybe[s].insert(id);
        self.issued[s].push(id);
    }

    pub(super) fn good(&mut self, s: usize, id: u32, fua: bool) {
        if id < self.acked[s] {
            // A write issued after this one was answered first: the two were outstanding
            // together, which one node's range lock never allows, but a takeover does (the
            // old primary's write, mirrored before it froze, is answered by the ack it
            // finds when it runs again; the new primary took a later one meanwhile). SCSI
            // orders no overlapping commands in flight together: either may be what the
            // sector holds.
            self.maybe[s].insert(id);
            if fua && id > self.durable[s] {
                self.durable[s] = id;
            }
            return;
        }
        self.acked[s] = id;
        self.maybe[s].retain(|&x| x > id);
        if fua {
            self.durable[s] = id;
        }
    }

    /// A machine lost power: what was not durable when acknowledged may be gone.
    pub(super) fn power_loss(&mut self) {
        for s in 0..SECTORS {
            if self.acked[s] != self.durable[s] {
                let since = self.durable[s];
                self.maybe[s].extend(self.issued[s].iter().copied().filter(|&x| x > since));
                self.acked[s] = since;
            }
        }
    }

    /// A split brain was resolved: what the initiator may read back is what the node that
    /// kept its data holds (`volatile`; `durable` after a power loss), whatever either node
    /// acknowledged before.
    pub(super) fn reset_to(&mut self, volatile: &[u8], durable: &[u8]) {
        for s in 0..SECTORS {
            self.acked[s] = sector_value(volatile, s);
            self.durable[s] = sector_value(durable, s);
            self.maybe[s].clear();
        }
    }

    /// Whether `data` holds, in every sector, the last GOOD write or one issued after it.
    pub(super) fn holds(&self, data: &[u8]) -> Result<(), String> {
        for s in 0..SECTORS {
            let v = sector_value(data, s);
            if v != self.acked[s] && !self.maybe[s].contains(&v) {
                return Err(format!(
                    "sector {s} (region {}) holds write {v}, but write {} was acknowledged (later writes: {:?})",
                    s as u64 * SECTOR / REGION,
                    self.acked[s],
                    self.maybe[s]
                ));
            }
        }
        Ok(())
    }
}
