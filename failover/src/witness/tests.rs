use super::*;

const A: NodeId = NodeId(0);
const B: NodeId = NodeId(1);

fn acquire(id: u64, alone: bool, in_sync: bool, epoch: u64) -> LeaseRequest {
    LeaseRequest {
        request_id: id,
        op: LeaseOp::Acquire,
        up_to_date: true,
        alone,
        peer_in_sync: in_sync,
        renew_alone: false,
        epoch,
    }
}

fn started() -> Witness {
    // Started at 0 with 500 ms leases: grants from 500.
    Witness::new(0, 500, [])
}

fn rec(outdated: Option<NodeId>, epoch: u64) -> Record {
    Record { outdated, epoch }
}

#[test]
fn one_holder_at_a_time_until_its_lease_ends() {
    let mut w = started();
    assert_eq!(
        w.request(100, b"p", A, acquire(1, false, false, 0))
            .reply
            .granted,
        Err(Refusal::WitnessStarting),
        "a restarted witness cannot know who held a lease"
    );
    assert!(w
        .request(600, b"p", A, acquire(2, false, false, 0))
        .reply
        .granted
        .is_ok());
    assert_eq!(
        w.request(900, b"p", B, acquire(1, true, false, 0))
            .reply
            .granted,
        Err(Refusal::HeldByPeer)
    );
    assert!(
        w.request(1000, b"p", A, acquire(3, false, false, 0))
            .reply
            .granted
            .is_ok(),
        "renewed"
    );
    assert_eq!(
        w.request(1499, b"p", B, acquire(2, true, false, 0))
            .reply
            .granted,
        Err(Refusal::HeldByPeer)
    );
    let d = w.request(1500, b"p", B, acquire(3, true, false, 0));
    assert!(d.reply.granted.is_ok(), "A's renewal ran out at 1500");
    assert_eq!(
        d.persist,
        Some(rec(Some(A), 1)),
        "B writes alone: A is outdated, on disk first"
    );
    assert_eq!((d.reply.holder, d.reply.epoch), (Some(B), 1));
}

#[test]
fn an_outdated_node_gets_no_vote_until_its_peer_says_it_is_in_sync() {
    let mut w = started();
    assert!(w
        .request(600, b"p", A, acquire(1, true, false, 0))
        .reply
        .granted
        .is_ok());
    // A dies; B has not seen A's writes.
    assert_eq!(
        w.request(5000, b"p", B, acquire(1, false, false, 1))
            .reply
            .granted,
        Err(Refusal::Outdated)
    );
    // A returns, resyncs B and says so.
    let d = w.request(6000, b"p", A, acquire(2, false, true, 1));
    assert_eq!(d.persist, Some(rec(None, 2)));
    assert_eq!(d.reply.outdated, None);
    assert!(w
        .request(7000, b"p", B, acquire(2, false, false, 2))
        .reply
        .granted
        .is_ok());
}

#[test]
fn a_late_duplicate_cannot_undo_a_newer_record() {
    let mut w = started();
    assert!(w
        .request(600, b"p", A, acquire(5, false, true, 0))
        .reply
        .granted
        .is_ok());
    assert!(w
        .request(700, b"p", A, acquire(6, true, false, 0))
        .reply
        .granted
        .is_ok());
    let late = w.request(750, b"p", A, acquire(5, false, true, 0));
    assert_eq!(late.reply.granted, Err(Refusal::Stale));
    assert_eq!(w.vote(b"p").unwrap().outdated, Some(B), "still outdated");
}

#[test]
fn an_old_request_replayed_after_a_witness_restart_changes_nothing() {
    // Found by the simulation: a restart empties the replay windows and the last request
    // ids, and a captured "peer in sync" from before B wrote alone cleared A's record.
    let mut w = started();
    let old_in_sync = acquire(10, false, true, 0);
    assert!(w.request(600, b"p", A, old_in_sync).reply.granted.is_ok());
    let d = w.request(2000, b"p", B, acquire(1, true, false, 0));
    assert!(d.reply.granted.is_ok());
    let record = d.persist.unwrap();
    assert_eq!(record, rec(Some(A), 1));
    let mut w = Witness::new(5000, 500, [(b"p".to_vec(), record)]);
    let replayed = w.request(6000, b"p", A, old_in_sync);
    assert_eq!(
        replayed.reply.granted,
        Err(Refusal::Stale),
        "asked on epoch 0; it is 1"
    );
    assert_eq!(replayed.persist, None);
    let mut old_alone = old_in_sync;
    old_alone.peer_in_sync = false;
    old_alone.alone = true;
    assert!(w.request(6000, b"p", A, old_alone).reply.granted.is_err());
    assert_eq!(w.record(b"p"), record);
}

#[test]
fn a_change_on_an_old_epoch_is_refused_with_the_current_one() {
    let mut w = Witness::new(0, 500, [(b"p".to_vec(), rec(Some(B), 7))]);
    let d = w.request(600, b"p", A, acquire(1, false, true, 3));
    assert_eq!((d.reply.granted, d.reply.epoch), (Err(Refusal::Stale), 7));
    let d = w.request(700, b"p", A, acquire(2, false, true, 7));
    assert!(d.reply.granted.is_ok());
    assert_eq!(d.persist, Some(rec(None, 8)));
}

#[test]
fn not_up_to_date_and_release_and_pairs_apart() {
    let mut w = started();
    let mut r = acquire(1, false, false, 0);
    r.up_to_date = false;
    assert_eq!(
        w.request(600, b"p", A, r).reply.granted,
        Err(Refusal::NotUpToDate)
    );
    assert!(w
        .request(600, b"p", B, acquire(1, false, false, 0))
        .reply
        .granted
        .is_ok());
    assert!(
        w.request(600, b"q", A, acquire(1, false, false, 0))
            .reply
            .granted
            .is_ok(),
        "another pair"
    );
    let release = LeaseRequest {
        op: LeaseOp::Release,
        ..acquire(2, false, false, 0)
    };
    assert!(w.request(610, b"p", B, release).reply.granted.is_ok());
    assert!(
        w.request(620, b"p", A, acquire(2, false, false, 0))
            .reply
            .granted
            .is_ok(),
        "a clean handover needs no wait"
    );
}

#[test]
fn records_survive_a_restart_and_a_failed_persist_grants_nothing() {
    let mut w = Witness::new(0, 500, [(b"p".to_vec(), rec(Some(B), 4))]);
    assert_eq!(
        w.request(600, b"p", B, acquire(1, false, false, 4))
            .reply
            .granted,
        Err(Refusal::Outdated)
    );
    let mut w = started();
    let mut d = w.request(600, b"p", A, acquire(1, true, false, 0));
    assert_eq!(d.persist, Some(rec(Some(B), 1)));
    w.persist_failed(b"p", rec(None, 0), &mut d.reply);
    assert_eq!(d.reply.granted, Err(Refusal::NotRecorded));
    assert_eq!(w.record(b"p"), rec(None, 0));
    assert!(w.vote(b"p").unwrap().holder.is_none());
}

/// Found by the failover simulation (seed 28041): B, alone with A outdated at epoch 3,
/// resynced A and claimed it in sync; the claim was delayed; B lost A again and wrote
/// alone at the same epoch; the claim, landing after a witness restart (its replay window
/// gone), cleared A's record, and A promoted without B's last writes. A new alone period
/// after a claim moves the epoch on, so the late claim is stale.
#[test]
fn a_late_in_sync_claim_cannot_clear_writes_made_alone_after_it() {
    let mut w = started();
    let alone = w.request(600, b"p", B, acquire(1, true, false, 0));
    assert!(alone.reply.granted.is_ok());
    let epoch = alone.reply.epoch;
    assert_eq!(alone.reply.outdated, Some(A));
    // The claim (id 2) is sent, and lost for now. B writes alone again, asking for a new
    // epoch because of that claim.
    let renew = LeaseRequest {
        renew_alone: true,
        ..acquire(3, true, false, epoch)
    };
    let d = w.request(700, b"p", B, renew);
    assert!(d.reply.granted.is_ok());
    assert!(
        d.persist.is_some(),
        "the new epoch is on disk before the grant"
    );
    assert_eq!(d.reply.outdated, Some(A));
    assert!(d.reply.epoch > epoch);
    // The witness restarts (replay windows and last request ids gone); the claim lands.
    let mut w = Witness::new(800, 500, [(b"p".to_vec(), w.record(b"p"))]);
    let late = w.request(1400, b"p", B, acquire(2, false, true, epoch));
    assert_eq!(late.reply.granted, Err(Refusal::Stale));
    assert_eq!(w.record(b"p").outdated, Some(A), "A stays outdated");
}

/// Found by the failover simulation (seed 54357): B held the lease; its next request
/// needed a record change that could not be stored, and the failed persist revoked B's
/// lease, which B still counted on; A was granted it at once: two holders. A failed
/// persist restores the holder as it was before the request.
#[test]
fn a_failed_persist_does_not_revoke_a_lease_already_granted() {
    let mut w = started();
    assert!(w
        .request(600, b"p", B, acquire(1, false, false, 0))
        .reply
        .granted
        .is_ok());
    let before = w.record(b"p");
    let mut d = w.request(650, b"p", B, acquire(2, true, false, 0));
    assert!(d.persist.is_some(), "alone outdates A: a record change");
    w.persist_failed(b"p", before, &mut d.reply);
    assert_eq!(d.reply.granted, Err(Refusal::NotRecorded));
    assert_eq!(w.record(b"p"), before, "nothing recorded");
    assert_eq!(
        w.request(700, b"p", A, acquire(1, false, false, 0))
            .reply
            .granted,
        Err(Refusal::HeldByPeer),
        "B's grant of 600 still runs"
    );
}
