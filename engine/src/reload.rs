//! Online reconfiguration: `twinsan reload` (and SIGHUP) read the config file again and
//! apply the difference without touching unaffected sessions.
//!
//! The whole file is validated first (config.rs, errors name file, key and value); then
//! the difference is planned ([`diff`], pure, unit-tested): what cannot change online is
//! refused naming its key, before anything changes. Applying ([`reload`]) creates new LUNs'
//! files, fills their slots and waits until every core has an fd for them, grows LUNs
//! (CAPACITY DATA HAS CHANGED), swaps the login view, marks removed LUNs, and ends the
//! sessions of initiators the new ACLs or CHAP refuse.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::config::{Config, ConfigError, LunConfig, TargetConfig};
use crate::lun::{Lun, LunError};
use crate::registry::{Registry, TargetEntry, View, MAX_TARGET_SLOTS};

/// How long a reload waits for every core to install a new LUN's fd: cores look on their
/// 250 ms tick, so this is many ticks.
const INSTALL_WAIT_MS: u64 = 5_000;

#[derive(Debug, Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("the daemon runs the embedded default configuration (no --config): nothing to reload")]
    NoFile,
    #[error("{file}: key `{key}` cannot change while the daemon runs ({why}): restart the daemon to change it")]
    Immutable {
        file: String,
        key: String,
        why: &'static str,
    },
    #[error("{file}: key `{key}`: {new} bytes is smaller than the LUN's {old} bytes: shrinking a LUN is refused (data would be lost)")]
    Shrink {
        file: String,
        key: String,
        old: u64,
        new: u64,
    },
    #[error("{file}: key `{key}`: on a pair, {what}")]
    Pair {
        file: String,
        key: String,
        what: String,
    },
    #[error("LUN {lun} of target {target} has {sessions} session(s): not removed (use --force to remove it anyway; their commands to it then fail)")]
    InUse {
        target: String,
        lun: u64,
        sessions: usize,
    },
    #[error("more than {max} targets over the daemon's lifetime: restart the daemon")]
    TooManyTargets { max: usize },
    #[error(transparent)]
    Lun(#[from] LunError),
    /// A LUN's replication record (on a pair) could not be read, written or grown.
    #[error("replication record: {0}")]
    Replica(#[from] std::io::Error),
    /// A step after new LUN slots were filled failed: what came before it stays applied.
    #[error("applied in part (new LUNs' slots were filled or LUNs grown before this; the targets and ACLs were not changed): {0}")]
    Partial(Box<ReloadError>),
    #[error("core threads did not install the new LUNs' files within {ms} ms: the new LUNs are not served (see the log)")]
    Install { ms: u64 },
}

/// What a reload changes, by target name and LUN id.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub targets_added: Vec<String>,
    pub targets_removed: Vec<String>,
    /// Targets whose initiator ACL, address ACL or CHAP changed (their sessions are checked).
    pub access_changed: Vec<String>,
    /// Targets whose alias changed (shown to new logins only).
    pub alias_changed: Vec<String>,
    pub luns_added: Vec<(String, u64)>,
    pub luns_removed: Vec<(String, u64)>,
    /// (target, LUN id, old bytes, new bytes).
    pub luns_grown: Vec<(String, u64, u64, u64)>,
    pub discovery_chap_changed: bool,
    /// `[[snapshot_schedule]]` changed (the schedule thread reads the new view).
    pub schedules_changed: bool,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        *self == Diff::default()
    }

    /// One line for the CLI and the log.
    pub fn summary(&self) -> String {
        if self.is_empty() {
            return "no change".into();
        }
        let mut parts = Vec::new();
        let names = |v: &[String]| v.join(", ");
        let luns = |v: &[(String, u64)]| {
            v.iter()
                .map(|(t, l)| format!("{t}/{l}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !self.targets_added.is_empty() {
            parts.push(format!("targets added: {}", names(&self.targets_added)));
        }
        if !self.targets_removed.is_empty() {
            parts.push(format!("targets removed: {}", names(&self.targets_removed)));
        }
        if !self.luns_added.is_empty() {
            parts.push(format!("LUNs added: {}", luns(&self.luns_added)));
        }
        if !self.luns_removed.is_empty() {
            parts.push(format!("LUNs removed: {}", luns(&self.luns_removed)));
        }
        for (t, l, old, new) in &self.luns_grown {
            parts.push(format!("LUN {t}/{l} grown from {old} to {new} bytes"));
        }
        if !self.access_changed.is_empty() {
            parts.push(format!("access changed: {}", names(&self.access_changed)));
        }
        if !self.alias_changed.is_empty() {
            parts.push(format!("alias changed: {}", names(&self.alias_changed)));
        }
        if self.discovery_chap_changed {
            parts.push("discovery CHAP changed".into());
        }
        if self.schedules_changed {
            parts.push("snapshot schedules changed".into());
        }
        parts.join("; ")
    }
}

fn find<'a>(targets: &'a [TargetConfig], name: &str) -> Option<(usize, &'a TargetConfig)> {
    targets
        .iter()
        .enumerate()
        .find(|(_, t)| t.name.eq_ignore_ascii_case(name))
}

/// The settings that cannot change online, with the key that names them and why.
fn immutable(old: &Config, new: &Config) -> Option<(&'static str, &'static str)> {
    let dbg =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let checks = [
        (
            old.listen != new.listen,
            "server.listen",
            "the listeners are bound at start",
        ),
        (
            old.data_dir != new.data_dir,
            "server.data_dir",
            "LUN paths were resolved against it",
        ),
        (
            old.cores != new.cores,
            "server.cores",
            "core threads start once",
        ),
        (
            old.nop_interval_ms != new.nop_interval_ms,
            "server.nop_interval_ms",
            "running sessions keep their timers",
        ),
        (
            old.nop_timeout_ms != new.nop_timeout_ms,
            "server.nop_timeout_ms",
            "running sessions keep their timers",
        ),
        (
            old.login_timeout_ms != new.login_timeout_ms,
            "server.login_timeout_ms",
            "read at start",
        ),
        (
            old.queue_depth != new.queue_depth,
            "server.queue_depth",
            "running sessions negotiated their window",
        ),
        (
            old.role != new.role,
            "server.role",
            "the role changes with `twinsan promote` / `demote`",
        ),
        (
            old.spill_writes != new.spill_writes,
            "server.spill_writes",
            "the helpers start with the cores",
        ),
        (
            old.admin_socket != new.admin_socket,
            "server.admin_socket",
            "the socket is bound at start",
        ),
        (
            old.metrics_listen != new.metrics_listen,
            "server.metrics_listen",
            "the endpoint is bound at start",
        ),
        (
            dbg(&old.peer, &new.peer),
            "peer",
            "the replica link is set up at start",
        ),
        (
            dbg(&old.failover, &new.failover),
            "failover",
            "the failover driver starts once",
        ),
        (
            old.snapshot_receive != new.snapshot_receive,
            "snapshot_receive",
            "its listener is bound at start",
        ),
    ];
    first_change(checks)
}

/// A LUN setting that cannot change online, with its key's last part.
fn lun_immutable(old: &LunConfig, new: &LunConfig) -> Option<(&'static str, &'static str)> {
    let checks = [
        (old.path != new.path, "path", "the backing file is open"),
        (
            old.block_size != new.block_size,
            "block_size",
            "initiators address blocks of the old size",
        ),
        (
            old.physical_block_size != new.physical_block_size,
            "physical_block_size",
            "initiators aligned to it",
        ),
        (
            old.read_only != new.read_only,
            "read_only",
            "the cores' fds are open with the old mode",
        ),
        (
            old.cache != new.cache,
            "cache",
            "the cores' fds are open with the old mode",
        ),
        (old.thin != new.thin, "thin", "read at start"),
        (
            old.serial != new.serial,
            "serial",
            "initiators identify the LUN by it",
        ),
    ];
    first_change(checks)
}

/// The key and reason of the first check that found a change.
fn first_change<const N: usize>(
    checks: [(bool, &'static str, &'static str); N],
) -> Option<(&'static str, &'static str)> {
    checks
        .into_iter()
        .find(|(changed, _, _)| *changed)
        .map(|(_, k, w)| (k, w))
}

/// Plans a reload from `old` (applied) to `new` (validated). `live_size` gives a served
/// LUN's current size (a LUN sized by its file has `size_bytes = 0` in the config).
/// Refuses, before anything changes, what cannot be done online.
pub fn diff(
    old: &Config,
    new: &Config,
    live_size: &dyn Fn(&str, u64) -> Option<u64>,
) -> Result<Diff, ReloadError> {
    let file = new.source_name();
    if let Some((key, why)) = immutable(old, new) {
        return Err(ReloadError::Immutable {
            file,
            key: key.into(),
            why,
        });
    }
    let mut d = Diff {
        discovery_chap_changed: old.discovery_chap != new.discovery_chap,
        schedules_changed: old.snapshot_schedules != new.snapshot_schedules,
        ..Diff::default()
    };
    for t in &old.targets {
        if find(&new.targets, &t.name).is_none() {
            d.targets_removed.push(t.name.clone());
            d.luns_removed
                .extend(t.luns.iter().map(|l| (t.name.clone(), l.id)));
        }
    }
    for (ti, t) in new.targets.iter().enumerate() {
        let tk = format!("target[{ti}]");
        let Some((_, o)) = find(&old.targets, &t.name) else {
            d.targets_added.push(t.name.clone());
            d.luns_added
                .extend(t.luns.iter().map(|l| (t.name.clone(), l.id)));
            continue;
        };
        if o.allowed_initiators != t.allowed_initiators
            || o.allowed_addresses != t.allowed_addresses
            || o.chap != t.chap
        {
            d.access_changed.push(t.name.clone());
        }
        if o.alias != t.alias {
            d.alias_changed.push(t.name.clone());
        }
        for ol in &o.luns {
            if !t.luns.iter().any(|l| l.id == ol.id) {
                d.luns_removed.push((t.name.clone(), ol.id));
            }
        }
        for (li, l) in t.luns.iter().enumerate() {
            let lk = format!("{tk}.lun[{li}]");
            let Some(ol) = o.luns.iter().find(|x| x.id == l.id) else {
                d.luns_added.push((t.name.clone(), l.id));
                continue;
            };
            if let Some((k, why)) = lun_immutable(ol, l) {
                return Err(ReloadError::Immutable {
                    file,
                    key: format!("{lk}.{k}"),
                    why,
                });
            }
            let live = live_size(&t.name, l.id).unwrap_or(ol.size_bytes);
            if l.size_bytes != 0 && l.size_bytes < live {
                return Err(ReloadError::Shrink {
                    file,
                    key: format!("{lk}.size"),
                    old: live,
                    new: l.size_bytes,
                });
            }
            if l.size_bytes > live {
                d.luns_grown
                    .push((t.name.clone(), l.id, live, l.size_bytes));
            }
        }
    }
    Ok(d)
}

/// Rereads the daemon's config file and applies it. `force`: remove LUNs that have
/// sessions. Returns what changed.
pub fn reload(reg: &Registry, force: bool) -> Result<Diff, ReloadError> {
    let _one = reg.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
    let Some(path) = reg.config.source.clone() else {
        return Err(ReloadError::NoFile);
    };
    let new = Config::load(&path, &reg.overrides)?;
    let view = reg.view();
    let live_size = |t: &str, id: u64| {
        let (_, e) = view.target(t)?;
        e.lun(id).map(|i| reg.luns[i].size_bytes())
    };
    let d = diff(&view.config, &new, &live_size)?;
    if d.is_empty() {
        return Ok(d);
    }
    if !force {
        for (t, l) in &d.luns_removed {
            let sessions = view.target(t).map_or(0, |(i, _)| reg.sessions_on(i));
            if sessions > 0 {
                return Err(ReloadError::InUse {
                    target: t.clone(),
                    lun: *l,
                    sessions,
                });
            }
        }
    }
    let stable_targets = view.targets.len() + d.targets_added.len();
    if stable_targets > MAX_TARGET_SLOTS {
        return Err(ReloadError::TooManyTargets {
            max: MAX_TARGET_SLOTS,
        });
    }
    // Every fallible step on new LUNs before anything is visible: a failure here drops
    // them (their files' locks with them) and changes nothing.
    let mut created = Vec::new();
    for (t, id) in &d.luns_added {
        let Some(cfg) =
            find(&new.targets, t).and_then(|(_, tc)| tc.luns.iter().find(|l| l.id == *id))
        else {
            continue;
        };
        let lun = Lun::create_or_open(t, cfg)?;
        drop(lun.open_fd()?);
        created.push((t.clone(), *id, Arc::new(lun)));
    }
    let rep = reg.replication.get();
    if let Some(rep) = rep {
        pair_may_change(reg, rep, &view, &new, &d, &created)?;
    }
    // Opened only now, with the pair's consent: opening writes the record and the
    // running marker.
    let mut records = Vec::new();
    for (_, _, lun) in &created {
        records.push(rep.map(|r| r.open_lun(lun)).transpose()?);
    }
    if created.len() + reg.luns.len() > crate::registry::MAX_LUNS {
        return Err(LunError::TooMany {
            max: crate::registry::MAX_LUNS,
        }
        .into());
    }
    let mut new_index = Vec::new();
    let partial = |e: ReloadError, changed: bool| match changed {
        false => e,
        true => ReloadError::Partial(Box::new(e)),
    };
    for ((t, id, lun), record) in created.into_iter().zip(records) {
        let index = reg
            .add_lun(lun)
            .map_err(|e| partial(e.into(), !new_index.is_empty()))?;
        new_index.push((t, id, index));
        if let (Some(rep), Some(record)) = (rep, record) {
            rep.install_lun(index, record)
                .map_err(|e| partial(ReloadError::Replica(e), true))?;
        }
    }
    let mut changed = !new_index.is_empty();
    if changed {
        wait_installed(reg).map_err(|e| partial(e, true))?;
    }
    for (t, id, _, new_bytes) in &d.luns_grown {
        if let Some(i) = view.target(t).and_then(|(_, e)| e.lun(*id)) {
            if let Some(rep) = rep {
                // The record first: no write may reach the new space before it covers it.
                rep.grow_lun(i, &reg.luns[i], *new_bytes)
                    .map_err(|e| partial(ReloadError::Replica(e), changed))?;
            }
            reg.luns[i]
                .grow(*new_bytes)
                .map_err(|e| partial(e.into(), changed))?;
            changed = true;
        }
    }
    let targets = new_targets(&view, &new, &new_index);
    let removed: Vec<usize> = d
        .luns_removed
        .iter()
        .filter_map(|(t, id)| view.target(t).and_then(|(_, e)| e.lun(*id)))
        .collect();
    reg.swap_view(View {
        login: crate::iscsi::login::login_config(&new),
        config: new,
        targets,
    });
    for &i in &removed {
        reg.luns[i].mark_removed();
        // Other sessions of the target see the inventory change (session.rs follow_reload).
    }
    if !removed.is_empty() {
        reg.files_gen.fetch_add(1, Ordering::AcqRel);
    }
    let ended = end_refused_sessions(reg, &view);
    tracing::info!(change = %d.summary(), sessions_ended = ended, "configuration reloaded");
    Ok(d)
}

/// On a pair: refuses what would make the two nodes differ (`replica::pair::reconfig`
/// decides from the peer's LUNs), naming the first LUN that must wait and why. A read-only
/// LUN (a snapshot export) is each node's own (its file is a snapshot clone, which a
/// resync would overwrite on the peer): added and removed without asking the peer.
fn pair_may_change(
    reg: &Registry,
    rep: &crate::replication::Replication,
    view: &View,
    new: &Config,
    d: &Diff,
    created: &[(String, u64, Arc<Lun>)],
) -> Result<(), ReloadError> {
    use replica::pair::reconfig::LunChange;
    let file = new.source_name();
    let refused = |cfg: &Config, t: &str, id: u64, what: String| ReloadError::Pair {
        file: file.clone(),
        key: lun_key(cfg, t, id),
        what,
    };
    let replicated: Vec<_> = created.iter().filter(|(_, _, l)| !l.read_only).collect();
    let mut metas = Vec::new();
    for (_, _, lun) in &replicated {
        metas.push(rep.lun_meta(lun)?);
    }
    // (target, LUN id, config it is in, verb) of each change, in the order of `changes`.
    let mut named: Vec<(&str, u64, &Config, &str)> = Vec::new();
    let mut changes = Vec::new();
    for ((t, id, _), m) in replicated.iter().zip(&metas) {
        named.push((t, *id, new, "added"));
        changes.push(LunChange::Add(m));
    }
    let index = |t: &str, id: u64| view.target(t).and_then(|(_, e)| e.lun(id));
    for (t, id, _, new_bytes) in &d.luns_grown {
        if let Some(i) = index(t, *id) {
            named.push((t, *id, new, "grown"));
            changes.push(LunChange::Grow {
                key: reg.luns[i].naa_id,
                size_bytes: *new_bytes,
            });
        }
    }
    for (t, id) in &d.luns_removed {
        if let Some(i) = index(t, *id).filter(|&i| !reg.luns[i].read_only) {
            named.push((t, *id, &view.config, "removed"));
            changes.push(LunChange::Remove {
                key: reg.luns[i].naa_id,
            });
        }
    }
    rep.may_change_luns(&changes).map_err(|(i, why)| {
        let (t, id, cfg, verb) = named[i];
        refused(cfg, t, id, format!("LUN {t}/{id} is not {verb} yet: {why}"))
    })
}

/// The config key of LUN `id` of target `t` in `cfg` (`target[0].lun[1]`).
fn lun_key(cfg: &Config, t: &str, id: u64) -> String {
    match find(&cfg.targets, t) {
        Some((ti, tc)) => match tc.luns.iter().position(|l| l.id == id) {
            Some(li) => format!("target[{ti}].lun[{li}]"),
            None => format!("target[{ti}].lun"),
        },
        None => "target".into(),
    }
}

/// The targets of the new view: stable indexes (kept by name, new ones appended, removed
/// ones left empty), LUN slots kept by (target, id), new LUNs at the slots just filled.
fn new_targets(
    view: &View,
    new: &Config,
    new_index: &[(String, u64, usize)],
) -> Vec<Option<Arc<TargetEntry>>> {
    let mut targets: Vec<Option<Arc<TargetEntry>>> = view.targets.iter().map(|_| None).collect();
    for t in &new.targets {
        let old = view.target(&t.name);
        let mut luns = Vec::new();
        for l in &t.luns {
            let index = old.and_then(|(_, e)| e.lun(l.id)).or_else(|| {
                new_index
                    .iter()
                    .find(|(nt, nid, _)| nt.eq_ignore_ascii_case(&t.name) && *nid == l.id)
                    .map(|&(_, _, i)| i)
            });
            if let Some(index) = index {
                luns.push((l.id, index));
            }
        }
        luns.sort_unstable();
        let entry = Some(Arc::new(TargetEntry {
            cfg: t.clone(),
            luns,
        }));
        match old {
            Some((i, _)) => targets[i] = entry,
            None => targets.push(entry),
        }
    }
    targets
}

/// Waits until every core installed the fds of the slots filled so far.
fn wait_installed(reg: &Registry) -> Result<(), ReloadError> {
    let gen = reg.files_gen.load(Ordering::Acquire);
    let started = Instant::now();
    let Some(acks) = reg.files_acks.get() else {
        return Ok(());
    };
    while acks.iter().any(|a| a.load(Ordering::Acquire) < gen) {
        if started.elapsed() >= Duration::from_millis(INSTALL_WAIT_MS) {
            return Err(ReloadError::Install {
                ms: INSTALL_WAIT_MS,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Whether a session of `initiator` from `peer`, admitted when its target's CHAP was
/// `chap_at_login`, is still admitted by `now`, its target's current entry: the target
/// exists, the initiator and address ACLs allow it, and the CHAP it authenticated with is
/// still the target's (with a new secret it must log in again).
pub fn still_admitted(
    now: Option<&TargetEntry>,
    chap_at_login: Option<&crate::config::ChapConfig>,
    initiator: &str,
    peer: std::net::IpAddr,
) -> bool {
    let Some(e) = now else { return false };
    let name_ok = e
        .cfg
        .allowed_initiators
        .as_ref()
        .is_none_or(|acl| acl.iter().any(|a| a.eq_ignore_ascii_case(initiator)));
    name_ok && e.cfg.address_allowed(peer) && e.cfg.chap.as_ref() == chap_at_login
}

/// Ends the sessions the current view no longer admits (`still_admitted`, against the
/// `old` view they were admitted under). Their I_T nexus is lost at once, as at a
/// reinstatement; their cores close them within a tick. Returns how many.
fn end_refused_sessions(reg: &Registry, old: &View) -> usize {
    let view = reg.view();
    let m = reg.live_sessions.lock().unwrap_or_else(|p| p.into_inner());
    let mut ended = 0;
    for ((initiator, isid, target), s) in m.iter() {
        let before = old.targets.get(*target).and_then(Option::as_deref);
        let now = view.targets.get(*target).and_then(Option::as_deref);
        let chap = before.and_then(|e| e.cfg.chap.as_ref());
        if still_admitted(now, chap, initiator, s.peer) || s.kill.swap(true, Ordering::AcqRel) {
            continue;
        }
        ended += 1;
        tracing::warn!(%initiator, target = before.or(now).map_or("?", |e| e.cfg.name.as_str()), "reload: ending a session the new configuration refuses");
        let nexus =
            proto::scsi::pr::Nexus::new(initiator, *isid, crate::iscsi::login::PORTAL_GROUP_TAG);
        for &(_, index) in before.or(now).map(|e| &e.luns[..]).unwrap_or(&[]) {
            let lun = &reg.luns[index];
            if lun.pr_in_use() {
                lun.with_pr(|st| proto::scsi::pr::nexus_lost(st, &nexus));
            }
        }
    }
    ended
}

#[cfg(test)]
mod tests;
