//! Replays the replica-link fuzz corpus (`fuzz/corpus/replica_wire/`) through the fuzz
//! target's body under `cargo test`: every input that once reached new decoder code must
//! still decode without a panic, and what decodes must re-encode to the same bytes.

use std::path::PathBuf;

#[test]
fn replay_replica_wire_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/replica_wire");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    // The minimized corpus of this session; fewer means it was lost, not minimized.
    assert!(files.len() >= 20, "only {} corpus files", files.len());
    for f in &files {
        replica::wire::fuzz(&std::fs::read(f).unwrap());
    }
}

#[test]
fn a_hello_with_the_crashed_bit_survives_the_fuzz_body() {
    // Valid frames take the canonical re-encoding branch of the fuzz body, which random
    // bytes (with their frame checksums) seldom reach.
    use replica::genid::{GenFlags, GenIds};
    use replica::wire::{LunHello, Message};
    let msg = Message::Hello {
        node_id: "node-a".into(),
        luns: vec![LunHello {
            lun_key: 7,
            size_bytes: 1 << 30,
            region_bytes: 1 << 20,
            gen: GenIds {
                current: 3,
                bitmap: 2,
                history: [1, 0],
            },
            flags: GenFlags {
                crashed: true,
                ..GenFlags::default()
            },
        }],
        link: 1,
    };
    let mut bytes = Vec::new();
    replica::wire::encode(&msg, 9, &mut bytes);
    replica::wire::fuzz(&bytes);
    match replica::wire::decode_one(&bytes) {
        Ok(Some((back, 9, n))) => {
            assert_eq!(n, bytes.len());
            assert_eq!(back, msg);
        }
        other => panic!("{other:?}"),
    }
}
