//! In-process tests of the connection and SCSI layers, in the spirit of quinn's `Pair`: the
//! daemon's own `Conn` is fed initiator PDUs as bytes, its disk I/O runs against a LUN file
//! in a temporary directory, its mirrored operations are acknowledged as a peer would, and
//! both complete in an order the test chooses (seeded); the PDUs that come out are checked.
//! No socket, no reactor, no peer process: what is tested is the rule every initiator
//! depends on, "GOOD only when the local write and the peer's ack are both in".

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use engine::config::{Config, Overrides};
use engine::disk::bufpool::BufPool;
use engine::iscsi::conn::{encode_lun, Conn, IoReq, Out};
use engine::net::sendq::SendQueue;
use engine::registry::Registry;
use engine::replication::RepReq;
use engine::scsi::IoOp;
use proto::login::text::{encode_text, parse_text, TextPair};
use proto::pdu::{initiator, parse_target, LoginStage, TargetView, BHS_LEN};

const BLOCK: u64 = 512;
const LUN_BYTES: u64 = 4 << 20;

/// A parsed target PDU.
struct Pdu {
    v: TargetView,
    data: Vec<u8>,
}

struct Harness {
    _dir: tempdir::Dir,
    reg: Registry,
    pool: BufPool,
    conn: Conn,
    sendq: SendQueue,
    file: std::fs::File,
    /// Disk I/O the connection issued, not completed yet.
    io: Vec<IoReq>,
    /// Mirrored operations sent "to the peer", not acknowledged yet.
    rep: Vec<RepReq>,
    wire: Vec<u8>,
    rng: u64,
    cmd_sn: u32,
    exp_stat_sn: u32,
    itt: u32,
}

/// A temporary directory removed on drop (std only).
mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir().join(format!(
                "twinsan-conn-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("temp dir");
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

const TARGET: &str = "iqn.2026-11.io.twinsan:inproc";

impl Harness {
    /// A connection to a target with one 4 MiB LUN; `replicated`: the node has a peer (so
    /// every change is mirrored and waits for its ack).
    fn new(tag: &str, seed: u64, replicated: bool) -> Harness {
        let dir = tempdir::Dir::new(tag);
        let peer = if replicated {
            "[peer]\nname = \"b\"\naddress = \"127.0.0.1:1\"\nlisten = \"127.0.0.1:2\"\npsk = \"in-process-test-psk\"\n"
        } else {
            ""
        };
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:3260\"\ndata_dir = \"{}\"\n{peer}\n[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"4MiB\"\n",
            dir.0.display()
        );
        let config = Config::parse_str(&text, "inproc.toml", None, &Overrides::default())
            .expect("valid config");
        let portal: SocketAddr = "127.0.0.1:3260".parse().expect("addr");
        let reg = Registry::build(config, portal, Default::default()).expect("registry");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.0.join("lun0.img"))
            .expect("lun file");
        let conn = Conn::new(
            &reg,
            "127.0.0.1:50000".parse().expect("addr"),
            Some(portal),
            0,
        );
        let mut h = Harness {
            _dir: dir,
            reg,
            pool: BufPool::new(),
            conn,
            sendq: SendQueue::default(),
            file,
            io: Vec::new(),
            rep: Vec::new(),
            wire: Vec::new(),
            rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 1,
        };
        h.login();
        h
    }

    fn rand(&mut self, n: usize) -> usize {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % n as u64) as usize
    }

    fn take(&mut self, out: Out) {
        assert!(!out.close_now, "the connection closed");
        self.sendq.push(out.send, out.send_refs, out.send_holds);
        self.io.extend(out.io);
        self.rep.extend(out.rep);
        let pool = &mut self.pool;
        let bytes = self.sendq.drain_to_vec(&mut |b| pool.put(b));
        self.wire.extend_from_slice(&bytes);
    }

    fn send(&mut self, bhs: &[u8; BHS_LEN], data: &[u8]) {
        let mut bytes = bhs.to_vec();
        bytes.extend_from_slice(data);
        bytes.resize(bytes.len().div_ceil(4) * 4, 0);
        let mut out = Out::default();
        let r = self
            .conn
            .on_recv(&bytes, &self.reg, &mut self.pool, 0, &mut out);
        assert_eq!(r.used_bytes, bytes.len(), "the whole PDU is taken");
        self.take(out);
    }

    /// The next whole PDU the target sent, if any.
    fn recv(&mut self) -> Option<Pdu> {
        if self.wire.len() < BHS_LEN {
            return None;
        }
        let bhs: [u8; BHS_LEN] = self.wire[..BHS_LEN].try_into().expect("bhs");
        let ahs = bhs[4] as usize * 4;
        let dsl = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
        let total = BHS_LEN + ahs + dsl.div_ceil(4) * 4;
        if self.wire.len() < total {
            return None;
        }
        let data = self.wire[BHS_LEN + ahs..BHS_LEN + ahs + dsl].to_vec();
        self.wire.drain(..total);
        let v = parse_target(&bhs);
        self.exp_stat_sn = self.exp_stat_sn.max(v.stat_sn.wrapping_add(1));
        Some(Pdu { v, data })
    }

    fn login(&mut self) {
        let isid = [0x80, 0, 0, 0, 0, 1];
        let stages = [
            (
                LoginStage::Security,
                LoginStage::Operational,
                vec![
                    TextPair::new("InitiatorName", "iqn.2026-12.test:inproc"),
                    TextPair::new("TargetName", TARGET),
                    TextPair::new("SessionType", "Normal"),
                    TextPair::new("AuthMethod", "None"),
                ],
            ),
            (
                LoginStage::Operational,
                LoginStage::FullFeature,
                benches::conn::offered_keys(false, true),
            ),
        ];
        for (csg, nsg, keys) in stages {
            let text = encode_text(&keys);
            let bhs = initiator::login(
                true,
                csg,
                nsg,
                isid,
                0,
                0,
                self.cmd_sn,
                self.exp_stat_sn,
                text.len() as u32,
            );
            self.send(&bhs, &text);
            let p = self.recv().expect("a login response");
            assert_eq!(p.v.opcode, 0x23, "login response");
            assert_eq!(
                (p.v.status_class, p.v.status_detail),
                (0, 0),
                "login accepted"
            );
            parse_text(&p.data).expect("login text");
        }
    }

    /// Sends a SCSI command (with `data` as immediate data); returns its ITT.
    fn command(&mut self, cdb: &[u8], read_len: u32, data: &[u8]) -> u32 {
        let itt = self.itt;
        self.itt += 1;
        let write = !data.is_empty();
        let edtl = if write { data.len() as u32 } else { read_len };
        let bhs = initiator::scsi_command(
            encode_lun(0),
            itt,
            self.cmd_sn,
            self.exp_stat_sn,
            read_len > 0,
            write,
            edtl,
            cdb,
            data.len() as u32,
        );
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(&bhs, data);
        itt
    }

    /// Completes one outstanding disk I/O (`pick` chooses which) against the LUN file.
    fn complete_io(&mut self, pick: usize) {
        let req = self.io.swap_remove(pick);
        let res = self.run_io(&req);
        let mut out = Out::default();
        self.conn
            .on_io_done(req.task, res, &self.reg, &mut self.pool, &mut out);
        self.take(out);
    }

    fn run_io(&mut self, req: &IoReq) -> i32 {
        let buf = |h: &mut Harness, off: u32, len: u32| -> &'static mut [u8] {
            let (ptr, cap) = h
                .conn
                .task_buf_ptr(req.task)
                .expect("the task holds a buffer");
            assert!(
                off as usize + len as usize <= cap,
                "I/O inside the task's buffer"
            );
            // SAFETY: the connection lends the task's buffer for this I/O until on_io_done
            // (the reactor's contract), and nothing else touches it meanwhile here.
            unsafe { std::slice::from_raw_parts_mut(ptr.add(off as usize), len as usize) }
        };
        let done = |r: std::io::Result<usize>| match r {
            Ok(n) => n as i32,
            Err(e) => -e.raw_os_error().unwrap_or(5),
        };
        match req.op {
            IoOp::Read {
                offset,
                buf_off,
                len,
            } => {
                let b = buf(self, buf_off, len);
                done(self.file.read_at(b, offset))
            }
            IoOp::Write {
                offset,
                buf_off,
                len,
                fua,
            } => {
                let b = buf(self, buf_off, len);
                let r = done(self.file.write_at(b, offset));
                if fua {
                    self.file.sync_data().expect("fsync");
                }
                r
            }
            IoOp::Flush => done(self.file.sync_data().map(|()| 0)),
            IoOp::Fallocate { offset, len, mode } => {
                // SAFETY: fallocate on the LUN file's open fd; no memory is passed.
                let r = unsafe {
                    libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64)
                };
                if r == 0 {
                    0
                } else {
                    -std::io::Error::last_os_error().raw_os_error().unwrap_or(5)
                }
            }
        }
    }

    /// The peer acknowledges one mirrored operation (`ok`: it stored it).
    fn ack_rep(&mut self, pick: usize, ok: bool) {
        let req = self.rep.swap_remove(pick);
        let mut out = Out::default();
        self.conn
            .on_rep_done(req.token as u32, ok, &self.reg, &mut self.pool, &mut out);
        self.take(out);
    }

    /// Completes outstanding I/O and acks, one at a time in a seeded order, until nothing
    /// is outstanding; `before_each` sees the state before every step.
    fn settle(&mut self, mut before_each: impl FnMut(&mut Harness)) {
        while !self.io.is_empty() || !self.rep.is_empty() {
            before_each(self);
            let n = self.io.len() + self.rep.len();
            let pick = self.rand(n);
            if pick < self.io.len() {
                self.complete_io(pick);
            } else {
                self.ack_rep(pick - self.io.len(), true);
            }
        }
    }

    /// Every SCSI Response (and Data-In with status) received so far: (ITT, status,
    /// sense, data read).
    fn responses(&mut self) -> Vec<(u32, u8, Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        let mut read: std::collections::HashMap<u32, Vec<u8>> = Default::default();
        while let Some(p) = self.recv() {
            match p.v.opcode {
                0x25 => {
                    let d = read.entry(p.v.itt).or_default();
                    let at = p.v.buffer_offset as usize;
                    if d.len() < at + p.data.len() {
                        d.resize(at + p.data.len(), 0);
                    }
                    d[at..at + p.data.len()].copy_from_slice(&p.data);
                    if p.v.flags & 0x01 != 0 {
                        out.push((
                            p.v.itt,
                            p.v.status,
                            Vec::new(),
                            read.remove(&p.v.itt).unwrap_or_default(),
                        ));
                    }
                }
                0x21 => {
                    let sense = if p.data.len() >= 2 {
                        p.data[2..].to_vec()
                    } else {
                        Vec::new()
                    };
                    out.push((
                        p.v.itt,
                        p.v.status,
                        sense,
                        read.remove(&p.v.itt).unwrap_or_default(),
                    ));
                }
                _ => {}
            }
        }
        out
    }
}

fn write16(lba: u64, blocks: u32, fua: bool) -> [u8; 16] {
    let mut c = benches::conn::rw16(true, lba, blocks);
    if fua {
        c[1] |= 0x08;
    }
    c
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed) as u8)
        .collect()
}

#[test]
fn a_replicated_write_is_good_only_after_both_its_local_write_and_the_peers_ack() {
    for seed in 0..64 {
        let mut h = Harness::new("good-after-both", seed, true);
        let data = pattern(seed as u32, 8 * BLOCK as usize);
        let itt = h.command(&write16(16, 8, seed % 3 == 0), 0, &data);
        assert!(
            !h.rep.is_empty(),
            "seed {seed}: a replicated write is mirrored"
        );
        // Before every completion step: no status while either side is outstanding.
        h.settle(|h| {
            let early = h.responses();
            assert!(
                early.is_empty(),
                "seed {seed}: a status before both were in: {early:?}"
            );
        });
        let done = h.responses();
        assert_eq!(done.len(), 1, "seed {seed}");
        assert_eq!((done[0].0, done[0].1), (itt, 0), "seed {seed}: GOOD");
        let mut on_disk = vec![0u8; data.len()];
        h.file
            .read_exact_at(&mut on_disk, 16 * BLOCK)
            .expect("read back");
        assert_eq!(on_disk, data, "seed {seed}");
    }
}

#[test]
fn a_write_the_peer_could_not_store_is_not_reported_good() {
    let mut h = Harness::new("peer-failed", 7, true);
    let itt = h.command(&write16(0, 1, false), 0, &pattern(1, BLOCK as usize));
    while !h.io.is_empty() {
        h.complete_io(0);
    }
    h.ack_rep(0, false);
    let r = h.responses();
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].0, r[0].1), (itt, 0x02), "CHECK CONDITION, never GOOD");
    // Fixed sense: key MEDIUM ERROR (3), WRITE ERROR (0C/00).
    assert_eq!(r[0].2[2] & 0x0f, 0x03, "{:02x?}", r[0].2);
    assert_eq!(r[0].2[12], 0x0c, "{:02x?}", r[0].2);
}

#[test]
fn a_write_failed_by_a_demotion_is_answered_standby_for_the_initiator_to_retry_elsewhere() {
    let mut h = Harness::new("demoted", 5, true);
    let itt = h.command(&write16(0, 1, false), 0, &pattern(2, BLOCK as usize));
    while !h.io.is_empty() {
        h.complete_io(0);
    }
    // Demoted while the write waited for the peer: the pair fails it (Mirror::demoted).
    h.reg.set_role(engine::config::Role::Secondary);
    h.ack_rep(0, false);
    let r = h.responses();
    assert_eq!((r[0].0, r[0].1), (itt, 0x02), "CHECK CONDITION, never GOOD");
    // Fixed sense: NOT READY (2), LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN STANDBY
    // STATE (04/0B).
    assert_eq!(r[0].2[2] & 0x0f, 0x02, "{:02x?}", r[0].2);
    assert_eq!((r[0].2[12], r[0].2[13]), (0x04, 0x0b), "{:02x?}", r[0].2);
}

/// Data-Out PDUs of at most this much data (below any MaxRecvDataSegmentLength the target
/// declares).
const DATA_OUT_SEG: usize = 16 << 10;

#[test]
fn a_write_past_its_immediate_data_is_solicited_by_r2t_and_good_only_after_both() {
    for seed in 0..8u64 {
        let mut h = Harness::new("r2t", seed, true);
        let total = 96 << 10;
        let data = pattern(seed as u32 + 9, total);
        let imm = 8 << 10;
        // F = 1 with 8 KiB of immediate data: nothing unsolicited follows, so the target
        // asks for the rest with R2Ts (RFC 7143 section 11.3.4).
        let itt = h.itt;
        h.itt += 1;
        let cdb = write16(32, (total as u64 / BLOCK) as u32, false);
        let bhs = initiator::scsi_command(
            encode_lun(0),
            itt,
            h.cmd_sn,
            h.exp_stat_sn,
            false,
            true,
            total as u32,
            &cdb,
            imm as u32,
        );
        h.cmd_sn = h.cmd_sn.wrapping_add(1);
        h.send(&bhs, &data[..imm]);
        let mut sent = imm;
        while sent < total {
            let p = h.recv().expect("an R2T for the rest of the data");
            assert_eq!((p.v.opcode, p.v.itt), (0x31, itt), "seed {seed}: R2T");
            let (at, want) = (p.v.buffer_offset as usize, p.v.word44 as usize);
            assert_eq!(at, sent, "seed {seed}: the R2T asks for what is missing");
            assert!(want > 0 && at + want <= total, "seed {seed}: {at}+{want}");
            for (n, off) in (at..at + want).step_by(DATA_OUT_SEG).enumerate() {
                let end = (off + DATA_OUT_SEG).min(at + want);
                let d = initiator::data_out(
                    end == at + want,
                    encode_lun(0),
                    itt,
                    p.v.ttt,
                    h.exp_stat_sn,
                    n as u32,
                    off as u32,
                    (end - off) as u32,
                );
                h.send(&d, &data[off..end]);
            }
            sent = at + want;
        }
        assert!(!h.rep.is_empty(), "seed {seed}: mirrored");
        h.settle(|h| {
            let early = h.responses();
            assert!(
                early.is_empty(),
                "seed {seed}: a status before both: {early:?}"
            );
        });
        let done = h.responses();
        assert_eq!(done.len(), 1, "seed {seed}");
        assert_eq!((done[0].0, done[0].1), (itt, 0), "seed {seed}: GOOD");
        let mut on_disk = vec![0u8; total];
        h.file
            .read_exact_at(&mut on_disk, 32 * BLOCK)
            .expect("read back");
        assert!(on_disk == data, "seed {seed}: the data as sent");
    }
}

#[test]
fn an_abort_of_a_write_waiting_for_the_peer_is_answered_once_the_peer_is_done() {
    let mut h = Harness::new("abort", 11, true);
    let (cmd_sn, itt) = (h.cmd_sn, h.itt);
    h.command(&write16(8, 4, false), 0, &pattern(4, 4 * BLOCK as usize));
    while !h.io.is_empty() {
        h.complete_io(0);
    }
    assert_eq!(h.rep.len(), 1, "the mirrored write waits for its ack");
    // ABORT TASK (function 1), immediate.
    let tmf_itt = h.itt;
    h.itt += 1;
    let tmf = initiator::task_mgmt(
        1,
        encode_lun(0),
        tmf_itt,
        itt,
        h.cmd_sn,
        h.exp_stat_sn,
        cmd_sn,
    );
    h.send(&tmf, &[]);
    // The task is not gone while its change may still land on the peer (RFC 7143 section
    // 4.2.3.3: the answer comes once the aborted task is over).
    let mut early = Vec::new();
    while let Some(p) = h.recv() {
        early.push((p.v.opcode, p.v.itt));
    }
    assert!(early.is_empty(), "nothing before the peer's ack: {early:?}");
    h.ack_rep(0, true);
    let mut after = Vec::new();
    while let Some(p) = h.recv() {
        after.push((p.v.opcode, p.v.itt, p.v.byte2));
    }
    // Only the TMF response, FUNCTION COMPLETE; never a status for the aborted write.
    assert_eq!(after, vec![(0x22, tmf_itt, 0)], "{after:?}");
}

#[test]
fn compare_and_write_answers_miscompare_or_writes_only_after_the_peer() {
    let mut h = Harness::new("caw", 5, true);
    let old = pattern(1, BLOCK as usize);
    h.command(&write16(100, 1, false), 0, &old);
    h.settle(|_| {});
    assert_eq!(h.responses()[0].1, 0, "the first write is GOOD");
    let new = pattern(2, BLOCK as usize);
    let caw = |nlb: u8| {
        let mut c = [0u8; 16];
        c[0] = 0x89;
        c[2..10].copy_from_slice(&100u64.to_be_bytes());
        c[13] = nlb;
        c
    };
    // Verify data that does not match: MISCOMPARE, nothing written, nothing mirrored.
    let wrong = [pattern(3, BLOCK as usize), new.clone()].concat();
    let itt = h.command(&caw(1), 0, &wrong);
    let reps_before = h.rep.len();
    h.settle(|_| {});
    let r = h.responses();
    assert_eq!((r[0].0, r[0].1), (itt, 0x02), "CHECK CONDITION");
    assert_eq!(r[0].2[2] & 0x0f, 0x0e, "MISCOMPARE: {:02x?}", r[0].2);
    assert_eq!(h.rep.len(), reps_before, "nothing mirrored");
    // Matching: the new block is written, and GOOD waits for the peer's ack.
    let right = [old.clone(), new.clone()].concat();
    let itt = h.command(&caw(1), 0, &right);
    h.settle(|h| {
        let early = h.responses();
        assert!(early.is_empty(), "a status before both: {early:?}");
    });
    let r = h.responses();
    assert_eq!((r[0].0, r[0].1), (itt, 0), "GOOD");
    let mut on_disk = vec![0u8; BLOCK as usize];
    h.file
        .read_exact_at(&mut on_disk, 100 * BLOCK)
        .expect("read back");
    assert!(on_disk == new, "the new data");
}

#[test]
fn interleaved_writes_and_reads_complete_in_any_order_and_read_what_was_acknowledged() {
    for seed in 0..32u64 {
        let mut h = Harness::new("interleaved", seed, true);
        let mut expect: Vec<u8> = vec![0; (64 * BLOCK) as usize];
        for round in 0..6u32 {
            // A batch of non-overlapping writes in flight at once, completed in a seeded
            // order, then a read of the whole range.
            let mut itts = Vec::new();
            for k in 0..4u64 {
                let lba = k * 16 + h.rand(8) as u64;
                let blocks = 1 + h.rand(8) as u32;
                let data = pattern(
                    round * 10 + k as u32 + seed as u32,
                    (blocks as u64 * BLOCK) as usize,
                );
                let at = (lba * BLOCK) as usize;
                expect[at..at + data.len()].copy_from_slice(&data);
                let fua = h.rand(4) == 0;
                itts.push(h.command(&write16(lba, blocks, fua), 0, &data));
            }
            h.settle(|_| {});
            let done = h.responses();
            let mut got: Vec<u32> = done.iter().filter(|r| r.1 == 0).map(|r| r.0).collect();
            got.sort_unstable();
            assert_eq!(got, itts, "seed {seed} round {round}: every write GOOD");
            let read = h.command(&benches::conn::rw16(false, 0, 64), (64 * BLOCK) as u32, &[]);
            h.settle(|_| {});
            let r = h.responses();
            assert_eq!(r.len(), 1, "seed {seed}");
            assert_eq!((r[0].0, r[0].1), (read, 0), "seed {seed}");
            assert!(
                r[0].3 == expect,
                "seed {seed} round {round}: the read returns the acknowledged data"
            );
        }
    }
}

#[test]
fn a_bad_cdb_gets_illegal_request_and_the_connection_keeps_serving() {
    let mut h = Harness::new("bad-cdb", 3, false);
    // WRITE(16) beyond the end of the 4 MiB LUN: LBA OUT OF RANGE.
    let lba = LUN_BYTES / BLOCK;
    let itt = h.command(&write16(lba, 1, false), 0, &pattern(0, BLOCK as usize));
    h.settle(|_| {});
    let r = h.responses();
    assert_eq!((r[0].0, r[0].1), (itt, 0x02));
    assert_eq!(r[0].2[2] & 0x0f, 0x05, "ILLEGAL REQUEST");
    assert_eq!((r[0].2[12], r[0].2[13]), (0x21, 0x00), "LBA OUT OF RANGE");
    // An unknown opcode: INVALID COMMAND OPERATION CODE.
    let itt = h.command(&[0xd7, 0, 0, 0, 0, 0], 0, &[]);
    h.settle(|_| {});
    let r = h.responses();
    assert_eq!((r[0].0, r[0].1), (itt, 0x02));
    assert_eq!((r[0].2[2] & 0x0f, r[0].2[12]), (0x05, 0x20));
    // And the session goes on.
    let data = pattern(9, BLOCK as usize);
    let itt = h.command(&write16(1, 1, false), 0, &data);
    h.settle(|_| {});
    let r = h.responses();
    assert_eq!((r[0].0, r[0].1), (itt, 0), "GOOD");
}
