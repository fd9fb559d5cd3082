//! Benchmarks and the `twinsan bench` load generator: an iSCSI initiator built on `proto`.
//!
//! `twinsan bench` wiring: `Bench(benches::BenchArgs)` in the CLI, then
//! `benches::run_cli(args)`. Each session is one TCP connection driven by one thread
//! (pinned round-robin to cores) that keeps `--iodepth` commands in flight.

pub mod args;
pub mod conn;
#[cfg(test)]
mod fake_target;
pub mod report;
pub mod stall;
pub mod verify;
pub mod worker;

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use proto::login::chap::{ChapEntropy, ChapInitiator, CHALLENGE_LEN_BYTES};
use proto::login::ChapCredentials;

pub use args::{BenchArgs, Job, Rw};
use conn::Conn;
use report::{
    format_report, new_histogram, progress_line, JobSummary, Latency, OutageReport, Report,
};
use verify::Tracker;
use worker::{Plan, SessionResult, Shared, Worker};

/// ISID qualifier of this process: random (type 0x80 is "random" in RFC 7143 section
/// 11.12.5), so two bench processes with the same initiator name (in containers, PIDs
/// repeat) never share an ISID and reinstate, i.e. close, each other's sessions.
fn isid_for(session: usize) -> [u8; 6] {
    static QUALIFIER: OnceLock<[u8; 3]> = OnceLock::new();
    let q = QUALIFIER.get_or_init(|| {
        let mut q = [0u8; 3];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut q);
        q
    });
    [0x80, q[0], q[1], q[2], (session >> 8) as u8, session as u8]
}

fn chap_of(job: &Job) -> Result<Option<ChapInitiator>> {
    match (&job.url.user, &job.url.secret) {
        (Some(u), Some(s)) => {
            let creds = ChapCredentials::new(u.clone(), s.as_bytes().to_vec())
                .map_err(|e| anyhow::anyhow!("CHAP credentials: {e}"))?;
            let mutual = match &job.target_chap {
                None => None,
                Some((tu, ts)) => {
                    let target = ChapCredentials::new(tu.clone(), ts.as_bytes().to_vec())
                        .map_err(|e| anyhow::anyhow!("mutual CHAP credentials: {e}"))?;
                    // Our challenge to the target: fresh and unpredictable per run.
                    let mut e = ChapEntropy {
                        id: 0,
                        challenge: [0; CHALLENGE_LEN_BYTES],
                    };
                    let mut id = [0u8; 1];
                    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
                    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut e.challenge);
                    e.id = id[0];
                    Some((target, e))
                }
            };
            Ok(Some(
                ChapInitiator::new(creds, mutual).map_err(|e| anyhow::anyhow!("CHAP: {e}"))?,
            ))
        }
        _ => Ok(None),
    }
}

fn open_session(job: &Job, chap: Option<&ChapInitiator>, session: usize) -> Result<Conn> {
    open_session_within(job, chap, session, None)
}

/// Connects and logs in session `session` (its ISID: a new login with it reinstates the
/// session, ending the old connection's tasks on the target). With `timeout`, each step
/// (the TCP connect, at most `worker`'s connect attempt limit; every login exchange; each
/// TEST UNIT READY) gives up after it, for the attempts of --reconnect.
fn open_session_within(
    job: &Job,
    chap: Option<&ChapInitiator>,
    session: usize,
    timeout: Option<Duration>,
) -> Result<Conn> {
    let lun = args::encode_lun(job.url.lun);
    let mut c = match timeout {
        None => Conn::connect(&job.url.addr(), lun)?,
        Some(t) => {
            Conn::connect_timeout(&job.url.addr(), lun, t.min(worker::CONNECT_ATTEMPT_TIMEOUT))?
        }
    };
    c.exchange_timeout = timeout;
    c.offer_immediate_data = job.immediate_data;
    c.login(
        &job.initiator,
        &job.url.target,
        isid_for(session),
        job.digest,
        chap,
    )
    .with_context(|| format!("login to {} at {}", job.url.target, job.url.addr()))?;
    c.until_ready()?;
    c.exchange_timeout = None;
    Ok(c)
}

/// Runs `twinsan bench` and prints its report (and the JSON one), also for a run in which
/// sessions failed: a failover test needs the figures of the run that saw the failure.
/// Failed sessions, verify mismatches and failed commands make it return `Err`, so the
/// process exits non-zero.
pub fn run_cli(args: BenchArgs) -> Result<()> {
    let job = args.job()?;
    let report = run(&job)?;
    eprint!("{}", format_report(&report));
    if job.json {
        use std::io::Write as _;
        let text = serde_json::to_string_pretty(&report)?;
        // A reader that went away (`| head`) is not the benchmark's failure: the verdict
        // below still decides the exit status.
        if let Err(e) = writeln!(std::io::stdout(), "{text}") {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(e.into());
            }
        }
    }
    if !report.failures.is_empty() {
        bail!("{}", report.failures.join("; "));
    }
    if report.verify_mismatches > 0 {
        bail!("{} verify mismatches", report.verify_mismatches);
    }
    if report.errors > 0 {
        bail!("{} commands failed", report.errors);
    }
    Ok(())
}

/// Runs one job and returns its report; sessions that failed are listed in its
/// `failures` (an `Err` is a job that could not start).
pub fn run(job: &Job) -> Result<Report> {
    let chap = chap_of(job)?;
    // Probe: capacity and block size, on a session of its own.
    let (capacity, block_size) = {
        let mut c = open_session(job, chap.as_ref(), 0xffff)?;
        let cap = c.read_capacity()?;
        let p = c.params;
        if !job.quiet {
            eprintln!(
                "twinsan bench: {} lun {}: {} bytes, {}-byte blocks; target MaxRecvDataSegmentLength {}, FirstBurstLength {}, MaxBurstLength {}, ImmediateData {}, InitialR2T {}, HeaderDigest CRC32C {}, DataDigest CRC32C {}",
                job.url.target, job.url.lun, cap.0, cap.1, p.target_mrdsl, p.first_burst, p.max_burst, p.immediate_data, p.initial_r2t, p.digests.header, p.digests.data
            );
        }
        c.logout()?;
        cap
    };
    if !job.bs.is_multiple_of(block_size as u64) {
        bail!(
            "--bs {} is not a multiple of the LUN's block size {block_size}",
            job.bs
        );
    }
    let size = job.size.unwrap_or(capacity).min(capacity);
    let units = size / job.bs;
    if units == 0 {
        bail!("--size {size} holds no block of --bs {}", job.bs);
    }

    if job.verify {
        verify::check_units(units, job.bs)?;
    }
    let state_exists = job.verify_state.as_ref().is_some_and(|p| p.exists());
    let tracker = if !job.verify {
        None
    } else if state_exists {
        let p = job.verify_state.as_ref().unwrap();
        let t = Tracker::load(p)?;
        if t.unit_bytes() != job.bs {
            bail!(
                "{} was written with --bs {}; use the same",
                p.display(),
                t.unit_bytes()
            );
        }
        if t.units() != units {
            bail!(
                "{} covers {} units of {} bytes, this run {units}: use the same --size",
                p.display(),
                t.units(),
                job.bs
            );
        }
        Some(Arc::new(t))
    } else {
        if job.verify_only {
            bail!("--verify-only needs an existing --verify-state file");
        }
        Some(Arc::new(Tracker::new(job.bs, units)))
    };
    let verify_list = if job.verify_only {
        tracker.as_ref().map(|t| Arc::new(t.known_units()))
    } else {
        None
    };
    if let Some(l) = &verify_list {
        if !job.quiet {
            eprintln!(
                "twinsan bench: verify-only pass over {} blocks with acknowledged writes",
                l.len()
            );
        }
    }

    let shared = Shared::default();
    let t0_cell: OnceLock<Instant> = OnceLock::new();
    let barrier = Barrier::new(job.sessions + 1);
    let cores = if job.pin {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let ramp = if job.verify_only || job.once {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(job.ramp_s)
    };
    let runtime = Duration::from_secs_f64(job.runtime_s);

    // When the last session finished: the end of the window the stall is measured over.
    let mut run_end = Instant::now();
    let (results, elapsed, bench_cpu, target_cpu) = std::thread::scope(|scope| -> Result<_> {
        let mut handles = Vec::new();
        for i in 0..job.sessions {
            let core = if cores.is_empty() {
                None
            } else {
                Some(cores[i % cores.len()])
            };
            let (shared, barrier, t0_cell, tracker, verify_list, chap) = (
                &shared,
                &barrier,
                &t0_cell,
                tracker.clone(),
                verify_list.clone(),
                chap.as_ref(),
            );
            handles.push(scope.spawn(move || -> SessionResult {
                if let Some(c) = core {
                    core_affinity::set_for_current(c);
                }
                let conn = open_session(job, chap, i);
                barrier.wait();
                let t0 = *t0_cell.get_or_init(Instant::now);
                let conn = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        shared.stop.store(true, Ordering::Relaxed);
                        let mut r = Worker::empty_result();
                        r.failure = Some(format!("session {i}: {e:#}"));
                        return r;
                    }
                };
                let measure_start = t0 + ramp;
                let end = if job.verify_only || job.once {
                    None
                } else {
                    Some(measure_start + runtime)
                };
                let plan = Plan {
                    units,
                    bs: job.bs,
                    max_units: job.bs_max / job.bs,
                    block_size,
                    tracker,
                    verify_list,
                    measure_start,
                    end,
                };
                Worker::new(conn, job, plan, shared, i, chap).run()
            }));
        }
        barrier.wait();
        let t0 = *t0_cell.get_or_init(Instant::now);
        let measure_start = t0 + ramp;
        let tty = std::io::stderr().is_terminal();
        let window_end = (!job.verify_only && !job.once).then(|| measure_start + runtime);
        // CPU is sampled at the edges of the measured window (not the drain and logout),
        // the interval whose I/Os it is divided by.
        let mut cpu0: Option<(u64, Option<u64>)> = None;
        let mut cpu1: Option<(u64, Option<u64>)> = None;
        let (mut last_ios, mut last_bytes, mut last_t) = (0u64, 0u64, t0);
        let mut next_tick = t0 + Duration::from_secs(1);
        loop {
            let all_done = handles.iter().all(|h| h.is_finished());
            let now = Instant::now();
            if cpu0.is_none() && now >= measure_start {
                cpu0 = Some((
                    report::self_cpu_us(),
                    job.target_pid.and_then(report::proc_cpu_us),
                ));
            }
            if cpu1.is_none() && window_end.is_some_and(|e| now >= e) {
                cpu1 = Some((
                    report::self_cpu_us(),
                    job.target_pid.and_then(report::proc_cpu_us),
                ));
            }
            if all_done {
                break;
            }
            if now >= next_tick {
                next_tick += Duration::from_secs(1);
                let ios = shared.ios.load(Ordering::Relaxed);
                let bytes = shared.bytes.load(Ordering::Relaxed);
                let dt = now.duration_since(last_t).as_secs_f64().max(1e-6);
                let p99 = shared
                    .hist
                    .lock()
                    .ok()
                    .filter(|h| !h.is_empty())
                    .map(|h| h.value_at_quantile(0.99));
                if !job.quiet {
                    let line = progress_line(
                        now.duration_since(t0).as_secs_f64(),
                        now < measure_start,
                        (ios - last_ios) as f64 / dt,
                        (bytes - last_bytes) as f64 / dt / 1048576.0,
                        p99,
                        shared.errors.load(Ordering::Relaxed),
                        window_end.map(|e| e.saturating_duration_since(now).as_secs_f64()),
                    );
                    if tty {
                        eprint!("\r{line}   ");
                    } else {
                        eprintln!("{line}");
                    }
                }
                (last_ios, last_bytes, last_t) = (ios, bytes, now);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let end = Instant::now();
        run_end = end;
        let cpu1 = cpu1.unwrap_or_else(|| {
            (
                report::self_cpu_us(),
                job.target_pid.and_then(report::proc_cpu_us),
            )
        });
        if tty && !job.quiet {
            eprintln!();
        }
        let results: Vec<SessionResult> = handles
            .into_iter()
            .map(|h| h.join().expect("session thread panicked"))
            .collect();
        let elapsed = if job.verify_only || job.once {
            end.duration_since(t0)
        } else {
            runtime.min(end.saturating_duration_since(measure_start))
        };
        let (c0, t0c) = cpu0.unwrap_or((cpu1.0, cpu1.1));
        let target = match (t0c, cpu1.1) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        Ok((results, elapsed, cpu1.0.saturating_sub(c0), target))
    })?;

    // The ack log survives even a failed run: it is exactly what a later check needs.
    if let (Some(t), Some(p)) = (&tracker, &job.verify_state) {
        if job.rw.writes() && !job.verify_only {
            t.save(p)?;
            if !job.quiet {
                eprintln!("twinsan bench: ack log saved to {}", p.display());
            }
        }
    }

    // Set by the first session thread (or this one) after the barrier.
    let t0 = t0_cell.get().copied().unwrap_or(run_end);
    let mut all = new_histogram();
    let mut rd = new_histogram();
    let mut wr = new_histogram();
    let mut r = Report {
        job: JobSummary {
            target: job.url.target.clone(),
            portal: job.url.addr(),
            lun: job.url.lun,
            rw: if job.verify_only {
                "verify".into()
            } else {
                job.rw.name().into()
            },
            rwmix_read: job.rwmix_read,
            unmap_pct: job.unmap_pct,
            bs: job.bs,
            bs_max: job.bs_max,
            sessions: job.sessions,
            iodepth: job.iodepth,
            runtime_s: job.runtime_s,
            ramp_s: ramp.as_secs_f64(),
            size_bytes: units * job.bs,
            block_size,
            digest: job.digest,
            verify: job.verify,
            verify_only: job.verify_only,
            reconnect: job.reconnect.is_some(),
        },
        elapsed_s: elapsed.as_secs_f64(),
        ios: 0,
        reads: 0,
        writes: 0,
        unmaps: 0,
        bytes: 0,
        iops: 0.0,
        mib_s: 0.0,
        latency_us: Latency::default(),
        read_latency_us: None,
        write_latency_us: None,
        errors: 0,
        busy: 0,
        rejects: 0,
        verified_ios: 0,
        verify_mismatches: 0,
        verify_unacknowledged_blocks: tracker.as_ref().map_or(0, |t| t.unacknowledged_units()),
        stall_max_ms: shared.timeline.stall_max_ms(t0, run_end),
        reconnects: 0,
        reissued: 0,
        unit_attentions: 0,
        outages: shared
            .timeline
            .outages(t0)
            .into_iter()
            .map(|o| OutageReport {
                start_ms: ms_of(o.start),
                first_io_after_ms: o.first_io_after.map(ms_of),
                connection_failures: o.connection_failures,
            })
            .collect(),
        bench_cpu_us_per_io: 0.0,
        target_cpu_us_per_io: None,
        target_cpu_cores: None,
        failures: Vec::new(),
    };
    let mut failures = Vec::new();
    for s in &results {
        all.add(&s.all).ok();
        rd.add(&s.read).ok();
        wr.add(&s.write).ok();
        r.ios += s.ios;
        r.reads += s.reads;
        r.writes += s.writes;
        r.unmaps += s.unmaps;
        r.bytes += s.bytes;
        r.errors += s.errors;
        r.busy += s.busy;
        r.rejects += s.rejects;
        r.verified_ios += s.verified;
        r.verify_mismatches += s.mismatches;
        r.reconnects += s.reconnects;
        r.reissued += s.reissued;
        r.unit_attentions += s.unit_attentions;
        if let Some(f) = &s.failure {
            failures.push(f.clone());
        }
    }
    let secs = r.elapsed_s.max(1e-9);
    r.iops = r.ios as f64 / secs;
    r.mib_s = r.bytes as f64 / secs / 1048576.0;
    r.latency_us = Latency::of(&all);
    if r.reads > 0 && r.writes > 0 {
        r.read_latency_us = Some(Latency::of(&rd));
        r.write_latency_us = Some(Latency::of(&wr));
    }
    let ios = r.ios.max(1) as f64;
    r.bench_cpu_us_per_io = bench_cpu as f64 / ios;
    if let Some(t) = target_cpu {
        r.target_cpu_us_per_io = Some(t as f64 / ios);
        r.target_cpu_cores = Some(t as f64 / 1e6 / secs);
    }
    r.failures = failures;
    Ok(r)
}

/// Milliseconds, rounded to the microsecond (the JSON stays readable).
fn ms_of(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Worker<'_> {
    /// An empty result, for a session that never got going.
    pub fn empty_result() -> SessionResult {
        SessionResult::default()
    }
}
