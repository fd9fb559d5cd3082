//! [`PairLun`]: one LUN's pair record and its transitions.

use super::plan::{self, PlanRefusal, ResyncPlan};
use super::progress::Progress;
use super::{PeerLossPolicy, Persist, SyncState};
use crate::genid::{GenFlags, GenIds};
use crate::meta::Meta;
use crate::wire::LunHello;

/// Extra passes over regions dirtied again during a resync before it gives up (and is
/// retried later): each pass is only what got dirty behind the last one.
pub const RESYNC_PASSES_MAX: u32 = 4;

/// What a start finds of the previous run (the "running" marker beside the backing file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marker {
    /// A clean stop: nothing was in flight.
    Absent,
    /// The process stopped uncleanly, the machine did not restart: the page cache survived.
    SameBoot,
    /// The machine restarted since (power loss, kernel crash): the page cache went with it.
    OtherBoot,
}

/// What a start found, for the driver to log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartNote {
    /// Clean.
    Clean,
    /// Unclean, with a write-intent log: these many regions will be resynced.
    UncleanLogged {
        /// The write-intent regions.
        regions: u64,
        /// The machine restarted: every region will be resynced.
        rebooted: bool,
    },
    /// Unclean without a write-intent log (older metadata): every allocated region marked.
    UncleanUnlogged {
        /// The allocated regions marked.
        regions: u64,
        /// The machine restarted: every region will be resynced.
        rebooted: bool,
    },
}

/// How a resync pass over one LUN ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PassEnd {
    /// Nothing is dirty: persist if asked (a new pair's first id), then tell the peer these
    /// ids; once it acknowledged them, [`PairLun::completion_acknowledged`].
    Complete {
        /// The ids the target adopts.
        gen: GenIds,
        /// Whether this node's record must be written before they are sent.
        persist: Persist,
    },
    /// Regions got dirty again behind the pass: copy these next.
    Again(Vec<u64>),
    /// Regions keep getting dirty: give up for now (the resync is retried later).
    GiveUp {
        /// Regions still dirty.
        dirty: u64,
    },
}

/// One LUN's replication record on this node (see the module docs).
#[derive(Debug)]
pub struct PairLun {
    meta: Meta,
    state: SyncState,
    /// Crashed under metadata without a write-intent log: the next resync compares every
    /// region, as nothing names the in-flight ones.
    crash_unlogged: bool,
    progress: Progress,
    /// A transition changed what must be on disk and no persist has succeeded since. Why it
    /// matters: a write made alone may skip its own persist only when the "peer outdated"
    /// record covering it is on disk, not merely in memory (found by the simulation: a
    /// loss whose record failed to persist, then an operator's `outdate-peer`, let writes
    /// complete GOOD on a record that existed only in memory; a crash and a promotion of
    /// the peer then lost them).
    unpersisted: bool,
    /// The ids a resync's completion sent the target, until it acknowledged them
    /// ([`PairLun::completion_acknowledged`]).
    completing: Option<GenIds>,
    /// A peer loss came since the resync began: a copy acknowledged from now on does not
    /// clear its region (see [`PairLun::region_copied`]).
    copies_void: bool,
}

impl PairLun {
    /// Opens the record from the metadata on disk at a start in role `primary`. `allocated`
    /// names the regions holding data (asked only after an unclean stop without a
    /// write-intent log). The metadata must be persisted if so returned, before anything is
    /// served.
    pub fn open(
        mut meta: Meta,
        marker: Marker,
        primary: bool,
        allocated: impl FnOnce(u64) -> Vec<u64>,
    ) -> (PairLun, Persist, StartNote) {
        let unclean = marker != Marker::Absent;
        let rebooted = marker == Marker::OtherBoot;
        // Writes in flight at a crash (the unacknowledged tail) may be on this node only.
        // After a machine restart writes acknowledged since the last flush may be missing
        // anywhere, not only in the write-intent regions: only a copy of every region
        // makes the two nodes equal again.
        let crash_unlogged = unclean && (!meta.flags.intent_log || rebooted);
        // Write-intent regions on disk: writes may have been in flight here, whatever the
        // role on record (a node demoted while its writes drained, then crashed, is on
        // record as secondary).
        let had_intents = meta.flags.intent_log && meta.bitmap.dirty_count() > 0;
        let note = if !unclean {
            StartNote::Clean
        } else if meta.flags.intent_log {
            // The bitmap on disk holds the write-intent regions: exactly where writes may
            // have been in flight. They stay set until a resync copies them.
            StartNote::UncleanLogged {
                regions: meta.bitmap.dirty_count(),
                rebooted,
            }
        } else {
            let regions = allocated(meta.bitmap.region_bytes());
            for &r in &regions {
                meta.bitmap.set(r);
            }
            StartNote::UncleanUnlogged {
                regions: regions.len() as u64,
                rebooted,
            }
        };
        if crash_unlogged {
            // Recorded in the bitmap, durably, not only in memory: a process crash before
            // the next resync completes must not forget that every region may differ (the
            // simulation found it: after a power loss and then a process crash, the resync
            // copied only the write-intent regions, and a write the power loss took from
            // this node stayed on the peer while both said UpToDate). The copy sends holes
            // as deallocations, so a thin LUN costs little.
            meta.bitmap.set_all();
        }
        if unclean {
            // This node may become the sync target (after a failover), and the peer does not
            // know our write-intent regions: tell it at the next connect, so that its resync
            // compares every region. As the sync source our own bitmap suffices. A secondary
            // originates no writes: what it applied alone is in the primary's dirty bitmap
            // already (an unacknowledged mirror marks its region). But a node demoted with
            // writes still running is on record as secondary while they may land here only:
            // its write-intent regions say so (found by the simulation: a write of the old
            // primary, never acknowledged, stayed on it after the new primary's resync).
            meta.flags.crashed |= meta.flags.primary || rebooted || had_intents;
        }
        let persist = unclean || meta.flags.primary != primary || !meta.flags.intent_log;
        // The role we start in, for the crash check at the next start.
        meta.flags.primary = primary;
        meta.flags.intent_log = true;
        let state = if meta.flags.peer_outdated {
            SyncState::PeerOutdated
        } else {
            SyncState::Unknown
        };
        let lun = PairLun {
            meta,
            state,
            crash_unlogged,
            progress: Progress::default(),
            unpersisted: persist,
            completing: None,
            copies_void: false,
        };
        (lun, Persist::from_changed(persist), note)
    }

    fn needs_if(&mut self, changed: bool) -> Persist {
        self.unpersisted |= changed;
        Persist::from_changed(changed)
    }

    /// The driver wrote [`PairLun::meta_for_disk`] to stable storage.
    pub fn mark_persisted(&mut self) {
        self.unpersisted = false;
    }

    /// The metadata in memory (the bitmap holds only what is really out of sync).
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The metadata as it must be on disk: also every write-intent region set in the bitmap
    /// (`intent`: the regions writes may be in flight to).
    pub fn meta_for_disk(&self, intent: &[u64]) -> Meta {
        let mut disk = self.meta.clone();
        disk.flags.intent_log = true;
        for &r in intent {
            disk.bitmap.set(r);
        }
        disk
    }

    /// The LUN grew to `size_bytes` (both nodes' files grow with holes, so nothing new is
    /// out of sync). Persist before a write may reach the new space: a start compares the
    /// metadata's size with the LUN's.
    pub fn grow(&mut self, size_bytes: u64) -> Result<Persist, crate::meta::MetaError> {
        if size_bytes == self.meta.size_bytes {
            return Ok(Persist::No);
        }
        self.meta.grow(size_bytes)?;
        Ok(self.needs_if(true))
    }

    /// The synchronization state.
    pub fn state(&self) -> SyncState {
        self.state
    }

    /// The LUN's stable id.
    pub fn key(&self) -> u64 {
        self.meta.lun_key
    }

    /// Bytes per bitmap region (fixed when the metadata was created).
    pub fn region_bytes(&self) -> u64 {
        self.meta.bitmap.region_bytes()
    }

    /// Our hello entry for this LUN, as a node in role `primary`. `writes_unanswered`:
    /// mirrored writes of this node's last term to this LUN still wait for the peer's
    /// answer (see [`LinkShard::holds_lun`](super::LinkShard::holds_lun)).
    ///
    /// A node that is no longer primary with such writes was demoted without draining
    /// them: the old primary frozen (SIGSTOP, a hang) while its peer took over, and
    /// demoted by its controller once it ran again. They may have landed here only, and
    /// nothing names their regions to the peer yet (the peer loss that records them comes
    /// later): the hello says crashed, so the new primary's resync compares every region.
    /// Found by the simulation (seed 39167 of the lease takeover): the new primary planned
    /// from its own bitmap, and an unanswered write of the old one stayed on it alone while
    /// both said UpToDate.
    pub fn hello(&self, primary: bool, writes_unanswered: bool) -> LunHello {
        LunHello {
            lun_key: self.meta.lun_key,
            size_bytes: self.meta.size_bytes,
            region_bytes: self.meta.region_bytes,
            gen: self.meta.gen,
            flags: GenFlags {
                outdated: self.meta.flags.outdated,
                inconsistent: self.meta.flags.inconsistent,
                primary,
                crashed: self.meta.flags.crashed || (writes_unanswered && !primary),
            },
        }
    }

    // ------------------------------------------------------------- roles and promotion

    /// Whether this copy may not serve as a primary: a resync into it did not finish, or
    /// it was given up (`resolve --discard-local`).
    pub fn unusable_as_primary(&self) -> bool {
        self.meta.flags.inconsistent || self.meta.flags.outdated
    }

    /// Whether `promote` (without `--force`) must refuse because of this LUN's data: it is
    /// unusable, or a resync into it is going on.
    pub fn blocks_promotion(&self) -> bool {
        self.state == SyncState::SyncTarget || self.unusable_as_primary()
    }

    /// The peer at our start (we are configured primary) holds newer data, or the two split:
    /// the peer must stay the source. Returns what the generation ids said.
    pub fn peer_is_ahead_at_start(&self, peer: &LunHello) -> Option<crate::genid::Decision> {
        plan::peer_is_ahead_at_start(&self.meta, peer)
    }

    /// Records the role (promote, demote), so that a crash is known at the next start to
    /// have been a primary's.
    ///
    /// A node made primary (with `promote --force` when its data was outdated) is no longer
    /// "outdated": it serves, and what it writes is the newest data there is. Why it matters:
    /// outdated, inconsistent and crashed together are how `resolve --discard-local` marks
    /// given-up data that a resync overwrites whole; a forced primary that crashed would
    /// have looked given up, and its writes would have been overwritten without a split
    /// brain being declared (found by the simulation).
    pub fn set_role(&mut self, primary: bool) -> Persist {
        let changed = self.meta.flags.primary != primary || (primary && self.meta.flags.outdated);
        self.meta.flags.primary = primary;
        if primary {
            self.meta.flags.outdated = false;
        }
        self.needs_if(changed)
    }

    /// `resolve --discard-local` on a secondary: the data is given up, and the primary's next
    /// resync overwrites every region (our changes may sit where the peer has holes).
    pub fn discard_local(&mut self) -> Persist {
        self.meta.flags.outdated = true;
        self.meta.flags.inconsistent = true;
        self.meta.flags.crashed = true;
        self.state = SyncState::Unknown;
        self.needs_if(true)
    }

    // ------------------------------------------------------------- the peer goes away

    /// The peer is lost with the writes of `unanswered` (offset, len) never acknowledged:
    /// they go into the bitmap, and the peer is recorded outdated under a new generation
    /// (`random` draws it). Persist, then call [`PairLun::peer_loss_recorded`].
    pub fn peer_lost(
        &mut self,
        unanswered: impl IntoIterator<Item = (u64, u64)>,
        random: [u8; 8],
        policy: PeerLossPolicy,
    ) -> Persist {
        // A completion on its way is void, but the target may have taken its ids (its ack
        // lost): what this node writes from now on must be under a new generation, or a
        // target that moved on from those ids too would not be seen as a split brain
        // (found by the simulation). `bump` keeps the sent ids in the history, so such a
        // target gets a full sync, not a false split brain.
        let completing = self.completing.take().is_some();
        self.copies_void = true;
        let mut any = false;
        for (offset, len) in unanswered {
            if len > 0 {
                self.meta.bitmap.mark(offset, len);
                any = true;
            }
        }
        if policy == PeerLossPolicy::Degrade || completing {
            self.outdate_peer_record(random);
        } else if any {
            self.hold_unanswered();
        }
        self.needs_if(true)
    }

    /// Suspended: nothing is answered without the peer until it is recorded outdated
    /// ([`PairLun::operator_outdated_peer`] moves the generation on then). Until then this
    /// node is ahead by unacknowledged writes only, so its generation stays: a peer
    /// promoted meanwhile (the failover controller's takeover of a cut-off primary) is
    /// then simply ahead at the next connection, not a split brain; and, since that peer
    /// cannot know which regions those writes touched, this node asks it to compare every
    /// region (the crash flag, cleared by the next completed resync).
    fn hold_unanswered(&mut self) {
        self.meta.flags.crashed = true;
    }

    /// A write to `[offset, offset + len)` that waits (held) while the peer is away and
    /// not recorded outdated: in the bitmap and flagged, on disk before it is applied
    /// here, without a new generation (see [`PairLun::hold_unanswered`]).
    pub fn record_held(&mut self, (offset, len): (u64, u64)) -> Persist {
        if self.meta.bitmap.covers(offset, len) && self.meta.flags.crashed && !self.unpersisted {
            return Persist::No;
        }
        self.meta.bitmap.mark(offset, len);
        self.hold_unanswered();
        self.needs_if(true)
    }

    /// Records the peer outdated under a generation of this node's own (drawn from
    /// `random`) if it is not yet. "Outdated" with no bitmap id is a completion sent and
    /// not acknowledged (see [`PairLun::end_pass`]): the peer may hold the current ids, so
    /// writes made alone go under a new generation (whose bitmap id is those ids).
    ///
    /// A completion still on its way is void from here: its ack must not put back the
    /// ids this node just moved on from. Why: `twinsan outdate-peer` while a completion
    /// was on its way drew a new generation, and the ack then replaced it in memory with
    /// the sent ids (UpToDate) while a failed persist left the new one on disk; after a
    /// crash the operator, told UpToDate, promoted the peer, and its writes made the two
    /// a split brain with no forced promotion (replica sim seed 1242531).
    fn outdate_peer_record(&mut self, random: [u8; 8]) {
        if !self.meta.flags.peer_outdated || self.meta.gen.bitmap == 0 {
            self.meta.flags.peer_outdated = true;
            self.meta.gen.bump(random);
            self.completing = None;
        }
    }

    /// After [`PairLun::peer_lost`]'s persist: `recorded` says whether it reached the disk.
    /// Without that record nothing may be acknowledged without the peer: suspended.
    pub fn peer_loss_recorded(&mut self, recorded: bool, policy: PeerLossPolicy) {
        self.state = match (recorded, policy) {
            (false, _) | (true, PeerLossPolicy::Suspend) => SyncState::Suspended,
            (true, PeerLossPolicy::Degrade) => SyncState::PeerOutdated,
        };
    }

    /// A write to `[offset, offset + len)` completes while the peer is away: it must be in
    /// the bitmap, under a "peer outdated" record, on disk before it is answered. Covered
    /// regions alone are not a record: after a restart they are the write-intent regions,
    /// and the peer is not yet recorded outdated (nor the generation bumped) until this
    /// write makes it so.
    pub fn record_alone(&mut self, (offset, len): (u64, u64), random: [u8; 8]) -> Persist {
        if self.meta.bitmap.covers(offset, len)
            && self.meta.flags.peer_outdated
            && self.meta.gen.bitmap != 0
            && !self.unpersisted
        {
            return Persist::No;
        }
        self.meta.bitmap.mark(offset, len);
        self.outdate_peer_record(random);
        self.needs_if(true)
    }

    /// `twinsan outdate-peer`: the operator vouches the peer is stale. The record of what
    /// differs must still be on disk before anything completes alone: a record that failed
    /// to persist is written again (persist, then [`PairLun::operator_outdate_recorded`]).
    /// Why: the operator vouches for the peer, not for which regions differ; a write
    /// released without that record is forgotten by a crash (found by the simulation).
    pub fn operator_outdated_peer(&mut self, random: [u8; 8]) -> Persist {
        // Held writes go out now, alone: from here on this node has moved on.
        let bump = !self.meta.flags.peer_outdated || self.meta.gen.bitmap == 0;
        if bump {
            self.outdate_peer_record(random);
        }
        let retry = self.unpersisted || bump;
        self.needs_if(retry)
    }

    /// After [`PairLun::operator_outdated_peer`]'s persist: suspended I/O goes on only if
    /// the record is on disk; a record that is not freezes the LUN whatever its state was.
    /// Why: a node promoted while its peer was away has not lost a peer (its state is
    /// `Unknown`, not `Suspended`), and letting that state answer alone released held
    /// writes with no "peer outdated" on disk: after a crash its `status` showed nothing
    /// that kept the old primary from starting alone without them (replica sim seed 114720).
    pub fn operator_outdate_recorded(&mut self, recorded: bool) {
        if !recorded {
            self.state = SyncState::Suspended;
        } else if self.state == SyncState::Suspended {
            self.state = SyncState::PeerOutdated;
        }
    }

    /// Marks regions that may differ from the peer (a verify found them different, a command
    /// failed here after it was mirrored, SANITIZE rewrites the LUN).
    pub fn mark_regions(&mut self, regions: impl IntoIterator<Item = u64>) -> Persist {
        for r in regions {
            self.meta.bitmap.set(r);
        }
        self.needs_if(true)
    }

    /// Marks `[offset, offset + len)` as possibly different from the peer.
    pub fn mark_range(&mut self, offset: u64, len: u64) -> Persist {
        self.meta.bitmap.mark(offset, len);
        self.needs_if(true)
    }

    /// Marks every region (the whole LUN changes outside the mirrored write path).
    pub fn mark_all(&mut self) -> Persist {
        self.meta.bitmap.set_all();
        self.needs_if(true)
    }

    /// This node's copy can no longer be trusted anywhere (a failed fsync may have dropped
    /// written pages): recorded like a crash, so the primary's next resync copies every
    /// region into it.
    pub fn distrust(&mut self) -> Persist {
        self.meta.flags.crashed = true;
        self.needs_if(true)
    }
}

// ----------------------------------------------------------------- resync, source side
impl PairLun {
    /// Plans the resync of this LUN to the peer that sent `peer`. A split brain is recorded
    /// in the state (`status` shows it) and refused.
    pub fn plan_resync(&mut self, peer: &LunHello) -> Result<ResyncPlan, PlanRefusal> {
        let plan = plan::plan_resync(&self.meta, self.crash_unlogged, peer);
        if plan == Err(PlanRefusal::SplitBrain) {
            self.state = SyncState::SplitBrain;
        }
        plan
    }

    /// A resync of `plan` starts at `now_ms`: the plan goes into the bitmap first (durably,
    /// if it named regions the bitmap did not: a full or initial copy that is interrupted
    /// must resume with what it did not copy yet). Returns every region to copy (the plan
    /// and everything dirty; the bitmap only shrinks from here), ascending.
    pub fn begin_resync(&mut self, plan: &ResyncPlan, now_ms: u64) -> (Vec<u64>, Persist) {
        let mut fresh = false;
        for &r in &plan.regions {
            fresh |= self.meta.bitmap.set(r);
        }
        let regions: Vec<u64> = self.meta.bitmap.iter_dirty().collect();
        self.copies_void = false;
        self.state = SyncState::SyncSource;
        self.progress = Progress::start(regions.len() as u64 * self.region_bytes(), now_ms);
        (regions, self.needs_if(fresh))
    }

    /// The peer acknowledged the copy of `region`: it is in sync (unless a write dirties it
    /// again, which the next pass finds). Not after a peer loss since the resync began
    /// (the ack came late, or the loss raced it): the region stays dirty. Why: the loss
    /// marked the regions of the writes it gave up on, whose frames may still be on their
    /// way on the old links; this copy was applied before the next round's gate closed
    /// those links, so one of those frames can still land there after a newer write, and
    /// only the next round's copy, behind its gate, makes the region equal again (replica
    /// sim seed 1072395: a data link cut alone held a write of round 1 whose region's
    /// copy was acknowledged after the loss; it landed over a newer write of round 2
    /// before that round's first change, and round 2 did not copy the region).
    pub fn region_copied(&mut self, region: u64) {
        if self.copies_void {
            return;
        }
        self.meta.bitmap.clear(region);
        self.progress.done_bytes = self.progress.done_bytes.saturating_add(self.region_bytes());
    }

    /// A pass over the planned regions ended (`passes` extra passes ran before it). Call
    /// with the pair's peer-loss transitions excluded: a loss either came before (and its
    /// record stands) or comes after this completion is persisted (and records the peer
    /// outdated again).
    pub fn end_pass(&mut self, initial: bool, passes: u32, random: [u8; 8]) -> PassEnd {
        let dirty: Vec<u64> = self.meta.bitmap.iter_dirty().collect();
        if !dirty.is_empty() {
            if passes >= RESYNC_PASSES_MAX {
                return PassEnd::GiveUp {
                    dirty: dirty.len() as u64,
                };
            }
            self.progress.total_bytes = self
                .progress
                .total_bytes
                .saturating_add(dirty.len() as u64 * self.region_bytes());
            return PassEnd::Again(dirty);
        }
        // The ids the target will adopt are recorded here before it hears them (a new
        // pair's first completion names its data's generation; the bitmap id retires),
        // with the peer still outdated: "outdated with no bitmap id" says a completion is on
        // its way, and a crash here does not forget that the peer may hold these ids (see
        // `outdate_peer_record`). "The peer is in sync" only once the target took them.
        if initial || self.meta.gen.current == 0 {
            self.meta.gen.bump(random);
        }
        self.meta.gen.resync_done_source();
        self.meta.flags.peer_outdated = true;
        self.completing = Some(self.meta.gen);
        PassEnd::Complete {
            gen: self.meta.gen,
            persist: self.needs_if(true),
        }
    }

    /// The target acknowledged the completion (call under the coordinator's lock, with
    /// the round still standing): the bitmap id retires, the peer is no longer outdated,
    /// and a crash's tail is covered. Persist it. Why only now: recorded before the ack, a
    /// target that failed to take it (its own metadata failing) would be on record here
    /// as a good copy; `status` and the start checks would then take the stale peer for
    /// one (found by the simulation: the peer was promoted, and it ended in a split brain).
    pub fn completion_acknowledged(&mut self) -> Persist {
        let Some(gen) = self.completing.take() else {
            return Persist::No;
        };
        self.meta.gen = gen;
        self.meta.flags.peer_outdated = false;
        self.meta.flags.crashed = false;
        self.state = SyncState::UpToDate;
        self.needs_if(true)
    }

    /// Every LUN's resync completed: a crash before the write-intent log is covered now.
    pub fn crash_covered(&mut self) {
        self.crash_unlogged = false;
    }

    /// `(done, total, eta_ms)` of the resync this node sources, at `now_ms`.
    pub fn source_progress(&self, now_ms: u64) -> (u64, u64, u64) {
        self.progress.estimate(now_ms)
    }
}

// ----------------------------------------------------------------- resync, target side
impl PairLun {
    /// The primary's control connection arrived with `peer`: if it holds newer data, this
    /// node is recorded outdated before any resync starts, so that a promotion while the
    /// resync is on its way (to this LUN, or to one before it) is refused instead of serving
    /// stale data. The resync's completion clears it.
    pub fn primary_connected(&mut self, peer: &LunHello) -> Persist {
        let behind = plan::primary_is_ahead(&self.meta, peer);
        let changed = behind && !self.meta.flags.outdated;
        if changed {
            self.meta.flags.outdated = true;
        }
        self.needs_if(changed)
    }

    /// Resync data arrives: the copy is inconsistent until the resync completes (persist
    /// that first, the first time).
    pub fn resync_data_arriving(&mut self) -> Persist {
        if self.state == SyncState::SyncTarget {
            return Persist::No;
        }
        self.meta.flags.inconsistent = true;
        self.state = SyncState::SyncTarget;
        self.needs_if(true)
    }

    /// The source says the resync is done with its ids `gen` (everything it copied is on
    /// stable storage here already). Persist, then [`PairLun::resync_target_recorded`].
    pub fn resync_done_target(&mut self, gen: &GenIds) -> Persist {
        self.meta.gen.resync_done_target(gen);
        self.meta.flags.inconsistent = false;
        self.meta.flags.outdated = false;
        // Every region now equals the source's: a tail from a crash is gone.
        self.meta.flags.crashed = false;
        self.meta.bitmap.clear_all();
        self.needs_if(true)
    }

    /// The completion is on disk: up to date. The next resync's progress starts from its
    /// own plan.
    pub fn resync_target_recorded(&mut self) {
        self.state = SyncState::UpToDate;
        self.progress = Progress::default();
    }

    /// What the source said of its progress (`ResyncProgress`).
    pub fn progress_heard(&mut self, done_bytes: u64, total_bytes: u64, eta_ms: u64) {
        self.progress.done_bytes = done_bytes;
        self.progress.total_bytes = total_bytes;
        self.progress.heard_eta_ms = eta_ms;
    }

    /// `(done, total, eta_ms)` as the source last said.
    pub fn heard_progress(&self) -> (u64, u64, u64) {
        self.progress.heard()
    }
}

// ----------------------------------------------------------------- status
impl PairLun {
    /// This LUN's line in `twinsan status` at `now_ms`. `source_connected`: on a sync
    /// target, whether the source's control connection stands (only then is a resync going
    /// on: an interrupted one's last figures would look like one in progress).
    pub fn status_line(&self, now_ms: u64, source_connected: bool) -> String {
        let m = &self.meta;
        let progress = match self.state {
            SyncState::SyncSource => Some(self.source_progress(now_ms)),
            SyncState::SyncTarget if source_connected => Some(self.heard_progress()),
            _ => None,
        };
        format!(
            "replica lun {:016x}: {:?} gen current={:016x} bitmap={:016x} dirty={} bytes{}",
            m.lun_key,
            self.state,
            m.gen.current,
            m.gen.bitmap,
            m.bitmap.dirty_bytes(),
            progress
                .map(super::progress::status_suffix)
                .unwrap_or_default()
        )
    }
}

#[cfg(test)]
mod tests;
