//! Prometheus metrics. The I/O path only bumps counters that its own core thread owns
//! (one writer each: a relaxed load and store, no lock prefix, no lock, no allocation); a
//! scrape sums the cores and reads the slower facts (space, sessions, the pair) at that
//! moment, through a `prometheus_client` collector. Names follow the Prometheus
//! conventions: base units (seconds, bytes), `_total` counters, labels `target` and `lun`.

mod collector;
pub mod http;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use collector::{prometheus_text, render, Format};

/// Upper bounds of the command latency histogram's buckets, in nanoseconds (25 us to
/// 10 s: a cached read at the bottom, ESXi's 8 s ATS heartbeat limit near the top).
pub const LATENCY_BOUNDS_NS: [u64; 18] = [
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// What kind of command finished (from its CDB's operation code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdKind {
    /// READ (6/10/12/16).
    Read,
    /// WRITE (6/10/12/16), WRITE AND VERIFY, COMPARE AND WRITE.
    Write,
    /// UNMAP.
    Unmap,
    /// Everything else (INQUIRY, TEST UNIT READY, WRITE SAME, ...).
    Other,
}

impl CmdKind {
    /// The kind of the command whose CDB starts with `opcode`.
    pub fn of(opcode: u8) -> CmdKind {
        match opcode {
            0x08 | 0x28 | 0xa8 | 0x88 => CmdKind::Read,
            0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x89 => CmdKind::Write,
            0x42 => CmdKind::Unmap,
            _ => CmdKind::Other,
        }
    }

    const ALL: [CmdKind; 4] = [
        CmdKind::Read,
        CmdKind::Write,
        CmdKind::Unmap,
        CmdKind::Other,
    ];

    fn index(self) -> usize {
        self as usize
    }

    fn label(self) -> &'static str {
        match self {
            CmdKind::Read => "read",
            CmdKind::Write => "write",
            CmdKind::Unmap => "unmap",
            CmdKind::Other => "other",
        }
    }
}

/// Why a login was refused (the label of `twinsan_login_failures_total`), from the Login
/// Response's status class and detail (RFC 7143 section 11.13.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginFailure {
    /// 0x0201: CHAP failed (a wrong secret or user name).
    Authentication,
    /// 0x0202: the initiator is not in the target's ACL, or its address may not reach it.
    Authorization,
    /// 0x0203, 0x0204: no such target (or none this address may reach).
    TargetNotFound,
    /// Everything else: a malformed or unsupported login, a target error.
    Other,
}

impl LoginFailure {
    /// The reason a refusal with status `class`, `detail` counts as.
    pub fn of(class: u8, detail: u8) -> LoginFailure {
        match (class, detail) {
            (0x02, 0x01) => LoginFailure::Authentication,
            (0x02, 0x02) => LoginFailure::Authorization,
            (0x02, 0x03 | 0x04) => LoginFailure::TargetNotFound,
            _ => LoginFailure::Other,
        }
    }

    const ALL: [LoginFailure; 4] = [
        LoginFailure::Authentication,
        LoginFailure::Authorization,
        LoginFailure::TargetNotFound,
        LoginFailure::Other,
    ];

    fn label(self) -> &'static str {
        match self {
            LoginFailure::Authentication => "authentication",
            LoginFailure::Authorization => "authorization",
            LoginFailure::TargetNotFound => "target_not_found",
            LoginFailure::Other => "other",
        }
    }
}

/// Adds `n` to a counter only the calling core thread writes. Why not `fetch_add`: its
/// lock prefix costs on every command, and a single writer needs none; a scrape reads a
/// value that is at most one update old.
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// A latency histogram with fixed buckets ([`LATENCY_BOUNDS_NS`] and +Inf).
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; LATENCY_BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

/// The bucket of a latency of `ns`.
fn bucket(ns: u64) -> usize {
    LATENCY_BOUNDS_NS
        .iter()
        .position(|&b| ns <= b)
        .unwrap_or(LATENCY_BOUNDS_NS.len())
}

impl Histogram {
    /// Records `ns`; only one thread may call this (see [`bump`]).
    fn observe(&self, ns: u64) {
        bump(&self.counts[bucket(ns)], 1);
        bump(&self.sum_ns, ns);
    }

    /// Records `ns` from any thread (`fetch_add`). For threads off the I/O path that may
    /// briefly overlap (a replica link's old and new ack readers across a reconnect).
    pub fn observe_shared(&self, ns: u64) {
        self.counts[bucket(ns)].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// Histograms summed at scrape: per-bucket counts (not cumulative) and the sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistogramTotals {
    pub counts: [u64; LATENCY_BOUNDS_NS.len() + 1],
    pub sum_ns: u64,
}

impl HistogramTotals {
    /// Adds `h`'s figures.
    pub fn add(&mut self, h: &Histogram) {
        for (total, n) in self.counts.iter_mut().zip(&h.counts) {
            *total = total.wrapping_add(read(n));
        }
        self.sum_ns = self.sum_ns.wrapping_add(read(&h.sum_ns));
    }
}

/// One core's counters of one LUN. Aligned to a cache line: cores never share one.
#[repr(align(64))]
#[derive(Default)]
struct LunCounters {
    commands: [AtomicU64; 4],
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    /// Bytes deallocated by UNMAP and WRITE SAME with UNMAP.
    unmapped_bytes: AtomicU64,
    /// CHECK CONDITION answers by sense key (0..=15).
    errors: [AtomicU64; 16],
    read_latency: Histogram,
    write_latency: Histogram,
}

/// One core's counters.
struct CoreCounters {
    luns: Box<[LunCounters]>,
    connections_opened: AtomicU64,
    connections_closed: AtomicU64,
}

/// Every core's counters, summed at scrape, and the node's rare events.
pub struct Metrics {
    cores: Box<[CoreCounters]>,
    /// Refused logins by [`LoginFailure`]. Shared by the cores (`fetch_add`): a refusal is
    /// rare and never on the I/O path, so one counter per reason is enough.
    login_failures: [AtomicU64; 4],
}

/// What a finished command adds.
#[derive(Clone, Copy, Debug)]
pub struct Finished {
    /// The registry's LUN index.
    pub lun: usize,
    /// Its kind.
    pub kind: CmdKind,
    /// Bytes it moved (GOOD reads and writes).
    pub bytes: u64,
    /// Bytes it deallocated (UNMAP, WRITE SAME with UNMAP), whatever its status: a
    /// command that failed part-way still punched what it did.
    pub unmapped: u64,
    /// The sense key of a CHECK CONDITION.
    pub sense_key: Option<u8>,
    /// From its arrival to its answer.
    pub latency: Duration,
}

impl Metrics {
    /// Counters for `cores` core threads and `luns` LUNs (the registry's).
    pub fn new(cores: usize, luns: usize) -> Arc<Metrics> {
        let cores = (0..cores)
            .map(|_| CoreCounters {
                luns: (0..luns).map(|_| LunCounters::default()).collect(),
                connections_opened: AtomicU64::new(0),
                connections_closed: AtomicU64::new(0),
            })
            .collect();
        Arc::new(Metrics {
            cores,
            login_failures: Default::default(),
        })
    }

    /// Core `core` answered a command. Only core `core`'s thread calls this.
    pub fn finished(&self, core: usize, f: Finished) {
        let Some(l) = self.cores.get(core).and_then(|c| c.luns.get(f.lun)) else {
            return;
        };
        bump(&l.commands[f.kind.index()], 1);
        if f.unmapped > 0 {
            bump(&l.unmapped_bytes, f.unmapped);
        }
        let ns = u64::try_from(f.latency.as_nanos()).unwrap_or(u64::MAX);
        match f.kind {
            CmdKind::Read => {
                bump(&l.read_bytes, f.bytes);
                l.read_latency.observe(ns);
            }
            CmdKind::Write => {
                bump(&l.write_bytes, f.bytes);
                l.write_latency.observe(ns);
            }
            CmdKind::Unmap | CmdKind::Other => {}
        }
        if let Some(key) = f.sense_key {
            bump(&l.errors[usize::from(key & 0x0f)], 1);
        }
    }

    /// A login was refused for `why`.
    pub fn login_failed(&self, why: LoginFailure) {
        self.login_failures[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Core `core` accepted (`true`) or closed an initiator connection.
    pub fn connection(&self, core: usize, opened: bool) {
        if let Some(c) = self.cores.get(core) {
            bump(
                if opened {
                    &c.connections_opened
                } else {
                    &c.connections_closed
                },
                1,
            );
        }
    }
}

#[cfg(test)]
mod tests;
