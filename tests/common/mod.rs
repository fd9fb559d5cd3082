//! A daemon under test: its own data directory, an ephemeral loopback port, killed on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub mod pair;

pub const TARGET: &str = "iqn.2026-11.io.twinsan:test";

pub struct Daemon {
    child: Child,
    pub addr: String,
    pub dir: PathBuf,
}

/// A fresh scratch directory under the target dir (kept small: LUNs are sparse).
pub fn scratch(name: &str) -> PathBuf {
    let d =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create scratch dir");
    d
}

impl Daemon {
    /// Starts `twinsan serve --config <dir>/twinsan.toml` with `toml` as the file.
    pub fn start(name: &str, toml: &str) -> Daemon {
        let dir = scratch(name);
        std::fs::write(dir.join("twinsan.toml"), toml).expect("write config");
        Self::start_in(dir)
    }

    pub fn start_in(dir: PathBuf) -> Daemon {
        let (child, line) = spawn(&dir, "127.0.0.1:0", Stdio::inherit());
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("daemon did not start: {line:?}"))
            .to_string();
        Daemon { child, addr, dir }
    }

    /// The common single-LUN configuration, with `extra` appended to the [[target]] table.
    pub fn simple(name: &str, size: &str, extra: &str) -> Daemon {
        Self::start(name, &format!("[[target]]\nname = \"{TARGET}\"\n{extra}\n[[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"{size}\"\n"))
    }

    /// Like [`simple`](Self::simple) with extra keys in the [[target.lun]] table.
    pub fn simple_with_lun(name: &str, size: &str, extra: &str, lun_extra: &str) -> Daemon {
        Self::start(name, &format!("[[target]]\nname = \"{TARGET}\"\n{extra}\n[[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"{size}\"\n{lun_extra}\n"))
    }

    /// Runs `twinsan CMD` on the daemon's admin socket (in its data directory, `dir`) and
    /// returns its output.
    pub fn admin(&self, cmd: &str) -> String {
        let o = Command::new(env!("CARGO_BIN_EXE_twinsan"))
            .arg(cmd)
            .arg("--socket")
            .arg(self.dir.join("twinsan.sock"))
            .output()
            .expect("run twinsan admin command");
        text(&o)
    }

    pub fn url(&self, lun: u32) -> String {
        format!("iscsi://{}/{TARGET}/{lun}", self.addr)
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): a stopped daemon keeps its connections open
    /// and answers nothing, as a hung node or a silent network would.
    pub fn set_stopped(&self, stopped: bool) {
        let sig = if stopped { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} on the daemon failed");
    }

    /// The daemon's process id (for signals such as SIGHUP).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `twinsan ARGS... --socket <its admin socket>` and returns the output.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_twinsan"))
            .args(args)
            .arg("--socket")
            .arg(self.dir.join("twinsan.sock"))
            .output()
            .expect("run twinsan")
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, reaped, and started again at once on the same address and data, as a
    /// supervisor restarts a crashed daemon.
    pub fn crash_and_restart(&mut self) {
        self.crash_and_restart_after(Duration::ZERO);
    }

    /// SIGKILL, reaped, down for `down`, then started again on the same address and data:
    /// a portal that is gone for a while (a failover moving its address) and comes back.
    pub fn crash_and_restart_after(&mut self, down: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down);
        let (child, line) = spawn(&self.dir, &self.addr, Stdio::piped());
        if !line.starts_with("listening on ") {
            let o = child.wait_with_output().expect("restarted daemon");
            panic!("restart failed: {line:?} {}", text(&o));
        }
        self.child = child;
    }
}

/// Starts `twinsan serve` on the directory's config; returns it and its first stdout line.
fn spawn(dir: &Path, listen: &str, stderr: Stdio) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_twinsan"))
        .args(["serve", "--config"])
        .arg(dir.join("twinsan.toml"))
        .args(["--listen", listen, "--data-dir"])
        .arg(dir)
        .env(
            "RUST_LOG",
            std::env::var("TWINSAN_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn twinsan");
    let stdout = child.stdout.take().expect("stdout piped");
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    (child, line)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a libiscsi tool with a timeout so a hung target fails the test instead of CI.
pub fn tool(prog: &str, args: &[&str]) -> Output {
    let out = Command::new("timeout")
        .arg("60")
        .arg(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog} (install libiscsi-bin): {e}"));
    out
}

/// Runs `twinsan bench URL ARGS...` (with a timeout, so a hung target fails the test).
pub fn bench(url: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("120")
        .arg(env!("CARGO_BIN_EXE_twinsan"))
        .arg("bench")
        .arg(url)
        .args(args)
        .output()
        .expect("run twinsan bench")
}

/// Writes the first `size` bytes of `url` once, in 64 KiB self-describing writes at queue
/// depth 4, recording every acknowledged one in `state` (for `read_back`).
pub fn verified_fill(url: &str, size: &str, state: &Path) -> Output {
    let state = state.to_str().expect("UTF-8 scratch path");
    bench(
        url,
        &[
            "--rw",
            "write",
            "--bs",
            "64k",
            "--iodepth",
            "4",
            "--size",
            size,
            "--once",
            "--verify",
            "--verify-state",
            state,
        ],
    )
}

/// The writes of `o` (a `twinsan bench` run past the end of a full file system) failed,
/// with SPACE ALLOCATION FAILED WRITE PROTECT (DATA PROTECT, 27/07) rather than anything else.
pub fn assert_space_allocation_failed(o: &Output) {
    let t = text(o);
    assert!(
        !o.status.success(),
        "writes beyond the pool succeeded?\n{t}"
    );
    assert!(
        t.contains("DATA PROTECT") && t.to_ascii_uppercase().contains("27/07"),
        "expected SPACE ALLOCATION FAILED WRITE PROTECT (07/27/07):\n{t}"
    );
}

/// Reads the first `size` bytes of `url` in `bs` reads and checks every block whose
/// acknowledged write `--verify-state` recorded in `state` (`twinsan bench` exits non-zero
/// on a mismatch).
pub fn read_back(url: &str, bs: &str, size: &str, state: &Path) -> Output {
    let state = state.to_str().expect("UTF-8 scratch path");
    bench(
        url,
        &[
            "--rw",
            "read",
            "--bs",
            bs,
            "--size",
            size,
            "--verify-state",
            state,
        ],
    )
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

pub fn wait_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// A tmpfs mounted for the test (a small file system to fill) and unmounted when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount's syntax: "24m") at `dir`, created if missing.
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("create mount point");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "mounting a {size} tmpfs failed: this test needs root (CI runs as root)"
        );
        Tmpfs(dir.to_path_buf())
    }

    /// Grows (or shrinks) the mounted file system to `size`.
    pub fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "remounting the tmpfs with size {size} failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// An XFS file system (with reflink, mkfs.xfs's default) in a sparse image file, loop
/// mounted for the test and unmounted when dropped: snapshots need a file system that
/// clones files, and this machine's root is ext4.
pub struct Xfs {
    dir: PathBuf,
    image: PathBuf,
}

impl Xfs {
    /// Makes and mounts a `size_mib` MiB XFS at `dir` (created if missing).
    pub fn mount(dir: &Path, size_mib: u64) -> Xfs {
        std::fs::create_dir_all(dir).expect("create mount point");
        let mut image = dir.as_os_str().to_owned();
        image.push(".xfs-image");
        let image = PathBuf::from(image);
        let f = std::fs::File::create(&image).expect("create the XFS image");
        f.set_len(size_mib << 20).expect("size the XFS image");
        drop(f);
        let mkfs = Command::new("mkfs.xfs")
            .args(["-q", "-f", "-m", "reflink=1"])
            .arg(&image)
            .output()
            .expect("mkfs.xfs: install xfsprogs (scripts/test-all does)");
        assert!(mkfs.status.success(), "mkfs.xfs failed: {}", text(&mkfs));
        let m = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(dir)
            .output()
            .expect("mount");
        assert!(
            m.status.success(),
            "loop-mounting an XFS image failed (this test needs root and loop devices; CI has both): {}",
            text(&m)
        );
        Xfs {
            dir: dir.to_path_buf(),
            image,
        }
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        // Not lazy: the loop device is freed only once nothing holds the file system, and a
        // busy one (a daemon still running) should show up as a leak, not hide.
        for _ in 0..50 {
            let ok = Command::new("umount")
                .arg(&self.dir)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

/// A logged-in session (from `twinsan bench`'s initiator) to LUN 0 of `target` at `addr`,
/// as `initiator`, with ISID qualifier `isid_low` (sessions of one name must differ).
pub fn session_at(addr: &str, target: &str, initiator: &str, isid_low: u8) -> benches::conn::Conn {
    let mut c = benches::conn::Conn::connect(addr, benches::args::encode_lun(0)).expect("connect");
    c.login(
        initiator,
        target,
        [0x80, 0x12, 0x34, 0x56, 0, isid_low],
        false,
        None,
    )
    .expect("login");
    c.until_ready().expect("unit ready");
    c
}

/// A `twinsan bench` running in the background, its stderr read on a thread (the bench must
/// never block on it).
pub struct BackgroundBench {
    child: std::process::Child,
    reader: std::thread::JoinHandle<String>,
    /// Whether the bench probed the LUN (its sessions are logging in) within 60 s.
    pub probed: bool,
}

/// Starts `twinsan bench URL ARGS...` (with a timeout) and returns once it has probed the
/// LUN, or after 60 s without (then `probed` is false).
pub fn bench_background(url: &str, args: &[&str]) -> BackgroundBench {
    let mut child = Command::new("timeout")
        .arg("120")
        .arg(env!("CARGO_BIN_EXE_twinsan"))
        .arg("bench")
        .arg(url)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run twinsan bench");
    // Stderr lines come back both as they arrive (to see the probe) and all together.
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let probed = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains("-byte blocks") => break true,
            Ok(_) => continue,
            Err(_) => break false,
        }
    };
    BackgroundBench {
        child,
        reader,
        probed,
    }
}

impl BackgroundBench {
    /// Waits for the bench to end: its output (stdout) and all of its stderr.
    pub fn wait(self) -> (Output, String) {
        let o = self
            .child
            .wait_with_output()
            .expect("wait for twinsan bench");
        let err = self.reader.join().unwrap_or_default();
        (o, err)
    }
}

/// A loopback port free a moment ago (the daemon binds it right after).
/// `N` distinct ports free now (all bound at once, then released): fixed ports collided
/// when two checkouts ran the pair tests at the same time.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("its address").port())
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("its address").port()
}
