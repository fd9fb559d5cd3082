//! The `[failover]` section: heartbeat paths and timings, the witness or fence command that
//! guards a takeover, and the VIP (ARCHITECTURE.md section 5, docs/failover.md).

use std::net::{Ipv4Addr, SocketAddr};

use failover::controller::{Guard, Timings};
use serde::Deserialize;

/// Defaults chosen by measurement (docs/failover.md): a heartbeat every 100 ms, a peer
/// silent for 500 ms on every path is dead. The controller runs on its own thread at a
/// real-time priority, so busy core threads do not starve it into a false takeover.
pub const DEFAULT_TIMINGS: Timings = Timings {
    keepalive_ms: 100,
    deadtime_ms: 500,
    warntime_ms: 250,
    initdead_ms: 3000,
};
/// Most heartbeat paths.
pub const MAX_PATHS: usize = failover::controller::MAX_PATHS;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFailover {
    pair_id: String,
    vip: Option<String>,
    interface: Option<String>,
    keepalive_ms: Option<u64>,
    deadtime_ms: Option<u64>,
    warntime_ms: Option<u64>,
    initdead_ms: Option<u64>,
    auto_failback: Option<bool>,
    witness: Option<String>,
    fence_command: Option<String>,
    #[serde(default, rename = "path")]
    paths: Vec<RawPath>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPath {
    /// Our heartbeat endpoint on this path.
    listen: String,
    /// The peer's.
    peer: String,
}

/// One heartbeat path (the dedicated link, the client network).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatPath {
    pub listen: SocketAddr,
    pub peer: SocketAddr,
}

/// The floating address the primary holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipConfig {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub interface: String,
}

/// Automatic failover.
#[derive(Debug, Clone)]
pub struct FailoverConfig {
    /// Names the pair at the witness (the same on both nodes).
    pub pair_id: String,
    pub vip: Option<VipConfig>,
    pub timings: Timings,
    pub auto_failback: bool,
    pub paths: Vec<HeartbeatPath>,
    pub witness: Option<SocketAddr>,
    pub fence_command: Option<String>,
}

impl FailoverConfig {
    /// What guards a takeover of a silent peer.
    pub fn guard(&self) -> Guard {
        match (&self.witness, &self.fence_command) {
            (Some(_), _) => Guard::Witness,
            (None, Some(_)) => Guard::Fence,
            (None, None) => Guard::Manual,
        }
    }
}

pub(super) fn parse(
    raw: RawFailover,
    bad: &dyn Fn(&str, String) -> super::ConfigError,
) -> Result<FailoverConfig, super::ConfigError> {
    if raw.pair_id.is_empty() || raw.pair_id.len() > failover::wire::MAX_PAIR_ID_LEN {
        return Err(bad(
            "failover.pair_id",
            format!("must be 1..={} bytes", failover::wire::MAX_PAIR_ID_LEN),
        ));
    }
    let addr = |k: &str, v: &str| {
        v.parse::<SocketAddr>()
            .map_err(|_| bad(k, format!("`{v}` is not an ADDRESS:PORT")))
    };
    let vip = match (raw.vip, raw.interface) {
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            return Err(bad(
                "failover.vip",
                "`vip` and `interface` go together (the address and the interface it goes on)"
                    .into(),
            ))
        }
        (Some(v), Some(interface)) => {
            let (a, p) = v
                .split_once('/')
                .ok_or_else(|| bad("failover.vip", format!("`{v}` is not ADDRESS/PREFIX")))?;
            let addr: Ipv4Addr = a
                .parse()
                .map_err(|_| bad("failover.vip", format!("`{a}` is not an IPv4 address")))?;
            let prefix_len: u8 = p
                .parse()
                .ok()
                .filter(|p| (1..=32).contains(p))
                .ok_or_else(|| bad("failover.vip", format!("prefix `{p}` is not 1..=32")))?;
            if interface.is_empty() || interface.len() >= 16 {
                return Err(bad(
                    "failover.interface",
                    "must be an interface name (1..=15 bytes)".into(),
                ));
            }
            Some(VipConfig {
                addr,
                prefix_len,
                interface,
            })
        }
    };
    let timings = Timings {
        keepalive_ms: raw.keepalive_ms.unwrap_or(DEFAULT_TIMINGS.keepalive_ms),
        deadtime_ms: raw.deadtime_ms.unwrap_or(DEFAULT_TIMINGS.deadtime_ms),
        warntime_ms: raw.warntime_ms.unwrap_or(DEFAULT_TIMINGS.warntime_ms),
        initdead_ms: raw.initdead_ms.unwrap_or(DEFAULT_TIMINGS.initdead_ms),
    };
    timings.check().map_err(|m| bad("failover", m))?;
    if timings.deadtime_ms > 60_000 {
        return Err(bad(
            "failover.deadtime_ms",
            "above 60000: ESXi gives up on a datastore long before".into(),
        ));
    }
    if raw.paths.is_empty() || raw.paths.len() > MAX_PATHS {
        return Err(bad(
            "failover.path",
            format!("1..={MAX_PATHS} heartbeat paths (the dedicated link and the client network)"),
        ));
    }
    let mut paths = Vec::new();
    for (i, p) in raw.paths.into_iter().enumerate() {
        paths.push(HeartbeatPath {
            listen: addr(&format!("failover.path[{i}].listen"), &p.listen)?,
            peer: addr(&format!("failover.path[{i}].peer"), &p.peer)?,
        });
    }
    let witness = match raw.witness {
        None => None,
        Some(w) => Some(addr("failover.witness", &w)?),
    };
    if raw
        .fence_command
        .as_ref()
        .is_some_and(|c| c.trim().is_empty())
    {
        return Err(bad("failover.fence_command", "is empty".into()));
    }
    Ok(FailoverConfig {
        pair_id: raw.pair_id,
        vip,
        timings,
        auto_failback: raw.auto_failback.unwrap_or(false),
        paths,
        witness,
        fence_command: raw.fence_command,
    })
}
