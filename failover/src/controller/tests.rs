use super::*;
use crate::wire::LeaseReply;

const T: Timings = Timings {
    keepalive_ms: 100,
    deadtime_ms: 500,
    warntime_ms: 250,
    initdead_ms: 2000,
};

fn cfg(node: u8, guard: Guard) -> Config {
    Config {
        node: NodeId(node),
        paths: 2,
        timings: T,
        guard,
        auto_failback: false,
        preferred: node == 0,
    }
}

const SECONDARY: ReplicaView = ReplicaView {
    primary: false,
    promotable: true,
    in_sync: false,
    frozen: false,
};
const PRIMARY: ReplicaView = ReplicaView {
    primary: true,
    promotable: true,
    in_sync: true,
    frozen: false,
};

fn drain(c: &mut Controller) -> Vec<Action> {
    std::iter::from_fn(|| c.poll_action()).collect()
}

fn requests(actions: &[Action]) -> Vec<LeaseRequest> {
    actions
        .iter()
        .filter_map(|a| match a {
            // Queries (a secondary's "do I reach the witness") change nothing.
            Action::Witness(r) if r.op != LeaseOp::Query => Some(*r),
            _ => None,
        })
        .collect()
}

fn grant(req: &LeaseRequest, holder: u8) -> LeaseReply {
    LeaseReply {
        request_id: req.request_id,
        granted: Ok(()),
        lease_ms: 500,
        holder: Some(NodeId(holder)),
        outdated: None,
        epoch: 0,
    }
}

fn beat(primary: bool, seq: u64) -> (u64, Heartbeat) {
    (
        seq,
        Heartbeat {
            path: 0,
            primary,
            promotable: true,
            in_sync: primary,
            ..Heartbeat::default()
        },
    )
}

#[test]
fn timings_that_would_take_a_late_heartbeat_for_a_death_are_refused() {
    assert!(T.check().is_ok());
    let tight = Timings {
        deadtime_ms: 200,
        ..T
    };
    assert!(tight.check().is_err());
}

#[test]
fn a_secondary_takes_over_only_after_deadtime_and_with_the_lease() {
    let mut c = Controller::new(cfg(1, Guard::Witness), SECONDARY, 0, 1000);
    let (seq, b) = beat(true, 1);
    c.heartbeat(10, seq, b);
    drain(&mut c);
    c.handle_timeout(400);
    assert!(
        requests(&drain(&mut c)).is_empty(),
        "the peer spoke 390 ms ago"
    );
    c.handle_timeout(520);
    let asked = requests(&drain(&mut c));
    assert_eq!(asked.len(), 1, "silent for a deadtime: ask the witness");
    assert!(asked[0].alone, "it will write without the peer");
    assert!(!drain(&mut c).contains(&Action::Promote));
    c.lease_reply(530, grant(&asked[0], 1));
    let acts = drain(&mut c);
    assert_eq!(acts.first(), Some(&Action::Promote));
    // Promoted without its peer: not in sync with it.
    c.replica(
        531,
        ReplicaView {
            in_sync: false,
            ..PRIMARY
        },
    );
    let acts = drain(&mut c);
    let pos = |a: Action| acts.iter().position(|x| *x == a).unwrap();
    assert!(pos(Action::OutdatePeer) < pos(Action::AddVip));
    assert!(pos(Action::AddVip) < pos(Action::Announce));
    assert!(pos(Action::Announce) < pos(Action::Tickle));
    assert_eq!(
        c.alone_until_ms(),
        520 + 500 - 125,
        "counted from the request's send time"
    );
}

/// The rig's cold start: both nodes secondary, heard, one of them not yet reaching the
/// witness. The other's queries are answered "granted" (a query always is): that is no
/// lease, and promoting on it made two primaries.
#[test]
fn a_granted_query_is_no_lease() {
    let mut c = Controller::new(cfg(1, Guard::Witness), SECONDARY, 0, 1000);
    let (seq, b) = beat(false, 1);
    assert!(!b.witness_ok, "the peer does not reach the witness (yet)");
    c.heartbeat(10, seq, b);
    c.handle_timeout(10);
    let queries: Vec<LeaseRequest> = drain(&mut c)
        .iter()
        .filter_map(|a| match a {
            Action::Witness(r) if r.op == LeaseOp::Query => Some(*r),
            _ => None,
        })
        .collect();
    assert!(!queries.is_empty(), "a secondary queries the witness");
    c.lease_reply(15, grant(&queries[0], 0));
    assert_eq!(c.status(16).lease_left_ms, None, "a query grants no lease");
    let acts = drain(&mut c);
    assert!(!acts.contains(&Action::Promote));
    // Reaching the witness while the peer does not is a reason to take over: it asks.
    assert!(
        requests(&acts).iter().any(|r| r.op == LeaseOp::Acquire) || {
            c.handle_timeout(120);
            requests(&drain(&mut c))
                .iter()
                .any(|r| r.op == LeaseOp::Acquire)
        },
        "then it asks for the lease"
    );
}

#[test]
fn a_secondary_that_is_not_up_to_date_never_asks() {
    let view = ReplicaView {
        promotable: false,
        ..SECONDARY
    };
    let mut c = Controller::new(cfg(1, Guard::Witness), view, 0, 1000);
    for t in (0..5000).step_by(50) {
        c.handle_timeout(t);
        let acts = drain(&mut c);
        assert!(requests(&acts).is_empty() && !acts.contains(&Action::Promote));
    }
}

#[test]
fn a_primary_reaching_neither_peer_nor_witness_drops_the_vip_then_demotes_before_its_lease_ends() {
    let mut c = Controller::new(cfg(0, Guard::Witness), PRIMARY, 0, 1000);
    let (seq, b) = beat(false, 1);
    c.heartbeat(0, seq, b);
    let req = requests(&drain(&mut c))[0];
    c.lease_reply(5, grant(&req, 0));
    drain(&mut c);
    // From now on nothing arrives: the lease (0 + 500 - 125) ends at 375.
    let mut t = 5;
    let acts = loop {
        t = c.poll_timeout().max(t + 1);
        c.handle_timeout(t);
        let acts = drain(&mut c);
        if acts.contains(&Action::Demote) {
            break acts;
        }
        assert!(t < 1000, "never gave up");
    };
    assert!(
        t <= 500,
        "gave up at {t}: after the witness could grant the peer"
    );
    let remove = acts.iter().position(|a| *a == Action::RemoveVip).unwrap();
    let demote = acts.iter().position(|a| *a == Action::Demote).unwrap();
    assert!(remove < demote, "the address goes first");
    assert_eq!(c.alone_until_ms(), 0);
}

#[test]
fn frozen_writes_go_on_only_with_a_grant_that_outdates_the_peer() {
    let mut c = Controller::new(cfg(0, Guard::Witness), PRIMARY, 0, 1000);
    drain(&mut c);
    let frozen = ReplicaView {
        in_sync: false,
        frozen: true,
        ..PRIMARY
    };
    c.replica(100, frozen);
    c.handle_timeout(100);
    let req = requests(&drain(&mut c)).pop().unwrap();
    assert!(req.alone);
    assert!(!drain(&mut c).contains(&Action::OutdatePeer));
    c.lease_reply(110, grant(&req, 0));
    assert!(drain(&mut c).contains(&Action::OutdatePeer));
    assert_eq!(c.alone_until_ms(), 100 + 500 - 125);
}

#[test]
fn without_witness_or_fence_a_silent_peer_is_never_taken_over() {
    let mut c = Controller::new(cfg(1, Guard::Manual), SECONDARY, 0, 1000);
    let (seq, b) = beat(true, 1);
    c.heartbeat(0, seq, b);
    for t in (0..10_000).step_by(100) {
        c.handle_timeout(t);
        assert!(!drain(&mut c).contains(&Action::Promote));
    }
    assert!(std::iter::from_fn(|| c.poll_note()).any(|n| n == Note::NoGuard));
}

#[test]
fn standby_hands_over_and_the_peer_takes_without_waiting_for_a_deadtime() {
    let mut p = Controller::new(cfg(0, Guard::Witness), PRIMARY, 0, 1000);
    let (seq, b) = beat(false, 1);
    p.heartbeat(0, seq, b);
    drain(&mut p);
    assert!(p.operator(10, Operator::Standby).is_ok());
    let acts = drain(&mut p);
    assert!(acts.contains(&Action::RemoveVip) && acts.contains(&Action::Demote));
    p.replica(20, SECONDARY);
    let acts = drain(&mut p);
    assert!(requests(&acts).iter().any(|r| r.op == LeaseOp::Release));
    p.handle_timeout(120);
    let hb = drain(&mut p)
        .into_iter()
        .find_map(|a| match a {
            Action::Heartbeat(h) => Some(h),
            _ => None,
        })
        .unwrap();
    assert!(hb.standby && !hb.primary);
    // The peer sees it and asks for the lease at once, without outdating anyone.
    let mut s = Controller::new(cfg(1, Guard::Witness), SECONDARY, 0, 5000);
    s.heartbeat(121, 2, hb);
    let req = requests(&drain(&mut s)).pop().unwrap();
    assert!(!req.alone);
    s.lease_reply(125, grant(&req, 1));
    assert_eq!(drain(&mut s).first(), Some(&Action::Promote));
    // And the standby node does not take it back.
    assert!(p.operator(200, Operator::Standby).is_ok());
}
