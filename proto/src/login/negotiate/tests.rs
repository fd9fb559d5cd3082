use super::*;
use crate::login::text::{find, parse_text};

fn pairs(s: &str) -> Vec<TextPair> {
    parse_text(s.replace(';', "\0").as_bytes()).unwrap()
}

fn neg(limits: TargetLimits, st: SessionType, s: &str) -> (Negotiator, Vec<TextPair>) {
    let mut n = Negotiator::new(limits, st);
    let mut out = Vec::new();
    n.negotiate_login(&pairs(s), &mut out).unwrap();
    (n, out)
}

fn answer(s: &str) -> String {
    let (_, out) = neg(TargetLimits::default(), SessionType::Normal, s);
    let key = s.split('=').next().unwrap();
    find(&out, key).unwrap().to_string()
}

#[test]
fn defaults_are_rfc_defaults() {
    let p = SessionParams::default();
    assert_eq!(p.initiator_mrdsl_bytes, 8192);
    assert_eq!(p.target_mrdsl_bytes, 8192);
    assert_eq!(p.max_burst_len_bytes, 262_144);
    assert_eq!(p.first_burst_len_bytes, 65_536);
    assert!(p.initial_r2t && p.immediate_data);
    assert!(p.data_pdu_in_order && p.data_sequence_in_order);
    assert_eq!(p.max_outstanding_r2t, 1);
    assert_eq!(
        (p.default_time2wait_secs, p.default_time2retain_secs),
        (2, 20)
    );
    assert_eq!(p.error_recovery_level, 0);
    assert!(!p.header_digest && !p.data_digest);
    assert!(TargetLimits::default().validate().is_ok());
}

#[test]
fn limits_validation() {
    let mut l = TargetLimits {
        first_burst_len_bytes: 2_000_000,
        ..TargetLimits::default()
    };
    assert_eq!(l.validate(), Err(LimitsError("first_burst_len_bytes")));
    l.first_burst_len_bytes = 512;
    l.max_recv_data_segment_len_bytes = 511;
    assert!(l.validate().is_err());
    l.max_recv_data_segment_len_bytes = 1 << 24;
    assert!(l.validate().is_err());
}

#[test]
fn digests_pick_first_supported() {
    assert_eq!(answer("HeaderDigest=None,CRC32C"), "None");
    assert_eq!(answer("HeaderDigest=CRC32C,None"), "CRC32C");
    assert_eq!(answer("DataDigest=X-foo,CRC32C"), "CRC32C");
    assert_eq!(answer("DataDigest=X-foo"), "Reject");
    let l = TargetLimits {
        header_digest_crc32c: false,
        ..TargetLimits::default()
    };
    let (n, out) = neg(l, SessionType::Normal, "HeaderDigest=CRC32C,None");
    assert_eq!(find(&out, "HeaderDigest"), Some("None"));
    assert!(!n.params().header_digest);
    let (n, _) = neg(
        TargetLimits::default(),
        SessionType::Normal,
        "HeaderDigest=CRC32C;DataDigest=CRC32C",
    );
    assert!(n.params().header_digest && n.params().data_digest);
}

#[test]
fn numeric_rules() {
    assert_eq!(answer("MaxConnections=8"), "1");
    assert_eq!(answer("MaxConnections=0"), "Reject");
    assert_eq!(answer("MaxBurstLength=262144"), "262144");
    assert_eq!(answer("MaxBurstLength=16777215"), "1048576");
    assert_eq!(answer("MaxBurstLength=16777216"), "Reject");
    assert_eq!(answer("MaxBurstLength=511"), "Reject");
    assert_eq!(answer("MaxBurstLength=abc"), "Reject");
    assert_eq!(answer("FirstBurstLength=262144"), "65536");
    assert_eq!(answer("FirstBurstLength=4096"), "4096");
    assert_eq!(answer("DefaultTime2Wait=0"), "2");
    assert_eq!(answer("DefaultTime2Wait=10"), "10");
    assert_eq!(answer("DefaultTime2Wait=3601"), "Reject");
    assert_eq!(answer("DefaultTime2Retain=0"), "0");
    assert_eq!(answer("DefaultTime2Retain=60"), "20");
    assert_eq!(answer("MaxOutstandingR2T=16"), "1");
    assert_eq!(answer("MaxOutstandingR2T=0"), "Reject");
    assert_eq!(answer("ErrorRecoveryLevel=2"), "0");
    assert_eq!(answer("ErrorRecoveryLevel=3"), "Reject");
    assert_eq!(answer("iSCSIProtocolLevel=2"), "1");
    assert_eq!(answer("iSCSIProtocolLevel=0"), "0");
    assert_eq!(answer("iSCSIProtocolLevel=32"), "Reject");
    assert_eq!(answer("MaxBurstLength=0x40000"), "262144");
}

#[test]
fn first_burst_capped_by_max_burst_in_same_request() {
    let (n, out) = neg(
        TargetLimits::default(),
        SessionType::Normal,
        "FirstBurstLength=65536;MaxBurstLength=16384",
    );
    assert_eq!(find(&out, "FirstBurstLength"), Some("16384"));
    assert_eq!(find(&out, "MaxBurstLength"), Some("16384"));
    let p = n.finish().unwrap();
    assert_eq!(
        (p.first_burst_len_bytes, p.max_burst_len_bytes),
        (16384, 16384)
    );
    // MaxBurstLength alone below the FirstBurstLength default: clamped at finish.
    let (n, _) = neg(
        TargetLimits::default(),
        SessionType::Normal,
        "MaxBurstLength=4096",
    );
    assert_eq!(n.finish().unwrap().first_burst_len_bytes, 4096);
}

#[test]
fn boolean_rules() {
    // InitialR2T is OR; our default preference is No.
    assert_eq!(answer("InitialR2T=No"), "No");
    assert_eq!(answer("InitialR2T=Yes"), "Yes");
    let l = TargetLimits {
        initial_r2t: true,
        immediate_data: false,
        ..TargetLimits::default()
    };
    let (_, out) = neg(
        l.clone(),
        SessionType::Normal,
        "InitialR2T=No;ImmediateData=Yes",
    );
    assert_eq!(find(&out, "InitialR2T"), Some("Yes"));
    assert_eq!(find(&out, "ImmediateData"), Some("No"));
    assert_eq!(answer("ImmediateData=Yes"), "Yes");
    assert_eq!(answer("ImmediateData=No"), "No");
    assert_eq!(answer("ImmediateData=yes"), "Reject");
    assert_eq!(answer("DataPDUInOrder=No"), "Yes");
    assert_eq!(answer("DataSequenceInOrder=No"), "Yes");
    let l = TargetLimits {
        data_pdu_in_order: false,
        data_sequence_in_order: false,
        ..TargetLimits::default()
    };
    let (_, out) = neg(
        l,
        SessionType::Normal,
        "DataPDUInOrder=No;DataSequenceInOrder=Yes",
    );
    assert_eq!(find(&out, "DataPDUInOrder"), Some("No"));
    assert_eq!(find(&out, "DataSequenceInOrder"), Some("Yes"));
}

#[test]
fn declarations_and_misc_keys() {
    let (n, out) = neg(
        TargetLimits::default(),
        SessionType::Normal,
        "MaxRecvDataSegmentLength=65536;TaskReporting=FastAbort,RFC3720;X-com.example.foo=1;X#bar=2;Bogus=3;IFMarker=No;OFMarker=Yes;IFMarkInt=2048~8192;TargetAlias=x;SendTargets=All;TargetPortalGroupTag=1",
    );
    assert_eq!(n.params().initiator_mrdsl_bytes, 65536);
    assert_eq!(n.params().target_mrdsl_bytes, 262_144);
    assert_eq!(find(&out, "MaxRecvDataSegmentLength"), Some("262144"));
    assert_eq!(find(&out, "TaskReporting"), Some("RFC3720"));
    assert_eq!(find(&out, "X-com.example.foo"), Some("NotUnderstood"));
    assert_eq!(find(&out, "X#bar"), Some("NotUnderstood"));
    assert_eq!(find(&out, "Bogus"), Some("NotUnderstood"));
    assert_eq!(find(&out, "IFMarker"), Some("No"));
    assert_eq!(find(&out, "OFMarker"), Some("No"));
    assert_eq!(find(&out, "IFMarkInt"), Some("Reject"));
    assert_eq!(find(&out, "TargetAlias"), Some("Reject"));
    assert_eq!(find(&out, "SendTargets"), Some("Reject"));
    assert_eq!(find(&out, "TargetPortalGroupTag"), Some("Reject"));
    assert_eq!(answer("TaskReporting=FastAbort"), "Reject");
}

#[test]
fn bad_mrdsl_declaration_fails() {
    let mut n = Negotiator::new(TargetLimits::default(), SessionType::Normal);
    let mut out = Vec::new();
    assert_eq!(
        n.negotiate_login(&pairs("MaxRecvDataSegmentLength=100"), &mut out),
        Err(NegotiationError::BadDeclaration)
    );
}

#[test]
fn duplicates_across_requests_fail() {
    let mut n = Negotiator::new(TargetLimits::default(), SessionType::Normal);
    let mut out = Vec::new();
    n.negotiate_login(&pairs("MaxBurstLength=4096"), &mut out)
        .unwrap();
    assert_eq!(
        n.negotiate_login(&pairs("MaxBurstLength=8192"), &mut out),
        Err(NegotiationError::DuplicateKey("MaxBurstLength".into()))
    );
    assert!(matches!(
        n.negotiate_login(&pairs("AuthMethod=None"), &mut out),
        Err(NegotiationError::WrongStage(_))
    ));
}

#[test]
fn discovery_irrelevant_keys() {
    let (n, out) = neg(
        TargetLimits::default(),
        SessionType::Discovery,
        "MaxBurstLength=4096;InitialR2T=No;HeaderDigest=None;ErrorRecoveryLevel=0;DefaultTime2Wait=2",
    );
    assert_eq!(find(&out, "MaxBurstLength"), Some("Irrelevant"));
    assert_eq!(find(&out, "InitialR2T"), Some("Irrelevant"));
    assert_eq!(find(&out, "HeaderDigest"), Some("None"));
    assert_eq!(find(&out, "ErrorRecoveryLevel"), Some("0"));
    assert_eq!(n.params().max_burst_len_bytes, 262_144);
}

#[test]
fn target_offers_when_defaults_exceed_limits() {
    let l = TargetLimits {
        max_burst_len_bytes: 131_072,
        first_burst_len_bytes: 16_384,
        immediate_data: false,
        ..TargetLimits::default()
    };
    let mut n = Negotiator::new(l.clone(), SessionType::Normal);
    assert!(n.needs_operational_stage());
    let mut out = Vec::new();
    n.negotiate_login(&pairs("HeaderDigest=None"), &mut out)
        .unwrap();
    assert_eq!(find(&out, "MaxBurstLength"), Some("131072"));
    assert_eq!(find(&out, "FirstBurstLength"), Some("16384"));
    assert_eq!(find(&out, "ImmediateData"), Some("No"));
    assert!(n.awaiting_answers());
    assert_eq!(
        n.finish(),
        Err(NegotiationError::MissingAnswer("ImmediateData"))
    );
    let mut out2 = Vec::new();
    n.negotiate_login(
        &pairs("MaxBurstLength=65536;FirstBurstLength=16384;ImmediateData=No"),
        &mut out2,
    )
    .unwrap();
    assert!(out2.is_empty());
    assert!(!n.awaiting_answers());
    let p = n.finish().unwrap();
    assert_eq!(p.max_burst_len_bytes, 65536);
    assert!(!p.immediate_data);
    // An answer above our offer is a protocol error.
    let mut n = Negotiator::new(l.clone(), SessionType::Normal);
    n.negotiate_login(&[], &mut Vec::new()).unwrap();
    assert_eq!(
        n.negotiate_login(&pairs("MaxBurstLength=262144"), &mut Vec::new()),
        Err(NegotiationError::BadAnswer("MaxBurstLength"))
    );
    // No offers if the initiator already negotiated the keys.
    let mut n = Negotiator::new(l, SessionType::Normal);
    let mut out = Vec::new();
    n.negotiate_login(
        &pairs("MaxBurstLength=262144;FirstBurstLength=65536;ImmediateData=Yes"),
        &mut out,
    )
    .unwrap();
    assert!(!n.awaiting_answers());
    assert_eq!(find(&out, "ImmediateData"), Some("No"));
}

#[test]
fn full_feature_text_keys() {
    let mut n = Negotiator::new(TargetLimits::default(), SessionType::Normal);
    let mut out = Vec::new();
    n.negotiate_full_feature(
        &pairs("MaxRecvDataSegmentLength=16384;MaxBurstLength=512;X-a=1;SendTargets=All;InitiatorAlias=h"),
        &mut out,
    )
    .unwrap();
    assert_eq!(n.params().initiator_mrdsl_bytes, 16384);
    assert_eq!(
        out,
        vec![
            TextPair::new("MaxBurstLength", "Reject"),
            TextPair::new("X-a", "NotUnderstood")
        ]
    );
    assert!(n
        .negotiate_full_feature(&pairs("X-a=1;X-a=2"), &mut out)
        .is_err());
}

#[test]
fn key_table_is_consistent() {
    for (k, n) in ALL_KEYS {
        assert_eq!(Key::from_name(n), Some(k));
        assert_eq!(k.name(), n);
        assert!((k as u32) < 64);
    }
    assert_eq!(classify("X-foo"), KeyClass::Vendor);
    assert_eq!(classify("headerdigest"), KeyClass::Unknown);
}
