//! The node's configuration: a TOML file (`twinsan serve --config FILE`) or the embedded
//! default (one 10 GiB sparse LUN under `./data`, on 127.0.0.1:3260, no authentication).
//!
//! Parsing happens once, here: the rest of the daemon only sees validated, typed values.
//! Every error names the file, the key and what is wrong, and the daemon does not start.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

mod failover;
mod snapshots;
mod values;
pub use self::failover::{FailoverConfig, HeartbeatPath, VipConfig};
pub use self::snapshots::{ReceiveConfig, ScheduleConfig};
pub use self::values::{
    derive_naa_id, derive_serial, parse_size, stable_hash, validate_iscsi_name, Cidr,
};
/// The failover defaults (the witness uses the same lease).
pub mod failover_defaults {
    pub use super::failover::DEFAULT_TIMINGS;
}

/// Default iSCSI port (RFC 7143 section 13.1.1... IANA: 3260).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3260";
/// The embedded default target's name.
pub const DEFAULT_TARGET: &str = "iqn.2026-11.io.twinsan:default";
/// The embedded default LUN size: 10 GiB, sparse.
pub const DEFAULT_LUN_SIZE_BYTES: u64 = 10 << 30;
/// Largest LUN we accept: 2^63 bytes is beyond any file system anyway; 256 TiB keeps
/// offsets far from overflow in every computation (`lba * block_size + len`).
pub const MAX_LUN_SIZE_BYTES: u64 = 256 << 40;
/// RFC 7143 section 4.2.7.2: iSCSI names are at most 223 bytes.
pub const MAX_ISCSI_NAME_LEN: usize = 223;
/// Default soft threshold for thin LUNs: warn initiators (ESXi shows it as an out-of-space
/// warning) while a tenth of the pool is still free.
pub const DEFAULT_SOFT_THRESHOLD_PERCENT: u8 = 90;
/// Backing files sit on 4 KiB file-system blocks: that is the unit a write can allocate,
/// punch or rewrite without a read-modify-write, so it is what initiators should align to.
pub const DEFAULT_PHYSICAL_BLOCK_BYTES: u32 = 4096;
/// The dirty-region size bounds it: a "physical block" larger than a replication region
/// would say nothing true about the device.
pub const MAX_PHYSICAL_BLOCK_BYTES: u32 = 1 << 20;
/// How long a primary waits for the peer's acknowledgement before it declares the peer lost:
/// well under the 8 s an ESXi ATS heartbeat tolerates, so a degrade completes in time.
pub const DEFAULT_REPLICA_TIMEOUT_MS: u64 = 2_000;
/// Default resync throughput cap: a 1 TiB LUN resyncs in about 70 minutes, while a gigabit
/// of the initiators' own traffic still fits beside it on a 10 GbE replica link.
pub const DEFAULT_RESYNC_RATE_BYTES_PER_S: u64 = 256 << 20;
/// A bound on configuration fan-out; far above any real deployment of one node.
pub const MAX_TARGETS: usize = 256;
pub const MAX_LUNS_PER_TARGET: usize = 256;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}: key `{key}`: {message}")]
    Invalid {
        file: String,
        key: String,
        message: String,
    },
}

/// How LUN data reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// O_DIRECT: no page cache; every first write into a hole allocates synchronously.
    Direct,
    /// Page cache; SYNCHRONIZE CACHE and FUA still reach stable storage (fdatasync / RWF_DSYNC).
    Writeback,
}

/// Whether large buffered writes may move to a core's helper thread (engine/src/disk/spill.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpillWrites {
    /// While the core's CPU is saturated and another CPU has room (the default).
    Auto,
    /// Every large buffered write (for tests, or a machine whose other CPUs are idle anyway).
    Always,
    /// Never: every write stays on the core thread that received it.
    Off,
}

/// The default cache mode, chosen by measurement (docs/performance.md): 4 KiB random
/// writes at queue depth 32 into a fresh sparse LUN ran at the same IOPS either way (62.4K
/// buffered vs 61.7K O_DIRECT) with p99 latency 1.2 ms buffered vs 3.2 ms direct.
pub const DEFAULT_CACHE_MODE: CacheMode = CacheMode::Writeback;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    peer: Option<RawPeer>,
    #[serde(default)]
    failover: Option<self::failover::RawFailover>,
    #[serde(default)]
    discovery: Option<RawDiscovery>,
    #[serde(default, rename = "target")]
    targets: Vec<RawTarget>,
    #[serde(default, rename = "snapshot_schedule")]
    schedules: Vec<self::snapshots::RawSchedule>,
    #[serde(default)]
    snapshot_receive: Option<self::snapshots::RawReceive>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    data_dir: Option<String>,
    cores: Option<usize>,
    cache: Option<CacheMode>,
    nop_interval_ms: Option<u64>,
    nop_timeout_ms: Option<u64>,
    login_timeout_ms: Option<u64>,
    queue_depth: Option<u32>,
    role: Option<Role>,
    admin_socket: Option<String>,
    spill_writes: Option<SpillWrites>,
    metrics_listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: String,
    /// The peer's replica endpoint (on the dedicated link).
    address: String,
    /// Our replica endpoint.
    listen: String,
    psk: String,
    replica_timeout_ms: Option<u64>,
    on_peer_loss: Option<OnPeerLoss>,
    region_bytes: Option<toml::Value>,
    resync_rate: Option<toml::Value>,
}

/// Which node serves initiators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
}

/// What a primary does when the peer stops acknowledging (ARCHITECTURE.md section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPeerLoss {
    /// Freeze I/O until the peer returns or an operator runs `twinsan outdate-peer`.
    Suspend,
    /// Record the peer as outdated, bump the generation, go on tracking dirty regions.
    Degrade,
}

/// The replication peer.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub name: String,
    pub address: SocketAddr,
    pub listen: SocketAddr,
    pub psk: Vec<u8>,
    pub replica_timeout_ms: u64,
    pub on_peer_loss: OnPeerLoss,
    pub region_bytes: u64,
    /// Resync throughput cap (bytes per second), so a catching-up peer does not starve
    /// initiator I/O on either node.
    pub resync_rate_bytes_per_s: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    chap: Option<RawChap>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: String,
    alias: Option<String>,
    allowed_initiators: Option<Vec<String>>,
    allowed_addresses: Option<Vec<String>>,
    chap: Option<RawChap>,
    #[serde(default, rename = "lun")]
    luns: Vec<RawLun>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChap {
    user: String,
    secret: String,
    mutual_user: Option<String>,
    mutual_secret: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLun {
    id: u64,
    path: String,
    size: Option<toml::Value>,
    block_size: Option<u32>,
    physical_block_size: Option<u32>,
    read_only: Option<bool>,
    cache: Option<CacheMode>,
    serial: Option<String>,
    thin: Option<bool>,
    soft_threshold_percent: Option<u8>,
}

/// CHAP credentials for one direction or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapConfig {
    pub user: String,
    pub secret: String,
    /// Mutual CHAP: the name and secret the target answers the initiator's challenge with.
    pub mutual: Option<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct LunConfig {
    pub id: u64,
    pub path: PathBuf,
    pub size_bytes: u64,
    pub block_size: u32,
    /// The unit initiators should align writes to (READ CAPACITY (16) LBPPBE): a power of
    /// two multiple of `block_size`.
    pub physical_block_size: u32,
    pub read_only: bool,
    pub cache: CacheMode,
    pub thin: bool,
    /// Unit serial number (VPD 0x80). Derived from the target name and LUN id unless set,
    /// so it is identical on both nodes of a pair and across restarts.
    pub serial: String,
    /// Percent of the backing file system in use above which initiators get the THIN
    /// PROVISIONING SOFT THRESHOLD REACHED unit attention (thin LUNs only).
    pub soft_threshold_percent: Option<u8>,
}

#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub name: String,
    pub alias: Option<String>,
    /// `None`: any initiator name.
    pub allowed_initiators: Option<Vec<String>>,
    /// `None`: any source address.
    pub allowed_addresses: Option<Vec<Cidr>>,
    pub chap: Option<ChapConfig>,
    pub luns: Vec<LunConfig>,
}

impl TargetConfig {
    /// Whether a connection from `peer` may see and log in to this target.
    pub fn address_allowed(&self, peer: IpAddr) -> bool {
        self.allowed_addresses
            .as_ref()
            .is_none_or(|l| l.iter().any(|c| c.contains(peer)))
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, for messages; `None` for the embedded default.
    pub source: Option<PathBuf>,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Number of core threads; 0 means one per available core.
    pub cores: usize,
    pub nop_interval_ms: u64,
    pub nop_timeout_ms: u64,
    pub login_timeout_ms: u64,
    /// CmdSN window per session (MaxCmdSN - ExpCmdSN + 1).
    pub queue_depth: u32,
    pub discovery_chap: Option<ChapConfig>,
    pub targets: Vec<TargetConfig>,
    /// The role this node starts in.
    pub role: Role,
    /// Where large buffered writes run (engine/src/disk/spill.rs).
    pub spill_writes: SpillWrites,
    pub peer: Option<PeerConfig>,
    /// Automatic failover (needs `peer`).
    pub failover: Option<FailoverConfig>,
    /// The admin socket (`twinsan status`, `promote`, `demote`).
    pub admin_socket: PathBuf,
    /// Where the Prometheus metrics are served (`GET /metrics`); off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// Snapshots taken on a period (`[[snapshot_schedule]]`); a reload changes them.
    pub snapshot_schedules: Vec<ScheduleConfig>,
    /// Where diff streams are received (`twinsan snapshot ship`); off when `None`.
    pub snapshot_receive: Option<ReceiveConfig>,
}

/// Overrides from the command line; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
}

impl Config {
    /// The embedded default: one 10 GiB thin LUN 0 at `<data_dir>/lun0.img`.
    pub fn embedded_default(ov: &Overrides) -> Result<Self, ConfigError> {
        let text = format!(
            "[[target]]\nname = \"{DEFAULT_TARGET}\"\nalias = \"default\"\n[[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"10GiB\"\n"
        );
        Self::parse_str(&text, "<embedded default>", None, ov)
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path, ov: &Overrides) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse_str(&text, &file, Some(path.to_path_buf()), ov)
    }

    /// Parses and validates config text. `file` names it in errors.
    pub fn parse_str(
        text: &str,
        file: &str,
        source: Option<PathBuf>,
        ov: &Overrides,
    ) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let bad = |key: &str, message: String| ConfigError::Invalid {
            file: file.to_string(),
            key: key.to_string(),
            message,
        };

        let listen_s = ov
            .listen
            .clone()
            .or(raw.server.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = listen_s.parse().map_err(|_| {
            bad(
                "server.listen",
                format!("`{listen_s}` is not an ADDRESS:PORT"),
            )
        })?;
        let metrics_listen = match raw.server.metrics_listen.as_deref() {
            None => None,
            Some(s) => Some(s.parse().map_err(|_| {
                bad(
                    "server.metrics_listen",
                    format!("`{s}` is not an ADDRESS:PORT"),
                )
            })?),
        };
        // Paths in a file are relative to the file (so a config and its data travel together);
        // command-line paths are relative to the working directory.
        let base = source
            .as_ref()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        let data_dir = match (&ov.data_dir, raw.server.data_dir) {
            (Some(d), _) => d.clone(),
            (None, Some(d)) => base.join(d),
            (None, None) => PathBuf::from("./data"),
        };
        let queue_depth = raw.server.queue_depth.unwrap_or(128);
        if !(1..=1024).contains(&queue_depth) {
            return Err(bad(
                "server.queue_depth",
                format!("{queue_depth} is outside 1..=1024"),
            ));
        }
        let nop_interval_ms = raw.server.nop_interval_ms.unwrap_or(5_000);
        let nop_timeout_ms = raw.server.nop_timeout_ms.unwrap_or(15_000);
        let login_timeout_ms = raw.server.login_timeout_ms.unwrap_or(15_000);
        for (k, v) in [
            ("server.nop_interval_ms", nop_interval_ms),
            ("server.nop_timeout_ms", nop_timeout_ms),
            ("server.login_timeout_ms", login_timeout_ms),
        ] {
            if !(1_000..=3_600_000).contains(&v) {
                return Err(bad(k, format!("{v} ms is outside 1000..=3600000")));
            }
        }
        let cores = raw.server.cores.unwrap_or(0);
        if cores > 1024 {
            return Err(bad(
                "server.cores",
                format!("{cores} is not a plausible core count"),
            ));
        }
        let default_cache = raw.server.cache.unwrap_or(DEFAULT_CACHE_MODE);

        let discovery_chap = match raw.discovery.and_then(|d| d.chap) {
            Some(c) => Some(chap(c, "discovery.chap", &bad)?),
            None => None,
        };
        if raw.targets.is_empty() {
            return Err(bad("target", "at least one [[target]] is required".into()));
        }
        if raw.targets.len() > MAX_TARGETS {
            return Err(bad(
                "target",
                format!(
                    "{} targets exceed the limit of {MAX_TARGETS}",
                    raw.targets.len()
                ),
            ));
        }
        let mut targets: Vec<TargetConfig> = Vec::new();
        for (ti, t) in raw.targets.into_iter().enumerate() {
            let tk = format!("target[{ti}]");
            validate_iscsi_name(&t.name).map_err(|m| bad(&format!("{tk}.name"), m))?;
            if targets.iter().any(|o| o.name.eq_ignore_ascii_case(&t.name)) {
                return Err(bad(
                    &format!("{tk}.name"),
                    format!("target `{}` is defined twice", t.name),
                ));
            }
            if let Some(l) = &t.allowed_initiators {
                for (i, n) in l.iter().enumerate() {
                    validate_iscsi_name(n)
                        .map_err(|m| bad(&format!("{tk}.allowed_initiators[{i}]"), m))?;
                }
            }
            let allowed_addresses = match t.allowed_addresses {
                None => None,
                Some(l) => Some(
                    l.iter()
                        .enumerate()
                        .map(|(i, s)| {
                            Cidr::parse(s)
                                .map_err(|m| bad(&format!("{tk}.allowed_addresses[{i}]"), m))
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            let chap_cfg = match t.chap {
                Some(c) => Some(chap(c, &format!("{tk}.chap"), &bad)?),
                None => None,
            };
            if t.luns.len() > MAX_LUNS_PER_TARGET {
                return Err(bad(
                    &format!("{tk}.lun"),
                    format!("more than {MAX_LUNS_PER_TARGET} LUNs"),
                ));
            }
            let mut luns: Vec<LunConfig> = Vec::new();
            for (li, l) in t.luns.into_iter().enumerate() {
                let lk = format!("{tk}.lun[{li}]");
                if l.id >= 16384 {
                    return Err(bad(
                        &format!("{lk}.id"),
                        format!("{} is not a LUN id below 16384", l.id),
                    ));
                }
                if luns.iter().any(|o| o.id == l.id) {
                    return Err(bad(
                        &format!("{lk}.id"),
                        format!("LUN {} is defined twice in target `{}`", l.id, t.name),
                    ));
                }
                let block_size = l.block_size.unwrap_or(512);
                if ![512, 4096].contains(&block_size) {
                    return Err(bad(
                        &format!("{lk}.block_size"),
                        format!("{block_size} is not 512 or 4096"),
                    ));
                }
                let physical_block_size = l
                    .physical_block_size
                    .unwrap_or(DEFAULT_PHYSICAL_BLOCK_BYTES.max(block_size));
                if !physical_block_size.is_power_of_two()
                    || physical_block_size < block_size
                    || physical_block_size > MAX_PHYSICAL_BLOCK_BYTES
                {
                    return Err(bad(
                        &format!("{lk}.physical_block_size"),
                        format!("{physical_block_size} must be a power of two from the block size {block_size} to {MAX_PHYSICAL_BLOCK_BYTES}"),
                    ));
                }
                let size_bytes = match &l.size {
                    None => None,
                    Some(v) => Some(parse_size(v).map_err(|m| bad(&format!("{lk}.size"), m))?),
                };
                if let Some(s) = size_bytes {
                    if s == 0 || s % block_size as u64 != 0 || s > MAX_LUN_SIZE_BYTES {
                        return Err(bad(&format!("{lk}.size"), format!("{s} bytes must be a non-zero multiple of the block size {block_size} and at most {MAX_LUN_SIZE_BYTES}")));
                    }
                }
                if l.path.is_empty() {
                    return Err(bad(&format!("{lk}.path"), "is empty".into()));
                }
                let path = data_dir.join(&l.path);
                let serial = match l.serial {
                    Some(s)
                        if s.is_empty()
                            || s.len() > 32
                            || !s.bytes().all(|b| b.is_ascii_graphic()) =>
                    {
                        return Err(bad(
                            &format!("{lk}.serial"),
                            "must be 1..=32 printable ASCII characters".into(),
                        ))
                    }
                    Some(s) => s,
                    None => derive_serial(&t.name, l.id),
                };
                luns.push(LunConfig {
                    id: l.id,
                    // A missing size means "use the existing file's size": resolved when the
                    // LUN is opened, where a missing file is an error naming this key.
                    size_bytes: size_bytes.unwrap_or(0),
                    path,
                    block_size,
                    physical_block_size,
                    read_only: l.read_only.unwrap_or(false),
                    cache: l.cache.unwrap_or(default_cache),
                    thin: l.thin.unwrap_or(true),
                    serial,
                    soft_threshold_percent: match l.soft_threshold_percent {
                        Some(p) if !(1..=99).contains(&p) => {
                            return Err(bad(
                                &format!("{lk}.soft_threshold_percent"),
                                format!("{p} is outside 1..=99"),
                            ))
                        }
                        Some(p) => Some(p),
                        None if l.thin.unwrap_or(true) => Some(DEFAULT_SOFT_THRESHOLD_PERCENT),
                        None => None,
                    },
                });
            }
            targets.push(TargetConfig {
                name: t.name,
                alias: t.alias,
                allowed_initiators: t.allowed_initiators,
                allowed_addresses,
                chap: chap_cfg,
                luns,
            });
        }
        let raw_on_peer_loss = raw.peer.as_ref().and_then(|p| p.on_peer_loss);
        let peer = match raw.peer {
            None => None,
            Some(p) => {
                let addr = |k: &str, v: &str| {
                    v.parse::<SocketAddr>().map_err(|_| {
                        bad(
                            &format!("peer.{k}"),
                            format!("`{v}` is not an ADDRESS:PORT"),
                        )
                    })
                };
                // The PSK authenticates the replica link: as strong as a CHAP secret at least.
                if p.psk.len() < 16 || p.psk.len() > 1024 {
                    return Err(bad(
                        "peer.psk",
                        format!("must be 16..=1024 bytes long (got {})", p.psk.len()),
                    ));
                }
                let replica_timeout_ms = p.replica_timeout_ms.unwrap_or(DEFAULT_REPLICA_TIMEOUT_MS);
                if !(100..=60_000).contains(&replica_timeout_ms) {
                    return Err(bad(
                        "peer.replica_timeout_ms",
                        format!("{replica_timeout_ms} is outside 100..=60000"),
                    ));
                }
                let region_bytes = match &p.region_bytes {
                    None => 1 << 20,
                    Some(v) => parse_size(v).map_err(|m| bad("peer.region_bytes", m))?,
                };
                if !region_bytes.is_power_of_two()
                    || !((64 << 10)..=(64 << 20)).contains(&region_bytes)
                {
                    return Err(bad(
                        "peer.region_bytes",
                        format!("{region_bytes} must be a power of two in 64KiB..=64MiB"),
                    ));
                }
                let resync_rate_bytes_per_s = match &p.resync_rate {
                    None => DEFAULT_RESYNC_RATE_BYTES_PER_S,
                    Some(v) => parse_size(v).map_err(|m| bad("peer.resync_rate", m))?,
                };
                // Below 1 MiB/s a resync of a large LUN would take days; above the fastest
                // links and disks the cap means nothing and a typo would go unnoticed.
                if !((1 << 20)..=(64 << 30)).contains(&resync_rate_bytes_per_s) {
                    return Err(bad(
                        "peer.resync_rate",
                        format!(
                            "{resync_rate_bytes_per_s} bytes per second is outside 1MiB..=64GiB"
                        ),
                    ));
                }
                if p.name.is_empty() || p.name.len() > 64 {
                    return Err(bad("peer.name", "must be 1..=64 bytes".into()));
                }
                Some(PeerConfig {
                    name: p.name,
                    address: addr("address", &p.address)?,
                    listen: addr("listen", &p.listen)?,
                    psk: p.psk.into_bytes(),
                    replica_timeout_ms,
                    on_peer_loss: p.on_peer_loss.unwrap_or(OnPeerLoss::Degrade),
                    region_bytes,
                    resync_rate_bytes_per_s,
                })
            }
        };
        let failover = match raw.failover {
            None => None,
            Some(f) => Some(self::failover::parse(f, &bad)?),
        };
        let mut peer = peer;
        if let (Some(_), None) = (&failover, &peer) {
            return Err(bad(
                "failover",
                "needs a [peer] section: failover moves service between the two nodes of a pair"
                    .into(),
            ));
        }
        if let (Some(_), Some(p)) = (&failover, peer.as_mut()) {
            // With automatic failover, a primary that loses its peer holds its writes until
            // the witness records the peer outdated (or the fence command succeeded): it
            // never outdates it on its own word.
            if raw_on_peer_loss == Some(OnPeerLoss::Degrade) {
                return Err(bad(
                    "peer.on_peer_loss",
                    "`degrade` outdates the peer on this node's own word: with [failover], \
                     the witness or the fence command decides (leave it unset or `suspend`)"
                        .into(),
                ));
            }
            p.on_peer_loss = OnPeerLoss::Suspend;
        }
        let role = raw.server.role.unwrap_or(Role::Primary);
        let admin_socket = raw
            .server
            .admin_socket
            .map(|p| base.join(p))
            .unwrap_or_else(|| data_dir.join("twinsan.sock"));
        let snapshot_schedules = self::snapshots::schedules(raw.schedules, &targets, &bad)?;
        let snapshot_receive = self::snapshots::receive(raw.snapshot_receive, &bad)?;
        Ok(Config {
            snapshot_schedules,
            snapshot_receive,
            source,
            listen,
            data_dir,
            cores,
            nop_interval_ms,
            nop_timeout_ms,
            login_timeout_ms,
            queue_depth,
            discovery_chap,
            targets,
            role,
            spill_writes: raw.server.spill_writes.unwrap_or(SpillWrites::Auto),
            peer,
            failover,
            admin_socket,
            metrics_listen,
        })
    }

    /// The file name for messages.
    pub fn source_name(&self) -> String {
        self.source
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<embedded default>".into())
    }
}

fn chap(
    c: RawChap,
    key: &str,
    bad: &dyn Fn(&str, String) -> ConfigError,
) -> Result<ChapConfig, ConfigError> {
    // RFC 7143 section 12.1.3: secrets should be at least 12 bytes (96 bits); shorter ones
    // are brute-forceable from one captured exchange, so we refuse them.
    let check = |k: &str, s: &str| {
        if s.len() < 12 || s.len() > 255 {
            Err(bad(
                &format!("{key}.{k}"),
                format!("must be 12..=255 bytes long (got {})", s.len()),
            ))
        } else {
            Ok(())
        }
    };
    if c.user.is_empty() || c.user.len() > 255 {
        return Err(bad(&format!("{key}.user"), "must be 1..=255 bytes".into()));
    }
    check("secret", &c.secret)?;
    let mutual = match (c.mutual_user, c.mutual_secret) {
        (None, None) => None,
        (Some(u), Some(s)) => {
            check("mutual_secret", &s)?;
            if s == c.secret {
                return Err(bad(
                    &format!("{key}.mutual_secret"),
                    "must differ from the initiator's secret (RFC 7143 section 12.1.3)".into(),
                ));
            }
            Some((u, s))
        }
        _ => return Err(bad(key, "mutual_user and mutual_secret go together".into())),
    };
    Ok(ChapConfig {
        user: c.user,
        secret: c.secret,
        mutual,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse_str(t, "test.toml", None, &Overrides::default())
    }

    #[test]
    fn embedded_default_is_one_thin_10g_lun() {
        let c = Config::embedded_default(&Overrides::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:3260");
        assert_eq!(c.targets.len(), 1);
        assert_eq!(c.targets[0].luns[0].size_bytes, 10 << 30);
        assert!(c.targets[0].luns[0].thin);
        assert_eq!(c.targets[0].luns[0].path, PathBuf::from("./data/lun0.img"));
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = parse("[[target]]\nname = \"iqn.2026-11.x:a\"\n[[target.lun]]\nid = 0\npath = \"a.img\"\nsize = \"10XB\"\n").unwrap_err().to_string();
        assert!(
            e.contains("test.toml") && e.contains("target[0].lun[0].size") && e.contains("XB"),
            "{e}"
        );
        let e = parse("[server]\nlisten = \"nope\"\n[[target]]\nname = \"iqn.2026-11.x:a\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.listen"), "{e}");
        let e = parse(
            "[[target]]\nname = \"iqn.2026-11.x:a\"\nchap = { user = \"u\", secret = \"short\" }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("target[0].chap.secret"), "{e}");
        let e = parse("[[target]]\nname = \"iqn.2026-11.x:a\"\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("test.toml") && e.contains("bogus"), "{e}");
        let e = parse("[[target]]\nname = \"bad name\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("target[0].name"), "{e}");
    }

    #[test]
    fn physical_block_size_defaults_to_the_file_system_block_and_is_checked() {
        let lun = |extra: &str| {
            parse(&format!("[[target]]\nname = \"iqn.2026-11.x:a\"\n[[target.lun]]\nid = 0\npath = \"a.img\"\nsize = 1048576\n{extra}\n"))
        };
        let c = lun("").unwrap();
        assert_eq!(c.targets[0].luns[0].physical_block_size, 4096);
        let c = lun("block_size = 4096").unwrap();
        assert_eq!(c.targets[0].luns[0].physical_block_size, 4096);
        let c = lun("physical_block_size = 512").unwrap();
        assert_eq!(c.targets[0].luns[0].physical_block_size, 512);
        for bad in [
            "physical_block_size = 3000",
            "physical_block_size = 256",
            "block_size = 4096\nphysical_block_size = 512",
            "physical_block_size = 2097152",
        ] {
            let e = lun(bad).unwrap_err().to_string();
            assert!(
                e.contains("target[0].lun[0].physical_block_size"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn resync_rate_defaults_and_is_checked() {
        let peer = |extra: &str| {
            parse(&format!(
                "[peer]\nname = \"b\"\naddress = \"198.18.0.2:7789\"\nlisten = \"198.18.0.1:7789\"\npsk = \"0123456789abcdef\"\n{extra}\n[[target]]\nname = \"iqn.2026-11.x:a\"\n"
            ))
        };
        let rate = |c: Config| c.peer.map(|p| p.resync_rate_bytes_per_s);
        assert_eq!(
            rate(peer("").unwrap()),
            Some(DEFAULT_RESYNC_RATE_BYTES_PER_S)
        );
        assert_eq!(rate(peer("resync_rate = \"1GiB\"").unwrap()), Some(1 << 30));
        for bad in [
            "resync_rate = \"512KiB\"",
            "resync_rate = \"1TiB\"",
            "resync_rate = 0",
        ] {
            let e = peer(bad).unwrap_err().to_string();
            assert!(e.contains("peer.resync_rate"), "{bad}: {e}");
        }
    }

    #[test]
    fn overrides_win() {
        let ov = Overrides {
            listen: Some("127.0.0.1:3999".into()),
            data_dir: Some("/tmp/x".into()),
        };
        let c = Config::parse_str("[server]\nlisten = \"0.0.0.0:3260\"\n[[target]]\nname = \"iqn.2026-11.x:a\"\n[[target.lun]]\nid = 1\npath = \"l.img\"\nsize = 1048576\n", "f", None, &ov).unwrap();
        assert_eq!(c.listen.port(), 3999);
        assert_eq!(c.targets[0].luns[0].path, PathBuf::from("/tmp/x/l.img"));
    }

    #[test]
    fn cidr_matching() {
        let c = Cidr::parse("198.18.0.0/15").unwrap();
        assert!(c.contains("198.19.1.1".parse().unwrap()));
        assert!(!c.contains("198.20.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:198.18.0.9".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("127.0.0.1")
            .unwrap()
            .contains("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn identity_is_stable_and_distinct() {
        assert_eq!(
            derive_serial("iqn.2026-11.x:a", 0),
            derive_serial("IQN.2026-11.X:A", 0)
        );
        assert_ne!(
            derive_serial("iqn.2026-11.x:a", 0),
            derive_serial("iqn.2026-11.x:a", 1)
        );
        assert_ne!(
            derive_naa_id("iqn.2026-11.x:a", 0),
            derive_naa_id("iqn.2026-11.x:b", 0)
        );
        // Pinned: identities must never change across releases (ESXi keys datastores on
        // them). This literal is what VPD 0x80 reported for the embedded default LUN.
        assert_eq!(
            derive_serial("iqn.2026-11.io.twinsan:default", 0),
            "2b10c2f3f740bc24"
        );
    }
}
