//! Fuzz-target bodies, as plain functions so they run both under libFuzzer (the
//! `fuzz/` crate, whose targets only call these) and under `cargo test`, which replays
//! the checked-in corpora in `fuzz/corpus/<target>/` (`tests/fuzz_corpus.rs`).
//!
//! Each function takes arbitrary bytes and must never panic. Besides "no panic" they
//! check a few cheap invariants the callers rely on (lengths agree with the framing,
//! our own text output parses, a decoded CDB reports the opcode it came from, ...),
//! so the fuzzer finds wrong answers as well as crashes.
//!
//! The input formats are documented on each function; `fuzz/gen_corpus.py` writes the
//! seed corpora in these formats.

use crate::digest;
use crate::login::chap::{ChapEntropy, CHALLENGE_LEN_BYTES};
use crate::login::negotiate::{
    SessionParams, SessionType, TargetLimits, MAX_DATA_LEN_BYTES, MIN_DATA_LEN_BYTES,
};
use crate::login::target::{
    answer_text_request, Auth, DiscoveryTarget, LoginConfig, LoginOutcome, LoginRequest,
    LoginResult, Stage, TargetConfig, TargetLogin,
};
use crate::login::text::{encode_text, parse_text, MAX_TEXT_LEN_BYTES};
use crate::pdu::{
    self, frame_len, parse_initiator, parse_target, split_frame, Bhs, Digests, InitiatorPdu,
    BHS_LEN,
};
use crate::scsi::cdb::{self, Command};
use crate::scsi::inquiry::{standard_inquiry, vpd_page};
use crate::scsi::lun_info::LunInfo;
use crate::scsi::mode::{mode_select, mode_sense, ModeState};
use crate::scsi::rsoc::{report_supported_opcodes, Filter, SUPPORTED_OPCODES};
use crate::scsi::sense::SenseFormat;

// ---------------------------------------------------------------------------------
// pdu
// ---------------------------------------------------------------------------------

/// Data segment limit a target applies during login (what the engine uses).
pub const LOGIN_MAX_DATA_BYTES: usize = 8192;
/// A typical negotiated MaxRecvDataSegmentLength.
pub const FULL_FEATURE_MAX_DATA_BYTES: usize = 262_144;

const NO_DIGESTS: Digests = Digests {
    header: false,
    data: false,
};
const ALL_DIGESTS: Digests = Digests {
    header: true,
    data: true,
};

/// The `pdu` target. The input is the byte stream an initiator sends on a connection:
/// zero or more PDUs back to back. It is consumed the way the engine's receive loop
/// does (`frame_len` on each BHS, `split_frame` on the complete frame, then
/// `parse_initiator` on the BHS and the AHS the frame says), once for every
/// combination of header/data digests and for the login and full-feature data
/// segment limits. A random stream almost never carries valid CRC32C digests, so the
/// stream is also framed without digests, re-serialised with correct digests and
/// parsed again with both digests on: that pass reaches the parser with digests.
pub fn pdu(data: &[u8]) {
    for limit in [LOGIN_MAX_DATA_BYTES, FULL_FEATURE_MAX_DATA_BYTES] {
        for header in [false, true] {
            for data_digest in [false, true] {
                let digests = Digests {
                    header,
                    data: data_digest,
                };
                receive_stream(data, digests, limit);
            }
        }
    }
    let redigested = redigest(data, FULL_FEATURE_MAX_DATA_BYTES);
    let parsed = receive_stream(&redigested, ALL_DIGESTS, FULL_FEATURE_MAX_DATA_BYTES);
    let plain = receive_stream(data, NO_DIGESTS, FULL_FEATURE_MAX_DATA_BYTES);
    // Adding correct digests must not change which PDUs parse.
    assert_eq!(parsed, plain, "digests changed the parse of a stream");
}

/// Frames and parses PDUs from `stream` like a target's receive loop; returns what
/// each complete PDU parsed to (for comparing passes).
fn receive_stream(
    stream: &[u8],
    digests: Digests,
    limit: usize,
) -> Vec<Result<InitiatorPdu, pdu::PduError>> {
    let mut parsed = Vec::new();
    let mut used = 0usize;
    while stream.len() - used >= BHS_LEN {
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&stream[used..used + BHS_LEN]);
        let view = Bhs::new(&bhs);
        let _ = (view.opcode(), view.immediate(), view.itt());
        let _ = parse_target(&bhs);
        let frame = match frame_len(&bhs, digests, limit) {
            Ok(f) => f,
            // The engine drops the connection: nothing after this can be framed.
            Err(e) => {
                assert!(e.reject_reason().is_some() || e == pdu::PduError::Truncated);
                break;
            }
        };
        assert!(frame.data_len_bytes <= limit.min(pdu::MAX_DATA_SEGMENT_LEN));
        assert_eq!(frame.ahs_len_bytes, view.total_ahs_len_bytes());
        assert_eq!(frame.data_len_bytes, view.data_segment_len_bytes());
        assert!(frame.total_len_bytes >= BHS_LEN + frame.ahs_len_bytes + frame.data_len_bytes);
        if stream.len() - used < frame.total_len_bytes {
            // Wait for more bytes; also check a short buffer is refused, not read past.
            let rest = &stream[used..];
            assert_eq!(
                split_frame(rest, &frame, digests),
                Err(pdu::PduError::Truncated)
            );
            break;
        }
        let whole = &stream[used..used + frame.total_len_bytes];
        used += frame.total_len_bytes;
        let (ahs, seg) = match split_frame(whole, &frame, digests) {
            Ok(x) => x,
            Err(e) => match e.reject_reason() {
                // Data digest error: Reject and go on with the next PDU.
                Some(_) => continue,
                None => break,
            },
        };
        assert_eq!(ahs.len(), frame.ahs_len_bytes);
        assert_eq!(seg.len(), frame.data_len_bytes);
        let result = parse_initiator(&bhs, ahs);
        if let Ok(p) = &result {
            check_initiator_pdu(p, &bhs, seg);
        }
        parsed.push(result);
    }
    parsed
}

/// What the engine does next with a parsed PDU, as far as proto is concerned.
fn check_initiator_pdu(p: &InitiatorPdu, bhs: &[u8; BHS_LEN], seg: &[u8]) {
    match p {
        InitiatorPdu::ScsiCommand(c) => {
            assert!((16..=32).contains(&c.cdb().len()));
            assert_eq!(&c.cdb()[..16], &bhs[32..48]);
            if let Err(e) = cdb::decode(c.cdb()) {
                let _ = e.sense().encode(SenseFormat::Fixed);
            }
        }
        InitiatorPdu::LoginRequest(r) => {
            assert!(!(r.transit && r.cont));
            if !r.transit {
                assert_eq!(r.csg, r.nsg);
            }
            let _ = parse_text(seg);
        }
        InitiatorPdu::TextRequest(t) => {
            assert!(!(t.final_ && t.cont));
            let _ = parse_text(seg);
        }
        _ => {}
    }
}

/// Frames `stream` without digests and writes each complete PDU back with correct
/// header and data digests (what a well-behaved initiator would have sent). Stops
/// where the digest-less framing stops.
fn redigest(stream: &[u8], limit: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(stream.len() + stream.len() / 8);
    let mut used = 0usize;
    while stream.len() - used >= BHS_LEN {
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&stream[used..used + BHS_LEN]);
        let Ok(frame) = frame_len(&bhs, NO_DIGESTS, limit) else {
            break;
        };
        if stream.len() - used < frame.total_len_bytes {
            break;
        }
        let whole = &stream[used..used + frame.total_len_bytes];
        used += frame.total_len_bytes;
        let hdr_end = BHS_LEN + frame.ahs_len_bytes;
        out.extend_from_slice(&whole[..hdr_end]);
        out.extend_from_slice(&digest::to_wire(digest::crc32c(&whole[..hdr_end])));
        if frame.data_len_bytes > 0 {
            // Keep the pad bytes as sent: the digest covers them.
            let padded = &whole[hdr_end..];
            out.extend_from_slice(padded);
            out.extend_from_slice(&digest::to_wire(digest::crc32c(padded)));
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// login
// ---------------------------------------------------------------------------------

/// The CHAP-protected target of the `login` target's configuration.
pub const CHAP_TARGET: &str = "iqn.2026-11.io.twinsan:chap";
/// The open (no authentication) target.
pub const OPEN_TARGET: &str = "iqn.2026-11.io.twinsan:open";
/// CHAP user the CHAP target expects.
pub const CHAP_USER: &str = "alice";
/// CHAP secret the CHAP target expects.
pub const CHAP_SECRET: &[u8] = b"alice-secret-1";
/// Mutual CHAP user and secret of the CHAP target.
pub const CHAP_MUTUAL_USER: &str = "tgt";
/// Mutual CHAP secret.
pub const CHAP_MUTUAL_SECRET: &[u8] = b"target-secret-1";
/// Discovery CHAP credentials (used when the config byte asks for discovery CHAP).
pub const DISCOVERY_USER: &str = "disc";
/// Discovery CHAP secret.
pub const DISCOVERY_SECRET: &[u8] = b"discovery-secret";
/// The fixed CHAP entropy, so seeds can carry a correct CHAP_R:
/// `CHAP_R = MD5(id || secret || challenge)`.
pub const LOGIN_ENTROPY: ChapEntropy = ChapEntropy {
    id: 0x2a,
    challenge: [0xa5; CHALLENGE_LEN_BYTES],
};
/// Separates login requests in a `login` input. 0xFF never occurs in UTF-8, so no
/// valid text is lost by reserving it.
pub const LOGIN_SEPARATOR: u8 = 0xff;
/// Most requests one `login` input drives (above the state machine's own cap).
const MAX_LOGIN_REQUESTS: usize = 40;
/// ISID of every request, unless the variation byte says otherwise.
pub const LOGIN_ISID: [u8; 6] = [0x80, 0x00, 0x02, 0x3d, 0x00, 0x00];

/// The `login` configuration. `config_byte` bit 0 makes discovery require CHAP.
pub fn login_config(config_byte: u8) -> LoginConfig {
    LoginConfig {
        targets: vec![
            TargetConfig {
                name: CHAP_TARGET.into(),
                alias: Some("chap disk".into()),
                auth: Auth::Chap {
                    user: CHAP_USER.into(),
                    secret: CHAP_SECRET.to_vec(),
                    mutual: Some((CHAP_MUTUAL_USER.into(), CHAP_MUTUAL_SECRET.to_vec())),
                },
                allowed_initiators: None,
            },
            TargetConfig {
                name: OPEN_TARGET.into(),
                alias: None,
                auth: Auth::None,
                allowed_initiators: None,
            },
        ],
        discovery_auth: if config_byte & 0x01 != 0 {
            Auth::Chap {
                user: DISCOVERY_USER.into(),
                secret: DISCOVERY_SECRET.to_vec(),
                mutual: None,
            }
        } else {
            Auth::None
        },
        portal_group_tag: 1,
        limits: TargetLimits::default(),
    }
}

fn visible_targets() -> Vec<DiscoveryTarget> {
    [CHAP_TARGET, OPEN_TARGET]
        .iter()
        .map(|n| DiscoveryTarget {
            name: (*n).to_string(),
            addresses: vec!["127.0.0.1:3260,1".into(), "[::1]:3260,1".into()],
        })
        .collect()
}

/// One login request as encoded in a `login` input chunk.
///
/// * byte 0: BHS byte 1 of the Login Request: T (0x80), C (0x40), CSG (bits 3..2),
///   NSG (bits 1..0);
/// * byte 1: variations: 0x01 flips an ISID byte, 0x02 sets TSIH 1, 0x04 sets CID 1,
///   0x08 sets Version-min 1, 0x10 sets Version-max 1, 0x80 skips `parse_initiator`
///   and hands the raw stage bits to the state machine;
/// * the rest: the data segment (text keys).
///
/// Missing header bytes count as 0.
pub struct LoginChunk<'a> {
    pub flags: u8,
    pub variation: u8,
    pub data: &'a [u8],
}

impl<'a> LoginChunk<'a> {
    pub fn parse(chunk: &'a [u8]) -> Self {
        LoginChunk {
            flags: chunk.first().copied().unwrap_or(0),
            variation: chunk.get(1).copied().unwrap_or(0),
            data: chunk.get(2..).unwrap_or(&[]),
        }
    }

    /// The Login Request BHS this chunk stands for.
    pub fn bhs(&self, seq: u32) -> [u8; BHS_LEN] {
        let mut b = [0u8; BHS_LEN];
        b[0] = 0x40 | pdu::opcode::LOGIN_REQUEST;
        b[1] = self.flags;
        b[2] = u8::from(self.variation & 0x10 != 0);
        b[3] = u8::from(self.variation & 0x08 != 0);
        let len = self.data.len().min(0xff_ffff) as u32;
        b[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
        let mut isid = LOGIN_ISID;
        if self.variation & 0x01 != 0 {
            isid[5] ^= 0x01;
        }
        b[8..14].copy_from_slice(&isid);
        let tsih: u16 = if self.variation & 0x02 != 0 { 1 } else { 0 };
        b[14..16].copy_from_slice(&tsih.to_be_bytes());
        b[16..20].copy_from_slice(&seq.to_be_bytes()); // ITT
        let cid: u16 = if self.variation & 0x04 != 0 { 1 } else { 0 };
        b[20..22].copy_from_slice(&cid.to_be_bytes());
        b[24..28].copy_from_slice(&1u32.to_be_bytes()); // CmdSN
        b[28..32].copy_from_slice(&seq.to_be_bytes()); // ExpStatSN
        b
    }

    /// The request the state machine sees: through `parse_initiator` and the engine's
    /// stage mapping, or (variation 0x80) straight from the raw bits. `None` when the
    /// PDU parser rejects the header (the engine drops the connection then).
    pub fn request(&self, seq: u32) -> Option<LoginRequest> {
        let bhs = self.bhs(seq);
        if self.variation & 0x80 != 0 {
            return Some(LoginRequest {
                transit: self.flags & 0x80 != 0,
                cont: self.flags & 0x40 != 0,
                csg: Stage::from_bits((self.flags >> 2) & 0x03)?,
                nsg: Stage::from_bits(self.flags & 0x03)?,
                isid: bhs[8..14].try_into().ok()?,
                tsih: u16::from_be_bytes([bhs[14], bhs[15]]),
                itt: seq,
                cid: u16::from_be_bytes([bhs[20], bhs[21]]),
                cmd_sn: 1,
                exp_stat_sn: seq,
                version_max: bhs[2],
                version_min: bhs[3],
            });
        }
        match parse_initiator(&bhs, &[]) {
            Ok(InitiatorPdu::LoginRequest(r)) => Some(r),
            _ => None,
        }
    }
}

/// How a `login` input ended; returned for tests that check seed behaviour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginRun {
    /// Requests ran out while the login was still going.
    Unfinished,
    /// The state machine failed the login with this (Status-Class, Status-Detail).
    Failed(u8, u8),
    /// The login completed; the chunks after it were Text requests.
    Complete(Box<LoginResult>),
    /// The PDU parser refused a request header.
    BadHeader,
}

/// The `login` target. Input: byte 0 configures (bit 0: discovery requires CHAP;
/// bit 1: the source address may not reach any target), then chunks separated by
/// [`LOGIN_SEPARATOR`], each a [`LoginChunk`]. Chunks drive
/// [`TargetLogin::step`] against [`login_config`]; once the login completes, the
/// remaining chunks' data segments go to [`answer_text_request`] as full-feature Text
/// requests of the session. Every chunk's data is also run through `parse_text`
/// (and checked to survive an encode/parse round trip) and through
/// `answer_text_request` for a fresh discovery and a fresh normal session.
pub fn login(data: &[u8]) {
    let _ = login_run(data);
}

/// [`login`], returning how the login ended.
pub fn login_run(data: &[u8]) -> LoginRun {
    let Some((&config_byte, rest)) = data.split_first() else {
        return LoginRun::Unfinished;
    };
    let config = login_config(config_byte);
    assert!(config.validate().is_ok());
    let reachable = config_byte & 0x02 == 0;
    let may_reach = move |_: &str| reachable;
    let limits = config.limits.clone();
    let visible = visible_targets();

    let mut machine = TargetLogin::new(LOGIN_ENTROPY);
    let mut run = LoginRun::Unfinished;
    let mut session: Option<LoginResult> = None;
    for (seq, raw) in rest
        .split(|&b| b == LOGIN_SEPARATOR)
        .take(MAX_LOGIN_REQUESTS)
        .enumerate()
    {
        let chunk = LoginChunk::parse(raw);
        check_text(chunk.data);
        for session_type in [SessionType::Discovery, SessionType::Normal] {
            let mut params = SessionParams::default();
            let _ = answer_text_request(
                &limits,
                session_type,
                &mut params,
                Some(OPEN_TARGET),
                &visible,
                chunk.data,
            );
        }

        if let Some(s) = session.as_mut() {
            // Full feature phase: the chunk is a Text request of this session.
            let before = s.params.clone();
            if let Ok(reply) = answer_text_request(
                &limits,
                s.session_type,
                &mut s.params,
                s.target_name.as_deref(),
                &visible,
                chunk.data,
            ) {
                assert!(reply.data.len() <= MAX_TEXT_LEN_BYTES);
                assert!(parse_text(&reply.data).is_ok(), "our Text reply must parse");
                check_params(&s.params);
            } else {
                assert_eq!(before, s.params, "a refused Text request changed params");
            }
            continue;
        }
        if run != LoginRun::Unfinished {
            break;
        }

        let Some(req) = chunk.request(seq as u32) else {
            run = LoginRun::BadHeader;
            break;
        };
        let step = machine.step(&config, &may_reach, &req, chunk.data);
        let resp = &step.response;
        assert_eq!(resp.csg, req.csg);
        assert!(!resp.cont);
        assert!(
            parse_text(&resp.data).is_ok(),
            "our Login Response text must parse"
        );
        match step.outcome {
            LoginOutcome::Continue => {
                assert_eq!((resp.status_class, resp.status_detail), (0, 0));
            }
            LoginOutcome::Failed => {
                assert_ne!(resp.status_class, 0);
                run = LoginRun::Failed(resp.status_class, resp.status_detail);
                // A failed login stays failed.
                let again = machine.step(&config, &may_reach, &req, chunk.data);
                assert_eq!(again.outcome, LoginOutcome::Failed);
            }
            LoginOutcome::Complete(r) => {
                assert_eq!((resp.status_class, resp.status_detail), (0, 0));
                assert!(resp.transit);
                assert_eq!(resp.nsg, Stage::FullFeature);
                check_params(&r.params);
                if r.session_type == SessionType::Normal {
                    let name = r.target_name.as_deref().unwrap_or("");
                    assert!(name == CHAP_TARGET || name == OPEN_TARGET);
                    assert!(reachable);
                }
                run = LoginRun::Complete(Box::new(r.clone()));
                session = Some(r);
            }
        }
    }
    run
}

/// `parse_text` on arbitrary bytes; anything it accepts must survive encode + parse.
fn check_text(data: &[u8]) {
    if let Ok(pairs) = parse_text(data) {
        let encoded = encode_text(&pairs);
        if encoded.len() <= MAX_TEXT_LEN_BYTES {
            assert_eq!(parse_text(&encoded).as_ref(), Ok(&pairs));
        }
    }
}

/// Invariants of negotiated parameters.
fn check_params(p: &SessionParams) {
    let len_ok = |v: u32| (MIN_DATA_LEN_BYTES..=MAX_DATA_LEN_BYTES).contains(&v);
    assert!(len_ok(p.initiator_mrdsl_bytes), "{p:?}");
    assert!(len_ok(p.target_mrdsl_bytes), "{p:?}");
    assert!(len_ok(p.max_burst_len_bytes), "{p:?}");
    assert!(p.first_burst_len_bytes <= p.max_burst_len_bytes, "{p:?}");
}

// ---------------------------------------------------------------------------------
// cdb
// ---------------------------------------------------------------------------------

/// The logical units the `cdb` target runs page builders against: a thin 512-byte
/// LUN and a read-only 4096-byte one.
pub fn cdb_luns() -> [LunInfo; 2] {
    let a = LunInfo::new(512, 1 << 21, 0x2a5e_1d00_0000_0001, "SN0001", OPEN_TARGET);
    let mut b = LunInfo::new(4096, 1 << 18, 0x2a5e_1d00_0000_0002, "SN0002", CHAP_TARGET);
    b.read_only = true;
    b.thin = false;
    b.physical_block_exp = 3;
    [a, b]
}

/// Length of the CDB field of a SCSI Command BHS; shorter CDBs are zero-padded to it.
pub const CDB_FIELD_LEN_BYTES: usize = 16;

/// The `cdb` target. The input is what a SCSI Command PDU carries: the 16-byte CDB
/// field (shorter inputs are tried too) and, for MODE SELECT, the parameter list from
/// byte 16 on. `decode` runs on the whole input; a decoded command must report the
/// opcode and service action it came from. MODE SELECT runs `mode_select` on the bytes
/// from byte 16 on (at most PARAMETER LIST LENGTH of them), MODE SENSE and INQUIRY run their page builders, REPORT SUPPORTED
/// OPERATION CODES runs `report_supported_opcodes` with the decoded fields; and
/// `report_supported_opcodes` also runs with raw input bytes as its fields.
pub fn cdb(data: &[u8]) {
    if data.len() >= 5 {
        let reporting_options = data[1];
        let rctd = data[2] & 0x80 != 0;
        let sa = u16::from_be_bytes([data[3], data[4]]);
        let _ = report_supported_opcodes(SUPPORTED_OPCODES, rctd, reporting_options, data[2], sa);
    }
    let cmd = match cdb::decode(data) {
        Ok(c) => c,
        Err(e) => {
            let sense = e.sense();
            let _ = sense.encode(SenseFormat::Fixed);
            let _ = sense.encode(SenseFormat::Descriptor);
            return;
        }
    };
    let opcode = data[0];
    let len = cdb::cdb_len(opcode).expect("decoded opcode has a CDB length");
    assert!(data.len() >= len);
    assert_eq!(cmd.opcode(), opcode, "{cmd:?}");
    if let Some(sa) = cmd.service_action() {
        assert_eq!(sa, u16::from(data[1] & 0x1f), "{cmd:?}");
    }
    let luns = cdb_luns();
    match cmd {
        Command::ModeSelect {
            ten_byte,
            pf,
            sp,
            param_len,
        } => {
            // The parameter list follows the 16-byte CDB field of the SCSI Command PDU.
            let after = data.get(CDB_FIELD_LEN_BYTES..).unwrap_or(&[]);
            let params = &after[..after.len().min(usize::from(param_len))];
            for info in &luns {
                for start in [ModeState::default(), changed_mode_state()] {
                    let mut state = start;
                    match mode_select(info, &mut state, pf, sp, params, ten_byte) {
                        Ok(()) => {}
                        Err(sense) => {
                            assert_eq!(state, start, "a failed MODE SELECT changed state");
                            let _ = sense.encode(state.sense_format());
                        }
                    }
                }
            }
        }
        Command::ModeSense(m) => {
            for info in &luns {
                for state in [ModeState::default(), changed_mode_state()] {
                    let _ = mode_sense(info, &state, &m);
                }
            }
        }
        Command::Inquiry { evpd, page, .. } => {
            for info in &luns {
                if evpd {
                    let _ = vpd_page(info, page);
                } else {
                    let _ = standard_inquiry(info);
                }
            }
        }
        Command::ReportSupportedOpcodes {
            rctd,
            reporting_options,
            requested_opcode,
            requested_service_action,
            ..
        } => {
            let filter = Filter::new(|op, _| op % 2 == 0);
            for table in [SUPPORTED_OPCODES, &filter[..]] {
                if let Ok(out) = report_supported_opcodes(
                    table,
                    rctd,
                    reporting_options,
                    requested_opcode,
                    requested_service_action,
                ) {
                    assert!(out.len() >= 4);
                    if reporting_options == 0 {
                        let n = u32::from_be_bytes([out[0], out[1], out[2], out[3]]);
                        assert_eq!(n as usize, out.len() - 4);
                    }
                }
            }
        }
        _ => {}
    }
}

fn changed_mode_state() -> ModeState {
    ModeState {
        d_sense: true,
        swp: true,
        wce: false,
    }
}
