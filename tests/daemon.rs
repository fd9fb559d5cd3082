//! The daemon end to end, driven by libiscsi's command-line tools.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::{text, tool, Daemon, TARGET};

#[test]
fn discovery_lists_the_target_and_inquiry_answers() {
    let d = Daemon::simple("discovery", "64MiB", "");
    let out = tool("iscsi-ls", &[&format!("iscsi://{}", d.addr)]);
    assert!(out.status.success(), "iscsi-ls failed: {}", text(&out));
    assert!(
        text(&out).contains(TARGET),
        "target not listed: {}",
        text(&out)
    );

    let out = tool("iscsi-inq", &[&d.url(0)]);
    assert!(out.status.success(), "iscsi-inq failed: {}", text(&out));
    let t = text(&out);
    assert!(t.contains("TWINSAN"), "vendor missing: {t}");
    // Each of those sessions logged out again: status counts open sessions only (the
    // daemon may take a moment to see the last connection close).
    let t = std::time::Instant::now();
    loop {
        let s = d.admin("status");
        if s.contains("sessions: 0") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "sessions left counted: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // VPD 0x80 and 0x83 carry the serial and the NAA designator.
    let out = tool("iscsi-inq", &["-e", "1", "-c", "131", &d.url(0)]);
    assert!(out.status.success(), "VPD 83 failed: {}", text(&out));
    assert!(
        text(&out).contains("Designator Type:(3) NAA"),
        "no NAA designator: {}",
        text(&out)
    );
}

#[test]
fn identity_is_stable_across_restarts() {
    let inq = |d: &Daemon| {
        let o = tool("iscsi-inq", &["-e", "1", "-c", "131", &d.url(0)]);
        assert!(o.status.success(), "{}", text(&o));
        let s = tool("iscsi-inq", &["-e", "1", "-c", "128", &d.url(0)]);
        assert!(s.status.success(), "{}", text(&s));
        (text(&o), text(&s))
    };
    let d = Daemon::simple("identity", "16MiB", "");
    let first = inq(&d);
    let dir = d.dir.clone();
    let keep = dir.with_extension("keep");
    let _ = std::fs::remove_dir_all(&keep);
    std::fs::create_dir_all(&keep).unwrap();
    std::fs::copy(dir.join("twinsan.toml"), keep.join("twinsan.toml")).unwrap();
    drop(d);
    let d2 = Daemon::start_in(keep);
    assert_eq!(first, inq(&d2), "NAA or serial changed across a restart");
}

#[test]
fn chap_one_way_refuses_wrong_secret_and_admits_the_right_one() {
    let d = Daemon::simple(
        "chap",
        "16MiB",
        "chap = { user = \"alice\", secret = \"correct-horse-battery\" }",
    );
    let good = format!("iscsi://alice%correct-horse-battery@{}/{TARGET}/0", d.addr);
    let bad = format!("iscsi://alice%wrong-horse-battery@{}/{TARGET}/0", d.addr);
    let none = d.url(0);
    let o = tool("iscsi-inq", &[&good]);
    assert!(
        o.status.success(),
        "right CHAP secret refused: {}",
        text(&o)
    );
    let o = tool("iscsi-inq", &[&bad]);
    assert!(
        !o.status.success(),
        "wrong CHAP secret admitted: {}",
        text(&o)
    );
    let o = tool("iscsi-inq", &[&none]);
    assert!(
        !o.status.success(),
        "login without CHAP admitted: {}",
        text(&o)
    );
}

#[test]
fn chap_mutual_authenticates_the_target_too() {
    let d = Daemon::simple(
        "mutual",
        "16MiB",
        "chap = { user = \"alice\", secret = \"correct-horse-battery\", mutual_user = \"tgt\", mutual_secret = \"target-secret-99\" }",
    );
    let ok = format!("iscsi://alice%correct-horse-battery@{}/{TARGET}/0?target_user=tgt&target_password=target-secret-99", d.addr);
    let o = tool("iscsi-inq", &[&ok]);
    assert!(o.status.success(), "mutual CHAP failed: {}", text(&o));
    // An initiator that expects a different target secret must reject the target.
    let wrong = format!("iscsi://alice%correct-horse-battery@{}/{TARGET}/0?target_user=tgt&target_password=not-the-secret", d.addr);
    let o = tool("iscsi-inq", &[&wrong]);
    assert!(
        !o.status.success(),
        "initiator accepted a target with the wrong mutual secret: {}",
        text(&o)
    );
    // The same with `twinsan bench` as the initiator.
    let url = format!("iscsi://alice%correct-horse-battery@{}/{TARGET}/0", d.addr);
    let run = |target_secret: &str| {
        common::bench(
            &url,
            &[
                "--rw",
                "randread",
                "--runtime",
                "0.5",
                "--target-user",
                "tgt",
                "--target-secret",
                target_secret,
            ],
        )
    };
    let o = run("target-secret-99");
    assert!(o.status.success(), "bench with mutual CHAP: {}", text(&o));
    let o = run("not-the-secret-at-all");
    assert!(
        !o.status.success() && text(&o).contains("mutual CHAP"),
        "bench accepted a target with the wrong mutual secret: {}",
        text(&o)
    );
}

#[test]
fn initiator_acl_refuses_strangers() {
    let d = Daemon::simple(
        "acl-iqn",
        "16MiB",
        "allowed_initiators = [\"iqn.2026-11.io.example:allowed\"]",
    );
    let o = tool(
        "iscsi-inq",
        &["-i", "iqn.2026-11.io.example:allowed", &d.url(0)],
    );
    assert!(
        o.status.success(),
        "allowed initiator refused: {}",
        text(&o)
    );
    let o = tool(
        "iscsi-inq",
        &["-i", "iqn.2026-11.io.example:stranger", &d.url(0)],
    );
    assert!(!o.status.success(), "stranger admitted: {}", text(&o));
    // Discovery lists the target only to initiators that may log in to it.
    let portal = format!("iscsi://{}", d.addr);
    let listed = |who: &str| text(&tool("iscsi-ls", &["-i", who, &portal])).contains(TARGET);
    assert!(listed("iqn.2026-11.io.example:allowed"));
    assert!(
        !listed("iqn.2026-11.io.example:stranger"),
        "SendTargets listed a target the initiator may not log in to"
    );
}

#[test]
fn address_acl_hides_and_refuses() {
    let d = Daemon::start(
        "acl-addr",
        &format!(
            "[[target]]\nname = \"{TARGET}\"\nallowed_addresses = [\"198.18.0.0/15\"]\n[[target.lun]]\nid = 0\npath = \"a.img\"\nsize = \"1MiB\"\n\
             [[target]]\nname = \"iqn.2026-11.io.twinsan:open\"\n[[target.lun]]\nid = 0\npath = \"b.img\"\nsize = \"1MiB\"\n"
        ),
    );
    let o = tool("iscsi-ls", &[&format!("iscsi://{}", d.addr)]);
    let t = text(&o);
    assert!(
        t.contains("iqn.2026-11.io.twinsan:open"),
        "open target not listed: {t}"
    );
    assert!(
        !t.contains(TARGET),
        "restricted target listed to a foreign address: {t}"
    );
    let o = tool("iscsi-inq", &[&d.url(0)]);
    assert!(
        !o.status.success(),
        "login from outside the address ACL admitted: {}",
        text(&o)
    );
}

#[test]
fn garbage_connection_does_not_disturb_other_sessions() {
    let mut d = Daemon::simple("garbage", "16MiB", "");
    // A connection that sends nonsense, one with an absurd data segment length, and one
    // that sends a valid-looking BHS with an unknown opcode after no login.
    for payload in [vec![0xffu8; 4096], {
        let mut b = vec![0u8; 48];
        b[0] = 0x43;
        b[5] = 0xff;
        b[6] = 0xff;
        b[7] = 0xff;
        b
    }] {
        let mut s = TcpStream::connect(&d.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&payload);
        // The target answers with a Reject or drops the connection; either way we move on.
        let mut buf = [0u8; 512];
        let _ = s.read(&mut buf);
    }
    assert!(d.is_running(), "daemon died on garbage");
    let o = tool("iscsi-inq", &[&d.url(0)]);
    assert!(
        o.status.success(),
        "daemon stopped serving after garbage: {}",
        text(&o)
    );
}

#[test]
fn bad_config_names_the_key_and_does_not_start() {
    let dir = common::scratch("badcfg");
    let f = dir.join("bad.toml");
    std::fs::write(&f, "[[target]]\nname = \"iqn.2026-11.x:a\"\n[[target.lun]]\nid = 0\npath = \"a.img\"\nsize = \"12 parsecs\"\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_twinsan"))
        .args(["serve", "--config"])
        .arg(&f)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("bad.toml") && t.contains("target[0].lun[0].size"),
        "{t}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_daemon_on_the_same_data_refuses_to_start() {
    let d = Daemon::simple("twice", "16MiB", "");
    let o = Command::new(env!("CARGO_BIN_EXE_twinsan"))
        .args(["serve", "--config"])
        .arg(d.dir.join("twinsan.toml"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&d.dir)
        .output()
        .unwrap();
    assert!(!o.status.success(), "second daemon started: {}", text(&o));
    let t = text(&o);
    assert!(t.contains("in use by another process"), "{t}");
    // The first one is untouched and still serves.
    let out = tool("iscsi-inq", &[&d.url(0)]);
    assert!(
        out.status.success(),
        "first daemon stopped serving: {}",
        text(&out)
    );
}

#[test]
fn a_second_daemon_on_a_busy_port_refuses_to_start() {
    let d = Daemon::simple("port-a", "16MiB", "");
    // Another data directory, the first daemon's address.
    let dir = common::scratch("port-b");
    std::fs::write(
        dir.join("twinsan.toml"),
        "[[target]]\nname = \"iqn.2026-11.io.twinsan:other\"\n[[target.lun]]\nid = 0\npath = \"b.img\"\nsize = \"16MiB\"\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_twinsan"))
        .args(["serve", "--config"])
        .arg(dir.join("twinsan.toml"))
        .args(["--listen", &d.addr, "--data-dir"])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It must exit on its own; one still running after 10 s serves beside the first.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&dir);
            panic!("second daemon started on a port already in use");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success(), "second daemon: {}", text(&o));
    assert!(text(&o).contains("address in use"), "{}", text(&o));
    let out = tool("iscsi-ls", &[&format!("iscsi://{}", d.addr)]);
    assert!(
        text(&out).contains(TARGET),
        "first daemon disturbed: {}",
        text(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_daemon_restarted_right_after_a_crash_serves_again() {
    // A killed daemon's io_uring keeps its listening sockets for a moment after the process
    // is gone; the restart must wait for them rather than fail with "address in use".
    let mut d = Daemon::simple("crash-restart", "16MiB", "");
    for _ in 0..3 {
        // Open connections too: their accept and receive requests sit in the ring.
        let _held = TcpStream::connect(&d.addr).unwrap();
        d.crash_and_restart();
        let out = tool("iscsi-inq", &[&d.url(0)]);
        assert!(out.status.success(), "after restart: {}", text(&out));
    }
}

#[test]
fn data_written_reads_back_and_lun_stays_sparse() {
    let d = Daemon::simple("rw", "1GiB", "");
    // iscsi-perf is a read-only load; use iscsi-dd from a file for writes when present,
    // else iscsi-test-cu's Write10.Simple which writes and reads back.
    let o = tool(
        "iscsi-test-cu",
        &[
            "-d",
            "-t",
            "ALL.Write10.Simple,ALL.Read10.Simple",
            &d.url(0),
        ],
    );
    assert!(text(&o).contains("Run Summary"), "{}", text(&o));
    assert!(!text(&o).contains("FAILED"), "{}", text(&o));
    // 1 GiB LUN, a few KiB written: still thin.
    let allocated = common::allocated_bytes(&d.dir.join("lun0.img"));
    assert!(
        allocated < 64 << 20,
        "LUN not sparse: {allocated} bytes allocated"
    );
}

/// RFC 7143 section 11.3.4: a write command with F = 1 says that no unsolicited Data-Out
/// follows, even where InitialR2T=No would allow it. An initiator may send part of its
/// first burst as immediate data and then wait: the target must solicit the rest with
/// R2Ts (here from byte 4096 on), not wait for data that will never come. Then
/// `twinsan bench` with ImmediateData=No sends the first burst as unsolicited Data-Out
/// with F = 0 on the command, and every block reads back.
#[test]
fn a_final_write_command_with_partial_immediate_data_is_solicited_by_r2t() {
    use benches::conn::rw16;
    use proto::pdu::{initiator, opcode};
    use std::time::Instant;
    let d = Daemon::simple("final-bit", "16MiB", "");
    let mut c = common::session_at(&d.addr, TARGET, "iqn.2026-11.io.twinsan:test-initiator", 2);
    assert!(
        !c.params.initial_r2t && c.params.immediate_data,
        "the target no longer negotiates InitialR2T=No with ImmediateData=Yes: {:?}",
        c.params
    );
    let data: Vec<u8> = (0..16384u32).map(|i| (i * 7 + 3) as u8).collect();
    let itt = 0x1234;
    let cdb = rw16(true, 64, 32);
    let b = initiator::scsi_command(
        c.lun,
        itt,
        c.cmd_sn,
        c.exp_stat_sn,
        false,
        true,
        16384,
        &cdb,
        4096,
    );
    c.cmd_sn = c.cmd_sn.wrapping_add(1);
    c.queue(&b, &data[..4096]);
    let deadline = Instant::now() + Duration::from_secs(5);
    c.flush_blocking(deadline).expect("send");
    let mut solicited = 4096u32;
    loop {
        let p = c
            .recv_blocking(deadline)
            .expect("the target neither solicited the rest of the data nor answered");
        match p.v.opcode {
            opcode::R2T => {
                let (off, len) = (p.v.buffer_offset, p.v.word44);
                assert_eq!(off, solicited, "R2T for data already sent");
                let out =
                    initiator::data_out(true, c.lun, itt, p.v.ttt, c.exp_stat_sn, 0, off, len);
                c.queue(&out, &data[off as usize..(off + len) as usize]);
                c.flush_blocking(deadline).expect("send");
                solicited += len;
            }
            opcode::SCSI_RESPONSE => {
                assert_eq!(p.v.status, 0, "the write failed");
                break;
            }
            op => panic!("unexpected PDU {op:#04x}"),
        }
    }
    assert_eq!(solicited, 16384, "GOOD before all data arrived");
    let r = c.command_sync(&rw16(false, 64, 32), 16384).expect("read");
    assert_eq!(r.status, 0);
    assert!(r.data == data, "the write did not land as sent");
    c.logout().expect("logout");

    let o = common::bench(
        &d.url(0),
        &[
            "--rw",
            "randrw",
            "--bs",
            "4k-256k",
            "--iodepth",
            "8",
            "--runtime",
            "2",
            "--verify",
            "--immediate-data",
            "no",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("0 mismatches"), "{}", text(&o));
}

/// MaxCmdSN opens as commands finish, not as they arrive: with `queue_depth = 4`, four
/// writes waiting for their data (R2T sent, no Data-Out yet) close the window, so an
/// initiator cannot pile up more commands (and their buffers) than the target allows.
/// Each answered command opens it by one again.
#[test]
fn the_command_window_counts_unfinished_commands() {
    use benches::conn::rw16;
    use proto::pdu::{initiator, opcode};
    use std::time::Instant;
    let d = Daemon::start(
        "window",
        &format!("[server]\nqueue_depth = 4\n[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"16MiB\"\n"),
    );
    let mut c = common::session_at(&d.addr, TARGET, "iqn.2026-11.io.twinsan:test-initiator", 3);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut r2ts = Vec::new();
    for i in 0..4u32 {
        assert!(c.window_open(), "the window closed after {i} commands");
        // F = 1 and no immediate data: the target solicits all 4 KiB by R2T.
        let b = initiator::scsi_command(
            c.lun,
            i,
            c.cmd_sn,
            c.exp_stat_sn,
            false,
            true,
            4096,
            &rw16(true, u64::from(i) * 8, 8),
            0,
        );
        c.cmd_sn = c.cmd_sn.wrapping_add(1);
        c.queue(&b, &[]);
    }
    c.flush_blocking(deadline).expect("send");
    while r2ts.len() < 4 {
        let p = c.recv_blocking(deadline).expect("R2T");
        assert_eq!(p.v.opcode, opcode::R2T, "expected an R2T");
        r2ts.push((p.v.itt, p.v.ttt));
    }
    assert!(
        !c.window_open(),
        "four unfinished commands left room for more (ExpCmdSN {}, MaxCmdSN {})",
        c.exp_cmd_sn,
        c.max_cmd_sn
    );
    // Answer the first R2T: its response reopens the window by one.
    let (itt, ttt) = r2ts[0];
    let out = initiator::data_out(true, c.lun, itt, ttt, c.exp_stat_sn, 0, 0, 4096);
    c.queue(&out, &[0x5a; 4096]);
    c.flush_blocking(deadline).expect("send");
    let p = c.recv_blocking(deadline).expect("response");
    assert_eq!((p.v.opcode, p.v.status), (opcode::SCSI_RESPONSE, 0));
    assert!(
        c.window_open(),
        "the window did not reopen after a command finished"
    );
}

/// Session reinstatement (RFC 7143 section 6.3.5): a login with the initiator name and
/// ISID of a live session (what open-iscsi, ESXi and Windows do when they reconnect after
/// a path failure) closes the old session at once, instead of leaving it to time out with
/// commands that could still land after the initiator retried them. A reservation the new
/// session takes survives the old session's end.
#[test]
fn a_login_with_a_live_sessions_isid_reinstates_it() {
    use std::time::Instant;
    let d = Daemon::simple("reinstate", "16MiB", "");
    let who = "iqn.2026-11.io.twinsan:test-initiator";
    let mut old = common::session_at(&d.addr, TARGET, who, 7);
    let mut new = common::session_at(&d.addr, TARGET, who, 7);
    // RESERVE(6) on the new session, before the old one is gone.
    let r = new
        .command_sync(&[0x16, 0, 0, 0, 0, 0], 0)
        .expect("RESERVE(6)");
    assert_eq!(r.status, 0, "RESERVE(6): {}", r.sense);
    let deadline = Instant::now() + Duration::from_secs(3);
    let closed = loop {
        match old.recv_blocking(deadline) {
            Err(e) => break !e.to_string().contains("timed out"),
            Ok(_) => continue,
        }
    };
    assert!(closed, "the reinstated session was not closed");
    std::thread::sleep(Duration::from_millis(500));
    // Another initiator meets the new session's reservation: it was not released.
    // (Logged in without `until_ready`: its TEST UNIT READY meets the reservation too.)
    let mut other =
        benches::conn::Conn::connect(&d.addr, benches::args::encode_lun(0)).expect("connect");
    other
        .login(
            "iqn.2026-11.io.twinsan:other",
            TARGET,
            [0x80, 9, 9, 9, 0, 1],
            false,
            None,
        )
        .expect("login");
    let read = benches::conn::rw16(false, 0, 1);
    let r = other.command_sync(&read, 512).expect("READ(16)");
    assert_eq!(r.status, 0x18, "the new session's reservation was lost");
    let r = new
        .command_sync(&[0x00, 0, 0, 0, 0, 0], 0)
        .expect("TUR on the new session");
    assert_eq!(r.status, 0, "the new session does not work: {}", r.sense);
}

/// A long SANITIZE shows its progress in `status`: percent, rate and time left, in the
/// human table and in `--json`.
#[test]
fn a_running_sanitize_shows_percent_rate_and_time_left_in_status() {
    // 384 MiB overwritten with a pattern at the sanitize's cap (128 MiB/s): about 3 s.
    let d = Daemon::simple("sanitize-progress", "384MiB", "");
    let mut c = common::session_at(&d.addr, TARGET, "iqn.2026-12.test:sanitize", 1);
    // SANITIZE (48h), OVERWRITE (01h), IMMED: one pass of a 4-byte pattern.
    let param = [0x01, 0x00, 0x00, 0x04, 0xde, 0xad, 0xbe, 0xef];
    let cdb = [0x48, 0x80 | 0x01, 0, 0, 0, 0, 0, 0, param.len() as u8, 0];
    let r = c.command_sync_data(&cdb, 0, &param).expect("SANITIZE");
    assert_eq!(r.status, 0, "SANITIZE refused");
    let started = std::time::Instant::now();
    let (mut table, mut json) = (None, None);
    while started.elapsed() < Duration::from_secs(20) && (table.is_none() || json.is_none()) {
        let s = d.admin("status");
        if let Some(l) = s.lines().find(|l| l.contains("Sanitizing ")) {
            table = Some(l.to_string());
        }
        let j: serde_json::Value =
            serde_json::from_slice(&d.cli(&["status", "--json"]).stdout).expect("JSON");
        if let Some(p) = j["luns"][0]["sanitize"].as_str() {
            json = Some(p.to_string());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let table = table.expect("no Sanitizing row with progress in status");
    assert!(
        table.contains("% ") && table.contains("MiB/s eta"),
        "{table}"
    );
    let json = json.expect("no sanitize progress in status --json");
    assert!(json.contains("MiB/s eta"), "{json}");
}
