//! The secondary: the apply server. It authenticates replica connections and applies what
//! the primary sends straight from the receive buffer, acking in batches.

use super::verify::region_digest;
use super::*;
use crate::disk::allocation::{punch, zero_range};
use replica::genid::GenIds;
use replica::pair::apply::{Apply, ApplyConn, Change, ChangeOp};

/// The secondary sends its acks after at most this many applied messages (and always
/// before it would block for more). Why 16: each ack write on a one-machine pair also runs
/// the loopback delivery and wakes the primary's ack reader; 8 cost 12% of replicated 4 KiB
/// IOPS at queue depth 32 against 16 (2026-12-03, `ab` alternation, 8 runs each: 176K
/// against 197K, ratio to standalone 0.60 against 0.65), and the whole queue depth (32)
/// made the pair run in lock-step bursts (0.33-0.68).
pub(super) const ACK_BATCH: usize = 16;

/// Counts a replica connection as authenticating until dropped (also by a panic's unwind).
pub(super) struct Authenticating(Arc<AtomicUsize>);

impl Authenticating {
    /// Takes over one count already added by the acceptor.
    pub(super) fn new(count: Arc<AtomicUsize>) -> Self {
        Authenticating(count)
    }
}

impl Drop for Authenticating {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Replication {
    /// On a secondary, when a primary's control connection arrives: every LUN for which it
    /// holds newer data is recorded outdated here before any resync starts, so that a
    /// promotion of this node while the resync is still on its way (to this LUN, or to
    /// one before it) is refused instead of serving stale data. The resync's completion
    /// clears it.
    pub(super) fn note_primary_ahead(&self, hellos: &[LunHello]) {
        for l in &self.luns {
            let Some(h) = hellos.iter().find(|h| h.lun_key == l.key) else {
                continue;
            };
            let mut p = l.pair();
            let persist = p.primary_connected(h);
            if let Err(e) = l.persist_if(&mut p, persist) {
                tracing::error!(lun = l.key, error = %e, "cannot record this node outdated");
            }
        }
    }

    /// This node's copy of LUN `key` can no longer be trusted anywhere (a failed fsync may
    /// have dropped written pages): recorded like a crash, so the primary's next resync
    /// copies every region into it.
    pub(super) fn distrust_local(&self, key: u64, why: &str) {
        let Some(i) = self.lun_by_key(key) else {
            return;
        };
        let l = &self.luns[i];
        let mut p = l.pair();
        let persist = p.distrust();
        tracing::error!(
            lun = key,
            reason = why,
            "local copy distrusted: the next resync copies every region"
        );
        if let Err(e) = l.persist_if(&mut p, persist) {
            tracing::error!(lun = key, error = %e, "cannot record the distrusted copy");
        }
    }

    pub(super) fn serve(self: Arc<Self>, listener: TcpListener) {
        // Connections still authenticating cost a thread and a receive buffer each, for up
        // to the handshake's timeouts: a bounded number of them (our peer opens one link
        // per core and a control connection, one at a time each).
        let max_unauthenticated = self.links.len() * 2 + 8;
        let unauthenticated = Arc::new(AtomicUsize::new(0));
        for stream in listener.incoming().flatten() {
            if unauthenticated.load(Ordering::Acquire) >= max_unauthenticated {
                tracing::warn!(peer = ?stream.peer_addr().ok(), max_unauthenticated, "too many replica connections authenticating: refusing one");
                continue;
            }
            unauthenticated.fetch_add(1, Ordering::AcqRel);
            let conn_id = self
                .apply_gate
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .accept();
            let rep = Arc::clone(&self);
            let count = Arc::clone(&unauthenticated);
            let spawned = std::thread::Builder::new()
                .name("twinsan-replica-apply".into())
                .spawn(move || {
                    let peer = stream.peer_addr().ok();
                    if let Err(e) = rep.apply_conn(stream, conn_id, Authenticating::new(count)) {
                        tracing::info!(?peer, error = %e, "replica connection ended");
                    }
                });
            if spawned.is_err() {
                unauthenticated.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    pub(super) fn apply_conn(
        &self,
        mut s: TcpStream,
        conn_id: u64,
        authenticating: Authenticating,
    ) -> std::io::Result<()> {
        let _ = s.set_nodelay(true);
        // A primary that lost power never closes its links: keepalive ends them (and their
        // threads) within about 11 s instead of never.
        if let Err(e) = keep_alive(&s) {
            tracing::debug!(error = %e, "replica link keepalive unavailable");
        }
        let mut rbuf = RxBuf::default();
        let (peer_hellos, peer_link) =
            self.handshake(&mut s, &mut rbuf, AuthRole::Acceptor, LINK_NONE)?;
        drop(authenticating);
        if self.is_primary() {
            if peer_hellos.iter().any(|h| h.flags.primary) {
                // Two primaries would both accept writes: refuse, loudly (split-brain guard).
                tracing::error!("refusing replica connection: this node is primary too");
            } else {
                // A secondary asking who is primary (its `promote`): the hello answered it.
                tracing::debug!("a secondary asked for the role: this node is primary");
            }
            return Err(std::io::Error::other("both nodes are primary"));
        }
        if peer_link != LINK_NONE {
            // On a one-machine pair the peer's core thread for this link runs there.
            self.keep_off_core(usize::from(peer_link));
        }
        // Counted down however the connection ends (error, EOF, panic).
        struct Open<'a>(&'a AtomicUsize);
        impl Drop for Open<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _open = (peer_link == LINK_NONE).then(|| {
            // The primary's control connection (a resync, then pings every PING_INTERVAL
            // while it stays primary; verify): while it is open a primary is there
            // (promote_refusal). Silence means the primary is gone or cut off, and the
            // connection must not go on counting. Data links may idle forever and close
            // only with the primary's process: they do not count.
            self.primary_links.fetch_add(1, Ordering::AcqRel);
            Open(&self.primary_links)
        });
        if peer_link == LINK_NONE {
            self.note_primary_ahead(&peer_hellos);
            let quiet = Duration::from_millis(self.cfg.replica_timeout_ms.max(1000) * 2);
            s.set_read_timeout(Some(quiet))?;
        }
        let mut files: HashMap<usize, File> = HashMap::new();
        let mut acks = Vec::new();
        let mut pending_acks = 0usize;
        let mut conn = ApplyConn::new(conn_id, peer_link == LINK_NONE);
        loop {
            // Acks go out in one write just before we would block for more input: one
            // syscall per batch of applied messages, not per message.
            let (frame, seq) = match rbuf.next_ref()? {
                Some(m) => m,
                None => {
                    if !acks.is_empty() {
                        s.write_all(&acks)?;
                        acks.clear();
                        pending_acks = 0;
                    }
                    rbuf.fill(&mut s)?;
                    continue;
                }
            };
            if conn.supersedes(&frame) {
                self.supersede_older(conn.id());
            }
            // Counted before the fence is read, so a promotion that set the fence either
            // stops this message or waits for it (fence_for_promotion).
            self.applying.fetch_add(1, Ordering::SeqCst);
            struct Applying<'a>(&'a AtomicUsize);
            impl Drop for Applying<'_> {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let _applying = Applying(&self.applying);
            if self.apply_fenced.load(Ordering::SeqCst) {
                tracing::warn!(
                    "this node is primary now: closing the old primary's replica connection"
                );
                return Err(std::io::Error::other("this node was promoted"));
            }
            let gate = self.apply_gate.read().unwrap_or_else(|p| p.into_inner());
            // The fence again under the gate: waiting for it (a resync raising it) may
            // have taken longer than a promotion waits for the messages being applied.
            match conn.admit(&gate, self.apply_fenced.load(Ordering::SeqCst)) {
                Admit::Apply => {}
                Admit::Promoted => return Err(std::io::Error::other("this node was promoted")),
                Admit::Superseded => {
                    tracing::warn!(
                        "closing a replica connection from before the primary's current resync: \
                         what it still carries is stale"
                    );
                    return Err(std::io::Error::other("superseded by a newer resync"));
                }
            }
            let lun = |key| self.lun_by_key(key).map(|i| (i, self.luns[i].size_bytes()));
            let status = match conn.plan(frame, lun) {
                Apply::Answer(status) => status,
                Apply::Refused(why) => {
                    tracing::error!(%why, "refused an operation from the peer");
                    AckStatus::Refused
                }
                Apply::Change(change) => self.apply_change(&mut files, change),
                Apply::Flush { lun } => {
                    let status = self.apply_at(&mut files, lun, (0, 0), Allocates::Nothing, |f| {
                        f.sync_data()
                    });
                    if status != AckStatus::Ok {
                        self.distrust_local(self.luns[lun].key, "a flush failed");
                    }
                    status
                }
                Apply::Complete { lun, gen } => self.complete_resync(&files, lun, &gen),
                Apply::StorePr {
                    lun,
                    origin,
                    version,
                    state,
                } => self.store_pr(lun, origin, version, &state),
                Apply::Digest { lun, region } => match region_digest(&self.luns[lun], region) {
                    Ok(digest) => {
                        let digest = Message::VerifyDigest {
                            lun_key: self.luns[lun].key,
                            region,
                            digest,
                        };
                        wire::encode(&digest, seq, &mut acks);
                        continue;
                    }
                    Err(e) => AckStatus::IoError(e.raw_os_error().unwrap_or(libc::EIO)),
                },
                Apply::Snapshot {
                    lun,
                    op,
                    guid,
                    name,
                } => self.apply_snapshot(lun, op, guid, &name),
                Apply::FollowSnapshots { lun, guids } => self.follow_snapshots(lun, &guids),
                Apply::Progress {
                    lun,
                    done_bytes,
                    total_bytes,
                    eta_ms,
                } => {
                    self.luns[lun]
                        .pair()
                        .progress_heard(done_bytes, total_bytes, eta_ms);
                    AckStatus::Ok
                }
            };
            // Not held while acks are written: a stale connection's write may block on a
            // peer that stopped reading, and a resync waits for this lock.
            drop(gate);
            wire::encode(&Message::Ack { seq, status }, 0, &mut acks);
            pending_acks += 1;
            if pending_acks >= ACK_BATCH {
                // Do not hold early acks until a whole read's worth of writes is applied:
                // the primary's queue depth is only refilled as acks arrive.
                s.write_all(&acks)?;
                acks.clear();
                pending_acks = 0;
            }
        }
    }

    /// On a secondary, when a resync (control connection `conn_id`) starts changing data:
    /// every connection accepted before it belongs to a mirroring round the primary gave
    /// up on (it reset its links, recorded their unacknowledged writes dirty, and this
    /// resync copies those regions). What such a connection still carries (the socket
    /// buffers of a node that was paused, or of a partition that healed) must not land
    /// after the copy: the copies would differ while both sides say UpToDate. Waits for
    /// the messages being applied now; the old connections close at their next message.
    pub(super) fn supersede_older(&self, conn_id: u64) {
        self.apply_gate
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .supersede_older(conn_id);
    }

    /// Performs a change of a LUN's bytes (`ApplyConn::plan` checked its range).
    fn apply_change(&self, files: &mut HashMap<usize, File>, change: Change<'_>) -> AckStatus {
        let Change {
            lun,
            offset,
            op,
            resync,
        } = change;
        if resync {
            let l = &self.luns[lun];
            // Inconsistent until the resync completes: persist that first.
            let mut p = l.pair();
            let persist = p.resync_data_arriving();
            if let Err(e) = l.persist_if(&mut p, persist) {
                tracing::error!(lun = l.key, error = %e, "cannot record this node inconsistent");
            }
        }
        let len = op.len();
        match op {
            // The hot path: straight from the receive buffer to the file.
            ChangeOp::Write { data, fua } => {
                self.apply_at(files, lun, (offset, len), Allocates::Data, |f| {
                    crate::disk::inline_write::write_all_chunked(f, &data, offset)?;
                    if fua {
                        f.sync_data()?;
                    }
                    Ok(())
                })
            }
            ChangeOp::Punch { .. } => {
                self.apply_at(files, lun, (offset, len), Allocates::Hole, |f| {
                    punch(f, offset, len)
                })
            }
            // Zeroed in place, the blocks stay allocated (as on the primary).
            ChangeOp::ZeroRange { .. } => {
                self.apply_at(files, lun, (offset, len), Allocates::Data, |f| {
                    zero_range(f, offset, len)
                })
            }
        }
    }

    /// The resync into LUN `i` completed: everything copied (and punched) must be on stable
    /// storage before the source forgets which regions it copied; then the ids are adopted.
    fn complete_resync(&self, files: &HashMap<usize, File>, i: usize, gen: &GenIds) -> AckStatus {
        let l = &self.luns[i];
        let synced = match files.get(&i) {
            Some(f) => f.sync_data(),
            None => File::open(&l.backing).and_then(|f| f.sync_data()),
        };
        if let Err(e) = synced {
            self.distrust_local(l.key, "the resync's flush failed");
            return AckStatus::IoError(e.raw_os_error().unwrap_or(libc::EIO));
        }
        let mut p = l.pair();
        let persist = p.resync_done_target(gen);
        match l.persist_if(&mut p, persist) {
            Ok(()) => {
                p.resync_target_recorded();
                tracing::info!(lun = l.key, "resync complete: up to date");
                AckStatus::Ok
            }
            Err(e) => AckStatus::IoError(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    /// Stores reservation snapshot (`origin`, `version`) of LUN `i` if it is newer than the
    /// one applied last. Checked and applied under one lock: snapshots arrive on every
    /// core's link, and an older one (overtaken on another link) must not replace a newer.
    fn store_pr(&self, i: usize, origin: u64, version: u64, state: &[u8]) -> AckStatus {
        let Some(reg) = self.registry() else {
            return AckStatus::Refused;
        };
        let Ok(st) = proto::scsi::pr::PrState::decode(state) else {
            return AckStatus::Refused;
        };
        let mut applied = self.luns[i]
            .pr_applied
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !replica::pair::pr_snapshot_supersedes(*applied, (origin, version)) {
            return AckStatus::Ok;
        }
        *applied = (origin, version);
        let lun = &reg.luns[i];
        lun.with_pr(|cur| *cur = st.clone());
        match lun.persist_pr(&st) {
            Ok(()) => AckStatus::Ok,
            Err(e) => AckStatus::IoError(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    /// Runs `f` on LUN `i`'s backing file (opened once per connection), keeping its
    /// allocation map right around it (`effect`) for the range `offset..offset + len`.
    fn apply_at(
        &self,
        files: &mut HashMap<usize, File>,
        i: usize,
        (offset, len): (u64, u64),
        effect: Allocates,
        f: impl FnOnce(&File) -> std::io::Result<()>,
    ) -> AckStatus {
        if let std::collections::hash_map::Entry::Vacant(slot) = files.entry(i) {
            match OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.luns[i].backing)
            {
                Ok(file) => {
                    slot.insert(file);
                }
                Err(e) => return AckStatus::IoError(e.raw_os_error().unwrap_or(libc::EIO)),
            }
        }
        let Some(file) = files.get(&i) else {
            return AckStatus::Refused;
        };
        let alloc = &self.luns[i].alloc;
        if effect == Allocates::Data {
            // Before the data can reach the file (disk/alloc_map.rs).
            alloc.mark_data(offset, len);
        }
        match f(file) {
            Ok(()) => {
                // Done: a clone staged meanwhile clones it again (snapshot/staging.rs).
                let l = &self.luns[i];
                if effect != Allocates::Nothing && len > 0 {
                    l.ranges.note_written(
                        offset / l.block_bytes,
                        offset.saturating_add(len).div_ceil(l.block_bytes),
                    );
                }
                if effect == Allocates::Hole {
                    // Done, and the primary sends nothing that overlaps an operation
                    // it has not had acknowledged: no write to these chunks runs now.
                    alloc.mark_hole(offset, len);
                }
                AckStatus::Ok
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => AckStatus::NoSpace,
            Err(e) => AckStatus::IoError(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }
}

/// What an applied operation does to the allocation map (disk/alloc_map.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Allocates {
    /// It writes data (or allocates): the chunks are marked before it runs.
    Data,
    /// It deallocates: the chunks it covers whole are cleared once it is done.
    Hole,
    /// Neither (a flush).
    Nothing,
}
