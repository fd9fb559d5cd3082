//! Unit and scenario tests for persistent reservations. Scenario tests mirror the
//! expectations of libiscsi's test-tool suites (named in each test's comment).

use super::*;
use crate::scsi::cdb::{self, CdbSize, ModeSenseCdb, Rw, StartStop};
use crate::scsi::sense::SenseKey;

use PrOutAction as A;

const WE: u8 = 1;
const EA: u8 = 3;
const WE_RO: u8 = 5;
const EA_RO: u8 = 6;
const WE_AR: u8 = 7;
const EA_AR: u8 = 8;
const ALL_TYPES: [u8; 6] = [WE, EA, WE_RO, EA_RO, WE_AR, EA_AR];

fn nx(name: &str, port: u16) -> Nexus {
    Nexus::new(name, [0x80, 0, 0x02, 0x3d, 0, 1], port)
}

fn i1() -> Nexus {
    nx("iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test", 1)
}

fn i2() -> Nexus {
    nx("iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2", 1)
}

fn i3() -> Nexus {
    nx("iqn.1994-05.com.example:node3", 2)
}

fn params(key: u64, sark: u64, flags: u8) -> [u8; 24] {
    let mut p = [0u8; 24];
    p[..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sark.to_be_bytes());
    p[20] = flags;
    p
}

/// A basic PR OUT with scope 0 and a 24-byte parameter list.
fn out(
    s: &mut PrState,
    n: &Nexus,
    action: PrOutAction,
    ty: u8,
    key: u64,
    sark: u64,
) -> Result<PrOutEffect, PrOutError> {
    pr_out(s, n, action, 0, ty, &params(key, sark, 0), 24)
}

fn riek(s: &mut PrState, n: &Nexus, key: u64) {
    out(s, n, A::RegisterAndIgnoreExistingKey, 0, 0, key).unwrap();
}

fn read_keys(s: &PrState) -> (u32, Vec<u64>) {
    let v = pr_in(s, PrInAction::ReadKeys, 16384).unwrap();
    let gen = u32::from_be_bytes(v[0..4].try_into().unwrap());
    let len = u32::from_be_bytes(v[4..8].try_into().unwrap()) as usize;
    assert_eq!(len, v.len() - 8, "ADDITIONAL LENGTH matches the data");
    let keys = v[8..]
        .chunks(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect();
    (gen, keys)
}

/// READ RESERVATION: `Some((key, type))` when reserved.
fn read_res(s: &PrState) -> Option<(u64, u8)> {
    let v = pr_in(s, PrInAction::ReadReservation, 16384).unwrap();
    match u32::from_be_bytes(v[4..8].try_into().unwrap()) {
        0 => {
            assert_eq!(v.len(), 8);
            None
        }
        16 => {
            assert_eq!(v.len(), 24);
            assert_eq!(v[21] >> 4, 0, "LU_SCOPE");
            Some((
                u64::from_be_bytes(v[8..16].try_into().unwrap()),
                v[21] & 0x0F,
            ))
        }
        n => panic!("bad additional length {n}"),
    }
}

fn sense_of(r: Result<PrOutEffect, PrOutError>) -> Sense {
    match r {
        Err(PrOutError::Sense(s)) => s,
        other => panic!("expected CHECK CONDITION, got {other:?}"),
    }
}

fn is_conflict(r: Result<PrOutEffect, PrOutError>) -> bool {
    matches!(r, Err(PrOutError::ReservationConflict))
}

fn read10() -> Command {
    Command::Read {
        size: CdbSize::Ten,
        rw: Rw {
            lba: 1,
            blocks: 1,
            ..Rw::default()
        },
    }
}

fn write10() -> Command {
    Command::Write {
        size: CdbSize::Ten,
        rw: Rw {
            lba: 1,
            blocks: 1,
            ..Rw::default()
        },
    }
}

fn mode_sense() -> Command {
    Command::ModeSense(ModeSenseCdb {
        page: 0x3F,
        alloc_len: 255,
        ..ModeSenseCdb::default()
    })
}

fn uas(e: &PrOutEffect) -> Vec<(Nexus, Asc)> {
    sorted(e.unit_attentions.clone())
}

fn sorted(mut v: Vec<(Nexus, Asc)>) -> Vec<(Nexus, Asc)> {
    v.sort_by(|a, b| (&a.0, a.1 .0, a.1 .1).cmp(&(&b.0, b.1 .0, b.1 .1)));
    v
}

// ---------------------------------------------------------------------------------
// Nexus / TransportID
// ---------------------------------------------------------------------------------

#[test]
fn nexus_lowercases_and_builds_transport_id() {
    let n = Nexus::new("IQN.2000-01.COM.Example:Host", [0x80, 1, 2, 3, 4, 0xAB], 7);
    assert_eq!(n.initiator, "iqn.2000-01.com.example:host");
    assert_eq!(
        n.initiator_port_name(),
        "iqn.2000-01.com.example:host,i,0x8001020304ab"
    );
    let tid = n.transport_id();
    assert_eq!(tid[0], 0x45, "FORMAT CODE 01b, PROTOCOL IDENTIFIER iSCSI");
    let addl = u16::from_be_bytes([tid[2], tid[3]]) as usize;
    assert_eq!(tid.len(), 4 + addl);
    assert_eq!(addl % 4, 0);
    assert!(addl >= 20);
    let name = n.initiator_port_name();
    assert_eq!(&tid[4..4 + name.len()], name.as_bytes());
    assert!(
        tid[4 + name.len()..].iter().all(|&b| b == 0),
        "NUL + padding"
    );
    assert_eq!(Nexus::from_transport_id(&tid, 7), Some(n.clone()));
    // Short names still get the 20-byte minimum.
    let short = Nexus::new("a", [0; 6], 1);
    assert_eq!(short.transport_id().len(), 24);
    assert_eq!(
        Nexus::from_transport_id(&short.transport_id(), 1),
        Some(short)
    );
}

#[test]
fn transport_id_parse_rejects_other_formats() {
    let mut tid = i1().transport_id();
    assert!(Nexus::from_transport_id(&tid, 1).is_some());
    tid[0] = 0x05; // format 00b (no ISID)
    assert!(Nexus::from_transport_id(&tid, 1).is_none());
    tid[0] = 0x41; // FC format 01b? wrong protocol
    assert!(Nexus::from_transport_id(&tid, 1).is_none());
    assert!(Nexus::from_transport_id(&[0x45, 0, 0, 200], 1).is_none());
    assert!(Nexus::from_transport_id(&[], 1).is_none());
    let mut bad_hex = Nexus::new("iqn.x", [0; 6], 1).transport_id();
    let at = 4 + "iqn.x,i,0x".len();
    bad_hex[at] = b'g';
    assert!(Nexus::from_transport_id(&bad_hex, 1).is_none());
}

// ---------------------------------------------------------------------------------
// REGISTER / REGISTER AND IGNORE EXISTING KEY
// ---------------------------------------------------------------------------------

/// libiscsi ProutRegister.Simple.
#[test]
fn libiscsi_prout_register_simple() {
    let mut s = PrState::default();
    let key = 0x1234_5678_9abc_def0;
    riek(&mut s, &i1(), key);
    assert!(read_keys(&s).1.contains(&key));
    // Re-register with RESERVATION KEY 0 while registered: RESERVATION CONFLICT.
    assert!(is_conflict(out(&mut s, &i1(), A::Register, 0, 0, key + 1)));
    // Unregister with the right key.
    out(&mut s, &i1(), A::Register, 0, key, 0).unwrap();
    assert!(!read_keys(&s).1.contains(&key));
}

#[test]
fn register_key_rules_and_generation() {
    let mut s = PrState::default();
    // Unregistered nexus with a non-zero RESERVATION KEY: conflict, no state change.
    assert!(is_conflict(out(&mut s, &i1(), A::Register, 0, 5, 7)));
    assert_eq!(s, PrState::default());
    // Unregistered nexus "unregistering": GOOD, nothing happens.
    let e = out(&mut s, &i1(), A::Register, 0, 0, 0).unwrap();
    assert!(!e.changed);
    assert_eq!(s.generation(), 0);

    out(&mut s, &i1(), A::Register, 0, 0, 7).unwrap();
    assert_eq!(read_keys(&s), (1, vec![7]));
    // Wrong existing key: conflict, nothing changes.
    assert!(is_conflict(out(&mut s, &i1(), A::Register, 0, 8, 9)));
    assert_eq!(read_keys(&s), (1, vec![7]));
    // Right key: change it.
    out(&mut s, &i1(), A::Register, 0, 7, 9).unwrap();
    assert_eq!(read_keys(&s), (2, vec![9]));
    // REGISTER AND IGNORE EXISTING KEY ignores the RESERVATION KEY field.
    out(
        &mut s,
        &i1(),
        A::RegisterAndIgnoreExistingKey,
        0,
        0xdead,
        10,
    )
    .unwrap();
    assert_eq!(read_keys(&s), (3, vec![10]));
    // Unregister via RIEK with SARK 0.
    out(&mut s, &i1(), A::RegisterAndIgnoreExistingKey, 0, 0, 0).unwrap();
    assert_eq!(read_keys(&s), (4, vec![]));
}

#[test]
fn registrations_are_per_i_t_nexus() {
    let mut s = PrState::default();
    let a = i1();
    let mut a_other_isid = a.clone();
    a_other_isid.isid[5] = 2;
    let mut a_other_port = a.clone();
    a_other_port.target_port = 2;
    riek(&mut s, &a, 1);
    riek(&mut s, &a_other_isid, 1); // same key on several nexuses is fine
    riek(&mut s, &a_other_port, 2);
    assert_eq!(read_keys(&s).1, vec![1, 1, 2]);
    assert_eq!(s.key_of(&a_other_port), Some(2));
}

#[test]
fn register_changing_key_keeps_reservation_and_reports_new_key() {
    let mut s = PrState::default();
    riek(&mut s, &i1(), 1);
    out(&mut s, &i1(), A::Reserve, WE, 1, 0).unwrap();
    out(&mut s, &i1(), A::Register, 0, 1, 2).unwrap();
    assert_eq!(read_res(&s), Some((2, WE)));
    assert!(s.is_holder(&i1()));
}

#[test]
fn parameter_list_length_must_be_24() {
    for action in [
        A::Register,
        A::RegisterAndIgnoreExistingKey,
        A::Reserve,
        A::Release,
        A::Clear,
        A::Preempt,
        A::PreemptAndAbort,
    ] {
        let mut s = PrState::default();
        for len in [0u32, 23, 25, 32] {
            let buf = vec![0u8; len as usize];
            let sense = sense_of(pr_out(&mut s, &i1(), action, 0, WE, &buf, len));
            assert_eq!(
                (sense.key, sense.asc),
                (SenseKey::IllegalRequest, Asc::PARAMETER_LIST_LENGTH_ERROR),
                "{action:?} len {len}"
            );
        }
        // CDB says 24 but less data arrived.
        let sense = sense_of(pr_out(&mut s, &i1(), action, 0, WE, &[0; 10], 24));
        assert_eq!(sense.asc, Asc::PARAMETER_LIST_LENGTH_ERROR);
    }
}

#[test]
fn spec_i_pt_and_all_tg_pt_are_rejected() {
    let mut s = PrState::default();
    let sense = sense_of(pr_out(
        &mut s,
        &i1(),
        A::Register,
        0,
        0,
        &params(0, 1, 0x08),
        24,
    ));
    assert_eq!(sense.asc, Asc::INVALID_FIELD_IN_PARAMETER_LIST);
    assert_eq!(
        sense.key_specific,
        Some(crate::scsi::sense::SenseKeySpecific::Field(
            crate::scsi::sense::FieldPointer {
                cdb: false,
                byte: 20,
                bit: Some(3)
            }
        ))
    );
    // SPEC_I_PT with a longer list still reports the bit, not the length.
    let mut long = params(0, 1, 0x08).to_vec();
    long.extend_from_slice(&[0; 8]);
    assert_eq!(
        sense_of(pr_out(&mut s, &i1(), A::Register, 0, 0, &long, 32)).asc,
        Asc::INVALID_FIELD_IN_PARAMETER_LIST
    );
    for a in [A::Register, A::RegisterAndIgnoreExistingKey] {
        let sense = sense_of(pr_out(&mut s, &i1(), a, 0, 0, &params(0, 1, 0x04), 24));
        assert_eq!(sense.asc, Asc::INVALID_FIELD_IN_PARAMETER_LIST);
    }
    assert_eq!(s, PrState::default());
    // ALL_TG_PT is ignored by other service actions.
    riek(&mut s, &i1(), 1);
    pr_out(&mut s, &i1(), A::Reserve, 0, WE, &params(1, 0, 0x04), 24).unwrap();
    assert_eq!(read_res(&s), Some((1, WE)));
}

#[test]
fn registration_limit() {
    let mut s = PrState::default();
    for i in 0..MAX_REGISTRATIONS {
        riek(&mut s, &nx(&format!("iqn.x:{i}"), 1), i as u64 + 1);
    }
    let sense = sense_of(out(&mut s, &i1(), A::RegisterAndIgnoreExistingKey, 0, 0, 1));
    assert_eq!(sense.asc, Asc::INSUFFICIENT_REGISTRATION_RESOURCES);
    // Existing registrants can still change keys.
    out(&mut s, &nx("iqn.x:0", 1), A::Register, 0, 1, 99).unwrap();
    // Over-long names are refused too.
    let mut t = PrState::default();
    let long = nx(&"a".repeat(MAX_NAME_BYTES + 1), 1);
    let sense = sense_of(out(&mut t, &long, A::RegisterAndIgnoreExistingKey, 0, 0, 1));
    assert_eq!(sense.asc, Asc::INSUFFICIENT_REGISTRATION_RESOURCES);
}

// ---------------------------------------------------------------------------------
// RESERVE / RELEASE
// ---------------------------------------------------------------------------------

#[test]
fn reserve_rules() {
    let mut s = PrState::default();
    // Not registered: conflict.
    assert!(is_conflict(out(&mut s, &i1(), A::Reserve, WE, 0, 0)));
    riek(&mut s, &i1(), 1);
    riek(&mut s, &i2(), 2);
    // Wrong key: conflict.
    assert!(is_conflict(out(&mut s, &i1(), A::Reserve, WE, 2, 0)));
    // Bad scope / type: INVALID FIELD IN CDB.
    let e = sense_of(pr_out(
        &mut s,
        &i1(),
        A::Reserve,
        1,
        WE,
        &params(1, 0, 0),
        24,
    ));
    assert_eq!(e.asc, Asc::INVALID_FIELD_IN_CDB);
    for bad in [0u8, 2, 4, 9, 15] {
        let e = sense_of(out(&mut s, &i1(), A::Reserve, bad, 1, 0));
        assert_eq!(e.asc, Asc::INVALID_FIELD_IN_CDB, "type {bad}");
    }
    let gen = s.generation();
    out(&mut s, &i1(), A::Reserve, WE, 1, 0).unwrap();
    assert_eq!(s.generation(), gen, "RESERVE does not bump PRGENERATION");
    // Same type again from the holder: GOOD, no change.
    assert!(!out(&mut s, &i1(), A::Reserve, WE, 1, 0).unwrap().changed);
    // Different type from the holder: conflict.
    assert!(is_conflict(out(&mut s, &i1(), A::Reserve, EA, 1, 0)));
    // Another registrant: conflict.
    assert!(is_conflict(out(&mut s, &i2(), A::Reserve, WE, 2, 0)));
    assert_eq!(read_res(&s), Some((1, WE)));
}

#[test]
fn all_registrants_reserve_from_any_registrant_is_a_noop() {
    for ty in [WE_AR, EA_AR] {
        let mut s = PrState::default();
        riek(&mut s, &i1(), 1);
        riek(&mut s, &i2(), 2);
        out(&mut s, &i1(), A::Reserve, ty, 1, 0).unwrap();
        assert_eq!(read_res(&s), Some((0, ty)), "all-registrants key is 0");
        assert!(s.is_holder(&i2()));
        assert!(!out(&mut s, &i2(), A::Reserve, ty, 2, 0).unwrap().changed);
        assert!(is_conflict(out(&mut s, &i2(), A::Reserve, WE, 2, 0)));
    }
}

#[test]
fn release_rules_and_unit_attentions() {
    for ty in ALL_TYPES {
        let mut s = PrState::default();
        riek(&mut s, &i1(), 1);
        riek(&mut s, &i2(), 2);
        riek(&mut s, &i3(), 3);
        // No reservation: GOOD.
        out(&mut s, &i1(), A::Release, ty, 1, 0).unwrap();
        out(&mut s, &i1(), A::Reserve, ty, 1, 0).unwrap();
        let gen = s.generation();
        // Wrong key: conflict.
        assert!(is_conflict(out(&mut s, &i1(), A::Release, ty, 9, 0)));
        // Unregistered: conflict.
        assert!(is_conflict(out(
            &mut s,
            &nx("iqn.z", 1),
            A::Release,
            ty,
            0,
            0
        )));
        let pr_type = PrType::from_code(ty).unwrap();
        if !pr_type.all_registrants() {
            // A registrant that is not the holder: GOOD, reservation kept.
            let e = out(&mut s, &i2(), A::Release, ty, 2, 0).unwrap();
            assert!(!e.changed);
            assert!(read_res(&s).is_some());
        }
        // Holder with the wrong type: INVALID RELEASE OF PERSISTENT RESERVATION.
        let wrong = if ty == WE { EA } else { WE };
        let e = sense_of(out(&mut s, &i1(), A::Release, wrong, 1, 0));
        assert_eq!(
            (e.key, e.asc),
            (
                SenseKey::IllegalRequest,
                Asc::INVALID_RELEASE_OF_PERSISTENT_RESERVATION
            )
        );
        let e = sense_of(pr_out(
            &mut s,
            &i1(),
            A::Release,
            2,
            ty,
            &params(1, 0, 0),
            24,
        ));
        assert_eq!(e.asc, Asc::INVALID_RELEASE_OF_PERSISTENT_RESERVATION);
        // Proper release.
        let e = out(&mut s, &i1(), A::Release, ty, 1, 0).unwrap();
        assert_eq!(read_res(&s), None);
        assert_eq!(s.generation(), gen, "RELEASE does not bump PRGENERATION");
        assert_eq!(read_keys(&s).1.len(), 3, "registrations survive RELEASE");
        if pr_type.registrants_only() || pr_type.all_registrants() {
            assert_eq!(
                uas(&e),
                sorted(vec![
                    (i2(), Asc::RESERVATIONS_RELEASED),
                    (i3(), Asc::RESERVATIONS_RELEASED)
                ]),
                "type {ty}"
            );
        } else {
            assert!(e.unit_attentions.is_empty(), "type {ty}");
        }
    }
}

#[test]
fn all_registrants_release_by_any_registrant() {
    let mut s = PrState::default();
    riek(&mut s, &i1(), 1);
    riek(&mut s, &i2(), 2);
    out(&mut s, &i1(), A::Reserve, WE_AR, 1, 0).unwrap();
    let e = out(&mut s, &i2(), A::Release, WE_AR, 2, 0).unwrap();
    assert_eq!(read_res(&s), None);
    assert_eq!(e.unit_attentions, vec![(i1(), Asc::RESERVATIONS_RELEASED)]);
}

// ---------------------------------------------------------------------------------
// Unregistering the holder (libiscsi ProutReserve.Ownership*)
// ---------------------------------------------------------------------------------

/// libiscsi ProutReserve.Ownership{EA,WE,EARO,WERO,EAAR,WEAR}.
#[test]
fn libiscsi_prout_reserve_ownership() {
    for ty in ALL_TYPES {
        let pr_type = PrType::from_code(ty).unwrap();
        let (k1, k2) = (0x11, 0x22);
        let mut s = PrState::default();
        riek(&mut s, &i1(), k1);
        riek(&mut s, &i2(), k2);
        out(&mut s, &i1(), A::Reserve, ty, k1, 0).unwrap();
        let expect_key = if pr_type.all_registrants() { 0 } else { k1 };
        assert_eq!(read_res(&s), Some((expect_key, ty)));
        // Unregister the reserving initiator.
        let e = out(&mut s, &i1(), A::Register, 0, k1, 0).unwrap();
        if pr_type.all_registrants() {
            // Shared: still reserved, and initiator 2 (a holder) can release it.
            assert_eq!(read_res(&s), Some((0, ty)));
            assert!(e.unit_attentions.is_empty());
            out(&mut s, &i2(), A::Release, ty, k2, 0).unwrap();
        } else {
            assert_eq!(read_res(&s), None, "type {ty}");
            if pr_type.registrants_only() {
                assert_eq!(e.unit_attentions, vec![(i2(), Asc::RESERVATIONS_RELEASED)]);
            } else {
                assert!(e.unit_attentions.is_empty());
            }
        }
        out(&mut s, &i2(), A::Register, 0, k2, 0).unwrap();
        assert_eq!(read_keys(&s).1, Vec::<u64>::new());
        assert_eq!(read_res(&s), None);
    }
}

#[test]
fn last_all_registrants_unregister_drops_reservation() {
    let mut s = PrState::default();
    riek(&mut s, &i1(), 1);
    out(&mut s, &i1(), A::Reserve, EA_AR, 1, 0).unwrap();
    out(&mut s, &i1(), A::Register, 0, 1, 0).unwrap();
    assert_eq!(s.reservation(), None);
}

// ---------------------------------------------------------------------------------
// Access control (libiscsi ProutReserve.Access*, SPC-4 table 62, SBC-3 table 13)
// ---------------------------------------------------------------------------------

/// libiscsi ProutReserve.Access{EA,WE,EARO,WERO,EAAR,WEAR}: initiator 1 reserves;
/// (registered i2 read, write), then i2 unregisters: (unregistered i2 read, write).
#[test]
fn libiscsi_prout_reserve_access() {
    let table: [(u8, [bool; 4]); 6] = [
        (EA, [false, false, false, false]),
        (WE, [true, false, true, false]),
        (EA_RO, [true, true, false, false]),
        (WE_RO, [true, true, true, false]),
        (EA_AR, [true, true, false, false]),
        (WE_AR, [true, true, true, false]),
    ];
    for (ty, [reg_read, reg_write, unreg_read, unreg_write]) in table {
        let (k1, k2) = (0xAAAA, 0xBBBB);
        let mut s = PrState::default();
        riek(&mut s, &i1(), k1);
        riek(&mut s, &i2(), k2);
        out(&mut s, &i1(), A::Reserve, ty, k1, 0).unwrap();
        let pr_type = PrType::from_code(ty).unwrap();
        let expect_key = if pr_type.all_registrants() { 0 } else { k1 };
        assert_eq!(read_res(&s), Some((expect_key, ty)));
        assert_eq!(check_access(&s, &i1(), &read10()), Ok(()));
        assert_eq!(check_access(&s, &i1(), &write10()), Ok(()));
        assert_eq!(check_access(&s, &i2(), &read10()).is_ok(), reg_read, "{ty}");
        assert_eq!(
            check_access(&s, &i2(), &write10()).is_ok(),
            reg_write,
            "{ty}"
        );
        out(&mut s, &i2(), A::Register, 0, k2, 0).unwrap();
        assert_eq!(
            check_access(&s, &i2(), &read10()).is_ok(),
            unreg_read,
            "{ty}"
        );
        assert_eq!(
            check_access(&s, &i2(), &write10()).is_ok(),
            unreg_write,
            "{ty}"
        );
        out(&mut s, &i1(), A::Release, ty, k1, 0).unwrap();
        out(&mut s, &i1(), A::Register, 0, k1, 0).unwrap();
        assert_eq!(s.registrations().len(), 0);
    }
}

#[test]
fn access_table_per_command_class() {
    let reads = [
        read10(),
        Command::Verify {
            size: CdbSize::Ten,
            rw: Rw::default(),
            bytchk: 0,
        },
        Command::PreFetch {
            size: CdbSize::Ten,
            immed: false,
            lba: 0,
            blocks: 1,
            group: 0,
        },
        Command::GetLbaStatus {
            lba: 0,
            alloc_len: 32,
        },
        mode_sense(),
    ];
    let writes = [
        write10(),
        Command::WriteSame {
            size: CdbSize::Sixteen,
            rw: Rw::default(),
            anchor: false,
            unmap: true,
            ndob: false,
        },
        Command::Unmap {
            anchor: false,
            group: 0,
            param_len: 24,
        },
        Command::CompareAndWrite(Rw::default()),
        Command::SynchronizeCache {
            size: CdbSize::Ten,
            immed: false,
            lba: 0,
            blocks: 0,
            group: 0,
        },
        Command::ModeSelect {
            ten_byte: false,
            pf: true,
            sp: false,
            param_len: 12,
        },
        Command::StartStopUnit(StartStop::default()), // START=0: conflicts
        Command::PreventAllowMediumRemoval { prevent: 1 },
    ];
    let always = [
        Command::TestUnitReady,
        Command::Inquiry {
            evpd: false,
            page: 0,
            alloc_len: 96,
        },
        Command::RequestSense {
            desc: false,
            alloc_len: 18,
        },
        Command::ReportLuns {
            select_report: 0,
            alloc_len: 64,
        },
        Command::ReadCapacity10,
        Command::ReadCapacity16 { alloc_len: 32 },
        Command::ReportTargetPortGroups {
            extended: false,
            alloc_len: 64,
        },
        Command::PersistentReserveIn {
            action: PrInAction::ReadKeys,
            alloc_len: 64,
        },
        Command::PersistentReserveOut {
            action: PrOutAction::Register,
            scope: 0,
            pr_type: 0,
            param_len: 24,
        },
        Command::PreventAllowMediumRemoval { prevent: 0 },
        Command::StartStopUnit(StartStop {
            start: true,
            ..StartStop::default()
        }),
    ];
    for ty in ALL_TYPES {
        let pr_type = PrType::from_code(ty).unwrap();
        let mut s = PrState::default();
        riek(&mut s, &i1(), 1);
        riek(&mut s, &i2(), 2);
        out(&mut s, &i1(), A::Reserve, ty, 1, 0).unwrap();
        let stranger = i3();
        let shared = pr_type.registrants_only() || pr_type.all_registrants();
        for c in &always {
            for n in [i1(), i2(), stranger.clone()] {
                assert_eq!(check_access(&s, &n, c), Ok(()), "{ty} {c:?}");
            }
        }
        for c in &reads {
            assert_eq!(check_access(&s, &i1(), c), Ok(()));
            let reg_ok = shared || !pr_type.exclusive_access();
            assert_eq!(check_access(&s, &i2(), c).is_ok(), reg_ok, "{ty} {c:?}");
            let stranger_ok = !pr_type.exclusive_access();
            assert_eq!(
                check_access(&s, &stranger, c).is_ok(),
                stranger_ok,
                "{ty} {c:?}"
            );
        }
        for c in &writes {
            assert_eq!(check_access(&s, &i1(), c), Ok(()));
            assert_eq!(check_access(&s, &i2(), c).is_ok(), shared, "{ty} {c:?}");
            assert_eq!(check_access(&s, &stranger, c), Err(Conflict), "{ty} {c:?}");
        }
    }
    // No reservation: everything is allowed, registered or not.
    let mut s = PrState::default();
    riek(&mut s, &i1(), 1);
    for c in reads.iter().chain(&writes).chain(&always) {
        assert_eq!(check_access(&s, &i2(), c), Ok(()));
    }
}

/// libiscsi MultipathIO: the same initiator through another target port (or with
/// another ISID) is a different I_T nexus; without reservations every path works.
#[test]
fn libiscsi_multipath_paths_are_distinct_nexuses() {
    let path_a = i1();
    let mut path_b = i1();
    path_b.target_port = 2;
    let mut s = PrState::default();
    for p in [&path_a, &path_b] {
        assert_eq!(check_access(&s, p, &write10()), Ok(()));
        assert_eq!(check_access(&s, p, &read10()), Ok(()));
    }
    // Register and reserve through path A only.
    riek(&mut s, &path_a, 1);
    out(&mut s, &path_a, A::Reserve, WE, 1, 0).unwrap();
    assert_eq!(check_access(&s, &path_b, &write10()), Err(Conflict));
    assert_eq!(check_access(&s, &path_b, &read10()), Ok(()));
    // Registering path B too makes it a registrant but not the WE holder...
    riek(&mut s, &path_b, 1);
    assert_eq!(check_access(&s, &path_b, &write10()), Err(Conflict));
    // ...while a registrants-only type admits every registered path.
    out(&mut s, &path_a, A::Release, WE, 1, 0).unwrap();
    out(&mut s, &path_a, A::Reserve, WE_RO, 1, 0).unwrap();
    assert_eq!(check_access(&s, &path_b, &write10()), Ok(()));
}

// ---------------------------------------------------------------------------------
// CLEAR / PREEMPT / PREEMPT AND ABORT
// ---------------------------------------------------------------------------------

/// libiscsi ProutClear.Simple.
#[test]
fn libiscsi_prout_clear_simple() {
    let mut s = PrState::default();
    let key = 0x5151;
    riek(&mut s, &i1(), key);
    let (old_gen, keys) = read_keys(&s);
    assert!(!keys.is_empty());
    out(&mut s, &i1(), A::Reserve, EA, key, 0).unwrap();
    assert_eq!(read_res(&s), Some((key, EA)));
    out(&mut s, &i1(), A::Clear, 0, key, 0).unwrap();
    assert_eq!(read_res(&s), None);
    let (gen, keys) = read_keys(&s);
    assert!(keys.is_empty());
    assert_eq!(
        gen,
        old_gen + 1,
        "incremented once for CLEAR, not for RESERVE"
    );
}

#[test]
fn clear_rules_and_unit_attentions() {
    let mut s = PrState::default();
    riek(&mut s, &i1(), 1);
    riek(&mut s, &i2(), 2);
    riek(&mut s, &i3(), 3);
    out(&mut s, &i2(), A::Reserve, WE_RO, 2, 0).unwrap();
    assert!(
        is_conflict(out(&mut s, &i1(), A::Clear, 0, 2, 0)),
        "wrong key"
    );
    assert!(is_conflict(out(&mut s, &nx("iqn.z", 1), A::Clear, 0, 0, 0)));
    let e = out(&mut s, &i1(), A::Clear, 0, 1, 0).unwrap();
    assert_eq!(
        uas(&e),
        sorted(vec![
            (i2(), Asc::RESERVATIONS_PREEMPTED),
            (i3(), Asc::RESERVATIONS_PREEMPTED)
        ])
    );
    assert!(s.registrations().is_empty());
    assert!(s.reservation().is_none());
}

/// libiscsi ProutPreempt.RemoveRegistration.
#[test]
fn libiscsi_prout_preempt_remove_registration() {
    let (k1, k2) = (0x1111, 0x2222);
    let mut s = PrState::default();
    riek(&mut s, &i1(), k1);
    out(&mut s, &i1(), A::Clear, 0, k1, 0).unwrap();
    riek(&mut s, &i1(), k1);
    riek(&mut s, &i2(), k2);
    let (old_gen, keys) = read_keys(&s);
    assert_eq!(keys.len(), 2);
    // i2 preempts k1 (no reservation exists; type EA in the CDB is ignored).
    let e = out(&mut s, &i2(), A::Preempt, EA, k2, k1).unwrap();
    assert_eq!(
        e.unit_attentions,
        vec![(i1(), Asc::REGISTRATIONS_PREEMPTED)]
    );
    assert!(e.abort_tasks_of.is_empty(), "PREEMPT aborts nothing");
    let (gen, keys) = read_keys(&s);
    assert_eq!(keys, vec![k2]);
    assert_eq!(gen, old_gen + 1);
    assert_eq!(read_res(&s), None);
    out(&mut s, &i2(), A::Register, 0, k2, 0).unwrap();
}

#[test]
fn preempt_without_reservation_errors() {
    let mut s = PrState::default();
    riek(&mut s, &i1(), 1);
    riek(&mut s, &i2(), 2);
    let before = s.clone();
    let e = sense_of(out(&mut s, &i1(), A::Preempt, WE, 1, 0));
    assert_eq!(e.asc, Asc::INVALID_FIELD_IN_PARAMETER_LIST);
    assert!(
        is_conflict(out(&mut s, &i1(), A::Preempt, WE, 1, 77)),
        "no such key"
    );
    assert!(
        is_conflict(out(&mut s, &i1(), A::Preempt, WE, 2, 2)),
        "wrong own key"
    );
    assert!(
        is_conflict(out(&mut s, &i3(), A::Preempt, WE, 0, 2)),
        "unregistered"
    );
    assert_eq!(s, before);
    // Preempting one's own key keeps one's own registration.
    out(&mut s, &i1(), A::Preempt, WE, 1, 1).unwrap();
    assert_eq!(read_keys(&s).1, vec![1, 2]);
}

#[test]
fn preempt_the_holder() {
    let mut s = PrState::default();
    riek(&mut s, &i1(), 1);
    riek(&mut s, &i2(), 2);
    riek(&mut s, &i3(), 3);
    out(&mut s, &i1(), A::Reserve, WE, 1, 0).unwrap();
    let gen = s.generation();
    // Bad type when establishing the new reservation.
    let e = sense_of(out(&mut s, &i2(), A::Preempt, 4, 2, 1));
    assert_eq!(e.asc, Asc::INVALID_FIELD_IN_CDB);
    let e = out(&mut s, &i2(), A::Preempt, EA, 2, 1).unwrap();
    assert_eq!(s.generation(), gen + 1);
    assert_eq!(read_res(&s), Some((2, EA)));
    assert!(s.is_holder(&i2()));
    assert_eq!(read_keys(&s).1, vec![2, 3]);
    assert_eq!(
        uas(&e),
        sorted(vec![
            (i1(), Asc::REGISTRATIONS_PREEMPTED),
            // Type changed: the remaining registrant lost the old reservation.
            (i3(), Asc::RESERVATIONS_RELEASED),
        ])
    );
    // Same type, new holder: only the preempted registrant hears about it.
    let e = out(&mut s, &i3(), A::Preempt, EA, 3, 2).unwrap();
    assert_eq!(
        e.unit_attentions,
        vec![(i2(), Asc::REGISTRATIONS_PREEMPTED)]
    );
    assert_eq!(read_res(&s), Some((3, EA)));
}

#[test]
fn preempt_self_changes_type() {
    let mut s = PrState::default();
    riek(&mut s, &i1(), 1);
    riek(&mut s, &i2(), 2);
    out(&mut s, &i1(), A::Reserve, WE, 1, 0).unwrap();
    let e = out(&mut s, &i1(), A::Preempt, EA_RO, 1, 1).unwrap();
    assert_eq!(read_res(&s), Some((1, EA_RO)));
    assert_eq!(read_keys(&s).1, vec![1, 2]);
    assert_eq!(e.unit_attentions, vec![(i2(), Asc::RESERVATIONS_RELEASED)]);
}

#[test]
fn preempt_registrations_only_keeps_reservation() {
    let mut s = PrState::default();
    riek(&mut s, &i1(), 1);
    riek(&mut s, &i2(), 2);
    riek(&mut s, &i3(), 3);
    out(&mut s, &i1(), A::Reserve, WE_RO, 1, 0).unwrap();
    // SARK is not the holder's key: only registrations go; type/scope are not used.
    let e = out(&mut s, &i2(), A::Preempt, 0, 2, 3).unwrap();
    assert_eq!(
        e.unit_attentions,
        vec![(i3(), Asc::REGISTRATIONS_PREEMPTED)]
    );
    assert_eq!(read_res(&s), Some((1, WE_RO)));
    assert_eq!(read_keys(&s).1, vec![1, 2]);
    // SARK zero with a non-all-registrants reservation is invalid.
    let e = sense_of(out(&mut s, &i2(), A::Preempt, WE_RO, 2, 0));
    assert_eq!(e.asc, Asc::INVALID_FIELD_IN_PARAMETER_LIST);
    assert!(is_conflict(out(&mut s, &i2(), A::Preempt, WE_RO, 2, 99)));
}

#[test]
fn preempt_all_registrants() {
    // SARK zero: everyone else is removed and the preemptor gets a new reservation.
    let mut s = PrState::default();
    riek(&mut s, &i1(), 1);
    riek(&mut s, &i2(), 2);
    riek(&mut s, &i3(), 3);
    out(&mut s, &i1(), A::Reserve, WE_AR, 1, 0).unwrap();
    let e = out(&mut s, &i2(), A::PreemptAndAbort, EA, 2, 0).unwrap();
    assert_eq!(read_keys(&s).1, vec![2]);
    assert_eq!(read_res(&s), Some((2, EA)));
    assert_eq!(
        uas(&e),
        sorted(vec![
            (i1(), Asc::REGISTRATIONS_PREEMPTED),
            (i3(), Asc::REGISTRATIONS_PREEMPTED)
        ])
    );
    let mut aborted = e.abort_tasks_of.clone();
    aborted.sort();
    let mut expect = vec![i1(), i2(), i3()];
    expect.sort();
    assert_eq!(aborted, expect, "SARK 0 identifies every registrant");

    // SARK non-zero: just that key's registrations; the AR reservation stays.
    let mut s = PrState::default();
    riek(&mut s, &i1(), 1);
    riek(&mut s, &i2(), 2);
    riek(&mut s, &i3(), 3);
    out(&mut s, &i1(), A::Reserve, EA_AR, 1, 0).unwrap();
    let e = out(&mut s, &i2(), A::Preempt, EA_AR, 2, 1).unwrap();
    assert_eq!(
        e.unit_attentions,
        vec![(i1(), Asc::REGISTRATIONS_PREEMPTED)]
    );
    assert_eq!(read_res(&s), Some((0, EA_AR)));
    assert_eq!(read_keys(&s).1, vec![2, 3]);
    assert!(is_conflict(out(&mut s, &i2(), A::Preempt, EA_AR, 2, 1)));
}

#[test]
fn preempt_and_abort_lists_nexuses() {
    let mut s = PrState::default();
    riek(&mut s, &i1(), 1);
    riek(&mut s, &i2(), 2);
    let mut i2b = i2();
    i2b.target_port = 9;
    riek(&mut s, &i2b, 2);
    out(&mut s, &i2(), A::Reserve, EA, 2, 0).unwrap();
    let e = out(&mut s, &i1(), A::PreemptAndAbort, EA, 1, 2).unwrap();
    assert_eq!(e.abort_tasks_of, vec![i2(), i2b.clone()]);
    assert_eq!(read_res(&s), Some((1, EA)));
    assert_eq!(read_keys(&s).1, vec![1]);
    assert_eq!(
        uas(&e),
        sorted(vec![
            (i2(), Asc::REGISTRATIONS_PREEMPTED),
            (i2b, Asc::REGISTRATIONS_PREEMPTED)
        ])
    );
}

#[test]
fn generation_counts_only_the_right_actions() {
    let mut s = PrState::default();
    riek(&mut s, &i1(), 1); // 1
    riek(&mut s, &i2(), 2); // 2
    out(&mut s, &i1(), A::Reserve, WE, 1, 0).unwrap();
    out(&mut s, &i1(), A::Release, WE, 1, 0).unwrap();
    assert_eq!(s.generation(), 2);
    let _ = out(&mut s, &i1(), A::Register, 0, 9, 3); // conflict: no bump
    let _ = out(&mut s, &i1(), A::Preempt, WE, 1, 0); // check condition: no bump
    assert_eq!(s.generation(), 2);
    out(&mut s, &i1(), A::Preempt, WE, 1, 2).unwrap(); // 3
    out(&mut s, &i1(), A::Clear, 0, 1, 0).unwrap(); // 4
    assert_eq!(read_keys(&s).0, 4);
    // PR IN never bumps.
    for a in [
        PrInAction::ReadKeys,
        PrInAction::ReadReservation,
        PrInAction::ReportCapabilities,
        PrInAction::ReadFullStatus,
    ] {
        pr_in(&s, a, 100).unwrap();
    }
    assert_eq!(s.generation(), 4);
}

// ---------------------------------------------------------------------------------
// REGISTER AND MOVE / REPLACE LOST RESERVATION
// ---------------------------------------------------------------------------------

fn move_params(key: u64, sark: u64, flags: u8, rtpi: u16, tid: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 24];
    p[..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sark.to_be_bytes());
    p[17] = flags;
    p[18..20].copy_from_slice(&rtpi.to_be_bytes());
    p[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
    p.extend_from_slice(tid);
    p
}

#[test]
fn register_and_move() {
    let mut s = PrState::default();
    riek(&mut s, &i1(), 1);
    out(&mut s, &i1(), A::Reserve, WE, 1, 0).unwrap();
    let dest = i2();
    let tid = dest.transport_id();
    let p = move_params(1, 0x77, 0x02 | 0x01, dest.target_port, &tid);
    let len = p.len() as u32;
    // Length mismatch.
    let e = sense_of(pr_out(
        &mut s,
        &i1(),
        A::RegisterAndMove,
        0,
        WE,
        &p,
        len + 4,
    ));
    assert_eq!(e.asc, Asc::PARAMETER_LIST_LENGTH_ERROR);
    // Not the holder: conflict.
    riek(&mut s, &i3(), 3);
    assert!(is_conflict(pr_out(
        &mut s,
        &i3(),
        A::RegisterAndMove,
        0,
        WE,
        &move_params(3, 0x77, 0, 1, &tid),
        len
    )));
    // Moving to oneself is invalid.
    let own = i1().transport_id();
    let p_self = move_params(1, 5, 0, 1, &own);
    let e = sense_of(pr_out(
        &mut s,
        &i1(),
        A::RegisterAndMove,
        0,
        WE,
        &p_self,
        p_self.len() as u32,
    ));
    assert_eq!(e.asc, Asc::INVALID_FIELD_IN_PARAMETER_LIST);
    let gen = s.generation();
    let e = pr_out(&mut s, &i1(), A::RegisterAndMove, 0, EA, &p, len).unwrap();
    assert!(e.persist && e.changed);
    assert!(s.aptpl());
    assert_eq!(s.generation(), gen + 1);
    assert_eq!(s.key_of(&i1()), None, "UNREG removed the source");
    assert_eq!(s.key_of(&dest), Some(0x77));
    assert_eq!(read_res(&s), Some((0x77, EA)));
    assert!(s.is_holder(&dest));
    // All-registrants reservations cannot be moved.
    let mut t = PrState::default();
    riek(&mut t, &i1(), 1);
    out(&mut t, &i1(), A::Reserve, WE_AR, 1, 0).unwrap();
    assert!(is_conflict(pr_out(
        &mut t,
        &i1(),
        A::RegisterAndMove,
        0,
        WE,
        &p,
        len
    )));
}

#[test]
fn replace_lost_reservation_is_unsupported() {
    let mut s = PrState::default();
    riek(&mut s, &i1(), 1);
    let e = sense_of(out(&mut s, &i1(), A::ReplaceLostReservation, WE, 1, 0));
    assert_eq!(e, Sense::invalid_field_in_cdb(1, Some(4)));
}

// ---------------------------------------------------------------------------------
// PERSISTENT RESERVE IN
// ---------------------------------------------------------------------------------

/// libiscsi PrinReadKeys.Simple and PrinReadKeys.Truncate.
#[test]
fn libiscsi_prin_read_keys() {
    let mut s = PrState::default();
    let v = pr_in(&s, PrInAction::ReadKeys, 16384).unwrap();
    assert_eq!(v, vec![0; 8]);
    riek(&mut s, &i1(), 0xfeed);
    riek(&mut s, &i2(), 0xbeef);
    let v = pr_in(&s, PrInAction::ReadKeys, 8).unwrap();
    // The caller truncates to 8 bytes; ADDITIONAL LENGTH still reports both keys.
    assert_eq!(&v[4..8], &16u32.to_be_bytes());
    assert_eq!(read_keys(&s), (2, vec![0xfeed, 0xbeef]));
}

/// libiscsi PrinReportCapabilities.Simple.
#[test]
fn libiscsi_prin_report_capabilities() {
    let mut s = PrState::default();
    let key = 0xC0FFEE;
    riek(&mut s, &i1(), key);
    let v = pr_in(&s, PrInAction::ReportCapabilities, 16384).unwrap();
    assert_eq!(v.len(), 8);
    assert_eq!(u16::from_be_bytes([v[0], v[1]]), 8, "LENGTH");
    assert_eq!(v[2] & 0x10, 0, "CRH=0");
    assert_eq!(v[2] & 0x0C, 0, "SIP_C=0, ATP_C=0");
    assert_eq!(v[2] & 0x01, 1, "PTPL_C=1");
    assert_eq!(v[3] & 0x80, 0x80, "TMV=1");
    assert!((v[3] >> 4) & 0x07 <= 5, "ALLOW COMMANDS");
    assert_eq!(v[3] & 0x01, 0, "PTPL_A follows APTPL");
    let mask = u16::from_be_bytes([v[4], v[5]]);
    // WR_EX_AR 0x8000, EX_AC_RO 0x4000, WR_EX_RO 0x2000, EX_AC 0x0800, WR_EX 0x0200,
    // EX_AC_AR 0x0001: all of them and nothing else.
    assert_eq!(mask, 0xEA01);
    for ty in ALL_TYPES {
        out(&mut s, &i1(), A::Reserve, ty, key, 0).unwrap();
        let all_reg = PrType::from_code(ty).unwrap().all_registrants();
        assert_eq!(read_res(&s), Some((if all_reg { 0 } else { key }, ty)));
        out(&mut s, &i1(), A::Release, ty, key, 0).unwrap();
        assert_eq!(read_res(&s), None);
    }
    out(&mut s, &i1(), A::Register, 0, key, 0).unwrap();
    // PTPL_A reflects the APTPL state.
    pr_out(&mut s, &i1(), A::Register, 0, 0, &params(0, 1, 0x01), 24).unwrap();
    let v = pr_in(&s, PrInAction::ReportCapabilities, 8).unwrap();
    assert_eq!(v[3] & 0x01, 1);
}

/// libiscsi PrinServiceactionRange: service actions 0..=3 decode, 4..=0x1F are
/// rejected by the CDB decoder with ILLEGAL REQUEST / INVALID FIELD IN CDB.
#[test]
fn libiscsi_prin_serviceaction_range() {
    let s = PrState::default();
    for sa in 0u8..0x20 {
        let cdb_bytes = [0x5E, sa, 0, 0, 0, 0, 0, 0x40, 0x00, 0];
        match cdb::decode(&cdb_bytes) {
            Ok(Command::PersistentReserveIn { action, alloc_len }) => {
                assert!(sa < 4, "SA {sa:#x} decoded");
                assert_eq!(action as u8, sa);
                assert!(pr_in(&s, action, alloc_len).is_ok());
            }
            Ok(other) => panic!("{other:?}"),
            Err(e) => {
                assert!(sa >= 4, "SA {sa:#x} rejected");
                let sense = e.sense();
                assert_eq!(
                    (sense.key, sense.asc),
                    (SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB)
                );
            }
        }
    }
}

#[test]
fn read_reservation_layout() {
    let mut s = PrState::default();
    riek(&mut s, &i1(), 0x0102_0304_0506_0708);
    out(&mut s, &i1(), A::Reserve, EA_RO, 0x0102_0304_0506_0708, 0).unwrap();
    let v = pr_in(&s, PrInAction::ReadReservation, 100).unwrap();
    assert_eq!(
        v,
        vec![0, 0, 0, 1, 0, 0, 0, 16, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0x06, 0, 0]
    );
}

#[test]
fn read_full_status() {
    let mut s = PrState::default();
    riek(&mut s, &i1(), 0xA);
    riek(&mut s, &i3(), 0xB);
    out(&mut s, &i3(), A::Reserve, WE, 0xB, 0).unwrap();
    let v = pr_in(&s, PrInAction::ReadFullStatus, 100).unwrap();
    assert_eq!(&v[0..4], &2u32.to_be_bytes());
    let addl = u32::from_be_bytes(v[4..8].try_into().unwrap()) as usize;
    assert_eq!(addl, v.len() - 8);
    let mut at = 8;
    let mut seen = Vec::new();
    while at < v.len() {
        let d = &v[at..];
        let key = u64::from_be_bytes(d[0..8].try_into().unwrap());
        let holder = d[12] & 0x01 != 0;
        assert_eq!(d[12] & 0x02, 0, "ALL_TG_PT");
        let scope_type = d[13];
        let rtpi = u16::from_be_bytes([d[18], d[19]]);
        let tid_len = u32::from_be_bytes(d[20..24].try_into().unwrap()) as usize;
        let nexus = Nexus::from_transport_id(&d[24..24 + tid_len], rtpi).unwrap();
        seen.push((key, holder, scope_type, nexus));
        at += 24 + tid_len;
    }
    assert_eq!(at, v.len());
    assert_eq!(seen, vec![(0xA, false, 0, i1()), (0xB, true, WE, i3())]);
    // All registrants: every descriptor is a holder.
    out(&mut s, &i3(), A::Release, WE, 0xB, 0).unwrap();
    out(&mut s, &i3(), A::Reserve, EA_AR, 0xB, 0).unwrap();
    let v = pr_in(&s, PrInAction::ReadFullStatus, 100).unwrap();
    let first = &v[8..];
    assert_eq!((first[12], first[13]), (1, EA_AR));
}

// ---------------------------------------------------------------------------------
// SPC-2 RESERVE / RELEASE
// ---------------------------------------------------------------------------------

/// libiscsi Reserve6.Simple and Reserve6.2Initiators.
#[test]
fn libiscsi_reserve6_two_initiators() {
    let mut s = PrState::default();
    let (a, b) = (i1(), i2());
    let reserve = Command::Reserve { ten_byte: false };
    let release = Command::Release { ten_byte: false };
    assert_eq!(check_access(&s, &a, &reserve), Ok(()));
    reserve6(&mut s, &a).unwrap();
    reserve6(&mut s, &a).unwrap(); // re-reserve by the holder
    assert_eq!(check_access(&s, &b, &reserve), Err(Conflict));
    assert_eq!(reserve6(&mut s, &b), Err(Conflict));
    // RELEASE from the non-holder: GOOD, nothing released.
    assert_eq!(check_access(&s, &b, &release), Ok(()));
    release6(&mut s, &b).unwrap();
    assert_eq!(s.spc2_holder(), Some(&a));
    assert_eq!(check_access(&s, &a, &mode_sense()), Ok(()));
    assert_eq!(check_access(&s, &b, &mode_sense()), Err(Conflict));
    assert_eq!(reserve6(&mut s, &b), Err(Conflict));
    release6(&mut s, &a).unwrap();
    assert_eq!(s.spc2_holder(), None);
    reserve6(&mut s, &b).unwrap();
    release6(&mut s, &b).unwrap();
    assert_eq!(s, PrState::default());
}

/// libiscsi Reserve6.ITNexusLoss / Logout and Reserve6.LUNReset / Target*Reset.
#[test]
fn libiscsi_reserve6_nexus_loss_and_resets() {
    let mut s = PrState::default();
    reserve6(&mut s, &i1()).unwrap();
    assert_eq!(reserve6(&mut s, &i2()), Err(Conflict));
    nexus_lost(&mut s, &i2()); // someone else's loss changes nothing
    assert_eq!(reserve6(&mut s, &i2()), Err(Conflict));
    nexus_lost(&mut s, &i1());
    reserve6(&mut s, &i2()).unwrap();
    release6(&mut s, &i2()).unwrap();

    reserve6(&mut s, &i1()).unwrap();
    lun_reset(&mut s);
    reserve6(&mut s, &i2()).unwrap();
    release6(&mut s, &i2()).unwrap();
}

/// libiscsi Sanitize.Reservations: another nexus of the *same* initiator name (other
/// ISID) conflicts with a RESERVE(6) holder.
#[test]
fn libiscsi_sanitize_under_reserve6_conflicts_from_other_isid() {
    let mut s = PrState::default();
    let a = i1();
    let mut a2 = i1();
    a2.isid = [0x80, 0, 0, 0, 0, 9];
    reserve6(&mut s, &a2).unwrap();
    let sanitize = Command::Sanitize {
        immed: false,
        ause: false,
        action: cdb::SanitizeAction::BlockErase,
        param_len: 0,
    };
    assert_eq!(check_access(&s, &a, &sanitize), Err(Conflict));
    assert_eq!(check_access(&s, &a2, &sanitize), Ok(()));
}

#[test]
fn spc2_reservation_access_rules() {
    let mut s = PrState::default();
    reserve6(&mut s, &i1()).unwrap();
    let allowed = [
        Command::Inquiry {
            evpd: true,
            page: 0x83,
            alloc_len: 255,
        },
        Command::RequestSense {
            desc: false,
            alloc_len: 18,
        },
        Command::ReportLuns {
            select_report: 0,
            alloc_len: 64,
        },
        Command::ReadCapacity10,
        Command::ReadCapacity16 { alloc_len: 32 },
        Command::Release { ten_byte: true },
        Command::PreventAllowMediumRemoval { prevent: 0 },
    ];
    let conflicting = [
        Command::TestUnitReady,
        read10(),
        write10(),
        mode_sense(),
        Command::Reserve { ten_byte: true },
        Command::PreventAllowMediumRemoval { prevent: 1 },
    ];
    for c in &allowed {
        assert_eq!(check_access(&s, &i2(), c), Ok(()), "{c:?}");
    }
    for c in &conflicting {
        assert_eq!(check_access(&s, &i2(), c), Err(Conflict), "{c:?}");
        if !matches!(c, Command::Reserve { .. }) {
            assert_eq!(check_access(&s, &i1(), c), Ok(()), "holder: {c:?}");
        }
    }
    // Every PR IN / PR OUT conflicts, from any nexus, while an SPC-2 reservation exists.
    let prin = Command::PersistentReserveIn {
        action: PrInAction::ReadKeys,
        alloc_len: 8,
    };
    let prout = Command::PersistentReserveOut {
        action: PrOutAction::RegisterAndIgnoreExistingKey,
        scope: 0,
        pr_type: 0,
        param_len: 24,
    };
    for n in [i1(), i2()] {
        assert_eq!(check_access(&s, &n, &prin), Err(Conflict));
        assert_eq!(check_access(&s, &n, &prout), Err(Conflict));
        assert!(is_conflict(out(
            &mut s,
            &n,
            A::RegisterAndIgnoreExistingKey,
            0,
            0,
            1
        )));
    }
}

#[test]
fn reserve6_conflicts_with_registrations() {
    let mut s = PrState::default();
    riek(&mut s, &i1(), 1);
    for n in [i1(), i2()] {
        assert_eq!(reserve6(&mut s, &n), Err(Conflict));
        assert_eq!(release6(&mut s, &n), Err(Conflict));
        for c in [
            Command::Reserve { ten_byte: false },
            Command::Release { ten_byte: true },
        ] {
            assert_eq!(check_access(&s, &n, &c), Err(Conflict));
        }
    }
    out(&mut s, &i1(), A::Register, 0, 1, 0).unwrap();
    reserve6(&mut s, &i2()).unwrap();
}

#[test]
fn nexus_loss_and_lun_reset_keep_persistent_state() {
    let mut s = PrState::default();
    riek(&mut s, &i1(), 1);
    out(&mut s, &i1(), A::Reserve, EA, 1, 0).unwrap();
    let before = s.clone();
    nexus_lost(&mut s, &i1());
    lun_reset(&mut s);
    assert_eq!(s, before);
}

// ---------------------------------------------------------------------------------
// APTPL and the persisted image
// ---------------------------------------------------------------------------------

#[test]
fn aptpl_and_persist_flags() {
    let mut s = PrState::default();
    let e = out(&mut s, &i1(), A::RegisterAndIgnoreExistingKey, 0, 0, 1).unwrap();
    assert!(e.changed && !e.persist, "APTPL=0 state is never persisted");
    assert!(!s.aptpl());
    let e = pr_out(
        &mut s,
        &i2(),
        A::RegisterAndIgnoreExistingKey,
        0,
        0,
        &params(0, 2, 1),
        24,
    )
    .unwrap();
    assert!(e.persist && s.aptpl());
    let e = out(&mut s, &i1(), A::Reserve, WE, 1, 0).unwrap();
    assert!(e.persist, "reservation changes are persisted while APTPL=1");
    let e = out(&mut s, &i1(), A::Reserve, WE, 1, 0).unwrap();
    assert!(!e.changed && !e.persist);
    // The APTPL bit of other service actions is ignored.
    let e = pr_out(&mut s, &i1(), A::Release, 0, WE, &params(1, 0, 0), 24).unwrap();
    assert!(e.persist && s.aptpl());
    // A REGISTER with APTPL=0 turns persistence off: persist=true means "delete".
    let e = out(&mut s, &i1(), A::Register, 0, 1, 5).unwrap();
    assert!(e.persist && !s.aptpl());
    let e = out(&mut s, &i1(), A::Register, 0, 5, 6).unwrap();
    assert!(e.changed && !e.persist);
}

#[test]
fn power_on_semantics() {
    let mut s = PrState::default();
    pr_out(
        &mut s,
        &i1(),
        A::RegisterAndIgnoreExistingKey,
        0,
        0,
        &params(0, 1, 1),
        24,
    )
    .unwrap();
    out(&mut s, &i1(), A::Reserve, EA_RO, 1, 0).unwrap();
    let mut restored = PrState::decode(&s.encode()).unwrap();
    assert_eq!(restored, s);
    restored.power_on();
    assert_eq!(restored.generation(), 0);
    assert_eq!(restored.registrations(), s.registrations());
    assert_eq!(restored.reservation(), s.reservation());

    let mut volatile = PrState::default();
    riek(&mut volatile, &i1(), 1);
    volatile.power_on();
    assert_eq!(volatile, PrState::default());
    reserve6(&mut volatile, &i1()).unwrap();
    volatile.power_on();
    assert_eq!(volatile, PrState::default());
}

#[test]
fn encode_decode_round_trip() {
    let mut s = PrState::default();
    assert_eq!(PrState::decode(&s.encode()), Ok(s.clone()));
    pr_out(
        &mut s,
        &i1(),
        A::RegisterAndIgnoreExistingKey,
        0,
        0,
        &params(0, 1, 1),
        24,
    )
    .unwrap();
    riek(&mut s, &i2(), u64::MAX);
    riek(&mut s, &i3(), 3);
    for ty in ALL_TYPES {
        out(&mut s, &i2(), A::Reserve, ty, u64::MAX, 0).unwrap();
        assert_eq!(PrState::decode(&s.encode()), Ok(s.clone()), "type {ty}");
        out(&mut s, &i2(), A::Release, ty, u64::MAX, 0).unwrap();
    }
    // The SPC-2 reservation is not part of the image.
    let mut t = PrState::default();
    reserve6(&mut t, &i1()).unwrap();
    assert_eq!(PrState::decode(&t.encode()), Ok(PrState::default()));
}

#[test]
fn decode_rejects_damage() {
    let mut s = PrState::default();
    riek(&mut s, &i1(), 1);
    out(&mut s, &i1(), A::Reserve, WE, 1, 0).unwrap();
    let good = s.encode();
    assert_eq!(PrState::decode(&[]), Err(PrDecodeError::Truncated));
    assert!(PrState::decode(&good[..good.len() - 1]).is_err());
    let mut bad = good.clone();
    bad[0] = b'X';
    assert_eq!(PrState::decode(&bad), Err(PrDecodeError::BadMagic));
    let mut bad = good.clone();
    bad[4] = 2;
    assert_eq!(
        PrState::decode(&bad),
        Err(PrDecodeError::UnsupportedVersion(2))
    );
    let mut bad = good.clone();
    bad[12] ^= 1;
    assert_eq!(PrState::decode(&bad), Err(PrDecodeError::Checksum));

    // Structurally wrong but correctly checksummed images.
    let reseal = |mut body: Vec<u8>| {
        let crc = crc32c::crc32c(&body);
        body.extend_from_slice(&crc.to_be_bytes());
        body
    };
    let body = good[..good.len() - 4].to_vec();
    // Holder index out of range.
    let mut b = body.clone();
    let n = b.len();
    b[n - 2..].copy_from_slice(&5u16.to_be_bytes());
    assert_eq!(PrState::decode(&reseal(b)), Err(PrDecodeError::BadHolder));
    // Non-AR type without a holder.
    let mut b = body.clone();
    b[n - 2..].copy_from_slice(&0xFFFFu16.to_be_bytes());
    assert_eq!(PrState::decode(&reseal(b)), Err(PrDecodeError::BadHolder));
    // Bad type code.
    let mut b = body.clone();
    b[n - 3] = 2;
    assert_eq!(PrState::decode(&reseal(b)), Err(PrDecodeError::BadType(2)));
    // Zero key.
    let mut b = body.clone();
    b[12..20].copy_from_slice(&0u64.to_be_bytes());
    assert_eq!(PrState::decode(&reseal(b)), Err(PrDecodeError::ZeroKey));
    // Trailing bytes.
    let mut b = body.clone();
    b.push(0);
    assert_eq!(
        PrState::decode(&reseal(b)),
        Err(PrDecodeError::TrailingBytes)
    );
    // Reserved flag bits.
    let mut b = body;
    b[5] |= 0x80;
    assert!(matches!(
        PrState::decode(&reseal(b)),
        Err(PrDecodeError::BadFlags(_))
    ));
}

// ---------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------

/// Invariants every reachable state satisfies (the ones decode enforces).
fn assert_invariants(s: &PrState) {
    assert!(s.registrations.len() <= MAX_REGISTRATIONS);
    for (i, r) in s.registrations.iter().enumerate() {
        assert_ne!(r.key, 0);
        assert!(s.registrations[..i].iter().all(|x| x.nexus != r.nexus));
    }
    if let Some(res) = &s.reservation {
        assert!(!s.registrations.is_empty());
        match &res.holder {
            None => assert!(res.pr_type.all_registrants()),
            Some(h) => {
                assert!(!res.pr_type.all_registrants());
                assert!(s.key_of(h).is_some(), "holder registered");
            }
        }
    }
    assert!(s.spc2.is_none() || s.registrations.is_empty());
}

proptest::proptest! {
    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
        let _ = PrState::decode(&bytes);
        // Also with a valid header and checksum, so the structural checks get exercised.
        let mut body = b"TSPR\x01".to_vec();
        body.extend_from_slice(&bytes);
        let crc = crc32c::crc32c(&body);
        body.extend_from_slice(&crc.to_be_bytes());
        if let Ok(s) = PrState::decode(&body) {
            assert_invariants(&s);
            proptest::prop_assert_eq!(PrState::decode(&s.encode()), Ok(s));
        }
    }

    #[test]
    fn random_operation_sequences_keep_invariants_and_round_trip(
        ops in proptest::collection::vec(
            (0usize..4, 0u8..10, 0u8..9, 0u64..4, 0u64..4, 0u8..2),
            0..60,
        )
    ) {
        let nexuses = [i1(), i2(), i3(), nx("iqn.x:4", 3)];
        let mut s = PrState::default();
        for (who, op, ty, key, sark, aptpl) in ops {
            let n = &nexuses[who];
            let before = s.clone();
            let result = match op {
                0..=7 => {
                    let action = [
                        A::Register,
                        A::Reserve,
                        A::Release,
                        A::Clear,
                        A::Preempt,
                        A::PreemptAndAbort,
                        A::RegisterAndIgnoreExistingKey,
                        A::RegisterAndMove,
                    ][usize::from(op)];
                    let r = if action == A::RegisterAndMove {
                        let dest = &nexuses[(who + 1) % 4];
                        let p = move_params(key, sark, aptpl | (ty & 0x02), dest.target_port, &dest.transport_id());
                        let len = p.len() as u32;
                        pr_out(&mut s, n, action, 0, ty, &p, len)
                    } else {
                        pr_out(&mut s, n, action, 0, ty, &params(key, sark, aptpl), 24)
                    };
                    if let Ok(e) = &r {
                        proptest::prop_assert_eq!(e.changed, s != before);
                        proptest::prop_assert_eq!(e.persist, e.changed && (s.aptpl || before.aptpl));
                    }
                    r.is_ok()
                }
                8 => reserve6(&mut s, n).is_ok(),
                _ => release6(&mut s, n).is_ok(),
            };
            if !result {
                proptest::prop_assert_eq!(&s, &before, "failed commands change nothing");
            }
            assert_invariants(&s);
            let mut image = s.clone();
            image.spc2 = None;
            proptest::prop_assert_eq!(PrState::decode(&s.encode()), Ok(image));
            for a in [PrInAction::ReadKeys, PrInAction::ReadReservation, PrInAction::ReadFullStatus] {
                let v = pr_in(&s, a, 0).unwrap();
                let addl = u32::from_be_bytes(v[4..8].try_into().unwrap()) as usize;
                proptest::prop_assert_eq!(addl, v.len() - 8);
            }
        }
    }
}
