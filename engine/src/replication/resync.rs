//! The primary's manager: reconnects to a lost peer, plans the resync from the generation ids
//! (`replica::pair`), copies the dirty regions under their range locks, and watches the peer.

use super::*;

/// Regions holding data (SEEK_DATA), for the first sync of a thin LUN.
pub(super) fn allocated_regions(lun: &crate::lun::Lun, region_bytes: u64) -> Vec<u64> {
    let mut v: Vec<u64> = Vec::new();
    for (start, len) in lun.data_extents() {
        for r in start / region_bytes..(start + len).div_ceil(region_bytes) {
            if v.last() != Some(&r) {
                v.push(r);
            }
        }
    }
    v
}

/// A resync's pace: bytes copied since it started (held to `resync_rate`), and when the
/// target last heard the progress.
struct Pace {
    started: Instant,
    copied: u64,
    progress_sent: Instant,
}

impl Replication {
    pub(super) fn manage(self: Arc<Self>) {
        let mut retry_ms = RECONNECT_MS;
        loop {
            std::thread::sleep(Duration::from_millis(retry_ms));
            if self.peer_up.load(Ordering::Acquire) || !self.is_primary() {
                continue;
            }
            match self.connect(LINK_NONE) {
                Ok((s, rbuf, hellos)) => match self.resync(s, rbuf, &hellos) {
                    Ok(()) => retry_ms = RECONNECT_MS,
                    Err(e) => {
                        // A peer that keeps failing the resync (out of space, a bad disk,
                        // a split brain) is retried less and less often, not every 500 ms.
                        retry_ms = (retry_ms * 2).min(RESYNC_RETRY_MAX_MS);
                        tracing::warn!(error = %e, retry_ms, "resync interrupted");
                    }
                },
                Err(e) => tracing::debug!(error = %e, "peer not reachable"),
            }
        }
    }

    pub(super) fn resync(
        &self,
        mut s: TcpStream,
        mut rbuf: RxBuf,
        hellos: &[LunHello],
    ) -> std::io::Result<()> {
        let Some(reg) = self.registry() else {
            return Ok(());
        };
        let mut wbuf = Vec::new();
        let mut plans: Vec<(usize, ResyncPlan)> = Vec::new();
        for (i, l) in self.luns.iter().enumerate() {
            let Some(h) = hellos.iter().find(|h| h.lun_key == l.key) else {
                tracing::error!(lun = l.key, "peer does not have this LUN");
                return Err(std::io::Error::other("LUN missing on peer"));
            };
            let planned = l.pair().plan_resync(h);
            let plan = match planned {
                Ok(plan) => plan,
                Err(PlanRefusal::Geometry {
                    size_bytes,
                    peer_size_bytes,
                    region_bytes,
                    peer_region_bytes,
                }) => {
                    tracing::error!(
                        lun = l.key,
                        size_bytes,
                        peer_size_bytes,
                        region_bytes,
                        peer_region_bytes,
                        "the peer's LUN differs in size or region size: not mirroring to it (fix the configs)"
                    );
                    return Err(std::io::Error::other(
                        "LUN size or region size differs on peer",
                    ));
                }
                Err(PlanRefusal::SplitBrain) => {
                    let local = l.pair().meta().gen;
                    tracing::error!(lun = l.key, ?local, peer = ?h.gen, "SPLIT BRAIN: both nodes changed the data; not resolved automatically");
                    return Err(std::io::Error::other("split brain"));
                }
                Err(PlanRefusal::Refused(decision)) => {
                    let local = l.pair().meta().gen;
                    tracing::error!(lun = l.key, ?decision, ?local, peer = ?h.gen, "peer has newer or unrelated data: refusing to sync from here");
                    return Err(std::io::Error::other("refusing resync"));
                }
            };
            if plan.every_region_after_crash {
                tracing::warn!(
                    lun = l.key,
                    peer_crashed = h.flags.crashed,
                    "a node stopped uncleanly: resync covers every region"
                );
            }
            plans.push((i, plan));
        }
        self.open_round(&mut s, &mut rbuf, &mut wbuf)?;
        // Mirror new writes from now on: a region copy and a write to the same region are
        // serialized by the range lock, so one pass over what is dirty now suffices (writes
        // during the resync reach the peer directly instead of dirtying regions again).
        let round = self.with_mirror(|m, _| m.start_round());
        let r = self.copy_all(&reg, &mut s, &mut rbuf, &mut wbuf, plans, round);
        if r.is_ok() {
            for l in &self.luns {
                l.pair().crash_covered();
            }
        }
        match &r {
            // Whatever was not copied stays dirty; stop mirroring to a half-synced peer.
            Err(e) => self.peer_lost(&format!("resync failed: {e}")),
            Ok(()) => self.watch_peer(&mut s, &mut rbuf),
        }
        let _ = s.shutdown(std::net::Shutdown::Both);
        r
    }

    /// The resync's first change, acknowledged before the round mirrors anything: the peer
    /// stops applying what connections accepted before this control connection still
    /// carry (`ApplyGate::supersede_older`, raised once the messages being applied have
    /// finished). Why: a write mirrored on the round's new data links could otherwise be
    /// applied before that, and a stale write an older link still held (one this node gave
    /// up on, whose region a copy had already made clean) landed over it: the copies
    /// differed while both said UpToDate (replica sim seed 618664).
    fn open_round(
        &self,
        s: &mut TcpStream,
        rbuf: &mut RxBuf,
        wbuf: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        let Some(l) = self.luns.first() else {
            return Ok(());
        };
        let start = Message::ResyncProgress {
            lun_key: l.key,
            done_bytes: 0,
            total_bytes: 0,
            eta_ms: 0,
        };
        self.request(s, rbuf, wbuf, &start, "resync start")
    }

    /// While mirroring, pings the peer over the resync connection every [`PING_INTERVAL`]
    /// and waits up to `replica_timeout_ms` for each answer. Why: the data links only
    /// carry writes, so an idle pair would not notice a dead or hung peer until the next
    /// write (status would say "mirroring" meanwhile); and this connection tells the peer
    /// that a primary is there (its `promote` refuses to make a second one). Returns when
    /// the peer is lost or this node stops being primary (which closes the connection).
    pub(super) fn watch_peer(&self, s: &mut TcpStream, rbuf: &mut RxBuf) {
        let timeout = Duration::from_millis(self.cfg.replica_timeout_ms);
        if s.set_read_timeout(Some(timeout)).is_err() || s.set_write_timeout(Some(timeout)).is_err()
        {
            return;
        }
        let mut wbuf = Vec::new();
        let watching = || self.peer_up.load(Ordering::Acquire) && self.is_primary();
        while watching() {
            std::thread::sleep(PING_INTERVAL);
            if !watching() {
                return;
            }
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            let ping = Message::Ping {
                now_ms: now_ms(&self.epoch),
            };
            let answer = send(s, &ping, seq, &mut wbuf).and_then(|()| recv(s, rbuf));
            match answer {
                Ok((Message::Ack { seq: acked, status }, _))
                    if acked == seq && status == AckStatus::Ok => {}
                other => {
                    if watching() {
                        tracing::warn!(answer = ?other.map(|(m, _)| m), "the peer did not answer a ping");
                        self.peer_lost("the peer stopped answering pings");
                    }
                    return;
                }
            }
        }
    }

    /// Tells the sync target how far the resync of `l` has come (its `status` shows it).
    pub(super) fn send_progress(
        &self,
        s: &mut TcpStream,
        rbuf: &mut RxBuf,
        wbuf: &mut Vec<u8>,
        l: &RepLun,
    ) -> std::io::Result<()> {
        let (done_bytes, total_bytes, eta_ms) = l.pair().source_progress(now_ms(&self.epoch));
        let progress = Message::ResyncProgress {
            lun_key: l.key,
            done_bytes,
            total_bytes,
            eta_ms,
        };
        self.request(s, rbuf, wbuf, &progress, "resync progress")
    }

    pub(super) fn copy_all(
        &self,
        reg: &Registry,
        s: &mut TcpStream,
        rbuf: &mut RxBuf,
        wbuf: &mut Vec<u8>,
        plans: Vec<(usize, ResyncPlan)>,
        round: u64,
    ) -> std::io::Result<()> {
        let mut pace = Pace {
            started: Instant::now(),
            copied: 0,
            progress_sent: Instant::now(),
        };
        for (i, plan) in plans {
            self.copy_lun(reg, s, rbuf, wbuf, (i, &plan, round), &mut pace)?;
        }
        if !self.with_mirror(|m, port| m.round_synced(port, round)) {
            // Held writes were recorded by the loss; they stay held (suspend) until the
            // next resync or `outdate-peer`.
            return Err(std::io::Error::other("the peer was lost during the resync"));
        }
        Ok(())
    }

    /// Resyncs LUN `i` by `plan`: its regions (and whatever gets dirty behind them), its
    /// reservations, then the completion the peer adopts.
    fn copy_lun(
        &self,
        reg: &Registry,
        s: &mut TcpStream,
        rbuf: &mut RxBuf,
        wbuf: &mut Vec<u8>,
        (i, plan, round): (usize, &ResyncPlan, u64),
        pace: &mut Pace,
    ) -> std::io::Result<()> {
        let l = &self.luns[i];
        let lun = &reg.luns[i];
        let region_bytes = l.region_bytes();
        // Everything planned plus everything dirty (the bitmap only shrinks from here); the
        // plan is durable in the bitmap first (PairLun::begin_resync says why).
        let regions = {
            let mut p = l.pair();
            let (regions, persist) = p.begin_resync(plan, now_ms(&self.epoch));
            l.persist_if(&mut p, persist)?;
            regions
        };
        tracing::info!(
            lun = l.key,
            regions = regions.len(),
            initial = plan.initial,
            "resync started"
        );
        let file = File::open(&l.backing)?;
        // The target marks itself inconsistent on the first ResyncData: send the start of
        // the first region as data even if it is a hole, before any hole region goes as
        // WriteZeroes (which the target cannot tell from a mirrored write).
        if let Some(&first) = regions.first() {
            let start = first * region_bytes;
            let end = start + (lun.size_bytes - start).min(HEAD_CHUNK_BYTES);
            let bs = lun.block_size as u64;
            // Not waiting for parked writes (`RangeLock::lock_for_copy`): writes held while
            // the peer was away are answered only once this resync copied their regions.
            let _guard =
                lun.ranges
                    .lock_for_copy(start / bs, end.div_ceil(bs), Duration::from_micros(200));
            pace.copied += self.copy_range(s, rbuf, wbuf, &file, l, start, end)?;
        }
        self.send_progress(s, rbuf, wbuf, l)?;
        pace.progress_sent = Instant::now();
        // Passes until the bitmap is clean: a region can be dirtied again behind the pass
        // (a mirrored write the peer failed, a write that failed here after being
        // mirrored), and the peer may only hear "done" when it holds everything.
        let mut pass = regions;
        let mut passes = 0;
        let gen = loop {
            for region in pass {
                if !self.peer_up.load(Ordering::Acquire) {
                    return Err(std::io::Error::other("the peer was lost during the resync"));
                }
                pace.copied += self.copy_region(s, rbuf, wbuf, &file, lun, l, region)?;
                self.keep_pace(s, rbuf, wbuf, l, pace)?;
            }
            // Under the coordinator's lock: a peer loss either happened before (and its
            // record stands: no completion) or comes after the completion is persisted (and
            // records the peer outdated again).
            let mirror = self.mirror.lock().unwrap_or_else(|p| p.into_inner());
            if !mirror.round_stands(round) {
                return Err(std::io::Error::other("the peer was lost during the resync"));
            }
            let mut p = l.pair();
            match p.end_pass(plan.initial, passes, random8()) {
                PassEnd::Complete { gen, persist } => {
                    l.persist_if(&mut p, persist)?;
                    break gen;
                }
                PassEnd::Again(dirty) => pass = dirty,
                PassEnd::GiveUp { dirty } => {
                    return Err(std::io::Error::other(format!(
                        "{dirty} regions keep getting dirty during the resync"
                    )));
                }
            }
            passes += 1;
        };
        // Reservations changed while the peer was away were not mirrored: the peer takes
        // the current state before it is declared up to date.
        let (pr, version) = lun.pr_snapshot();
        let pr = Message::PrState {
            lun_key: l.key,
            origin: self.instance,
            version,
            state: pr,
        };
        self.request(s, rbuf, wbuf, &pr, "resync reservations")?;
        let done = Message::ResyncDone {
            lun_key: l.key,
            gen,
        };
        self.request(s, rbuf, wbuf, &done, "resync completion")?;
        // Under the coordinator's lock, as the pass's end: a loss since then voided it.
        let mirror = self.mirror.lock().unwrap_or_else(|p| p.into_inner());
        if !mirror.round_stands(round) {
            return Err(std::io::Error::other("the peer was lost during the resync"));
        }
        let mut p = l.pair();
        let persist = p.completion_acknowledged();
        if let Err(e) = l.persist_if(&mut p, persist) {
            // The record still says the peer is outdated: only a longer resync next time.
            tracing::warn!(lun = l.key, error = %e, "cannot record the resync's completion");
        }
        drop(p);
        drop(mirror);
        tracing::info!(
            lun = l.key,
            copied_bytes = pace.copied,
            "resync complete; mirroring"
        );
        Ok(())
    }

    /// Sends `msg` on the control connection and waits for its Ok ack.
    pub(super) fn request(
        &self,
        s: &mut TcpStream,
        rbuf: &mut RxBuf,
        wbuf: &mut Vec<u8>,
        msg: &Message,
        what: &str,
    ) -> std::io::Result<()> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        send(s, msg, seq, wbuf)?;
        expect_ok(recv(s, rbuf)?.0, what)
    }

    /// Holds the resync to `resync_rate`, telling the target the progress meanwhile. The
    /// pause comes in slices with progress between them: a large region at a low rate
    /// pauses longer than the target waits on a silent control connection (twice
    /// `replica_timeout_ms`).
    fn keep_pace(
        &self,
        s: &mut TcpStream,
        rbuf: &mut RxBuf,
        wbuf: &mut Vec<u8>,
        l: &RepLun,
        pace: &mut Pace,
    ) -> std::io::Result<()> {
        let due =
            Duration::from_secs_f64(pace.copied as f64 / self.cfg.resync_rate_bytes_per_s as f64);
        loop {
            if pace.progress_sent.elapsed() >= PROGRESS_INTERVAL {
                self.send_progress(s, rbuf, wbuf, l)?;
                pace.progress_sent = Instant::now();
            }
            match due.checked_sub(pace.started.elapsed()) {
                Some(wait) if !wait.is_zero() => {
                    std::thread::sleep(wait.min(PROGRESS_INTERVAL));
                }
                _ => return Ok(()),
            }
        }
    }

    /// Copies one region under its range lock (no write to it runs meanwhile) and clears
    /// its bit once the peer acknowledged it. Returns the bytes sent.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn copy_region(
        &self,
        s: &mut TcpStream,
        rbuf: &mut RxBuf,
        wbuf: &mut Vec<u8>,
        file: &File,
        lun: &crate::lun::Lun,
        l: &RepLun,
        region: u64,
    ) -> std::io::Result<u64> {
        let region_bytes = l.region_bytes();
        let bs = lun.block_size as u64;
        let start = region * region_bytes;
        let end = (start + region_bytes).min(lun.size_bytes);
        // Writes whose data is final and which wait only for the peer (parked) do not hold
        // the copy up: a held write waits for this copy (`RangeLock::lock_for_copy`).
        let _guard =
            lun.ranges
                .lock_for_copy(start / bs, end.div_ceil(bs), Duration::from_micros(200));
        let hole =
            lun.alloc.is_hole(start, end - start) || lun.seek(start, true).is_none_or(|d| d >= end);
        let sent = if hole {
            // Nothing allocated here: the peer deallocates the range (and reads zeros).
            let hole = Message::WriteZeroes {
                lun_key: l.key,
                offset_bytes: start,
                len_bytes: end - start,
                unmap: true,
            };
            self.request(s, rbuf, wbuf, &hole, "resync hole")?;
            0
        } else {
            self.copy_range(s, rbuf, wbuf, file, l, start, end)?
        };
        // Still under the range lock: a write to the region after this is mirrored.
        l.pair().region_copied(region);
        Ok(sent)
    }

    /// Sends `start..end` of the source file as ResyncData chunks, each acknowledged.
    /// The caller holds the range lock (or, for the head chunk, the data is rewritten under
    /// it by the region copy that follows).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn copy_range(
        &self,
        s: &mut TcpStream,
        rbuf: &mut RxBuf,
        wbuf: &mut Vec<u8>,
        file: &File,
        l: &RepLun,
        start: u64,
        end: u64,
    ) -> std::io::Result<u64> {
        let mut off = start;
        let mut sent = 0;
        while off < end {
            let n = ((end - off) as usize).min(RESYNC_CHUNK_BYTES);
            let mut data = vec![0u8; n];
            file.read_exact_at(&mut data, off)?;
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            send(
                s,
                &Message::ResyncData {
                    lun_key: l.key,
                    offset_bytes: off,
                    data,
                },
                seq,
                wbuf,
            )?;
            expect_ok(recv(s, rbuf)?.0, "resync data")?;
            off += n as u64;
            sent += n as u64;
        }
        Ok(sent)
    }
}
