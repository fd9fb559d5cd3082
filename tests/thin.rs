//! Thin provisioning end to end: space comes back on UNMAP, and a full file system under a
//! thin LUN refuses writes cleanly without losing acknowledged data.

mod common;

use benches::conn::Conn;
use common::{
    allocated_bytes, assert_space_allocation_failed, bench, read_back, scratch, text,
    verified_fill, Daemon, Tmpfs, TARGET,
};

fn session(d: &Daemon) -> Conn {
    common::session_at(&d.addr, TARGET, "iqn.2026-11.io.twinsan:test-initiator", 1)
}

fn unmap_cdb(param_len: u16) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x42;
    cdb[7..9].copy_from_slice(&param_len.to_be_bytes());
    cdb
}

fn unmap_params(lba: u64, blocks: u32) -> [u8; 24] {
    let mut p = [0u8; 24];
    p[0..2].copy_from_slice(&22u16.to_be_bytes());
    p[2..4].copy_from_slice(&16u16.to_be_bytes());
    p[8..16].copy_from_slice(&lba.to_be_bytes());
    p[16..20].copy_from_slice(&blocks.to_be_bytes());
    p
}

#[test]
fn unmap_gives_the_space_back() {
    let d = Daemon::simple("thin-unmap", "1GiB", "");
    let lun = d.dir.join("lun0.img");
    let o = bench(
        &d.url(0),
        &["--rw", "write", "--bs", "128k", "--size", "64m", "--once"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let before = allocated_bytes(&lun);
    assert!(before >= 64 << 20, "writes did not allocate: {before}");
    let mut c = session(&d);
    // 64 MiB at LBA 0 = 131072 blocks of 512 bytes.
    let r = c
        .command_sync_data(&unmap_cdb(24), 0, &unmap_params(0, 131072))
        .expect("UNMAP");
    assert_eq!(r.status, 0, "UNMAP failed: {}", r.sense);
    let after = allocated_bytes(&lun);
    assert!(
        after + (60 << 20) <= before,
        "allocated bytes went from {before} to {after}: space not returned"
    );
    // GET LBA STATUS agrees: LBA 0 is deallocated (provisioning status 1).
    let mut cdb = [0u8; 16];
    cdb[0] = 0x9e;
    cdb[1] = 0x12;
    cdb[13] = 24;
    let r = c.command_sync(&cdb, 24).expect("GET LBA STATUS");
    assert_eq!(r.status, 0, "{}", r.sense);
    assert_eq!(
        r.data[20] & 0x0f,
        1,
        "LBA 0 not reported deallocated: {:02x?}",
        &r.data[..24]
    );
    let _ = c.logout();
}

#[test]
fn full_file_system_answers_space_allocation_failed_and_keeps_acked_data() {
    let dir = scratch("thin-full");
    let mnt = dir.join("pool");
    let _guard = Tmpfs::mount(&mnt, "24m");
    // A 128 MiB thin LUN on a 24 MiB file system.
    std::fs::write(
        dir.join("twinsan.toml"),
        format!("[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\npath = \"{}/lun0.img\"\nsize = \"128MiB\"\n", mnt.display()),
    )
    .unwrap();
    let mut d = Daemon::start_in(dir.clone());
    let state = dir.join("acks");
    let o = verified_fill(&d.url(0), "128m", &state);
    assert_space_allocation_failed(&o);
    assert!(d.is_running(), "daemon died on a full file system");
    // Everything acknowledged before the pool filled reads back intact.
    let o = read_back(&d.url(0), "64k", "128m", &state);
    assert!(
        o.status.success(),
        "acknowledged data lost or unreadable:\n{}",
        text(&o)
    );
    let o = common::tool("iscsi-inq", &[&d.url(0)]);
    assert!(o.status.success(), "daemon stopped serving: {}", text(&o));
}
