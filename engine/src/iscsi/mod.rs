//! iSCSI (RFC 7143) on a core thread: login and the full-feature connection.

pub mod conn;
pub mod login;
