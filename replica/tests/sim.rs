//! Deterministic simulation of the pair as the daemon runs it: two nodes, each with the
//! shipped decision code of `replica::pair` (the per-LUN record `PairLun`, the primary's
//! coordinator `Mirror` with its per-link `LinkShard`s, resync planning, the secondary's
//! `ApplyGate`) and the shipped write-intent log, driven by a model of the engine's drivers
//! over a simulated network and disk. Seeded: a failing seed prints itself and replays exactly
//! (`SEED=N cargo test -p twinsan-replica --test sim`).
//!
//! What the drivers here model of the engine (engine/src/replication/): a write is issued
//! once its regions are in the persisted write-intent log, applied locally, and handed to one
//! core's data link (`Mirror::sending` records it pending before it leaves); GOOD needs the
//! local write and the peer's ack (`LinkShard::take_acks`) or a completion the coordinator
//! gives alone. Links are TCP connections: in order, never lost while open, delayed, cut by
//! partitions (what was sent arrives after the heal, as TCP retransmits), closed by the
//! primary's link reset, a crash or a demotion. The primary's manager connects a control
//! connection when not mirroring, plans the resync from the generation ids, starts a round,
//! sends the head of the first region as data, copies each planned region under its range
//! lock (no write to it meanwhile, until the ack), completes under the round check, then
//! pings. The secondary numbers connections in accept order and lets a resync supersede the
//! older ones; a promotion fences them all. The metadata is written as `write_meta` does
//! (a synced `.tmp` exchanged with the record, then the directory synced).
//!
//! Faults at random steps, each as the engine can meet it (the code says why):
//! - the network: delays (some beyond `replica_timeout_ms`), a partition of the replica
//!   path, one connection cut alone, one way or both (a flow a firewall forgot, a failed
//!   bond member), the backlog of a connection the primary gave up on held up until newer
//!   connections' frames have arrived (TCP never duplicates a frame nor the primary resends
//!   one: what the secondary sees twice is the same bytes on two connections, a given-up
//!   write and the next resync's copy, in either order), the secondary's keepalive ending
//!   a silent cut connection;
//! - the nodes: a paused process (SIGSTOP: nothing of it runs, its sockets stay open), a
//!   process crash (the page cache survives), a machine restart (unflushed writes are lost;
//!   also while the daemon is down);
//! - the disks: a full data disk, metadata writes that fail before their rename (nothing
//!   changes) or at the directory's sync (reported failed, yet in place, and a power loss
//!   may undo it), the power failing in the middle of a metadata write (the step unwinds
//!   there, `PowerCut`: nothing after it runs); a record failing its checksum cannot come
//!   from the engine's write order and is not modelled;
//! - the failover controller's takeover of a paused primary under the witness's lease (the
//!   rig's sigstop): the old primary, which can answer nothing alone any more, runs again
//!   still saying primary until its controller demotes it, and answers hellos meanwhile
//!   (an acceptor that is primary sends its hello before it refuses the connection);
//! - the operator: switchover, a switchover called off (demote then promote),
//!   `outdate-peer`, `verify` and `verify --repair`, `resolve --discard-local`;
//! - quiet spells: the faults stop for a while and the pair resyncs while writes go on.
//!
//! The rules of manual failover (what an operator may do before the failover controller
//! exists): `promote` without `--force` only when the tool accepts it, and not while the
//! old primary is alive but unreachable (the link cut, or the process paused: the operator
//! cannot tell that from a dead node; the witness of the failover issue can); after the
//! primary recorded writes alone ("PeerOutdated" in `status`, or `outdate-peer` issued
//! there), the other node is promoted only once it was resynced. A node configured primary
//! whose peer was promoted or changed data alone restarts only once it can reach the peer
//! (its start asks the peer first; an unreachable peer lets it start as a second primary:
//! what the failover issue's witness lifts). `verify` runs on the primary (the tool refuses
//! it elsewhere). `resolve --discard-local` gives up a secondary's data while the other
//! node serves, or the split-brain victim's once the split brain shows (the victim's daemon
//! restarted first if it is primary or has writes running); the engine refuses it on a
//! primary.
//!
//! Invariants, checked at every step:
//! - at most one node takes writes;
//! - no write an initiator saw GOOD is lost: every sector of the node that serves holds the
//!   last GOOD write over it or a later write (checked whenever a node starts serving, and at
//!   the end); after a split brain is resolved, what the surviving node held is the start;
//! - every command is answered once (a stale or duplicate ack completes nothing);
//! - when the pair is quiet and both say UpToDate after a resync, the two copies are equal;
//!   and a region `verify` compares while the pair stays in sync is equal on both;
//! - a split brain is detected (refused), never resolved by a resync but by the operator;
//! - progress: once the faults stop, a pair with a writer settles by itself (in sync,
//!   every write answered), and a split brain once the operator resolved it.
//!
//! Layout: this file holds the types and the test; sim/ the parts: `net` (connections and
//! the secondary), `disk` (data and metadata files), `model` (what the initiator may read),
//! `writes` (the primary's write path), `manager` (resync and pings), `roles` (start,
//! promote, demote, crash), `operator` (the rules and the commands), `verify`, `run`
//! (timers, faults, invariants, the run).
//!
//! `SIM_SEEDS` (default 10000), `SIM_SEED_BASE` (default 0) and `SIM_STEPS` (default 600)
//! scale the run; `SEED` (or `SIM_SEED`) runs one seed and traces it with `SIM_TRACE=1`;
//! `SIM_SECONDS` runs seeds from `SIM_SEED_BASE` on until that much wall time has passed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use replica::intent::IntentLog;
use replica::meta::Meta;
use replica::pair::{
    apply::{Apply, ApplyConn, Change, ChangeOp},
    Admit, ApplyGate, LinkShard, Marker, Mirror, NewTerm, PairLun, PeerLossPolicy, Pending,
    Persist, PlanRefusal, Port, SourceRun, SourceStep, SourceTimers, SyncState,
};
use replica::wire::{AckStatus, Frame as WireFrame, Message};

const REGION: u64 = 4096;
const REGIONS: u64 = 16;
const SIZE: u64 = REGION * REGIONS;
const SECTOR: u64 = 512;
const SECTORS: usize = (SIZE / SECTOR) as usize;
const LUN_KEY: u64 = 0x7a11;
const CORES: usize = 2;
/// `replica_timeout_ms`.
const TIMEOUT_MS: u64 = 200;
/// The manager's reconnect period and the primary's ping period.
const RECONNECT_MS: u64 = 50;
const PING_MS: u64 = 50;
/// A secondary closes a silent control connection after this long.
const QUIET_MS: u64 = 2 * TIMEOUT_MS;
/// Write-intent regions idle this long are forgotten.
const INTENT_COOL_MS: u64 = 300;
/// The resync's pace and timers, scaled to `TIMEOUT_MS` as the engine's are to its 2 s
/// default: progress every half timeout, the longest answer 60 timeouts (engine: 1 s and
/// `CONTROL_ANSWER_TIMEOUT`, 120 s); the head chunk a part of a region as there
/// (`HEAD_CHUNK_BYTES`); a rate that copies the whole LUN in a few network delays.
const SOURCE_TIMERS: SourceTimers = SourceTimers {
    rate_bytes_per_s: SIZE * 50,
    progress_interval_ms: TIMEOUT_MS / 2,
    ping_interval_ms: PING_MS,
    ping_timeout_ms: TIMEOUT_MS,
    answer_timeout_ms: 60 * TIMEOUT_MS,
    head_bytes: REGION / 4,
};
/// The secondary's TCP keepalive gives up on a silent connection after this long.
const KEEPALIVE_MS: u64 = 11 * TIMEOUT_MS / 2;

type NodeId = usize;
type ConnId = usize;

fn trace_on() -> bool {
    std::env::var("SIM_TRACE").is_ok()
}

macro_rules! trace {
    ($sim:expr, $($arg:tt)*) => {
        if $sim.trace {
            println!("[{:>6} ms] {}", $sim.now, format!($($arg)*));
        }
    };
}

#[path = "sim/disk.rs"]
mod disk;
#[path = "sim/manager.rs"]
mod manager;
#[path = "sim/model.rs"]
mod model;
#[path = "sim/net.rs"]
mod net;
#[path = "sim/operator.rs"]
mod operator;
#[path = "sim/roles.rs"]
mod roles;
#[path = "sim/run.rs"]
mod run;
#[path = "sim/verify.rs"]
mod verify;
#[path = "sim/writes.rs"]
mod writes;

use disk::*;
use model::*;
use net::*;
use verify::*;

/// A write in flight on the primary.
struct Write {
    id: u32,
    offset: u64,
    len: u64,
    fua: bool,
    local_done: bool,
    /// The local write succeeded (a full data disk fails it: SPACE ALLOCATION FAILED).
    local_ok: bool,
    /// The peer side: None while waiting, Some(ok) once answered.
    peer: Option<bool>,
}

/// The manager (engine: `manage`, `resync`): idle between attempts, or running the shipped
/// resync round and watch ([`SourceRun`]) on its control connection.
#[derive(Debug)]
enum Manager {
    Idle {
        next_try_ms: u64,
    },
    Running {
        conn: ConnId,
        run: Box<SourceRun>,
        /// The frame the step in flight waits for; `None` while that step has not been
        /// performed yet (a copy waiting for its range lock).
        seq: Option<u64>,
    },
}

/// A daemon: what a crash loses.
struct Proc {
    primary: bool,
    mirror: Mirror,
    parts: Parts,
    manager: Manager,
    next_seq: u64,
    writes: BTreeMap<u64, Write>,
    last_cool_ms: u64,
    /// Secondary side: the gate on the primary's connections, and the promotion fence.
    gate: ApplyGate,
    fenced: bool,
    /// When this node was demoted: `demote` waits for the writes running (engine:
    /// `drain_after_demotion`), then ends the mirroring round.
    demoted_at: Option<u64>,
    /// An operator's `verify` running here.
    verify: Option<Verify>,
}

/// The parts of a daemon the coordinator's port touches (the `Mirror` is borrowed apart).
struct Parts {
    lun: PairLun,
    intent: IntentLog,
    shards: Vec<LinkShard>,
    links: Vec<Option<ConnId>>,
    /// Answers the coordinator gave: (core, token, ok).
    answers: Vec<(usize, u64, bool)>,
}

impl Parts {
    /// The LUN's hello as this node, in role `primary`, announces it (engine:
    /// `Replication::hello`, which asks the links for unanswered writes).
    fn hello(&self, primary: bool) -> replica::wire::LunHello {
        let unanswered = self.shards.iter().any(|s| s.holds_lun(0));
        self.lun.hello(primary, unanswered)
    }
}

/// A machine.
struct Node {
    disk: Disk,
    config_primary: bool,
    paused: bool,
    proc_: Option<Proc>,
    /// Completed a write alone while the other node was a forced second primary (split
    /// brain).
    diverged: bool,
    /// What the operator last saw of this node in `status` (kept while it is down): its
    /// role, and whether it recorded the peer outdated (it changed data alone).
    seen_primary: bool,
    seen_peer_outdated: bool,
    /// Primary while paused when its peer took over under the witness's lease
    /// ([`Sim::lease_takeover`]): it answers nothing alone any more (the witness refuses it
    /// the lease), and its controller demotes it soon after it runs again.
    lease_lost: bool,
}

#[derive(Default, Debug, Clone, Copy)]
struct Stats {
    good: u64,
    failed: u64,
    resyncs: u64,
    equal_checks: u64,
    crashes: u64,
    power_losses: u64,
    losses: u64,
    promotions: u64,
    split_brains: u64,
    superseded: u64,
    /// Connections cut alone.
    cuts: u64,
    /// Backlogs of connections given up on, held up, and frames of such connections that
    /// reached the secondary behind a newer control connection.
    held_backlogs: u64,
    stale_frames: u64,
    /// Power failures in the middle of a metadata write, and power losses with a metadata
    /// rename not known to be on stable storage.
    power_cuts: u64,
    unsynced_renames: u64,
    /// Verifies started, and regions they compared while the pair was in sync.
    verifies: u64,
    verified_in_sync: u64,
    /// `resolve --discard-local` done, and split brains it resolved.
    discards: u64,
    resolved: u64,
    /// Takeovers from a paused primary under the lease, and connections that met the old
    /// primary still saying primary after one (refused until it stepped down).
    lease_takeovers: u64,
    both_primary: u64,
}

impl Stats {
    fn add(&mut self, s: &Stats) {
        self.good += s.good;
        self.failed += s.failed;
        self.resyncs += s.resyncs;
        self.equal_checks += s.equal_checks;
        self.crashes += s.crashes;
        self.power_losses += s.power_losses;
        self.losses += s.losses;
        self.promotions += s.promotions;
        self.split_brains += s.split_brains;
        self.superseded += s.superseded;
        self.cuts += s.cuts;
        self.held_backlogs += s.held_backlogs;
        self.stale_frames += s.stale_frames;
        self.power_cuts += s.power_cuts;
        self.unsynced_renames += s.unsynced_renames;
        self.verifies += s.verifies;
        self.verified_in_sync += s.verified_in_sync;
        self.discards += s.discards;
        self.resolved += s.resolved;
        self.lease_takeovers += s.lease_takeovers;
        self.both_primary += s.both_primary;
    }

    /// Whether every fault and check a long run claims happened at least once.
    fn all_exercised(&self) -> bool {
        [
            self.crashes,
            self.power_losses,
            self.losses,
            self.promotions,
            self.split_brains,
            self.superseded,
            self.cuts,
            self.held_backlogs,
            self.stale_frames,
            self.power_cuts,
            self.unsynced_renames,
            self.verifies,
            self.verified_in_sync,
            self.discards,
            self.resolved,
            self.lease_takeovers,
            self.both_primary,
        ]
        .iter()
        .all(|&x| x > 0)
    }
}

struct Sim {
    seed: u64,
    rng: StdRng,
    now: u64,
    trace: bool,
    nodes: Vec<Node>,
    conns: Vec<Conn>,
    partitioned: bool,
    policy: PeerLossPolicy,
    model: Model,
    next_write: u32,
    next_token: u64,
    /// A forced promotion made two primaries on purpose (the split-brain scenario).
    forced: bool,
    /// Steps left in a quiet spell (no faults).
    calm_steps: u32,
    /// The split brain of the forced promotion was detected (`status` shows SplitBrain).
    split_seen: bool,
    stats: Stats,
}

/// The coordinator's port over one simulated daemon.
struct SimPort<'a> {
    disk: &'a mut Disk,
    parts: &'a mut Parts,
    conns: &'a mut Vec<Conn>,
    now: u64,
    random: u64,
}

impl Port for SimPort<'_> {
    fn lun_count(&self) -> usize {
        1
    }
    fn update_lun(&mut self, _i: usize, f: &mut dyn FnMut(&mut PairLun) -> Persist) -> bool {
        if f(&mut self.parts.lun).needed() {
            return persist(self.disk, &mut self.parts.lun, &self.parts.intent);
        }
        true
    }
    fn drain_links(&mut self) -> Vec<(usize, Pending)> {
        let mut v = Vec::new();
        for (core, s) in self.parts.shards.iter_mut().enumerate() {
            v.extend(s.drain().into_iter().map(|p| (core, p)));
        }
        v
    }
    fn links_idle(&mut self) -> bool {
        self.parts.shards.iter().all(LinkShard::is_empty)
    }
    fn reset_links(&mut self) {
        for link in &mut self.parts.links {
            if let Some(c) = link.take() {
                close_end(self.conns, c, true, self.now);
            }
        }
    }
    fn answer(&mut self, core: usize, token: u64, ok: bool) {
        self.parts.answers.push((core, token, ok));
    }
    fn random(&mut self) -> [u8; 8] {
        self.random = self
            .random
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.random.to_le_bytes()
    }
}

fn sector_value(data: &[u8], sector: usize) -> u32 {
    let at = sector * SECTOR as usize;
    u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
}

fn fresh_meta() -> Meta {
    Meta::new(LUN_KEY, SIZE, REGION).expect("valid geometry")
}

fn sectors(offset: u64, len: u64) -> std::ops::Range<usize> {
    (offset / SECTOR) as usize..((offset + len) / SECTOR) as usize
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let policy = if rng.gen_bool(0.5) {
            PeerLossPolicy::Degrade
        } else {
            PeerLossPolicy::Suspend
        };
        let node = |id: NodeId| Node {
            disk: Disk {
                id,
                volatile: vec![0; SIZE as usize],
                durable: vec![0; SIZE as usize],
                meta: fresh_meta(),
                meta_synced: None,
                marker: None,
                boot: 1,
                meta_fails: None,
                power_cut: None,
                data_full: false,
            },
            config_primary: id == 0,
            paused: false,
            proc_: None,
            diverged: false,
            seen_primary: id == 0,
            seen_peer_outdated: false,
            lease_lost: false,
        };
        let mut sim = Sim {
            seed,
            rng,
            now: 0,
            trace: trace_on(),
            nodes: vec![node(0), node(1)],
            conns: Vec::new(),
            partitioned: false,
            policy,
            model: Model::new(),
            next_write: 1,
            next_token: 1,
            forced: false,
            calm_steps: 0,
            split_seen: false,
            stats: Stats::default(),
        };
        sim.start(1);
        sim.start(0);
        sim
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "seed {} failed at {} ms: {what}\nreplay: SEED={} SIM_TRACE=1 cargo test -p twinsan-replica --test sim -- --nocapture",
            self.seed, self.now, self.seed
        );
    }

    fn other(n: NodeId) -> NodeId {
        1 - n
    }

    fn up(&self, n: NodeId) -> bool {
        self.nodes[n].proc_.is_some()
    }

    fn is_primary(&self, n: NodeId) -> bool {
        self.nodes[n].proc_.as_ref().is_some_and(|p| p.primary)
    }

    /// Whether `from` can reach `to`'s daemon right now (connect and handshake succeed).
    fn reachable(&self, to: NodeId) -> bool {
        !self.partitioned && self.up(to) && !self.nodes[to].paused
    }
}

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Power cuts unwind a step (`PowerCut`): not a failure, so not reported as a panic.
fn quiet_power_cuts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<PowerCut>().is_none() {
                report(info);
            }
        }));
    });
}

#[test]
fn simulation() {
    quiet_power_cuts();
    let steps = env("SIM_STEPS").unwrap_or(600) as usize;
    let base = env("SIM_SEED_BASE").unwrap_or(0);
    let single = env("SEED").or_else(|| env("SIM_SEED"));
    let deadline =
        env("SIM_SECONDS").map(|s| std::time::Instant::now() + std::time::Duration::from_secs(s));
    let count = env("SIM_SEEDS").unwrap_or(10_000);
    let mut total = Stats::default();
    let mut seeds = 0u64;
    let mut seed = single.unwrap_or(base);
    loop {
        let mut sim = Sim::new(seed);
        sim.run(steps);
        total.add(&sim.stats);
        seeds += 1;
        seed += 1;
        let more = match (single, deadline) {
            (Some(_), _) => false,
            (None, Some(d)) => std::time::Instant::now() < d,
            (None, None) => seeds < count,
        };
        if !more {
            break;
        }
    }
    println!("{seeds} seeds x {steps} steps: {total:?}");
    // The run must exercise what it claims to check (one replayed seed need not).
    if single.is_none() {
        assert!(total.good > 0 && total.resyncs > 0 && total.equal_checks > 0);
    }
    if seeds >= 500 {
        assert!(total.all_exercised(), "{total:?}");
    }
}
