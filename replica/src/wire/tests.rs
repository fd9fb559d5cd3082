use super::*;
use proptest::prelude::*;

fn arb_gen() -> impl Strategy<Value = GenIds> {
    (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
        |(current, bitmap, h0, h1)| GenIds {
            current,
            bitmap,
            history: [h0, h1],
        },
    )
}

fn arb_status() -> impl Strategy<Value = AckStatus> {
    prop_oneof![
        Just(AckStatus::Ok),
        any::<i32>().prop_map(AckStatus::IoError),
        Just(AckStatus::NoSpace),
        Just(AckStatus::Refused),
    ]
}

fn arb_lun() -> impl Strategy<Value = LunHello> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        arb_gen(),
        any::<[bool; 4]>(),
    )
        .prop_map(
            |(
                lun_key,
                size_bytes,
                region_bytes,
                gen,
                [outdated, inconsistent, primary, crashed],
            )| {
                LunHello {
                    lun_key,
                    size_bytes,
                    region_bytes,
                    gen,
                    flags: GenFlags {
                        outdated,
                        inconsistent,
                        primary,
                        crashed,
                    },
                }
            },
        )
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..300)
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            "[a-z0-9.-]{0,64}",
            proptest::collection::vec(arb_lun(), 0..5),
            any::<u16>()
        )
            .prop_map(|(node_id, luns, link)| Message::Hello {
                node_id,
                luns,
                link,
            }),
        any::<[u8; 32]>().prop_map(|nonce| Message::AuthChallenge { nonce }),
        any::<[u8; 32]>().prop_map(|mac| Message::AuthResponse { mac }),
        (any::<u64>(), any::<u64>(), any::<bool>(), bytes()).prop_map(
            |(lun_key, offset_bytes, fua, data)| Message::Write {
                lun_key,
                offset_bytes,
                fua,
                data
            }
        ),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
            |(lun_key, offset_bytes, len_bytes, unmap)| Message::WriteZeroes {
                lun_key,
                offset_bytes,
                len_bytes,
                unmap
            }
        ),
        any::<u64>().prop_map(|lun_key| Message::Flush { lun_key }),
        (any::<u64>(), any::<u64>(), any::<u64>(), bytes()).prop_map(
            |(lun_key, origin, version, state)| Message::PrState {
                lun_key,
                origin,
                version,
                state
            }
        ),
        (any::<u64>(), arb_status()).prop_map(|(seq, status)| Message::Ack { seq, status }),
        (any::<u64>(), any::<u64>(), bytes()).prop_map(|(lun_key, offset_bytes, data)| {
            Message::ResyncData {
                lun_key,
                offset_bytes,
                data,
            }
        }),
        (any::<u64>(), arb_gen()).prop_map(|(lun_key, gen)| Message::ResyncDone { lun_key, gen }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(lun_key, region)| Message::VerifyRequest { lun_key, region }),
        (any::<u64>(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(lun_key, region, digest)| {
            Message::VerifyDigest {
                lun_key,
                region,
                digest,
            }
        }),
        any::<u64>().prop_map(|now_ms| Message::Ping { now_ms }),
        any::<u64>().prop_map(|now_ms| Message::Pong { now_ms }),
        (any::<u64>(), bytes())
            .prop_map(|(lun_key, bitmap)| Message::DirtyBitmap { lun_key, bitmap }),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(lun_key, a, b, eta_ms)| Message::ResyncProgress {
                lun_key,
                done_bytes: a.min(b),
                total_bytes: a.max(b),
                eta_ms
            }
        ),
        (
            any::<u64>(),
            1u8..=6,
            any::<u64>(),
            "[A-Za-z0-9_][A-Za-z0-9._:-]{0,63}"
        )
            .prop_map(|(lun_key, op, guid, name)| Message::Snapshot {
                lun_key,
                op: crate::snapshot::SnapOp::from_code(op).unwrap(),
                guid,
                name: crate::snapshot::SnapshotName::parse(&name).unwrap(),
            }),
        (any::<u64>(), proptest::collection::vec(any::<u64>(), 0..20))
            .prop_map(|(lun_key, guids)| Message::SnapshotList { lun_key, guids }),
    ]
}

proptest! {
    #[test]
    fn round_trip(msgs in proptest::collection::vec((arb_message(), any::<u64>()), 1..6), chunk in 1usize..50) {
        let mut stream = Vec::new();
        for (msg, seq) in &msgs {
            let before = stream.len();
            encode(msg, *seq, &mut stream);
            let (decoded, decoded_seq, used) = decode_one(&stream[before..]).unwrap().unwrap();
            prop_assert_eq!(&decoded, msg);
            prop_assert_eq!(decoded_seq, *seq);
            prop_assert_eq!(used, stream.len() - before);
        }
        // The incremental decoder yields the same messages whatever the chunking.
        let mut decoder = Decoder::new();
        let mut out = Vec::new();
        for piece in stream.chunks(chunk) {
            decoder.feed(piece).unwrap();
            while let Some(item) = decoder.next_message().unwrap() {
                out.push(item);
            }
        }
        prop_assert_eq!(out, msgs);
        prop_assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        fuzz(&data);
    }

    #[test]
    fn mutated_frames_never_panic(msg in arb_message(), index in any::<usize>(), value in any::<u8>()) {
        let mut frame = Vec::new();
        encode(&msg, 7, &mut frame);
        let len = frame.len();
        frame[index % len] ^= value | 1;
        fuzz(&frame);
        // Any single corruption is caught by the checksum or the header checks.
        prop_assert!(!matches!(decode_one(&frame), Ok(Some((ref m, 7, _))) if *m == msg));
    }
}

#[test]
fn borrowed_write_frames_decode_as_the_write() {
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let write = WriteRef {
        lun_key: 0x1234,
        offset_bytes: 1 << 30,
        fua: true,
        data: &data,
    };
    let mut frame = Vec::new();
    encode_write(&write, 99, &mut frame);
    let msg = Message::Write {
        lun_key: 0x1234,
        offset_bytes: 1 << 30,
        fua: true,
        data: data.clone(),
    };
    assert_eq!(decode_one(&frame), Ok(Some((msg, 99, frame.len()))));
    assert_eq!(
        decode_one_ref(&frame),
        Ok(Some((Frame::Write(write), 99, frame.len())))
    );
}

#[test]
fn oversized_body_rejected_from_header_alone() {
    let mut frame = Vec::new();
    encode(&Message::Flush { lun_key: 1 }, 1, &mut frame);
    frame[8..12].copy_from_slice(&(BODY_BYTES_MAX as u32 + 1).to_le_bytes());
    let mut decoder = Decoder::new();
    assert_eq!(
        decoder.feed(&frame[..HEADER_BYTES]),
        Err(WireError::BodyTooLong(BODY_BYTES_MAX as u32 + 1))
    );
    assert_eq!(decoder.next_message(), Err(WireError::Poisoned));
    assert_eq!(
        decode_one(&frame[..HEADER_BYTES]),
        Err(WireError::BodyTooLong(BODY_BYTES_MAX as u32 + 1))
    );
}

#[test]
fn resync_progress_beyond_its_total_is_rejected() {
    let mut frame = Vec::new();
    let progress = Message::ResyncProgress {
        lun_key: 1,
        done_bytes: 1 << 20,
        total_bytes: 2 << 20,
        eta_ms: 500,
    };
    encode(&progress, 5, &mut frame);
    assert_eq!(decode_one(&frame), Ok(Some((progress, 5, frame.len()))));
    // done 3 MiB of 2 MiB, checksummed like a real frame: refused by its meaning.
    let done = HEADER_BYTES + 8;
    frame[done..done + 8].copy_from_slice(&(3u64 << 20).to_le_bytes());
    finish_frame(0, &mut frame);
    assert_eq!(
        decode_one(&frame),
        Err(WireError::BadField("resync progress beyond its total"))
    );
}

#[test]
fn bad_magic_rejected_from_first_byte() {
    assert_eq!(decode_one(b"X"), Err(WireError::BadMagic));
    assert_eq!(decode_one(b"TW"), Ok(None));
}

#[test]
fn decoder_buffer_is_bounded() {
    let mut decoder = Decoder::new();
    let mut frame = Vec::new();
    encode(
        &Message::Write {
            lun_key: 1,
            offset_bytes: 0,
            fua: false,
            data: vec![0; DATA_BYTES_MAX],
        },
        3,
        &mut frame,
    );
    decoder.feed(&frame).unwrap();
    assert_eq!(decoder.feed(&[0; 65]), Err(WireError::BufferFull));
}
