//! SCSI command execution (SPC-4 / SBC-3) on a LUN backed by a sparse file.
//!
//! Each command becomes a small state machine: [`start`] decodes and checks it and says
//! what it needs next (write data, a disk operation, or nothing); [`data_ready`] and
//! [`io_done`] advance it. The transport (conn/) moves the bytes; the reactor does the I/O.
//!
//! This file holds what every step shares: the operations and replies a command yields,
//! its stages, the task and its context. The rooms:
//!
//! - `dispatch`: [`start`], and each command's checks and first step (`run`).
//! - `data_out`: write data or a parameter list has arrived ([`data_ready`]).
//! - `completion`: a disk operation finished ([`io_done`]); errno to sense data.
//! - `locking`: range locks and the write-intent log before a change, parked tasks
//!   ([`retry`]), and the first operation of a locked stage.
//! - `read_write`: READ / WRITE / VERIFY field checks, transfer and WRITE ATOMIC limits.
//! - `provisioning`: UNMAP parameter lists and GET LBA STATUS.
//! - `extended_copy`: EXTENDED COPY planning.
//! - `reservations`: PERSISTENT RESERVE OUT.
//! - `sanitize`: SANITIZE parameter lists and the start of a sanitize.
//! - `info`: what a LUN reports: identity and limits, REPORT LUNS, supported opcodes.

use proto::scsi::cdb::Command;
use proto::scsi::sense::{Sense, SenseFormat};

use crate::disk::bufpool::{AlignedBuf, BufPool};
use crate::iscsi::conn::status;
use crate::lun::Lun;
use crate::registry::{Registry, TargetEntry};

mod completion;
mod data_out;
mod dispatch;
mod extended_copy;
mod info;
mod locking;
mod provisioning;
mod read_write;
mod reservations;
mod sanitize;
pub mod sanitize_job;
pub mod unit_attention;

pub use completion::io_done;
pub use data_out::data_ready;
pub use dispatch::{start, ua_exempt};
pub use info::{implemented, lun_info};
pub use locking::retry;
pub use read_write::{ATOMIC_ALIGN_BYTES, MAX_ATOMIC_BYTES, MAX_XFER_BYTES};

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
    /// n zero bytes, sent from one shared buffer ([`zeros`]): a read of chunks that hold no
    /// data (disk/alloc_map.rs), with no task buffer and no file I/O.
    Zeros(usize),
}

/// The zeros every read of a hole is answered from, as long as the largest transfer.
/// Allocated zeroed once (fresh anonymous memory at this size) and only ever read, so its
/// pages stay the kernel's shared zero page: no memory, no page cache. Why not a static: an
/// immutable all-zero static lands in the binary's read-only data (8 MiB of file, and page
/// cache when read).
pub fn zeros() -> &'static [u8] {
    static ZEROS: std::sync::OnceLock<Box<[u8]>> = std::sync::OnceLock::new();
    ZEROS.get_or_init(|| vec![0u8; read_write::MAX_XFER_BYTES].into_boxed_slice())
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
    guard: Option<crate::disk::range_lock::RangeGuard>,
    /// Bytes the CDB transfers, for the residual.
    transfer: u32,
    /// Bytes this command's punches deallocated (UNMAP, WRITE SAME with UNMAP), for the
    /// metrics.
    unmapped: u64,
}

impl ScsiTask {
    pub fn empty() -> Self {
        Self::default()
    }

    /// Bytes this command deallocated so far (its completed punches).
    pub fn unmapped_bytes(&self) -> u64 {
        self.unmapped
    }

    /// The command is done here and its reply waits only for the peer: its range stays
    /// held against writes, but a resync may copy under it (`RangeGuard::park` says why).
    pub fn park_range(&self) {
        if let Some(g) = &self.guard {
            g.park();
        }
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
    /// Set when the command changed the LUN's reservation state (conn/mirror.rs mirrors it).
    pub mirror_pr: std::cell::Cell<bool>,
}

impl<'a> ExecCtx<'a> {
    /// The context of a command on target `target` (the session's entry), LUN `lun`, from the
    /// session `session_id` of `nexus`. One constructor for every path that runs a SCSI
    /// step (a new command, its data, a completed I/O, a retry).
    pub fn new(
        reg: &'a Registry,
        target: &'a TargetEntry,
        (lun, lun_id): (Option<usize>, u64),
        pool: &'a mut BufPool,
        session_id: u64,
        nexus: &'a proto::scsi::pr::Nexus,
    ) -> ExecCtx<'a> {
        ExecCtx {
            reg,
            target,
            lun,
            lun_id,
            pool,
            session_id,
            nexus,
            mirror_pr: Default::default(),
        }
    }
}

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

fn with_format(step: Step, fmt: SenseFormat) -> Step {
    match step {
        Step::Done(mut r) => {
            r.sense_format = fmt;
            Step::Done(r)
        }
        s => s,
    }
}

fn check_writable(lun: &Lun) -> Result<(), Sense> {
    if write_protected(lun) {
        Err(Sense::write_protected())
    } else {
        Ok(())
    }
}

/// The LUN a context addresses (commands past `start` always have one).
fn ctx_lun<'a>(ctx: &ExecCtx<'a>) -> Option<&'a std::sync::Arc<Lun>> {
    ctx.lun.map(|i| &ctx.reg.luns[i])
}

/// Whether no later step of the command writes the task's buffer: it is in its final
/// write (a plain write, or the write-back of COMPARE AND WRITE or ORWRITE), and only a
/// flush or the status can follow. Replication then frames the buffer itself instead of
/// a copy (conn/mirror.rs `mirror`).
pub fn buffer_is_final(task: &ScsiTask) -> bool {
    matches!(task.stage, Stage::Writing { .. })
}
