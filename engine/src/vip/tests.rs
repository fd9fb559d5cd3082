//! The drivers against a real kernel, in throwaway network namespaces, so nothing touches the
//! machine's own interfaces and no packet leaves the pair of namespaces a test makes.
//!
//! Each test makes two namespaces, `A` (this node, holding the VIP) and `B` (an initiator on
//! the same segment), joined by a veth pair (a dummy interface would do for the addresses,
//! but not every kernel has the dummy driver). Only 198.18.0.0/15 (benchmarking, RFC 2544)
//! addresses are used. The namespaces are made and deleted with `ip netns` (test set-up
//! only); the code under test runs on a thread that entered the namespace with `setns`,
//! which moves only the calling thread. Sockets keep the namespace they were made in, so a
//! socket made on such a thread can be used from the test thread afterwards.
//!
//! Without root (or where namespaces cannot be made) each test says it is skipped and passes.

use super::arp::{interface_mac, link_sockaddr, ETH_P_ARP};
use super::tickle::tickle_packet;
use super::*;

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

const IF_A: &str = "tsva";
const IF_B: &str = "tsvb";
/// Node A's own address: the VIP is added beside it, as a secondary, as in production.
const NODE_A: Ipv4Addr = Ipv4Addr::new(198, 18, 99, 10);
const NODE_B: Ipv4Addr = Ipv4Addr::new(198, 18, 99, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 99, 1);
const ISCSI_PORT: u16 = 3260;
/// Every EtherType. A socket bound to one EtherType sees only incoming frames; outgoing
/// copies go only to ETH_P_ALL sockets, and the tickle test wants both directions.
const ETH_P_ALL: u16 = 0x0003;

/// A named network namespace, deleted on drop (also when the test panics).
struct Netns {
    name: String,
}

impl Netns {
    fn create(tag: &str) -> Result<Netns, String> {
        let name = format!("tsvip-test-{}-{tag}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip netns add {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Netns { name })
    }

    /// Runs `ip -n NAME args...` and returns its output; panics if it fails.
    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {} {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread inside this namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).expect("open the namespace");
                // SAFETY: `ns` is an open namespace file for the duration of the call;
                // CLONE_NEWNET moves only this (scoped, short-lived) thread, so no other
                // code of the test binary runs in the namespace.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // The veth pair goes with the namespaces; sockets still open in one keep it alive
        // until they close, but the name is gone.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Namespaces A and B joined by veth `tsva` (in A, 198.18.99.10/24) -- `tsvb` (in B,
/// 198.18.99.2/24), both up. `None` (and a line on stderr) where this cannot be done.
struct Pair {
    a: Netns,
    b: Netns,
}

fn pair(test: &str) -> Option<Pair> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("vip::{test}: skipped, not root (needs network namespaces)");
        return None;
    }
    let a = match Netns::create(&format!("{test}-a")) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vip::{test}: skipped, cannot make a network namespace: {e}");
            return None;
        }
    };
    let b = Netns::create(&format!("{test}-b")).expect("a second namespace");
    a.ip(&[
        "link", "add", IF_A, "type", "veth", "peer", "name", IF_B, "netns", &b.name,
    ]);
    a.ip(&["addr", "add", &format!("{NODE_A}/24"), "dev", IF_A]);
    a.ip(&["link", "set", IF_A, "up"]);
    b.ip(&["addr", "add", &format!("{NODE_B}/24"), "dev", IF_B]);
    b.ip(&["link", "set", IF_B, "up"]);
    Some(Pair { a, b })
}

/// The index of interface `name` in the calling thread's namespace.
fn ifindex(name: &str) -> u32 {
    let c = CString::new(name).unwrap();
    // SAFETY: `c` is NUL-terminated and outlives the call, which only reads it.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(index, 0, "{name}: {}", std::io::Error::last_os_error());
    index
}

/// An AF_PACKET socket receiving EtherType `protocol` on interface `ifindex`: `Type::RAW`
/// frames with their Ethernet header, `Type::DGRAM` without.
fn capture(ifindex: u32, protocol: u16, ty: Type) -> Socket {
    let sock = Socket::new(
        Domain::PACKET,
        ty,
        Some(Protocol::from(i32::from(protocol.to_be()))),
    )
    .unwrap();
    sock.bind(&link_sockaddr(ifindex, protocol, [0; 6]).unwrap())
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    sock
}

/// Reads frames from `sock` for up to `within` and returns those `keep` accepts, stopping
/// once `want` were kept.
fn frames(
    sock: &Socket,
    within: Duration,
    want: usize,
    keep: impl Fn(&[u8]) -> bool,
) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + within;
    let mut kept = Vec::new();
    let mut buf = [0u8; 2048];
    while kept.len() < want && Instant::now() < deadline {
        match (&*sock).read(&mut buf) {
            Ok(n) if keep(&buf[..n]) => kept.push(buf[..n].to_vec()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("capture: {e}"),
        }
    }
    kept
}

#[test]
fn vip_is_added_renewed_and_removed() {
    let Some(p) = pair("addr") else { return };
    p.a.run(|| {
        let vip = Vip::resolve(VIP, 24, IF_A).unwrap();
        assert!(!vip.present().unwrap());
        vip.add(2).unwrap();
        assert!(vip.present().unwrap());
        let fresh = vip.lifetime().unwrap().unwrap();
        assert_eq!(
            fresh,
            AddrLifetime {
                valid_left_s: 2,
                preferred_left_s: 2
            }
        );
        // Adding an address that is there is not an error: it is the renewal.
        let added = Instant::now();
        std::thread::sleep(Duration::from_millis(1_100));
        let aged = vip.lifetime().unwrap();
        if added.elapsed() < Duration::from_millis(1_900) {
            assert!(matches!(aged, Some(l) if l.valid_left_s <= 1), "{aged:?}");
        }
        vip.add(2).unwrap();
        assert_eq!(vip.lifetime().unwrap().map(|l| l.valid_left_s), Some(2));
        // Another prefix length is another address.
        assert!(!Vip {
            prefix_len: 32,
            ..vip
        }
        .present()
        .unwrap());
        vip.remove().unwrap();
        assert!(!vip.present().unwrap());
        // Gone already is fine.
        vip.remove().unwrap();
        // The node's own address was not touched, and has no lifetime.
        let node = Vip::resolve(NODE_A, 24, IF_A).unwrap();
        assert_eq!(
            node.lifetime().unwrap().map(|l| l.valid_left_s),
            Some(u32::MAX)
        );
    });
    // And `ip` agrees: only the node's own address is left.
    let shown = p.a.ip(&["-4", "addr", "show", "dev", IF_A]);
    assert!(shown.contains(&format!("{NODE_A}/24")), "{shown}");
    assert!(!shown.contains(&format!("{VIP}/")), "{shown}");
}

#[test]
fn a_vip_nobody_renews_disappears_by_itself() {
    let Some(p) = pair("expiry") else { return };
    p.a.run(|| {
        let vip = Vip::resolve(Ipv4Addr::new(198, 18, 99, 3), 24, IF_A).unwrap();
        vip.add(1).unwrap();
        assert!(vip.present().unwrap());
        let added = Instant::now();
        while vip.present().unwrap() {
            assert!(
                added.elapsed() < Duration::from_secs(3),
                "a 1 s address still there after 3 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("vip: a 1 s address expired after {:?}", added.elapsed());
    });
}

#[test]
fn gratuitous_arp_reaches_the_peer_and_moves_its_neighbour_entry() {
    let Some(p) = pair("garp") else { return };
    // B still believes the VIP is at the old primary's MAC.
    let old_mac = "02:00:00:00:00:99";
    p.b.ip(&[
        "neigh",
        "replace",
        &VIP.to_string(),
        "lladdr",
        old_mac,
        "dev",
        IF_B,
        "nud",
        "stale",
    ]);
    let cap = p.b.run(|| capture(ifindex(IF_B), ETH_P_ARP, Type::RAW));
    let mac_a = p.a.run(|| {
        let vip = Vip::resolve(VIP, 24, IF_A).unwrap();
        vip.add(5).unwrap();
        announce(vip.ifindex, VIP, 2, 20).unwrap();
        let any = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        interface_mac(&any, vip.ifindex).unwrap()
    });
    let mut expected = vec![0xff; 6];
    expected.extend_from_slice(&mac_a);
    expected.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    expected.extend_from_slice(&arp::garp_payload(mac_a, VIP));
    let got = frames(&cap, Duration::from_secs(2), 2, |f| {
        f.starts_with(&expected)
    });
    assert_eq!(got.len(), 2, "both announcements arrive, byte for byte");

    let mac_text = mac_a
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let neigh = p.b.ip(&["neigh", "show", &VIP.to_string(), "dev", IF_B]);
        if neigh.contains(&mac_text) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B's entry not moved to {mac_text}: {neigh}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The whole takeover story. An initiator (B) is connected to the VIP on the old primary, C
/// (its own veth to B and a /32 route); C then drops off the network for good, its socket
/// still open, so nothing ever tells B. The new primary A adds the VIP and tickles the
/// connection: B's real ACK, now routed to A, meets no socket there and A's kernel resets
/// it, so B's connection fails at once instead of hanging.
#[test]
fn a_tickle_makes_an_orphaned_initiator_reset_at_once() {
    let Some(p) = pair("tickle") else { return };
    let old = Netns::create("tickle-c").expect("a third namespace");
    old.ip(&[
        "link", "add", "tsvc", "type", "veth", "peer", "name", "tsvd", "netns", &p.b.name,
    ]);
    old.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "tsvc"]);
    old.ip(&["link", "set", "tsvc", "up"]);
    old.ip(&["route", "add", &format!("{NODE_B}/32"), "dev", "tsvc"]);
    p.b.ip(&["link", "set", "tsvd", "up"]);
    p.b.ip(&["route", "add", &format!("{VIP}/32"), "dev", "tsvd"]);

    let server_side = SocketAddrV4::new(VIP, ISCSI_PORT);
    let old_listener = old.run(|| TcpListener::bind(server_side).unwrap());
    let client = p.b.run(|| {
        TcpStream::connect_timeout(&SocketAddr::V4(server_side), Duration::from_secs(2)).unwrap()
    });
    // Kept open to the end: C never closes the connection, it just vanishes.
    let (_old_server, _) = old_listener.accept().unwrap();
    let SocketAddr::V4(initiator) = client.local_addr().unwrap() else {
        panic!("an IPv4 client has an IPv4 address")
    };
    // C is cut off (deleting one end of a veth deletes both, and B's /32 route with it).
    old.ip(&["link", "del", "tsvc"]);

    // A takes over: the VIP, a target listening on it, and the tickle.
    let (_listener, cap) = p.a.run(|| {
        Vip::resolve(VIP, 24, IF_A).unwrap().add(5).unwrap();
        let listener = TcpListener::bind(server_side).unwrap();
        let cap = capture(ifindex(IF_A), ETH_P_ALL, Type::DGRAM);
        tickle(server_side, initiator, 1).unwrap();
        (listener, cap)
    });

    // Every frame on A's wire, without its Ethernet header; the IPv4 ones here have no
    // options, so TCP starts at byte 20 and its flags are byte 33.
    let tcp_between = |ip: &[u8], src: SocketAddrV4, dst: SocketAddrV4| {
        ip.len() >= 40
            && ip[0] == 0x45
            && ip[9] == libc::IPPROTO_TCP as u8
            && ip[12..16] == src.ip().octets()
            && ip[16..20] == dst.ip().octets()
            && ip[20..22] == src.port().to_be_bytes()
            && ip[22..24] == dst.port().to_be_bytes()
    };
    let seen = frames(&cap, Duration::from_secs(2), 3, |ip| {
        tcp_between(ip, server_side, initiator) || tcp_between(ip, initiator, server_side)
    });
    let (from_a, from_b): (Vec<_>, Vec<_>) = seen
        .into_iter()
        .partition(|ip| tcp_between(ip, server_side, initiator));
    let summary = |v: &[Vec<u8>]| {
        v.iter()
            .map(|ip| {
                format!(
                    "flags {:#04x} seq {:02x?} ack {:02x?}",
                    ip[33],
                    &ip[24..28],
                    &ip[28..32]
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        (from_a.len(), from_b.len()),
        (2, 1),
        "tickle, answer, reset: A sent {:?}, B sent {:?}",
        summary(&from_a),
        summary(&from_b)
    );
    // The kernel may fill in the IP identification and checksum; the TCP segment is ours.
    assert_eq!(
        from_a[0][20..40],
        tickle_packet(server_side, initiator)[20..]
    );
    let answer = &from_b[0];
    assert_eq!(answer[33] & 0x17, 0x10, "B answers with a bare ACK");
    assert_ne!(answer[28..32], [0, 0, 0, 0], "with its real numbers");
    assert_eq!(from_a[1][33] & 0x04, 0x04, "which A resets");

    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let read = (&client).read(&mut [0u8; 1]);
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the initiator's connection is reset: {read:?}"
    );
}
