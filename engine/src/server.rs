//! Starting and stopping the daemon's core threads.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;

use crate::config::{Config, Overrides, SpillWrites};
use crate::disk::spill::SpillGates;
use crate::health::CoreBeats;
use crate::lun::LunError;
use crate::net::reactor::Reactor;
use crate::registry::Registry;

/// Pending connections per listener before the kernel refuses more.
const LISTEN_BACKLOG: i32 = 1024;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Lun(#[from] LunError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("replica link: {source}")]
    Replica { source: std::io::Error },
    #[error("core {core}: cannot set up io_uring: {source}")]
    Ring { core: usize, source: std::io::Error },
    #[error("cannot start the snapshot schedule thread: {0}")]
    Thread(std::io::Error),
}

/// A running daemon.
pub struct Server {
    pub local_addr: SocketAddr,
    pub registry: Arc<Registry>,
    /// Each core thread's tick count (the systemd watchdog's evidence that they run).
    pub beats: Arc<CoreBeats>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// A TCP socket for `addr` with SO_REUSEADDR: binding over connections in TIME_WAIT from a
/// previous run is fine, binding beside a listener is not.
fn tcp_socket(addr: SocketAddr) -> std::io::Result<Socket> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    Ok(s)
}

fn listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = tcp_socket(addr)?;
    // One listener per core on the same port: the kernel spreads connections across them,
    // so each connection lands on one core and stays there.
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(LISTEN_BACKLOG)?;
    Ok(s.into())
}

/// Whether something listens on `addr` (a probe bind without SO_REUSEPORT fails beside a
/// listener, whether it is bound to `addr` or to the wildcard address on its port).
pub fn listener_present(addr: SocketAddr) -> std::io::Result<bool> {
    let probe = tcp_socket(addr)?;
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(true),
        Err(e) => Err(e),
    }
}

/// Fails if anything already listens on `addr`. Why: our listeners share the port with
/// SO_REUSEPORT, and the kernel lets any other process of the same user join that group, so
/// a second daemon (say, with another data directory) would silently receive a share of the
/// connections. A socket without SO_REUSEPORT cannot bind beside a listener, so a probe bind
/// tells. Port 0 asks for a fresh port and needs no probe.
///
/// A daemon that was just killed keeps listening for a moment: its io_uring holds the
/// listeners (pending accepts) until the kernel tears the ring down after the process has
/// gone, 0.1 to 0.15 s here. So a busy port is probed again for up to
/// [`PORT_BUSY_WAIT_MS`] before we give up: a restart right after a crash (systemd's
/// `Restart=`) must not fail, and a live listener never goes away.
fn ensure_port_free(addr: SocketAddr) -> std::io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let mut told = false;
    while listener_present(addr)? {
        if started.elapsed() >= std::time::Duration::from_millis(PORT_BUSY_WAIT_MS) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "address in use: another twinsan or another iSCSI target already listens there",
            ));
        }
        if !std::mem::replace(&mut told, true) {
            tracing::info!(%addr, "address busy, waiting for it to be released (a daemon that just stopped?)");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

/// How long a busy listening address may take to be released before the start fails.
const PORT_BUSY_WAIT_MS: u64 = 3000;

impl Server {
    /// Opens every LUN, binds the listeners and starts one pinned thread per core.
    pub fn start(config: Config) -> Result<Server, ServeError> {
        Self::start_with(config, Default::default())
    }

    /// As [`Server::start`], remembering the command-line overrides the config was read
    /// with: a reload reads the file again with the same ones.
    pub fn start_with(config: Config, overrides: Overrides) -> Result<Server, ServeError> {
        let want = config.listen;
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let n = match config.cores {
            0 => cores.len().max(1),
            n => n,
        };
        ensure_port_free(want).map_err(|source| ServeError::Listen { addr: want, source })?;
        let first = listener(want).map_err(|source| ServeError::Listen { addr: want, source })?;
        let local_addr = first
            .local_addr()
            .map_err(|source| ServeError::Listen { addr: want, source })?;
        let registry = Arc::new(Registry::build(config, local_addr, overrides)?);
        let _ = registry
            .files_acks
            .set((0..n).map(|_| Default::default()).collect());
        // Counted only when served: with no `metrics_listen` the command path reads no
        // clock and bumps no counter (benches/ab-bench compares the two, AB_*_SERVER).
        // Counters for every slot: a LUN added online is counted from its first command.
        if let Some(addr) = registry.config.metrics_listen {
            let metrics = crate::metrics::Metrics::new(n, crate::registry::MAX_LUNS);
            let _ = registry.metrics.set(Arc::clone(&metrics));
            crate::metrics::http::spawn(addr, metrics, Arc::clone(&registry))
                .map_err(|source| ServeError::Listen { addr, source })?;
        }
        crate::snapshot::schedule::spawn(&registry).map_err(ServeError::Thread)?;
        if let Some(r) = registry.config.snapshot_receive.clone() {
            crate::snapshot::ship::serve(&r, &registry).map_err(|source| ServeError::Listen {
                addr: r.listen,
                source,
            })?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let beats = Arc::new(CoreBeats::new(n));
        let mut listeners = vec![first];
        for _ in 1..n {
            listeners.push(listener(local_addr).map_err(|source| ServeError::Listen {
                addr: local_addr,
                source,
            })?);
        }
        // Each connection to the core thread on the CPU that handles its packets (steer.rs).
        if !cores.is_empty() {
            let cpu_of: Vec<usize> = (0..n).map(|i| cores[i % cores.len()].id).collect();
            if let Some(prog) = crate::net::steer::program(&cpu_of) {
                if let Err(e) = crate::net::steer::attach(&listeners[0], &prog) {
                    // Still correct without it: the kernel hashes connections to threads.
                    tracing::warn!(error = %e, "connection steering unavailable");
                }
            }
        }
        // The replica link, when a peer is configured: one link per core.
        let mut links: Vec<Option<crate::replication::CoreLink>> = (0..n).map(|_| None).collect();
        if registry.config.peer.is_some() {
            let cpu_of = match cores.is_empty() {
                true => Vec::new(),
                false => (0..n).map(|i| cores[i % cores.len()].id).collect(),
            };
            let (rep, core_links) = crate::replication::Replication::start(&registry, n, cpu_of)
                .map_err(|source| ServeError::Replica { source })?;
            let _ = registry.replication.set(rep);
            for (i, l) in core_links.into_iter().enumerate() {
                links[i] = Some(l);
            }
        }
        // Large writes may move to a helper while a core's CPU is saturated and another CPU
        // has room (spill.rs); with one CPU there is nowhere to move them.
        let spill_gates = match registry.config.spill_writes {
            SpillWrites::Auto => (cores.len() >= 2).then(|| Arc::new(SpillGates::new(n))),
            SpillWrites::Always => Some(Arc::new(SpillGates::always())),
            SpillWrites::Off => None,
        };
        let sample = registry.config.spill_writes == SpillWrites::Auto;
        // Build every ring before starting any thread, so a failure leaves nothing running.
        let mut reactors = Vec::new();
        for ((core, l), link) in listeners.into_iter().enumerate().zip(links) {
            let spill = spill_gates.as_ref().map(|g| {
                (
                    Arc::clone(g),
                    cores.get(core % cores.len().max(1)).map(|c| c.id),
                )
            });
            let r = Reactor::new(
                core,
                l,
                Arc::clone(&registry),
                Arc::clone(&stop),
                Arc::clone(&beats),
                link,
                spill,
            )
            .map_err(|source| ServeError::Ring { core, source })?;
            reactors.push(r);
        }
        let mut threads = Vec::new();
        if let Some(gates) = spill_gates.filter(|_| sample) {
            let cpu_of: Vec<usize> = (0..n).map(|i| cores[i % cores.len()].id).collect();
            let stop = Arc::clone(&stop);
            let t = std::thread::Builder::new()
                .name("twinsan-cpuload".into())
                .spawn(move || crate::disk::spill::run_sampler(gates, cpu_of, stop))
                .map_err(|source| ServeError::Ring { core: 0, source })?;
            threads.push(t);
        }
        for (core, mut r) in reactors.into_iter().enumerate() {
            let pin = cores.get(core % cores.len().max(1)).copied();
            let t = std::thread::Builder::new()
                .name(format!("twinsan-core{core}"))
                .spawn(move || {
                    if let Some(id) = pin {
                        core_affinity::set_for_current(id);
                    }
                    r.run();
                })
                .map_err(|source| ServeError::Ring { core, source })?;
            threads.push(t);
        }
        if registry.config.failover.is_some() {
            let handle = crate::failover::start(Arc::clone(&registry))
                .map_err(|source| ServeError::Replica { source })?;
            let _ = registry.failover.set(handle);
        }
        if let Err(e) = crate::admin::serve(&registry.config.admin_socket, Arc::clone(&registry)) {
            // The data path works without it; say clearly that status/promote will not.
            tracing::error!(path = %registry.config.admin_socket.display(), error = %e, "admin socket unavailable");
        }
        tracing::info!(%local_addr, cores = n, luns = registry.luns.len(), role = ?registry.role(), "serving");
        Ok(Server {
            local_addr,
            registry,
            beats,
            stop,
            threads,
        })
    }

    /// Asks every core to stop.
    pub fn stop_handle(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// Waits for every core thread to finish (after a stop).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }

    pub fn shutdown(self) {
        self.stop.store(true, Ordering::Relaxed);
        let reg = Arc::clone(&self.registry);
        self.join();
        // Every core has drained: nothing is in flight, the replica state is final.
        if let Some(rep) = reg.replication.get() {
            rep.clean_shutdown();
        }
    }
}
