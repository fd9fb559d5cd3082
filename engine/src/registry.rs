//! What this node serves: targets, their LUNs and access rules, built once at start-up from
//! the validated configuration and shared read-only by every core thread.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::{Config, TargetConfig};
use crate::lun::{Lun, LunError};

pub struct TargetEntry {
    pub cfg: TargetConfig,
    /// (LUN id, index into [`Registry::luns`]), sorted by LUN id.
    pub luns: Vec<(u64, usize)>,
}

impl TargetEntry {
    /// The global LUN index for a LUN id, if this target has it.
    pub fn lun(&self, id: u64) -> Option<usize> {
        self.luns.iter().find(|(l, _)| *l == id).map(|&(_, i)| i)
    }
}

pub struct Registry {
    pub config: Config,
    pub targets: Vec<TargetEntry>,
    /// Every LUN of every target; cores open and register one fd per entry, in this order.
    pub luns: Vec<Arc<Lun>>,
    /// The address initiators reach us on, for SendTargets answers.
    pub portal: SocketAddr,
    /// The login view of the targets (names, CHAP, initiator ACLs, negotiation limits).
    pub login: proto::login::LoginConfig,
    next_tsih: AtomicU16,
    next_session_id: AtomicU64,
    /// Current role: 0 primary, 1 secondary (changed by `twinsan promote` / `demote`).
    role: std::sync::atomic::AtomicU8,
    /// The replica link, when a peer is configured (set once at start).
    pub replication: std::sync::OnceLock<Arc<crate::replication::Replication>>,
    /// The failover driver, when `[failover]` is configured.
    pub failover: std::sync::OnceLock<crate::failover::FailoverHandle>,
    /// The per-core command counters (set once at start, before the cores run).
    pub metrics: std::sync::OnceLock<Arc<crate::metrics::Metrics>>,
    /// Sessions in full feature phase, for status.
    pub sessions: std::sync::atomic::AtomicUsize,
    /// Normal sessions by (initiator name, ISID, target index): the one a new login with
    /// the same key reinstates (RFC 7143 section 6.3.5), with its session id and the flag
    /// that tells its core to close it.
    live_sessions: std::sync::Mutex<
        std::collections::HashMap<SessionKey, (u64, Arc<std::sync::atomic::AtomicBool>)>,
    >,
    /// Held EXTENDED COPY outcomes per (session, list id), newest last, bounded.
    copy_results:
        std::sync::Mutex<std::collections::VecDeque<(u64, u8, proto::scsi::xcopy::CopyResult)>>,
}

/// What identifies a session for reinstatement: initiator name (lowercase), ISID, target.
pub type SessionKey = (String, [u8; 6], usize);

impl Registry {
    /// Records session `id` under `key`; returns the kill flag of the session it
    /// reinstates (already set), if one was live.
    pub fn session_started(
        &self,
        key: SessionKey,
        id: u64,
        kill: Arc<std::sync::atomic::AtomicBool>,
    ) -> Option<u64> {
        let mut m = self.live_sessions.lock().unwrap_or_else(|p| p.into_inner());
        let old = m.insert(key, (id, kill));
        old.map(|(old_id, flag)| {
            flag.store(true, Ordering::Release);
            old_id
        })
    }

    /// Whether any normal session is logged in to target `target` (its index).
    pub fn target_has_sessions(&self, target: usize) -> bool {
        let m = self.live_sessions.lock().unwrap_or_else(|p| p.into_inner());
        m.keys().any(|(_, _, t)| *t == target)
    }

    /// Forgets session `id` under `key` (unless a newer session has taken the key).
    pub fn session_ended(&self, key: &SessionKey, id: u64) {
        let mut m = self.live_sessions.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(key).is_some_and(|(live, _)| *live == id) {
            m.remove(key);
        }
    }
}

/// Copy results kept for RECEIVE COPY RESULTS; older ones are forgotten (SPC-4 allows a
/// copy manager to discard held data).
const MAX_HELD_COPY_RESULTS: usize = 256;

fn role_code(r: crate::config::Role) -> u8 {
    match r {
        crate::config::Role::Primary => 0,
        crate::config::Role::Secondary => 1,
    }
}

impl Registry {
    /// Creates or opens every backing file. Fails (and the daemon does not start) on the
    /// first LUN that cannot be served.
    pub fn build(config: Config, portal: SocketAddr) -> Result<Self, LunError> {
        let mut luns = Vec::new();
        let mut targets = Vec::new();
        for t in &config.targets {
            let mut ids = Vec::new();
            for l in &t.luns {
                ids.push((l.id, luns.len()));
                luns.push(Arc::new(Lun::create_or_open(&t.name, l)?));
            }
            ids.sort_unstable();
            targets.push(TargetEntry {
                cfg: t.clone(),
                luns: ids,
            });
        }
        let login = crate::iscsi::login::login_config(&config);
        // With a witness, every node starts as secondary: the witness's records and the
        // heartbeats decide who serves (the configured role is the preferred one). A node
        // that restarts while its peer serves with newer data must not even try.
        let config_role = match config.failover.as_ref().map(|f| f.guard()) {
            Some(failover::controller::Guard::Witness) => crate::config::Role::Secondary,
            _ => config.role,
        };
        Ok(Registry {
            config,
            targets,
            luns,
            portal,
            login,
            next_tsih: AtomicU16::new(1),
            next_session_id: AtomicU64::new(1),
            copy_results: Default::default(),
            role: std::sync::atomic::AtomicU8::new(role_code(config_role)),
            metrics: Default::default(),
            sessions: Default::default(),
            live_sessions: Default::default(),
            replication: std::sync::OnceLock::new(),
            failover: std::sync::OnceLock::new(),
        })
    }

    pub fn target(&self, name: &str) -> Option<(usize, &TargetEntry)> {
        self.targets
            .iter()
            .enumerate()
            .find(|(_, t)| t.cfg.name.eq_ignore_ascii_case(name))
    }

    /// Targets a connection from `peer` may discover and log in to.
    pub fn visible_to(&self, peer: IpAddr) -> impl Iterator<Item = &TargetEntry> {
        self.targets
            .iter()
            .filter(move |t| t.cfg.address_allowed(peer))
    }

    /// A new non-zero TSIH (RFC 7143 section 11.12.6: zero is reserved).
    pub fn new_tsih(&self) -> u16 {
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }

    pub fn role(&self) -> crate::config::Role {
        match self.role.load(Ordering::Acquire) {
            0 => crate::config::Role::Primary,
            _ => crate::config::Role::Secondary,
        }
    }

    /// Changes the role; returns the previous one. The one call a failover controller makes.
    pub fn set_role(&self, role: crate::config::Role) -> crate::config::Role {
        let prev = self.role.swap(role_code(role), Ordering::AcqRel);
        if prev != role_code(role) {
            tracing::warn!(?role, "role changed");
            if let Some(rep) = self.replication.get() {
                rep.note_role(role == crate::config::Role::Primary);
            }
        }
        match prev {
            0 => crate::config::Role::Primary,
            _ => crate::config::Role::Secondary,
        }
    }

    /// Holds the result of a copy for COPY STATUS.
    pub fn hold_copy_result(&self, session: u64, list_id: u8, r: proto::scsi::xcopy::CopyResult) {
        let mut q = self.copy_results.lock().unwrap_or_else(|p| p.into_inner());
        q.retain(|&(s, l, _)| !(s == session && l == list_id));
        if q.len() == MAX_HELD_COPY_RESULTS {
            q.pop_front();
        }
        q.push_back((session, list_id, r));
    }

    pub fn copy_result(&self, session: u64, list_id: u8) -> Option<proto::scsi::xcopy::CopyResult> {
        let q = self.copy_results.lock().unwrap_or_else(|p| p.into_inner());
        q.iter()
            .rev()
            .find(|&&(s, l, _)| s == session && l == list_id)
            .map(|&(_, _, r)| r)
    }

    /// A node-unique session id (unit attentions are keyed by it; 0 is reserved).
    pub fn new_session_id(&self) -> u64 {
        self.next_session_id.fetch_add(1, Ordering::Relaxed)
    }
}
