//! The sync source's side of one resync round and the watch that follows it, as a step
//! machine: [`SourceRun::next`] says what the driver does now (send a message on the control
//! connection, copy a range, end a pass under the coordinator's lock, wait), the driver does
//! it and reports the outcome through the method the step names. The engine's manager thread
//! and the simulation drive this same type, so the order of a resync (the round opened before
//! anything is mirrored, the head chunk before any hole, passes until the bitmap is clean,
//! reservations before the completion, the round checked at every decision) is code both run,
//! not a model of the other. Nothing here does I/O or reads a clock: `now_ms` is passed in,
//! and [`SourceStep::Wait`] is the timer.

use std::collections::VecDeque;

use super::{Mirror, PairLun, PassEnd, Persist, Port, ResyncPlan};
use crate::genid::GenIds;

/// The pace and timers of a resync round, in the driver's clock (ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceTimers {
    /// Copy rate limit, bytes per second (at least 1).
    pub rate_bytes_per_s: u64,
    /// How often the target hears the progress while copying. Why bounded: the target
    /// takes a control connection silent for twice its timeout for a dead source, and a
    /// slow region at a low rate must not look like one.
    pub progress_interval_ms: u64,
    /// How often an idle, in-sync primary pings the peer over the control connection.
    pub ping_interval_ms: u64,
    /// How long a ping's answer may take before the peer is lost (the replica timeout).
    pub ping_timeout_ms: u64,
    /// How long any other answer may take: above the slowest honest one (a completion's
    /// flush of the target's page cache).
    pub answer_timeout_ms: u64,
    /// The head chunk's size: the start of the first region, sent as data whatever it holds.
    pub head_bytes: u64,
}

/// What the driver does now. Each step that talks to the peer is one request on the control
/// connection answered by one Ok ack (anything else ends the round: [`SourceRun::stop`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceStep {
    /// Send the round's first resync change (`ResyncProgress` of `lun`, all zeros): the peer
    /// stops applying what connections accepted before this one still carry. At its ack,
    /// [`SourceRun::opened`] starts the round (writes are mirrored from then on).
    Open {
        /// Index of the first LUN (none: nothing to send, call `opened` at once).
        lun: Option<usize>,
    },
    /// Lock the LUN's pair record and call [`SourceRun::begin`]; persist if it asks.
    Begin {
        /// LUN index.
        lun: usize,
    },
    /// Copy `offset..offset + len` as data (even if it is a hole: the target marks itself
    /// inconsistent on the first data) under the range's copy lock; then [`SourceRun::sent`].
    CopyHead {
        /// LUN index.
        lun: usize,
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Copy region `region` (data, or one deallocation for a hole) under its range's copy
    /// lock; once acknowledged and still under the lock, [`SourceRun::region_sent`].
    CopyRegion {
        /// LUN index.
        lun: usize,
        /// Region number.
        region: u64,
    },
    /// Send `lun`'s progress ([`PairLun::source_progress`]); then [`SourceRun::sent`].
    Progress {
        /// LUN index.
        lun: usize,
    },
    /// A pass over `lun` ended: under the coordinator's lock, [`SourceRun::end_pass`].
    EndPass {
        /// LUN index.
        lun: usize,
    },
    /// Send the LUN's current reservations (not mirrored while the peer was away); then
    /// [`SourceRun::sent`].
    Reservations {
        /// LUN index.
        lun: usize,
    },
    /// Send `ResyncDone` with `gen`; at its ack, under the coordinator's lock,
    /// [`SourceRun::completion_acked`].
    Completion {
        /// LUN index.
        lun: usize,
        /// The ids the target adopts.
        gen: GenIds,
    },
    /// Every LUN is in sync: under the coordinator's lock, [`SourceRun::finish`].
    Finish,
    /// Send a ping; at its answer, [`SourceRun::sent`].
    Ping,
    /// Nothing to do before `until_ms` (the copy pace, or the next ping).
    Wait {
        /// When to call [`SourceRun::next`] again.
        until_ms: u64,
    },
    /// An answer is overdue, or the peer was lost: end the round ([`SourceRun::stop`]).
    Stop(SourceStop),
    /// The round ended ([`SourceRun::stop`] was called): close the control connection.
    Over,
}

/// Why a round ends early.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SourceStop {
    /// The peer was lost (a write's link, a ping) since the round started.
    #[error("the peer was lost during the resync")]
    PeerLost,
    /// An answer did not come within the timeout.
    #[error("the peer did not answer in time")]
    Overdue,
    /// Regions kept getting dirty behind the passes.
    #[error("{0} regions keep getting dirty during the resync")]
    KeepsDirty(u64),
    /// This node was demoted before the round began.
    #[error("demoted before the resync's round began")]
    Demoted,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Opening,
    Begin,
    /// The head of the first region goes as data; `queue` is the pass to copy after it.
    Head {
        offset: u64,
        len: u64,
        queue: VecDeque<u64>,
    },
    FirstProgress {
        queue: VecDeque<u64>,
    },
    Copy {
        queue: VecDeque<u64>,
        passes: u32,
    },
    Reservations {
        gen: GenIds,
    },
    Completion {
        gen: GenIds,
    },
    Finish,
    Watching {
        next_ping_ms: u64,
    },
    Over,
}

/// One resync round from this node (the sync source) and the watch after it.
#[derive(Clone, Debug)]
pub struct SourceRun {
    timers: SourceTimers,
    plans: Vec<(usize, ResyncPlan)>,
    /// Index into `plans` of the LUN being synced.
    at: usize,
    round: Option<u64>,
    phase: Phase,
    /// The step handed out and not answered yet, with when.
    in_flight: Option<(SourceStep, u64)>,
    started_ms: u64,
    copied_bytes: u64,
    progress_sent_ms: u64,
}

impl SourceRun {
    /// A round over `plans` (LUN index, plan), in that order, starting at `now_ms`.
    pub fn new(plans: Vec<(usize, ResyncPlan)>, timers: SourceTimers, now_ms: u64) -> SourceRun {
        assert!(
            timers.rate_bytes_per_s > 0,
            "a resync rate of zero never ends"
        );
        assert!(timers.head_bytes > 0, "the head chunk carries data");
        SourceRun {
            timers,
            plans,
            at: 0,
            round: None,
            phase: Phase::Opening,
            in_flight: None,
            started_ms: now_ms,
            copied_bytes: 0,
            progress_sent_ms: now_ms,
        }
    }

    /// The round this run belongs to, once opened.
    pub fn round(&self) -> Option<u64> {
        self.round
    }

    /// Whether the current LUN's resync is its first copy to a new peer.
    pub fn initial(&self) -> bool {
        self.plans
            .get(self.at)
            .is_some_and(|(_, plan)| plan.initial)
    }

    /// Bytes of data copied so far (holes count nothing).
    pub fn copied_bytes(&self) -> u64 {
        self.copied_bytes
    }

    /// Regions the current pass over the current LUN has left to copy.
    pub fn pass_regions(&self) -> usize {
        match &self.phase {
            Phase::Head { queue, .. }
            | Phase::FirstProgress { queue }
            | Phase::Copy { queue, .. } => queue.len(),
            _ => 0,
        }
    }

    /// Whether every LUN is in sync and the run only watches the peer now.
    pub fn watching(&self) -> bool {
        matches!(self.phase, Phase::Watching { .. })
    }

    /// Whether the round ended.
    pub fn is_over(&self) -> bool {
        self.phase == Phase::Over
    }

    /// The step handed out and not answered yet.
    pub fn in_flight(&self) -> Option<&SourceStep> {
        self.in_flight.as_ref().map(|(s, _)| s)
    }

    /// The range a copy on its way holds locked against writes: `(lun, offset, len)`.
    pub fn copy_in_flight(&self, region_bytes: u64) -> Option<(usize, u64, u64)> {
        match self.in_flight {
            Some((SourceStep::CopyHead { lun, offset, len }, _)) => Some((lun, offset, len)),
            Some((SourceStep::CopyRegion { lun, region }, _)) => {
                Some((lun, region * region_bytes, region_bytes))
            }
            _ => None,
        }
    }

    /// What the driver does now (`peer_up`: the coordinator still mirrors to the peer).
    /// While a step is in flight: `Wait` until its answer is due, then `Stop(Overdue)`.
    pub fn next(&mut self, now_ms: u64, peer_up: bool) -> SourceStep {
        if self.phase == Phase::Over {
            return SourceStep::Over;
        }
        if let Some((step, sent_ms)) = &self.in_flight {
            let timeout_ms = match step {
                SourceStep::Ping => self.timers.ping_timeout_ms,
                _ => self.timers.answer_timeout_ms,
            };
            let due_ms = sent_ms.saturating_add(timeout_ms);
            if now_ms > due_ms {
                return SourceStep::Stop(SourceStop::Overdue);
            }
            return SourceStep::Wait {
                until_ms: due_ms + 1,
            };
        }
        if self.round.is_some() && !peer_up {
            return SourceStep::Stop(SourceStop::PeerLost);
        }
        let step = self.step(now_ms);
        if !matches!(
            step,
            SourceStep::Wait { .. } | SourceStep::Stop(_) | SourceStep::Over
        ) {
            self.in_flight = Some((step.clone(), now_ms));
        }
        step
    }

    /// The step of the current phase.
    fn step(&mut self, now_ms: u64) -> SourceStep {
        if self.phase == Phase::Opening {
            let lun = self.plans.first().map(|&(lun, _)| lun);
            return SourceStep::Open { lun };
        }
        let Some(&(lun, _)) = self.plans.get(self.at) else {
            // Every LUN is done (or there were none): the round completes, then watches.
            return match self.phase {
                Phase::Watching { next_ping_ms } if now_ms < next_ping_ms => SourceStep::Wait {
                    until_ms: next_ping_ms,
                },
                Phase::Watching { .. } => SourceStep::Ping,
                Phase::Over => SourceStep::Over,
                _ => {
                    self.phase = Phase::Finish;
                    SourceStep::Finish
                }
            };
        };
        match &self.phase {
            Phase::Begin => SourceStep::Begin { lun },
            &Phase::Head { offset, len, .. } => SourceStep::CopyHead { lun, offset, len },
            Phase::FirstProgress { .. } => SourceStep::Progress { lun },
            Phase::Copy { queue, .. } => {
                if now_ms.saturating_sub(self.progress_sent_ms) >= self.timers.progress_interval_ms
                {
                    return SourceStep::Progress { lun };
                }
                // The pace: the bytes copied so far may not run ahead of the rate.
                let pace_ms = self.copied_bytes.saturating_mul(1000) / self.timers.rate_bytes_per_s;
                let due_ms = self.started_ms.saturating_add(pace_ms);
                if due_ms > now_ms {
                    let progress_ms = self
                        .progress_sent_ms
                        .saturating_add(self.timers.progress_interval_ms);
                    return SourceStep::Wait {
                        until_ms: due_ms.min(progress_ms),
                    };
                }
                match queue.front() {
                    Some(&region) => SourceStep::CopyRegion { lun, region },
                    None => SourceStep::EndPass { lun },
                }
            }
            Phase::Reservations { .. } => SourceStep::Reservations { lun },
            &Phase::Completion { gen } => SourceStep::Completion { lun, gen },
            // Only once every LUN is done (above).
            Phase::Opening | Phase::Finish | Phase::Watching { .. } | Phase::Over => {
                unreachable!("{:?} with LUN {lun} still to sync", self.phase)
            }
        }
    }

    /// The step in flight is answered: takes it, checking it is of the kind `what` accepts.
    fn answered(&mut self, what: fn(&SourceStep) -> bool) -> SourceStep {
        let Some((step, _)) = self.in_flight.take() else {
            panic!("an answer with no step in flight");
        };
        assert!(what(&step), "an answer to another step: {step:?}");
        step
    }

    /// The peer acknowledged the round's first change: the round starts on the coordinator
    /// (writes are mirrored from now on: a region copy and a write to the same region are
    /// serialized by the range lock, so one pass over what is dirty suffices). Returns it,
    /// or `Demoted`: the node was demoted since it planned, and no round starts
    /// ([`Mirror::start_round`] says why); end the run.
    pub fn opened(&mut self, mirror: &mut Mirror) -> Result<u64, SourceStop> {
        self.answered(|s| matches!(s, SourceStep::Open { .. }));
        let round = mirror.start_round().ok_or(SourceStop::Demoted)?;
        self.round = Some(round);
        self.phase = Phase::Begin;
        Ok(round)
    }

    /// The current LUN's resync begins on its record at `now_ms`: every region to copy is
    /// the plan and everything dirty. Persist if asked before going on (the plan must be
    /// durable in the bitmap: an interrupted full copy resumes with what it did not copy).
    pub fn begin(&mut self, pair: &mut PairLun, now_ms: u64) -> Persist {
        self.answered(|s| matches!(s, SourceStep::Begin { .. }));
        let (_, plan) = &self.plans[self.at];
        let (regions, persist) = pair.begin_resync(plan, now_ms);
        let queue: VecDeque<u64> = regions.into();
        // The target marks itself inconsistent on the first ResyncData: the start of the
        // first region goes as data even if it is a hole, before any hole region goes as
        // a deallocation (which the target cannot tell from a mirrored write).
        self.phase = match queue.front() {
            Some(&first) => {
                let offset = first * pair.region_bytes();
                let len = pair
                    .meta()
                    .size_bytes
                    .saturating_sub(offset)
                    .min(self.timers.head_bytes);
                Phase::Head { offset, len, queue }
            }
            None => Phase::FirstProgress { queue },
        };
        persist
    }

    /// The step in flight (the head chunk, progress, reservations, a ping) was answered Ok,
    /// carrying `bytes` of data, at `now_ms`.
    pub fn sent(&mut self, now_ms: u64, bytes: u64) {
        let step = self.answered(|s| {
            matches!(
                s,
                SourceStep::CopyHead { .. }
                    | SourceStep::Progress { .. }
                    | SourceStep::Reservations { .. }
                    | SourceStep::Ping
            )
        });
        self.copied_bytes = self.copied_bytes.saturating_add(bytes);
        let phase = std::mem::replace(&mut self.phase, Phase::Over);
        self.phase = match (step, phase) {
            (SourceStep::CopyHead { .. }, Phase::Head { queue, .. }) => {
                Phase::FirstProgress { queue }
            }
            (SourceStep::Progress { .. }, Phase::FirstProgress { queue }) => {
                self.progress_sent_ms = now_ms;
                Phase::Copy { queue, passes: 0 }
            }
            (SourceStep::Progress { .. }, phase) => {
                self.progress_sent_ms = now_ms;
                phase
            }
            (SourceStep::Reservations { .. }, Phase::Reservations { gen }) => {
                Phase::Completion { gen }
            }
            (SourceStep::Ping, Phase::Watching { .. }) => Phase::Watching {
                next_ping_ms: now_ms.saturating_add(self.timers.ping_interval_ms),
            },
            (step, phase) => unreachable!("{step:?} answered in {phase:?}"),
        };
    }

    /// The copy of the region in flight was acknowledged with `bytes` of data; call still
    /// under its range lock (a write to the region after this is mirrored): its bit clears.
    pub fn region_sent(&mut self, pair: &mut PairLun, bytes: u64) {
        let step = self.answered(|s| matches!(s, SourceStep::CopyRegion { .. }));
        let SourceStep::CopyRegion { region, .. } = step else {
            unreachable!("checked by answered");
        };
        pair.region_copied(region);
        self.copied_bytes = self.copied_bytes.saturating_add(bytes);
        if let Phase::Copy { queue, .. } = &mut self.phase {
            let copied = queue.pop_front();
            assert_eq!(
                copied,
                Some(region),
                "regions are copied in their pass's order"
            );
        }
    }

    /// A pass over the current LUN ended. Call under the coordinator's lock: a peer loss
    /// either came before (its record stands: no completion) or comes after the completion
    /// is persisted (and records the peer outdated again). `Ok(persist)`: persist if asked
    /// before going on (a failure ends the round); `Err`: end the round.
    pub fn end_pass(
        &mut self,
        mirror: &Mirror,
        pair: &mut PairLun,
        random: [u8; 8],
    ) -> Result<Persist, SourceStop> {
        self.answered(|s| matches!(s, SourceStep::EndPass { .. }));
        if !self.round.is_some_and(|r| mirror.round_stands(r)) {
            return Err(SourceStop::PeerLost);
        }
        let initial = self.plans[self.at].1.initial;
        let Phase::Copy { passes, .. } = self.phase else {
            unreachable!("a pass ends while copying: {:?}", self.phase);
        };
        match pair.end_pass(initial, passes, random) {
            PassEnd::Complete { gen, persist } => {
                // Reservations changed while the peer was away were not mirrored: the
                // peer takes the current state before it is declared up to date.
                self.phase = Phase::Reservations { gen };
                Ok(persist)
            }
            PassEnd::Again(dirty) => {
                self.phase = Phase::Copy {
                    queue: dirty.into(),
                    passes: passes + 1,
                };
                Ok(Persist::No)
            }
            PassEnd::GiveUp { dirty } => Err(SourceStop::KeepsDirty(dirty)),
        }
    }

    /// The target acknowledged the current LUN's completion. Call under the coordinator's
    /// lock, as [`Self::end_pass`]: a loss since the pass ended voided it. `Ok(persist)`:
    /// persist if asked (a failure only costs a longer resync next time); the next LUN
    /// follows.
    pub fn completion_acked(
        &mut self,
        mirror: &Mirror,
        pair: &mut PairLun,
    ) -> Result<Persist, SourceStop> {
        self.answered(|s| matches!(s, SourceStep::Completion { .. }));
        if !self.round.is_some_and(|r| mirror.round_stands(r)) {
            return Err(SourceStop::PeerLost);
        }
        let persist = pair.completion_acknowledged();
        self.at += 1;
        self.phase = Phase::Begin;
        Ok(persist)
    }

    /// Every LUN of the round is in sync: held completions go out (`Mirror::round_synced`),
    /// and a crash before the write-intent log is covered on each LUN of the round. Call
    /// under the coordinator's lock, with the node as its port. From now on the run watches
    /// the peer.
    pub fn finish(
        &mut self,
        mirror: &mut Mirror,
        port: &mut dyn Port,
        now_ms: u64,
    ) -> Result<(), SourceStop> {
        self.answered(|s| matches!(s, SourceStep::Finish));
        let round = self.round.ok_or(SourceStop::Demoted)?;
        if !mirror.round_synced(port, round) {
            // Held writes were recorded by the loss; they stay held (suspend) until the next
            // resync or `outdate-peer`.
            return Err(SourceStop::PeerLost);
        }
        for &(lun, _) in &self.plans {
            port.update_lun(lun, &mut |pair| {
                pair.crash_covered();
                Persist::No
            });
        }
        self.phase = Phase::Watching {
            next_ping_ms: now_ms.saturating_add(self.timers.ping_interval_ms),
        };
        Ok(())
    }

    /// The round ends (an error, a refused answer, the connection closed, a stop step, or
    /// this node stopped being primary). Whatever was not copied stays dirty; the driver
    /// closes the control connection and, unless the node was demoted, declares the peer
    /// lost.
    pub fn stop(&mut self) {
        self.in_flight = None;
        self.phase = Phase::Over;
    }
}

#[cfg(test)]
mod tests;
