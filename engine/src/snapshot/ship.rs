//! `twinsan snapshot ship`: a diff stream sent to another twinsan over TCP, authenticated
//! with a pre-shared key (the replica link's challenge-response, `replica::auth`, with this
//! protocol's own ids), and resumable: the receiver keeps the records it has in a partial
//! file and says how many bytes that is; the sender makes the same stream again (a diff of
//! two clones is deterministic) and sends from there.
//!
//! The exchange: the sender's nonce; the receiver's nonce and proof; the sender's proof;
//! then a request line `SHIP TARGET/LUN TO_GUID` and the answer `HAVE BYTES` (or `ERROR
//! why`); the stream from that byte to its end record; the answer `OK what` or `ERROR why`
//! once the receiver applied it (`snapshot::apply`, as `snapshot apply` does).

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use rand::RngCore;
use replica::auth::{Role, Transcript};
use replica::snapshot::stream::{Reader, Record};

use crate::config::ReceiveConfig;
use crate::registry::Registry;

/// The ids bound into every proof: a MAC of this protocol never verifies on the replica
/// link (whose ids are node names) and the other way round.
const SENDER_ID: &str = "twinsan-ship-sender";
const RECEIVER_ID: &str = "twinsan-ship-receiver";
/// Longest request or answer line.
const LINE_BYTES_MAX: usize = 1024;
/// Connections received at once: each applies a stream with a LUN's writes held.
const RECEIVERS_MAX: usize = 4;
/// A sender silent this long is dropped (its partial file stays, to resume).
const IDLE: Duration = Duration::from_secs(60);

fn put_line(s: &mut impl Write, line: &str) -> std::io::Result<()> {
    // Cut on a character boundary: the reader refuses a line that is not UTF-8.
    let b = &line.as_bytes()[..line.floor_char_boundary(LINE_BYTES_MAX)];
    let n = u16::try_from(b.len()).unwrap_or(0);
    s.write_all(&n.to_le_bytes())?;
    s.write_all(&b[..usize::from(n)])
}

fn get_line(s: &mut impl Read) -> std::io::Result<String> {
    let mut n = [0u8; 2];
    s.read_exact(&mut n)?;
    let n = usize::from(u16::from_le_bytes(n));
    if n > LINE_BYTES_MAX {
        return Err(std::io::Error::other("line too long"));
    }
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    String::from_utf8(b).map_err(|_| std::io::Error::other("line is not UTF-8"))
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut n);
    n
}

fn transcript(initiator_nonce: [u8; 32], acceptor_nonce: [u8; 32]) -> Transcript {
    Transcript {
        initiator_id: SENDER_ID.into(),
        acceptor_id: RECEIVER_ID.into(),
        initiator_nonce,
        acceptor_nonce,
    }
}

/// What a ship did.
pub struct Shipped {
    /// Bytes the receiver had already (a resumed ship).
    pub resumed_at: u64,
    /// Bytes sent now.
    pub sent: u64,
    /// The receiver's answer.
    pub answer: String,
}

/// Sends the stream `make` writes (the same bytes each time it is called) to the receiver
/// at `to` for LUN `lun` (TARGET/LUN there), authenticated with `psk`, at most `rate`
/// bytes per second (0: no limit); with `progress`, a line on stderr each second.
pub fn send(
    to: &str,
    psk: &[u8],
    lun: &str,
    to_guid: u64,
    rate: u64,
    progress: bool,
    make: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<Shipped, String> {
    let mut s = TcpStream::connect(to).map_err(|e| format!("{to}: {e}"))?;
    s.set_read_timeout(Some(IDLE)).map_err(|e| e.to_string())?;
    let io = |e: std::io::Error| format!("{to}: {e}");
    let mine = nonce();
    s.write_all(&mine).map_err(io)?;
    let (mut theirs, mut proof) = ([0u8; 32], [0u8; 32]);
    s.read_exact(&mut theirs).map_err(io)?;
    s.read_exact(&mut proof).map_err(io)?;
    let t = transcript(mine, theirs);
    t.verify(psk, Role::Acceptor, &proof)
        .map_err(|e| format!("{to}: the receiver is not who it should be: {e}"))?;
    let mac = t.mac(psk, Role::Initiator).map_err(|e| e.to_string())?;
    s.write_all(&mac).map_err(io)?;
    put_line(&mut s, &format!("SHIP {lun} {to_guid:016x}")).map_err(io)?;
    let answer = get_line(&mut s).map_err(io)?;
    let have: u64 = match answer.strip_prefix("HAVE ") {
        Some(n) => n
            .parse()
            .map_err(|_| format!("{to}: bad answer {answer:?}"))?,
        None => return Err(format!("{to}: {}", answer.trim_start_matches("ERROR "))),
    };
    let mut w = SkipThenSend {
        skip: have,
        sent: 0,
        rate,
        started: Instant::now(),
        shown: progress.then(Instant::now),
        s: &mut s,
    };
    make(&mut w).map_err(io)?;
    let sent = w.sent;
    if progress {
        eprintln!();
    }
    s.flush().map_err(io)?;
    let answer = get_line(&mut s).map_err(io)?;
    match answer.strip_prefix("OK ") {
        Some(ok) => Ok(Shipped {
            resumed_at: have,
            sent,
            answer: ok.to_string(),
        }),
        None => Err(format!("{to}: {}", answer.trim_start_matches("ERROR "))),
    }
}

/// Drops the first `skip` bytes (the receiver has them), sends the rest, paced to `rate`.
struct SkipThenSend<'a> {
    skip: u64,
    sent: u64,
    rate: u64,
    started: Instant,
    /// When progress was last shown (None: not shown).
    shown: Option<Instant>,
    s: &'a mut TcpStream,
}

impl Write for SkipThenSend<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let drop_n = self.skip.min(buf.len() as u64) as usize;
        self.skip -= drop_n as u64;
        let rest = &buf[drop_n..];
        if !rest.is_empty() {
            self.s.write_all(rest)?;
            self.sent += rest.len() as u64;
            if self
                .shown
                .is_some_and(|t| t.elapsed() >= Duration::from_secs(1))
            {
                let secs = self.started.elapsed().as_secs_f64().max(1e-3);
                eprint!(
                    "\rshipped {:.1} MiB at {:.1} MiB/s   ",
                    self.sent as f64 / 1048576.0,
                    self.sent as f64 / 1048576.0 / secs
                );
                self.shown = Some(Instant::now());
            }
            if self.rate > 0 {
                let due = Duration::from_secs_f64(self.sent as f64 / self.rate as f64);
                if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

/// Starts the receiver on `cfg.listen`; it ends with the registry.
pub fn serve(cfg: &ReceiveConfig, reg: &Arc<Registry>) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(cfg.listen)?;
    let addr = l.local_addr()?;
    let psk = cfg.psk.clone().into_bytes();
    let weak = Arc::downgrade(reg);
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("snapshot-receive".into())
        .spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                if weak.strong_count() == 0 {
                    return;
                }
                if busy.fetch_add(1, Ordering::AcqRel) >= RECEIVERS_MAX {
                    busy.fetch_sub(1, Ordering::AcqRel);
                    let _ = put_line(&mut c, "ERROR busy: too many streams at once; retry");
                    continue;
                }
                let (weak, psk, busy) = (Weak::clone(&weak), psk.clone(), Arc::clone(&busy));
                let spawned = std::thread::Builder::new()
                    .name("snapshot-recv".into())
                    .spawn(move || {
                        let peer = c.peer_addr().ok();
                        if let Err(e) = receive(&mut c, &psk, &weak) {
                            tracing::warn!(?peer, error = %e, "snapshot stream not received");
                            let _ = put_line(&mut c, &format!("ERROR {e}"));
                        }
                        busy.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    tracing::error!("cannot start a snapshot receiver thread");
                }
            }
        })?;
    Ok(addr)
}

/// One sender: authenticate, say what is here, take the rest, apply it.
fn receive(c: &mut TcpStream, psk: &[u8], reg: &Weak<Registry>) -> Result<(), String> {
    c.set_read_timeout(Some(IDLE)).map_err(|e| e.to_string())?;
    let io = |e: std::io::Error| e.to_string();
    let mut theirs = [0u8; 32];
    c.read_exact(&mut theirs).map_err(io)?;
    let mine = nonce();
    let t = transcript(theirs, mine);
    let proof = t.mac(psk, Role::Acceptor).map_err(|e| e.to_string())?;
    c.write_all(&mine).map_err(io)?;
    c.write_all(&proof).map_err(io)?;
    let mut mac = [0u8; 32];
    c.read_exact(&mut mac).map_err(io)?;
    t.verify(psk, Role::Initiator, &mac)
        .map_err(|e| format!("sender not authenticated: {e}"))?;
    let line = get_line(c).map_err(io)?;
    let mut words = line.split(' ');
    let (Some("SHIP"), Some(lun_spec), Some(guid), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(format!("bad request {line:?}"));
    };
    let guid = u64::from_str_radix(guid, 16).map_err(|_| format!("bad snapshot id {guid:?}"))?;
    let reg = reg.upgrade().ok_or("shutting down")?;
    let lun_index = super::find_lun(&reg, lun_spec)?;
    let path = partial_path(&reg.luns[lun_index].path, guid);
    let (reader, have, ended) =
        keep_whole_records(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    put_line(c, &format!("HAVE {have}")).map_err(io)?;
    // A whole stream may be here already (its apply was refused, or its answer lost).
    let complete =
        ended || take_rest(c, &path, reader).map_err(|e| format!("{}: {e}", path.display()))?;
    if !complete {
        return Err("the stream ended before its end record; ship again to resume".into());
    }
    let r = super::apply(&reg, lun_index, &path, false);
    // A stream refused only for now is kept for the next ship; otherwise it has served.
    if !matches!(r, Err(super::ApplyRefused::Later(_))) {
        let _ = std::fs::remove_file(&path);
    }
    match r {
        Ok(done) => put_line(c, &format!("OK {}", done.trim_end())).map_err(io),
        Err(e) => Err(e.to_string()),
    }
}

/// `<lun file>.snapshots/incoming-<guid>.tsd`.
fn partial_path(lun_path: &std::path::Path, guid: u64) -> PathBuf {
    let mut dir = lun_path.as_os_str().to_owned();
    dir.push(".snapshots");
    PathBuf::from(dir).join(format!("incoming-{guid:016x}.tsd"))
}

/// Reads the partial file in pieces (a stream may be far larger than memory), cuts it after
/// its last whole, valid record, and returns the reader positioned there, its length, and
/// whether the end record is in (no file: an empty one).
fn keep_whole_records(path: &std::path::Path) -> std::io::Result<(Reader, u64, bool)> {
    let mut r = Reader::new();
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((r, 0, false)),
        Err(e) => return Err(e),
    };
    let (mut carry, mut chunk) = (Vec::new(), vec![0u8; 1 << 20]);
    let (mut valid, mut ended) = (0u64, false);
    'file: loop {
        let n = f.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        carry.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        loop {
            match r.next(&carry[at..]) {
                Ok(Some((rec, used))) => {
                    at += used;
                    valid += used as u64;
                    if matches!(rec, Record::End(_)) {
                        ended = true;
                        break 'file;
                    }
                }
                Ok(None) => break,
                // What follows is damaged: it goes, and the sender resends it.
                Err(_) => break 'file,
            }
        }
        carry.drain(..at);
    }
    let f = OpenOptions::new().write(true).open(path)?;
    f.set_len(valid)?;
    f.sync_all()?;
    Ok((r, valid, ended))
}

/// Appends what the sender sends to the partial file, each piece checked as records by `r`
/// (positioned after what the file holds), until the end record (true) or the sender stops
/// (false). Durable before it returns.
fn take_rest(c: &mut TcpStream, path: &std::path::Path, mut r: Reader) -> std::io::Result<bool> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut ended = false;
    loop {
        let mut at = 0;
        loop {
            match r.next(&pending[at..]) {
                Ok(Some((rec, used))) => {
                    at += used;
                    ended |= matches!(rec, Record::End(_));
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = std::fs::remove_file(path);
                    return Err(std::io::Error::other(format!("the stream is refused: {e}")));
                }
            }
        }
        pending.drain(..at);
        if ended {
            break;
        }
        let n = match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                f.sync_all()?;
                return Err(e);
            }
        };
        f.write_all(&buf[..n])?;
        pending.extend_from_slice(&buf[..n]);
    }
    f.sync_all()?;
    Ok(ended)
}
