//! The data path: thread-per-core io_uring reactors, iSCSI connections, and SCSI execution
//! on sparse files; and the drivers of replication (whose decisions live in `replica`).
//!
//! Rooms:
//! - [`net`]: the core threads (reactor), their send queues, connection steering, the
//!   doorbell that wakes a core, CPU placement.
//! - [`iscsi`]: login and the full-feature connection (PDU dispatch, Data-Out and R2T, the
//!   task table and task management, Data-In and responses).
//! - [`scsi`]: SCSI execution by command family, and the long jobs (EXTENDED COPY,
//!   SANITIZE) and unit attentions.
//! - [`disk`]: the buffer pool, range locks, inline writes and the spill helper.
//! - [`replication`]: the drivers of the pair (link sockets, apply and resync file I/O,
//!   timers) around `replica::pair`.
//! - [`lun`], [`registry`], [`config`], [`server`], [`admin`]: the LUNs, the daemon's shared
//!   state, its configuration, start-up and the admin socket; [`health`]: the core threads'
//!   liveness, for the service manager's watchdog; [`reload`]: online reconfiguration.
//! - [`snapshot`]: snapshots (cuts on both nodes, clones, catalogues, diff streams).

pub mod admin;
pub mod config;
pub mod disk;
pub mod failover;
pub mod health;
pub mod iscsi;
pub mod log_limit;
pub mod lun;
pub mod metrics;
pub mod net;
pub mod progress;
pub mod registry;
pub mod reload;
pub mod replication;
pub mod scsi;
pub mod server;
pub mod snapshot;
pub mod vip;
