//! Command-line arguments of `twinsan bench` and the parsing helpers behind them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};

/// `twinsan bench URL [options]`: an iSCSI load generator and data verifier.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Target LUN: iscsi://[user%secret@]host[:port]/target-iqn/lun (port 3260, LUN 0 by default).
    pub url: String,
    /// Sessions (one TCP connection and one thread each, pinned round-robin to cores).
    #[arg(long, default_value_t = 1)]
    pub sessions: usize,
    /// Commands kept in flight per session.
    #[arg(long, default_value_t = 1)]
    pub iodepth: usize,
    /// Block size of each I/O: bytes or with a k/m suffix (4k, 128k, 1m), or for random
    /// jobs a range MIN-MAX (4k-64k: every I/O a multiple of MIN, uniformly up to MAX).
    #[arg(long, default_value = "4k", value_parser = parse_bs)]
    pub bs: BsRange,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    pub rw: Rw,
    /// Percentage of reads for --rw randrw.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmix_read: u8,
    /// Percentage of writes (randwrite, randrw) sent as UNMAP of the same blocks instead. With
    /// --verify, unmapped blocks must read as zeros: the target must report LBPRZ=1.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub unmap_pct: u8,
    /// Measured seconds (after the ramp). Default 10; see --verify-state for the exception.
    #[arg(long)]
    pub runtime: Option<f64>,
    /// Seconds of warm-up load before measuring (excluded from the statistics).
    #[arg(long, default_value_t = 0.0)]
    pub ramp: f64,
    /// Bytes of the LUN to use from LBA 0 (k/m/g/t suffixes); default: the whole LUN.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// CHAP user (or in the URL as user%secret@).
    #[arg(long)]
    pub user: Option<String>,
    /// CHAP secret.
    #[arg(long)]
    pub secret: Option<String>,
    /// Mutual CHAP: the user the target must answer with (needs --target-secret and a
    /// one-way user and secret; the login then insists on CHAP).
    #[arg(long)]
    pub target_user: Option<String>,
    /// Mutual CHAP: the target's secret (must differ from --secret).
    #[arg(long)]
    pub target_secret: Option<String>,
    /// Initiator name to log in with.
    #[arg(long, default_value = "iqn.2026-11.io.twinsan:bench")]
    pub initiator: String,
    /// Offer CRC32C header and data digests.
    #[arg(long)]
    pub digest: bool,
    /// Offer ImmediateData at login (yes: write data rides with the command up to the
    /// first burst; no: all of it follows as Data-Out PDUs, unsolicited or after R2T).
    #[arg(long, value_enum, default_value_t = YesNo::Yes)]
    pub immediate_data: YesNo,
    /// Write self-describing sectors and check every read against the last acknowledged write.
    #[arg(long)]
    pub verify: bool,
    /// Read every block with a known acknowledged write once, check it, and stop.
    #[arg(long)]
    pub verify_only: bool,
    /// Ack log: loaded at start if it exists, saved at the end of a run that wrote. With an
    /// existing file, `--rw read` and no --runtime, the run is a --verify-only pass. Implies --verify.
    #[arg(long)]
    pub verify_state: Option<PathBuf>,
    /// Sequential jobs only: stop after one pass over the range (e.g. to fill a LUN).
    #[arg(long)]
    pub once: bool,
    /// Survive a lost connection (error, EOF, reset, or a command unanswered for
    /// --io-timeout-ms): log in again to the same URL and re-issue every unanswered
    /// command; BUSY, TASK SET FULL and UNIT ATTENTION answers are retried too. For
    /// failover tests: the report gives the stall and the outages.
    #[arg(long)]
    pub reconnect: bool,
    /// With --reconnect: a command unanswered this long means the connection is dead.
    #[arg(long, default_value_t = 2000, requires = "reconnect")]
    pub io_timeout_ms: u64,
    /// With --reconnect: give up when no login succeeded this long after the failure.
    #[arg(long, default_value_t = 60.0, requires = "reconnect")]
    pub reconnect_timeout_s: f64,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also measure this process's CPU per I/O (the target daemon's pid).
    #[arg(long)]
    pub target_pid: Option<u32>,
    /// Do not pin session threads to cores.
    #[arg(long)]
    pub no_pin: bool,
    /// Suppress the live progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// A yes/no option value, spelled as iSCSI keys are.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum YesNo {
    Yes,
    No,
}

/// Access pattern of a job.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    Read,
    Write,
    Randread,
    Randwrite,
    Randrw,
}

impl Rw {
    pub fn random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite | Rw::Randrw)
    }
    pub fn writes(self) -> bool {
        matches!(self, Rw::Write | Rw::Randwrite | Rw::Randrw)
    }
    pub fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Randrw => "randrw",
        }
    }
}

/// Parses `4096`, `4k`, `128K`, `1m`, `4GiB`, `2t` into bytes (binary multiples).
/// An I/O size, or a range of sizes (`--bs 4k-64k`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BsRange {
    pub min: u64,
    pub max: u64,
}

/// Parses `--bs`: one size, or `MIN-MAX`.
pub fn parse_bs(s: &str) -> Result<BsRange, String> {
    match s.split_once('-') {
        None => parse_size(s).map(|n| BsRange { min: n, max: n }),
        Some((a, b)) => Ok(BsRange {
            min: parse_size(a)?,
            max: parse_size(b)?,
        }),
    }
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(format!(
            "{s:?} is not a size (want e.g. 4096, 4k, 128k, 4g)"
        ));
    }
    let n: u64 = t[..digits_end].parse().map_err(|e| format!("{s:?}: {e}"))?;
    let shift = match t[digits_end..].to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("{s:?}: unknown unit {other:?}")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} overflows"))
}

/// A parsed `iscsi://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiUrl {
    pub host: String,
    pub port: u16,
    pub target: String,
    pub lun: u16,
    pub user: Option<String>,
    pub secret: Option<String>,
}

impl IscsiUrl {
    /// `host:port` for `TcpStream::connect`.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Parses `iscsi://[user%secret@]host[:port]/iqn/lun` (libiscsi's syntax).
pub fn parse_url(s: &str) -> anyhow::Result<IscsiUrl> {
    let rest = s
        .strip_prefix("iscsi://")
        .with_context(|| format!("{s:?}: URL must start with iscsi://"))?;
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((a, r)) => (Some(a), r),
        None => (None, rest),
    };
    let (user, secret) = match auth {
        Some(a) => match a.split_once('%') {
            Some((u, p)) => (Some(u.to_string()), Some(p.to_string())),
            None => (Some(a.to_string()), None),
        },
        None => (None, None),
    };
    let (hostport, path) = rest
        .split_once('/')
        .with_context(|| format!("{s:?}: missing /target-iqn/lun"))?;
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        let (h, after) = h
            .split_once(']')
            .with_context(|| format!("{s:?}: unclosed ["))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().with_context(|| format!("{s:?}: bad port"))?,
            None => 3260,
        };
        (h.to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse()
                    .with_context(|| format!("{s:?}: bad port {p:?}"))?,
            ),
            None => (hostport.to_string(), 3260),
        }
    };
    if host.is_empty() {
        bail!("{s:?}: empty host");
    }
    let path = path.trim_end_matches('/');
    let (target, lun) = match path.rsplit_once('/') {
        Some((t, l)) => (
            t.to_string(),
            l.parse().with_context(|| format!("{s:?}: bad LUN {l:?}"))?,
        ),
        None => (path.to_string(), 0),
    };
    if target.is_empty() {
        bail!("{s:?}: missing target name");
    }
    if lun > MAX_FLAT_LUN {
        bail!("{s:?}: LUN {lun} is beyond {MAX_FLAT_LUN} (SAM flat space addressing)");
    }
    Ok(IscsiUrl {
        host,
        port,
        target,
        lun,
        user,
        secret,
    })
}

/// The 8-byte LUN field for a LUN number (SAM-5 peripheral or flat addressing).
/// The largest LUN of SAM's flat space addressing (14 bits), what `encode_lun` encodes.
pub const MAX_FLAT_LUN: u16 = 0x3fff;

/// The 8-byte LUN field for `lun` (at most `MAX_FLAT_LUN`): peripheral addressing below
/// 256, flat space addressing above.
pub fn encode_lun(lun: u16) -> u64 {
    debug_assert!(lun <= MAX_FLAT_LUN);
    if lun < 256 {
        (lun as u64) << 48
    } else {
        ((0x40 | (lun as u64 >> 8) & 0x3f) << 56) | ((lun as u64 & 0xff) << 48)
    }
}

/// What `--reconnect` does on a lost connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconnect {
    /// A command unanswered this long means the connection is dead.
    pub io_timeout: Duration,
    /// Login attempts stop this long after the failure.
    pub timeout: Duration,
}

/// Everything a run needs, validated.
#[derive(Debug, Clone)]
pub struct Job {
    pub url: IscsiUrl,
    pub sessions: usize,
    pub iodepth: usize,
    /// The I/O size, or the smallest of a range: the unit that --verify tracks.
    pub bs: u64,
    /// The largest I/O size (a multiple of `bs`; equal to it for a fixed size).
    pub bs_max: u64,
    pub rw: Rw,
    pub rwmix_read: u8,
    /// Percentage of writes sent as UNMAP instead.
    pub unmap_pct: u8,
    pub runtime_s: f64,
    pub ramp_s: f64,
    pub size: Option<u64>,
    pub initiator: String,
    /// Mutual CHAP: the target's (user, secret).
    pub target_chap: Option<(String, String)>,
    pub digest: bool,
    pub immediate_data: bool,
    pub verify: bool,
    pub verify_only: bool,
    pub verify_state: Option<PathBuf>,
    pub once: bool,
    /// `--reconnect`: None keeps the old behaviour (a lost connection ends the session).
    pub reconnect: Option<Reconnect>,
    pub json: bool,
    pub target_pid: Option<u32>,
    pub pin: bool,
    pub quiet: bool,
}

impl BenchArgs {
    /// Validates the arguments into a [`Job`].
    pub fn job(&self) -> anyhow::Result<Job> {
        let mut url = parse_url(&self.url)?;
        if self.user.is_some() {
            url.user.clone_from(&self.user);
        }
        if self.secret.is_some() {
            url.secret.clone_from(&self.secret);
        }
        if url.user.is_some() != url.secret.is_some() {
            bail!("CHAP needs both a user and a secret");
        }
        let target_chap = match (&self.target_user, &self.target_secret) {
            (None, None) => None,
            (Some(u), Some(s)) if url.user.is_some() => Some((u.clone(), s.clone())),
            (Some(_), Some(_)) => bail!("mutual CHAP needs the one-way --user and --secret too"),
            _ => bail!("mutual CHAP needs both --target-user and --target-secret"),
        };
        if self.sessions == 0 || self.sessions > 1024 {
            bail!("--sessions must be 1..=1024");
        }
        if self.iodepth == 0 || self.iodepth > 4096 {
            bail!("--iodepth must be 1..=4096");
        }
        let BsRange {
            min: bs,
            max: bs_max,
        } = self.bs;
        if bs == 0 || !bs.is_multiple_of(512) || bs_max > 16 << 20 {
            bail!("--bs must be a multiple of 512 bytes and at most 16 MiB");
        }
        if bs_max < bs || !bs_max.is_multiple_of(bs) {
            bail!("--bs MIN-MAX: MAX must be a multiple of MIN, and not smaller");
        }
        if bs_max != bs && !self.rw.random() {
            bail!("--bs MIN-MAX is for random jobs (randread, randwrite, randrw)");
        }
        if self.ramp < 0.0 || self.runtime.is_some_and(|r| r <= 0.0) {
            bail!("--runtime must be positive and --ramp not negative");
        }
        if self.once && self.rw.random() {
            bail!("--once is for sequential jobs (--rw read or write)");
        }
        if self.unmap_pct > 0 && !matches!(self.rw, Rw::Randwrite | Rw::Randrw) {
            bail!("--unmap-pct is for random write jobs (--rw randwrite or randrw)");
        }
        let reconnect = if self.reconnect {
            if self.io_timeout_ms == 0 {
                bail!("--io-timeout-ms must be positive");
            }
            if !(self.reconnect_timeout_s > 0.0 && self.reconnect_timeout_s <= 86_400.0) {
                bail!("--reconnect-timeout-s must be in (0, 86400]");
            }
            Some(Reconnect {
                io_timeout: Duration::from_millis(self.io_timeout_ms),
                timeout: Duration::from_secs_f64(self.reconnect_timeout_s),
            })
        } else {
            None
        };
        let state_exists = self.verify_state.as_ref().is_some_and(|p| p.exists());
        let verify_only =
            self.verify_only || (state_exists && self.rw == Rw::Read && self.runtime.is_none());
        Ok(Job {
            url,
            sessions: self.sessions,
            iodepth: self.iodepth,
            bs,
            bs_max,
            rw: self.rw,
            rwmix_read: self.rwmix_read,
            unmap_pct: self.unmap_pct,
            runtime_s: self.runtime.unwrap_or(10.0),
            ramp_s: self.ramp,
            size: self.size,
            initiator: self.initiator.clone(),
            target_chap,
            digest: self.digest,
            immediate_data: self.immediate_data == YesNo::Yes,
            verify: self.verify || verify_only || self.verify_state.is_some(),
            verify_only,
            verify_state: self.verify_state.clone(),
            once: self.once,
            reconnect,
            json: self.json,
            target_pid: self.target_pid,
            pin: !self.no_pin,
            quiet: self.quiet,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        a: BenchArgs,
    }

    fn parse(args: &[&str]) -> BenchArgs {
        let mut v = vec!["bench"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap().a
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("128K"), Ok(128 << 10));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert!(parse_size("k").is_err());
        assert!(parse_size("4q").is_err());
    }

    #[test]
    fn urls() {
        let u = parse_url("iscsi://127.0.0.1:3262/iqn.2026-11.io.twinsan:default/0").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.target.as_str(), u.lun),
            ("127.0.0.1", 3262, "iqn.2026-11.io.twinsan:default", 0)
        );
        assert_eq!(u.user, None);
        let u = parse_url("iscsi://esx%initiator-secret@host/iqn.x:y/3").unwrap();
        assert_eq!((u.port, u.lun), (3260, 3));
        assert_eq!(u.user.as_deref(), Some("esx"));
        assert_eq!(u.secret.as_deref(), Some("initiator-secret"));
        assert_eq!(u.addr(), "host:3260");
        let u = parse_url("iscsi://[::1]:3263/iqn.a:b").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.lun), ("::1", 3263, 0));
        assert_eq!(u.addr(), "[::1]:3263");
        assert!(parse_url("http://x/y/0").is_err());
        assert!(parse_url("iscsi://x").is_err());
        assert!(parse_url("iscsi://x/iqn/notanumber").is_err());
    }

    #[test]
    fn lun_encoding() {
        assert_eq!(encode_lun(0), 0);
        assert_eq!(encode_lun(1), 0x0001_0000_0000_0000);
        assert_eq!(encode_lun(300), 0x412c_0000_0000_0000);
    }

    #[test]
    fn args_to_job() {
        let a = parse(&[
            "iscsi://h/iqn.a:b/0",
            "--sessions",
            "4",
            "--iodepth",
            "32",
            "--bs",
            "128k",
            "--rw",
            "randrw",
            "--rwmix-read",
            "70",
            "--runtime",
            "20",
            "--ramp",
            "3",
            "--user",
            "u",
            "--secret",
            "s3cr3t-s3cr3t",
        ]);
        let j = a.job().unwrap();
        assert_eq!(
            (j.sessions, j.iodepth, j.bs, j.rw, j.rwmix_read),
            (4, 32, 128 << 10, Rw::Randrw, 70)
        );
        assert_eq!((j.runtime_s, j.ramp_s), (20.0, 3.0));
        assert_eq!(j.url.user.as_deref(), Some("u"));
        assert!(!j.verify && !j.verify_only && j.pin);
        let j = parse(&["iscsi://h/iqn.a:b/0"]).job().unwrap();
        assert_eq!(
            (j.sessions, j.iodepth, j.bs, j.rw, j.runtime_s),
            (1, 1, 4096, Rw::Randread, 10.0)
        );
        assert!(parse(&["iscsi://h/iqn.a:b/0", "--bs", "1000"])
            .job()
            .is_err());
        let j = parse(&["iscsi://h/iqn.a:b/0", "--rw", "randwrite", "--bs", "4k-64k"])
            .job()
            .unwrap();
        assert_eq!((j.bs, j.bs_max), (4 << 10, 64 << 10));
        for bad in [
            ["--rw", "write", "--bs", "4k-64k"], // sequential
            ["--rw", "randwrite", "--bs", "64k-4k"],
            ["--rw", "randwrite", "--bs", "4k-6k"],
            ["--rw", "randwrite", "--bs", "4k-32m"],
        ] {
            let mut v = vec!["iscsi://h/iqn.a:b/0"];
            v.extend(bad);
            assert!(parse(&v).job().is_err(), "{bad:?} accepted");
        }
        assert!(parse(&["iscsi://h/iqn.a:b/0", "--user", "u"])
            .job()
            .is_err());
        let mut v = vec!["bench", "iscsi://h/iqn.a:b/0", "--rwmix-read", "101"];
        assert!(Cli::try_parse_from(&v).is_err());
        v.truncate(2);
        v.push("--verify-state");
        v.push("/nonexistent/state");
        let j = Cli::try_parse_from(&v).unwrap().a.job().unwrap();
        assert!(
            j.verify && !j.verify_only,
            "a missing state file is a fresh log, not a verify pass"
        );
    }

    #[test]
    fn reconnect_options() {
        let j = parse(&["iscsi://h/iqn.a:b/0"]).job().unwrap();
        assert_eq!(j.reconnect, None, "off unless asked for");
        let j = parse(&["iscsi://h/iqn.a:b/0", "--reconnect"])
            .job()
            .unwrap();
        assert_eq!(
            j.reconnect,
            Some(Reconnect {
                io_timeout: Duration::from_millis(2000),
                timeout: Duration::from_secs(60),
            })
        );
        let j = parse(&[
            "iscsi://h/iqn.a:b/0",
            "--reconnect",
            "--io-timeout-ms",
            "500",
            "--reconnect-timeout-s",
            "2.5",
        ])
        .job()
        .unwrap();
        assert_eq!(
            j.reconnect,
            Some(Reconnect {
                io_timeout: Duration::from_millis(500),
                timeout: Duration::from_millis(2500),
            })
        );
        for bad in [
            &["--io-timeout-ms", "500"][..], // without --reconnect
            &["--reconnect-timeout-s", "5"],
        ] {
            let mut v = vec!["bench", "iscsi://h/iqn.a:b/0"];
            v.extend(bad);
            assert!(Cli::try_parse_from(&v).is_err(), "{bad:?} accepted");
        }
        for bad in [
            &["--reconnect", "--io-timeout-ms", "0"][..],
            &["--reconnect", "--reconnect-timeout-s", "0"],
            &["--reconnect", "--reconnect-timeout-s", "NaN"],
        ] {
            let mut v = vec!["iscsi://h/iqn.a:b/0"];
            v.extend(bad);
            assert!(parse(&v).job().is_err(), "{bad:?} accepted");
        }
    }
}
