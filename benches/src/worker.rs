//! One session's I/O loop: keeps `iodepth` READ(16)/WRITE(16) commands in flight on one
//! connection, tagged by ITT (the slot index), inside the target's CmdSN window.
//!
//! With `--reconnect`, a lost connection (an error, EOF, a reset, an asynchronous event
//! announcing its end, or a command unanswered for `--io-timeout-ms`) is replaced by a new
//! login to the same URL, and every command that was unanswered is sent again as it was: a
//! write with the same data and generation, so it stays "either the old or the new data"
//! in the verify model until the target acknowledges it.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use hdrhistogram::Histogram;
use proto::login::chap::ChapInitiator;
use proto::pdu::{initiator, opcode, RESERVED_TAG};

use crate::args::{Job, Rw};
use crate::conn::{
    describe_sense, parse_sense, rw16, unmap10, unmap_param_list, Conn, Pdu,
    SENSE_KEY_UNIT_ATTENTION, UNMAP_PARAM_BYTES,
};
use crate::report::new_histogram;
use crate::stall::Timeline;

use crate::verify::{check, stamp, Tracker, SECTOR};
pub use reconnect::ConnectionLost;
use reconnect::Interrupted;
pub(crate) use reconnect::CONNECT_ATTEMPT_TIMEOUT;

/// SCSI status codes (SAM-5) the target uses to ask for a retry later.
const STATUS_BUSY: u8 = 0x08;
const STATUS_TASK_SET_FULL: u8 = 0x28;
const STATUS_CHECK_CONDITION: u8 = 0x02;

/// With --reconnect, how long a command answered BUSY or TASK SET FULL waits before it is
/// sent again: a target short of resources is not hammered, and a failover's stall is not
/// lengthened noticeably.
const BUSY_RETRY_DELAY: Duration = Duration::from_millis(5);
/// UNIT ATTENTIONs in a row one command may be answered with before it counts as failed:
/// each reports (and clears) one event, so a target that keeps sending them is broken.
const MAX_UNIT_ATTENTION_RETRIES: u32 = 8;
/// How often --reconnect looks for a command outstanding past --io-timeout-ms (a scan of
/// the slots: the timeout is noticed at most this much late).
const TIMEOUT_CHECK_INTERVAL: Duration = Duration::from_millis(20);
/// How long the drain after the run may take without --reconnect (with it, the reconnect
/// budget is added: commands lost at the end of a run are re-issued in the drain).
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Counters shared with the progress printer.
pub struct Shared {
    /// Completed I/Os (including the ramp).
    pub ios: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    /// Latencies measured so far (after the ramp), merged by sessions every 250 ms.
    pub hist: Mutex<Histogram<u64>>,
    /// Verify mismatches printed so far (capped across all sessions).
    pub printed: AtomicU64,
    /// Ask all sessions to stop issuing.
    pub stop: AtomicBool,
    /// Completions and connection failures of all sessions, for the stall figures.
    pub timeline: Timeline,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            ios: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            hist: Mutex::new(new_histogram()),
            printed: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            timeline: Timeline::new(Instant::now()),
        }
    }
}

/// What one session measured.
pub struct SessionResult {
    pub all: Histogram<u64>,
    pub read: Histogram<u64>,
    pub write: Histogram<u64>,
    pub ios: u64,
    pub reads: u64,
    pub writes: u64,
    /// Of `writes`, those sent as UNMAP (they move no data: not in `bytes`).
    pub unmaps: u64,
    pub bytes: u64,
    pub errors: u64,
    /// Commands answered BUSY or TASK SET FULL (not run; without --reconnect the slot was
    /// reused, with it the command was sent again).
    pub busy: u64,
    /// Commands answered UNIT ATTENTION and sent again (--reconnect only).
    pub unit_attentions: u64,
    pub rejects: u64,
    pub verified: u64,
    pub mismatches: u64,
    /// Logins that replaced a lost connection (--reconnect).
    pub reconnects: u64,
    /// Commands sent again on a new connection because the lost one left them unanswered.
    pub reissued: u64,
    pub failure: Option<String>,
}

impl Default for SessionResult {
    fn default() -> Self {
        Self {
            all: new_histogram(),
            read: new_histogram(),
            write: new_histogram(),
            ios: 0,
            reads: 0,
            writes: 0,
            unmaps: 0,
            bytes: 0,
            errors: 0,
            busy: 0,
            unit_attentions: 0,
            rejects: 0,
            verified: 0,
            mismatches: 0,
            reconnects: 0,
            reissued: 0,
            failure: None,
        }
    }
}

/// Where a session's I/Os go.
#[derive(Clone)]
pub struct Plan {
    pub units: u64,
    /// Bytes per unit: the I/O size, or the smallest of a `--bs MIN-MAX` range.
    pub bs: u64,
    /// Units per I/O at most (1 for a fixed size).
    pub max_units: u64,
    pub block_size: u32,
    pub tracker: Option<Arc<Tracker>>,
    /// For a verify-only pass: the units to read, shared out round-robin.
    pub verify_list: Option<Arc<Vec<u64>>>,
    /// Measurement window.
    pub measure_start: Instant,
    pub end: Option<Instant>,
}

/// Where a slot's command is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Sent (or queued to send) on the current connection, unanswered.
    Sent,
    /// Unanswered and waiting in `Worker::retry` to be sent again (--reconnect): its
    /// connection was lost, or the target answered BUSY, TASK SET FULL or UNIT ATTENTION.
    /// Its units stay claimed meanwhile, so nothing else touches them.
    Waiting,
}

struct Slot {
    state: SlotState,
    write: bool,
    /// A write sent as UNMAP of its blocks (--unmap-pct); `param` is its parameter list.
    unmap: bool,
    param: [u8; UNMAP_PARAM_BYTES],
    /// The command covers units `unit..unit + n`.
    unit: u64,
    n: u64,
    /// Verify mode, per unit of the command: the generation written, or what a read expects.
    gens: Vec<u64>,
    exps: Vec<(u64, u64)>,
    /// When the command was first issued: its latency runs from here across every re-issue,
    /// as an application's would.
    start: Instant,
    /// When it was last sent on the current connection: what --io-timeout-ms measures.
    sent_at: Instant,
    /// UNIT ATTENTION answers to this command so far.
    unit_attentions: u32,
    /// Data-In bytes received for a read (a GOOD read must have delivered them all).
    received: u64,
    buf: Vec<u8>,
}

impl Slot {
    fn len_bytes(&self, bs: u64) -> u64 {
        self.n * bs
    }

    fn command_name(&self) -> &'static str {
        match (self.write, self.unmap) {
            (true, true) => "UNMAP",
            (true, false) => "WRITE(16)",
            _ => "READ(16)",
        }
    }
}

/// A tiny xorshift PRNG: the bench's own, so runs need no entropy source.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// The I/O loop's state that outlives a reconnect.
struct LoopState {
    stopping: bool,
    stop_at: Option<Instant>,
    /// The target announced the end of the connection (--reconnect): nothing more is sent
    /// on it, and once every command sent on it is answered the session logs in again.
    leaving: Option<ConnectionLost>,
}

pub struct Worker<'a> {
    conn: Conn,
    job: &'a Job,
    /// CHAP for the logins of --reconnect.
    chap: Option<&'a ChapInitiator>,
    plan: Plan,
    shared: &'a Shared,
    idx: usize,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Slots not free (sent, or waiting to be sent again).
    inflight: usize,
    /// Slots to send again, each not before its instant (in about that order).
    retry: VecDeque<(usize, Instant)>,
    next_timeout_check: Instant,
    /// What unverified writes send, shared with the send queue (sent in place).
    pattern: Arc<[u8]>,
    rng: Rng,
    seq_cursor: u64,
    region: (u64, u64),
    vo_next: usize,
    exhausted: bool,
    res: SessionResult,
    recent: Histogram<u64>,
    last_merge: Instant,
    sense_printed: u32,
}

impl<'a> Worker<'a> {
    pub fn new(
        conn: Conn,
        job: &'a Job,
        plan: Plan,
        shared: &'a Shared,
        idx: usize,
        chap: Option<&'a ChapInitiator>,
    ) -> Self {
        let verify = plan.tracker.is_some();
        let max_bytes = plan.bs * plan.max_units;
        let slots = (0..job.iodepth)
            .map(|_| Slot {
                state: SlotState::Free,
                write: false,
                unmap: false,
                param: [0; UNMAP_PARAM_BYTES],
                unit: 0,
                n: 1,
                gens: Vec::new(),
                exps: Vec::new(),
                start: Instant::now(),
                sent_at: Instant::now(),
                unit_attentions: 0,
                received: 0,
                buf: if verify {
                    vec![0u8; max_bytes as usize]
                } else {
                    Vec::new()
                },
            })
            .collect();
        // A non-zero pattern, so written blocks are real data on both targets.
        let mut rng = Rng::new(0x5eed ^ (idx as u64) << 20 ^ std::process::id() as u64);
        let pattern: Arc<[u8]> = (0..max_bytes / 8)
            .flat_map(|_| rng.next_u64().to_le_bytes())
            .collect();
        let per = (plan.units / job.sessions as u64).max(1);
        let start = (idx as u64 * per).min(plan.units - 1);
        let region = (start, per.min(plan.units - start));
        Self {
            conn,
            job,
            chap,
            plan,
            shared,
            idx,
            slots,
            free: (0..job.iodepth).rev().collect(),
            inflight: 0,
            retry: VecDeque::new(),
            next_timeout_check: Instant::now(),
            pattern,
            rng,
            seq_cursor: 0,
            region,
            vo_next: idx,
            exhausted: false,
            res: SessionResult::default(),
            recent: new_histogram(),
            last_merge: Instant::now(),
            sense_printed: 0,
        }
    }

    /// Runs the load until the end of the window (or the verify list), drains, logs out.
    pub fn run(mut self) -> SessionResult {
        if let Err(e) = self.run_inner() {
            self.res.failure = Some(format!("session {}: {e:#}", self.idx));
            // Abandoned commands keep their pending generation in the tracker; free the
            // claims so a later pass in this process could still read those units.
            if let Some(t) = &self.plan.tracker {
                for s in self.slots.iter().filter(|s| s.state != SlotState::Free) {
                    t.release(s.unit);
                }
            }
        }
        self.merge_recent();
        self.res
    }

    fn run_inner(&mut self) -> Result<()> {
        let mut st = LoopState {
            stopping: false,
            stop_at: None,
            leaving: None,
        };
        loop {
            match self.pump(&mut st) {
                Ok(()) => break,
                Err(Interrupted::Lost(why)) => match self.job.reconnect {
                    Some(policy) => {
                        // Whatever the old connection announced, the new one starts afresh.
                        st.leaving = None;
                        self.reconnect(&why, policy)?
                    }
                    None => return Err(why.into()),
                },
                Err(Interrupted::Fatal(e)) => return Err(e),
            }
        }
        match self.conn.logout() {
            Err(e) if self.job.reconnect.is_some() => {
                // Every command was answered: a connection lost at the logout loses nothing.
                eprintln!(
                    "twinsan bench: session {}: logout failed after the drain ({e:#}); ignored with --reconnect",
                    self.idx
                );
                Ok(())
            }
            r => r,
        }
    }

    /// Runs the I/O loop until the drain after the run is complete (`Ok`), the connection
    /// is lost, or something fatal happens.
    fn pump(&mut self, st: &mut LoopState) -> Result<(), Interrupted> {
        let drain_limit = DRAIN_LIMIT + self.job.reconnect.map_or(Duration::ZERO, |r| r.timeout);
        loop {
            let now = Instant::now();
            if !st.stopping
                && (self.exhausted
                    || self.plan.end.is_some_and(|e| now >= e)
                    || self.shared.stop.load(Ordering::Relaxed))
            {
                st.stopping = true;
                st.stop_at = Some(now);
            }
            let mut progress = false;
            // Commands to send again first (also while stopping: they are part of the
            // drain), then new ones.
            while st.leaving.is_none() && self.conn.window_open() {
                if let Some(&(i, not_before)) = self.retry.front() {
                    if not_before <= now {
                        self.retry.pop_front();
                        self.send(i);
                        progress = true;
                        continue;
                    }
                }
                if st.stopping || self.inflight >= self.job.iodepth || !self.issue()? {
                    break;
                }
                progress = true;
            }
            progress |= self.conn.flush()?;
            progress |= self.conn.fill()?;
            while let Some(p) = self.conn.next_pdu()? {
                if let Some(lost) = self.handle(p, &mut st.stopping)? {
                    st.leaving.get_or_insert(lost);
                }
                progress = true;
            }
            if now.duration_since(self.last_merge) > Duration::from_millis(250) {
                self.merge_recent();
            }
            if st.stopping && self.inflight == 0 && !self.conn.pending_tx() {
                return Ok(());
            }
            if st.leaving.is_some()
                && self.oldest_unanswered(now).is_none()
                && !self.conn.pending_tx()
            {
                if let Some(lost) = st.leaving.take() {
                    if matches!(lost, ConnectionLost::Announced { event: 1 }) {
                        // Asked to log out: do, so the target ends the session cleanly.
                        // Its failure changes nothing: every command here is answered.
                        let _ = self.conn.logout();
                    }
                    return Err(Interrupted::Lost(lost));
                }
            }
            if let Some(s) = st.stop_at {
                if now.duration_since(s) > drain_limit {
                    return Err(anyhow!(
                        "{} commands still unanswered {} s after the run ended",
                        self.inflight,
                        drain_limit.as_secs()
                    )
                    .into());
                }
            }
            match self.job.reconnect {
                Some(policy) => {
                    if now >= self.next_timeout_check {
                        self.next_timeout_check = now + TIMEOUT_CHECK_INTERVAL;
                        if let Some(waited) = self.oldest_unanswered(now) {
                            if waited > policy.io_timeout {
                                return Err(Interrupted::Lost(ConnectionLost::NoProgress {
                                    waited_ms: waited.as_millis() as u64,
                                }));
                            }
                        }
                    }
                }
                None => {
                    if self.inflight > 0
                        && now.duration_since(self.conn.last_rx) > Duration::from_secs(30)
                    {
                        return Err(anyhow!(
                            "target sent nothing for 30 s with {} commands outstanding",
                            self.inflight
                        )
                        .into());
                    }
                }
            }
            if !progress {
                // Not past the next retry: a BUSY answer waits 5 ms, not a whole poll.
                let wait = self
                    .retry
                    .front()
                    .map_or(Duration::from_millis(50), |&(_, t)| {
                        t.saturating_duration_since(now)
                            .clamp(Duration::from_millis(1), Duration::from_millis(50))
                    });
                self.conn.wait(wait);
            }
        }
    }

    /// How long the oldest command sent on the current connection has been unanswered.
    fn oldest_unanswered(&self, now: Instant) -> Option<Duration> {
        self.slots
            .iter()
            .filter(|s| s.state == SlotState::Sent)
            .map(|s| now.saturating_duration_since(s.sent_at))
            .max()
    }

    fn merge_recent(&mut self) {
        if !self.recent.is_empty() {
            if let Ok(mut h) = self.shared.hist.lock() {
                let _ = h.add(&self.recent);
            }
            self.recent.reset();
        }
        self.last_merge = Instant::now();
    }

    /// The units of the next command, `(first, count)`, claimed in the tracker.
    fn pick_units(&mut self) -> Option<(u64, u64)> {
        let claim = |t: &Option<Arc<Tracker>>, u: u64| t.as_ref().is_none_or(|t| t.try_claim(u));
        if let Some(list) = &self.plan.verify_list {
            let i = self.vo_next;
            if i >= list.len() {
                self.exhausted = true;
                return None;
            }
            self.vo_next += self.job.sessions;
            let u = list[i];
            return claim(&self.plan.tracker, u).then_some((u, 1));
        }
        if self.job.rw.random() && self.plan.max_units > 1 {
            let n = (1 + self.rng.below(self.plan.max_units)).min(self.plan.units);
            for _ in 0..16 {
                let u = self.rng.below(self.plan.units - n + 1);
                if self.claim_all(u, n) {
                    return Some((u, n));
                }
            }
            return None;
        }
        for _ in 0..16 {
            let u = if self.job.rw.random() {
                self.rng.below(self.plan.units)
            } else {
                if self.job.once && self.seq_cursor >= self.region.1 {
                    self.exhausted = true;
                    return None;
                }
                let u = self.region.0 + self.seq_cursor % self.region.1;
                self.seq_cursor += 1;
                u
            };
            if claim(&self.plan.tracker, u) {
                return Some((u, 1));
            }
        }
        None
    }

    /// Claims units `u..u + n`, all or none (two commands in flight never overlap).
    fn claim_all(&self, u: u64, n: u64) -> bool {
        let Some(t) = &self.plan.tracker else {
            return true;
        };
        for k in 0..n {
            if !t.try_claim(u + k) {
                for j in 0..k {
                    t.release(u + j);
                }
                return false;
            }
        }
        true
    }

    /// Issues one command into a free slot. False when no unit could be claimed now.
    fn issue(&mut self) -> Result<bool> {
        let Some((unit, n)) = self.pick_units() else {
            return Ok(false);
        };
        let i = self
            .free
            .pop()
            .expect("inflight < iodepth leaves a free slot");
        let write = !self.job.verify_only
            && match self.job.rw {
                Rw::Read | Rw::Randread => false,
                Rw::Write | Rw::Randwrite => true,
                Rw::Randrw => self.rng.below(100) >= self.job.rwmix_read as u64,
            };
        let unmap =
            write && self.job.unmap_pct > 0 && self.rng.below(100) < u64::from(self.job.unmap_pct);
        let bs = self.plan.bs;
        let s = &mut self.slots[i];
        s.write = write;
        s.unmap = unmap;
        s.unit = unit;
        s.n = n;
        if unmap {
            let lba = unit * bs / self.plan.block_size as u64;
            let blocks = (n * bs / self.plan.block_size as u64) as u32;
            s.param = unmap_param_list(lba, blocks);
        }
        if let Some(t) = &self.plan.tracker {
            s.gens.clear();
            s.exps.clear();
            for k in 0..n {
                let at = (k * bs) as usize..((k + 1) * bs) as usize;
                if unmap {
                    s.gens.push(t.begin_unmap(unit + k));
                } else if write {
                    let gen = t.begin_write(unit + k);
                    stamp(&mut s.buf[at], (unit + k) * bs / SECTOR as u64, gen);
                    s.gens.push(gen);
                } else {
                    s.exps.push(t.expect(unit + k));
                }
            }
        }
        // Latency from here: stamping verify data is the harness's work, not the target's.
        s.start = Instant::now();
        s.unit_attentions = 0;
        self.inflight += 1;
        self.send(i);
        Ok(true)
    }

    /// Sends slot `i`'s command on the current connection: a new one, or one again.
    fn send(&mut self, i: usize) {
        let bs = self.plan.bs;
        let s = &mut self.slots[i];
        s.state = SlotState::Sent;
        s.received = 0;
        s.sent_at = Instant::now();
        let (write, len) = (s.write, s.n * bs);
        let lba = s.unit * bs / self.plan.block_size as u64;
        let blocks = (len / self.plan.block_size as u64) as u32;
        let (cdb, len, data) = if s.unmap {
            let len = UNMAP_PARAM_BYTES as u64;
            (unmap10(len as u16), len, Payload::Copy(&s.param))
        } else if self.plan.tracker.is_some() {
            let data = Payload::Copy(&s.buf[..len as usize]);
            (rw16(write, lba, blocks), len, data)
        } else {
            let data = Payload::Shared(&self.pattern, len as usize);
            (rw16(write, lba, blocks), len, data)
        };
        let p = self.conn.params;
        let itt = i as u32;
        let imm = if write && p.immediate_data {
            (len as u32).min(p.first_burst).min(p.target_mrdsl)
        } else {
            0
        };
        let mut b = initiator::scsi_command(
            self.conn.lun,
            itt,
            self.conn.cmd_sn,
            self.conn.exp_stat_sn,
            !write,
            write,
            len as u32,
            &cdb,
            imm,
        );
        // With InitialR2T=No the first burst that immediate data did not carry follows as
        // unsolicited Data-Out, which the command must announce (F = 0).
        let unsolicited_end = if write && !p.initial_r2t {
            (len as u32).min(p.first_burst)
        } else {
            imm
        };
        if unsolicited_end > imm {
            initiator::unsolicited_data_follows(&mut b);
        }
        self.conn.cmd_sn = self.conn.cmd_sn.wrapping_add(1);
        data.queue(&mut self.conn, &b, 0..imm as usize);
        if unsolicited_end > imm {
            send_data_out(
                &mut self.conn,
                data,
                itt,
                RESERVED_TAG,
                imm,
                unsolicited_end,
            );
        }
    }

    /// Queues slot `i`'s command to be sent again from `at` on (--reconnect).
    fn send_again(&mut self, i: usize, at: Instant) {
        self.slots[i].state = SlotState::Waiting;
        self.retry.push_back((i, at));
    }

    /// Handles one PDU from the target; `Some` when it announces the end of the connection
    /// and --reconnect is on.
    fn handle(&mut self, p: Pdu, stopping: &mut bool) -> Result<Option<ConnectionLost>> {
        let v = p.v;
        match v.opcode {
            opcode::DATA_IN => {
                let i = self.slot_of(v.itt)?;
                let off = v.buffer_offset as u64;
                let seg_len = p.data.len() as u64;
                let len = self.slots[i].len_bytes(self.plan.bs);
                if self.slots[i].write || off + seg_len > len {
                    bail!(
                        "Data-In beyond the transfer (ITT {:#x}, offset {off}, {seg_len} bytes, {len} expected)",
                        v.itt
                    );
                }
                self.slots[i].received += seg_len;
                if self.plan.tracker.is_some() {
                    let seg = &self.conn.rbuf()[p.data.clone()];
                    let (off, len) = (off as usize, len as usize);
                    self.slots[i].buf[..len][off..off + seg.len()].copy_from_slice(seg);
                }
                if v.flags & 0x01 != 0 {
                    self.complete(i, v.status, 0, v.flags, v.word44, &[]);
                }
            }
            opcode::SCSI_RESPONSE => {
                let i = self.slot_of(v.itt)?;
                let sense = self.conn.rbuf()[p.data.clone()].to_vec();
                self.complete(i, v.status, v.byte2, v.flags, v.word44, &sense);
            }
            opcode::R2T => {
                let i = self.slot_of(v.itt)?;
                if !self.slots[i].write {
                    bail!("R2T for a read (ITT {:#x})", v.itt);
                }
                let len = self.slots[i].len_bytes(self.plan.bs) as usize;
                let data = if self.plan.tracker.is_some() {
                    Payload::Copy(&self.slots[i].buf[..len])
                } else {
                    Payload::Shared(&self.pattern, len)
                };
                let (off, len) = (v.buffer_offset, v.word44);
                if off as u64 + len as u64 > data.len() as u64 {
                    bail!("R2T beyond the transfer (offset {off}, {len} bytes)");
                }
                send_data_out(&mut self.conn, data, v.itt, v.ttt, off, off + len);
            }
            opcode::NOP_IN => {
                if v.ttt != RESERVED_TAG {
                    self.conn.answer_nop(&p);
                }
            }
            opcode::REJECT => {
                self.res.rejects += 1;
                // The data segment holds the rejected PDU's header.
                let d = &self.conn.rbuf()[p.data.clone()];
                let (rejected_op, itt) = if d.len() >= 20 {
                    (
                        d[0] & 0x3f,
                        u32::from_be_bytes([d[16], d[17], d[18], d[19]]),
                    )
                } else {
                    (0xff, RESERVED_TAG)
                };
                eprintln!("twinsan bench: session {}: target rejected a PDU (reason {:#04x}, opcode {rejected_op:#04x}, ITT {itt:#x})", self.idx, v.byte2);
                // A rejected command never became a task: its slot is free again. A rejected
                // Data-Out (a data digest error, say) belongs to a task the target still
                // ends with a response (RFC 7143 section 11.17.1), which frees the slot.
                if rejected_op == opcode::SCSI_COMMAND {
                    if let Ok(i) = self.slot_of(itt) {
                        self.fail(i);
                    }
                }
            }
            opcode::ASYNC_MESSAGE => {
                let event = p.bhs[36];
                eprintln!(
                    "twinsan bench: session {}: asynchronous message event {event}",
                    self.idx
                );
                // 1: logout requested, 2 and 3: the connection or session will be
                // dropped; with --reconnect the session stops sending on this connection,
                // collects the answers still coming, and logs in again (where the portal
                // now is) instead of ending. 4 (renegotiate) ends the run as before.
                if self.job.reconnect.is_some() && (1..=3).contains(&event) {
                    return Ok(Some(ConnectionLost::Announced { event }));
                }
                if (1..=4).contains(&event) {
                    *stopping = true;
                }
            }
            op => bail!("unexpected PDU opcode {op:#04x}"),
        }
        Ok(None)
    }

    fn slot_of(&self, itt: u32) -> Result<usize> {
        let i = itt as usize;
        if i < self.slots.len() && self.slots[i].state == SlotState::Sent {
            Ok(i)
        } else {
            bail!("target answered unknown ITT {itt:#x}")
        }
    }

    fn release(&mut self, i: usize) {
        let s = &mut self.slots[i];
        s.state = SlotState::Free;
        if let Some(t) = &self.plan.tracker {
            for k in 0..s.n {
                t.release(s.unit + k);
            }
        }
        self.free.push(i);
        self.inflight -= 1;
    }

    fn fail(&mut self, i: usize) {
        self.res.errors += 1;
        self.shared.errors.fetch_add(1, Ordering::Relaxed);
        self.release(i);
    }

    /// A command ended with `status` (and, from a SCSI Response, iSCSI `response`); `flags`
    /// and `residual` are the final PDU's (U = 0x02, O = 0x04).
    fn complete(
        &mut self,
        i: usize,
        status: u8,
        response: u8,
        flags: u8,
        residual: u32,
        sense: &[u8],
    ) {
        let now = Instant::now();
        let retrying = self.job.reconnect.is_some();
        if response == 0 && matches!(status, STATUS_BUSY | STATUS_TASK_SET_FULL) {
            // The target did not run it and asks us to retry later: flow control, not a
            // failed command. Without --reconnect the slot goes back (a write's generation
            // stays pending); with it the same command goes again shortly, as an
            // initiator's SCSI layer would do.
            self.res.busy += 1;
            if retrying {
                self.send_again(i, now + BUSY_RETRY_DELAY);
            } else {
                self.release(i);
            }
            return;
        }
        if retrying
            && response == 0
            && status == STATUS_CHECK_CONDITION
            && parse_sense(sense).is_some_and(|(key, _, _)| key == SENSE_KEY_UNIT_ATTENTION)
            && self.slots[i].unit_attentions < MAX_UNIT_ATTENTION_RETRIES
        {
            // Not run: the target reports an event first (a reset, a failover's changed
            // state). A write keeps its generation pending until an answer GOOD.
            self.slots[i].unit_attentions += 1;
            self.res.unit_attentions += 1;
            self.send_again(i, now);
            return;
        }
        let len = self.slots[i].len_bytes(self.plan.bs);
        let short = flags & 0x06 != 0 && residual != 0
            || (!self.slots[i].write && status == 0 && self.slots[i].received != len);
        if response == 0 && status == 0 && short {
            if self.sense_printed < 10 {
                self.sense_printed += 1;
                let s = &self.slots[i];
                eprintln!(
                    "twinsan bench: session {}: {} at byte {} ended GOOD but moved {} of {len} bytes (residual {residual}, flags {flags:#04x})",
                    self.idx,
                    s.command_name(),
                    s.unit * self.plan.bs,
                    if s.write { len.saturating_sub(residual as u64) } else { s.received },
                );
            }
            self.fail(i);
            return;
        }
        if response != 0 || status != 0 {
            if self.sense_printed < 10 {
                self.sense_printed += 1;
                let what = if response != 0 {
                    format!("iSCSI response {response:#04x}")
                } else if status == 2 {
                    format!("CHECK CONDITION: {}", describe_sense(sense))
                } else {
                    format!("SCSI status {status:#04x}")
                };
                let s = &self.slots[i];
                eprintln!(
                    "twinsan bench: session {}: {} at byte {} failed: {what}",
                    self.idx,
                    s.command_name(),
                    s.unit * self.plan.bs
                );
            }
            self.fail(i);
            return;
        }
        let bs = self.plan.bs;
        let s = &self.slots[i];
        if let Some(t) = &self.plan.tracker {
            for k in 0..s.n {
                let unit = s.unit + k;
                if s.unmap {
                    t.ack_unmap(unit, s.gens[k as usize]);
                    continue;
                }
                if s.write {
                    t.ack_write(unit, s.gens[k as usize]);
                    continue;
                }
                // A unit never written in this ack log is checked too: whatever it held
                // before, it must not hold another sector's block.
                let exp = s.exps[k as usize];
                if exp != (0, 0) {
                    self.res.verified += 1;
                }
                let at = (k * bs) as usize..((k + 1) * bs) as usize;
                if let Some(m) = check(&s.buf[at], unit * bs / SECTOR as u64, exp.0, exp.1) {
                    self.res.mismatches += 1;
                    if self.shared.printed.fetch_add(1, Ordering::Relaxed) < 20 {
                        eprintln!("twinsan bench: VERIFY MISMATCH: {m}");
                    }
                }
            }
        }
        let bytes = if s.unmap { 0 } else { s.len_bytes(bs) };
        let (write, unmap) = (s.write, s.unmap);
        let lat = (now.duration_since(s.start).as_micros() as u64).max(1);
        self.shared.timeline.completed(now);
        self.shared.ios.fetch_add(1, Ordering::Relaxed);
        self.shared.bytes.fetch_add(bytes, Ordering::Relaxed);
        // Latency: every command issued in the measured window, also one that completes
        // after it (in the drain): the slowest commands, a stall at the end of a failover
        // test, would otherwise be the ones left out. Throughput: completions inside it.
        if s.start >= self.plan.measure_start {
            let _ = self.res.all.record(lat);
            let _ = self.recent.record(lat);
            let _ = if write {
                self.res.write.record(lat)
            } else {
                self.res.read.record(lat)
            };
        }
        if now >= self.plan.measure_start && self.plan.end.is_none_or(|e| now <= e) {
            if write {
                self.res.writes += 1;
                self.res.unmaps += u64::from(unmap);
            } else {
                self.res.reads += 1;
            }
            self.res.ios += 1;
            self.res.bytes += bytes;
        }
        self.release(i);
    }
}

/// The data of a write: a slot's own stamped buffer (verify mode: copied into the send
/// queue, since the slot is restamped for its next write) or the shared pattern (sent in
/// place).
#[derive(Clone, Copy)]
enum Payload<'b> {
    Copy(&'b [u8]),
    /// The first `.1` bytes of the shared pattern.
    Shared(&'b Arc<[u8]>, usize),
}

impl Payload<'_> {
    fn len(&self) -> usize {
        match self {
            Payload::Copy(b) => b.len(),
            Payload::Shared(_, len) => *len,
        }
    }

    fn queue(&self, conn: &mut Conn, bhs: &[u8; proto::pdu::BHS_LEN], range: Range<usize>) {
        debug_assert!(range.end <= self.len());
        match self {
            Payload::Copy(b) => conn.queue(bhs, &b[range]),
            Payload::Shared(b, _) => conn.queue_shared(bhs, b, range),
        }
    }
}

/// Queues Data-Out PDUs for `data[from..to]`, each at most the target's MRDSL, DataSN from 0.
fn send_data_out(conn: &mut Conn, data: Payload, itt: u32, ttt: u32, from: u32, to: u32) {
    let max = conn.params.target_mrdsl;
    let mut off = from;
    let mut data_sn = 0;
    while off < to {
        let n = (to - off).min(max);
        let last = off + n == to;
        let b = initiator::data_out(last, conn.lun, itt, ttt, conn.exp_stat_sn, data_sn, off, n);
        data.queue(conn, &b, off as usize..(off + n) as usize);
        data_sn += 1;
        off += n;
    }
}

mod reconnect;
#[cfg(test)]
mod tests;
