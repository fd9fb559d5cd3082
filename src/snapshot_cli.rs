//! `twinsan snapshot ...`: the CLI side. Everything but `diff` is one admin request; `diff`
//! asks the daemon where the clones are and reads them itself (they never change).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use crate::{admin, admin_socket, AdminArgs};

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Take a crash-consistent snapshot of LUNs at one cut, on both nodes of a pair.
    /// GROUP: TARGET/LUN, several separated by commas, or a TARGET for all of its LUNs.
    Create {
        group: String,
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List snapshots (of GROUP, or of every LUN).
    List {
        group: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Delete a snapshot (on both nodes).
    Delete {
        lun: String,
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Replace a LUN's data by a snapshot's, on both nodes.
    Rollback {
        lun: String,
        name: String,
        /// Even while initiators are logged in to the LUN's target (their caches go stale).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Write the stream of changed and zeroed ranges from snapshot --from (or from nothing)
    /// to snapshot --to, to --output or stdout.
    Diff {
        lun: String,
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: String,
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Serve a snapshot as a read-only LUN (its own NAA and serial, so ESXi sees a copy of
    /// the volume, never another path to it): added to the config file (--config) and
    /// applied like `reload`. `twinsan lun remove` takes it away.
    Export {
        lun: String,
        name: String,
        /// The exported LUN, TARGET/ID (the target is made if the file has none).
        #[arg(long = "as")]
        as_lun: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Send snapshot --snapshot (as a diff from --from, which the receiver must hold, or
    /// whole) to the twinsan at --to (its [snapshot_receive]), which applies it to its
    /// LUN of the same TARGET/LUN (or --as). Resumable: shipped again after a cut, it
    /// continues where the receiver stopped.
    Ship {
        lun: String,
        #[arg(long)]
        snapshot: String,
        #[arg(long)]
        from: Option<String>,
        /// The receiver, HOST:PORT.
        #[arg(long)]
        to: String,
        /// A file holding the receiver's pre-shared key (keys stay off command lines).
        #[arg(long)]
        psk_file: PathBuf,
        /// The receiver's LUN, if not the same TARGET/LUN.
        #[arg(long = "as")]
        as_lun: Option<String>,
        /// Bytes per second at most (k/m/g suffixes), to spare a WAN link.
        #[arg(long)]
        rate: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Apply a diff stream: the LUN becomes the stream's snapshot, which is recorded here.
    Apply {
        lun: String,
        file: PathBuf,
        /// Even while initiators are logged in to the LUN's target.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Sends `snapshot VERB WORDS... [force]`: each word must be one word of the one-line
/// admin request (no whitespace), or nothing is sent.
fn send(
    a: AdminArgs,
    verb: &str,
    words: &[(&str, &str)],
    force: bool,
) -> Result<ExitCode, ExitCode> {
    let mut cmd = format!("snapshot {verb}");
    for (what, s) in words {
        if s.is_empty() || s.chars().any(char::is_whitespace) {
            eprintln!("twinsan snapshot {verb}: {what} {s:?} must be one word");
            return Err(ExitCode::from(2));
        }
        cmd.push(' ');
        cmd.push_str(s);
    }
    if force {
        cmd.push_str(" force");
    }
    Ok(admin(a, &cmd))
}

pub fn run(cmd: SnapshotCmd) -> ExitCode {
    let r = match cmd {
        SnapshotCmd::Create {
            group,
            name,
            admin: a,
        } => send(a, "create", &[("group", &group), ("name", &name)], false),
        SnapshotCmd::List { group, admin: a } => match group {
            Some(g) => send(a, "list", &[("group", &g)], false),
            None => send(a, "list", &[], false),
        },
        SnapshotCmd::Delete {
            lun,
            name,
            admin: a,
        } => send(a, "delete", &[("LUN", &lun), ("name", &name)], false),
        SnapshotCmd::Rollback {
            lun,
            name,
            force,
            admin: a,
        } => send(a, "rollback", &[("LUN", &lun), ("name", &name)], force),
        SnapshotCmd::Apply {
            lun,
            file,
            force,
            admin: a,
        } => match std::fs::canonicalize(&file) {
            // The daemon opens the file: give it a path that does not depend on our cwd.
            Ok(p) => send(
                a,
                "apply",
                &[("LUN", &lun), ("file", &p.to_string_lossy())],
                force,
            ),
            Err(e) => {
                eprintln!("twinsan snapshot apply: {}: {e}", file.display());
                Err(ExitCode::from(1))
            }
        },
        SnapshotCmd::Export {
            lun,
            name,
            as_lun,
            admin: a,
        } => export(&lun, &name, &as_lun, &a),
        SnapshotCmd::Ship {
            lun,
            snapshot,
            from,
            to,
            psk_file,
            as_lun,
            rate,
            admin: a,
        } => ship(
            &lun,
            &snapshot,
            from.as_deref(),
            &to,
            &psk_file,
            as_lun.as_deref(),
            rate.as_deref(),
            a,
        ),
        SnapshotCmd::Diff {
            lun,
            from,
            to,
            output,
            admin: a,
        } => diff(&lun, from.as_deref(), &to, output, a),
    };
    r.unwrap_or_else(|code| code)
}

/// What `snapshot info` says of one snapshot.
struct Info {
    guid: u64,
    path: PathBuf,
    size_bytes: u64,
    block_size: u32,
    created_unix_ms: u64,
}

fn info(socket: &std::path::Path, lun: &str, name: &str) -> Result<Info, String> {
    let reply = engine::admin::request(socket, &format!("snapshot info {lun} {name}"))
        .map_err(|e| format!("cannot reach the daemon at {}: {e}", socket.display()))?;
    let body = reply
        .strip_prefix("ok\n")
        .ok_or_else(|| reply.trim_end().trim_start_matches("error: ").to_string())?;
    let field = |k: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(' '))
            .ok_or_else(|| format!("the daemon's answer lacks {k}"))
    };
    let num = |k: &str| field(k).and_then(|v| v.parse::<u64>().map_err(|e| format!("{k}: {e}")));
    Ok(Info {
        guid: u64::from_str_radix(field("guid")?, 16).map_err(|e| format!("guid: {e}"))?,
        path: PathBuf::from(field("path")?),
        size_bytes: num("size_bytes")?,
        block_size: num("block_size")? as u32,
        created_unix_ms: num("created_unix_ms")?,
    })
}

/// The clones and header of the stream from `from` (or nothing) to `to`.
fn prepare(
    socket: &std::path::Path,
    lun: &str,
    from: Option<&str>,
    to: &str,
) -> Result<
    (
        std::fs::File,
        Option<std::fs::File>,
        replica::snapshot::stream::Header,
    ),
    String,
> {
    let to_name = replica::snapshot::SnapshotName::parse(to).map_err(|e| e.to_string())?;
    let to_info = info(socket, lun, to)?;
    let from_info = from.map(|f| info(socket, lun, f)).transpose()?;
    let open =
        |p: &std::path::Path| std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()));
    let to_file = open(&to_info.path)?;
    let from_file = from_info.as_ref().map(|i| open(&i.path)).transpose()?;
    let header = replica::snapshot::stream::Header {
        block_size: to_info.block_size,
        size_bytes: to_info.size_bytes,
        from_guid: from_info.as_ref().map_or(0, |i| i.guid),
        to_guid: to_info.guid,
        to_name,
        created_unix_ms: to_info.created_unix_ms,
    };
    Ok((to_file, from_file, header))
}

#[allow(clippy::too_many_arguments)]
fn ship(
    lun: &str,
    snapshot: &str,
    from: Option<&str>,
    to: &str,
    psk_file: &std::path::Path,
    as_lun: Option<&str>,
    rate: Option<&str>,
    a: AdminArgs,
) -> Result<ExitCode, ExitCode> {
    let fail = |e: String| {
        eprintln!("twinsan snapshot ship: {e}");
        ExitCode::from(1)
    };
    let psk = std::fs::read_to_string(psk_file)
        .map_err(|e| fail(format!("{}: {e}", psk_file.display())))?;
    let rate = rate
        .map(benches::args::parse_size)
        .transpose()
        .map_err(|e| fail(format!("--rate: {e}")))?
        .unwrap_or(0);
    let socket = admin_socket(a)?;
    let (to_file, from_file, header) = prepare(&socket, lun, from, snapshot).map_err(fail)?;
    let there = as_lun.unwrap_or(lun);
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let shipped = engine::snapshot::ship::send(
        to,
        psk.trim_end().as_bytes(),
        there,
        header.to_guid,
        rate,
        progress,
        |w| {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, w);
            engine::snapshot::diff::write_diff(from_file.as_ref(), &to_file, &header, &mut w)
                .map(|_| ())
        },
    )
    .map_err(fail)?;
    if shipped.resumed_at > 0 {
        println!(
            "resumed at byte {} (the receiver had them)",
            shipped.resumed_at
        );
    }
    println!("sent {} bytes; {}", shipped.sent, shipped.answer);
    Ok(ExitCode::SUCCESS)
}

fn diff(
    lun: &str,
    from: Option<&str>,
    to: &str,
    output: Option<PathBuf>,
    a: AdminArgs,
) -> Result<ExitCode, ExitCode> {
    use std::io::Write;
    let fail = |e: String| {
        eprintln!("twinsan snapshot diff: {e}");
        ExitCode::from(1)
    };
    let socket = admin_socket(a)?;
    let (to_file, from_file, header) = prepare(&socket, lun, from, to).map_err(fail)?;
    let out: Box<dyn Write> = match &output {
        Some(p) => {
            Box::new(std::fs::File::create(p).map_err(|e| fail(format!("{}: {e}", p.display())))?)
        }
        None if std::io::IsTerminal::is_terminal(&std::io::stdout()) => {
            return Err(fail(
                "the stream is binary: redirect stdout or pass --output FILE".into(),
            ))
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let mut out = std::io::BufWriter::with_capacity(4 << 20, out);
    let t = engine::snapshot::diff::write_diff(from_file.as_ref(), &to_file, &header, &mut out)
        .map_err(|e| fail(e.to_string()))?;
    eprintln!(
        "twinsan snapshot diff: {} data bytes in {} records, {} zeroed bytes in {} records",
        t.data_bytes, t.data_records, t.zero_bytes, t.zero_records
    );
    Ok(ExitCode::SUCCESS)
}

fn export(lun: &str, name: &str, as_lun: &str, a: &AdminArgs) -> Result<ExitCode, ExitCode> {
    let fail = |e: String| {
        eprintln!("twinsan snapshot export: {e}");
        ExitCode::from(1)
    };
    let (target, id) = as_lun
        .rsplit_once('/')
        .and_then(|(t, id)| Some((t.to_string(), id.parse::<u64>().ok()?)))
        .ok_or_else(|| fail(format!("--as {as_lun:?}: expected TARGET/ID")))?;
    let socket = admin_socket(AdminArgs {
        config: a.config.clone(),
        socket: a.socket.clone(),
    })?;
    let i = info(&socket, lun, name).map_err(fail)?;
    let path = i.path.to_string_lossy().into_owned();
    Ok(crate::lun_edit::edit_then_reload(
        "snapshot export",
        a,
        |text| {
            let mut doc: toml_edit::DocumentMut = text
                .parse()
                .map_err(|e| format!("the file is not valid TOML: {e}"))?;
            let mut l = toml_edit::Table::new();
            l["id"] = toml_edit::value(id as i64);
            l["path"] = toml_edit::value(path.as_str());
            l["size"] = toml_edit::value(i.size_bytes as i64);
            l["block_size"] = toml_edit::value(i64::from(i.block_size));
            l["read_only"] = toml_edit::value(true);
            l.decor_mut().set_prefix(format!(
                "\n# snapshot {name} of {lun}, exported read-only (twinsan snapshot export)\n"
            ));
            crate::lun_edit::add_lun_table(&mut doc, &target, id, l)?;
            Ok((doc.to_string(), "reload"))
        },
    ))
}
