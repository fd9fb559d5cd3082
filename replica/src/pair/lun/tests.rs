//! Unit tests of the per-LUN pair record.

use super::*;
use crate::genid::{decide, Decision};

const REGION: u64 = 1 << 20;

fn blank() -> Meta {
    let mut m = Meta::new(7, 16 * REGION, REGION).unwrap();
    m.flags.intent_log = true;
    m
}

/// The plan of a resync of what the bitmap holds (no regions of its own).
fn bitmap_plan() -> ResyncPlan {
    ResyncPlan {
        regions: vec![],
        initial: false,
        every_region_after_crash: false,
        decision: Decision::SyncSourceBitmap,
    }
}

fn open(meta: Meta, marker: Marker, primary: bool) -> (PairLun, Persist, StartNote) {
    PairLun::open(meta, marker, primary, |_| vec![1, 2, 3])
}

#[test]
fn a_clean_start_in_the_same_role_writes_nothing() {
    let mut m = blank();
    m.flags.primary = true;
    let (lun, persist, note) = open(m.clone(), Marker::Absent, true);
    assert_eq!((persist, note), (Persist::No, StartNote::Clean));
    assert_eq!(lun.state(), SyncState::Unknown);
    assert!(!lun.crash_unlogged);
    // Another role is recorded, so a later crash is known to be a primary's.
    let (lun, persist, _) = open(m, Marker::Absent, false);
    assert_eq!(persist, Persist::Needed);
    assert!(!lun.meta().flags.primary);
}

#[test]
fn a_crashed_primary_keeps_its_intent_regions_and_tells_the_peer() {
    let mut m = blank();
    m.flags.primary = true;
    m.bitmap.set(4);
    let (lun, persist, note) = open(m, Marker::SameBoot, true);
    assert_eq!(persist, Persist::Needed);
    assert_eq!(
        note,
        StartNote::UncleanLogged {
            regions: 1,
            rebooted: false
        }
    );
    assert!(lun.meta().bitmap.is_dirty(4));
    assert!(
        lun.meta().flags.crashed,
        "the peer must compare every region"
    );
    assert!(!lun.crash_unlogged, "our own bitmap names the tail");
}

#[test]
fn a_machine_restart_or_an_unlogged_crash_covers_every_region() {
    // A secondary whose machine restarted: its page cache (acknowledged writes) is gone.
    let (lun, _, note) = open(blank(), Marker::OtherBoot, false);
    assert!(lun.meta().flags.crashed);
    assert!(lun.crash_unlogged);
    assert!(matches!(
        note,
        StartNote::UncleanLogged { rebooted: true, .. }
    ));
    // Metadata from before the write-intent log: the allocated regions are marked.
    let mut old = blank();
    old.flags.intent_log = false;
    let (lun, persist, note) = open(old, Marker::SameBoot, true);
    assert_eq!(persist, Persist::Needed);
    assert_eq!(
        note,
        StartNote::UncleanUnlogged {
            regions: 3,
            rebooted: false
        }
    );
    // Every region, durably (the allocated ones alone would miss holes here where the
    // peer may hold data).
    assert_eq!(lun.meta().bitmap.dirty_count(), 16);
    assert!(lun.crash_unlogged);
    assert!(lun.meta().flags.intent_log);
}

#[test]
fn a_power_loss_is_remembered_across_a_later_process_crash() {
    let mut m = blank();
    m.flags.primary = true;
    m.bitmap.set(4);
    let (lun, persist, _) = open(m, Marker::OtherBoot, true);
    assert_eq!(persist, Persist::Needed);
    assert_eq!(lun.meta().bitmap.dirty_count(), 16);
    // The process crashes again before any resync: the next start is the same boot.
    let disk = lun.meta_for_disk(&[]);
    let (lun, _, _) = open(disk, Marker::SameBoot, true);
    let peer = {
        let mut h = lun.hello(false, false);
        h.flags = Default::default();
        h
    };
    let mut lun = lun;
    let plan = lun.plan_resync(&peer).unwrap();
    assert_eq!(
        plan.regions.len(),
        16,
        "every region, not only the intent regions"
    );
}

#[test]
fn a_node_demoted_with_writes_running_that_crashed_asks_for_every_region() {
    // On record as secondary (demoted), with write-intent regions of its last term.
    let mut m = blank();
    m.flags.primary = false;
    m.bitmap.set(8);
    let (lun, _, _) = open(m, Marker::SameBoot, false);
    assert!(
        lun.hello(false, false).flags.crashed,
        "the new primary must compare every region"
    );
    // A secondary that crashed with nothing of its own in flight does not.
    let (lun, _, _) = open(blank(), Marker::SameBoot, false);
    assert!(!lun.hello(false, false).flags.crashed);
}

#[test]
fn a_demoted_node_with_writes_still_unanswered_asks_for_every_region() {
    // Running, not crashed: the old primary frozen while its peer took over, demoted once
    // it ran again, its last writes still waiting for the peer's answer.
    let (lun, _, _) = open(blank(), Marker::Absent, false);
    assert!(lun.hello(false, true).flags.crashed);
    // Once they are answered (they are on the peer) or recorded by the peer loss, the
    // hello says what the record says.
    assert!(!lun.hello(false, false).flags.crashed);
    // A primary's own unanswered writes are in its bitmap: it is the sync source.
    assert!(!lun.hello(true, true).flags.crashed);
}

#[test]
fn a_lost_peer_records_every_unanswered_write_under_a_new_generation() {
    let (mut lun, _, _) = open(blank(), Marker::Absent, true);
    let before = lun.meta().gen;
    let p = lun.peer_lost(
        [(3 * REGION + 5, 10), (0, 0)],
        [9; 8],
        PeerLossPolicy::Degrade,
    );
    assert_eq!(p, Persist::Needed);
    assert_eq!(lun.meta().bitmap.iter_dirty().collect::<Vec<_>>(), vec![3]);
    assert!(lun.meta().flags.peer_outdated);
    assert_ne!(lun.meta().gen.current, before.current);
    // A second loss before a resync keeps the generation: one degrade, one bump.
    let gen = lun.meta().gen;
    let _ = lun.peer_lost([], [8; 8], PeerLossPolicy::Degrade);
    assert_eq!(lun.meta().gen, gen);
    lun.peer_loss_recorded(true, PeerLossPolicy::Degrade);
    assert_eq!(lun.state(), SyncState::PeerOutdated);
    lun.peer_loss_recorded(false, PeerLossPolicy::Degrade);
    assert_eq!(
        lun.state(),
        SyncState::Suspended,
        "no record on disk: frozen"
    );
    // The operator's word writes the record again; only once it is on disk does I/O go on.
    assert_eq!(lun.operator_outdated_peer([5; 8]), Persist::Needed);
    lun.operator_outdate_recorded(false);
    assert_eq!(lun.state(), SyncState::Suspended);
    lun.mark_persisted();
    lun.operator_outdate_recorded(true);
    assert_eq!(lun.state(), SyncState::PeerOutdated);
}

#[test]
fn a_suspended_loss_keeps_the_generation_until_something_is_answered_alone() {
    // A cut-off primary whose writes froze, then was taken over: the new primary is
    // simply ahead at the next connection (no split brain), and compares every region
    // because it cannot know where this node's unanswered writes landed.
    let (mut lun, _, _) = open(blank(), Marker::Absent, true);
    lun.mark_persisted();
    let before = lun.meta().gen;
    let p = lun.peer_lost([(3 * REGION, 512)], [9; 8], PeerLossPolicy::Suspend);
    assert_eq!(p, Persist::Needed);
    assert_eq!(
        lun.meta().gen,
        before,
        "nothing answered alone: no new generation"
    );
    assert!(lun.meta().bitmap.is_dirty(3));
    assert!(
        lun.hello(true, false).flags.crashed,
        "the peer must compare every region"
    );
    lun.mark_persisted();
    assert_eq!(lun.record_held((5 * REGION, 512)), Persist::Needed);
    assert_eq!(lun.meta().gen, before);
    lun.mark_persisted();
    assert_eq!(lun.record_held((5 * REGION, 512)), Persist::No, "covered");
    // The peer recorded outdated (operator, witness): the held writes go out alone,
    // under a generation of their own, persisted first.
    assert_eq!(lun.operator_outdated_peer([4; 8]), Persist::Needed);
    assert_ne!(lun.meta().gen.current, before.current);
    assert!(lun.meta().flags.peer_outdated);
}

#[test]
fn a_write_alone_needs_a_record_unless_one_covers_it() {
    let (mut lun, _, _) = open(blank(), Marker::Absent, true);
    lun.mark_persisted();
    assert_eq!(lun.record_alone((REGION, 512), [1; 8]), Persist::Needed);
    lun.mark_persisted();
    assert_eq!(lun.record_alone((REGION + 512, 512), [2; 8]), Persist::No);
    assert_eq!(lun.record_alone((2 * REGION, 512), [3; 8]), Persist::Needed);
    // Dirty regions from a restart (the write-intent regions) are not a record yet.
    let mut m = blank();
    m.bitmap.set(5);
    let (mut lun, _, _) = open(m, Marker::SameBoot, true);
    assert_eq!(lun.record_alone((5 * REGION, 512), [4; 8]), Persist::Needed);
    assert!(lun.meta().flags.peer_outdated);
}

#[test]
fn a_resync_completes_only_when_nothing_is_dirty_and_both_sides_agree_after() {
    let (mut primary, _, _) = open(blank(), Marker::Absent, true);
    let (mut secondary, _, _) = open(blank(), Marker::Absent, false);
    let plan = primary.plan_resync(&secondary.hello(false, false)).unwrap();
    assert!(plan.initial);
    let (regions, persist) = primary.begin_resync(&plan, 1000);
    assert_eq!(persist, Persist::Needed, "the plan is durable first");
    assert_eq!(regions.len(), 16);
    assert_eq!(primary.state(), SyncState::SyncSource);
    assert_eq!(
        secondary.primary_connected(&primary.hello(true, false)),
        Persist::Needed
    );
    assert!(secondary.blocks_promotion());
    assert_eq!(secondary.resync_data_arriving(), Persist::Needed);
    assert_eq!(secondary.resync_data_arriving(), Persist::No);
    for r in regions {
        primary.region_copied(r);
    }
    // A write the peer failed dirtied a region behind the pass: another pass.
    let _ = primary.mark_regions([6]);
    assert_eq!(primary.end_pass(true, 0, [5; 8]), PassEnd::Again(vec![6]));
    assert_eq!(
        primary.end_pass(true, RESYNC_PASSES_MAX, [5; 8]),
        PassEnd::GiveUp { dirty: 1 }
    );
    primary.region_copied(6);
    let PassEnd::Complete { gen, persist } = primary.end_pass(true, 1, [5; 8]) else {
        panic!("nothing is dirty: the resync completes");
    };
    assert_eq!(
        persist,
        Persist::Needed,
        "a new pair's first id is recorded first"
    );
    assert!(
        primary.meta().flags.peer_outdated || primary.meta().gen.bitmap != 0,
        "not in sync on record before the target took the ids"
    );
    assert_ne!(
        gen.current, 0,
        "a new pair's first completion draws a generation"
    );
    let _ = secondary.resync_done_target(&gen);
    secondary.resync_target_recorded();
    assert_eq!(primary.completion_acknowledged(), Persist::Needed);
    assert_eq!(secondary.state(), SyncState::UpToDate);
    assert!(!secondary.blocks_promotion());
    let (p, s) = (primary.hello(true, false), secondary.hello(false, false));
    assert_eq!(decide(&p.gen, p.flags, &s.gen, s.flags), Decision::InSync);
    assert_eq!(
        primary.source_progress(2000).0,
        primary.source_progress(2000).1
    );
}

#[test]
fn a_record_only_in_memory_does_not_cover_a_write_made_alone() {
    let (mut lun, _, _) = open(blank(), Marker::Absent, true);
    // The loss's record fails to reach the disk.
    let _ = lun.peer_lost([(REGION, 512)], [1; 8], PeerLossPolicy::Degrade);
    lun.peer_loss_recorded(false, PeerLossPolicy::Degrade);
    assert_eq!(lun.record_alone((REGION, 512), [2; 8]), Persist::Needed);
    lun.mark_persisted();
    assert_eq!(lun.record_alone((REGION, 512), [3; 8]), Persist::No);
}

#[test]
fn the_peer_is_in_sync_on_record_only_once_it_took_the_ids() {
    let (mut lun, _, _) = open(blank(), Marker::Absent, true);
    let _ = lun.peer_lost([(REGION, 512)], [1; 8], PeerLossPolicy::Degrade);
    lun.mark_persisted();
    let before = lun.meta().gen;
    let plan = bitmap_plan();
    let (regions, _) = lun.begin_resync(&plan, 0);
    for r in regions {
        lun.region_copied(r);
    }
    let PassEnd::Complete { gen, persist } = lun.end_pass(false, 0, [2; 8]) else {
        panic!("nothing is dirty");
    };
    assert_eq!(
        persist,
        Persist::Needed,
        "the ids are recorded before they are sent"
    );
    assert!(lun.meta().flags.peer_outdated, "not in sync on record yet");
    assert_eq!((lun.meta().gen.bitmap, gen.bitmap), (0, 0));
    // The ack never comes, the peer is lost: a new generation whose bitmap id is the
    // sent ids, so a target that took them gets a bitmap resync, and a target that did
    // not gets a full one; neither is a false split brain, nor missed.
    let _ = lun.peer_lost([], [3; 8], PeerLossPolicy::Degrade);
    assert_eq!(lun.completion_acknowledged(), Persist::No);
    assert!(lun.meta().flags.peer_outdated);
    assert_eq!(lun.meta().gen.bitmap, gen.current);
    let decide_with = |target: GenIds| {
        let h = lun.hello(true, false);
        crate::genid::decide(&h.gen, h.flags, &target, GenFlags::default())
    };
    assert_eq!(decide_with(gen), crate::genid::Decision::SyncSourceBitmap);
    let behind = GenIds {
        current: before.bitmap,
        ..GenIds::default()
    };
    assert_eq!(decide_with(behind), crate::genid::Decision::SyncSourceFull);
    // Another pass whose ids are acknowledged.
    let PassEnd::Complete { gen, .. } = lun.end_pass(false, 0, [4; 8]) else {
        panic!("nothing is dirty");
    };
    assert_eq!(lun.completion_acknowledged(), Persist::Needed);
    assert_eq!(lun.meta().gen, gen);
    assert!(!lun.meta().flags.peer_outdated);
    assert_eq!(lun.state(), SyncState::UpToDate);
}

#[test]
fn a_copy_acknowledged_after_a_loss_leaves_its_region_dirty() {
    // Replica sim seed 1072395: the loss gave up a write to region 1 whose frame was
    // still on a data link; the copy of region 1, sent before the loss, is acknowledged
    // after it. That frame can land after the copy (before the next round's gate), so
    // the next round must copy region 1 again.
    let (mut lun, _, _) = open(blank(), Marker::Absent, true);
    let _ = lun.peer_lost([(REGION, 512)], [1; 8], PeerLossPolicy::Degrade);
    lun.mark_persisted();
    let plan = bitmap_plan();
    let (regions, _) = lun.begin_resync(&plan, 0);
    assert_eq!(regions, vec![1]);
    let _ = lun.peer_lost([(REGION + 512, 512)], [2; 8], PeerLossPolicy::Degrade);
    lun.region_copied(1);
    assert!(lun.meta().bitmap.is_dirty(1), "the late ack clears nothing");
    // The next round's copies count.
    let (regions, _) = lun.begin_resync(&plan, 10);
    assert_eq!(regions, vec![1]);
    lun.region_copied(1);
    assert!(!lun.meta().bitmap.is_dirty(1));
}

#[test]
fn the_operators_word_voids_a_completion_on_its_way() {
    // Replica sim seed 1242531: `outdate-peer` while the completion's ids were on
    // their way; their ack must not put back in memory the ids the record moved on
    // from (the operator would see UpToDate, and promote the peer).
    let (mut lun, _, _) = open(blank(), Marker::Absent, true);
    let _ = lun.peer_lost([(REGION, 512)], [1; 8], PeerLossPolicy::Degrade);
    lun.mark_persisted();
    let plan = bitmap_plan();
    let (regions, _) = lun.begin_resync(&plan, 0);
    for r in regions {
        lun.region_copied(r);
    }
    let PassEnd::Complete { gen: sent, .. } = lun.end_pass(false, 0, [2; 8]) else {
        panic!("nothing is dirty");
    };
    lun.mark_persisted();
    assert_eq!(lun.operator_outdated_peer([3; 8]), Persist::Needed);
    let moved_on = lun.meta().gen;
    assert_ne!(moved_on.current, sent.current);
    assert_eq!(
        moved_on.bitmap, sent.current,
        "the peer may hold the sent ids"
    );
    assert_eq!(lun.completion_acknowledged(), Persist::No);
    assert_eq!(lun.meta().gen, moved_on);
    assert!(lun.meta().flags.peer_outdated);
    assert_ne!(lun.state(), SyncState::UpToDate);
}

#[test]
fn a_completion_on_its_way_at_a_crash_makes_the_next_write_alone_a_new_generation() {
    // On disk: the ids of a completion were sent (bitmap id retired), the ack never
    // recorded. The peer may hold these ids.
    let mut m = blank();
    m.flags.primary = true;
    m.flags.peer_outdated = true;
    m.gen.bump([1; 8]);
    m.gen.resync_done_source();
    let sent = m.gen;
    let (mut lun, _, _) = open(m, Marker::SameBoot, true);
    lun.mark_persisted();
    assert_eq!(lun.record_alone((2 * REGION, 512), [2; 8]), Persist::Needed);
    assert_ne!(lun.meta().gen.current, sent.current);
    assert_eq!(lun.meta().gen.bitmap, sent.current);
    lun.mark_persisted();
    // Restarts from here on do not draw more (the history stays for the lineage).
    let disk = lun.meta_for_disk(&[]);
    let (mut lun, _, _) = open(disk, Marker::SameBoot, true);
    lun.mark_persisted();
    let gen = lun.meta().gen;
    assert_eq!(lun.record_alone((2 * REGION, 512), [3; 8]), Persist::No);
    assert_eq!(lun.meta().gen, gen);
}

#[test]
fn a_discarded_secondary_cannot_be_promoted_and_is_overwritten() {
    let (mut lun, _, _) = open(blank(), Marker::Absent, false);
    assert_eq!(lun.discard_local(), Persist::Needed);
    assert!(lun.blocks_promotion());
    let h = lun.hello(false, false);
    assert!(h.flags.outdated && h.flags.inconsistent && h.flags.crashed);
}

#[test]
fn the_disk_copy_carries_the_write_intent_regions_the_memory_copy_does_not() {
    let (mut lun, _, _) = open(blank(), Marker::Absent, true);
    let _ = lun.mark_range(0, 1);
    let disk = lun.meta_for_disk(&[9, 10]);
    assert_eq!(disk.bitmap.iter_dirty().collect::<Vec<_>>(), vec![0, 9, 10]);
    assert_eq!(lun.meta().bitmap.iter_dirty().collect::<Vec<_>>(), vec![0]);
    assert!(disk.flags.intent_log);
}
