//! The failover driver: runs the sans-I/O `failover::controller::Controller` with real
//! sockets, clocks, the VIP and the replica. Thin by design: every decision is the
//! controller's; this file moves datagrams and carries actions out.
//!
//! Threads:
//! - the controller thread (`twinsan-failover`, real-time priority when allowed, so busy
//!   core threads cannot starve the heartbeats into a false takeover): heartbeat and
//!   witness sockets, the controller, the replica's view, the admin's commands;
//! - the actuator thread (`twinsan-failover-act`): the actions that block (promote, demote
//!   with its drain, the fence command, netlink, ARP, tickles), in order, each reported
//!   back; the heartbeats keep going meanwhile.

mod actuator;
mod boot_count;
mod clock;
mod driver;
mod sessions;
pub mod vip_guard;
pub mod witness_server;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::Sender;

pub use clock::boot_clock_ms;
pub use driver::start;

/// An operator command for the controller (from the admin socket), with where to answer.
pub struct AdminRequest {
    pub op: failover::controller::Operator,
    pub reply: Sender<Result<&'static str, &'static str>>,
}

/// What the admin socket needs of a running failover driver.
pub struct FailoverHandle {
    pub(crate) admin_tx: Sender<AdminRequest>,
    /// `twinsan status`'s failover lines, refreshed by the controller thread.
    pub(crate) status: Arc<Mutex<String>>,
    /// The metrics endpoint's figures, written by the controller thread.
    pub(crate) figures: Arc<FailoverFigures>,
}

/// What the metrics endpoint shows of failover. Atomics: the controller thread writes them
/// every loop and a scrape must never hold it up.
pub struct FailoverFigures {
    /// Per heartbeat path: when (`boot_clock_ms`) the peer was last heard on it,
    /// [`NEVER_HEARD`] before that.
    heard_at_ms: Box<[AtomicU64]>,
    /// Takeovers this node's controller began (a promotion the engine then refused too).
    takeovers: AtomicU64,
}

/// `FailoverFigures::heard_at_ms` of a path the peer was never heard on.
const NEVER_HEARD: u64 = u64::MAX;

impl FailoverFigures {
    pub(crate) fn new(paths: usize) -> FailoverFigures {
        FailoverFigures {
            heard_at_ms: (0..paths).map(|_| AtomicU64::new(NEVER_HEARD)).collect(),
            takeovers: AtomicU64::new(0),
        }
    }

    /// Each path's heartbeat age at `now_ms` (the controller's `path_age_ms`).
    pub(crate) fn set_ages(&self, now_ms: u64, ages_ms: &[Option<u64>]) {
        for (at, age) in self.heard_at_ms.iter().zip(ages_ms) {
            let v = age.map_or(NEVER_HEARD, |a| now_ms.saturating_sub(a));
            at.store(v, Ordering::Relaxed);
        }
    }

    pub(crate) fn took_over(&self) {
        self.takeovers.fetch_add(1, Ordering::Relaxed);
    }

    /// Per path, ms since the peer was last heard on it at `now_ms` (`None`: never).
    pub fn heartbeat_ages_ms(&self, now_ms: u64) -> Vec<Option<u64>> {
        self.heard_at_ms
            .iter()
            .map(|at| match at.load(Ordering::Relaxed) {
                NEVER_HEARD => None,
                t => Some(now_ms.saturating_sub(t)),
            })
            .collect()
    }

    pub fn takeovers(&self) -> u64 {
        self.takeovers.load(Ordering::Relaxed)
    }
}

impl FailoverHandle {
    /// Runs an operator command; the controller answers within one loop (bounded wait).
    pub fn operator(
        &self,
        op: failover::controller::Operator,
    ) -> Result<&'static str, &'static str> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.admin_tx.send(AdminRequest { op, reply: tx }).is_err() {
            return Err("the failover controller is not running");
        }
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .unwrap_or(Err("the failover controller did not answer within 5 s"))
    }

    /// The metrics endpoint's figures.
    pub fn figures(&self) -> &FailoverFigures {
        &self.figures
    }

    /// The failover part of `twinsan status`.
    pub fn status(&self) -> String {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
