//! The core threads and what moves bytes between them and the network: one io_uring
//! reactor per core, its send queue, where connections land, the doorbell that wakes a
//! core from another thread, CPU placement, and each core's fixed-file table of the LUN
//! slots (files.rs).

pub mod affinity;
pub mod doorbell;
pub mod files;
pub mod reactor;
pub mod sendq;
pub mod steer;
