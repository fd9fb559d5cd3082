//! The VIP guard: a small process (`twinsan vip-guard`) that the daemon starts with a pipe
//! on its stdin. When the daemon dies, however it dies (SIGKILL included), the kernel closes
//! the pipe; the guard then removes the VIP, so the address is never on two nodes while the
//! peer takes over. The address's short lifetime is the backstop for a daemon that stops
//! without dying (SIGSTOP, a hang), or a guard that was killed too.
//!
//! Why the guard first waits for the dead daemon's iSCSI listeners to go: the daemon's
//! io_uring keeps them (pending accepts) until the kernel tears the ring down, 0.1 to 0.15 s
//! after the process died. An initiator that saw its connection close (the kernel sends FIN
//! for a killed process's sockets) reconnects at once, and its new connection lands in that
//! dying listener's queue. The teardown resets it, but only while the VIP is still here to
//! send the RST from: removed earlier, the RST is never sent, the survivor never heard of
//! that connection (nothing to tickle), and the initiator waits out its own timeout (the
//! rig measured 2 s stalls in one kill of four). So the guard removes the address once the
//! listeners are released, or after `release_wait_ms`, whichever comes first.

use std::io::Read;
use std::net::{SocketAddr, SocketAddrV4};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::VipConfig;
use crate::vip::Vip;

/// How often the guard probes for the dead daemon's listeners.
const RELEASE_PROBE_INTERVAL_MS: u64 = 5;

/// What the guard is told at its start.
#[derive(Debug, Clone)]
pub struct GuardArgs {
    pub vip: VipConfig,
    /// The daemon's iSCSI listening address (probed on the VIP when it is the wildcard).
    pub iscsi_listen: SocketAddr,
    /// The longest the guard waits for the listeners before removing the VIP regardless:
    /// below the lease, so the address is gone before the peer may add it.
    pub release_wait_ms: u64,
}

/// Starts the guard (the current executable, `vip-guard` subcommand).
pub fn spawn(args: &GuardArgs) -> std::io::Result<Child> {
    let exe = std::env::current_exe()?;
    Command::new(exe)
        .arg("vip-guard")
        .arg("--interface")
        .arg(&args.vip.interface)
        .arg("--vip")
        .arg(format!("{}/{}", args.vip.addr, args.vip.prefix_len))
        .arg("--listen")
        .arg(args.iscsi_listen.to_string())
        .arg("--release-wait-ms")
        .arg(args.release_wait_ms.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
}

/// The guard's body: waits for its stdin to close, for the daemon's listeners to be
/// released (bounded), then removes the VIP.
pub fn run(args: &GuardArgs) -> std::io::Result<()> {
    // A stop signal to the whole group (systemd's default KillMode=control-group, Ctrl-C
    // in a terminal) must not end the guard before the daemon: it would leave the VIP
    // behind. The guard ends on its own once the daemon has gone (its stdin closes).
    // SAFETY: SIG_IGN installs no handler code; it only changes this process's dispositions.
    unsafe {
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    let v = Vip::resolve(args.vip.addr, args.vip.prefix_len, &args.vip.interface)
        .map_err(std::io::Error::other)?;
    let mut buf = [0u8; 64];
    let mut stdin = std::io::stdin();
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    wait_for_release(probe_addr(args), args.release_wait_ms);
    v.remove().map_err(std::io::Error::other)
}

/// Where the listeners are probed: the listening address, or the VIP on its port when the
/// daemon listens on the wildcard address.
fn probe_addr(args: &GuardArgs) -> SocketAddr {
    if args.iscsi_listen.ip().is_unspecified() {
        SocketAddr::V4(SocketAddrV4::new(args.vip.addr, args.iscsi_listen.port()))
    } else {
        args.iscsi_listen
    }
}

/// Returns once nothing listens on `addr` or `wait_ms` has passed. A probe that fails for
/// another reason than "in use" (the address gone, say) ends the wait: the guard must
/// never hold the VIP longer because of it.
fn wait_for_release(addr: SocketAddr, wait_ms: u64) {
    let started = Instant::now();
    while let Ok(true) = crate::server::listener_present(addr) {
        if started.elapsed() >= Duration::from_millis(wait_ms) {
            return;
        }
        std::thread::sleep(Duration::from_millis(RELEASE_PROBE_INTERVAL_MS));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener};

    fn args(listen: SocketAddr) -> GuardArgs {
        GuardArgs {
            vip: VipConfig {
                addr: Ipv4Addr::LOCALHOST,
                prefix_len: 8,
                interface: "lo".into(),
            },
            iscsi_listen: listen,
            release_wait_ms: 200,
        }
    }

    #[test]
    fn a_wildcard_listener_is_probed_on_the_vip() {
        let a = args("0.0.0.0:3260".parse().unwrap());
        assert_eq!(probe_addr(&a), "127.0.0.1:3260".parse().unwrap());
        let a = args("127.0.0.2:3261".parse().unwrap());
        assert_eq!(probe_addr(&a), "127.0.0.2:3261".parse().unwrap());
    }

    #[test]
    fn the_wait_ends_when_the_listener_goes_and_is_bounded_while_it_stays() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let started = Instant::now();
        wait_for_release(addr, 150);
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "a live listener holds the wait to its bound"
        );
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(l);
        });
        let started = Instant::now();
        wait_for_release(addr, 10_000);
        closer.join().unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(5_000),
            "the wait ends once the listener is closed"
        );
    }
}
