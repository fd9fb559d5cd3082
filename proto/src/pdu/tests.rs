use super::*;
use proptest::prelude::*;

/// A READ(10) of 8 blocks at LBA 0x1234 as libiscsi sends it: golden bytes.
const GOLDEN_READ10: [u8; 48] = [
    0x01, 0xc1, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // opcode, F|R|simple, DSL 0
    0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // LUN 1
    0x00, 0x00, 0x00, 0x07, // ITT
    0x00, 0x00, 0x10, 0x00, // EDTL 4096
    0x00, 0x00, 0x00, 0x2a, // CmdSN
    0x00, 0x00, 0x00, 0x05, // ExpStatSN
    0x28, 0x00, 0x00, 0x00, 0x12, 0x34, 0x00, 0x00, 0x08, 0x00, 0, 0, 0, 0, 0, 0,
];

#[test]
fn golden_scsi_command_parses() {
    let pdu = parse_initiator(&GOLDEN_READ10, &[]).unwrap();
    let InitiatorPdu::ScsiCommand(c) = pdu else {
        panic!("not a command")
    };
    assert!(c.read && !c.write && c.final_ && !c.immediate);
    assert_eq!(c.lun, 0x0001_0000_0000_0000);
    assert_eq!(
        (c.itt, c.expected_data_len_bytes, c.cmd_sn, c.exp_stat_sn),
        (7, 4096, 42, 5)
    );
    assert_eq!(&c.cdb()[..10], &[0x28, 0, 0, 0, 0x12, 0x34, 0, 0, 8, 0]);
    assert_eq!(c.cdb_len, 16);
}

#[test]
fn builder_matches_golden() {
    let cdb = [0x28, 0, 0, 0, 0x12, 0x34, 0, 0, 8, 0];
    let b = initiator::scsi_command(0x0001_0000_0000_0000, 7, 42, 5, true, false, 4096, &cdb, 0);
    assert_eq!(b, GOLDEN_READ10);
}

#[test]
fn golden_scsi_response_with_underflow() {
    let sns = TargetSns {
        stat_sn: 9,
        exp_cmd_sn: 43,
        max_cmd_sn: 170,
    };
    let b = TargetPdu::ScsiResponse {
        itt: 7,
        status: 0,
        response: 0,
        residual: Residual::Underflow(512),
        exp_data_sn: 1,
        sns,
        data_len: 0,
    }
    .encode_bhs();
    let mut want = [0u8; 48];
    want[0] = 0x21;
    want[1] = 0x82;
    want[16..20].copy_from_slice(&7u32.to_be_bytes());
    want[24..28].copy_from_slice(&9u32.to_be_bytes());
    want[28..32].copy_from_slice(&43u32.to_be_bytes());
    want[32..36].copy_from_slice(&170u32.to_be_bytes());
    want[36..40].copy_from_slice(&1u32.to_be_bytes());
    want[44..48].copy_from_slice(&512u32.to_be_bytes());
    assert_eq!(b, want);
}

#[test]
fn data_in_with_status_sets_s_bit_and_statsn() {
    let sns = TargetSns {
        stat_sn: 3,
        exp_cmd_sn: 4,
        max_cmd_sn: 5,
    };
    let b = TargetPdu::DataIn {
        final_: true,
        ack: false,
        lun: 0,
        itt: 1,
        status: Some(0),
        residual: Residual::Overflow(8),
        data_sn: 0,
        buffer_offset: 0,
        sns,
        data_len: 512,
    }
    .encode_bhs();
    assert_eq!(b[1], 0x80 | 0x01 | 0x04);
    assert_eq!(&b[5..8], &[0, 2, 0]);
    assert_eq!(be32(&b, 24), 3);
    assert_eq!(be32(&b, 44), 8);
    let b = TargetPdu::DataIn {
        final_: false,
        ack: false,
        lun: 0,
        itt: 1,
        status: None,
        residual: Residual::None,
        data_sn: 0,
        buffer_offset: 0,
        sns,
        data_len: 512,
    }
    .encode_bhs();
    assert_eq!(be32(&b, 24), 0, "StatSN is reserved without the S bit");
}

#[test]
fn frame_with_digests_round_trips() {
    let digests = Digests {
        header: true,
        data: true,
    };
    let bhs = initiator::data_out(true, 0, 1, 2, 3, 0, 0, 5);
    let mut wire = Vec::new();
    write_pdu(&mut wire, &bhs, b"hello", digests);
    assert_eq!(wire.len(), 48 + 4 + 8 + 4);
    let mut head = [0u8; 48];
    head.copy_from_slice(&wire[..48]);
    let frame = frame_len(&head, digests, 1 << 20).unwrap();
    assert_eq!(frame.total_len_bytes, wire.len());
    let (ahs, data) = split_frame(&wire, &frame, digests).unwrap();
    assert!(ahs.is_empty());
    assert_eq!(data, b"hello");
    // Flip one data bit: the data digest catches it.
    wire[53] ^= 1;
    assert_eq!(
        split_frame(&wire, &frame, digests),
        Err(PduError::DataDigest)
    );
    // Flip one header bit: the header digest catches it.
    wire[53] ^= 1;
    wire[20] ^= 1;
    assert_eq!(
        split_frame(&wire, &frame, digests),
        Err(PduError::HeaderDigest)
    );
}

#[test]
fn oversized_data_segment_is_refused_before_reading_it() {
    let bhs = initiator::data_out(true, 0, 1, 2, 3, 0, 0, 70_000);
    assert!(matches!(
        frame_len(&bhs, Digests::default(), 65536),
        Err(PduError::DataSegmentTooLong { .. })
    ));
}

#[test]
fn login_request_stages() {
    let b = initiator::login(
        true,
        LoginStage::Security,
        LoginStage::Operational,
        [0x80, 1, 2, 3, 4, 5],
        0,
        1,
        0,
        0,
        0,
    );
    let InitiatorPdu::LoginRequest(l) = parse_initiator(&b, &[]).unwrap() else {
        panic!()
    };
    assert!(l.transit && !l.cont);
    assert_eq!(
        (l.csg, l.nsg),
        (LoginStage::Security, LoginStage::Operational)
    );
    let mut bad = b;
    bad[1] = 0x80 | 0x08 | 0x02; // CSG 2 is reserved
    assert!(parse_initiator(&bad, &[]).is_err());
}

#[test]
fn unknown_opcode_is_command_not_supported() {
    let mut b = [0u8; 48];
    b[0] = 0x1c;
    let e = parse_initiator(&b, &[]).unwrap_err();
    assert_eq!(e.reject_reason(), Some(RejectReason::CommandNotSupported));
}

#[test]
fn extended_cdb_ahs() {
    let mut b = initiator::scsi_command(0, 1, 1, 1, false, false, 0, &[0x7f; 16], 0);
    b[4] = 5; // 20 bytes of AHS
    let mut ahs = vec![0u8; 20];
    ahs[0..2].copy_from_slice(&17u16.to_be_bytes());
    ahs[2] = 1;
    ahs[4..20].copy_from_slice(&[0x55; 16]);
    let InitiatorPdu::ScsiCommand(c) = parse_initiator(&b, &ahs).unwrap() else {
        panic!()
    };
    assert_eq!(c.cdb_len, 32);
    assert_eq!(&c.cdb()[16..], &[0x55; 16]);
}

proptest! {
    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 48), ahs in proptest::collection::vec(any::<u8>(), 0..40)) {
        let mut b = [0u8; 48];
        b.copy_from_slice(&bytes);
        let _ = parse_initiator(&b, &ahs);
        let _ = frame_len(&b, Digests { header: true, data: true }, 1 << 20);
    }

    #[test]
    fn data_out_round_trip(f: bool, lun: u64, itt: u32, ttt: u32, sn: u32, dsn: u32, off: u32, len in 0u32..(1 << 24)) {
        let b = initiator::data_out(f, lun, itt, ttt, sn, dsn, off, len);
        let InitiatorPdu::DataOut(d) = parse_initiator(&b, &[]).unwrap() else { panic!() };
        prop_assert_eq!(d, DataOut { final_: f, lun, itt, ttt, exp_stat_sn: sn, data_sn: dsn, buffer_offset: off });
        prop_assert_eq!(Bhs::new(&b).data_segment_len_bytes(), len as usize);
    }

    #[test]
    fn scsi_response_fields_survive(itt: u32, status: u8, stat_sn: u32, exp: u32, max: u32, under: bool, n: u32, dl in 0u32..(1 << 24)) {
        let residual = if n == 0 { Residual::None } else if under { Residual::Underflow(n) } else { Residual::Overflow(n) };
        let sns = TargetSns { stat_sn, exp_cmd_sn: exp, max_cmd_sn: max };
        let b = TargetPdu::ScsiResponse { itt, status, response: 0, residual, exp_data_sn: 0, sns, data_len: dl }.encode_bhs();
        let v = parse_target(&b);
        prop_assert_eq!((v.opcode, v.itt, v.status, v.stat_sn, v.exp_cmd_sn, v.max_cmd_sn, v.word44), (opcode::SCSI_RESPONSE, itt, status, stat_sn, exp, max, n));
        prop_assert_eq!(v.flags & 0x06, match residual { Residual::None => 0, Residual::Underflow(_) => 2, Residual::Overflow(_) => 4 });
    }
}
