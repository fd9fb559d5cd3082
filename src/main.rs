//! `twinsan`: the daemon and its tools in one binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use engine::config::{Config, Overrides};
use engine::server::Server;

mod generate;
mod lun_edit;
mod service;
mod snapshot_cli;

/// mimalloc instead of glibc malloc: replicated writes allocate a buffer on a core thread and
/// free it on a link thread, and glibc serializes such cross-thread frees on the arena lock
/// (perf showed the lock's futex wakes on the write path).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "twinsan",
    version,
    about = "A redundant, thin-provisioned iSCSI SAN"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon. Without --config: one 10 GiB sparse LUN under ./data on 127.0.0.1:3260.
    Serve {
        /// TOML configuration file (see README.md, "Configuration").
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address, overriding the file: ADDRESS:PORT (port 0 picks a free one).
        #[arg(long)]
        listen: Option<String>,
        /// Directory for backing files given by relative paths, overriding the file.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Drive any iSCSI target with load and report IOPS, MiB/s and latency percentiles
    /// (`--verify` checks every read against the last acknowledged write).
    // Boxed: its options outweigh every other subcommand's many times over.
    Bench(Box<benches::BenchArgs>),
    /// Show role, peer, LUN states and sessions of a running daemon.
    Status {
        /// One JSON document instead of the table, for scripts.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Make this node primary (serve initiator writes). Refused while the peer is primary
    /// and connected, or while this node's data is outdated or inconsistent.
    Promote {
        /// Promote anyway (the peer's link still stands but it is gone for initiators, or
        /// this node's data is to be served as it is).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Make this node secondary (initiators see the LUNs in standby).
    Demote(AdminArgs),
    /// Compare every region's digest with the peer's, online; `--repair` resyncs differences.
    Verify {
        #[arg(long)]
        repair: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Release I/O frozen by `on_peer_loss = "suspend"`: the peer is recorded outdated.
    OutdatePeer(AdminArgs),
    /// Resolve a split brain on the victim: discard this node's changes; the primary
    /// overwrites its data with a full resync.
    Resolve {
        /// Required: this discards data written on this node since the split.
        #[arg(long, required = true)]
        discard_local: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Automatic failover: hand over to the peer (on the primary) and do not take over
    /// until `takeover` (either node), for maintenance.
    Standby(AdminArgs),
    /// Automatic failover: clear standby, and ask an in-sync primary to hand over here.
    Takeover(AdminArgs),
    /// Snapshots: create, list, delete, rollback, diff, apply.
    Snapshot {
        #[command(subcommand)]
        op: snapshot_cli::SnapshotCmd,
    },
    /// Reread the config file and apply the difference online: targets and LUNs added or
    /// removed, LUNs grown, ACLs and CHAP (docs/operations.md, "Reload"). SIGHUP does the
    /// same. An invalid file, or a change that cannot be made online, changes nothing.
    Reload {
        /// Remove LUNs even if sessions use them (their commands to them then fail).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Add, grow or remove a LUN: edits the config file (--config, comments kept) and
    /// applies it like `reload`; the file is restored if the daemon refuses.
    Lun {
        #[command(subcommand)]
        cmd: lun_edit::LunCmd,
    },
    /// Run a witness: the third vote for any number of pairs (see docs/failover.md).
    Witness {
        /// UDP address to listen on, ADDRESS:PORT.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// TOML file: state_dir and one [[pair]] (id, key) per pair served.
        #[arg(long)]
        config: PathBuf,
    },
    /// Internal: removes the VIP when the daemon that started it dies (its stdin closes).
    #[command(hide = true)]
    VipGuard {
        #[arg(long)]
        interface: String,
        /// ADDRESS/PREFIX.
        #[arg(long)]
        vip: String,
        /// The daemon's iSCSI listening address: the guard removes the VIP once nothing
        /// listens there any more (so connections made to the dying daemon are reset).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The longest wait for that, in milliseconds.
        #[arg(long, default_value_t = 250)]
        release_wait_ms: u64,
    },
    /// Check a configuration file and print what it would serve.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print a shell completion script (e.g. `twinsan completions bash >
    /// /etc/bash_completion.d/twinsan`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page twinsan(1) (troff), or write one page per subcommand into a
    /// directory.
    Man {
        /// Write twinsan.1 and twinsan-SUBCOMMAND.1 here instead of printing twinsan.1.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
pub(crate) struct AdminArgs {
    /// The daemon's config file (its admin socket is read from it).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// The admin socket, overriding the config (default: ./data/twinsan.sock).
    #[arg(long)]
    pub(crate) socket: Option<PathBuf>,
}

/// The admin socket named by the arguments, or exit status 2 after saying why.
pub(crate) fn admin_socket(args: AdminArgs) -> Result<PathBuf, ExitCode> {
    match (args.socket, args.config) {
        (Some(s), _) => Ok(s),
        (None, cfg) => match load(cfg, &Overrides::default()) {
            Ok(c) => Ok(c.admin_socket),
            Err(e) => {
                eprintln!("twinsan: configuration error: {e}");
                Err(ExitCode::from(2))
            }
        },
    }
}

/// `status --json`: the daemon's JSON document without the "ok" line, so the output
/// parses as it is. Errors go to stderr with status 1, as for the other commands.
fn status_json(args: AdminArgs) -> ExitCode {
    let socket = match admin_socket(args) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match engine::admin::request(&socket, "status-json") {
        Ok(reply) => match reply.strip_prefix("ok\n") {
            Some(json) => {
                print!("{json}");
                ExitCode::SUCCESS
            }
            None => {
                eprint!("{reply}");
                ExitCode::from(1)
            }
        },
        Err(e) => unreachable_daemon(&socket, &e),
    }
}

/// An admin command could not reach the daemon at `socket`: said on stderr, status 1.
pub(crate) fn unreachable_daemon(socket: &std::path::Path, e: &std::io::Error) -> ExitCode {
    eprintln!(
        "twinsan: cannot reach the daemon at {}: {e}",
        socket.display()
    );
    ExitCode::from(1)
}

pub(crate) fn admin(args: AdminArgs, cmd: &str) -> ExitCode {
    let socket = match admin_socket(args) {
        Ok(s) => s,
        Err(code) => return code,
    };
    answered(&socket, engine::admin::request(&socket, cmd))
}

/// Prints the daemon's reply; status 0 for "ok", 1 otherwise or when it was unreachable.
fn answered(socket: &std::path::Path, reply: std::io::Result<String>) -> ExitCode {
    match reply {
        Ok(reply) => {
            print!("{reply}");
            if reply.starts_with("ok") {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => unreachable_daemon(socket, &e),
    }
}

/// `twinsan verify`: the daemon's report at the end; on a terminal, meanwhile, its
/// progress line from `status` (percent, rate, time left, regions differing so far) once a
/// second on stderr.
fn verify(args: AdminArgs, repair: bool) -> ExitCode {
    let socket = match admin_socket(args) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let cmd = if repair { "verify-repair" } else { "verify" };
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return answered(&socket, engine::admin::request(&socket, cmd));
    }
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shown = {
        let (done, socket) = (std::sync::Arc::clone(&done), socket.clone());
        std::thread::spawn(move || {
            let mut shown = false;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::sleep(std::time::Duration::from_secs(1));
                let Ok(status) = engine::admin::request(&socket, "status") else {
                    continue;
                };
                if let Some(line) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("note: verify: "))
                {
                    if !done.load(std::sync::atomic::Ordering::Acquire) {
                        eprint!("\rverify {line}   ");
                        shown = true;
                    }
                }
            }
            shown
        })
    };
    let reply = engine::admin::request(&socket, cmd);
    done.store(true, std::sync::atomic::Ordering::Release);
    if shown.join().unwrap_or(false) {
        eprintln!();
    }
    answered(&socket, reply)
}

fn load(config: Option<PathBuf>, ov: &Overrides) -> Result<Config, engine::config::ConfigError> {
    match config {
        Some(p) => Config::load(&p, ov),
        None => Config::embedded_default(ov),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve {
            config,
            listen,
            data_dir,
        } => {
            let ov = Overrides { listen, data_dir };
            let ov_for_file = ov.clone();
            let cfg = match load(config, &ov_for_file) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("twinsan: configuration error: {e}");
                    return ExitCode::from(2);
                }
            };
            let signals = service::block_stop_signals();
            let server = match Server::start_with(cfg, ov) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("twinsan: cannot start: {e}");
                    return ExitCode::from(1);
                }
            };
            // Tests and scripts read the bound address (useful with port 0) from stdout. A
            // closed stdout must not stop a storage daemon: write errors are ignored.
            {
                use std::io::Write;
                let mut o = std::io::stdout().lock();
                let _ = writeln!(o, "listening on {}", server.local_addr);
                for (_, t) in server.registry.view().live() {
                    let _ = writeln!(
                        o,
                        "target {} luns {:?}",
                        t.cfg.name,
                        t.luns.iter().map(|l| l.0).collect::<Vec<_>>()
                    );
                }
                let _ = o.flush();
            }
            service::ready(&server);
            let sig = service::wait_for_stop(&signals, &server.beats, &|| service::reload(&server));
            tracing::info!(signal = sig, "stopping");
            service::stopping();
            server.shutdown();
            ExitCode::SUCCESS
        }
        Cmd::Status {
            json: false,
            admin: a,
        } => admin(a, "status"),
        Cmd::Status {
            json: true,
            admin: a,
        } => status_json(a),
        Cmd::Completions { shell } => match generate::completions(shell) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("twinsan completions: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::Man { out_dir } => match generate::man(out_dir.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("twinsan man: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::Promote { force, admin: a } => {
            admin(a, if force { "promote-force" } else { "promote" })
        }
        Cmd::Demote(a) => admin(a, "demote"),
        Cmd::Reload { force, admin: a } => admin(a, if force { "reload-force" } else { "reload" }),
        Cmd::Lun { cmd } => lun_edit::run(cmd),
        Cmd::Verify { repair, admin: a } => verify(a, repair),
        Cmd::OutdatePeer(a) => admin(a, "outdate-peer"),
        Cmd::Snapshot { op } => snapshot_cli::run(op),
        Cmd::Standby(a) => admin(a, "standby"),
        Cmd::Takeover(a) => admin(a, "takeover"),
        Cmd::Witness { listen, config } => {
            match engine::failover::witness_server::serve(listen, &config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("twinsan witness: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::VipGuard {
            interface,
            vip,
            listen,
            release_wait_ms,
        } => {
            let parsed = vip.split_once('/').and_then(|(a, p)| {
                Some(engine::config::VipConfig {
                    addr: a.parse().ok()?,
                    prefix_len: p.parse().ok()?,
                    interface,
                })
            });
            let Some(v) = parsed else {
                eprintln!("twinsan vip-guard: --vip must be ADDRESS/PREFIX");
                return ExitCode::from(2);
            };
            let args = engine::failover::vip_guard::GuardArgs {
                vip: v,
                iscsi_listen: listen,
                release_wait_ms,
            };
            match engine::failover::vip_guard::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("twinsan vip-guard: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Resolve {
            discard_local: true,
            admin: a,
        } => admin(a, "resolve-discard-local"),
        Cmd::Resolve { .. } => {
            eprintln!("twinsan resolve: pass --discard-local to discard this node's data");
            ExitCode::from(2)
        }
        Cmd::Bench(args) => match benches::run_cli(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("twinsan bench: {e:#}");
                ExitCode::from(1)
            }
        },
        Cmd::CheckConfig { config } => match Config::load(&config, &Overrides::default()) {
            Ok(c) => {
                println!(
                    "{}: ok: listen {}, {} target(s)",
                    c.source_name(),
                    c.listen,
                    c.targets.len()
                );
                for t in &c.targets {
                    for l in &t.luns {
                        println!(
                            "  {} lun {} -> {} ({} bytes)",
                            t.name,
                            l.id,
                            l.path.display(),
                            l.size_bytes
                        );
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("twinsan: configuration error: {e}");
                ExitCode::from(2)
            }
        },
    }
}
