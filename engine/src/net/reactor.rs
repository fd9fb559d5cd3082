//! One core's event loop: one io_uring that carries this core's accepts, socket reads and
//! writes, and file I/O on registered fds. Connections never leave the core that accepted
//! them, so nothing on the data path is shared or locked.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};

use crate::disk::bufpool::BufPool;
use crate::disk::thin_read::{self, ReadPlan, SplitRead};
use crate::iscsi::conn::{Conn, Out};
use crate::registry::Registry;
use crate::scsi::IoOp;
use proto::pdu::BHS_LEN;

/// Submission queue entries per ring: enough for every connection's recv + send plus a
/// full queue of disk I/O; overflow is handled by submitting early.
const RING_ENTRIES: u32 = 1024;
/// Receive buffer per connection. Large enough that one recv usually carries many small
/// PDUs or a whole 256 KiB write burst.
const RECV_BUF_BYTES: usize = 512 << 10;
/// A PDU at least this long is received up to its end and no further (see post_recv).
const LARGE_PDU_BYTES: usize = 32 << 10;
/// Connections per core, a hard bound (slot ids must fit the 24 bits of user_data).
const MAX_CONNS_PER_CORE: usize = 4096;
/// How often tasks parked on a range lock retry (50 µs: a lock is held for one disk I/O).
const WAIT_POLL_NS: u32 = 50_000;
/// How long a core thread with mirrored writes in flight polls for their acks before it
/// blocks (see `poll_for_acks`).
const ACK_POLL_US: u64 = 50;
/// Tick period for timers (NOP-In pings, login timeouts, shutdown checks).
const TICK_MS: u64 = 250;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Kind {
    Accept = 1,
    Recv = 2,
    Send = 3,
    Disk = 4,
    Tick = 5,
    /// The replica link's eventfd: mirrored operations were acknowledged.
    Rep = 6,
    /// The spill helper's eventfd: large writes it was handed are done (spill.rs).
    Spill = 7,
    /// One file read of a read split around holes (thin_read.rs).
    ReadPart = 8,
}

fn user_data(kind: Kind, slot: usize, task: u32) -> u64 {
    (kind as u64) << 56 | (slot as u64) << 32 | task as u64
}

fn split_user_data(ud: u64) -> (u8, usize, u32) {
    (
        (ud >> 56) as u8,
        ((ud >> 32) & 0xff_ffff) as usize,
        ud as u32,
    )
}

struct Slot {
    stream: TcpStream,
    conn: Conn,
    /// Received bytes not yet consumed are rbuf[rstart..rlen]. Why a start offset: moving
    /// a partial 128 KiB PDU to the front after every receive was a quarter of the daemon's
    /// CPU for large writes; now bytes move only when a PDU would not fit.
    rbuf: crate::disk::bufpool::AlignedBuf,
    rstart: usize,
    rlen: usize,
    recv_posted: bool,
    /// The buffer was lent to a write and nothing followed that PDU yet: receive the next
    /// header on its own (see post_recv).
    after_lend: bool,
    /// What is to be sent (sendq.rs).
    sendq: crate::net::sendq::SendQueue,
    send_posted: bool,
    close_after_send: bool,
    /// The socket is shut down; the slot is freed when no operation references it.
    dead: bool,
    /// SQEs in flight that reference this slot (recv, send, disk).
    ops: u32,
}

pub struct Reactor {
    core: usize,
    ring: IoUring,
    listener: TcpListener,
    reg: Arc<Registry>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    pool: BufPool,
    /// The fd per LUN slot, registered as fixed files at the same indexes (files.rs).
    files: crate::net::files::LunFiles,
    /// Plain buffered writes done on this thread (see inline_write.rs).
    inline_writes: crate::disk::inline_write::InlineWrites,
    tick_ts: Box<types::Timespec>,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    /// This core's liveness counter, bumped every tick.
    beats: Arc<crate::health::CoreBeats>,
    accept_posted: bool,
    last_space_check_s: u64,
    /// The replica link of this core, when a peer is configured.
    link: Option<crate::replication::CoreLink>,
    /// Where the eventfd read lands (8 bytes; boxed so its address is stable).
    efd_buf: Box<[u8; 8]>,
    /// Acknowledgements taken from the link, reused across wake-ups.
    rep_done: Vec<crate::replication::RepDone>,
    /// Mirrored operations handed to the link and not yet acknowledged.
    reps_out: usize,
    /// The helper that takes large writes while this core's CPU is saturated (spill.rs).
    spill: Option<crate::disk::spill::Spill>,
    /// Where the spill eventfd read lands.
    spill_efd_buf: Box<[u8; 8]>,
    /// Spilled writes that came back, reused across wake-ups.
    spill_done: Vec<crate::disk::spill::Done>,
    /// Reads split around holes with a file read in flight (thin_read.rs): at most one per
    /// task of this core's connections.
    splits: Vec<SplitRead>,
}

impl Drop for Reactor {
    /// A reactor torn down with mirrors out (a panic on the core thread: `run` itself only
    /// returns once every slot is free) leaks its connections rather than free task
    /// buffers that the link writer may still be framing (replication::LentBytes).
    fn drop(&mut self) {
        if self.reps_out > 0 {
            std::mem::forget(std::mem::take(&mut self.slots));
        }
    }
}

impl Reactor {
    pub fn new(
        core: usize,
        listener: TcpListener,
        reg: Arc<Registry>,
        stop: Arc<AtomicBool>,
        beats: Arc<crate::health::CoreBeats>,
        link: Option<crate::replication::CoreLink>,
        spill: Option<(Arc<crate::disk::spill::SpillGates>, Option<usize>)>,
    ) -> std::io::Result<Self> {
        let ring = IoUring::builder().build(RING_ENTRIES)?;
        let files = crate::net::files::LunFiles::register(&ring, &reg)?;
        let spill = match spill {
            Some((gates, cpu)) => Some(crate::disk::spill::Spill::start(
                core,
                cpu,
                files.clone_at_start()?,
                gates,
            )?),
            None => None,
        };
        Ok(Reactor {
            core,
            ring,
            listener,
            reg,
            slots: Vec::new(),
            free: Vec::new(),
            pool: BufPool::new(),
            files,
            inline_writes: Default::default(),
            tick_ts: Box::new(types::Timespec::new().nsec((TICK_MS * 1_000_000) as u32)),
            epoch: Instant::now(),
            stop,
            beats,
            accept_posted: false,
            last_space_check_s: 0,
            link,
            efd_buf: Box::new([0u8; 8]),
            rep_done: Vec::new(),
            reps_out: 0,
            spill,
            spill_efd_buf: Box::new([0u8; 8]),
            spill_done: Vec::new(),
            splits: Vec::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn push(&mut self, sqe: squeue::Entry) {
        // SAFETY: every buffer an SQE points to outlives the operation: socket buffers live
        // in the slot, which is not freed while `ops > 0`; disk buffers live in the task,
        // which conn/ keeps while `io_inflight > 0`; the timespec is boxed in self.
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            if let Err(e) = self.ring.submit() {
                tracing::error!(core = self.core, error = %e, "io_uring submit failed");
            }
        }
    }

    fn post_accept(&mut self) {
        if self.accept_posted || self.stop.load(Ordering::Relaxed) {
            return;
        }
        let sqe = opcode::Accept::new(
            types::Fd(self.listener.as_raw_fd()),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(user_data(Kind::Accept, 0, 0));
        self.push(sqe);
        self.accept_posted = true;
    }

    fn post_tick(&mut self) {
        let sqe = opcode::Timeout::new(&*self.tick_ts as *const types::Timespec)
            .build()
            .user_data(user_data(Kind::Tick, 0, 0));
        self.push(sqe);
    }

    /// Keeps a read posted on the replica link's doorbell eventfd.
    fn post_efd(&mut self) {
        let Some(l) = &self.link else { return };
        let fd = crate::replication::efd_raw(l);
        let ptr = self.efd_buf.as_mut_ptr();
        self.post_bell_read(fd, ptr, Kind::Rep);
    }

    /// Keeps a read posted on the spill helper's doorbell eventfd.
    fn post_spill_efd(&mut self) {
        let Some(sp) = &self.spill else { return };
        let fd = sp.bell.raw_fd();
        let ptr = self.spill_efd_buf.as_mut_ptr();
        self.post_bell_read(fd, ptr, Kind::Spill);
    }

    /// An 8-byte eventfd read into `ptr` (a boxed buffer of ours that outlives the ring).
    fn post_bell_read(&mut self, fd: RawFd, ptr: *mut u8, kind: Kind) {
        let sqe = opcode::Read::new(types::Fd(fd), ptr, 8)
            .build()
            .user_data(user_data(kind, 0, 0));
        self.push(sqe);
    }

    /// Delivers spilled writes that the helper finished to their tasks, as on_disk does for
    /// io_uring completions.
    fn on_spill(&mut self) {
        let Some(sp) = self.spill.as_mut() else {
            return;
        };
        if !sp.has_done() {
            return;
        }
        let mut done = std::mem::take(&mut self.spill_done);
        sp.take_done(&mut done);
        for d in &done {
            self.on_disk(d.slot, d.task, d.res);
        }
        done.clear();
        self.spill_done = done;
    }

    /// Delivers acknowledged mirrored operations to their tasks: consecutive acks for one
    /// connection are carried out together (one send queue append, one submission).
    fn on_rep(&mut self) {
        let Some(l) = &self.link else { return };
        if l.done_rx.is_empty() {
            return;
        }
        let mut done = std::mem::take(&mut self.rep_done);
        done.extend(l.done_rx.try_iter());
        self.reps_out = self.reps_out.saturating_sub(done.len());
        let mut i = 0;
        while i < done.len() {
            let slot = (done[i].token >> 32) as usize;
            let mut out = Out::default();
            let Some(s) = self.slots.get_mut(slot).and_then(|s| s.as_mut()) else {
                i += 1;
                continue;
            };
            while let Some(d) = done.get(i).filter(|d| (d.token >> 32) as usize == slot) {
                s.conn
                    .on_rep_done(d.token as u32, d.ok, &self.reg, &mut self.pool, &mut out);
                i += 1;
            }
            if !s.dead {
                self.apply(slot, out);
            }
            self.maybe_free(slot);
        }
        done.clear();
        self.rep_done = done;
    }

    /// With mirrored writes in flight, polls (yielding the CPU between looks) for up to
    /// [`ACK_POLL_US`] for a completion or an ack before the loop blocks. Why: the ack reader
    /// runs on another CPU, and waking a blocked core thread from there is an
    /// inter-processor interrupt, a VM exit on a virtual machine; the next ack is usually
    /// microseconds away. Yielding lets a client on the same CPU (a benchmark, or another
    /// daemon's thread) run meanwhile.
    fn poll_for_acks(&mut self) {
        if let Err(e) = self.ring.submit() {
            tracing::debug!(core = self.core, error = %e, "io_uring submit failed");
            return;
        }
        let start = Instant::now();
        loop {
            let acked = self.link.as_ref().is_some_and(|l| !l.done_rx.is_empty());
            let spilled = self.spill.as_ref().is_some_and(|s| s.has_done());
            if acked || spilled || !self.ring.completion().is_empty() {
                return;
            }
            if start.elapsed() >= Duration::from_micros(ACK_POLL_US) {
                return;
            }
            std::thread::yield_now();
        }
    }

    /// Runs until the stop flag is set and every connection has drained.
    pub fn run(&mut self) {
        self.post_accept();
        self.post_tick();
        self.post_efd();
        self.post_spill_efd();
        let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(RING_ENTRIES as usize);
        // Parked tasks wait for a lock that another core may release: poll them at this
        // period instead of sleeping until the next completion.
        let poll_ts = types::Timespec::new().nsec(WAIT_POLL_NS);
        loop {
            let waiting = self.slots.iter().flatten().any(|s| s.conn.has_waiting());
            if self.reps_out > 0 || self.spill.as_ref().is_some_and(|s| s.inflight > 0) {
                self.poll_for_acks();
            }
            // Acks that arrived while we were busy were handed over without an eventfd
            // write (see doorbell.rs): look once more after announcing the sleep, and do
            // not block if there are some.
            let acks_queued = self.link.as_ref().is_some_and(|l| {
                l.bell.going_to_sleep();
                !l.done_rx.is_empty()
            });
            let spills_queued = self.spill.as_ref().is_some_and(|s| {
                s.bell.going_to_sleep();
                s.has_done()
            });
            let acks_queued = acks_queued || spills_queued;
            let r = if acks_queued {
                self.ring.submit()
            } else if waiting {
                let args = types::SubmitArgs::new().timespec(&poll_ts);
                self.ring.submitter().submit_with_args(1, &args)
            } else {
                self.ring.submit_and_wait(1)
            };
            if let Err(e) = r {
                if e.raw_os_error() == Some(libc::ETIME) || e.raw_os_error() == Some(libc::EINTR) {
                    // A poll period passed: fall through to retry parked tasks.
                } else {
                    tracing::error!(core = self.core, error = %e, "io_uring wait failed");
                }
            }
            if let Some(l) = &self.link {
                l.bell.awake();
            }
            if let Some(s) = &self.spill {
                s.bell.awake();
            }
            cqes.clear();
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for &(ud, res) in &cqes {
                self.on_cqe(ud, res);
            }
            self.on_rep();
            self.on_spill();
            if waiting {
                self.retry_parked();
            }
            if self.stop.load(Ordering::Relaxed) && self.slots.iter().all(|s| s.is_none()) {
                return;
            }
        }
    }

    fn on_cqe(&mut self, ud: u64, res: i32) {
        let (kind, slot, task) = split_user_data(ud);
        match kind {
            k if k == Kind::Accept as u8 => {
                self.accept_posted = false;
                if res >= 0 {
                    // SAFETY: a successful accept returns a new fd that nothing else owns.
                    let stream = unsafe { TcpStream::from_raw_fd(res) };
                    self.add_conn(stream);
                } else if res != -libc::ECANCELED {
                    tracing::warn!(core = self.core, errno = -res, "accept failed");
                }
                self.post_accept();
            }
            k if k == Kind::Recv as u8 => self.on_recv(slot, res),
            k if k == Kind::Send as u8 => self.on_send(slot, res),
            k if k == Kind::Disk as u8 => self.on_disk(slot, task, res),
            k if k == Kind::ReadPart as u8 => self.on_read_part(slot, task, res),
            k if k == Kind::Tick as u8 => self.on_tick(),
            // The eventfd woke us: re-arm it; the acks are taken after this batch.
            k if k == Kind::Rep as u8 => self.post_efd(),
            k if k == Kind::Spill as u8 => self.post_spill_efd(),
            _ => debug_assert!(false, "unknown completion kind {kind}"),
        }
    }

    fn retry_parked(&mut self) {
        let reg = Arc::clone(&self.reg);
        for idx in 0..self.slots.len() {
            let Some(s) = self.slots.get_mut(idx).and_then(|s| s.as_mut()) else {
                continue;
            };
            if s.dead || !s.conn.has_waiting() {
                continue;
            }
            let mut out = Out::default();
            s.conn.retry_waiting(&reg, &mut self.pool, &mut out);
            self.apply(idx, out);
        }
    }

    fn add_conn(&mut self, stream: TcpStream) {
        let peer: SocketAddr = match stream.peer_addr() {
            Ok(p) => p,
            Err(_) => return,
        };
        let live = self.slots.len() - self.free.len();
        if live >= MAX_CONNS_PER_CORE {
            tracing::warn!(core = self.core, %peer, "connection limit reached; refusing");
            return;
        }
        // Latency matters more than segment efficiency for SCSI responses.
        let _ = stream.set_nodelay(true);
        tracing::debug!(core = self.core, %peer, "connection accepted");
        let mut conn = Conn::new(&self.reg, peer, stream.local_addr().ok(), self.now_ms());
        if let Some(m) = self.reg.metrics.get() {
            m.connection(self.core, true);
            conn.count_into(Arc::clone(m), self.core);
        }
        let slot = Slot {
            stream,
            conn,
            rbuf: self.pool.get(RECV_BUF_BYTES),
            rstart: 0,
            rlen: 0,
            recv_posted: false,
            after_lend: false,
            sendq: Default::default(),
            send_posted: false,
            close_after_send: false,
            dead: false,
            ops: 0,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.post_recv(idx);
    }

    fn post_recv(&mut self, idx: usize) {
        let Some(s) = self.slots.get_mut(idx).and_then(|s| s.as_mut()) else {
            return;
        };
        if s.recv_posted || s.dead || s.conn.closing {
            return;
        }
        let max_pdu = s.conn.max_pdu_bytes();
        if s.rbuf.len() < max_pdu {
            let mut bigger = self.pool.get(max_pdu);
            let have = s.rlen - s.rstart;
            bigger[..have].copy_from_slice(&s.rbuf[s.rstart..s.rlen]);
            self.pool.put(std::mem::replace(&mut s.rbuf, bigger));
            s.rstart = 0;
            s.rlen = have;
        }
        // The PDU that starts at rstart, if its header is here: how long it is in total.
        let partial = s.conn.frame_bytes(&s.rbuf[s.rstart..s.rlen]);
        let need = partial.unwrap_or(max_pdu);
        if s.rbuf.len() - s.rstart < need {
            s.rbuf.copy_within(s.rstart..s.rlen, 0);
            s.rlen -= s.rstart;
            s.rstart = 0;
        }
        if s.rlen == s.rbuf.len() {
            // Cannot happen: the buffer holds a maximal PDU from rstart, and on_recv consumes
            // every complete PDU. Treat it as a broken stream rather than spin.
            debug_assert!(false, "receive buffer full");
            self.kill(idx);
            return;
        }
        let mut len = s.rbuf.len() - s.rlen;
        let have = s.rlen - s.rstart;
        if let Some(total) = partial.filter(|&t| t >= LARGE_PDU_BYTES && t > have) {
            // Stop at the end of a large PDU and the header after it, so that little
            // follows it in the buffer: a write whose buffer is lent to its task (conn/,
            // LEND_MIN_BYTES) leaves at most that header to move into the fresh buffer, and
            // the next large PDU is again received up to its end in one receive.
            len = len.min(total - have + BHS_LEN);
        } else if partial.is_none() && have < BHS_LEN && (have > 0 || s.after_lend) {
            // No header, or part of one, after a lent write: complete the header first, or
            // this receive takes the whole buffer and a large PDU in it cannot be lent
            // without moving everything after it into the fresh buffer. (A stream of small
            // PDUs is still received many at a time: it lends nothing.)
            len = len.min(BHS_LEN - have);
        }
        let fd = s.stream.as_raw_fd();
        let ptr = s.rbuf[s.rlen..].as_mut_ptr();
        let len = len as u32;
        s.recv_posted = true;
        s.ops += 1;
        let sqe = opcode::Recv::new(types::Fd(fd), ptr, len)
            .build()
            .user_data(user_data(Kind::Recv, idx, 0));
        self.push(sqe);
    }

    fn on_recv(&mut self, idx: usize, res: i32) {
        let now = self.now_ms();
        let reg = Arc::clone(&self.reg);
        let Some(s) = self.slots.get_mut(idx).and_then(|s| s.as_mut()) else {
            return;
        };
        s.ops -= 1;
        s.recv_posted = false;
        if res <= 0 {
            if res < 0 && res != -libc::ECONNRESET && res != -libc::ECANCELED {
                tracing::debug!(core = self.core, errno = -res, "recv failed");
            }
            self.kill(idx);
            self.maybe_free(idx);
            return;
        }
        s.rlen += res as usize;
        let mut out = Out::default();
        s.after_lend = false;
        loop {
            let r = s.conn.on_recv(
                &s.rbuf[s.rstart..s.rlen],
                &reg,
                &mut self.pool,
                now,
                &mut out,
            );
            s.rstart += r.used_bytes;
            let Some(total) = r.lend_bytes else {
                s.after_lend &= r.used_bytes == 0;
                break;
            };
            // Lend the buffer holding this PDU to its task (conn/, LEND_MIN_BYTES) and go
            // on in a fresh one that starts with whatever followed it (usually nothing: a
            // receive stops at the end of a large PDU).
            let end = s.rstart + total;
            debug_assert!(end <= s.rlen, "a lent PDU is whole");
            let mut fresh = self.pool.get(s.rbuf.len());
            let tail = s.rlen - end;
            fresh[..tail].copy_from_slice(&s.rbuf[end..s.rlen]);
            let mut lent = std::mem::replace(&mut s.rbuf, fresh);
            lent.narrow(s.rstart, total);
            s.rstart = 0;
            s.rlen = tail;
            s.conn
                .on_recv_lent(lent, &reg, &mut self.pool, now, &mut out);
            s.after_lend = true;
        }
        if s.rstart == s.rlen {
            s.rstart = 0;
            s.rlen = 0;
        }
        self.apply(idx, out);
        self.post_recv(idx);
        self.maybe_free(idx);
    }

    /// Carries out what a connection asked for.
    fn apply(&mut self, idx: usize, out: Out) {
        let mut pending = vec![out];
        let mut sqes: Vec<squeue::Entry> = Vec::new();
        let mut close_now = false;
        while let Some(out) = pending.pop() {
            let Some(s) = self.slots.get_mut(idx).and_then(|s| s.as_mut()) else {
                return;
            };
            s.sendq.push(out.send, out.send_refs, out.send_holds);
            s.close_after_send |= out.close_after_send;
            close_now |= out.close_now;
            if let Some(rep) = self.reg.replication.get() {
                for &(lun, offset, len) in &out.diverged {
                    rep.diverged(lun, offset, len);
                }
            }
            if let Some(l) = &self.link {
                for mut r in out.rep {
                    r.token |= (idx as u64) << 32;
                    if l.req_tx.send(r).is_err() {
                        tracing::error!("replica link thread gone");
                    } else {
                        self.reps_out += 1;
                    }
                }
            }
            for req in out.io {
                let file = types::Fixed(req.lun as u32);
                // Writes marked their chunks already (conn: mark_allocation).
                let map = &self.reg.luns[req.lun].alloc;
                let sqe = match req.op {
                    IoOp::Flush => opcode::Fsync::new(file)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build(),
                    IoOp::Fallocate { offset, len, mode } => opcode::Fallocate::new(file, len)
                        .offset(offset)
                        .mode(mode)
                        .build(),
                    IoOp::Read {
                        offset,
                        buf_off,
                        len,
                    }
                    | IoOp::Write {
                        offset,
                        buf_off,
                        len,
                        ..
                    } => {
                        let Some((base, cap)) = s.conn.task_buf_ptr(req.task) else {
                            debug_assert!(false, "disk I/O without a buffer");
                            let mut o = Out::default();
                            s.conn.on_io_done(
                                req.task,
                                -libc::EIO,
                                &self.reg,
                                &mut self.pool,
                                &mut o,
                            );
                            pending.push(o);
                            continue;
                        };
                        assert!(
                            buf_off as usize + len as usize <= cap,
                            "disk I/O beyond its buffer"
                        );
                        // SAFETY: buf_off + len <= cap (asserted), so the pointer stays inside
                        // the task's buffer.
                        let ptr = unsafe { base.add(buf_off as usize) };
                        match req.op {
                            IoOp::Write {
                                fua: false, offset, ..
                            } if self.inline_writes.allowed(self.reg.luns[req.lun].cache) => {
                                let spill_has_fd = self.files.spillable(req.lun);
                                if let Some(sp) = self.spill.as_mut().filter(|_| spill_has_fd) {
                                    let w = crate::disk::spill::SpillWrite {
                                        lun: req.lun,
                                        ptr,
                                        len,
                                        offset,
                                        slot: idx,
                                        task: req.task,
                                    };
                                    // SAFETY: the task keeps its buffer, unchanged, while
                                    // its disk operation is in flight (io_inflight), and the
                                    // slot stays while ops > 0; both last until on_spill
                                    // delivers the completion.
                                    if unsafe { sp.offer(w) } {
                                        s.ops += 1;
                                        continue;
                                    }
                                }
                                // SAFETY: ptr..ptr+len lies inside the task's buffer (asserted
                                // above), which the task owns until on_io_done below; the fd
                                // is one of ours (or -1 for a removed LUN: EBADF) and stays
                                // open while in `files`.
                                let res = unsafe {
                                    self.inline_writes.pwrite(
                                        self.files.raw_fd(req.lun),
                                        ptr,
                                        len,
                                        offset,
                                    )
                                };
                                let mut o = Out::default();
                                s.conn
                                    .on_io_done(req.task, res, &self.reg, &mut self.pool, &mut o);
                                pending.push(o);
                                continue;
                            }
                            IoOp::Write { fua, .. } => {
                                // FUA: durable before GOOD (RWF_DSYNC = a per-write fdatasync).
                                let flags = if fua { libc::RWF_DSYNC } else { 0 };
                                opcode::Write::new(file, ptr, len)
                                    .offset(offset)
                                    .rw_flags(flags)
                                    .build()
                            }
                            IoOp::Read { .. } => {
                                match thin_read::plan(map, offset, len) {
                                    ReadPlan::File => {
                                        opcode::Read::new(file, ptr, len).offset(offset).build()
                                    }
                                    ReadPlan::Zeros => {
                                        // SAFETY: ptr..ptr+len lies inside the task's buffer
                                        // (asserted above), which the task owns.
                                        unsafe { std::ptr::write_bytes(ptr, 0, len as usize) };
                                        let mut o = Out::default();
                                        s.conn.on_io_done(
                                            req.task,
                                            len as i32,
                                            &self.reg,
                                            &mut self.pool,
                                            &mut o,
                                        );
                                        pending.push(o);
                                        continue;
                                    }
                                    ReadPlan::Split => {
                                        let mut r = SplitRead::new(
                                            idx, req.task, req.lun, offset, buf_off, len,
                                        );
                                        // SAFETY: base..base+cap is the task's buffer, which
                                        // the task owns, unread by anything else, until its
                                        // I/O completes (io_inflight keeps it).
                                        let next = r
                                            .advance(map, unsafe { thin_read::zero_in(base, cap) });
                                        let Some(f) = next else {
                                            debug_assert!(false, "a split read holds data");
                                            continue;
                                        };
                                        self.splits.push(r);
                                        s.ops += 1;
                                        let ud = user_data(Kind::ReadPart, idx, req.task);
                                        // SAFETY: as above, until this read's completion.
                                        sqes.push(unsafe {
                                            thin_read::sqe(file, base, cap, f, ud)
                                        });
                                        continue;
                                    }
                                }
                            }
                            _ => {
                                debug_assert!(false, "a buffered op is a read or a write");
                                continue;
                            }
                        }
                    }
                };
                s.ops += 1;
                sqes.push(sqe.user_data(user_data(Kind::Disk, idx, req.task)));
            }
        }
        for sqe in sqes {
            self.push(sqe);
        }
        if close_now {
            self.kill(idx);
        }
        self.flush_send(idx);
    }

    fn flush_send(&mut self, idx: usize) {
        let Some(s) = self.slots.get_mut(idx).and_then(|s| s.as_mut()) else {
            return;
        };
        if s.send_posted || s.dead {
            return;
        }
        if s.sendq.is_empty() {
            if s.close_after_send {
                self.kill(idx);
            }
            return;
        }
        let msg = s.sendq.prepare_msg();
        let fd = s.stream.as_raw_fd();
        s.send_posted = true;
        s.ops += 1;
        let sqe = opcode::SendMsg::new(types::Fd(fd), msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(user_data(Kind::Send, idx, 0));
        self.push(sqe);
    }

    fn on_send(&mut self, idx: usize, res: i32) {
        let Some(s) = self.slots.get_mut(idx).and_then(|s| s.as_mut()) else {
            return;
        };
        s.ops -= 1;
        s.send_posted = false;
        let pool = &mut self.pool;
        if res < 0 {
            s.sendq.sent(0, &mut |b| pool.put(b));
            s.sendq.clear(&mut |b| pool.put(b));
            self.kill(idx);
        } else {
            s.sendq.sent(res as usize, &mut |b| pool.put(b));
            self.flush_send(idx);
        }
        self.maybe_free(idx);
    }

    fn on_disk(&mut self, idx: usize, task: u32, res: i32) {
        let reg = Arc::clone(&self.reg);
        let Some(s) = self.slots.get_mut(idx).and_then(|s| s.as_mut()) else {
            debug_assert!(false, "disk completion for a free slot");
            return;
        };
        s.ops -= 1;
        let mut out = Out::default();
        s.conn.on_io_done(task, res, &reg, &mut self.pool, &mut out);
        if s.dead {
            // Nobody to answer; just let the task go.
            self.maybe_free(idx);
            return;
        }
        self.apply(idx, out);
        self.maybe_free(idx);
    }

    /// A file read of a split read is done: the next run goes out, or the whole read
    /// completes (as one disk completion of its full length) or fails.
    fn on_read_part(&mut self, idx: usize, task: u32, res: i32) {
        let Some(at) = self
            .splits
            .iter()
            .position(|r| r.slot == idx && r.task == task)
        else {
            debug_assert!(false, "a read part without its split read");
            return;
        };
        let Some(s) = self.slots.get_mut(idx).and_then(|s| s.as_mut()) else {
            debug_assert!(false, "a read part for a free slot");
            return;
        };
        let next = match (res, s.conn.task_buf_ptr(task)) {
            (n, Some((base, cap))) if n > 0 && !s.dead => {
                let r = &mut self.splits[at];
                r.file_read_done(n as u32);
                let map = &self.reg.luns[r.lun].alloc;
                // SAFETY: the task's buffer, owned by the task until its I/O completes
                // (its read is still in flight for the conn: io_inflight).
                r.advance(map, unsafe { thin_read::zero_in(base, cap) })
                    .map(|f| {
                        let ud = user_data(Kind::ReadPart, idx, task);
                        // SAFETY: as above, until this read's completion.
                        unsafe { thin_read::sqe(types::Fixed(r.lun as u32), base, cap, f, ud) }
                    })
                    .ok_or(r.total_len() as i32)
            }
            (n, _) if n <= 0 => Err(n),
            _ => Err(-libc::ECANCELED),
        };
        match next {
            // One file read done, the next in flight: the slot's count stays.
            Ok(sqe) => self.push(sqe),
            Err(res) => {
                self.splits.swap_remove(at);
                self.on_disk(idx, task, res);
            }
        }
    }

    fn on_tick(&mut self) {
        // This loop turns: the watchdog's evidence (health.rs).
        self.beats.beat(self.core);
        let now = self.now_ms();
        // Pool space is a node-wide fact: one core watches it, about once a second.
        if self.core == 0 && now / 1000 != self.last_space_check_s {
            self.last_space_check_s = now / 1000;
            for lun in self.reg.luns.iter().filter(|l| !l.is_removed()) {
                lun.check_soft_threshold();
            }
        }
        if self.files.stale(&self.reg) {
            self.files.sync(&self.ring, &self.reg, self.core);
        }
        let reg = Arc::clone(&self.reg);
        let stopping = self.stop.load(Ordering::Relaxed);
        for idx in 0..self.slots.len() {
            let Some(s) = self.slots.get_mut(idx).and_then(|s| s.as_mut()) else {
                continue;
            };
            if stopping {
                self.kill(idx);
                self.maybe_free(idx);
                continue;
            }
            let mut out = Out::default();
            s.conn.on_tick(&reg, &mut self.pool, now, &mut out);
            self.apply(idx, out);
            self.maybe_free(idx);
        }
        if !(stopping && self.slots.iter().all(|s| s.is_none())) {
            self.post_tick();
        }
    }

    /// Shuts the socket down: pending recv/send complete, after which the slot is freed.
    fn kill(&mut self, idx: usize) {
        let Some(s) = self.slots.get_mut(idx).and_then(|s| s.as_mut()) else {
            return;
        };
        if !s.dead {
            s.dead = true;
            let _ = s.stream.shutdown(std::net::Shutdown::Both);
            s.conn.shutdown(&self.reg, &mut self.pool);
        }
    }

    fn maybe_free(&mut self, idx: usize) {
        let Some(s) = self.slots.get_mut(idx).and_then(|s| s.as_mut()) else {
            return;
        };
        if s.dead && s.ops == 0 && !s.conn.io_inflight() {
            tracing::debug!(core = self.core, "connection closed");
            if let Some(m) = self.reg.metrics.get() {
                m.connection(self.core, false);
            }
            self.slots[idx] = None;
            self.free.push(idx);
        }
    }
}
