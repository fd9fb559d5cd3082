//! `[[snapshot_schedule]]`: a thread that takes each schedule's snapshot when its period
//! has passed since the newest one, on the primary only, and deletes the oldest beyond
//! `keep`. It reads the schedules from the live view each time, so a reload changes them.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use replica::snapshot::SnapshotName;

use crate::config::{Role, ScheduleConfig};
use crate::registry::Registry;

/// How often the schedules are looked at: a snapshot is at most this late.
const TICK: Duration = Duration::from_secs(5);
/// A schedule that failed (the pair apart, no reflink) is retried this often, not every
/// tick: each failure is logged.
const RETRY_MS: u64 = 60_000;

/// Whether a schedule whose newest snapshot was cut at `newest_ms` is due at `now_ms`.
pub fn due(now_ms: u64, newest_ms: Option<u64>, every_ms: u64) -> bool {
    newest_ms.is_none_or(|n| now_ms >= n.saturating_add(every_ms))
}

/// Of one schedule's snapshots on a LUN (creation times, any order), which to delete to keep
/// `keep`: the oldest.
pub fn expired(mut created_ms: Vec<(u64, String)>, keep: usize) -> Vec<String> {
    created_ms.sort();
    let excess = created_ms.len().saturating_sub(keep);
    created_ms
        .into_iter()
        .take(excess)
        .map(|(_, n)| n)
        .collect()
}

/// The name of a schedule's snapshot cut at `unix_ms`.
pub fn name_at(prefix: &str, unix_ms: u64) -> String {
    format!("{prefix}-{}", super::utc(unix_ms))
}

/// The schedule's snapshots on LUN `i`: (creation time, name). With `pinned_too` false,
/// those exported as LUNs are left out: retention neither deletes nor counts them.
fn of_schedule(reg: &Registry, i: usize, prefix: &str, pinned_too: bool) -> Vec<(u64, String)> {
    let st = reg.luns[i].snaps.lock().unwrap_or_else(|p| p.into_inner());
    let head = format!("{prefix}-");
    st.committed()
        .filter(|e| e.name.starts_with(&head))
        .filter(|e| pinned_too || super::exported_as(reg, &st.image_path(e.guid)).is_none())
        .map(|e| (e.created_unix_ms, e.name.clone()))
        .collect()
}

fn tick(reg: &Registry, failed_at: &mut HashMap<String, u64>) {
    if reg.role() != Role::Primary {
        return;
    }
    let now = super::now_unix_ms();
    let schedules: Vec<ScheduleConfig> = reg.view().config.snapshot_schedules.clone();
    for s in &schedules {
        let group = match super::find_group(reg, &s.luns) {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(schedule = %s.prefix, error = %e, "snapshot schedule names no LUN here");
                continue;
            }
        };
        if failed_at
            .get(&s.prefix)
            .is_some_and(|&t| now < t + RETRY_MS)
        {
            continue;
        }
        let newest = group
            .iter()
            .filter_map(|&i| {
                of_schedule(reg, i, &s.prefix, true)
                    .into_iter()
                    .map(|(t, _)| t)
                    .max()
            })
            .max();
        if due(now, newest, s.every_ms) {
            let name = name_at(&s.prefix, now);
            let r = SnapshotName::parse(&name)
                .map_err(|e| e.to_string())
                .and_then(|n| super::create(reg, &group, &n));
            match r {
                Ok(_) => {
                    failed_at.remove(&s.prefix);
                }
                Err(e) => {
                    tracing::warn!(schedule = %s.prefix, error = %e, "scheduled snapshot not taken; retried in a minute");
                    failed_at.insert(s.prefix.clone(), now);
                    continue;
                }
            }
        }
        for &i in &group {
            for old in expired(of_schedule(reg, i, &s.prefix, false), s.keep) {
                let Ok(n) = SnapshotName::parse(&old) else {
                    continue;
                };
                if let Err(e) = super::delete(reg, i, &n) {
                    tracing::warn!(schedule = %s.prefix, snapshot = %old, error = %e, "an expired snapshot was not deleted");
                }
            }
        }
    }
}

/// Starts the schedule thread; it ends with the registry.
pub fn spawn(reg: &Arc<Registry>) -> std::io::Result<()> {
    let weak: Weak<Registry> = Arc::downgrade(reg);
    std::thread::Builder::new()
        .name("snapshots".into())
        .spawn(move || {
            let mut failed_at = HashMap::new();
            loop {
                std::thread::sleep(TICK);
                let Some(reg) = weak.upgrade() else { return };
                tick(&reg, &mut failed_at);
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_is_due_once_its_period_passed_and_keeps_the_newest() {
        let hour = 3_600_000;
        assert!(due(5, None, hour), "a first snapshot at once");
        assert!(!due(10 * hour - 1, Some(9 * hour), hour));
        assert!(due(10 * hour, Some(9 * hour), hour));
        let names = |v: &[u64]| v.iter().map(|&t| (t, format!("h-{t}"))).collect::<Vec<_>>();
        assert_eq!(expired(names(&[30, 10, 20, 40]), 2), vec!["h-10", "h-20"]);
        assert!(expired(names(&[1, 2]), 2).is_empty());
        let n = name_at("hourly", 1_765_141_200_000);
        assert_eq!(n, "hourly-2025-12-07T21:00:00Z");
        assert!(SnapshotName::parse(&name_at(&"x".repeat(40), u64::from(u32::MAX) * 1000)).is_ok());
    }
}
