//! Replays the snapshot-stream fuzz corpus (`fuzz/corpus/snapshot_stream/`) through the fuzz
//! target's body under `cargo test`.

use std::path::PathBuf;

use replica::snapshot::stream::{Header, Writer};
use replica::snapshot::SnapshotName;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/snapshot_stream")
}

#[test]
fn replay_snapshot_stream_corpus() {
    let dir = corpus_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 8, "only {} corpus files", files.len());
    for f in &files {
        replica::snapshot::stream::fuzz(&std::fs::read(f).unwrap());
    }
}

/// Writes the seed corpus: whole streams (full and incremental, empty and with records),
/// fed in pieces of several sizes, and cut or damaged copies. Run by hand:
/// `cargo test -p twinsan-replica --test stream_corpus -- --ignored`.
#[test]
#[ignore]
fn write_seed_corpus() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let h = |from: u64| Header {
        block_size: 512,
        size_bytes: 1 << 24,
        from_guid: from,
        to_guid: 0xfeed,
        to_name: SnapshotName::parse("hourly-1").unwrap(),
        created_unix_ms: 1_765_000_000_000,
    };
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for from in [0, 7] {
        let mut out = Vec::new();
        let w = Writer::start(&h(from), &mut out);
        w.finish(&mut out);
        seeds.push(out);
        let mut out = Vec::new();
        let mut w = Writer::start(&h(from), &mut out);
        w.data(4096, &[0xab; 700], &mut out);
        w.zero(1 << 20, 1 << 20, &mut out);
        w.data(0, b"twinsan", &mut out);
        w.finish(&mut out);
        seeds.push(out);
    }
    let whole = seeds.clone();
    for s in &whole {
        seeds.push(s[..s.len() / 2].to_vec());
        let mut bad = s.clone();
        bad[20] ^= 1;
        seeds.push(bad);
    }
    for (i, s) in seeds.iter().enumerate() {
        for step in [1u8, 7, 255] {
            let mut input = vec![step];
            input.extend_from_slice(s);
            std::fs::write(dir.join(format!("seed-{i:02}-{step}")), input).unwrap();
        }
    }
}
