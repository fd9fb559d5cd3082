//! Micro-benchmarks of the per-I/O protocol work: BHS/PDU encode and decode, CDB decode,
//! CRC32C digests.
//!
//! The range lock, dirty bitmap and replica-link codec are in state_ops.rs.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use proto::digest;
use proto::pdu::{
    self, initiator, parse_initiator, parse_target, Digests, Residual, TargetPdu, TargetSns,
};
use proto::scsi::cdb;

fn read10() -> [u8; 48] {
    let cdb = [0x28, 0, 0, 0, 0x12, 0x34, 0, 0, 8, 0];
    initiator::scsi_command(0, 7, 42, 5, true, false, 4096, &cdb, 0)
}

fn pdu_codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("pdu");
    let cmd = read10();
    g.bench_function("parse_initiator/scsi_command", |b| {
        b.iter(|| parse_initiator(black_box(&cmd), &[]).unwrap())
    });
    let dout = initiator::data_out(true, 0, 1, 2, 3, 0, 0, 4096);
    g.bench_function("parse_initiator/data_out", |b| {
        b.iter(|| parse_initiator(black_box(&dout), &[]).unwrap())
    });
    let sns = TargetSns {
        stat_sn: 9,
        exp_cmd_sn: 43,
        max_cmd_sn: 170,
    };
    g.bench_function("encode_bhs/scsi_response", |b| {
        b.iter(|| {
            TargetPdu::ScsiResponse {
                itt: black_box(7),
                status: 0,
                response: 0,
                residual: Residual::None,
                exp_data_sn: 0,
                sns,
                data_len: 0,
            }
            .encode_bhs()
        })
    });
    g.bench_function("encode_bhs/data_in_with_status", |b| {
        b.iter(|| {
            TargetPdu::DataIn {
                final_: true,
                ack: false,
                lun: 0,
                itt: black_box(7),
                status: Some(0),
                residual: Residual::None,
                data_sn: 0,
                buffer_offset: 0,
                sns,
                data_len: 4096,
            }
            .encode_bhs()
        })
    });
    g.bench_function("initiator/scsi_command", |b| {
        let cdb = [0x88u8, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0, 0, 0, 8, 0, 0];
        b.iter(|| initiator::scsi_command(0, black_box(7), 42, 5, true, false, 4096, &cdb, 0))
    });
    let resp = TargetPdu::ScsiResponse {
        itt: 7,
        status: 0,
        response: 0,
        residual: Residual::None,
        exp_data_sn: 0,
        sns,
        data_len: 0,
    }
    .encode_bhs();
    g.bench_function("parse_target/scsi_response", |b| {
        b.iter(|| parse_target(black_box(&resp)))
    });

    // Whole framed PDUs: write_pdu + frame_len + split_frame, without and with digests.
    let data = vec![0xa5u8; 4096];
    for (name, d) in [
        ("none", Digests::default()),
        (
            "crc32c",
            Digests {
                header: true,
                data: true,
            },
        ),
    ] {
        let bhs = TargetPdu::DataIn {
            final_: true,
            ack: false,
            lun: 0,
            itt: 7,
            status: Some(0),
            residual: Residual::None,
            data_sn: 0,
            buffer_offset: 0,
            sns,
            data_len: 4096,
        }
        .encode_bhs();
        let mut wire = Vec::with_capacity(8192);
        g.throughput(Throughput::Bytes(4096));
        g.bench_with_input(BenchmarkId::new("write_pdu_4k", name), &d, |b, &d| {
            b.iter(|| {
                wire.clear();
                pdu::write_pdu(&mut wire, &bhs, black_box(&data), d);
            })
        });
        wire.clear();
        pdu::write_pdu(&mut wire, &bhs, &data, d);
        g.bench_with_input(BenchmarkId::new("frame_and_split_4k", name), &d, |b, &d| {
            b.iter(|| {
                let head: &[u8; 48] = wire[..48].try_into().unwrap();
                let f = pdu::frame_len(head, d, 1 << 20).unwrap();
                pdu::split_frame(black_box(&wire), &f, d).unwrap().1.len()
            })
        });
    }
    g.finish();
}

fn cdb_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("cdb_decode");
    let cases: [(&str, Vec<u8>); 4] = [
        ("read10", vec![0x28, 0, 0, 0, 0x12, 0x34, 0, 0, 8, 0]),
        (
            "read16",
            vec![0x88, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0, 0, 0, 8, 0, 0],
        ),
        (
            "write16",
            vec![0x8a, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0, 0, 0, 8, 0, 0],
        ),
        ("inquiry_vpd", vec![0x12, 1, 0x83, 0, 0xff, 0]),
    ];
    for (name, bytes) in &cases {
        let mut padded = bytes.clone();
        padded.resize(16, 0);
        g.bench_function(*name, |b| {
            b.iter(|| cdb::decode(black_box(&padded)).is_ok())
        });
    }
    g.finish();
}

fn digests(c: &mut Criterion) {
    let mut g = c.benchmark_group("crc32c");
    for size in [48usize, 4096, 65536] {
        let buf: Vec<u8> = (0..size).map(|i| i as u8).collect();
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &buf, |b, buf| {
            b.iter(|| digest::data_digest(black_box(buf)))
        });
    }
    g.finish();
}

criterion_group!(benches, pdu_codec, cdb_decode, digests);
criterion_main!(benches);
