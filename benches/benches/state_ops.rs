//! Micro-benchmarks of the per-write shared state: the range lock every write takes, the
//! dirty bitmap and write-intent set the replica keeps per region, and the replica link's
//! message codec (every mirrored write is encoded on the primary and decoded on the peer).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engine::disk::range_lock::RangeLock;
use replica::bitmap::Bitmap;
use replica::intent::IntentLog;
use replica::wire::{self, Message};

/// 4 KiB writes in 512-byte blocks.
const BLOCKS_PER_WRITE: u64 = 8;

fn range_lock(c: &mut Criterion) {
    let mut g = c.benchmark_group("range_lock");
    // Held ranges: idle, one session at queue depth 32, 16 sessions at 32.
    for held in [0u64, 32, 512] {
        let lock = Arc::new(RangeLock::default());
        let guards: Vec<_> = (0..held)
            .map(|i| {
                let lba = i * 1000;
                lock.try_lock(lba, lba + BLOCKS_PER_WRITE)
                    .expect("disjoint ranges lock")
            })
            .collect();
        g.bench_with_input(BenchmarkId::new("lock_unlock_free", held), &held, |b, _| {
            b.iter(|| {
                let lba = black_box(999_999_000);
                drop(lock.try_lock(lba, lba + BLOCKS_PER_WRITE))
            })
        });
        if held > 0 {
            g.bench_with_input(BenchmarkId::new("conflict", held), &held, |b, _| {
                b.iter(|| {
                    let lba = black_box((held - 1) * 1000 + 4);
                    assert!(lock.try_lock(lba, lba + BLOCKS_PER_WRITE).is_none())
                })
            });
        }
        drop(guards);
    }
    g.finish();
}

fn bitmap(c: &mut Criterion) {
    let mut g = c.benchmark_group("bitmap");
    // A 1 TiB LUN in 1 MiB regions: a million regions.
    let size = 1u64 << 40;
    let region = 1u64 << 20;
    let mut bm = Bitmap::new(size, region).expect("geometry is valid");
    g.bench_function("mark_4k", |b| {
        let mut off = 0u64;
        b.iter(|| {
            off = (off + 7 * 4096 + region) % size;
            black_box(bm.mark(black_box(off), 4096))
        })
    });
    let mut sparse = Bitmap::new(size, region).expect("geometry is valid");
    for r in (0..sparse.regions()).step_by(1000) {
        sparse.set(r);
    }
    g.bench_function("iter_dirty_1tib_0.1pct", |b| {
        b.iter(|| black_box(&sparse).iter_dirty().count())
    });
    let mut out = Vec::new();
    g.throughput(Throughput::Bytes(sparse.encoded_len() as u64));
    g.bench_function("encode_1tib", |b| {
        b.iter(|| {
            out.clear();
            sparse.encode(&mut out);
            black_box(out.len())
        })
    });
    g.bench_function("decode_1tib", |b| {
        b.iter(|| Bitmap::decode(black_box(&out)).expect("round trip"))
    });
    g.finish();

    let mut g = c.benchmark_group("write_intent");
    // The write path's check: every region already durable (the common case) costs a load
    // and a store per region, no lock.
    let log = IntentLog::new(size, region);
    log.ready(100 * region, 4096);
    let wanted = log.take_wanted();
    log.made_durable(&wanted);
    g.bench_function("ready_hot_4k", |b| {
        b.iter(|| log.ready(black_box(100 * region + 4096), 4096))
    });
    g.finish();
}

fn link_codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("replica_wire");
    for len in [4096usize, 65536] {
        let msg = Message::Write {
            lun_key: 7,
            offset_bytes: 1 << 30,
            fua: false,
            data: vec![0x5a; len],
        };
        let mut buf = Vec::with_capacity(len + 128);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("encode_write", len), &len, |b, _| {
            b.iter(|| {
                buf.clear();
                wire::encode(black_box(&msg), 42, &mut buf);
                black_box(buf.len())
            })
        });
        g.bench_with_input(BenchmarkId::new("decode_write", len), &len, |b, _| {
            b.iter(|| wire::decode_one(black_box(&buf)).expect("valid frame"))
        });
    }
    g.finish();
}

criterion_group!(benches, range_lock, bitmap, link_codec);
criterion_main!(benches);
