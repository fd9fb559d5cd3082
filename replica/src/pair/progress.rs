//! A resync's progress: bytes planned and copied, and the estimate of the time left.

/// `eta_ms` when there is no estimate yet (nothing copied, so no rate to extrapolate from).
pub const ETA_UNKNOWN: u64 = u64::MAX;

/// Progress of the resync of one LUN. On the source it is counted here; on the target it is
/// what the source last said (`ResyncProgress`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes the resync plans to copy (grows when regions get dirty again behind a pass).
    pub total_bytes: u64,
    /// Bytes copied so far.
    pub done_bytes: u64,
    /// When the resync started (the driver's clock, ms); source only.
    pub started_ms: u64,
    /// The source's estimate of the time left; target only.
    pub heard_eta_ms: u64,
}

impl Progress {
    /// A resync of `total_bytes` starting at `now_ms`.
    pub fn start(total_bytes: u64, now_ms: u64) -> Progress {
        Progress {
            total_bytes,
            done_bytes: 0,
            started_ms: now_ms,
            heard_eta_ms: ETA_UNKNOWN,
        }
    }

    /// `(done, total, eta_ms)` at `now_ms`, extrapolated from the rate so far.
    pub fn estimate(&self, now_ms: u64) -> (u64, u64, u64) {
        let total = self.total_bytes;
        let done = self.done_bytes.min(total);
        let elapsed_ms = now_ms.saturating_sub(self.started_ms).max(1);
        let eta_ms = match done {
            0 => ETA_UNKNOWN,
            _ => {
                u64::try_from(u128::from(total - done) * u128::from(elapsed_ms) / u128::from(done))
                    .unwrap_or(ETA_UNKNOWN)
            }
        };
        (done, total, eta_ms)
    }

    /// What the target shows: `(done, total, eta_ms)` as the source last said.
    pub fn heard(&self) -> (u64, u64, u64) {
        (self.done_bytes, self.total_bytes, self.heard_eta_ms)
    }
}

/// The ` resync X% eta Ns` suffix of a status line, or nothing while the plan is not known
/// (a target that has not heard the source's plan yet says so rather than 0%).
pub fn status_suffix((done, total, eta_ms): (u64, u64, u64)) -> String {
    if total == 0 {
        return String::new();
    }
    let eta = match eta_ms {
        ETA_UNKNOWN => "unknown".to_string(),
        ms => format!("{:.0}s", ms as f64 / 1000.0),
    };
    format!(
        " resync {:.1}% eta {eta}",
        done.min(total) as f64 * 100.0 / total as f64
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_extrapolates_the_rate_so_far() {
        let mut p = Progress::start(1000, 10_000);
        assert_eq!(p.estimate(10_500), (0, 1000, ETA_UNKNOWN));
        p.done_bytes = 250;
        // 250 bytes in 1 s: 750 more take 3 s.
        assert_eq!(p.estimate(11_000), (250, 1000, 3000));
        assert_eq!(status_suffix(p.estimate(11_000)), " resync 25.0% eta 3s");
        assert_eq!(status_suffix((0, 0, ETA_UNKNOWN)), "");
        assert_eq!(
            status_suffix((0, 10, ETA_UNKNOWN)),
            " resync 0.0% eta unknown"
        );
    }
}
