//! The closing report (human and JSON), the live progress line, and CPU accounting.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// A latency histogram in microseconds (1 µs .. 1 hour, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds")
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            min: h.min(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// What was run, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct JobSummary {
    pub target: String,
    pub portal: String,
    pub lun: u16,
    pub rw: String,
    pub rwmix_read: u8,
    pub unmap_pct: u8,
    pub bs: u64,
    /// The largest I/O size (equal to `bs` unless `--bs MIN-MAX`).
    pub bs_max: u64,
    pub sessions: usize,
    pub iodepth: usize,
    pub runtime_s: f64,
    pub ramp_s: f64,
    pub size_bytes: u64,
    pub block_size: u32,
    pub digest: bool,
    pub verify: bool,
    pub verify_only: bool,
    /// `--reconnect` was on.
    pub reconnect: bool,
}

/// One outage of a run: a connection failure and the wait for I/O after it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutageReport {
    /// When the bench found the first connection of the outage lost, in ms since the run
    /// started (a silent connection is found lost --io-timeout-ms after its last answer).
    pub start_ms: f64,
    /// From that failure to the first command completed after it, in any session; None
    /// (null) if none completed.
    pub first_io_after_ms: Option<f64>,
    /// Connections found lost before that completion (a session whose new connection
    /// failed again counts again).
    pub connection_failures: u32,
}

/// The closing report of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub job: JobSummary,
    pub elapsed_s: f64,
    pub ios: u64,
    pub reads: u64,
    pub writes: u64,
    /// Of `writes`, those sent as UNMAP (--unmap-pct).
    pub unmaps: u64,
    pub bytes: u64,
    pub iops: f64,
    pub mib_s: f64,
    pub latency_us: Latency,
    pub read_latency_us: Option<Latency>,
    pub write_latency_us: Option<Latency>,
    /// Commands that ended in CHECK CONDITION or another non-GOOD status, or moved less
    /// data than asked with GOOD status.
    pub errors: u64,
    /// Commands the target answered BUSY or TASK SET FULL (not run; not errors).
    pub busy: u64,
    pub rejects: u64,
    pub verified_ios: u64,
    pub verify_mismatches: u64,
    /// Blocks whose latest write was sent but never acknowledged at the end of the run:
    /// until a write to one is acknowledged, its old or its new data is correct.
    pub verify_unacknowledged_blocks: u64,
    /// The longest interval in which no command completed (GOOD) in any session, in ms
    /// (1 ms resolution), over the whole run from its start to the end of the drain.
    pub stall_max_ms: u64,
    /// Logins that replaced a lost connection (--reconnect).
    pub reconnects: u64,
    /// Commands sent again on a new connection because the lost one left them unanswered.
    pub reissued: u64,
    /// Commands answered UNIT ATTENTION and sent again (--reconnect).
    pub unit_attentions: u64,
    pub outages: Vec<OutageReport>,
    /// (user + system CPU of this process) / I/Os, over the measured interval.
    pub bench_cpu_us_per_io: f64,
    /// Same for `--target-pid`, from /proc/PID/stat.
    pub target_cpu_us_per_io: Option<f64>,
    /// Fraction of one core the target used over the measured interval.
    pub target_cpu_cores: Option<f64>,
    /// Sessions that ended in an error (connection lost, protocol violation), one line each.
    pub failures: Vec<String>,
}

fn lat_line(out: &mut String, label: &str, l: &Latency) {
    let _ = writeln!(
        out,
        "  {label:<6} min {} / p50 {} / p90 {} / p99 {} / p99.9 {} / max {} us (mean {:.1})",
        l.min, l.p50, l.p90, l.p99, l.p999, l.max, l.mean
    );
}

/// Formats the human-readable report.
pub fn format_report(r: &Report) -> String {
    let j = &r.job;
    let mut out = String::new();
    let mix = if j.rw == "randrw" {
        format!(" ({}% reads)", j.rwmix_read)
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "twinsan bench: {} lun {} at {}: {}{} bs={} sessions={} iodepth={}{}{}",
        j.target,
        j.lun,
        j.portal,
        j.rw,
        mix,
        if j.bs_max == j.bs {
            human_bytes(j.bs)
        } else {
            format!("{}-{}", human_bytes(j.bs), human_bytes(j.bs_max))
        },
        j.sessions,
        j.iodepth,
        if j.digest { " digests=CRC32C" } else { "" },
        if j.verify { " verify" } else { "" },
    );
    let _ = writeln!(
        out,
        "  {:.1} s measured (after {:.1} s ramp) over {} of {}-byte blocks",
        r.elapsed_s,
        j.ramp_s,
        human_bytes(j.size_bytes),
        j.block_size
    );
    let unmaps = if r.unmaps > 0 {
        format!(", {} of them UNMAP", r.unmaps)
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "  IOPS {:.0}  bandwidth {:.1} MiB/s  ({} I/Os: {} reads, {} writes{unmaps})",
        r.iops, r.mib_s, r.ios, r.reads, r.writes
    );
    lat_line(&mut out, "lat", &r.latency_us);
    if let (Some(rl), Some(wl)) = (&r.read_latency_us, &r.write_latency_us) {
        lat_line(&mut out, "read", rl);
        lat_line(&mut out, "write", wl);
    }
    let _ = write!(out, "  CPU per I/O: bench {:.1} us", r.bench_cpu_us_per_io);
    if let (Some(t), Some(c)) = (r.target_cpu_us_per_io, r.target_cpu_cores) {
        let _ = write!(out, ", target {t:.1} us ({c:.2} cores busy)");
    }
    out.push('\n');
    let _ = write!(out, "  errors {}  rejects {}", r.errors, r.rejects);
    if r.busy > 0 {
        let _ = write!(out, "  busy {} (BUSY or TASK SET FULL, not run)", r.busy);
    }
    out.push('\n');
    for f in &r.failures {
        let _ = writeln!(out, "  FAILED {f}");
    }
    let _ = write!(
        out,
        "  stall: longest {} ms without a completion",
        r.stall_max_ms
    );
    if j.reconnect || r.reconnects > 0 {
        let _ = write!(
            out,
            "; {} reconnects, {} commands re-issued, {} unit attentions retried",
            r.reconnects, r.reissued, r.unit_attentions
        );
    }
    out.push('\n');
    for o in &r.outages {
        let _ = write!(
            out,
            "  outage at {:.1} ms: {} connections lost, ",
            o.start_ms, o.connection_failures
        );
        let _ = match o.first_io_after_ms {
            Some(ms) => writeln!(out, "first I/O {ms:.1} ms after the failure"),
            None => writeln!(out, "no I/O completed after it"),
        };
    }
    if j.verify {
        let _ = write!(
            out,
            "  verify: {} blocks read back and checked, {} mismatches",
            r.verified_ios, r.verify_mismatches
        );
        if r.verify_unacknowledged_blocks > 0 {
            let _ = write!(
                out,
                "; {} blocks with an unacknowledged last write (old or new data accepted)",
                r.verify_unacknowledged_blocks
            );
        }
        out.push('\n');
    }
    out
}

/// The live progress line (no newline); `left_s`: the time left, when the run is timed.
pub fn progress_line(
    t_s: f64,
    ramping: bool,
    iops: f64,
    mib_s: f64,
    p99_us: Option<u64>,
    errors: u64,
    left_s: Option<f64>,
) -> String {
    let p99 = p99_us
        .map(|p| format!("{p} us"))
        .unwrap_or_else(|| "-".into());
    let phase = if ramping { " ramp" } else { "" };
    let eta = left_s
        .map(|l| format!("  ETA {:.0}s", l.max(0.0)))
        .unwrap_or_default();
    format!(
        "[{t_s:5.0}s{phase}] {iops:>9.0} IOPS {mib_s:>9.1} MiB/s  p99 {p99}  errors {errors}{eta}"
    )
}

/// `4096` -> `4KiB`, `131072` -> `128KiB`, `4294967296` -> `4GiB`; odd sizes stay bytes.
pub fn human_bytes(n: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    format!("{n}B")
}

/// User + system CPU time of this process, in microseconds (getrusage).
pub fn self_cpu_us() -> u64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// utime + stime of `pid` in microseconds, from /proc/PID/stat.
pub fn proc_cpu_us(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_proc_stat_cpu_ticks(&s).map(|ticks| {
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        ticks * 1_000_000 / hz
    })
}

/// utime + stime (fields 14 and 15) in clock ticks from a /proc/PID/stat line.
pub fn parse_proc_stat_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state), so field N is f[N - 3].
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let mut h = new_histogram();
        for v in 1..=1000u64 {
            h.record(v * 10).unwrap();
        }
        Report {
            job: JobSummary {
                target: "iqn.t:x".into(),
                portal: "127.0.0.1:3262".into(),
                lun: 0,
                rw: "randrw".into(),
                rwmix_read: 70,
                unmap_pct: 0,
                bs: 4096,
                bs_max: 4096,
                sessions: 1,
                iodepth: 32,
                runtime_s: 20.0,
                ramp_s: 3.0,
                size_bytes: 4 << 30,
                block_size: 512,
                digest: false,
                verify: true,
                verify_only: false,
                reconnect: true,
            },
            elapsed_s: 20.0,
            ios: 1000,
            reads: 700,
            writes: 300,
            unmaps: 0,
            bytes: 4096 * 1000,
            iops: 50.0,
            mib_s: 0.2,
            latency_us: Latency::of(&h),
            read_latency_us: Some(Latency::of(&h)),
            write_latency_us: Some(Latency::of(&h)),
            errors: 0,
            busy: 0,
            rejects: 0,
            verified_ios: 700,
            verify_mismatches: 0,
            verify_unacknowledged_blocks: 3,
            stall_max_ms: 612,
            reconnects: 2,
            reissued: 64,
            unit_attentions: 1,
            outages: vec![OutageReport {
                start_ms: 1012.25,
                first_io_after_ms: Some(611.5),
                connection_failures: 2,
            }],
            bench_cpu_us_per_io: 12.34,
            target_cpu_us_per_io: Some(20.0),
            target_cpu_cores: Some(0.5),
            failures: Vec::new(),
        }
    }

    #[test]
    fn percentiles_from_histogram() {
        let l = sample().latency_us;
        assert_eq!(l.min, 10);
        assert_eq!(
            l.max,
            10_000 + 7,
            "3 significant digits: max is the bucket's upper value"
        );
        assert!((4990..=5010).contains(&l.p50), "{}", l.p50);
        assert!((9890..=9910).contains(&l.p99), "{}", l.p99);
        assert_eq!(Latency::of(&new_histogram()), Latency::default());
    }

    #[test]
    fn human_report() {
        let s = format_report(&sample());
        assert!(
            s.contains("randrw (70% reads) bs=4KiB sessions=1 iodepth=32"),
            "{s}"
        );
        assert!(s.contains("over 4GiB of 512-byte blocks"), "{s}");
        assert!(
            s.contains("IOPS 50  bandwidth 0.2 MiB/s  (1000 I/Os: 700 reads, 300 writes)"),
            "{s}"
        );
        assert!(s.contains("  lat    min 10 / p50 "), "{s}");
        assert!(
            s.contains("CPU per I/O: bench 12.3 us, target 20.0 us (0.50 cores busy)"),
            "{s}"
        );
        assert!(
            s.contains("verify: 700 blocks read back and checked, 0 mismatches; 3 blocks with an unacknowledged last write"),
            "{s}"
        );
        assert!(
            s.contains("stall: longest 612 ms without a completion; 2 reconnects, 64 commands re-issued, 1 unit attentions retried"),
            "{s}"
        );
        assert!(
            s.contains(
                "outage at 1012.2 ms: 2 connections lost, first I/O 611.5 ms after the failure"
            ),
            "{s}"
        );
    }

    #[test]
    fn json_report_has_fields() {
        let v: serde_json::Value = serde_json::to_value(sample()).unwrap();
        assert_eq!(v["iops"], 50.0);
        assert_eq!(v["latency_us"]["min"], 10);
        assert_eq!(v["job"]["rw"], "randrw");
        assert!(v["latency_us"]["p999"].is_u64());
        assert_eq!(v["stall_max_ms"], 612);
        assert_eq!(v["reconnects"], 2);
        assert_eq!(v["outages"][0]["start_ms"], 1012.25);
        assert_eq!(v["outages"][0]["first_io_after_ms"], 611.5);
        assert_eq!(v["verify_unacknowledged_blocks"], 3);
        let mut r = sample();
        r.outages[0].first_io_after_ms = None;
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert!(v["outages"][0]["first_io_after_ms"].is_null());
        assert!(format_report(&r).contains("no I/O completed after it"));
    }

    #[test]
    fn progress() {
        assert_eq!(
            progress_line(3.0, true, 1234.4, 4.82, Some(250), 0, Some(11.6)),
            "[    3s ramp]      1234 IOPS       4.8 MiB/s  p99 250 us  errors 0  ETA 12s"
        );
        assert!(progress_line(1.0, false, 0.0, 0.0, None, 2, None).ends_with("p99 -  errors 2"));
    }

    #[test]
    fn sizes_and_proc_stat() {
        assert_eq!(human_bytes(4096), "4KiB");
        assert_eq!(human_bytes(128 << 10), "128KiB");
        assert_eq!(human_bytes(4 << 30), "4GiB");
        assert_eq!(human_bytes(1000), "1000B");
        let line =
            "1234 (tw (x) d) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_proc_stat_cpu_ticks(line), Some(325));
        assert!(proc_cpu_us(std::process::id()).is_some());
        assert!(self_cpu_us() > 0);
    }
}
