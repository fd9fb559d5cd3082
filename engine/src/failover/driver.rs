//! The controller thread: sockets in, the controller's actions out.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender};
use failover::controller::{Action, Config as CtlConfig, Controller, Guard, Note, ReplicaView};
use failover::wire::{self, Body, Key, ReplayWindow, SeqCounter, WITNESS_SENDER};
use failover::NodeId;

use super::actuator::{self, Done, Job};
use super::{boot_clock_ms, AdminRequest, FailoverHandle};
use crate::config::{FailoverConfig, Role};
use crate::registry::Registry;

/// The controller thread's longest sleep: how stale the replica's view may get before the
/// controller sees it (a role change, frozen writes).
const VIEW_POLL_MS: u64 = 20;
/// How often the primary sends its initiator connections to the peer: every heartbeat's
/// worth, so that a connection made (or a peer restarted) just before a crash is known to
/// the survivor. A connection it does not know waits for the initiator's own timeout
/// (the rig measured 2 s stalls with 500 ms). Reading /proc/net/tcp ten times a second
/// costs little next to the heartbeats themselves.
const SESSIONS_EVERY_MS: u64 = 100;
/// Actions waiting for the actuator (a bound: it runs them in order; the controller makes
/// a few per takeover and one VIP renewal per keepalive).
const MAX_QUEUED_JOBS: usize = 256;
/// Operator commands (standby, takeover) waiting for the controller thread: each admin
/// connection waits for its answer, so a few at once is all there ever is; a full queue
/// makes the admin command wait, never the controller.
const MAX_QUEUED_ADMIN: usize = 8;

/// Which node of the pair this is: the one whose replica endpoint sorts first is node 0.
/// Both nodes compute the same from their mirrored configurations, with no extra setting.
pub fn node_id(listen: SocketAddr, peer: SocketAddr) -> NodeId {
    NodeId(u8::from(listen > peer))
}

/// Starts the failover threads for `reg` (which has a peer and `[failover]`).
pub fn start(reg: Arc<Registry>) -> std::io::Result<FailoverHandle> {
    let (Some(fo), Some(peer)) = (reg.config.failover.clone(), reg.config.peer.clone()) else {
        return Err(std::io::Error::other(
            "failover needs [peer] and [failover]",
        ));
    };
    let node = node_id(peer.listen, peer.address);
    let guard = fo.guard();
    match guard {
        Guard::Witness => {}
        Guard::Fence => tracing::warn!(
            "failover without a witness: a takeover waits for fence_command, and a pair whose \
             fence does not really stop the peer can split brain"
        ),
        Guard::Manual => tracing::warn!(
            "failover with neither witness nor fence_command: a silent peer is never taken \
             over automatically (clean handovers only); such a pair relies on the operator"
        ),
    }
    let mut sockets = Vec::new();
    for p in &fo.paths {
        let s = UdpSocket::bind(p.listen)?;
        s.set_nonblocking(true)?;
        sockets.push(s);
    }
    let witness_socket = match fo.witness {
        Some(w) => {
            let any: SocketAddr = if w.is_ipv4() {
                "0.0.0.0:0".parse().map_err(std::io::Error::other)?
            } else {
                "[::]:0".parse().map_err(std::io::Error::other)?
            };
            let s = UdpSocket::bind(any)?;
            s.set_nonblocking(true)?;
            Some(s)
        }
        None => None,
    };
    let (admin_tx, admin_rx) = crossbeam_channel::bounded(MAX_QUEUED_ADMIN);
    let (job_tx, job_rx) = crossbeam_channel::bounded(MAX_QUEUED_JOBS);
    let (done_tx, done_rx) = crossbeam_channel::bounded(MAX_QUEUED_JOBS);
    let status = Arc::new(Mutex::new(String::new()));
    let figures = Arc::new(super::FailoverFigures::new(fo.paths.len()));
    // Sequence numbers and request ids above every earlier run's, whatever the clock did.
    let first = failover::wire::first_of_boot(super::boot_count::next(
        &reg.config.data_dir,
        "failover.boot",
        super::boot_count::wall_secs(),
    )?);
    let guard_child = actuator::start(Arc::clone(&reg), &fo, job_rx, done_tx)?;
    let mut d = Driver {
        key: Key::derive(&peer.psk),
        pair_id: fo.pair_id.clone().into_bytes(),
        node,
        ctl: Controller::new(
            CtlConfig {
                node,
                paths: fo.paths.len(),
                timings: fo.timings,
                guard,
                auto_failback: fo.auto_failback,
                preferred: reg.config.role == Role::Primary,
            },
            ReplicaView::default(),
            boot_clock_ms(),
            first,
        ),
        sockets,
        witness_socket,
        seq: SeqCounter::starting_at(first),
        peer_window: ReplayWindow::default(),
        witness_window: ReplayWindow::default(),
        jobs: job_tx,
        done: done_rx,
        admin: admin_rx,
        status: Arc::clone(&status),
        figures: Arc::clone(&figures),
        reg,
        fo,
        view: None,
        dropped: Dropped::default(),
        next_sessions_ms: 0,
        peer_sessions: Vec::new(),
        _guard_child: guard_child,
    };
    std::thread::Builder::new()
        .name("twinsan-failover".into())
        .spawn(move || {
            raise_priority(10);
            d.run();
        })?;
    Ok(FailoverHandle {
        admin_tx,
        status,
        figures,
    })
}

/// Datagrams dropped, by why (shown by `status`).
#[derive(Default)]
struct Dropped {
    forged: u64,
    replayed: u64,
    foreign: u64,
}

struct Driver {
    key: Key,
    pair_id: Vec<u8>,
    node: NodeId,
    ctl: Controller,
    sockets: Vec<UdpSocket>,
    witness_socket: Option<UdpSocket>,
    seq: SeqCounter,
    peer_window: ReplayWindow,
    witness_window: ReplayWindow,
    jobs: Sender<Job>,
    done: Receiver<Done>,
    admin: Receiver<AdminRequest>,
    status: Arc<Mutex<String>>,
    figures: Arc<super::FailoverFigures>,
    reg: Arc<Registry>,
    fo: FailoverConfig,
    /// The view last reported to the controller.
    view: Option<ReplicaView>,
    dropped: Dropped,
    next_sessions_ms: u64,
    /// The peer's initiator connections, as it last sent them (tickled after a takeover).
    peer_sessions: Vec<SocketAddrV4>,
    /// The VIP guard process: it removes the VIP when this process dies (its stdin closes).
    _guard_child: Option<std::process::Child>,
}

impl Driver {
    fn run(&mut self) {
        loop {
            let now = boot_clock_ms();
            let wait_ms = self
                .ctl
                .poll_timeout()
                .saturating_sub(now)
                .min(VIEW_POLL_MS);
            self.wait_readable(wait_ms);
            self.receive();
            let now = boot_clock_ms();
            while let Ok(req) = self.admin.try_recv() {
                let answer = self.ctl.operator(now, req.op);
                let _ = req.reply.send(answer);
            }
            while let Ok(done) = self.done.try_recv() {
                match done {
                    Done::Fenced(ok) => self.ctl.fence_done(now, ok),
                    // A role change is reported whatever came of it (a refused promotion
                    // too): the controller waits for it.
                    Done::RoleChanged => {
                        let v = self.replica_view();
                        self.view = Some(v);
                        self.ctl.replica(now, v);
                    }
                }
            }
            let v = self.replica_view();
            if self.view != Some(v) {
                self.view = Some(v);
                self.ctl.replica(now, v);
            }
            if now >= self.ctl.poll_timeout() {
                self.ctl.handle_timeout(now);
            }
            self.act(now);
            if let Some(rep) = self.reg.replication.get() {
                rep.set_alone_until_ms(self.ctl.alone_until_ms());
            }
            self.send_sessions(now);
            self.log_notes();
            self.refresh_status(now);
        }
    }

    fn replica_view(&self) -> ReplicaView {
        let primary = self.reg.role() == Role::Primary;
        match self.reg.replication.get() {
            Some(rep) => rep.failover_view(primary, self.fo.guard() == Guard::Witness),
            None => ReplicaView {
                primary,
                ..ReplicaView::default()
            },
        }
    }

    fn wait_readable(&self, wait_ms: u64) {
        let mut fds: Vec<libc::pollfd> = self
            .sockets
            .iter()
            .chain(self.witness_socket.iter())
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures that lives across
        // the call; the sockets they name stay open (owned by self).
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                wait_ms as libc::c_int,
            );
        }
    }

    fn receive(&mut self) {
        let mut buf = [0u8; wire::MAX_DATAGRAM_LEN + 1];
        for i in 0..self.sockets.len() + usize::from(self.witness_socket.is_some()) {
            // Bounded per wake-up, so a flood on one socket cannot starve the others.
            for _ in 0..64 {
                let sock = match self.sockets.get(i) {
                    Some(s) => s,
                    None => match &self.witness_socket {
                        Some(s) => s,
                        None => break,
                    },
                };
                let Ok((n, _from)) = sock.recv_from(&mut buf) else {
                    break;
                };
                let now = boot_clock_ms();
                self.datagram(now, &buf[..n]);
            }
        }
    }

    fn datagram(&mut self, now: u64, bytes: &[u8]) {
        let d = match wire::open(&self.key, bytes) {
            Ok(d) => d,
            Err(_) => {
                self.dropped.forged += 1;
                return;
            }
        };
        if d.pair_id != self.pair_id || d.sender == self.node.0 {
            self.dropped.foreign += 1;
            return;
        }
        let window = if d.sender == WITNESS_SENDER {
            &mut self.witness_window
        } else {
            &mut self.peer_window
        };
        if window.accept(d.seq).is_err() {
            self.dropped.replayed += 1;
            return;
        }
        match d.body {
            Body::Heartbeat(hb) if d.sender != WITNESS_SENDER => self.ctl.heartbeat(now, d.seq, hb),
            Body::LeaseReply(r) => self.ctl.lease_reply(now, r),
            Body::Sessions(s) if d.sender != WITNESS_SENDER => {
                if s.part == 0 {
                    self.peer_sessions.clear();
                }
                for (ip, port) in s.list() {
                    if self.peer_sessions.len() < super::sessions::MAX_SESSIONS {
                        self.peer_sessions
                            .push(SocketAddrV4::new((*ip).into(), *port));
                    }
                }
            }
            _ => self.dropped.foreign += 1,
        }
    }

    fn act(&mut self, now: u64) {
        while let Some(a) = self.ctl.poll_action() {
            match a {
                Action::Heartbeat(hb) => {
                    let path = usize::from(hb.path);
                    let bytes = self.seal(&Body::Heartbeat(hb));
                    if let (Some(s), Some(p)) = (self.sockets.get(path), self.fo.paths.get(path)) {
                        // A full socket buffer or a down link: the deadtime covers it.
                        let _ = s.send_to(&bytes, p.peer);
                    }
                }
                Action::Witness(req) => {
                    let bytes = self.seal(&Body::LeaseRequest(req));
                    if let (Some(s), Some(w)) = (&self.witness_socket, self.fo.witness) {
                        let _ = s.send_to(&bytes, w);
                    }
                }
                Action::Tickle => {
                    let peers = std::mem::take(&mut self.peer_sessions);
                    self.job(Job::Tickle(peers));
                }
                other => self.job(Job::Act(other)),
            }
        }
        let _ = now;
    }

    fn job(&self, j: Job) {
        if self.jobs.try_send(j).is_err() {
            tracing::error!("failover actuator queue full: an action was dropped");
        }
    }

    fn seal(&mut self, body: &Body) -> Vec<u8> {
        let seq = self.seq.next_seq();
        wire::seal(&self.key, &self.pair_id, self.node.0, seq, body)
    }

    /// The primary sends its initiators' connections to the VIP to the peer (on the first
    /// path), for the tickles after a takeover.
    fn send_sessions(&mut self, now: u64) {
        if now < self.next_sessions_ms || self.reg.role() != Role::Primary {
            return;
        }
        self.next_sessions_ms = now + SESSIONS_EVERY_MS;
        let Some(vip) = &self.fo.vip else { return };
        let local = SocketAddrV4::new(vip.addr, self.reg.config.listen.port());
        let list = super::sessions::established_to(local);
        let per = wire::MAX_SESSIONS_PER_DATAGRAM;
        let parts = list.len().div_ceil(per).max(1);
        for part in 0..parts.min(usize::from(u8::MAX)) {
            let chunk = &list[(part * per).min(list.len())..((part + 1) * per).min(list.len())];
            let mut peers = [([0u8; 4], 0u16); wire::MAX_SESSIONS_PER_DATAGRAM];
            for (slot, a) in peers.iter_mut().zip(chunk) {
                *slot = (a.ip().octets(), a.port());
            }
            let body = Body::Sessions(wire::Sessions {
                part: part as u8,
                count: chunk.len() as u8,
                peers,
            });
            // Sealed per path: the same sequence number twice would be a replay.
            for i in 0..self.sockets.len() {
                let bytes = self.seal(&body);
                if let (Some(s), Some(p)) = (self.sockets.get(i), self.fo.paths.get(i)) {
                    let _ = s.send_to(&bytes, p.peer);
                }
            }
        }
    }

    fn log_notes(&mut self) {
        while let Some(n) = self.ctl.poll_note() {
            match n {
                Note::LateHeartbeat { path, gap_ms } => {
                    tracing::warn!(path, gap_ms, "late heartbeat (over warntime_ms)")
                }
                Note::PeerSilent => tracing::warn!("peer silent on every heartbeat path"),
                Note::PeerBack => tracing::info!("peer heard again"),
                Note::TookOver(why) => {
                    self.figures.took_over();
                    tracing::warn!(reason = why, "taking over as primary")
                }
                Note::GaveUp(why) => tracing::warn!(reason = why, "giving up the primary role"),
                Note::Refused(r) => tracing::info!(?r, "witness refused a lease request"),
                Note::NoGuard => tracing::error!(
                    "peer silent, but no witness and no fence_command: not taking over \
                     (`twinsan promote` by hand once the peer is known dead)"
                ),
                Note::FenceFailed => tracing::error!("fence_command failed; retrying"),
                Note::PromotionRefused => {
                    tracing::warn!("promotion refused (the peer answered as primary)")
                }
            }
        }
    }

    fn refresh_status(&self, now: u64) {
        let s = self.ctl.status(now);
        self.figures.set_ages(now, &s.path_age_ms);
        let ages: Vec<String> = s
            .path_age_ms
            .iter()
            .enumerate()
            .map(|(i, a)| match a {
                Some(ms) => format!("path{i} {ms} ms"),
                None => format!("path{i} never"),
            })
            .collect();
        let node = |n: Option<NodeId>| match n {
            Some(n) if n == self.node => "this node".to_string(),
            Some(_) => "the peer".to_string(),
            None => "none".to_string(),
        };
        let mut out = format!(
            "failover: node {} guard {:?} {}\n  heartbeats: {} (peer {})\n  lease: holder {}{}; \
             witness says outdated: {}\n  vip: {}\n",
            self.node.0,
            self.fo.guard(),
            if s.standby { "STANDBY" } else { "" },
            ages.join(", "),
            if s.peer_alive { "alive" } else { "silent" },
            node(s.lease_holder),
            s.lease_left_ms
                .map(|l| format!(" ({l} ms left here)"))
                .unwrap_or_default(),
            node(s.witness_outdated),
            match (&self.fo.vip, s.vip_held) {
                (Some(v), true) => format!("{}/{} on {} (held)", v.addr, v.prefix_len, v.interface),
                (Some(v), false) => format!("{}/{} not held", v.addr, v.prefix_len),
                (None, _) => "none configured".into(),
            }
        );
        if let Some((at, why)) = s.last_takeover {
            out.push_str(&format!(
                "  last takeover: {} ms ago: {why}\n",
                now.saturating_sub(at)
            ));
        }
        if let Some((at, why)) = s.last_give_up {
            out.push_str(&format!(
                "  last gave up: {} ms ago: {why}\n",
                now.saturating_sub(at)
            ));
        }
        out.push_str(&format!(
            "  dropped datagrams: {} forged, {} replayed, {} foreign\n",
            self.dropped.forged, self.dropped.replayed, self.dropped.foreign
        ));
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = out;
    }
}

/// SCHED_FIFO for the controller thread: a heartbeat that a saturated core starves is a
/// false takeover waiting to happen. Without the privilege it stays at normal priority.
pub(super) fn raise_priority(priority: i32) {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for the call.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "failover thread stays at normal priority (SCHED_FIFO refused): under heavy load \
             heartbeats may be late"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_nodes_agree_on_their_ids() {
        let a: SocketAddr = "198.18.2.1:7789".parse().unwrap();
        let b: SocketAddr = "198.18.2.2:7789".parse().unwrap();
        assert_eq!(node_id(a, b), NodeId(0));
        assert_eq!(node_id(b, a), NodeId(1));
    }
}
