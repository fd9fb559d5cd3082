//! Gratuitous ARP after taking the VIP: tells every host and switch on the segment that the
//! VIP is now at this node's MAC, so the initiators' ARP caches (and the switches' MAC
//! tables) stop pointing at the old primary without waiting for them to age out.
//!
//! The form sent is the RFC 5227 "ARP Announcement": an ARP *request* with sender IP =
//! target IP = the VIP, sender MAC = ours, target MAC zero, broadcast. Linux, Windows and
//! ESXi all update an existing cache entry from it (Linux: `arp_is_garp`), and a request,
//! unlike a reply, is also processed by hosts that ignore unsolicited replies.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

use super::VipError;

/// EtherType of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// Length of an Ethernet/IPv4 ARP packet (without the Ethernet header).
pub const ARP_PAYLOAD_LEN: usize = 28;
/// `ARPHRD_ETHER`, the hardware type of Ethernet (and of veth, bonds, bridges, VLANs).
const ARPHRD_ETHER: u16 = 1;
const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// The 28-byte gratuitous ARP (request form) announcing that `addr` is at `sender_mac`.
pub fn garp_payload(sender_mac: [u8; 6], addr: Ipv4Addr) -> [u8; ARP_PAYLOAD_LEN] {
    let mut p = [0u8; ARP_PAYLOAD_LEN];
    p[0..2].copy_from_slice(&ARPHRD_ETHER.to_be_bytes()); // hardware type
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    p[4] = 6; // hardware address length
    p[5] = 4; // protocol address length
    p[6..8].copy_from_slice(&1u16.to_be_bytes()); // operation: request
    p[8..14].copy_from_slice(&sender_mac);
    p[14..18].copy_from_slice(&addr.octets()); // sender IP
                                               // 18..24: target MAC, zero (RFC 5227: ignored by receivers, zero by convention).
    p[24..28].copy_from_slice(&addr.octets()); // target IP = sender IP: gratuitous
    p
}

/// Sends `count` gratuitous ARPs for `addr` out of interface `ifindex`, `interval_ms`
/// apart (several, because one broadcast frame may be lost and a switch port may still be
/// coming up). Blocks for `(count - 1) * interval_ms`.
pub fn announce(
    ifindex: u32,
    addr: Ipv4Addr,
    count: u32,
    interval_ms: u64,
) -> Result<(), VipError> {
    if count == 0 {
        return Ok(());
    }
    let op = "gratuitous ARP";
    let io = |source| VipError::Io { op, source };
    // SOCK_DGRAM: the kernel writes the Ethernet header from the destination address below.
    // Protocol 0: this socket receives nothing; it only sends.
    let sock = Socket::new(Domain::PACKET, Type::DGRAM, None).map_err(io)?;
    let mac = interface_mac(&sock, ifindex)?;
    let dest = link_sockaddr(ifindex, ETH_P_ARP, BROADCAST_MAC)?;
    let payload = garp_payload(mac, addr);
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(interval_ms));
        }
        let sent = sock.send_to(&payload, &dest).map_err(io)?;
        if sent != payload.len() {
            return Err(VipError::ShortSend {
                op,
                sent,
                expected: payload.len(),
            });
        }
    }
    Ok(())
}

/// The interface's MAC address (`SIOCGIFHWADDR`, asked through any socket `sock`). Errors
/// if the interface is not Ethernet-like: ARP as built here would be wrong there.
pub fn interface_mac(sock: &Socket, ifindex: u32) -> Result<[u8; 6], VipError> {
    let op = "read interface MAC";
    // SAFETY: ifreq is plain data (a name and a union of plain fields); all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: `ifr_name` is IFNAMSIZ bytes, the size if_indextoname writes at most
    // (including the NUL); it returns null, without writing a name, for an unknown index.
    let named = unsafe { libc::if_indextoname(ifindex, req.ifr_name.as_mut_ptr()) };
    if named.is_null() {
        return Err(VipError::NoSuchIfindex {
            ifindex,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: SIOCGIFHWADDR reads the NUL-terminated name in `req` and writes a sockaddr
    // into its union; `req` is a valid, writable ifreq for the duration of the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR as _, &mut req) };
    if rc != 0 {
        return Err(VipError::Io {
            op,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: after a successful SIOCGIFHWADDR the union holds `ifru_hwaddr`, a sockaddr
    // whose every bit pattern is a valid value.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
    if hw.sa_family != ARPHRD_ETHER {
        return Err(VipError::NotEthernet {
            ifindex,
            hw_type: hw.sa_family,
        });
    }
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(hw.sa_data.iter()) {
        // c_char to byte: the same 8 bits, whether c_char is signed or not.
        *m = *d as u8;
    }
    Ok(mac)
}

/// An `AF_PACKET` address: interface `ifindex`, EtherType `protocol`, link-layer
/// destination `mac` (for sending; for binding a receiving socket it is ignored).
pub fn link_sockaddr(ifindex: u32, protocol: u16, mac: [u8; 6]) -> Result<SockAddr, VipError> {
    let sll_ifindex = i32::try_from(ifindex).map_err(|_| VipError::NoSuchIfindex {
        ifindex,
        source: std::io::Error::from_raw_os_error(libc::ENODEV),
    })?;
    // SAFETY: sockaddr_ll is plain data; all-zero is valid.
    let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    ll.sll_family = libc::AF_PACKET as u16;
    ll.sll_protocol = protocol.to_be();
    ll.sll_ifindex = sll_ifindex;
    ll.sll_halen = 6;
    ll.sll_addr[..6].copy_from_slice(&mac);
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    // SAFETY: sockaddr_storage is larger than sockaddr_ll and at least as aligned (it is
    // made to hold any socket address), so the write stays inside `storage` and is aligned.
    unsafe {
        std::ptr::write(
            (&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_ll>(),
            ll,
        )
    };
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: the family (AF_PACKET) and length describe the sockaddr_ll written above.
    Ok(unsafe { SockAddr::new(storage, len) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gratuitous_arp_is_a_request_from_and_for_the_vip() {
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        let p = garp_payload(mac, Ipv4Addr::new(198, 18, 99, 1));
        #[rustfmt::skip]
        let expected: [u8; 28] = [
            0x00, 0x01,                         // Ethernet
            0x08, 0x00,                         // IPv4
            6, 4,                               // address lengths
            0x00, 0x01,                         // request
            0x02, 0x11, 0x22, 0x33, 0x44, 0x55, // sender MAC
            198, 18, 99, 1,                     // sender IP
            0, 0, 0, 0, 0, 0,                   // target MAC
            198, 18, 99, 1,                     // target IP
        ];
        assert_eq!(p, expected);
    }

    #[test]
    fn a_link_address_carries_the_interface_protocol_and_destination() {
        let a = link_sockaddr(3, ETH_P_ARP, BROADCAST_MAC).unwrap();
        assert_eq!(a.family(), libc::AF_PACKET as libc::sa_family_t);
        assert_eq!(a.len() as usize, std::mem::size_of::<libc::sockaddr_ll>());
        // SAFETY: the storage holds the sockaddr_ll written by link_sockaddr.
        let ll = unsafe { *a.as_ptr().cast::<libc::sockaddr_ll>() };
        assert_eq!(ll.sll_ifindex, 3);
        assert_eq!(u16::from_be(ll.sll_protocol), ETH_P_ARP);
        assert_eq!(ll.sll_addr[..6], BROADCAST_MAC);
        assert!(link_sockaddr(u32::MAX, ETH_P_ARP, BROADCAST_MAC).is_err());
    }
}
