//! `[[snapshot_schedule]]`: snapshots taken on a period and kept up to a count, for example
//! hourly keep 24 and daily keep 7 (docs/snapshots.md).

use serde::Deserialize;

use super::{ConfigError, TargetConfig};

/// Schedules per node: each costs a cut per period.
pub const MAX_SCHEDULES: usize = 32;
/// The shortest period: a cut holds writes for milliseconds, and a schedule tighter than
/// this is a load generator, not a DR policy.
pub const MIN_EVERY_MS: u64 = 60_000;
/// Longest name prefix: the time stamp after it must fit a snapshot name (64 bytes).
pub const PREFIX_BYTES_MAX: usize = 40;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSchedule {
    luns: String,
    name: String,
    every: String,
    keep: u64,
}

/// One schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleConfig {
    /// The group (TARGET, TARGET/LUN, comma separated), cut at once.
    pub luns: String,
    /// Snapshot names are `<prefix>-<UTC time>`; retention counts this prefix only.
    pub prefix: String,
    /// Period.
    pub every_ms: u64,
    /// Snapshots of this schedule kept per LUN (the oldest beyond it are deleted).
    pub keep: usize,
}

/// Validates the schedules against the file's targets.
pub(super) fn schedules(
    raw: Vec<RawSchedule>,
    targets: &[TargetConfig],
    bad: &impl Fn(&str, String) -> ConfigError,
) -> Result<Vec<ScheduleConfig>, ConfigError> {
    if raw.len() > MAX_SCHEDULES {
        return Err(bad(
            "snapshot_schedule",
            format!(
                "{} schedules exceed the limit of {MAX_SCHEDULES}",
                raw.len()
            ),
        ));
    }
    let mut out: Vec<ScheduleConfig> = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let k = |f: &str| format!("snapshot_schedule[{i}].{f}");
        let name_ok = r.name.len() <= PREFIX_BYTES_MAX
            && replica::snapshot::SnapshotName::parse(&r.name).is_ok();
        if !name_ok {
            return Err(bad(
                &k("name"),
                format!("`{}` is not a name prefix: 1 to {PREFIX_BYTES_MAX} of letters, digits, '.', '_', ':', '-'", r.name),
            ));
        }
        if out.iter().any(|o| o.prefix == r.name) {
            return Err(bad(
                &k("name"),
                format!(
                    "`{}` names two schedules (retention would mix them)",
                    r.name
                ),
            ));
        }
        let every_ms = humantime::parse_duration(&r.every)
            .map_err(|e| {
                bad(
                    &k("every"),
                    format!("`{}` is not a duration like 15m, 1h, 1d: {e}", r.every),
                )
            })?
            .as_millis() as u64;
        if every_ms < MIN_EVERY_MS {
            return Err(bad(
                &k("every"),
                format!("`{}` is shorter than a minute", r.every),
            ));
        }
        let keep_max = replica::wire::SNAPSHOTS_PER_LUN_MAX as u64;
        if !(1..=keep_max).contains(&r.keep) {
            return Err(bad(
                &k("keep"),
                format!("{} is outside 1..={keep_max}", r.keep),
            ));
        }
        for part in r.luns.split(',') {
            let known = match part.rsplit_once('/') {
                _ if targets.iter().any(|t| t.name.eq_ignore_ascii_case(part)) => true,
                Some((t, id)) => targets.iter().any(|x| {
                    x.name.eq_ignore_ascii_case(t)
                        && id
                            .parse::<u64>()
                            .is_ok_and(|id| x.luns.iter().any(|l| l.id == id))
                }),
                None => false,
            };
            if !known {
                return Err(bad(
                    &k("luns"),
                    format!("`{part}` is neither a target nor a TARGET/LUN of this file"),
                ));
            }
        }
        out.push(ScheduleConfig {
            luns: r.luns,
            prefix: r.name,
            every_ms,
            keep: r.keep as usize,
        });
    }
    Ok(out)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReceive {
    listen: String,
    psk: String,
}

/// `[snapshot_receive]`: where this node takes diff streams that `twinsan snapshot ship`
/// sends, authenticated with a pre-shared key.
#[derive(Clone, PartialEq, Eq)]
pub struct ReceiveConfig {
    pub listen: std::net::SocketAddr,
    pub psk: String,
}

/// The key stays out of logs and `Debug` output.
impl std::fmt::Debug for ReceiveConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiveConfig")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

pub(super) fn receive(
    raw: Option<RawReceive>,
    bad: &impl Fn(&str, String) -> ConfigError,
) -> Result<Option<ReceiveConfig>, ConfigError> {
    let Some(r) = raw else { return Ok(None) };
    let listen = r.listen.parse().map_err(|_| {
        bad(
            "snapshot_receive.listen",
            format!("`{}` is not an ADDRESS:PORT", r.listen),
        )
    })?;
    let n = r.psk.len();
    let (min, max) = (replica::auth::PSK_BYTES_MIN, replica::auth::PSK_BYTES_MAX);
    if !(min..=max).contains(&n) {
        return Err(bad(
            "snapshot_receive.psk",
            format!("{n} bytes; a key has {min} to {max}"),
        ));
    }
    Ok(Some(ReceiveConfig { listen, psk: r.psk }))
}
