//! Large buffered writes handed to a helper thread while this core's CPU is saturated and
//! another CPU has idle time.
//!
//! Why: a connection lives on one core thread, so one session gets at most one CPU, and for
//! a large write about half of that CPU's time is ext4's buffered write (the page-cache copy
//! and the per-page work; `perf` on 128 KiB writes, docs/performance.md). When that CPU is
//! saturated (by this core's own connections, or on a small machine by a local initiator or
//! benchmark sharing it) while another CPU idles, the copy can run there instead: each core
//! thread has a helper thread, kept off the core's CPU, that does the `pwrite`s it is handed
//! and hands back what an io_uring completion would carry. (Large cached reads were tried the
//! same way: 5% more IOPS for twice the daemon CPU per read, so reads stay on their core.)
//!
//! When every CPU is busy the hand-off would only add its own cost (a wake-up and a
//! completion message; measured as 57-64 instead of 39-46 µs of daemon CPU per 128 KiB write
//! with a helper that was always used), so a gate per core, set from `/proc/stat` every
//! [`SAMPLE_MS`], lets writes through only while the core's CPU is saturated and some other
//! CPU has room. The gate opens at [`OPEN_BUSY_PERMILLE`] busy / [`OPEN_IDLE_PERMILLE`] idle
//! elsewhere and closes only below the lower [`KEEP_BUSY_PERMILLE`] / [`KEEP_IDLE_PERMILLE`]:
//! once open, the helper's own work fills part of the other CPU and part of the core's time
//! is freed, which must not close the gate again at the next sample.
//!
//! Ordering: a spilled write is still one disk operation of its task, which keeps its range
//! lock (and its buffer) until the completion comes back, exactly as with io_uring.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::net::doorbell::Doorbell;

/// Writes at least this long may be spilled. Smaller ones cost less to do than to hand over.
pub const SPILL_MIN_BYTES: u32 = 64 << 10;
/// Spilled writes in flight per core, a hard bound: beyond it the core writes inline.
pub const MAX_SPILLED: usize = 64;
/// How often the gates are recomputed.
pub const SAMPLE_MS: u64 = 100;
/// A closed gate opens when the core's CPU is at least this busy (permille of the period)...
pub const OPEN_BUSY_PERMILLE: u16 = 900;
/// ...and some other CPU was idle at least this much.
pub const OPEN_IDLE_PERMILLE: u16 = 250;
/// An open gate stays open while the core's CPU is at least this busy...
pub const KEEP_BUSY_PERMILLE: u16 = 500;
/// ...and some other CPU still has this much idle time.
pub const KEEP_IDLE_PERMILLE: u16 = 100;

/// One CPU's time from `/proc/stat`, in clock ticks.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy: u64,
    pub idle: u64,
}

/// The per-CPU lines (`cpuN user nice system idle iowait irq softirq steal ...`) of
/// `/proc/stat`. Busy is user + nice + system + irq + softirq + steal (guest time is already
/// inside user; stolen time is time the CPU was not ours); idle is idle + iowait. Lines that
/// do not parse are skipped: a missing CPU just cannot be a spill target.
pub fn parse_proc_stat(text: &str) -> Vec<(usize, CpuTimes)> {
    let mut out = Vec::new();
    for line in text.lines() {
        // "cpuN ..." only: the "cpu  ..." total line has a space where N would be.
        let Some(rest) = line
            .strip_prefix("cpu")
            .filter(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        else {
            continue;
        };
        let mut fields = rest.split_ascii_whitespace();
        let Some(Ok(cpu)) = fields.next().map(str::parse::<usize>) else {
            continue;
        };
        let v: Vec<u64> = fields.take(8).map_while(|f| f.parse().ok()).collect();
        if v.len() < 4 {
            continue;
        }
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        out.push((
            cpu,
            CpuTimes {
                busy: at(0) + at(1) + at(2) + at(5) + at(6) + at(7),
                idle: at(3) + at(4),
            },
        ));
    }
    out
}

/// Busy share of each CPU present in both samples, in permille. A CPU with no ticks in
/// between (a sample period shorter than a tick) counts as idle.
pub fn busy_permille(prev: &[(usize, CpuTimes)], now: &[(usize, CpuTimes)]) -> Vec<(usize, u16)> {
    now.iter()
        .filter_map(|&(cpu, n)| {
            let (_, p) = prev.iter().find(|(c, _)| *c == cpu)?;
            let busy = n.busy.saturating_sub(p.busy);
            let total = busy + n.idle.saturating_sub(p.idle);
            let permille = (busy * 1000).checked_div(total).unwrap_or(0);
            Some((cpu, permille.min(1000) as u16))
        })
        .collect()
}

/// Whether the core on a CPU `own_busy` permille busy should spill, given the busy shares of
/// the other CPUs and whether its gate is open now.
pub fn gate(own_busy: u16, others_busy: &[u16], open: bool) -> bool {
    let best_idle = others_busy
        .iter()
        .map(|&b| 1000u16.saturating_sub(b))
        .max()
        .unwrap_or(0);
    if open {
        own_busy >= KEEP_BUSY_PERMILLE && best_idle >= KEEP_IDLE_PERMILLE
    } else {
        own_busy >= OPEN_BUSY_PERMILLE && best_idle >= OPEN_IDLE_PERMILLE
    }
}

/// One gate per core thread, written by the sampler and read by the core on each large write.
#[derive(Debug)]
pub struct SpillGates {
    /// `spill_writes = "always"`: every gate open, no sampler.
    always: bool,
    open: Vec<AtomicBool>,
    /// How often a gate changed state, for status and tests.
    pub flips: AtomicU64,
}

impl SpillGates {
    /// Gates for `cores` core threads, closed until the sampler opens them.
    pub fn new(cores: usize) -> SpillGates {
        SpillGates {
            always: false,
            open: (0..cores).map(|_| AtomicBool::new(false)).collect(),
            flips: AtomicU64::new(0),
        }
    }

    /// Gates that are always open.
    pub fn always() -> SpillGates {
        SpillGates {
            always: true,
            open: Vec::new(),
            flips: AtomicU64::new(0),
        }
    }

    pub fn is_open(&self, core: usize) -> bool {
        self.always
            || self
                .open
                .get(core)
                .is_some_and(|g| g.load(Ordering::Relaxed))
    }

    /// Recomputes every gate from one pair of samples; `cpu_of[core]` is the CPU the core
    /// thread is pinned to.
    pub fn update(&self, cpu_of: &[usize], busy: &[(usize, u16)]) {
        for (core, &cpu) in cpu_of.iter().enumerate() {
            let Some(g) = self.open.get(core) else { break };
            let Some(&(_, own)) = busy.iter().find(|(c, _)| *c == cpu) else {
                continue;
            };
            let others: Vec<u16> = busy
                .iter()
                .filter(|(c, _)| *c != cpu)
                .map(|&(_, b)| b)
                .collect();
            let was = g.load(Ordering::Relaxed);
            let now = gate(own, &others, was);
            if now != was {
                g.store(now, Ordering::Relaxed);
                self.flips.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    core,
                    cpu,
                    own_busy = own,
                    open = now,
                    "large-write spill gate"
                );
            }
        }
    }
}

/// Samples `/proc/stat` every [`SAMPLE_MS`] and updates the gates until `stop` is set.
pub fn run_sampler(gates: Arc<SpillGates>, cpu_of: Vec<usize>, stop: Arc<AtomicBool>) {
    let read = || {
        std::fs::read_to_string("/proc/stat")
            .map(|t| parse_proc_stat(&t))
            .unwrap_or_default()
    };
    let mut prev = read();
    if prev.is_empty() {
        tracing::info!("no per-CPU times in /proc/stat: large writes stay on their core");
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(SAMPLE_MS));
        let now = read();
        gates.update(&cpu_of, &busy_permille(&prev, &now));
        prev = now;
    }
}

/// How long an idle helper looks for its next job before it sleeps. Why: waking a sleeping
/// helper is a futex wake-up and, on another CPU, an inter-processor interrupt (a VM exit on
/// a virtual machine) paid by the core thread; under a streaming load the next write
/// arrives within microseconds. The helper only runs while the other CPUs have room.
const HELPER_SPIN_US: u64 = 50;

/// The next job, looking (yielding the CPU in between) for up to [`HELPER_SPIN_US`] before
/// blocking; None once the core has gone.
fn next_job(rx: &Receiver<SpillWrite>) -> Option<SpillWrite> {
    let start = std::time::Instant::now();
    loop {
        match rx.try_recv() {
            Ok(j) => return Some(j),
            Err(crossbeam_channel::TryRecvError::Disconnected) => return None,
            Err(crossbeam_channel::TryRecvError::Empty) => {}
        }
        if start.elapsed() >= Duration::from_micros(HELPER_SPIN_US) {
            return rx.recv().ok();
        }
        std::thread::yield_now();
    }
}

/// A write to hand to the helper: `len` bytes from `ptr`, a task's buffer on the core
/// thread, to `offset` in LUN `lun`, for task `task` of connection slot `slot`.
#[derive(Debug)]
pub struct SpillWrite {
    pub lun: usize,
    pub ptr: *const u8,
    pub len: u32,
    pub offset: u64,
    pub slot: usize,
    pub task: u32,
}

// SAFETY: the buffer `ptr` points into is owned by a task on the core thread, which keeps it
// (and does not touch it) until this write's `Done` has been taken (see `Spill::offer`); the
// helper only reads it.
unsafe impl Send for SpillWrite {}

/// What came back: the result a CQE would carry for the task's disk operation.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    pub slot: usize,
    pub task: u32,
    pub res: i32,
}

/// A core thread's helper.
pub struct Spill {
    core: usize,
    jobs: Option<Sender<SpillWrite>>,
    done_rx: Receiver<Done>,
    pub bell: Arc<Doorbell>,
    gates: Arc<SpillGates>,
    /// Jobs handed over and not yet taken back.
    pub inflight: usize,
    /// Writes spilled so far, for status and tests.
    pub spilled_count: u64,
    helper: Option<std::thread::JoinHandle<()>>,
}

impl Spill {
    /// Starts the helper of `core` (pinned to `cpu`): it writes through its own handles to
    /// the LUN files, `files[lun]`, and keeps off `cpu`.
    pub fn start(
        core: usize,
        cpu: Option<usize>,
        files: Vec<File>,
        gates: Arc<SpillGates>,
    ) -> std::io::Result<Spill> {
        // Bounded by construction: the core offers a write only while fewer than
        // MAX_SPILLED are in flight (`offer`), and each job gets one completion, so neither
        // channel holds more than MAX_SPILLED entries.
        let (jobs, job_rx) = crossbeam_channel::unbounded::<SpillWrite>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
        let bell = Arc::new(Doorbell::new()?);
        let ring = Arc::clone(&bell);
        let helper = std::thread::Builder::new()
            .name(format!("twinsan-spill{core}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if let Err(e) = crate::net::affinity::keep_off_cpu(cpu) {
                        tracing::debug!(core, error = %e, "spill helper placement");
                    }
                }
                while let Some(j) = next_job(&job_rx) {
                    let res = match files.get(j.lun) {
                        // SAFETY: the job's buffer stays valid and unchanged until its Done
                        // is taken (see SpillWrite); the fd is ours and open.
                        Some(f) => unsafe {
                            crate::disk::inline_write::pwrite_chunked(
                                f.as_raw_fd(),
                                j.ptr,
                                j.len,
                                j.offset,
                            )
                        },
                        None => -libc::EBADF,
                    };
                    let d = Done {
                        slot: j.slot,
                        task: j.task,
                        res,
                    };
                    if done_tx.send(d).is_err() {
                        return;
                    }
                    ring.ring();
                }
            })?;
        Ok(Spill {
            core,
            jobs: Some(jobs),
            done_rx,
            bell,
            gates,
            inflight: 0,
            spilled_count: 0,
            helper: Some(helper),
        })
    }

    /// Hands a plain write to the helper if it is large, the gate is open and the helper has
    /// room; false means the caller writes it itself.
    ///
    /// # Safety
    /// If this returns true, `w.ptr..w.ptr + w.len` must stay valid and unchanged until the
    /// `Done` for (`w.slot`, `w.task`) has been taken with [`Spill::take_done`].
    pub unsafe fn offer(&mut self, w: SpillWrite) -> bool {
        if w.len < SPILL_MIN_BYTES || self.inflight >= MAX_SPILLED || !self.gates.is_open(self.core)
        {
            return false;
        }
        let Some(jobs) = &self.jobs else { return false };
        if jobs.send(w).is_err() {
            return false; // the helper is gone (it panicked): write inline
        }
        self.inflight += 1;
        self.spilled_count += 1;
        true
    }

    /// Whether this core's gate is open now: its CPU is saturated and another has room.
    pub fn gate_open(&self) -> bool {
        self.gates.is_open(self.core)
    }

    pub fn has_done(&self) -> bool {
        !self.done_rx.is_empty()
    }

    /// Moves the completions that came back into `into`.
    pub fn take_done(&mut self, into: &mut Vec<Done>) {
        let before = into.len();
        into.extend(self.done_rx.try_iter());
        let n = into.len() - before;
        debug_assert!(n <= self.inflight, "more spill completions than jobs");
        self.inflight = self.inflight.saturating_sub(n);
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        // Closing the job channel ends the helper once it has finished what it holds.
        self.jobs = None;
        if let Some(h) = self.helper.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE_A: &str = "cpu  100 0 50 800 10 0 5 0 0 0\n\
        cpu0 60 0 30 300 5 0 5 0 0 0\n\
        cpu1 40 0 20 500 5 0 0 0 0 0\n\
        intr 12345\nctxt 999\n";
    const SAMPLE_B: &str = "cpu  300 0 150 850 10 0 5 0 0 0\n\
        cpu0 150 0 100 300 5 0 15 0 0 0\n\
        cpu1 50 0 20 590 5 0 0 0 0 0\n";

    #[test]
    fn proc_stat_lines_become_busy_shares_per_cpu() {
        let a = parse_proc_stat(SAMPLE_A);
        assert_eq!(
            a,
            vec![
                (
                    0,
                    CpuTimes {
                        busy: 95,
                        idle: 305
                    }
                ),
                (
                    1,
                    CpuTimes {
                        busy: 60,
                        idle: 505
                    }
                ),
            ]
        );
        let b = parse_proc_stat(SAMPLE_B);
        // cpu0: 170 busy ticks, 0 idle -> 1000; cpu1: 10 busy, 90 idle -> 100.
        assert_eq!(busy_permille(&a, &b), vec![(0, 1000), (1, 100)]);
        // No ticks in between: idle, not a division by zero.
        assert_eq!(busy_permille(&b, &b), vec![(0, 0), (1, 0)]);
        // Garbage and short lines are skipped.
        assert!(parse_proc_stat("cpu0 1 2\ncpux 1 2 3 4\nnot a line\n").is_empty());
    }

    #[test]
    fn gate_opens_only_when_own_cpu_is_saturated_and_another_has_room_then_holds() {
        // Saturated, the other CPU idle: open.
        assert!(gate(980, &[100], false));
        // Saturated but every other CPU busy too: spilling would only add work.
        assert!(!gate(980, &[950], false));
        // Room elsewhere but our CPU is not the bottleneck.
        assert!(!gate(600, &[100], false));
        // One CPU: nowhere to spill.
        assert!(!gate(1000, &[], false));
        // Open: the helper now fills part of the other CPU and frees part of ours; stay.
        assert!(gate(600, &[700], true));
        // Close once the other CPU is full as well, or our CPU has plenty of time.
        assert!(!gate(990, &[960], true));
        assert!(!gate(300, &[100], true));
    }

    #[test]
    fn gates_follow_the_samples_of_their_own_cpu() {
        let g = SpillGates::new(2);
        // Core 0 on CPU 0 (saturated), core 1 on CPU 1 (idle).
        g.update(&[0, 1], &[(0, 990), (1, 50)]);
        assert!(g.is_open(0));
        assert!(!g.is_open(1));
        g.update(&[0, 1], &[(0, 990), (1, 990)]);
        assert!(!g.is_open(0));
        assert_eq!(g.flips.load(Ordering::Relaxed), 2);
        // A core whose CPU is missing from the sample keeps its gate as it was.
        g.update(&[5, 1], &[(0, 990), (1, 50)]);
        assert!(!g.is_open(0));
        assert!(!g.is_open(5));
    }

    fn offer(
        s: &mut Spill,
        lun: usize,
        data: &[u8],
        len: u32,
        offset: u64,
        slot: usize,
        task: u32,
    ) -> bool {
        assert!(len as usize <= data.len());
        let w = SpillWrite {
            lun,
            ptr: data.as_ptr(),
            len,
            offset,
            slot,
            task,
        };
        // SAFETY: the test keeps `data` alive and unchanged until it has taken every
        // completion (or dropped the Spill, which waits for the helper).
        unsafe { s.offer(w) }
    }

    #[test]
    fn a_spilled_write_lands_and_its_completion_comes_back() {
        let (dir, path, f) = crate::disk::inline_write::tests::scratch_file("spill");
        let gates = Arc::new(SpillGates::new(1));
        let mut s =
            Spill::start(0, None, vec![f.try_clone().unwrap()], Arc::clone(&gates)).unwrap();
        let data: Vec<u8> = (0..SPILL_MIN_BYTES).map(|i| (i % 253) as u8).collect();
        let n = SPILL_MIN_BYTES;
        let wait = |s: &mut Spill, want: usize| {
            let mut done = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while done.len() < want && std::time::Instant::now() < deadline {
                s.take_done(&mut done);
                std::thread::sleep(Duration::from_millis(1));
            }
            done
        };
        // Gate closed: the caller keeps the write.
        assert!(!offer(&mut s, 0, &data, n, 8192, 3, 7));
        gates.update(&[0], &[(0, 1000), (1, 0)]);
        assert!(gates.is_open(0));
        // Too small to be worth it.
        assert!(!offer(&mut s, 0, &data, 4096, 0, 3, 7));
        assert!(offer(&mut s, 0, &data, n, 8192, 3, 7));
        // A LUN index the helper has no file for comes back as EBADF, like a CQE would.
        assert!(offer(&mut s, 9, &data, n, 0, 4, 8));
        assert_eq!(s.inflight, 2);
        let done = wait(&mut s, 2);
        assert_eq!(done.len(), 2);
        assert_eq!(s.inflight, 0);
        let by_task = |t: u32| *done.iter().find(|d| d.task == t).unwrap();
        assert_eq!((by_task(7).slot, by_task(7).res), (3, n as i32));
        assert_eq!(by_task(8).res, -libc::EBADF);
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), 8192 + n as usize);
        assert!(back[..8192].iter().all(|&b| b == 0));
        assert_eq!(&back[8192..], &data[..]);
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
