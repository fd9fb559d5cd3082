use super::*;

/// Both nodes' view of one group member's snapshot, as the driver's steps leave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    None,
    Pending,
    Committed,
}

#[derive(Clone, Debug)]
struct World {
    local: Vec<Held>,
    peer: Vec<Held>,
    writes_held: bool,
    steps: usize,
}

impl World {
    fn new(luns: usize) -> World {
        World {
            local: vec![Held::None; luns],
            peer: vec![Held::None; luns],
            writes_held: false,
            steps: 0,
        }
    }

    /// Performs `step` with outcome `ok`, checking what must hold at that step.
    fn perform(&mut self, step: CutStep, ok: bool) {
        self.steps += 1;
        assert!(self.steps < 1000, "a cut must end");
        let apply = |h: &mut Held, op: SnapOp| match op {
            SnapOp::Prepare => *h = Held::Pending,
            SnapOp::Commit => {
                assert_eq!(*h, Held::Pending, "only a pending clone is committed");
                *h = Held::Committed;
            }
            SnapOp::Abort => *h = Held::None,
            SnapOp::Delete | SnapOp::Rollback | SnapOp::Stage => {
                panic!("a cut's steps never delete, roll back or stage (staging precedes it)")
            }
        };
        match step {
            CutStep::Drain => self.writes_held = ok,
            CutStep::Release => self.writes_held = false,
            CutStep::Local { lun, op } | CutStep::Peer { lun, op } => {
                if op == SnapOp::Prepare {
                    assert!(
                        self.writes_held,
                        "a clone is taken only while writes are held"
                    );
                }
                let side = match step {
                    CutStep::Local { .. } => &mut self.local,
                    _ => &mut self.peer,
                };
                if ok {
                    apply(&mut side[lun], op);
                }
            }
            CutStep::Finished(_) => unreachable!(),
        }
    }
}

/// Runs every combination of step outcomes (a tree) and checks each ending.
fn explore(cut: Cut, world: World, peer: bool, endings: &mut usize) {
    match cut.next() {
        CutStep::Finished(outcome) => {
            *endings += 1;
            check_ending(outcome, &world, peer, &cut);
        }
        step => {
            for ok in [true, false] {
                let (mut c, mut w) = (cut.clone(), world.clone());
                w.perform(step, ok);
                c.done(ok);
                explore(c, w, peer, endings);
            }
        }
    }
}

fn check_ending(outcome: CutOutcome, w: &World, peer: bool, cut: &Cut) {
    assert!(
        !w.writes_held && !cut.holding_writes(),
        "writes released at the end"
    );
    let all = |v: &[Held], h: Held| v.iter().all(|&x| x == h);
    match outcome {
        CutOutcome::Taken => {
            assert!(all(&w.local, Held::Committed), "{w:?}");
            if peer {
                assert!(all(&w.peer, Held::Committed), "{w:?}");
            }
        }
        CutOutcome::PeerUnconfirmed => {
            assert!(peer);
            assert!(all(&w.local, Held::Committed), "{w:?}");
            // The peer holds every clone, some maybe committed: its reconnect commits the rest.
            assert!(!w.peer.contains(&Held::None), "{w:?}");
        }
        CutOutcome::Failed => {
            // Whatever failed, nothing is committed anywhere; a pending clone the peer could
            // not drop is dropped at its reconnect (reconcile: not in the primary's list),
            // and one here only if its abort failed (the driver deletes pending files at
            // start-up too).
            assert!(!w.peer.contains(&Held::Committed), "{w:?}");
        }
    }
}

#[test]
fn every_outcome_of_every_step_ends_whole_or_absent_with_writes_released() {
    for luns in 1..=3 {
        for peer in [false, true] {
            let view = if peer {
                PeerView::InSync
            } else {
                PeerView::Standalone
            };
            let mut endings = 0;
            let cut = Cut::start(true, view, luns).unwrap();
            explore(cut, World::new(luns), peer, &mut endings);
            assert!(
                endings > 2 * luns,
                "the tree was explored ({endings} endings)"
            );
        }
    }
}

#[test]
fn a_local_commit_failure_drops_members_committed_before_it() {
    let mut cut = Cut::start(true, PeerView::Standalone, 2).unwrap();
    let mut w = World::new(2);
    // Drain, prepare 0, prepare 1, release, commit 0 succeed; commit 1 fails.
    for _ in 0..5 {
        let s = cut.next();
        w.perform(s, true);
        cut.done(true);
    }
    assert_eq!(
        cut.next(),
        CutStep::Local {
            lun: 1,
            op: SnapOp::Commit
        }
    );
    w.perform(cut.next(), false);
    cut.done(false);
    while let step @ (CutStep::Local { .. }
    | CutStep::Peer { .. }
    | CutStep::Release
    | CutStep::Drain) = cut.next()
    {
        w.perform(step, true);
        cut.done(true);
    }
    assert_eq!(cut.next(), CutStep::Finished(CutOutcome::Failed));
    assert_eq!(
        w.local,
        vec![Held::None, Held::None],
        "the group is absent, not half taken"
    );
}

#[test]
fn writes_are_released_before_any_commit() {
    let mut cut = Cut::start(true, PeerView::InSync, 2).unwrap();
    let mut seen = Vec::new();
    loop {
        match cut.next() {
            CutStep::Finished(o) => {
                assert_eq!(o, CutOutcome::Taken);
                break;
            }
            s => {
                seen.push(s);
                cut.done(true);
            }
        }
    }
    let release = seen.iter().position(|s| *s == CutStep::Release).unwrap();
    let first_commit = seen
        .iter()
        .position(|s| {
            matches!(
                s,
                CutStep::Local {
                    op: SnapOp::Commit,
                    ..
                }
            )
        })
        .unwrap();
    assert!(release < first_commit, "{seen:?}");
    // The peer clones before this node: while writes are held, nothing that failed here can
    // leave the peer a snapshot this node lacks, since its pending clone is dropped.
    assert_eq!(
        seen[1],
        CutStep::Peer {
            lun: 0,
            op: SnapOp::Prepare
        }
    );
}

#[test]
fn a_cut_is_refused_on_a_secondary_or_when_the_peer_is_apart() {
    assert_eq!(
        Cut::start(false, PeerView::Standalone, 1).unwrap_err(),
        CutRefusal::NotPrimary
    );
    let e = Cut::start(true, PeerView::Apart("resync 40%".into()), 1).unwrap_err();
    assert!(e.to_string().contains("resync 40%"), "{e}");
    assert_eq!(
        Cut::start(true, PeerView::InSync, 0).unwrap_err(),
        CutRefusal::GroupSize(0)
    );
    assert!(Cut::start(true, PeerView::InSync, GROUP_LUNS_MAX + 1).is_err());
}

#[test]
fn names_are_checked() {
    assert!(SnapshotName::parse("hourly-2026-12-07T20:00").is_ok());
    assert_eq!(SnapshotName::parse(""), Err(NameError::Empty));
    assert!(matches!(
        SnapshotName::parse("../x"),
        Err(NameError::BadChar(_))
    ));
    assert!(matches!(
        SnapshotName::parse("-x"),
        Err(NameError::BadChar(_))
    ));
    assert!(matches!(
        SnapshotName::parse("a b"),
        Err(NameError::BadChar(_))
    ));
    assert_eq!(
        SnapshotName::parse(&"a".repeat(65)),
        Err(NameError::TooLong(65))
    );
    for op in [
        SnapOp::Prepare,
        SnapOp::Commit,
        SnapOp::Abort,
        SnapOp::Delete,
        SnapOp::Rollback,
    ] {
        assert_eq!(SnapOp::from_code(op.code()), Some(op));
    }
    assert_eq!(SnapOp::from_code(0), None);
}

#[test]
fn a_secondary_follows_the_primarys_list() {
    let n = |s: &str| SnapshotName::parse(s).unwrap();
    let here = vec![
        Listed {
            guid: 1,
            name: n("a"),
            pending: false,
        },
        Listed {
            guid: 2,
            name: n("b"),
            pending: true,
        },
        Listed {
            guid: 3,
            name: n("c"),
            pending: true,
        },
        Listed {
            guid: 4,
            name: n("d"),
            pending: false,
        },
    ];
    let f = reconcile(&[1, 2, 5], &here);
    assert_eq!(
        f,
        vec![
            Follow::Commit(2),
            Follow::Drop(3),
            Follow::Drop(4),
            Follow::Missing(5)
        ]
    );
    assert!(reconcile(&[1], &here[..1]).is_empty());
}
