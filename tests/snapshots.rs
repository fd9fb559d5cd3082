//! Snapshots: crash-consistent cuts under load, diff streams applied on another daemon,
//! rollback, a file system without reflink, and a pair (the same cut on both nodes, kept by
//! a failover, followed by a node that rejoins).

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pair::{node_toml, same_bytes, wait_in_sync, Node};
use common::{bench, scratch, session_at, text, Daemon, Xfs, TARGET};

/// One loop-mounted file system at a time is plenty on two cores, and the pair's timing
/// checks must not compete with another test's load.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A standalone daemon whose data directory is a fresh XFS, with one LUN of `size`.
struct XfsDaemon {
    d: Daemon,
    _fs: Xfs,
}

impl XfsDaemon {
    fn start(name: &str, size: &str) -> XfsDaemon {
        XfsDaemon::start_with(name, size, "")
    }

    /// With `extra` TOML after the target.
    fn start_with(name: &str, size: &str, extra: &str) -> XfsDaemon {
        let dir = scratch(name);
        let fs = Xfs::mount(&dir, 1024);
        std::fs::write(
            dir.join("twinsan.toml"),
            format!("[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"{size}\"\n{extra}"),
        )
        .unwrap();
        XfsDaemon {
            d: Daemon::start_in(dir),
            _fs: fs,
        }
    }

    /// `twinsan snapshot ARGS...` on this daemon: (success, output).
    fn snap(&self, args: &[&str]) -> (bool, String) {
        snapshot_cmd(&self.d.dir.join("twinsan.sock"), args)
    }

    fn lun(&self) -> PathBuf {
        self.d.dir.join("lun0.img")
    }

    /// Writes the first `size` of the LUN once (64 KiB writes), then takes snapshot `name`.
    fn fill_and_snapshot(&self, size: &str, name: &str) {
        let o = bench(
            &self.d.url(0),
            &["--rw", "write", "--bs", "64k", "--size", size, "--once"],
        );
        assert!(o.status.success(), "{}", text(&o));
        let (ok, out) = self.snap(&["create", &format!("{TARGET}/0"), name]);
        assert!(ok, "{out}");
    }
}

fn snapshot_cmd(socket: &Path, args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_twinsan"))
        .arg("snapshot")
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .unwrap();
    (o.status.success(), text(&o))
}

/// The path of a snapshot's clone, from `snapshot info` (the admin request).
fn clone_path(socket: &Path, lun: &str, name: &str) -> PathBuf {
    let reply = engine_request(socket, &format!("snapshot info {lun} {name}"));
    let path = reply
        .lines()
        .find_map(|l| l.strip_prefix("path "))
        .unwrap_or_else(|| panic!("no clone for {name}: {reply}"));
    PathBuf::from(path)
}

fn engine_request(socket: &Path, cmd: &str) -> String {
    engine::admin::request(socket, cmd).expect("reach the daemon's admin socket")
}

const BLOCK_BYTES: usize = 4096;
/// 4 KiB blocks each writer owns.
const BLOCKS_PER_WRITER: u64 = 2048;
/// Writers whose blocks interleave.
const WRITERS: u64 = 3;

/// Block `i` of writer `w`: the writers' blocks interleave, 32 KiB apart, over the first
/// 192 MiB, so that a clone made in pieces (snapshot/staging.rs, 8 MiB each) splits every
/// writer's blocks: a piece not cloned again where they went on breaks the writer's order.
fn block_of(w: u64, i: u64) -> u64 {
    (i * WRITERS + w) * 8
}

/// A block as the writers stamp it: writer, sequence number, block, then filler from them.
fn stamped(writer: u32, seq: u64, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_BYTES];
    b[..4].copy_from_slice(b"SNAP");
    b[4..8].copy_from_slice(&writer.to_le_bytes());
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..24].copy_from_slice(&block.to_le_bytes());
    for (i, x) in b[24..].iter_mut().enumerate() {
        *x = (seq as usize).wrapping_mul(31).wrapping_add(i) as u8;
    }
    b
}

/// (writer, seq, block) of a stamped block; None for zeros. Panics on anything else (a torn
/// or foreign block).
fn stamp_of(b: &[u8]) -> Option<(u32, u64, u64)> {
    if b.iter().all(|&x| x == 0) {
        return None;
    }
    assert_eq!(
        &b[..4],
        b"SNAP",
        "a block that is neither zeros nor a whole stamped write"
    );
    let w = u32::from_le_bytes(b[4..8].try_into().unwrap());
    let seq = u64::from_le_bytes(b[8..16].try_into().unwrap());
    let block = u64::from_le_bytes(b[16..24].try_into().unwrap());
    assert_eq!(b, &stamped(w, seq, block)[..], "a torn block");
    Some((w, seq, block))
}

/// One acknowledged write: its block, when it was sent and when its GOOD arrived.
#[derive(Clone, Copy)]
struct Done {
    seq: u64,
    block: u64,
    sent: Instant,
    acked: Instant,
}

/// Writers at queue depth 1 on their own blocks, each logging every write, until `stop`.
fn writer(addr: String, w: u32, stop: Arc<AtomicBool>) -> Vec<Done> {
    let mut c = session_at(
        &addr,
        TARGET,
        &format!("iqn.2026-12.test:writer{w}"),
        w as u8,
    );
    let mut log = Vec::new();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let block = block_of(u64::from(w), (seq * 7919) % BLOCKS_PER_WRITER);
        let data = stamped(w, seq, block);
        let cdb = benches::conn::rw16(true, block * 8, 8);
        let sent = Instant::now();
        let r = c.command_sync_data(&cdb, 0, &data).expect("write");
        assert_eq!(r.status, 0, "write {seq} failed: {}", r.sense);
        log.push(Done {
            seq,
            block,
            sent,
            acked: Instant::now(),
        });
    }
    log
}

/// Each snapshot holds, for every block, the last write acknowledged before its cut began
/// or a later one sent before the cut ended, never one sent after: the cut is a single
/// point in the write stream, even with writes in flight while it is taken.
#[test]
fn a_snapshot_under_load_holds_the_writes_acknowledged_before_its_cut() {
    let _g = serial();
    let d = XfsDaemon::start("snap-load", "256MiB");
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let (addr, stop) = (d.d.addr.clone(), stop.clone());
            std::thread::spawn(move || writer(addr, w, stop))
        })
        .collect();
    // Long enough for tens of thousands of scattered 4 KiB writes: a file of that many
    // extents takes a while to clone, and the writers go on meanwhile.
    std::thread::sleep(Duration::from_secs(3));
    let mut cuts = Vec::new();
    for i in 0..4 {
        let name = format!("load-{i}");
        let began = Instant::now();
        let (ok, out) = d.snap(&["create", &format!("{TARGET}/0"), &name]);
        let ended = Instant::now();
        assert!(ok, "{out}");
        cuts.push((name, began, ended));
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    let logs: Vec<Vec<Done>> = writers.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(logs.iter().all(|l| l.len() > 100), "the writers ran");
    let socket = d.d.dir.join("twinsan.sock");
    for (name, began, ended) in &cuts {
        let clone = std::fs::File::open(clone_path(&socket, &format!("{TARGET}/0"), name)).unwrap();
        let (mut inside, mut overwritten_later) = (0, 0);
        for (w, log) in logs.iter().enumerate() {
            for b in 0..BLOCKS_PER_WRITER {
                let block = block_of(w as u64, b);
                let mut buf = vec![0u8; BLOCK_BYTES];
                clone
                    .read_exact_at(&mut buf, block * BLOCK_BYTES as u64)
                    .unwrap();
                let held = stamp_of(&buf).map(|(sw, seq, sb)| {
                    assert_eq!(
                        (sw as usize, sb),
                        (w, block),
                        "{name}: a block of another writer"
                    );
                    seq
                });
                let must_hold = log
                    .iter()
                    .filter(|x| x.block == block && x.acked < *began)
                    .map(|x| x.seq)
                    .max();
                match (held, must_hold) {
                    (None, None) => {}
                    (None, Some(s)) => {
                        panic!("{name}: block {block} lost write {s}, acknowledged before the cut")
                    }
                    (Some(seq), m) => {
                        assert!(m.is_none_or(|m| seq >= m), "{name}: block {block} holds write {seq}, older than {m:?} acknowledged before the cut");
                        let x = log
                            .iter()
                            .find(|x| x.seq == seq)
                            .expect("a write the writer logged");
                        assert!(
                            x.sent < *ended,
                            "{name}: block {block} holds write {seq}, sent after the cut"
                        );
                        inside += 1;
                        // Not the block's final content: the writer went on after the cut,
                        // and the snapshot kept the older write.
                        if log.iter().any(|x| x.block == block && x.seq > seq) {
                            overwritten_later += 1;
                        }
                    }
                }
            }
        }
        assert!(
            inside > 100 && overwritten_later > 100,
            "{name}: the check saw the load ({inside} blocks, {overwritten_later} rewritten after the cut)"
        );
        // One point in each writer's stream: a writer at queue depth 1 sends a write only
        // after the one before it was acknowledged, so a snapshot that holds its write M
        // holds, in every block of its, the last write up to M (a clone staged before the
        // cut and not cloned again where the writers went on fails here).
        for (w, log) in logs.iter().enumerate() {
            let held = |block: u64| {
                let mut buf = vec![0u8; BLOCK_BYTES];
                clone
                    .read_exact_at(&mut buf, block * BLOCK_BYTES as u64)
                    .unwrap();
                stamp_of(&buf).map(|(_, seq, _)| seq)
            };
            let blocks = || (0..BLOCKS_PER_WRITER).map(|b| block_of(w as u64, b));
            let m = blocks().filter_map(held).max().unwrap_or(0);
            for block in blocks() {
                let expected = log
                    .iter()
                    .filter(|x| x.block == block && x.seq <= m)
                    .map(|x| x.seq)
                    .max();
                assert_eq!(
                    held(block),
                    expected,
                    "{name}: writer {w}'s block {block} is not at the snapshot's point (write {m})"
                );
            }
        }
    }
}

/// `diff` then `apply` on a third daemon reproduces each snapshot byte for byte; a stream
/// for a base that daemon lacks, or a damaged one, changes nothing.
#[test]
fn diff_and_apply_reproduce_snapshots_on_another_daemon() {
    let _g = serial();
    let a = XfsDaemon::start("snap-diff-a", "64MiB");
    let c = XfsDaemon::start("snap-diff-c", "64MiB");
    let lun = format!("{TARGET}/0");
    a.fill_and_snapshot("48m", "s1");
    // Between s1 and s2: 200 scattered 4 KiB writes and one 1 MiB UNMAP, all where s1
    // holds data.
    let mut sess = session_at(&a.d.addr, TARGET, "iqn.2026-12.test:diff", 1);
    for i in 0..200u64 {
        let lba = (i * 7919 % 12_000) * 8;
        let r = sess
            .command_sync_data(&benches::conn::rw16(true, lba, 8), 0, &[i as u8 | 1; 4096])
            .unwrap();
        assert_eq!(r.status, 0);
    }
    let unmap_lba = 40 << 11; // 40 MiB in 512-byte blocks
    let r = sess
        .command_sync_data(
            &benches::conn::unmap10(benches::conn::UNMAP_PARAM_BYTES as u16),
            0,
            &benches::conn::unmap_param_list(unmap_lba, 2048),
        )
        .unwrap();
    assert_eq!(r.status, 0, "UNMAP: {}", r.sense);
    sess.logout().unwrap();
    assert!(a.snap(&["create", &lun, "s2"]).0);
    let dir = scratch("snap-diff-streams");
    let (full, inc) = (dir.join("full.tsd"), dir.join("inc.tsd"));
    let (ok, out) = a.snap(&[
        "diff",
        &lun,
        "--to",
        "s1",
        "--output",
        full.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let (ok, out) = a.snap(&[
        "diff",
        &lun,
        "--from",
        "s1",
        "--to",
        "s2",
        "--output",
        inc.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    // Only what changed travels: the rewritten blocks as data (a block two writes hit
    // counts once), the unmapped MiB as one zero record.
    assert!(out.contains("1048576 zeroed bytes in 1 records"), "{out}");
    let data_bytes: u64 = out
        .split(" data bytes")
        .next()
        .and_then(|h| h.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(data_bytes <= 200 * 4096 && data_bytes > 190 * 4096, "{out}");
    let inc_bytes = std::fs::metadata(&inc).unwrap().len();
    assert!(
        inc_bytes < data_bytes + data_bytes / 20,
        "a stream of {inc_bytes} bytes for {data_bytes} changed"
    );
    // No base on C yet: refused, nothing changes.
    let (ok, out) = c.snap(&["apply", &lun, inc.to_str().unwrap()]);
    assert!(!ok && out.contains("does not hold"), "{out}");
    let (ok, out) = c.snap(&["apply", &lun, full.to_str().unwrap()]);
    assert!(ok, "{out}");
    let s1 = clone_path(&a.d.dir.join("twinsan.sock"), &lun, "s1");
    assert!(
        same_bytes(&c.lun(), &s1),
        "the full stream did not reproduce s1"
    );
    // A damaged stream is refused and leaves the LUN at its base.
    let mut bad = std::fs::read(&inc).unwrap();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    let bad_path = dir.join("bad.tsd");
    std::fs::write(&bad_path, &bad).unwrap();
    let (ok, out) = c.snap(&["apply", &lun, bad_path.to_str().unwrap()]);
    assert!(!ok && out.contains("checksum"), "{out}");
    assert!(
        same_bytes(&c.lun(), &s1),
        "a refused stream changed the LUN"
    );
    let (ok, out) = c.snap(&["apply", &lun, inc.to_str().unwrap()]);
    assert!(ok, "{out}");
    let s2 = clone_path(&a.d.dir.join("twinsan.sock"), &lun, "s2");
    assert!(
        same_bytes(&c.lun(), &s2),
        "s1 + the incremental stream is not s2"
    );
    let c_s2 = clone_path(&c.d.dir.join("twinsan.sock"), &lun, "s2");
    assert!(same_bytes(&c_s2, &s2), "C's snapshot s2 differs from A's");
    // Holes stay holes: the unmapped MiB is a hole in C's LUN, not written zeros.
    let f = std::fs::File::open(c.lun()).unwrap();
    // SAFETY: lseek on an fd we own; no memory is passed.
    let next_data = unsafe {
        libc::lseek(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            40 << 20,
            libc::SEEK_DATA,
        )
    };
    assert!(
        !(0..41 << 20).contains(&next_data),
        "data at {next_data} inside the unmapped MiB"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rollback brings back the snapshot's bytes; it is refused while an initiator is logged
/// in (its cache would disagree), unless forced.
#[test]
fn rollback_restores_the_snapshot_and_waits_for_initiators_to_leave() {
    let _g = serial();
    let d = XfsDaemon::start("snap-rollback", "64MiB");
    let lun = format!("{TARGET}/0");
    let write = |c: &mut benches::conn::Conn, byte: u8| {
        let r = c
            .command_sync_data(&benches::conn::rw16(true, 64, 8), 0, &[byte; 4096])
            .unwrap();
        assert_eq!(r.status, 0);
    };
    let read = |c: &mut benches::conn::Conn| {
        c.command_sync(&benches::conn::rw16(false, 64, 8), 4096)
            .unwrap()
            .data
    };
    let mut c = session_at(&d.d.addr, TARGET, "iqn.2026-12.test:rb", 1);
    write(&mut c, 0xAA);
    assert!(d.snap(&["create", &lun, "before"]).0);
    write(&mut c, 0xBB);
    let (ok, out) = d.snap(&["rollback", &lun, "before"]);
    assert!(!ok && out.contains("logged in"), "{out}");
    c.logout().unwrap();
    let (ok, out) = d.snap(&["rollback", &lun, "before"]);
    assert!(ok, "{out}");
    let mut c = session_at(&d.d.addr, TARGET, "iqn.2026-12.test:rb", 2);
    assert_eq!(read(&mut c), vec![0xAA; 4096]);
    // The snapshot is still there, and writes go on after the rollback.
    write(&mut c, 0xCC);
    assert_eq!(read(&mut c), vec![0xCC; 4096]);
    let (ok, out) = d.snap(&["list"]);
    assert!(ok && out.contains("before"), "{out}");
    let (ok, out) = d.snap(&["delete", &lun, "before"]);
    assert!(ok, "{out}");
    let (_, out) = d.snap(&["list"]);
    assert!(!out.contains("before"), "{out}");
}

/// Where the file system cannot clone (this machine's ext4), a snapshot is refused with
/// the reason, and I/O goes on.
#[test]
fn a_file_system_without_reflink_refuses_snapshots_with_the_reason() {
    let _g = serial();
    let d = Daemon::simple("snap-ext4", "16MiB", "");
    let (ok, out) = snapshot_cmd(
        &d.dir.join("twinsan.sock"),
        &["create", &format!("{TARGET}/0"), "x"],
    );
    assert!(!ok && out.contains("cannot clone files"), "{out}");
    let (ok, out) = snapshot_cmd(&d.dir.join("twinsan.sock"), &["create", "nosuch/0", "x"]);
    assert!(!ok && out.contains("no target"), "{out}");
    let (ok, out) = snapshot_cmd(
        &d.dir.join("twinsan.sock"),
        &["create", &format!("{TARGET}/0"), "../x"],
    );
    assert!(!ok && out.contains("snapshot name"), "{out}");
    let (_, out) = snapshot_cmd(&d.dir.join("twinsan.sock"), &["list"]);
    assert_eq!(out.lines().count(), 2, "ok and the header only: {out}");
    let o = bench(&d.url(0), &["--rw", "write", "--size", "4m", "--once"]);
    assert!(o.status.success(), "{}", text(&o));
}

/// A pair: the snapshot is cut at the same write on both nodes (their clones are identical
/// although a load ran), a rollback reaches the secondary, the promoted secondary lists and
/// serves the same snapshots after the primary is killed, and the old primary, rejoining,
/// follows the new primary's list.
const PAIR_PSK: &str = "pair-test-psk-0123456789";

/// A pair (`NAME-a` primary, `NAME-b` secondary), each on its own XFS with one 64 MiB LUN,
/// in sync; and a's iSCSI port and both replica ports (to write a's config again).
fn xfs_pair(name: &str) -> (Node, Node, [u16; 3]) {
    let [ia, ib, ra, rb] = common::free_ports();
    let b = Node::on_xfs(
        &format!("{name}-b"),
        node_toml(ib, rb, ra, "secondary", PAIR_PSK, "64MiB"),
        ib,
        512,
    );
    let a = Node::on_xfs(
        &format!("{name}-a"),
        node_toml(ia, ra, rb, "primary", PAIR_PSK, "64MiB"),
        ia,
        512,
    );
    wait_in_sync(&a, Duration::from_secs(20));
    (a, b, [ia, ra, rb])
}

#[test]
fn a_pair_cuts_at_the_same_write_on_both_nodes_and_keeps_it_through_a_failover() {
    let _g = serial();
    let (mut a, mut b, [ia, ra, rb]) = xfs_pair("snap-pair");
    let lun = format!("{}/0", common::pair::TARGET);
    let load_url = a.url();
    let load = std::thread::spawn(move || {
        bench(
            &load_url,
            &[
                "--rw",
                "randwrite",
                "--iodepth",
                "8",
                "--size",
                "32m",
                "--runtime",
                "3",
            ],
        )
    });
    std::thread::sleep(Duration::from_millis(800));
    let out = a.admin(&format!("snapshot create {lun} under-load"));
    assert!(out.starts_with("ok"), "{out}");
    let o = load.join().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = a.admin(&format!("snapshot create {lun} quiet"));
    assert!(out.starts_with("ok"), "{out}");
    let clones = |n: &Node, name: &str| clone_path(&n.dir.join("data/twinsan.sock"), &lun, name);
    for name in ["under-load", "quiet"] {
        assert!(
            same_bytes(&clones(&a, name), &clones(&b, name)),
            "{name}: the nodes cut at different writes"
        );
    }
    // Rollback reaches the secondary: both live copies equal the snapshot.
    let o = bench(&a.url(), &["--rw", "write", "--size", "8m", "--once"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = a.admin(&format!("snapshot rollback {lun} under-load"));
    assert!(out.starts_with("ok") && !out.contains("could not"), "{out}");
    assert!(same_bytes(&a.lun(), &clones(&a, "under-load")));
    assert!(
        same_bytes(&b.lun(), &clones(&a, "under-load")),
        "the secondary did not roll back"
    );
    // Failover: the primary dies, the secondary is promoted and has every snapshot.
    a.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    let out = b.admin("promote");
    assert!(out.starts_with("ok"), "{out}");
    let listed = b.admin("snapshot list");
    assert!(
        listed.contains("under-load") && listed.contains("quiet"),
        "{listed}"
    );
    // The new primary deletes one while the old primary is away; the old one rejoins as
    // secondary and follows.
    let out = b.admin(&format!("snapshot delete {lun} quiet"));
    assert!(out.starts_with("ok"), "{out}");
    std::fs::write(
        &a.config,
        node_toml(ia, ra, rb, "secondary", PAIR_PSK, "64MiB"),
    )
    .unwrap();
    a.start();
    wait_in_sync(&b, Duration::from_secs(30));
    let t = Instant::now();
    loop {
        let listed = a.admin("snapshot list");
        if !listed.contains("quiet") {
            assert!(listed.contains("under-load"), "{listed}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the rejoined node kept a deleted snapshot: {listed}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    b.kill9();
}

/// A stream applied to a pair's primary reaches the secondary: both nodes go back to the
/// base, hold the stream's data and its snapshot, and keep it through a failover (the DR
/// site of a ship is often a pair itself).
#[test]
fn a_stream_applied_on_a_pair_reaches_both_nodes_and_survives_a_failover() {
    let _g = serial();
    let src = XfsDaemon::start("snap-pair-apply-src", "64MiB");
    let src_lun = format!("{TARGET}/0");
    src.fill_and_snapshot("40m", "s1");
    let o = bench(
        &src.d.url(0),
        &["--rw", "randwrite", "--size", "48m", "--runtime", "1"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(src.snap(&["create", &src_lun, "s2"]).0);
    let dir = scratch("snap-pair-apply-streams");
    let (full, inc) = (dir.join("full.tsd"), dir.join("inc.tsd"));
    for (from, to, path) in [(None, "s1", &full), (Some("s1"), "s2", &inc)] {
        let mut args = vec!["diff", &src_lun];
        if let Some(f) = from {
            args.extend(["--from", f]);
        }
        args.extend(["--to", to, "--output", path.to_str().unwrap()]);
        let (ok, out) = src.snap(&args);
        assert!(ok, "{out}");
    }
    let src_clone = |name: &str| clone_path(&src.d.dir.join("twinsan.sock"), &src_lun, name);

    let (mut a, mut b, _) = xfs_pair("snap-pair-apply");
    let lun = format!("{}/0", common::pair::TARGET);
    // Something the full stream must replace on both nodes.
    let o = bench(&a.url(), &["--rw", "write", "--size", "8m", "--once"]);
    assert!(o.status.success(), "{}", text(&o));
    // The secondary refuses: streams are applied where the writes are ordered.
    let out = b.admin(&format!("snapshot apply {lun} {}", full.display()));
    assert!(!out.starts_with("ok") && out.contains("primary"), "{out}");
    let clones = |n: &Node, name: &str| clone_path(&n.dir.join("data/twinsan.sock"), &lun, name);
    for (path, name) in [(&full, "s1"), (&inc, "s2")] {
        let out = a.admin(&format!("snapshot apply {lun} {}", path.display()));
        assert!(
            out.starts_with("ok") && out.contains("the peer holds it too"),
            "{out}"
        );
        for (n, node) in [("primary", &a), ("secondary", &b)] {
            assert!(
                same_bytes(&node.lun(), &src_clone(name)),
                "after applying {name}: the {n}'s LUN differs from the source's snapshot"
            );
            assert!(
                same_bytes(&clones(node, name), &src_clone(name)),
                "the {n}'s snapshot {name} differs from the source's"
            );
        }
    }
    // The pair is still mirroring: a write now reaches the secondary.
    let o = bench(&a.url(), &["--rw", "write", "--size", "1m", "--once"]);
    assert!(o.status.success(), "{}", text(&o));
    wait_in_sync(&a, Duration::from_secs(20));
    // Failover: the secondary serves with both snapshots, and the next stream of the chain
    // would find its base there.
    a.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    let out = b.admin("promote");
    assert!(out.starts_with("ok"), "{out}");
    let listed = b.admin("snapshot list");
    assert!(listed.contains("s1") && listed.contains("s2"), "{listed}");
    b.kill9();
    let _ = std::fs::remove_dir_all(&dir);
}

/// VPD page 0x83's NAA designator (raw bytes, as `iscsi-inq` prints them: the last
/// designator) and page 0x80's serial.
fn identity(url: &str) -> (Vec<u8>, String) {
    let o = common::tool("iscsi-inq", &["-e", "1", "-c", "131", url]);
    let page83 = &o.stdout;
    let marker = b"Designator Type:(3) NAA\nDesignator:[";
    let at = page83
        .windows(marker.len())
        .position(|w| w == marker)
        .unwrap_or_else(|| panic!("no NAA designator from {url}: {}", text(&o)));
    let naa = page83[at + marker.len()..].to_vec();
    let serial = text(&common::tool("iscsi-inq", &["-e", "1", "-c", "128", url]));
    let serial = serial
        .lines()
        .find(|l| l.starts_with("Unit Serial Number"))
        .unwrap_or_else(|| panic!("no serial: {serial}"))
        .to_string();
    assert!(naa.len() >= 8, "a short NAA designator");
    (naa, serial)
}

/// An exported snapshot is a read-only LUN with its own NAA and serial (ESXi must see a
/// copy of the volume, not another path to it) holding the snapshot's bytes; writes get
/// DATA PROTECT / WRITE PROTECTED; the snapshot cannot be deleted while exported.
#[test]
fn an_exported_snapshot_is_a_read_only_copy_with_its_own_identity() {
    let _g = serial();
    let d = XfsDaemon::start("snap-export", "64MiB");
    let lun = format!("{TARGET}/0");
    let mut c = session_at(&d.d.addr, TARGET, "iqn.2026-12.test:ex", 1);
    let w = c
        .command_sync_data(&benches::conn::rw16(true, 0, 8), 0, &[0x5A; 4096])
        .unwrap();
    assert_eq!(w.status, 0);
    assert!(d.snap(&["create", &lun, "for-dr"]).0);
    let w = c
        .command_sync_data(&benches::conn::rw16(true, 0, 8), 0, &[0x33; 4096])
        .unwrap();
    assert_eq!(w.status, 0);
    let export_target = "iqn.2026-12.io.twinsan:dr-copy";
    let o = Command::new(env!("CARGO_BIN_EXE_twinsan"))
        .args([
            "snapshot",
            "export",
            &lun,
            "for-dr",
            "--as",
            &format!("{export_target}/0"),
        ])
        .arg("--config")
        .arg(d.d.dir.join("twinsan.toml"))
        .arg("--socket")
        .arg(d.d.dir.join("twinsan.sock"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let exported = format!("iscsi://{}/{export_target}/0", d.d.addr);
    let source = d.d.url(0);
    let (naa_e, serial_e) = identity(&exported);
    let (naa_s, serial_s) = identity(&source);
    assert_ne!(naa_e, naa_s, "the export reuses the source's NAA");
    assert_ne!(serial_e, serial_s, "the export reuses the source's serial");
    let mut e = session_at(&d.d.addr, export_target, "iqn.2026-12.test:ex", 2);
    let r = e
        .command_sync(&benches::conn::rw16(false, 0, 8), 4096)
        .unwrap();
    assert_eq!(
        r.data,
        vec![0x5A; 4096],
        "the export holds the snapshot's bytes"
    );
    let w = e
        .command_sync_data(&benches::conn::rw16(true, 0, 8), 0, &[1; 4096])
        .unwrap();
    assert_eq!(w.status, 2, "a write to the export must fail");
    assert!(
        w.sense.contains("DATA PROTECT ASC/ASCQ 27/00"),
        "{}",
        w.sense
    );
    let (ok, out) = d.snap(&["delete", &lun, "for-dr"]);
    assert!(!ok && out.contains("exported"), "{out}");
    // The source kept its own, newer data.
    let r = c
        .command_sync(&benches::conn::rw16(false, 0, 8), 4096)
        .unwrap();
    assert_eq!(r.data, vec![0x33; 4096]);
}

/// On a pair each node exports its own clone of the snapshot (the same bytes: the cut was
/// at one write on both), under the same identity, without asking the peer and without
/// becoming part of the pair; after a failover the survivor serves it.
#[test]
fn each_node_of_a_pair_exports_its_clone_and_the_survivor_serves_it() {
    let _g = serial();
    let (mut a, mut b, _) = xfs_pair("snap-pair-export");
    let lun = format!("{}/0", common::pair::TARGET);
    let addr = |n: &Node| format!("127.0.0.1:{}", n.iscsi_port);
    let mut c = session_at(&addr(&a), common::pair::TARGET, "iqn.2026-12.test:pex", 1);
    let w = c
        .command_sync_data(&benches::conn::rw16(true, 0, 8), 0, &[0x5A; 4096])
        .unwrap();
    assert_eq!(w.status, 0);
    let out = a.admin(&format!("snapshot create {lun} for-dr"));
    assert!(out.starts_with("ok"), "{out}");
    let w = c
        .command_sync_data(&benches::conn::rw16(true, 0, 8), 0, &[0x33; 4096])
        .unwrap();
    assert_eq!(w.status, 0);
    drop(c);
    let export = "iqn.2026-12.io.twinsan:pair-dr-copy";
    for n in [&b, &a] {
        let out = n.admin(&format!("snapshot export {lun} for-dr --as {export}/0"));
        assert!(!out.contains("rror") && !out.contains("refused"), "{out}");
    }
    // Not the pair's: the pair stays in sync, status shows no state for the export, and
    // no replication record is written beside the clone it serves.
    wait_in_sync(&a, Duration::from_secs(20));
    let status = a.admin("status");
    assert_eq!(status.matches("replica lun ").count(), 1, "{status}");
    for n in [&a, &b] {
        let clone = clone_path(&n.dir.join("data/twinsan.sock"), &lun, "for-dr");
        for sidecar in [".meta", ".running"] {
            let mut p = clone.clone().into_os_string();
            p.push(sidecar);
            assert!(!PathBuf::from(&p).exists(), "{p:?} written");
        }
    }
    // Served by the primary only (the secondary's LUNs are in standby, as ALUA says).
    let url = |n: &Node| format!("iscsi://{}/{export}/0", addr(n));
    let served_by_a = identity(&url(&a));
    let read_export = |n: &Node| {
        let mut e = session_at(&addr(n), export, "iqn.2026-12.test:pex", 2);
        let r = e
            .command_sync(&benches::conn::rw16(false, 0, 8), 4096)
            .unwrap();
        r.data
    };
    assert_eq!(read_export(&a), vec![0x5A; 4096]);
    a.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    let out = b.admin("promote");
    assert!(out.starts_with("ok"), "{out}");
    assert_eq!(
        read_export(&b),
        vec![0x5A; 4096],
        "the survivor's export does not hold the snapshot's bytes"
    );
    assert_eq!(
        identity(&url(&b)),
        served_by_a,
        "the nodes export the snapshot under different identities"
    );
    let mut c = session_at(&addr(&b), common::pair::TARGET, "iqn.2026-12.test:pex", 3);
    let r = c
        .command_sync(&benches::conn::rw16(false, 0, 8), 4096)
        .unwrap();
    assert_eq!(r.data, vec![0x33; 4096], "the LUN itself lost a write");
    b.kill9();
}

/// Names of the LUN's snapshots, from `snapshot list`.
fn names(d: &XfsDaemon) -> Vec<String> {
    let (ok, out) = d.snap(&["list"]);
    assert!(ok, "{out}");
    out.lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(20), "{what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A schedule takes its first snapshot at once, keeps `keep` of its own (the oldest go,
/// other names stay), shows in `status`, and follows a reload; a bad schedule is refused
/// with its key and value.
#[test]
fn schedules_take_snapshots_keep_the_newest_and_follow_a_reload() {
    let _g = serial();
    let schedule = format!(
        "[[snapshot_schedule]]\nluns = \"{TARGET}\"\nname = \"hourly\"\nevery = \"1h\"\nkeep = 2\n"
    );
    let d = XfsDaemon::start_with("snap-schedule", "16MiB", &schedule);
    wait_for("the first scheduled snapshot", || {
        names(&d).iter().any(|n| n.starts_with("hourly-"))
    });
    let first = names(&d)
        .into_iter()
        .find(|n| n.starts_with("hourly-"))
        .unwrap();
    let lun = format!("{TARGET}/0");
    for extra in ["hourly-b", "hourly-c", "manual"] {
        std::thread::sleep(Duration::from_millis(1100));
        assert!(d.snap(&["create", &lun, extra]).0);
    }
    wait_for("retention deleted the oldest", || {
        !names(&d).contains(&first)
    });
    let left = names(&d);
    assert_eq!(
        left.iter().filter(|n| n.starts_with("hourly-")).count(),
        2,
        "{left:?}"
    );
    assert!(
        left.contains(&"manual".to_string()),
        "another name is not the schedule's: {left:?}"
    );
    let status = engine_request(&d.d.dir.join("twinsan.sock"), "status");
    assert!(
        status.contains("SNAPSHOTS") && status.contains("3, newest"),
        "{status}"
    );
    // A reload adds a schedule: its first snapshot comes.
    let config = d.d.dir.join("twinsan.toml");
    let mut file = std::fs::read_to_string(&config).unwrap();
    file.push_str(&format!(
        "[[snapshot_schedule]]\nluns = \"{TARGET}/0\"\nname = \"daily\"\nevery = \"1d\"\nkeep = 7\n"
    ));
    std::fs::write(&config, &file).unwrap();
    let reply = engine_request(&d.d.dir.join("twinsan.sock"), "reload");
    assert!(reply.starts_with("ok"), "{reply}");
    wait_for("the reloaded schedule's snapshot", || {
        names(&d).iter().any(|n| n.starts_with("daily-"))
    });
    // Refused with key and value.
    std::fs::write(&config, file.replace("every = \"1d\"", "every = \"10s\"")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_twinsan"))
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let out = text(&o);
    assert!(
        !o.status.success() && out.contains("snapshot_schedule[1].every") && out.contains("10s"),
        "{out}"
    );
}

/// `snapshot ship` sends a snapshot to another daemon, authenticated; cut off half-way it
/// resumes where the receiver stopped; an incremental ship follows; a wrong key changes
/// nothing.
#[test]
fn ship_sends_snapshots_to_another_daemon_and_resumes_after_a_cut() {
    let _g = serial();
    let a = XfsDaemon::start("snap-ship-a", "64MiB");
    let port = common::free_port();
    let psk = "ship-test-psk-0123456789";
    let c = XfsDaemon::start_with(
        "snap-ship-c",
        "64MiB",
        &format!("[snapshot_receive]\nlisten = \"127.0.0.1:{port}\"\npsk = \"{psk}\"\n"),
    );
    let lun = format!("{TARGET}/0");
    a.fill_and_snapshot("48m", "s1");
    let keys = scratch("snap-ship-keys");
    let (good, bad) = (keys.join("good"), keys.join("bad"));
    std::fs::write(&good, format!("{psk}\n")).unwrap();
    std::fs::write(&bad, "not-the-key-0123456789\n").unwrap();
    let command = |key: &Path, args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_twinsan"));
        c.args(["snapshot", "ship", &lun, "--to"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--psk-file")
            .arg(key)
            .args(args)
            .arg("--socket")
            .arg(a.d.dir.join("twinsan.sock"));
        c
    };
    let ship_done = |args: &[&str]| {
        let o = command(&good, args).output().unwrap();
        let out = text(&o);
        assert!(o.status.success(), "{out}");
        out
    };
    // Bytes that are no sender (junk, then a forged proof) are dropped; the receiver goes on.
    for junk in [vec![0x5au8; 200], vec![1u8; 32 + 32]] {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&junk);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(
            !String::from_utf8_lossy(&rest).contains("HAVE"),
            "junk was served"
        );
    }
    let ok = command(&bad, &["--snapshot", "s1"])
        .status()
        .unwrap()
        .success();
    assert!(!ok, "a wrong key must be refused");
    // Cut off: at 8 MiB/s the 48 MiB stream takes 6 s; killed after 2.
    let mut slow = command(&good, &["--snapshot", "s1", "--rate", "8m"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    slow.kill().unwrap();
    let _ = slow.wait();
    let out = ship_done(&["--snapshot", "s1"]);
    let resumed: u64 = out
        .split("resumed at byte ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not resumed: {out}"));
    assert!(resumed > 4 << 20, "resumed at {resumed}: {out}");
    let s1 = clone_path(&a.d.dir.join("twinsan.sock"), &lun, "s1");
    assert!(same_bytes(&c.lun(), &s1), "the shipped LUN differs from s1");
    // Incremental.
    let mut sess = session_at(&a.d.addr, TARGET, "iqn.2026-12.test:ship", 1);
    for i in 0..50u64 {
        let r = sess
            .command_sync_data(
                &benches::conn::rw16(true, (i * 997 % 12_000) * 8, 8),
                0,
                &[i as u8 | 0x80; 4096],
            )
            .unwrap();
        assert_eq!(r.status, 0);
    }
    sess.logout().unwrap();
    assert!(a.snap(&["create", &lun, "s2"]).0);
    ship_done(&["--from", "s1", "--snapshot", "s2"]);
    let s2 = clone_path(&a.d.dir.join("twinsan.sock"), &lun, "s2");
    assert!(
        same_bytes(&c.lun(), &s2),
        "s1 + the shipped increment is not s2"
    );
    let (_, listed) = c.snap(&["list"]);
    assert!(listed.contains("s1") && listed.contains("s2"), "{listed}");
    let _ = std::fs::remove_dir_all(&keys);
}

/// The committed snapshot names `snapshot list` shows on a node.
fn listed_on(n: &Node) -> Vec<String> {
    let out = n.admin("snapshot list");
    assert!(out.starts_with("ok"), "{out}");
    let mut v: Vec<String> = out
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect();
    v.sort();
    v
}

/// 2 s of random writes on `n`'s LUN on a thread, started 0.5 s ago when this returns.
fn under_load(n: &Node) -> std::thread::JoinHandle<std::process::Output> {
    let url = n.url();
    let load = std::thread::spawn(move || {
        bench(
            &url,
            &["--rw", "randwrite", "--size", "16m", "--runtime", "2"],
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    load
}

/// The primary is killed at several points of a cut (a snapshot being created under load);
/// the secondary is promoted, and the old primary rejoins as secondary: each time both
/// nodes end with the same snapshots (the interrupted one whole on both, or on neither),
/// and every snapshot both hold has the same bytes on both.
#[test]
fn a_failover_in_the_middle_of_a_cut_leaves_the_snapshot_whole_on_both_nodes_or_on_neither() {
    let _g = serial();
    let [ia, ib, ra, rb] = common::free_ports();
    let toml =
        |i: u16, me: u16, peer: u16, role: &str| node_toml(i, me, peer, role, PAIR_PSK, "64MiB");
    let mut b = Node::on_xfs("snap-cutfail-b", toml(ib, rb, ra, "secondary"), ib, 512);
    let mut a = Node::on_xfs("snap-cutfail-a", toml(ia, ra, rb, "primary"), ia, 512);
    wait_in_sync(&a, Duration::from_secs(20));
    let lun = format!("{}/0", common::pair::TARGET);
    // How long a cut takes under this load here (mostly the write-back ahead of it): the
    // kills land at fractions of it, most near its end where the clones and commits are.
    let load = under_load(&a);
    let took = {
        let t = Instant::now();
        let out = a.admin(&format!("snapshot create {lun} warm-up"));
        assert!(out.starts_with("ok"), "{out}");
        t.elapsed().as_millis() as u64
    };
    let _ = load.join();
    let delays: Vec<u64> = [50, 80, 90, 95, 100, 110]
        .iter()
        .map(|p| took * p / 100)
        .collect();
    // (victim, survivor) alternate: each round kills the primary of the previous one.
    for (round, delay_ms) in delays.into_iter().enumerate() {
        let (primary, secondary, p_ports, s_ports) = if round % 2 == 0 {
            (&mut a, &mut b, (ia, ra, rb), (ib, rb, ra))
        } else {
            (&mut b, &mut a, (ib, rb, ra), (ia, ra, rb))
        };
        let load = under_load(primary);
        let name = format!("cut-{round}");
        let cmd = Command::new(env!("CARGO_BIN_EXE_twinsan"))
            .args(["snapshot", "create", &lun, &name, "--config"])
            .arg(&primary.config)
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        primary.kill9();
        let _ = load.join();
        let _ = cmd.wait_with_output();
        // The survivor takes over once it notices the link is gone.
        let t = Instant::now();
        loop {
            let out = secondary.admin("promote");
            if out.starts_with("ok") {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "promotion refused: {out}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        let on_survivor = listed_on(secondary);
        eprintln!(
            "round {round}: killed {delay_ms} ms into the cut; the survivor holds {name}: {}",
            on_survivor.contains(&name)
        );
        // The victim rejoins as secondary.
        let (i, me, peer) = p_ports;
        std::fs::write(&primary.config, toml(i, me, peer, "secondary")).unwrap();
        primary.start();
        let _ = s_ports;
        wait_in_sync(secondary, Duration::from_secs(30));
        let t = Instant::now();
        while listed_on(primary) != on_survivor {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "round {round}: the nodes hold different snapshots: {:?} vs {on_survivor:?}",
                listed_on(primary)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        for n in &on_survivor {
            let pa = clone_path(&primary.dir.join("data/twinsan.sock"), &lun, n);
            let pb = clone_path(&secondary.dir.join("data/twinsan.sock"), &lun, n);
            assert!(
                same_bytes(&pa, &pb),
                "round {round}: snapshot {n} differs between the nodes"
            );
        }
    }
}

/// What makes a diff read only the change: the extent maps of a file and its reflink clone
/// (FIEMAP) say they share every block, until one is written, and then all but that block.
#[test]
fn a_clone_shares_every_block_with_its_file_until_one_is_written() {
    use engine::disk::fiemap::{extents, mapped_alike, shared};
    let dir = scratch("fiemap");
    let _fs = Xfs::mount(&dir, 320);
    let (a, b) = (dir.join("a"), dir.join("b"));
    std::fs::write(&a, vec![7u8; 8 << 20]).unwrap();
    let fa = std::fs::File::open(&a).unwrap();
    let fb = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&b)
        .unwrap();
    engine::snapshot::reflink::clone_file(&fa, &fb).expect("XFS clones");
    let size = 8 << 20;
    let both = || shared(&extents(&fa, size).unwrap(), &extents(&fb, size).unwrap());
    assert_eq!(both(), vec![(0, size)]);
    assert!(
        mapped_alike(&fa, &fb, size),
        "a fresh clone maps as its file"
    );
    // The same bytes written again still break it: the block is no longer shared (what
    // tells an applied stream's LUN written since from one that was not).
    fb.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
    fb.sync_all().unwrap();
    assert_eq!(both(), vec![(0, 1 << 20), ((1 << 20) + 4096, size)]);
    assert!(!mapped_alike(&fa, &fb, size));
}
