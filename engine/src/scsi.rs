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
    Read { offset: u64, buf_off: u32, len: u32 },
    Write { offset: u64, buf_off: u32, len: u32, fua: bool },
    /// fdatasync: SYNCHRONIZE CACHE, and the durability point of WRITE AND VERIFY.
    Flush,
}

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
        Reply { status: status::GOOD, sense: None, sense_format: SenseFormat::Fixed, data: ReplyData::None, transfer_bytes: None }
    }
    pub fn check(sense: Sense) -> Self {
        Reply { status: status::CHECK_CONDITION, sense: Some(sense), sense_format: SenseFormat::Fixed, data: ReplyData::None, transfer_bytes: None }
    }
    fn data(v: Vec<u8>, alloc_len: usize) -> Self {
        let mut v = v;
        v.truncate(alloc_len);
        Reply { data: ReplyData::Inline(v), ..Reply::good() }
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
}

/// What a command still has to do.
#[derive(Debug, Default)]
enum Stage {
    #[default]
    Idle,
    /// Reading `len` bytes at `offset` into the buffer; `done` so far.
    Read { offset: u64, len: u32, done: u32, transfer: u32 },
    /// Data arrives for a write of `len` bytes at `offset`.
    WriteData { offset: u64, len: u32, fua: bool, flush_after: bool, transfer: u32 },
    Writing { offset: u64, len: u32, done: u32, fua: bool, flush_after: bool, transfer: u32 },
    Flushing { transfer: u32 },
    /// VERIFY with BYTCHK: data arrives into buf[..len], then the medium is read into
    /// buf[len..2*len] (or, for BYTCHK=3, one block is compared against every block).
    VerifyData { offset: u64, len: u32, one_block: bool },
    VerifyRead { offset: u64, len: u32, done: u32, one_block: bool },
    ModeSelect { ten_byte: bool, pf: bool, sp: bool, len: u32 },
}

/// Per-command state owned by the transport's task.
#[derive(Default)]
pub struct ScsiTask {
    pub buf: Option<AlignedBuf>,
    stage: Stage,
    sense_format: Option<SenseFormat>,
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
}

/// Commands that a pending unit attention does not block (SAM-5 section 5.14 / SPC-4
/// section 5.13: INQUIRY, REPORT LUNS and REQUEST SENSE still run).
pub fn ua_exempt(cdb: &[u8]) -> bool {
    matches!(cdb.first(), Some(0x12) | Some(0xa0) | Some(0x03))
}

/// The identity and limits a LUN reports.
pub fn lun_info(lun: &Lun) -> LunInfo {
    let mut i = LunInfo::new(lun.block_size, lun.num_blocks(), lun.naa_id, &lun.serial, &lun.target_name);
    i.thin = lun.thin;
    i.lbprz = lun.thin;
    i.read_only = lun.read_only;
    i.max_xfer_blocks = (MAX_XFER_BYTES / lun.block_size as usize) as u32;
    i
}

/// Largest single READ/WRITE: MAXIMUM TRANSFER LENGTH in VPD B0 says the same.
pub const MAX_XFER_BYTES: usize = 8 << 20;
const _: () = assert!(MAX_XFER_BYTES * 2 <= MAX_BUF_BYTES, "VERIFY needs two transfers in one buffer");

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
pub fn start(cdb_bytes: &[u8], edtl: u32, _write_flag: bool, ctx: &mut ExecCtx) -> (ScsiTask, Step) {
    let mut task = ScsiTask::default();
    let cmd = match cdb::decode(cdb_bytes) {
        Ok(c) => c,
        Err(e) => return (task, Step::Done(Reply::check(e.sense()))),
    };
    // Commands that need no LUN.
    match cmd {
        Command::ReportLuns { select_report, alloc_len } => return (task, Step::Done(report_luns(ctx, select_report, alloc_len))),
        Command::Inquiry { evpd, page, alloc_len } if ctx.lun.is_none() => {
            // SPC-4 section 6.6.2: peripheral qualifier 011b / type 1Fh for a LUN that is not there.
            if evpd {
                return (task, Step::Done(Reply::check(Sense::invalid_field_in_cdb(1, Some(0)))));
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
            let f = if desc { SenseFormat::Descriptor } else { SenseFormat::Fixed };
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

fn run(cmd: &Command, lun: &Lun, edtl: u32, task: &mut ScsiTask, ctx: &mut ExecCtx) -> Result<Step, Sense> {
    let bs = lun.block_size;
    let info = || lun_info(lun);
    Ok(match *cmd {
        Command::TestUnitReady => Step::Done(Reply::good()),
        Command::RequestSense { desc, alloc_len } => {
            // No deferred errors are kept: report NO SENSE in the format asked for.
            let f = if desc { SenseFormat::Descriptor } else { SenseFormat::Fixed };
            let s = Sense::new(SenseKey::NoSense, Asc::NO_ADDITIONAL_SENSE).encode(f).as_slice().to_vec();
            Step::Done(Reply::data(s, alloc_len as usize))
        }
        Command::Inquiry { evpd, page, alloc_len } => {
            let i = info();
            let v = if evpd {
                proto::scsi::inquiry::vpd_page(&i, page).ok_or_else(|| Sense::invalid_field_in_cdb(2, None))?
            } else {
                proto::scsi::inquiry::standard_inquiry(&i)
            };
            Step::Done(Reply::data(v, alloc_len as usize))
        }
        Command::ReadCapacity10 => Step::Done(Reply::data(proto::scsi::capacity::read_capacity10(&info()).to_vec(), 8)),
        Command::ReadCapacity16 { alloc_len } => Step::Done(Reply::data(proto::scsi::capacity::read_capacity16(&info()).to_vec(), alloc_len as usize)),
        Command::ModeSense(ms) => {
            let state = lun.mode_state();
            let v = proto::scsi::mode::mode_sense(&info(), &state, &ms)?;
            Step::Done(Reply::data(v, ms.alloc_len as usize))
        }
        Command::ModeSelect { ten_byte, pf, sp, param_len } => {
            if param_len == 0 {
                return Ok(Step::Done(Reply::good()));
            }
            task.buf = Some(ctx.pool.get(param_len as usize));
            task.stage = Stage::ModeSelect { ten_byte, pf, sp, len: param_len as u32 };
            Step::NeedData(param_len as u32)
        }
        Command::ReportSupportedOpcodes { rctd, reporting_options, requested_opcode, requested_service_action, alloc_len } => {
            let v = proto::scsi::rsoc::report_supported_opcodes(&proto::scsi::rsoc::Filter::new(implemented), rctd, reporting_options, requested_opcode, requested_service_action)?;
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
        Command::Read { rw, .. } => {
            check_rw_fields(&rw, true)?;
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
            task.stage = Stage::Read { offset, len, done: 0, transfer };
            Step::Io(IoOp::Read { offset, buf_off: 0, len })
        }
        Command::Write { rw, .. } | Command::WriteAndVerify { rw, .. } => {
            let bytchk = match *cmd {
                Command::WriteAndVerify { bytchk, .. } => bytchk,
                _ => 0,
            };
            if bytchk > 1 {
                return Err(Sense::invalid_field_in_cdb(1, Some(2)));
            }
            check_rw_fields(&rw, true)?;
            check_range(lun, rw.lba, rw.blocks as u64)?;
            if write_protected(lun) {
                return Err(Sense::write_protected());
            }
            let transfer = rw.blocks.saturating_mul(bs);
            if edtl < transfer && edtl % bs != 0 {
                // A partial block cannot be written atomically from what the initiator
                // will send: refuse without writing (libiscsi accepts 0E/03 here).
                return Ok(Step::Done(Reply::check(Sense::illegal_request(Asc(0x0e, 0x03))).transfer(transfer)));
            }
            let len = transfer.min(edtl);
            if len == 0 {
                return Ok(Step::Done(Reply::good().transfer(transfer)));
            }
            task.buf = Some(ctx.pool.get(len as usize));
            // WRITE AND VERIFY: the data must be on the medium before it is "verified".
            let flush_after = matches!(cmd, Command::WriteAndVerify { .. });
            task.stage = Stage::WriteData { offset: byte_offset(lun, rw.lba), len, fua: rw.fua, flush_after, transfer };
            Step::NeedData(len)
        }
        Command::Verify { rw, bytchk, .. } => {
            check_rw_fields(&rw, false)?;
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
            task.stage = Stage::VerifyData { offset: byte_offset(lun, rw.lba), len, one_block };
            Step::NeedData(data_len)
        }
        Command::SynchronizeCache { lba, blocks, .. } => {
            check_range(lun, lba, blocks as u64)?;
            task.stage = Stage::Flushing { transfer: 0 };
            Step::Io(IoOp::Flush)
        }
        Command::PersistentReserveIn { action, alloc_len } => {
            // No registrations can exist until PERSISTENT RESERVE OUT is implemented: the
            // truthful answer is an empty key list and no reservation, generation 0.
            use proto::scsi::cdb::PrInAction;
            match action {
                PrInAction::ReadKeys | PrInAction::ReadReservation => Step::Done(Reply::data(vec![0u8; 8], alloc_len as usize)),
                _ => return Err(Sense::invalid_field_in_cdb(1, Some(4))),
            }
        }
        Command::PreFetch { lba, blocks, .. } => {
            check_range(lun, lba, blocks as u64)?;
            Step::Done(Reply::good())
        }
        _ => return Err(Sense::invalid_opcode()),
    })
}

/// Whether the engine implements an opcode / service action (for REPORT SUPPORTED
/// OPERATION CODES: we list exactly what [`run`] handles).
pub fn implemented(opcode: u8, service_action: Option<u16>) -> bool {
    use cdb::op::*;
    match opcode {
        TEST_UNIT_READY | REQUEST_SENSE | READ_6 | WRITE_6 | INQUIRY | MODE_SELECT_6 | MODE_SENSE_6 | START_STOP_UNIT | READ_CAPACITY_10 | READ_10 | WRITE_10
        | WRITE_VERIFY_10 | VERIFY_10 | PRE_FETCH_10 | SYNC_CACHE_10 | MODE_SELECT_10 | MODE_SENSE_10 | READ_16 | WRITE_16 | WRITE_VERIFY_16 | VERIFY_16
        | PRE_FETCH_16 | SYNC_CACHE_16 | REPORT_LUNS | READ_12 | WRITE_12 | WRITE_VERIFY_12 | VERIFY_12 => true,
        SERVICE_ACTION_IN_16 => service_action == Some(0x10),
        PR_IN => matches!(service_action, Some(0) | Some(1)),
        MAINTENANCE_IN => service_action == Some(0x0c),
        _ => false,
    }
}

/// RD/WR/VRPROTECT must be zero on a LUN without protection information (SBC-3 section
/// 4.22); DPO and FUA are honoured (MODE SENSE reports DPOFUA).
fn check_rw_fields(rw: &Rw, _write: bool) -> Result<(), Sense> {
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
    let ids: Vec<u64> = ctx.target.luns.iter().map(|&(id, _)| id).collect();
    Reply::data(proto::scsi::report_luns::report_luns(&ids), alloc_len as usize)
}

/// All write data has arrived.
pub fn data_ready(task: &mut ScsiTask, ctx: &mut ExecCtx) -> Step {
    let fmt = task.sense_format.unwrap_or(SenseFormat::Fixed);
    let step = match std::mem::take(&mut task.stage) {
        Stage::WriteData { offset, len, fua, flush_after, transfer } => {
            task.stage = Stage::Writing { offset, len, done: 0, fua, flush_after, transfer };
            Step::Io(IoOp::Write { offset, buf_off: 0, len, fua })
        }
        Stage::VerifyData { offset, len, one_block } => {
            let data_len = if one_block { ctx.lun.map(|l| ctx.reg.luns[l].block_size).unwrap_or(512) } else { len };
            task.stage = Stage::VerifyRead { offset, len, done: 0, one_block };
            Step::Io(IoOp::Read { offset, buf_off: data_len, len })
        }
        Stage::ModeSelect { ten_byte, pf, sp, len } => {
            let Some(lun_idx) = ctx.lun else { return Step::Done(Reply::check(Sense::lun_not_supported())) };
            let lun = &ctx.reg.luns[lun_idx];
            let params = task.buf.as_deref().map(|b| &b[..(len as usize).min(b.len())]).unwrap_or(&[]);
            let mut state = lun.mode.lock().unwrap_or_else(|p| p.into_inner());
            let before = state.clone();
            match proto::scsi::mode::mode_select(&lun_info(lun), &mut state, pf, sp, params, ten_byte) {
                Ok(()) => {
                    if *state != before {
                        drop(state);
                        // SPC-4 section 6.11: other nexuses learn of the change by UA.
                        lun.ua.raise_state_change(ctx.session_id, Asc::MODE_PARAMETERS_CHANGED, lun.mode_tag());
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

/// Maps a failed disk operation to sense data.
fn io_error(errno: i32, writing: bool) -> Sense {
    match errno {
        // A thin LUN whose file system is full: SBC-3 section 4.7.3.6.
        libc::ENOSPC | libc::EDQUOT => Sense::new(SenseKey::DataProtect, Asc::SPACE_ALLOCATION_FAILED_WRITE_PROTECT),
        libc::EROFS => Sense::write_protected(),
        _ if writing => Sense::medium_error(Asc::WRITE_ERROR),
        _ => Sense::medium_error(Asc::UNRECOVERED_READ_ERROR),
    }
}

/// A disk operation finished with `res` (bytes transferred, or -errno).
pub fn io_done(task: &mut ScsiTask, res: i32, ctx: &mut ExecCtx) -> Step {
    let fmt = task.sense_format.unwrap_or(SenseFormat::Fixed);
    let _ = &ctx;
    let step = match std::mem::take(&mut task.stage) {
        Stage::Read { offset, len, done, transfer } => {
            if res < 0 {
                tracing::warn!(errno = -res, offset, "read failed");
                Step::Done(Reply::check(io_error(-res, false)))
            } else if res == 0 {
                // The file is sized to the LUN; EOF inside it means it was truncated under us.
                Step::Done(Reply::check(Sense::medium_error(Asc::UNRECOVERED_READ_ERROR)))
            } else {
                let done = done + res as u32;
                if done < len {
                    task.stage = Stage::Read { offset, len, done, transfer };
                    Step::Io(IoOp::Read { offset: offset + done as u64, buf_off: done, len: len - done })
                } else {
                    Step::Done(Reply { data: ReplyData::Buf(len as usize), ..Reply::good() }.transfer(transfer))
                }
            }
        }
        Stage::Writing { offset, len, done, fua, flush_after, transfer } => {
            if res < 0 {
                tracing::warn!(errno = -res, offset, "write failed");
                Step::Done(Reply::check(io_error(-res, true)).transfer(transfer))
            } else if res == 0 {
                Step::Done(Reply::check(Sense::medium_error(Asc::WRITE_ERROR)).transfer(transfer))
            } else {
                let done = done + res as u32;
                if done < len {
                    task.stage = Stage::Writing { offset, len, done, fua, flush_after, transfer };
                    Step::Io(IoOp::Write { offset: offset + done as u64, buf_off: done, len: len - done, fua })
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
                tracing::warn!(errno = -res, "fdatasync failed");
                Step::Done(Reply::check(io_error(-res, true)))
            } else if transfer > 0 {
                Step::Done(Reply::good().transfer(transfer))
            } else {
                Step::Done(Reply::good())
            }
        }
        Stage::VerifyRead { offset, len, done, one_block } => {
            if res <= 0 {
                Step::Done(Reply::check(io_error(-res.min(-libc::EIO), false)))
            } else {
                let done = done + res as u32;
                let Some(buf) = task.buf.as_deref() else { return Step::Done(Reply::check(Sense::internal_target_failure())) };
                let bs = ctx.lun.map(|l| ctx.reg.luns[l].block_size).unwrap_or(512);
                let data_len = if one_block { bs } else { len };
                if done < len {
                    task.stage = Stage::VerifyRead { offset, len, done, one_block };
                    Step::Io(IoOp::Read { offset: offset + done as u64, buf_off: data_len + done, len: len - done })
                } else {
                    let (given, medium) = buf.split_at(data_len as usize);
                    let mismatch = if one_block {
                        medium[..len as usize].chunks(bs as usize).enumerate().find_map(|(i, blk)| {
                            blk.iter().zip(given).position(|(a, b)| a != b).map(|p| i * bs as usize + p)
                        })
                    } else {
                        given.iter().zip(&medium[..len as usize]).position(|(a, b)| a != b)
                    };
                    match mismatch {
                        // SBC-3 section 5.29: INFORMATION is the offset of the first miscompare.
                        Some(at) => Step::Done(Reply::check(Sense::miscompare(at as u64))),
                        None => Step::Done(Reply::good()),
                    }
                }
            }
        }
        other => {
            debug_assert!(false, "io_done in stage {other:?}");
            Step::Done(Reply::check(Sense::internal_target_failure()))
        }
    };
    with_format(step, fmt)
}
