//! Online LUN changes on a pair, driven by a reload: the checks `replica::pair::reconfig`
//! decides from the peer's hello, and the records that follow a LUN added or grown.

use replica::pair::reconfig::{may_change, LunChange, Wait};

use super::*;
use crate::lun::Lun;

/// How long a growth waits for the LUN's writes in flight to finish (a parked write waits
/// for its peer ack, bounded by the replica timeout): then it gives up, changing nothing.
const GROW_DRAIN_MS: u64 = 5_000;

impl Replication {
    /// The LUNs the peer announces now (a fresh handshake on a control connection, closed
    /// at once), or why it cannot be asked.
    fn peer_luns_now(&self) -> Result<Vec<LunHello>, String> {
        let (s, _rbuf, hellos) = self.connect(LINK_NONE).map_err(|e| e.to_string())?;
        let _ = s.shutdown(std::net::Shutdown::Both);
        Ok(hellos)
    }

    /// The replication metadata a LUN a reload adds would open with (for
    /// [`Replication::may_change_luns`]; nothing is written).
    pub fn lun_meta(&self, lun: &Lun) -> std::io::Result<Meta> {
        RepLun::load_meta(lun, self.cfg.region_bytes).map(|(m, _)| m)
    }

    /// Opens the replication record of a LUN a reload adds (before it is served: the
    /// record is installed at the LUN's registry slot by [`Replication::install_lun`]).
    pub fn open_lun(&self, lun: &Lun) -> std::io::Result<RepLun> {
        RepLun::open(lun, self.cfg.region_bytes, self.is_primary())
    }

    /// Whether this node may make `changes` now (the first that must wait, with its index
    /// and why). The peer is asked only when a change needs its answer.
    pub fn may_change_luns(&self, changes: &[LunChange<'_>]) -> Result<(), (usize, Wait)> {
        let primary = self.is_primary();
        let mut peer: Option<Result<Vec<LunHello>, String>> = None;
        for (i, c) in changes.iter().enumerate() {
            // A cheap first answer without the peer: most changes need none.
            if may_change(primary, c, Err("not asked")).is_ok() {
                continue;
            }
            let hellos = peer.get_or_insert_with(|| self.peer_luns_now());
            let answer = match hellos {
                Ok(h) => may_change(primary, c, Ok(h)),
                Err(e) => may_change(primary, c, Err(e)),
            };
            answer.map_err(|w| (i, w))?;
        }
        Ok(())
    }

    /// Installs a new LUN's record at its registry slot `index`. On a primary the pair
    /// is then resynced, so the peer's copy of the new LUN becomes this node's whatever its
    /// file held (every region of a LUN that never synced is copied; holes travel as
    /// deallocations): the peer is declared lost, and the manager reconnects within a
    /// moment and plans every LUN again. Writes to other LUNs meanwhile are recorded and
    /// copied by that resync (`on_peer_loss = "suspend"` holds them until then).
    pub fn install_lun(&self, index: usize, l: RepLun) -> std::io::Result<()> {
        let never_synced = l.pair().meta().gen.current == 0;
        let regions = l.size_bytes().div_ceil(l.region_bytes());
        self.luns.install(index, l)?;
        if self.is_primary() && !self.unreplicated(index) {
            if never_synced {
                self.luns[index].mark_out_of_sync(0..regions)?;
            }
            self.peer_lost("a LUN was added online: resyncing to include it");
        }
        Ok(())
    }

    /// Grows LUN `index`'s record to `new_bytes`, before the LUN itself grows (no write may
    /// reach the new space before the write-intent log and the bitmap cover it): waits for
    /// the writes in flight (no new one starts meanwhile), grows the bitmap and the
    /// write-intent log, and persists the record.
    pub fn grow_lun(&self, index: usize, lun: &Lun, new_bytes: u64) -> std::io::Result<()> {
        let Some(l) = self.luns.get(index) else {
            return Ok(());
        };
        if new_bytes <= l.size_bytes() {
            return Ok(());
        }
        let Some(_all) = lun.ranges.drain(
            lun.num_blocks(),
            Duration::from_micros(200),
            Duration::from_millis(GROW_DRAIN_MS),
        ) else {
            return Err(std::io::Error::other(format!(
                "writes in flight did not finish within {GROW_DRAIN_MS} ms: not grown"
            )));
        };
        let mut p = l.pair();
        let persist = p
            .grow(new_bytes)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // No write is in flight (the whole LUN is held), so the regions the old log named
        // durable are all the new one must know; what writers asked for meanwhile they ask
        // again when they retry.
        let old = l.intent.load();
        let grown = IntentLog::new(new_bytes, l.region_bytes());
        grown.made_durable(&old.durable_regions());
        l.intent.store(Arc::new(grown));
        l.size_bytes.store(new_bytes, Ordering::Release);
        l.persist_if(&mut p, persist)?;
        tracing::info!(lun = l.key, new_bytes, "replication record grown");
        Ok(())
    }

    /// Whether registry slot `index` holds a LUN the pair does not replicate: one a reload
    /// removed (the peer may remove it too), or a read-only one (a snapshot export: each
    /// node serves its own clone of the same snapshot, and a resync would overwrite the
    /// peer's). Such a LUN is neither announced nor resynced, and counts for no promotion.
    pub(super) fn unreplicated(&self, index: usize) -> bool {
        self.registry().is_some_and(|r| {
            r.luns
                .get(index)
                .is_some_and(|l| l.is_removed() || l.read_only)
        })
    }

    /// The LUNs the pair replicates: what promotion checks and the failover controller look
    /// at (a removed LUN's record is never resynced again, whatever its state says).
    pub(super) fn live_luns(&self) -> impl Iterator<Item = &RepLun> {
        self.luns
            .iter()
            .enumerate()
            .filter(|&(i, _)| !self.unreplicated(i))
            .map(|(_, l)| l)
    }
}
