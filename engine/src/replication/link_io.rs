//! The replica link's byte handling: framed sends, the receive buffer, the authenticated
//! handshake (hello, mutual HMAC challenge-response), connecting, TCP keepalive.

use super::*;

/// `recv_timeout`, after polling for up to [`LINK_POLL_US`] with `sched_yield` between
/// tries: a thread that shares its CPU with others (the secondary's apply thread on a
/// one-machine pair) lets them run, and one alone on its CPU spins briefly.
pub(super) fn recv_polling<T>(
    rx: &Receiver<T>,
    timeout: Duration,
) -> Result<T, crossbeam_channel::RecvTimeoutError> {
    let start = Instant::now();
    loop {
        match rx.try_recv() {
            Ok(r) => return Ok(r),
            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                return Err(crossbeam_channel::RecvTimeoutError::Disconnected)
            }
            Err(crossbeam_channel::TryRecvError::Empty) => {}
        }
        if start.elapsed() >= Duration::from_micros(LINK_POLL_US) {
            return rx.recv_timeout(timeout);
        }
        std::thread::yield_now();
    }
}

/// Writes one framed message.
pub(super) fn send(
    stream: &mut TcpStream,
    msg: &Message,
    seq: u64,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    buf.clear();
    wire::encode(msg, seq, buf);
    stream.write_all(buf)
}

/// Received replica-link bytes not yet decoded: buf[start..]. Why a start offset: a read
/// brings many messages (a batch of 4 KiB writes is 64 KiB), and removing each decoded
/// message from the front of a Vec moved the rest of the batch every time.
#[derive(Debug, Default)]
pub(super) struct RxBuf {
    /// Zeroed once and reused: only buf[start..end] holds data.
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// Bytes asked of the socket per read, at least.
pub(super) const RX_READ_BYTES: usize = 256 << 10;

impl RxBuf {
    /// The next complete message, if one is buffered.
    pub(super) fn next(&mut self) -> std::io::Result<Option<(Message, u64)>> {
        Ok(self.next_ref()?.map(|(frame, seq)| match frame {
            Frame::Write(w) => (
                Message::Write {
                    lun_key: w.lun_key,
                    offset_bytes: w.offset_bytes,
                    fua: w.fua,
                    data: w.data.to_vec(),
                },
                seq,
            ),
            Frame::Other(m) => (m, seq),
        }))
    }

    /// The next complete message, a write's data borrowed from the buffer.
    pub(super) fn next_ref(&mut self) -> std::io::Result<Option<(Frame<'_>, u64)>> {
        match wire::decode_one_ref(&self.buf[self.start..self.end]) {
            Ok(Some((frame, seq, used))) => {
                self.start += used;
                if self.start == self.end {
                    // Nothing buffered after it: the next read may start at the front
                    // (the frame's bytes stay valid until then).
                    self.start = 0;
                    self.end = 0;
                }
                Ok(Some((frame, seq)))
            }
            Ok(None) => Ok(None),
            // The typed error rides along: the handshake tells a peer of another version
            // from a broken one (`note_wire_version`).
            Err(e) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
    }

    /// One blocking read from `stream`, straight into the buffer.
    pub(super) fn fill(&mut self, stream: &mut impl Read) -> std::io::Result<()> {
        if self.buf.len() - self.end < RX_READ_BYTES {
            // Only the partial message after the decoded ones moves, then room is made
            // (a resync message can be larger than one read).
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() - self.end < RX_READ_BYTES {
                self.buf.resize(self.end + RX_READ_BYTES, 0);
            }
        }
        match stream.read(&mut self.buf[self.end..])? {
            0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                self.end += n;
                Ok(())
            }
        }
    }
}

/// Reads one framed message (blocking), with `rbuf` as carry-over between calls.
pub(super) fn recv(stream: &mut TcpStream, rbuf: &mut RxBuf) -> std::io::Result<(Message, u64)> {
    loop {
        if let Some(m) = rbuf.next()? {
            return Ok(m);
        }
        rbuf.fill(stream)?;
    }
}

/// TCP keepalive on a replica socket: first probe after 5 s idle, then every 2 s, given up
/// after 3 unanswered probes.
pub(super) fn keep_alive(s: &TcpStream) -> std::io::Result<()> {
    let fd = s.as_raw_fd();
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 5),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 2),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ] {
        let v: libc::c_int = value;
        // SAFETY: `fd` is a live socket owned by `s`; the option value is a c_int on our
        // stack whose size we pass.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// An Ack with status Ok, or an error naming `what`.
pub(super) fn expect_ok(m: Message, what: &str) -> std::io::Result<()> {
    match m {
        Message::Ack {
            status: AckStatus::Ok,
            ..
        } => Ok(()),
        other => Err(std::io::Error::other(format!(
            "peer failed {what}: {other:?}"
        ))),
    }
}

impl Replication {
    pub(super) fn hello(&self, link: u16) -> Message {
        let primary = self.is_primary();
        // Read under the mirror lock: a peer loss takes the unanswered writes off the links
        // and records them in their LUNs under it too, so no hello falls between the two.
        let unanswered: Vec<bool> = if primary {
            vec![false; self.luns.len()]
        } else {
            self.with_mirror(|_, _| {
                (0..self.luns.len())
                    .map(|i| {
                        self.links.iter().any(|l| {
                            l.pending
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .holds_lun(i)
                        })
                    })
                    .collect()
            })
        };
        // A LUN a reload removed is not announced: the peer may remove it too.
        let luns = self
            .luns
            .iter()
            .enumerate()
            .filter(|&(i, _)| !self.unreplicated(i))
            .map(|(i, l)| l.pair().hello(primary, unanswered[i]))
            .collect();
        Message::Hello {
            node_id: self.node_id.clone(),
            luns,
            link,
        }
    }

    /// Mutual challenge-response over the pre-shared key. We announce this connection as
    /// our link `link`; returns the peer's LUNs and the link number it announced.
    pub(super) fn handshake(
        &self,
        s: &mut TcpStream,
        rbuf: &mut RxBuf,
        role: AuthRole,
        link: u16,
    ) -> std::io::Result<(Vec<LunHello>, u16)> {
        s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let mut wbuf = Vec::new();
        let mut nonce = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let bad = |what: &str| {
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, what.to_string())
        };
        send(s, &self.hello(link), 0, &mut wbuf)?;
        send(s, &Message::AuthChallenge { nonce }, 0, &mut wbuf)?;
        let hello = recv(s, rbuf).inspect_err(|e| self.note_wire_version(e))?;
        let (peer_id, peer_luns, peer_link) = match hello.0 {
            Message::Hello {
                node_id,
                luns,
                link,
            } => (node_id, luns, link),
            _ => return Err(bad("expected hello")),
        };
        let peer_nonce = match recv(s, rbuf)?.0 {
            Message::AuthChallenge { nonce } => nonce,
            _ => return Err(bad("expected challenge")),
        };
        let t = match role {
            AuthRole::Initiator => Transcript {
                initiator_id: self.node_id.clone(),
                acceptor_id: peer_id.clone(),
                initiator_nonce: nonce,
                acceptor_nonce: peer_nonce,
            },
            AuthRole::Acceptor => Transcript {
                initiator_id: peer_id.clone(),
                acceptor_id: self.node_id.clone(),
                initiator_nonce: peer_nonce,
                acceptor_nonce: nonce,
            },
        };
        let mac = t
            .mac(&self.cfg.psk, role)
            .map_err(|e| bad(&e.to_string()))?;
        send(s, &Message::AuthResponse { mac }, 0, &mut wbuf)?;
        let peer_mac = match recv(s, rbuf)?.0 {
            Message::AuthResponse { mac } => mac,
            _ => return Err(bad("expected auth response")),
        };
        let peer_role = match role {
            AuthRole::Initiator => AuthRole::Acceptor,
            AuthRole::Acceptor => AuthRole::Initiator,
        };
        if let Err(e) = t.verify(&self.cfg.psk, peer_role, &peer_mac) {
            tracing::error!(peer = %peer_id, error = %e, "replica link authentication failed (wrong pre-shared key?)");
            return Err(bad("authentication failed"));
        }
        s.set_read_timeout(None)?;
        self.peer_wire_version.store(0, Ordering::Relaxed);
        Ok((peer_luns, peer_link))
    }

    /// A peer whose first frame carries another protocol version runs another twinsan
    /// version: nothing will mirror until both nodes run the same one. Said once, loudly
    /// (the connection is retried every half second), and kept for `status`.
    pub(super) fn note_wire_version(&self, e: &std::io::Error) {
        let theirs = match e
            .get_ref()
            .and_then(|i| i.downcast_ref::<wire::WireError>())
        {
            Some(wire::WireError::BadVersion(v)) => *v,
            _ => return,
        };
        if self.peer_wire_version.swap(theirs, Ordering::Relaxed) != theirs {
            tracing::error!(
                peer_version = theirs,
                our_version = wire::VERSION,
                "the peer speaks another replica protocol version: run the same twinsan \
                 version on both nodes; nothing is mirrored until then"
            );
        }
    }

    pub(super) fn connect(&self, link: u16) -> std::io::Result<(TcpStream, RxBuf, Vec<LunHello>)> {
        let mut s = TcpStream::connect_timeout(
            &self.cfg.address,
            Duration::from_millis(self.cfg.replica_timeout_ms),
        )?;
        let _ = s.set_nodelay(true);
        let mut rbuf = RxBuf::default();
        let (hellos, _) = self.handshake(&mut s, &mut rbuf, AuthRole::Initiator, link)?;
        if link == LINK_NONE {
            self.bound_control_waits(&s)?;
        }
        Ok((s, rbuf, hellos))
    }

    /// The control connection (resync, verify) waits for one answer at a time: without a
    /// bound, a peer that died or hung after taking a request left the manager in `recv`
    /// for good (no resync ever again; verify kept its region's range lock, so writes there
    /// hung too; found by the replica simulation's faithful model). Keepalives find a dead
    /// machine or a cut network within about `replica_timeout_ms`; the read timeout, long
    /// enough for the slowest honest answer (a resync's final flush of the target's page
    /// cache), finds a hung process.
    fn bound_control_waits(&self, s: &TcpStream) -> std::io::Result<()> {
        /// The least TCP_USER_TIMEOUT on a control connection (see below).
        const UNACKED_MIN: Duration = Duration::from_secs(10);
        s.set_read_timeout(Some(CONTROL_ANSWER_TIMEOUT))?;
        s.set_write_timeout(Some(CONTROL_ANSWER_TIMEOUT))?;
        // Whole seconds, at least one: the kernel's keepalive unit.
        let probe = Duration::from_secs((self.cfg.replica_timeout_ms / 4000).max(1));
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(probe)
            .with_interval(probe)
            .with_retries(3);
        let sock = socket2::SockRef::from(s);
        sock.set_tcp_keepalive(&keepalive)?;
        // A request the peer's machine never acknowledged ends it too (TCP_USER_TIMEOUT).
        // Not as short as the replica timeout: the kernel counts a zero receive window as
        // unacknowledged, and a target busy writing a 1 MiB resync chunk may close its
        // window for a moment.
        let unacked = Duration::from_millis(self.cfg.replica_timeout_ms).max(UNACKED_MIN);
        sock.set_tcp_user_timeout(Some(unacked))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out at most `step` bytes per read, like a socket under load.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.bytes.len().min(self.step).min(out.len());
            out[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    #[test]
    fn link_receive_decodes_every_message_in_order_however_the_bytes_arrive() {
        // Small writes, acks, and one message larger than a read, so that partial messages
        // are carried over and moved at every position.
        let mut msgs = Vec::new();
        for i in 0..200u64 {
            let len = if i == 77 {
                3 * RX_READ_BYTES
            } else {
                512 * (1 + i as usize % 9)
            };
            msgs.push(Message::Write {
                lun_key: 7,
                offset_bytes: i * 4096,
                fua: i % 5 == 0,
                data: (0..len).map(|b| (b as u64 ^ i) as u8).collect(),
            });
            msgs.push(Message::Ack {
                seq: i,
                status: AckStatus::Ok,
            });
        }
        let mut wire_bytes = Vec::new();
        for (seq, m) in msgs.iter().enumerate() {
            wire::encode(m, seq as u64, &mut wire_bytes);
        }
        for step in [1usize, 1000, 4096, 65_537, 1 << 20] {
            let mut src = Trickle {
                bytes: &wire_bytes,
                step,
            };
            let mut rx = RxBuf::default();
            let mut got = Vec::new();
            while got.len() < msgs.len() {
                match rx.next().unwrap() {
                    Some(m) => got.push(m),
                    None => rx.fill(&mut src).unwrap(),
                }
            }
            for (seq, (m, (g, gseq))) in msgs.iter().zip(&got).enumerate() {
                assert_eq!((m, seq as u64), (g, *gseq), "step {step}");
            }
            assert!(rx.next().unwrap().is_none());
            // The stream is exhausted: the next read reports the peer gone.
            assert!(rx.fill(&mut src).is_err());
        }
    }
}
