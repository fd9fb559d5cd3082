//! The scrape: every core's counters summed, and the facts read at that moment (sessions,
//! space, the pair), encoded in the Prometheus text format by `prometheus_client`.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::{
    read, CmdKind, Histogram, HistogramTotals, LoginFailure, LunCounters, Metrics,
    LATENCY_BOUNDS_NS,
};
use crate::registry::Registry;

/// SPC sense key names, by key (the label of `twinsan_scsi_check_conditions_total`).
const SENSE_KEYS: [&str; 16] = [
    "no_sense",
    "recovered_error",
    "not_ready",
    "medium_error",
    "hardware_error",
    "illegal_request",
    "unit_attention",
    "data_protect",
    "blank_check",
    "vendor_specific",
    "copy_aborted",
    "aborted_command",
    "reserved_c",
    "volume_overflow",
    "miscompare",
    "completed",
];

/// The metrics page in `format`: `metrics` summed over the cores, with `reg`'s state.
pub fn render(metrics: &Arc<Metrics>, reg: &Arc<Registry>, format: Format) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Scrape {
        metrics: Arc::clone(metrics),
        reg: Arc::clone(reg),
    }));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    match format {
        Format::OpenMetrics => out,
        Format::Prometheus => prometheus_text(&out),
    }
}

/// Which exposition format a scraper asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 (`Accept: application/openmetrics-text`), what the encoder writes.
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (every other scraper, `curl`, `promtool`).
    Prometheus,
}

/// The OpenMetrics page `om` in the Prometheus text format: a counter family's HELP and
/// TYPE lines name its samples (`x_total`, where OpenMetrics names the family `x`), and
/// there is no `# EOF`. Why: the older parsers (promtool's among them) take a `_total`
/// sample of family `x` for an undocumented metric of its own.
pub fn prometheus_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<&str> = None;
    for line in om.lines() {
        if line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            // Held until its TYPE line says whether the name changes.
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let suffix = if kind == "counter" { "_total" } else { "" };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name}{suffix} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Encodes `h` as one histogram sample set: its buckets with their upper bounds in
/// seconds (the encoder makes them cumulative; the last is +Inf, which it writes for
/// `f64::MAX`), count and sum.
fn histogram(
    mut enc: prometheus_client::encoding::MetricEncoder<'_>,
    h: &HistogramTotals,
) -> std::fmt::Result {
    let total = h.counts.iter().fold(0u64, |s, n| s.wrapping_add(*n));
    let buckets: Vec<(f64, u64)> = h
        .counts
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            let bound = LATENCY_BOUNDS_NS
                .get(k)
                .map_or(f64::MAX, |&b| b as f64 / 1e9);
            (bound, n)
        })
        .collect();
    enc.encode_histogram::<Labels>(h.sum_ns as f64 / 1e9, total, &buckets, None)
}

struct Scrape {
    metrics: Arc<Metrics>,
    reg: Arc<Registry>,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

type Labels = Vec<(&'static str, String)>;

impl Scrape {
    fn lun_labels(&self, i: usize) -> Labels {
        let lun = &self.reg.luns[i];
        vec![
            ("target", lun.target_name.clone()),
            ("lun", lun.id.to_string()),
        ]
    }

    /// `f` of LUN `i`'s counters, summed over the cores.
    fn sum(&self, i: usize, f: impl Fn(&LunCounters) -> u64) -> u64 {
        self.metrics
            .cores
            .iter()
            .filter_map(|c| c.luns.get(i))
            .map(f)
            .fold(0u64, u64::wrapping_add)
    }

    /// One metric family of `kind`: its HELP and TYPE, then one sample per label set.
    fn family<M: EncodeMetric>(
        &self,
        enc: &mut DescriptorEncoder<'_>,
        kind: MetricType,
        (name, help): (&str, &str),
        samples: impl Iterator<Item = (Labels, M)>,
    ) -> std::fmt::Result {
        let mut family = enc.encode_descriptor(name, help, None, kind)?;
        for (labels, metric) in samples {
            metric.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn counter(
        &self,
        enc: &mut DescriptorEncoder<'_>,
        name_help: (&str, &str),
        samples: impl Iterator<Item = (Labels, u64)>,
    ) -> std::fmt::Result {
        let samples = samples.map(|(l, v)| (l, ConstCounter::new(v)));
        self.family(enc, MetricType::Counter, name_help, samples)
    }

    fn gauge(
        &self,
        enc: &mut DescriptorEncoder<'_>,
        name_help: (&str, &str),
        samples: impl Iterator<Item = (Labels, i64)>,
    ) -> std::fmt::Result {
        let samples = samples.map(|(l, v)| (l, ConstGauge::new(v)));
        self.family(enc, MetricType::Gauge, name_help, samples)
    }

    /// A gauge without labels.
    fn gauge1(
        &self,
        enc: &mut DescriptorEncoder<'_>,
        (name, help): (&str, &str),
        v: i64,
    ) -> std::fmt::Result {
        let family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        ConstGauge::new(v).encode(family)
    }

    /// The slots of LUNs not removed by a reload (a removed LUN's series end).
    fn live(&self) -> impl Iterator<Item = usize> + Clone + '_ {
        (0..self.reg.luns.len()).filter(|&i| !self.reg.luns[i].is_removed())
    }

    fn commands(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        let luns = self.live();
        let samples = luns.flat_map(|i| {
            CmdKind::ALL.into_iter().map(move |k| {
                let mut labels = self.lun_labels(i);
                labels.push(("op", k.label().to_string()));
                (labels, self.sum(i, |l| read(&l.commands[k.index()])))
            })
        });
        self.counter(
            enc,
            (
                "twinsan_scsi_commands",
                "SCSI commands answered, by LUN and kind",
            ),
            samples,
        )?;
        self.counter(
            enc,
            (
                "twinsan_scsi_read_bytes",
                "Bytes read by GOOD READ commands",
            ),
            self.live()
                .map(|i| (self.lun_labels(i), self.sum(i, |l| read(&l.read_bytes)))),
        )?;
        self.counter(
            enc,
            (
                "twinsan_scsi_written_bytes",
                "Bytes written by GOOD WRITE commands",
            ),
            self.live()
                .map(|i| (self.lun_labels(i), self.sum(i, |l| read(&l.write_bytes)))),
        )?;
        self.counter(
            enc,
            (
                "twinsan_scsi_unmapped_bytes",
                "Bytes deallocated by UNMAP and WRITE SAME with UNMAP",
            ),
            self.live()
                .map(|i| (self.lun_labels(i), self.sum(i, |l| read(&l.unmapped_bytes)))),
        )?;
        let errors = self.live().flat_map(|i| {
            (0..16).filter_map(move |key| {
                let v = self.sum(i, |l| read(&l.errors[key]));
                // Only the keys that occurred: 16 zero series per LUN say nothing.
                (v > 0).then(|| {
                    let mut labels = self.lun_labels(i);
                    labels.push(("sense_key", SENSE_KEYS[key].to_string()));
                    (labels, v)
                })
            })
        });
        self.counter(
            enc,
            (
                "twinsan_scsi_check_conditions",
                "Commands answered CHECK CONDITION, by sense key",
            ),
            errors,
        )
    }

    fn latencies(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        let mut family = enc.encode_descriptor(
            "twinsan_scsi_command_duration_seconds",
            "Time from a READ or WRITE's arrival to its answer",
            None,
            MetricType::Histogram,
        )?;
        for i in self.live() {
            for (op, pick) in [
                (
                    "read",
                    (|l: &LunCounters| &l.read_latency) as fn(&LunCounters) -> &Histogram,
                ),
                ("write", |l: &LunCounters| &l.write_latency),
            ] {
                let mut totals = HistogramTotals::default();
                for c in self.metrics.cores.iter().filter_map(|c| c.luns.get(i)) {
                    totals.add(pick(c));
                }
                let mut labels = self.lun_labels(i);
                labels.push(("op", op.to_string()));
                histogram(family.encode_family(&labels)?, &totals)?;
            }
        }
        Ok(())
    }

    fn node(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        let open: u64 = self.metrics.cores.iter().fold(0, |s, c| {
            s.wrapping_add(read(&c.connections_opened))
                .wrapping_sub(read(&c.connections_closed))
        });
        self.gauge1(
            enc,
            ("twinsan_connections", "Initiator connections open"),
            open as i64,
        )?;
        self.counter(
            enc,
            (
                "twinsan_login_failures",
                "Logins refused, by reason (authentication: CHAP failed; authorization: ACL or address)",
            ),
            LoginFailure::ALL.into_iter().map(|why| {
                (
                    vec![("reason", why.label().to_string())],
                    read(&self.metrics.login_failures[why as usize]),
                )
            }),
        )?;
        let sessions = self.reg.sessions.load(std::sync::atomic::Ordering::Relaxed);
        self.gauge1(
            enc,
            ("twinsan_sessions", "iSCSI sessions in full feature phase"),
            sessions as i64,
        )?;
        self.gauge(
            enc,
            (
                "twinsan_lun_size_bytes",
                "The LUN's size as initiators see it",
            ),
            self.live()
                .map(|i| (self.lun_labels(i), self.reg.luns[i].size_bytes() as i64)),
        )?;
        self.gauge(
            enc,
            (
                "twinsan_lun_allocated_bytes",
                "Bytes the LUN's backing file occupies on disk (thin: what was written)",
            ),
            self.live().map(|i| {
                (
                    self.lun_labels(i),
                    self.reg.luns[i].allocated_bytes() as i64,
                )
            }),
        )?;
        // One look at each LUN's snapshot store. Not waiting for its lock: a clone or a
        // rollback holds it as long as the file system takes, and a scrape must answer
        // within its timeout; a LUN whose store is busy is left out of this scrape.
        let snaps: Vec<_> = self
            .live()
            .filter_map(|i| {
                let st = match self.reg.luns[i].snaps.try_lock() {
                    Ok(st) => st,
                    Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => return None,
                };
                Some((i, crate::admin::status::summary_of(&st)))
            })
            .collect();
        self.gauge(
            enc,
            (
                "twinsan_snapshots",
                "Committed snapshots of the LUN on this node",
            ),
            snaps.iter().map(|(i, s)| {
                (
                    self.lun_labels(*i),
                    s.as_ref().map_or(0, |s| s.count as i64),
                )
            }),
        )?;
        self.gauge(
            enc,
            (
                "twinsan_snapshot_newest_age_seconds",
                "Age of the LUN's newest snapshot (LUNs with a snapshot only)",
            ),
            snaps.iter().filter_map(|(i, s)| {
                let s = s.as_ref()?;
                Some((self.lun_labels(*i), s.newest_age_seconds as i64))
            }),
        )?;
        let used = self.live().filter_map(|i| {
            let pct = self.reg.luns[i].pool_used_percent()?;
            Some((self.lun_labels(i), i64::from(pct)))
        });
        self.gauge(
            enc,
            (
                "twinsan_pool_used_percent",
                "Percent of the file system under the LUN in use (the thin threshold's measure)",
            ),
            used,
        )
    }

    fn pair(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        let Some(rep) = self.reg.replication.get() else {
            return Ok(());
        };
        let primary = self.reg.role() == crate::config::Role::Primary;
        let figures = rep.figures();
        self.gauge1(
            enc,
            (
                "twinsan_pair_primary",
                "1 on the pair's primary, 0 on its secondary",
            ),
            i64::from(primary),
        )?;
        self.gauge1(
            enc,
            (
                "twinsan_pair_peer_connected",
                "1 while the peer is mirrored to (primary) or a primary is connected (secondary)",
            ),
            i64::from(figures.peer_connected),
        )?;
        let luns = &figures.luns;
        let per_lun = |pick: fn(&crate::replication::PairLunFigures) -> u64| {
            luns.iter()
                .map(move |l| (self.lun_labels(l.index), pick(l) as i64))
        };
        self.gauge(
            enc,
            (
                "twinsan_pair_out_of_sync_bytes",
                "Bytes in regions that may differ from the peer (the dirty bitmap)",
            ),
            per_lun(|l| l.dirty_bytes),
        )?;
        self.gauge(
            enc,
            (
                "twinsan_pair_resync_done_bytes",
                "Bytes the running resync has copied (0 when none runs)",
            ),
            per_lun(|l| l.resync.0),
        )?;
        self.gauge(
            enc,
            (
                "twinsan_pair_resync_total_bytes",
                "Bytes the running resync plans to copy (0 when none runs)",
            ),
            per_lun(|l| l.resync.1),
        )?;
        self.counter(
            enc,
            (
                "twinsan_pair_resync_copied_bytes",
                "Bytes of data resyncs copied from this node to the peer (holes count nothing)",
            ),
            luns.iter()
                .map(|l| (self.lun_labels(l.index), l.resync_copied_bytes)),
        )?;
        let family = enc.encode_descriptor(
            "twinsan_pair_replica_ack_seconds",
            "Time from a mirrored operation's send on a replica data link to the peer's ack",
            None,
            MetricType::Histogram,
        )?;
        histogram(family, &figures.ack_latency)
    }
}

impl Scrape {
    /// Only when `[failover]` runs.
    fn failover(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        let Some(f) = self.reg.failover.get() else {
            return Ok(());
        };
        let f = f.figures();
        let ages = f.heartbeat_ages_ms(crate::failover::boot_clock_ms());
        let mut family = enc.encode_descriptor(
            "twinsan_failover_heartbeat_age_seconds",
            "Time since the peer's last heartbeat on each path (paths never heard: none)",
            None,
            MetricType::Gauge,
        )?;
        for (path, age) in ages.iter().enumerate() {
            if let Some(ms) = age {
                let labels: Labels = vec![("path", path.to_string())];
                // Seconds with ms precision: a float gauge.
                ConstGauge::new(*ms as f64 / 1e3).encode(family.encode_family(&labels)?)?;
            }
        }
        // Without labels: a family of one sample would write an empty `{}`.
        let family = enc.encode_descriptor(
            "twinsan_failover_takeovers",
            "Takeovers this node's failover controller began (automatic or by the operator)",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(f.takeovers()).encode(family)
    }
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        self.commands(&mut enc)?;
        self.latencies(&mut enc)?;
        self.node(&mut enc)?;
        self.pair(&mut enc)?;
        self.failover(&mut enc)
    }
}
