//! `twinsan snapshot ...`: crash-consistent snapshots of LUNs, taken at one cut on both
//! nodes of a pair (`replica::snapshot` decides the order of every step; this module
//! performs them: the drain on range locks, the clones, the catalogue, the peer's requests).
//!
//! Storage: a reflink clone of the backing file per snapshot (store.rs, reflink.rs). On a
//! file system without reflink (ext4) snapshots are refused with the reason; the
//! redirect-on-write overlay chain for those is not built yet (docs/limitations.md).

pub mod admin;
pub mod diff;
pub mod reflink;
pub mod schedule;
pub mod ship;
pub mod staging;
pub mod store;

use store::CloneFrom;

use std::fs::{File, OpenOptions};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use replica::snapshot::{Cut, CutOutcome, CutStep, PeerView, SnapOp, SnapshotName};

use crate::config::Role;
use crate::disk::range_lock::RangeGuard;
use crate::lun::Lun;
use crate::registry::Registry;

/// How long a cut waits for the writes running when it starts. Why this bound: every write
/// of the group waits meanwhile, and ESXi reports a datastore lost when an ATS heartbeat
/// waits 8 s; a healthy pair completes a write in milliseconds, so a drain this long means
/// something is stuck, and the cut gives up rather than stall the LUN.
pub const DRAIN_TIMEOUT_MS: u64 = 2_000;
/// How often a waiting drain looks again.
const DRAIN_POLL: Duration = Duration::from_micros(100);

/// One snapshot operation at a time on a node: cuts hold writes, and two at once would
/// only make both wait longer.
static OPERATION: Mutex<()> = Mutex::new(());

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A time for people: RFC 3339, seconds, UTC.
pub fn utc(unix_ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

/// `TARGET/LUN` (target name, LUN id) to the registry's LUN index.
pub fn find_lun(reg: &Registry, spec: &str) -> Result<usize, String> {
    let (target, id) = spec.rsplit_once('/').ok_or_else(|| {
        format!("{spec:?}: name a LUN as TARGET/LUN (e.g. iqn.2026-11.io.twinsan:default/0)")
    })?;
    let id: u64 = id
        .parse()
        .map_err(|_| format!("{spec:?}: the LUN id {id:?} is not a number"))?;
    let view = reg.view();
    let (_, t) = view
        .target(target)
        .ok_or_else(|| format!("{spec:?}: no target named {target:?} here"))?;
    t.lun(id)
        .ok_or_else(|| format!("{spec:?}: target {target:?} has no LUN {id}"))
}

/// The LUNs a group names: `TARGET/LUN`s separated by commas, or a bare `TARGET` for all of
/// its LUNs.
pub fn find_group(reg: &Registry, spec: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    let view = reg.view();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        if let Some((_, t)) = view.target(part) {
            out.extend(t.luns.iter().map(|&(_, i)| i));
        } else {
            out.push(find_lun(reg, part)?);
        }
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        return Err(format!("{spec:?} names no LUN"));
    }
    Ok(out)
}

fn peer_view(reg: &Registry, luns: &[usize]) -> PeerView {
    match reg.replication.get() {
        None => PeerView::Standalone,
        Some(rep) => rep.snapshot_peer_view(luns),
    }
}

fn store_err(lun: &Lun, e: impl std::fmt::Display) -> String {
    format!("{}/{}: {e}", lun.target_name, lun.id)
}

/// Takes snapshot `name` of every LUN in `luns` at one cut (on both nodes of a pair).
pub fn create(reg: &Registry, luns: &[usize], name: &SnapshotName) -> Result<String, String> {
    let _one = OPERATION.lock().unwrap_or_else(|p| p.into_inner());
    let mut cut = Cut::start(
        reg.role() == Role::Primary,
        peer_view(reg, luns),
        luns.len(),
    )
    .map_err(|e| e.to_string())?;
    for &i in luns {
        let lun = &reg.luns[i];
        let mut st = lun.snaps.lock().unwrap_or_else(|p| p.into_inner());
        // Clones of cuts that never completed here (this node was secondary then, or
        // crashed mid-cut): nothing will commit them now that this node orders the cuts.
        st.drop_pending().map_err(|e| store_err(lun, e))?;
        if st.by_name(name.as_str()).is_ok() {
            return Err(store_err(
                lun,
                format!("a snapshot named {name:?} exists already"),
            ));
        }
    }
    let mut peer = None;
    flush_ahead(reg, luns, cut.with_peer(), &mut peer);
    let mut rng = rand::thread_rng();
    let group = rng.next_u64();
    let guids: Vec<u64> = luns.iter().map(|_| rng.next_u64()).collect();
    let created = now_unix_ms();
    let mut drained_at = std::time::Instant::now();
    let mut guards: Vec<RangeGuard> = Vec::new();
    let mut error = None;
    let mut held_ms = 0;
    let outcome = loop {
        let step = cut.next();
        let ok = match step {
            CutStep::Finished(o) => break o,
            CutStep::Drain => {
                drained_at = std::time::Instant::now();
                for &i in luns {
                    let lun = &reg.luns[i];
                    match drain(lun) {
                        Ok(g) => guards.push(g),
                        Err(e) => {
                            error.get_or_insert(e);
                            break;
                        }
                    }
                }
                if guards.len() < luns.len() {
                    guards.clear();
                }
                !guards.is_empty()
            }
            CutStep::Release => {
                held_ms = drained_at.elapsed().as_millis();
                guards.clear();
                true
            }
            CutStep::Local { lun: m, op } => {
                let lun = &reg.luns[luns[m]];
                local_step(lun, op, guids[m], name, group, created)
                    .map_err(|e| error.get_or_insert(store_err(lun, e)))
                    .is_ok()
            }
            CutStep::Peer { lun: m, op } => {
                let Some(rep) = reg.replication.get() else {
                    debug_assert!(false, "a standalone cut asks no peer");
                    break CutOutcome::Failed;
                };
                let r = rep
                    .snapshot_link_in(&mut peer)
                    .and_then(|link| rep.snapshot_request(link, luns[m], op, guids[m], name));
                if let Err(e) = &r {
                    peer = None;
                    error.get_or_insert(format!("peer: {op:?}: {e}"));
                }
                r.is_ok()
            }
        };
        cut.done(ok);
    };
    drop(guards);
    // A staging the cut did not use (it failed before this node's clone) goes.
    for &i in luns {
        staging::drop_staging(&reg.luns[i]);
    }
    let names: Vec<String> = luns
        .iter()
        .map(|&i| format!("{}/{}", reg.luns[i].target_name, reg.luns[i].id))
        .collect();
    match outcome {
        CutOutcome::Taken => {
            tracing::info!(%name, luns = ?names, held_ms, "snapshot taken");
            Ok(format!(
                "snapshot {name} of {} taken (writes held {held_ms} ms)\n",
                names.join(", ")
            ))
        }
        CutOutcome::PeerUnconfirmed => Err(format!(
            "snapshot {name} taken on this node, but the peer did not confirm it ({}); the peer keeps it when the pair reconnects, unless it is promoted first",
            error.unwrap_or_default()
        )),
        CutOutcome::Failed => Err(format!(
            "no snapshot taken: {}",
            error.unwrap_or_else(|| "the cut failed".into())
        )),
    }
}

/// Holds every write of `lun` out (see [`crate::disk::range_lock::RangeLock::drain`]), or
/// says why not.
fn drain(lun: &Lun) -> Result<RangeGuard, String> {
    lun.ranges
        .drain(
            lun.num_blocks(),
            DRAIN_POLL,
            Duration::from_millis(DRAIN_TIMEOUT_MS),
        )
        .ok_or_else(|| {
            store_err(
                lun,
                format!(
                    "writes still running after {DRAIN_TIMEOUT_MS} ms: nothing changed (retry)"
                ),
            )
        })
}

/// Refuses, unless `force`, while initiators are logged in to the target of `lun`: what
/// follows replaces its data under their caches.
fn refuse_with_sessions(reg: &Registry, lun: &Lun, force: bool) -> Result<(), String> {
    let target = reg.view().target(&lun.target_name).map(|(i, _)| i);
    if !force && target.is_some_and(|t| reg.sessions_on(t) > 0) {
        return Err(store_err(
            lun,
            "initiators are logged in to its target; their caches would disagree with the replaced data. Log them out first, or pass --force",
        ));
    }
    Ok(())
}

/// Writes back what the page cache holds for `luns` now, here and on the peer, while writes
/// go on. Why: a clone first writes back whatever is dirty, and it does so while the cut
/// holds every write; right after a burst of random writes that took seconds (a create took 4.1 s after
/// 10 s of 4 KiB writes at QD32), and writes must never wait that long (ESXi's 8 s). A
/// failure only makes the hold longer: it is logged, and the cut goes on.
fn flush_ahead(
    reg: &Registry,
    luns: &[usize],
    with_peer: bool,
    peer: &mut Option<crate::replication::SnapLink>,
) {
    for &i in luns {
        let lun = &reg.luns[i];
        if let Err(e) = stage_after_writeback(lun) {
            tracing::warn!(lun = %lun.path.display(), error = %e, "staging a snapshot's clone failed: the cut clones the whole file");
        }
        let Some(rep) = reg.replication.get().filter(|_| with_peer) else {
            continue;
        };
        let stage = SnapshotName::parse("staging").map_err(|e| e.to_string());
        let r = rep.snapshot_link_in(peer).and_then(|link| {
            let Ok(name) = &stage else {
                return rep.snapshot_flush(link, i);
            };
            // A peer that does not know Stage refuses it: it is written back instead.
            rep.snapshot_request(link, i, SnapOp::Stage, 0, name)
                .or_else(|_| rep.snapshot_flush(link, i))
        });
        if let Err(e) = r {
            *peer = None;
            tracing::warn!(error = %e, "the peer's write-back before a snapshot failed");
        }
    }
}

/// Writes back what the page cache holds for `lun`, then stages its clone (staging.rs).
/// The write-back waits at most this long: under sustained writes an fdatasync lasted as
/// long as the load did (8 s at 175K IOPS), and the cut must not wait for the load to end.
/// What is still dirty then is written back by the staging clone, piece by piece.
const WRITEBACK_WAIT_MS: u64 = 2_000;

fn stage_after_writeback(lun: &Lun) -> Result<(), String> {
    let f = File::open(&lun.path).map_err(|e| format!("writing back: {e}"))?;
    let (tx, rx) = crossbeam_channel::bounded(1);
    // On its own thread so that it can be left running (it is harmless, and it ends once
    // the kernel has written what was dirty when it began).
    let spawned = std::thread::Builder::new()
        .name("twinsan-writeback".into())
        .spawn(move || {
            let _ = tx.send(f.sync_data());
        });
    if spawned.is_ok() {
        match rx.recv_timeout(Duration::from_millis(WRITEBACK_WAIT_MS)) {
            Ok(r) => r.map_err(|e| format!("writing back: {e}"))?,
            Err(_) => {
                tracing::info!(lun = %lun.path.display(), "the write-back before a snapshot goes on behind it (writes keep the page cache dirty)")
            }
        }
    }
    staging::stage(lun)
}

/// One local step of a cut, delete or rollback.
fn local_step(
    lun: &Lun,
    op: SnapOp,
    guid: u64,
    name: &SnapshotName,
    group: u64,
    created_unix_ms: u64,
) -> Result<(), String> {
    let mut st = lun.snaps.lock().unwrap_or_else(|p| p.into_inner());
    let r = match op {
        SnapOp::Prepare => match staging::finish(lun) {
            Some(staged) => st.prepare(
                CloneFrom::Staged(&staged),
                guid,
                name,
                group,
                created_unix_ms,
            ),
            None => {
                let live = File::open(&lun.path).map_err(|e| e.to_string())?;
                st.prepare(CloneFrom::Live(&live), guid, name, group, created_unix_ms)
            }
        },
        SnapOp::Stage => {
            drop(st);
            return stage_after_writeback(lun);
        }
        SnapOp::Commit => st.commit(guid),
        SnapOp::Abort => {
            staging::drop_staging(lun);
            st.remove(guid)
        }
        SnapOp::Delete => st.remove(guid),
        SnapOp::Rollback => {
            // The file's content is replaced by no noted write: a clone staged before
            // would be finished from stale pieces.
            staging::drop_staging(lun);
            let live = OpenOptions::new()
                .write(true)
                .open(&lun.path)
                .map_err(|e| e.to_string())?;
            let r = st.rollback(guid, &live);
            // Whatever the clone did (it may have replaced part of the file), the chunks
            // that hold data are read from the file again.
            refresh_allocation(lun, &live);
            r
        }
    };
    r.map_err(|e| e.to_string())
}

/// After the file's content was replaced: every chunk may hold data, then the holes the
/// new content has are known again.
pub fn refresh_allocation(lun: &Lun, f: &File) {
    let size = lun.size_bytes();
    lun.alloc.mark_data(0, size);
    let mut end_of_data = 0;
    for (off, len) in crate::disk::allocation::data_extents(f, size) {
        lun.alloc.mark_hole(end_of_data, off - end_of_data);
        end_of_data = off + len;
    }
    lun.alloc.mark_hole(end_of_data, size - end_of_data);
}

/// The secondary's side of a step the primary orders.
pub fn apply_step(lun: &Lun, op: SnapOp, guid: u64, name: &SnapshotName) -> Result<(), String> {
    local_step(lun, op, guid, name, 0, now_unix_ms())
}

/// `snapshot list`: every committed snapshot of `luns`.
pub fn list(reg: &Registry, luns: &[usize]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<40} {:<28} {:<16} {:<24}",
        "LUN", "NAME", "ID", "CREATED (UTC)"
    );
    for &i in luns {
        let lun = &reg.luns[i];
        let st = lun.snaps.lock().unwrap_or_else(|p| p.into_inner());
        for e in st.committed() {
            let _ = writeln!(
                out,
                "{:<40} {:<28} {:016x} {:<24}",
                format!("{}/{}", lun.target_name, lun.id),
                e.name,
                e.guid,
                utc(e.created_unix_ms)
            );
        }
    }
    out
}

/// The LUN (TARGET/ID) that serves the clone at `image`, if one does. Paths compare
/// canonical: the export's config names the clone by its absolute path, the store by one
/// relative to the data directory.
pub fn exported_as(reg: &Registry, image: &std::path::Path) -> Option<String> {
    let canon = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let image = canon(image);
    reg.luns
        .iter()
        .find(|l| !l.is_removed() && canon(&l.path) == image)
        .map(|l| format!("{}/{}", l.target_name, l.id))
}

/// `snapshot delete`: on this node, then on the peer (a peer that is apart drops it when
/// the pair reconnects).
pub fn delete(reg: &Registry, lun_index: usize, name: &SnapshotName) -> Result<String, String> {
    let _one = OPERATION.lock().unwrap_or_else(|p| p.into_inner());
    if reg.role() != Role::Primary {
        return Err("snapshots are deleted on the primary (this node is secondary)".into());
    }
    let lun = &reg.luns[lun_index];
    let (guid, image) = {
        let st = lun.snaps.lock().unwrap_or_else(|p| p.into_inner());
        let guid = st
            .by_name(name.as_str())
            .map_err(|e| store_err(lun, e))?
            .guid;
        (guid, st.image_path(guid))
    };
    if let Some(e) = exported_as(reg, &image) {
        return Err(store_err(
            lun,
            format!(
                "snapshot {name} is exported as {e}: remove that LUN first (twinsan lun remove)"
            ),
        ));
    }
    local_step(lun, SnapOp::Delete, guid, name, 0, 0).map_err(|e| store_err(lun, e))?;
    let mut note = String::new();
    if let Some(rep) = reg.replication.get() {
        let r = rep.snapshot_request_once(lun_index, SnapOp::Delete, guid, name);
        if let Err(e) = r {
            note = format!(" (the peer deletes it when the pair reconnects: {e})");
        }
    }
    Ok(format!(
        "snapshot {name} of {}/{} deleted{note}\n",
        lun.target_name, lun.id
    ))
}

/// `snapshot rollback`: the LUN's data becomes the snapshot's, on both nodes.
pub fn rollback(
    reg: &Registry,
    lun_index: usize,
    name: &SnapshotName,
    force: bool,
) -> Result<String, String> {
    let _one = OPERATION.lock().unwrap_or_else(|p| p.into_inner());
    let lun = &reg.luns[lun_index];
    if reg.role() != Role::Primary {
        return Err("a rollback runs on the primary (this node is secondary)".into());
    }
    if let PeerView::Apart(why) = peer_view(reg, &[lun_index]) {
        return Err(format!(
            "the peer cannot roll back with this node now ({why}); retry once the pair is UpToDate"
        ));
    }
    refuse_with_sessions(reg, lun, force)?;
    let guid = {
        let st = lun.snaps.lock().unwrap_or_else(|p| p.into_inner());
        st.by_name(name.as_str())
            .map_err(|e| store_err(lun, e))?
            .guid
    };
    let guard = drain(lun)?;
    local_step(lun, SnapOp::Rollback, guid, name, 0, 0).map_err(|e| {
        // A clone that failed half-way may have changed the file: the peer must follow.
        if let Some(rep) = reg.replication.get() {
            rep.resync_whole(lun_index, "a rollback failed on the primary");
        }
        store_err(lun, e)
    })?;
    let mut note = String::new();
    if let Some(rep) = reg.replication.get() {
        let r = rep.snapshot_request_once(lun_index, SnapOp::Rollback, guid, name);
        if let Err(e) = r {
            rep.resync_whole(lun_index, "the peer could not roll back");
            note = format!(" (the peer could not roll back: {e}; it is resynced from this node)");
        }
    }
    drop(guard);
    Ok(format!(
        "{}/{} rolled back to snapshot {name}{note}\n",
        lun.target_name, lun.id
    ))
}

/// `snapshot info`: what a reader of the snapshot's clone needs (diff streams): its id, the
/// clone's path, the LUN's size and block size, and the id of the snapshot before it.
pub fn info(reg: &Registry, lun_index: usize, name: &SnapshotName) -> Result<String, String> {
    let lun = &reg.luns[lun_index];
    let st = lun.snaps.lock().unwrap_or_else(|p| p.into_inner());
    let e = st.by_name(name.as_str()).map_err(|e| store_err(lun, e))?;
    Ok(format!(
        "guid {:016x}\npath {}\nsize_bytes {}\nblock_size {}\ncreated_unix_ms {}\n",
        e.guid,
        // Absolute: the CLI (diff, export) may run elsewhere than the daemon.
        std::fs::canonicalize(st.image_path(e.guid))
            .unwrap_or_else(|_| st.image_path(e.guid))
            .display(),
        lun.size_bytes(),
        lun.block_size,
        e.created_unix_ms
    ))
}

/// Why [`apply`] applied nothing.
#[derive(Debug)]
pub enum ApplyRefused {
    /// Not now (initiators logged in, writes still running): the same stream may be
    /// applied later, so a received one is kept.
    Later(String),
    /// Not this stream here.
    Final(String),
}

impl std::fmt::Display for ApplyRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyRefused::Later(m) | ApplyRefused::Final(m) => f.write_str(m),
        }
    }
}

impl From<String> for ApplyRefused {
    fn from(m: String) -> Self {
        ApplyRefused::Final(m)
    }
}

/// `snapshot apply`: makes the LUN's data the stream's new snapshot and records that
/// snapshot (same id and name as where the stream was made). The stream's base must be a
/// snapshot here (the LUN is rolled back to it first, as `zfs receive -F` does), or the
/// stream full (the LUN is emptied first). The LUN's writes wait meanwhile, so no initiator
/// may be logged in to its target unless `force`.
pub fn apply(
    reg: &Registry,
    lun_index: usize,
    path: &std::path::Path,
    force: bool,
) -> Result<String, ApplyRefused> {
    let _one = OPERATION.lock().unwrap_or_else(|p| p.into_inner());
    let lun = &reg.luns[lun_index];
    let at = |e: String| ApplyRefused::Final(store_err(lun, e));
    if reg.role() != Role::Primary {
        return Err(ApplyRefused::Final(
            "a stream is applied on the primary (this node is secondary)".into(),
        ));
    }
    let rep = reg.replication.get();
    if rep.is_some() {
        // Both nodes must start from the same base and end with the same snapshot.
        if let PeerView::Apart(why) = peer_view(reg, &[lun_index]) {
            return Err(ApplyRefused::Later(store_err(
                lun,
                format!(
                    "the peer cannot follow a stream now ({why}); retry once the pair is UpToDate"
                ),
            )));
        }
    }
    refuse_with_sessions(reg, lun, force).map_err(ApplyRefused::Later)?;
    let mut f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (h, reader, rest) =
        diff::read_header(&mut f).map_err(|e| format!("{}: {e}", path.display()))?;
    if h.size_bytes != lun.size_bytes() || h.block_size != lun.block_size {
        return Err(at(format!(
            "the stream is for a LUN of {} bytes in {}-byte blocks; this one has {} in {}",
            h.size_bytes,
            h.block_size,
            lun.size_bytes(),
            lun.block_size
        )));
    }
    let base = {
        let st = lun.snaps.lock().unwrap_or_else(|p| p.into_inner());
        if st
            .entries()
            .iter()
            .any(|e| e.guid == h.to_guid && !e.pending)
        {
            return Err(at(format!(
                "snapshot {:016x} ({}) is here already",
                h.to_guid, h.to_name
            )));
        }
        if st.by_name(h.to_name.as_str()).is_ok() {
            return Err(at(format!("a snapshot named {} exists already", h.to_name)));
        }
        match h.from_guid {
            0 => None,
            g => Some(
                st.committed()
                    .find(|e| e.guid == g)
                    .map(|e| e.guid)
                    .ok_or_else(|| at(format!("the stream applies to snapshot {g:016x}, which this LUN does not hold (apply the streams before it first)")))?,
            ),
        }
    };
    let guard = drain(lun).map_err(ApplyRefused::Later)?;
    if let (Some(rep), Some(g)) = (rep, base) {
        // The peer goes back to the same base on its own clone (snapshots are cut at one
        // write on both nodes, so the two clones hold the same bytes): what the stream
        // changes is then all the two nodes differ by, and the resync below copies only it.
        rep.snapshot_request_once(lun_index, SnapOp::Rollback, g, &h.to_name)
            .map_err(|e| {
                ApplyRefused::Later(store_err(
                    lun,
                    format!(
                        "the peer could not go back to the stream's base ({e}); nothing changed"
                    ),
                ))
            })?;
    }
    let live = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&lun.path)
        .map_err(|e| at(e.to_string()))?;
    // The reset below replaces the file's content by no noted write (see local_step).
    staging::drop_staging(lun);
    let reset = |live: &File| -> Result<(), String> {
        let st = lun.snaps.lock().unwrap_or_else(|p| p.into_inner());
        let r = match base {
            Some(g) => st.rollback(g, live).map_err(|e| e.to_string()),
            None => {
                crate::disk::allocation::punch(live, 0, lun.size_bytes()).map_err(|e| e.to_string())
            }
        };
        refresh_allocation(lun, live);
        r
    };
    // On a pair, every range the stream writes (all of them for a full stream, which
    // empties the LUN first) is resynced to the peer from here, even if this fails half
    // way: the peer must end up with what this node holds.
    let mut changed: Vec<(u64, u64)> = match base {
        Some(_) => Vec::new(),
        None => vec![(0, lun.size_bytes())],
    };
    let resync_changed = |changed: &[(u64, u64)]| -> Result<(), String> {
        let Some(rep) = rep else { return Ok(()) };
        rep.resync_ranges(lun_index, changed.iter().copied(), "a snapshot stream was applied")
            .map_err(|e| format!("the changed ranges could not be recorded for the peer ({e}); run `twinsan verify --repair`"))
    };
    // A reset that failed may have left any part of the file changed: all of it goes.
    let whole = [(0, lun.size_bytes())];
    if let Err(e) = reset(&live) {
        resync_changed(&whole).map_err(at)?;
        return Err(at(e));
    }
    let t = diff::apply_records(reader, rest, &mut f, &live, |off, len, data| {
        if data {
            lun.alloc.mark_data(off, len);
        } else {
            lun.alloc.mark_hole(off, len);
        }
        if rep.is_some() && base.is_some() {
            changed.push((off, len));
        }
    });
    let t = match t.and_then(|t| live.sync_all().map(|()| t).map_err(diff::ApplyError::Write)) {
        Ok(t) => t,
        Err(e) => {
            // Half applied is neither the base nor the new snapshot: back to the base.
            let undo = reset(&live);
            resync_changed(if undo.is_ok() { &changed } else { &whole }).map_err(at)?;
            return Err(at(format!(
                "{}: {e}; the LUN {}",
                path.display(),
                match undo {
                    Ok(()) => "is back at the stream's base".to_string(),
                    Err(u) => format!(
                        "could not be reset to the stream's base ({u}): its content is undefined"
                    ),
                }
            )));
        }
    };
    let mut st = lun.snaps.lock().unwrap_or_else(|p| p.into_inner());
    st.prepare(
        CloneFrom::Live(&live),
        h.to_guid,
        &h.to_name,
        h.to_guid,
        h.created_unix_ms,
    )
    .map_err(|e| at(e.to_string()))?;
    let clone_path = st.image_path(h.to_guid);
    drop(st);
    let mut note = String::new();
    if let Some(rep) = rep {
        resync_changed(&changed).map_err(at)?;
        // The resync copies under the range locks: the writes must flow again meanwhile.
        drop(guard);
        note = match peer_takes_applied(rep, reg, lun_index, &clone_path, &h) {
            Ok(()) => "; the peer holds it too".into(),
            Err(e) => format!("; the peer does not hold it ({e}): a failover would lose it"),
        };
    }
    let mut st = lun.snaps.lock().unwrap_or_else(|p| p.into_inner());
    st.commit(h.to_guid).map_err(|e| at(e.to_string()))?;
    Ok(format!(
        "applied {}: {} data bytes, {} zeroed bytes; {}/{} holds snapshot {} ({:016x}){note}\n",
        path.display(),
        t.data_bytes,
        t.zero_bytes,
        lun.target_name,
        lun.id,
        h.to_name,
        h.to_guid
    ))
}

/// How long an applied stream waits for the resync of what it changed. Why this bound: the
/// operator's command waits meanwhile, and a resync this slow means the link or the peer
/// is failing (the snapshot then stays on this node only).
const APPLY_PEER_SYNC_TIMEOUT: Duration = Duration::from_secs(600);

/// On a pair, after a stream was applied here and this node cloned the result into the
/// stream's snapshot (`clone`, pending): waits until the resync has copied what it changed
/// (the peer UpToDate again), holds the writes, and, if none came since the apply (the LUN
/// still maps every block as its clone does), has the peer clone its LUN, now the same
/// bytes, into the same snapshot (`Prepare`, `Commit`), as a cut would.
fn peer_takes_applied(
    rep: &crate::replication::Replication,
    reg: &Registry,
    lun_index: usize,
    clone: &std::path::Path,
    h: &replica::snapshot::stream::Header,
) -> Result<(), String> {
    let lun = &reg.luns[lun_index];
    let (guid, name) = (h.to_guid, &h.to_name);
    let start = std::time::Instant::now();
    loop {
        match peer_view(reg, &[lun_index]) {
            // Not the state alone: a resync opens its round (the peer connected again)
            // before it marks the LUN SyncSource, and the LUN may still say UpToDate then.
            PeerView::InSync if rep.out_of_sync_bytes(lun_index) == 0 => break,
            PeerView::Apart(why) if start.elapsed() >= APPLY_PEER_SYNC_TIMEOUT => {
                return Err(format!(
                    "the resync did not finish within {} s: {why}",
                    APPLY_PEER_SYNC_TIMEOUT.as_secs()
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let _held = drain(lun)?;
    let unchanged = File::open(&lun.path)
        .and_then(|live| File::open(clone).map(|c| (live, c)))
        .map(|(live, c)| crate::disk::fiemap::mapped_alike(&live, &c, lun.size_bytes()))
        .unwrap_or(false);
    if !unchanged {
        return Err(
            "the LUN was written while the peer resynced, so its data is no longer the stream's"
                .into(),
        );
    }
    if let PeerView::Apart(why) = peer_view(reg, &[lun_index]) {
        return Err(format!("the peer is apart again: {why}"));
    }
    let mut link = None;
    for op in [SnapOp::Prepare, SnapOp::Commit] {
        let r = rep
            .snapshot_link_in(&mut link)
            .and_then(|l| rep.snapshot_request(l, lun_index, op, guid, name));
        if let Err(e) = r {
            if op == SnapOp::Commit {
                let _ = rep.snapshot_request_once(lun_index, SnapOp::Abort, guid, name);
            }
            return Err(format!("peer: {op:?}: {e}"));
        }
    }
    Ok(())
}
