use super::*;
use crate::scsi::sense::{Asc, SenseKey};

fn cdb16(prefix: &[u8]) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..prefix.len()].copy_from_slice(prefix);
    b
}

#[test]
fn cdb_len_by_group() {
    assert_eq!(cdb_len(0x00), Some(6));
    assert_eq!(cdb_len(0x28), Some(10));
    assert_eq!(cdb_len(0x5A), Some(10));
    assert_eq!(cdb_len(0x7F), None);
    assert_eq!(cdb_len(0x88), Some(16));
    assert_eq!(cdb_len(0xA0), Some(12));
    assert_eq!(cdb_len(0xC0), None);
    assert_eq!(cdb_len(0xFF), None);
}

#[test]
fn read10_golden() {
    // RDPROTECT=1, DPO, FUA, LBA 0x01020304, group 5, 0x0010 blocks.
    let cmd = decode(&[0x28, 0x38, 1, 2, 3, 4, 5, 0x00, 0x10, 0x00]).unwrap();
    assert_eq!(
        cmd,
        Command::Read {
            size: CdbSize::Ten,
            rw: Rw {
                lba: 0x0102_0304,
                blocks: 16,
                protect: 1,
                dpo: true,
                fua: true,
                group: 5
            }
        }
    );
    assert_eq!(cmd.opcode(), 0x28);
}

#[test]
fn read6_zero_len_is_256_and_lba_21_bits() {
    let cmd = decode(&[0x08, 0xFF, 0xFF, 0xFF, 0x00, 0x00]).unwrap();
    let Command::Read { size, rw } = cmd else {
        panic!("{cmd:?}")
    };
    assert_eq!(size, CdbSize::Six);
    assert_eq!(rw.lba, 0x1F_FFFF);
    assert_eq!(rw.blocks, 256);
}

#[test]
fn write16_and_12() {
    let mut b = cdb16(&[0x8A, 0xE0]);
    b[2..10].copy_from_slice(&0x1122_3344_5566_7788_u64.to_be_bytes());
    b[10..14].copy_from_slice(&7u32.to_be_bytes());
    b[14] = 0x3F;
    let Command::Write { size, rw } = decode(&b).unwrap() else {
        panic!()
    };
    assert_eq!(size, CdbSize::Sixteen);
    assert_eq!(rw.lba, 0x1122_3344_5566_7788);
    assert_eq!(rw.blocks, 7);
    assert_eq!(rw.protect, 7);
    assert_eq!(rw.group, 0x1F);

    let w12 = [0xAA, 0x08, 0, 0, 0, 9, 0, 1, 0, 0, 0, 0];
    let Command::Write { size, rw } = decode(&w12).unwrap() else {
        panic!()
    };
    assert_eq!(size, CdbSize::Twelve);
    assert_eq!((rw.lba, rw.blocks, rw.fua), (9, 0x1_0000, true));
}

#[test]
fn verify_bytchk_and_no_fua() {
    let cmd = decode(&[0x2F, 0x1E, 0, 0, 0, 1, 0, 0, 2, 0]).unwrap();
    let Command::Verify { size, rw, bytchk } = cmd else {
        panic!()
    };
    assert_eq!(size, CdbSize::Ten);
    assert_eq!(bytchk, 3);
    assert!(rw.dpo);
    assert!(!rw.fua);
    assert_eq!(cmd.opcode(), 0x2F);
}

#[test]
fn write_same16_flags() {
    let mut b = cdb16(&[0x93, 0x19]);
    b[13] = 4;
    let Command::WriteSame {
        size,
        rw,
        anchor,
        unmap,
        ndob,
    } = decode(&b).unwrap()
    else {
        panic!()
    };
    assert_eq!(size, CdbSize::Sixteen);
    assert_eq!(rw.blocks, 4);
    assert!(anchor && unmap && ndob);
}

#[test]
fn compare_and_write_one_byte_len() {
    let mut b = cdb16(&[0x89, 0x08]);
    b[9] = 3;
    b[13] = 2;
    let Command::CompareAndWrite(rw) = decode(&b).unwrap() else {
        panic!()
    };
    assert_eq!((rw.lba, rw.blocks, rw.fua), (3, 2, true));
}

#[test]
fn write_atomic_layout() {
    let mut b = cdb16(&[0x9C]);
    b[11] = 1;
    b[13] = 8;
    let Command::WriteAtomic {
        rw,
        atomic_boundary,
    } = decode(&b).unwrap()
    else {
        panic!()
    };
    assert_eq!((rw.blocks, atomic_boundary), (8, 1));
}

#[test]
fn inquiry_evpd_zero_with_page_is_invalid() {
    let err = decode(&[0x12, 0x00, 0x01, 0x01, 0x00, 0x00]).unwrap_err();
    assert_eq!(err, CdbError::InvalidField { byte: 2, bit: None });
    let s = err.sense();
    assert_eq!(
        (s.key, s.asc),
        (SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB)
    );
    assert_eq!(
        decode(&[0x12, 0x01, 0x83, 0x01, 0x00, 0x00]).unwrap(),
        Command::Inquiry {
            evpd: true,
            page: 0x83,
            alloc_len: 256
        }
    );
}

#[test]
fn mode_sense10_fields() {
    let cmd = decode(&[0x5A, 0x18, 0x7F, 0xFF, 0, 0, 0, 0x10, 0x00, 0]).unwrap();
    assert_eq!(
        cmd,
        Command::ModeSense(ModeSenseCdb {
            ten_byte: true,
            dbd: true,
            llbaa: true,
            pc: 1,
            page: 0x3F,
            subpage: 0xFF,
            alloc_len: 0x1000
        })
    );
    assert_eq!(cmd.opcode(), 0x5A);
}

#[test]
fn service_action_in_and_maintenance_in() {
    let mut b = cdb16(&[0x9E, 0x10]);
    b[13] = 32;
    assert_eq!(
        decode(&b).unwrap(),
        Command::ReadCapacity16 { alloc_len: 32 }
    );
    let b = cdb16(&[0x9E, 0x11]);
    let err = decode(&b).unwrap_err();
    assert!(matches!(err, CdbError::UnsupportedServiceAction { .. }));
    assert_eq!(err.sense().asc, Asc::INVALID_FIELD_IN_CDB);

    let rsoc = [0xA3, 0x0C, 0x82, 0x9E, 0x00, 0x10, 0, 0, 0xFF, 0xFF, 0, 0];
    let cmd = decode(&rsoc).unwrap();
    assert_eq!(
        cmd,
        Command::ReportSupportedOpcodes {
            rctd: true,
            reporting_options: 2,
            requested_opcode: 0x9E,
            requested_service_action: 0x10,
            alloc_len: 0xFFFF
        }
    );
    assert_eq!(cmd.opcode(), 0xA3);
    assert_eq!(cmd.service_action(), Some(0x0C));
}

#[test]
fn persistent_reserve_out_fields() {
    let b = [0x5F, 0x01, 0x03, 0, 0, 0, 0, 0, 24, 0];
    assert_eq!(
        decode(&b).unwrap(),
        Command::PersistentReserveOut {
            action: PrOutAction::Reserve,
            scope: 0,
            pr_type: 3,
            param_len: 24
        }
    );
    assert!(decode(&[0x5E, 0x04, 0, 0, 0, 0, 0, 0, 8, 0]).is_err());
}

#[test]
fn start_stop_fields() {
    assert_eq!(
        decode(&[0x1B, 0x01, 0, 0x02, 0x37, 0]).unwrap(),
        Command::StartStopUnit(StartStop {
            immed: true,
            power_condition_modifier: 2,
            power_condition: 3,
            no_flush: true,
            loej: true,
            start: true
        })
    );
}

#[test]
fn unknown_opcode_and_naca() {
    let err = decode(&[0x02, 0, 0, 0, 0, 0]).unwrap_err();
    assert_eq!(err, CdbError::UnsupportedOpcode(0x02));
    assert_eq!(err.sense().asc, Asc::INVALID_COMMAND_OPERATION_CODE);
    let err = decode(&[0x00, 0, 0, 0, 0, 0x04]).unwrap_err();
    assert_eq!(
        err,
        CdbError::InvalidField {
            byte: 5,
            bit: Some(2)
        }
    );
    assert!(decode(&[0xC5; 16]).is_err());
}

#[test]
fn truncated() {
    assert_eq!(decode(&[]), Err(CdbError::Empty));
    assert_eq!(
        decode(&[0x28, 0, 0]),
        Err(CdbError::Truncated {
            opcode: 0x28,
            expected_len_bytes: 10,
            actual_len_bytes: 3
        })
    );
}

#[test]
fn read_capacity10_pmi_rule() {
    assert_eq!(
        decode(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap(),
        Command::ReadCapacity10
    );
    assert!(decode(&[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0]).is_err());
    assert!(decode(&[0x25, 0, 0, 0, 0, 1, 0, 0, 1, 0]).is_ok());
}

#[test]
fn opcode_roundtrips_for_every_decodable_opcode() {
    for opcode in 0..=0xFF_u8 {
        let mut b = [0u8; 16];
        b[0] = opcode;
        // Pick a valid service action for opcodes that need one.
        b[1] = match opcode {
            0x9E => 0x10,
            0xA3 => 0x0C,
            0x48 => 0x01,
            _ => 0,
        };
        if let Ok(cmd) = decode(&b) {
            assert_eq!(cmd.opcode(), opcode, "{cmd:?}");
        }
    }
}

proptest::proptest! {
    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)) {
        if let Err(e) = decode(&bytes) {
            let _ = e.sense();
        }
    }
}
