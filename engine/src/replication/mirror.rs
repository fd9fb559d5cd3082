//! The primary's data links: each core's mirrored operations framed and sent by its link
//! writer, acks taken by its link reader, and what happens when the peer is lost.

use super::*;

/// The link writer's longest sleep between looks at its reset flag and at every link's ack
/// deadlines (its own deadline wakes it sooner).
const LINK_POLL: Duration = Duration::from_millis(50);

impl Replication {
    /// The whole LUN `index` changed outside the mirrored write path (SANITIZE): every
    /// region is marked dirty and the peer is declared outdated, so the manager reconnects
    /// and copies them (holes as deallocations). The caller still holds the LUN's range
    /// lock, so the copy waits for it and sees the final data.
    pub fn lun_rewritten(&self, index: usize, why: &str) {
        if let Err(e) = self.mark_lun_dirty(index) {
            tracing::error!(lun = index, error = %e, "cannot record the rewritten LUN");
        }
        self.peer_lost(why);
    }

    /// Marks every region of LUN `index` dirty, durably: before a change outside the
    /// mirrored write path (SANITIZE) begins, so that a crash in its middle still resyncs
    /// the whole LUN (the write-intent log knows nothing of it).
    pub fn mark_lun_dirty(&self, index: usize) -> std::io::Result<()> {
        let Some(l) = self.luns.get(index) else {
            return Ok(());
        };
        let mut p = l.pair();
        let persist = p.mark_all();
        l.persist_if(&mut p, persist)
    }

    pub(super) fn link_writer(self: Arc<Self>, core: usize, rx: Receiver<RepReq>) {
        self.keep_off_core(core);
        let link = &self.links[core];
        // The link and the mirroring round it was connected in (Mirror::link_failed).
        let mut stream: Option<(TcpStream, u64)> = None;
        let mut wbuf = Vec::new();
        let mut batch: Vec<(u64, Pending)> = Vec::new();
        loop {
            // Wake at this link's first ack deadline (the state machine's poll_timeout), or
            // after LINK_POLL to see a reset or another link's deadline.
            let wait = link
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .poll_timeout(self.cfg.replica_timeout_ms)
                .map_or(LINK_POLL, |at_ms| {
                    Duration::from_millis(at_ms.saturating_sub(now_ms(&self.epoch))).min(LINK_POLL)
                });
            let req = match recv_polling(&rx, wait) {
                Ok(r) => Some(r),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            };
            self.check_timeouts();
            if link.reset.swap(false, Ordering::AcqRel) {
                if let Some((s, _)) = stream.take() {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            }
            let Some(mut req) = req else { continue };
            if !self.peer_up.load(Ordering::Acquire) {
                match self.degraded(core, req) {
                    None => continue,
                    // Mirroring resumed meanwhile: send it like any other.
                    Some(r) => req = r,
                }
            }
            if stream.is_none() {
                match self.connect_link(core) {
                    Ok(connected) => stream = Some(connected),
                    Err((e, round)) => {
                        tracing::warn!(error = %e, "replica link connect failed");
                        self.link_failed(round, "connect failed");
                        if let Some(r) = self.degraded(core, req) {
                            // Only if the peer came back in between; retry from the top.
                            let _ = self.links[core].done_tx.send(RepDone {
                                token: r.token,
                                ok: false,
                            });
                            self.links[core].bell.ring();
                        }
                        continue;
                    }
                }
            }
            wbuf.clear();
            batch.clear();
            // One clock read for both: ms for the ack deadlines, ns for the latency figures.
            let since = self.epoch.elapsed();
            let (sent_ms, sent_ns) = (since.as_millis() as u64, since.as_nanos() as u64);
            // More requests already queued go out in the same write (bounded batch).
            let mut next = Some(req);
            while let Some(req) = next.take() {
                let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                // Lent bytes are read here, before the request is pending (LentBytes).
                let (offset, len) = self.to_frame(req.lun, req.op, seq, &mut wbuf);
                batch.push((
                    seq,
                    Pending {
                        token: req.token,
                        lun: req.lun,
                        offset,
                        len,
                        sent_ms,
                        sent_ns,
                    },
                ));
                if wbuf.len() < LINK_BATCH_BYTES && self.peer_up.load(Ordering::Acquire) {
                    next = rx.try_recv().ok();
                }
            }
            // Recorded before the bytes leave: an ack can only follow the write. Under the
            // coordinator's lock: a peer loss since the check above drained the shards
            // already, and what it did not see must be recorded like any write while the
            // peer is away (nothing would ever answer it otherwise).
            let send = self.with_mirror(|m, port| {
                let mut shard = link.pending.lock().unwrap_or_else(|p| p.into_inner());
                m.sending(port, &mut shard, core, batch.drain(..))
            });
            if !send {
                continue;
            }
            let sent = stream
                .as_mut()
                .map(|(s, round)| (self.send_watched(s, &wbuf), *round));
            if let Some((Err(e), round)) = sent {
                tracing::debug!(core, error = %e, "replica link send failed");
                stream = None;
                self.link_failed(round, "send failed");
            }
        }
    }

    /// Connects core `core`'s data link and starts its ack reader; returns the link and
    /// the mirroring round it belongs to (read before connecting). A link whose connect
    /// straddled a loss and the next round's start belongs to the old round: it is closed
    /// and connected again once, in the new round. The error carries the round too.
    fn connect_link(
        self: &Arc<Self>,
        core: usize,
    ) -> Result<(TcpStream, u64), (std::io::Error, u64)> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let round = self.with_mirror(|m, _| m.round());
            let (s, rbuf, _) = self
                .connect(u16::try_from(core).unwrap_or(LINK_NONE))
                .and_then(|(s, rbuf, h)| {
                    // Sends give up waiting now and then (send_watched says why).
                    s.set_write_timeout(Some(SEND_POLL))?;
                    Ok((s, rbuf, h))
                })
                .map_err(|e| (e, round))?;
            if attempts < 2 && self.with_mirror(|m, _| m.round()) != round {
                let _ = s.shutdown(std::net::Shutdown::Both);
                continue;
            }
            if let Ok(r) = s.try_clone() {
                let rep = Arc::clone(self);
                let _ = std::thread::Builder::new()
                    .name(format!("twinsan-link{core}-rx"))
                    .spawn(move || rep.link_reader(core, round, r, rbuf));
            }
            return Ok((s, round));
        }
    }

    /// Writes all of `bytes` to the link, checking the acknowledgement deadlines whenever
    /// the socket makes no progress for [`SEND_POLL`] (its write timeout). Why: a hung
    /// peer stops reading, the socket buffers fill and a plain blocking write would hold
    /// the link writer, the one thread that notices late acks, forever; and a write timeout
    /// alone restarts with every partial write. Fails once the peer is declared lost.
    pub(super) fn send_watched(&self, s: &mut TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            match s.write(bytes) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    self.check_timeouts();
                    if !self.peer_up.load(Ordering::Acquire) {
                        return Err(e);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Appends the frame of a mirrored operation to `wbuf`; returns the byte range it
    /// covers. Called by the link writer only, before the request is recorded as pending.
    pub(super) fn to_frame(
        &self,
        lun: usize,
        op: RepOp,
        seq: u64,
        wbuf: &mut Vec<u8>,
    ) -> (u64, u64) {
        let key = self.luns[lun].key;
        let (msg, offset, len) = match op {
            RepOp::Write { offset, data, fua } => {
                // SAFETY: this is the link writer, and the request is not pending yet.
                let bytes = unsafe { data.bytes() };
                let write = wire::WriteRef {
                    lun_key: key,
                    offset_bytes: offset,
                    fua,
                    data: bytes,
                };
                wire::encode_write(&write, seq, wbuf);
                return (offset, bytes.len() as u64);
            }
            RepOp::Zero { offset, len, unmap } => (
                Message::WriteZeroes {
                    lun_key: key,
                    offset_bytes: offset,
                    len_bytes: len,
                    unmap,
                },
                offset,
                len,
            ),
            RepOp::Flush => (Message::Flush { lun_key: key }, 0, 0),
            RepOp::PrState { state, version } => (
                Message::PrState {
                    lun_key: key,
                    origin: self.instance,
                    version,
                    state,
                },
                0,
                0,
            ),
        };
        wire::encode(&msg, seq, wbuf);
        (offset, len)
    }

    /// Takes the acks of core `core`'s link, connected in mirroring round `round`.
    pub(super) fn link_reader(
        self: Arc<Self>,
        core: usize,
        round: u64,
        mut s: TcpStream,
        mut rbuf: RxBuf,
    ) {
        self.keep_off_core(core);
        let link = &self.links[core];
        // Acks are taken a read's worth at a time: one lock of the pending map and one
        // wake-up of the core thread per read, not per ack.
        let mut acks: Vec<(u64, AckStatus)> = Vec::new();
        loop {
            let ended = loop {
                match rbuf.next() {
                    Ok(Some((Message::Ack { seq, status }, _))) => acks.push((seq, status)),
                    Ok(Some(_)) => {}
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            };
            // A failure the peer reports detaches it (LinkShard::take_acks says why): the
            // range is recorded and the write completes on this node alone.
            if !acks.is_empty() {
                // One clock read per read's worth of acks, on this thread, not the core's.
                let now_ns = self.epoch.elapsed().as_nanos() as u64;
                let out = link
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take_acks_observed(acks.drain(..), |p| {
                        link.ack_latency
                            .observe_shared(now_ns.saturating_sub(p.sent_ns))
                    });
                for &token in &out.answered {
                    let _ = link.done_tx.send(RepDone { token, ok: true });
                }
                if !out.answered.is_empty() {
                    link.bell.ring();
                }
                if let Some((status, offset)) = out.peer_failed {
                    tracing::error!(
                        ?status,
                        offset,
                        "the peer failed a mirrored write: declaring it lost, this node goes on alone"
                    );
                    self.peer_lost("the peer failed a mirrored write");
                }
            }
            let failed = match ended {
                Some(e) => Some(e),
                None => rbuf.fill(&mut s).err(),
            };
            if failed.is_some() {
                if self.peer_up.load(Ordering::Acquire) {
                    self.link_failed(round, "link closed");
                }
                return;
            }
        }
    }

    pub(super) fn check_timeouts(&self) {
        if !self.peer_up.load(Ordering::Acquire) {
            return;
        }
        let now = now_ms(&self.epoch);
        let late = self.links.iter().any(|l| {
            l.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .overdue(now, self.cfg.replica_timeout_ms)
        });
        if late {
            self.peer_lost("no acknowledgement within replica_timeout_ms");
        }
    }

    /// The peer is gone: record it outdated (bumped generation, bitmap covering every
    /// unacknowledged write) durably, then complete the waiting writes (degrade) or hold
    /// them (suspend). `Mirror::peer_lost` decides; this logs why.
    pub(super) fn peer_lost(&self, why: &str) {
        if self.with_mirror(|m, port| m.peer_lost(port)) {
            tracing::warn!(reason = why, mode = ?self.cfg.on_peer_loss, "replication peer lost");
        }
    }

    /// A data link of mirroring round `round` failed: the peer is lost only if that round
    /// still stands (`Mirror::link_failed`).
    fn link_failed(&self, round: u64, why: &str) {
        if self.with_mirror(|m, port| m.link_failed(port, round)) {
            tracing::warn!(reason = why, mode = ?self.cfg.on_peer_loss, "replication peer lost");
        }
    }

    /// A request while the peer is away: its regions are recorded (durably, when new) and
    /// it is answered or held. Returns the request if mirroring resumed meanwhile (the
    /// caller sends it).
    pub(super) fn degraded(&self, core: usize, req: RepReq) -> Option<RepReq> {
        let range = match &req.op {
            RepOp::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
            RepOp::Zero { offset, len, .. } => Some((*offset, *len)),
            RepOp::Flush | RepOp::PrState { .. } => None,
        };
        self.with_mirror(|m, port| {
            if m.mirroring() {
                return Some(req);
            }
            m.alone(port, core, req.token, req.lun, range);
            None
        })
    }

    /// A command failed on this node (out of space, an I/O error) after its change to
    /// `[offset, offset + len)` of LUN `lun` was mirrored: the peer may have stored what
    /// this node did not, and the copies differ there. The range goes into the dirty
    /// bitmap and the peer is declared lost, so the resync that follows at once makes the
    /// peer's range equal to ours again (as `verify --repair` does). While the peer is
    /// away already, the degraded path recorded the range.
    pub fn diverged(&self, lun: usize, offset: u64, len: u64) {
        if !self.peer_up.load(Ordering::Acquire) || len == 0 {
            return;
        }
        if self.with_mirror(|m, port| m.diverged(port, lun, offset, len)) {
            tracing::warn!(
                lun = self.luns.get(lun).map(|l| l.key),
                offset,
                len,
                "a mirrored command failed on this node: resyncing its range to the peer"
            );
            tracing::warn!(reason = "a mirrored command failed on this node", mode = ?self.cfg.on_peer_loss, "replication peer lost");
        }
    }
}
