//! Unit tests of the sync source's round: the order of its steps, and what a loss, a region
//! dirtied behind a pass, the pace and a silent peer do to it.

use super::*;
use crate::genid::Decision;
use crate::pair::mirror::tests::TestPort;
use crate::pair::{PeerLossPolicy, SyncState};

const REGION: u64 = 1 << 20;

const TIMERS: SourceTimers = SourceTimers {
    rate_bytes_per_s: u64::MAX,
    progress_interval_ms: 1000,
    ping_interval_ms: 500,
    ping_timeout_ms: 2000,
    answer_timeout_ms: 120_000,
    head_bytes: 4096,
};

fn plan(regions: &[u64]) -> ResyncPlan {
    ResyncPlan {
        regions: regions.to_vec(),
        initial: false,
        every_region_after_crash: false,
        decision: Decision::SyncSourceBitmap,
    }
}

/// A run over the port's one LUN, opened and begun at 0 ms; returns the round.
fn begun(run: &mut SourceRun, mirror: &mut Mirror, port: &mut TestPort) -> u64 {
    assert_eq!(run.next(0, false), SourceStep::Open { lun: Some(0) });
    let round = run.opened(mirror).expect("not demoted");
    assert_eq!(run.next(0, true), SourceStep::Begin { lun: 0 });
    let _ = run.begin(&mut port.luns[0], 0);
    round
}

/// A round over `regions` of the port's one LUN, opened and begun, its head chunk and first
/// progress sent: the next step copies the first region.
fn copying(regions: &[u64]) -> (TestPort, Mirror, SourceRun) {
    let mut port = TestPort::new();
    let mut mirror = Mirror::new(PeerLossPolicy::Degrade);
    let mut run = SourceRun::new(vec![(0, plan(regions))], TIMERS, 0);
    begun(&mut run, &mut mirror, &mut port);
    head_and_progress(&mut run, 0);
    (port, mirror, run)
}

/// Copies the head chunk and sends the first progress, as a driver does.
fn head_and_progress(run: &mut SourceRun, now_ms: u64) {
    let SourceStep::CopyHead { len, .. } = run.next(now_ms, true) else {
        panic!("the head chunk first");
    };
    run.sent(now_ms, len);
    assert_eq!(run.next(now_ms, true), SourceStep::Progress { lun: 0 });
    run.sent(now_ms, 0);
}

#[test]
fn a_round_opens_copies_the_head_then_regions_and_completes_before_it_watches() {
    let mut port = TestPort::new();
    let mut mirror = Mirror::new(PeerLossPolicy::Degrade);
    port.luns[0].mark_regions([9]).needed();
    let mut run = SourceRun::new(vec![(0, plan(&[2, 5]))], TIMERS, 0);
    assert!(!mirror.mirroring());
    let round = begun(&mut run, &mut mirror, &mut port);
    assert!(
        mirror.round_stands(round),
        "writes are mirrored once the round opened"
    );
    // The head of the first region goes as data before any region (a hole or not).
    assert_eq!(
        run.next(0, true),
        SourceStep::CopyHead {
            lun: 0,
            offset: 2 * REGION,
            len: 4096
        }
    );
    run.sent(0, 4096);
    assert_eq!(run.next(0, true), SourceStep::Progress { lun: 0 });
    run.sent(0, 0);
    // The plan and what was dirty already, ascending.
    for region in [2, 5, 9] {
        assert_eq!(run.next(1, true), SourceStep::CopyRegion { lun: 0, region });
        assert_eq!(
            run.copy_in_flight(REGION),
            Some((0, region * REGION, REGION))
        );
        run.region_sent(&mut port.luns[0], REGION);
    }
    assert_eq!(run.next(2, true), SourceStep::EndPass { lun: 0 });
    let persist = run.end_pass(&mirror, &mut port.luns[0], [1; 8]);
    assert_eq!(
        persist,
        Ok(Persist::Needed),
        "the ids go on disk before the peer hears them"
    );
    assert_eq!(run.next(3, true), SourceStep::Reservations { lun: 0 });
    run.sent(3, 0);
    let SourceStep::Completion { gen, .. } = run.next(3, true) else {
        panic!("the completion follows the reservations");
    };
    assert_eq!(gen, port.luns[0].meta().gen);
    assert_ne!(
        port.luns[0].state(),
        SyncState::UpToDate,
        "not before the ack"
    );
    assert_eq!(
        run.completion_acked(&mirror, &mut port.luns[0]),
        Ok(Persist::Needed)
    );
    assert_eq!(port.luns[0].state(), SyncState::UpToDate);
    assert_eq!(run.next(4, true), SourceStep::Finish);
    assert_eq!(run.finish(&mut mirror, &mut port, 4), Ok(()));
    assert!(run.watching());
    assert_eq!(run.copied_bytes(), 4096 + 3 * REGION);
    // The watch: a ping every interval, each answered.
    assert_eq!(run.next(5, true), SourceStep::Wait { until_ms: 504 });
    assert_eq!(run.next(504, true), SourceStep::Ping);
    run.sent(510, 0);
    assert_eq!(run.next(511, true), SourceStep::Wait { until_ms: 1010 });
    // The peer lost elsewhere (a link): the watch ends.
    assert_eq!(run.next(600, false), SourceStep::Stop(SourceStop::PeerLost));
}

#[test]
fn a_region_dirtied_behind_the_pass_is_copied_again_before_the_completion() {
    let (mut port, mirror, mut run) = copying(&[1, 3]);
    run.next(0, true);
    run.region_sent(&mut port.luns[0], REGION);
    // A mirrored write the peer failed dirties region 1 again behind the pass.
    let _ = port.luns[0].mark_range(REGION, 512);
    run.next(0, true);
    run.region_sent(&mut port.luns[0], REGION);
    assert_eq!(run.next(0, true), SourceStep::EndPass { lun: 0 });
    assert_eq!(
        run.end_pass(&mirror, &mut port.luns[0], [1; 8]),
        Ok(Persist::No)
    );
    assert_eq!(
        run.next(0, true),
        SourceStep::CopyRegion { lun: 0, region: 1 }
    );
}

#[test]
fn a_loss_during_the_round_stops_it_and_no_completion_is_recorded() {
    let (mut port, mut mirror, mut run) = copying(&[4]);
    run.next(0, true);
    run.region_sent(&mut port.luns[0], REGION);
    assert_eq!(run.next(0, true), SourceStep::EndPass { lun: 0 });
    assert_eq!(
        run.end_pass(&mirror, &mut port.luns[0], [1; 8]),
        Ok(Persist::Needed)
    );
    run.next(0, true);
    run.sent(0, 0);
    assert!(matches!(run.next(0, true), SourceStep::Completion { .. }));
    // The peer is lost while the completion is on its way; its ack then comes too late.
    assert!(mirror.peer_lost(&mut port));
    assert_eq!(
        run.completion_acked(&mirror, &mut port.luns[0]),
        Err(SourceStop::PeerLost)
    );
    assert!(
        port.luns[0].meta().flags.peer_outdated,
        "the peer stays outdated"
    );
    assert_ne!(port.luns[0].state(), SyncState::UpToDate);
    run.stop();
    assert_eq!(run.next(1, false), SourceStep::Over);
}

#[test]
fn a_pass_that_ends_after_a_loss_completes_nothing() {
    let (mut port, mut mirror, mut run) = copying(&[4]);
    run.next(0, true);
    run.region_sent(&mut port.luns[0], REGION);
    assert_eq!(run.next(0, true), SourceStep::EndPass { lun: 0 });
    // Lost, and a new round started meanwhile (the manager of a later attempt): this
    // round's pass must not complete either.
    assert!(mirror.peer_lost(&mut port));
    mirror.start_round();
    assert_eq!(
        run.end_pass(&mirror, &mut port.luns[0], [1; 8]),
        Err(SourceStop::PeerLost)
    );
    // And a round whose peer is lost stops before its next copy.
    let (_, _, mut other) = copying(&[4, 6]);
    assert_eq!(other.next(1, false), SourceStep::Stop(SourceStop::PeerLost));
}

#[test]
fn the_copy_keeps_to_its_rate_and_tells_the_progress_while_it_waits() {
    let mut port = TestPort::new();
    let mut mirror = Mirror::new(PeerLossPolicy::Degrade);
    let timers = SourceTimers {
        rate_bytes_per_s: REGION, // one region a second
        progress_interval_ms: 400,
        ..TIMERS
    };
    let mut run = SourceRun::new(vec![(0, plan(&[1, 2]))], timers, 0);
    begun(&mut run, &mut mirror, &mut port);
    let SourceStep::CopyHead { .. } = run.next(0, true) else {
        panic!("head first");
    };
    run.sent(0, 0); // the head of a hole: no data
    run.next(0, true);
    run.sent(0, 0);
    assert_eq!(
        run.next(0, true),
        SourceStep::CopyRegion { lun: 0, region: 1 }
    );
    run.region_sent(&mut port.luns[0], REGION);
    // One region copied at 0 ms: the next may start at 1000 ms; the target hears the
    // progress every 400 ms meanwhile (a long pause must not look like a dead source).
    assert_eq!(run.next(10, true), SourceStep::Wait { until_ms: 400 });
    assert_eq!(run.next(400, true), SourceStep::Progress { lun: 0 });
    run.sent(400, 0);
    assert_eq!(run.next(401, true), SourceStep::Wait { until_ms: 800 });
    assert_eq!(run.next(800, true), SourceStep::Progress { lun: 0 });
    run.sent(800, 0);
    assert_eq!(run.next(801, true), SourceStep::Wait { until_ms: 1000 });
    assert_eq!(
        run.next(1000, true),
        SourceStep::CopyRegion { lun: 0, region: 2 }
    );
}

#[test]
fn an_unanswered_step_ends_the_round_after_its_timeout() {
    let mut port = TestPort::new();
    let mut mirror = Mirror::new(PeerLossPolicy::Degrade);
    let mut run = SourceRun::new(vec![(0, plan(&[1]))], TIMERS, 0);
    assert_eq!(run.next(0, false), SourceStep::Open { lun: Some(0) });
    assert_eq!(
        run.next(120_000, false),
        SourceStep::Wait { until_ms: 120_001 }
    );
    assert_eq!(
        run.next(120_001, false),
        SourceStep::Stop(SourceStop::Overdue)
    );
    // A ping's answer is due within the replica timeout, not the long one.
    let mut run = SourceRun::new(vec![], TIMERS, 0);
    assert_eq!(run.next(0, false), SourceStep::Open { lun: None });
    run.opened(&mut mirror).expect("not demoted");
    assert_eq!(run.next(0, true), SourceStep::Finish);
    run.finish(&mut mirror, &mut port, 0).unwrap();
    assert_eq!(run.next(500, true), SourceStep::Ping);
    assert_eq!(run.next(2501, true), SourceStep::Stop(SourceStop::Overdue));
}

#[test]
fn a_node_demoted_before_its_round_opened_starts_none() {
    // The plan was made as primary and the round's first change is on its way when the
    // operator demotes the node: its ack must not start mirroring (replica sim seed 5138500).
    let mut port = TestPort::new();
    let mut mirror = Mirror::new(PeerLossPolicy::Degrade);
    let mut run = SourceRun::new(vec![(0, plan(&[1]))], TIMERS, 0);
    assert_eq!(run.next(0, false), SourceStep::Open { lun: Some(0) });
    mirror.demoted(&mut port);
    assert_eq!(run.opened(&mut mirror), Err(SourceStop::Demoted));
    assert!(!mirror.mirroring());
}
