//! The failover rig's scenarios (`tests/cluster/scenarios.sh`) under `cargo test`: two nodes,
//! a client and a witness in network namespaces (addresses in 198.18.0.0/15 only, all torn
//! down on exit). Each scenario runs `twinsan bench --reconnect --verify` against the VIP
//! through the fault, then reads every acknowledged write back, samples both nodes' address
//! lists every 50 ms (never the VIP on both), and checks who serves afterwards. The stalls
//! it prints are measurements (docs/performance.md), not assertions.
//!
//! Needs root, iproute2 and jq (`scripts/test-all` installs them); without root it says it
//! is skipped.

use std::process::Command;

#[test]
fn failover_scenarios_in_network_namespaces() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("failover scenarios skipped: network namespaces need root");
        return;
    }
    let bin = std::env::var("TWINSAN_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_twinsan").into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cluster/scenarios.sh");
    let status = Command::new("bash")
        .arg(script)
        .args([
            "kill-primary",
            "power-off",
            "cut-link",
            "cut-client",
            "sigstop",
        ])
        .env("TWINSAN_BIN", bin)
        .env("RUNS", std::env::var("RUNS").unwrap_or_else(|_| "3".into()))
        .status()
        .expect("bash runs");
    assert!(
        status.success(),
        "a failover scenario failed (its logs are named above)"
    );
}
