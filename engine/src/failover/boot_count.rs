//! The number of this process's start, kept in a small file: the base of its heartbeat
//! sequence numbers and lease request ids (`failover::wire::first_of_boot`), which must
//! increase across restarts. Each start takes the larger of "the last one plus one" (a
//! clock stepped back at boot changes nothing) and the wall clock in seconds (a node
//! rebuilt with an empty data directory still starts above its former self, whose numbers
//! its peer and the witness remember).

use std::path::Path;

/// The largest start number (the wire keeps 32 bits for it: wall-clock seconds until 2106).
const MAX_BOOTS: u64 = (1 << (64 - failover::wire::BOOT_SHIFT)) - 1;

/// Reads the start number in `dir/name` (0 if the file does not exist), stores the next
/// one, `max(last + 1, wall_secs)`, durably (temporary file, synced, renamed, directory
/// synced) and returns it. A file that cannot be parsed is an error: guessing could make
/// this node's datagrams look like replays to receivers that remember a higher number.
pub fn next(dir: &Path, name: &str, wall_secs: u64) -> std::io::Result<u64> {
    let path = dir.join(name);
    let before = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().map_err(|e| {
            std::io::Error::other(format!(
                "{}: not a start count ({e}); remove it only if both nodes and the witness restart too",
                path.display()
            ))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let now = (before + 1).max(wall_secs);
    if now > MAX_BOOTS {
        return Err(std::io::Error::other(format!(
            "{}: start count {before} at its limit",
            path.display()
        )));
    }
    write_durably(&path, &format!("{now}\n"))?;
    Ok(now)
}

/// Replaces `path` with `text`, durably ([`crate::disk::durable::replace_file`]).
pub(super) fn write_durably(path: &Path, text: &str) -> std::io::Result<()> {
    crate::disk::durable::replace_file(path, text.as_bytes())
}

/// The wall clock in whole seconds (0 if it reads before 1970).
pub fn wall_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increases_across_starts_whatever_the_clock_and_refuses_a_damaged_file() {
        let d = std::env::temp_dir().join(format!("twinsan-boot-count-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let _ = std::fs::remove_file(d.join("boot"));
        assert_eq!(
            next(&d, "boot", 1000).unwrap(),
            1000,
            "a fresh start: the clock"
        );
        assert_eq!(next(&d, "boot", 1500).unwrap(), 1500);
        assert_eq!(
            next(&d, "boot", 10).unwrap(),
            1501,
            "the clock stepped back: last + 1"
        );
        std::fs::write(d.join("boot"), "garbage").unwrap();
        assert!(
            next(&d, "boot", 2000).is_err(),
            "a damaged file is not guessed over"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
