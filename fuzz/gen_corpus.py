#!/usr/bin/env python3
"""Writes the seed corpora of the twinsan fuzz targets into fuzz/corpus/<target>/.

    python3 fuzz/gen_corpus.py

Seeds are named `seed-*`; files with other names (entries the fuzzer found and we
kept) are left alone. The input format of each target is documented in
proto/src/fuzzing.rs; this script must agree with it (the constants below mirror it).
The output is deterministic, so re-running it leaves `git status` clean.
"""

import hashlib
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")

# --------------------------------------------------------------------------------
# CRC32C (Castagnoli, reflected 0x82F63B78), stored little-endian on the wire.
# --------------------------------------------------------------------------------

_CRC_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ b) & 0xFF]
    return crc ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283  # the standard check value


def digest(data: bytes) -> bytes:
    return struct.pack("<I", crc32c(data))


def pad(n: int) -> int:
    return (4 - n % 4) % 4


# --------------------------------------------------------------------------------
# iSCSI PDUs (RFC 7143 section 11)
# --------------------------------------------------------------------------------

ISID = bytes([0x80, 0x00, 0x02, 0x3D, 0x00, 0x00])
RESERVED_TAG = 0xFFFFFFFF


def bhs(opcode, flags=0, ahs_len=0, data_len=0, lun=0, itt=0, f20=0, f24=0, f28=0,
        rest=b"", b2=0, b3=0, lun_bytes=None):
    """A 48-byte BHS: byte 0 opcode (with I bit), byte 1 flags, bytes 2..3, TotalAHSLength
    (in bytes; must be a multiple of 4), DataSegmentLength, bytes 8..15 (LUN or ISID/TSIH),
    ITT, then the three opcode-specific words at 20/24/28 and bytes 32..47."""
    assert ahs_len % 4 == 0
    b = bytearray(48)
    b[0] = opcode
    b[1] = flags
    b[2] = b2
    b[3] = b3
    b[4] = ahs_len // 4
    b[5:8] = data_len.to_bytes(3, "big")
    b[8:16] = lun_bytes if lun_bytes is not None else struct.pack(">Q", lun)
    b[16:20] = struct.pack(">I", itt)
    b[20:24] = struct.pack(">I", f20)
    b[24:28] = struct.pack(">I", f24)
    b[28:32] = struct.pack(">I", f28)
    b[32:32 + len(rest)] = rest
    return bytes(b)


def frame(header: bytes, ahs: bytes = b"", data: bytes = b"", digests=False,
          bad_header_digest=False, bad_data_digest=False, pad_byte=0):
    """A complete PDU: BHS (with its length fields as given), AHS, optional header digest,
    data + pad, optional data digest."""
    out = bytearray(header + ahs)
    if digests:
        d = crc32c(bytes(out)) ^ (1 if bad_header_digest else 0)
        out += struct.pack("<I", d)
    if data:
        seg = data + bytes([pad_byte]) * pad(len(data))
        out += seg
        if digests:
            d = crc32c(seg) ^ (1 if bad_data_digest else 0)
            out += struct.pack("<I", d)
    return bytes(out)


def lun_field(lun: int) -> int:
    """Single-level peripheral LUN addressing (SAM-5)."""
    return (lun & 0x3FFF) << 48


def text(*pairs) -> bytes:
    return b"".join(p.encode() + b"\0" for p in pairs)


def login_pdu(flags, data, itt=0x1000, cmd_sn=1, exp_stat_sn=0, tsih=0, cid=0, vmax=0, vmin=0,
              digests=False):
    h = bhs(0x43, flags, data_len=len(data), itt=itt, b2=vmax, b3=vmin,
            lun_bytes=ISID + struct.pack(">H", tsih), f20=cid << 16, f24=cmd_sn,
            f28=exp_stat_sn)
    return frame(h, data=data, digests=digests)


def scsi_cmd(cdb, read=False, write=False, edtl=0, data=b"", itt=1, cmd_sn=1, exp_stat_sn=1,
             final=True, attr=1, lun=0, immediate=False, ahs=b"", digests=False):
    flags = (0x80 if final else 0) | (0x40 if read else 0) | (0x20 if write else 0) | attr
    cdb16 = (cdb + bytes(16))[:16]
    h = bhs(0x01 | (0x40 if immediate else 0), flags, ahs_len=len(ahs), data_len=len(data),
            lun=lun_field(lun), itt=itt, f20=edtl, f24=cmd_sn, f28=exp_stat_sn, rest=cdb16)
    return frame(h, ahs=ahs, data=data, digests=digests)


def data_out(data, itt=1, ttt=RESERVED_TAG, data_sn=0, offset=0, final=True, exp_stat_sn=1,
             lun=0, digests=False):
    rest = struct.pack(">III", 0, data_sn, offset)  # reserved(32..36), DataSN, BufferOffset
    h = bhs(0x05, 0x80 if final else 0, data_len=len(data), lun=lun_field(lun), itt=itt,
            f20=ttt, f28=exp_stat_sn, rest=rest)
    return frame(h, data=data, digests=digests)


def nop_out(itt=0x10, ttt=RESERVED_TAG, cmd_sn=1, exp_stat_sn=1, data=b"", immediate=True,
            digests=False):
    h = bhs(0x00 | (0x40 if immediate else 0), 0x80, data_len=len(data), itt=itt, f20=ttt,
            f24=cmd_sn, f28=exp_stat_sn)
    return frame(h, data=data, digests=digests)


def tmf(function, ref_itt=RESERVED_TAG, itt=0x20, cmd_sn=1, exp_stat_sn=1, ref_cmd_sn=0, lun=0,
        digests=False):
    h = bhs(0x42, 0x80 | function, lun=lun_field(lun), itt=itt, f20=ref_itt, f24=cmd_sn,
            f28=exp_stat_sn, rest=struct.pack(">II", ref_cmd_sn, 0))
    return frame(h, digests=digests)


def logout(reason=0, itt=0x30, cmd_sn=1, exp_stat_sn=1, cid=0, digests=False):
    h = bhs(0x46, 0x80 | reason, itt=itt, f20=cid << 16, f24=cmd_sn, f28=exp_stat_sn)
    return frame(h, digests=digests)


def text_req(data, itt=0x40, ttt=RESERVED_TAG, final=True, cont=False, cmd_sn=1, exp_stat_sn=1,
             digests=False):
    flags = (0x80 if final else 0) | (0x40 if cont else 0)
    h = bhs(0x44, flags, data_len=len(data), itt=itt, f20=ttt, f24=cmd_sn, f28=exp_stat_sn)
    return frame(h, data=data, digests=digests)


def snack(itt=0x50, digests=False):
    h = bhs(0x10, 0x80, itt=itt, f20=RESERVED_TAG, rest=struct.pack(">II", 0, 1))
    return frame(h, digests=digests)


# --------------------------------------------------------------------------------
# CDBs
# --------------------------------------------------------------------------------

def cdb6(op, b1=0, b2=0, b3=0, b4=0, control=0):
    return bytes([op, b1, b2, b3, b4, control])


def rw10(op, lba, blocks, b1=0, group=0):
    return struct.pack(">BBIBHB", op, b1, lba, group, blocks, 0)


def rw12(op, lba, blocks, b1=0, group=0):
    return struct.pack(">BBIIBB", op, b1, lba, blocks, group, 0)


def rw16(op, lba, blocks, b1=0, group=0):
    return struct.pack(">BBQIBB", op, b1, lba, blocks, group, 0)


def sa16(op, sa, lba=0, alloc=0, b14=0):
    return struct.pack(">BBQIBB", op, sa, lba, alloc, b14, 0)


def maint_in(sa, b2=0, b3=0, b45=0, alloc=0x1000):
    return struct.pack(">BBBBHIBB", 0xA3, sa, b2, b3, b45, alloc, 0, 0)


LIBISCSI_INITIATOR = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-ls"
INITIATOR = "iqn.1993-08.org.debian:01:7b4f1c2d3e4f"
CHAP_TARGET = "iqn.2026-11.io.twinsan:chap"
OPEN_TARGET = "iqn.2026-11.io.twinsan:open"
DEFAULT_TARGET = "iqn.2026-11.io.twinsan:default"

LIBISCSI_OPERATIONAL = [
    "HeaderDigest=None,CRC32C", "DataDigest=None", "InitialR2T=Yes", "ImmediateData=Yes",
    "MaxBurstLength=262144", "FirstBurstLength=262144", "DefaultTime2Wait=2",
    "DefaultTime2Retain=0", "MaxOutstandingR2T=1", "ErrorRecoveryLevel=0", "IFMarker=No",
    "OFMarker=No", "MaxConnections=1", "MaxRecvDataSegmentLength=262144",
    "DataPDUInOrder=Yes", "DataSequenceInOrder=Yes",
]

OPEN_ISCSI_OPERATIONAL = [
    "HeaderDigest=CRC32C,None", "DataDigest=CRC32C,None", "DefaultTime2Wait=2",
    "DefaultTime2Retain=0", "IFMarker=No", "OFMarker=No", "ErrorRecoveryLevel=0",
    "InitialR2T=No", "ImmediateData=Yes", "MaxBurstLength=16776192",
    "FirstBurstLength=262144", "MaxOutstandingR2T=1", "MaxConnections=1",
    "DataPDUInOrder=Yes", "DataSequenceInOrder=Yes", "MaxRecvDataSegmentLength=262144",
]


def libiscsi_login_text(target, session="Normal"):
    keys = [f"InitiatorName={LIBISCSI_INITIATOR}", "InitiatorAlias=client"]
    if session == "Normal":
        keys.append(f"TargetName={target}")
    keys.append(f"SessionType={session}")
    return text(*keys, *LIBISCSI_OPERATIONAL)


def pdu_seeds():
    s = {}
    # Logins, as libiscsi (straight to the operational stage) and open-iscsi send them.
    login_op = libiscsi_login_text(DEFAULT_TARGET)
    s["login-libiscsi"] = login_pdu(0x87, login_op)
    s["login-libiscsi-digests"] = login_pdu(0x87, login_op, digests=True)
    s["login-discovery"] = login_pdu(0x87, libiscsi_login_text("", "Discovery"))
    sec = text(f"InitiatorName={INITIATOR}", f"TargetName={DEFAULT_TARGET}",
               "SessionType=Normal", "AuthMethod=CHAP,None")
    s["login-security-chap"] = login_pdu(0x81, sec)
    s["login-chap-a"] = login_pdu(0x01, text("CHAP_A=5"), cmd_sn=1)
    s["login-chap-response"] = login_pdu(
        0x81, text("CHAP_N=alice", "CHAP_R=0x" + "00" * 16), digests=True)
    s["login-open-iscsi-operational"] = login_pdu(0x87, text(*OPEN_ISCSI_OPERATIONAL))
    s["login-continued"] = (login_pdu(0x44, text(f"InitiatorName={INITIATOR}"))
                            + login_pdu(0x87, text(f"TargetName={DEFAULT_TARGET}")))

    # SCSI commands.
    read10 = rw10(0x28, 0x1234, 8)
    s["scsi-read10"] = scsi_cmd(read10, read=True, edtl=8 * 512)
    s["scsi-read10-digests"] = scsi_cmd(read10, read=True, edtl=8 * 512, digests=True)
    block = bytes((i * 7) & 0xFF for i in range(512))
    write10 = rw10(0x2A, 0x40, 1)
    s["scsi-write10-immediate"] = scsi_cmd(write10, write=True, edtl=512, data=block)
    s["scsi-write10-immediate-digests"] = scsi_cmd(write10, write=True, edtl=512, data=block,
                                                   digests=True)
    # Write of two blocks: one immediate, one unsolicited Data-Out (InitialR2T=No).
    write2 = rw10(0x2A, 0x80, 2)
    s["scsi-write10-dataout-stream"] = (
        scsi_cmd(write2, write=True, edtl=1024, data=block, final=False, itt=7)
        + data_out(block, itt=7, offset=512))
    s["scsi-write10-dataout-stream-digests"] = (
        scsi_cmd(write2, write=True, edtl=1024, data=block, final=False, itt=7, digests=True)
        + data_out(block, itt=7, offset=512, digests=True))
    s["scsi-read16"] = scsi_cmd(rw16(0x88, 1 << 33, 64), read=True, edtl=64 * 512, lun=1)
    s["scsi-inquiry"] = scsi_cmd(bytes([0x12, 0, 0, 0, 0x60, 0]), read=True, edtl=96,
                                 immediate=True)
    s["scsi-tur"] = scsi_cmd(bytes(6))
    s["scsi-report-luns"] = scsi_cmd(struct.pack(">BBBBBBIBB", 0xA0, 0, 0, 0, 0, 0, 4096, 0, 0),
                                     read=True, edtl=4096)
    # 32-byte CDB via an Extended CDB AHS (AHSLength 17: reserved byte + 16 CDB bytes).
    ext = struct.pack(">HBB", 17, 1, 0) + bytes(range(16, 32))
    s["scsi-extended-cdb-ahs"] = scsi_cmd(bytes([0x7F, 0, 0, 0, 0, 0, 0, 0x18]), ahs=ext)
    s["scsi-extended-cdb-ahs-digests"] = scsi_cmd(bytes([0x7F]), ahs=ext, digests=True)
    s["data-out"] = data_out(block[:100], itt=9, ttt=0x55, data_sn=3, offset=4096)
    s["data-out-digests"] = data_out(block[:100], itt=9, ttt=0x55, data_sn=3, offset=4096,
                                     digests=True)

    # Other PDUs.
    s["nop-out-ping"] = nop_out()
    s["nop-out-ping-data"] = nop_out(data=b"ping payload", digests=True)
    s["nop-out-reply"] = nop_out(itt=RESERVED_TAG, ttt=0x1234)
    s["tmf-abort-task"] = tmf(1, ref_itt=7, ref_cmd_sn=5)
    s["tmf-lun-reset"] = tmf(5, lun=0, digests=True)
    s["tmf-unknown-function"] = tmf(0x7F)
    s["logout-close-session"] = logout(0)
    s["logout-close-connection-digests"] = logout(1, digests=True)
    s["text-sendtargets-all"] = text_req(text("SendTargets=All"))
    s["text-sendtargets-all-digests"] = text_req(text("SendTargets=All"), digests=True)
    s["snack"] = snack()

    # A whole discovery session and a whole normal session, back to back.
    s["session-discovery"] = (login_pdu(0x87, libiscsi_login_text("", "Discovery"))
                              + text_req(text("SendTargets=All"), cmd_sn=1, exp_stat_sn=1)
                              + logout(0, cmd_sn=2, exp_stat_sn=2))
    s["session-normal"] = (login_pdu(0x87, login_op)
                           + scsi_cmd(bytes(6), itt=1, cmd_sn=1)
                           + scsi_cmd(bytes([0x12, 0, 0, 0, 0x60, 0]), read=True, edtl=96,
                                      itt=2, cmd_sn=2)
                           + scsi_cmd(write10, write=True, edtl=512, data=block, itt=3,
                                      cmd_sn=3)
                           + scsi_cmd(read10, read=True, edtl=4096, itt=4, cmd_sn=4)
                           + nop_out(itt=5, cmd_sn=5)
                           + logout(0, itt=6, cmd_sn=5))

    # Edge cases.
    s["edge-empty"] = b""
    s["edge-short-bhs"] = s["nop-out-ping"][:47]
    s["edge-truncated-data"] = s["scsi-write10-immediate"][:48 + 100]
    s["edge-data-too-long-login"] = bhs(0x43, 0x87, data_len=8193)
    s["edge-data-max-field"] = bhs(0x01, 0x80, data_len=0xFFFFFF)
    s["edge-unknown-opcode"] = bhs(0x3F)
    s["edge-target-opcode"] = bhs(0x21, 0x80)
    s["edge-login-t-and-c"] = login_pdu(0xC7, b"")
    s["edge-login-stage-2"] = login_pdu(0x8B, b"")
    s["edge-login-nsg-2"] = login_pdu(0x86, b"")
    s["edge-text-f-and-c"] = text_req(b"", final=True, cont=True)
    s["edge-logout-bad-reason"] = logout(5)
    s["edge-ahs-too-short"] = scsi_cmd(bytes(6), ahs=bytes([0, 1, 1, 0]))
    s["edge-ahs-ext-cdb-zero"] = scsi_cmd(bytes(6), ahs=struct.pack(">HBB", 1, 1, 0))
    s["edge-ahs-ext-cdb-too-long"] = scsi_cmd(
        bytes(6), ahs=struct.pack(">HBB", 18, 1, 0) + bytes(20))
    s["edge-ahs-ext-cdb-overrun"] = scsi_cmd(
        bytes(6), ahs=struct.pack(">HBB", 17, 1, 0) + bytes(4))
    s["edge-ahs-other-type"] = scsi_cmd(bytes(6), ahs=struct.pack(">HBB", 5, 2, 0) + bytes(8))
    s["edge-ahs-max"] = bhs(0x01, 0x80, ahs_len=255 * 4) + bytes(255 * 4)
    s["edge-bad-header-digest"] = frame(bhs(0x40, 0x80, itt=1, f20=RESERVED_TAG),
                                        digests=True, bad_header_digest=True)
    s["edge-bad-data-digest"] = frame(bhs(0x40, 0x80, data_len=5, itt=1, f20=RESERVED_TAG),
                                      data=b"hello", digests=True, bad_data_digest=True)
    s["edge-nonzero-pad"] = frame(bhs(0x40, 0x80, data_len=5, itt=1, f20=RESERVED_TAG),
                                  data=b"hello", digests=True, pad_byte=0xEE)
    s["edge-zero-bhs"] = bytes(48)
    s["edge-ones-bhs"] = bytes([0xFF]) * 48
    return s


# --------------------------------------------------------------------------------
# login target inputs: config byte, then chunks (flags, variation, data) split by 0xFF
# --------------------------------------------------------------------------------

SEP = b"\xff"
ENTROPY_ID = 0x2A
ENTROPY_CHALLENGE = bytes([0xA5]) * 16
CHAP_SECRET = b"alice-secret-1"
DISCOVERY_SECRET = b"discovery-secret"


def chap_r(secret: bytes, ident=ENTROPY_ID, challenge=ENTROPY_CHALLENGE) -> str:
    return "0x" + hashlib.md5(bytes([ident]) + secret + challenge).hexdigest()


def chunk(flags, data=b"", variation=0):
    assert SEP not in data
    return bytes([flags, variation]) + data


def login_input(config, *chunks):
    return bytes([config]) + SEP.join(chunks)


T_SEC_OP = 0x81    # T, CSG security, NSG operational
T_SEC_FF = 0x83    # T, CSG security, NSG full feature
T_OP_FF = 0x87     # T, CSG operational, NSG full feature
SEC = 0x01         # no T (parse_initiator takes NSG = CSG)
OP = 0x05
C_SEC = 0x40       # C bit, security stage
C_OP = 0x44


def login_seeds():
    s = {}
    ident_open = [f"InitiatorName={INITIATOR}", f"TargetName={OPEN_TARGET}",
                  "SessionType=Normal"]
    ident_chap = [f"InitiatorName={INITIATOR}", f"TargetName={CHAP_TARGET}",
                  "SessionType=Normal"]
    ops = text(*LIBISCSI_OPERATIONAL)

    s["libiscsi-open-no-security"] = login_input(
        0, chunk(T_OP_FF, libiscsi_login_text(OPEN_TARGET)),
        chunk(0, text("SendTargets=")), chunk(0, text("MaxRecvDataSegmentLength=65536")),
        chunk(0, text("SendTargets=All")))
    s["open-security-none-then-operational"] = login_input(
        0, chunk(T_SEC_OP, text(*ident_open, "AuthMethod=None")), chunk(T_OP_FF, ops))
    s["open-security-straight-to-ff"] = login_input(
        0, chunk(T_SEC_FF, text(*ident_open, "AuthMethod=None")),
        chunk(0, text(f"SendTargets={OPEN_TARGET}")))
    s["open-iscsi-operational"] = login_input(
        0, chunk(T_SEC_OP, text(*ident_open, "AuthMethod=None")),
        chunk(T_OP_FF, text(*OPEN_ISCSI_OPERATIONAL)))

    chap_start = chunk(T_SEC_OP, text(*ident_chap, "AuthMethod=CHAP,None"))
    chap_a = chunk(SEC, text("CHAP_A=5"))
    good = chunk(T_SEC_OP, text("CHAP_N=alice", "CHAP_R=" + chap_r(CHAP_SECRET)))
    s["chap-one-way-success"] = login_input(
        0, chap_start, chap_a, good, chunk(T_OP_FF, ops), chunk(0, text("SendTargets=")))
    s["chap-mutual-success"] = login_input(
        0, chap_start, chap_a,
        chunk(T_SEC_OP, text("CHAP_N=alice", "CHAP_R=" + chap_r(CHAP_SECRET), "CHAP_I=9",
                             "CHAP_C=0x" + "5a" * 16)),
        chunk(T_OP_FF, ops))
    s["chap-wrong-secret"] = login_input(
        0, chap_start, chap_a,
        chunk(T_SEC_OP, text("CHAP_N=alice", "CHAP_R=" + chap_r(b"wrong-secret-9"))))
    s["chap-wrong-user"] = login_input(
        0, chap_start, chap_a,
        chunk(T_SEC_OP, text("CHAP_N=bob", "CHAP_R=" + chap_r(CHAP_SECRET))))
    s["chap-reflected-challenge"] = login_input(
        0, chap_start, chap_a,
        chunk(T_SEC_OP, text("CHAP_N=alice", "CHAP_R=" + chap_r(CHAP_SECRET), "CHAP_I=42",
                             "CHAP_C=0x" + "a5" * 16)))
    s["chap-base64-response"] = login_input(
        0, chap_start, chap_a,
        chunk(T_SEC_OP, text("CHAP_N=alice", "CHAP_R=0bAAAAAAAAAAAAAAAAAAAAAA==")))
    s["chap-unsupported-algorithm"] = login_input(0, chap_start, chunk(SEC, text("CHAP_A=6,7")))
    s["chap-algorithm-list"] = login_input(0, chap_start, chunk(SEC, text("CHAP_A=7,5")))
    s["chap-skip-security"] = login_input(0, chunk(T_OP_FF, text(*ident_chap, *LIBISCSI_OPERATIONAL)))
    s["chap-response-before-challenge"] = login_input(
        0, chap_start, chunk(T_SEC_OP, text("CHAP_N=alice", "CHAP_R=0x00")))

    disc = [f"InitiatorName={INITIATOR}", "SessionType=Discovery"]
    s["discovery-open"] = login_input(
        0, chunk(T_SEC_OP, text(*disc, "AuthMethod=None")),
        chunk(T_OP_FF, text("HeaderDigest=None", "DataDigest=None",
                            "MaxRecvDataSegmentLength=32768")),
        chunk(0, text("SendTargets=All")), chunk(0, text(f"SendTargets={CHAP_TARGET}")),
        chunk(0, text("SendTargets=")))
    s["discovery-libiscsi"] = login_input(
        0, chunk(T_OP_FF, libiscsi_login_text("", "Discovery")), chunk(0, text("SendTargets=All")))
    s["discovery-chap"] = login_input(
        1, chunk(T_SEC_OP, text(*disc, "AuthMethod=CHAP")), chunk(SEC, text("CHAP_A=5")),
        chunk(T_SEC_OP, text("CHAP_N=disc", "CHAP_R=" + chap_r(DISCOVERY_SECRET))),
        chunk(T_OP_FF, ops), chunk(0, text("SendTargets=All")))
    s["discovery-chap-required-none-offered"] = login_input(
        1, chunk(T_SEC_OP, text(*disc, "AuthMethod=None")))

    # Failures of identity and header rules.
    s["missing-initiator-name"] = login_input(0, chunk(T_OP_FF, text(f"TargetName={OPEN_TARGET}")))
    s["missing-target-name"] = login_input(0, chunk(T_OP_FF, text(f"InitiatorName={INITIATOR}")))
    s["unknown-target"] = login_input(0, chunk(T_OP_FF, text(
        f"InitiatorName={INITIATOR}", "TargetName=iqn.2026-11.io.twinsan:nope")))
    s["address-not-allowed"] = login_input(2, chunk(T_OP_FF, libiscsi_login_text(OPEN_TARGET)))
    s["bad-session-type"] = login_input(0, chunk(T_OP_FF, text(
        f"InitiatorName={INITIATOR}", "SessionType=Bogus")))
    s["version-min-1"] = login_input(0, chunk(T_OP_FF, libiscsi_login_text(OPEN_TARGET), 0x08))
    s["version-max-1"] = login_input(0, chunk(T_OP_FF, libiscsi_login_text(OPEN_TARGET), 0x10))
    s["tsih-nonzero"] = login_input(0, chunk(T_OP_FF, libiscsi_login_text(OPEN_TARGET), 0x02))
    s["isid-changes"] = login_input(
        0, chunk(T_SEC_OP, text(*ident_open, "AuthMethod=None")), chunk(T_OP_FF, ops, 0x01))
    s["cid-changes"] = login_input(
        0, chunk(T_SEC_OP, text(*ident_open, "AuthMethod=None")), chunk(T_OP_FF, ops, 0x04))
    s["raw-t-and-c"] = login_input(0, chunk(0xC7, text(*ident_open), 0x80))
    s["raw-csg-full-feature"] = login_input(0, chunk(0x8F, text(*ident_open), 0x80))
    s["raw-nsg-before-csg"] = login_input(0, chunk(0x84, text(*ident_open), 0x80))
    s["parser-stage-2"] = login_input(0, chunk(0x89, text(*ident_open)))
    s["stage-goes-back"] = login_input(
        0, chunk(T_SEC_OP, text(*ident_open, "AuthMethod=None")),
        chunk(T_SEC_OP, text("AuthMethod=None")))
    s["continued-text"] = login_input(
        0, chunk(C_OP, text(f"InitiatorName={INITIATOR}")),
        chunk(C_OP, text(f"TargetName={OPEN_TARGET}")),
        chunk(T_OP_FF, ops))
    s["continued-text-split-mid-key"] = login_input(
        0, chunk(C_OP, b"InitiatorName=iqn.1993-08.org.deb"),
        chunk(T_OP_FF, b"ian:01:7b4f1c2d3e4f\0" + text(f"TargetName={OPEN_TARGET}")))
    s["duplicate-key"] = login_input(0, chunk(T_OP_FF, text(
        *ident_open, "MaxBurstLength=65536", "MaxBurstLength=65536")))
    s["identity-changes"] = login_input(
        0, chunk(T_SEC_OP, text(*ident_open, "AuthMethod=None")),
        chunk(T_OP_FF, text(f"TargetName={CHAP_TARGET}")))
    s["security-key-in-operational"] = login_input(
        0, chunk(T_OP_FF, text(*ident_open, "AuthMethod=None", "CHAP_A=5")))
    s["operational-key-in-security"] = login_input(
        0, chunk(T_SEC_OP, text(*ident_open, "AuthMethod=None", "MaxBurstLength=65536")))
    s["bad-values"] = login_input(0, chunk(T_OP_FF, text(
        *ident_open, "MaxRecvDataSegmentLength=0", "MaxBurstLength=0x10", "FirstBurstLength=abc",
        "ErrorRecoveryLevel=2", "MaxConnections=65536", "HeaderDigest=MD5",
        "DefaultTime2Wait=3601", "X-com.example.Foo=bar", "iSCSIProtocolLevel=1")))
    s["first-burst-above-max"] = login_input(0, chunk(T_OP_FF, text(
        *ident_open, "MaxBurstLength=512", "FirstBurstLength=16777215")))
    s["text-without-equals"] = login_input(0, chunk(T_OP_FF, b"InitiatorName\0"))
    s["text-invalid-utf8"] = login_input(0, chunk(T_OP_FF, b"InitiatorName=\xc3\x28\0"))
    s["text-key-too-long"] = login_input(0, chunk(T_OP_FF, b"K" * 64 + b"=v\0"))
    s["text-no-trailing-nul"] = login_input(0, chunk(T_OP_FF, text(*ident_open)[:-1]))
    s["too-many-requests"] = login_input(
        0, *([chunk(T_SEC_OP, text(*ident_open, "AuthMethod=CHAP,None"))]
             + [chunk(SEC, b"")] * 34))
    s["empty-input"] = b""
    s["config-only"] = b"\x00"
    s["after-login-bad-text"] = login_input(
        0, chunk(T_OP_FF, libiscsi_login_text(OPEN_TARGET)),
        chunk(0, text("HeaderDigest=CRC32C")), chunk(0, b"no-equals\0"),
        chunk(0, text("SendTargets=All")), chunk(0, text("MaxRecvDataSegmentLength=1024",
                                                          "MaxRecvDataSegmentLength=2048")))
    return s


# --------------------------------------------------------------------------------
# cdb target inputs: the 16-byte CDB field, then (MODE SELECT) the parameter list
# --------------------------------------------------------------------------------

def pad16(cdb):
    return cdb + bytes(max(0, 16 - len(cdb)))


def mode_select_seeds():
    s = {}
    # MODE SELECT (6), PF=1: header(4) + caching page with WCE cleared.
    caching = bytes([0x08, 0x12]) + bytes(0x12)
    hdr6 = bytes([0, 0, 0, 0])
    plist = hdr6 + caching
    s["mode-select6-caching-wce-off"] = pad16(cdb6(0x15, 0x10, 0, 0, len(plist))) + plist
    # Control page with D_SENSE set.
    # Unchangeable bits must hold their current values (QUEUE ALGORITHM MODIFIER 1).
    control = bytearray([0x0A, 0x0A]) + bytearray(0x0A)
    control[3] = 0x10
    control[2] |= 0x04
    plist = hdr6 + bytes(control)
    s["mode-select6-control-dsense"] = pad16(cdb6(0x15, 0x10, 0, 0, len(plist))) + plist
    # SWP set (control byte 4 bit 3).
    control_swp = bytearray(control)
    control_swp[4] |= 0x08
    plist = hdr6 + bytes(control_swp)
    s["mode-select6-control-swp"] = pad16(cdb6(0x15, 0x10, 0, 0, len(plist))) + plist
    # With a short block descriptor (512-byte blocks, 2 Mi blocks) and two pages.
    bd = struct.pack(">I", 1 << 21) + struct.pack(">I", 512)
    plist = bytes([0, 0, 0, 8]) + bd + caching + bytes(control)
    s["mode-select6-bd-two-pages"] = pad16(cdb6(0x15, 0x10, 0, 0, len(plist))) + plist
    # MODE SELECT (10): header(8) + long LBA block descriptor + control extension subpage.
    ctl_ext = bytes([0x4A, 0x01, 0x00, 0x1C]) + bytes(0x1C)
    lbd = struct.pack(">QII", 1 << 21, 0, 512)
    plist = struct.pack(">HBBBBH", 0, 0, 0, 1, 0, len(lbd)) + lbd + ctl_ext
    ms10 = struct.pack(">BBBBBBBHB", 0x55, 0x10, 0, 0, 0, 0, 0, len(plist), 0)
    s["mode-select10-long-lba-ctl-ext"] = pad16(ms10) + plist
    plist = bytes(8) + caching
    ms10 = struct.pack(">BBBBBBBHB", 0x55, 0x10, 0, 0, 0, 0, 0, len(plist), 0)
    s["mode-select10-caching"] = pad16(ms10) + plist
    # Errors: SP=1, truncated list, unknown page, wrong page length, changed
    # unchangeable bit, wrong block length, non-zero medium type.
    s["mode-select6-sp"] = pad16(cdb6(0x15, 0x11, 0, 0, 4)) + hdr6
    s["mode-select6-truncated-page"] = pad16(cdb6(0x15, 0x10, 0, 0, 10)) + hdr6 + caching[:6]
    s["mode-select6-param-len-longer-than-data"] = pad16(cdb6(0x15, 0x10, 0, 0, 0xFF)) + hdr6
    s["mode-select6-unknown-page"] = pad16(cdb6(0x15, 0x10, 0, 0, 8)) + hdr6 + bytes([0x3E, 2, 0, 0])
    s["mode-select6-bad-page-len"] = (pad16(cdb6(0x15, 0x10, 0, 0, 4 + 2 + 5))
                                      + hdr6 + bytes([0x08, 5]) + bytes(5))
    bad = bytearray(caching)
    bad[2] |= 0x01  # RCD: not changeable
    s["mode-select6-unchangeable-bit"] = pad16(cdb6(0x15, 0x10, 0, 0, 4 + len(bad))) + hdr6 + bytes(bad)
    bd4096 = struct.pack(">I", 0) + struct.pack(">I", 4096)
    plist = bytes([0, 0, 0, 8]) + bd4096
    s["mode-select6-wrong-block-len"] = pad16(cdb6(0x15, 0x10, 0, 0, len(plist))) + plist
    s["mode-select6-medium-type"] = pad16(cdb6(0x15, 0x10, 0, 0, 4)) + bytes([0, 1, 0, 0])
    s["mode-select6-empty-list"] = pad16(cdb6(0x15, 0x10, 0, 0, 0))
    # Exact-length CDB: the list would start at byte 16, so 10 of its bytes are "CDB".
    s["mode-select6-exact-cdb"] = cdb6(0x15, 0x10, 0, 0, 4 + len(caching)) + hdr6 + caching
    return s


def cdb_seeds():
    s = {}
    one = {
        "test-unit-ready": cdb6(0x00),
        "request-sense": cdb6(0x03, 0x01, 0, 0, 252),
        "read6": cdb6(0x08, 0x01, 0x23, 0x45, 8),
        "write6": cdb6(0x0A, 0x00, 0x00, 0x10, 0),
        "inquiry-standard": cdb6(0x12, 0, 0, 0, 96),
        "inquiry-vpd-00": cdb6(0x12, 1, 0x00, 0, 255),
        "inquiry-vpd-80": cdb6(0x12, 1, 0x80, 0, 255),
        "inquiry-vpd-83": cdb6(0x12, 1, 0x83, 1, 0),
        "inquiry-vpd-b0": cdb6(0x12, 1, 0xB0, 0, 64),
        "inquiry-vpd-b1": cdb6(0x12, 1, 0xB1, 0, 64),
        "inquiry-vpd-b2": cdb6(0x12, 1, 0xB2, 0, 64),
        "inquiry-vpd-unknown": cdb6(0x12, 1, 0xC0, 0, 64),
        "reserve6": cdb6(0x16),
        "release6": cdb6(0x17),
        "mode-sense6-all": cdb6(0x1A, 0, 0x3F, 0, 255),
        "mode-sense6-caching-changeable": cdb6(0x1A, 0x08, 0x48, 0, 255),
        "mode-sense6-control-default": cdb6(0x1A, 0, 0x8A, 0, 255),
        "mode-sense6-saved": cdb6(0x1A, 0, 0xC8, 0, 255),
        "start-stop-unit": cdb6(0x1B, 0x01, 0, 0, 0x01),
        "prevent-allow": cdb6(0x1E, 0, 0, 0, 1),
        "read-capacity10": bytes([0x25] + [0] * 9),
        "read10": rw10(0x28, 0x1234, 8),
        "read10-fua-dpo": rw10(0x28, 0, 1, b1=0x18),
        "write10": rw10(0x2A, 0x40, 1),
        "write-verify10": rw10(0x2E, 0x40, 1, b1=0x02),
        "verify10-bytchk": rw10(0x2F, 0, 1, b1=0x02),
        "pre-fetch10": rw10(0x34, 0, 16, b1=0x02),
        "sync-cache10": rw10(0x35, 0, 0),
        "read-defect-data10": struct.pack(">BBBBBBBHB", 0x37, 0, 0x18, 0, 0, 0, 0, 4, 0),
        "write-same10-unmap": rw10(0x41, 0, 8, b1=0x08),
        "unmap": struct.pack(">BBBBBBBHB", 0x42, 0, 0, 0, 0, 0, 0, 24, 0),
        "sanitize-overwrite": struct.pack(">BBBBBBBHB", 0x48, 0x01, 0, 0, 0, 0, 0, 8, 0),
        "sanitize-exit-failure": struct.pack(">BBBBBBBHB", 0x48, 0x1F, 0, 0, 0, 0, 0, 0, 0),
        "mode-select10": struct.pack(">BBBBBBBHB", 0x55, 0x10, 0, 0, 0, 0, 0, 0, 0),
        "reserve10": bytes([0x56] + [0] * 9),
        "release10": bytes([0x57] + [0] * 9),
        "mode-sense10-llbaa": struct.pack(">BBBBBBBHB", 0x5A, 0x10, 0x3F, 0xFF, 0, 0, 0, 4096, 0),
        "mode-sense10-ctl-ext": struct.pack(">BBBBBBBHB", 0x5A, 0, 0x0A, 0x01, 0, 0, 0, 255, 0),
        "pr-in-read-keys": struct.pack(">BBBBBBBHB", 0x5E, 0, 0, 0, 0, 0, 0, 1024, 0),
        "pr-in-report-caps": struct.pack(">BBBBBBBHB", 0x5E, 2, 0, 0, 0, 0, 0, 8, 0),
        "pr-out-register": struct.pack(">BBBBBIB", 0x5F, 0, 0, 0, 0, 24, 0),
        "pr-out-reserve": struct.pack(">BBBBBIB", 0x5F, 1, 0x05, 0, 0, 24, 0),
        "extended-copy": struct.pack(">BBBBBBBBBBIBB", 0x83, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4096, 0, 0),
        "receive-copy-op-params": struct.pack(">BBBBBBBBBBIBB", 0x84, 3, 0, 0, 0, 0, 0, 0, 0, 0, 44, 0, 0),
        "receive-copy-status": struct.pack(">BBBBBBBBBBIBB", 0x84, 0, 7, 0, 0, 0, 0, 0, 0, 0, 12, 0, 0),
        "read16": rw16(0x88, 1 << 33, 64),
        "compare-and-write": struct.pack(">BBQBBBBBB", 0x89, 0, 0x10, 0, 0, 0, 1, 0, 0),
        "write16": rw16(0x8A, 1 << 33, 64),
        "orwrite16": rw16(0x8B, 0, 1),
        "write-verify16": rw16(0x8E, 0, 1),
        "verify16": rw16(0x8F, 0, 1),
        "pre-fetch16": rw16(0x90, 0, 1),
        "sync-cache16": rw16(0x91, 0, 0),
        "write-same16-ndob": rw16(0x93, 0, 8, b1=0x09),
        "write-atomic16": struct.pack(">BBQHHBB", 0x9C, 0, 0, 0, 4, 0, 0),
        "read-capacity16": sa16(0x9E, 0x10, alloc=32),
        "get-lba-status": sa16(0x9E, 0x12, lba=0, alloc=24),
        "report-luns": struct.pack(">BBBBBBIBB", 0xA0, 0, 0, 0, 0, 0, 4096, 0, 0),
        "rtpg": maint_in(0x0A, alloc=4096),
        "rtpg-extended": struct.pack(">BBBBHIBB", 0xA3, 0x2A, 0, 0, 0, 4096, 0, 0),
        "rsoc-all": maint_in(0x0C, alloc=65535),
        "rsoc-all-rctd": maint_in(0x0C, b2=0x80, alloc=65535),
        "rsoc-one-opcode": maint_in(0x0C, b2=0x01, b3=0x28),
        "rsoc-opcode-with-sa": maint_in(0x0C, b2=0x01, b3=0x9E),
        "rsoc-opcode-sa": maint_in(0x0C, b2=0x82, b3=0x9E, b45=0x10),
        "rsoc-opcode-sa-no-sa": maint_in(0x0C, b2=0x02, b3=0x28),
        "rsoc-either": maint_in(0x0C, b2=0x03, b3=0xA3, b45=0x0C),
        "rsoc-bad-options": maint_in(0x0C, b2=0x05),
        "rstmf": maint_in(0x0D, b2=0x80, alloc=16),
        "read12": rw12(0xA8, 0x100, 8),
        "write12": rw12(0xAA, 0x100, 8),
        "write-verify12": rw12(0xAE, 0x100, 8),
        "verify12": rw12(0xAF, 0x100, 8),
        "read-defect-data12": struct.pack(">BBIIBB", 0xB7, 0x18, 0, 8, 0, 0),
    }
    # Every service action of the opcodes that have them.
    for sa in (0x01, 0x02, 0x03, 0x1F):
        one[f"sanitize-sa{sa:02x}"] = struct.pack(">BBBBBBBHB", 0x48, sa, 0, 0, 0, 0, 0, 0, 0)
    for sa in range(4):
        one[f"pr-in-sa{sa}"] = struct.pack(">BBBBBBBHB", 0x5E, sa, 0, 0, 0, 0, 0, 256, 0)
    for sa in range(9):
        one[f"pr-out-sa{sa}"] = struct.pack(">BBBBBIB", 0x5F, sa, 0x01, 0, 0, 24, 0)
    for sa in (0, 1, 3, 4):
        one[f"receive-copy-sa{sa}"] = struct.pack(">BBBBBBBBBBIBB", 0x84, sa, 0, 0, 0, 0, 0,
                                                  0, 0, 0, 64, 0, 0)
    for name, c in one.items():
        s[name] = pad16(c)
    # A few at their exact length (what a direct caller passes).
    for name in ["read6", "read10", "read12", "read16", "inquiry-standard", "rsoc-all"]:
        s[name + "-exact"] = one[name]
    s.update(mode_select_seeds())
    # Edge cases.
    s["edge-empty"] = b""
    s["edge-truncated-read10"] = one["read10"][:9]
    s["edge-truncated-read16"] = one["read16"][:15]
    s["edge-naca"] = pad16(cdb6(0x00, control=0x04))
    s["edge-link"] = pad16(cdb6(0x00, control=0x01))
    s["edge-unknown-opcode"] = pad16(bytes([0xC0]))
    s["edge-group3-opcode"] = pad16(bytes([0x7F, 0, 0, 0, 0, 0, 0, 0x18]))
    s["edge-unknown-sa"] = pad16(sa16(0x9E, 0x1F))
    s["edge-inquiry-cmddt"] = pad16(cdb6(0x12, 0x02, 0, 0, 96))
    s["edge-inquiry-page-without-evpd"] = pad16(cdb6(0x12, 0, 0x80, 0, 96))
    s["edge-read-capacity10-lba-no-pmi"] = pad16(bytes([0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0]))
    s["edge-reserve6-3rdpty"] = pad16(cdb6(0x16, 0x10))
    s["edge-rtpg-bad-format"] = pad16(struct.pack(">BBBBHIBB", 0xA3, 0x4A, 0, 0, 0, 16, 0, 0))
    s["edge-all-ones"] = bytes([0xFF]) * 16
    s["edge-32-bytes"] = pad16(rw16(0x88, 0, 1)) + bytes(range(16))
    return s


def write(target, seeds):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    for name in os.listdir(d):
        if name.startswith("seed-"):
            os.remove(os.path.join(d, name))
    for name, data in sorted(seeds.items()):
        with open(os.path.join(d, "seed-" + name), "wb") as f:
            f.write(data)
    print(f"{target}: {len(seeds)} seeds", file=sys.stderr)


def main():
    write("pdu", pdu_seeds())
    write("login", login_seeds())
    write("cdb", cdb_seeds())


if __name__ == "__main__":
    main()
