//! The Linux side effects of holding the service address (the VIP): the drivers the failover
//! controller calls. The controller decides; these only act, synchronously, with typed
//! errors, and without running external programs (`ip`, `arping`), so a takeover does not
//! depend on a fork/exec or on the PATH.
//!
//! What each piece is for, in the order a takeover uses them:
//! - [`addr`]: adding, renewing and removing the VIP on an interface over rtnetlink. The
//!   controller adds the VIP with a short lifetime (`lifetime_s`) and renews it (the same
//!   call) while this node holds the witness lease. The lifetime is the kernel's own
//!   `valid_lft`, so a daemon killed with SIGKILL, or frozen, loses the address by itself
//!   when the lifetime runs out, and two nodes cannot both keep answering on it for longer
//!   than that. On demote the controller removes the VIP first, before anything else, so the
//!   peer can take it over. [`Vip::present`] is for status and tests.
//! - [`arp`]: right after adding the VIP, a burst of gratuitous ARPs, so hosts and switches
//!   on the segment move the VIP's IP-to-MAC binding (and the switches their MAC tables) to
//!   this node now, instead of when their ARP cache entries age out.
//! - [`tickle`]: after a takeover, for each iSCSI TCP connection the old primary mirrored to
//!   us (a 4-tuple client:port -> VIP:3260), a "tickle ACK" as CTDB and Pacemaker's
//!   portblock send: a bare ACK with sequence 0 and acknowledgement 0, from the VIP. The
//!   initiator's kernel answers with its real ACK, which finds no socket on this node and
//!   gets a RST, so the initiator reconnects at once instead of after its TCP retransmission
//!   timeouts (minutes, for an idle connection).
//!
//! All of it needs CAP_NET_ADMIN (addresses) and CAP_NET_RAW (ARP and raw IP); each call
//! opens its own socket, so the functions are safe to call from any thread, and a failure
//! leaves nothing open behind it.

pub mod addr;
pub mod arp;
pub mod tickle;

#[cfg(test)]
mod tests;

pub use addr::{AddrLifetime, Vip};
pub use arp::announce;
pub use tickle::tickle;

use std::io;
use thiserror::Error;

/// What went wrong driving the kernel. `Kernel` carries the errno the kernel answered with,
/// as an `io::Error`, so a caller can match on `raw_os_error()`.
#[derive(Debug, Error)]
pub enum VipError {
    #[error("interface name {0:?} is empty, too long or contains NUL")]
    BadInterfaceName(String),
    #[error("interface {name:?}: {source}")]
    NoSuchInterface { name: String, source: io::Error },
    #[error("interface index {ifindex}: {source}")]
    NoSuchIfindex { ifindex: u32, source: io::Error },
    #[error("prefix length /{0} is not in 0..=32")]
    BadPrefixLen(u8),
    #[error("lifetime {0} s: must be in 1..{max} (0 is refused by the kernel; u32::MAX is infinite, which defeats the self-expiry)", max = u32::MAX)]
    BadLifetime(u32),
    #[error("interface index {ifindex} is not Ethernet (hardware type {hw_type})")]
    NotEthernet { ifindex: u32, hw_type: u16 },
    #[error("{op}: {source}")]
    Io { op: &'static str, source: io::Error },
    #[error("{op}: the kernel answered {source}")]
    Kernel { op: &'static str, source: io::Error },
    #[error("{op}: no answer from the kernel within {timeout_ms} ms")]
    Timeout { op: &'static str, timeout_ms: u64 },
    #[error("{op}: undecodable netlink reply: {detail}")]
    Decode { op: &'static str, detail: String },
    #[error("{op}: sent {sent} of {expected} bytes")]
    ShortSend {
        op: &'static str,
        sent: usize,
        expected: usize,
    },
}

impl VipError {
    /// An `io::Error` from a socket call: a receive timeout becomes [`VipError::Timeout`].
    fn io(op: &'static str, source: io::Error, timeout_ms: u64) -> VipError {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                VipError::Timeout { op, timeout_ms }
            }
            _ => VipError::Io { op, source },
        }
    }
}

/// The Internet checksum (RFC 1071) of `parts` taken as one byte string: the ones'
/// complement of the ones'-complement sum of its 16-bit big-endian words. A part of odd
/// length is padded with a zero byte only where the whole string ends, so callers pass
/// even-length parts except possibly the last (the IP and TCP headers here all are).
fn inet_checksum(parts: &[&[u8]]) -> u16 {
    // u64: no carry is lost before the fold below for any input shorter than 2^48 words.
    let mut sum: u64 = 0;
    for part in parts {
        let mut words = part.chunks_exact(2);
        for w in &mut words {
            sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [last] = words.remainder() {
            sum += u64::from(*last) << 8;
        }
    }
    // Fold the carries back in until the sum fits 16 bits.
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
