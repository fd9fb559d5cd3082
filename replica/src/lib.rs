//! Peer replication (DRBD protocol C) for twinsan: the pure, sans-I/O foundations.
//!
//! - [`wire`]: the replica link's framed, checksummed messages, and an incremental decoder.
//! - [`auth`]: mutual HMAC-SHA256 challenge-response with the pre-shared key.
//! - [`bitmap`]: region bitmaps (dirty regions) and the write-intent set.
//! - [`meta`]: per-LUN metadata beside the backing file, and its durability contract.
//! - [`genid`]: generation ids and [`genid::decide`], which picks the resync direction at connect.
//! - [`primary`]: the state machine of one LUN on the primary.
//!
//! Nothing here does I/O, reads a clock or spawns a thread: time comes in as `now_ms`, randomness
//! as a seed, and every decision comes out as a [`primary::Action`] for the engine to carry out.
//!
//! # How the engine drives a LUN's [`primary::Primary`]
//!
//! Setup: read `lunN.img.meta` ([`meta::Meta::decode`], or [`meta::Meta::new`] for a new LUN) and call
//! `Primary::new(config, meta, fresh_random_seed, now_ms)`. Call `tick(now_ms)` periodically (every
//! ~100 ms is plenty); it runs peer timeouts, periodic flushes and resync pacing. Execute every
//! returned action in order. `PersistMeta { version, meta }` means: encode, overwrite `*.meta.tmp` in
//! place, fsync, exchange it with `*.meta` (renameat2 RENAME_EXCHANGE, so neither file ever needs new
//! blocks on a full file system), fsync the directory, then call `persisted(version, now_ms)`; only
//! one is ever outstanding.
//!
//! Connect: exchange `Hello` (with [`primary::Primary::lun_hello`] for each LUN) and authenticate
//! ([`auth::Transcript`]); the peer may also send `DirtyBitmap`. Then call
//! `peer_connected(&peer_lun_hello, peer_dirty, now_ms)`. On `PeerRefused` drop the connection and
//! report (a split brain needs an operator). On loss of the connection call `peer_disconnected`; on
//! `DisconnectPeer` drop it (the state machine already knows). Frames carry the sequence numbers
//! the actions give; feed every `Ack { seq, status }` to `peer_ack`. (If one connection carries
//! several LUNs, the engine maps the connection's frame sequence to the LUN and its sequence.)
//!
//! ## A write, connected and in sync (the normal path)
//! 1. The engine takes its range lock for the write and calls `submit_write(id, offset, len, fua, now)`.
//! 2. Usually the regions are already hot (in the persisted bitmap), so the actions are
//!    `SubmitLocalWrite { id }` and `ReplicateWrite { id, seq, .. }`: issue both in parallel.
//!    If a region is cold, a `PersistMeta` comes first and the two follow from `persisted(v)`.
//! 3. `local_done(id, ok)` when the local write completes, `peer_ack(seq, Ok)` when the peer acks
//!    (after its own write; durable if FUA). Whichever comes last returns `Complete { id, Good }`:
//!    send the SCSI status and release the range lock.
//!
//! A SYNCHRONIZE CACHE is `submit_flush(id)`: `SubmitLocalFlush` plus a `Flush` to the peer,
//! completed when both are done.
//!
//! ## Peer lost (degraded)
//! 1. The connection drops (`peer_disconnected`) or the peer leaves a request unanswered for
//!    `replica_timeout_ms` (`tick` returns `DisconnectPeer`). Writes in flight keep waiting.
//! 2. Once the peer has been away for `replica_timeout_ms`, `tick` returns `Freeze`: stop taking new
//!    commands for the LUN (writes still submitted are held inside the state machine).
//! 3. With `PeerLossPolicy::Degrade` (or after `operator_outdate_peer()`, which the engine also calls
//!    when its fence handler or the witness outdated the peer), the generation is bumped and a
//!    `PersistMeta` with `peer_outdated = true` and every affected region in the bitmap is emitted.
//!    When it is `persisted`, `Thaw` comes out and the waiting writes complete `Good`.
//!    With `Suspend` and no operator, nothing completes without the peer: a stall, never a divergence.
//! 4. While degraded, a write is `SubmitLocalWrite` only (after its regions are durable in the
//!    bitmap) and completes on `local_done`.
//!
//! ## Resync (the peer is back)
//! `peer_connected` decides (see [`genid::decide`]). If we are the source, it returns `StartResync`
//! and, for up to `resync_regions_inflight_max` dirty regions at a time, `ReadRegionForResync`:
//! the engine takes the range lock covering the whole region (waiting for writes in flight there),
//! reads it, and calls `resync_region_read(region, Data(bytes) | Hole | Failed)`. The state machine
//! sends `ResyncData` (or `WriteZeroes { unmap }` for a hole); when the peer acks it (the target
//! writes resync data durably before acking), the bit is cleared and `UnlockRegion` releases the lock.
//! Holding the lock until the ack keeps a newer write to that region from reaching the peer before
//! the older copy. Writes during the resync are mirrored as usual; a region still dirty stays dirty
//! and is copied later with its latest data. When no region is left, `ResyncDone` carries our new
//! ids; on its ack the bitmap id is retired, `peer_outdated` cleared, `PersistMeta` and
//! `ResyncFinished` come out.
//!
//! A primary that crashed restarts with every region of its persisted bitmap marked out of sync
//! (that covers its unacknowledged tail, because intents are durable before writes are issued), and
//! reconciles those regions with the peer on reconnect even when `decide` says `InSync`.

// Sans-I/O: nothing here needs `unsafe`, and the compiler keeps it that way.
#![forbid(unsafe_code)]

pub mod auth;
pub mod bitmap;
pub mod genid;
pub mod intent;
pub mod meta;
pub mod pair;
pub mod primary;
pub mod wire;

pub use bitmap::{Bitmap, BitmapError, WriteIntent};
pub use genid::{decide, Decision, GenFlags, GenIds};
pub use meta::{Meta, MetaError, MetaFlags};
pub use primary::{
    Action, Completion, PeerLossPolicy, Primary, PrimaryConfig, PrimaryError, RegionRead,
};
pub use wire::{decode_one, encode, AckStatus, Decoder, LunHello, Message, WireError};
