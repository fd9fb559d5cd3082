//! A scripted iSCSI target for the worker's tests: one LUN in memory, a thread per
//! connection, RFC defaults for every negotiated key, and one fault injected on the first
//! connection that carries READs and WRITEs (the probe session's connection comes first,
//! and carries none). What `--reconnect` must survive is then a fixed script instead of a
//! daemon's timing.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use proto::pdu::{
    frame_len, parse_initiator, write_pdu, Digests, InitiatorPdu, Residual, TargetPdu, TargetSns,
    BHS_LEN,
};

pub const TARGET: &str = "iqn.2026-11.io.twinsan:fake";
const BLOCK_BYTES: usize = 512;

/// What goes wrong on the faulty connection. `at` counts its READ and WRITE commands from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// At the `at`-th WRITE: store its data if `lands` (its answer is what gets lost),
    /// then close the connection with every later command unanswered.
    CloseAtWrite {
        at: u64,
        lands: bool,
    },
    /// From the `at`-th command on: answer nothing, keep the connection open.
    SilentFrom {
        at: u64,
    },
    /// Answer the `at`-th command BUSY (not run).
    BusyAt {
        at: u64,
    },
    /// Answer the `at`-th command CHECK CONDITION, UNIT ATTENTION 29/00 (not run).
    UnitAttentionAt {
        at: u64,
    },
    /// After answering the `at`-th command, ask for a logout (asynchronous event 1) and go
    /// on answering until the initiator logs out.
    LogoutRequestAt {
        at: u64,
    },
}

struct State {
    disk: Mutex<Vec<u8>>,
    fault: Fault,
    /// Connections accepted so far.
    conns: AtomicU64,
}

pub struct FakeTarget {
    pub addr: String,
    state: Arc<State>,
}

impl FakeTarget {
    /// Listens on an ephemeral loopback port; serves a LUN of `size_bytes` (zeros).
    pub fn start(size_bytes: usize, fault: Fault) -> FakeTarget {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local address").to_string();
        let state = Arc::new(State {
            disk: Mutex::new(vec![0u8; size_bytes]),
            fault,
            conns: AtomicU64::new(0),
        });
        let s = Arc::clone(&state);
        // The listener lives as long as the test process: tests are short.
        std::thread::spawn(move || {
            for sock in listener.incoming() {
                let Ok(sock) = sock else { break };
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    let _ = serve(sock, &s);
                });
            }
        });
        FakeTarget { addr, state }
    }

    pub fn url(&self) -> String {
        format!("iscsi://{}/{TARGET}/0", self.addr)
    }

    /// Connections accepted so far (the probe's, the session's, and every new login's).
    pub fn connections(&self) -> u64 {
        self.state.conns.load(Ordering::Relaxed)
    }
}

/// Sequence numbers of one connection's session.
struct Sns {
    stat_sn: u32,
    exp_cmd_sn: u32,
}

impl Sns {
    /// The numbers for the next response that carries a StatSN.
    fn next(&mut self) -> TargetSns {
        let s = TargetSns {
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.exp_cmd_sn.wrapping_add(63),
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        s
    }
}

fn send(sock: &mut TcpStream, pdu: TargetPdu, data: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::new();
    write_pdu(&mut out, &pdu.encode_bhs(), data, Digests::default());
    sock.write_all(&out)
}

fn response(itt: u32, status: u8, sns: TargetSns, sense: &[u8]) -> TargetPdu {
    TargetPdu::ScsiResponse {
        itt,
        status,
        response: 0,
        residual: Residual::None,
        exp_data_sn: 0,
        sns,
        data_len: sense.len() as u32,
    }
}

fn serve(mut sock: TcpStream, state: &State) -> std::io::Result<()> {
    // The probe session's connection is the first; the session's is the second.
    let faulty = state.conns.fetch_add(1, Ordering::Relaxed) == 1;
    let fault = if faulty { state.fault } else { Fault::None };
    let mut sns = Sns {
        stat_sn: 0,
        exp_cmd_sn: 0,
    };
    let (mut commands, mut writes) = (0u64, 0u64);
    let mut silent = false;
    loop {
        let mut bhs = [0u8; BHS_LEN];
        sock.read_exact(&mut bhs)?;
        let frame = frame_len(&bhs, Digests::default(), 1 << 20)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut rest = vec![0u8; frame.total_len_bytes - BHS_LEN];
        sock.read_exact(&mut rest)?;
        if silent {
            continue;
        }
        let ahs = &rest[..frame.ahs_len_bytes];
        let data = &rest[frame.ahs_len_bytes..frame.ahs_len_bytes + frame.data_len_bytes];
        let pdu = parse_initiator(&bhs, ahs).map_err(|e| std::io::Error::other(e.to_string()))?;
        match pdu {
            InitiatorPdu::LoginRequest(l) => {
                sns.exp_cmd_sn = l.cmd_sn;
                // No keys answered: RFC defaults apply (ImmediateData=Yes, InitialR2T=Yes,
                // MaxRecvDataSegmentLength 8192), so a 4 KiB write is all immediate data.
                let p = TargetPdu::LoginResponse {
                    transit: l.transit,
                    cont: false,
                    csg: l.csg,
                    nsg: l.nsg,
                    version_max: 0,
                    version_active: 0,
                    isid: l.isid,
                    tsih: 1,
                    itt: l.itt,
                    status_class: 0,
                    status_detail: 0,
                    sns: sns.next(),
                    data_len: 0,
                };
                send(&mut sock, p, &[])?;
            }
            InitiatorPdu::LogoutRequest(l) => {
                let p = TargetPdu::LogoutResponse {
                    itt: l.itt,
                    response: 0,
                    time2wait: 0,
                    time2retain: 0,
                    sns: sns.next(),
                };
                send(&mut sock, p, &[])?;
                return Ok(());
            }
            InitiatorPdu::ScsiCommand(c) => {
                if !c.immediate {
                    sns.exp_cmd_sn = c.cmd_sn.wrapping_add(1);
                }
                let cdb = c.cdb();
                let rw = matches!(cdb[0], 0x88 | 0x8a);
                if rw {
                    commands += 1;
                }
                let nth = |at: u64| rw && commands == at;
                match fault {
                    Fault::SilentFrom { at } if rw && commands >= at => {
                        silent = true;
                        continue;
                    }
                    Fault::BusyAt { at } if nth(at) => {
                        send(&mut sock, response(c.itt, 0x08, sns.next(), &[]), &[])?;
                        continue;
                    }
                    Fault::UnitAttentionAt { at } if nth(at) => {
                        let mut sense = vec![0u8, 18, 0x70, 0, 0x06, 0, 0, 0, 0, 10];
                        sense.extend_from_slice(&[0, 0, 0, 0, 0x29, 0x00, 0, 0, 0, 0]);
                        send(&mut sock, response(c.itt, 0x02, sns.next(), &sense), &sense)?;
                        continue;
                    }
                    _ => {}
                }
                let lba = u64::from_be_bytes(cdb[2..10].try_into().unwrap_or([0; 8])) as usize;
                let blocks = u32::from_be_bytes(cdb[10..14].try_into().unwrap_or([0; 4]));
                let (at, len) = (lba * BLOCK_BYTES, blocks as usize * BLOCK_BYTES);
                match cdb[0] {
                    0x8a => {
                        writes += 1;
                        if let Fault::CloseAtWrite { at: n, lands } = fault {
                            if writes == n {
                                if lands {
                                    state.disk.lock().expect("disk")[at..at + len]
                                        .copy_from_slice(data);
                                }
                                let _ = sock.shutdown(std::net::Shutdown::Both);
                                return Ok(());
                            }
                        }
                        state.disk.lock().expect("disk")[at..at + len].copy_from_slice(data);
                        send(&mut sock, response(c.itt, 0, sns.next(), &[]), &[])?;
                    }
                    0x88 | 0x9e => {
                        let bytes = if cdb[0] == 0x88 {
                            state.disk.lock().expect("disk")[at..at + len].to_vec()
                        } else {
                            // READ CAPACITY(16): last LBA, block length.
                            let size = state.disk.lock().expect("disk").len();
                            let mut b = vec![0u8; 32];
                            b[..8]
                                .copy_from_slice(&((size / BLOCK_BYTES) as u64 - 1).to_be_bytes());
                            b[8..12].copy_from_slice(&(BLOCK_BYTES as u32).to_be_bytes());
                            b
                        };
                        let p = TargetPdu::DataIn {
                            final_: true,
                            ack: false,
                            lun: 0,
                            itt: c.itt,
                            status: Some(0),
                            residual: Residual::None,
                            data_sn: 0,
                            buffer_offset: 0,
                            sns: sns.next(),
                            data_len: bytes.len() as u32,
                        };
                        send(&mut sock, p, &bytes)?;
                    }
                    // TEST UNIT READY and anything else: GOOD.
                    _ => send(&mut sock, response(c.itt, 0, sns.next(), &[]), &[])?,
                }
                if let Fault::LogoutRequestAt { at } = fault {
                    if nth(at) {
                        let p = TargetPdu::AsyncMessage {
                            lun: 0,
                            event: 1,
                            vcode: 0,
                            params: [0, 0, 5],
                            sns: sns.next(),
                            data_len: 0,
                        };
                        send(&mut sock, p, &[])?;
                    }
                }
            }
            // NOP-Out answers (we send no pings), Data-Out (none at RFC defaults for
            // 4 KiB writes), and the rest: nothing to answer.
            _ => {}
        }
    }
}
