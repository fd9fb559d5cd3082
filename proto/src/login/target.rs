//! Target-side login state machine for one connection (RFC 7143 sections
//! 6.3, 11.12, 11.13), plus the full-feature-phase Text request helper
//! (`SendTargets`).
//!
//! The caller decodes each Login Request PDU into a [`LoginRequest`] and feeds it, with
//! its data segment, to [`TargetLogin::step`], and encodes the returned [`LoginResponse`] into a
//! Login Response PDU. The caller fills the PDU fields this module does not
//! own: ISID and ITT echo, TSIH (assigned on the final successful response of
//! a leading login), StatSN, ExpCmdSN and MaxCmdSN. Version-max and
//! version-active are carried in the response (always 0, the only version).
//!
//! Flow we implement:
//! * The first request must carry `InitiatorName` (else 0x0207) and, for a
//!   normal session, a `TargetName` we know (0x0207 if absent, 0x0203 if
//!   unknown). The initiator must be on the target's ACL and the source must
//!   be allowed to reach it (0x0202).
//! * Security stage: `AuthMethod` list -> `None` or `CHAP` as configured;
//!   CHAP: `CHAP_A` -> `CHAP_A=5, CHAP_I, CHAP_C` -> verify `CHAP_N/CHAP_R`
//!   (and answer mutual CHAP). Wrong credentials give 0x0201. An initiator
//!   that skips the security stage when the target requires CHAP gets 0x0201.
//! * Operational stage: [`Negotiator`] answers; we declare our
//!   `MaxRecvDataSegmentLength`.
//! * `TargetPortalGroupTag` (and `TargetAlias`, if configured) go in the
//!   response to the first request with C=0 of a normal session, as RFC 7143
//!   section 13.9 requires.
//! * C bit: pieces are accumulated (bounded) and answered with empty
//!   responses until the final piece.
//! * Any protocol violation gives 0x0200 and the login is over.

use super::chap::{ChapAnswer, ChapCredentials, ChapEntropy, ChapError, ChapTarget};
use super::negotiate::{
    classify, KeyClass, NegotiationError, Negotiator, SessionParams, SessionType, TargetLimits,
};
use super::text::{
    encode_text, find, first_duplicate, parse_text, split_list, TextError, TextPair,
    MAX_TEXT_LEN_BYTES,
};
use thiserror::Error;

/// Longest iSCSI name (RFC 7143 section 4.2.7.1: 223 bytes).
pub const MAX_NAME_LEN_BYTES: usize = 223;

/// Most Login Request PDUs we accept in one login. A normal CHAP login takes
/// four; the cap stops an initiator from keeping a connection in login
/// forever by sending empty requests.
pub const MAX_LOGIN_PDUS: u32 = 32;

/// A decoded Login Request header: the PDU layer's type (one for both); its data segment
/// (the key=value text) comes beside it.
pub use crate::pdu::LoginRequest;
/// Login stages: the PDU layer's type (one for both).
pub use crate::pdu::LoginStage as Stage;

/// Login Response fields decided by the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResponse {
    /// T bit.
    pub transit: bool,
    /// C bit (we never split responses, so always false).
    pub cont: bool,
    /// Current stage (echoes the request's CSG).
    pub csg: Stage,
    /// Next stage; [`Stage::Security`] (field value 0, reserved) unless `transit`.
    pub nsg: Stage,
    /// Version-max (0: the only iSCSI version).
    pub version_max: u8,
    /// Version-active (0).
    pub version_active: u8,
    /// Status-Class (RFC 7143 section 11.13.5).
    pub status_class: u8,
    /// Status-Detail.
    pub status_detail: u8,
    /// Text data segment.
    pub data: Vec<u8>,
}

/// Login status codes we produce (RFC 7143 section 11.13.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginStatus {
    /// 0x0000.
    Success,
    /// 0x0200 initiator error (protocol violation).
    InitiatorError,
    /// 0x0201 authentication failure.
    AuthenticationFailure,
    /// 0x0202 authorization failure.
    AuthorizationFailure,
    /// 0x0203 target not found.
    NotFound,
    /// 0x0205 unsupported version.
    UnsupportedVersion,
    /// 0x0206 too many connections.
    TooManyConnections,
    /// 0x0207 missing parameter.
    MissingParameter,
    /// 0x0209 session type not supported.
    SessionTypeNotSupported,
    /// 0x020A session does not exist (a login naming a TSIH we have no session for).
    SessionDoesNotExist,
    /// 0x0300 target error (e.g. invalid configuration).
    TargetError,
}

impl LoginStatus {
    /// (Status-Class, Status-Detail).
    pub fn code(self) -> (u8, u8) {
        match self {
            Self::Success => (0x00, 0x00),
            Self::InitiatorError => (0x02, 0x00),
            Self::AuthenticationFailure => (0x02, 0x01),
            Self::AuthorizationFailure => (0x02, 0x02),
            Self::NotFound => (0x02, 0x03),
            Self::UnsupportedVersion => (0x02, 0x05),
            Self::TooManyConnections => (0x02, 0x06),
            Self::MissingParameter => (0x02, 0x07),
            Self::SessionTypeNotSupported => (0x02, 0x09),
            Self::SessionDoesNotExist => (0x02, 0x0a),
            Self::TargetError => (0x03, 0x00),
        }
    }
}

/// Authentication a target (or discovery) requires.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// No authentication (`AuthMethod=None`).
    None,
    /// CHAP with MD5.
    Chap {
        /// User name the initiator must present.
        user: String,
        /// Secret the initiator must prove (>= 12 bytes).
        secret: Vec<u8>,
        /// Target user and secret for mutual CHAP, if the initiator asks.
        mutual: Option<(String, Vec<u8>)>,
    },
}

impl std::fmt::Debug for Auth {
    // Keep secrets out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Chap { user, mutual, .. } => f
                .debug_struct("Chap")
                .field("user", user)
                .field("mutual_user", &mutual.as_ref().map(|(u, _)| u))
                .finish_non_exhaustive(),
        }
    }
}

impl Auth {
    fn credentials(&self) -> Result<Option<(ChapCredentials, Option<ChapCredentials>)>, ChapError> {
        match self {
            Auth::None => Ok(None),
            Auth::Chap {
                user,
                secret,
                mutual,
            } => {
                let c = ChapCredentials::new(user.clone(), secret.clone())?;
                let m = match mutual {
                    Some((u, s)) => Some(ChapCredentials::new(u.clone(), s.clone())?),
                    None => None,
                };
                // RFC 7143 12.1.3: never the same secret in both directions.
                if mutual.as_ref().is_some_and(|(_, s)| s == secret) {
                    return Err(ChapError::SameSecretBothWays);
                }
                Ok(Some((c, m)))
            }
        }
    }
}

/// One exported target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    /// iSCSI name (e.g. `iqn.2024-01.org.example:disk0`).
    pub name: String,
    /// Optional human-readable alias, sent as `TargetAlias`.
    pub alias: Option<String>,
    /// Authentication this target requires.
    pub auth: Auth,
    /// Initiator names allowed to log in; `None` allows any.
    pub allowed_initiators: Option<Vec<String>>,
}

/// Login configuration shared by all connections of a portal group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginConfig {
    /// Exported targets.
    pub targets: Vec<TargetConfig>,
    /// Authentication required for discovery sessions.
    pub discovery_auth: Auth,
    /// Our TargetPortalGroupTag.
    pub portal_group_tag: u16,
    /// What we support for operational parameters.
    pub limits: TargetLimits,
}

/// An invalid [`LoginConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// Bad operational limits.
    #[error(transparent)]
    Limits(#[from] super::negotiate::LimitsError),
    /// Bad CHAP credentials for the named target (empty name: discovery).
    #[error("target {target:?}: {error}")]
    Chap {
        /// Target name.
        target: String,
        /// What is wrong.
        error: ChapError,
    },
    /// A target or alias name that is empty, too long or has control bytes.
    #[error("invalid name {0:?}")]
    BadName(String),
    /// Two targets with the same name.
    #[error("duplicate target {0:?}")]
    DuplicateTarget(String),
}

impl LoginConfig {
    /// Checks the configuration once at startup so logins cannot fail on it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.limits.validate()?;
        let chap = |target: &str, a: &Auth| {
            a.credentials()
                .map(|_| ())
                .map_err(|error| ConfigError::Chap {
                    target: target.to_string(),
                    error,
                })
        };
        chap("", &self.discovery_auth)?;
        for (i, t) in self.targets.iter().enumerate() {
            if !valid_name(&t.name) {
                return Err(ConfigError::BadName(t.name.clone()));
            }
            if let Some(a) = &t.alias {
                if a.is_empty() || a.len() > 255 || a.chars().any(char::is_control) {
                    return Err(ConfigError::BadName(a.clone()));
                }
            }
            chap(&t.name, &t.auth)?;
            let dup = self
                .targets
                .iter()
                .skip(i + 1)
                .any(|o| o.name.eq_ignore_ascii_case(&t.name));
            if dup {
                return Err(ConfigError::DuplicateTarget(t.name.clone()));
            }
        }
        Ok(())
    }
}

/// iSCSI name sanity: 1..=223 bytes, no whitespace or control characters.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN_BYTES
        && !s.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// What a successful login established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResult {
    /// Normal or discovery.
    pub session_type: SessionType,
    /// The configured name of the target (normal sessions only).
    pub target_name: Option<String>,
    /// The initiator's name as sent.
    pub initiator_name: String,
    /// The initiator's alias, if sent.
    pub initiator_alias: Option<String>,
    /// ISID of the login.
    pub isid: [u8; 6],
    /// CID of the login.
    pub cid: u16,
    /// Negotiated parameters.
    pub params: SessionParams,
}

/// What happens after this response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginOutcome {
    /// Wait for the next Login Request.
    Continue,
    /// Login done; the connection is in full feature phase.
    Complete(LoginResult),
    /// Login failed; send the response and close the connection.
    Failed,
}

/// Output of one [`TargetLogin::step`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginStep {
    /// Response to send.
    pub response: LoginResponse,
    /// What to do next.
    pub outcome: LoginOutcome,
}

#[derive(Debug, Clone)]
enum AuthState {
    /// No `AuthMethod` yet.
    Start,
    /// CHAP chosen, waiting for `CHAP_A`.
    ChapAlgorithm,
    /// Challenge sent, waiting for `CHAP_N`/`CHAP_R`.
    ChapResponse(Box<ChapTarget>),
    /// Authenticated (or no authentication needed).
    Done,
}

#[derive(Debug, Clone)]
struct Identity {
    initiator_name: String,
    initiator_alias: Option<String>,
    /// TargetName as the initiator spelled it (for repeat checks).
    target_name_sent: Option<String>,
    /// Index into `LoginConfig::targets`.
    target: Option<usize>,
    session_type: SessionType,
    /// Whether SessionType was sent explicitly (for repeat checks).
    session_type_sent: Option<String>,
    auth_required: bool,
}

/// Target-side login state for one connection.
#[derive(Debug, Clone)]
pub struct TargetLogin {
    entropy: ChapEntropy,
    /// Text of C=1 pieces awaiting the final piece.
    pending: Vec<u8>,
    pdus: u32,
    /// ISID, TSIH and CID of the first request; later ones must match.
    header: Option<([u8; 6], u16, u16)>,
    /// Stage the next request must be in (after the first).
    stage: Option<Stage>,
    identity: Option<Identity>,
    auth: AuthState,
    neg: Option<Negotiator>,
    finished: bool,
}

type StepResult = Result<(bool, Stage, Option<LoginResult>), LoginStatus>;

impl TargetLogin {
    /// Starts a login. `entropy` must come from a CSPRNG; it becomes the
    /// CHAP identifier and challenge if CHAP is used.
    pub fn new(entropy: ChapEntropy) -> Self {
        Self {
            entropy,
            pending: Vec::new(),
            pdus: 0,
            header: None,
            stage: None,
            identity: None,
            auth: AuthState::Start,
            neg: None,
            finished: false,
        }
    }

    /// Processes one Login Request. `may_reach` tells whether the
    /// connection's source address may log in to the named target (the
    /// portal-level ACL the caller owns).
    pub fn step(
        &mut self,
        config: &LoginConfig,
        may_reach: &dyn Fn(&str) -> bool,
        req: &LoginRequest,
        data: &[u8],
    ) -> LoginStep {
        let mut out = Vec::new();
        let result = self.step_inner(config, may_reach, (req, data), &mut out);
        let (status, transit, nsg, outcome) = match result {
            Ok((transit, nsg, done)) => match done {
                Some(r) => {
                    self.finished = true;
                    (
                        LoginStatus::Success,
                        transit,
                        nsg,
                        LoginOutcome::Complete(r),
                    )
                }
                None => (LoginStatus::Success, transit, nsg, LoginOutcome::Continue),
            },
            Err(s) => {
                self.finished = true;
                (s, false, Stage::Security, LoginOutcome::Failed)
            }
        };
        let (status_class, status_detail) = status.code();
        LoginStep {
            response: LoginResponse {
                transit,
                cont: false,
                csg: req.csg,
                nsg: if transit { nsg } else { Stage::Security },
                version_max: 0,
                version_active: 0,
                status_class,
                status_detail,
                data: encode_text(&out),
            },
            outcome,
        }
    }

    fn step_inner(
        &mut self,
        config: &LoginConfig,
        may_reach: &dyn Fn(&str) -> bool,
        (req, data): (&LoginRequest, &[u8]),
        out: &mut Vec<TextPair>,
    ) -> StepResult {
        use LoginStatus as S;
        if self.finished {
            return Err(S::InitiatorError);
        }
        self.pdus += 1;
        if self.pdus > MAX_LOGIN_PDUS {
            return Err(S::InitiatorError);
        }
        // We speak version 0 only (RFC 7143 section 11.12.4).
        if req.version_min > 0 {
            return Err(S::UnsupportedVersion);
        }
        // RFC 7143 11.12.2: C and T must not both be set; CSG must be a
        // login stage; NSG, when T is set, must be a later stage.
        if req.cont && req.transit {
            return Err(S::InitiatorError);
        }
        if req.csg == Stage::FullFeature {
            return Err(S::InitiatorError);
        }
        if req.transit && req.nsg <= req.csg {
            return Err(S::InitiatorError);
        }
        match self.header {
            None => {
                // A non-zero TSIH asks to add a connection to an existing session,
                // or to reinstate its connection (RFC 7143 6.3.4). With
                // MaxConnections=1 and ErrorRecoveryLevel=0 no session takes either:
                // "session does not exist" sends the initiator to a new session
                // (TSIH 0), which reinstates the old one if it still lives. "Too
                // many connections" would make it give up.
                if req.tsih != 0 {
                    return Err(S::SessionDoesNotExist);
                }
                self.header = Some((req.isid, req.tsih, req.cid));
            }
            Some(h) => {
                if h != (req.isid, req.tsih, req.cid) {
                    return Err(S::InitiatorError);
                }
            }
        }
        if let Some(stage) = self.stage {
            if req.csg != stage {
                return Err(S::InitiatorError);
            }
        }
        self.stage = Some(req.csg);

        // Accumulate continued text, bounded.
        if self.pending.len().saturating_add(data.len()) > MAX_TEXT_LEN_BYTES {
            return Err(S::InitiatorError);
        }
        self.pending.extend_from_slice(data);
        if req.cont {
            return Ok((false, req.csg, None));
        }
        let text = std::mem::take(&mut self.pending);
        let pairs = parse_text(&text).map_err(|_: TextError| S::InitiatorError)?;
        if first_duplicate(&pairs).is_some() {
            return Err(S::InitiatorError);
        }

        let first = self.identity.is_none();
        if first {
            self.identify(config, may_reach, &pairs)?;
        } else {
            self.check_identity_repeat(&pairs)?;
        }
        let ident = self.identity.clone().ok_or(S::InitiatorError)?;
        if first && ident.session_type == SessionType::Normal {
            out.push(TextPair::new(
                "TargetPortalGroupTag",
                config.portal_group_tag.to_string(),
            ));
            let alias = ident
                .target
                .and_then(|i| config.targets.get(i))
                .and_then(|t| t.alias.clone());
            if let Some(alias) = alias {
                out.push(TextPair::new("TargetAlias", alias));
            }
        }
        let neg = self
            .neg
            .get_or_insert_with(|| Negotiator::new(config.limits.clone(), ident.session_type));

        match req.csg {
            Stage::Security => {
                for p in &pairs {
                    match classify(&p.key) {
                        KeyClass::Security | KeyClass::Identity => {}
                        KeyClass::Vendor | KeyClass::Unknown => {
                            out.push(TextPair::new(p.key.clone(), "NotUnderstood"));
                        }
                        // Operational keys belong to the operational stage
                        // (as in the Linux target, they end the login).
                        _ => return Err(S::InitiatorError),
                    }
                }
                self.security(config, &ident, &pairs, out)?;
                let auth_done = matches!(self.auth, AuthState::Done);
                if !(req.transit && auth_done) {
                    return Ok((false, req.csg, None));
                }
                let neg = self.neg.as_ref().ok_or(S::TargetError)?;
                if req.nsg == Stage::FullFeature && !neg.needs_operational_stage() {
                    let params = neg.finish().map_err(negotiation_status)?;
                    return Ok((
                        true,
                        Stage::FullFeature,
                        Some(result(config, &ident, req, params)),
                    ));
                }
                // Either the initiator asked for the operational stage, or it
                // asked for full feature but our limits need negotiating: we
                // then move it to the operational stage instead.
                self.stage = Some(Stage::Operational);
                Ok((true, Stage::Operational, None))
            }
            Stage::Operational => {
                if !matches!(self.auth, AuthState::Done) {
                    if ident.auth_required {
                        // Skipping a mandatory security stage.
                        return Err(S::AuthenticationFailure);
                    }
                    self.auth = AuthState::Done;
                }
                neg.negotiate_login(&pairs, out)
                    .map_err(negotiation_status)?;
                if !req.transit || neg.awaiting_answers() {
                    return Ok((false, req.csg, None));
                }
                let params = neg.finish().map_err(negotiation_status)?;
                self.stage = Some(Stage::FullFeature);
                Ok((
                    true,
                    Stage::FullFeature,
                    Some(result(config, &ident, req, params)),
                ))
            }
            Stage::FullFeature => Err(S::InitiatorError),
        }
    }

    /// Handles the identity keys of the first (complete) request.
    fn identify(
        &mut self,
        config: &LoginConfig,
        may_reach: &dyn Fn(&str) -> bool,
        pairs: &[TextPair],
    ) -> Result<(), LoginStatus> {
        use LoginStatus as S;
        let initiator_name = find(pairs, "InitiatorName").ok_or(S::MissingParameter)?;
        if !valid_name(initiator_name) {
            return Err(S::InitiatorError);
        }
        let initiator_alias = match find(pairs, "InitiatorAlias") {
            Some(a) if a.len() > 255 => return Err(S::InitiatorError),
            a => a.map(str::to_string),
        };
        let session_type_sent = find(pairs, "SessionType");
        let session_type = match session_type_sent {
            None => SessionType::Normal,
            Some(s) => SessionType::parse(s).ok_or(S::SessionTypeNotSupported)?,
        };
        let target_name_sent = find(pairs, "TargetName");
        let (target, auth) = match session_type {
            SessionType::Discovery => (None, &config.discovery_auth),
            SessionType::Normal => {
                let name = target_name_sent.ok_or(S::MissingParameter)?;
                if !valid_name(name) {
                    return Err(S::InitiatorError);
                }
                // iSCSI names are case-insensitive after RFC 3722
                // normalisation, which for the ASCII names used in practice
                // is ASCII lower-casing.
                let index = config
                    .targets
                    .iter()
                    .position(|t| t.name.eq_ignore_ascii_case(name))
                    .ok_or(S::NotFound)?;
                let t = config.targets.get(index).ok_or(S::NotFound)?;
                if let Some(acl) = &t.allowed_initiators {
                    if !acl.iter().any(|a| a.eq_ignore_ascii_case(initiator_name)) {
                        return Err(S::AuthorizationFailure);
                    }
                }
                if !may_reach(&t.name) {
                    return Err(S::AuthorizationFailure);
                }
                (Some(index), &t.auth)
            }
        };
        self.identity = Some(Identity {
            initiator_name: initiator_name.to_string(),
            initiator_alias,
            target_name_sent: target_name_sent.map(str::to_string),
            target,
            session_type,
            session_type_sent: session_type_sent.map(str::to_string),
            auth_required: !matches!(auth, Auth::None),
        });
        Ok(())
    }

    /// Later requests may repeat identity keys only with the same value.
    /// (RFC 7143 6.1 forbids renegotiation; identical repeats are tolerated
    /// because they change nothing.)
    fn check_identity_repeat(&mut self, pairs: &[TextPair]) -> Result<(), LoginStatus> {
        let ident = self.identity.as_mut().ok_or(LoginStatus::InitiatorError)?;
        let same = |key: &str, was: Option<&str>| match find(pairs, key) {
            None => true,
            Some(v) => was == Some(v),
        };
        let ok = same("InitiatorName", Some(&ident.initiator_name))
            && same("TargetName", ident.target_name_sent.as_deref())
            && same("SessionType", ident.session_type_sent.as_deref());
        if !ok {
            return Err(LoginStatus::InitiatorError);
        }
        match (find(pairs, "InitiatorAlias"), &ident.initiator_alias) {
            (None, _) => {}
            (Some(a), Some(was)) if a == was => {}
            (Some(a), None) if a.len() <= 255 => ident.initiator_alias = Some(a.to_string()),
            _ => return Err(LoginStatus::InitiatorError),
        }
        Ok(())
    }

    /// Security-stage keys: AuthMethod selection and the CHAP exchange.
    fn security(
        &mut self,
        config: &LoginConfig,
        ident: &Identity,
        pairs: &[TextPair],
        out: &mut Vec<TextPair>,
    ) -> Result<(), LoginStatus> {
        use LoginStatus as S;
        let auth_method = find(pairs, "AuthMethod");
        let chap_a = find(pairs, "CHAP_A");
        let chap_answer = ChapAnswer::from_pairs(pairs);
        let has_answer = chap_answer.name.is_some()
            || chap_answer.response.is_some()
            || chap_answer.id.is_some()
            || chap_answer.challenge.is_some();
        if matches!(self.auth, AuthState::Start) {
            match auth_method {
                None if !ident.auth_required && chap_a.is_none() && !has_answer => {
                    // Lenient: an initiator that goes through the security
                    // stage without AuthMethod gets the default, None.
                    self.auth = AuthState::Done;
                    return Ok(());
                }
                None => return Err(S::MissingParameter),
                Some(list) => {
                    let want = if ident.auth_required { "CHAP" } else { "None" };
                    if !split_list(list).any(|m| m == want) {
                        out.push(TextPair::new("AuthMethod", "Reject"));
                        return Err(S::AuthenticationFailure);
                    }
                    out.push(TextPair::new("AuthMethod", want));
                    self.auth = if ident.auth_required {
                        AuthState::ChapAlgorithm
                    } else {
                        AuthState::Done
                    };
                }
            }
            if has_answer {
                return Err(S::InitiatorError);
            }
            // CHAP_A may ride along with AuthMethod in the same request.
            if chap_a.is_none() {
                return Ok(());
            }
            if matches!(self.auth, AuthState::Done) {
                return Err(S::InitiatorError);
            }
        } else if auth_method.is_some() {
            // AuthMethod negotiated twice.
            return Err(S::InitiatorError);
        }
        match std::mem::replace(&mut self.auth, AuthState::Done) {
            AuthState::Start => Err(S::InitiatorError),
            AuthState::ChapAlgorithm => {
                if has_answer {
                    return Err(S::InitiatorError);
                }
                let list = chap_a.ok_or(S::MissingParameter)?;
                let auth = match ident.target.and_then(|i| config.targets.get(i)) {
                    Some(t) => &t.auth,
                    None => &config.discovery_auth,
                };
                let (creds, mutual) = auth
                    .credentials()
                    .map_err(|_| S::TargetError)?
                    .ok_or(S::TargetError)?;
                let chap =
                    ChapTarget::new(creds, mutual, self.entropy).map_err(|_| S::TargetError)?;
                match chap.challenge(list) {
                    Ok(keys) => out.extend(keys),
                    Err(_) => {
                        out.push(TextPair::new("CHAP_A", "Reject"));
                        return Err(S::AuthenticationFailure);
                    }
                }
                self.auth = AuthState::ChapResponse(Box::new(chap));
                Ok(())
            }
            AuthState::ChapResponse(chap) => {
                if chap_a.is_some() {
                    return Err(S::InitiatorError);
                }
                let keys = chap
                    .verify(&chap_answer)
                    .map_err(|_| S::AuthenticationFailure)?;
                out.extend(keys);
                Ok(())
            }
            AuthState::Done => {
                if chap_a.is_some() || has_answer {
                    return Err(S::InitiatorError);
                }
                Ok(())
            }
        }
    }
}

fn negotiation_status(e: NegotiationError) -> LoginStatus {
    match e {
        NegotiationError::MissingAnswer(_) => LoginStatus::MissingParameter,
        _ => LoginStatus::InitiatorError,
    }
}

fn result(
    config: &LoginConfig,
    ident: &Identity,
    req: &LoginRequest,
    params: SessionParams,
) -> LoginResult {
    LoginResult {
        session_type: ident.session_type,
        target_name: ident
            .target
            .and_then(|i| config.targets.get(i))
            .map(|t| t.name.clone()),
        initiator_name: ident.initiator_name.clone(),
        initiator_alias: ident.initiator_alias.clone(),
        isid: req.isid,
        cid: req.cid,
        params,
    }
}

/// A target as reported by `SendTargets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryTarget {
    /// iSCSI name.
    pub name: String,
    /// `TargetAddress` values, e.g. from [`target_address`].
    pub addresses: Vec<String>,
}

/// Formats a `TargetAddress` value: `ip:port,tpgt` (IPv6 in brackets).
pub fn target_address(addr: std::net::SocketAddr, portal_group_tag: u16) -> String {
    format!("{addr},{portal_group_tag}")
}

/// Reply to a full-feature Text request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextReply {
    /// Text data segment (at most [`MAX_TEXT_LEN_BYTES`]; the caller splits
    /// it into PDUs of the initiator's MaxRecvDataSegmentLength with the C
    /// bit and a target transfer tag, RFC 7143 section 11.11).
    pub data: Vec<u8>,
    /// Whether some targets were left out to respect the size bound.
    pub truncated: bool,
}

/// Why a Text request could not be answered (send a Reject PDU).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TextRequestError {
    /// Malformed text.
    #[error(transparent)]
    Text(#[from] TextError),
    /// Protocol violation in the keys.
    #[error(transparent)]
    Negotiation(#[from] NegotiationError),
}

/// Answers a full-feature-phase Text request (final, already reassembled).
///
/// `SendTargets=All` (discovery sessions only; `Reject` in normal sessions,
/// RFC 7143 section 13.3) lists every target in `visible`;
/// `SendTargets=<name>` lists that target if visible; an empty value in a
/// normal session lists the session's own target (`session_target`). Other
/// keys are negotiated per [`Negotiator::negotiate_full_feature`], which may
/// update `params` (a new `MaxRecvDataSegmentLength` declaration).
pub fn answer_text_request(
    limits: &TargetLimits,
    session_type: SessionType,
    params: &mut SessionParams,
    session_target: Option<&str>,
    visible: &[DiscoveryTarget],
    data: &[u8],
) -> Result<TextReply, TextRequestError> {
    let pairs = parse_text(data)?;
    let mut neg = Negotiator::resume(limits.clone(), session_type, params.clone());
    let mut out = Vec::new();
    neg.negotiate_full_feature(&pairs, &mut out)?;
    *params = neg.params().clone();
    let mut truncated = false;
    if let Some(st) = find(&pairs, "SendTargets") {
        let selected: Vec<&DiscoveryTarget> = match (st, session_type) {
            ("All", SessionType::Discovery) => visible.iter().collect(),
            ("All", SessionType::Normal) | ("", SessionType::Discovery) => {
                out.push(TextPair::new("SendTargets", "Reject"));
                Vec::new()
            }
            ("", SessionType::Normal) => visible
                .iter()
                .filter(|t| session_target.is_some_and(|s| t.name.eq_ignore_ascii_case(s)))
                .collect(),
            (name, _) => visible
                .iter()
                .filter(|t| t.name.eq_ignore_ascii_case(name))
                .collect(),
        };
        let mut len_bytes = encode_text(&out).len();
        for t in selected {
            let mut record = vec![TextPair::new("TargetName", t.name.clone())];
            record.extend(
                t.addresses
                    .iter()
                    .map(|a| TextPair::new("TargetAddress", a.clone())),
            );
            let record_len = encode_text(&record).len();
            if len_bytes.saturating_add(record_len) > MAX_TEXT_LEN_BYTES {
                truncated = true;
                break;
            }
            len_bytes += record_len;
            out.extend(record);
        }
    }
    Ok(TextReply {
        data: encode_text(&out),
        truncated,
    })
}

#[cfg(test)]
mod tests;
