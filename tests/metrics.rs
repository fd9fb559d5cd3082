//! The Prometheus endpoint: what `twinsan bench` did shows in the counters, and the page
//! passes `promtool check metrics` (when promtool is installed: Debian's `prometheus`).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use common::{bench, text, Daemon, TARGET};

/// The page at `addr`'s `/metrics`, without the HTTP head.
fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send the request");
    let mut page = String::new();
    s.read_to_string(&mut page).expect("read the answer");
    let (head, body) = page.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The value of the sample whose line starts with `series` (name and labels).
fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{page}"))
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad value of {series}"))
}

#[test]
fn the_counters_match_what_the_initiator_did() {
    let port = common::free_port();
    let d = Daemon::start(
        "metrics",
        &format!(
            "[server]\nmetrics_listen = \"127.0.0.1:{port}\"\n[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"64MiB\"\n"
        ),
    );
    let addr = format!("127.0.0.1:{port}");
    let lun = format!("{{target=\"{TARGET}\",lun=\"0\"");
    let before = scrape(&addr);
    assert_eq!(
        sample(&before, &format!("twinsan_scsi_written_bytes_total{lun}}}")),
        0.0
    );
    // 1024 writes of 4 KiB, then 512 reads of 8 KiB, each block once.
    let w = bench(
        &d.url(0),
        &["--rw", "write", "--bs", "4k", "--size", "4m", "--once"],
    );
    assert!(w.status.success(), "{}", text(&w));
    let r = bench(
        &d.url(0),
        &["--rw", "read", "--bs", "8k", "--size", "4m", "--once"],
    );
    assert!(r.status.success(), "{}", text(&r));
    let page = scrape(&addr);
    let count = |op: &str| {
        sample(
            &page,
            &format!("twinsan_scsi_commands_total{lun},op=\"{op}\"}}"),
        )
    };
    assert_eq!(count("write"), 1024.0);
    assert_eq!(count("read"), 512.0);
    assert_eq!(
        sample(&page, &format!("twinsan_scsi_written_bytes_total{lun}}}")),
        4194304.0
    );
    assert_eq!(
        sample(&page, &format!("twinsan_scsi_read_bytes_total{lun}}}")),
        4194304.0
    );
    // Every write is in the latency histogram, and took some time.
    let hist = "twinsan_scsi_command_duration_seconds";
    assert_eq!(
        sample(&page, &format!("{hist}_count{lun},op=\"write\"}}")),
        1024.0
    );
    assert!(sample(&page, &format!("{hist}_sum{lun},op=\"write\"}}")) > 0.0);
    assert_eq!(
        sample(
            &page,
            &format!("{hist}_bucket{{le=\"+Inf\",target=\"{TARGET}\",lun=\"0\",op=\"write\"}}")
        ),
        1024.0
    );
    assert_eq!(
        sample(&page, &format!("twinsan_lun_size_bytes{lun}}}")),
        67108864.0
    );
    assert!(sample(&page, &format!("twinsan_lun_allocated_bytes{lun}}}")) >= 4194304.0);
    // A read past the end is a CHECK CONDITION (ILLEGAL REQUEST), counted by its key.
    let mut c = common::session_at(&d.addr, TARGET, "iqn.2026-11.io.twinsan:test-initiator", 1);
    let mut cdb = [0u8; 16];
    cdb[0] = 0x88;
    cdb[2..10].copy_from_slice(&(64u64 << 20 >> 9).to_be_bytes());
    cdb[13] = 8;
    let r = c.command_sync(&cdb, 4096).expect("READ (16)");
    assert_eq!(r.status, 2, "a read past the end must fail");
    // Deallocations: an UNMAP of 256 blocks, one of none (nothing punched), and a WRITE
    // SAME (16) with UNMAP of 64 blocks; a WRITE SAME without UNMAP writes, and counts not.
    let unmap = |c: &mut benches::conn::Conn, lba, blocks| {
        let r = c
            .command_sync_data(
                &benches::conn::unmap10(benches::conn::UNMAP_PARAM_BYTES as u16),
                0,
                &benches::conn::unmap_param_list(lba, blocks),
            )
            .expect("UNMAP");
        assert_eq!(r.status, 0, "UNMAP");
    };
    unmap(&mut c, 0, 256);
    unmap(&mut c, 512, 0);
    let write_same = |c: &mut benches::conn::Conn, lba: u64, blocks: u32, unmap: bool| {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x93;
        cdb[1] = if unmap { 0x08 } else { 0 };
        cdb[2..10].copy_from_slice(&lba.to_be_bytes());
        cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
        let r = c
            .command_sync_data(&cdb, 0, &[0u8; 512])
            .expect("WRITE SAME (16)");
        assert_eq!(r.status, 0, "WRITE SAME");
    };
    write_same(&mut c, 1024, 64, true);
    write_same(&mut c, 2048, 64, false);
    let page = scrape(&addr);
    assert_eq!(sample(&page, "twinsan_sessions"), 1.0);
    assert_eq!(sample(&page, "twinsan_connections"), 1.0);
    let _ = c.logout();
    assert_eq!(
        sample(&page, &format!("twinsan_scsi_unmapped_bytes_total{lun}}}")),
        ((256 + 64) * 512) as f64
    );
    assert_eq!(
        sample(
            &page,
            &format!("twinsan_scsi_check_conditions_total{lun},sense_key=\"illegal_request\"}}")
        ),
        1.0
    );
    // The dashboard and the alert rules use only metrics the daemon exports (the pair's
    // only on a pair, failover's only with [failover]: their tests check those).
    for file in [
        "contrib/grafana/twinsan-dashboard.json",
        "contrib/prometheus/twinsan-alerts.yml",
    ] {
        let text = std::fs::read_to_string(file).expect("read a contrib file");
        for (i, _) in text.match_indices("twinsan_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            if name.starts_with("twinsan_pair_")
                || name.starts_with("twinsan_failover_")
                || name == "twinsan_"
            {
                continue;
            }
            assert!(
                page.lines()
                    .any(|l| l.starts_with(&name) || l.starts_with(&format!("# TYPE {family} "))),
                "{file} uses {name}, which the daemon does not export"
            );
        }
    }
    promtool_check(&page);
}

/// `promtool check metrics` of `page` finds nothing to say (when promtool is installed).
fn promtool_check(page: &str) {
    let Ok(out) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut p| {
            p.stdin.take().expect("stdin").write_all(page.as_bytes())?;
            p.wait_with_output()
        })
    else {
        eprintln!("promtool not installed: the page is not checked");
        return;
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics:\n{said}"
    );
}

#[test]
fn the_alert_rules_load() {
    let Ok(out) = Command::new("promtool")
        .args(["check", "rules", "contrib/prometheus/twinsan-alerts.yml"])
        .output()
    else {
        eprintln!("promtool not installed: rules not checked");
        return;
    };
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The answer to raw `request` bytes on the metrics port (the status line).
fn status_line(addr: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    let _ = s.write_all(request);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut page = String::new();
    let _ = s.read_to_string(&mut page);
    page.lines().next().unwrap_or("").to_string()
}

#[test]
fn bad_requests_and_a_bad_address_are_refused_and_scrapes_go_on() {
    let port = common::free_port();
    let d = Daemon::start(
        "metrics-bad",
        &format!(
            "[server]\nmetrics_listen = \"127.0.0.1:{port}\"\n[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"16MiB\"\n"
        ),
    );
    let addr = format!("127.0.0.1:{port}");
    assert!(status_line(&addr, b"POST /metrics HTTP/1.1\r\n\r\n").contains("405"));
    assert!(status_line(&addr, b"GET /other HTTP/1.1\r\n\r\n").contains("404"));
    assert!(status_line(&addr, b"\x00\xff garbage\r\n\r\n").contains("400"));
    // A request line longer than the bound: cut, and not a scrape.
    let long = format!("GET /{} HTTP/1.1\r\n\r\n", "x".repeat(20_000));
    assert!(!status_line(&addr, long.as_bytes()).contains("200"));
    // A client that says nothing is given up on; scrapes still answer, as does iSCSI.
    let _silent = TcpStream::connect(&addr).expect("connect");
    assert!(scrape(&addr).contains("twinsan_sessions 0"));
    let o = bench(
        &d.url(0),
        &["--rw", "write", "--bs", "4k", "--size", "64k", "--once"],
    );
    assert!(o.status.success(), "{}", text(&o));
    // A metrics_listen that is not an address is refused with its key and value.
    let cfg = d.dir.join("bad.toml");
    std::fs::write(
        &cfg,
        format!("[server]\nmetrics_listen = \"nowhere\"\n[[target]]\nname = \"{TARGET}\"\n"),
    )
    .expect("write a config");
    let o = Command::new(env!("CARGO_BIN_EXE_twinsan"))
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .expect("run check-config");
    let said = text(&o);
    assert!(!o.status.success(), "{said}");
    assert!(
        said.contains("server.metrics_listen") && said.contains("nowhere"),
        "{said}"
    );
}

#[test]
fn refused_logins_are_counted_by_reason() {
    let port = common::free_port();
    let acl_target = "iqn.2026-11.io.twinsan:acl";
    let d = Daemon::start(
        "metrics-login",
        &format!(
            "[server]\nmetrics_listen = \"127.0.0.1:{port}\"\n\
             [[target]]\nname = \"{TARGET}\"\nchap = {{ user = \"alice\", secret = \"correct-horse-battery\" }}\n\
             [[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"16MiB\"\n\
             [[target]]\nname = \"{acl_target}\"\nallowed_initiators = [\"iqn.2026-11.io.example:allowed\"]\n\
             [[target.lun]]\nid = 0\npath = \"lun1.img\"\nsize = \"16MiB\"\n"
        ),
    );
    let addr = format!("127.0.0.1:{port}");
    let failures = |page: &str, reason: &str| {
        sample(
            page,
            &format!("twinsan_login_failures_total{{reason=\"{reason}\"}}"),
        )
    };
    let page = scrape(&addr);
    for reason in [
        "authentication",
        "authorization",
        "target_not_found",
        "other",
    ] {
        assert_eq!(failures(&page, reason), 0.0, "{reason}");
    }
    let login = |target: &str, initiator: &str, secret: Option<&str>| {
        let chap = secret.map(|s| {
            let creds = proto::login::chap::ChapCredentials::new("alice", s).expect("credentials");
            proto::login::chap::ChapInitiator::new(creds, None).expect("CHAP initiator")
        });
        let mut c = benches::conn::Conn::connect(&d.addr, 0).expect("connect");
        c.login(
            initiator,
            target,
            [0x80, 0, 0, 0, 2, 1],
            false,
            chap.as_ref(),
        )
    };
    let me = "iqn.2026-11.io.twinsan:test-initiator";
    // Two wrong CHAP secrets, one initiator outside the ACL, one target that is not there.
    assert!(login(TARGET, me, Some("wrong-horse-battery")).is_err());
    assert!(login(TARGET, me, Some("another-wrong-one")).is_err());
    assert!(login(acl_target, me, None).is_err());
    assert!(login("iqn.2026-11.io.twinsan:nope", me, None).is_err());
    // The right secret and an initiator in the ACL log in, and count as nothing.
    assert!(login(TARGET, me, Some("correct-horse-battery")).is_ok());
    assert!(login(acl_target, "iqn.2026-11.io.example:allowed", None).is_ok());
    let page = scrape(&addr);
    assert_eq!(failures(&page, "authentication"), 2.0);
    assert_eq!(failures(&page, "authorization"), 1.0);
    assert_eq!(failures(&page, "target_not_found"), 1.0);
    assert_eq!(failures(&page, "other"), 0.0);
}

#[test]
fn snapshots_show_their_count_and_the_newest_ones_age() {
    let port = common::free_port();
    let dir = common::scratch("metrics-snap");
    // Declared before the daemon: dropped after it (a busy file system would not unmount).
    let _fs = common::Xfs::mount(&dir, 512);
    std::fs::write(
        dir.join("twinsan.toml"),
        format!(
            "[server]\nmetrics_listen = \"127.0.0.1:{port}\"\n[[target]]\nname = \"{TARGET}\"\n\
             [[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"16MiB\"\n\
             [[target.lun]]\nid = 1\npath = \"lun1.img\"\nsize = \"16MiB\"\n"
        ),
    )
    .expect("write the config");
    let d = Daemon::start_in(dir);
    let addr = format!("127.0.0.1:{port}");
    let lun = |n: u32| format!("{{target=\"{TARGET}\",lun=\"{n}\"}}");
    let snapshot = |name: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_twinsan"))
            .args([
                "snapshot",
                "create",
                &format!("{TARGET}/0"),
                name,
                "--socket",
            ])
            .arg(d.dir.join("twinsan.sock"))
            .output()
            .expect("run twinsan snapshot");
        assert!(o.status.success(), "{}", text(&o));
    };
    let age = "twinsan_snapshot_newest_age_seconds";
    let page = scrape(&addr);
    assert_eq!(sample(&page, &format!("twinsan_snapshots{}", lun(0))), 0.0);
    assert!(!page.contains(&format!("{age}{{")), "{page}");
    snapshot("s1");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let page = scrape(&addr);
    assert_eq!(sample(&page, &format!("twinsan_snapshots{}", lun(0))), 1.0);
    assert!(sample(&page, &format!("{age}{}", lun(0))) >= 2.0);
    snapshot("s2");
    let page = scrape(&addr);
    assert_eq!(sample(&page, &format!("twinsan_snapshots{}", lun(0))), 2.0);
    assert!(
        sample(&page, &format!("{age}{}", lun(0))) < 2.0,
        "s2 is the newest"
    );
    // LUN 1 has none: a count of 0 and no age.
    assert_eq!(sample(&page, &format!("twinsan_snapshots{}", lun(1))), 0.0);
    assert!(!page.contains(&format!("{age}{}", lun(1))), "{page}");
    // A deleted snapshot no longer counts.
    let o = Command::new(env!("CARGO_BIN_EXE_twinsan"))
        .args([
            "snapshot",
            "delete",
            &format!("{TARGET}/0"),
            "s1",
            "--socket",
        ])
        .arg(d.dir.join("twinsan.sock"))
        .output()
        .expect("run twinsan snapshot");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        sample(&scrape(&addr), &format!("twinsan_snapshots{}", lun(0))),
        1.0
    );
}

/// The sum of `copied_bytes=` over the "resync complete" lines of a node's log.
fn logged_resync_copies(log: &str) -> f64 {
    log.lines()
        .filter(|l| l.contains("resync complete"))
        .filter_map(|l| {
            l.split("copied_bytes=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .sum()
}

#[test]
fn the_pair_shows_its_ack_latency_and_what_resyncs_copied() {
    use common::pair::{node_toml, wait_in_sync, Node};
    use std::time::Duration;
    let port = common::free_port();
    let (ia, ib, ra, rb) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let psk = "pair-test-psk-0123456789";
    let mut b = Node::new(
        "metrics-pair-b",
        node_toml(ib, rb, ra, "secondary", psk, "64MiB"),
        ib,
    );
    let a = Node::new(
        "metrics-pair-a",
        node_toml(ia, ra, rb, "primary", psk, "64MiB").replacen(
            "[server]\n",
            &format!("[server]\nmetrics_listen = \"127.0.0.1:{port}\"\n"),
            1,
        ),
        ia,
    );
    wait_in_sync(&a, Duration::from_secs(20));
    let addr = format!("127.0.0.1:{port}");
    let acks = "twinsan_pair_replica_ack_seconds";
    let copied = format!(
        "twinsan_pair_resync_copied_bytes_total{{target=\"{}\",lun=\"0\"}}",
        common::pair::TARGET
    );
    let before = scrape(&addr);
    let (acks0, copied0) = (
        sample(&before, &format!("{acks}_count")),
        sample(&before, &copied),
    );
    // 1024 mirrored writes: each acknowledged by the peer, and timed.
    let o = bench(
        &a.url(),
        &["--rw", "write", "--bs", "4k", "--size", "4m", "--once"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let page = scrape(&addr);
    let n = sample(&page, &format!("{acks}_count"));
    assert!(n - acks0 >= 1024.0, "{n} acks after {acks0}:\n{page}");
    assert_eq!(sample(&page, &format!("{acks}_bucket{{le=\"+Inf\"}}")), n);
    assert!(sample(&page, &format!("{acks}_sum")) > 0.0);
    promtool_check(&page);
    // Acks on loopback take well under the replica timeout (1 s).
    assert!(sample(&page, &format!("{acks}_bucket{{le=\"1.0\"}}")) >= n - acks0);
    // 8 MiB written while the secondary is away: the resync copies at least that, and the
    // counter says what the log does.
    b.kill9();
    let o = bench(
        &a.url(),
        &["--rw", "write", "--bs", "64k", "--size", "8m", "--once"],
    );
    assert!(o.status.success(), "{}", text(&o));
    b.start();
    wait_in_sync(&a, Duration::from_secs(30));
    let page = scrape(&addr);
    let total = sample(&page, &copied);
    assert!(total - copied0 >= 8388608.0, "{total} after {copied0}");
    assert_eq!(total, logged_resync_copies(&a.log()));
}

#[test]
fn failover_shows_heartbeat_ages_and_counts_takeovers() {
    use common::pair::{node_toml, wait_in_sync, Node};
    use std::time::{Duration, Instant};
    let port = common::free_port();
    let p = || common::free_port();
    let (ia, ib, ra, rb, ha, hb) = (p(), p(), p(), p(), p(), p());
    let psk = "pair-test-psk-0123456789";
    // One heartbeat path on loopback; a fence command that always succeeds, so that a
    // silent peer is taken over (nothing to fence here: the test kills it). With
    // [failover], the fence decides a peer loss, not `degrade`.
    let node = |iscsi, me, peer, role| {
        node_toml(iscsi, me, peer, role, psk, "16MiB").replace("on_peer_loss = \"degrade\"\n", "")
    };
    let failover = |me: u16, peer: u16| {
        format!(
            "[failover]\npair_id = \"metrics\"\nfence_command = \"true\"\n\
             [[failover.path]]\nlisten = \"127.0.0.1:{me}\"\npeer = \"127.0.0.1:{peer}\"\n"
        )
    };
    let b = Node::new(
        "metrics-failover-b",
        node(ib, rb, ra, "secondary").replacen(
            "[server]\n",
            &format!("[server]\nmetrics_listen = \"127.0.0.1:{port}\"\n"),
            1,
        ) + &failover(hb, ha),
        ib,
    );
    let mut a = Node::new(
        "metrics-failover-a",
        node(ia, ra, rb, "primary") + &failover(ha, hb),
        ia,
    );
    wait_in_sync(&a, Duration::from_secs(20));
    let addr = format!("127.0.0.1:{port}");
    let age = "twinsan_failover_heartbeat_age_seconds{path=\"0\"}";
    let takeovers = "twinsan_failover_takeovers_total";
    let page = scrape(&addr);
    // Heartbeats every 100 ms.
    assert!(sample(&page, age) < 1.0, "{page}");
    assert_eq!(sample(&page, takeovers), 0.0);
    promtool_check(&page);
    // The primary dies: B takes over once, and the heartbeats' age grows.
    a.kill9();
    let t = Instant::now();
    let page = loop {
        let page = scrape(&addr);
        if sample(&page, takeovers) >= 1.0 {
            break page;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no takeover:\n{}\n{}",
            b.admin("status"),
            b.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(sample(&page, takeovers), 1.0);
    assert!(sample(&page, age) >= 0.4, "{page}");
}
