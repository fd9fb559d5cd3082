//! The secondary's side of the primary's connections: which connection's messages may still
//! change data here ([`ApplyGate`]), and what each message does ([`ApplyConn::plan`]: the
//! engine's apply threads and the simulation perform the same [`Apply`] actions).
//!
//! A secondary that was paused (a frozen VM) or cut off and came back still holds, in its
//! socket buffers, writes the primary gave up on when it declared the peer lost (it recorded
//! their regions dirty, and its next resync copies them). Those late writes must not land
//! after the resync's copy of their region, or the copies differ while both say UpToDate.
//! So connections are numbered in accept order (the primary connects a resync's control
//! connection, and only once it is authenticated its new data links), and the first change
//! a resync makes closes every connection accepted before it.

use std::borrow::Cow;

use crate::genid::GenIds;
use crate::wire::{AckStatus, Frame, Message};

/// Accept order and the oldest connection whose messages are still applied.
#[derive(Debug, Default)]
pub struct ApplyGate {
    accepted: u64,
    oldest_admitted: u64,
}

/// Whether a message may be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Apply it.
    Apply,
    /// This node is primary now (promoted, or promoting): the old primary's connections
    /// close; nothing of theirs is applied.
    Promoted,
    /// The connection belongs to a mirroring round a newer resync replaced: it closes.
    Superseded,
}

impl ApplyGate {
    /// Numbers a new connection (accept order).
    pub fn accept(&mut self) -> u64 {
        self.accepted += 1;
        self.accepted
    }

    /// The resync on control connection `conn_id` starts changing data: connections
    /// accepted before it apply nothing more. The driver raises it once the messages being
    /// applied now have finished.
    pub fn supersede_older(&mut self, conn_id: u64) {
        self.oldest_admitted = self.oldest_admitted.max(conn_id);
    }

    /// This node is being promoted: every connection accepted so far belongs to the old
    /// primary and applies nothing more, even after a later demotion. Why: the promotion's
    /// fence closed them only at their next message; one that stayed quiet until this node
    /// was demoted again applied the old primary's stale writes (a resync's completion
    /// among them) over what this node wrote as primary (found by the simulation).
    pub fn close_all_accepted(&mut self) {
        self.oldest_admitted = self.accepted + 1;
    }

    /// Whether a message of connection `conn_id` may be applied, on a node that is
    /// (`fenced`) or is not being promoted.
    pub fn admit(&self, conn_id: u64, fenced: bool) -> Admit {
        if fenced {
            Admit::Promoted
        } else if conn_id < self.oldest_admitted {
            Admit::Superseded
        } else {
            Admit::Apply
        }
    }
}

/// Whether `msg`, on the primary's control connection, is a resync's change (the point from
/// which older connections must apply nothing more).
pub fn resync_change(msg: &Message) -> bool {
    matches!(
        msg,
        Message::ResyncData { .. }
            | Message::ResyncProgress { .. }
            | Message::WriteZeroes { .. }
            | Message::ResyncDone { .. }
    )
}

/// One of the primary's connections on this node: decides, for each message it carries,
/// whether a resync starts with it and what applying it does.
#[derive(Debug)]
pub struct ApplyConn {
    id: u64,
    control: bool,
    superseded_older: bool,
}

/// What applying one message does. The driver performs it, then acknowledges the message
/// with the outcome (the status an action names, or the I/O's).
#[derive(Debug, PartialEq, Eq)]
pub enum Apply<'a> {
    /// Nothing to change: answer with this status (a ping).
    Answer(AckStatus),
    /// Not applied, answered `Refused` (log why).
    Refused(Refusal),
    /// Change the LUN's bytes (checked inside the LUN).
    Change(Change<'a>),
    /// Make the LUN durable; a failure distrusts this node's copy (a failed fsync may have
    /// dropped written pages): the next resync copies every region into it.
    Flush {
        /// LUN index.
        lun: usize,
    },
    /// The resync into this LUN is complete: make everything copied durable first (a
    /// failure distrusts the copy and answers the error), then record `gen`
    /// ([`super::PairLun::resync_done_target`]), persisted before the answer.
    Complete {
        /// LUN index.
        lun: usize,
        /// The ids to adopt.
        gen: GenIds,
    },
    /// Store the reservation snapshot if it supersedes the one applied last
    /// ([`super::pr_snapshot_supersedes`], checked and stored under one lock).
    StorePr {
        /// LUN index.
        lun: usize,
        /// The primary instance that sent it.
        origin: u64,
        /// Its version at `origin`.
        version: u64,
        /// The encoded state.
        state: Vec<u8>,
    },
    /// Answer with the digest of a region instead of an ack (verify).
    Digest {
        /// LUN index.
        lun: usize,
        /// Region number.
        region: u64,
    },
    /// A snapshot step the primary orders ([`crate::snapshot`]): performed, then answered.
    Snapshot {
        /// LUN index.
        lun: usize,
        /// What to do.
        op: crate::snapshot::SnapOp,
        /// The snapshot's id.
        guid: u64,
        /// Its name.
        name: crate::snapshot::SnapshotName,
    },
    /// Follow the primary's snapshot list ([`crate::snapshot::reconcile`]), then answer.
    FollowSnapshots {
        /// LUN index.
        lun: usize,
        /// The primary's committed snapshots.
        guids: Vec<u64>,
    },
    /// The source's progress ([`super::PairLun::progress_heard`]).
    Progress {
        /// LUN index.
        lun: usize,
        /// Bytes copied.
        done_bytes: u64,
        /// Bytes planned.
        total_bytes: u64,
        /// The source's estimate.
        eta_ms: u64,
    },
}

/// A change of a LUN's bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Change<'a> {
    /// LUN index.
    pub lun: usize,
    /// Byte offset.
    pub offset: u64,
    /// What is done there.
    pub op: ChangeOp<'a>,
    /// A resync's copy: this node is recorded inconsistent (persisted) before it lands
    /// ([`super::PairLun::resync_data_arriving`]), until the resync completes.
    pub resync: bool,
}

/// What a [`Change`] does to its range.
#[derive(Debug, PartialEq, Eq)]
pub enum ChangeOp<'a> {
    /// Write `data` (durable before the answer if `fua`); its range is allocated.
    Write {
        /// The bytes.
        data: Cow<'a, [u8]>,
        /// Durable before the answer.
        fua: bool,
    },
    /// Deallocate `len` bytes (they read as zeros; the chunks it covers whole become holes
    /// once it is done). A resync chunk of zeros is one: a hole on the primary stays one.
    Punch {
        /// Bytes.
        len: u64,
    },
    /// Zero `len` bytes in place (they stay allocated, as on the primary).
    ZeroRange {
        /// Bytes.
        len: u64,
    },
}

impl ChangeOp<'_> {
    /// Bytes the change covers.
    pub fn len(&self) -> u64 {
        match self {
            ChangeOp::Write { data, .. } => data.len() as u64,
            ChangeOp::Punch { len } | ChangeOp::ZeroRange { len } => *len,
        }
    }

    /// Whether it covers nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a message is not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// This node has no LUN with that key.
    #[error("no LUN with key {0:#x} here")]
    UnknownLun(u64),
    /// The range reaches past the LUN's end: a peer configured with a larger LUN must not
    /// grow ours.
    #[error("{len} bytes at {offset} reach past the LUN's {size_bytes} bytes")]
    BeyondLun {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// The LUN's size here.
        size_bytes: u64,
    },
    /// A message a primary never sends on a connection to its secondary.
    #[error("not a message a secondary applies")]
    Unexpected,
}

impl ApplyConn {
    /// Connection `id` (from [`ApplyGate::accept`]); `control`: the primary's control
    /// connection (resync, pings, verify), not a data link.
    pub fn new(id: u64, control: bool) -> ApplyConn {
        ApplyConn {
            id,
            control,
            superseded_older: false,
        }
    }

    /// Whether this message is the first resync change on the control connection: every
    /// connection accepted before it must apply nothing more. The driver then raises the
    /// gate ([`ApplyGate::supersede_older`] with [`Self::id`]) once the messages being
    /// applied have finished, before this one is applied.
    pub fn supersedes(&mut self, frame: &Frame<'_>) -> bool {
        let first = self.control
            && !self.superseded_older
            && matches!(frame, Frame::Other(m) if resync_change(m));
        self.superseded_older |= first;
        first
    }

    /// The connection's number in accept order.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether its messages may be applied (`fenced`: this node is being promoted).
    pub fn admit(&self, gate: &ApplyGate, fenced: bool) -> Admit {
        gate.admit(self.id, fenced)
    }

    /// What applying `frame` does; `lun` finds a LUN's index and size by its key.
    pub fn plan<'a>(
        &self,
        frame: Frame<'a>,
        lun: impl Fn(u64) -> Option<(usize, u64)>,
    ) -> Apply<'a> {
        let msg = match frame {
            Frame::Write(w) => {
                return change(
                    &lun,
                    w.lun_key,
                    w.offset_bytes,
                    false,
                    ChangeOp::Write {
                        data: Cow::Borrowed(w.data),
                        fua: w.fua,
                    },
                )
            }
            Frame::Other(msg) => msg,
        };
        plan_message(msg, lun)
    }
}

/// What applying `msg` (not a borrowed write) does.
fn plan_message<'a>(msg: Message, lun: impl Fn(u64) -> Option<(usize, u64)>) -> Apply<'a> {
    let find = |key| lun(key).map(|(i, _)| i).ok_or(Refusal::UnknownLun(key));
    let planned = match msg {
        Message::Write {
            lun_key,
            offset_bytes,
            fua,
            data,
        } => {
            return change(
                &lun,
                lun_key,
                offset_bytes,
                false,
                ChangeOp::Write {
                    data: Cow::Owned(data),
                    fua,
                },
            )
        }
        Message::ResyncData {
            lun_key,
            offset_bytes,
            data,
        } => {
            let op = if data.iter().all(|&b| b == 0) {
                ChangeOp::Punch {
                    len: data.len() as u64,
                }
            } else {
                ChangeOp::Write {
                    data: Cow::Owned(data),
                    fua: false,
                }
            };
            return change(&lun, lun_key, offset_bytes, true, op);
        }
        Message::WriteZeroes {
            lun_key,
            offset_bytes,
            len_bytes,
            unmap,
        } => {
            let op = if unmap {
                ChangeOp::Punch { len: len_bytes }
            } else {
                ChangeOp::ZeroRange { len: len_bytes }
            };
            return change(&lun, lun_key, offset_bytes, false, op);
        }
        Message::Flush { lun_key } => find(lun_key).map(|lun| Apply::Flush { lun }),
        Message::ResyncDone { lun_key, gen } => {
            find(lun_key).map(|lun| Apply::Complete { lun, gen })
        }
        Message::PrState {
            lun_key,
            origin,
            version,
            state,
        } => find(lun_key).map(|lun| Apply::StorePr {
            lun,
            origin,
            version,
            state,
        }),
        Message::VerifyRequest { lun_key, region } => {
            find(lun_key).map(|lun| Apply::Digest { lun, region })
        }
        Message::ResyncProgress {
            lun_key,
            done_bytes,
            total_bytes,
            eta_ms,
        } => find(lun_key).map(|lun| Apply::Progress {
            lun,
            done_bytes,
            total_bytes,
            eta_ms,
        }),
        Message::Snapshot {
            lun_key,
            op,
            guid,
            name,
        } => find(lun_key).map(|lun| Apply::Snapshot {
            lun,
            op,
            guid,
            name,
        }),
        Message::SnapshotList { lun_key, guids } => {
            find(lun_key).map(|lun| Apply::FollowSnapshots { lun, guids })
        }
        Message::Ping { .. } => Ok(Apply::Answer(AckStatus::Ok)),
        _ => Err(Refusal::Unexpected),
    };
    planned.unwrap_or_else(Apply::Refused)
}

/// A change of `op` at `offset` of LUN `key`, if the LUN is here and holds the range.
fn change<'a>(
    lun: &impl Fn(u64) -> Option<(usize, u64)>,
    key: u64,
    offset: u64,
    resync: bool,
    op: ChangeOp<'a>,
) -> Apply<'a> {
    let Some((i, size_bytes)) = lun(key) else {
        return Apply::Refused(Refusal::UnknownLun(key));
    };
    let len = op.len();
    if offset.checked_add(len).is_none_or(|end| end > size_bytes) {
        return Apply::Refused(Refusal::BeyondLun {
            offset,
            len,
            size_bytes,
        });
    }
    Apply::Change(Change {
        lun: i,
        offset,
        op,
        resync,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resync_closes_every_connection_accepted_before_it() {
        let mut gate = ApplyGate::default();
        let old_link = gate.accept();
        let control = gate.accept();
        let new_link = gate.accept();
        assert_eq!(gate.admit(old_link, false), Admit::Apply);
        gate.supersede_older(control);
        assert_eq!(gate.admit(old_link, false), Admit::Superseded);
        assert_eq!(gate.admit(control, false), Admit::Apply);
        assert_eq!(gate.admit(new_link, false), Admit::Apply);
        // A promotion closes them all.
        assert_eq!(gate.admit(new_link, true), Admit::Promoted);
        // A promotion closes every connection accepted before it, for good.
        let mut fenced = ApplyGate::default();
        let before = fenced.accept();
        fenced.close_all_accepted();
        let after = fenced.accept();
        assert_eq!(fenced.admit(before, false), Admit::Superseded);
        assert_eq!(fenced.admit(after, false), Admit::Apply);
        // An older resync's connection never lowers the gate again.
        gate.supersede_older(old_link);
        assert_eq!(gate.admit(old_link, false), Admit::Superseded);
    }

    #[test]
    fn only_resync_changes_supersede() {
        assert!(resync_change(&Message::ResyncDone {
            lun_key: 1,
            gen: Default::default()
        }));
        assert!(!resync_change(&Message::Ping { now_ms: 1 }));
        assert!(!resync_change(&Message::Flush { lun_key: 1 }));
    }

    const LUN_KEY: u64 = 9;
    const SIZE: u64 = 1 << 20;

    fn luns(key: u64) -> Option<(usize, u64)> {
        (key == LUN_KEY).then_some((0, SIZE))
    }

    #[test]
    fn only_the_first_resync_change_on_the_control_connection_supersedes() {
        let resync = || {
            Frame::Other(Message::ResyncProgress {
                lun_key: LUN_KEY,
                done_bytes: 0,
                total_bytes: 0,
                eta_ms: 0,
            })
        };
        let mut control = ApplyConn::new(3, true);
        assert!(!control.supersedes(&Frame::Other(Message::Ping { now_ms: 1 })));
        assert!(control.supersedes(&resync()));
        assert!(!control.supersedes(&resync()), "once");
        // A data link carries no resync.
        let mut link = ApplyConn::new(4, false);
        assert!(!link.supersedes(&resync()));
    }

    #[test]
    fn a_change_outside_the_lun_or_of_another_lun_is_refused() {
        let conn = ApplyConn::new(1, false);
        let write = |offset_bytes, lun_key| {
            Frame::Write(crate::wire::WriteRef {
                lun_key,
                offset_bytes,
                fua: true,
                data: &[7; 512],
            })
        };
        assert_eq!(
            conn.plan(write(SIZE - 512, LUN_KEY), luns),
            Apply::Change(Change {
                lun: 0,
                offset: SIZE - 512,
                op: ChangeOp::Write {
                    data: Cow::Borrowed(&[7; 512]),
                    fua: true
                },
                resync: false,
            })
        );
        assert_eq!(
            conn.plan(write(SIZE - 511, LUN_KEY), luns),
            Apply::Refused(Refusal::BeyondLun {
                offset: SIZE - 511,
                len: 512,
                size_bytes: SIZE
            })
        );
        // An offset that would wrap around is beyond the LUN too, not a small one.
        let zeroes = Frame::Other(Message::WriteZeroes {
            lun_key: LUN_KEY,
            offset_bytes: u64::MAX,
            len_bytes: 2,
            unmap: true,
        });
        assert!(matches!(
            conn.plan(zeroes, luns),
            Apply::Refused(Refusal::BeyondLun { .. })
        ));
        assert_eq!(
            conn.plan(write(0, 8), luns),
            Apply::Refused(Refusal::UnknownLun(8))
        );
        let ack = Frame::Other(Message::Ack {
            seq: 1,
            status: AckStatus::Ok,
        });
        assert_eq!(conn.plan(ack, luns), Apply::Refused(Refusal::Unexpected));
    }

    #[test]
    fn resync_zeros_stay_holes_and_mark_the_copy_inconsistent_first() {
        let conn = ApplyConn::new(1, true);
        let chunk = |data: Vec<u8>| {
            Frame::Other(Message::ResyncData {
                lun_key: LUN_KEY,
                offset_bytes: 4096,
                data,
            })
        };
        let Apply::Change(hole) = conn.plan(chunk(vec![0; 4096]), luns) else {
            panic!("a change");
        };
        assert_eq!(hole.op, ChangeOp::Punch { len: 4096 });
        assert!(hole.resync);
        let Apply::Change(data) = conn.plan(chunk(vec![1; 4096]), luns) else {
            panic!("a change");
        };
        assert!(matches!(data.op, ChangeOp::Write { fua: false, .. }));
        assert!(data.resync);
        // A mirrored WRITE SAME: deallocated with UNMAP, zeroed in place without.
        let same = |unmap| {
            Frame::Other(Message::WriteZeroes {
                lun_key: LUN_KEY,
                offset_bytes: 0,
                len_bytes: 8192,
                unmap,
            })
        };
        assert!(matches!(
            conn.plan(same(true), luns),
            Apply::Change(Change {
                op: ChangeOp::Punch { len: 8192 },
                resync: false,
                ..
            })
        ));
        assert!(matches!(
            conn.plan(same(false), luns),
            Apply::Change(Change {
                op: ChangeOp::ZeroRange { len: 8192 },
                ..
            })
        ));
    }
}
