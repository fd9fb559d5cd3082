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

    /// Plans the resync of every LUN from the peer's hellos, then drives the round and the
    /// watch after it (`replica::pair::SourceRun` decides each step; this thread performs it
    /// on the control connection `s`, the LUNs' files and range locks). Returns when the
    /// round failed (the peer is then lost: whatever was not copied stays dirty), or when
    /// the watch ended (the peer lost, or this node no longer primary).
    pub(super) fn resync(
        &self,
        mut s: TcpStream,
        mut rbuf: RxBuf,
        hellos: &[LunHello],
    ) -> std::io::Result<()> {
        let Some(reg) = self.registry() else {
            return Ok(());
        };
        let plans = self.plan_all(hellos)?;
        // The peer keeps exactly this node's snapshots (a cut it holds pending that this
        // node committed, none this node dropped).
        if let Err(e) = self.send_snapshot_lists(&reg, &mut s, &mut rbuf) {
            tracing::warn!(error = %e, "the peer did not follow this node's snapshot list");
        }
        let mut run = SourceRun::new(plans, self.source_timers(), now_ms(&self.epoch));
        let r = self.drive(&reg, &mut s, &mut rbuf, &mut run);
        if let Err(e) = &r {
            // Whatever was not copied stays dirty; stop mirroring to a half-synced peer.
            self.peer_lost(&format!("resync failed: {e}"));
        }
        let _ = s.shutdown(std::net::Shutdown::Both);
        r
    }

    /// The plan of each LUN for the peer that sent `hellos`, or why there is none.
    fn plan_all(&self, hellos: &[LunHello]) -> std::io::Result<Vec<(usize, ResyncPlan)>> {
        let mut plans = Vec::new();
        for (i, l) in self.luns.iter().enumerate() {
            if self.unreplicated(i) {
                continue;
            }
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
                Err(PlanRefusal::PeerAlsoPrimary) => {
                    tracing::warn!(
                        lun = l.key,
                        "the peer still says it is primary (an old primary that was frozen or \
                         cut off and has not stepped down yet): not syncing it until it does"
                    );
                    return Err(std::io::Error::other("the peer is primary too"));
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
        Ok(plans)
    }

    /// The resync's pace and timers (see `SourceTimers`).
    fn source_timers(&self) -> SourceTimers {
        SourceTimers {
            rate_bytes_per_s: self.cfg.resync_rate_bytes_per_s.max(1),
            progress_interval_ms: PROGRESS_INTERVAL.as_millis() as u64,
            ping_interval_ms: PING_INTERVAL.as_millis() as u64,
            ping_timeout_ms: self.cfg.replica_timeout_ms,
            answer_timeout_ms: CONTROL_ANSWER_TIMEOUT.as_millis() as u64,
            head_bytes: HEAD_CHUNK_BYTES,
        }
    }

    /// Performs `run`'s steps until it ends. The watch's end (the peer lost, this node
    /// demoted) is `Ok`; a failed round is the error.
    fn drive(
        &self,
        reg: &Registry,
        s: &mut TcpStream,
        rbuf: &mut RxBuf,
        run: &mut SourceRun,
    ) -> std::io::Result<()> {
        let mut wbuf = Vec::new();
        let mut files: Vec<Option<File>> = (0..self.luns.len()).map(|_| None).collect();
        loop {
            let watching = run.watching();
            if watching && !self.is_primary() {
                return Ok(());
            }
            let now = now_ms(&self.epoch);
            let step = run.next(now, self.peer_up.load(Ordering::Acquire));
            match step {
                SourceStep::Wait { until_ms } => {
                    std::thread::sleep(Duration::from_millis(until_ms.saturating_sub(now)));
                }
                SourceStep::Stop(why) if watching => {
                    tracing::debug!(%why, "the watch of the peer ends");
                    return Ok(());
                }
                SourceStep::Stop(why) => return Err(std::io::Error::other(why)),
                SourceStep::Over => return Ok(()),
                SourceStep::Ping => {
                    if !self.ping(s, rbuf, &mut wbuf) {
                        return Ok(());
                    }
                    run.sent(now_ms(&self.epoch), 0);
                }
                SourceStep::Finish => {
                    self.with_mirror(|m, port| run.finish(m, port, now))
                        .map_err(std::io::Error::other)?;
                    // The watch: each ping's answer within the replica timeout.
                    let timeout = Duration::from_millis(self.cfg.replica_timeout_ms);
                    s.set_read_timeout(Some(timeout))?;
                    s.set_write_timeout(Some(timeout))?;
                }
                step => self.resync_step(reg, s, rbuf, &mut wbuf, &mut files, run, step)?,
            }
        }
    }

    /// Performs one step of the round itself (copies, messages, pass ends, completions).
    #[allow(clippy::too_many_arguments)]
    fn resync_step(
        &self,
        reg: &Registry,
        s: &mut TcpStream,
        rbuf: &mut RxBuf,
        wbuf: &mut Vec<u8>,
        files: &mut [Option<File>],
        run: &mut SourceRun,
        step: SourceStep,
    ) -> std::io::Result<()> {
        let now = || now_ms(&self.epoch);
        match step {
            SourceStep::Open { lun } => {
                if let Some(i) = lun {
                    let start = Message::ResyncProgress {
                        lun_key: self.luns[i].key,
                        done_bytes: 0,
                        total_bytes: 0,
                        eta_ms: 0,
                    };
                    self.request(s, rbuf, wbuf, &start, "resync start")?;
                }
                let round = self
                    .with_mirror(|m, _| run.opened(m))
                    .map_err(std::io::Error::other)?;
                tracing::debug!(round, "resync round opened");
            }
            SourceStep::Begin { lun: i } => {
                let l = &self.luns[i];
                let mut p = l.pair();
                let persist = run.begin(&mut p, now());
                l.persist_if(&mut p, persist)?;
                drop(p);
                files[i] = Some(File::open(&l.backing)?);
                tracing::info!(
                    lun = l.key,
                    regions = run.pass_regions(),
                    initial = run.initial(),
                    "resync started"
                );
            }
            SourceStep::CopyHead {
                lun: i,
                offset,
                len,
            } => {
                let lun = &reg.luns[i];
                let bs = lun.block_size as u64;
                // Not waiting for parked writes (`RangeLock::lock_for_copy`): writes held
                // while the peer was away are answered only once this resync copied them.
                let _guard = lun.ranges.lock_for_copy(
                    offset / bs,
                    (offset + len).div_ceil(bs),
                    Duration::from_micros(200),
                );
                let file = lun_file(files, i)?;
                let sent =
                    self.copy_range(s, rbuf, wbuf, file, &self.luns[i], offset, offset + len)?;
                run.sent(now(), sent);
            }
            SourceStep::CopyRegion { lun: i, region } => {
                let file = lun_file(files, i)?;
                self.copy_region(s, rbuf, wbuf, file, &reg.luns[i], i, region, run)?;
            }
            SourceStep::Progress { lun: i } => {
                self.send_progress(s, rbuf, wbuf, &self.luns[i])?;
                run.sent(now(), 0);
            }
            SourceStep::EndPass { lun: i } => {
                // Under the coordinator's lock: a peer loss either happened before (and its
                // record stands: no completion) or comes after the completion is persisted
                // (and records the peer outdated again).
                let mirror = self.mirror.lock().unwrap_or_else(|p| p.into_inner());
                let l = &self.luns[i];
                let mut p = l.pair();
                let persist = run
                    .end_pass(&mirror, &mut p, random8())
                    .map_err(std::io::Error::other)?;
                l.persist_if(&mut p, persist)?;
            }
            SourceStep::Reservations { lun: i } => {
                let (pr, version) = reg.luns[i].pr_snapshot();
                let pr = Message::PrState {
                    lun_key: self.luns[i].key,
                    origin: self.instance,
                    version,
                    state: pr,
                };
                self.request(s, rbuf, wbuf, &pr, "resync reservations")?;
                run.sent(now(), 0);
            }
            SourceStep::Completion { lun: i, gen } => {
                let l = &self.luns[i];
                let done = Message::ResyncDone {
                    lun_key: l.key,
                    gen,
                };
                self.request(s, rbuf, wbuf, &done, "resync completion")?;
                // Under the coordinator's lock, as the pass's end: a loss since then voided it.
                let mirror = self.mirror.lock().unwrap_or_else(|p| p.into_inner());
                let mut p = l.pair();
                let persist = run
                    .completion_acked(&mirror, &mut p)
                    .map_err(std::io::Error::other)?;
                if let Err(e) = l.persist_if(&mut p, persist) {
                    // The record still says the peer is outdated: only a longer resync.
                    tracing::warn!(lun = l.key, error = %e, "cannot record the resync's completion");
                }
                drop(p);
                drop(mirror);
                files[i] = None;
                tracing::info!(
                    lun = l.key,
                    copied_bytes = run.copied_bytes(),
                    "resync complete; mirroring"
                );
            }
            step => unreachable!("{step:?} is the driver loop's"),
        }
        Ok(())
    }

    /// One ping of the watch over the control connection, answered within the replica
    /// timeout. Why: the data links only carry writes, so an idle pair would not notice a
    /// dead or hung peer until the next write (status would say "mirroring" meanwhile);
    /// and this connection tells the peer that a primary is there (its `promote` refuses
    /// to make a second one). False: the peer is lost (declared here unless it already
    /// was, or this node stopped being primary meanwhile).
    fn ping(&self, s: &mut TcpStream, rbuf: &mut RxBuf, wbuf: &mut Vec<u8>) -> bool {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let ping = Message::Ping {
            now_ms: now_ms(&self.epoch),
        };
        let answer = send(s, &ping, seq, wbuf).and_then(|()| recv(s, rbuf));
        match answer {
            Ok((Message::Ack { seq: acked, status }, _))
                if acked == seq && status == AckStatus::Ok =>
            {
                true
            }
            other => {
                if self.peer_up.load(Ordering::Acquire) && self.is_primary() {
                    tracing::warn!(answer = ?other.map(|(m, _)| m), "the peer did not answer a ping");
                    self.peer_lost("the peer stopped answering pings");
                }
                false
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

    /// Copies region `region` of LUN `i` under its range lock (no write to it runs
    /// meanwhile) and, once the peer acknowledged it and still under the lock, tells `run`
    /// (its bit clears).
    #[allow(clippy::too_many_arguments)]
    fn copy_region(
        &self,
        s: &mut TcpStream,
        rbuf: &mut RxBuf,
        wbuf: &mut Vec<u8>,
        file: &File,
        lun: &crate::lun::Lun,
        i: usize,
        region: u64,
        run: &mut SourceRun,
    ) -> std::io::Result<()> {
        let l = &self.luns[i];
        let region_bytes = l.region_bytes();
        let bs = lun.block_size as u64;
        let start = region * region_bytes;
        let end = (start + region_bytes).min(lun.size_bytes());
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
        run.region_sent(&mut l.pair(), sent);
        Ok(())
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
            l.resync_copied_bytes.fetch_add(n as u64, Ordering::Relaxed);
            off += n as u64;
            sent += n as u64;
        }
        Ok(sent)
    }
}

/// The backing file of LUN `i`, opened when its resync began.
fn lun_file(files: &[Option<File>], i: usize) -> std::io::Result<&File> {
    files
        .get(i)
        .and_then(Option::as_ref)
        .ok_or_else(|| std::io::Error::other("a copy before its LUN's resync began"))
}
