use super::*;

fn key() -> Key {
    Key::derive(b"pair secret")
}

fn all_bodies() -> Vec<Body> {
    vec![
        Body::Heartbeat(Heartbeat {
            path: 1,
            primary: true,
            promotable: true,
            in_sync: false,
            standby: true,
            wants_takeover: false,
            frozen: true,
            preferred: true,
            witness_ok: true,
        }),
        Body::LeaseRequest(LeaseRequest {
            request_id: 77,
            op: LeaseOp::Release,
            up_to_date: true,
            alone: false,
            peer_in_sync: true,
            renew_alone: true,
            epoch: 9,
        }),
        Body::LeaseReply(LeaseReply {
            request_id: 77,
            granted: Err(Refusal::Outdated),
            lease_ms: 500,
            holder: Some(NodeId(1)),
            outdated: Some(NodeId(0)),
            epoch: 9,
        }),
        Body::Sessions({
            let mut peers = [([0u8; 4], 0u16); MAX_SESSIONS_PER_DATAGRAM];
            peers[0] = ([198, 18, 1, 10], 40_001);
            peers[1] = ([198, 18, 1, 11], 50_123);
            Sessions {
                part: 0,
                count: 2,
                peers,
            }
        }),
    ]
}

#[test]
fn every_kind_round_trips() {
    for body in all_bodies() {
        let sender = if matches!(body, Body::LeaseReply(_)) {
            WITNESS_SENDER
        } else {
            1
        };
        let bytes = seal(&key(), b"pair-1", sender, 42, &body);
        assert!(bytes.len() <= MAX_DATAGRAM_LEN);
        let d = open(&key(), &bytes).unwrap();
        assert_eq!(d.body, body);
        assert_eq!(
            (d.sender, d.seq, d.pair_id.as_slice()),
            (sender, 42, &b"pair-1"[..])
        );
    }
}

#[test]
fn forged_altered_or_truncated_datagrams_are_dropped() {
    let body = all_bodies()[0];
    let bytes = seal(&key(), b"p", 0, 1, &body);
    assert_eq!(
        open(&Key::derive(b"other key"), &bytes),
        Err(WireError::Mac),
        "a node with another key cannot speak for the pair"
    );
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x10;
        assert!(open(&key(), &b).is_err(), "byte {i} altered and accepted");
    }
    for n in 0..bytes.len() {
        assert!(open(&key(), &bytes[..n]).is_err());
    }
}

#[test]
fn a_witness_reply_from_a_node_is_refused() {
    // Even authenticated: a node must not be able to grant itself a lease.
    let reply = all_bodies()[2];
    let bytes = seal(&key(), b"p", 0, 1, &reply);
    assert_eq!(
        open(&key(), &bytes),
        Err(WireError::BadField("sender for this kind"))
    );
}

#[test]
fn replay_window_takes_each_seq_once_and_reordering_within_the_window() {
    let mut w = ReplayWindow::default();
    w.accept(100).unwrap();
    w.accept(102).unwrap();
    w.accept(101).unwrap();
    assert_eq!(w.accept(101), Err(WireError::Replay(101)));
    assert_eq!(w.accept(102), Err(WireError::Replay(102)));
    w.accept(102 + REPLAY_WINDOW - 1).unwrap();
    assert!(w.accept(102).is_err(), "below the window now");
    assert!(w.accept(50).is_err(), "older than the window");
    w.accept(10_000).unwrap();
    assert!(w.accept(10_000 - REPLAY_WINDOW).is_err());
    w.accept(10_000 - REPLAY_WINDOW + 1).unwrap();
}

#[test]
fn sequence_numbers_increase_across_a_restart() {
    let mut before = SeqCounter::starting_at(1_000_000);
    let last = (0..10).map(|_| before.next_seq()).last().unwrap();
    let mut after = SeqCounter::starting_at(1_000_000 + 5_000);
    let mut w = ReplayWindow::default();
    w.accept(last).unwrap();
    w.accept(after.next_seq()).unwrap();
}

#[test]
fn mutated_datagrams_never_panic_and_parse_canonically() {
    // The fuzz body over every single-byte mutation of each kind's unsigned datagram, and
    // over truncations: deterministic, so it runs in CI.
    for body in all_bodies() {
        let sender = if matches!(body, Body::LeaseReply(_)) {
            WITNESS_SENDER
        } else {
            0
        };
        let sealed = seal(&key(), b"pair", sender, 5, &body);
        let unsigned = &sealed[..sealed.len() - 32];
        fuzz(unsigned);
        for i in 0..unsigned.len() {
            for v in [0u8, 1, 2, 3, 0x7f, 0x80, 0xff] {
                let mut m = unsigned.to_vec();
                m[i] = v;
                fuzz(&m);
            }
            fuzz(&unsigned[..i]);
        }
    }
}
