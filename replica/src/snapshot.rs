//! Snapshots on a pair, sans-I/O: what a snapshot is called, the order in which the primary
//! cuts a group of LUNs on both nodes ([`Cut`]), and how a secondary's catalogue follows the
//! primary's after they were apart ([`reconcile`]).
//!
//! A cut is crash-consistent and the same on both nodes because the primary *drains* every
//! LUN of the group first: new writes wait, and every write already running finishes, which
//! under protocol C means it is on both nodes. With nothing in flight, the peer clones each
//! LUN into a *pending* snapshot, then this node does; only then may writes go on. The
//! snapshot is committed here, then on the peer, and the operator hears "ok" only once both
//! hold it. A pending snapshot is never served: a node promoted while holding one drops it
//! (the old primary may never have committed it), and a secondary that reconnects keeps
//! exactly the primary's list (committing a pending one the primary holds, dropping the rest).
//! So a failover at any step leaves the snapshot whole on both nodes or on neither.

use std::fmt;

pub mod stream;

/// Longest snapshot name, in bytes.
pub const NAME_BYTES_MAX: usize = 64;
/// LUNs one cut may cover (a consistency group): far above the LUNs of one target in
/// practice, and the bound on how long a cut holds writes.
pub const GROUP_LUNS_MAX: usize = 64;

/// A snapshot's name: 1 to 64 of `[A-Za-z0-9._:-]`, not starting with `.` or `-` (it is part
/// of file names and command lines).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotName(String);

/// Why a name is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty.
    #[error("a snapshot name cannot be empty")]
    Empty,
    /// Longer than [`NAME_BYTES_MAX`].
    #[error("a snapshot name has at most {NAME_BYTES_MAX} bytes ({0} given)")]
    TooLong(usize),
    /// A character outside the allowed set, or a leading `.`/`-`.
    #[error("a snapshot name holds only letters, digits, '.', '_', ':' and '-', and starts with a letter, a digit or '_' ({0:?} given)")]
    BadChar(String),
}

impl SnapshotName {
    /// Parses a name from the operator or the wire.
    pub fn parse(s: &str) -> Result<SnapshotName, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > NAME_BYTES_MAX {
            return Err(NameError::TooLong(s.len()));
        }
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
        if !s.chars().all(ok_char) || s.starts_with(['.', '-']) {
            return Err(NameError::BadChar(s.to_string()));
        }
        Ok(SnapshotName(s.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SnapshotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the primary asks of the secondary for one LUN's snapshot (the wire's `Snapshot`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapOp {
    /// Clone the LUN now into a pending snapshot (nothing is in flight: the primary drained).
    Prepare,
    /// The pending snapshot is committed under its name.
    Commit,
    /// Drop the pending snapshot.
    Abort,
    /// Delete a committed snapshot.
    Delete,
    /// Replace the LUN's data by the snapshot's (the primary drained, and rolled back first).
    Rollback,
    /// Before a cut, while writes go on: clone the LUN into a staging file and track what
    /// is written meanwhile, so that `Prepare` under the hold only clones that again. A
    /// peer that does not know it refuses it, and its `Prepare` clones the whole file.
    Stage,
}

impl SnapOp {
    /// Its code on the wire.
    pub fn code(self) -> u8 {
        match self {
            SnapOp::Prepare => 1,
            SnapOp::Commit => 2,
            SnapOp::Abort => 3,
            SnapOp::Delete => 4,
            SnapOp::Rollback => 5,
            SnapOp::Stage => 6,
        }
    }

    /// The op of a wire code.
    pub fn from_code(code: u8) -> Option<SnapOp> {
        Some(match code {
            1 => SnapOp::Prepare,
            2 => SnapOp::Commit,
            3 => SnapOp::Abort,
            4 => SnapOp::Delete,
            5 => SnapOp::Rollback,
            6 => SnapOp::Stage,
            _ => return None,
        })
    }
}

/// What the primary knows of its peer when asked for a cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerView {
    /// No peer is configured: the cut is local.
    Standalone,
    /// Mirroring, and the peer's copy is up to date: the cut is taken on both nodes.
    InSync,
    /// A peer is configured but cannot take the same cut now (why, for the operator).
    Apart(String),
}

/// Why a cut is refused before it starts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CutRefusal {
    /// Only the primary orders writes.
    #[error("snapshots are taken on the primary (this node is secondary)")]
    NotPrimary,
    /// The peer could not take the same cut.
    #[error("the peer cannot take the same snapshot now ({0}): a snapshot on one node only would be lost by a failover; retry once `twinsan status` shows the pair UpToDate")]
    PeerApart(String),
    /// No LUN, or more than [`GROUP_LUNS_MAX`].
    #[error("a snapshot covers 1 to {GROUP_LUNS_MAX} LUNs ({0} given)")]
    GroupSize(usize),
}

/// One step of a cut, for the driver to perform and report ([`Cut::done`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutStep {
    /// Make every LUN of the group wait for new writes and for those running to finish
    /// (bounded: a drain that does not finish in time fails the cut).
    Drain,
    /// Ask the peer for `op` on group member `lun` (an index into the group).
    Peer {
        /// Group member.
        lun: usize,
        /// What to do.
        op: SnapOp,
    },
    /// Do `op` here on group member `lun`.
    Local {
        /// Group member.
        lun: usize,
        /// What to do.
        op: SnapOp,
    },
    /// Let writes go on.
    Release,
    /// Over: the outcome for the operator.
    Finished(CutOutcome),
}

/// How a cut ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutOutcome {
    /// Committed on every node that takes it.
    Taken,
    /// Nowhere (every pending clone was dropped, or is dropped at the peer's reconnect).
    Failed,
    /// Committed here; the peer holds it pending and keeps it when the pair reconnects,
    /// unless it is promoted first (then neither keeps it once this node rejoins).
    PeerUnconfirmed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Draining,
    PeerPrepare(usize),
    LocalPrepare(usize),
    Release,
    LocalCommit(usize),
    PeerCommit(usize),
    /// Undo after a failure: drop pending clones here (index < `local_prepared`) and on the
    /// peer (index < `peer_prepared`), then release if still drained.
    AbortLocal(usize),
    AbortPeer(usize),
    ReleaseAfterAbort,
    Over(CutOutcome),
}

/// The primary's cut of a group of LUNs, one step at a time. The driver asks [`Cut::next`],
/// performs the step, and reports its success with [`Cut::done`]; nothing else decides the
/// order. Release comes as soon as both nodes hold their clones, so writes wait only for the
/// drain and the clones, never for the commits.
#[derive(Clone, Debug)]
pub struct Cut {
    luns: usize,
    peer: bool,
    phase: Phase,
    drained: bool,
    peer_prepared: usize,
    local_prepared: usize,
}

impl Cut {
    /// A cut of `luns` LUNs, refused unless this node is primary and its peer (if any) can
    /// take it too.
    pub fn start(primary: bool, peer: PeerView, luns: usize) -> Result<Cut, CutRefusal> {
        if !primary {
            return Err(CutRefusal::NotPrimary);
        }
        if luns == 0 || luns > GROUP_LUNS_MAX {
            return Err(CutRefusal::GroupSize(luns));
        }
        let peer = match peer {
            PeerView::Standalone => false,
            PeerView::InSync => true,
            PeerView::Apart(why) => return Err(CutRefusal::PeerApart(why)),
        };
        Ok(Cut {
            luns,
            peer,
            phase: Phase::Draining,
            drained: false,
            peer_prepared: 0,
            local_prepared: 0,
        })
    }

    /// The step to perform now.
    pub fn next(&self) -> CutStep {
        match self.phase {
            Phase::Draining => CutStep::Drain,
            Phase::PeerPrepare(lun) => CutStep::Peer {
                lun,
                op: SnapOp::Prepare,
            },
            Phase::LocalPrepare(lun) => CutStep::Local {
                lun,
                op: SnapOp::Prepare,
            },
            Phase::Release | Phase::ReleaseAfterAbort => CutStep::Release,
            Phase::LocalCommit(lun) => CutStep::Local {
                lun,
                op: SnapOp::Commit,
            },
            Phase::PeerCommit(lun) => CutStep::Peer {
                lun,
                op: SnapOp::Commit,
            },
            Phase::AbortLocal(lun) => CutStep::Local {
                lun,
                op: SnapOp::Abort,
            },
            Phase::AbortPeer(lun) => CutStep::Peer {
                lun,
                op: SnapOp::Abort,
            },
            Phase::Over(outcome) => CutStep::Finished(outcome),
        }
    }

    /// Reports the step [`Cut::next`] gave: `ok` is whether it succeeded.
    pub fn done(&mut self, ok: bool) {
        let after_prepares = |c: &Cut| {
            if c.peer {
                Phase::PeerPrepare(0)
            } else {
                Phase::LocalPrepare(0)
            }
        };
        self.phase = match (self.phase, ok) {
            (Phase::Draining, true) => {
                self.drained = true;
                after_prepares(self)
            }
            (Phase::Draining, false) => Phase::Over(CutOutcome::Failed),
            (Phase::PeerPrepare(i), true) => {
                self.peer_prepared = i + 1;
                if i + 1 < self.luns {
                    Phase::PeerPrepare(i + 1)
                } else {
                    Phase::LocalPrepare(0)
                }
            }
            (Phase::LocalPrepare(i), true) => {
                self.local_prepared = i + 1;
                if i + 1 < self.luns {
                    Phase::LocalPrepare(i + 1)
                } else {
                    Phase::Release
                }
            }
            (Phase::PeerPrepare(_) | Phase::LocalPrepare(_), false) => self.abort(),
            (Phase::Release, _) => {
                // Writes go on whatever the release reports: a cut never holds them longer.
                self.drained = false;
                Phase::LocalCommit(0)
            }
            (Phase::LocalCommit(i), true) if i + 1 < self.luns => Phase::LocalCommit(i + 1),
            (Phase::LocalCommit(_), true) if self.peer => Phase::PeerCommit(0),
            (Phase::LocalCommit(_), true) => Phase::Over(CutOutcome::Taken),
            // A commit here failed (the catalogue could not be written): drop every pending
            // clone, including those of members committed already, so the group stays whole
            // or absent.
            (Phase::LocalCommit(_), false) => self.abort(),
            (Phase::PeerCommit(i), true) if i + 1 < self.luns => Phase::PeerCommit(i + 1),
            (Phase::PeerCommit(_), true) => Phase::Over(CutOutcome::Taken),
            (Phase::PeerCommit(_), false) => Phase::Over(CutOutcome::PeerUnconfirmed),
            (Phase::AbortLocal(i), _) => {
                if i + 1 < self.local_prepared {
                    Phase::AbortLocal(i + 1)
                } else {
                    self.after_local_aborts()
                }
            }
            (Phase::AbortPeer(i), _) => {
                if i + 1 < self.peer_prepared {
                    Phase::AbortPeer(i + 1)
                } else {
                    self.after_peer_aborts()
                }
            }
            (Phase::ReleaseAfterAbort, _) => {
                self.drained = false;
                Phase::Over(CutOutcome::Failed)
            }
            (Phase::Over(o), _) => Phase::Over(o),
        };
    }

    fn abort(&mut self) -> Phase {
        if self.local_prepared > 0 {
            Phase::AbortLocal(0)
        } else {
            self.after_local_aborts()
        }
    }

    fn after_local_aborts(&self) -> Phase {
        if self.peer_prepared > 0 {
            Phase::AbortPeer(0)
        } else {
            self.after_peer_aborts()
        }
    }

    fn after_peer_aborts(&self) -> Phase {
        if self.drained {
            Phase::ReleaseAfterAbort
        } else {
            Phase::Over(CutOutcome::Failed)
        }
    }

    /// Whether the peer takes the cut too.
    pub fn with_peer(&self) -> bool {
        self.peer
    }

    /// Whether writes are held now (between a successful drain and the release).
    pub fn holding_writes(&self) -> bool {
        self.drained
    }
}

/// One snapshot as a catalogue lists it: its id (the same on both nodes, and the base a diff
/// stream names) and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Id, chosen by the primary at the cut.
    pub guid: u64,
    /// Name.
    pub name: SnapshotName,
    /// Whether it is still pending (cloned, not committed).
    pub pending: bool,
}

/// What a secondary does to one of its snapshots to follow the primary's list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Follow {
    /// The primary committed it: commit the pending clone here.
    Commit(u64),
    /// The primary does not hold it: delete it here (pending or not).
    Drop(u64),
    /// The primary holds it and this node never cloned it (it was apart at the cut).
    Missing(u64),
}

/// How a secondary's snapshots (`here`) follow the primary's committed ones (`primary`).
pub fn reconcile(primary: &[u64], here: &[Listed]) -> Vec<Follow> {
    let mut out = Vec::new();
    for s in here {
        match (primary.contains(&s.guid), s.pending) {
            (true, true) => out.push(Follow::Commit(s.guid)),
            (true, false) => {}
            (false, _) => out.push(Follow::Drop(s.guid)),
        }
    }
    for &g in primary {
        if !here.iter().any(|s| s.guid == g) {
            out.push(Follow::Missing(g));
        }
    }
    out
}

#[cfg(test)]
mod tests;
