//! The failover datagrams: heartbeats between the two nodes and lease requests and replies
//! between a node and the witness. Each is one UDP datagram, authenticated with
//! HMAC-SHA256 under a key derived from the pair's key, numbered, and checked against a
//! replay window. Bytes from the network become typed values here, once.
//!
//! Layout (big-endian):
//! ```text
//! 0   magic "TSFO"      4   version (1)     5   kind
//! 6   sender (0, 1: a node; 2: the witness)  7   pair id length n (1..=64)
//! 8   pair id (n bytes)  8+n seq (u64)       16+n body (kind's fixed length)
//! end HMAC-SHA256 over everything before it (32 bytes)
//! ```

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::NodeId;

const MAGIC: &[u8; 4] = b"TSFO";
const VERSION: u8 = 1;
const MAC_LEN: usize = 32;
/// Longest pair id: names a pair at a witness that serves many.
pub const MAX_PAIR_ID_LEN: usize = 64;
/// Longest datagram this format makes (a bound for receive buffers).
pub const MAX_DATAGRAM_LEN: usize = 8 + MAX_PAIR_ID_LEN + 8 + SESSIONS_BODY_LEN + MAC_LEN;
/// Initiator connections named in one sessions datagram (more go in several).
pub const MAX_SESSIONS_PER_DATAGRAM: usize = 32;
/// The witness's sender id.
pub const WITNESS_SENDER: u8 = 2;

const KIND_HEARTBEAT: u8 = 1;
const KIND_LEASE_REQUEST: u8 = 2;
const KIND_LEASE_REPLY: u8 = 3;
const KIND_SESSIONS: u8 = 4;

const HEARTBEAT_BODY_LEN: usize = 2;
const REQUEST_BODY_LEN: usize = 18;
const REPLY_BODY_LEN: usize = 24;
const SESSIONS_BODY_LEN: usize = 2 + 6 * MAX_SESSIONS_PER_DATAGRAM;

/// What a node tells its peer on every path, every `keepalive_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Heartbeat {
    /// Which configured path it was sent on (so each path's age is known).
    pub path: u8,
    /// The sender serves as primary.
    pub primary: bool,
    /// The sender's data is UpToDate for every LUN (it may be promoted).
    pub promotable: bool,
    /// The sender is primary and its peer (the receiver) is in sync with it.
    pub in_sync: bool,
    /// The operator put the sender in standby: it hands over and does not take over.
    pub standby: bool,
    /// The sender asks the primary to hand over to it (`takeover`, or `auto_failback`).
    pub wants_takeover: bool,
    /// The sender is primary and its writes are frozen (the peer lost, not yet outdated).
    pub frozen: bool,
    /// The sender is the configured primary (preferred when both are secondary).
    pub preferred: bool,
    /// The sender heard the witness within the last deadtime (it reaches the network the
    /// witness sits on: the clients').
    pub witness_ok: bool,
}

impl Heartbeat {
    fn flags(&self) -> u8 {
        u8::from(self.primary)
            | u8::from(self.promotable) << 1
            | u8::from(self.in_sync) << 2
            | u8::from(self.standby) << 3
            | u8::from(self.wants_takeover) << 4
            | u8::from(self.frozen) << 5
            | u8::from(self.preferred) << 6
            | u8::from(self.witness_ok) << 7
    }

    fn from_body(b: &[u8]) -> Result<Heartbeat, WireError> {
        let f = b[1];
        Ok(Heartbeat {
            path: b[0],
            primary: f & 1 != 0,
            promotable: f & 2 != 0,
            in_sync: f & 4 != 0,
            standby: f & 8 != 0,
            wants_takeover: f & 16 != 0,
            frozen: f & 32 != 0,
            preferred: f & 64 != 0,
            witness_ok: f & 128 != 0,
        })
    }
}

/// What a node asks of the witness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseOp {
    /// Grant or renew the lease to serve writes.
    Acquire,
    /// Give the lease up (a clean handover).
    Release,
    /// Change nothing; answer with the vote as it stands. A secondary asks every keepalive,
    /// so both nodes know whether they reach the witness (the clients' network).
    Query,
}

/// A node's lease request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseRequest {
    /// Increases with every request of a node (also across its restarts): the witness acts
    /// on a request only if it is newer than the last it acted on, so a late duplicate
    /// cannot undo a newer record.
    pub request_id: u64,
    /// What is asked.
    pub op: LeaseOp,
    /// The sender's data is UpToDate for every LUN.
    pub up_to_date: bool,
    /// The sender writes (or will) without its peer: the witness records the peer outdated
    /// before it grants, and votes for the peer no more until it is in sync again.
    pub alone: bool,
    /// The sender is primary and its peer is in sync: the peer's outdated record goes.
    pub peer_in_sync: bool,
    /// With `alone`: the sender has claimed its peer in sync (`peer_in_sync`) at this
    /// epoch since it last wrote alone. The witness moves the epoch on even though the
    /// record names the peer outdated already, so that claim, should it arrive late
    /// (delayed, or replayed after a witness restart emptied the replay windows), is stale
    /// and cannot clear the record of writes made alone after it.
    pub renew_alone: bool,
    /// The witness's record epoch as the sender last heard it. A request that would change
    /// the record is acted on only if this is current: an old request replayed (after a
    /// witness restart emptied its replay windows, say) cannot undo a newer record.
    pub epoch: u64,
}

/// Why a request was not granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The other node holds an unexpired lease.
    HeldByPeer,
    /// The sender's data is outdated (its peer wrote alone since): it must resync first.
    Outdated,
    /// The sender says its own data is not UpToDate.
    NotUpToDate,
    /// The witness started less than a lease ago and cannot know who held one.
    WitnessStarting,
    /// A newer request of the sender was acted on already.
    Stale,
    /// The witness could not record the outdate durably.
    NotRecorded,
}

/// The witness's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseReply {
    /// The request answered.
    pub request_id: u64,
    /// Granted for `lease_ms` from when the request was sent (the node counts from its own
    /// send time, which is before the witness's receive time: its lease ends first).
    pub granted: Result<(), Refusal>,
    /// The lease's length.
    pub lease_ms: u32,
    /// Who holds the lease after this request, if anyone.
    pub holder: Option<NodeId>,
    /// The node the witness records as outdated, if any.
    pub outdated: Option<NodeId>,
    /// The record's epoch (increases with every change of it; persisted).
    pub epoch: u64,
}

/// The primary's initiator connections (their address and port), sent to the peer so that
/// after a takeover it can tickle them into reconnecting at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sessions {
    /// Which part of the list this is (0-based), when it takes several datagrams.
    pub part: u8,
    /// How many of `peers` are used.
    pub count: u8,
    pub peers: [([u8; 4], u16); MAX_SESSIONS_PER_DATAGRAM],
}

impl Sessions {
    /// The used entries.
    pub fn list(&self) -> &[([u8; 4], u16)] {
        &self.peers[..usize::from(self.count).min(MAX_SESSIONS_PER_DATAGRAM)]
    }
}

/// A datagram's kind and content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    Heartbeat(Heartbeat),
    LeaseRequest(LeaseRequest),
    LeaseReply(LeaseReply),
    Sessions(Sessions),
}

/// A datagram that passed its authentication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    /// The pair it belongs to.
    pub pair_id: Vec<u8>,
    /// Node 0, node 1 or [`WITNESS_SENDER`].
    pub sender: u8,
    /// The sender's sequence number (for the replay window).
    pub seq: u64,
    /// What it says.
    pub body: Body,
}

/// Why a datagram was dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("datagram of {0} bytes: too short or too long")]
    Length(usize),
    #[error("not a twinsan failover datagram (magic or version)")]
    Magic,
    #[error("unknown kind {0}")]
    Kind(u8),
    #[error("bad {0}")]
    BadField(&'static str),
    #[error("authentication failed (wrong key or altered)")]
    Mac,
    #[error("replayed or too old (seq {0})")]
    Replay(u64),
}

/// The HMAC key of one pair's failover datagrams, derived from the pair's key so that a
/// failover datagram can never pass as a replication handshake message or back.
#[derive(Clone)]
pub struct Key(Hmac<Sha256>);

impl Key {
    /// Derives the key from the pair's shared key `psk`.
    pub fn derive(psk: &[u8]) -> Key {
        // HMAC takes keys of any length: new_from_slice cannot fail for it.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(psk)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        m.update(b"twinsan failover key v1");
        let derived = m.finalize().into_bytes();
        Key(<Hmac<Sha256> as Mac>::new_from_slice(&derived)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length")))
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

fn body_len(kind: u8) -> Option<usize> {
    match kind {
        KIND_HEARTBEAT => Some(HEARTBEAT_BODY_LEN),
        KIND_LEASE_REQUEST => Some(REQUEST_BODY_LEN),
        KIND_LEASE_REPLY => Some(REPLY_BODY_LEN),
        KIND_SESSIONS => Some(SESSIONS_BODY_LEN),
        _ => None,
    }
}

fn node_byte(n: Option<NodeId>) -> u8 {
    n.map_or(0xff, |n| n.0)
}

fn parse_node(b: u8, what: &'static str) -> Result<Option<NodeId>, WireError> {
    match b {
        0 | 1 => Ok(Some(NodeId(b))),
        0xff => Ok(None),
        _ => Err(WireError::BadField(what)),
    }
}

fn refusal_byte(r: Result<(), Refusal>) -> u8 {
    match r {
        Ok(()) => 0,
        Err(Refusal::HeldByPeer) => 1,
        Err(Refusal::Outdated) => 2,
        Err(Refusal::NotUpToDate) => 3,
        Err(Refusal::WitnessStarting) => 4,
        Err(Refusal::Stale) => 5,
        Err(Refusal::NotRecorded) => 6,
    }
}

fn parse_refusal(b: u8) -> Result<Result<(), Refusal>, WireError> {
    Ok(match b {
        0 => Ok(()),
        1 => Err(Refusal::HeldByPeer),
        2 => Err(Refusal::Outdated),
        3 => Err(Refusal::NotUpToDate),
        4 => Err(Refusal::WitnessStarting),
        5 => Err(Refusal::Stale),
        6 => Err(Refusal::NotRecorded),
        _ => return Err(WireError::BadField("refusal")),
    })
}

/// Encodes and authenticates one datagram.
pub fn seal(key: &Key, pair_id: &[u8], sender: u8, seq: u64, body: &Body) -> Vec<u8> {
    assert!(
        !pair_id.is_empty() && pair_id.len() <= MAX_PAIR_ID_LEN,
        "pair ids are checked at configuration"
    );
    assert!(sender <= WITNESS_SENDER);
    let mut out = Vec::with_capacity(MAX_DATAGRAM_LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    let kind = match body {
        Body::Heartbeat(_) => KIND_HEARTBEAT,
        Body::LeaseRequest(_) => KIND_LEASE_REQUEST,
        Body::LeaseReply(_) => KIND_LEASE_REPLY,
        Body::Sessions(_) => KIND_SESSIONS,
    };
    out.push(kind);
    out.push(sender);
    out.push(pair_id.len() as u8);
    out.extend_from_slice(pair_id);
    out.extend_from_slice(&seq.to_be_bytes());
    match body {
        Body::Heartbeat(h) => out.extend_from_slice(&[h.path, h.flags()]),
        Body::LeaseRequest(r) => {
            out.extend_from_slice(&r.request_id.to_be_bytes());
            out.push(match r.op {
                LeaseOp::Acquire => 1,
                LeaseOp::Release => 2,
                LeaseOp::Query => 3,
            });
            out.push(
                u8::from(r.up_to_date)
                    | u8::from(r.alone) << 1
                    | u8::from(r.peer_in_sync) << 2
                    | u8::from(r.renew_alone) << 3,
            );
            out.extend_from_slice(&r.epoch.to_be_bytes());
        }
        Body::LeaseReply(r) => {
            out.extend_from_slice(&r.request_id.to_be_bytes());
            out.push(refusal_byte(r.granted));
            out.extend_from_slice(&r.lease_ms.to_be_bytes());
            out.push(node_byte(r.holder));
            out.push(node_byte(r.outdated));
            out.push(0);
            out.extend_from_slice(&r.epoch.to_be_bytes());
        }
        Body::Sessions(ss) => {
            assert!(usize::from(ss.count) <= MAX_SESSIONS_PER_DATAGRAM);
            out.push(ss.part);
            out.push(ss.count);
            for (ip, port) in ss.peers {
                out.extend_from_slice(&ip);
                out.extend_from_slice(&port.to_be_bytes());
            }
        }
    }
    let mut m = key.0.clone();
    m.update(&out);
    out.extend_from_slice(&m.finalize().into_bytes());
    out
}

/// The pair id a datagram claims, unauthenticated: a witness serving many pairs picks the
/// key to authenticate it with by this.
pub fn peek_pair_id(bytes: &[u8]) -> Option<&[u8]> {
    let n = usize::from(*bytes.get(7)?);
    if bytes.get(..4)? != MAGIC || n == 0 || n > MAX_PAIR_ID_LEN {
        return None;
    }
    bytes.get(8..8 + n)
}

/// Parses and authenticates one datagram (the replay check is the receiver's
/// [`ReplayWindow`]).
pub fn open(key: &Key, bytes: &[u8]) -> Result<Datagram, WireError> {
    if bytes.len() < 8 + 1 + 8 + HEARTBEAT_BODY_LEN + MAC_LEN || bytes.len() > MAX_DATAGRAM_LEN {
        return Err(WireError::Length(bytes.len()));
    }
    if &bytes[..4] != MAGIC || bytes[4] != VERSION {
        return Err(WireError::Magic);
    }
    let kind = bytes[5];
    let len = body_len(kind).ok_or(WireError::Kind(kind))?;
    let sender = bytes[6];
    let id_len = usize::from(bytes[7]);
    if sender > WITNESS_SENDER {
        return Err(WireError::BadField("sender"));
    }
    if id_len == 0 || id_len > MAX_PAIR_ID_LEN || bytes.len() != 8 + id_len + 8 + len + MAC_LEN {
        return Err(WireError::Length(bytes.len()));
    }
    let (signed, mac) = bytes.split_at(bytes.len() - MAC_LEN);
    let mut m = key.0.clone();
    m.update(signed);
    m.verify_slice(mac).map_err(|_| WireError::Mac)?;
    let pair_id = signed[8..8 + id_len].to_vec();
    let mut seq_bytes = [0u8; 8];
    seq_bytes.copy_from_slice(&signed[8 + id_len..16 + id_len]);
    let seq = u64::from_be_bytes(seq_bytes);
    let b = &signed[16 + id_len..];
    let body = match kind {
        KIND_HEARTBEAT => Body::Heartbeat(Heartbeat::from_body(b)?),
        KIND_LEASE_REQUEST => {
            let op = match b[8] {
                1 => LeaseOp::Acquire,
                2 => LeaseOp::Release,
                3 => LeaseOp::Query,
                _ => return Err(WireError::BadField("lease op")),
            };
            if b[9] & !15 != 0 {
                return Err(WireError::BadField("lease request flags"));
            }
            Body::LeaseRequest(LeaseRequest {
                request_id: u64_at(b, 0),
                op,
                up_to_date: b[9] & 1 != 0,
                alone: b[9] & 2 != 0,
                peer_in_sync: b[9] & 4 != 0,
                renew_alone: b[9] & 8 != 0,
                epoch: u64_at(b, 10),
            })
        }
        KIND_SESSIONS => {
            if usize::from(b[1]) > MAX_SESSIONS_PER_DATAGRAM {
                return Err(WireError::BadField("session count"));
            }
            let mut peers = [([0u8; 4], 0u16); MAX_SESSIONS_PER_DATAGRAM];
            for (i, p) in peers.iter_mut().enumerate() {
                let at = 2 + 6 * i;
                p.0.copy_from_slice(&b[at..at + 4]);
                p.1 = u16::from_be_bytes([b[at + 4], b[at + 5]]);
            }
            Body::Sessions(Sessions {
                part: b[0],
                count: b[1],
                peers,
            })
        }
        _ if b[15] != 0 => return Err(WireError::BadField("reply padding")),
        _ => Body::LeaseReply(LeaseReply {
            request_id: u64_at(b, 0),
            granted: parse_refusal(b[8])?,
            lease_ms: u32::from_be_bytes([b[9], b[10], b[11], b[12]]),
            holder: parse_node(b[13], "holder")?,
            outdated: parse_node(b[14], "outdated")?,
            epoch: u64_at(b, 16),
        }),
    };
    let sender_ok = match body {
        Body::LeaseReply(_) => sender == WITNESS_SENDER,
        _ => sender < WITNESS_SENDER,
    };
    if !sender_ok {
        return Err(WireError::BadField("sender for this kind"));
    }
    Ok(Datagram {
        pair_id,
        sender,
        seq,
        body,
    })
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Which sequence numbers of one sender were seen: the highest, and a 64-wide bitmap
/// below it (as IPsec's anti-replay window). Datagrams may arrive out of order over
/// several paths; one seen before, or older than the window, is a replay.
#[derive(Clone, Debug, Default)]
pub struct ReplayWindow {
    highest: u64,
    /// Bit i: `highest - i` was seen.
    seen: u64,
    any: bool,
}

/// How far below the highest sequence number a datagram may still arrive.
pub const REPLAY_WINDOW: u64 = 64;

impl ReplayWindow {
    /// Accepts `seq` once; a repeat or one older than the window is refused.
    pub fn accept(&mut self, seq: u64) -> Result<(), WireError> {
        if !self.any || seq > self.highest {
            let shift = if self.any {
                seq - self.highest
            } else {
                REPLAY_WINDOW
            };
            self.seen = if shift >= REPLAY_WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.highest = seq;
            self.any = true;
            return Ok(());
        }
        let back = self.highest - seq;
        if back >= REPLAY_WINDOW || self.seen & (1 << back) != 0 {
            return Err(WireError::Replay(seq));
        }
        self.seen |= 1 << back;
        Ok(())
    }
}

/// Sequence numbers (and lease request ids) of one run of a sender live above
/// `boot << BOOT_SHIFT`, where `boot` numbers the sender's starts (persisted by the
/// driver, see [`first_of_boot`]). 2^32 numbers per run: at the 40 datagrams a second a
/// node sends, over three years.
pub const BOOT_SHIFT: u32 = 32;

/// The first number of run `boot`: above every number of every earlier run, whatever the
/// clocks do. Why not the wall clock: a node that restarts with its clock stepped back (an
/// RTC behind, NTP stepping it at boot) would start below the numbers its receivers last
/// saw, and be taken for a replay, deaf to its peer and the witness, for as long as it
/// takes to count up the difference (the failover simulation: a node restarted within a
/// second, clock stepped back, never reached the witness again).
pub fn first_of_boot(boot: u64) -> u64 {
    assert!(boot < 1 << (64 - BOOT_SHIFT), "boot counter out of range");
    boot << BOOT_SHIFT
}

/// A sender's sequence numbers: they start at [`first_of_boot`], so they increase across
/// restarts (a receiver that remembers the last one does not take a restarted sender's
/// datagrams for replays), and never repeat within a run.
#[derive(Clone, Debug)]
pub struct SeqCounter(u64);

impl SeqCounter {
    /// Starts above `first`.
    pub fn starting_at(first: u64) -> SeqCounter {
        SeqCounter(first)
    }

    /// The next sequence number.
    pub fn next_seq(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }
}

/// The fuzz target's body (`fuzz/fuzz_targets/failover_wire.rs`), here so that `cargo
/// test` runs it too. Random bytes never carry a valid HMAC, so besides opening `data` as
/// it is, it signs `data` with a fixed key and opens that, which reaches every field's
/// parser; whatever parses must seal back to the same bytes (one encoding per value).
pub fn fuzz(data: &[u8]) {
    let key = Key::derive(b"fuzzing key, not a secret");
    let _ = open(&key, data);
    let _ = peek_pair_id(data);
    let mut m = key.0.clone();
    m.update(data);
    let mut signed = data.to_vec();
    signed.extend_from_slice(&m.finalize().into_bytes());
    if let Ok(d) = open(&key, &signed) {
        let again = seal(&key, &d.pair_id, d.sender, d.seq, &d.body);
        assert_eq!(again, signed, "a datagram with two encodings");
    }
}

#[cfg(test)]
mod tests;
