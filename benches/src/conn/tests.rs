//! Unit tests of the initiator connection: the send queue, negotiation, sense, CDBs.

use super::*;

/// PDUs queued with their data in place (`queue_shared`) or copied (`queue`), in any
/// mix, reach the target as the same bytes `write_pdu` builds, in order, with and
/// without digests, also through a socket too small to take them in one write.
#[test]
fn shared_and_copied_pdus_go_out_byte_identical() {
    for digests in [
        Digests::default(),
        Digests {
            header: true,
            data: true,
        },
    ] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut c = Conn::connect(&addr, 0).unwrap();
        c.digests = digests;
        let (mut peer, _) = listener.accept().unwrap();
        let buf: Arc<[u8]> = (0..300_001u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut expected = Vec::new();
        for i in 0..40u32 {
            let len = [0usize, 1, 4095, 65536, 262_144][i as usize % 5];
            let off = (i as usize * 977) % (buf.len() - len);
            let b = initiator::data_out(true, 0, i, RESERVED_TAG, 0, 0, 0, len as u32);
            pdu::write_pdu(&mut expected, &b, &buf[off..off + len], digests);
            if i % 3 == 0 {
                c.queue(&b, &buf[off..off + len]);
            } else {
                c.queue_shared(&b, &buf, off..off + len);
            }
        }
        let total = expected.len();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; total];
            peer.read_exact(&mut got).unwrap();
            got
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.pending_tx() {
            assert!(Instant::now() < deadline, "send queue did not drain");
            c.flush().unwrap();
            c.wait(Duration::from_millis(10));
        }
        assert!(
            c.wbuf.is_empty(),
            "staging buffer restarts once all is sent"
        );
        assert!(
            reader.join().unwrap() == expected,
            "bytes on the wire differ"
        );
    }
}

#[test]
fn negotiation_answers() {
    let mut p = Params::default();
    let ans = vec![
        TextPair::new("HeaderDigest", "None"),
        TextPair::new("DataDigest", "CRC32C"),
        TextPair::new("MaxRecvDataSegmentLength", "8192"),
        TextPair::new("MaxBurstLength", "262144"),
        TextPair::new("FirstBurstLength", "524288"),
        TextPair::new("ImmediateData", "Yes"),
        TextPair::new("InitialR2T", "No"),
    ];
    apply_answers(&mut p, &ans).unwrap();
    assert_eq!(p.target_mrdsl, 8192);
    assert_eq!(
        (p.max_burst, p.first_burst),
        (262_144, 262_144),
        "FirstBurstLength never exceeds MaxBurstLength"
    );
    assert!(p.immediate_data && !p.initial_r2t);
    assert_eq!(
        p.digests,
        Digests {
            header: false,
            data: true
        }
    );
    assert!(apply_answers(&mut p, &[TextPair::new("ErrorRecoveryLevel", "Reject")]).is_err());
    assert!(apply_answers(&mut p, &[TextPair::new("MaxBurstLength", "x")]).is_err());
    let keys = offered_keys(true, false);
    assert!(keys
        .iter()
        .any(|k| k.key == "HeaderDigest" && k.value == "CRC32C,None"));
    assert!(keys
        .iter()
        .any(|k| k.key == "ImmediateData" && k.value == "No"));
}

#[test]
fn sense_text() {
    let mut fixed = vec![
        0u8, 18, 0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0x00, 0, 0, 0, 0,
    ];
    assert_eq!(describe_sense(&fixed), "ILLEGAL REQUEST ASC/ASCQ 21/00");
    fixed.truncate(1);
    assert_eq!(describe_sense(&fixed), "no sense data");
    let desc = [0u8, 8, 0x72, 0x06, 0x29, 0x00, 0, 0, 0, 0];
    assert_eq!(describe_sense(&desc), "UNIT ATTENTION ASC/ASCQ 29/00");
    assert_eq!(
        parse_sense(&desc),
        Some((SENSE_KEY_UNIT_ATTENTION, 0x29, 0x00))
    );
    assert_eq!(parse_sense(&fixed), None);
    assert_eq!(parse_sense(&[]), None);
    assert_eq!(
        parse_sense(&[0, 4, 0x70, 0]),
        None,
        "too short for fixed sense"
    );
}

#[test]
fn cdbs() {
    let c = rw16(true, 0x0102_0304_0506_0708, 8);
    assert_eq!(c[0], 0x8a);
    assert_eq!(&c[2..10], &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(&c[10..14], &[0, 0, 0, 8]);
    assert_eq!(rw16(false, 0, 1)[0], 0x88);
}
