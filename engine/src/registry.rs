//! What this node serves: targets, their LUNs and access rules, built at start-up from the
//! validated configuration and changed online by `twinsan reload` (reload.rs).
//!
//! Why this shape: commands must not pay a lock for reloads. LUNs live in fixed slots
//! (filled once, never reused), so a command reads its LUN by index with one atomic load;
//! the login view (targets, ACLs, CHAP) is an `Arc` swapped whole, which logins read under
//! a read lock and sessions re-take only when the generation counter moved.

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

/// Name and LUNs only: the entry holds CHAP secrets, which no log may show.
impl std::fmt::Debug for TargetEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetEntry")
            .field("name", &self.cfg.name)
            .field("luns", &self.luns)
            .finish_non_exhaustive()
    }
}

impl TargetEntry {
    /// The global LUN index for a LUN id, if this target has it.
    pub fn lun(&self, id: u64) -> Option<usize> {
        self.luns.iter().find(|(l, _)| *l == id).map(|&(_, i)| i)
    }
}

/// LUN slots per node, a hard limit over the daemon's lifetime: a slot is never reused
/// (a command, a session or a core's fixed-file table may still name a removed LUN's
/// index), so adds beyond it need a restart. Every core registers a sparse io_uring file
/// table of this size at start.
pub const MAX_LUNS: usize = 1024;
/// Target indexes over the daemon's lifetime (sessions are keyed by them; never reused).
pub const MAX_TARGET_SLOTS: usize = 1024;

/// The LUNs, by stable index. Slots fill once and are never emptied: a command holds a
/// plain index and reads the LUN with one atomic load (`OnceLock::get`), no lock.
pub struct LunTable {
    slots: Box<[std::sync::OnceLock<Arc<Lun>>]>,
    /// Slots filled so far (published with Release after the slot).
    len: std::sync::atomic::AtomicUsize,
}

impl LunTable {
    fn new() -> Self {
        LunTable {
            slots: (0..MAX_LUNS).map(|_| std::sync::OnceLock::new()).collect(),
            len: Default::default(),
        }
    }

    /// Slots filled so far, removed LUNs included.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, index: usize) -> Option<&Arc<Lun>> {
        self.slots.get(index)?.get()
    }

    /// Every filled slot, removed LUNs included, in index order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Lun>> {
        (0..self.len()).filter_map(|i| self.get(i))
    }

    /// Fills the next slot. Only one thread adds (start-up, then the reload lock).
    fn push(&self, lun: Arc<Lun>) -> Result<usize, Arc<Lun>> {
        let i = self.len();
        let Some(slot) = self.slots.get(i) else {
            return Err(lun);
        };
        slot.set(lun)?;
        self.len.store(i + 1, Ordering::Release);
        Ok(i)
    }
}

impl std::ops::Index<usize> for LunTable {
    type Output = Arc<Lun>;
    /// Indexes come from published target entries only, so the slot is filled.
    fn index(&self, index: usize) -> &Arc<Lun> {
        match self.get(index) {
            Some(l) => l,
            None => panic!("LUN slot {index} is empty"),
        }
    }
}

impl<'a> IntoIterator for &'a LunTable {
    type Item = &'a Arc<Lun>;
    type IntoIter = Box<dyn Iterator<Item = &'a Arc<Lun>> + 'a>;
    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

/// What logins, discovery and REPORT LUNS see: swapped whole by a reload. Sessions keep
/// the `Arc` of their target and look at [`Registry::view_gen`] (one atomic load) per
/// command to know when to take the new one.
pub struct View {
    /// The configuration last applied (reloadable parts: targets, LUNs, ACLs, CHAP).
    pub config: Config,
    /// By stable target index; `None` for a target a reload removed.
    pub targets: Vec<Option<Arc<TargetEntry>>>,
    /// The login view of the targets (names, CHAP, initiator ACLs, negotiation limits).
    pub login: proto::login::LoginConfig,
}

impl View {
    /// The live targets with their stable indexes.
    pub fn live(&self) -> impl Iterator<Item = (usize, &Arc<TargetEntry>)> {
        self.targets
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.as_ref().map(|t| (i, t)))
    }

    pub fn target(&self, name: &str) -> Option<(usize, &Arc<TargetEntry>)> {
        self.live()
            .find(|(_, t)| t.cfg.name.eq_ignore_ascii_case(name))
    }
}

/// A live session's entry: its id, the flag that tells its core to close it, and the
/// address it came from (for address ACLs changed by a reload).
pub struct LiveSession {
    pub id: u64,
    pub kill: Arc<std::sync::atomic::AtomicBool>,
    pub peer: IpAddr,
}

pub struct Registry {
    /// The configuration at start: what cannot change online (listen, peer, failover,
    /// timings) is read from here; the reloadable parts live in [`Registry::view`].
    pub config: Config,
    /// Every LUN slot; cores install one fd per filled slot in their fixed-file table.
    pub luns: LunTable,
    view: std::sync::RwLock<Arc<View>>,
    /// Bumped after every view swap.
    view_gen: AtomicU64,
    /// Bumped when a LUN slot was filled or a LUN removed: cores then open or close fds.
    pub files_gen: AtomicU64,
    /// Per core, the `files_gen` whose fds it has installed (set once at start).
    pub files_acks: std::sync::OnceLock<Box<[AtomicU64]>>,
    /// One reload at a time (admin socket and SIGHUP may race).
    pub(crate) reload_lock: std::sync::Mutex<()>,
    /// The command-line overrides the daemon started with: a reload reads the file with them.
    pub overrides: crate::config::Overrides,
    /// The address initiators reach us on, for SendTargets answers.
    pub portal: SocketAddr,
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
    /// the same key reinstates (RFC 7143 section 6.3.5), and the one a reload ends when its
    /// initiator is now refused.
    pub(crate) live_sessions: std::sync::Mutex<std::collections::HashMap<SessionKey, LiveSession>>,
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
        peer: IpAddr,
    ) -> Option<u64> {
        let mut m = self.live_sessions.lock().unwrap_or_else(|p| p.into_inner());
        let old = m.insert(key, LiveSession { id, kill, peer });
        old.map(|old| {
            old.kill.store(true, Ordering::Release);
            old.id
        })
    }

    /// Forgets session `id` under `key` (unless a newer session has taken the key).
    pub fn session_ended(&self, key: &SessionKey, id: u64) {
        let mut m = self.live_sessions.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(key).is_some_and(|live| live.id == id) {
            m.remove(key);
        }
    }

    /// Fills the next LUN slot with a new LUN and tells the cores to install its fd (they
    /// do on their next tick; reload.rs waits for their acks before publishing it).
    pub(crate) fn add_lun(&self, lun: Arc<Lun>) -> Result<usize, LunError> {
        let index = self
            .luns
            .push(lun)
            .map_err(|_| LunError::TooMany { max: MAX_LUNS })?;
        self.files_gen.fetch_add(1, Ordering::AcqRel);
        Ok(index)
    }

    /// Live normal sessions on target index `target`.
    pub fn sessions_on(&self, target: usize) -> usize {
        let m = self.live_sessions.lock().unwrap_or_else(|p| p.into_inner());
        m.keys().filter(|k| k.2 == target).count()
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
    pub fn build(
        config: Config,
        portal: SocketAddr,
        overrides: crate::config::Overrides,
    ) -> Result<Self, LunError> {
        let luns = LunTable::new();
        let mut targets = Vec::new();
        for t in &config.targets {
            let mut ids = Vec::new();
            for l in &t.luns {
                let lun = Arc::new(Lun::create_or_open(&t.name, l)?);
                let index = luns
                    .push(lun)
                    .map_err(|_| LunError::TooMany { max: MAX_LUNS })?;
                ids.push((l.id, index));
            }
            ids.sort_unstable();
            targets.push(Some(Arc::new(TargetEntry {
                cfg: t.clone(),
                luns: ids,
            })));
        }
        let view = View {
            login: crate::iscsi::login::login_config(&config),
            config: config.clone(),
            targets,
        };
        // With a witness, every node starts as secondary: the witness's records and the
        // heartbeats decide who serves (the configured role is the preferred one). A node
        // that restarts while its peer serves with newer data must not even try.
        let config_role = match config.failover.as_ref().map(|f| f.guard()) {
            Some(failover::controller::Guard::Witness) => crate::config::Role::Secondary,
            _ => config.role,
        };
        Ok(Registry {
            config,
            luns,
            view: std::sync::RwLock::new(Arc::new(view)),
            view_gen: AtomicU64::new(0),
            files_gen: AtomicU64::new(0),
            files_acks: std::sync::OnceLock::new(),
            reload_lock: std::sync::Mutex::new(()),
            overrides,
            portal,
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

    /// The current view (a read lock for the clone of an `Arc`: logins, discovery, status
    /// and reloads take it, never a command).
    pub fn view(&self) -> Arc<View> {
        Arc::clone(&self.view.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Changes with every view swap: one atomic load per command tells a session whether
    /// its target entry is current.
    pub fn view_gen(&self) -> u64 {
        self.view_gen.load(Ordering::Acquire)
    }

    /// Installs a new view (the reload lock is held).
    pub(crate) fn swap_view(&self, view: View) {
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(view);
        self.view_gen.fetch_add(1, Ordering::AcqRel);
    }

    pub fn target(&self, name: &str) -> Option<(usize, Arc<TargetEntry>)> {
        self.view().target(name).map(|(i, t)| (i, Arc::clone(t)))
    }

    /// Targets a connection from `peer` may discover and log in to.
    pub fn visible_to(&self, peer: IpAddr) -> Vec<Arc<TargetEntry>> {
        self.view()
            .live()
            .filter(|(_, t)| t.cfg.address_allowed(peer))
            .map(|(_, t)| Arc::clone(t))
            .collect()
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
