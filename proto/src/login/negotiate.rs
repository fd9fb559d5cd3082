//! Target-side operational parameter negotiation (RFC 7143 sections 6 and 13,
//! RFC 7144 for `iSCSIProtocolLevel` and `TaskReporting`).
//!
//! The initiator offers, we answer according to each key's result function
//! (list: first supported in the initiator's order; numbers: minimum or
//! maximum with our value; booleans: OR / AND). Values outside a key's range
//! are answered with `Reject` and the key keeps its RFC default. Declarative
//! keys (`MaxRecvDataSegmentLength`) are recorded, and we declare our own.
//!
//! Keys the target must state even if the initiator did not offer them are
//! added by [`Negotiator::negotiate_login`] on the first operational-stage
//! exchange: our `MaxRecvDataSegmentLength`, and offers for keys whose RFC
//! default would exceed our limits (e.g. `MaxBurstLength` when we support less
//! than 262144). Such offers need an answer, so the login must not leave the
//! operational stage until [`Negotiator::awaiting_answers`] is false.

use thiserror::Error;

use super::text::MAX_SIMPLE_VALUE_LEN_BYTES;
use super::text::{bool_str, parse_bool, parse_number, split_list, TextPair};

/// Smallest legal data segment / burst length (RFC 7143 section 13.12).
pub const MIN_DATA_LEN_BYTES: u32 = 512;
/// Largest legal data segment / burst length, 2^24 - 1 (RFC 7143 section 13.12).
pub const MAX_DATA_LEN_BYTES: u32 = (1 << 24) - 1;
/// Upper bound of `DefaultTime2Wait` / `DefaultTime2Retain` (RFC 7143 13.15/13.16).
pub const MAX_TIME2_SECS: u16 = 3600;
/// The `iSCSIProtocolLevel` we implement (RFC 7144: 1 = RFC 7143).
pub const PROTOCOL_LEVEL: u8 = 1;

/// Session type (RFC 7143 section 13.21).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionType {
    /// A normal session, carrying SCSI commands to one target.
    #[default]
    Normal,
    /// A discovery session, carrying only `SendTargets` text requests.
    Discovery,
}

impl SessionType {
    /// Parses `Normal` / `Discovery`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Normal" => Some(Self::Normal),
            "Discovery" => Some(Self::Discovery),
            _ => None,
        }
    }
}

/// What the target supports or prefers. Our answer to each key never exceeds
/// these values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetLimits {
    /// Largest data segment we accept in one PDU (we declare this).
    pub max_recv_data_segment_len_bytes: u32,
    /// Largest solicited + unsolicited burst we accept.
    pub max_burst_len_bytes: u32,
    /// Largest unsolicited burst we accept.
    pub first_burst_len_bytes: u32,
    /// Whether we accept immediate data (AND with the initiator's wish).
    pub immediate_data: bool,
    /// Whether we insist on an R2T before unsolicited Data-Out (OR).
    pub initial_r2t: bool,
    /// Most R2Ts we keep outstanding per task.
    pub max_outstanding_r2t: u16,
    /// Most connections per session (we implement 1).
    pub max_connections: u16,
    /// Whether we insist that Data PDUs arrive in order (OR).
    pub data_pdu_in_order: bool,
    /// Whether we insist that data sequences arrive in order (OR).
    pub data_sequence_in_order: bool,
    /// Our DefaultTime2Wait (answer is max with the initiator's).
    pub default_time2wait_secs: u16,
    /// Our DefaultTime2Retain (answer is min with the initiator's).
    pub default_time2retain_secs: u16,
    /// Highest error recovery level we implement (we implement 0).
    pub error_recovery_level: u8,
    /// Whether we may agree to a CRC32C header digest.
    pub header_digest_crc32c: bool,
    /// Whether we may agree to a CRC32C data digest.
    pub data_digest_crc32c: bool,
}

impl Default for TargetLimits {
    fn default() -> Self {
        Self {
            max_recv_data_segment_len_bytes: 262_144,
            max_burst_len_bytes: 1_048_576,
            first_burst_len_bytes: 65_536,
            immediate_data: true,
            initial_r2t: false,
            max_outstanding_r2t: 1,
            max_connections: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            default_time2wait_secs: 2,
            default_time2retain_secs: 20,
            error_recovery_level: 0,
            header_digest_crc32c: true,
            data_digest_crc32c: true,
        }
    }
}

/// A [`TargetLimits`] value outside what RFC 7143 allows.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid target limit: {0}")]
pub struct LimitsError(pub &'static str);

impl TargetLimits {
    /// Checks every field against its RFC range.
    pub fn validate(&self) -> Result<(), LimitsError> {
        let len_ok = |v: u32| (MIN_DATA_LEN_BYTES..=MAX_DATA_LEN_BYTES).contains(&v);
        if !len_ok(self.max_recv_data_segment_len_bytes) {
            return Err(LimitsError("max_recv_data_segment_len_bytes"));
        }
        if !len_ok(self.max_burst_len_bytes) {
            return Err(LimitsError("max_burst_len_bytes"));
        }
        if !len_ok(self.first_burst_len_bytes)
            || self.first_burst_len_bytes > self.max_burst_len_bytes
        {
            return Err(LimitsError("first_burst_len_bytes"));
        }
        if self.max_outstanding_r2t == 0 {
            return Err(LimitsError("max_outstanding_r2t"));
        }
        if self.max_connections == 0 {
            return Err(LimitsError("max_connections"));
        }
        if self.default_time2wait_secs > MAX_TIME2_SECS {
            return Err(LimitsError("default_time2wait_secs"));
        }
        if self.default_time2retain_secs > MAX_TIME2_SECS {
            return Err(LimitsError("default_time2retain_secs"));
        }
        if self.error_recovery_level > 2 {
            return Err(LimitsError("error_recovery_level"));
        }
        Ok(())
    }
}

/// Negotiated session and connection parameters. [`Default`] gives the RFC
/// 7143 defaults, which apply to every key not negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    /// CRC32C header digest in use.
    pub header_digest: bool,
    /// CRC32C data digest in use.
    pub data_digest: bool,
    /// MaxConnections.
    pub max_connections: u16,
    /// InitialR2T.
    pub initial_r2t: bool,
    /// ImmediateData.
    pub immediate_data: bool,
    /// The initiator's MaxRecvDataSegmentLength: the most data we may send
    /// in one PDU.
    pub initiator_mrdsl_bytes: u32,
    /// Our MaxRecvDataSegmentLength as declared: the most data the initiator
    /// may send in one PDU (8192 until we declare ours).
    pub target_mrdsl_bytes: u32,
    /// MaxBurstLength.
    pub max_burst_len_bytes: u32,
    /// FirstBurstLength (never above `max_burst_len_bytes`).
    pub first_burst_len_bytes: u32,
    /// DefaultTime2Wait.
    pub default_time2wait_secs: u16,
    /// DefaultTime2Retain.
    pub default_time2retain_secs: u16,
    /// MaxOutstandingR2T.
    pub max_outstanding_r2t: u16,
    /// DataPDUInOrder.
    pub data_pdu_in_order: bool,
    /// DataSequenceInOrder.
    pub data_sequence_in_order: bool,
    /// ErrorRecoveryLevel.
    pub error_recovery_level: u8,
    /// iSCSIProtocolLevel (RFC 7144).
    pub protocol_level: u8,
}

impl Default for SessionParams {
    fn default() -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            initiator_mrdsl_bytes: 8192,
            target_mrdsl_bytes: 8192,
            max_burst_len_bytes: 262_144,
            first_burst_len_bytes: 65_536,
            default_time2wait_secs: 2,
            default_time2retain_secs: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
            // The level this crate implements; it only matters when the
            // initiator negotiates the key, and then the minimum wins.
            protocol_level: PROTOCOL_LEVEL,
        }
    }
}

/// Every key RFC 7143 / RFC 7144 defines that we recognise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)] // Variant names are the RFC key names.
pub enum Key {
    HeaderDigest,
    DataDigest,
    MaxConnections,
    SendTargets,
    TargetName,
    InitiatorName,
    TargetAlias,
    InitiatorAlias,
    TargetAddress,
    TargetPortalGroupTag,
    InitialR2T,
    ImmediateData,
    MaxRecvDataSegmentLength,
    MaxBurstLength,
    FirstBurstLength,
    DefaultTime2Wait,
    DefaultTime2Retain,
    MaxOutstandingR2T,
    DataPDUInOrder,
    DataSequenceInOrder,
    ErrorRecoveryLevel,
    SessionType,
    AuthMethod,
    ChapA,
    ChapI,
    ChapC,
    ChapN,
    ChapR,
    OFMarker,
    IFMarker,
    OFMarkInt,
    IFMarkInt,
    ProtocolLevel,
    TaskReporting,
}

const ALL_KEYS: [(Key, &str); 34] = [
    (Key::HeaderDigest, "HeaderDigest"),
    (Key::DataDigest, "DataDigest"),
    (Key::MaxConnections, "MaxConnections"),
    (Key::SendTargets, "SendTargets"),
    (Key::TargetName, "TargetName"),
    (Key::InitiatorName, "InitiatorName"),
    (Key::TargetAlias, "TargetAlias"),
    (Key::InitiatorAlias, "InitiatorAlias"),
    (Key::TargetAddress, "TargetAddress"),
    (Key::TargetPortalGroupTag, "TargetPortalGroupTag"),
    (Key::InitialR2T, "InitialR2T"),
    (Key::ImmediateData, "ImmediateData"),
    (Key::MaxRecvDataSegmentLength, "MaxRecvDataSegmentLength"),
    (Key::MaxBurstLength, "MaxBurstLength"),
    (Key::FirstBurstLength, "FirstBurstLength"),
    (Key::DefaultTime2Wait, "DefaultTime2Wait"),
    (Key::DefaultTime2Retain, "DefaultTime2Retain"),
    (Key::MaxOutstandingR2T, "MaxOutstandingR2T"),
    (Key::DataPDUInOrder, "DataPDUInOrder"),
    (Key::DataSequenceInOrder, "DataSequenceInOrder"),
    (Key::ErrorRecoveryLevel, "ErrorRecoveryLevel"),
    (Key::SessionType, "SessionType"),
    (Key::AuthMethod, "AuthMethod"),
    (Key::ChapA, "CHAP_A"),
    (Key::ChapI, "CHAP_I"),
    (Key::ChapC, "CHAP_C"),
    (Key::ChapN, "CHAP_N"),
    (Key::ChapR, "CHAP_R"),
    (Key::OFMarker, "OFMarker"),
    (Key::IFMarker, "IFMarker"),
    (Key::OFMarkInt, "OFMarkInt"),
    (Key::IFMarkInt, "IFMarkInt"),
    (Key::ProtocolLevel, "iSCSIProtocolLevel"),
    (Key::TaskReporting, "TaskReporting"),
];

impl Key {
    /// Looks a key name up (case-sensitive, as RFC 7143 requires).
    pub fn from_name(name: &str) -> Option<Self> {
        ALL_KEYS.iter().find(|(_, n)| *n == name).map(|(k, _)| *k)
    }

    /// The RFC spelling of the key.
    pub fn name(self) -> &'static str {
        ALL_KEYS
            .iter()
            .find(|(k, _)| *k == self)
            .map_or("", |(_, n)| *n)
    }

    fn bit(self) -> u64 {
        1u64 << (self as u32)
    }

    /// Which group of rules applies to this key.
    pub fn class(self) -> KeyClass {
        match self {
            Key::AuthMethod | Key::ChapA | Key::ChapI | Key::ChapC | Key::ChapN | Key::ChapR => {
                KeyClass::Security
            }
            Key::InitiatorName | Key::TargetName | Key::SessionType | Key::InitiatorAlias => {
                KeyClass::Identity
            }
            Key::TargetAlias | Key::TargetAddress | Key::TargetPortalGroupTag => {
                KeyClass::TargetOnly
            }
            Key::SendTargets => KeyClass::FullFeatureOnly,
            Key::OFMarker | Key::IFMarker | Key::OFMarkInt | Key::IFMarkInt => KeyClass::Obsolete,
            _ => KeyClass::Operational,
        }
    }
}

/// Rough grouping of keys by where and by whom they may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyClass {
    /// `AuthMethod` and `CHAP_*`: security stage only.
    Security,
    /// Initiator/target naming and `SessionType`: handled by the login state
    /// machine, not negotiated.
    Identity,
    /// Operational keys negotiated in the operational stage.
    Operational,
    /// Keys only the target may send.
    TargetOnly,
    /// `SendTargets`: full feature phase only.
    FullFeatureOnly,
    /// RFC 3720 marker keys, obsoleted by RFC 7143 section 13.25.
    Obsolete,
    /// `X-` / `X#` private or public extension keys (RFC 7143 section 13.22).
    Vendor,
    /// Anything else.
    Unknown,
}

/// Classifies a key name.
pub fn classify(name: &str) -> KeyClass {
    match Key::from_name(name) {
        Some(k) => k.class(),
        None if name.starts_with("X-") || name.starts_with("X#") => KeyClass::Vendor,
        None => KeyClass::Unknown,
    }
}

/// Negotiation failures that end the login (RFC 7143 status 0x0200 or 0x0207).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NegotiationError {
    /// The initiator negotiated or declared a key twice in one login (RFC
    /// 7143 section 6.1: "MUST result in a Login reject (initiator error)").
    #[error("key {0} negotiated more than once")]
    DuplicateKey(String),
    /// A security-stage key outside the security stage.
    #[error("key {0} not allowed in this stage")]
    WrongStage(String),
    /// An invalid `MaxRecvDataSegmentLength` declaration. We cannot answer a
    /// declaration with `Reject` (our own declaration uses the same key), and
    /// guessing the initiator's limit could overrun it, so the login fails.
    #[error("invalid MaxRecvDataSegmentLength declaration")]
    BadDeclaration,
    /// The initiator answered one of our offers with a value outside the
    /// key's rule.
    #[error("bad answer for {0}")]
    BadAnswer(&'static str),
    /// The initiator left the stage without answering one of our offers.
    #[error("no answer for {0}")]
    MissingAnswer(&'static str),
}

/// Operational keys that are irrelevant in discovery sessions (RFC 7143
/// section 13, "Irrelevant when: SessionType=Discovery").
fn irrelevant_in_discovery(k: Key) -> bool {
    matches!(
        k,
        Key::MaxConnections
            | Key::InitialR2T
            | Key::ImmediateData
            | Key::MaxBurstLength
            | Key::FirstBurstLength
            | Key::MaxOutstandingR2T
            | Key::DataPDUInOrder
            | Key::DataSequenceInOrder
            | Key::TaskReporting
    )
}

fn num_in(v: &str, lo: u64, hi: u64) -> Option<u64> {
    parse_number(v).ok().filter(|n| (lo..=hi).contains(n))
}

fn len_in(v: &str) -> Option<u32> {
    num_in(v, MIN_DATA_LEN_BYTES.into(), MAX_DATA_LEN_BYTES.into())
        .and_then(|n| u32::try_from(n).ok())
}

fn u16_in(v: &str, lo: u16, hi: u16) -> Option<u16> {
    num_in(v, lo.into(), hi.into()).and_then(|n| u16::try_from(n).ok())
}

const REJECT: &str = "Reject";
const IRRELEVANT: &str = "Irrelevant";
const NOT_UNDERSTOOD: &str = "NotUnderstood";

/// Target-side negotiation state for one login (and later text exchanges).
#[derive(Debug, Clone)]
pub struct Negotiator {
    limits: TargetLimits,
    session_type: SessionType,
    params: SessionParams,
    /// Keys already negotiated in this login (bit per [`Key`]).
    seen: u64,
    /// Keys we offered and still await an answer for.
    offered: u64,
    /// Whether our login-time declarations have been emitted.
    declared: bool,
}

impl Negotiator {
    /// Starts a negotiation. `limits` should have passed
    /// [`TargetLimits::validate`].
    pub fn new(limits: TargetLimits, session_type: SessionType) -> Self {
        Self {
            limits,
            session_type,
            params: SessionParams::default(),
            seen: 0,
            offered: 0,
            declared: false,
        }
    }

    /// Continues from already-negotiated parameters, e.g. to handle Text
    /// requests in the full feature phase after login.
    pub fn resume(limits: TargetLimits, session_type: SessionType, params: SessionParams) -> Self {
        Self {
            limits,
            session_type,
            params,
            seen: 0,
            offered: 0,
            declared: true,
        }
    }

    /// Values agreed so far.
    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    /// Whether we offered keys the initiator has not answered yet; the login
    /// must not leave the operational stage while true.
    pub fn awaiting_answers(&self) -> bool {
        self.offered != 0
    }

    /// Whether the RFC defaults exceed our limits so that the login must go
    /// through the operational stage (used when an initiator asks to jump
    /// from security straight to full feature phase).
    pub fn needs_operational_stage(&self) -> bool {
        self.limits.max_recv_data_segment_len_bytes < SessionParams::default().target_mrdsl_bytes
            || self.offers_needed() != 0
    }

    fn offers_needed(&self) -> u64 {
        if self.session_type == SessionType::Discovery {
            return 0;
        }
        let d = SessionParams::default();
        let mut need = 0;
        if self.limits.max_burst_len_bytes < d.max_burst_len_bytes {
            need |= Key::MaxBurstLength.bit();
        }
        if self.limits.first_burst_len_bytes < d.first_burst_len_bytes {
            need |= Key::FirstBurstLength.bit();
        }
        if !self.limits.immediate_data {
            need |= Key::ImmediateData.bit();
        }
        need
    }

    /// Negotiates one operational-stage request's pairs, appending our
    /// answers to `out`. Identity keys are skipped (the login state machine
    /// owns them). On the first call our own declarations and any needed
    /// offers are appended too.
    pub fn negotiate_login(
        &mut self,
        pairs: &[TextPair],
        out: &mut Vec<TextPair>,
    ) -> Result<(), NegotiationError> {
        for p in pairs {
            let class = classify(&p.key);
            match class {
                KeyClass::Identity => continue,
                KeyClass::Security => return Err(NegotiationError::WrongStage(p.key.clone())),
                KeyClass::Vendor | KeyClass::Unknown => {
                    out.push(TextPair::new(p.key.clone(), NOT_UNDERSTOOD));
                    continue;
                }
                _ => {}
            }
            let Some(key) = Key::from_name(&p.key) else {
                continue;
            };
            if self.offered & key.bit() != 0 {
                self.take_answer(key, &p.value)?;
                continue;
            }
            if self.seen & key.bit() != 0 {
                return Err(NegotiationError::DuplicateKey(p.key.clone()));
            }
            self.seen |= key.bit();
            if key == Key::MaxRecvDataSegmentLength {
                let v = len_in(&p.value).ok_or(NegotiationError::BadDeclaration)?;
                self.params.initiator_mrdsl_bytes = v;
                continue;
            }
            let answer = match class {
                KeyClass::TargetOnly | KeyClass::FullFeatureOnly => REJECT.to_string(),
                KeyClass::Obsolete => obsolete_answer(key, &p.value).to_string(),
                _ if self.session_type == SessionType::Discovery
                    && irrelevant_in_discovery(key) =>
                {
                    IRRELEVANT.to_string()
                }
                _ => self.answer_operational(key, &p.value, pairs),
            };
            out.push(TextPair::new(p.key.clone(), answer));
        }
        if !self.declared {
            self.declared = true;
            self.params.target_mrdsl_bytes = self.limits.max_recv_data_segment_len_bytes;
            out.push(TextPair::new(
                Key::MaxRecvDataSegmentLength.name(),
                self.params.target_mrdsl_bytes.to_string(),
            ));
            let need = self.offers_needed() & !self.seen;
            for key in [
                Key::MaxBurstLength,
                Key::FirstBurstLength,
                Key::ImmediateData,
            ] {
                if need & key.bit() == 0 {
                    continue;
                }
                let value = match key {
                    Key::MaxBurstLength => self.limits.max_burst_len_bytes.to_string(),
                    Key::FirstBurstLength => self
                        .limits
                        .first_burst_len_bytes
                        .min(self.params.max_burst_len_bytes)
                        .to_string(),
                    _ => bool_str(false).to_string(),
                };
                self.offered |= key.bit();
                out.push(TextPair::new(key.name(), value));
            }
        }
        Ok(())
    }

    /// Records the initiator's answer to one of our offers.
    fn take_answer(&mut self, key: Key, value: &str) -> Result<(), NegotiationError> {
        self.offered &= !key.bit();
        self.seen |= key.bit();
        let bad = NegotiationError::BadAnswer(key.name());
        match key {
            Key::MaxBurstLength => {
                let v = len_in(value).filter(|&v| v <= self.limits.max_burst_len_bytes);
                self.params.max_burst_len_bytes = v.ok_or(bad)?;
            }
            Key::FirstBurstLength => {
                let v = len_in(value).filter(|&v| v <= self.limits.first_burst_len_bytes);
                self.params.first_burst_len_bytes = v.ok_or(bad)?;
            }
            Key::ImmediateData => {
                // AND with our "No" can only give "No".
                if parse_bool(value) != Ok(false) {
                    return Err(bad);
                }
                self.params.immediate_data = false;
            }
            _ => return Err(bad),
        }
        Ok(())
    }

    /// Answers one operational key and updates the parameters.
    fn answer_operational(&mut self, key: Key, value: &str, pairs: &[TextPair]) -> String {
        if value.len() > MAX_SIMPLE_VALUE_LEN_BYTES {
            return REJECT.to_string();
        }
        let l = &self.limits;
        let p = &mut self.params;
        let answer: Option<String> = match key {
            Key::HeaderDigest => pick_digest(value, l.header_digest_crc32c).map(|crc| {
                p.header_digest = crc;
                digest_str(crc).to_string()
            }),
            Key::DataDigest => pick_digest(value, l.data_digest_crc32c).map(|crc| {
                p.data_digest = crc;
                digest_str(crc).to_string()
            }),
            Key::MaxConnections => u16_in(value, 1, u16::MAX).map(|v| {
                p.max_connections = v.min(l.max_connections);
                p.max_connections.to_string()
            }),
            Key::InitialR2T => parse_bool(value).ok().map(|v| {
                p.initial_r2t = v || l.initial_r2t;
                bool_str(p.initial_r2t).to_string()
            }),
            Key::ImmediateData => parse_bool(value).ok().map(|v| {
                p.immediate_data = v && l.immediate_data;
                bool_str(p.immediate_data).to_string()
            }),
            Key::MaxBurstLength => len_in(value).map(|v| {
                p.max_burst_len_bytes = v.min(l.max_burst_len_bytes);
                p.max_burst_len_bytes.to_string()
            }),
            Key::FirstBurstLength => len_in(value).map(|v| {
                // FirstBurstLength MUST NOT exceed MaxBurstLength (RFC 7143
                // 13.14); honour a MaxBurstLength offered in the same request
                // even if it comes later in the list.
                let mbl = pairs
                    .iter()
                    .find(|q| q.key == Key::MaxBurstLength.name())
                    .and_then(|q| len_in(&q.value))
                    .map_or(p.max_burst_len_bytes, |m| m.min(l.max_burst_len_bytes));
                p.first_burst_len_bytes = v.min(l.first_burst_len_bytes).min(mbl);
                p.first_burst_len_bytes.to_string()
            }),
            Key::DefaultTime2Wait => u16_in(value, 0, MAX_TIME2_SECS).map(|v| {
                p.default_time2wait_secs = v.max(l.default_time2wait_secs);
                p.default_time2wait_secs.to_string()
            }),
            Key::DefaultTime2Retain => u16_in(value, 0, MAX_TIME2_SECS).map(|v| {
                p.default_time2retain_secs = v.min(l.default_time2retain_secs);
                p.default_time2retain_secs.to_string()
            }),
            Key::MaxOutstandingR2T => u16_in(value, 1, u16::MAX).map(|v| {
                p.max_outstanding_r2t = v.min(l.max_outstanding_r2t);
                p.max_outstanding_r2t.to_string()
            }),
            Key::DataPDUInOrder => parse_bool(value).ok().map(|v| {
                p.data_pdu_in_order = v || l.data_pdu_in_order;
                bool_str(p.data_pdu_in_order).to_string()
            }),
            Key::DataSequenceInOrder => parse_bool(value).ok().map(|v| {
                p.data_sequence_in_order = v || l.data_sequence_in_order;
                bool_str(p.data_sequence_in_order).to_string()
            }),
            Key::ErrorRecoveryLevel => num_in(value, 0, 2).map(|v| {
                let v = u8::try_from(v).unwrap_or(0).min(l.error_recovery_level);
                p.error_recovery_level = v;
                v.to_string()
            }),
            Key::ProtocolLevel => num_in(value, 0, 31).map(|v| {
                let v = u8::try_from(v).unwrap_or(0).min(PROTOCOL_LEVEL);
                p.protocol_level = v;
                v.to_string()
            }),
            // We implement only the RFC 3720 task reporting semantics.
            Key::TaskReporting => split_list(value)
                .any(|v| v == "RFC3720")
                .then(|| "RFC3720".to_string()),
            _ => None,
        };
        answer.unwrap_or_else(|| REJECT.to_string())
    }

    /// Ends login negotiation: fails if an offer of ours went unanswered and
    /// returns the final parameters.
    pub fn finish(&self) -> Result<SessionParams, NegotiationError> {
        if self.offered != 0 {
            let missing = ALL_KEYS
                .iter()
                .find(|(k, _)| self.offered & k.bit() != 0)
                .map_or("", |(_, n)| *n);
            return Err(NegotiationError::MissingAnswer(missing));
        }
        let mut p = self.params.clone();
        // Both sides clamp: a MaxBurstLength agreed after FirstBurstLength
        // can leave the pair out of order (RFC 7143 13.14).
        p.first_burst_len_bytes = p.first_burst_len_bytes.min(p.max_burst_len_bytes);
        Ok(p)
    }

    /// Negotiates keys of a full-feature-phase Text request (other than
    /// `SendTargets`, which the caller answers). Login-only keys get
    /// `Reject`; `MaxRecvDataSegmentLength` may be re-declared and updates
    /// the parameters; unknown keys get `NotUnderstood`.
    pub fn negotiate_full_feature(
        &mut self,
        pairs: &[TextPair],
        out: &mut Vec<TextPair>,
    ) -> Result<(), NegotiationError> {
        if let Some(dup) = super::text::first_duplicate(pairs) {
            return Err(NegotiationError::DuplicateKey(dup.to_string()));
        }
        for p in pairs {
            match Key::from_name(&p.key) {
                Some(Key::SendTargets) => {}
                Some(Key::MaxRecvDataSegmentLength) => {
                    let v = len_in(&p.value).ok_or(NegotiationError::BadDeclaration)?;
                    self.params.initiator_mrdsl_bytes = v;
                }
                // Declarative and allowed in any phase (RFC 7143 13.7).
                Some(Key::InitiatorAlias) => {}
                Some(_) => out.push(TextPair::new(p.key.clone(), REJECT)),
                None => out.push(TextPair::new(p.key.clone(), NOT_UNDERSTOOD)),
            }
        }
        Ok(())
    }
}

/// RFC 7143 section 13.25: for IFMarker/OFMarker answer `Reject` (SHOULD) or
/// `No` (MAY); we answer `No` to a well-formed boolean because RFC 3720
/// initiators understand it as an ordinary negotiation result. MarkInt keys
/// MUST get `Reject`.
fn obsolete_answer(key: Key, value: &str) -> &'static str {
    match key {
        Key::IFMarker | Key::OFMarker if parse_bool(value).is_ok() => "No",
        _ => REJECT,
    }
}

fn digest_str(crc: bool) -> &'static str {
    if crc {
        "CRC32C"
    } else {
        "None"
    }
}

/// First digest in the initiator's order that we support: `Some(true)` for
/// CRC32C, `Some(false)` for None, `None` if nothing matches.
fn pick_digest(list: &str, crc_allowed: bool) -> Option<bool> {
    split_list(list).find_map(|v| match v {
        "None" => Some(false),
        "CRC32C" if crc_allowed => Some(true),
        _ => None,
    })
}

#[cfg(test)]
mod tests;
