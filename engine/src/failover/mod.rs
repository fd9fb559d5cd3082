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

    /// The failover part of `twinsan status`.
    pub fn status(&self) -> String {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
