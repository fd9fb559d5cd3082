//! Unit tests of the per-core counters.

use super::*;

fn finished(lun: usize, kind: CmdKind, bytes: u64, us: u64, sense_key: Option<u8>) -> Finished {
    Finished {
        lun,
        kind,
        bytes,
        unmapped: 0,
        sense_key,
        latency: Duration::from_micros(us),
    }
}

#[test]
fn commands_are_classified_by_their_operation_code() {
    for op in [0x08, 0x28, 0xa8, 0x88] {
        assert_eq!(CmdKind::of(op), CmdKind::Read, "{op:#x}");
    }
    for op in [0x0a, 0x2a, 0xaa, 0x8a, 0x2e, 0x8e, 0x89] {
        assert_eq!(CmdKind::of(op), CmdKind::Write, "{op:#x}");
    }
    assert_eq!(CmdKind::of(0x42), CmdKind::Unmap);
    // WRITE SAME, INQUIRY, TEST UNIT READY: counted, but neither reads nor writes.
    for op in [0x41, 0x93, 0x12, 0x00] {
        assert_eq!(CmdKind::of(op), CmdKind::Other, "{op:#x}");
    }
}

#[test]
fn each_core_counts_alone_and_the_cores_add_up() {
    let m = Metrics::new(2, 2);
    m.finished(0, finished(1, CmdKind::Write, 4096, 30, None));
    m.finished(1, finished(1, CmdKind::Write, 8192, 700, None));
    m.finished(1, finished(1, CmdKind::Read, 512, 10, None));
    m.finished(0, finished(0, CmdKind::Other, 0, 5, Some(6)));
    m.finished(1, finished(1, CmdKind::Write, 0, 90, Some(5)));
    // A LUN or core the counters do not know is ignored, not a panic.
    m.finished(7, finished(0, CmdKind::Read, 1, 1, None));
    m.finished(0, finished(9, CmdKind::Read, 1, 1, None));
    let sum = |f: &dyn Fn(&CoreCounters) -> u64| m.cores.iter().map(f).sum::<u64>();
    assert_eq!(
        sum(&|c| read(&c.luns[1].commands[CmdKind::Write.index()])),
        3
    );
    assert_eq!(sum(&|c| read(&c.luns[1].write_bytes)), 4096 + 8192);
    assert_eq!(sum(&|c| read(&c.luns[1].read_bytes)), 512);
    assert_eq!(sum(&|c| read(&c.luns[0].errors[6])), 1, "unit attention");
    assert_eq!(sum(&|c| read(&c.luns[1].errors[5])), 1, "illegal request");
    assert_eq!(
        sum(&|c| read(&c.luns[0].commands[CmdKind::Read.index()])),
        0
    );
    // 30 us lands in the 50 us bucket, 90 us in the 100 us one, 700 us in the 1 ms one.
    let h = |c: &CoreCounters, k: usize| read(&c.luns[1].write_latency.counts[k]);
    assert_eq!(sum(&|c| h(c, 1)), 1);
    assert_eq!(sum(&|c| h(c, 2)), 1);
    assert_eq!(sum(&|c| h(c, 5)), 1);
    assert_eq!(sum(&|c| read(&c.luns[1].write_latency.sum_ns)), 820_000);
}

#[test]
fn unmapped_bytes_are_counted_per_lun_whatever_the_kind() {
    let m = Metrics::new(2, 2);
    let unmap = |bytes| Finished {
        unmapped: bytes,
        ..finished(1, CmdKind::Unmap, 0, 40, None)
    };
    m.finished(0, unmap(1 << 20));
    m.finished(1, unmap(4096));
    // WRITE SAME with UNMAP is an Other command; a failed one still punched what it did.
    m.finished(
        1,
        Finished {
            unmapped: 8192,
            ..finished(1, CmdKind::Other, 0, 40, Some(3))
        },
    );
    let sum = |i: usize| {
        m.cores
            .iter()
            .map(|c| read(&c.luns[i].unmapped_bytes))
            .sum::<u64>()
    };
    assert_eq!(sum(1), (1 << 20) + 4096 + 8192);
    assert_eq!(sum(0), 0);
}

#[test]
fn login_refusals_are_classified_by_their_status() {
    assert_eq!(LoginFailure::of(2, 1), LoginFailure::Authentication);
    assert_eq!(LoginFailure::of(2, 2), LoginFailure::Authorization);
    assert_eq!(LoginFailure::of(2, 3), LoginFailure::TargetNotFound);
    assert_eq!(LoginFailure::of(2, 4), LoginFailure::TargetNotFound);
    for (c, d) in [(2, 0), (2, 5), (2, 7), (3, 0), (3, 2)] {
        assert_eq!(
            LoginFailure::of(c, d),
            LoginFailure::Other,
            "{c:02x}{d:02x}"
        );
    }
    let m = Metrics::new(1, 0);
    m.login_failed(LoginFailure::Authentication);
    m.login_failed(LoginFailure::Authentication);
    m.login_failed(LoginFailure::Other);
    assert_eq!(
        read(&m.login_failures[LoginFailure::Authentication as usize]),
        2
    );
    assert_eq!(read(&m.login_failures[LoginFailure::Other as usize]), 1);
    assert_eq!(
        read(&m.login_failures[LoginFailure::Authorization as usize]),
        0
    );
}

#[test]
fn open_connections_are_opened_minus_closed() {
    let m = Metrics::new(2, 0);
    m.connection(0, true);
    m.connection(1, true);
    m.connection(1, true);
    m.connection(0, false);
    let open: u64 = m
        .cores
        .iter()
        .map(|c| read(&c.connections_opened) - read(&c.connections_closed))
        .sum();
    assert_eq!(open, 2);
}

#[test]
fn a_latency_beyond_the_last_bound_goes_to_the_infinite_bucket() {
    let h = Histogram::default();
    h.observe(LATENCY_BOUNDS_NS[LATENCY_BOUNDS_NS.len() - 1] + 1);
    h.observe(0);
    assert_eq!(read(&h.counts[LATENCY_BOUNDS_NS.len()]), 1);
    assert_eq!(read(&h.counts[0]), 1);
}

#[test]
fn the_prometheus_text_names_a_counter_family_by_its_samples() {
    let om = "# HELP x_bytes Bytes moved\n# TYPE x_bytes counter\nx_bytes_total{a=\"1\"} 5\n\
              # HELP up Whether it is up\n# TYPE up gauge\nup 1\n# EOF\n";
    assert_eq!(
        prometheus_text(om),
        "# HELP x_bytes_total Bytes moved\n# TYPE x_bytes_total counter\nx_bytes_total{a=\"1\"} 5\n\
         # HELP up Whether it is up\n# TYPE up gauge\nup 1\n"
    );
}

#[test]
fn histograms_add_up_whichever_way_they_were_recorded() {
    let (a, b) = (Histogram::default(), Histogram::default());
    a.observe(30_000);
    b.observe_shared(30_000);
    b.observe_shared(2_000_000);
    let mut t = HistogramTotals::default();
    t.add(&a);
    t.add(&b);
    assert_eq!(t.counts[1], 2, "two in the 50 us bucket");
    assert_eq!(t.counts[6], 1, "one in the 2.5 ms bucket");
    assert_eq!(t.counts.iter().sum::<u64>(), 3);
    assert_eq!(t.sum_ns, 2_060_000);
}
