//! The witness: the third vote of a two-node pair (as DRBD 9's tiebreaker or corosync's
//! qnetd). It grants one node at a time a lease to serve writes, and remembers which node
//! is outdated (its peer wrote without it), so it never votes for stale data.
//!
//! Sans-I/O: requests and `now` in, a reply (and, first, the record to persist) out. One
//! witness serves many pairs, each under its own key and pair id; the driver keeps the
//! keys and the replay windows, this keeps the votes. The rules:
//! - a lease goes to a node that says it is UpToDate, is not recorded outdated, and whose
//!   peer holds no unexpired lease; a renewal by the holder extends it;
//! - `alone` records the peer outdated (persisted before the grant is sent); `peer_in_sync`
//!   from the holder clears that record; either change needs the request to name the
//!   record's current epoch (so an old request, replayed, changes nothing) and moves the
//!   epoch on; so does an `alone` request with `renew_alone` (its sender claimed the peer
//!   in sync at this epoch since it last wrote alone: that claim must not land later);
//! - after a restart the witness grants nothing for one lease (it cannot know who held one)
//!   but keeps the outdated records (they are on disk).
//!
//! A lease from etcd could take its place behind the same requests and replies.

use std::collections::HashMap;

use crate::wire::{LeaseOp, LeaseReply, LeaseRequest, Refusal};
use crate::NodeId;

/// What one pair's vote looks like now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PairVote {
    /// The lease holder and when (the witness's clock, ms) the lease ends.
    pub holder: Option<(NodeId, u64)>,
    /// The node whose data is outdated, if any (persisted).
    pub outdated: Option<NodeId>,
    /// Moves on with every change of `outdated` (persisted with it).
    pub epoch: u64,
    /// The newest request acted on, per node (a late duplicate must not undo a newer one).
    last_request: [Option<u64>; 2],
    /// The holder before the last request: what a failed persist restores (a renewal whose
    /// record could not be stored must not revoke the lease the holder still counts on).
    holder_before: Option<(NodeId, u64)>,
}

/// One pair's durable record: who is outdated, and the record's epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub outdated: Option<NodeId>,
    pub epoch: u64,
}

/// The witness's answer to one request, and what must be on disk before it is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The record to persist first, if it changed.
    pub persist: Option<Record>,
    /// The reply.
    pub reply: LeaseReply,
}

/// The witness's votes for every pair it serves.
#[derive(Debug)]
pub struct Witness {
    lease_ms: u32,
    /// No grant before this (the clock at start plus one lease).
    granting_from_ms: u64,
    pairs: HashMap<Vec<u8>, PairVote>,
    /// Most pairs one witness keeps (a bound on memory; pairs are configured, so this is
    /// a check on the configuration, not on the network).
    max_pairs: usize,
}

/// Most pairs a witness serves.
pub const MAX_PAIRS: usize = 4096;

impl Witness {
    /// A witness started at `now_ms`, granting leases of `lease_ms`, with the records it
    /// persisted (pair id, record).
    pub fn new(
        now_ms: u64,
        lease_ms: u32,
        records: impl IntoIterator<Item = (Vec<u8>, Record)>,
    ) -> Witness {
        assert!(lease_ms > 0);
        let mut pairs = HashMap::new();
        for (id, r) in records {
            pairs.insert(
                id,
                PairVote {
                    outdated: r.outdated,
                    epoch: r.epoch,
                    ..PairVote::default()
                },
            );
        }
        Witness {
            lease_ms,
            granting_from_ms: now_ms + u64::from(lease_ms),
            pairs,
            max_pairs: MAX_PAIRS,
        }
    }

    /// The vote of `pair`, if it asked anything yet.
    pub fn vote(&self, pair: &[u8]) -> Option<&PairVote> {
        self.pairs.get(pair)
    }

    /// A request from `node` of `pair` (authenticated by the driver with that pair's key).
    pub fn request(
        &mut self,
        now_ms: u64,
        pair: &[u8],
        node: NodeId,
        req: LeaseRequest,
    ) -> Decision {
        let lease_ms = self.lease_ms;
        let known = self.pairs.contains_key(pair);
        if !known && self.pairs.len() >= self.max_pairs {
            return Decision {
                persist: None,
                reply: LeaseReply {
                    request_id: req.request_id,
                    granted: Err(Refusal::NotRecorded),
                    lease_ms,
                    holder: None,
                    outdated: None,
                    epoch: 0,
                },
            };
        }
        let starting = now_ms < self.granting_from_ms;
        let v = self.pairs.entry(pair.to_vec()).or_default();
        if v.holder.is_some_and(|(_, until)| now_ms >= until) {
            v.holder = None;
        }
        v.holder_before = v.holder;
        let slot = usize::from(node.0);
        let granted = if v.last_request[slot].is_some_and(|last| req.request_id <= last) {
            Err(Refusal::Stale)
        } else {
            v.last_request[slot] = Some(req.request_id);
            decide(v, now_ms, node, req, starting, lease_ms)
        };
        let mut persist = None;
        if granted.is_ok() && req.op == LeaseOp::Acquire {
            if req.alone {
                after_change(v, Some(node.peer()), req.renew_alone, &mut persist);
            } else if req.peer_in_sync {
                after_change(v, None, false, &mut persist);
            }
        }
        Decision {
            persist,
            reply: LeaseReply {
                request_id: req.request_id,
                granted,
                lease_ms,
                holder: v.holder.map(|(n, _)| n),
                outdated: v.outdated,
                epoch: v.epoch,
            },
        }
    }

    /// The driver could not persist `decision.persist`: the record goes back to `before`
    /// and the grant becomes a refusal (nothing may rely on a record not on disk).
    pub fn persist_failed(&mut self, pair: &[u8], before: Record, reply: &mut LeaseReply) {
        if let Some(v) = self.pairs.get_mut(pair) {
            v.outdated = before.outdated;
            v.epoch = before.epoch;
            v.holder = v.holder_before;
            reply.granted = Err(Refusal::NotRecorded);
            reply.holder = v.holder.map(|(n, _)| n);
            reply.outdated = before.outdated;
            reply.epoch = before.epoch;
        }
    }

    /// The record of `pair` (what the driver persists).
    pub fn record(&self, pair: &[u8]) -> Record {
        self.pairs.get(pair).map_or(Record::default(), |v| Record {
            outdated: v.outdated,
            epoch: v.epoch,
        })
    }
}

/// Records `outdated` and moves the epoch on if it changed, or if `renew` asks for a new
/// epoch anyway (a new alone period after an in-sync claim: `LeaseRequest::renew_alone`).
fn after_change(
    v: &mut PairVote,
    outdated: Option<NodeId>,
    renew: bool,
    persist: &mut Option<Record>,
) {
    if v.outdated != outdated || renew {
        v.outdated = outdated;
        v.epoch += 1;
        *persist = Some(Record {
            outdated,
            epoch: v.epoch,
        });
    }
}

fn decide(
    v: &mut PairVote,
    now_ms: u64,
    node: NodeId,
    req: LeaseRequest,
    starting: bool,
    lease_ms: u32,
) -> Result<(), Refusal> {
    match req.op {
        LeaseOp::Query => Ok(()),
        LeaseOp::Release => {
            if v.holder.is_some_and(|(n, _)| n == node) {
                v.holder = None;
            }
            Ok(())
        }
        LeaseOp::Acquire => {
            if v.holder.is_some_and(|(n, _)| n != node) {
                return Err(Refusal::HeldByPeer);
            }
            if starting && v.holder.is_none() {
                return Err(Refusal::WitnessStarting);
            }
            // An outdated node that says its peer is in sync with it resynced the peer,
            // which the replica's generation ids allow only when it is not behind: the
            // record was conservative (the peer took over and wrote nothing alone).
            if v.outdated == Some(node) && !req.peer_in_sync {
                return Err(Refusal::Outdated);
            }
            if !req.up_to_date {
                return Err(Refusal::NotUpToDate);
            }
            let changes = if req.alone {
                v.outdated != Some(node.peer()) || req.renew_alone
            } else {
                req.peer_in_sync && v.outdated.is_some()
            };
            if changes && req.epoch != v.epoch {
                // Asked on an older record (or replayed): the reply names the current
                // epoch, and a live node asks again.
                return Err(Refusal::Stale);
            }
            v.holder = Some((node, now_ms + u64::from(lease_ms)));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
