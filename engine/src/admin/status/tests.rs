//! The status report: parsing the pair's lines and the human table.

use super::*;

/// A real status line from `replica::pair` (not a copy of its format), so a change there
/// that this parser does not follow fails here.
fn real_line() -> String {
    let meta = replica::meta::Meta::new(0x6001_4050_0000_0007, 16 << 20, 1 << 20).unwrap();
    let (lun, _, _) =
        replica::pair::PairLun::open(meta, replica::pair::Marker::Absent, true, |_| vec![]);
    lun.status_line(0, false)
}

#[test]
fn the_pairs_own_line_parses_into_fields() {
    let line = real_line();
    let r = parse_replica(&line).unwrap_or_else(|| panic!("not parsed: {line}"));
    assert_eq!(r.key, "6001405000000007");
    assert_eq!(r.dirty_bytes, 0);
    assert_eq!(r.resync, None);
    assert_eq!(
        line,
        format!(
            "replica lun {}: {} gen current={} bitmap={} dirty=0 bytes",
            r.key, r.state, r.gen_current, r.gen_bitmap
        )
    );
}

#[test]
fn resync_progress_parses_from_the_pairs_suffix() {
    let suffix = replica::pair::progress::status_suffix((250, 1000, 3000));
    let line = format!("replica lun 00000000000000aa: SyncSource gen current=01 bitmap=02 dirty=1048576 bytes{suffix}");
    let r = parse_replica(&line).unwrap();
    assert_eq!(r.state, "SyncSource");
    assert_eq!(r.dirty_bytes, 1 << 20);
    assert_eq!(
        r.resync,
        Some(Resync {
            percent: 25.0,
            eta_seconds: Some(3)
        })
    );
    let unknown = replica::pair::progress::status_suffix((0, 1000, replica::pair::ETA_UNKNOWN));
    let line = format!(
        "replica lun 00000000000000aa: SyncTarget gen current=01 bitmap=02 dirty=5 bytes{unknown}"
    );
    assert_eq!(
        parse_replica(&line).unwrap().resync,
        Some(Resync {
            percent: 0.0,
            eta_seconds: None
        })
    );
}

#[test]
fn the_suffix_is_worded_as_the_pairs_own() {
    let r = Resync {
        percent: 25.0,
        eta_seconds: Some(3),
    };
    assert_eq!(
        resync_suffix(&r),
        replica::pair::progress::status_suffix((250, 1000, 3000))
    );
    let r = Resync {
        percent: 0.0,
        eta_seconds: None,
    };
    assert_eq!(
        resync_suffix(&r),
        replica::pair::progress::status_suffix((0, 1000, replica::pair::ETA_UNKNOWN))
    );
}

#[test]
fn unknown_lines_are_not_taken_for_replica_lines() {
    assert_eq!(
        parse_replica("replica lun 01: UpToDate gen current=1 bitmap=2 dirty=x bytes"),
        None
    );
    assert_eq!(
        parse_replica("replica lun 01: UpToDate gen current=1 bitmap=2 dirty=3 bytes extra"),
        None
    );
    assert_eq!(parse_replica("note: something"), None);
}

#[test]
fn the_peer_line_parses() {
    let p = parse_peer("peer: node-b at 127.0.0.1:7790 (connected, mirroring)").unwrap();
    assert_eq!(
        p,
        PeerStatus {
            name: "node-b".into(),
            address: "127.0.0.1:7790".into(),
            link: "connected, mirroring".into()
        }
    );
    assert_eq!(parse_peer("peer: none (standalone)"), None);
}

fn report() -> StatusReport {
    StatusReport {
        role: "primary",
        peer: Some(PeerStatus {
            name: "node-b".into(),
            address: "127.0.0.1:7790".into(),
            link: "connected, mirroring".into(),
        }),
        notes: vec![],
        sessions: 2,
        luns: vec![
            LunStatus {
                target: "iqn.2026-11.io.twinsan:default".into(),
                lun: 0,
                state: "SyncSource".into(),
                size_bytes: 10 << 30,
                allocated_bytes: 4096,
                path: "/var/lib/twinsan/lun0.img".into(),
                snapshots: Some(SnapshotSummary {
                    count: 3,
                    newest: "hourly-2026-12-07T20:00:00Z".into(),
                    newest_age_seconds: 750,
                }),
                sanitize: None,
                replica: Some(ReplicaStatus {
                    key: "00000000000000aa".into(),
                    state: "SyncSource".into(),
                    gen_current: "01".into(),
                    gen_bitmap: "02".into(),
                    dirty_bytes: 1 << 20,
                    resync: Some(Resync {
                        percent: 25.0,
                        eta_seconds: Some(3),
                    }),
                }),
            },
            LunStatus {
                target: "iqn.2026-11.io.twinsan:x".into(),
                lun: 12,
                state: "UpToDate".into(),
                size_bytes: 512,
                allocated_bytes: 0,
                path: "x.img".into(),
                snapshots: None,
                sanitize: None,
                replica: Some(ReplicaStatus {
                    key: "00000000000000bb".into(),
                    state: "UpToDate".into(),
                    gen_current: "03".into(),
                    gen_bitmap: "00".into(),
                    dirty_bytes: 0,
                    resync: None,
                }),
            },
        ],
        failover: None,
    }
}

#[test]
fn the_human_form_is_an_aligned_table_under_the_key_lines() {
    let text = report().render();
    let expected = "\
role: primary
peer: node-b at 127.0.0.1:7790 (connected, mirroring)
sessions: 2

TARGET                          LUN  STATE       SIZE      ALLOCATED  RESYNC           SNAPSHOTS          PATH
iqn.2026-11.io.twinsan:default  0    SyncSource  10.0 GiB  4.0 KiB    25.0% (3s left)  3, newest 12m ago  /var/lib/twinsan/lun0.img
iqn.2026-11.io.twinsan:x        12   UpToDate    512 B     0 B        -                -                  x.img

replica lun 00000000000000aa: SyncSource gen current=01 bitmap=02 dirty=1048576 bytes resync 25.0% eta 3s
replica lun 00000000000000bb: UpToDate   gen current=03 bitmap=00 dirty=0 bytes
";
    assert_eq!(text, expected);
    // Scripts and tests find the progress by " resync P% eta": only the pair's line has it.
    let first = text
        .lines()
        .find(|l| l.contains("SyncSource") && l.contains("% eta "));
    assert!(
        first.is_some_and(|l| l.starts_with("replica lun ")),
        "{text}"
    );
    // The replica lines it shows parse back to the same fields (one source of truth).
    for (line, lun) in text
        .lines()
        .filter(|l| l.starts_with("replica lun"))
        .zip(&report().luns)
    {
        assert_eq!(parse_replica(line).as_ref(), lun.replica.as_ref());
    }
}

#[test]
fn a_standalone_node_says_so_and_its_json_has_no_peer() {
    let r = StatusReport {
        role: "secondary",
        peer: None,
        notes: vec!["a note".into()],
        sessions: 0,
        luns: vec![],
        failover: None,
    };
    assert_eq!(
        r.render(),
        "role: secondary\npeer: none (standalone)\nnote: a note\nsessions: 0\n"
    );
    let v: serde_json::Value = serde_json::to_value(&r).unwrap();
    assert_eq!(v["peer"], serde_json::Value::Null);
    assert_eq!(v["role"], "secondary");
    assert_eq!(v["luns"], serde_json::json!([]));
}

#[test]
fn sizes_read_in_binary_units() {
    assert_eq!(human_bytes(0), "0 B");
    assert_eq!(human_bytes(1023), "1023 B");
    assert_eq!(human_bytes(1536), "1.5 KiB");
    assert_eq!(human_bytes(2 << 40), "2.0 TiB");
}
