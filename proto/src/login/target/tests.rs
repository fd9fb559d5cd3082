//! Login state machine tests: full transcripts as real initiators send them,
//! each failure status, and a never-panics property test.

use super::*;
use crate::login::chap::{ChapInitiator, CHALLENGE_LEN_BYTES};
use crate::login::text::{find, parse_text};
use proptest::prelude::*;

const TARGET: &str = "iqn.2024-01.org.twinsan:disk0";
const INITIATOR: &str = "iqn.2024-01.org.example:host1";
const ISID: [u8; 6] = [0x80, 0, 0, 0x12, 0x34, 0];
const ENTROPY: ChapEntropy = ChapEntropy {
    id: 42,
    challenge: [0xa5; CHALLENGE_LEN_BYTES],
};

fn chap_auth(mutual: bool) -> Auth {
    Auth::Chap {
        user: "alice".into(),
        secret: b"alice-secret-1".to_vec(),
        mutual: mutual.then(|| ("target".to_string(), b"target-secret-1".to_vec())),
    }
}

fn config(auth: Auth) -> LoginConfig {
    LoginConfig {
        targets: vec![
            TargetConfig {
                name: TARGET.into(),
                alias: Some("disk zero".into()),
                auth,
                allowed_initiators: None,
            },
            TargetConfig {
                name: "iqn.2024-01.org.twinsan:private".into(),
                alias: None,
                auth: Auth::None,
                allowed_initiators: Some(vec!["iqn.2024-01.org.example:other".into()]),
            },
        ],
        discovery_auth: Auth::None,
        portal_group_tag: 7,
        limits: TargetLimits::default(),
    }
}

fn any_source(_: &str) -> bool {
    true
}

/// Text with ';' standing in for NUL, for readable test transcripts.
fn text(s: &str) -> Vec<u8> {
    let mut v = s.replace(';', "\0").into_bytes();
    if !v.is_empty() {
        v.push(0);
    }
    v
}

fn request(csg: Stage, nsg: Stage, transit: bool) -> LoginRequest {
    LoginRequest {
        transit,
        cont: false,
        csg,
        nsg,
        isid: ISID,
        tsih: 0,
        itt: 1,
        cid: 0,
        cmd_sn: 1,
        exp_stat_sn: 0,
        version_max: 0,
        version_min: 0,
    }
}

struct Harness {
    cfg: LoginConfig,
    login: TargetLogin,
}

impl Harness {
    fn new(cfg: LoginConfig) -> Self {
        cfg.validate().unwrap();
        Self {
            cfg,
            login: TargetLogin::new(ENTROPY),
        }
    }

    fn send(
        &mut self,
        csg: Stage,
        nsg: Stage,
        transit: bool,
        s: &str,
    ) -> (LoginStep, Vec<TextPair>) {
        let data = text(s);
        let step = self
            .login
            .step(&self.cfg, &any_source, &request(csg, nsg, transit), &data);
        let pairs = parse_text(&step.response.data).unwrap();
        (step, pairs)
    }
}

fn status(step: &LoginStep) -> u16 {
    u16::from(step.response.status_class) << 8 | u16::from(step.response.status_detail)
}

fn complete(step: &LoginStep) -> &LoginResult {
    match &step.outcome {
        LoginOutcome::Complete(r) => r,
        o => panic!("expected Complete, got {o:?} status {:#06x}", status(step)),
    }
}

/// What libiscsi sends in the operational stage (lib/login.c), in its order.
const LIBISCSI_OPERATIONAL: &str = "HeaderDigest=None,CRC32C;DataDigest=None;InitialR2T=Yes;ImmediateData=Yes;MaxBurstLength=262144;FirstBurstLength=262144;DefaultTime2Wait=2;DefaultTime2Retain=0;MaxOutstandingR2T=1;ErrorRecoveryLevel=0;IFMarker=No;OFMarker=No;MaxConnections=1;MaxRecvDataSegmentLength=262144;DataPDUInOrder=Yes;DataSequenceInOrder=Yes";

#[test]
fn libiscsi_login_without_security_stage() {
    // libiscsi without a CHAP user starts directly in the operational stage
    // and asks for full feature phase in the same request.
    let mut h = Harness::new(config(Auth::None));
    let first = format!(
        "InitiatorName={INITIATOR};InitiatorAlias=host1;TargetName={TARGET};SessionType=Normal;{LIBISCSI_OPERATIONAL}"
    );
    let (step, out) = h.send(Stage::Operational, Stage::FullFeature, true, &first);
    assert_eq!(status(&step), 0);
    assert!(step.response.transit);
    assert_eq!(step.response.csg, Stage::Operational);
    assert_eq!(step.response.nsg, Stage::FullFeature);
    assert_eq!(find(&out, "TargetPortalGroupTag"), Some("7"));
    assert_eq!(find(&out, "TargetAlias"), Some("disk zero"));
    assert_eq!(find(&out, "HeaderDigest"), Some("None"));
    assert_eq!(find(&out, "DataDigest"), Some("None"));
    assert_eq!(find(&out, "InitialR2T"), Some("Yes"));
    assert_eq!(find(&out, "ImmediateData"), Some("Yes"));
    assert_eq!(find(&out, "MaxBurstLength"), Some("262144"));
    assert_eq!(find(&out, "FirstBurstLength"), Some("65536"));
    assert_eq!(find(&out, "DefaultTime2Wait"), Some("2"));
    assert_eq!(find(&out, "DefaultTime2Retain"), Some("0"));
    assert_eq!(find(&out, "MaxOutstandingR2T"), Some("1"));
    assert_eq!(find(&out, "ErrorRecoveryLevel"), Some("0"));
    assert_eq!(find(&out, "IFMarker"), Some("No"));
    assert_eq!(find(&out, "MaxConnections"), Some("1"));
    assert_eq!(find(&out, "MaxRecvDataSegmentLength"), Some("262144"));
    assert_eq!(find(&out, "DataPDUInOrder"), Some("Yes"));
    let r = complete(&step);
    assert_eq!(r.session_type, SessionType::Normal);
    assert_eq!(r.target_name.as_deref(), Some(TARGET));
    assert_eq!(r.initiator_name, INITIATOR);
    assert_eq!(r.initiator_alias.as_deref(), Some("host1"));
    assert_eq!(r.isid, ISID);
    let p = &r.params;
    assert_eq!(p.initiator_mrdsl_bytes, 262_144);
    assert_eq!(p.target_mrdsl_bytes, 262_144);
    assert_eq!(p.max_burst_len_bytes, 262_144);
    assert_eq!(p.first_burst_len_bytes, 65_536);
    assert_eq!(p.default_time2retain_secs, 0);
    assert!(p.initial_r2t && p.immediate_data && !p.header_digest);
    // Nothing more is accepted on this login.
    let (step, _) = h.send(Stage::Operational, Stage::FullFeature, true, "");
    assert_eq!(step.outcome, LoginOutcome::Failed);
}

#[test]
fn security_none_then_operational() {
    let mut h = Harness::new(config(Auth::None));
    let (step, out) = h.send(
        Stage::Security,
        Stage::Operational,
        true,
        &format!(
            "InitiatorName={INITIATOR};TargetName={TARGET};SessionType=Normal;AuthMethod=CHAP,None"
        ),
    );
    assert_eq!(status(&step), 0);
    assert_eq!(step.outcome, LoginOutcome::Continue);
    assert!(step.response.transit);
    assert_eq!(
        (step.response.csg, step.response.nsg),
        (Stage::Security, Stage::Operational)
    );
    assert_eq!(find(&out, "AuthMethod"), Some("None"));
    assert_eq!(find(&out, "TargetPortalGroupTag"), Some("7"));
    let (step, out) = h.send(
        Stage::Operational,
        Stage::FullFeature,
        true,
        LIBISCSI_OPERATIONAL,
    );
    assert_eq!(
        find(&out, "TargetPortalGroupTag"),
        None,
        "TPGT only in the first response"
    );
    assert_eq!(find(&out, "MaxRecvDataSegmentLength"), Some("262144"));
    complete(&step);
}

#[test]
fn security_straight_to_full_feature() {
    let mut h = Harness::new(config(Auth::None));
    let (step, _) = h.send(
        Stage::Security,
        Stage::FullFeature,
        true,
        &format!("InitiatorName={INITIATOR};TargetName={TARGET};AuthMethod=None"),
    );
    let r = complete(&step);
    // Nothing negotiated: RFC defaults, and we never declared our MRDSL.
    assert_eq!(r.params, SessionParams::default());

    // With limits below the RFC defaults we steer the initiator into the
    // operational stage instead.
    let mut cfg = config(Auth::None);
    cfg.limits.max_burst_len_bytes = 65_536;
    let mut h = Harness::new(cfg);
    let (step, _) = h.send(
        Stage::Security,
        Stage::FullFeature,
        true,
        &format!("InitiatorName={INITIATOR};TargetName={TARGET};AuthMethod=None"),
    );
    assert_eq!(step.outcome, LoginOutcome::Continue);
    assert!(step.response.transit);
    assert_eq!(step.response.nsg, Stage::Operational);
    // Our offer needs an answer, so no transit yet.
    let (step, out) = h.send(
        Stage::Operational,
        Stage::FullFeature,
        true,
        "HeaderDigest=None",
    );
    assert_eq!(step.outcome, LoginOutcome::Continue);
    assert!(!step.response.transit);
    assert_eq!(find(&out, "MaxBurstLength"), Some("65536"));
    let (step, _) = h.send(
        Stage::Operational,
        Stage::FullFeature,
        true,
        "MaxBurstLength=65536",
    );
    assert_eq!(complete(&step).params.max_burst_len_bytes, 65_536);
}

#[test]
fn target_offer_must_be_answered_per_rule() {
    let mut cfg = config(Auth::None);
    cfg.limits.immediate_data = false;
    let mut h = Harness::new(cfg);
    let first = format!("InitiatorName={INITIATOR};TargetName={TARGET}");
    let (step, out) = h.send(Stage::Operational, Stage::FullFeature, true, &first);
    assert_eq!(find(&out, "ImmediateData"), Some("No"));
    assert!(!step.response.transit);
    // The initiator ignores our offer: still awaiting, so still no transit;
    // the offer stays open until answered.
    let (step, _) = h.send(Stage::Operational, Stage::FullFeature, true, "");
    assert!(!step.response.transit);
    let (step, _) = h.send(
        Stage::Operational,
        Stage::FullFeature,
        true,
        "ImmediateData=Yes",
    );
    assert_eq!(status(&step), 0x0200);
}

#[test]
fn discovery_login_and_send_targets() {
    let mut h = Harness::new(config(chap_auth(false)));
    let (step, out) = h.send(
        Stage::Operational,
        Stage::FullFeature,
        true,
        &format!("InitiatorName={INITIATOR};SessionType=Discovery;HeaderDigest=None;DataDigest=None;MaxBurstLength=262144;MaxRecvDataSegmentLength=32768"),
    );
    assert_eq!(find(&out, "TargetPortalGroupTag"), None);
    assert_eq!(find(&out, "MaxBurstLength"), Some("Irrelevant"));
    let r = complete(&step).clone();
    assert_eq!(r.session_type, SessionType::Discovery);
    assert_eq!(r.target_name, None);

    let visible = vec![
        DiscoveryTarget {
            name: TARGET.into(),
            addresses: vec![
                target_address("10.0.0.1:3260".parse().unwrap(), 7),
                target_address("[fe80::1]:3260".parse().unwrap(), 7),
            ],
        },
        DiscoveryTarget {
            name: "iqn.2024-01.org.twinsan:disk1".into(),
            addresses: vec!["10.0.0.1:3260,7".into()],
        },
    ];
    let mut params = r.params.clone();
    let reply = answer_text_request(
        &h.cfg.limits,
        SessionType::Discovery,
        &mut params,
        None,
        &visible,
        &text("SendTargets=All"),
    )
    .unwrap();
    assert!(!reply.truncated);
    assert_eq!(
        parse_text(&reply.data).unwrap(),
        vec![
            TextPair::new("TargetName", TARGET),
            TextPair::new("TargetAddress", "10.0.0.1:3260,7"),
            TextPair::new("TargetAddress", "[fe80::1]:3260,7"),
            TextPair::new("TargetName", "iqn.2024-01.org.twinsan:disk1"),
            TextPair::new("TargetAddress", "10.0.0.1:3260,7"),
        ]
    );
    let one = answer_text_request(
        &h.cfg.limits,
        SessionType::Discovery,
        &mut params,
        None,
        &visible,
        &text("SendTargets=iqn.2024-01.org.twinsan:DISK1;MaxRecvDataSegmentLength=4096;X-y=1"),
    )
    .unwrap();
    let p = parse_text(&one.data).unwrap();
    assert_eq!(
        find(&p, "TargetName"),
        Some("iqn.2024-01.org.twinsan:disk1")
    );
    assert_eq!(find(&p, "X-y"), Some("NotUnderstood"));
    assert_eq!(params.initiator_mrdsl_bytes, 4096);
    let none = answer_text_request(
        &h.cfg.limits,
        SessionType::Discovery,
        &mut params,
        None,
        &visible,
        &text("SendTargets=iqn.nope"),
    )
    .unwrap();
    assert!(none.data.is_empty());
}

#[test]
fn send_targets_in_normal_session() {
    let visible = vec![DiscoveryTarget {
        name: TARGET.into(),
        addresses: vec!["10.0.0.1:3260,7".into()],
    }];
    let limits = TargetLimits::default();
    let mut params = SessionParams::default();
    let all = answer_text_request(
        &limits,
        SessionType::Normal,
        &mut params,
        Some(TARGET),
        &visible,
        &text("SendTargets=All"),
    )
    .unwrap();
    assert_eq!(
        parse_text(&all.data).unwrap(),
        vec![TextPair::new("SendTargets", "Reject")]
    );
    let own = answer_text_request(
        &limits,
        SessionType::Normal,
        &mut params,
        Some(TARGET),
        &visible,
        b"SendTargets=\0",
    )
    .unwrap();
    assert_eq!(
        find(&parse_text(&own.data).unwrap(), "TargetName"),
        Some(TARGET)
    );
    // Login-only keys are rejected in full feature phase.
    let r = answer_text_request(
        &limits,
        SessionType::Normal,
        &mut params,
        Some(TARGET),
        &visible,
        &text("MaxBurstLength=4096;HeaderDigest=CRC32C"),
    )
    .unwrap();
    let p = parse_text(&r.data).unwrap();
    assert_eq!(find(&p, "MaxBurstLength"), Some("Reject"));
    assert_eq!(find(&p, "HeaderDigest"), Some("Reject"));
    assert!(answer_text_request(
        &limits,
        SessionType::Normal,
        &mut params,
        None,
        &visible,
        b"=x"
    )
    .is_err());
}

#[test]
fn send_targets_output_is_bounded() {
    let visible: Vec<DiscoveryTarget> = (0..2000)
        .map(|i| DiscoveryTarget {
            name: format!("iqn.2024-01.org.twinsan:disk{i:05}"),
            addresses: vec!["10.0.0.1:3260,1".into()],
        })
        .collect();
    let mut params = SessionParams::default();
    let r = answer_text_request(
        &TargetLimits::default(),
        SessionType::Discovery,
        &mut params,
        None,
        &visible,
        &text("SendTargets=All"),
    )
    .unwrap();
    assert!(r.truncated);
    assert!(r.data.len() <= MAX_TEXT_LEN_BYTES);
    // Truncation happens at a target boundary. (The reply has more pairs
    // than our own inbound parser accepts, so split it by hand.)
    let last = r.data.split(|&b| b == 0).rev().nth(1).unwrap();
    assert!(last.starts_with(b"TargetAddress="));
    assert!(r.data.ends_with(b"\0"));
}

/// Runs a CHAP login the way libiscsi does: offer CHAP,None with T=1, send
/// CHAP_A=5 with T=0, then CHAP_N/CHAP_R (and CHAP_I/CHAP_C for mutual) with
/// T=1.
fn chap_login(target_auth: Auth, initiator: &ChapInitiator) -> (Harness, LoginStep, Vec<TextPair>) {
    let mut h = Harness::new(config(target_auth));
    let (step, out) = h.send(
        Stage::Security,
        Stage::Operational,
        true,
        &format!(
            "InitiatorName={INITIATOR};TargetName={TARGET};SessionType=Normal;AuthMethod=CHAP,None"
        ),
    );
    assert_eq!(status(&step), 0);
    assert_eq!(find(&out, "AuthMethod"), Some("CHAP"));
    assert!(!step.response.transit, "must not transit before CHAP");
    let (step, out) = h.send(Stage::Security, Stage::Operational, false, "CHAP_A=5");
    assert_eq!(status(&step), 0);
    assert_eq!(find(&out, "CHAP_A"), Some("5"));
    assert_eq!(find(&out, "CHAP_I"), Some("42"));
    let answer = initiator
        .respond(
            find(&out, "CHAP_A").unwrap(),
            find(&out, "CHAP_I").unwrap(),
            find(&out, "CHAP_C").unwrap(),
        )
        .unwrap();
    let answer: Vec<String> = answer
        .iter()
        .map(|p| format!("{}={}", p.key, p.value))
        .collect();
    let (step, out) = h.send(Stage::Security, Stage::Operational, true, &answer.join(";"));
    (h, step, out)
}

fn initiator(secret: &str, mutual: Option<&str>) -> ChapInitiator {
    ChapInitiator::new(
        ChapCredentials::new("alice", secret.as_bytes().to_vec()).unwrap(),
        mutual.map(|s| {
            (
                ChapCredentials::new("target", s.as_bytes().to_vec()).unwrap(),
                ChapEntropy {
                    id: 9,
                    challenge: [0x5a; CHALLENGE_LEN_BYTES],
                },
            )
        }),
    )
    .unwrap()
}

#[test]
fn chap_one_way_success() {
    let (mut h, step, out) = chap_login(chap_auth(false), &initiator("alice-secret-1", None));
    assert_eq!(status(&step), 0);
    assert!(step.response.transit);
    assert_eq!(step.response.nsg, Stage::Operational);
    assert_eq!(find(&out, "CHAP_N"), None);
    let (step, _) = h.send(
        Stage::Operational,
        Stage::FullFeature,
        true,
        LIBISCSI_OPERATIONAL,
    );
    complete(&step);
}

#[test]
fn chap_one_way_wrong_secret() {
    let (_, step, _) = chap_login(chap_auth(false), &initiator("wrong-secret-1", None));
    assert_eq!(status(&step), 0x0201);
    assert_eq!(step.outcome, LoginOutcome::Failed);
}

#[test]
fn chap_mutual_success_and_target_proof() {
    let i = initiator("alice-secret-1", Some("target-secret-1"));
    let (_, step, out) = chap_login(chap_auth(true), &i);
    assert_eq!(status(&step), 0);
    assert_eq!(find(&out, "CHAP_N"), Some("target"));
    assert_eq!(
        i.verify_target(find(&out, "CHAP_N"), find(&out, "CHAP_R")),
        Ok(())
    );
}

#[test]
fn chap_mutual_not_configured_fails() {
    let i = initiator("alice-secret-1", Some("target-secret-1"));
    let (_, step, _) = chap_login(chap_auth(false), &i);
    assert_eq!(status(&step), 0x0201);
}

#[test]
fn chap_wrong_order_and_algorithms() {
    // CHAP_A with only unsupported algorithms.
    let mut h = Harness::new(config(chap_auth(false)));
    let first = format!("InitiatorName={INITIATOR};TargetName={TARGET};AuthMethod=CHAP");
    h.send(Stage::Security, Stage::Operational, false, &first);
    let (step, out) = h.send(Stage::Security, Stage::Operational, false, "CHAP_A=6,7");
    assert_eq!(status(&step), 0x0201);
    assert_eq!(find(&out, "CHAP_A"), Some("Reject"));
    // CHAP_R before the challenge.
    let mut h = Harness::new(config(chap_auth(false)));
    h.send(Stage::Security, Stage::Operational, false, &first);
    let (step, _) = h.send(
        Stage::Security,
        Stage::Operational,
        false,
        "CHAP_N=alice;CHAP_R=0x00",
    );
    assert_eq!(status(&step), 0x0200);
    // CHAP_A in the same request as AuthMethod is fine.
    let mut h = Harness::new(config(chap_auth(false)));
    let (step, out) = h.send(
        Stage::Security,
        Stage::Operational,
        true,
        &format!("{first};CHAP_A=5"),
    );
    assert_eq!(status(&step), 0);
    assert!(find(&out, "CHAP_C").is_some());
    // Initiator offers only None to a CHAP target.
    let mut h = Harness::new(config(chap_auth(false)));
    let (step, out) = h.send(
        Stage::Security,
        Stage::Operational,
        true,
        &format!("InitiatorName={INITIATOR};TargetName={TARGET};AuthMethod=None"),
    );
    assert_eq!(status(&step), 0x0201);
    assert_eq!(find(&out, "AuthMethod"), Some("Reject"));
    // And only CHAP to a target without authentication.
    let mut h = Harness::new(config(Auth::None));
    let (step, _) = h.send(
        Stage::Security,
        Stage::Operational,
        true,
        &format!("InitiatorName={INITIATOR};TargetName={TARGET};AuthMethod=CHAP"),
    );
    assert_eq!(status(&step), 0x0201);
}

#[test]
fn skipping_security_with_chap_target_fails() {
    let mut h = Harness::new(config(chap_auth(false)));
    let first = format!("InitiatorName={INITIATOR};TargetName={TARGET};{LIBISCSI_OPERATIONAL}");
    let (step, _) = h.send(Stage::Operational, Stage::FullFeature, true, &first);
    assert_eq!(status(&step), 0x0201);
    // Security stage with CHAP not finished, then jump to operational.
    let mut h = Harness::new(config(chap_auth(false)));
    h.send(
        Stage::Security,
        Stage::Operational,
        true,
        &format!("InitiatorName={INITIATOR};TargetName={TARGET};AuthMethod=CHAP"),
    );
    let (step, _) = h.send(Stage::Operational, Stage::FullFeature, true, "");
    assert_eq!(
        status(&step),
        0x0200,
        "CSG must stay Security until we transit"
    );
}

#[test]
fn identity_failures() {
    let mut h = Harness::new(config(Auth::None));
    let (step, _) = h.send(
        Stage::Operational,
        Stage::FullFeature,
        true,
        &format!("TargetName={TARGET}"),
    );
    assert_eq!(status(&step), 0x0207);
    assert_eq!(step.outcome, LoginOutcome::Failed);

    let mut h = Harness::new(config(Auth::None));
    let (step, _) = h.send(
        Stage::Operational,
        Stage::FullFeature,
        true,
        &format!("InitiatorName={INITIATOR}"),
    );
    assert_eq!(status(&step), 0x0207, "normal session needs TargetName");

    let mut h = Harness::new(config(Auth::None));
    let (step, _) = h.send(
        Stage::Operational,
        Stage::FullFeature,
        true,
        &format!("InitiatorName={INITIATOR};TargetName=iqn.2024-01.org.twinsan:nope"),
    );
    assert_eq!(status(&step), 0x0203);

    let mut h = Harness::new(config(Auth::None));
    let (step, _) = h.send(
        Stage::Operational,
        Stage::FullFeature,
        true,
        &format!("InitiatorName={INITIATOR};TargetName=iqn.2024-01.org.twinsan:private"),
    );
    assert_eq!(status(&step), 0x0202, "initiator ACL");

    let mut h = Harness::new(config(Auth::None));
    let data = text(&format!("InitiatorName={INITIATOR};TargetName={TARGET}"));
    let deny = |_: &str| false;
    let step = h.login.step(
        &h.cfg,
        &deny,
        &request(Stage::Operational, Stage::FullFeature, true),
        &data,
    );
    assert_eq!(status(&step), 0x0202, "source ACL");

    let mut h = Harness::new(config(Auth::None));
    let (step, _) = h.send(
        Stage::Operational,
        Stage::FullFeature,
        true,
        &format!("InitiatorName={INITIATOR};SessionType=Bogus"),
    );
    assert_eq!(status(&step), 0x0209);

    // Case-insensitive target name match returns the configured spelling.
    let mut h = Harness::new(config(Auth::None));
    let (step, _) = h.send(
        Stage::Operational,
        Stage::FullFeature,
        true,
        &format!(
            "InitiatorName={INITIATOR};TargetName={}",
            TARGET.to_uppercase()
        ),
    );
    assert_eq!(complete(&step).target_name.as_deref(), Some(TARGET));
}

#[test]
fn header_rule_failures() {
    let cfg = config(Auth::None);
    let data = text(&format!("InitiatorName={INITIATOR};TargetName={TARGET}"));
    let run = |f: &dyn Fn(&mut LoginRequest)| {
        let mut r = request(Stage::Operational, Stage::FullFeature, true);
        f(&mut r);
        let step = TargetLogin::new(ENTROPY).step(&cfg, &any_source, &r, &data);
        status(&step)
    };
    assert_eq!(run(&|_| {}), 0);
    assert_eq!(run(&|r| r.version_min = 1), 0x0205);
    assert_eq!(run(&|r| r.cont = true), 0x0200, "C and T together");
    assert_eq!(
        run(&|r| r.nsg = Stage::Operational),
        0x0200,
        "NSG must be after CSG"
    );
    assert_eq!(run(&|r| r.nsg = Stage::Security), 0x0200);
    assert_eq!(run(&|r| r.csg = Stage::FullFeature), 0x0200);
    assert_eq!(run(&|r| r.tsih = 5), 0x020a, "no session has TSIH 5");
}

#[test]
fn later_requests_must_match_first() {
    let mut h = Harness::new(config(Auth::None));
    let first = format!("InitiatorName={INITIATOR};TargetName={TARGET}");
    h.send(Stage::Operational, Stage::FullFeature, false, &first);
    let data = text("");
    let mut r = request(Stage::Operational, Stage::FullFeature, true);
    r.isid = [1; 6];
    let step = h.login.step(&h.cfg, &any_source, &r, &data);
    assert_eq!(status(&step), 0x0200);

    // Repeating identity keys with the same value is tolerated; changing
    // them is not.
    let mut h = Harness::new(config(Auth::None));
    h.send(Stage::Operational, Stage::FullFeature, false, &first);
    let (step, _) = h.send(Stage::Operational, Stage::FullFeature, false, &first);
    assert_eq!(status(&step), 0);
    let (step, _) = h.send(
        Stage::Operational,
        Stage::FullFeature,
        false,
        "InitiatorName=iqn.2024-01.org.example:evil",
    );
    assert_eq!(status(&step), 0x0200);
}

#[test]
fn duplicate_keys_fail() {
    let mut h = Harness::new(config(Auth::None));
    let (step, _) = h.send(
        Stage::Operational,
        Stage::FullFeature,
        true,
        &format!(
            "InitiatorName={INITIATOR};TargetName={TARGET};MaxBurstLength=4096;MaxBurstLength=8192"
        ),
    );
    assert_eq!(status(&step), 0x0200);
    let mut h = Harness::new(config(Auth::None));
    h.send(
        Stage::Operational,
        Stage::FullFeature,
        false,
        &format!("InitiatorName={INITIATOR};TargetName={TARGET};MaxBurstLength=4096"),
    );
    let (step, _) = h.send(
        Stage::Operational,
        Stage::FullFeature,
        true,
        "MaxBurstLength=8192",
    );
    assert_eq!(status(&step), 0x0200, "renegotiation in a later request");
}

#[test]
fn wrong_stage_keys_fail() {
    let mut h = Harness::new(config(Auth::None));
    let (step, _) = h.send(
        Stage::Security,
        Stage::Operational,
        true,
        &format!(
            "InitiatorName={INITIATOR};TargetName={TARGET};AuthMethod=None;MaxBurstLength=4096"
        ),
    );
    assert_eq!(status(&step), 0x0200, "operational key in security stage");
    let mut h = Harness::new(config(Auth::None));
    let (step, _) = h.send(
        Stage::Operational,
        Stage::FullFeature,
        true,
        &format!("InitiatorName={INITIATOR};TargetName={TARGET};AuthMethod=None"),
    );
    assert_eq!(status(&step), 0x0200, "security key in operational stage");
    // Vendor keys are fine anywhere.
    let mut h = Harness::new(config(Auth::None));
    let (step, out) = h.send(
        Stage::Security,
        Stage::Operational,
        true,
        &format!("InitiatorName={INITIATOR};TargetName={TARGET};AuthMethod=None;X-com.example.v=1"),
    );
    assert_eq!(status(&step), 0);
    assert_eq!(find(&out, "X-com.example.v"), Some("NotUnderstood"));
}

#[test]
fn continued_text_is_accumulated() {
    let mut h = Harness::new(config(Auth::None));
    let all = text(&format!(
        "InitiatorName={INITIATOR};TargetName={TARGET};{LIBISCSI_OPERATIONAL}"
    ));
    // Split in the middle of a key to show reassembly is byte-exact.
    let (a, b) = all.split_at(all.len() / 2);
    let mut r = request(Stage::Operational, Stage::FullFeature, false);
    r.cont = true;
    let step = h.login.step(&h.cfg, &any_source, &r, a);
    assert_eq!(status(&step), 0);
    assert_eq!(step.outcome, LoginOutcome::Continue);
    assert!(step.response.data.is_empty());
    assert!(!step.response.transit && !step.response.cont);
    let step = h.login.step(
        &h.cfg,
        &any_source,
        &request(Stage::Operational, Stage::FullFeature, true),
        b,
    );
    let out = parse_text(&step.response.data).unwrap();
    assert_eq!(find(&out, "TargetPortalGroupTag"), Some("7"));
    assert_eq!(complete(&step).params.initiator_mrdsl_bytes, 262_144);
}

#[test]
fn continued_text_is_bounded() {
    let mut h = Harness::new(config(Auth::None));
    let chunk = vec![b'a'; 16 * 1024];
    let mut last = None;
    for _ in 0..5 {
        let mut r = request(Stage::Operational, Stage::FullFeature, false);
        r.cont = true;
        last = Some(h.login.step(&h.cfg, &any_source, &r, &chunk));
    }
    let step = last.unwrap();
    assert_eq!(status(&step), 0x0200);
}

#[test]
fn login_pdu_count_is_bounded() {
    let mut h = Harness::new(config(Auth::None));
    let first = format!("InitiatorName={INITIATOR};TargetName={TARGET}");
    h.send(Stage::Operational, Stage::FullFeature, false, &first);
    let mut last = None;
    for _ in 0..MAX_LOGIN_PDUS {
        last = Some(h.send(Stage::Operational, Stage::FullFeature, false, "").0);
    }
    assert_eq!(status(&last.unwrap()), 0x0200);
}

#[test]
fn config_validation() {
    assert!(config(Auth::None).validate().is_ok());
    let bad = config(Auth::Chap {
        user: "alice".into(),
        secret: b"short".to_vec(),
        mutual: None,
    });
    assert!(matches!(bad.validate(), Err(ConfigError::Chap { .. })));
    let same = config(Auth::Chap {
        user: "alice".into(),
        secret: b"same-secret-1".to_vec(),
        mutual: Some(("t".into(), b"same-secret-1".to_vec())),
    });
    assert!(matches!(
        same.validate(),
        Err(ConfigError::Chap {
            error: ChapError::SameSecretBothWays,
            ..
        })
    ));
    let mut dup = config(Auth::None);
    dup.targets.push(dup.targets[0].clone());
    assert!(matches!(
        dup.validate(),
        Err(ConfigError::DuplicateTarget(_))
    ));
    let mut sp = config(Auth::None);
    sp.targets[0].name = "iqn.with space".into();
    assert!(matches!(sp.validate(), Err(ConfigError::BadName(_))));
    assert!(!format!("{:?}", chap_auth(true)).contains("secret-1"));
}

fn arb_stage() -> impl Strategy<Value = Stage> {
    prop_oneof![
        Just(Stage::Security),
        Just(Stage::Operational),
        Just(Stage::FullFeature)
    ]
}

/// Pairs drawn from real keys and values plus junk, so the state machine
/// gets deep as well as wide coverage.
fn arb_text() -> impl Strategy<Value = Vec<u8>> {
    let key = prop_oneof![
        Just("InitiatorName".to_string()),
        Just("TargetName".to_string()),
        Just("SessionType".to_string()),
        Just("AuthMethod".to_string()),
        Just("CHAP_A".to_string()),
        Just("CHAP_N".to_string()),
        Just("CHAP_R".to_string()),
        Just("CHAP_I".to_string()),
        Just("CHAP_C".to_string()),
        Just("MaxBurstLength".to_string()),
        Just("FirstBurstLength".to_string()),
        Just("HeaderDigest".to_string()),
        Just("MaxRecvDataSegmentLength".to_string()),
        "[A-Za-z#-]{1,8}",
    ];
    let value = prop_oneof![
        Just(INITIATOR.to_string()),
        Just(TARGET.to_string()),
        Just("CHAP,None".to_string()),
        Just("None".to_string()),
        Just("5".to_string()),
        Just("Discovery".to_string()),
        Just("0x00112233445566778899aabbccddeeff".to_string()),
        "[0-9]{0,9}",
        "\\PC{0,12}",
    ];
    prop_oneof![
        4 => prop::collection::vec((key, value), 0..8).prop_map(|v| {
            let mut out = Vec::new();
            for (k, v) in v {
                out.extend_from_slice(k.as_bytes());
                out.push(b'=');
                out.extend_from_slice(v.as_bytes());
                out.push(0);
            }
            out
        }),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

fn arb_request() -> impl Strategy<Value = (bool, bool, Stage, Stage, u8, u16, Vec<u8>)> {
    (
        any::<bool>(),
        prop::bool::weighted(0.1),
        arb_stage(),
        arb_stage(),
        prop::sample::select(vec![0u8, 0, 0, 1]),
        prop::sample::select(vec![0u16, 0, 0, 9]),
        arb_text(),
    )
}

proptest! {
    #[test]
    fn parser_never_panics(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_text(&data);
    }

    #[test]
    fn state_machine_never_panics(
        reqs in prop::collection::vec(arb_request(), 1..10),
        chap in any::<bool>(),
    ) {
        let cfg = config(if chap { chap_auth(true) } else { Auth::None });
        let mut login = TargetLogin::new(ENTROPY);
        let mut failed = false;
        for (transit, cont, csg, nsg, vmin, tsih, data) in reqs {
            let mut r = request(csg, nsg, transit);
            r.cont = cont;
            r.version_min = vmin;
            r.tsih = tsih;
            let step = login.step(&cfg, &any_source, &r, &data);
            // Responses are always well-formed text and never contradict
            // themselves.
            prop_assert!(parse_text(&step.response.data).is_ok());
            prop_assert!(!(step.response.transit && step.response.cont));
            if step.outcome == LoginOutcome::Failed {
                prop_assert!(step.response.status_class != 0);
                failed = true;
            } else {
                prop_assert!(!failed, "no success after failure");
                prop_assert_eq!(step.response.status_class, 0);
            }
            if step.response.transit {
                prop_assert!(r.transit, "T only if the initiator set T");
                prop_assert!(step.response.nsg > step.response.csg);
            }
        }
    }

    #[test]
    fn text_request_never_panics(data in arb_text(), discovery in any::<bool>()) {
        let st = if discovery { SessionType::Discovery } else { SessionType::Normal };
        let visible = vec![DiscoveryTarget { name: TARGET.into(), addresses: vec!["1.2.3.4:3260,1".into()] }];
        let mut params = SessionParams::default();
        let _ = answer_text_request(&TargetLimits::default(), st, &mut params, Some(TARGET), &visible, &data);
    }
}
