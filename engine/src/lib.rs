//! The data path: thread-per-core io_uring reactors, iSCSI connections, and SCSI execution
//! on sparse files.

pub mod admin;
pub mod affinity;
pub mod bufpool;
pub mod config;
pub mod conn;
pub mod doorbell;
pub mod inline_write;
pub mod log_limit;
pub mod login;
pub mod lun;
pub mod range_lock;
pub mod reactor;
pub mod registry;
pub mod replication;
pub mod sanitize;
pub mod scsi;
pub mod sendq;
pub mod server;
pub mod spill;
pub mod steer;
pub mod ua;
pub mod xcopy;
