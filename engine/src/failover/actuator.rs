//! The actuator thread: carries out, in order, the controller's actions that block
//! (a promotion waits for the apply side to go quiet, a demotion drains running writes, the
//! fence command runs, netlink and ARP talk to the kernel) and reports what changed.

use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use failover::controller::{Action, Guard};

use crate::config::{FailoverConfig, Role};
use crate::registry::Registry;
use crate::vip::Vip;

/// Gratuitous ARPs after the VIP is added: the first at once, then these more.
const ARP_REPEATS: u32 = 2;
const ARP_INTERVAL_MS: u64 = 100;
/// Tickle ACKs per old connection (a lost one costs the initiator a retransmission wait).
const TICKLES_PER_CONNECTION: u32 = 2;
/// Longest a fence command may run before it counts as failed.
const FENCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Work for the actuator.
pub enum Job {
    Act(Action),
    /// Tickle these initiator connections (the peer's, as it last sent them).
    Tickle(Vec<SocketAddrV4>),
}

/// What the actuator reports back.
pub enum Done {
    Fenced(bool),
    /// The role changed (or a promotion was refused): the controller reads the new view.
    RoleChanged,
}

struct Actuator {
    reg: Arc<Registry>,
    guard: Guard,
    vip: Option<Vip>,
    vip_lifetime_s: u32,
    iscsi_port: u16,
    fence_command: Option<String>,
    peer: String,
    done: Sender<Done>,
}

/// Starts the actuator; returns the VIP guard process (kept by the caller: its stdin
/// closing, when this process dies, removes the VIP).
pub fn start(
    reg: Arc<Registry>,
    fo: &FailoverConfig,
    jobs: Receiver<Job>,
    done: Sender<Done>,
) -> std::io::Result<Option<std::process::Child>> {
    let vip = match &fo.vip {
        Some(v) => Some(
            Vip::resolve(v.addr, v.prefix_len, &v.interface)
                .map_err(|e| std::io::Error::other(format!("failover.vip: {e}")))?,
        ),
        None => None,
    };
    // A node that starts must not hold the address from an earlier run (killed before its
    // guard could act, say): it is added back only when the controller says so.
    if let Some(v) = &vip {
        if let Err(e) = v.remove() {
            tracing::warn!(error = %e, "could not remove a leftover VIP at start");
        }
    }
    let guard_child = match &fo.vip {
        Some(v) => Some(super::vip_guard::spawn(&super::vip_guard::GuardArgs {
            vip: v.clone(),
            iscsi_listen: reg.config.listen,
            release_wait_ms: fo.timings.lease_ms() / 2,
        })?),
        None => None,
    };
    // Twice the lease, in whole seconds (the kernel's unit; it checks lifetimes with up to
    // a second's slack), renewed every keepalive. It only matters when this process stops
    // without dying (SIGSTOP, a hang): death is the guard's job. The shorter, the shorter
    // such a node keeps answering ARP for the address after its peer took over (the rig
    // measured 1.5 s of overlap with 2 s).
    let vip_lifetime_s = (fo.timings.lease_ms() * 2).div_ceil(1000).max(1) as u32;
    let a = Actuator {
        iscsi_port: reg.config.listen.port(),
        peer: reg
            .config
            .peer
            .as_ref()
            .map(|p| p.name.clone())
            .unwrap_or_default(),
        reg,
        guard: fo.guard(),
        vip,
        vip_lifetime_s,
        fence_command: fo.fence_command.clone(),
        done,
    };
    std::thread::Builder::new()
        .name("twinsan-failover-act".into())
        .spawn(move || {
            // Real-time too (below the controller): a VIP renewal that a saturated CPU
            // delays past the address's lifetime would drop it under the initiators.
            super::driver::raise_priority(5);
            for j in jobs {
                a.run(j);
            }
        })?;
    Ok(guard_child)
}

impl Actuator {
    fn run(&self, j: Job) {
        match j {
            Job::Act(a) => self.act(a),
            Job::Tickle(peers) => self.tickle(&peers),
        }
    }

    fn act(&self, a: Action) {
        match a {
            Action::Promote => {
                self.promote();
                let _ = self.done.send(Done::RoleChanged);
            }
            Action::Demote => {
                let prev = self.reg.set_role(Role::Secondary);
                let _ = self.done.send(Done::RoleChanged);
                if prev == Role::Primary {
                    if let Some(rep) = self.reg.replication.get() {
                        let timeout_ms = self
                            .reg
                            .config
                            .peer
                            .as_ref()
                            .map_or(0, |p| p.replica_timeout_ms);
                        let drained = rep.drain_after_demotion(
                            &self.reg,
                            Duration::from_millis(timeout_ms + 2_000),
                        );
                        if !drained {
                            tracing::warn!(
                                "demoted with writes still running (the peer may be hung)"
                            );
                        }
                    }
                }
            }
            Action::OutdatePeer => {
                if let Some(rep) = self.reg.replication.get() {
                    if !rep.outdate_peer() {
                        tracing::error!(
                            "the peer-outdated record could not be persisted: \
                             I/O stays suspended on the LUNs concerned"
                        );
                    }
                }
            }
            Action::AddVip => {
                if let Some(v) = &self.vip {
                    if let Err(e) = v.add(self.vip_lifetime_s) {
                        tracing::error!(error = %e, "adding the VIP failed");
                    }
                }
            }
            Action::RemoveVip => {
                if let Some(v) = &self.vip {
                    if let Err(e) = v.remove() {
                        tracing::error!(error = %e, "removing the VIP failed");
                    }
                }
            }
            Action::Announce => self.announce(),
            Action::Fence => {
                let ok = self.fence();
                let _ = self.done.send(Done::Fenced(ok));
            }
            // Sent by the controller thread itself.
            Action::Heartbeat(_) | Action::Witness(_) | Action::Tickle => {}
        }
    }

    fn promote(&self) {
        let Some(rep) = self.reg.replication.get() else {
            self.reg.set_role(Role::Primary);
            return;
        };
        // With a witness the lease decided (the old primary's lease has ended at the
        // witness, so it serves no more); without one, ask a reachable peer as
        // `twinsan promote` does, so a stale heartbeat cannot make two primaries.
        if self.guard != Guard::Witness {
            if let Some(why) = rep.promote_refusal() {
                tracing::warn!(reason = %why, "automatic promotion refused");
                return;
            }
        }
        if !rep.fence_for_promotion() {
            tracing::warn!("a message from the old primary was still being applied at promotion");
        }
        self.reg.set_role(Role::Primary);
    }

    fn announce(&self) {
        let Some(v) = &self.vip else { return };
        if let Err(e) = crate::vip::arp::announce(v.ifindex, v.addr, 1, 0) {
            tracing::warn!(error = %e, "gratuitous ARP failed");
        }
        // The repeats in the background: the tickles must not wait for them.
        let (ifindex, addr) = (v.ifindex, v.addr);
        let _ = std::thread::Builder::new()
            .name("twinsan-garp".into())
            .spawn(move || {
                std::thread::sleep(Duration::from_millis(ARP_INTERVAL_MS));
                let _ = crate::vip::arp::announce(ifindex, addr, ARP_REPEATS, ARP_INTERVAL_MS);
            });
    }

    fn tickle(&self, peers: &[SocketAddrV4]) {
        let Some(v) = &self.vip else { return };
        let from = SocketAddrV4::new(v.addr, self.iscsi_port);
        for p in peers {
            if let Err(e) = crate::vip::tickle::tickle(from, *p, TICKLES_PER_CONNECTION) {
                tracing::debug!(error = %e, peer = %p, "tickle failed");
            }
        }
        if !peers.is_empty() {
            tracing::info!(
                connections = peers.len(),
                "tickled the old primary's initiator connections"
            );
        }
    }

    /// Runs `fence_command` (through `sh -c`, with TWINSAN_PEER naming the peer); success
    /// is exit status 0 within FENCE_TIMEOUT.
    fn fence(&self) -> bool {
        let Some(cmd) = &self.fence_command else {
            return false;
        };
        tracing::warn!(command = %cmd, peer = %self.peer, "fencing the peer");
        let child = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(cmd)
            .env("TWINSAN_PEER", &self.peer)
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "fence_command could not start");
                return false;
            }
        };
        let t = std::time::Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if t.elapsed() < FENCE_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    tracing::error!("fence_command timed out");
                    return false;
                }
            }
        }
    }
}
