//! Generation identifiers, in the spirit of DRBD's data-generation UUIDs.
//!
//! Every LUN carries a [`GenIds`]. `current` names the generation of the data on this node; whenever a
//! primary starts writing data its peer will not see (it degrades), the old `current` moves into
//! `bitmap` (the generation at which the dirty bitmap started tracking) and a fresh random `current` is
//! drawn. When a resync completes, the source retires `bitmap` into `history` and the target adopts
//! the source's ids. Comparing the two nodes' ids at connect time ([`decide`]) tells who is ahead,
//! whether the dirty bitmap can be used, and whether both moved on independently (split brain).
//!
//! Value `0` means "none". A LUN that has never been written as a primary has `current == 0`; its
//! content is the blank initial content (zeros), identical on both nodes of a new pair. When such a
//! LUN degrades, its bitmap id becomes [`JUST_CREATED`] ("my bitmap tracks every write since the LUN
//! was blank"), so that a peer still at `current == 0` can be brought up to date from the bitmap alone.

/// Bitmap/history id meaning "the LUN was blank (never written)". A `current` of 0 compares equal to
/// it, because both describe the blank initial content.
pub const JUST_CREATED: u64 = 1;

/// The generation ids of one LUN on one node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GenIds {
    /// Generation of the data on this node (0 = blank, never written as primary).
    pub current: u64,
    /// Generation at which the dirty bitmap started tracking (0 = the bitmap tracks nothing).
    pub bitmap: u64,
    /// Older bitmap ids, newest first (0 = none).
    pub history: [u64; 2],
}

/// The per-LUN state flags that [`decide`] looks at (sent in the hello).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GenFlags {
    /// Known to be behind its peer (fenced). Informational for `decide`: the ids are authoritative.
    pub outdated: bool,
    /// The data is a partial copy (an interrupted resync target): it can never be a source.
    pub inconsistent: bool,
    /// Currently the writer for this LUN.
    pub primary: bool,
    /// Stopped uncleanly since its last resync: writes in flight then may be on this node
    /// only, anywhere. The next resync must make every region equal, holes included.
    pub crashed: bool,
}

/// What to do when two nodes' LUNs meet (see [`decide`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Same generation. The data can differ only in regions covered by either side's dirty bitmap
    /// (an unacknowledged tail after a crash); the current primary copies those regions to the other.
    InSync,
    /// We are ahead and the peer is at our bitmap id: copy only the regions dirty in our bitmap (plus
    /// the peer's own dirty regions).
    SyncSourceBitmap,
    /// The peer is ahead and we are at its bitmap id.
    SyncTargetBitmap,
    /// We are ahead, but the peer is at an older generation our bitmap does not cover: copy everything.
    SyncSourceFull,
    /// The peer is ahead by more than its bitmap covers.
    SyncTargetFull,
    /// Both moved on from a common ancestor. Never resolved silently: an operator must choose the
    /// victim.
    SplitBrain,
    /// Both claim to be primary, but the ids show no divergence: at most one side wrote since they
    /// parted (a primary answers a write alone only under a new generation). A role conflict, not
    /// a verdict on the data: nothing is copied until one side steps down, and the ids are
    /// compared afresh then. Typically an old primary that was frozen (SIGSTOP, a hang) while
    /// its peer took over, and that answers a connection before it notices and demotes.
    BothPrimary,
    /// No common history, or no side holds usable (consistent) data to copy from: refuse.
    Unrelated,
    /// A brand-new pair (both blank). The configured primary is the source; only allocated regions
    /// need copying. `source_is_local` is `local.primary`, so when neither side is primary, neither
    /// starts copying until one is promoted.
    InitialSync {
        /// Whether this node is the source.
        source_is_local: bool,
    },
}

impl GenIds {
    /// The ids of a blank LUN.
    pub const BLANK: GenIds = GenIds {
        current: 0,
        bitmap: 0,
        history: [0, 0],
    };

    /// Turns 8 random bytes into a generation id that is neither 0 nor [`JUST_CREATED`].
    pub fn id_from_random(random: [u8; 8]) -> u64 {
        let raw = u64::from_le_bytes(random);
        // Reserved values are remapped rather than rejected so callers never loop on randomness.
        if raw <= JUST_CREATED {
            raw + 2
        } else {
            raw
        }
    }

    /// Degrade: the primary goes on without its peer. The old `current` becomes the bitmap id unless
    /// the bitmap already tracks an older generation (then it covers this one too), and a fresh
    /// random `current` is drawn so that any later divergence is detectable.
    ///
    /// When the bitmap id is already set, the old `current` goes into the history instead of being
    /// dropped: the peer may have adopted it (a `ResyncDone` whose ack was lost), and forgetting it
    /// would turn that peer into a false split brain. Such a peer then gets a full sync.
    pub fn bump(&mut self, random: [u8; 8]) {
        if self.bitmap == 0 {
            self.bitmap = normalized(self.current);
        } else if self.current != 0 && !self.history.contains(&self.current) {
            self.history = [self.current, self.history[0]];
        }
        let mut fresh = Self::id_from_random(random);
        // A collision with our own ids would make divergence undetectable; flip a bit to avoid it.
        while fresh == self.current || fresh == self.bitmap || self.history.contains(&fresh) {
            fresh = fresh.wrapping_add(2);
        }
        self.current = fresh;
        assert!(self.current > JUST_CREATED);
        assert!(self.bitmap != 0);
    }

    /// Resync finished on the source: the bitmap id is retired into the history.
    pub fn resync_done_source(&mut self) {
        if self.bitmap != 0 {
            self.history = [self.bitmap, self.history[0]];
            self.bitmap = 0;
        }
    }

    /// Resync finished on the target: it now holds exactly the source's generation.
    pub fn resync_done_target(&mut self, source: &GenIds) {
        *self = *source;
    }

    /// Every ancestor id this node knows (bitmap and history), zeros excluded.
    fn ancestors(&self) -> impl Iterator<Item = u64> + '_ {
        [self.bitmap, self.history[0], self.history[1]]
            .into_iter()
            .filter(|id| *id != 0)
    }
}

/// Whether both sides moved on from a common ancestor: neither `current` is the other's
/// ancestor (nor equal to it), yet they share one.
fn diverged(local: &GenIds, peer: &GenIds) -> bool {
    let local_current = normalized(local.current);
    let peer_current = normalized(peer.current);
    local_current != peer_current
        && !local.ancestors().any(|id| id == peer_current)
        && !peer.ancestors().any(|id| id == local_current)
        && local
            .ancestors()
            .any(|id| peer.ancestors().any(|other| other == id))
}

/// A `current` of 0 (blank) is the same content as the [`JUST_CREATED`] ancestor.
fn normalized(current: u64) -> u64 {
    if current == 0 {
        JUST_CREATED
    } else {
        current
    }
}

/// Compares our LUN's ids with the peer's and decides the direction of resync (if any).
///
/// The table, first match wins:
/// 1. both primary → `SplitBrain` if the ids diverged (rule 6 below), else `BothPrimary`;
/// 2. both blank → `InitialSync { source_is_local: local.primary }`;
/// 3. same `current` → `InSync`, unless exactly one side is inconsistent (it becomes the bitmap
///    target) or both are (`Unrelated`: nothing to copy from);
/// 4. our bitmap id is the peer's `current` → `SyncSourceBitmap` (and mirrored → `SyncTargetBitmap`);
/// 5. the peer's `current` is in our history → `SyncSourceFull` (and mirrored);
/// 6. any common ancestor → `SplitBrain`;
/// 7. otherwise `Unrelated`; except that a blank side in its first sync (current 0 and
///    inconsistent) is a full target of the other (before 4).
///
/// A decision that would make an inconsistent side the source becomes `Unrelated`. The table is
/// symmetric: `decide(a, b)` is the mirror image of `decide(b, a)`.
pub fn decide(
    local: &GenIds,
    local_flags: GenFlags,
    peer: &GenIds,
    peer_flags: GenFlags,
) -> Decision {
    if local_flags.primary && peer_flags.primary {
        // Deciding the split brain from roles alone turned a stopped old primary's first
        // answer after SIGCONT (before it demoted) into a permanent split brain on the new
        // primary, which then gave its role up: nobody served (the failover rig's sigstop
        // scenario). The ids alone say whether both wrote.
        return if diverged(local, peer) {
            Decision::SplitBrain
        } else {
            Decision::BothPrimary
        };
    }
    if local.current == 0 && peer.current == 0 {
        return Decision::InitialSync {
            source_is_local: local_flags.primary,
        };
    }
    let local_current = normalized(local.current);
    let peer_current = normalized(peer.current);
    if local_current == peer_current {
        return match (local_flags.inconsistent, peer_flags.inconsistent) {
            (false, false) => Decision::InSync,
            (false, true) => Decision::SyncSourceBitmap,
            (true, false) => Decision::SyncTargetBitmap,
            (true, true) => Decision::Unrelated,
        };
    }
    // A side still without a current id that is inconsistent is in the middle of its first
    // sync: it never held data of its own (the first write it answers alone draws an id,
    // and so does a completed sync into it), whatever the other side did meanwhile (its
    // history keeps only two ids). A full copy into it, not "unrelated", which left the
    // pair waiting for an operator with nothing to decide (replica sim seed 3097325). A
    // blank side that is consistent stays unrelated: its metadata may have been lost.
    let decision = if peer.current == 0 && peer_flags.inconsistent {
        Decision::SyncSourceFull
    } else if local.current == 0 && local_flags.inconsistent {
        Decision::SyncTargetFull
    } else if local.bitmap != 0 && local.bitmap == peer_current {
        Decision::SyncSourceBitmap
    } else if peer.bitmap != 0 && peer.bitmap == local_current {
        Decision::SyncTargetBitmap
    } else if local.ancestors().any(|id| id == peer_current) {
        Decision::SyncSourceFull
    } else if peer.ancestors().any(|id| id == local_current) {
        Decision::SyncTargetFull
    } else if diverged(local, peer) {
        Decision::SplitBrain
    } else {
        Decision::Unrelated
    };
    match decision {
        Decision::SyncSourceBitmap | Decision::SyncSourceFull if local_flags.inconsistent => {
            Decision::Unrelated
        }
        Decision::SyncTargetBitmap | Decision::SyncTargetFull if peer_flags.inconsistent => {
            Decision::Unrelated
        }
        other => other,
    }
}

impl Decision {
    /// The decision as seen from the other side.
    pub fn mirrored(self) -> Decision {
        match self {
            Decision::SyncSourceBitmap => Decision::SyncTargetBitmap,
            Decision::SyncTargetBitmap => Decision::SyncSourceBitmap,
            Decision::SyncSourceFull => Decision::SyncTargetFull,
            Decision::SyncTargetFull => Decision::SyncSourceFull,
            Decision::InitialSync { source_is_local } => Decision::InitialSync {
                source_is_local: !source_is_local,
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: GenFlags = GenFlags {
        outdated: false,
        inconsistent: false,
        primary: false,
        crashed: false,
    };
    const PRI: GenFlags = GenFlags {
        outdated: false,
        inconsistent: false,
        primary: true,
        crashed: false,
    };
    const INCONS: GenFlags = GenFlags {
        outdated: false,
        inconsistent: true,
        primary: false,
        crashed: false,
    };

    fn ids(current: u64, bitmap: u64, history: [u64; 2]) -> GenIds {
        GenIds {
            current,
            bitmap,
            history,
        }
    }

    /// Checks `decide` both ways round, so the table's symmetry is tested with every case.
    fn check(a: GenIds, af: GenFlags, b: GenIds, bf: GenFlags, expected: Decision) {
        assert_eq!(decide(&a, af, &b, bf), expected, "a={a:?} b={b:?}");
        let mirror = match expected {
            Decision::InitialSync { .. } => Decision::InitialSync {
                source_is_local: bf.primary,
            },
            other => other.mirrored(),
        };
        assert_eq!(decide(&b, bf, &a, af), mirror, "mirror a={a:?} b={b:?}");
    }

    #[test]
    fn brand_new_pair_configured_primary_is_source() {
        check(
            GenIds::BLANK,
            PRI,
            GenIds::BLANK,
            SEC,
            Decision::InitialSync {
                source_is_local: true,
            },
        );
        check(
            GenIds::BLANK,
            SEC,
            GenIds::BLANK,
            SEC,
            Decision::InitialSync {
                source_is_local: false,
            },
        );
    }

    #[test]
    fn both_primary_without_divergence_waits_for_one_to_step_down() {
        check(
            ids(5, 0, [0, 0]),
            PRI,
            ids(5, 0, [0, 0]),
            PRI,
            Decision::BothPrimary,
        );
        // The new primary wrote after the takeover; the frozen old one did not (it would
        // have drawn a new id first): whoever steps down becomes the bitmap target.
        let old = ids(77, 0, [33, 0]);
        let mut new = old;
        new.bump([4; 8]);
        check(new, PRI, old, PRI, Decision::BothPrimary);
        check(new, PRI, old, SEC, Decision::SyncSourceBitmap);
    }

    #[test]
    fn both_primary_after_both_wrote_is_split_brain() {
        let base = ids(77, 0, [33, 0]);
        let mut a = base;
        let mut b = base;
        a.bump([1; 8]);
        b.bump([2; 8]);
        check(a, PRI, b, PRI, Decision::SplitBrain);
        let through_history = (ids(300, 0, [200, 100]), ids(400, 100, [0, 0]));
        check(
            through_history.0,
            PRI,
            through_history.1,
            PRI,
            Decision::SplitBrain,
        );
    }

    #[test]
    fn crash_and_restart_without_changes_is_in_sync() {
        let gen = ids(77, 0, [33, 0]);
        check(gen, PRI, gen, SEC, Decision::InSync);
        check(gen, SEC, gen, SEC, Decision::InSync);
    }

    #[test]
    fn secondary_away_while_primary_degraded() {
        let mut primary = ids(77, 0, [33, 0]);
        let secondary = primary;
        primary.bump([9; 8]);
        assert_eq!(primary.bitmap, 77);
        check(primary, PRI, secondary, SEC, Decision::SyncSourceBitmap);
        // Degrading again before the resync keeps the older bitmap id, which still matches.
        primary.bump([10; 8]);
        assert_eq!(primary.bitmap, 77);
        check(primary, PRI, secondary, SEC, Decision::SyncSourceBitmap);
    }

    #[test]
    fn peer_that_adopted_an_intermediate_generation_is_not_split_brain() {
        // Initial sync: the source bumps from blank; the peer adopts the ids in ResyncDone, but the
        // ack is lost, so the source still holds its bitmap id when it degrades again.
        let mut source = GenIds::BLANK;
        source.bump([7; 8]);
        let mut adopted = source;
        adopted.resync_done_source();
        let peer = adopted;
        source.bump([8; 8]);
        check(source, PRI, peer, SEC, Decision::SyncSourceFull);
    }

    #[test]
    fn blank_peer_after_degrade_from_blank_uses_bitmap() {
        let mut primary = GenIds::BLANK;
        primary.bump([3; 8]);
        assert_eq!(primary.bitmap, JUST_CREATED);
        check(primary, PRI, GenIds::BLANK, SEC, Decision::SyncSourceBitmap);
    }

    #[test]
    fn replacement_blank_node_after_history_needs_full_sync() {
        let mut primary = GenIds::BLANK;
        primary.bump([3; 8]);
        primary.resync_done_source();
        assert_eq!(primary.history[0], JUST_CREATED);
        check(primary, PRI, GenIds::BLANK, SEC, Decision::SyncSourceFull);
    }

    #[test]
    fn both_bumped_independently_is_split_brain() {
        let base = ids(77, 0, [33, 0]);
        let mut a = base;
        let mut b = base;
        a.bump([1; 8]);
        b.bump([2; 8]);
        check(a, PRI, b, SEC, Decision::SplitBrain);
        check(a, SEC, b, SEC, Decision::SplitBrain);
    }

    #[test]
    fn split_brain_through_history() {
        // a: degraded twice with a resync between against a third party; b: bumped from the old base.
        let a = ids(300, 0, [200, 100]);
        let b = ids(400, 100, [0, 0]);
        check(a, SEC, b, SEC, Decision::SplitBrain);
    }

    #[test]
    fn reversed_roles_after_failover() {
        // In sync at 77; node A fails, B is promoted and degrades; A comes back as secondary.
        let in_sync = ids(77, 0, [33, 0]);
        let a = in_sync;
        let mut b = in_sync;
        b.bump([4; 8]);
        check(b, PRI, a, SEC, Decision::SyncSourceBitmap);
        check(a, SEC, b, PRI, Decision::SyncTargetBitmap);
        // After the resync, A adopts B's ids; then A is promoted while B is away.
        let mut b_after = b;
        b_after.resync_done_source();
        let mut a_after = a;
        a_after.resync_done_target(&b_after);
        check(a_after, SEC, b_after, SEC, Decision::InSync);
        a_after.bump([5; 8]);
        check(a_after, PRI, b_after, SEC, Decision::SyncSourceBitmap);
    }

    #[test]
    fn history_match_needs_full_sync() {
        let source = ids(300, 0, [200, 100]);
        check(
            source,
            PRI,
            ids(200, 0, [100, 0]),
            SEC,
            Decision::SyncSourceFull,
        );
        check(
            source,
            PRI,
            ids(100, 0, [0, 0]),
            SEC,
            Decision::SyncSourceFull,
        );
        // The bitmap id matches before history is consulted.
        check(
            ids(300, 200, [100, 0]),
            PRI,
            ids(200, 0, [0, 0]),
            SEC,
            Decision::SyncSourceBitmap,
        );
    }

    #[test]
    fn a_blank_side_in_its_first_sync_is_copied_whole_whatever_the_other_did() {
        let inconsistent = GenFlags {
            inconsistent: true,
            ..SEC
        };
        // The primary moved on several generations while the peer's first sync was cut.
        check(
            ids(5, 6, [7, 8]),
            PRI,
            GenIds::BLANK,
            inconsistent,
            Decision::SyncSourceFull,
        );
    }

    #[test]
    fn unrelated_histories_refused() {
        check(
            ids(5, 6, [7, 8]),
            PRI,
            ids(9, 10, [11, 12]),
            SEC,
            Decision::Unrelated,
        );
        check(
            ids(5, 0, [0, 0]),
            PRI,
            GenIds::BLANK,
            SEC,
            Decision::Unrelated,
        );
    }

    #[test]
    fn interrupted_resync_target_stays_target() {
        let mut source = ids(77, 0, [0, 0]);
        let target = source;
        source.bump([6; 8]);
        check(source, PRI, target, INCONS, Decision::SyncSourceBitmap);
        // Same generation but the peer holds a partial copy (interrupted reconcile).
        check(
            ids(77, 0, [0, 0]),
            PRI,
            ids(77, 0, [0, 0]),
            INCONS,
            Decision::SyncSourceBitmap,
        );
        check(
            ids(77, 0, [0, 0]),
            INCONS,
            ids(77, 0, [0, 0]),
            INCONS,
            Decision::Unrelated,
        );
    }

    #[test]
    fn inconsistent_side_never_source() {
        let mut ahead = ids(77, 0, [0, 0]);
        let behind = ahead;
        ahead.bump([6; 8]);
        check(ahead, INCONS, behind, SEC, Decision::Unrelated);
    }

    #[test]
    fn outdated_flag_does_not_override_ids() {
        let gen = ids(77, 0, [0, 0]);
        let outdated = GenFlags {
            outdated: true,
            ..SEC
        };
        check(gen, PRI, gen, outdated, Decision::InSync);
    }

    #[test]
    fn bump_never_produces_reserved_or_own_ids() {
        let mut gen = ids(2, 0, [0, 0]);
        gen.bump([0; 8]);
        assert!(gen.current > JUST_CREATED);
        assert_ne!(gen.current, gen.bitmap);
        assert_eq!(GenIds::id_from_random([0; 8]), 2);
        assert_eq!(GenIds::id_from_random([1, 0, 0, 0, 0, 0, 0, 0]), 3);
    }
}
