//! Running under a service manager: sd_notify messages (READY once the port listens,
//! WATCHDOG while the cores run, STOPPING at a stop), `status --json`, completions and
//! the man page.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{scratch, text, Daemon, TARGET};

const BIN: &str = env!("CARGO_BIN_EXE_twinsan");

/// A daemon killed when the test ends, also when an assertion fails first.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `twinsan serve` on `listen` in `dir`, notifying `sock_path` with a 1.5 s watchdog
/// (a look every 500 ms); `watchdog_pid` names the process meant to ping, when not the
/// daemon (systemd's WATCHDOG_PID).
fn serve_notified(
    listen: &str,
    dir: &std::path::Path,
    sock_path: &std::path::Path,
    watchdog_pid: Option<u32>,
) -> Killed {
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--listen", listen, "--data-dir"])
        .arg(dir)
        .env("NOTIFY_SOCKET", sock_path)
        .env("WATCHDOG_USEC", "1500000")
        .stdout(Stdio::null());
    if let Some(pid) = watchdog_pid {
        cmd.env("WATCHDOG_PID", pid.to_string());
    }
    Killed(cmd.spawn().unwrap())
}

/// Receives notification datagrams until one contains `what` (or panics after `within`).
fn wait_for(sock: &UnixDatagram, what: &str, within: Duration) -> (String, Instant) {
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.saturating_sub(t.elapsed());
        assert!(!left.is_zero(), "no {what} within {within:?}");
        sock.set_read_timeout(Some(left)).unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            if msg.lines().any(|l| l == what) {
                return (msg, Instant::now());
            }
        }
    }
}

#[test]
fn systemd_hears_ready_after_the_listener_then_watchdog_pings_then_stopping() {
    let dir = scratch("notify");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let port = {
        // A free port that the daemon then takes (READY must mean it is listening).
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = serve_notified(
        &format!("127.0.0.1:{port}"),
        &dir,
        &sock_path,
        Some(std::process::id()),
    );
    // WATCHDOG_PID names another process: this one must not ping (systemd's rule).
    std::thread::sleep(Duration::from_millis(1200));
    let mut buf = [0u8; 4096];
    sock.set_nonblocking(true).unwrap();
    let mut early = Vec::new();
    while let Ok(n) = sock.recv(&mut buf) {
        early.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    sock.set_nonblocking(false).unwrap();
    assert!(early.iter().any(|m| m.contains("READY=1")), "{early:?}");
    assert!(!early.iter().any(|m| m.contains("WATCHDOG=1")), "{early:?}");
    let ready = early.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(
        ready.contains(&format!(
            "STATUS=serving iSCSI on 127.0.0.1:{port} as primary"
        )),
        "{ready}"
    );
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("READY before the listener");
    drop(child);

    // Now with the watchdog meant for the daemon itself.
    let mut child = serve_notified(&format!("127.0.0.1:{port}"), &dir, &sock_path, None);
    let (_, ready_at) = wait_for(&sock, "READY=1", Duration::from_secs(10));
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("READY before the listener");
    // Three pings in a row, about a look (500 ms) apart.
    let mut last = ready_at;
    for _ in 0..3 {
        let (_, at) = wait_for(&sock, "WATCHDOG=1", Duration::from_secs(2));
        assert!(
            at - last >= Duration::from_millis(300),
            "pinged faster than it looks"
        );
        last = at;
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    wait_for(&sock, "STOPPING=1", Duration::from_secs(10));
    assert!(child.0.wait().unwrap().success());
}

#[test]
fn status_json_carries_what_the_table_shows() {
    let d = Daemon::simple("status-json", "64MiB", "");
    let sock = d.dir.join("twinsan.sock");
    let o = Command::new(BIN)
        .args(["status", "--json", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    assert_eq!(v["role"], "primary");
    assert_eq!(v["peer"], serde_json::Value::Null);
    assert_eq!(v["luns"][0]["target"], TARGET);
    assert_eq!(v["luns"][0]["lun"], 0);
    assert_eq!(v["luns"][0]["size_bytes"], 64u64 << 20);
    let table = d.admin("status");
    let row = table
        .lines()
        .find(|l| l.starts_with(TARGET))
        .expect("a LUN row");
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[..4], [TARGET, "0", "UpToDate", "64.0"], "{table}");
    assert_eq!(
        cols.last().copied(),
        v["luns"][0]["path"].as_str(),
        "{table}"
    );
    // The header's columns start where the row's do (aligned).
    let header = table.lines().find(|l| l.starts_with("TARGET")).unwrap();
    assert_eq!(header.find("STATE"), row.find("UpToDate"), "{table}");

    // A daemon that is not there: an error on stderr and status 1, nothing on stdout.
    let o = Command::new(BIN)
        .args(["status", "--json", "--socket"])
        .arg(d.dir.join("none.sock"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
}

#[test]
fn completions_and_man_pages_come_from_the_cli_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let o = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(o.status.success(), "{shell}: {}", text(&o));
        let s = String::from_utf8_lossy(&o.stdout);
        assert!(
            s.contains("check-config") && s.contains("discard-local"),
            "{shell}"
        );
    }
    let o = Command::new(BIN).arg("man").output().unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && s.contains(".TH twinsan 1"), "{s}");
    let dir = scratch("man");
    let o = Command::new(BIN)
        .args(["man", "--out-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let serve = std::fs::read_to_string(dir.join("twinsan-serve.1")).unwrap();
    assert!(serve.contains("data\\-dir"), "{serve}");
    // The hidden internal subcommand gets no page.
    assert!(!dir.join("twinsan-vip-guard.1").exists());
}

/// The thread id of the daemon's thread named `name` (its comm), if it has one.
fn thread_id(pid: u32, name: &str) -> Option<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .and_then(|t| t.file_name().to_str()?.parse().ok())
}

/// Whether a datagram with `what` arrives within `d`.
fn heard_within(sock: &UnixDatagram, what: &str, d: Duration) -> bool {
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    while let Some(left) = d.checked_sub(t.elapsed()).filter(|l| !l.is_zero()) {
        sock.set_read_timeout(Some(left)).unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == what)
            {
                return true;
            }
        }
    }
    false
}

/// The watchdog is the cores' health, not a timer: one core thread stopped (ptrace stops
/// that thread alone; SIGSTOP would stop the whole process, the pinging thread too) and the
/// pings stop; it runs again and they resume.
#[test]
fn a_stalled_core_thread_stops_the_watchdog_pings() {
    let dir = scratch("watchdog-stall");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let child = Killed(
        Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "1500000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&sock, "READY=1", Duration::from_secs(10));
    wait_for(&sock, "WATCHDOG=1", Duration::from_secs(2));
    let tid = thread_id(child.0.id(), "twinsan-core0").expect("a twinsan-core0 thread");
    // SAFETY: ptrace and waitpid on a thread of our own child; no memory is shared.
    unsafe {
        assert_eq!(
            libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0),
            0,
            "seize core0"
        );
        assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0), 0);
        let mut st = 0;
        assert_eq!(libc::waitpid(tid, &mut st, libc::__WALL), tid);
    }
    // The look under way may still count ticks from before the stop: skip it.
    std::thread::sleep(Duration::from_millis(600));
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    while sock.recv(&mut buf).is_ok() {}
    sock.set_nonblocking(false).unwrap();
    let pinged = heard_within(&sock, "WATCHDOG=1", Duration::from_millis(1600));
    // SAFETY: as above; the thread is in a ptrace stop, so it may be detached.
    unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0) };
    assert!(!pinged, "pinged while core 0 was stopped");
    assert!(
        heard_within(&sock, "WATCHDOG=1", Duration::from_secs(2)),
        "no ping after core 0 ran again"
    );
    drop(child);
}
