//! Deterministic simulation of automatic failover: two nodes' shipped controllers
//! (`failover::controller`) and the shipped witness (`failover::witness`), speaking the
//! shipped wire format (HMAC, replay windows) over a seeded network: loss, duplicates,
//! reordering, delays, forged and replayed datagrams, cuts of the dedicated link, of either
//! node's client network and of the witness, paused processes (SIGSTOP), crashes and
//! restarts (sequence numbers and request ids from a start count kept on disk, so a
//! restart within moments is never taken for a replay), a witness restart, node clocks
//! running at different rates, operator `standby` and `takeover`, and (in some seeds) a
//! fence command instead of a witness.
//!
//! The replica is modelled at the level the controller sees it (role, UpToDate, in sync,
//! frozen; the mirrored writes of protocol C; a resync that takes time), and the driver's
//! write-path rule is modelled as the engine has it: a write made without the peer is
//! acknowledged only before `alone_until_ms`. Invariants, checked after every event:
//! - no acknowledged write is missing on a node when it acknowledges another or promotes;
//! - at most one node can acknowledge writes at any moment (never two writers);
//! - a node that is not UpToDate never promotes;
//! - the VIP is never on two running (not paused) nodes at once;
//! - after the faults stop, one node serves, holds the VIP and is in sync with the other.
//!
//! `SEED=N SIM_TRACE=1 cargo test --release -p twinsan-failover --test sim -- --nocapture`
//! replays one seed; `SIM_SEEDS`, `SIM_SEED_BASE` and `SIM_SECONDS` as in the replica's sim.

use std::collections::BTreeSet;

use failover::controller::{Action, Config, Controller, Guard, Operator, ReplicaView, Timings};
use failover::wire::{self, Body, Key, ReplayWindow, SeqCounter, WITNESS_SENDER};
use failover::witness::{Record, Witness};
use failover::NodeId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const PAIR: &[u8] = b"sim-pair";
const TIMINGS: Timings = Timings {
    keepalive_ms: 100,
    deadtime_ms: 500,
    warntime_ms: 250,
    initdead_ms: 2000,
};
/// The VIP's address lifetime (the kernel counts whole seconds).
const VIP_LIFETIME_MS: u64 = 1000;
/// A resync of the whole model LUN.
const RESYNC_MS: u64 = 300;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ep {
    Node(usize),
    Witness,
}

struct Packet {
    at_ms: u64,
    from: Ep,
    to: Ep,
    /// 0: the dedicated link; 1: the client network.
    path: usize,
    bytes: Vec<u8>,
}

struct Node {
    up: bool,
    paused: bool,
    ctl: Option<Controller>,
    config_primary: bool,
    primary: bool,
    data: BTreeSet<u64>,
    /// Writes received while paused (in the socket), processed at resume.
    inbox: Vec<u64>,
    /// Writes held: frozen until the peer is outdated or in sync.
    held: Vec<u64>,
    /// The peer is recorded outdated (`OutdatePeer`): writes may complete alone.
    alone_ok: bool,
    alone_until_ms: u64,
    /// Connected to the peer as its primary and (once `synced`) mirroring.
    connected: bool,
    /// As a secondary: inconsistent until a resync into it ends at this time.
    resync_until_ms: Option<u64>,
    vip_until_ms: u64,
    /// Since its start this node has not been in sync with a primary: its data is
    /// consistent, but whether it is current only the witness (or a connection) can say.
    consistent_only: bool,
    /// A handshake found the peer ahead: this node must be resynced before it serves.
    behind: bool,
    /// The view last reported to the controller (the driver reports every change).
    reported: ReplicaView,
    windows: [ReplayWindow; 3],
    seq: SeqCounter,
    /// Starts so far (on the node's disk: the base of its sequence numbers and request ids).
    boots: u64,
    /// Clock rate error, parts per million.
    ppm: i64,
    fence_pending: bool,
    reboot_at_ms: Option<u64>,
}

impl Node {
    fn new(config_primary: bool, ppm: i64) -> Node {
        Node {
            up: false,
            paused: false,
            ctl: None,
            config_primary,
            primary: false,
            data: BTreeSet::new(),
            inbox: Vec::new(),
            held: Vec::new(),
            alone_ok: false,
            alone_until_ms: 0,
            connected: false,
            resync_until_ms: None,
            vip_until_ms: 0,
            consistent_only: true,
            behind: false,
            reported: ReplicaView::default(),
            windows: Default::default(),
            seq: SeqCounter::starting_at(0),
            boots: 0,
            ppm,
            fence_pending: false,
            reboot_at_ms: None,
        }
    }
}

struct WitnessBox {
    up: bool,
    w: Witness,
    persisted: Record,
    windows: [ReplayWindow; 2],
    seq: SeqCounter,
    boots: u64,
    disk_fails: bool,
}

struct Sim {
    seed: u64,
    rng: StdRng,
    now_ms: u64,
    key: Key,
    guard: Guard,
    nodes: [Node; 2],
    witness: WitnessBox,
    net: Vec<Packet>,
    link_cut: bool,
    client_cut: [bool; 2],
    witness_cut: bool,
    acked: BTreeSet<u64>,
    next_write: u64,
    /// Datagrams seen on the wire, replayed by the attacker now and then.
    captured: Vec<(Ep, Ep, usize, Vec<u8>)>,
    trace: bool,
    faults: bool,
    vip_overlap_since_ms: std::cell::Cell<Option<u64>>,
}

macro_rules! trace {
    ($sim:expr, $($arg:tt)*) => {
        if $sim.trace {
            eprintln!("[{:>7} ms] {}", $sim.now_ms, format!($($arg)*));
        }
    };
}

impl Sim {
    fn new(seed: u64, trace: bool) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let guard = if rng.gen_range(0..5) == 0 {
            Guard::Fence
        } else {
            Guard::Witness
        };
        let ppm = [rng.gen_range(-1000..=1000), rng.gen_range(-1000..=1000)];
        let mut s = Sim {
            seed,
            rng,
            now_ms: 0,
            key: Key::derive(b"sim pair key"),
            guard,
            nodes: [Node::new(true, ppm[0]), Node::new(false, ppm[1])],
            witness: WitnessBox {
                up: true,
                w: Witness::new(0, TIMINGS.lease_ms() as u32, []),
                persisted: Record::default(),
                windows: Default::default(),
                seq: SeqCounter::starting_at(wire::first_of_boot(1)),
                boots: 1,
                disk_fails: false,
            },
            net: Vec::new(),
            link_cut: false,
            client_cut: [false; 2],
            witness_cut: false,
            acked: BTreeSet::new(),
            next_write: 1,
            captured: Vec::new(),
            trace,
            faults: true,
            vip_overlap_since_ms: std::cell::Cell::new(None),
        };
        s.start(0);
        s.start(1);
        s
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "seed {} failed at {} ms: {what}\nreplay: SEED={} SIM_TRACE=1 cargo test --release -p twinsan-failover --test sim -- --nocapture",
            self.seed, self.now_ms, self.seed
        );
    }

    fn node_now(&self, n: usize) -> u64 {
        let t = self.now_ms as i64;
        (t + t * self.nodes[n].ppm / 1_000_000) as u64
    }

    fn running(&self, n: usize) -> bool {
        self.nodes[n].up && !self.nodes[n].paused
    }

    fn reachable(&self, from: Ep, to: Ep, path: usize) -> bool {
        match (from, to) {
            (Ep::Node(_), Ep::Node(_)) if path == 0 => !self.link_cut,
            (Ep::Node(_), Ep::Node(_)) => !self.client_cut[0] && !self.client_cut[1],
            (Ep::Node(n), Ep::Witness) | (Ep::Witness, Ep::Node(n)) => {
                !self.client_cut[n] && !self.witness_cut
            }
            (Ep::Witness, Ep::Witness) => false,
        }
    }

    fn view(&self, n: usize) -> ReplicaView {
        let node = &self.nodes[n];
        ReplicaView {
            primary: node.primary,
            // Without a witness only a connection can tell a restarted node it is current
            // (DRBD's "Consistent" vs "UpToDate"); the engine's driver reports the same.
            promotable: node.resync_until_ms.is_none()
                && !node.behind
                && (self.guard == Guard::Witness || !node.consistent_only),
            in_sync: node.primary && self.in_sync(n),
            // Writes held: the peer lost (or not connected yet) and not recorded outdated.
            frozen: node.primary && !node.held.is_empty() && !self.mirroring(n),
        }
    }

    /// Primary `n` mirrors its writes to the secondary (during a resync too).
    fn mirroring(&self, n: usize) -> bool {
        self.nodes[n].connected && self.running(1 - n)
    }

    /// Primary `n` mirrors to a secondary that holds all its data.
    fn in_sync(&self, n: usize) -> bool {
        self.mirroring(n) && self.nodes[1 - n].resync_until_ms.is_none()
    }

    // ------------------------------------------------------------------ node lifecycle

    fn start(&mut self, n: usize) {
        let o = 1 - n;
        // The replica's start rule: a configured primary starts as secondary when the
        // peer answers as primary over the link; an unreachable peer does not stop it.
        let peer_primary = self.nodes[o].up && self.nodes[o].primary && !self.link_cut;
        // With a fence command and no witness, nothing would stop a node whose peer was
        // promoted meanwhile from fencing it: such a node starts as secondary unless it
        // reaches its peer (the engine does the same).
        let peer_reachable = self.nodes[o].up && !self.link_cut;
        // ... or holds newer data (the generation ids at the handshake).
        let peer_ahead = peer_reachable && !self.nodes[o].data.is_subset(&self.nodes[n].data);
        // With a witness every node starts as secondary: the witness's records and the
        // heartbeats decide who serves (the engine does the same).
        let primary = self.nodes[n].config_primary
            && !peer_primary
            && !peer_ahead
            && self.guard != Guard::Witness
            && peer_reachable;
        // Sequence numbers and request ids from the start count, not from the wall clock
        // (which may be stepped back at a restart: see `wire::first_of_boot`).
        self.nodes[n].boots += 1;
        let base = wire::first_of_boot(self.nodes[n].boots);
        let node = &mut self.nodes[n];
        node.up = true;
        node.paused = false;
        node.primary = primary;
        node.alone_ok = false;
        node.alone_until_ms = 0;
        node.connected = false;
        node.held.clear();
        node.inbox.clear();
        node.windows = Default::default();
        node.seq = SeqCounter::starting_at(base);
        node.fence_pending = false;
        node.consistent_only = !primary;
        let cfg = Config {
            node: NodeId(n as u8),
            paths: 2,
            timings: TIMINGS,
            guard: self.guard,
            auto_failback: false,
            preferred: node.config_primary,
        };
        let now = self.node_now(n);
        let view = self.view(n);
        self.nodes[n].ctl = Some(Controller::new(cfg, view, now, base));
        trace!(
            self,
            "node {n}: started as {}",
            if primary { "primary" } else { "secondary" }
        );
        self.run_actions(n);
    }

    fn crash(&mut self, n: usize) {
        if !self.nodes[n].up {
            return;
        }
        trace!(self, "node {n}: killed");
        let node = &mut self.nodes[n];
        node.up = false;
        node.paused = false;
        node.ctl = None;
        node.connected = false;
        node.held.clear();
        node.inbox.clear();
        // The VIP guard process removes the address when the daemon dies.
        node.vip_until_ms = 0;
    }

    // ------------------------------------------------------------------ actions

    fn run_actions(&mut self, n: usize) {
        // Bounded: a controller that keeps producing actions without time passing is a bug.
        for _ in 0..1000 {
            if !self.running(n) {
                return;
            }
            let Some(ctl) = self.nodes[n].ctl.as_mut() else {
                return;
            };
            while ctl.poll_note().is_some() {}
            let alone_until = ctl.alone_until_ms();
            let Some(a) = ctl.poll_action() else {
                self.nodes[n].alone_until_ms = alone_until;
                return;
            };
            self.nodes[n].alone_until_ms = alone_until;
            self.act(n, a);
        }
        self.fail(&format!("node {n}: an endless stream of actions"));
    }

    fn act(&mut self, n: usize, a: Action) {
        let now = self.node_now(n);
        if !matches!(
            a,
            Action::Heartbeat(_) | Action::Witness(_) | Action::AddVip
        ) {
            trace!(self, "node {n}: action {a:?}");
        }
        match a {
            Action::Heartbeat(hb) => {
                let seq = self.nodes[n].seq.next_seq();
                let bytes = wire::seal(&self.key, PAIR, n as u8, seq, &Body::Heartbeat(hb));
                self.send(Ep::Node(n), Ep::Node(1 - n), usize::from(hb.path), bytes);
            }
            Action::Witness(req) => {
                let seq = self.nodes[n].seq.next_seq();
                let bytes = wire::seal(&self.key, PAIR, n as u8, seq, &Body::LeaseRequest(req));
                self.send(Ep::Node(n), Ep::Witness, 1, bytes);
            }
            Action::Fence => {
                self.nodes[n].fence_pending = true;
            }
            Action::Promote => {
                let o = 1 - n;
                if self.guard != Guard::Witness
                    && self.running(o)
                    && self.nodes[o].primary
                    && !self.link_cut
                {
                    // The engine's promotion asks a reachable peer its role first.
                    trace!(self, "node {n}: promotion refused: the peer is primary");
                    self.report(n, now);
                    return;
                }
                trace!(self, "node {n}: PROMOTE");
                let missing: Vec<u64> = self
                    .acked
                    .difference(&self.nodes[n].data)
                    .copied()
                    .collect();
                if !missing.is_empty() {
                    self.fail(&format!(
                        "node {n} promoted without acknowledged writes {missing:?}"
                    ));
                }
                if !self.view(n).promotable {
                    self.fail(&format!("node {n} promoted while not UpToDate"));
                }
                let o = 1 - n;
                // The old primary's links close: its mirrored writes fail from now on.
                self.nodes[o].connected = false;
                self.nodes[n].primary = true;
                self.nodes[n].connected = false;
                self.report(n, now);
            }
            Action::OutdatePeer => {
                trace!(
                    self,
                    "node {n}: outdate-peer (alone until {})",
                    self.nodes[n].alone_until_ms
                );
                self.nodes[n].alone_ok = true;
                self.release_held(n);
                self.report(n, now);
            }
            Action::Demote => {
                trace!(self, "node {n}: DEMOTE");
                let node = &mut self.nodes[n];
                node.primary = false;
                node.alone_ok = false;
                node.connected = false;
                // Held commands fail; the initiator retries them on the new primary.
                node.held.clear();
                self.report(n, now);
            }
            Action::AddVip => self.nodes[n].vip_until_ms = self.now_ms + VIP_LIFETIME_MS,
            Action::RemoveVip => self.nodes[n].vip_until_ms = 0,
            Action::Announce | Action::Tickle => {}
        }
    }

    fn report(&mut self, n: usize, now: u64) {
        let view = self.view(n);
        self.nodes[n].reported = view;
        if let Some(c) = self.nodes[n].ctl.as_mut() {
            c.replica(now, view);
        }
    }

    fn send(&mut self, from: Ep, to: Ep, path: usize, bytes: Vec<u8>) {
        if self.faults && self.rng.gen_range(0..50) == 0 {
            return; // lost
        }
        let copies = if self.faults && self.rng.gen_range(0..50) == 0 {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if self.faults && self.rng.gen_range(0..20) == 0 {
                self.rng.gen_range(50..300)
            } else {
                self.rng.gen_range(0..5)
            };
            if self.captured.len() < 64 && self.rng.gen_range(0..10) == 0 {
                self.captured.push((from, to, path, bytes.clone()));
            }
            self.net.push(Packet {
                at_ms: self.now_ms + delay,
                from,
                to,
                path,
                bytes: bytes.clone(),
            });
        }
    }

    // ------------------------------------------------------------------ the replica model

    /// A held write completes once it may: mirrored, or alone before the lease ends.
    fn release_held(&mut self, n: usize) {
        let now = self.node_now(n);
        let node = &self.nodes[n];
        let may = self.in_sync(n) || node.alone_ok && now < node.alone_until_ms;
        if !may {
            return;
        }
        for w in std::mem::take(&mut self.nodes[n].held) {
            self.ack(n, w);
        }
    }

    fn ack(&mut self, n: usize, w: u64) {
        let missing: Vec<u64> = self
            .acked
            .difference(&self.nodes[n].data)
            .copied()
            .collect();
        if !missing.is_empty() {
            self.fail(&format!(
                "node {n} acknowledges write {w} but lacks acknowledged writes {missing:?}"
            ));
        }
        trace!(self, "node {n}: ack write {w}");
        self.acked.insert(w);
    }

    fn write(&mut self, n: usize, w: u64) {
        if !self.nodes[n].primary {
            return; // refused (NOT READY); the initiator retries
        }
        self.nodes[n].data.insert(w);
        let o = 1 - n;
        if self.mirroring(n) {
            self.nodes[o].data.insert(w);
            self.ack(n, w);
            return;
        }
        let now = self.node_now(n);
        let node = &self.nodes[n];
        if node.alone_ok && now < node.alone_until_ms {
            self.ack(n, w);
        } else {
            self.nodes[n].held.push(w);
        }
    }

    /// The replica link: a primary connects to its secondary and resyncs it.
    fn replica_link(&mut self) {
        for n in 0..2 {
            let o = 1 - n;
            let can = self.running(n)
                && self.running(o)
                && self.nodes[n].primary
                && !self.nodes[o].primary
                && !self.link_cut;
            if self.nodes[n].connected && !can {
                self.nodes[n].connected = false;
                let now = self.node_now(n);
                self.report(n, now);
                self.run_actions(n);
            } else if !self.nodes[n].connected && can {
                // The handshake: the secondary must not hold acknowledged writes the
                // primary lacks (that would be a split brain: detected, never resolved).
                let lost: Vec<u64> = self
                    .acked
                    .intersection(&self.nodes[o].data)
                    .filter(|w| !self.nodes[n].data.contains(w))
                    .copied()
                    .collect();
                if !lost.is_empty() {
                    // The generation ids say the secondary is ahead: the primary refuses to
                    // resync it and reports its own data as behind (not promotable).
                    if !self.nodes[n].behind {
                        trace!(self, "node {n}: handshake: peer {o} is ahead");
                        self.nodes[n].behind = true;
                        let now = self.node_now(n);
                        self.report(n, now);
                        self.run_actions(n);
                    }
                    continue;
                }
                trace!(self, "node {n}: replica connected to {o}, resync");
                self.nodes[n].connected = true;
                self.nodes[o].data = self.nodes[n].data.clone();
                self.nodes[o].behind = false;
                self.nodes[o].resync_until_ms =
                    Some(self.now_ms + self.rng.gen_range(0..RESYNC_MS));
                self.report_both();
            }
        }
        for o in 0..2 {
            if self.nodes[o]
                .resync_until_ms
                .is_some_and(|t| self.now_ms >= t)
                && self.running(o)
            {
                let n = 1 - o;
                if self.nodes[n].connected {
                    self.nodes[o].resync_until_ms = None;
                    self.nodes[o].consistent_only = false;
                    // The resync round ends: the peer holds everything; outdated no more.
                    self.nodes[n].alone_ok = false;
                    self.release_held(n);
                    trace!(self, "node {o}: resync done");
                    self.report_both();
                }
            }
        }
    }

    fn report_both(&mut self) {
        for n in 0..2 {
            if self.running(n) {
                let now = self.node_now(n);
                self.report(n, now);
                self.run_actions(n);
            }
        }
    }

    // ------------------------------------------------------------------ delivery

    fn deliver(&mut self, p: Packet) {
        if !self.reachable(p.from, p.to, p.path) {
            return;
        }
        match p.to {
            Ep::Node(n) => {
                if !self.running(n) {
                    return; // a paused process's socket buffer is modelled as loss
                }
                let Ok(d) = wire::open(&self.key, &p.bytes) else {
                    return;
                };
                let slot = usize::from(d.sender);
                if d.pair_id != PAIR
                    || slot == n
                    || self.nodes[n].windows[slot].accept(d.seq).is_err()
                {
                    return;
                }
                let now = self.node_now(n);
                let Some(ctl) = self.nodes[n].ctl.as_mut() else {
                    return;
                };
                match d.body {
                    Body::Heartbeat(hb) if slot != usize::from(WITNESS_SENDER) => {
                        ctl.heartbeat(now, d.seq, hb)
                    }
                    Body::LeaseReply(r) => ctl.lease_reply(now, r),
                    _ => return,
                }
                self.run_actions(n);
            }
            Ep::Witness => {
                if !self.witness.up {
                    return;
                }
                let Ok(d) = wire::open(&self.key, &p.bytes) else {
                    return;
                };
                let Body::LeaseRequest(req) = d.body else {
                    return;
                };
                let slot = usize::from(d.sender);
                if slot > 1 || self.witness.windows[slot].accept(d.seq).is_err() {
                    return;
                }
                let before = self.witness.w.record(&d.pair_id);
                let mut dec =
                    self.witness
                        .w
                        .request(self.now_ms, &d.pair_id, NodeId(d.sender), req);
                if let Some(after) = dec.persist {
                    if self.witness.disk_fails {
                        self.witness
                            .w
                            .persist_failed(&d.pair_id, before, &mut dec.reply);
                    } else {
                        self.witness.persisted = after;
                    }
                }
                trace!(self, "witness: node {slot} {req:?} -> {:?}", dec.reply);
                let seq = self.witness.seq.next_seq();
                let bytes = wire::seal(
                    &self.key,
                    PAIR,
                    WITNESS_SENDER,
                    seq,
                    &Body::LeaseReply(dec.reply),
                );
                self.send(Ep::Witness, Ep::Node(slot), 1, bytes);
            }
        }
    }

    // ------------------------------------------------------------------ the run

    fn fault(&mut self) {
        let n = self.rng.gen_range(0..2);
        match self.rng.gen_range(0..100) {
            0..=9 => {
                self.link_cut = !self.link_cut;
                trace!(
                    self,
                    "dedicated link {}",
                    if self.link_cut { "cut" } else { "back" }
                );
            }
            10..=17 => {
                self.client_cut[n] = !self.client_cut[n];
                trace!(
                    self,
                    "node {n} client network {}",
                    if self.client_cut[n] { "cut" } else { "back" }
                );
            }
            18..=22 => {
                self.witness_cut = !self.witness_cut;
                trace!(
                    self,
                    "witness {}",
                    if self.witness_cut { "cut" } else { "back" }
                );
            }
            23..=25 => {
                trace!(self, "witness restarts");
                self.witness.w = Witness::new(
                    self.now_ms,
                    TIMINGS.lease_ms() as u32,
                    [(PAIR.to_vec(), self.witness.persisted)],
                );
                self.witness.windows = Default::default();
                self.witness.boots += 1;
                self.witness.seq = SeqCounter::starting_at(wire::first_of_boot(self.witness.boots));
            }
            26 => self.witness.disk_fails = !self.witness.disk_fails,
            27..=36 if self.nodes[n].up => {
                let resume = self.nodes[n].paused;
                self.nodes[n].paused = !resume;
                trace!(
                    self,
                    "node {n}: {}",
                    if resume { "SIGCONT" } else { "SIGSTOP" }
                );
                if resume {
                    // Writes that waited in its sockets are processed first: the write
                    // path's lease check is what keeps them safe.
                    for w in std::mem::take(&mut self.nodes[n].inbox) {
                        self.write(n, w);
                    }
                    let now = self.node_now(n);
                    if let Some(c) = self.nodes[n].ctl.as_mut() {
                        c.handle_timeout(now);
                    }
                    self.run_actions(n);
                }
            }
            37..=46 => self.crash(n),
            47..=60 if !self.nodes[n].up => self.start(n),
            61..=64 if self.running(n) => {
                let now = self.node_now(n);
                if let Some(c) = self.nodes[n].ctl.as_mut() {
                    let r = c.operator(now, Operator::Standby);
                    trace!(self, "node {n}: operator standby: {r:?}");
                }
                self.run_actions(n);
            }
            65..=70 if self.running(n) => {
                let now = self.node_now(n);
                if let Some(c) = self.nodes[n].ctl.as_mut() {
                    let r = c.operator(now, Operator::Takeover);
                    trace!(self, "node {n}: operator takeover: {r:?}");
                }
                self.run_actions(n);
            }
            71..=74 => {
                // The attacker: a forged datagram, or an old one replayed.
                if let Some((from, to, path, bytes)) = (!self.captured.is_empty())
                    .then(|| self.captured[self.rng.gen_range(0..self.captured.len())].clone())
                {
                    self.net.push(Packet {
                        at_ms: self.now_ms,
                        from,
                        to,
                        path,
                        bytes,
                    });
                }
                let mut forged = wire::seal(
                    &Key::derive(b"attacker"),
                    PAIR,
                    0,
                    u64::MAX,
                    &Body::Heartbeat(Default::default()),
                );
                forged[10] ^= 1;
                self.net.push(Packet {
                    at_ms: self.now_ms,
                    from: Ep::Node(0),
                    to: Ep::Node(1),
                    path: 1,
                    bytes: forged,
                });
            }
            _ => {}
        }
    }

    fn tick(&mut self) {
        // Time moves in small random steps.
        let dt = self.rng.gen_range(1..20);
        self.now_ms += dt;
        let mut due: Vec<Packet> = Vec::new();
        let mut rest = Vec::new();
        for p in self.net.drain(..) {
            if p.at_ms <= self.now_ms {
                due.push(p);
            } else {
                rest.push(p);
            }
        }
        self.net = rest;
        // Reordering: equal-time deliveries in random order.
        for i in (1..due.len()).rev() {
            let j = self.rng.gen_range(0..=i);
            due.swap(i, j);
        }
        for p in due {
            self.deliver(p);
            self.check();
        }
        for n in 0..2 {
            if self.nodes[n].reboot_at_ms.is_some_and(|t| self.now_ms >= t) {
                self.nodes[n].reboot_at_ms = None;
                if !self.nodes[n].up {
                    self.start(n);
                }
            }
            if !self.running(n) {
                continue;
            }
            if self.nodes[n].fence_pending {
                self.nodes[n].fence_pending = false;
                // The fence command powers the peer off; it fails now and then.
                let ok = self.rng.gen_range(0..5) != 0;
                if ok {
                    // A power cycle: the node boots again a few seconds later.
                    self.crash(1 - n);
                    self.nodes[1 - n].reboot_at_ms =
                        Some(self.now_ms + self.rng.gen_range(2000..5000));
                }
                let now = self.node_now(n);
                if let Some(c) = self.nodes[n].ctl.as_mut() {
                    c.fence_done(now, ok);
                }
                self.run_actions(n);
            }
            let now = self.node_now(n);
            if let Some(c) = self.nodes[n].ctl.as_mut() {
                if now >= c.poll_timeout() {
                    c.handle_timeout(now);
                }
            }
            self.run_actions(n);
            self.release_held(n);
            if self.view(n) != self.nodes[n].reported {
                self.report(n, now);
                self.run_actions(n);
            }
            self.check();
        }
        self.replica_link();
        self.check();
        // The client writes to whoever answers at the VIP.
        if self.rng.gen_range(0..3) == 0 {
            let holders: Vec<usize> = (0..2)
                .filter(|&n| {
                    self.nodes[n].up
                        && self.nodes[n].vip_until_ms > self.now_ms
                        && !self.client_cut[n]
                })
                .collect();
            if let Some(&n) = holders.get(self.rng.gen_range(0..holders.len().max(1))) {
                let w = self.next_write;
                self.next_write += 1;
                if self.nodes[n].paused {
                    self.nodes[n].inbox.push(w);
                } else {
                    self.write(n, w);
                }
                self.check();
            }
        }
    }

    fn check(&self) {
        let writers: Vec<usize> = (0..2)
            .filter(|&n| {
                let node = &self.nodes[n];
                self.running(n)
                    && node.primary
                    && (self.mirroring(n)
                        || node.alone_ok && self.node_now(n) < node.alone_until_ms)
            })
            .collect();
        if writers.len() > 1 {
            self.fail("two nodes can acknowledge writes");
        }
        // The witness grants one lease at a time, and each holder's view of it ends before
        // the witness's does: two nodes that both think they hold it have misread a reply.
        let holders = (0..2)
            .filter(|&n| {
                self.running(n)
                    && self.nodes[n]
                        .ctl
                        .as_ref()
                        .is_some_and(|c| c.status(self.node_now(n)).lease_left_ms.is_some())
            })
            .count();
        if holders > 1 {
            self.fail("both nodes think they hold the witness's lease");
        }
        let vips = (0..2)
            .filter(|&n| self.running(n) && self.nodes[n].vip_until_ms > self.now_ms)
            .count();
        // A primary cut off from the witness and then from its peer keeps serving on the
        // peer's last word for up to deadtime_ms after its last heartbeat; the peer decides
        // on its own last heartbeat, up to one keepalive plus a delay apart. So the address
        // may be on both for a moment (the old one can acknowledge no write: its links are
        // cut and it holds no lease), never longer than a deadtime.
        if vips > 1 && self.vip_overlap_since_ms.get().is_none() {
            self.vip_overlap_since_ms.set(Some(self.now_ms));
        } else if vips <= 1 {
            self.vip_overlap_since_ms.set(None);
        }
        if let Some(since) = self.vip_overlap_since_ms.get() {
            if self.now_ms > since + TIMINGS.deadtime_ms {
                self.fail("the VIP is on both running nodes for longer than a deadtime");
            }
        }
    }

    fn settle(&mut self) {
        self.faults = false;
        self.link_cut = false;
        self.client_cut = [false; 2];
        self.witness_cut = false;
        self.witness.up = true;
        self.witness.disk_fails = false;
        for n in 0..2 {
            if !self.nodes[n].up {
                self.start(n);
            }
            if self.nodes[n].paused {
                self.nodes[n].paused = false;
            }
        }
        trace!(self, "settling: every fault healed");
        // A node in standby stays so (the operator's word); clear it as an operator would.
        for n in 0..2 {
            let now = self.node_now(n);
            if let Some(c) = self.nodes[n].ctl.as_mut() {
                let _ = c.operator(now, Operator::Takeover);
            }
        }
        let until = self.now_ms + 15_000;
        let mut operator_looked = false;
        let mut operator_can = true;
        while self.now_ms < until {
            self.tick();
            if !operator_looked && self.now_ms + 10_000 >= until {
                operator_looked = true;
                operator_can = self.operator_promotes_if_nobody_serves();
            }
        }
        if !operator_can {
            return;
        }
        let primaries: Vec<usize> = (0..2)
            .filter(|&n| self.nodes[n].up && self.nodes[n].primary)
            .collect();
        if primaries.len() != 1 {
            for n in 0..2 {
                let now = self.node_now(n);
                eprintln!(
                    "node {n}: up {} view {:?} consistent_only {} status {:?}",
                    self.nodes[n].up,
                    self.view(n),
                    self.nodes[n].consistent_only,
                    self.nodes[n].ctl.as_ref().map(|c| c.status(now))
                );
            }
            self.fail(&format!("after settling, primaries: {primaries:?}"));
        }
        let p = primaries[0];
        if self.nodes[p].vip_until_ms <= self.now_ms {
            self.fail("after settling, the primary does not hold the VIP");
        }
        if !self.in_sync(p) {
            self.fail("after settling, the pair is not in sync");
        }
        if self.guard == Guard::Witness {
            self.client_cut_moves_the_role(p);
        }
    }

    /// The primary loses only its client network (where the witness is): the role and the
    /// VIP move to the node the clients can reach, and writes go on there.
    fn client_cut_moves_the_role(&mut self, p: usize) {
        trace!(self, "node {p}: client network cut (settled pair)");
        self.client_cut[p] = true;
        let until = self.now_ms + 5_000;
        while self.now_ms < until {
            self.tick();
        }
        let o = 1 - p;
        if !self.nodes[o].primary || self.nodes[o].vip_until_ms <= self.now_ms {
            self.fail("the primary's client network is cut, and the role did not move");
        }
        let acked = self.acked.len();
        let until = self.now_ms + 2_000;
        while self.now_ms < until {
            self.tick();
        }
        if self.acked.len() == acked {
            self.fail("after the role moved, no write was acknowledged");
        }
        self.client_cut[p] = false;
    }
}

impl Sim {
    /// Without a witness, two nodes that restarted while apart cannot tell which is
    /// current (both "consistent"): the operator reads `twinsan status` on both (which
    /// names the last primary and whether it wrote alone) and promotes that node by hand,
    /// as the documentation says.
    fn operator_promotes_if_nobody_serves(&mut self) -> bool {
        if self.guard == Guard::Witness || self.nodes.iter().any(|n| n.primary) {
            return true;
        }
        let Some(n) = (0..2).find(|&n| {
            self.acked.is_subset(&self.nodes[n].data) && self.nodes[n].resync_until_ms.is_none()
        }) else {
            // The only copy of some acknowledged write is on a node whose resync was
            // interrupted: `twinsan status` says so, and the operator must decide
            // (`promote --force` there); no automatic rule could.
            trace!(
                self,
                "no node may be promoted by hand: the operator must force one"
            );
            return false;
        };
        trace!(self, "node {n}: operator promotes by hand");
        self.nodes[n].primary = true;
        self.nodes[n].consistent_only = false;
        self.nodes[n].behind = false;
        let now = self.node_now(n);
        self.report(n, now);
        self.run_actions(n);
        true
    }
}

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn run(seed: u64, steps: usize, trace: bool) {
    let mut sim = Sim::new(seed, trace);
    for _ in 0..steps {
        if sim.rng.gen_range(0..40) == 0 {
            sim.fault();
        }
        sim.tick();
    }
    sim.settle();
}

#[test]
fn simulation() {
    let trace = std::env::var("SIM_TRACE").is_ok();
    let steps = env("SIM_STEPS").unwrap_or(2000) as usize;
    if let Some(seed) = env("SEED") {
        run(seed, steps, trace);
        return;
    }
    let base = env("SIM_SEED_BASE").unwrap_or(0);
    if let Some(secs) = env("SIM_SECONDS") {
        let t = std::time::Instant::now();
        let mut seed = base;
        while t.elapsed().as_secs() < secs {
            run(seed, steps, false);
            seed += 1;
        }
        eprintln!("failover sim: seeds {base}..{seed} passed");
        return;
    }
    let seeds = env("SIM_SEEDS").unwrap_or(2000);
    for seed in base..base + seeds {
        run(seed, steps, false);
    }
}
