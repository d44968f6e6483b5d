"""What the portal fuzzer (tests/fuzz, issue 14) found, replayed PDU by PDU against the sans-I/O
connection: each input that once raised an exception out of ``Connection.receive`` (a traceback
in the daemon's log and the connection dropped without an answer) or made the target break the
initiator's declared limits."""

from __future__ import annotations

import struct

from lazyiscsi.iscsi.connection import Close, Connection, Execute, Send, State, Target
from lazyiscsi.iscsi.pdu import BHS_LEN, Framer, Opcode, encode

IQN = "iqn.2026-11.test:target"


def feed(conn: Connection, raw: bytes) -> list:  # type: ignore[type-arg]
    framer = Framer(max_data=1 << 20)
    framer.receive_data(raw)
    pdu = framer.next_pdu()
    assert pdu is not None
    return conn.receive(pdu)


def sent(actions: list) -> list[bytes]:  # type: ignore[type-arg]
    return [b"".join(bytes(p) for p in a.parts) for a in actions if isinstance(a, Send)]


def login(keys: str) -> Connection:
    conn = Connection(lambda name: Target(IQN, {0: object()}) if name == IQN else None,
                      lambda: [Target(IQN, {0: object()})], lambda cdb, lun: 0)
    text = (f"InitiatorName=iqn.test:i\0AuthMethod=None\0HeaderDigest=None\0DataDigest=None\0{keys}").encode()
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.LOGIN_REQUEST | 0x40, 0x80 | (1 << 2) | 3  # T=1, CSG 1 -> NSG 3
    b[8:14] = bytes.fromhex("400001370000")
    reply = sent(feed(conn, encode(b, text)))
    assert reply and reply[0][36] == 0 and conn.state is State.FULL_FEATURE
    return conn


def test_scsi_command_in_a_discovery_session_is_rejected_not_an_exception() -> None:
    """Fuzz finding: a SCSI Command in a discovery session hit ``assert self.target is not None``
    (AssertionError out of the connection's greenlet). A discovery session has no LUNs (RFC 7143
    4.3): the command is refused with a Reject and the session goes on."""
    conn = login("SessionType=Discovery\0")
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.SCSI_COMMAND, 0x80 | 0x40 | 1
    struct.pack_into(">IIII", b, 16, 7, 96, 0, 0)
    b[32:38] = bytes([0x12, 0, 0, 0, 96, 0])  # INQUIRY
    actions = feed(conn, encode(b))
    (reject,) = sent(actions)
    assert reject[0] & 0x3F == Opcode.REJECT and reject[2] == 0x04  # protocol error
    assert not any(isinstance(a, Close) for a in actions)
    b = bytearray(BHS_LEN)  # SendTargets still answers, with the next CmdSN
    b[0], b[1] = Opcode.TEXT_REQUEST, 0x80
    struct.pack_into(">IIII", b, 16, 8, 0xFFFFFFFF, 1, 0)
    (text,) = sent(feed(conn, encode(b, b"SendTargets=All\0")))
    assert text[0] & 0x3F == Opcode.TEXT_RESPONSE and IQN.encode() in text


def test_ping_data_longer_than_the_initiators_limit_is_rejected() -> None:
    """Fuzz finding: a NOP-Out with 4096 bytes of ping data came back as a 4096-byte NOP-In to an
    initiator that declared MaxRecvDataSegmentLength=512 (RFC 7143 13.12: the target may not send
    more). Like LIO, the target rejects such a ping as a protocol error instead of echoing it."""
    conn = login(f"TargetName={IQN}\0SessionType=Normal\0MaxRecvDataSegmentLength=512\0")
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.NOP_OUT, 0x80
    struct.pack_into(">IIII", b, 16, 5, 0xFFFFFFFF, 0, 0)
    (reply,) = sent(feed(conn, encode(b, bytes(4096))))
    assert reply[0] & 0x3F == Opcode.REJECT and int.from_bytes(reply[5:8], "big") <= 512
    struct.pack_into(">IIII", b, 16, 6, 0xFFFFFFFF, 1, 0)  # a ping within the limit is echoed
    (echo,) = sent(feed(conn, encode(b, b"ping")))
    assert echo[0] & 0x3F == Opcode.NOP_IN and echo[BHS_LEN:BHS_LEN + 4] == b"ping"


def test_login_with_a_tsih_naming_no_session_is_refused_session_does_not_exist() -> None:
    """A first Login Request with a nonzero TSIH names a session to join (RFC 7143 6.3); none
    here can be joined, so the answer is status 0x020A "Session does not exist" (11.13.5), not
    a new session, and the connection closes."""
    conn = Connection(lambda name: Target(IQN, {0: object()}) if name == IQN else None,
                      lambda: [Target(IQN, {0: object()})], lambda cdb, lun: 0)
    text = f"InitiatorName=iqn.test:i\0TargetName={IQN}\0AuthMethod=None\0".encode()
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.LOGIN_REQUEST | 0x40, 0x80 | (1 << 2) | 3
    b[8:14] = bytes.fromhex("400001370000")
    struct.pack_into(">H", b, 14, 0x1234)  # TSIH of no live session
    actions = feed(conn, encode(b, text))
    (reply,) = sent(actions)
    assert reply[0] & 0x3F == Opcode.LOGIN_RESPONSE and reply[36:38] == b"\x02\x0a"
    assert struct.unpack_from(">H", reply, 14)[0] == 0  # no session was made
    assert any(isinstance(a, Close) for a in actions) and conn.state is not State.FULL_FEATURE


def test_max_recv_declared_in_a_security_stage_login_to_full_feature_bounds_data_in() -> None:
    """Fuzz finding: operational keys in a security-stage request going straight to full
    feature (CSG=0, NSG=3, T=1; RFC 7143 6.3) were ignored, and the target sent 8192-byte
    Data-In to an initiator that declared MaxRecvDataSegmentLength=512 (13.12)."""
    conn = Connection(lambda name: Target(IQN, {0: object()}) if name == IQN else None,
                      lambda: [Target(IQN, {0: object()})], lambda cdb, lun: 0)
    text = (f"InitiatorName=iqn.test:i\0TargetName={IQN}\0AuthMethod=None\0"
            "MaxRecvDataSegmentLength=512\0").encode()
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.LOGIN_REQUEST | 0x40, 0x80 | (0 << 2) | 3  # T=1, CSG 0 -> NSG 3
    b[8:14] = bytes.fromhex("400001370000")
    (reply,) = sent(feed(conn, encode(b, text)))
    assert reply[36] == 0 and conn.state is State.FULL_FEATURE
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.SCSI_COMMAND, 0x80 | 0x40 | 1
    struct.pack_into(">IIII", b, 16, 7, 4096, 0, 0)
    b[32:38] = bytes([0x12, 0, 0, 0x10, 0, 0])  # INQUIRY, allocation length 4096
    (task,) = [a.task for a in feed(conn, encode(b)) if isinstance(a, Execute)]
    pdus = sent(conn.task_done(task, 0, bytes(4096), None))
    lengths = [int.from_bytes(p[5:8], "big") for p in pdus if p[0] & 0x3F == Opcode.SCSI_DATA_IN]
    assert sum(lengths) == 4096 and max(lengths) <= 512
