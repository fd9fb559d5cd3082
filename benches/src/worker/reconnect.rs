//! `--reconnect`: what counts as a lost connection, and the new login that replaces it.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::{SlotState, Worker};
use crate::args::Reconnect;
use crate::conn::TransportError;

/// Pause between login attempts while reconnecting.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(50);
/// Longest TCP connect attempt while reconnecting: a portal whose address is moving drops
/// SYNs, and a long attempt would notice its return only at the kernel's next SYN
/// retransmission (1 s, then 3 s), inflating the measured stall.
pub(crate) const CONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);

/// Why a session's connection is no longer usable: what `--reconnect` recovers from by
/// logging in again. Protocol violations are not among them and stay fatal.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionLost {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("a command has been unanswered for {waited_ms} ms (--io-timeout-ms)")]
    NoProgress { waited_ms: u64 },
    #[error("the target announced the end of the connection (asynchronous event {event})")]
    Announced { event: u8 },
}

/// Why the I/O loop stopped before the drain finished.
pub(super) enum Interrupted {
    Lost(ConnectionLost),
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for Interrupted {
    fn from(e: anyhow::Error) -> Self {
        Interrupted::Fatal(e)
    }
}

impl From<TransportError> for Interrupted {
    fn from(e: TransportError) -> Self {
        Interrupted::Lost(e.into())
    }
}

impl Worker<'_> {
    /// Replaces the lost connection with a new login to the same URL (the same ISID, so
    /// the target reinstates the session and ends the old one's tasks), retrying every
    /// 50 ms for up to --reconnect-timeout-s, and queues every unanswered command to be
    /// sent again. Err when no login succeeded in time.
    pub(super) fn reconnect(&mut self, why: &ConnectionLost, policy: Reconnect) -> Result<()> {
        let failed_at = Instant::now();
        self.conn.shutdown();
        self.shared.timeline.connection_failed(failed_at);
        // A command sent on the lost connection may or may not have run: a write stays
        // unacknowledged (its generation pending in the tracker) until it is answered GOOD
        // on the new connection. Its units stay claimed, so it is re-sent unchanged.
        let mut lost = 0u64;
        for (i, s) in self.slots.iter_mut().enumerate() {
            if s.state == SlotState::Sent {
                s.state = SlotState::Waiting;
                self.retry.push_back((i, failed_at));
                lost += 1;
            }
        }
        eprintln!(
            "twinsan bench: session {}: connection lost ({why}) with {lost} commands unanswered; logging in again",
            self.idx
        );
        let deadline = failed_at + policy.timeout;
        let mut attempts = 0u32;
        let conn = loop {
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let err = match crate::open_session_within(
                self.job,
                self.chap,
                self.idx,
                Some(left.min(policy.io_timeout)),
            ) {
                Ok(c) => break c,
                Err(e) => e,
            };
            if Instant::now() + RECONNECT_BACKOFF >= deadline {
                bail!(
                    "connection lost ({why}) and no login succeeded within {:.1} s ({attempts} attempts; last: {err:#})",
                    policy.timeout.as_secs_f64()
                );
            }
            std::thread::sleep(RECONNECT_BACKOFF);
        };
        self.conn = conn;
        self.res.reconnects += 1;
        self.res.reissued += lost;
        self.next_timeout_check = Instant::now();
        eprintln!(
            "twinsan bench: session {}: logged in again {} ms after the failure ({attempts} attempts); re-issuing {lost} commands",
            self.idx,
            failed_at.elapsed().as_millis()
        );
        Ok(())
    }
}
