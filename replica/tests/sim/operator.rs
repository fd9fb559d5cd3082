//! The operator's commands and the rules an operator keeps (the module docs of sim.rs):
//! `promote`'s rules, `outdate-peer`, `resolve --discard-local` (engine: roles.rs).

use super::*;

impl Sim {
    /// Whether the operator may run `promote` on `n` (the rules of manual failover, in the
    /// module docs); the tool itself refuses what it must.
    pub(super) fn operator_may_promote(&self, n: NodeId) -> bool {
        let o = Self::other(n);
        let old_alive = self.up(o) && self.is_primary(o);
        // What `status` showed of the other node (its record on disk): it changed data the
        // peer does not have ("PeerOutdated", dirty regions); then this node must be
        // resynced from it first.
        // `demote` returns once the writes that were running are answered (or warns, and
        // the operator waits): a node still draining is not yet out of the way.
        let draining = self.nodes[o]
            .proc_
            .as_ref()
            .is_some_and(|p| !p.writes.is_empty());
        (!old_alive || self.reachable(o)) && !draining && !self.nodes[o].seen_peer_outdated
    }

    /// `twinsan outdate-peer` on node `n`. One cut short by a power failure may still have
    /// recorded it (the rename done, kept by the journal); `status` showed it in memory.
    pub(super) fn outdate_peer(&mut self, n: NodeId) {
        trace!(self, "node {n}: outdate-peer");
        self.with_mirror(n, |m, port| m.operator_outdate(port));
    }

    /// `twinsan resolve --discard-local` on node `n` (engine: `discard_local`): refused on a
    /// primary; its data is given up (outdated, inconsistent, crashed, on disk first) and
    /// the primary's next connection copies every region into it. Returns whether it was
    /// done (an operator whose command failed runs it again).
    pub(super) fn discard_local(&mut self, n: NodeId) -> bool {
        let node = &mut self.nodes[n];
        let Some(p) = node.proc_.as_mut() else {
            return false;
        };
        if p.primary {
            trace!(self, "node {n}: resolve --discard-local refused: primary");
            return false;
        }
        if p.parts.lun.discard_local().needed()
            && !persist(&mut node.disk, &mut p.parts.lun, &p.parts.intent)
        {
            trace!(
                self,
                "node {n}: resolve --discard-local failed: cannot persist"
            );
            return false;
        }
        trace!(self, "node {n}: resolve --discard-local");
        self.stats.discards += 1;
        true
    }

    /// The operator's `resolve --discard-local` on node `n`, at a random time: on the
    /// split-brain victim once the split brain shows (the other node keeps its data), or
    /// to rebuild a secondary while the other node serves (it holds every acknowledged
    /// write); on a primary the engine refuses it.
    pub(super) fn resolve(&mut self, n: NodeId) {
        let o = Self::other(n);
        if self.forced {
            if self.split_visible() {
                self.resolve_split_brain(n);
            }
        } else if self.is_primary(n)
            || (self.is_primary(o) && !self.nodes[o].paused && !self.nodes[o].lease_lost)
        {
            // A primary that lost its lease does not serve (the witness names the node
            // that does): its peer's data is not given up for it.
            self.discard_local(n);
        }
    }

    /// Whether the operator can see the split brain: the resync refused it (`status` says
    /// SplitBrain), or both nodes say primary.
    pub(super) fn split_visible(&self) -> bool {
        let both = self.writers().len() == 2 && self.reachable(0) && self.reachable(1);
        self.forced && (self.split_seen || both)
    }

    /// Resolves the split brain with node `victim`'s data given up: the other node, which
    /// serves, keeps its own. The operator restarts the victim's daemon if it is primary or
    /// still has writes running (they fail; it starts as secondary, as the peer is
    /// primary), then runs `resolve --discard-local` there. From then on the survivor's
    /// data is what the initiator has, and every invariant holds again.
    pub(super) fn resolve_split_brain(&mut self, victim: NodeId) {
        let survivor = Self::other(victim);
        let usable = self.nodes[survivor]
            .proc_
            .as_ref()
            .is_some_and(|p| p.primary && !p.parts.lun.unusable_as_primary());
        if !usable || !self.reachable(victim) || !self.reachable(survivor) {
            return;
        }
        let busy = self.nodes[victim]
            .proc_
            .as_ref()
            .is_some_and(|p| p.primary || !p.writes.is_empty());
        if busy {
            trace!(
                self,
                "node {victim}: the operator restarts it (split-brain victim)"
            );
            self.crash(victim, false);
            self.start(victim);
        }
        if !self.discard_local(victim) {
            return;
        }
        trace!(self, "split brain resolved: node {survivor}'s data kept");
        let d = &self.nodes[survivor].disk;
        self.model.reset_to(&d.volatile, &d.durable);
        self.forced = false;
        self.split_seen = false;
        for node in &mut self.nodes {
            node.diverged = false;
        }
        self.stats.resolved += 1;
    }
}
