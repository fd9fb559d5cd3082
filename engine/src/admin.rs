//! The admin socket: a Unix stream socket (mode 0600, root's) that takes one command line
//! and answers with text. `twinsan status`, `promote`, `demote`, `reload` and `lun ...` are
//! its clients.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Role;
use crate::registry::Registry;

pub mod status;

/// Longest command line accepted: the commands are single words plus a LUN.
const MAX_LINE_BYTES: usize = 256;

/// How long `demote` waits for running writes: long enough for a hung peer to be declared
/// lost (`replica_timeout_ms`) and the writes to complete without it.
fn demote_drain(reg: &Registry) -> Duration {
    let timeout_ms = reg.config.peer.as_ref().map_or(0, |p| p.replica_timeout_ms);
    Duration::from_millis(timeout_ms + 2_000)
}

/// Binds the socket (replacing a stale one) and serves it on a background thread.
pub fn serve(path: &Path, reg: Arc<Registry>) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by a crashed daemon: nobody answers on it, so it is safe to remove.
    if path.exists() && UnixStream::connect(path).is_err() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("twinsan-admin".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                // One thread per client: a long `verify` must not block `status`.
                let reg = Arc::clone(&reg);
                let _ = std::thread::Builder::new()
                    .name("twinsan-admin-client".into())
                    .spawn(move || {
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                        if let Err(e) = handle(stream, &reg) {
                            tracing::debug!(error = %e, "admin client");
                        }
                    });
            }
        })?;
    Ok(())
}

fn handle(stream: UnixStream, reg: &Registry) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new(stream.try_clone()?.take(MAX_LINE_BYTES as u64)).read_line(&mut line)?;
    let reply = execute(line.trim(), reg);
    let mut w = stream;
    w.write_all(reply.as_bytes())
}

/// Runs one admin command. Replies start with "ok" or "error".
pub fn execute(cmd: &str, reg: &Registry) -> String {
    match cmd {
        "status" => format!("ok\n{}", status::StatusReport::gather(reg).render()),
        "reload" | "reload-force" => reload_reply(reg, cmd == "reload-force"),
        // One JSON document after the "ok" line (the CLI strips that line).
        "status-json" => match serde_json::to_string_pretty(&status::StatusReport::gather(reg)) {
            Ok(j) => format!("ok\n{j}\n"),
            Err(e) => format!("error: status as JSON: {e}\n"),
        },
        "standby" | "takeover" => match reg.failover.get() {
            Some(f) => {
                let op = if cmd == "standby" {
                    failover::controller::Operator::Standby
                } else {
                    failover::controller::Operator::Takeover
                };
                match f.operator(op) {
                    Ok(m) => format!("ok: {m}\n"),
                    Err(m) => format!("error: {m}\n"),
                }
            }
            None => "error: automatic failover is not configured ([failover])\n".into(),
        },
        "promote" | "promote-force" => {
            let refusal = (cmd == "promote" && reg.role() != Role::Primary)
                .then(|| reg.replication.get().and_then(|rep| rep.promote_refusal()))
                .flatten();
            if let Some(why) = refusal {
                return format!("error: not promoted: {why}\n");
            }
            if let Some(rep) = reg.replication.get() {
                if !rep.fence_for_promotion() {
                    tracing::warn!(
                        "a message from the old primary was still being applied at promotion"
                    );
                }
            }
            let prev = reg.set_role(Role::Primary);
            format!("ok: role primary (was {})\n", role_name(prev))
        }
        "demote" => {
            let prev = reg.set_role(Role::Secondary);
            // New commands are refused from here; those already running finish mirrored,
            // so the peer holds every write this node acknowledged before it is promoted.
            let drained = reg
                .replication
                .get()
                .is_none_or(|rep| rep.drain_after_demotion(reg, demote_drain(reg)));
            if drained {
                format!("ok: role secondary (was {})\n", role_name(prev))
            } else {
                format!(
                    "ok: role secondary (was {}); warning: writes still running after {} ms \
                     (the peer may be hung): check `twinsan status` before promoting the peer\n",
                    role_name(prev),
                    demote_drain(reg).as_millis()
                )
            }
        }
        "outdate-peer" => match reg.replication.get() {
            // Only the primary's word counts: on a secondary it would release writes held
            // from its last term, which the primary's resync may have overwritten since.
            Some(_) if reg.role() != crate::config::Role::Primary => {
                "error: outdate-peer runs on the primary (this node is secondary)\n".into()
            }
            Some(rep) => {
                if rep.outdate_peer() {
                    "ok: peer recorded outdated; suspended I/O resumes\n".into()
                } else {
                    "error: the \"peer outdated\" record could not be written to a LUN's \
                     metadata file (see the log): its I/O stays suspended; run outdate-peer \
                     again once the metadata disk works\n"
                        .into()
                }
            }
            None => "error: no peer configured\n".into(),
        },
        "verify" | "verify-repair" => match reg.replication.get() {
            Some(rep) => match rep.verify(cmd == "verify-repair") {
                Ok(report) => format!("ok\n{report}"),
                Err(e) => format!("error: {e}\n"),
            },
            None => "error: no peer configured\n".into(),
        },
        "resolve-discard-local" => match reg.replication.get() {
            Some(rep) => match rep.discard_local() {
                Ok(()) => "ok: local data marked outdated; the peer resyncs it fully\n".into(),
                Err(e) => format!("error: {e}\n"),
            },
            None => "error: no peer configured\n".into(),
        },
        other if other.starts_with("snapshot ") => {
            crate::snapshot::admin::execute(&other["snapshot ".len()..], reg)
        }
        other => {
            format!("error: unknown command `{other}` (status, status-json, promote, promote-force, demote, standby, takeover, outdate-peer, verify, verify-repair, resolve-discard-local, snapshot ...)\n")
        }
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Primary => "primary",
        Role::Secondary => "secondary",
    }
}

/// How long a client waits for the admin socket of a daemon that is still starting: the
/// iSCSI port opens before the socket is bound, so `serve` followed at once by `demote`
/// (scripts, tests) would otherwise meet a refused or missing socket.
const CONNECT_WAIT_MS: u64 = 2_000;

fn connect_waiting(path: &Path) -> std::io::Result<UnixStream> {
    let started = std::time::Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && started.elapsed() < Duration::from_millis(CONNECT_WAIT_MS) =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Client side: sends one command and returns the reply.
pub fn request(path: &Path, cmd: &str) -> std::io::Result<String> {
    let mut s = connect_waiting(path)?;
    // No reply timeout: `verify` of a large LUN takes as long as hashing it does.
    s.write_all(cmd.as_bytes())?;
    s.write_all(b"\n")?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// `twinsan reload` and SIGHUP: the reply says what changed, or why nothing did.
pub fn reload_reply(reg: &Registry, force: bool) -> String {
    match crate::reload::reload(reg, force) {
        Ok(d) => format!("ok: {}\n", d.summary()),
        Err(e @ crate::reload::ReloadError::Partial(_)) => {
            tracing::error!(error = %e, "reload failed");
            format!("error: reload failed: {e}\n")
        }
        Err(e) => {
            tracing::error!(error = %e, "reload refused: nothing changed");
            format!("error: reload refused, nothing changed: {e}\n")
        }
    }
}
