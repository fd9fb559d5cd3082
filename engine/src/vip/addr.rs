//! The VIP on an interface, over rtnetlink (`RTM_NEWADDR`, `RTM_DELADDR`, `RTM_GETADDR`).
//!
//! The address is added with a finite lifetime (`IFA_CACHEINFO` valid_lft = preferred_lft),
//! so the kernel deletes it by itself when nobody renews it: a node whose daemon was killed
//! with SIGKILL, or hangs, stops answering on the VIP within `lifetime_s`. Renewing is the
//! same request again (`NLM_F_REPLACE` resets the lifetimes of the existing address).
//!
//! One caveat the caller's configuration must respect: when an IPv4 address that is the
//! primary of its subnet on an interface is deleted (by us, or by expiry), the kernel
//! deletes the secondaries of that subnet with it unless `net.ipv4.conf.IF.promote_secondaries`
//! is 1. The VIP should therefore be a secondary (the node's own address of the same subnet
//! added first), or a /32, or the interface should promote secondaries.

use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE,
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope, CacheInfo};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::VipError;

/// How long to wait for each reply datagram from the kernel. rtnetlink answers
/// synchronously, so this only bounds how long a controller thread can be stuck on a kernel
/// that never answers; it is not on any normal path.
const REPLY_TIMEOUT_MS: u64 = 2_000;
/// One receive buffer. The kernel sizes a dump datagram to at most 32 KiB; a larger buffer
/// cannot be truncated by it.
const RECV_BUF_BYTES: usize = 64 * 1024;
/// How many times to redo an address dump that the kernel marked inconsistent
/// (`NLM_F_DUMP_INTR`: the address list changed during it, so an entry may be missing).
const DUMP_TRIES: u32 = 3;
/// `RTM_NEWADDR`, the type of each entry of an address dump (linux/rtnetlink.h).
const RTM_NEWADDR: u16 = 20;
/// The kernel's "infinite" address lifetime (`INFINITY_LIFE_TIME`).
const INFINITE_LIFETIME_S: u32 = u32::MAX;

/// Sequence numbers for our requests: replies carry them back, and a reply with another
/// number is not the answer to this request. Shared by all sockets of the process only so
/// that numbers are not reused close together.
static NEXT_SEQ: AtomicU32 = AtomicU32::new(1);

/// An IPv4 service address and the interface it lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vip {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub ifindex: u32,
}

/// What is left of an address's lifetimes, as the kernel reports them (rounded down to whole
/// seconds). `u32::MAX` means infinite (an address that was not added by us).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrLifetime {
    pub valid_left_s: u32,
    pub preferred_left_s: u32,
}

impl Vip {
    /// The VIP `addr/prefix_len` on the interface named `ifname`.
    pub fn resolve(addr: Ipv4Addr, prefix_len: u8, ifname: &str) -> Result<Vip, VipError> {
        if prefix_len > 32 {
            return Err(VipError::BadPrefixLen(prefix_len));
        }
        let bad_name = || VipError::BadInterfaceName(ifname.to_string());
        if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ {
            return Err(bad_name());
        }
        let cname = CString::new(ifname).map_err(|_| bad_name())?;
        // SAFETY: `cname` is a NUL-terminated string that lives across the call, which only
        // reads it.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(VipError::NoSuchInterface {
                name: ifname.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Vip {
            addr,
            prefix_len,
            ifindex,
        })
    }

    /// Adds the VIP with valid and preferred lifetimes of `lifetime_s`, or, if it is already
    /// there, resets its lifetimes to `lifetime_s` (renewal). Returns once the kernel has
    /// acknowledged it.
    pub fn add(&self, lifetime_s: u32) -> Result<(), VipError> {
        if lifetime_s == 0 || lifetime_s == INFINITE_LIFETIME_S {
            return Err(VipError::BadLifetime(lifetime_s));
        }
        self.check()?;
        let seq = next_seq();
        Rtnl::open("add VIP")?.request("add VIP", &new_addr_request(self, lifetime_s, seq), seq)
    }

    /// Removes the VIP. An address that is already gone (expired, removed by hand, or its
    /// interface gone with it) is success: what the caller wants is its absence.
    pub fn remove(&self) -> Result<(), VipError> {
        self.check()?;
        let seq = next_seq();
        match Rtnl::open("remove VIP")?.request("remove VIP", &del_addr_request(self, seq), seq) {
            Err(VipError::Kernel { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::EADDRNOTAVAIL | libc::ENOENT | libc::ENODEV)
                ) =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// Whether the VIP (this address and prefix length, on this interface) is configured.
    pub fn present(&self) -> Result<bool, VipError> {
        Ok(self.lifetime()?.is_some())
    }

    /// The VIP's remaining lifetimes, or `None` if it is not configured.
    pub fn lifetime(&self) -> Result<Option<AddrLifetime>, VipError> {
        self.check()?;
        let op = "look up VIP";
        let mut rtnl = Rtnl::open(op)?;
        for _ in 0..DUMP_TRIES {
            let (found, interrupted) = rtnl.find_address(op, self)?;
            if !interrupted || found.is_some() {
                return Ok(found);
            }
        }
        // Three dumps in a row raced with address changes; what the last one saw is the best
        // answer there is, and any answer may be stale a moment later anyway.
        rtnl.find_address(op, self).map(|(found, _)| found)
    }

    /// The fields are public, so a `Vip` may not have come from [`Vip::resolve`].
    fn check(&self) -> Result<(), VipError> {
        if self.prefix_len > 32 {
            return Err(VipError::BadPrefixLen(self.prefix_len));
        }
        Ok(())
    }

    /// The address message that names the VIP: family, prefix length, interface, and the
    /// address as both `IFA_LOCAL` and `IFA_ADDRESS` (as `ip addr add` sends it; on a
    /// non-point-to-point interface they are the same).
    fn message(&self) -> AddressMessage {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = self.prefix_len;
        msg.header.scope = AddressScope::Universe;
        msg.header.index = self.ifindex;
        msg.attributes
            .push(AddressAttribute::Local(IpAddr::V4(self.addr)));
        msg.attributes
            .push(AddressAttribute::Address(IpAddr::V4(self.addr)));
        msg
    }

    /// Whether a dumped address message is this VIP.
    fn matches(&self, msg: &AddressMessage) -> bool {
        msg.header.family == AddressFamily::Inet
            && msg.header.index == self.ifindex
            && msg.header.prefix_len == self.prefix_len
            && msg
                .attributes
                .contains(&AddressAttribute::Local(IpAddr::V4(self.addr)))
    }
}

fn next_seq() -> u32 {
    NEXT_SEQ.fetch_add(1, Ordering::Relaxed)
}

/// `RTM_NEWADDR` for `vip` with both lifetimes `lifetime_s`. `NLM_F_CREATE | NLM_F_REPLACE`:
/// create it if missing, else update the existing address in place (which resets its
/// lifetimes); without `NLM_F_REPLACE` a second add fails with EEXIST. `NLM_F_ACK` asks for
/// the kernel's verdict even on success.
fn new_addr_request(vip: &Vip, lifetime_s: u32, seq: u32) -> Vec<u8> {
    let mut msg = vip.message();
    let mut cache = CacheInfo::default();
    cache.ifa_valid = lifetime_s;
    cache.ifa_preferred = lifetime_s;
    msg.attributes.push(AddressAttribute::CacheInfo(cache));
    serialize(
        RouteNetlinkMessage::NewAddress(msg),
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        seq,
    )
}

fn del_addr_request(vip: &Vip, seq: u32) -> Vec<u8> {
    serialize(
        RouteNetlinkMessage::DelAddress(vip.message()),
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
    )
}

/// A dump of all IPv4 addresses. The kernel filters a dump by interface only on sockets
/// that opted into strict checking; filtering here works on every kernel.
fn get_addr_request(seq: u32) -> Vec<u8> {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet;
    serialize(
        RouteNetlinkMessage::GetAddress(msg),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
    )
}

fn serialize(payload: RouteNetlinkMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    // Fills in the length and message type from the payload.
    msg.finalize();
    let mut bytes = vec![0; msg.buffer_len()];
    msg.serialize(&mut bytes);
    bytes
}

/// One rtnetlink socket, connected to the kernel, for one request and its replies.
struct Rtnl {
    sock: Socket,
    buf: Vec<u8>,
}

impl Rtnl {
    fn open(op: &'static str) -> Result<Rtnl, VipError> {
        let io = |source| VipError::Io { op, source };
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(io)?;
        sock.bind_auto().map_err(io)?;
        // Port 0 is the kernel: replies come only from it.
        sock.connect(&SocketAddr::new(0, 0)).map_err(io)?;
        socket2::SockRef::from(&sock)
            .set_read_timeout(Some(Duration::from_millis(REPLY_TIMEOUT_MS)))
            .map_err(io)?;
        Ok(Rtnl {
            sock,
            buf: Vec::with_capacity(RECV_BUF_BYTES),
        })
    }

    fn send(&self, op: &'static str, bytes: &[u8]) -> Result<(), VipError> {
        let sent = self
            .sock
            .send(bytes, 0)
            .map_err(|e| VipError::io(op, e, REPLY_TIMEOUT_MS))?;
        if sent != bytes.len() {
            return Err(VipError::ShortSend {
                op,
                sent,
                expected: bytes.len(),
            });
        }
        Ok(())
    }

    /// Receives one datagram (which may hold several netlink messages) into `self.buf`.
    fn recv(&mut self, op: &'static str) -> Result<(), VipError> {
        self.buf.clear();
        // MSG_TRUNC: the return value is the datagram's real length, so a datagram larger
        // than the buffer is reported instead of silently cut.
        let len = self
            .sock
            .recv(&mut self.buf, libc::MSG_TRUNC)
            .map_err(|e| VipError::io(op, e, REPLY_TIMEOUT_MS))?;
        if len > self.buf.len() {
            return Err(VipError::Decode {
                op,
                detail: format!("a {len}-byte datagram did not fit {RECV_BUF_BYTES} bytes"),
            });
        }
        Ok(())
    }

    /// Sends a request that asked for an ACK and waits for the kernel's verdict on it: an
    /// `NLMSG_ERROR` with code 0 is success, any other code is that errno.
    fn request(&mut self, op: &'static str, bytes: &[u8], seq: u32) -> Result<(), VipError> {
        self.send(op, bytes)?;
        loop {
            self.recv(op)?;
            for msg in
                parse_datagram(&self.buf).map_err(|detail| VipError::Decode { op, detail })?
            {
                if msg.header.sequence_number != seq {
                    continue;
                }
                if let NetlinkPayload::Error(e) = msg.payload {
                    return match e.code {
                        None => Ok(()),
                        Some(code) => Err(VipError::Kernel {
                            op,
                            source: std::io::Error::from_raw_os_error(code.get().saturating_neg()),
                        }),
                    };
                }
            }
        }
    }

    /// Dumps the IPv4 addresses and returns `vip`'s lifetimes if it is among them, and
    /// whether the kernel flagged the dump as interrupted.
    fn find_address(
        &mut self,
        op: &'static str,
        vip: &Vip,
    ) -> Result<(Option<AddrLifetime>, bool), VipError> {
        let seq = next_seq();
        self.send(op, &get_addr_request(seq))?;
        let mut found = None;
        let mut interrupted = false;
        loop {
            self.recv(op)?;
            let mut rest: &[u8] = &self.buf;
            while !rest.is_empty() {
                let (one, after) =
                    split_message(rest).map_err(|detail| VipError::Decode { op, detail })?;
                rest = after;
                let raw = NetlinkBuffer::new(one);
                if raw.sequence_number() != seq {
                    continue;
                }
                interrupted |= raw.flags() & NLM_F_DUMP_INTR != 0;
                // Decode only the entries on our interface: an entry elsewhere that this
                // crate cannot decode must not make the VIP's own status unknowable.
                if raw.message_type() == RTM_NEWADDR
                    && ifaddrmsg_index(raw.payload()) != Some(vip.ifindex)
                {
                    continue;
                }
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(one).map_err(|e| {
                    VipError::Decode {
                        op,
                        detail: e.to_string(),
                    }
                })?;
                match msg.payload {
                    NetlinkPayload::Done(done) => {
                        if done.code != 0 {
                            return Err(VipError::Kernel {
                                op,
                                source: std::io::Error::from_raw_os_error(
                                    done.code.saturating_neg(),
                                ),
                            });
                        }
                        return Ok((found, interrupted));
                    }
                    NetlinkPayload::Error(e) => {
                        // A dump is not acknowledged; a code here is the dump's failure.
                        if let Some(code) = e.code {
                            return Err(VipError::Kernel {
                                op,
                                source: std::io::Error::from_raw_os_error(
                                    code.get().saturating_neg(),
                                ),
                            });
                        }
                    }
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(addr))
                        if vip.matches(&addr) =>
                    {
                        found = Some(lifetime_of(&addr));
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The lifetimes in a dumped address; an address without `IFA_CACHEINFO` never expires.
fn lifetime_of(msg: &AddressMessage) -> AddrLifetime {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::CacheInfo(c) => Some(AddrLifetime {
                valid_left_s: c.ifa_valid,
                preferred_left_s: c.ifa_preferred,
            }),
            _ => None,
        })
        .unwrap_or(AddrLifetime {
            valid_left_s: INFINITE_LIFETIME_S,
            preferred_left_s: INFINITE_LIFETIME_S,
        })
}

/// Splits the first netlink message off a datagram: (that message, the rest after its
/// 4-byte alignment padding). Errors if the length field is out of bounds.
fn split_message(bytes: &[u8]) -> Result<(&[u8], &[u8]), String> {
    let len = NetlinkBuffer::new_checked(bytes)
        .map_err(|e| e.to_string())?
        .length() as usize;
    let aligned = len.saturating_add(3) & !3;
    Ok((&bytes[..len], bytes.get(aligned..).unwrap_or(&[])))
}

/// All netlink messages of a datagram, decoded.
fn parse_datagram(mut bytes: &[u8]) -> Result<Vec<NetlinkMessage<RouteNetlinkMessage>>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (one, rest) = split_message(bytes)?;
        out.push(NetlinkMessage::deserialize(one).map_err(|e| e.to_string())?);
        bytes = rest;
    }
    Ok(out)
}

/// The interface index of an `RTM_NEWADDR` payload (`struct ifaddrmsg`: family, prefix
/// length, flags, scope as bytes, then the index as a native-endian u32).
fn ifaddrmsg_index(payload: &[u8]) -> Option<u32> {
    let index: [u8; 4] = payload.get(4..8)?.try_into().ok()?;
    Some(u32::from_ne_bytes(index))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip() -> Vip {
        Vip {
            addr: Ipv4Addr::new(198, 18, 99, 1),
            prefix_len: 24,
            ifindex: 7,
        }
    }

    /// Finds the attribute of type `kind` in an `RTM_*ADDR` request and returns its value.
    fn attribute(bytes: &[u8], kind: u16) -> Option<&[u8]> {
        // nlmsghdr (16) + ifaddrmsg (8), then (len u16, type u16, value, pad to 4).
        let mut at = 16 + 8;
        while at + 4 <= bytes.len() {
            let len = u16::from_ne_bytes([bytes[at], bytes[at + 1]]) as usize;
            let ty = u16::from_ne_bytes([bytes[at + 2], bytes[at + 3]]);
            if ty == kind {
                return Some(&bytes[at + 4..at + len]);
            }
            at += (len + 3) & !3;
        }
        None
    }

    #[test]
    fn an_add_request_creates_or_replaces_with_the_lifetime_in_cacheinfo() {
        let bytes = new_addr_request(&vip(), 5, 42);
        let nl = NetlinkBuffer::new_checked(&bytes[..]).unwrap();
        assert_eq!(nl.length() as usize, bytes.len());
        assert_eq!(nl.message_type(), RTM_NEWADDR);
        assert_eq!(
            nl.flags(),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        );
        assert_eq!(nl.sequence_number(), 42);
        // ifaddrmsg: AF_INET, /24, no flags, universe scope, ifindex 7.
        let mut ifaddrmsg = vec![libc::AF_INET as u8, 24, 0, 0];
        ifaddrmsg.extend_from_slice(&7u32.to_ne_bytes());
        assert_eq!(&bytes[16..24], &ifaddrmsg[..]);
        // IFA_LOCAL (2) and IFA_ADDRESS (1) are the VIP, in network order.
        assert_eq!(attribute(&bytes, 2), Some(&[198, 18, 99, 1][..]));
        assert_eq!(attribute(&bytes, 1), Some(&[198, 18, 99, 1][..]));
        // IFA_CACHEINFO (6): preferred, valid, cstamp, tstamp.
        let mut cache = Vec::new();
        for v in [5u32, 5, 0, 0] {
            cache.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(attribute(&bytes, 6), Some(&cache[..]));
    }

    #[test]
    fn a_delete_request_names_the_address_and_asks_for_an_ack() {
        let bytes = del_addr_request(&vip(), 9);
        let nl = NetlinkBuffer::new_checked(&bytes[..]).unwrap();
        assert_eq!(nl.message_type(), 21); // RTM_DELADDR
        assert_eq!(nl.flags(), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(attribute(&bytes, 2), Some(&[198, 18, 99, 1][..]));
        assert_eq!(attribute(&bytes, 6), None);
    }

    #[test]
    fn a_dump_reply_is_matched_on_interface_prefix_and_address() {
        let v = vip();
        let mut msg = v.message();
        let mut cache = CacheInfo::default();
        cache.ifa_valid = 3;
        cache.ifa_preferred = 2;
        msg.attributes.push(AddressAttribute::CacheInfo(cache));
        assert!(v.matches(&msg));
        assert_eq!(
            lifetime_of(&msg),
            AddrLifetime {
                valid_left_s: 3,
                preferred_left_s: 2
            }
        );
        let other_if = Vip { ifindex: 8, ..v };
        let other_prefix = Vip {
            prefix_len: 32,
            ..v
        };
        let other_addr = Vip {
            addr: Ipv4Addr::new(198, 18, 99, 2),
            ..v
        };
        for o in [other_if, other_prefix, other_addr] {
            assert!(!o.matches(&msg), "{o:?}");
        }
        // The raw index peek agrees with the decoded header.
        let bytes = serialize(RouteNetlinkMessage::NewAddress(msg), 0, 1);
        assert_eq!(ifaddrmsg_index(&bytes[16..]), Some(7));
    }

    #[test]
    fn split_message_walks_aligned_messages_and_rejects_bad_lengths() {
        let a = del_addr_request(&vip(), 1);
        let b = get_addr_request(2);
        let mut both = a.clone();
        both.extend_from_slice(&b);
        let msgs = parse_datagram(&both).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[1].header.sequence_number, 2);
        let mut bad = a.clone();
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(split_message(&bad).is_err());
        assert!(split_message(&a[..10]).is_err());
    }

    #[test]
    fn resolve_refuses_bad_names_and_prefixes() {
        let a = Ipv4Addr::new(198, 18, 99, 1);
        assert!(matches!(
            Vip::resolve(a, 33, "lo"),
            Err(VipError::BadPrefixLen(33))
        ));
        assert!(matches!(
            Vip::resolve(a, 24, ""),
            Err(VipError::BadInterfaceName(_))
        ));
        assert!(matches!(
            Vip::resolve(a, 24, "a\0b"),
            Err(VipError::BadInterfaceName(_))
        ));
        assert!(matches!(
            Vip::resolve(a, 24, "sixteen-chars-xx"),
            Err(VipError::BadInterfaceName(_))
        ));
        assert!(matches!(
            Vip::resolve(a, 24, "tsvip-none0"),
            Err(VipError::NoSuchInterface { .. })
        ));
        assert!(matches!(vip().add(0), Err(VipError::BadLifetime(0))));
        assert!(matches!(vip().add(u32::MAX), Err(VipError::BadLifetime(_))));
    }
}
