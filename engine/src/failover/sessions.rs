//! The initiators' connections to the VIP, read from `/proc/net/tcp`: the primary sends
//! them to its peer, which tickles them after a takeover (CTDB's and Pacemaker
//! `portblock`'s trick: an ACK the initiator's kernel answers, whose answer meets no
//! socket on the new node and is reset, so the initiator reconnects at once instead of at
//! its next retransmission, up to seconds later).

use std::net::{Ipv4Addr, SocketAddrV4};

/// Most connections remembered (a bound; ESXi hosts open a handful each).
pub const MAX_SESSIONS: usize = 1024;

/// Established TCP connections whose local end is `local` (the VIP and the iSCSI port),
/// as the remote ends. Unreadable or odd lines are skipped: this is best effort.
pub fn established_to(local: SocketAddrV4) -> Vec<SocketAddrV4> {
    match std::fs::read_to_string("/proc/net/tcp") {
        Ok(text) => parse_proc_net_tcp(&text, local),
        Err(_) => Vec::new(),
    }
}

/// Parses `/proc/net/tcp`: `sl local_address rem_address st ...`, addresses as
/// `XXXXXXXX:PPPP` (the IPv4 address in host byte order, little-endian on x86, as hex;
/// the port big-endian hex); state 01 is ESTABLISHED.
pub fn parse_proc_net_tcp(text: &str, local: SocketAddrV4) -> Vec<SocketAddrV4> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let mut f = line.split_whitespace();
        let (_, Some(l), Some(r), Some(st)) = (f.next(), f.next(), f.next(), f.next()) else {
            continue;
        };
        if st != "01" {
            continue;
        }
        let (Some(l), Some(r)) = (parse_addr(l), parse_addr(r)) else {
            continue;
        };
        if l == local && out.len() < MAX_SESSIONS {
            out.push(r);
        }
    }
    out
}

fn parse_addr(s: &str) -> Option<SocketAddrV4> {
    let (ip, port) = s.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // The kernel prints the address's bytes (network order) as one native-endian u32.
    Some(SocketAddrV4::new(Ipv4Addr::from(ip.to_ne_bytes()), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn established_connections_to_the_vip_are_found() {
        // 198.18.1.100:3260 <- 198.18.1.10:40000 established, one listening, one to
        // another address.
        let vip = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 100), 3260);
        let hex = |a: Ipv4Addr| format!("{:08X}", u32::from_ne_bytes(a.octets()));
        let text = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue\n\
             0: {vip}:0CBC 00000000:0000 0A 0\n\
             1: {vip}:0CBC {cli}:9C40 01 0\n\
             2: {other}:0CBC {cli}:9C41 01 0\n\
             garbage\n",
            vip = hex(*vip.ip()),
            cli = hex(Ipv4Addr::new(198, 18, 1, 10)),
            other = hex(Ipv4Addr::new(198, 18, 1, 1)),
        );
        assert_eq!(
            parse_proc_net_tcp(&text, vip),
            vec![SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 10), 40000)]
        );
    }
}
