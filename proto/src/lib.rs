//! Sans-I/O iSCSI (RFC 7143) and SCSI (SPC-4 / SBC-3) protocol.
//!
//! Everything here is deterministic: no sockets, no clocks, no randomness of its own
//! (callers pass entropy in). Bytes from the wire are parsed once, at the edge, into
//! typed values or typed errors.

// Sans-I/O: nothing here needs `unsafe`, and the compiler keeps it that way.
#![forbid(unsafe_code)]

pub mod digest;
pub mod fuzzing;
pub mod login;
pub mod pdu;
pub mod scsi;
pub mod seq;
