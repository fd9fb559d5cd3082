//! The start of a command: decoding, the checks every command passes (LUN, standby,
//! reservations, sanitize), and each command's own checks and first step.

use proto::scsi::cdb::{self, Command};
use proto::scsi::sense::{Asc, Sense, SenseFormat, SenseKey};

use super::info::{implemented, lun_info, report_luns};
use super::locking::retry;
use super::provisioning::lba_status;
use super::read_write::{check_atomic, check_rw_fields};
use super::sanitize::start_sanitize;
use super::{
    byte_offset, check_range, check_writable, data_ready, sense_format, status, with_format,
    ExecCtx, IoOp, Reply, ScsiTask, Stage, Step,
};
use crate::lun::Lun;

/// Commands that a pending unit attention does not block (SAM-5 section 5.14 / SPC-4
/// section 5.13: INQUIRY, REPORT LUNS and REQUEST SENSE still run).
pub fn ua_exempt(cdb: &[u8]) -> bool {
    matches!(cdb.first(), Some(0x12) | Some(0xa0) | Some(0x03))
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
            // Read whole blocks; the transport sends only the first `want` bytes. The
            // buffer is taken once the read can start (locking.rs): a hole needs none.
            let len = want.div_ceil(bs) * bs;
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
            // After the checks of the command itself, as LIO and libiscsi's tests order
            // them: a malformed command on a write-protected LUN is reported as malformed;
            // one that writes nothing is no error (SBC-4 5.x, TRANSFER LENGTH zero).
            check_writable(lun)?;
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
            check_writable(lun)?;
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
            // Before the Data-Out length: libiscsi's ReadOnlySBC sends WRITE SAME without
            // its block and expects WRITE PROTECTED (its WriteSame InvalidDataOutSize
            // expects the length refused first: both cannot pass, and the read-only test
            // is the one a read-only LUN is judged by).
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
                    start_sanitize(
                        task,
                        ctx,
                        crate::scsi::sanitize_job::Kind::BlockErase,
                        immed,
                    )
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
            if param_len as usize > 16 + proto::scsi::xcopy::MAX_DESCRIPTOR_LIST_BYTES as usize {
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
                CopyResultsAction::OperatingParameters => {
                    proto::scsi::xcopy::operating_parameters()
                }
                CopyResultsAction::CopyStatus => match ctx.reg.copy_result(ctx.session_id, list_id)
                {
                    Some(r) => proto::scsi::xcopy::copy_status(&r),
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
