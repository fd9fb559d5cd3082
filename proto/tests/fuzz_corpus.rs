//! Replays the fuzz corpora in `fuzz/corpus/<target>/` through the fuzz-target bodies
//! in `proto::fuzzing`, so every seed and every kept fuzzer finding (including crash
//! reproducers) runs under `cargo test` without libFuzzer. Also pins down what a few
//! seeds mean, so a seed that silently stops exercising its path is noticed.

use std::fs;
use std::path::PathBuf;

use proto::fuzzing::{self, LoginRun};
use proto::login::negotiate::SessionType;
use proto::pdu::{frame_len, parse_initiator, split_frame, Digests, InitiatorPdu, BHS_LEN};
use proto::scsi::cdb::{self, CdbSize, Command};

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Every file of a target's corpus, sorted by name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("directory entry").path();
            let name = path
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            let data = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (name, data)
        })
        .collect();
    files.sort();
    files
}

fn seed(target: &str, name: &str) -> Vec<u8> {
    let path = corpus_dir(target).join(format!("seed-{name}"));
    fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs every file through `f`, naming the file if it panics.
fn replay(target: &str, min_files: usize, f: fn(&[u8])) {
    let files = corpus(target);
    assert!(
        files.len() >= min_files,
        "{target} corpus has {} files, expected at least {min_files} (run fuzz/gen_corpus.py)",
        files.len()
    );
    for (name, data) in &files {
        let result = std::panic::catch_unwind(|| f(data));
        assert!(result.is_ok(), "fuzz target {target} panicked on {name}");
    }
}

#[test]
fn replay_pdu_corpus() {
    replay("pdu", 40, fuzzing::pdu);
}

#[test]
fn replay_login_corpus() {
    replay("login", 40, fuzzing::login);
}

#[test]
fn replay_cdb_corpus() {
    replay("cdb", 80, fuzzing::cdb);
}

/// Frames and parses the first PDU of `bytes`.
fn first_pdu(bytes: &[u8], digests: Digests) -> (InitiatorPdu, Vec<u8>) {
    let bhs: [u8; BHS_LEN] = bytes[..BHS_LEN].try_into().unwrap();
    let frame = frame_len(&bhs, digests, 262_144).unwrap();
    let (ahs, data) = split_frame(&bytes[..frame.total_len_bytes], &frame, digests).unwrap();
    (parse_initiator(&bhs, ahs).unwrap(), data.to_vec())
}

const DIGESTS: Digests = Digests {
    header: true,
    data: true,
};

#[test]
fn golden_login_request_parses() {
    for (name, digests) in [
        ("login-libiscsi", Digests::default()),
        ("login-libiscsi-digests", DIGESTS),
    ] {
        let (pdu, data) = first_pdu(&seed("pdu", name), digests);
        let InitiatorPdu::LoginRequest(req) = pdu else {
            panic!("{name}: {pdu:?}");
        };
        assert!(req.transit && !req.cont, "{name}");
        let pairs = proto::login::text::parse_text(&data).unwrap();
        assert_eq!(
            proto::login::text::find(&pairs, "TargetName"),
            Some("iqn.2026-11.io.twinsan:default")
        );
    }
}

#[test]
fn golden_scsi_commands_decode() {
    let (pdu, data) = first_pdu(&seed("pdu", "scsi-read10-digests"), DIGESTS);
    let InitiatorPdu::ScsiCommand(cmd) = pdu else {
        panic!("{pdu:?}");
    };
    assert!(cmd.read && data.is_empty());
    assert_eq!(cmd.expected_data_len_bytes, 4096);
    let Ok(Command::Read {
        size: CdbSize::Ten,
        rw,
    }) = cdb::decode(cmd.cdb())
    else {
        panic!("{:?}", cdb::decode(cmd.cdb()));
    };
    assert_eq!((rw.lba, rw.blocks), (0x1234, 8));

    let (pdu, data) = first_pdu(&seed("pdu", "scsi-write10-immediate"), Digests::default());
    let InitiatorPdu::ScsiCommand(cmd) = pdu else {
        panic!("{pdu:?}");
    };
    assert!(cmd.write && cmd.final_);
    assert_eq!(data.len(), 512);
    assert!(matches!(
        cdb::decode(cmd.cdb()),
        Ok(Command::Write {
            size: CdbSize::Ten,
            ..
        })
    ));

    let (pdu, _) = first_pdu(&seed("pdu", "scsi-extended-cdb-ahs"), Digests::default());
    let InitiatorPdu::ScsiCommand(cmd) = pdu else {
        panic!("{pdu:?}");
    };
    assert_eq!(cmd.cdb().len(), 32);
}

type PduCheck = fn(&InitiatorPdu) -> bool;

#[test]
fn golden_other_pdus_parse() {
    let cases: [(&str, Digests, PduCheck); 6] = [
        (
            "data-out-digests",
            DIGESTS,
            |p| matches!(p, InitiatorPdu::DataOut(d) if d.buffer_offset == 4096 && d.data_sn == 3),
        ),
        ("nop-out-ping", Digests::default(), |p| {
            matches!(p, InitiatorPdu::NopOut(_))
        }),
        ("tmf-lun-reset", DIGESTS, |p| {
            matches!(p, InitiatorPdu::TmfRequest(t)
                if t.function == proto::pdu::TmfFunction::LogicalUnitReset)
        }),
        ("logout-close-session", Digests::default(), |p| {
            matches!(p, InitiatorPdu::LogoutRequest(l)
                if l.reason == proto::pdu::LogoutReason::CloseSession)
        }),
        (
            "text-sendtargets-all-digests",
            DIGESTS,
            |p| matches!(p, InitiatorPdu::TextRequest(t) if t.final_),
        ),
        ("snack", Digests::default(), |p| {
            matches!(p, InitiatorPdu::Snack(_))
        }),
    ];
    for (name, digests, check) in cases {
        let (pdu, _) = first_pdu(&seed("pdu", name), digests);
        assert!(check(&pdu), "{name}: {pdu:?}");
    }
}

#[test]
fn every_cdb_seed_for_a_known_opcode_decodes() {
    // Every seed but the edge-* ones is a valid CDB (MODE SELECT and RSOC error seeds
    // carry their errors in the parameter list or the reporting options).
    let mut opcodes = std::collections::BTreeSet::new();
    for (name, data) in corpus("cdb") {
        if !name.starts_with("seed-") || name.starts_with("seed-edge-") {
            continue;
        }
        let cmd = cdb::decode(&data).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(cmd.opcode(), data[0], "{name}");
        opcodes.insert((cmd.opcode(), cmd.service_action()));
    }
    // Every (opcode, service action) REPORT SUPPORTED OPERATION CODES advertises has a seed.
    for e in proto::scsi::rsoc::SUPPORTED_OPCODES {
        assert!(
            opcodes.contains(&(e.opcode, e.service_action)),
            "no cdb seed for opcode {:#04x} sa {:?}",
            e.opcode,
            e.service_action
        );
    }
}

#[test]
fn cdb_error_seeds_fail_to_decode() {
    for name in [
        "edge-empty",
        "edge-truncated-read10",
        "edge-naca",
        "edge-unknown-opcode",
        "edge-unknown-sa",
        "edge-inquiry-cmddt",
    ] {
        assert!(cdb::decode(&seed("cdb", name)).is_err(), "{name}");
    }
}

fn login_completes(name: &str) -> proto::login::target::LoginResult {
    match fuzzing::login_run(&seed("login", name)) {
        LoginRun::Complete(r) => *r,
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn login_seeds_reach_full_feature_phase() {
    for name in [
        "libiscsi-open-no-security",
        "open-security-none-then-operational",
        "open-security-straight-to-ff",
        "open-iscsi-operational",
        "continued-text",
    ] {
        let r = login_completes(name);
        assert_eq!(r.session_type, SessionType::Normal, "{name}");
        assert_eq!(
            r.target_name.as_deref(),
            Some(fuzzing::OPEN_TARGET),
            "{name}"
        );
    }
    for name in ["chap-one-way-success", "chap-mutual-success"] {
        let r = login_completes(name);
        assert_eq!(
            r.target_name.as_deref(),
            Some(fuzzing::CHAP_TARGET),
            "{name}"
        );
    }
    for name in ["discovery-open", "discovery-chap", "discovery-libiscsi"] {
        assert_eq!(
            login_completes(name).session_type,
            SessionType::Discovery,
            "{name}"
        );
    }
    let r = login_completes("open-iscsi-operational");
    assert!(r.params.header_digest && r.params.data_digest);
}

#[test]
fn login_seeds_fail_with_the_right_status() {
    for (name, status) in [
        ("chap-wrong-secret", (2, 1)),
        ("chap-wrong-user", (2, 1)),
        ("chap-skip-security", (2, 1)),
        ("unknown-target", (2, 3)),
        ("missing-initiator-name", (2, 7)),
        ("address-not-allowed", (2, 2)),
        ("version-min-1", (2, 5)),
        ("tsih-nonzero", (2, 0x0a)),
        ("isid-changes", (2, 0)),
        ("duplicate-key", (2, 0)),
    ] {
        assert_eq!(
            fuzzing::login_run(&seed("login", name)),
            LoginRun::Failed(status.0, status.1),
            "{name}"
        );
    }
    assert_eq!(
        fuzzing::login_run(&seed("login", "parser-stage-2")),
        LoginRun::BadHeader
    );
}

#[test]
fn mode_select_seeds_change_the_mode_state() {
    use proto::scsi::mode::{mode_select, ModeState};
    let info = &fuzzing::cdb_luns()[0];
    for (name, check) in [
        (
            "mode-select6-caching-wce-off",
            (|s: &ModeState| !s.wce) as fn(&ModeState) -> bool,
        ),
        ("mode-select6-control-dsense", |s| s.d_sense),
        ("mode-select6-control-swp", |s| s.swp),
        ("mode-select10-caching", |s| !s.wce),
        ("mode-select6-bd-two-pages", |s| !s.wce && s.d_sense),
        ("mode-select10-long-lba-ctl-ext", |s| {
            *s == ModeState::default()
        }),
        ("mode-select6-empty-list", |s| *s == ModeState::default()),
    ] {
        let data = seed("cdb", name);
        let Ok(Command::ModeSelect {
            ten_byte,
            pf,
            sp,
            param_len,
        }) = cdb::decode(&data)
        else {
            panic!("{name}: {:?}", cdb::decode(&data));
        };
        let params = &data[fuzzing::CDB_FIELD_LEN_BYTES..];
        assert_eq!(params.len(), usize::from(param_len), "{name}");
        let mut state = ModeState::default();
        mode_select(info, &mut state, pf, sp, params, ten_byte)
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert!(check(&state), "{name}: {state:?}");
    }
    for name in [
        "mode-select6-sp",
        "mode-select6-unknown-page",
        "mode-select6-unchangeable-bit",
        "mode-select6-truncated-page",
        "mode-select6-bad-page-len",
        "mode-select6-wrong-block-len",
        "mode-select6-medium-type",
    ] {
        let data = seed("cdb", name);
        let Ok(Command::ModeSelect {
            ten_byte, pf, sp, ..
        }) = cdb::decode(&data)
        else {
            panic!("{name}");
        };
        let mut state = ModeState::default();
        assert!(
            mode_select(info, &mut state, pf, sp, &data[16..], ten_byte).is_err(),
            "{name}"
        );
    }
}
