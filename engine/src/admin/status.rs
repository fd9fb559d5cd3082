//! `twinsan status`: one report, shown as text for people (`status`) and as JSON for
//! scripts (`status-json`), so the two never disagree.
//!
//! The pair's and the failover driver's parts come as the text lines their drivers write
//! (`Replication::status`, `FailoverHandle::status`); the replica lines are parsed here into
//! fields, and a line this parser does not know is kept verbatim in `notes`, never dropped.

use serde::Serialize;

use crate::registry::Registry;

use super::role_name;

#[derive(Debug, Serialize, PartialEq)]
pub struct StatusReport {
    pub role: &'static str,
    /// None when no `[peer]` is configured (standalone).
    pub peer: Option<PeerStatus>,
    pub notes: Vec<String>,
    pub sessions: usize,
    pub luns: Vec<LunStatus>,
    /// The failover driver's lines as shown (heartbeats, lease, VIP); None without
    /// `[failover]`.
    pub failover: Option<Vec<String>>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct PeerStatus {
    pub name: String,
    pub address: String,
    /// "connected, mirroring", "not mirroring", "primary connected, receiving its writes"
    /// or "no primary connected".
    pub link: String,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct LunStatus {
    pub target: String,
    pub lun: u64,
    /// The pair's state when replicated (UpToDate, SyncSource, ...), else UpToDate;
    /// Sanitizing while a SANITIZE runs.
    pub state: String,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
    pub path: String,
    pub replica: Option<ReplicaStatus>,
    /// Its snapshots on this node, if any.
    pub snapshots: Option<SnapshotSummary>,
    /// While a SANITIZE runs: "P% R MiB/s eta Ts".
    pub sanitize: Option<String>,
}

/// How many snapshots a LUN has, and how old the newest is (a schedule that stopped shows
/// as an age past its period).
#[derive(Debug, Serialize, PartialEq, Clone)]
pub struct SnapshotSummary {
    pub count: usize,
    pub newest: String,
    pub newest_age_seconds: u64,
}

fn snapshot_summary(lun: &crate::lun::Lun) -> Option<SnapshotSummary> {
    summary_of(&lun.snaps.lock().unwrap_or_else(|p| p.into_inner()))
}

/// The summary of a LUN's committed snapshots, `None` without any (also what the metrics
/// endpoint shows).
pub(crate) fn summary_of(st: &crate::snapshot::store::Store) -> Option<SnapshotSummary> {
    let newest = st.committed().max_by_key(|e| e.created_unix_ms)?;
    let now = crate::snapshot::now_unix_ms();
    Some(SnapshotSummary {
        count: st.committed().count(),
        newest: newest.name.clone(),
        newest_age_seconds: now.saturating_sub(newest.created_unix_ms) / 1000,
    })
}

/// The SNAPSHOTS cell: the count and the newest one's age.
fn snapshots_cell(s: &SnapshotSummary) -> String {
    let a = s.newest_age_seconds;
    let age = match a {
        0..=119 => format!("{a}s"),
        120..=7199 => format!("{}m", a / 60),
        7200..=172_799 => format!("{}h", a / 3600),
        _ => format!("{}d", a / 86_400),
    };
    format!("{}, newest {age} ago", s.count)
}

#[derive(Debug, Serialize, PartialEq, Clone)]
pub struct ReplicaStatus {
    /// The LUN's NAA id, which is also its key on the replica link (hex).
    pub key: String,
    pub state: String,
    pub gen_current: String,
    pub gen_bitmap: String,
    pub dirty_bytes: u64,
    /// Resync progress, while one runs.
    pub resync: Option<Resync>,
}

#[derive(Debug, Serialize, PartialEq, Clone)]
pub struct Resync {
    pub percent: f64,
    /// None while the rate is not known yet.
    pub eta_seconds: Option<u64>,
}

impl StatusReport {
    pub fn gather(reg: &Registry) -> StatusReport {
        let mut peer = None;
        let mut notes = Vec::new();
        let mut replicas = Vec::new();
        if let Some(rep) = reg.replication.get() {
            for line in rep.status().lines() {
                if let Some(p) = parse_peer(line) {
                    peer = Some(p);
                } else if let Some(r) = parse_replica(line) {
                    replicas.push(r);
                } else if let Some(n) = line.strip_prefix("note: ") {
                    notes.push(n.to_string());
                } else if !line.trim().is_empty() {
                    notes.push(line.to_string());
                }
            }
        }
        let failover = reg.failover.get().map(|f| {
            f.status()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string)
                .collect()
        });
        let mut luns = Vec::new();
        let view = reg.view();
        for (_, t) in view.live() {
            for &(id, idx) in &t.luns {
                let lun = &reg.luns[idx];
                let key = format!("{:016x}", lun.naa_id);
                let replica = replicas.iter().find(|r| r.key == key).cloned();
                let state = if lun.sanitize.active() {
                    "Sanitizing".to_string()
                } else {
                    replica
                        .as_ref()
                        .map_or_else(|| "UpToDate".to_string(), |r| r.state.clone())
                };
                luns.push(LunStatus {
                    target: t.cfg.name.clone(),
                    lun: id,
                    state,
                    size_bytes: lun.size_bytes(),
                    allocated_bytes: lun.allocated_bytes(),
                    path: lun.path.display().to_string(),
                    replica,
                    snapshots: snapshot_summary(lun),
                    sanitize: lun.sanitize.summary(),
                });
            }
        }
        StatusReport {
            role: role_name(reg.role()),
            peer,
            notes,
            sessions: reg.sessions.load(std::sync::atomic::Ordering::Relaxed),
            luns,
            failover,
        }
    }

    /// The human form: `key: value` lines (scripts of old read `role:` and `peer:`), an
    /// aligned LUN table, then the pair's per-LUN detail lines (generation ids).
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(s, "role: {}", self.role);
        match &self.peer {
            Some(p) => {
                let _ = writeln!(s, "peer: {} at {} ({})", p.name, p.address, p.link);
            }
            None => {
                let _ = writeln!(s, "peer: none (standalone)");
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        for l in self.failover.iter().flatten() {
            let _ = writeln!(s, "{l}");
        }
        let _ = writeln!(s, "sessions: {}", self.sessions);
        if !self.luns.is_empty() {
            s.push('\n');
            let rows: Vec<[String; 8]> = self
                .luns
                .iter()
                .map(|l| {
                    [
                        l.target.clone(),
                        l.lun.to_string(),
                        match &l.sanitize {
                            Some(p) => format!("{} {p}", l.state),
                            None => l.state.clone(),
                        },
                        human_bytes(l.size_bytes),
                        human_bytes(l.allocated_bytes),
                        l.replica
                            .as_ref()
                            .and_then(|r| r.resync.as_ref())
                            .map_or_else(|| "-".to_string(), resync_cell),
                        l.snapshots
                            .as_ref()
                            .map_or_else(|| "-".to_string(), snapshots_cell),
                        l.path.clone(),
                    ]
                })
                .collect();
            let header = [
                "TARGET",
                "LUN",
                "STATE",
                "SIZE",
                "ALLOCATED",
                "RESYNC",
                "SNAPSHOTS",
                "PATH",
            ]
            .map(str::to_string);
            s.push_str(&table(&header, &rows));
        }
        let replicated: Vec<&ReplicaStatus> = self
            .luns
            .iter()
            .filter_map(|l| l.replica.as_ref())
            .collect();
        if !replicated.is_empty() {
            s.push('\n');
            let width = replicated.iter().map(|r| r.state.len()).max().unwrap_or(0);
            for r in replicated {
                let _ = writeln!(
                    s,
                    "replica lun {}: {:<width$} gen current={} bitmap={} dirty={} bytes{}",
                    r.key,
                    r.state,
                    r.gen_current,
                    r.gen_bitmap,
                    r.dirty_bytes,
                    r.resync.as_ref().map(resync_suffix).unwrap_or_default()
                );
            }
        }
        s
    }
}

/// The RESYNC cell of the table. Worded unlike the pair's own line (" resync P% eta E"),
/// which scripts and tests search for.
fn resync_cell(p: &Resync) -> String {
    match p.eta_seconds {
        Some(e) => format!("{:.1}% ({e}s left)", p.percent),
        None => format!("{:.1}% (rate unknown)", p.percent),
    }
}

/// The pair's own suffix, as `replica::pair::progress::status_suffix` words it.
fn resync_suffix(p: &Resync) -> String {
    match p.eta_seconds {
        Some(e) => format!(" resync {:.1}% eta {e}s", p.percent),
        None => format!(" resync {:.1}% eta unknown", p.percent),
    }
}

/// Left-aligned columns, two spaces apart, no trailing blanks.
fn table<const N: usize>(header: &[String; N], rows: &[[String; N]]) -> String {
    let mut width = [0usize; N];
    for r in std::iter::once(header).chain(rows) {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(header).chain(rows) {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(width).enumerate() {
            line.push_str(c);
            if i + 1 < N {
                line.extend(std::iter::repeat_n(' ', w - c.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Bytes in binary units with one decimal ("10.0 GiB"); exact below 1 KiB.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// "peer: NAME at ADDRESS (LINK)" (replication/status.rs).
fn parse_peer(line: &str) -> Option<PeerStatus> {
    let rest = line.strip_prefix("peer: ")?;
    let (name, rest) = rest.split_once(" at ")?;
    let (address, link) = rest.split_once(" (")?;
    Some(PeerStatus {
        name: name.to_string(),
        address: address.to_string(),
        link: link.strip_suffix(')')?.to_string(),
    })
}

/// "replica lun KEY: STATE gen current=X bitmap=Y dirty=N bytes[ resync P% eta Es|unknown]"
/// (`replica::pair::PairLun::status_line`).
fn parse_replica(line: &str) -> Option<ReplicaStatus> {
    let rest = line.strip_prefix("replica lun ")?;
    let (key, rest) = rest.split_once(": ")?;
    let mut w = rest.split_whitespace();
    let state = w.next()?.to_string();
    (w.next()? == "gen").then_some(())?;
    let gen_current = w.next()?.strip_prefix("current=")?.to_string();
    let gen_bitmap = w.next()?.strip_prefix("bitmap=")?.to_string();
    let dirty_bytes = w.next()?.strip_prefix("dirty=")?.parse().ok()?;
    (w.next()? == "bytes").then_some(())?;
    let resync = match w.next() {
        None => None,
        Some("resync") => {
            let percent = w.next()?.strip_suffix('%')?.parse().ok()?;
            (w.next()? == "eta").then_some(())?;
            let eta = w.next()?;
            let eta_seconds = match eta {
                "unknown" => None,
                e => Some(e.strip_suffix('s')?.parse().ok()?),
            };
            Some(Resync {
                percent,
                eta_seconds,
            })
        }
        Some(_) => return None,
    };
    if w.next().is_some() {
        return None;
    }
    Some(ReplicaStatus {
        key: key.to_string(),
        state,
        gen_current,
        gen_bitmap,
        dirty_bytes,
        resync,
    })
}

#[cfg(test)]
mod tests;
