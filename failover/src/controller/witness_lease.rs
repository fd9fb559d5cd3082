//! The controller's dialogue with the witness: when to ask (and what), and what a reply
//! means (a lease only for a granted Acquire; the record's epoch; a grant that outdates
//! the peer).

use super::*;

impl Controller {
    /// The witness answered.
    pub fn lease_reply(&mut self, now_ms: u64, reply: LeaseReply) {
        let Some(pos) = self
            .outstanding
            .iter()
            .position(|o| o.id == reply.request_id)
        else {
            return; // Forgotten, or answered already: its news is older than what we know.
        };
        let asked = self.outstanding[pos];
        // Replies to older requests are superseded by this one.
        self.outstanding.drain(..=pos);
        self.last_witness_reply_ms = Some(now_ms);
        self.lease_holder = reply.holder;
        self.witness_outdated = reply.outdated;
        self.witness_epoch = reply.epoch;
        match reply.granted {
            Ok(()) if asked.op != LeaseOp::Acquire => {}
            Ok(()) => {
                // The shorter of the witness's lease and ours, less its quarter: counted
                // from our send time, our view ends before the witness's.
                let lease_ms = u64::from(reply.lease_ms).min(self.cfg.timings.lease_ms());
                let until = asked.sent_ms + lease_ms - lease_ms / 4;
                if until > now_ms {
                    self.ever_leased = true;
                    self.lease_until_ms = Some(self.lease_until_ms.map_or(until, |u| u.max(until)));
                    if asked.alone {
                        self.granted_alone(now_ms, until);
                    } else if self.replica.primary && self.alone_until_ms > 0 {
                        self.alone_until_ms = self.alone_until_ms.max(until);
                    }
                }
            }
            Err(r) => {
                self.note(Note::Refused(r));
                // Only a peer that is not heard as a secondary may have taken over. Heard
                // as one, "outdated" is history (a resync from here, which the generation
                // ids allow only if this node is not behind, clears it) and "held" is a
                // lease the peer does not use; and should it promote now, its promotion
                // closes our links first, so our writes freeze, and we see it primary.
                let peer_secondary =
                    self.peer_alive(now_ms) && self.peer.is_some_and(|p| !p.primary);
                let took_over =
                    matches!(r, Refusal::HeldByPeer | Refusal::Outdated) && !peer_secondary;
                if self.replica.primary && took_over {
                    // The peer holds the lease, or wrote alone: it took over. Step aside
                    // at once (our own lease, if any, is older than its grant).
                    self.lease_until_ms = None;
                    self.give_up(now_ms, "the witness says the peer took over");
                }
            }
        }
        self.step(now_ms);
    }

    pub(super) fn ask_witness(&mut self, now_ms: u64, alive: bool) {
        if now_ms < self.next_ask_ms || self.role_change_pending {
            return;
        }
        self.next_ask_ms = now_ms + self.cfg.timings.keepalive_ms;
        if !self.wants_lease(now_ms, alive) {
            // Keeps `witness_ok` true while the witness answers: whether this node reaches
            // the clients' network decides where the role goes when the primary does not.
            let req = self.request(now_ms, LeaseOp::Query, false);
            self.actions.push_back(Action::Witness(req));
            return;
        }
        let alone = if self.replica.primary {
            self.replica.frozen || !self.replica.in_sync && !alive
        } else {
            !alive
        };
        let req = self.request(now_ms, LeaseOp::Acquire, alone);
        self.actions.push_back(Action::Witness(req));
    }

    /// A primary always holds (renews) the lease; a secondary asks when it should take
    /// over.
    pub(super) fn wants_lease(&self, now_ms: u64, alive: bool) -> bool {
        if self.role_change_pending {
            return false;
        }
        if self.replica.primary {
            !self.standby
        } else {
            self.takeover_reason(now_ms, alive).is_some()
        }
    }

    pub(super) fn request(&mut self, now_ms: u64, op: LeaseOp, alone: bool) -> LeaseRequest {
        self.next_request_id += 1;
        let peer_in_sync = self.replica.primary && self.replica.in_sync && !self.replica.frozen;
        if self
            .in_sync_claimed_at
            .is_some_and(|e| e != self.witness_epoch)
        {
            self.in_sync_claimed_at = None; // The epoch moved on: the claim is stale.
        }
        let renew_alone = alone && self.in_sync_claimed_at == Some(self.witness_epoch);
        if peer_in_sync && op == LeaseOp::Acquire && self.witness_outdated.is_some() {
            self.in_sync_claimed_at = Some(self.witness_epoch);
        }
        let req = LeaseRequest {
            request_id: self.next_request_id,
            op,
            up_to_date: self.replica.promotable,
            alone,
            peer_in_sync,
            renew_alone,
            epoch: self.witness_epoch,
        };
        if self.outstanding.len() == MAX_OUTSTANDING {
            self.outstanding.pop_front();
        }
        self.outstanding.push_back(Outstanding {
            id: req.request_id,
            sent_ms: now_ms,
            op,
            alone,
        });
        req
    }

    /// A grant that recorded the peer outdated.
    pub(super) fn granted_alone(&mut self, now_ms: u64, until_ms: u64) {
        if self.replica.primary {
            self.alone_until_ms = self.alone_until_ms.max(until_ms);
            if self.replica.frozen {
                self.actions.push_back(Action::OutdatePeer);
            }
        } else if !self.role_change_pending {
            if let Some(why) = self.takeover_reason(now_ms, self.peer_alive(now_ms)) {
                self.alone_until_ms = until_ms;
                self.take_over(now_ms, why, true);
            }
        }
    }
}
