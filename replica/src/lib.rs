//! Peer replication (DRBD's protocol C) for twinsan: every decision of the pair, sans-I/O.
//!
//! - [`wire`]: the replica link's framed, checksummed messages, and an incremental decoder.
//! - [`auth`]: mutual HMAC-SHA256 challenge-response with the pre-shared key.
//! - [`bitmap`]: region bitmaps (dirty regions).
//! - [`intent`]: the write-intent log (regions writes may be in flight to, durable first).
//! - [`meta`]: per-LUN metadata beside the backing file, and its durability contract.
//! - [`genid`]: generation ids and [`genid::decide`], which picks the resync direction at connect.
//! - [`pair`]: the pair state machine the daemon runs: each LUN's record ([`pair::PairLun`]),
//!   the primary's coordinator ([`pair::Mirror`]) with its per-link shards, the secondary's
//!   gate on the primary's connections ([`pair::ApplyGate`]), resync planning and progress.
//!
//! Nothing here does I/O, reads a clock or spawns a thread: time comes in as `now_ms`,
//! randomness as bytes, and what must reach the disk is said ([`pair::Persist`]) for the
//! driver (the engine's `replication/`) to write. `tests/sim.rs` runs these same types for two
//! nodes over a simulated network and disk, seeded.

// Sans-I/O: nothing here needs `unsafe`, and the compiler keeps it that way.
#![forbid(unsafe_code)]
// A state machine's function is read whole to be trusted: none over 100 lines (clippy's
// count, code lines only). A longer one is split where its decisions separate.
#![deny(clippy::too_many_lines)]

pub mod auth;
pub mod bitmap;
pub mod genid;
pub mod intent;
pub mod meta;
pub mod pair;
pub mod snapshot;
pub mod wire;

pub use bitmap::{Bitmap, BitmapError};
pub use genid::{decide, Decision, GenFlags, GenIds};
pub use meta::{Meta, MetaError, MetaFlags};
pub use wire::{decode_one, encode, AckStatus, Decoder, LunHello, Message, WireError};
