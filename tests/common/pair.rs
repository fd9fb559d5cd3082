//! Two daemons on loopback that mirror each other: one node of a pair, its config, and
//! waiting for the pair to be in sync.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{scratch, text, Tmpfs, Xfs};

pub const TARGET: &str = "iqn.2026-11.io.twinsan:pair";

pub struct Node {
    pub child: Option<Child>,
    pub config: PathBuf,
    pub dir: PathBuf,
    pub iscsi_port: u16,
    /// The small file system its data directory lives on, if any (unmounted after the
    /// daemon is killed: fields drop after `Drop::drop`).
    _pool: Option<Tmpfs>,
    /// Or the XFS (reflink) file system it lives on, for snapshots.
    _xfs: Option<Xfs>,
}

pub fn node_toml(iscsi: u16, me: u16, peer: u16, role: &str, psk: &str, size: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{iscsi}\"\ndata_dir = \"data\"\nrole = \"{role}\"\n\
         [peer]\nname = \"peer\"\naddress = \"127.0.0.1:{peer}\"\nlisten = \"127.0.0.1:{me}\"\npsk = \"{psk}\"\nreplica_timeout_ms = 1000\non_peer_loss = \"degrade\"\n\
         [[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"{size}\"\n"
    )
}

impl Node {
    pub fn new(name: &str, toml: String, iscsi_port: u16) -> Node {
        Node::with_pool(name, toml, iscsi_port, None)
    }

    /// A node whose data directory is a tmpfs of `size` (mount's syntax: "24m").
    pub fn on_tmpfs(name: &str, toml: String, iscsi_port: u16, size: &str) -> Node {
        Node::with_pool(name, toml, iscsi_port, Some(size))
    }

    pub fn with_pool(name: &str, toml: String, iscsi_port: u16, size: Option<&str>) -> Node {
        let dir = scratch(name);
        let config = dir.join("node.toml");
        std::fs::write(&config, toml).unwrap();
        let _pool = size.map(|size| Tmpfs::mount(&dir.join("data"), size));
        let mut n = Node {
            child: None,
            config,
            dir,
            iscsi_port,
            _pool,
            _xfs: None,
        };
        n.start();
        n
    }

    /// A node whose data directory is a fresh XFS of `size_mib` (reflink: snapshots).
    pub fn on_xfs(name: &str, toml: String, iscsi_port: u16, size_mib: u64) -> Node {
        let dir = scratch(name);
        let config = dir.join("node.toml");
        std::fs::write(&config, toml).unwrap();
        let xfs = Xfs::mount(&dir.join("data"), size_mib);
        let mut n = Node {
            child: None,
            config,
            dir,
            iscsi_port,
            _pool: None,
            _xfs: Some(xfs),
        };
        n.start();
        n
    }

    pub fn pool(&self) -> &Tmpfs {
        self._pool.as_ref().expect("a node on a tmpfs")
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_twinsan"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_port(self.iscsi_port);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("iscsi://127.0.0.1:{}/{TARGET}/0", self.iscsi_port)
    }

    pub fn lun(&self) -> PathBuf {
        self.dir.join("data/lun0.img")
    }

    pub fn admin(&self, cmd: &str) -> String {
        let o = Command::new(env!("CARGO_BIN_EXE_twinsan"))
            .args(cmd.split_whitespace())
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap();
        text(&o)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn wait_port(port: u16) {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "port {port} never opened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `status` on `node` says the LUN is UpToDate and mirroring.
pub fn wait_in_sync(node: &Node, timeout: Duration) {
    let t = Instant::now();
    loop {
        let s = node.admin("status");
        let replica_up = s
            .lines()
            .filter(|l| l.starts_with("replica lun"))
            .all(|l| l.contains(": UpToDate"));
        if s.contains("connected, mirroring") && replica_up && s.contains("replica lun") {
            return;
        }
        if t.elapsed() >= timeout {
            let log = node.log();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            panic!("never got in sync: {s}\nlast log lines, newest first:\n{tail:#?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn same_bytes(a: &Path, b: &Path) -> bool {
    let o = Command::new("cmp").arg(a).arg(b).output().unwrap();
    o.status.success()
}
