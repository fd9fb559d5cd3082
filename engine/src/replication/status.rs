//! `twinsan status` lines of the pair, and the clean stop.

use super::*;

impl Replication {
    /// A clean stop: no write is in flight any more, so the crash marker goes.
    pub fn clean_shutdown(&self) {
        for l in &self.luns {
            let mut p = l.pair();
            // Nothing is in flight any more: no write-intent region needs to survive.
            if l.persist_with(&mut p, &[]).is_ok() {
                let _ = std::fs::remove_file(running_marker(&l.backing));
            }
        }
    }

    /// Status lines for `twinsan status`.
    pub fn status(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let up = self.peer_up.load(Ordering::Acquire);
        // On a secondary: whether a primary's control connection stands.
        let primary_connected = self.primary_links.load(Ordering::Acquire) > 0;
        let link = if !self.is_primary() {
            // A secondary's own peer_up says nothing: whether a primary is there does.
            if primary_connected {
                "primary connected, receiving its writes"
            } else {
                "no primary connected"
            }
        } else if up {
            "connected, mirroring"
        } else {
            "not mirroring"
        };
        let _ = writeln!(
            s,
            "peer: {} at {} ({link})",
            self.cfg.name, self.cfg.address
        );
        let theirs = self.peer_wire_version.load(Ordering::Relaxed);
        if theirs != 0 {
            let _ = writeln!(
                s,
                "note: the peer speaks replica protocol version {theirs}, this node {}: \
                 run the same twinsan version on both nodes",
                wire::VERSION
            );
        }
        if let Some(note) = self
            .start_note
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = writeln!(s, "note: {note}");
        }
        if let Some(v) = self.verify_status() {
            let _ = writeln!(s, "{v}");
        }
        let now = now_ms(&self.epoch);
        // A removed or read-only LUN is not the pair's: no state to show.
        for (i, l) in self.luns.iter().enumerate() {
            if !self.unreplicated(i) {
                let _ = writeln!(s, "{}", l.pair().status_line(now, primary_connected));
            }
        }
        s
    }
}

/// The pair's figures for the metrics endpoint.
pub struct PairFigures {
    /// Writes are mirrored to the peer now (primary), or a primary's control connection
    /// stands (secondary).
    pub peer_connected: bool,
    pub luns: Vec<PairLunFigures>,
    /// Every data link's ack latencies, summed.
    pub ack_latency: crate::metrics::HistogramTotals,
}

/// One LUN's part of [`PairFigures`].
pub struct PairLunFigures {
    /// Its registry index.
    pub index: usize,
    /// Bytes out of sync (the dirty bitmap).
    pub dirty_bytes: u64,
    /// The running resync's `(done, total)` bytes (zeros when none runs).
    pub resync: (u64, u64),
    /// Bytes of data resyncs from this node ever copied.
    pub resync_copied_bytes: u64,
}

impl Replication {
    /// What the metrics endpoint shows of the pair, read at scrape.
    pub fn figures(&self) -> PairFigures {
        let peer_connected = if self.is_primary() {
            self.peer_up.load(Ordering::Acquire)
        } else {
            self.primary_links.load(Ordering::Acquire) > 0
        };
        let now = now_ms(&self.epoch);
        let luns = self
            .luns
            .iter()
            .enumerate()
            .map(|(index, l)| {
                let p = l.pair();
                let dirty_bytes = p.meta().bitmap.dirty_bytes();
                let (done, total, _) = match p.state() {
                    SyncState::SyncSource => p.source_progress(now),
                    SyncState::SyncTarget => p.heard_progress(),
                    _ => (0, 0, 0),
                };
                PairLunFigures {
                    index,
                    dirty_bytes,
                    resync: (done, total),
                    resync_copied_bytes: l.resync_copied_bytes.load(Ordering::Relaxed),
                }
            })
            .collect();
        let mut ack_latency = crate::metrics::HistogramTotals::default();
        for link in &self.links {
            ack_latency.add(&link.ack_latency);
        }
        PairFigures {
            peer_connected,
            luns,
            ack_latency,
        }
    }
}
