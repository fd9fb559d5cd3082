//! Resync planning on the primary: from this node's metadata and the peer's hello, which
//! regions a resync must copy, or why there must be none.

use crate::genid::{decide, Decision, GenFlags};
use crate::meta::Meta;
use crate::wire::LunHello;

/// What a resync of one LUN copies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncPlan {
    /// The regions to copy (before the bitmap's own dirty regions are added), ascending.
    pub regions: Vec<u64>,
    /// A brand-new pair: the first completion draws the first generation id.
    pub initial: bool,
    /// A node stopped uncleanly in a way no bitmap covers: every region is compared.
    pub every_region_after_crash: bool,
    /// What the generation ids said.
    pub decision: Decision,
}

/// Why this node must not sync the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanRefusal {
    /// The peer's LUN has another size or region size: a smaller peer could not hold our
    /// data (after a failover initiators would see the LUN shrink), and a different region
    /// size would make the bitmaps disagree.
    Geometry {
        /// Ours.
        size_bytes: u64,
        /// The peer's.
        peer_size_bytes: u64,
        /// Ours.
        region_bytes: u64,
        /// The peer's.
        peer_region_bytes: u64,
    },
    /// Both nodes changed the data: never resolved silently.
    SplitBrain,
    /// The peer says it is primary too, with no divergence: retried until it steps down
    /// ([`Decision::BothPrimary`]); the LUN's state is not touched.
    PeerAlsoPrimary,
    /// The peer has newer or unrelated data.
    Refused(Decision),
}

/// Plans the resync of the LUN whose metadata is `meta` (this node, the primary) to the peer
/// that sent `peer`. `crash_unlogged`: this node crashed under metadata that predates the
/// write-intent log, so nothing names its in-flight regions.
pub fn plan_resync(
    meta: &Meta,
    crash_unlogged: bool,
    peer: &LunHello,
) -> Result<ResyncPlan, PlanRefusal> {
    // A larger peer is a LUN grown online on the secondary first (reconfig.rs), until the
    // primary grows it too: everything this node copies fits, and the rest of the peer's
    // file is the hole the growth added.
    if peer.size_bytes < meta.size_bytes || peer.region_bytes != meta.bitmap.region_bytes() {
        return Err(PlanRefusal::Geometry {
            size_bytes: meta.size_bytes,
            peer_size_bytes: peer.size_bytes,
            region_bytes: meta.bitmap.region_bytes(),
            peer_region_bytes: peer.region_bytes,
        });
    }
    let ours = GenFlags {
        outdated: meta.flags.outdated,
        inconsistent: meta.flags.inconsistent,
        primary: true,
        crashed: meta.flags.crashed,
    };
    let h = peer.flags;
    // A peer that ran `twinsan resolve --discard-local` gave its data up: copy all. (Outdated
    // and inconsistent alone is a resync into it that was interrupted: the generation ids
    // still say where it stands.)
    let discarded = h.outdated && h.inconsistent && h.crashed && !h.primary;
    let decision = if discarded {
        Decision::SyncSourceFull
    } else {
        decide(&meta.gen, ours, &peer.gen, h)
    };
    let every_region: Vec<u64> = (0..meta.bitmap.regions()).collect();
    let regions = match decision {
        Decision::InSync | Decision::SyncSourceBitmap => meta.bitmap.iter_dirty().collect(),
        // Every region, but only allocated ones travel as data: a hole goes as a
        // deallocation, so a thin LUN stays thin on the peer, and whatever the peer's file
        // held there before (a reused image, a lost metadata file) does not survive.
        Decision::InitialSync {
            source_is_local: true,
        }
        | Decision::SyncSourceFull => every_region.clone(),
        Decision::SplitBrain => return Err(PlanRefusal::SplitBrain),
        Decision::BothPrimary => return Err(PlanRefusal::PeerAlsoPrimary),
        other => return Err(PlanRefusal::Refused(other)),
    };
    // A peer that crashed as primary since its last resync may hold writes nobody
    // acknowledged, in regions only its own write-intent log names: compare every region
    // (holes travel as small deallocations). Our own crash is in our bitmap (the
    // write-intent regions), unless it predates the log.
    let every_region_after_crash = h.crashed || crash_unlogged;
    Ok(ResyncPlan {
        regions: if every_region_after_crash {
            every_region
        } else {
            regions
        },
        initial: matches!(decision, Decision::InitialSync { .. }),
        every_region_after_crash,
        decision,
    })
}

/// Why the peer that sent `peer` must stay the source, seen from a node configured primary
/// at its start: the peer holds newer data for this LUN (it was promoted while we were away
/// and restarted since as secondary), the two split, or it is primary itself.
pub fn peer_is_ahead_at_start(meta: &Meta, peer: &LunHello) -> Option<Decision> {
    let ours = GenFlags {
        outdated: meta.flags.outdated,
        inconsistent: meta.flags.inconsistent,
        primary: true,
        crashed: meta.flags.crashed,
    };
    let d = decide(&meta.gen, ours, &peer.gen, peer.flags);
    matches!(
        d,
        Decision::SyncTargetBitmap
            | Decision::SyncTargetFull
            | Decision::SplitBrain
            | Decision::BothPrimary
    )
    .then_some(d)
}

/// On a secondary, whether the primary that sent `peer` holds newer data than ours (so this
/// node must be recorded outdated before any resync starts).
pub fn primary_is_ahead(meta: &Meta, peer: &LunHello) -> bool {
    let ours = GenFlags {
        outdated: meta.flags.outdated,
        inconsistent: meta.flags.inconsistent,
        primary: false,
        crashed: meta.flags.crashed,
    };
    matches!(
        decide(&meta.gen, ours, &peer.gen, peer.flags),
        Decision::SyncTargetBitmap
            | Decision::SyncTargetFull
            | Decision::InitialSync {
                source_is_local: false
            }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGION: u64 = 1 << 20;

    fn meta() -> Meta {
        Meta::new(7, 8 * REGION, REGION).unwrap()
    }

    fn hello(m: &Meta, flags: GenFlags) -> LunHello {
        LunHello {
            lun_key: m.lun_key,
            size_bytes: m.size_bytes,
            region_bytes: m.region_bytes,
            gen: m.gen,
            flags,
        }
    }

    const SECONDARY: GenFlags = GenFlags {
        outdated: false,
        inconsistent: false,
        primary: false,
        crashed: false,
    };

    #[test]
    fn a_new_pair_copies_every_region_and_draws_the_first_generation() {
        let m = meta();
        let plan = plan_resync(&m, false, &hello(&m, SECONDARY)).unwrap();
        assert!(plan.initial);
        assert_eq!(plan.regions, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn a_degraded_primary_copies_only_its_dirty_regions() {
        let mut m = meta();
        let peer = hello(&m, SECONDARY);
        m.gen.bump([1; 8]);
        m.bitmap.set(3);
        m.bitmap.set(5);
        // The peer is still at our bitmap id (blank: JUST_CREATED): a bitmap resync.
        let plan = plan_resync(&m, false, &peer).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(plan.decision, Decision::SyncSourceBitmap);
        assert_eq!(plan.regions, vec![3, 5]);
        assert!(!plan.every_region_after_crash);
    }

    #[test]
    fn a_crashed_peer_or_an_unlogged_crash_compares_every_region() {
        let mut m = meta();
        m.gen.bump([1; 8]);
        m.bitmap.set(2);
        let mut peer = hello(&m, SECONDARY);
        peer.flags.crashed = true;
        let plan = plan_resync(&m, false, &peer).unwrap();
        assert_eq!(plan.decision, Decision::InSync);
        assert_eq!(plan.regions.len(), 8);
        peer.flags.crashed = false;
        assert_eq!(plan_resync(&m, false, &peer).unwrap().regions, vec![2]);
        assert_eq!(plan_resync(&m, true, &peer).unwrap().regions.len(), 8);
    }

    #[test]
    fn a_discarded_peer_gets_a_full_copy_and_a_split_brain_is_refused() {
        let mut m = meta();
        m.gen.bump([1; 8]);
        let discarded = GenFlags {
            outdated: true,
            inconsistent: true,
            crashed: true,
            primary: false,
        };
        // Both moved on from the same generation.
        let mut peer = hello(&m, discarded);
        peer.gen.bump([2; 8]);
        m.gen.bump([3; 8]);
        let plan = plan_resync(&m, false, &peer).unwrap();
        assert_eq!(plan.decision, Decision::SyncSourceFull);
        assert_eq!(plan.regions.len(), 8);
        peer.flags = SECONDARY;
        assert_eq!(plan_resync(&m, false, &peer), Err(PlanRefusal::SplitBrain));
        peer.flags.primary = true;
        assert_eq!(plan_resync(&m, false, &peer), Err(PlanRefusal::SplitBrain));
    }

    #[test]
    fn an_old_primary_that_has_not_stepped_down_is_retried_not_split() {
        // This node took over and wrote; the old primary, frozen meanwhile, still says
        // primary at the first connection after it woke up.
        let mut m = meta();
        let mut old = hello(&m, SECONDARY);
        old.flags.primary = true;
        m.gen.bump([5; 8]);
        assert_eq!(
            plan_resync(&m, false, &old),
            Err(PlanRefusal::PeerAlsoPrimary)
        );
        assert_eq!(
            peer_is_ahead_at_start(&m, &old),
            Some(Decision::BothPrimary)
        );
        // Once it has demoted, it is the bitmap target.
        old.flags.primary = false;
        let plan = plan_resync(&m, false, &old).unwrap();
        assert_eq!(plan.decision, Decision::SyncSourceBitmap);
    }

    #[test]
    fn a_peer_of_another_geometry_is_refused() {
        let m = meta();
        let mut peer = hello(&m, SECONDARY);
        peer.size_bytes /= 2;
        assert!(matches!(
            plan_resync(&m, false, &peer),
            Err(PlanRefusal::Geometry { .. })
        ));
        peer.size_bytes = m.size_bytes;
        peer.region_bytes *= 2;
        assert!(matches!(
            plan_resync(&m, false, &peer),
            Err(PlanRefusal::Geometry { .. })
        ));
    }

    #[test]
    fn a_peer_grown_first_is_synced_within_this_nodes_size() {
        let m = meta();
        let mut peer = hello(&m, SECONDARY);
        peer.size_bytes *= 2;
        let plan = plan_resync(&m, false, &peer).unwrap();
        assert!(plan.regions.iter().all(|&r| r < m.bitmap.regions()));
    }

    #[test]
    fn a_peer_with_newer_data_is_never_synced_from_here() {
        let m = meta();
        let mut peer = hello(&m, SECONDARY);
        let mut newer = m.clone();
        newer.gen.bump([3; 8]);
        peer.gen = newer.gen;
        assert_eq!(
            plan_resync(&m, false, &peer),
            Err(PlanRefusal::Refused(Decision::SyncTargetBitmap))
        );
        assert_eq!(
            peer_is_ahead_at_start(&m, &peer),
            Some(Decision::SyncTargetBitmap)
        );
        assert!(primary_is_ahead(
            &m,
            &LunHello {
                flags: GenFlags {
                    primary: true,
                    ..SECONDARY
                },
                ..peer
            }
        ));
    }
}
