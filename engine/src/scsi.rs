//! SCSI command execution (SPC-4 / SBC-3) on a LUN backed by a sparse file.
//!
//! Each command becomes a small state machine: [`start`] decodes and checks it and says
//! what it needs next (write data, a disk operation, or nothing); [`data_ready`] and
//! [`io_done`] advance it. The transport (conn.rs) moves the bytes; the reactor does the I/O.

use proto::scsi::cdb::{self, Command, Rw};
use proto::scsi::lun_info::LunInfo;
use proto::scsi::sense::{Asc, Sense, SenseFormat, SenseKey};

use crate::bufpool::{AlignedBuf, BufPool, MAX_BUF_BYTES};
use crate::conn::status;
use crate::lun::Lun;
use crate::registry::{Registry, TargetEntry};

/// A disk operation on the task's buffer region `[buf_off, buf_off + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read {
        offset: u64,
        buf_off: u32,
        len: u32,
    },
    Write {
        offset: u64,
        buf_off: u32,
        len: u32,
        fua: bool,
    },
    /// fdatasync: SYNCHRONIZE CACHE, and the durability point of WRITE AND VERIFY.
    Flush,
    /// fallocate(mode) over a byte range: PUNCH_HOLE for UNMAP, ZERO_RANGE for zeroing.
    Fallocate {
        offset: u64,
        len: u64,
        mode: i32,
    },
}

/// fallocate modes we use (linux/falloc.h).
pub const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
pub const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// Where the data of a reply lives.
pub enum ReplyData {
    None,
    Inline(Vec<u8>),
    /// The first n bytes of the task's buffer.
    Buf(usize),
}

/// A finished command.
pub struct Reply {
    pub status: u8,
    pub sense: Option<Sense>,
    pub sense_format: SenseFormat,
    pub data: ReplyData,
    /// Bytes the command would transfer per its CDB, when that differs from the data
    /// produced (reads cut by EDTL, writes): residuals are computed against it.
    pub transfer_bytes: Option<u32>,
}

impl Reply {
    pub fn good() -> Self {
        Reply {
            status: status::GOOD,
            sense: None,
            sense_format: SenseFormat::Fixed,
            data: ReplyData::None,
            transfer_bytes: None,
        }
    }
    pub fn check(sense: Sense) -> Self {
        Reply {
            status: status::CHECK_CONDITION,
            sense: Some(sense),
            sense_format: SenseFormat::Fixed,
            data: ReplyData::None,
            transfer_bytes: None,
        }
    }
    fn data(v: Vec<u8>, alloc_len: usize) -> Self {
        let mut v = v;
        v.truncate(alloc_len);
        Reply {
            data: ReplyData::Inline(v),
            ..Reply::good()
        }
    }
    fn transfer(mut self, bytes: u32) -> Self {
        self.transfer_bytes = Some(bytes);
        self
    }
}

pub enum Step {
    Done(Reply),
    /// Collect this many bytes of Data-Out into the task's buffer, then call [`data_ready`].
    NeedData(u32),
    Io(IoOp),
    /// A disk operation on another LUN (registry index): EXTENDED COPY sources.
    IoAt(usize, IoOp),
    /// The blocks are locked by another command: call [`retry`] soon.
    Wait,
    /// A long wait (a sanitize): call [`retry`] on the next timer tick.
    WaitSlow,
}

/// What a command still has to do.
#[derive(Debug, Default)]
enum Stage {
    #[default]
    Idle,
    /// Reading `len` bytes at `offset` into the buffer; `done` so far.
    Read {
        offset: u64,
        len: u32,
        done: u32,
        transfer: u32,
    },
    /// Data arrives for a write of `len` bytes at `offset`.
    WriteData {
        offset: u64,
        len: u32,
        fua: bool,
        flush_after: bool,
        transfer: u32,
        atomic: bool,
    },
    Writing {
        offset: u64,
        len: u32,
        done: u32,
        fua: bool,
        flush_after: bool,
        transfer: u32,
    },
    Flushing {
        transfer: u32,
    },
    /// VERIFY with BYTCHK: data arrives into buf[..len], then the medium is read into
    /// buf[len..2*len] (or, for BYTCHK=3, one block is compared against every block).
    VerifyData {
        offset: u64,
        len: u32,
        one_block: bool,
    },
    VerifyRead {
        offset: u64,
        len: u32,
        done: u32,
        one_block: bool,
    },
    ModeSelect {
        ten_byte: bool,
        pf: bool,
        sp: bool,
        len: u32,
    },
    /// Waiting for blocks `[lba, lba + blocks)` to be free, then going on with `then`.
    Lock {
        lba: u64,
        blocks: u64,
        atomic: bool,
        then: Box<Stage>,
    },
    /// Like `Lock`, on another LUN.
    LockOn {
        lun: usize,
        lba: u64,
        blocks: u64,
        then: Box<Stage>,
    },
    /// A read waiting for an overlapping WRITE ATOMIC to finish.
    ReadBlocked {
        lba: u64,
        blocks: u64,
        offset: u64,
        len: u32,
        transfer: u32,
    },
    /// COMPARE AND WRITE: data is [verify n | write n]; the medium is read into [2n..3n].
    CawData {
        lba: u64,
        n: u32,
        fua: bool,
    },
    CawRead {
        offset: u64,
        n: u32,
        done: u32,
        fua: bool,
    },
    /// ORWRITE: data in [0..n]; the medium is read into [n..2n], ORed, written back.
    OrData {
        lba: u64,
        n: u32,
        fua: bool,
    },
    OrRead {
        offset: u64,
        n: u32,
        done: u32,
        fua: bool,
    },
    /// WRITE SAME: one block of pattern (or none for NDOB) then a punch, a zeroing or
    /// chunked writes of the repeated pattern.
    WsData {
        lba: u64,
        blocks: u64,
        unmap: bool,
        to_end: bool,
    },
    WsFill {
        offset: u64,
        remaining: u64,
        chunk: u32,
        fua: bool,
    },
    Falloc {
        offset: u64,
        len: u64,
        mode: i32,
    },
    /// UNMAP: the parameter list arrives, then one punch per descriptor.
    UnmapData {
        len: u32,
    },
    Unmapping {
        ranges: Vec<(u64, u64)>,
        next: usize,
    },
    /// SANITIZE: parameter list (overwrite) then the whole medium.
    SanitizeData {
        len: u32,
        immed: bool,
    },
    /// PERSISTENT RESERVE OUT: the parameter list arrives.
    PrOutData {
        cmd: Command,
        len: u32,
    },
    /// IMMED=0: the command completes when the background sanitize does.
    SanitizeWait,
    /// EXTENDED COPY: the parameter list arrives, then the copy runs chunk by chunk.
    XcopyData {
        len: u32,
    },
    Copy(Box<CopyJob>),
}

/// A running EXTENDED COPY segment.
#[derive(Debug, Clone)]
struct CopyJob {
    src: usize,
    dst: usize,
    src_off: u64,
    dst_off: u64,
    remaining: u64,
    chunk: u32,
    done: u64,
    list_id: u8,
    hold: bool,
}

/// Per-command state owned by the transport's task.
#[derive(Default)]
pub struct ScsiTask {
    pub buf: Option<AlignedBuf>,
    stage: Stage,
    sense_format: Option<SenseFormat>,
    /// Blocks this command is modifying (released when the task is dropped).
    guard: Option<crate::range_lock::RangeGuard>,
    /// Bytes the CDB transfers, for the residual.
    transfer: u32,
}

impl ScsiTask {
    pub fn empty() -> Self {
        Self::default()
    }
}

pub struct ExecCtx<'a> {
    pub reg: &'a Registry,
    pub target: &'a TargetEntry,
    /// Registry index of the addressed LUN, `None` when the target has no such LUN.
    pub lun: Option<usize>,
    pub lun_id: u64,
    pub pool: &'a mut BufPool,
    pub session_id: u64,
    pub nexus: &'a proto::scsi::pr::Nexus,
    /// Set when the command changed the LUN's reservation state (conn.rs mirrors it).
    pub mirror_pr: std::cell::Cell<bool>,
}

/// Commands that a pending unit attention does not block (SAM-5 section 5.14 / SPC-4
/// section 5.13: INQUIRY, REPORT LUNS and REQUEST SENSE still run).
pub fn ua_exempt(cdb: &[u8]) -> bool {
    matches!(cdb.first(), Some(0x12) | Some(0xa0) | Some(0x03))
}

/// The identity and limits a LUN reports.
pub fn lun_info(lun: &Lun) -> LunInfo {
    let mut i = LunInfo::new(
        lun.block_size,
        lun.num_blocks(),
        lun.naa_id,
        &lun.serial,
        &lun.target_name,
    );
    i.thin = lun.thin;
    i.lbprz = lun.thin;
    i.read_only = lun.read_only;
    // EXTENDED COPY (LID1) is supported: the 3PC bit in standard INQUIRY says so.
    i.extended_copy = true;
    i.max_xfer_blocks = (MAX_XFER_BYTES / lun.block_size as usize) as u32;
    // From `physical_block_size` (4 KiB by default: the file-system block). See
    // docs/limitations.md for how it meets libiscsi's GetLBAStatus.UnmapSingle.
    i.physical_block_exp = lun.physical_block_exp;
    // Unmap in file-system blocks (4 KiB divides 1 MiB): smaller punches only zero.
    i.unmap_granularity_blocks = (4096 / lun.block_size).max(1);
    // WRITE SAME up to 16 MiB: large enough for ESXi's zeroing, small enough that one
    // command's pattern writes never stall a core for long.
    i.max_write_same_blocks = (16 << 20) / lun.block_size as u64;
    // WSNZ = 0: a zero-length WRITE SAME writes to the end of the LUN.
    i.write_same_no_zero = false;
    let page_blocks = (ATOMIC_ALIGN_BYTES / lun.block_size).max(1);
    i.max_atomic_blocks = (MAX_ATOMIC_BYTES / lun.block_size).max(1);
    i.atomic_alignment_blocks = page_blocks;
    i.atomic_granularity_blocks = page_blocks;
    i
}

/// Largest single READ/WRITE: MAXIMUM TRANSFER LENGTH in VPD B0 says the same.
pub const MAX_XFER_BYTES: usize = 8 << 20;
const _: () = assert!(
    MAX_XFER_BYTES * 2 <= MAX_BUF_BYTES,
    "VERIFY needs two transfers in one buffer"
);

fn sense_format(lun: &Lun) -> SenseFormat {
    if lun.mode_state().d_sense {
        SenseFormat::Descriptor
    } else {
        SenseFormat::Fixed
    }
}

fn write_protected(lun: &Lun) -> bool {
    lun.read_only || lun.mode_state().swp
}

/// Checks an LBA range against the LUN (SBC-3 section 4.5: LBA + blocks may equal capacity).
fn check_range(lun: &Lun, lba: u64, blocks: u64) -> Result<(), Sense> {
    match lba.checked_add(blocks) {
        Some(end) if end <= lun.num_blocks() => Ok(()),
        _ => Err(Sense::lba_out_of_range()),
    }
}

fn byte_offset(lun: &Lun, lba: u64) -> u64 {
    lba * lun.block_size as u64
}

/// Starts a command. `edtl` is the iSCSI Expected Data Transfer Length.
pub fn start(
    cdb_bytes: &[u8],
    edtl: u32,
    _write_flag: bool,
    ctx: &mut ExecCtx,
) -> (ScsiTask, Step) {
    let mut task = ScsiTask::default();
    let cmd = match cdb::decode(cdb_bytes) {
        Ok(c) => c,
        Err(e) => return (task, Step::Done(Reply::check(e.sense()))),
    };
    // Commands that need no LUN.
    match cmd {
        Command::ReportLuns {
            select_report,
            alloc_len,
        } => return (task, Step::Done(report_luns(ctx, select_report, alloc_len))),
        Command::Inquiry {
            evpd,
            page,
            alloc_len,
        } if ctx.lun.is_none() => {
            // SPC-4 section 6.6.2: peripheral qualifier 011b / type 1Fh for a LUN that is not there.
            if evpd {
                return (
                    task,
                    Step::Done(Reply::check(Sense::invalid_field_in_cdb(1, Some(0)))),
                );
            }
            let _ = page;
            let mut v = vec![0u8; 36];
            v[0] = 0x7f;
            v[2] = 0x06;
            v[3] = 0x02;
            v[4] = 31;
            return (task, Step::Done(Reply::data(v, alloc_len as usize)));
        }
        Command::RequestSense { desc, alloc_len } if ctx.lun.is_none() => {
            let f = if desc {
                SenseFormat::Descriptor
            } else {
                SenseFormat::Fixed
            };
            let s = Sense::lun_not_supported().encode(f).as_slice().to_vec();
            return (task, Step::Done(Reply::data(s, alloc_len as usize)));
        }
        _ => {}
    }
    let Some(lun_idx) = ctx.lun else {
        return (task, Step::Done(Reply::check(Sense::lun_not_supported())));
    };
    let lun = &ctx.reg.luns[lun_idx];
    let fmt = sense_format(lun);
    task.sense_format = Some(fmt);
    if ctx.reg.role() == crate::config::Role::Secondary && !standby_allowed(&cmd) {
        // A secondary's data is the primary's mirror: initiators may look, not touch
        // (SPC-4 5.16 standby state: LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN STANDBY STATE).
        let sense = Sense::not_ready(Asc::LOGICAL_UNIT_NOT_ACCESSIBLE_STANDBY);
        return (task, with_format(Step::Done(Reply::check(sense)), fmt));
    }
    if lun.pr_in_use()
        && lun
            .with_pr(|st| proto::scsi::pr::check_access(st, ctx.nexus, &cmd))
            .is_err()
    {
        // SPC-4 5.12.4: RESERVATION CONFLICT carries no sense data.
        tracing::debug!(initiator = %ctx.nexus.initiator, isid = ?ctx.nexus.isid, ?cmd, state = ?lun.with_pr(|st| st.clone()), "reservation conflict");
        let r = Reply {
            status: status::RESERVATION_CONFLICT,
            ..Reply::good()
        };
        return (task, Step::Done(r));
    }
    if lun.sanitize.active() {
        // SBC-3 section 4.11: while a sanitize runs only INQUIRY, REPORT LUNS and REQUEST
        // SENSE are served; REQUEST SENSE reports the progress.
        let in_progress = Sense::not_ready(Asc::LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS)
            .with_progress(lun.sanitize.progress());
        match cmd {
            Command::Inquiry { .. } => {}
            Command::RequestSense { desc, alloc_len } => {
                let f = if desc {
                    SenseFormat::Descriptor
                } else {
                    SenseFormat::Fixed
                };
                return (
                    task,
                    Step::Done(Reply::data(
                        in_progress.encode(f).as_slice().to_vec(),
                        alloc_len as usize,
                    )),
                );
            }
            _ => {
                return (
                    task,
                    with_format(Step::Done(Reply::check(in_progress)), fmt),
                )
            }
        }
    }
    let step = match run(&cmd, lun, edtl, &mut task, ctx) {
        Ok(s) => s,
        Err(sense) => Step::Done(Reply::check(sense)),
    };
    (task, with_format(step, fmt))
}

fn with_format(step: Step, fmt: SenseFormat) -> Step {
    match step {
        Step::Done(mut r) => {
            r.sense_format = fmt;
            Step::Done(r)
        }
        s => s,
    }
}

fn run(
    cmd: &Command,
    lun: &Lun,
    edtl: u32,
    task: &mut ScsiTask,
    ctx: &mut ExecCtx,
) -> Result<Step, Sense> {
    let bs = lun.block_size;
    let info = || lun_info(lun);
    let wce = lun.mode_state().wce;
    Ok(match *cmd {
        Command::TestUnitReady => Step::Done(Reply::good()),
        Command::RequestSense { desc, alloc_len } => {
            // No deferred errors are kept: report NO SENSE in the format asked for.
            let f = if desc {
                SenseFormat::Descriptor
            } else {
                SenseFormat::Fixed
            };
            let s = Sense::new(SenseKey::NoSense, Asc::NO_ADDITIONAL_SENSE)
                .encode(f)
                .as_slice()
                .to_vec();
            Step::Done(Reply::data(s, alloc_len as usize))
        }
        Command::Inquiry {
            evpd,
            page,
            alloc_len,
        } => {
            let i = info();
            let v = if evpd {
                proto::scsi::inquiry::vpd_page(&i, page)
                    .ok_or_else(|| Sense::invalid_field_in_cdb(2, None))?
            } else {
                proto::scsi::inquiry::standard_inquiry(&i)
            };
            Step::Done(Reply::data(v, alloc_len as usize))
        }
        Command::ReadCapacity10 => Step::Done(Reply::data(
            proto::scsi::capacity::read_capacity10(&info()).to_vec(),
            8,
        )),
        Command::ReadCapacity16 { alloc_len } => Step::Done(Reply::data(
            proto::scsi::capacity::read_capacity16(&info()).to_vec(),
            alloc_len as usize,
        )),
        Command::ModeSense(ms) => {
            let state = lun.mode_state();
            let v = proto::scsi::mode::mode_sense(&info(), &state, &ms)?;
            Step::Done(Reply::data(v, ms.alloc_len as usize))
        }
        Command::ModeSelect {
            ten_byte,
            pf,
            sp,
            param_len,
        } => {
            if param_len == 0 {
                return Ok(Step::Done(Reply::good()));
            }
            task.buf = Some(ctx.pool.get(param_len as usize));
            task.stage = Stage::ModeSelect {
                ten_byte,
                pf,
                sp,
                len: param_len as u32,
            };
            Step::NeedData(param_len as u32)
        }
        Command::ReportSupportedOpcodes {
            rctd,
            reporting_options,
            requested_opcode,
            requested_service_action,
            alloc_len,
        } => {
            let v = proto::scsi::rsoc::report_supported_opcodes(
                &proto::scsi::rsoc::Filter::new(implemented),
                rctd,
                reporting_options,
                requested_opcode,
                requested_service_action,
            )?;
            Step::Done(Reply::data(v, alloc_len as usize))
        }
        Command::StartStopUnit(ss) => {
            // A disk that is always spinning: START/STOP and power conditions are accepted;
            // LOEJ on non-removable media is refused (SBC-3 section 5.25).
            if ss.loej {
                return Err(Sense::invalid_field_in_cdb(4, Some(1)));
            }
            Step::Done(Reply::good())
        }
        Command::PreventAllowMediumRemoval { prevent } => {
            // A non-removable disk has nothing to lock (SPC-4 section 6.13).
            if prevent != 0 {
                return Err(Sense::invalid_field_in_cdb(4, Some(0)));
            }
            Step::Done(Reply::good())
        }
        Command::Read { rw, .. } => {
            check_rw_fields(&rw)?;
            check_range(lun, rw.lba, rw.blocks as u64)?;
            let transfer = rw.blocks.saturating_mul(bs);
            let want = transfer.min(edtl);
            if want == 0 {
                return Ok(Step::Done(Reply::good().transfer(transfer)));
            }
            // Read whole blocks; the transport sends only the first `want` bytes.
            let len = want.div_ceil(bs) * bs;
            task.buf = Some(ctx.pool.get(len as usize));
            let offset = byte_offset(lun, rw.lba);
            task.stage = Stage::ReadBlocked {
                lba: rw.lba,
                blocks: rw.blocks as u64,
                offset,
                len,
                transfer,
            };
            retry(task, ctx)
        }
        Command::Write { rw, .. }
        | Command::WriteAndVerify { rw, .. }
        | Command::WriteAtomic { rw, .. } => {
            let bytchk = match *cmd {
                Command::WriteAndVerify { bytchk, .. } => bytchk,
                _ => 0,
            };
            if bytchk > 1 {
                return Err(Sense::invalid_field_in_cdb(1, Some(2)));
            }
            check_rw_fields(&rw)?;
            check_range(lun, rw.lba, rw.blocks as u64)?;
            if let Command::WriteAtomic {
                atomic_boundary, ..
            } = *cmd
            {
                check_atomic(lun, &rw, atomic_boundary)?;
            }
            check_writable(lun)?;
            let transfer = rw.blocks.saturating_mul(bs);
            if edtl < transfer && !edtl.is_multiple_of(bs) {
                // A partial block cannot be written from what the initiator will send:
                // refuse without writing (SAM-5 / libiscsi accept 0E/03 here).
                return Ok(Step::Done(
                    Reply::check(Sense::illegal_request(Asc(0x0e, 0x03))).transfer(transfer),
                ));
            }
            let len = transfer.min(edtl);
            if len == 0 {
                return Ok(Step::Done(Reply::good().transfer(transfer)));
            }
            task.buf = Some(ctx.pool.get(len as usize));
            task.transfer = transfer;
            // WRITE AND VERIFY: the data must be on the medium before it is "verified".
            let flush_after = matches!(cmd, Command::WriteAndVerify { .. });
            let atomic = matches!(cmd, Command::WriteAtomic { .. });
            task.stage = Stage::WriteData {
                offset: byte_offset(lun, rw.lba),
                len,
                fua: rw.fua || !wce || atomic,
                flush_after,
                transfer,
                atomic,
            };
            Step::NeedData(len)
        }
        Command::CompareAndWrite(rw) => {
            check_rw_fields(&rw)?;
            if rw.blocks > info().max_compare_write_blocks as u32 {
                return Err(Sense::invalid_field_in_cdb(13, None));
            }
            check_range(lun, rw.lba, rw.blocks as u64)?;
            check_writable(lun)?;
            let n = rw.blocks * bs;
            if n == 0 && edtl > 0 {
                // Data for zero blocks: the length field is not what the initiator meant.
                return Err(Sense::invalid_field_in_cdb(13, None));
            }
            if n == 0 {
                return Ok(Step::Done(Reply::good()));
            }
            if edtl != 2 * n {
                // SBC-3 section 5.3: the Data-Out buffer is exactly verify + write data.
                return Ok(Step::Done(Reply::check(Sense::illegal_request(Asc(
                    0x0e, 0x03,
                )))));
            }
            task.buf = Some(ctx.pool.get(3 * n as usize));
            task.stage = Stage::CawData {
                lba: rw.lba,
                n,
                fua: rw.fua || !wce,
            };
            Step::NeedData(2 * n)
        }
        Command::OrWrite(rw) => {
            check_rw_fields(&rw)?;
            check_range(lun, rw.lba, rw.blocks as u64)?;
            check_writable(lun)?;
            let n = rw.blocks.saturating_mul(bs);
            if n == 0 {
                return Ok(Step::Done(Reply::good()));
            }
            task.buf = Some(ctx.pool.get(2 * n as usize));
            task.stage = Stage::OrData {
                lba: rw.lba,
                n,
                fua: rw.fua || !wce,
            };
            Step::NeedData(n)
        }
        Command::WriteSame {
            rw,
            anchor,
            unmap,
            ndob,
            ..
        } => {
            if rw.protect != 0 {
                return Err(Sense::invalid_field_in_cdb(1, Some(7)));
            }
            if anchor {
                // ANC_SUP = 0 in VPD B2: anchored blocks are not supported.
                return Err(Sense::invalid_field_in_cdb(1, Some(4)));
            }
            let i = info();
            if rw.lba >= lun.num_blocks() {
                return Err(Sense::lba_out_of_range());
            }
            // WSNZ = 0: zero blocks means "to the last LBA" (SBC-3 section 5.45), a count
            // that MAXIMUM WRITE SAME LENGTH bounds like any other.
            let to_end = rw.blocks == 0;
            let blocks = if to_end {
                lun.num_blocks() - rw.lba
            } else {
                rw.blocks as u64
            };
            if blocks > i.max_write_same_blocks {
                return Err(Sense::invalid_field_in_cdb(7, None));
            }
            check_range(lun, rw.lba, blocks)?;
            check_writable(lun)?;
            let need = if ndob { 0 } else { bs };
            if edtl != need {
                // Exactly one block of pattern (none with NDOB), or the pattern is unknown.
                return Err(Sense::invalid_field_in_cdb(if ndob { 1 } else { 7 }, None));
            }
            task.stage = Stage::WsData {
                lba: rw.lba,
                blocks,
                unmap,
                to_end,
            };
            if ndob {
                // No Data-Out buffer: the pattern is zeros.
                return Ok(data_ready(task, ctx));
            }
            task.buf = Some(ctx.pool.get(bs as usize));
            Step::NeedData(bs)
        }
        Command::Unmap {
            anchor, param_len, ..
        } => {
            if anchor {
                return Err(Sense::invalid_field_in_cdb(1, Some(0)));
            }
            check_writable(lun)?;
            if param_len == 0 {
                return Ok(Step::Done(Reply::good()));
            }
            if param_len < 8 {
                return Err(Sense::parameter_list_length_error());
            }
            task.buf = Some(ctx.pool.get(param_len as usize));
            task.stage = Stage::UnmapData {
                len: param_len as u32,
            };
            Step::NeedData(param_len as u32)
        }
        Command::Sanitize {
            immed,
            action,
            param_len,
            ..
        } => {
            use proto::scsi::cdb::SanitizeAction;
            match action {
                // Nothing is encrypted: there is no key to destroy (SBC-3 section 4.11.4).
                SanitizeAction::CryptoErase => return Err(Sense::invalid_field_in_cdb(1, Some(4))),
                // No sanitize ever leaves the LUN in a failure mode to exit from; the
                // service action takes no parameter list (SBC-3 section 5.30.2).
                SanitizeAction::ExitFailureMode if param_len != 0 => {
                    return Err(Sense::invalid_field_in_cdb(7, None))
                }
                SanitizeAction::ExitFailureMode => return Ok(Step::Done(Reply::good())),
                SanitizeAction::BlockErase => {
                    if param_len != 0 {
                        return Err(Sense::invalid_field_in_cdb(7, None));
                    }
                    check_writable(lun)?;
                    start_sanitize(task, ctx, crate::sanitize::Kind::BlockErase, immed)
                }
                SanitizeAction::Overwrite => {
                    if param_len < 5 || param_len as u32 > bs + 4 {
                        return Err(Sense::invalid_field_in_cdb(7, None));
                    }
                    check_writable(lun)?;
                    task.buf = Some(ctx.pool.get(param_len as usize));
                    task.stage = Stage::SanitizeData {
                        len: param_len as u32,
                        immed,
                    };
                    Step::NeedData(param_len as u32)
                }
            }
        }
        Command::ExtendedCopy { param_len } => {
            if param_len == 0 {
                return Ok(Step::Done(Reply::good()));
            }
            // Header + the largest descriptor lists we accept: anything longer is refused
            // before its data is buffered.
            if param_len as usize > 16 + crate::xcopy::MAX_DESCRIPTOR_LIST_BYTES as usize {
                return Err(Sense::parameter_list_length_error());
            }
            if edtl < param_len {
                return Err(Sense::parameter_list_length_error());
            }
            task.buf = Some(ctx.pool.get(param_len as usize));
            task.stage = Stage::XcopyData { len: param_len };
            Step::NeedData(param_len)
        }
        Command::ReceiveCopyResults {
            action,
            list_id,
            alloc_len,
        } => {
            use proto::scsi::cdb::CopyResultsAction;
            let v = match action {
                CopyResultsAction::OperatingParameters => crate::xcopy::operating_parameters(),
                CopyResultsAction::CopyStatus => match ctx.reg.copy_result(ctx.session_id, list_id)
                {
                    Some(r) => crate::xcopy::copy_status(&r),
                    None => return Err(Sense::invalid_field_in_cdb(2, None)),
                },
                _ => return Err(Sense::invalid_field_in_cdb(1, Some(4))),
            };
            Step::Done(Reply::data(v, alloc_len as usize))
        }
        Command::GetLbaStatus { lba, alloc_len } => {
            if lba >= lun.num_blocks() {
                return Err(Sense::lba_out_of_range());
            }
            Step::Done(Reply::data(
                lba_status(lun, lba, alloc_len),
                alloc_len as usize,
            ))
        }
        Command::Verify { rw, bytchk, .. } => {
            check_rw_fields(&rw)?;
            if bytchk == 2 {
                return Err(Sense::invalid_field_in_cdb(1, Some(1)));
            }
            check_range(lun, rw.lba, rw.blocks as u64)?;
            let len = rw.blocks.saturating_mul(bs);
            if bytchk == 0 || len == 0 {
                // Medium verification only: a readable sparse file always verifies.
                return Ok(Step::Done(Reply::good()));
            }
            let one_block = bytchk == 3;
            let data_len = if one_block { bs } else { len };
            if edtl < data_len {
                return Err(Sense::invalid_field_in_cdb(1, Some(1)));
            }
            task.buf = Some(ctx.pool.get((data_len + len) as usize));
            task.stage = Stage::VerifyData {
                offset: byte_offset(lun, rw.lba),
                len,
                one_block,
            };
            Step::NeedData(data_len)
        }
        Command::SynchronizeCache { lba, blocks, .. } => {
            check_range(lun, lba, blocks as u64)?;
            task.stage = Stage::Flushing { transfer: 0 };
            Step::Io(IoOp::Flush)
        }
        Command::PreFetch { lba, blocks, .. } => {
            check_range(lun, lba, blocks as u64)?;
            Step::Done(Reply::good())
        }
        Command::ReadDefectData {
            size,
            req_plist,
            req_glist,
            format,
            alloc_len,
        } => {
            // A file has no defects: an empty list in the format asked for (SBC-3 5.12).
            let flags = (req_plist as u8) << 4 | (req_glist as u8) << 3 | (format & 0x07);
            let v = if size == proto::scsi::cdb::CdbSize::Ten {
                vec![0, flags, 0, 0]
            } else {
                vec![0, flags, 0, 0, 0, 0, 0, 0]
            };
            Step::Done(Reply::data(v, alloc_len as usize))
        }
        Command::PersistentReserveIn { action, alloc_len } => {
            let v = lun.with_pr(|st| proto::scsi::pr::pr_in(st, action, alloc_len))?;
            Step::Done(Reply::data(v, alloc_len as usize))
        }
        Command::PersistentReserveOut { param_len, .. } => {
            // Basic parameter lists are 24 bytes; REGISTER AND MOVE adds a TransportID.
            if param_len > 4096 || edtl < param_len {
                return Err(Sense::parameter_list_length_error());
            }
            task.buf = Some(ctx.pool.get(param_len as usize));
            task.stage = Stage::PrOutData {
                cmd: *cmd,
                len: param_len,
            };
            if param_len == 0 {
                return Ok(data_ready(task, ctx));
            }
            Step::NeedData(param_len)
        }
        Command::Reserve { .. } => match lun.with_pr(|st| proto::scsi::pr::reserve6(st, ctx.nexus))
        {
            Ok(()) => Step::Done(Reply::good()),
            Err(_) => Step::Done(Reply {
                status: status::RESERVATION_CONFLICT,
                ..Reply::good()
            }),
        },
        Command::Release { .. } => match lun.with_pr(|st| proto::scsi::pr::release6(st, ctx.nexus))
        {
            Ok(()) => Step::Done(Reply::good()),
            Err(_) => Step::Done(Reply {
                status: status::RESERVATION_CONFLICT,
                ..Reply::good()
            }),
        },
        _ => return Err(Sense::invalid_opcode()),
    })
}

/// Commands a LUN in standby (on a secondary) still serves.
fn standby_allowed(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::Inquiry { .. }
            | Command::ReportLuns { .. }
            | Command::RequestSense { .. }
            | Command::ReportSupportedOpcodes { .. }
            | Command::ReadCapacity10
            | Command::ReadCapacity16 { .. }
            | Command::ModeSense(_)
    )
}

fn check_writable(lun: &Lun) -> Result<(), Sense> {
    if write_protected(lun) {
        Err(Sense::write_protected())
    } else {
        Ok(())
    }
}

/// Largest WRITE ATOMIC. Atomic toward every other command (range-locked, and overlapping
/// reads wait); written with RWF_DSYNC. Against power loss only each 4 KiB file-system
/// block is all-or-nothing (docs/limitations.md).
pub const MAX_ATOMIC_BYTES: u32 = 128 << 10;
/// Alignment and granularity of atomic writes: one page.
pub const ATOMIC_ALIGN_BYTES: u32 = 4096;

fn check_atomic(lun: &Lun, rw: &Rw, boundary: u16) -> Result<(), Sense> {
    let i = lun_info(lun);
    if boundary != 0 {
        // No atomic boundary support (MAXIMUM ATOMIC BOUNDARY SIZE = 0).
        return Err(Sense::invalid_field_in_cdb(10, None));
    }
    let align = i.atomic_alignment_blocks.max(1) as u64;
    let gran = i.atomic_granularity_blocks.max(1);
    if rw.blocks > i.max_atomic_blocks
        || !rw.lba.is_multiple_of(align)
        || !rw.blocks.is_multiple_of(gran)
    {
        return Err(Sense::invalid_field_in_cdb(2, None));
    }
    Ok(())
}

/// GET LBA STATUS descriptors from SEEK_DATA / SEEK_HOLE, starting at `lba`.
fn lba_status(lun: &Lun, lba: u64, alloc_len: u32) -> Vec<u8> {
    const MAX_DESCRIPTORS: usize = 64;
    let bs = lun.block_size as u64;
    let size = lun.size_bytes;
    let room = ((alloc_len as usize).saturating_sub(8) / 16).clamp(1, MAX_DESCRIPTORS);
    let mut descs: Vec<(u64, u64, u8)> = Vec::new();
    let mut pos = lba * bs;
    while pos < size && descs.len() < room {
        let data_at = lun.seek(pos, true).unwrap_or(size).min(size);
        let (end, status) = if data_at <= pos {
            (lun.seek(pos, false).unwrap_or(size).min(size), 0u8)
        } else {
            (data_at, 1u8)
        };
        // Round to whole blocks: a block partly in data counts as mapped.
        let start_lba = pos / bs;
        let mut end_lba = if status == 0 {
            end.div_ceil(bs)
        } else {
            end / bs
        };
        if end_lba <= start_lba {
            end_lba = start_lba + 1;
        }
        descs.push((start_lba, end_lba - start_lba, status));
        pos = end_lba * bs;
    }
    let mut v = vec![0u8; 8];
    v[0..4].copy_from_slice(&((4 + 16 * descs.len()) as u32).to_be_bytes());
    for (l, n, st) in descs {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&l.to_be_bytes());
        d[8..12].copy_from_slice(&(n.min(u32::MAX as u64) as u32).to_be_bytes());
        d[12] = st;
        v.extend_from_slice(&d);
    }
    v
}

/// Whether the engine implements an opcode / service action (for REPORT SUPPORTED
/// OPERATION CODES: we list exactly what [`run`] handles).
pub fn implemented(opcode: u8, service_action: Option<u16>) -> bool {
    use cdb::op::*;
    match opcode {
        TEST_UNIT_READY | REQUEST_SENSE | READ_6 | WRITE_6 | INQUIRY | MODE_SELECT_6
        | MODE_SENSE_6 | START_STOP_UNIT | READ_CAPACITY_10 | READ_10 | WRITE_10
        | WRITE_VERIFY_10 | VERIFY_10 | PRE_FETCH_10 | SYNC_CACHE_10 | MODE_SELECT_10
        | MODE_SENSE_10 | READ_16 | WRITE_16 | WRITE_VERIFY_16 | VERIFY_16 | PRE_FETCH_16
        | SYNC_CACHE_16 | REPORT_LUNS | READ_12 | WRITE_12 | WRITE_VERIFY_12 | VERIFY_12
        | PREVENT_ALLOW | WRITE_SAME_10 | WRITE_SAME_16 | UNMAP | COMPARE_AND_WRITE
        | ORWRITE_16 | WRITE_ATOMIC_16 | READ_DEFECT_DATA_10 | READ_DEFECT_DATA_12
        | EXTENDED_COPY => true,
        // OVERWRITE, BLOCK ERASE and EXIT FAILURE MODE; not CRYPTOGRAPHIC ERASE.
        SANITIZE => matches!(service_action, Some(0x01) | Some(0x02) | Some(0x1f)),
        RESERVE_6 | RELEASE_6 | RESERVE_10 | RELEASE_10 => true,
        // Every PR OUT service action but REPLACE LOST RESERVATION (8).
        PR_OUT => service_action.is_some_and(|sa| sa <= 7),
        RECEIVE_COPY_RESULTS => matches!(service_action, Some(0) | Some(3)),
        SERVICE_ACTION_IN_16 => matches!(service_action, Some(0x10) | Some(0x12)),
        PR_IN => service_action.is_some_and(|sa| sa <= 3),
        MAINTENANCE_IN => service_action == Some(0x0c),
        _ => false,
    }
}

/// RD/WR/VRPROTECT must be zero on a LUN without protection information (SBC-3 section
/// 4.22); DPO and FUA are honoured (MODE SENSE reports DPOFUA).
fn check_rw_fields(rw: &Rw) -> Result<(), Sense> {
    if rw.protect != 0 {
        return Err(Sense::invalid_field_in_cdb(1, Some(7)));
    }
    if rw.blocks as usize > MAX_XFER_BYTES / 512 {
        // Over MAXIMUM TRANSFER LENGTH (SBC-3 section 6.5.3).
        return Err(Sense::invalid_field_in_cdb(7, None));
    }
    Ok(())
}

fn report_luns(ctx: &ExecCtx, select_report: u8, alloc_len: u32) -> Reply {
    if select_report > 2 {
        return Reply::check(Sense::invalid_field_in_cdb(2, None));
    }
    // SPC-4 section 6.33: an allocation length under 16 is an error.
    if alloc_len < 16 {
        return Reply::check(Sense::invalid_field_in_cdb(6, None));
    }
    // SELECT REPORT 01h asks for well-known logical units only: we have none.
    let ids: Vec<u64> = match select_report {
        1 => Vec::new(),
        _ => ctx.target.luns.iter().map(|&(id, _)| id).collect(),
    };
    Reply::data(
        proto::scsi::report_luns::report_luns(&ids),
        alloc_len as usize,
    )
}

/// The LUN a context addresses (commands past `start` always have one).
fn ctx_lun<'a>(ctx: &ExecCtx<'a>) -> Option<&'a std::sync::Arc<Lun>> {
    ctx.lun.map(|i| &ctx.reg.luns[i])
}

/// Whether the write-intent log lets a write to these blocks of registry LUN `lun` be
/// issued now (replication.rs); when not, the caller drops its range lock and retries.
/// `Err(errno)`: the metadata has not been writable for a while (the write fails).
fn intent_ready(ctx: &ExecCtx, lun: usize, lba: u64, blocks: u64) -> Result<bool, i32> {
    let Some(rep) = ctx.reg.replication.get() else {
        return Ok(true);
    };
    let bs = u64::from(ctx.reg.luns[lun].block_size);
    rep.write_intent_ready(
        lun,
        lba.saturating_mul(bs),
        blocks.max(1).saturating_mul(bs),
    )
}

/// Takes the range lock for `then`, or parks the task until it is free.
fn lock_then(task: &mut ScsiTask, ctx: &ExecCtx, lba: u64, blocks: u64, then: Stage) -> Step {
    lock_then_mode(task, ctx, lba, blocks, false, then)
}

/// A modifying command that was admitted while this node was primary but reaches its
/// range lock (the moment before it changes anything) after a demotion: refused like any
/// command on a secondary, so the initiator retries it on the new primary instead of it
/// landing here after `demote` has drained (twinsan promote on the peer may follow at once).
fn demoted_meanwhile(ctx: &ExecCtx) -> Option<Step> {
    (ctx.reg.role() == crate::config::Role::Secondary).then(|| {
        Step::Done(Reply::check(Sense::not_ready(
            Asc::LOGICAL_UNIT_NOT_ACCESSIBLE_STANDBY,
        )))
    })
}

fn lock_then_mode(
    task: &mut ScsiTask,
    ctx: &ExecCtx,
    lba: u64,
    blocks: u64,
    atomic: bool,
    then: Stage,
) -> Step {
    let Some(lun) = ctx_lun(ctx) else {
        return Step::Done(Reply::check(Sense::lun_not_supported()));
    };
    if let Some(refused) = demoted_meanwhile(ctx) {
        return refused;
    }
    let end = lba + blocks.max(1);
    let got = if atomic {
        lun.ranges.try_lock_atomic(lba, end)
    } else {
        lun.ranges.try_lock(lba, end)
    };
    // Checked under the range lock: the write-intent keeper forgets a region only while
    // holding its lock (intent.rs).
    let ready = match (&got, ctx.lun) {
        (Some(_), Some(i)) => intent_ready(ctx, i, lba, blocks),
        _ => Ok(true),
    };
    let got = match ready {
        Ok(ready) => got.filter(|_| ready),
        Err(errno) => return Step::Done(Reply::check(io_error(errno, true))),
    };
    match got {
        Some(g) => {
            task.guard = Some(g);
            task.stage = then;
            begin(task)
        }
        None => {
            task.stage = Stage::Lock {
                lba,
                blocks,
                atomic,
                then: Box::new(then),
            };
            Step::Wait
        }
    }
}

/// Marks (in `CopyJob::done`'s top bit) that the current chunk's write is in flight.
const WRITE_PENDING: u64 = 1 << 63;

fn task_flag_written(j: &CopyJob) -> bool {
    j.done & WRITE_PENDING != 0
}

/// Resolves an EXTENDED COPY list against this target's LUNs. `Ok(None)`: nothing to copy.
fn plan_copy(ctx: &ExecCtx, params: &[u8]) -> Result<Option<(CopyJob, u64, u64)>, Sense> {
    use crate::xcopy::{copy_aborted, COPY_TARGET_NOT_REACHABLE, UNREACHABLE_COPY_TARGET};
    let list = crate::xcopy::parse(params)?;
    // Copy targets are LUNs of the session's own target, found by their NAA designator:
    // a copy never reaches a LUN the initiator could not address itself.
    let resolve = |i: u16| -> Result<usize, Sense> {
        let id = list
            .targets
            .get(i as usize)
            .ok_or_else(|| copy_aborted(COPY_TARGET_NOT_REACHABLE))?;
        ctx.target
            .luns
            .iter()
            .map(|&(_, idx)| idx)
            .find(|&idx| {
                proto::scsi::inquiry::naa_designator(ctx.reg.luns[idx].naa_id).as_slice()
                    == id.as_slice()
            })
            .ok_or_else(|| copy_aborted(UNREACHABLE_COPY_TARGET))
    };
    let Some(seg) = list.segments.first().copied() else {
        return Ok(None);
    };
    let (src, dst) = (resolve(seg.src)?, resolve(seg.dst)?);
    let (s, d) = (&ctx.reg.luns[src], &ctx.reg.luns[dst]);
    if s.block_size != d.block_size {
        return Err(copy_aborted(COPY_TARGET_NOT_REACHABLE));
    }
    let blocks = seg.blocks as u64;
    if check_range(s, seg.src_lba, blocks).is_err() || check_range(d, seg.dst_lba, blocks).is_err()
    {
        // Out-of-range segments abort the copy (SPC-4 6.4.3: not LBA OUT OF RANGE).
        return Err(copy_aborted(COPY_TARGET_NOT_REACHABLE));
    }
    check_writable(d)?;
    if blocks == 0 {
        return Ok(None);
    }
    let bs = s.block_size as u64;
    let job = CopyJob {
        src,
        dst,
        src_off: seg.src_lba * bs,
        dst_off: seg.dst_lba * bs,
        remaining: blocks * bs,
        chunk: crate::xcopy::CHUNK_BYTES,
        done: 0,
        list_id: list.list_id,
        hold: list.hold,
    };
    Ok(Some((job, seg.dst_lba, blocks)))
}

/// Like [`lock_then`] for a range of another LUN (EXTENDED COPY destinations).
fn lock_on(
    task: &mut ScsiTask,
    ctx: &ExecCtx,
    lun: usize,
    lba: u64,
    blocks: u64,
    then: Stage,
) -> Step {
    if let Some(refused) = demoted_meanwhile(ctx) {
        return refused;
    }
    let got = ctx.reg.luns[lun].ranges.try_lock(lba, lba + blocks.max(1));
    let got = match got.as_ref().map(|_| intent_ready(ctx, lun, lba, blocks)) {
        Some(Err(errno)) => return Step::Done(Reply::check(io_error(errno, true))),
        Some(Ok(false)) => None,
        _ => got,
    };
    match got {
        Some(g) => {
            task.guard = Some(g);
            task.stage = then;
            begin(task)
        }
        None => {
            task.stage = Stage::LockOn {
                lun,
                lba,
                blocks,
                then: Box::new(then),
            };
            Step::Wait
        }
    }
}

/// Applies a PERSISTENT RESERVE OUT and its effects: unit attentions to the nexuses it
/// names, and the APTPL file when the persisted state changed.
fn pr_out(
    lun: &Lun,
    ctx: &ExecCtx,
    action: proto::scsi::cdb::PrOutAction,
    scope: u8,
    pr_type: u8,
    params: &[u8],
    param_len: u32,
) -> Step {
    use proto::scsi::pr::PrOutError;
    let r = lun.with_pr(|st| {
        let r = proto::scsi::pr::pr_out(st, ctx.nexus, action, scope, pr_type, params, param_len);
        if let Ok(e) = &r {
            if e.persist {
                if let Err(err) = lun.persist_pr(st) {
                    // The change stands in memory; say loudly that it would not survive.
                    tracing::error!(path = %lun.pr_path.display(), error = %err, "cannot persist reservations (APTPL)");
                }
            }
        }
        r
    });
    match r {
        Ok(effect) => {
            if effect.changed {
                // The reservation state is one per LUN on the pair: the peer stores it too, so
                // initiators find the same reservations after a failover.
                ctx.mirror_pr.set(true);
            }
            for (nexus, asc) in &effect.unit_attentions {
                lun.ua.raise_to(crate::conn::nexus_tag(nexus), *asc);
            }
            Step::Done(Reply::good())
        }
        Err(PrOutError::ReservationConflict) => Step::Done(Reply {
            status: status::RESERVATION_CONFLICT,
            ..Reply::good()
        }),
        Err(PrOutError::Sense(s)) => Step::Done(Reply::check(s)),
    }
}

/// OVERWRITE parameter list (SBC-3 section 5.30.3).
fn parse_overwrite(p: &[u8], bs: usize) -> Result<crate::sanitize::Kind, Sense> {
    if p.len() < 5 {
        return Err(Sense::parameter_list_length_error());
    }
    let count = p[0] & 0x1f;
    let invert = p[0] & 0x80 != 0;
    if count == 0 {
        return Err(Sense::invalid_field_in_parameter_list(0, Some(0)));
    }
    let plen = u16::from_be_bytes([p[2], p[3]]) as usize;
    if plen == 0 || plen > bs || 4 + plen != p.len() {
        return Err(Sense::invalid_field_in_parameter_list(2, None));
    }
    Ok(crate::sanitize::Kind::Overwrite {
        pattern: p[4..].to_vec(),
        invert,
        count,
    })
}

fn start_sanitize(
    task: &mut ScsiTask,
    ctx: &ExecCtx,
    kind: crate::sanitize::Kind,
    immed: bool,
) -> Step {
    let Some(lun) = ctx_lun(ctx) else {
        return Step::Done(Reply::check(Sense::lun_not_supported()));
    };
    // A replicated LUN: the peer gets every region again once the erase is done, and
    // every region is recorded dirty before it starts (a crash in its middle).
    let after = match (ctx.reg.replication.get(), ctx.lun) {
        (Some(rep), Some(index)) => {
            if let Err(e) = rep.mark_lun_dirty(index) {
                tracing::error!(error = %e, "cannot record the LUN dirty before SANITIZE");
                return Step::Done(Reply::check(Sense::internal_target_failure()));
            }
            let rep = std::sync::Arc::clone(rep);
            Some(
                Box::new(move || rep.lun_rewritten(index, "SANITIZE rewrote the LUN"))
                    as crate::sanitize::AfterErase,
            )
        }
        _ => None,
    };
    if !crate::sanitize::start(std::sync::Arc::clone(lun), kind, after) {
        return Step::Done(Reply::check(Sense::not_ready(
            Asc::LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS,
        )));
    }
    if immed {
        return Step::Done(Reply::good());
    }
    task.stage = Stage::SanitizeWait;
    Step::WaitSlow
}

/// A parked task tries again.
pub fn retry(task: &mut ScsiTask, ctx: &mut ExecCtx) -> Step {
    let fmt = task.sense_format.unwrap_or(SenseFormat::Fixed);
    match std::mem::take(&mut task.stage) {
        Stage::Lock {
            lba,
            blocks,
            atomic,
            then,
        } => with_format(lock_then_mode(task, ctx, lba, blocks, atomic, *then), fmt),
        Stage::LockOn {
            lun,
            lba,
            blocks,
            then,
        } => with_format(lock_on(task, ctx, lun, lba, blocks, *then), fmt),
        Stage::SanitizeWait => match ctx_lun(ctx) {
            Some(l) if l.sanitize.active() => {
                task.stage = Stage::SanitizeWait;
                Step::WaitSlow
            }
            Some(l) => match l.sanitize.failed() {
                None => Step::Done(Reply::good()),
                Some(errno) => with_format(Step::Done(Reply::check(io_error(errno, true))), fmt),
            },
            None => Step::Done(Reply::check(Sense::lun_not_supported())),
        },
        Stage::ReadBlocked {
            lba,
            blocks,
            offset,
            len,
            transfer,
        } => {
            if ctx_lun(ctx).is_some_and(|l| l.ranges.readable(lba, lba + blocks.max(1))) {
                task.stage = Stage::Read {
                    offset,
                    len,
                    done: 0,
                    transfer,
                };
                Step::Io(IoOp::Read {
                    offset,
                    buf_off: 0,
                    len,
                })
            } else {
                task.stage = Stage::ReadBlocked {
                    lba,
                    blocks,
                    offset,
                    len,
                    transfer,
                };
                Step::Wait
            }
        }
        other => {
            task.stage = other;
            Step::Wait
        }
    }
}

/// Whether no later step of the command writes the task's buffer: it is in its final
/// write (a plain write, or the write-back of COMPARE AND WRITE or ORWRITE), and only a
/// flush or the status can follow. Replication then frames the buffer itself instead of
/// a copy (conn.rs `mirror`).
pub fn buffer_is_final(task: &ScsiTask) -> bool {
    matches!(task.stage, Stage::Writing { .. })
}

/// The first operation of a (locked) stage.
fn begin(task: &mut ScsiTask) -> Step {
    match task.stage {
        Stage::Writing {
            offset, len, fua, ..
        } => Step::Io(IoOp::Write {
            offset,
            buf_off: 0,
            len,
            fua,
        }),
        Stage::CawRead { offset, n, .. } => Step::Io(IoOp::Read {
            offset,
            buf_off: 2 * n,
            len: n,
        }),
        Stage::OrRead { offset, n, .. } => Step::Io(IoOp::Read {
            offset,
            buf_off: n,
            len: n,
        }),
        Stage::WsFill {
            offset,
            remaining,
            chunk,
            fua,
        } => Step::Io(IoOp::Write {
            offset,
            buf_off: 0,
            len: (chunk as u64).min(remaining) as u32,
            fua,
        }),
        Stage::Falloc { offset, len, mode } => Step::Io(IoOp::Fallocate { offset, len, mode }),
        Stage::Copy(ref j) => Step::IoAt(
            j.src,
            IoOp::Read {
                offset: j.src_off,
                buf_off: 0,
                len: (j.chunk as u64).min(j.remaining) as u32,
            },
        ),
        Stage::Unmapping { ref ranges, next } => match ranges.get(next) {
            Some(&(offset, len)) => Step::Io(IoOp::Fallocate {
                offset,
                len,
                mode: PUNCH_HOLE,
            }),
            None => Step::Done(Reply::good()),
        },
        _ => {
            debug_assert!(false, "begin in stage {:?}", task.stage);
            Step::Done(Reply::check(Sense::internal_target_failure()))
        }
    }
}

/// All write data has arrived.
pub fn data_ready(task: &mut ScsiTask, ctx: &mut ExecCtx) -> Step {
    let fmt = task.sense_format.unwrap_or(SenseFormat::Fixed);
    let Some(lun) = ctx_lun(ctx) else {
        return Step::Done(Reply::check(Sense::lun_not_supported()));
    };
    let bs = lun.block_size as u64;
    let step = match std::mem::take(&mut task.stage) {
        Stage::WriteData {
            offset,
            len,
            fua,
            flush_after,
            transfer,
            atomic,
        } => {
            let (lba, blocks) = (offset / bs, (len as u64).div_ceil(bs));
            lock_then_mode(
                task,
                ctx,
                lba,
                blocks,
                atomic,
                Stage::Writing {
                    offset,
                    len,
                    done: 0,
                    fua,
                    flush_after,
                    transfer,
                },
            )
        }
        Stage::CawData { lba, n, fua } => lock_then(
            task,
            ctx,
            lba,
            n as u64 / bs,
            Stage::CawRead {
                offset: lba * bs,
                n,
                done: 0,
                fua,
            },
        ),
        Stage::OrData { lba, n, fua } => lock_then(
            task,
            ctx,
            lba,
            n as u64 / bs,
            Stage::OrRead {
                offset: lba * bs,
                n,
                done: 0,
                fua,
            },
        ),
        Stage::WsData {
            lba,
            blocks,
            unmap,
            to_end,
        } => {
            let offset = lba * bs;
            let len = blocks * bs;
            let zeros = task
                .buf
                .as_deref()
                .is_none_or(|b| b.iter().all(|&x| x == 0));
            let fua = !lun.mode_state().wce;
            let _ = to_end;
            let then = if unmap && lun.thin {
                // UNMAP=1 deallocates (as LIO and libiscsi's UnmapUntilEnd expect, whatever
                // the pattern); LBPRZ=1 says the blocks then read as zeros.
                Stage::Falloc {
                    offset,
                    len,
                    mode: PUNCH_HOLE,
                }
            } else if zeros {
                Stage::Falloc {
                    offset,
                    len,
                    mode: ZERO_RANGE,
                }
            } else {
                // Repeat the block through a chunk buffer, written as many times as needed.
                let chunk = (len.min(1 << 20) as usize / bs as usize) * bs as usize;
                let mut buf = ctx.pool.get(chunk);
                if let Some(one) = task.buf.take() {
                    for c in buf.chunks_mut(bs as usize) {
                        c.copy_from_slice(&one[..bs as usize]);
                    }
                    ctx.pool.put(one);
                }
                task.buf = Some(buf);
                Stage::WsFill {
                    offset,
                    remaining: len,
                    chunk: chunk as u32,
                    fua,
                }
            };
            lock_then(task, ctx, lba, blocks, then)
        }
        Stage::UnmapData { len } => match parse_unmap(
            lun,
            task.buf
                .as_deref()
                .map(|b| &b[..(len as usize).min(b.len())])
                .unwrap_or(&[]),
        ) {
            Err(s) => Step::Done(Reply::check(s)),
            Ok(ranges) if ranges.is_empty() => Step::Done(Reply::good()),
            Ok(ranges) => {
                let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
                let hi = ranges.iter().map(|r| r.0 + r.1).max().unwrap_or(0);
                let bytes: Vec<(u64, u64)> =
                    ranges.iter().map(|&(l, n)| (l * bs, n * bs)).collect();
                lock_then(
                    task,
                    ctx,
                    lo,
                    hi - lo,
                    Stage::Unmapping {
                        ranges: bytes,
                        next: 0,
                    },
                )
            }
        },
        Stage::PrOutData {
            cmd:
                Command::PersistentReserveOut {
                    action,
                    scope,
                    pr_type,
                    param_len,
                },
            len,
        } => {
            let p = task
                .buf
                .as_deref()
                .map(|b| &b[..(len as usize).min(b.len())])
                .unwrap_or(&[]);
            pr_out(lun, ctx, action, scope, pr_type, p, param_len)
        }
        Stage::SanitizeData { len, immed } => {
            let p = task
                .buf
                .as_deref()
                .map(|b| &b[..(len as usize).min(b.len())])
                .unwrap_or(&[]);
            match parse_overwrite(p, bs as usize) {
                Err(s) => Step::Done(Reply::check(s)),
                Ok(kind) => start_sanitize(task, ctx, kind, immed),
            }
        }
        Stage::XcopyData { len } => {
            let params = task
                .buf
                .as_deref()
                .map(|b| &b[..(len as usize).min(b.len())])
                .unwrap_or(&[]);
            match plan_copy(ctx, params) {
                Err(s) => Step::Done(Reply::check(s)),
                Ok(None) => Step::Done(Reply::good()),
                Ok(Some((job, dst_lba, blocks))) => {
                    let chunk = job.chunk as usize;
                    if let Some(b) = task.buf.take() {
                        ctx.pool.put(b);
                    }
                    task.buf = Some(ctx.pool.get(chunk));
                    lock_on(
                        task,
                        ctx,
                        job.dst,
                        dst_lba,
                        blocks,
                        Stage::Copy(Box::new(job)),
                    )
                }
            }
        }
        Stage::VerifyData {
            offset,
            len,
            one_block,
        } => {
            let data_len = if one_block { bs as u32 } else { len };
            task.stage = Stage::VerifyRead {
                offset,
                len,
                done: 0,
                one_block,
            };
            Step::Io(IoOp::Read {
                offset,
                buf_off: data_len,
                len,
            })
        }
        Stage::ModeSelect {
            ten_byte,
            pf,
            sp,
            len,
        } => {
            let params = task
                .buf
                .as_deref()
                .map(|b| &b[..(len as usize).min(b.len())])
                .unwrap_or(&[]);
            let mut state = lun.mode.lock().unwrap_or_else(|p| p.into_inner());
            let before = *state;
            match proto::scsi::mode::mode_select(
                &lun_info(lun),
                &mut state,
                pf,
                sp,
                params,
                ten_byte,
            ) {
                Ok(()) => {
                    if *state != before {
                        drop(state);
                        // SPC-4 section 6.11: other nexuses learn of the change by UA.
                        lun.ua.raise_state_change(
                            ctx.session_id,
                            Asc::MODE_PARAMETERS_CHANGED,
                            lun.mode_tag(),
                        );
                    }
                    Step::Done(Reply::good())
                }
                Err(s) => Step::Done(Reply::check(s)),
            }
        }
        other => {
            debug_assert!(false, "data_ready in stage {other:?}");
            Step::Done(Reply::check(Sense::internal_target_failure()))
        }
    };
    with_format(step, fmt)
}

/// UNMAP parameter list (SBC-3 section 5.28.2) to block ranges.
fn parse_unmap(lun: &Lun, p: &[u8]) -> Result<Vec<(u64, u64)>, Sense> {
    let i = lun_info(lun);
    if p.len() < 8 {
        return Err(Sense::parameter_list_length_error());
    }
    let desc_len = u16::from_be_bytes([p[2], p[3]]) as usize;
    let body = &p[8..];
    let n = desc_len.min(body.len()) / 16;
    if n > i.max_unmap_descriptors as usize {
        return Err(Sense::invalid_field_in_parameter_list(2, None));
    }
    let mut out = Vec::with_capacity(n);
    let mut total: u64 = 0;
    for d in body.chunks_exact(16).take(n) {
        let mut l = [0u8; 8];
        l.copy_from_slice(&d[0..8]);
        let lba = u64::from_be_bytes(l);
        let blocks = u32::from_be_bytes([d[8], d[9], d[10], d[11]]) as u64;
        check_range(lun, lba, blocks)?;
        total += blocks;
        if blocks > 0 {
            out.push((lba, blocks));
        }
    }
    if total > i.max_unmap_blocks as u64 {
        return Err(Sense::invalid_field_in_parameter_list(8, None));
    }
    Ok(out)
}

/// Maps a failed disk operation to sense data.
fn io_error(errno: i32, writing: bool) -> Sense {
    match errno {
        // A thin LUN whose file system is full: SBC-3 section 4.7.3.6.
        libc::ENOSPC | libc::EDQUOT => Sense::new(
            SenseKey::DataProtect,
            Asc::SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
        ),
        libc::EROFS => Sense::write_protected(),
        _ if writing => Sense::medium_error(Asc::WRITE_ERROR),
        _ => Sense::medium_error(Asc::UNRECOVERED_READ_ERROR),
    }
}

/// A disk operation finished with `res` (bytes transferred, or -errno).
pub fn io_done(task: &mut ScsiTask, res: i32, ctx: &mut ExecCtx) -> Step {
    let fmt = task.sense_format.unwrap_or(SenseFormat::Fixed);
    let bs = ctx_lun(ctx).map(|l| l.block_size).unwrap_or(512);
    let transfer = task.transfer;
    let fail = |res: i32, writing: bool, offset: u64| {
        // At most 10 lines a second: a full file system fails every write (log_limit.rs).
        static DISK_ERRORS: crate::log_limit::LogLimit = crate::log_limit::LogLimit::new(10);
        if let Some(suppressed) = DISK_ERRORS.allow() {
            tracing::warn!(errno = -res, offset, writing, suppressed, "disk I/O failed");
        }
        Step::Done(Reply::check(if res == 0 {
            io_error(libc::EIO, writing)
        } else {
            io_error(-res, writing)
        }))
    };
    let step = match std::mem::take(&mut task.stage) {
        Stage::Read {
            offset,
            len,
            done,
            transfer,
        } => {
            if res <= 0 {
                fail(res, false, offset)
            } else {
                let done = done + res as u32;
                if done < len {
                    task.stage = Stage::Read {
                        offset,
                        len,
                        done,
                        transfer,
                    };
                    Step::Io(IoOp::Read {
                        offset: offset + done as u64,
                        buf_off: done,
                        len: len - done,
                    })
                } else {
                    Step::Done(
                        Reply {
                            data: ReplyData::Buf(len as usize),
                            ..Reply::good()
                        }
                        .transfer(transfer),
                    )
                }
            }
        }
        Stage::Writing {
            offset,
            len,
            done,
            fua,
            flush_after,
            transfer,
        } => {
            if res <= 0 {
                fail(res, true, offset)
            } else {
                let done = done + res as u32;
                if done < len {
                    task.stage = Stage::Writing {
                        offset,
                        len,
                        done,
                        fua,
                        flush_after,
                        transfer,
                    };
                    Step::Io(IoOp::Write {
                        offset: offset + done as u64,
                        buf_off: done,
                        len: len - done,
                        fua,
                    })
                } else if flush_after && !fua {
                    task.stage = Stage::Flushing { transfer };
                    Step::Io(IoOp::Flush)
                } else {
                    Step::Done(Reply::good().transfer(transfer))
                }
            }
        }
        Stage::Flushing { transfer } => {
            if res < 0 {
                fail(res, true, 0)
            } else if transfer > 0 {
                Step::Done(Reply::good().transfer(transfer))
            } else {
                Step::Done(Reply::good())
            }
        }
        Stage::VerifyRead {
            offset,
            len,
            done,
            one_block,
        } => {
            if res <= 0 {
                fail(res, false, offset)
            } else {
                let done = done + res as u32;
                let data_len = if one_block { bs } else { len };
                if done < len {
                    task.stage = Stage::VerifyRead {
                        offset,
                        len,
                        done,
                        one_block,
                    };
                    Step::Io(IoOp::Read {
                        offset: offset + done as u64,
                        buf_off: data_len + done,
                        len: len - done,
                    })
                } else {
                    let Some(buf) = task.buf.as_deref() else {
                        return Step::Done(Reply::check(Sense::internal_target_failure()));
                    };
                    let (given, medium) = buf.split_at(data_len as usize);
                    let mismatch = if one_block {
                        medium[..len as usize]
                            .chunks(bs as usize)
                            .enumerate()
                            .find_map(|(i, blk)| {
                                blk.iter()
                                    .zip(given)
                                    .position(|(a, b)| a != b)
                                    .map(|p| i * bs as usize + p)
                            })
                    } else {
                        given
                            .iter()
                            .zip(&medium[..len as usize])
                            .position(|(a, b)| a != b)
                    };
                    match mismatch {
                        // SBC-3 section 5.29: INFORMATION is the offset of the first miscompare.
                        Some(at) => Step::Done(Reply::check(Sense::miscompare(at as u64))),
                        None => Step::Done(Reply::good()),
                    }
                }
            }
        }
        Stage::CawRead {
            offset,
            n,
            done,
            fua,
        } => {
            if res <= 0 {
                fail(res, false, offset)
            } else {
                let done = done + res as u32;
                if done < n {
                    task.stage = Stage::CawRead {
                        offset,
                        n,
                        done,
                        fua,
                    };
                    Step::Io(IoOp::Read {
                        offset: offset + done as u64,
                        buf_off: 2 * n + done,
                        len: n - done,
                    })
                } else {
                    let Some(buf) = task.buf.as_deref() else {
                        return Step::Done(Reply::check(Sense::internal_target_failure()));
                    };
                    let (verify, medium) =
                        (&buf[..n as usize], &buf[2 * n as usize..3 * n as usize]);
                    match verify.iter().zip(medium).position(|(a, b)| a != b) {
                        // SBC-3 section 5.3: nothing is written; INFORMATION = first miscompare offset.
                        Some(at) => Step::Done(Reply::check(Sense::miscompare(at as u64))),
                        None => {
                            task.stage = Stage::Writing {
                                offset,
                                len: n,
                                done: 0,
                                fua,
                                flush_after: false,
                                transfer: 0,
                            };
                            Step::Io(IoOp::Write {
                                offset,
                                buf_off: n,
                                len: n,
                                fua,
                            })
                        }
                    }
                }
            }
        }
        Stage::OrRead {
            offset,
            n,
            done,
            fua,
        } => {
            if res <= 0 {
                fail(res, false, offset)
            } else {
                let done = done + res as u32;
                if done < n {
                    task.stage = Stage::OrRead {
                        offset,
                        n,
                        done,
                        fua,
                    };
                    Step::Io(IoOp::Read {
                        offset: offset + done as u64,
                        buf_off: n + done,
                        len: n - done,
                    })
                } else {
                    let Some(buf) = task.buf.as_deref_mut() else {
                        return Step::Done(Reply::check(Sense::internal_target_failure()));
                    };
                    let (data, medium) = buf.split_at_mut(n as usize);
                    for (m, d) in medium[..n as usize].iter_mut().zip(data.iter()) {
                        *m |= *d;
                    }
                    // Write the ORed blocks back from the second half of the buffer.
                    task.stage = Stage::Writing {
                        offset,
                        len: n,
                        done: 0,
                        fua,
                        flush_after: false,
                        transfer: 0,
                    };
                    Step::Io(IoOp::Write {
                        offset,
                        buf_off: n,
                        len: n,
                        fua,
                    })
                }
            }
        }
        Stage::WsFill {
            offset,
            remaining,
            chunk,
            fua,
        } => {
            if res <= 0 {
                fail(res, true, offset)
            } else {
                // Partial writes resume at a block boundary of the repeated pattern.
                let wrote = (res as u64 / bs as u64) * bs as u64;
                let wrote = if wrote == 0 { res as u64 } else { wrote };
                let remaining = remaining.saturating_sub(wrote);
                if remaining == 0 {
                    Step::Done(Reply::good())
                } else {
                    let offset = offset + wrote;
                    task.stage = Stage::WsFill {
                        offset,
                        remaining,
                        chunk,
                        fua,
                    };
                    Step::Io(IoOp::Write {
                        offset,
                        buf_off: 0,
                        len: (chunk as u64).min(remaining) as u32,
                        fua,
                    })
                }
            }
        }
        Stage::Falloc { offset, .. } => {
            if res < 0 {
                fail(res, true, offset)
            } else {
                Step::Done(Reply::good())
            }
        }
        Stage::Copy(mut j) => {
            // Reads and writes alternate; a completion is a read when nothing of the current
            // chunk has been written yet (done counts written bytes).
            let n = (j.chunk as u64).min(j.remaining) as u32;
            if res <= 0 {
                tracing::warn!(errno = -res, "EXTENDED COPY I/O failed");
                if !j.hold {
                    Step::Done(Reply::check(crate::xcopy::copy_aborted(
                        crate::xcopy::COPY_TARGET_NOT_REACHABLE,
                    )))
                } else {
                    ctx.reg.hold_copy_result(
                        ctx.session_id,
                        j.list_id,
                        crate::xcopy::CopyResult {
                            ok: false,
                            segments_done: 0,
                            bytes: j.done,
                        },
                    );
                    Step::Done(Reply::check(crate::xcopy::copy_aborted(
                        crate::xcopy::COPY_TARGET_NOT_REACHABLE,
                    )))
                }
            } else if (res as u32) < n {
                // Short transfers only happen at EOF or on a full file system: give up cleanly.
                Step::Done(Reply::check(io_error(libc::EIO, true)))
            } else if !task_flag_written(&j) {
                let (dst, dst_off) = (j.dst, j.dst_off);
                j.done |= WRITE_PENDING;
                task.stage = Stage::Copy(j);
                Step::IoAt(
                    dst,
                    IoOp::Write {
                        offset: dst_off,
                        buf_off: 0,
                        len: n,
                        fua: false,
                    },
                )
            } else {
                j.done = (j.done & !WRITE_PENDING) + n as u64;
                j.remaining -= n as u64;
                j.src_off += n as u64;
                j.dst_off += n as u64;
                if j.remaining == 0 {
                    if j.hold {
                        ctx.reg.hold_copy_result(
                            ctx.session_id,
                            j.list_id,
                            crate::xcopy::CopyResult {
                                ok: true,
                                segments_done: 1,
                                bytes: j.done,
                            },
                        );
                    }
                    Step::Done(Reply::good())
                } else {
                    let (src, off, len) =
                        (j.src, j.src_off, (j.chunk as u64).min(j.remaining) as u32);
                    task.stage = Stage::Copy(j);
                    Step::IoAt(
                        src,
                        IoOp::Read {
                            offset: off,
                            buf_off: 0,
                            len,
                        },
                    )
                }
            }
        }
        Stage::Unmapping { ranges, next } => {
            if res < 0 {
                fail(res, true, ranges.get(next).map(|r| r.0).unwrap_or(0))
            } else {
                task.stage = Stage::Unmapping {
                    ranges,
                    next: next + 1,
                };
                begin(task)
            }
        }
        other => {
            debug_assert!(false, "io_done in stage {other:?}");
            Step::Done(Reply::check(Sense::internal_target_failure()))
        }
    };
    let _ = transfer;
    with_format(step, fmt)
}
