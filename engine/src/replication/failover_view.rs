//! What the failover controller sees of the replica (`failover::controller::ReplicaView`),
//! and the lease deadline it hands back for writes made without the peer.

use super::*;

impl Replication {
    /// The replica's state as the failover controller needs it. `primary` is the node's
    /// role; `trust_local`: the witness vouches for this node's data being current (else
    /// only a connection in this run can tell: a restarted secondary's data is merely
    /// consistent until its primary connected and found it in sync).
    pub fn failover_view(
        &self,
        primary: bool,
        trust_local: bool,
    ) -> failover::controller::ReplicaView {
        let (mirroring, held) = self.with_mirror(|m, _| (m.mirroring(), m.held()));
        let states: Vec<SyncState> = self.live_luns().map(|l| l.state()).collect();
        let usable = self.live_luns().all(|l| !l.pair().blocks_promotion());
        let known_current =
            trust_local || primary || states.iter().all(|s| *s == SyncState::UpToDate);
        failover::controller::ReplicaView {
            primary,
            promotable: usable && known_current && !states.contains(&SyncState::SplitBrain),
            in_sync: primary && mirroring && states.iter().all(|s| *s == SyncState::UpToDate),
            frozen: primary && held > 0 && !mirroring,
        }
    }

    /// The end of the failover lease for writes made without the peer
    /// (`failover::controller::Controller::alone_until_ms`).
    pub fn set_alone_until_ms(&self, until_ms: u64) {
        self.alone_until_ms.store(until_ms, Ordering::Release);
    }
}
