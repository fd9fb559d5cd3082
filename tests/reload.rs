//! Online reconfiguration (`twinsan reload`, SIGHUP, `twinsan lun ...`): what a storage
//! admin changes while initiators run, and what is refused with nothing changed.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{bench, session_at, text, tool, Daemon, TARGET};

const B: &str = "iqn.2026-11.io.twinsan:b";

/// A `[[target]]` named `name` with `extra` keys and LUNs (id, path, size).
fn target(name: &str, extra: &str, luns: &[(u64, &str, &str)]) -> String {
    let mut s = format!("[[target]]\nname = \"{name}\"\n{extra}\n");
    for (id, path, size) in luns {
        s += &format!("[[target.lun]]\nid = {id}\npath = \"{path}\"\nsize = \"{size}\"\n");
    }
    s
}

fn write_config(d: &Daemon, text: &str) {
    std::fs::write(d.dir.join("twinsan.toml"), text).expect("write config");
}

fn assert_ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what} failed:\n{}", text(o));
    assert!(text(o).starts_with("ok"), "{what}:\n{}", text(o));
}

/// READ CAPACITY (16) of LUN `lun` of `target` from a new session: bytes.
fn capacity(d: &Daemon, target: &str, lun: u64) -> u64 {
    let mut c = benches::conn::Conn::connect(&d.addr, benches::args::encode_lun(lun as u16))
        .expect("connect");
    c.login(
        "iqn.2026-11.io.twinsan:probe",
        target,
        [0x80, 0, 0, 0, 0, 9],
        false,
        None,
    )
    .expect("login");
    c.until_ready().expect("unit ready");
    c.read_capacity().expect("read capacity").0
}

/// `iscsi-ls -s`: the targets and LUNs an initiator discovers.
fn listing(d: &Daemon) -> String {
    text(&tool("iscsi-ls", &["-s", &format!("iscsi://{}", d.addr)]))
}

#[test]
fn reload_adds_a_target_and_grows_a_lun_under_load_without_errors() {
    let a = target(TARGET, "", &[(0, "a0.img", "64MiB")]);
    let d = Daemon::start("reload-load", &a);
    // 4 sessions of verified mixed load on A; --reconnect retries a UNIT ATTENTION as an
    // initiator's SCSI layer does (and would hide a lost connection: checked below).
    let bg = common::bench_background(
        &d.url(0),
        &[
            "--rw",
            "randrw",
            "--bs",
            "4k",
            "--size",
            "8m",
            "--sessions",
            "4",
            "--iodepth",
            "4",
            "--verify",
            "--reconnect",
            "--json",
            "--no-pin",
            "--runtime",
            "5",
        ],
    );
    assert!(bg.probed, "the bench never probed the LUN");
    std::thread::sleep(Duration::from_millis(1500));
    let grown = a.replace("64MiB", "128MiB") + &target(B, "", &[(0, "b0.img", "32MiB")]);
    write_config(&d, &grown);
    let started = Instant::now();
    let o = d.cli(&["reload"]);
    assert_ok(&o, "reload");
    let t = text(&o);
    assert!(t.contains("targets added: iqn.2026-11.io.twinsan:b"), "{t}");
    assert!(t.contains("grown from 67108864 to 134217728 bytes"), "{t}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "reload took {:?}",
        started.elapsed()
    );
    // B serves at once.
    let inq = tool("iscsi-inq", &[&format!("iscsi://{}/{B}/0", d.addr)]);
    assert!(inq.status.success(), "iscsi-inq on B: {}", text(&inq));
    assert_eq!(capacity(&d, TARGET, 0), 128 << 20);
    assert_eq!(capacity(&d, B, 0), 32 << 20);
    let (o, err) = bg.wait();
    let all = format!("{}{err}", String::from_utf8_lossy(&o.stdout));
    assert!(o.status.success(), "bench on A failed:\n{all}");
    let r: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("no JSON ({e}):\n{all}"));
    assert_eq!(r["errors"], 0, "{all}");
    assert_eq!(r["verify_mismatches"], 0, "{all}");
    assert_eq!(r["reconnects"], 0, "no session of A was lost:\n{all}");
    // Each session saw the one CAPACITY DATA HAS CHANGED, and nothing else.
    assert_eq!(r["unit_attentions"], 4, "{all}");
    // B takes verified writes and reads.
    let b = bench(
        &format!("iscsi://{}/{B}/0", d.addr),
        &[
            "--rw",
            "randrw",
            "--bs",
            "4k",
            "--size",
            "4m",
            "--verify",
            "--runtime",
            "1",
        ],
    );
    assert!(b.status.success(), "bench on B: {}", text(&b));
}

#[test]
fn a_broken_or_offline_only_change_is_refused_with_file_key_and_value_and_nothing_changes() {
    let a = target(TARGET, "", &[(0, "a0.img", "64MiB")]);
    let d = Daemon::start("reload-broken", &a);
    let config = d.dir.join("twinsan.toml");
    // A bad size, beside a grow of A and a new target: none of it may happen.
    write_config(
        &d,
        &(a.replace("64MiB", "128MiB") + &target(B, "", &[(0, "b0.img", "12x")])),
    );
    let o = d.cli(&["reload"]);
    let t = text(&o);
    assert!(!o.status.success(), "a broken file was accepted:\n{t}");
    assert!(t.contains("nothing changed"), "{t}");
    assert!(t.contains(&config.display().to_string()), "no file in: {t}");
    assert!(t.contains("target[1].lun[0].size"), "no key in: {t}");
    assert!(t.contains("12x"), "no value in: {t}");
    assert_eq!(capacity(&d, TARGET, 0), 64 << 20);
    assert!(!listing(&d).contains(B), "{}", listing(&d));
    // What cannot change online is named, not ignored.
    write_config(&d, &format!("[server]\nqueue_depth = 8\n{a}"));
    let t = text(&d.cli(&["reload"]));
    assert!(
        t.contains("`server.queue_depth`") && t.contains("restart"),
        "{t}"
    );
    write_config(&d, &a.replace("a0.img", "elsewhere.img"));
    let t = text(&d.cli(&["reload"]));
    assert!(t.contains("`target[0].lun[0].path`"), "{t}");
    // Shrinking is refused (data would be lost).
    write_config(&d, &a.replace("64MiB", "32MiB"));
    let t = text(&d.cli(&["reload"]));
    assert!(t.contains("shrinking a LUN is refused"), "{t}");
    assert_eq!(capacity(&d, TARGET, 0), 64 << 20);
}

/// How many LUNs REPORT LUNS lists to session `s`.
fn reported_luns(s: &mut benches::conn::Conn) -> u32 {
    let mut cdb = [0u8; 12];
    cdb[0] = 0xa0;
    cdb[9] = 64;
    let r = s.command_sync(&cdb, 64).expect("REPORT LUNS");
    assert_eq!(r.status, 0, "{}", r.sense);
    u32::from_be_bytes([r.data[0], r.data[1], r.data[2], r.data[3]]) / 8
}

#[test]
fn removing_a_lun_with_a_session_needs_force_and_keeps_the_file() {
    let two = target(
        TARGET,
        "",
        &[(0, "a0.img", "16MiB"), (1, "a1.img", "16MiB")],
    );
    let d = Daemon::start("reload-remove", &two);
    let mut s = session_at(&d.addr, TARGET, "iqn.2026-11.io.twinsan:holder", 1);
    write_config(&d, &target(TARGET, "", &[(0, "a0.img", "16MiB")]));
    let o = d.cli(&["reload"]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("LUN 1 of target") && t.contains("--force"),
        "{t}"
    );
    assert!(listing(&d).contains("Lun:1"), "{}", listing(&d));
    let o = d.cli(&["reload", "--force"]);
    assert_ok(&o, "reload --force");
    assert!(
        text(&o).contains("LUNs removed: iqn.2026-11.io.twinsan:test/1"),
        "{}",
        text(&o)
    );
    assert!(!listing(&d).contains("Lun:1"), "{}", listing(&d));
    assert!(
        d.dir.join("a1.img").exists(),
        "removing never deletes the backing file"
    );
    // The session that held it goes on with LUN 0: one REPORTED LUNS DATA HAS CHANGED,
    // then GOOD.
    let r = s.command_sync(&[0u8; 6], 0).expect("TEST UNIT READY");
    assert_eq!(r.status, 2, "expected the unit attention");
    assert!(
        r.sense.to_ascii_uppercase().contains("3F/0E"),
        "{}",
        r.sense
    );
    s.until_ready().expect("LUN 0 still serves");
    assert_eq!(reported_luns(&mut s), 1);
    // The same file can be served again by a later reload, and the session learns of it.
    write_config(&d, &two);
    assert_ok(&d.cli(&["reload"]), "re-adding the LUN");
    assert_eq!(capacity(&d, TARGET, 1), 16 << 20);
    let r = s.command_sync(&[0u8; 6], 0).expect("TEST UNIT READY");
    assert!(
        r.sense.to_ascii_uppercase().contains("3F/0E"),
        "{}",
        r.sense
    );
    assert_eq!(reported_luns(&mut s), 2);
}

#[test]
fn an_acl_change_ends_the_sessions_of_initiators_now_refused() {
    let a = target(TARGET, "", &[(0, "a0.img", "16MiB")]);
    let d = Daemon::start("reload-acl", &a);
    let mut one = session_at(&d.addr, TARGET, "iqn.2026-11.io.twinsan:one", 1);
    let mut two = session_at(&d.addr, TARGET, "iqn.2026-11.io.twinsan:two", 2);
    write_config(
        &d,
        &a.replace(
            "\n\n[[target.lun]]",
            "\nallowed_initiators = [\"iqn.2026-11.io.twinsan:two\"]\n\n[[target.lun]]",
        ),
    );
    let o = d.cli(&["reload"]);
    assert_ok(&o, "reload");
    assert!(text(&o).contains("access changed"), "{}", text(&o));
    // The core closes a killed session within a tick (250 ms).
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        one.command_sync(&[0u8; 6], 0).is_err(),
        "the refused initiator's session still answers"
    );
    let r = two
        .command_sync(&[0u8; 6], 0)
        .expect("the allowed session goes on");
    assert_eq!(r.status, 0, "{}", r.sense);
    // And it cannot log in again.
    let mut c = benches::conn::Conn::connect(&d.addr, 0).expect("connect");
    let login = c.login(
        "iqn.2026-11.io.twinsan:one",
        TARGET,
        [0x80, 0, 0, 0, 0, 3],
        false,
        None,
    );
    assert!(login.is_err(), "the refused initiator logged in again");
}

#[test]
fn sighup_reloads_like_the_command() {
    let a = target(TARGET, "", &[(0, "a0.img", "16MiB")]);
    let d = Daemon::start("reload-hup", &a);
    write_config(&d, &(a.clone() + &target(B, "", &[(0, "b0.img", "16MiB")])));
    let ok = Command::new("kill")
        .args(["-HUP", &d.pid().to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !listing(&d).contains(B) {
        assert!(Instant::now() < deadline, "B did not appear after SIGHUP");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(capacity(&d, B, 0), 16 << 20);
}

fn lun_cmd(d: &Daemon, args: &[&str]) -> Output {
    let config = d.dir.join("twinsan.toml");
    let mut all: Vec<&str> = vec!["lun"];
    all.extend_from_slice(args);
    all.push("--config");
    all.push(config.to_str().expect("UTF-8 scratch path"));
    d.cli(&all)
}

fn file(p: &Path) -> String {
    std::fs::read_to_string(p).expect("read config")
}

#[test]
fn lun_add_resize_remove_edit_the_file_and_apply_it() {
    let a = format!(
        "# kept: the operator's notes\n{}",
        target(TARGET, "", &[(0, "a0.img", "16MiB")])
    );
    let d = Daemon::start("reload-lun-cli", &a);
    let config = d.dir.join("twinsan.toml");
    let o = lun_cmd(
        &d,
        &["add", TARGET, "3", "--size", "8MiB", "--path", "a3.img"],
    );
    assert_ok(&o, "lun add");
    let f = file(&config);
    assert!(f.starts_with("# kept: the operator's notes\n"), "{f}");
    assert!(f.contains("id = 3") && f.contains("a3.img"), "{f}");
    assert_eq!(capacity(&d, TARGET, 3), 8 << 20);
    let lun3 = format!("{TARGET}/3");
    assert_ok(&lun_cmd(&d, &["resize", &lun3, "24MiB"]), "lun resize");
    assert_eq!(capacity(&d, TARGET, 3), 24 << 20);
    // Refused by the daemon (a shrink): the file is restored.
    let before = file(&config);
    let o = lun_cmd(&d, &["resize", &lun3, "8MiB"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("shrinking"), "{}", text(&o));
    assert_eq!(file(&config), before, "the file was not restored");
    // Refused before writing (a bad size): the file is untouched.
    let o = lun_cmd(&d, &["resize", &lun3, "lots"]);
    assert!(
        !o.status.success() && text(&o).contains("lots"),
        "{}",
        text(&o)
    );
    assert_eq!(file(&config), before);
    // A LUN with a session: refused without --force (file restored), removed with it.
    let _s = session_at(&d.addr, TARGET, "iqn.2026-11.io.twinsan:holder", 1);
    let o = lun_cmd(&d, &["remove", &lun3]);
    assert!(
        !o.status.success() && text(&o).contains("--force"),
        "{}",
        text(&o)
    );
    assert_eq!(file(&config), before);
    assert_ok(
        &lun_cmd(&d, &["remove", &lun3, "--force"]),
        "lun remove --force",
    );
    assert!(!file(&config).contains("id = 3"), "{}", file(&config));
    assert!(!listing(&d).contains("Lun:3"), "{}", listing(&d));
    assert!(d.dir.join("a3.img").exists());
}

/// A session to LUN 0 of TARGET as alice with CHAP `secret`, in full feature phase.
fn chap_session(d: &Daemon, secret: &str, isid_low: u8) -> anyhow::Result<benches::conn::Conn> {
    let creds = proto::login::chap::ChapCredentials::new("alice", secret)?;
    let chap = proto::login::chap::ChapInitiator::new(creds, None)?;
    let mut c = benches::conn::Conn::connect(&d.addr, 0)?;
    c.login(
        "iqn.2026-11.io.twinsan:alice",
        TARGET,
        [0x80, 0, 0, 0, 1, isid_low],
        false,
        Some(&chap),
    )?;
    c.until_ready()?;
    Ok(c)
}

#[test]
fn a_chap_change_ends_the_targets_sessions_and_the_new_secret_logs_in() {
    let chap = |secret: &str| {
        target(
            TARGET,
            &format!("chap = {{ user = \"alice\", secret = \"{secret}\" }}"),
            &[(0, "a0.img", "16MiB")],
        )
    };
    let d = Daemon::start("reload-chap", &chap("correct-horse-battery"));
    let mut old = chap_session(&d, "correct-horse-battery", 1).expect("login with the secret");
    write_config(&d, &chap("staple-of-new-secrets"));
    assert_ok(&d.cli(&["reload"]), "reload");
    // The core closes a killed session within a tick (250 ms).
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        old.command_sync(&[0u8; 6], 0).is_err(),
        "the session authenticated with the old secret still answers"
    );
    let mut new = chap_session(&d, "staple-of-new-secrets", 2).expect("the new secret logs in");
    assert_eq!(new.command_sync(&[0u8; 6], 0).expect("TUR").status, 0);
    assert!(
        chap_session(&d, "correct-horse-battery", 3).is_err(),
        "the old secret logged in"
    );
}

#[test]
fn on_a_pair_whose_peer_is_down_a_primary_refuses_lun_changes_with_the_reason_and_acl_changes_apply(
) {
    let (me, peer) = (common::free_port(), common::free_port());
    let pair = format!(
        "[peer]\nname = \"peer\"\naddress = \"127.0.0.1:{peer}\"\nlisten = \"127.0.0.1:{me}\"\n\
         psk = \"0123456789abcdef0123456789abcdef\"\non_peer_loss = \"degrade\"\n"
    );
    let a = target(TARGET, "", &[(0, "a0.img", "16MiB")]);
    // A primary whose peer is down cannot know what the peer has (tests/replication.rs
    // makes the changes on a running pair, in the order that keeps the nodes equal).
    let d = Daemon::start("reload-pair", &format!("{pair}{a}"));
    write_config(&d, &format!("{pair}{}", a.replace("16MiB", "32MiB")));
    let o = d.cli(&["reload"]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("on a pair")
            && t.contains("target[0].lun[0]")
            && t.contains("not grown yet")
            && t.contains("peer cannot be asked"),
        "{t}"
    );
    assert_eq!(capacity(&d, TARGET, 0), 16 << 20);
    write_config(
        &d,
        &format!(
            "{pair}{}",
            target(
                TARGET,
                "allowed_addresses = [\"127.0.0.0/8\"]",
                &[(0, "a0.img", "16MiB")]
            )
        ),
    );
    let o = d.cli(&["reload"]);
    assert_ok(&o, "an ACL change on a pair");
    assert!(text(&o).contains("access changed"), "{}", text(&o));
}
