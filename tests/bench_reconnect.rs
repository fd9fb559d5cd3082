//! `twinsan bench --reconnect` rides through its target going away: it logs in again,
//! re-issues what was unanswered, keeps every read consistent with the acknowledged
//! writes, and reports the stall. Two ways a failover looks to an initiator: the
//! connection is reset (the daemon is killed and comes back on the same address and
//! data), or it goes silent (the daemon is stopped and continued).

mod common;

use std::process::Output;
use std::time::Duration;

use common::{read_back, text, Daemon};

/// Runs `twinsan bench --reconnect --verify --json` on `d` while `disturb` acts on the
/// daemon, once the bench has probed the LUN (its sessions are logging in) and about
/// `after` has passed. Returns the bench's output and its JSON report.
fn bench_through(
    d: &mut Daemon,
    extra: &[&str],
    after: Duration,
    disturb: impl FnOnce(&mut Daemon),
) -> (Output, serde_json::Value) {
    let mut args = vec![
        "--rw",
        "randrw",
        "--rwmix-read",
        "50",
        "--bs",
        "4k",
        "--size",
        "8m",
        "--sessions",
        "2",
        "--iodepth",
        "8",
        "--verify",
        "--reconnect",
        "--json",
        "--no-pin",
    ];
    args.extend_from_slice(extra);
    let bg = common::bench_background(&d.url(0), &args);
    let probed = bg.probed;
    if probed {
        std::thread::sleep(after);
        disturb(d);
    }
    let (o, err) = bg.wait();
    let all = format!("{}{err}", String::from_utf8_lossy(&o.stdout));
    assert!(probed, "the bench never probed the LUN:\n{all}");
    let json: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}):\n{all}"));
    assert!(o.status.success(), "bench failed ({:?}):\n{all}", o.status);
    (
        Output {
            status: o.status,
            stdout: o.stdout,
            stderr: err.into_bytes(),
        },
        json,
    )
}

fn assert_rode_through(o: &Output, r: &serde_json::Value, min_stall_ms: u64) {
    let t = text(o);
    assert!(
        r["reconnects"].as_u64().unwrap_or(0) >= 1,
        "no reconnect:\n{t}"
    );
    assert_eq!(r["verify_mismatches"], 0, "{t}");
    assert_eq!(r["errors"], 0, "{t}");
    assert!(
        r["verified_ios"].as_u64().unwrap_or(0) > 0,
        "nothing verified:\n{t}"
    );
    assert!(
        r["failures"].as_array().is_some_and(|f| f.is_empty()),
        "{t}"
    );
    let stall = r["stall_max_ms"].as_u64().unwrap_or(0);
    assert!(stall >= min_stall_ms, "stall {stall} ms:\n{t}");
    let outages = r["outages"].as_array().cloned().unwrap_or_default();
    assert!(!outages.is_empty(), "no outage recorded:\n{t}");
    let first = outages[0]["first_io_after_ms"].as_f64();
    assert!(
        first.is_some_and(|ms| ms > 0.0 && ms <= stall as f64 + 1.0),
        "first I/O after the failure {first:?} vs stall {stall}:\n{t}"
    );
    assert!(t.contains("logged in again"), "{t}");
}

#[test]
fn bench_reconnects_after_the_target_is_killed_and_restarted() {
    let mut d = Daemon::simple("bench-reconnect-kill", "64MiB", "");
    let state = d.dir.join("acks");
    let state_arg = state.to_str().expect("UTF-8 scratch path").to_string();
    let (o, r) = bench_through(
        &mut d,
        &["--runtime", "4", "--verify-state", &state_arg],
        Duration::from_secs(1),
        |d| d.crash_and_restart_after(Duration::from_millis(500)),
    );
    // Down for 500 ms at least: nothing can complete meanwhile.
    assert_rode_through(&o, &r, 400);
    // Every write the run saw acknowledged, across the crash, reads back.
    let o = read_back(&d.url(0), "4k", "8m", &state);
    assert!(o.status.success(), "read back: {}", text(&o));
    assert!(text(&o).contains(" 0 mismatches"), "{}", text(&o));
}

#[test]
fn bench_reconnects_when_the_target_goes_silent() {
    let mut d = Daemon::simple("bench-reconnect-stop", "64MiB", "");
    let (o, r) = bench_through(
        &mut d,
        &["--runtime", "5", "--io-timeout-ms", "700"],
        Duration::from_secs(1),
        |d| {
            d.set_stopped(true);
            std::thread::sleep(Duration::from_millis(2500));
            d.set_stopped(false);
        },
    );
    // Silent for 2.5 s: found lost after --io-timeout-ms, logged in again once it answers.
    assert_rode_through(&o, &r, 2000);
    assert!(text(&o).contains("unanswered for"), "{}", text(&o));
}
