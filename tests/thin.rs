//! Thin provisioning end to end: space comes back on UNMAP, and a full file system under a
//! thin LUN refuses writes cleanly without losing acknowledged data.

mod common;

use benches::conn::Conn;
use common::{
    allocated_bytes, assert_space_allocation_failed, bench, scratch, text, verified_fill, Daemon,
    Tmpfs, TARGET,
};

fn session(d: &Daemon) -> Conn {
    common::session_at(&d.addr, TARGET, "iqn.2026-11.io.twinsan:test-initiator", 1)
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
        .command_sync_data(
            &benches::conn::unmap10(24),
            0,
            &benches::conn::unmap_param_list(0, 131072),
        )
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
    // Everything acknowledged before the pool filled reads back intact. The pool crossed
    // its soft threshold: the once-a-second space check may report it (UNIT ATTENTION
    // 38/07) to the read-back's session in its middle, and an initiator sends such a
    // command again, as `--reconnect` does (the first CI run with the metrics failed here).
    let o = bench(
        &d.url(0),
        &[
            "--rw",
            "read",
            "--bs",
            "64k",
            "--size",
            "128m",
            "--verify-state",
            state.to_str().expect("UTF-8 scratch path"),
            "--reconnect",
        ],
    );
    assert!(
        o.status.success(),
        "acknowledged data lost or unreadable:\n{}",
        text(&o)
    );
    let o = common::tool("iscsi-inq", &[&d.url(0)]);
    assert!(o.status.success(), "daemon stopped serving: {}", text(&o));
}

/// Mixed writes, UNMAPs of their own blocks and reads over a small LUN, from four sessions
/// spread over the cores, every read checked against the last acknowledged command of its
/// blocks (zeros after an UNMAP: LBPRZ=1). Reads of chunks the allocation map holds for
/// holes are answered without the file (disk/alloc_map.rs); I/O sizes from 512 bytes to
/// 64 KiB over 4 KiB chunks make UNMAPs that cover chunks in part: a map that cleared
/// those, or that missed a write before its GOOD, returns zeros for acknowledged data here.
#[test]
fn mixed_writes_unmaps_and_reads_never_take_data_for_a_hole() {
    let d = Daemon::simple("thin-map", "32MiB", "");
    let args = [
        "--sessions",
        "4",
        "--iodepth",
        "8",
        "--rw",
        "randrw",
        "--rwmix-read",
        "50",
        "--bs",
        "512-64k",
        "--unmap-pct",
        "25",
        "--verify",
        "--runtime",
        "8",
        "--json",
        "--quiet",
    ];
    let o = bench(&d.url(0), &args);
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("bench JSON");
    assert_eq!(r["verify_mismatches"], 0, "{}", text(&o));
    assert_eq!(r["errors"], 0, "{}", text(&o));
    let (unmaps, verified) = (r["unmaps"].as_u64(), r["verified_ios"].as_u64());
    assert!(unmaps.unwrap_or(0) > 1000, "too few UNMAPs: {unmaps:?}");
    assert!(
        verified.unwrap_or(0) > 10_000,
        "too few checked reads: {verified:?}"
    );
}

/// A read of a LUN nobody wrote leaves the page cache alone: not one page of the backing
/// file is cached after a full read (the kernel would otherwise allocate and zero a page
/// for every hole read, and keep it).
#[test]
fn reading_a_never_written_lun_caches_nothing() {
    let d = Daemon::simple("thin-read", "64MiB", "");
    let lun = d.dir.join("lun0.img");
    let o = bench(
        &d.url(0),
        &["--rw", "read", "--bs", "256k", "--iodepth", "4", "--once"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(resident_pages(&lun), 0, "pages of a hole were cached");
    // The same read after a write: the data is cached (the check can see caching).
    let o = bench(
        &d.url(0),
        &["--rw", "write", "--bs", "256k", "--size", "1m", "--once"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        resident_pages(&lun) > 0,
        "written data is not in the page cache?"
    );
}

/// Pages of `path` in the page cache (mincore over a read-only mapping).
fn resident_pages(path: &std::path::Path) -> usize {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).expect("open the backing file");
    let len = f.metadata().expect("stat").len() as usize;
    let page = 4096;
    // SAFETY: a shared read-only mapping of a file we hold open, never dereferenced: only
    // mincore looks at it, and it is unmapped before returning.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED, "mmap");
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: addr..addr+len is the mapping made above; vec has one byte per page.
    let r = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(addr, len) };
    assert_eq!(r, 0, "mincore");
    vec.iter().filter(|&&b| b & 1 != 0).count()
}
