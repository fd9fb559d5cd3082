//! `twinsan witness`: the third vote for any number of pairs, each under its own key and
//! pair id. A UDP service around the sans-I/O `failover::witness::Witness`; each pair's
//! record (who is outdated, and the record's epoch) is written to `state_dir` and synced
//! before the reply that relies on it leaves.
//!
//! ```toml
//! state_dir = "/var/lib/twinsan-witness"
//! [[pair]]
//! id = "pair1"                  # the nodes' failover.pair_id
//! key = "the pair's peer.psk"
//! lease_ms = 500                # the pair's failover.deadtime_ms (default 500)
//! ```
//!
//! One lease length per witness process (the largest of its pairs'): a longer lease than a
//! pair's deadtime only delays that pair's takeovers, never makes them unsafe.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};

use failover::wire::{self, Body, Key, ReplayWindow, SeqCounter, WITNESS_SENDER};
use failover::witness::{Record, Witness};
use failover::NodeId;
use serde::Deserialize;

use super::boot_clock_ms;
use crate::config::failover_defaults::DEFAULT_TIMINGS;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWitness {
    state_dir: String,
    #[serde(rename = "pair")]
    pairs: Vec<RawPair>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPair {
    id: String,
    key: String,
    lease_ms: Option<u32>,
}

struct Pair {
    key: Key,
    windows: [ReplayWindow; 2],
    state_file: PathBuf,
}

/// Runs the witness on `listen` with the configuration file `config` (never returns
/// unless the socket or the configuration fails).
pub fn serve(listen: SocketAddr, config: &Path) -> std::io::Result<()> {
    let text = std::fs::read_to_string(config)?;
    let raw: RawWitness = toml::from_str(&text)
        .map_err(|e| std::io::Error::other(format!("{}: {e}", config.display())))?;
    if raw.pairs.is_empty() || raw.pairs.len() > failover::witness::MAX_PAIRS {
        return Err(std::io::Error::other(format!(
            "{}: 1..={} [[pair]] sections",
            config.display(),
            failover::witness::MAX_PAIRS
        )));
    }
    let base = config.parent().unwrap_or(Path::new("."));
    let state_dir = base.join(&raw.state_dir);
    std::fs::create_dir_all(&state_dir)?;
    let mut pairs = HashMap::new();
    let mut records = Vec::new();
    let mut lease_ms = 0u32;
    for p in raw.pairs {
        let l = p.lease_ms.unwrap_or(DEFAULT_TIMINGS.lease_ms() as u32);
        if !(100..=60_000).contains(&l) {
            return Err(std::io::Error::other(format!(
                "{}: pair `{}`: lease_ms {l} is outside 100..=60000",
                config.display(),
                p.id
            )));
        }
        lease_ms = lease_ms.max(l);
        if p.id.is_empty() || p.id.len() > wire::MAX_PAIR_ID_LEN || p.key.len() < 16 {
            return Err(std::io::Error::other(format!(
                "{}: pair `{}`: id must be 1..={} bytes and key at least 16",
                config.display(),
                p.id,
                wire::MAX_PAIR_ID_LEN
            )));
        }
        let state_file = state_dir.join(format!("{}.state", hex(p.id.as_bytes())));
        let record = load(&state_file)?;
        records.push((p.id.clone().into_bytes(), record));
        pairs.insert(
            p.id.into_bytes(),
            Pair {
                key: Key::derive(p.key.as_bytes()),
                windows: Default::default(),
                state_file,
            },
        );
    }
    let mut w = Witness::new(boot_clock_ms(), lease_ms, records);
    let sock = UdpSocket::bind(listen)?;
    tracing::info!(%listen, pairs = pairs.len(), lease_ms, "witness serving");
    // Above every earlier run's sequence numbers, whatever the clock did.
    let boot = super::boot_count::next(&state_dir, "witness.boot", super::boot_count::wall_secs())?;
    let mut seq = SeqCounter::starting_at(failover::wire::first_of_boot(boot));
    let mut buf = [0u8; wire::MAX_DATAGRAM_LEN + 1];
    loop {
        let (n, from) = sock.recv_from(&mut buf)?;
        let bytes = &buf[..n];
        let Some(id) = wire::peek_pair_id(bytes) else {
            continue;
        };
        let Some(pair) = pairs.get_mut(id) else {
            continue;
        };
        let Ok(d) = wire::open(&pair.key, bytes) else {
            continue;
        };
        let Body::LeaseRequest(req) = d.body else {
            continue;
        };
        if d.sender > 1 || pair.windows[usize::from(d.sender)].accept(d.seq).is_err() {
            continue;
        }
        let node = NodeId(d.sender);
        let before = w.record(&d.pair_id);
        let mut dec = w.request(boot_clock_ms(), &d.pair_id, node, req);
        if let Some(after) = dec.persist {
            if let Err(e) = store(&pair.state_file, after) {
                tracing::error!(error = %e, file = %pair.state_file.display(), "cannot persist a witness record: refusing");
                w.persist_failed(&d.pair_id, before, &mut dec.reply);
            } else {
                tracing::warn!(pair = %String::from_utf8_lossy(&d.pair_id), outdated = ?after.outdated, epoch = after.epoch, "record changed");
            }
        }
        let reply = wire::seal(
            &pair.key,
            &d.pair_id,
            WITNESS_SENDER,
            seq.next_seq(),
            &Body::LeaseReply(dec.reply),
        );
        let _ = sock.send_to(&reply, from);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Reads a pair's record: `outdated=0|1|none epoch=N`; a missing file is a new pair.
fn load(path: &Path) -> std::io::Result<Record> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Record::default()),
        Err(e) => return Err(e),
    };
    let mut r = Record::default();
    for field in text.split_whitespace() {
        match field.split_once('=') {
            Some(("outdated", "none")) => r.outdated = None,
            Some(("outdated", "0")) => r.outdated = Some(NodeId(0)),
            Some(("outdated", "1")) => r.outdated = Some(NodeId(1)),
            Some(("epoch", n)) => {
                r.epoch = n
                    .parse()
                    .map_err(|_| std::io::Error::other(format!("{}: bad epoch", path.display())))?
            }
            _ => {
                return Err(std::io::Error::other(format!(
                    "{}: unreadable record `{field}`",
                    path.display()
                )))
            }
        }
    }
    Ok(r)
}

/// Writes a record durably: a temporary file, synced, renamed over the old one, the
/// directory synced.
fn store(path: &Path, r: Record) -> std::io::Result<()> {
    let outdated = match r.outdated {
        None => "none".to_string(),
        Some(n) => n.0.to_string(),
    };
    super::boot_count::write_durably(path, &format!("outdated={outdated} epoch={}\n", r.epoch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_their_file() {
        let dir = std::env::temp_dir().join(format!("twinsan-witness-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.state");
        assert_eq!(load(&f).unwrap(), Record::default(), "a new pair");
        let r = Record {
            outdated: Some(NodeId(1)),
            epoch: 42,
        };
        store(&f, r).unwrap();
        assert_eq!(load(&f).unwrap(), r);
        std::fs::write(&f, "outdated=7").unwrap();
        assert!(
            load(&f).is_err(),
            "a damaged record stops the witness, never reads as none"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
