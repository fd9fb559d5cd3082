//! Automatic failover for a twinsan pair (ARCHITECTURE.md section 5): authenticated
//! heartbeats, the witness's lease vote, and the controller that decides when a node
//! promotes, demotes, holds the VIP or unfreezes its writes.
//!
//! Everything here is sans-I/O, like `replica::pair`: no sockets, threads, files or clocks.
//! The engine's driver feeds events in with `now` and carries the actions out; the
//! deterministic simulation (`tests/sim.rs`) runs the same code with two nodes and a
//! witness over a faulty network.

// Sans-I/O: nothing here needs `unsafe`, and the compiler keeps it that way.
#![forbid(unsafe_code)]
// A state machine's function is read whole to be trusted: none over 100 lines (clippy's
// count, code lines only). A longer one is split where its decisions separate.
#![deny(clippy::too_many_lines)]

pub mod controller;
pub mod wire;
pub mod witness;

/// One node of the pair: 0 or 1 (the one whose replica listen address sorts first is 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u8);

impl NodeId {
    /// The other node.
    pub fn peer(self) -> NodeId {
        NodeId(1 - self.0)
    }
}
