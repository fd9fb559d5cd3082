//! "Tickle ACK" after a takeover, as CTDB and Pacemaker's portblock send it.
//!
//! The initiators' TCP connections were to the old primary; this node has no socket for
//! them. An idle initiator would only notice when its next send times out and retransmits
//! for minutes. So for each connection the old primary mirrored to us, we send, from the
//! server's side of the 4-tuple (VIP:3260), a bare ACK with sequence 0 and acknowledgement 0.
//! It is out of the initiator's window, so its kernel answers with a duplicate ACK carrying
//! the real sequence numbers (RFC 793/5961); that ACK reaches this node, finds no socket,
//! and our kernel answers it with a RST, so the initiator drops the connection and logs in
//! again at once.

use std::net::SocketAddrV4;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{inet_checksum, VipError};

/// An IPv4 header and a TCP header, both without options.
pub const TICKLE_LEN: usize = 40;
const IP_HEADER_LEN: usize = 20;
const TCP_HEADER_LEN: u16 = 20;
const TCP_FLAG_ACK: u8 = 0x10;
/// Any nonzero window: a zero window would be a window probe, which some stacks treat
/// differently. 1234 is what CTDB sends.
const TICKLE_WINDOW: u16 = 1234;
const TICKLE_TTL: u8 = 64;

/// The tickle ACK from `from` (the server side: VIP:port) to `to` (the initiator): an IPv4
/// header (DF, TTL 64) and a TCP header with only ACK set, seq 0, ack 0, both checksums.
pub fn tickle_packet(from: SocketAddrV4, to: SocketAddrV4) -> [u8; TICKLE_LEN] {
    let mut p = [0u8; TICKLE_LEN];
    // IPv4 header.
    p[0] = 0x45; // version 4, header length 5 words
    p[2..4].copy_from_slice(&(TICKLE_LEN as u16).to_be_bytes()); // total length
                                                                 // 4..6: identification 0 (the kernel picks one for a header-included packet).
    p[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // Don't Fragment, offset 0
    p[8] = TICKLE_TTL;
    p[9] = libc::IPPROTO_TCP as u8;
    // 10..12: header checksum, below.
    p[12..16].copy_from_slice(&from.ip().octets());
    p[16..20].copy_from_slice(&to.ip().octets());
    let ip_sum = inet_checksum(&[&p[..IP_HEADER_LEN]]);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    // TCP header.
    let t = IP_HEADER_LEN;
    p[t..t + 2].copy_from_slice(&from.port().to_be_bytes());
    p[t + 2..t + 4].copy_from_slice(&to.port().to_be_bytes());
    // t+4..t+8: sequence 0; t+8..t+12: acknowledgement 0.
    p[t + 12] = 5 << 4; // data offset 5 words, no options
    p[t + 13] = TCP_FLAG_ACK;
    p[t + 14..t + 16].copy_from_slice(&TICKLE_WINDOW.to_be_bytes());
    // t+16..t+18: checksum, below; t+18..t+20: urgent pointer 0.
    let tcp_sum = inet_checksum(&[&pseudo_header(from, to), &p[t..]]);
    p[t + 16..t + 18].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

/// The TCP checksum's IPv4 pseudo-header (RFC 793): source, destination, zero, protocol,
/// TCP length.
fn pseudo_header(from: SocketAddrV4, to: SocketAddrV4) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0..4].copy_from_slice(&from.ip().octets());
    h[4..8].copy_from_slice(&to.ip().octets());
    h[9] = libc::IPPROTO_TCP as u8;
    h[10..12].copy_from_slice(&TCP_HEADER_LEN.to_be_bytes());
    h
}

/// Sends the tickle ACK for the connection `to` -> `from` `count` times, back to back (the
/// repeats only guard against loss; the initiator's kernel rate-limits its answers anyway).
/// `from` is the server side (VIP:3260), `to` the initiator.
pub fn tickle(from: SocketAddrV4, to: SocketAddrV4, count: u32) -> Result<(), VipError> {
    if count == 0 {
        return Ok(());
    }
    let op = "tickle ACK";
    let io = |source| VipError::Io { op, source };
    // IPPROTO_RAW: we write the IP header ourselves (it implies IP_HDRINCL), so the source
    // address is the VIP whatever the route's preferred source, and the socket receives
    // nothing.
    let sock = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
    .map_err(io)?;
    let packet = tickle_packet(from, to);
    // The port of a raw socket's destination is unused; the kernel routes on the address.
    let dest = SockAddr::from(SocketAddrV4::new(*to.ip(), 0));
    for _ in 0..count {
        let sent = sock.send_to(&packet, &dest).map_err(io)?;
        if sent != packet.len() {
            return Err(VipError::ShortSend {
                op,
                sent,
                expected: packet.len(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn from() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 99, 1), 3260)
    }
    fn to() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 99, 2), 40000)
    }

    #[test]
    fn a_tickle_is_a_bare_ack_with_zero_numbers_from_the_server_side() {
        let p = tickle_packet(from(), to());
        // The checksums 0xe8a7 (IP) and 0xafdd (TCP) were computed apart from this code, with
        // a few lines of Python (struct.pack and an RFC 1071 sum).
        #[rustfmt::skip]
        let expected: [u8; TICKLE_LEN] = [
            // IPv4: 0x45, tos 0, length 40, id 0, DF, ttl 64, TCP, checksum, src, dst.
            0x45, 0x00, 0x00, 0x28, 0x00, 0x00, 0x40, 0x00, 0x40, 0x06, 0xe8, 0xa7,
            198, 18, 99, 1,
            198, 18, 99, 2,
            // TCP: 3260 -> 40000, seq 0, ack 0, offset 5, ACK, window 1234, checksum, urg 0.
            0x0c, 0xbc, 0x9c, 0x40,
            0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00,
            0x50, 0x10, 0x04, 0xd2, 0xaf, 0xdd, 0x00, 0x00,
        ];
        assert_eq!(p, expected);
    }

    #[test]
    fn a_tickle_checksums_verify_by_recomputation() {
        for (f, t) in [
            (from(), to()),
            (
                SocketAddrV4::new(Ipv4Addr::new(198, 19, 255, 254), 3260),
                SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 65535),
            ),
        ] {
            let p = tickle_packet(f, t);
            // A header whose checksum field is right sums, checksum included, to 0xffff,
            // i.e. its checksum over everything is 0.
            assert_eq!(inet_checksum(&[&p[..IP_HEADER_LEN]]), 0, "{f} -> {t}");
            assert_eq!(
                inet_checksum(&[&pseudo_header(f, t), &p[IP_HEADER_LEN..]]),
                0,
                "{f} -> {t}"
            );
        }
    }

    #[test]
    fn the_checksum_matches_rfc_1071s_worked_example() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (carries folded);
        // the checksum is its complement.
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(inet_checksum(&[&bytes]), !0xddf2);
        // Split across parts at an even boundary, and an odd tail padded with zero.
        assert_eq!(inet_checksum(&[&bytes[..4], &bytes[4..]]), !0xddf2);
        assert_eq!(inet_checksum(&[&[0x01]]), !0x0100);
    }
}
