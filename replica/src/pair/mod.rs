//! The pair record of one LUN: what this node knows about its copy and the peer's, and every
//! transition of it that protocol C makes (DRBD's "disk states" and generation ids, per LUN).
//!
//! [`PairLun`] owns the LUN's metadata (generation ids, flags, the out-of-sync bitmap) and its
//! [`SyncState`]. The engine's replication drivers hold one per LUN behind a lock and ask it for
//! every decision: what a start after a crash means, whether a peer may be synced from here and
//! which regions, what a lost peer changes, what a resync pass or a completion records, what the
//! sync target keeps. Each transition says whether the metadata must be persisted before the
//! caller goes on ([`Persist`]); the caller writes [`PairLun::meta_for_disk`] and reports a
//! failure where the contract depends on it. Nothing here does I/O or reads a clock.
//!
//! - [`mirror`]: the primary's pair-wide coordinator ([`Mirror`]) and its per-link shards.
//! - [`apply`]: the secondary's gate on the primary's connections.
//! - [`plan`]: which regions a resync copies, and why it may refuse.
//! - [`progress`]: a resync's progress and its estimate of the time left.
//! - [`reconfig`]: whether a reload may add, grow or remove a LUN now, from the peer's LUNs.
//! - [`source`]: the sync source's resync round and watch, as steps its drivers take.

pub mod apply;
mod lun;
pub mod mirror;
pub mod plan;
pub mod progress;
pub mod reconfig;
pub mod source;

pub use apply::{Admit, ApplyGate};
pub use lun::{Marker, PairLun, PassEnd, StartNote, RESYNC_PASSES_MAX};
pub use mirror::{AckOutcome, LinkShard, Mirror, NewTerm, Pending, Port};
pub use plan::{PlanRefusal, ResyncPlan};
pub use progress::{Progress, ETA_UNKNOWN};
pub use source::{SourceRun, SourceStep, SourceStop, SourceTimers};

/// Whether a transition changed what must be on disk before its effect may be relied on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a transition that needs persisting must be written before the caller relies on it"]
pub enum Persist {
    /// Write the metadata ([`PairLun::meta_for_disk`]) before going on.
    Needed,
    /// Nothing changed on disk.
    No,
}

impl Persist {
    /// Whether the metadata must be written.
    pub fn needed(self) -> bool {
        self == Persist::Needed
    }

    fn from_changed(changed: bool) -> Persist {
        if changed {
            Persist::Needed
        } else {
            Persist::No
        }
    }
}

/// Per-LUN synchronization state, as `twinsan status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    /// Mirroring, both copies equal (or the peer unknown yet on a primary that just started).
    UpToDate,
    /// The peer is outdated: writes complete locally and are tracked in the bitmap.
    PeerOutdated,
    /// A resync copies regions from here to the peer.
    SyncSource,
    /// A resync copies regions from the peer here: inconsistent until it completes.
    SyncTarget,
    /// Both nodes changed the data: an operator must choose the victim.
    SplitBrain,
    /// I/O waits for the peer or for `twinsan outdate-peer`.
    Suspended,
    /// The peer is unreachable and the data may be behind (secondary view).
    Unknown,
}

/// What the pair does with writes while the peer is away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerLossPolicy {
    /// Record the peer outdated (bumped generation, dirty bitmap) and go on alone.
    Degrade,
    /// Hold completions until the peer returns or an operator outdates it.
    Suspend,
}

/// Whether a write completed on this node alone while the peer is away may be answered now
/// (`false`: hold it until the peer returns or an operator outdates the peer). Why a policy
/// and a LUN state: `Suspend` holds every such write unless the operator vouched for the
/// peer being stale; a LUN whose "peer outdated" record could not be persisted holds them
/// whatever the policy (nothing on disk says the copies may differ).
pub fn may_answer_alone(policy: PeerLossPolicy, operator_outdated: bool, state: SyncState) -> bool {
    let suspend = policy == PeerLossPolicy::Suspend && !operator_outdated;
    !suspend && state != SyncState::Suspended
}

/// Whether reservation snapshot `next` (origin, version) replaces the one applied last: a
/// newer version from the same primary instance, or anything from another instance (a new
/// primary, or the same one restarted: its versions start again). Why: snapshots travel on
/// every core's link, and one overtaken on another link must not replace a newer state.
pub fn pr_snapshot_supersedes(applied: (u64, u64), next: (u64, u64)) -> bool {
    applied.0 != next.0 || next.1 > applied.1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overtaken_reservation_snapshot_does_not_replace_a_newer_one() {
        let applied = (7, 5);
        assert!(
            !pr_snapshot_supersedes(applied, (7, 4)),
            "older, other link"
        );
        assert!(!pr_snapshot_supersedes(applied, (7, 5)), "the same again");
        assert!(pr_snapshot_supersedes(applied, (7, 6)));
        assert!(pr_snapshot_supersedes(applied, (9, 1)), "a new primary");
    }

    #[test]
    fn suspend_holds_alone_completions_until_the_operator_outdates_the_peer() {
        use PeerLossPolicy::*;
        use SyncState::*;
        assert!(may_answer_alone(Degrade, false, PeerOutdated));
        assert!(!may_answer_alone(Suspend, false, Suspended));
        assert!(!may_answer_alone(Suspend, false, PeerOutdated));
        assert!(may_answer_alone(Suspend, true, PeerOutdated));
        // No record on disk: held whatever the policy says.
        assert!(!may_answer_alone(Degrade, false, Suspended));
        assert!(!may_answer_alone(Degrade, true, Suspended));
    }
}
