//! Unit tests of the session loop: its PRNG, and `--reconnect` against a scripted target.

use super::*;
use crate::fake_target::{FakeTarget, Fault};
use crate::report::Report;
use crate::BenchArgs;
use clap::Parser;

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    a: BenchArgs,
}

/// A short verified random read/write run against `t` (1 MiB, 256 units of 4 KiB).
fn run_against(t: &FakeTarget, extra: &[&str]) -> Report {
    let url = t.url();
    let mut v = vec![
        "bench",
        url.as_str(),
        "--rw",
        "randrw",
        "--rwmix-read",
        "50",
        "--bs",
        "4k",
        "--iodepth",
        "4",
        "--runtime",
        "0.6",
        "--verify",
        "--quiet",
        "--no-pin",
    ];
    v.extend_from_slice(extra);
    let job = Cli::try_parse_from(v).unwrap().a.job().unwrap();
    crate::run(&job).unwrap()
}

fn assert_clean(r: &Report) {
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!((r.errors, r.verify_mismatches), (0, 0));
    assert!(r.verified_ios > 0 && r.writes > 0);
}

/// The connection dies with a write unanswered, whether or not its data landed: the
/// session logs in again, sends it (and every other unanswered command) again, and
/// every read stays consistent with the acknowledged writes.
#[test]
fn a_lost_write_is_sent_again_on_a_new_connection() {
    for lands in [false, true] {
        let t = FakeTarget::start(1 << 20, Fault::CloseAtWrite { at: 20, lands });
        let r = run_against(&t, &["--reconnect"]);
        assert_clean(&r);
        assert_eq!(r.reconnects, 1, "lands {lands}");
        assert!(r.reissued >= 1, "the lost write is re-issued");
        assert_eq!(t.connections(), 3, "probe, session, the new login");
        assert_eq!(r.outages.len(), 1);
        assert_eq!(r.outages[0].connection_failures, 1);
        assert!(r.outages[0].first_io_after_ms.is_some());
        assert_eq!(
            r.verify_unacknowledged_blocks, 0,
            "the write sent again was acknowledged"
        );
    }
}

/// Without --reconnect a lost connection still ends the session, as before.
#[test]
fn without_reconnect_a_lost_connection_ends_the_session() {
    let t = FakeTarget::start(
        1 << 20,
        Fault::CloseAtWrite {
            at: 20,
            lands: false,
        },
    );
    let r = run_against(&t, &[]);
    assert_eq!(r.failures.len(), 1);
    // Closed, or reset under a send still in progress: which one is the kernel's timing.
    assert!(
        [
            "connection closed by target",
            "sending to target",
            "receiving from target"
        ]
        .iter()
        .any(|m| r.failures[0].contains(m)),
        "{:?}",
        r.failures
    );
    assert_eq!((r.reconnects, r.verify_mismatches), (0, 0));
    assert!(r.outages.is_empty());
    assert!(
        r.verify_unacknowledged_blocks >= 1,
        "the lost write stays unacknowledged"
    );
}

/// A connection that stays open but answers nothing is given up after --io-timeout-ms;
/// the stall covers the silence.
#[test]
fn a_silent_connection_is_replaced_after_the_io_timeout() {
    let t = FakeTarget::start(1 << 20, Fault::SilentFrom { at: 30 });
    let r = run_against(&t, &["--reconnect", "--io-timeout-ms", "200"]);
    assert_clean(&r);
    assert_eq!(r.reconnects, 1);
    assert!(r.reissued >= 1);
    assert!(r.stall_max_ms >= 190, "stall {} ms", r.stall_max_ms);
    assert_eq!(r.outages.len(), 1);
}

/// BUSY and UNIT ATTENTION: with --reconnect the command goes again (no error); without,
/// as before, BUSY frees the slot and UNIT ATTENTION is a failed command.
#[test]
fn busy_and_unit_attention_are_retried_with_reconnect() {
    let t = FakeTarget::start(1 << 20, Fault::BusyAt { at: 10 });
    let r = run_against(&t, &["--reconnect"]);
    assert_clean(&r);
    assert_eq!((r.busy, r.reconnects), (1, 0));
    let t = FakeTarget::start(1 << 20, Fault::UnitAttentionAt { at: 10 });
    let r = run_against(&t, &["--reconnect"]);
    assert_clean(&r);
    assert_eq!((r.unit_attentions, r.reconnects), (1, 0));
    let t = FakeTarget::start(1 << 20, Fault::UnitAttentionAt { at: 10 });
    let r = run_against(&t, &[]);
    assert_eq!(
        (r.errors, r.unit_attentions, r.verify_mismatches),
        (1, 0, 0)
    );
    let t = FakeTarget::start(1 << 20, Fault::BusyAt { at: 10 });
    let r = run_against(&t, &[]);
    assert_eq!((r.errors, r.busy, r.verify_mismatches), (0, 1, 0));
}

/// A logout request (asynchronous event 1): the session stops sending, collects the
/// answers still due, logs out and in again; nothing needs re-issuing.
#[test]
fn a_logout_request_is_followed_by_a_new_login() {
    let t = FakeTarget::start(1 << 20, Fault::LogoutRequestAt { at: 10 });
    let r = run_against(&t, &["--reconnect"]);
    assert_clean(&r);
    assert_eq!((r.reconnects, r.reissued), (1, 0));
    assert_eq!(t.connections(), 3);
}

#[test]
fn rng_below_is_in_range_and_spread() {
    let mut r = Rng::new(1);
    let mut seen = [0u32; 10];
    for _ in 0..10_000 {
        let x = r.below(10);
        seen[x as usize] += 1;
    }
    assert!(seen.iter().all(|&c| (800..1200).contains(&c)), "{seen:?}");
}
