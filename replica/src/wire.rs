//! The replica link's framed, checksummed messages.
//!
//! Every frame is a fixed 24-byte header followed by a body:
//!
//! | bytes | field |
//! |-------|-------|
//! | 0..4  | magic `TWRP` |
//! | 4     | version (1) |
//! | 5     | message type |
//! | 6..8  | flags (reserved, must be 0) |
//! | 8..12 | body length in bytes (little endian, at most [`BODY_BYTES_MAX`]) |
//! | 12..20| sequence number (the sender's; an [`Message::Ack`] names the sequence it answers) |
//! | 20..24| CRC32C of header bytes 0..20 followed by the body |
//!
//! Bodies are little endian. Every field is validated once, at decode, into a typed [`Message`] or a
//! typed [`WireError`]; a frame whose header is bad is rejected before its body is buffered.

use crate::bitmap::{le_u32, le_u64};
use crate::genid::{GenFlags, GenIds};
use crate::snapshot::{SnapOp, SnapshotName};
pub use snapshot::SNAPSHOTS_PER_LUN_MAX;

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"TWRP";
/// Wire protocol version (5: the snapshot messages).
pub const VERSION: u8 = 5;
/// Size of the fixed frame header.
pub const HEADER_BYTES: usize = 24;
/// Largest data payload of one message (write, resync, PR state, bitmap).
pub const DATA_BYTES_MAX: usize = 16 << 20;
/// Largest body: the largest payload plus room for the fixed fields around it.
pub const BODY_BYTES_MAX: usize = DATA_BYTES_MAX + 64;
/// Longest node id.
pub const NODE_ID_BYTES_MAX: usize = 64;
/// Most LUNs in one hello.
pub const LUNS_MAX: usize = 4096;
/// [`Message::Hello::link`] of a connection that is not a per-core write link.
pub const LINK_NONE: u16 = u16::MAX;
/// Largest persistent-reservation state blob.
pub const PR_STATE_BYTES_MAX: usize = 1 << 20;
/// Most bytes a [`Decoder`] buffers: one whole frame of the largest size.
pub const DECODER_BUFFER_MAX: usize = HEADER_BYTES + BODY_BYTES_MAX;

/// Why bytes could not be decoded into a message. Any error ends the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// Not a replica frame.
    #[error("bad frame magic")]
    BadMagic,
    /// A protocol version we do not speak.
    #[error("unsupported wire version {0}")]
    BadVersion(u8),
    /// Unknown message type.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// Reserved flags set.
    #[error("reserved frame flags {0:#x} set")]
    ReservedFlags(u16),
    /// Body longer than the limit.
    #[error("frame body of {0} bytes exceeds the limit")]
    BodyTooLong(u32),
    /// Header+body checksum mismatch.
    #[error("frame checksum mismatch")]
    BadChecksum,
    /// Body shorter or longer than its type needs.
    #[error("body of message type {msg_type} has a bad length {len}")]
    BadBodyLength {
        /// Message type.
        msg_type: u8,
        /// Body length.
        len: usize,
    },
    /// A field is out of its range (named).
    #[error("invalid field: {0}")]
    BadField(&'static str),
    /// The decoder was fed more than it may buffer (pull messages first).
    #[error("decoder buffer full")]
    BufferFull,
    /// The decoder saw an error earlier; the connection must be dropped.
    #[error("decoder poisoned by an earlier error")]
    Poisoned,
}

/// Per-LUN state in a hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LunHello {
    /// Stable id of the LUN (same on both nodes).
    pub lun_key: u64,
    /// LUN size.
    pub size_bytes: u64,
    /// Bitmap region size.
    pub region_bytes: u64,
    /// Generation ids.
    pub gen: GenIds,
    /// Outdated / inconsistent / primary.
    pub flags: GenFlags,
}

/// Status in an ack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AckStatus {
    /// Done (durable if the request asked for FUA, or was a flush or resync data).
    Ok,
    /// The peer's write failed with this errno.
    IoError(i32),
    /// The peer ran out of space (thin backing file).
    NoSpace,
    /// The peer refuses (not secondary for this LUN, unknown LUN, split brain...).
    Refused,
}

/// One replica link message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// First message on a connection: who we are and the state of every LUN.
    Hello {
        /// Node id (at most 64 bytes of UTF-8).
        node_id: String,
        /// Every replicated LUN.
        luns: Vec<LunHello>,
        /// Which of the sender's per-core links this connection is ([`LINK_NONE`] for the
        /// resync and verify connection), so that the receiver can keep the thread that
        /// serves it off that core's CPU.
        link: u16,
    },
    /// Our nonce for the mutual challenge-response (see [`crate::auth`]).
    AuthChallenge {
        /// Fresh random nonce.
        nonce: [u8; 32],
    },
    /// Our proof of the pre-shared key.
    AuthResponse {
        /// HMAC-SHA256 over our role label, both nonces and both node ids.
        mac: [u8; 32],
    },
    /// Mirror a write.
    Write {
        /// LUN.
        lun_key: u64,
        /// Byte offset.
        offset_bytes: u64,
        /// Ack only once durable.
        fua: bool,
        /// The data.
        data: Vec<u8>,
    },
    /// Mirror a WRITE SAME of zeros / UNMAP.
    WriteZeroes {
        /// LUN.
        lun_key: u64,
        /// Byte offset.
        offset_bytes: u64,
        /// Byte length.
        len_bytes: u64,
        /// Deallocate (punch a hole) rather than write zeros.
        unmap: bool,
    },
    /// Make every write acked so far durable.
    Flush {
        /// LUN.
        lun_key: u64,
    },
    /// Persistent reservation state to store.
    PrState {
        /// LUN.
        lun_key: u64,
        /// The sending primary's instance (random per start): versions compare only
        /// within one instance.
        origin: u64,
        /// Increases with every state change at `origin`: PR OUTs on different cores
        /// travel on different links, and an older snapshot must not replace a newer one.
        version: u64,
        /// Opaque encoded state.
        state: Vec<u8>,
    },
    /// Answer to the frame with sequence `seq`.
    Ack {
        /// Sequence being answered.
        seq: u64,
        /// Outcome.
        status: AckStatus,
    },
    /// One piece of the resync stream (the target writes it durably before acking).
    ResyncData {
        /// LUN.
        lun_key: u64,
        /// Byte offset.
        offset_bytes: u64,
        /// The data.
        data: Vec<u8>,
    },
    /// The resync is complete: adopt these ids (persist before acking).
    ResyncDone {
        /// LUN.
        lun_key: u64,
        /// The source's ids, which the target adopts.
        gen: GenIds,
    },
    /// Ask for a region's digest (online verify).
    VerifyRequest {
        /// LUN.
        lun_key: u64,
        /// Region index.
        region: u64,
    },
    /// A region's digest.
    VerifyDigest {
        /// LUN.
        lun_key: u64,
        /// Region index.
        region: u64,
        /// SHA-256 of the region.
        digest: [u8; 32],
    },
    /// Liveness probe.
    Ping {
        /// Sender's clock.
        now_ms: u64,
    },
    /// Liveness answer.
    Pong {
        /// The `now_ms` of the ping answered.
        now_ms: u64,
    },
    /// How far the resync into the receiver has come (sent by the sync source at the start
    /// and about once a second, so that the sync target's `status` can say it too).
    ResyncProgress {
        /// LUN.
        lun_key: u64,
        /// Bytes of the planned regions copied so far (at most `total_bytes`).
        done_bytes: u64,
        /// Bytes of all regions this resync copies (grows when a pass finds new dirt).
        total_bytes: u64,
        /// The source's estimate of the time left, in milliseconds (`u64::MAX`: none yet).
        eta_ms: u64,
    },
    /// The sender's dirty bitmap for a LUN, sent after the hello so the sync source can merge the
    /// regions where the sender itself may differ (a crashed primary's unacknowledged tail).
    DirtyBitmap {
        /// LUN.
        lun_key: u64,
        /// [`crate::bitmap::Bitmap::encode`] output.
        bitmap: Vec<u8>,
    },
    /// A step of a snapshot cut, delete or rollback the primary orders ([`crate::snapshot`]);
    /// answered with an ack.
    Snapshot {
        /// LUN.
        lun_key: u64,
        /// What to do.
        op: SnapOp,
        /// The snapshot's id (the same on both nodes).
        guid: u64,
        /// Its name.
        name: SnapshotName,
    },
    /// The primary's committed snapshots of a LUN, sent when the pair reconnects: the
    /// secondary follows it ([`crate::snapshot::reconcile`]); answered with an ack.
    SnapshotList {
        /// LUN.
        lun_key: u64,
        /// Their ids (at most [`SNAPSHOTS_PER_LUN_MAX`]).
        guids: Vec<u64>,
    },
}

mod msg_type {
    pub const HELLO: u8 = 1;
    pub const AUTH_CHALLENGE: u8 = 2;
    pub const AUTH_RESPONSE: u8 = 3;
    pub const WRITE: u8 = 4;
    pub const WRITE_ZEROES: u8 = 5;
    pub const FLUSH: u8 = 6;
    pub const PR_STATE: u8 = 7;
    pub const ACK: u8 = 8;
    pub const RESYNC_DATA: u8 = 9;
    pub const RESYNC_DONE: u8 = 10;
    pub const VERIFY_REQUEST: u8 = 11;
    pub const VERIFY_DIGEST: u8 = 12;
    pub const PING: u8 = 13;
    pub const PONG: u8 = 14;
    pub const DIRTY_BITMAP: u8 = 15;
    pub const RESYNC_PROGRESS: u8 = 16;
    pub const SNAPSHOT: u8 = 17;
    pub const SNAPSHOT_LIST: u8 = 18;
}

impl Message {
    fn type_code(&self) -> u8 {
        use msg_type::*;
        match self {
            Message::Hello { .. } => HELLO,
            Message::AuthChallenge { .. } => AUTH_CHALLENGE,
            Message::AuthResponse { .. } => AUTH_RESPONSE,
            Message::Write { .. } => WRITE,
            Message::WriteZeroes { .. } => WRITE_ZEROES,
            Message::Flush { .. } => FLUSH,
            Message::PrState { .. } => PR_STATE,
            Message::Ack { .. } => ACK,
            Message::ResyncData { .. } => RESYNC_DATA,
            Message::ResyncDone { .. } => RESYNC_DONE,
            Message::VerifyRequest { .. } => VERIFY_REQUEST,
            Message::VerifyDigest { .. } => VERIFY_DIGEST,
            Message::Ping { .. } => PING,
            Message::Pong { .. } => PONG,
            Message::DirtyBitmap { .. } => DIRTY_BITMAP,
            Message::ResyncProgress { .. } => RESYNC_PROGRESS,
            Message::Snapshot { .. } => SNAPSHOT,
            Message::SnapshotList { .. } => SNAPSHOT_LIST,
        }
    }
}

const LUN_FLAG_OUTDATED: u8 = 1;
const LUN_FLAG_INCONSISTENT: u8 = 2;
const LUN_FLAG_PRIMARY: u8 = 4;
const LUN_FLAG_CRASHED: u8 = 8;
const LUN_HELLO_BYTES: usize = 8 * 3 + 8 * 4 + 1;

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_gen(out: &mut Vec<u8>, gen: &GenIds) {
    for value in [gen.current, gen.bitmap, gen.history[0], gen.history[1]] {
        put_u64(out, value);
    }
}

/// An ack's body: the sequence answered, the outcome's code and errno.
fn put_ack_body(seq: u64, status: AckStatus, out: &mut Vec<u8>) {
    put_u64(out, seq);
    let (code, errno) = match status {
        AckStatus::Ok => (0u8, 0i32),
        AckStatus::IoError(errno) => (1, errno),
        AckStatus::NoSpace => (2, 0),
        AckStatus::Refused => (3, 0),
    };
    out.push(code);
    out.extend_from_slice(&errno.to_le_bytes());
}

/// A hello's body: node id, link, and each LUN's geometry, ids and flags.
fn put_hello_body(node_id: &str, luns: &[LunHello], link: u16, out: &mut Vec<u8>) {
    assert!(node_id.len() <= NODE_ID_BYTES_MAX, "node id too long");
    assert!(luns.len() <= LUNS_MAX, "too many LUNs in hello");
    out.push(node_id.len() as u8);
    out.extend_from_slice(node_id.as_bytes());
    out.extend_from_slice(&link.to_le_bytes());
    out.extend_from_slice(&(luns.len() as u32).to_le_bytes());
    for lun in luns {
        put_u64(out, lun.lun_key);
        put_u64(out, lun.size_bytes);
        put_u64(out, lun.region_bytes);
        put_gen(out, &lun.gen);
        out.push(
            (u8::from(lun.flags.outdated) * LUN_FLAG_OUTDATED)
                | (u8::from(lun.flags.inconsistent) * LUN_FLAG_INCONSISTENT)
                | (u8::from(lun.flags.primary) * LUN_FLAG_PRIMARY)
                | (u8::from(lun.flags.crashed) * LUN_FLAG_CRASHED),
        );
    }
}

/// Appends one frame carrying `msg` with sequence `seq` to `out`.
///
/// Panics if the message breaks a limit (payload over [`DATA_BYTES_MAX`], node id over 64 bytes,
/// more than [`LUNS_MAX`] LUNs): the sender builds these, so that is a bug, not bad input.
pub fn encode(msg: &Message, seq: u64, out: &mut Vec<u8>) {
    let start = begin_frame(msg.type_code(), seq, out);
    match msg {
        Message::Hello {
            node_id,
            luns,
            link,
        } => put_hello_body(node_id, luns, *link, out),
        Message::AuthChallenge { nonce } => out.extend_from_slice(nonce),
        Message::AuthResponse { mac } => out.extend_from_slice(mac),
        Message::Write {
            lun_key,
            offset_bytes,
            fua,
            data,
        } => put_write_body(
            &WriteRef {
                lun_key: *lun_key,
                offset_bytes: *offset_bytes,
                fua: *fua,
                data,
            },
            out,
        ),
        Message::WriteZeroes {
            lun_key,
            offset_bytes,
            len_bytes,
            unmap,
        } => {
            put_u64(out, *lun_key);
            put_u64(out, *offset_bytes);
            put_u64(out, *len_bytes);
            out.push(u8::from(*unmap));
        }
        Message::Flush { lun_key } => put_u64(out, *lun_key),
        Message::PrState {
            lun_key,
            origin,
            version,
            state,
        } => {
            assert!(state.len() <= PR_STATE_BYTES_MAX, "PR state too long");
            put_u64(out, *lun_key);
            put_u64(out, *origin);
            put_u64(out, *version);
            out.extend_from_slice(state);
        }
        Message::Ack { seq, status } => put_ack_body(*seq, *status, out),
        Message::ResyncData {
            lun_key,
            offset_bytes,
            data,
        } => {
            assert!(data.len() <= DATA_BYTES_MAX, "resync payload too long");
            put_u64(out, *lun_key);
            put_u64(out, *offset_bytes);
            out.extend_from_slice(data);
        }
        Message::ResyncDone { lun_key, gen } => {
            put_u64(out, *lun_key);
            put_gen(out, gen);
        }
        Message::VerifyRequest { lun_key, region } => {
            put_u64(out, *lun_key);
            put_u64(out, *region);
        }
        Message::VerifyDigest {
            lun_key,
            region,
            digest,
        } => {
            put_u64(out, *lun_key);
            put_u64(out, *region);
            out.extend_from_slice(digest);
        }
        Message::Ping { now_ms } | Message::Pong { now_ms } => put_u64(out, *now_ms),
        Message::DirtyBitmap { lun_key, bitmap } => {
            assert!(bitmap.len() <= DATA_BYTES_MAX, "bitmap too long");
            put_u64(out, *lun_key);
            out.extend_from_slice(bitmap);
        }
        Message::ResyncProgress {
            lun_key,
            done_bytes,
            total_bytes,
            eta_ms,
        } => {
            assert!(
                done_bytes <= total_bytes,
                "resync progress beyond its total"
            );
            for value in [*lun_key, *done_bytes, *total_bytes, *eta_ms] {
                put_u64(out, value);
            }
        }
        Message::Snapshot { .. } | Message::SnapshotList { .. } => snapshot::put_body(msg, out),
    }
    finish_frame(start, out);
}

/// Appends the frame of a mirrored write whose bytes are borrowed (the primary frames the
/// task's own buffer, without first copying it into a [`Message::Write`]). The bytes are
/// exactly those of `encode` for the same `Message::Write`.
pub fn encode_write(write: &WriteRef<'_>, seq: u64, out: &mut Vec<u8>) {
    let start = begin_frame(msg_type::WRITE, seq, out);
    put_write_body(write, out);
    finish_frame(start, out);
}

/// Appends a frame header with the length and checksum left zero; returns where it starts.
fn begin_frame(msg_type: u8, seq: u64, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(msg_type);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // body length, patched by finish_frame
    put_u64(out, seq);
    out.extend_from_slice(&0u32.to_le_bytes()); // checksum, patched by finish_frame
    debug_assert_eq!(out.len() - start, HEADER_BYTES);
    start
}

/// Patches the body length and checksum of the frame that starts at `start`.
fn finish_frame(start: usize, out: &mut [u8]) {
    let body_start = start + HEADER_BYTES;
    let body_len = out.len() - body_start;
    assert!(body_len <= BODY_BYTES_MAX);
    out[start + 8..start + 12].copy_from_slice(&(body_len as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[start..start + 20]), &out[body_start..]);
    out[start + 20..start + 24].copy_from_slice(&crc.to_le_bytes());
}

fn put_write_body(write: &WriteRef<'_>, out: &mut Vec<u8>) {
    assert!(write.data.len() <= DATA_BYTES_MAX, "write payload too long");
    put_u64(out, write.lun_key);
    put_u64(out, write.offset_bytes);
    out.push(u8::from(write.fua));
    out.extend_from_slice(write.data);
}

/// A validated frame header.
struct Header {
    msg_type: u8,
    body_len: usize,
    seq: u64,
    crc: u32,
}

/// Validates a header (exactly [`HEADER_BYTES`]) without needing the body.
fn parse_header(bytes: &[u8]) -> Result<Header, WireError> {
    debug_assert!(bytes.len() >= HEADER_BYTES);
    if bytes[0..4] != MAGIC {
        return Err(WireError::BadMagic);
    }
    if bytes[4] != VERSION {
        return Err(WireError::BadVersion(bytes[4]));
    }
    let msg_type = bytes[5];
    if !(msg_type::HELLO..=msg_type::SNAPSHOT_LIST).contains(&msg_type) {
        return Err(WireError::UnknownType(msg_type));
    }
    let flags = u16::from_le_bytes([bytes[6], bytes[7]]);
    if flags != 0 {
        return Err(WireError::ReservedFlags(flags));
    }
    let body_len = le_u32(&bytes[8..12]);
    if body_len as usize > BODY_BYTES_MAX {
        return Err(WireError::BodyTooLong(body_len));
    }
    Ok(Header {
        msg_type,
        body_len: body_len as usize,
        seq: le_u64(&bytes[12..20]),
        crc: le_u32(&bytes[20..24]),
    })
}

/// A cursor over a body that turns every short read into a typed error.
struct Reader<'a> {
    bytes: &'a [u8],
    msg_type: u8,
    len: usize,
}

impl<'a> Reader<'a> {
    fn short(&self) -> WireError {
        WireError::BadBodyLength {
            msg_type: self.msg_type,
            len: self.len,
        }
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], WireError> {
        if self.bytes.len() < count {
            return Err(self.short());
        }
        let (head, tail) = self.bytes.split_at(count);
        self.bytes = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(le_u64(self.take(8)?))
    }

    fn bool(&mut self, name: &'static str) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::BadField(name)),
        }
    }

    fn array32(&mut self) -> Result<[u8; 32], WireError> {
        let mut array = [0u8; 32];
        array.copy_from_slice(self.take(32)?);
        Ok(array)
    }

    fn gen(&mut self) -> Result<GenIds, WireError> {
        Ok(GenIds {
            current: self.u64()?,
            bitmap: self.u64()?,
            history: [self.u64()?, self.u64()?],
        })
    }

    fn rest(&mut self, limit: usize, name: &'static str) -> Result<Vec<u8>, WireError> {
        self.rest_ref(limit, name).map(<[u8]>::to_vec)
    }

    fn rest_ref(&mut self, limit: usize, name: &'static str) -> Result<&'a [u8], WireError> {
        if self.bytes.len() > limit {
            return Err(WireError::BadField(name));
        }
        Ok(std::mem::take(&mut self.bytes))
    }

    fn finish(self) -> Result<(), WireError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(self.short())
        }
    }
}

/// A [`Message::Write`] whose data stays where it was received: the secondary applies
/// every mirrored write from its receive buffer, without a copy per write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteRef<'a> {
    /// LUN.
    pub lun_key: u64,
    /// Where.
    pub offset_bytes: u64,
    /// Durable before the ack.
    pub fua: bool,
    /// The bytes.
    pub data: &'a [u8],
}

/// One decoded frame: a write borrowed from the input, any other message owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A mirrored write.
    Write(WriteRef<'a>),
    /// Anything else.
    Other(Message),
}

fn parse_write<'a>(reader: &mut Reader<'a>) -> Result<WriteRef<'a>, WireError> {
    Ok(WriteRef {
        lun_key: reader.u64()?,
        offset_bytes: reader.u64()?,
        fua: reader.bool("fua")?,
        data: reader.rest_ref(DATA_BYTES_MAX, "write data length")?,
    })
}

fn parse_hello(reader: &mut Reader<'_>) -> Result<Message, WireError> {
    let id_len = reader.u8()? as usize;
    if id_len > NODE_ID_BYTES_MAX {
        return Err(WireError::BadField("node_id length"));
    }
    let node_id = std::str::from_utf8(reader.take(id_len)?)
        .map_err(|_| WireError::BadField("node_id utf-8"))?
        .to_owned();
    let link = u16::from_le_bytes([reader.u8()?, reader.u8()?]);
    let count = le_u32(reader.take(4)?) as usize;
    // The count is checked against the limit and the bytes present before allocating.
    if count > LUNS_MAX || reader.bytes.len() != count * LUN_HELLO_BYTES {
        return Err(WireError::BadField("lun count"));
    }
    let mut luns = Vec::with_capacity(count);
    for _ in 0..count {
        let lun_key = reader.u64()?;
        let size_bytes = reader.u64()?;
        let region_bytes = reader.u64()?;
        let gen = reader.gen()?;
        let flags = reader.u8()?;
        if flags
            & !(LUN_FLAG_OUTDATED | LUN_FLAG_INCONSISTENT | LUN_FLAG_PRIMARY | LUN_FLAG_CRASHED)
            != 0
        {
            return Err(WireError::BadField("lun flags"));
        }
        let flags = GenFlags {
            outdated: flags & LUN_FLAG_OUTDATED != 0,
            inconsistent: flags & LUN_FLAG_INCONSISTENT != 0,
            primary: flags & LUN_FLAG_PRIMARY != 0,
            crashed: flags & LUN_FLAG_CRASHED != 0,
        };
        luns.push(LunHello {
            lun_key,
            size_bytes,
            region_bytes,
            gen,
            flags,
        });
    }
    Ok(Message::Hello {
        node_id,
        luns,
        link,
    })
}

fn parse_ack(reader: &mut Reader<'_>) -> Result<Message, WireError> {
    let seq = reader.u64()?;
    let code = reader.u8()?;
    let errno = le_u32(reader.take(4)?) as i32;
    let status = match (code, errno) {
        (0, 0) => AckStatus::Ok,
        (1, errno) => AckStatus::IoError(errno),
        (2, 0) => AckStatus::NoSpace,
        (3, 0) => AckStatus::Refused,
        _ => return Err(WireError::BadField("ack status")),
    };
    Ok(Message::Ack { seq, status })
}

fn parse_body(msg_type: u8, body: &[u8]) -> Result<Message, WireError> {
    use msg_type::*;
    let mut reader = Reader {
        bytes: body,
        msg_type,
        len: body.len(),
    };
    let msg = match msg_type {
        HELLO => parse_hello(&mut reader)?,
        AUTH_CHALLENGE => Message::AuthChallenge {
            nonce: reader.array32()?,
        },
        AUTH_RESPONSE => Message::AuthResponse {
            mac: reader.array32()?,
        },
        WRITE => {
            let w = parse_write(&mut reader)?;
            Message::Write {
                lun_key: w.lun_key,
                offset_bytes: w.offset_bytes,
                fua: w.fua,
                data: w.data.to_vec(),
            }
        }
        WRITE_ZEROES => Message::WriteZeroes {
            lun_key: reader.u64()?,
            offset_bytes: reader.u64()?,
            len_bytes: reader.u64()?,
            unmap: reader.bool("unmap")?,
        },
        FLUSH => Message::Flush {
            lun_key: reader.u64()?,
        },
        PR_STATE => Message::PrState {
            lun_key: reader.u64()?,
            origin: reader.u64()?,
            version: reader.u64()?,
            state: reader.rest(PR_STATE_BYTES_MAX, "pr state length")?,
        },
        ACK => parse_ack(&mut reader)?,
        RESYNC_DATA => Message::ResyncData {
            lun_key: reader.u64()?,
            offset_bytes: reader.u64()?,
            data: reader.rest(DATA_BYTES_MAX, "resync data length")?,
        },
        RESYNC_DONE => Message::ResyncDone {
            lun_key: reader.u64()?,
            gen: reader.gen()?,
        },
        VERIFY_REQUEST => Message::VerifyRequest {
            lun_key: reader.u64()?,
            region: reader.u64()?,
        },
        VERIFY_DIGEST => Message::VerifyDigest {
            lun_key: reader.u64()?,
            region: reader.u64()?,
            digest: reader.array32()?,
        },
        PING => Message::Ping {
            now_ms: reader.u64()?,
        },
        PONG => Message::Pong {
            now_ms: reader.u64()?,
        },
        DIRTY_BITMAP => Message::DirtyBitmap {
            lun_key: reader.u64()?,
            bitmap: reader.rest(DATA_BYTES_MAX, "bitmap length")?,
        },
        RESYNC_PROGRESS => {
            let (lun_key, done_bytes, total_bytes, eta_ms) =
                (reader.u64()?, reader.u64()?, reader.u64()?, reader.u64()?);
            if done_bytes > total_bytes {
                return Err(WireError::BadField("resync progress beyond its total"));
            }
            Message::ResyncProgress {
                lun_key,
                done_bytes,
                total_bytes,
                eta_ms,
            }
        }
        SNAPSHOT => snapshot::parse_snapshot(&mut reader)?,
        SNAPSHOT_LIST => snapshot::parse_list(&mut reader)?,
        other => return Err(WireError::UnknownType(other)),
    };
    reader.finish()?;
    Ok(msg)
}

/// Decodes the first frame in `bytes`.
///
/// Returns `Ok(None)` if more bytes are needed (the header, when present, has been validated), or the
/// message, its sequence number and how many bytes it used.
pub fn decode_one(bytes: &[u8]) -> Result<Option<(Message, u64, usize)>, WireError> {
    let Some((msg_type, seq, body, frame_len)) = checked_frame(bytes)? else {
        return Ok(None);
    };
    Ok(Some((parse_body(msg_type, body)?, seq, frame_len)))
}

/// Like [`decode_one`], but a WRITE's data is borrowed from `bytes`.
pub fn decode_one_ref(bytes: &[u8]) -> Result<Option<(Frame<'_>, u64, usize)>, WireError> {
    let Some((msg_type, seq, body, frame_len)) = checked_frame(bytes)? else {
        return Ok(None);
    };
    let frame = if msg_type == msg_type::WRITE {
        let mut reader = Reader {
            bytes: body,
            msg_type,
            len: body.len(),
        };
        let w = parse_write(&mut reader)?;
        reader.finish()?;
        Frame::Write(w)
    } else {
        Frame::Other(parse_body(msg_type, body)?)
    };
    Ok(Some((frame, seq, frame_len)))
}

/// The first frame of `bytes` with its checksum verified: (type, seq, body, frame length).
#[allow(clippy::type_complexity)]
fn checked_frame(bytes: &[u8]) -> Result<Option<(u8, u64, &[u8], usize)>, WireError> {
    if bytes.len() < HEADER_BYTES {
        // Reject a bad magic as early as possible, from whatever prefix is present.
        let prefix = bytes.len().min(4);
        if bytes[..prefix] != MAGIC[..prefix] {
            return Err(WireError::BadMagic);
        }
        return Ok(None);
    }
    let header = parse_header(&bytes[..HEADER_BYTES])?;
    let frame_len = HEADER_BYTES + header.body_len;
    if bytes.len() < frame_len {
        return Ok(None);
    }
    let body = &bytes[HEADER_BYTES..frame_len];
    let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[..20]), body);
    if crc != header.crc {
        return Err(WireError::BadChecksum);
    }
    Ok(Some((header.msg_type, header.seq, body, frame_len)))
}

/// Incremental decoder: feed bytes as they arrive, pull complete messages.
///
/// Buffering is bounded by [`DECODER_BUFFER_MAX`]; a frame header announcing a body over the limit is
/// rejected as soon as the header is in. After any error the decoder stays poisoned.
#[derive(Debug, Default)]
pub struct Decoder {
    buffer: Vec<u8>,
    /// Bytes of `buffer` already consumed by pulled messages (compacted lazily).
    start: usize,
    poisoned: bool,
}

impl Decoder {
    /// A new, empty decoder.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Bytes buffered and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buffer.len() - self.start
    }

    /// How many more bytes the decoder may accept now.
    pub fn space(&self) -> usize {
        DECODER_BUFFER_MAX - self.buffered()
    }

    /// Appends received bytes. Fails (and poisons) if the bytes do not fit or the pending header is bad.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        if self.poisoned {
            return Err(WireError::Poisoned);
        }
        if bytes.len() > self.space() {
            self.poisoned = true;
            return Err(WireError::BufferFull);
        }
        if self.start > 0 && self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        } else if self.start > DECODER_BUFFER_MAX / 2 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
        // Validate a complete header now, so an oversized frame is refused before its body arrives.
        let pending = &self.buffer[self.start..];
        if pending.len() >= HEADER_BYTES {
            if let Err(error) = parse_header(&pending[..HEADER_BYTES]) {
                self.poisoned = true;
                return Err(error);
            }
        }
        Ok(())
    }

    /// Pulls the next complete message and its sequence number, if one is buffered.
    pub fn next_message(&mut self) -> Result<Option<(Message, u64)>, WireError> {
        if self.poisoned {
            return Err(WireError::Poisoned);
        }
        match decode_one(&self.buffer[self.start..]) {
            Ok(Some((msg, seq, used))) => {
                self.start += used;
                assert!(self.start <= self.buffer.len());
                Ok(Some((msg, seq)))
            }
            Ok(None) => Ok(None),
            Err(error) => {
                self.poisoned = true;
                Err(error)
            }
        }
    }
}

/// Fuzz entry point: decoding arbitrary bytes must never panic, and anything that decodes must
/// re-encode to the same frame.
pub fn fuzz(data: &[u8]) {
    let owned = decode_one(data);
    if let Ok(Some((msg, seq, used))) = &owned {
        let mut again = Vec::new();
        encode(msg, *seq, &mut again);
        assert_eq!(again, data[..*used], "decode/encode not canonical");
    }
    // The borrowing decoder accepts and rejects exactly what the owning one does.
    match (decode_one_ref(data), owned) {
        (Ok(Some((Frame::Write(w), seq, used))), Ok(Some((m, seq2, used2)))) => {
            let as_msg = Message::Write {
                lun_key: w.lun_key,
                offset_bytes: w.offset_bytes,
                fua: w.fua,
                data: w.data.to_vec(),
            };
            assert_eq!((as_msg, seq, used), (m, seq2, used2));
        }
        (Ok(Some((Frame::Other(m), seq, used))), Ok(Some(o))) => assert_eq!((m, seq, used), o),
        (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
        (r, o) => panic!("decoders disagree: {r:?} vs {o:?}"),
    }
    let mut decoder = Decoder::new();
    for chunk in data.chunks(7) {
        if decoder.feed(chunk).is_err() {
            return;
        }
        loop {
            match decoder.next_message() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

mod snapshot;
#[cfg(test)]
mod tests;
