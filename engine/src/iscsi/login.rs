//! Glue between a connection and `proto`'s login state machine: the registry's targets
//! and access rules become a `LoginConfig`, and each Login Request becomes a framed Login
//! Response with the right sequence numbers and TSIH.

use std::net::SocketAddr;
use std::sync::Arc;

use proto::login::chap::CHALLENGE_LEN_BYTES;
use proto::login::target::target_address;
use proto::login::{
    answer_text_request, Auth, ChapEntropy, DiscoveryTarget, LoginConfig, LoginOutcome,
    SessionParams, SessionType, TargetConfig, TargetLimits, TargetLogin,
};
use proto::pdu::{self, Digests, TargetPdu, TargetSns};
use rand::RngCore;

use crate::config::{ChapConfig, Config};
use crate::registry::Registry;

/// Portal group tag of our single portal group (SendTargets and VPD 0x83 agree on it).
pub const PORTAL_GROUP_TAG: u16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    Normal,
    Discovery,
}

#[derive(Debug)]
pub struct LoginResult {
    pub kind: SessionKind,
    /// Registry index of the target (normal sessions).
    pub target: usize,
    /// The target as the login saw it (its ACLs and CHAP admitted the initiator).
    pub entry: Option<std::sync::Arc<crate::registry::TargetEntry>>,
    /// The registry's view generation read before that view (registry.rs).
    pub view_gen: u64,
    pub target_name: String,
    pub initiator_name: String,
    pub isid: [u8; 6],
    pub params: SessionParams,
    /// The CmdSN the first full-feature command will carry.
    pub exp_cmd_sn: u32,
}

pub enum LoginDone {
    Success(Box<LoginResult>),
    Failed,
}

pub struct LoginStepOut {
    /// The framed Login Response.
    pub bytes: Vec<u8>,
    pub done: Option<LoginDone>,
}

fn auth(c: &Option<ChapConfig>) -> Auth {
    match c {
        None => Auth::None,
        Some(c) => Auth::Chap {
            user: c.user.clone(),
            secret: c.secret.clone().into_bytes(),
            mutual: c
                .mutual
                .as_ref()
                .map(|(u, s)| (u.clone(), s.clone().into_bytes())),
        },
    }
}

/// What we offer in negotiation. 256 KiB segments and 1 MiB bursts keep large writes to a
/// few PDUs; InitialR2T=No saves a round trip, and a 256 KiB first burst (what Linux and
/// ESXi initiators offer) extends that to writes up to 256 KiB.
pub fn limits() -> TargetLimits {
    TargetLimits {
        first_burst_len_bytes: 262_144,
        ..TargetLimits::default()
    }
}

/// The login view of the configuration (built once, shared by every connection).
pub fn login_config(cfg: &Config) -> LoginConfig {
    LoginConfig {
        targets: cfg
            .targets
            .iter()
            .map(|t| TargetConfig {
                name: t.name.clone(),
                alias: t.alias.clone(),
                auth: auth(&t.chap),
                allowed_initiators: t.allowed_initiators.clone(),
            })
            .collect(),
        discovery_auth: auth(&cfg.discovery_chap),
        portal_group_tag: PORTAL_GROUP_TAG,
        limits: limits(),
    }
}

/// The login phase of one connection.
pub struct LoginPhase {
    machine: TargetLogin,
    peer: SocketAddr,
    /// CmdSN of the login (login requests are immediate: it does not advance).
    exp_cmd_sn: u32,
    window: u32,
}

impl LoginPhase {
    pub fn new(reg: &Registry, peer: SocketAddr) -> Self {
        let mut rng = rand::rngs::OsRng;
        let mut challenge = [0u8; CHALLENGE_LEN_BYTES];
        rng.fill_bytes(&mut challenge);
        let id = (rng.next_u32() & 0xff) as u8;
        LoginPhase {
            machine: TargetLogin::new(ChapEntropy { id, challenge }),
            peer,
            exp_cmd_sn: 0,
            window: reg.config.queue_depth,
        }
    }

    pub fn exp_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn
    }

    pub fn on_request(
        &mut self,
        req: &pdu::LoginRequest,
        data: &[u8],
        reg: &Registry,
        stat_sn: &mut u32,
    ) -> LoginStepOut {
        self.exp_cmd_sn = req.cmd_sn;
        let peer_ip = self.peer.ip();
        // One view for the whole step: a reload between its parts cannot mix old and new.
        let view_gen = reg.view_gen();
        let view = reg.view();
        let may_reach = |name: &str| {
            view.target(name)
                .is_some_and(|(_, t)| t.cfg.address_allowed(peer_ip))
        };
        // One request type from the PDU layer to the login state machine.
        let step = self.machine.step(&view.login, &may_reach, req, data);
        let mut tsih = 0;
        let done = match step.outcome {
            LoginOutcome::Continue => None,
            LoginOutcome::Failed => {
                let (c, d) = (step.response.status_class, step.response.status_detail);
                tracing::warn!(peer = %self.peer, status = format!("{c:02x}{d:02x}"), "login refused");
                if let Some(m) = reg.metrics.get() {
                    m.login_failed(crate::metrics::LoginFailure::of(c, d));
                }
                Some(LoginDone::Failed)
            }
            LoginOutcome::Complete(r) => {
                tsih = reg.new_tsih();
                let (kind, target, entry) = match r.session_type {
                    SessionType::Discovery => (SessionKind::Discovery, usize::MAX, None),
                    SessionType::Normal => {
                        let name = r.target_name.clone().unwrap_or_default();
                        match view.target(&name) {
                            Some((i, t)) => (SessionKind::Normal, i, Some(Arc::clone(t))),
                            // The state machine only completes for configured targets
                            // (of this same view); counted as `other` should it happen.
                            None => return self.fail(req, stat_sn, reg),
                        }
                    }
                };
                Some(LoginDone::Success(Box::new(LoginResult {
                    kind,
                    target,
                    target_name: entry
                        .as_ref()
                        .map(|e| e.cfg.name.clone())
                        .unwrap_or_default(),
                    entry,
                    view_gen,
                    initiator_name: r.initiator_name,
                    isid: r.isid,
                    params: r.params,
                    exp_cmd_sn: req.cmd_sn,
                })))
            }
        };
        let resp = step.response;
        let sns = TargetSns {
            stat_sn: *stat_sn,
            exp_cmd_sn: req.cmd_sn,
            max_cmd_sn: req.cmd_sn.wrapping_add(self.window - 1),
        };
        // RFC 7143 section 11.13.4: every Login Response advances StatSN.
        *stat_sn = stat_sn.wrapping_add(1);
        let bhs = TargetPdu::LoginResponse {
            transit: resp.transit,
            cont: resp.cont,
            csg: resp.csg,
            nsg: resp.nsg,
            version_max: resp.version_max,
            version_active: resp.version_active,
            isid: req.isid,
            tsih,
            itt: req.itt,
            status_class: resp.status_class,
            status_detail: resp.status_detail,
            sns,
            data_len: resp.data.len() as u32,
        }
        .encode_bhs();
        let mut bytes = Vec::with_capacity(48 + resp.data.len() + 4);
        pdu::write_pdu(&mut bytes, &bhs, &resp.data, Digests::default());
        LoginStepOut { bytes, done }
    }

    fn fail(&self, req: &pdu::LoginRequest, stat_sn: &mut u32, reg: &Registry) -> LoginStepOut {
        if let Some(m) = reg.metrics.get() {
            m.login_failed(crate::metrics::LoginFailure::Other);
        }
        let sns = TargetSns {
            stat_sn: *stat_sn,
            exp_cmd_sn: req.cmd_sn,
            max_cmd_sn: req.cmd_sn,
        };
        *stat_sn = stat_sn.wrapping_add(1);
        let bhs = TargetPdu::LoginResponse {
            transit: false,
            cont: false,
            csg: req.csg,
            nsg: req.csg,
            version_max: 0,
            version_active: 0,
            isid: req.isid,
            tsih: 0,
            itt: req.itt,
            status_class: 0x03,
            status_detail: 0x00,
            sns,
            data_len: 0,
        }
        .encode_bhs();
        let mut bytes = Vec::new();
        pdu::write_pdu(&mut bytes, &bhs, &[], Digests::default());
        LoginStepOut {
            bytes,
            done: Some(LoginDone::Failed),
        }
    }
}

/// The address SendTargets names: the listen address, unless it is a wildcard (0.0.0.0,
/// [::]), which no initiator can connect to; then the address this connection reached us
/// on (an IPv4 address seen through an IPv6 socket as itself, without a scope id).
pub fn advertised_portal(listen: SocketAddr, local: Option<SocketAddr>) -> SocketAddr {
    if !listen.ip().is_unspecified() {
        return listen;
    }
    let Some(local) = local else { return listen };
    let ip = match local.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    SocketAddr::new(ip, listen.port())
}

/// Answers a full-feature Text request (SendTargets and text negotiation). `None` means the
/// request was malformed and deserves a Reject.
#[allow(clippy::too_many_arguments)]
pub fn text_reply(
    reg: &Registry,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    initiator: &str,
    kind: SessionKind,
    params: &mut SessionParams,
    session_target: Option<&str>,
    data: &[u8],
) -> Option<Vec<u8>> {
    let addr = target_address(advertised_portal(reg.portal, local), PORTAL_GROUP_TAG);
    // Only targets this initiator may log in to: the others would fail its login.
    let visible: Vec<DiscoveryTarget> = reg
        .visible_to(peer.ip())
        .into_iter()
        .filter(|t| {
            t.cfg
                .allowed_initiators
                .as_ref()
                .is_none_or(|acl| acl.iter().any(|a| a.eq_ignore_ascii_case(initiator)))
        })
        .map(|t| DiscoveryTarget {
            name: t.cfg.name.clone(),
            addresses: vec![addr.clone()],
        })
        .collect();
    let st = match kind {
        SessionKind::Normal => SessionType::Normal,
        SessionKind::Discovery => SessionType::Discovery,
    };
    match answer_text_request(&limits(), st, params, session_target, &visible, data) {
        Ok(r) => Some(r.data),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "malformed text request");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::advertised_portal;
    use std::net::SocketAddr;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn send_targets_never_advertises_a_wildcard_address() {
        // A concrete listen address is advertised as configured.
        assert_eq!(
            advertised_portal(a("198.18.0.1:3260"), Some(a("198.18.0.1:3260"))),
            a("198.18.0.1:3260")
        );
        // 0.0.0.0 and [::] are not addresses an initiator can log in to: the address the
        // discovery connection came in on is.
        assert_eq!(
            advertised_portal(a("0.0.0.0:3260"), Some(a("198.18.0.7:3260"))),
            a("198.18.0.7:3260")
        );
        assert_eq!(
            advertised_portal(a("[::]:3260"), Some(a("[::ffff:198.18.0.7]:3260"))),
            a("198.18.0.7:3260")
        );
        assert_eq!(
            advertised_portal(a("[::]:3260"), Some(a("[2001:db8::5]:3260"))),
            a("[2001:db8::5]:3260")
        );
    }
}
