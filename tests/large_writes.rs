//! Large writes take the fast paths: a write whose immediate data is its whole transfer takes
//! the receive buffer as its data buffer (conn/, LEND_MIN_BYTES), and large buffered writes
//! may run on the core's helper thread (spill.rs). Every byte must still land where it was
//! sent, whichever path a write took, and read back after a restart.

mod common;

use common::{bench, text, Daemon, TARGET};

fn config(server: &str, lun: &str) -> String {
    format!(
        "[server]\n{server}\n\n[[target]]\nname = \"{TARGET}\"\n\n[[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"256MiB\"\n{lun}\n"
    )
}

/// Mixed verified reads and writes of `bs` at queue depth 16, then the daemon is killed and
/// restarted and every block with an acknowledged write is read back and checked.
fn writes_read_back(name: &str, server: &str, lun: &str, bs: &str, extra: &[&str]) {
    let mut d = Daemon::start(name, &config(server, lun));
    let state = d.dir.join("acks");
    let state = state.to_str().unwrap();
    let mut args = vec![
        "--rw",
        "randrw",
        "--rwmix-read",
        "30",
        "--bs",
        bs,
        "--size",
        "64m",
        "--iodepth",
        "16",
        "--runtime",
        "3",
        "--ramp",
        "0",
        "--verify",
        "--verify-state",
        state,
    ];
    args.extend_from_slice(extra);
    let o = bench(&d.url(0), &args);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains(" 0 mismatches"), "{t}");
    assert!(t.contains("errors 0"), "{t}");
    d.crash_and_restart();
    let mut args = vec![
        "--rw",
        "read",
        "--bs",
        bs,
        "--size",
        "64m",
        "--iodepth",
        "8",
        "--verify-state",
        state,
        "--verify-only",
    ];
    args.extend_from_slice(extra);
    let o = bench(&d.url(0), &args);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains(" 0 mismatches"), "{t}");
}

#[test]
fn large_writes_on_the_helper_with_lent_buffers_read_back() {
    // 128 KiB: all immediate data, lent; every one goes to the helper.
    writes_read_back("lw-helper", "spill_writes = \"always\"", "", "128k", &[]);
}

#[test]
fn large_writes_with_digests_and_data_out_read_back() {
    // 256 KiB is the whole first burst (immediate, lent); 1 MiB has Data-Out after it and
    // cannot be lent; with CRC32C header and data digests on both.
    writes_read_back(
        "lw-digest-256k",
        "spill_writes = \"always\"",
        "",
        "256k",
        &["--digest"],
    );
    writes_read_back(
        "lw-digest-1m",
        "spill_writes = \"always\"",
        "",
        "1m",
        &["--digest"],
    );
}

#[test]
fn large_writes_to_a_direct_lun_and_without_the_helper_read_back() {
    // O_DIRECT needs aligned buffers: a lent receive buffer is not, so the data is copied.
    writes_read_back("lw-direct", "", "cache = \"direct\"", "128k", &[]);
    writes_read_back("lw-off", "spill_writes = \"off\"", "", "64k", &[]);
}
