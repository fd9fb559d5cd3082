//! The VIP guard: a small process (`twinsan vip-guard`) that the daemon starts with a pipe
//! on its stdin. When the daemon dies, however it dies (SIGKILL included), the kernel closes
//! the pipe; the guard then removes the VIP at once, so the address is never on two nodes
//! while the peer takes over. The address's short lifetime is the backstop for a daemon
//! that stops without dying (SIGSTOP, a hang), or a guard that was killed too.

use std::io::Read;
use std::process::{Child, Command, Stdio};

use crate::config::VipConfig;
use crate::vip::Vip;

/// Starts the guard for `vip` (the current executable, `vip-guard` subcommand).
pub fn spawn(vip: &VipConfig) -> std::io::Result<Child> {
    let exe = std::env::current_exe()?;
    Command::new(exe)
        .arg("vip-guard")
        .arg("--interface")
        .arg(&vip.interface)
        .arg("--vip")
        .arg(format!("{}/{}", vip.addr, vip.prefix_len))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
}

/// The guard's body: waits for its stdin to close, then removes the VIP.
pub fn run(vip: &VipConfig) -> std::io::Result<()> {
    let v =
        Vip::resolve(vip.addr, vip.prefix_len, &vip.interface).map_err(std::io::Error::other)?;
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
    v.remove().map_err(std::io::Error::other)
}
