"""The sans-I/O connection state machine driven with hand-made PDUs: login, then the write
data path (R2Ts, DataSN, TTTs) and task management, checked PDU by PDU (RFC 7143)."""

from __future__ import annotations

import struct

from lazyiscsi.iscsi.connection import Close, Connection, Execute, Send, State, Target
from lazyiscsi.iscsi.pdu import BHS_LEN, Framer, Opcode, encode

IQN = "iqn.2026-11.test:target"
BS = 512


def feed(conn: Connection, raw: bytes) -> list:  # type: ignore[type-arg]
    framer = Framer(max_data=1 << 20)
    framer.receive_data(raw)
    pdu = framer.next_pdu()
    assert pdu is not None
    return conn.receive(pdu)


def sent(actions: list) -> list[bytes]:  # type: ignore[type-arg]
    return [b"".join(bytes(p) for p in a.parts) for a in actions if isinstance(a, Send)]


def logged_in(keys: str) -> Connection:
    conn = Connection(lambda name: Target(IQN, {0: object()}) if name == IQN else None, lambda: [],
                      lambda cdb, lun: struct.unpack_from(">H", cdb, 7)[0] * BS)
    text = (f"InitiatorName=iqn.test:i\0TargetName={IQN}\0SessionType=Normal\0AuthMethod=None\0"
            f"HeaderDigest=None\0DataDigest=None\0{keys}").encode()
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.LOGIN_REQUEST | 0x40, 0x80 | (1 << 2) | 3  # T=1, CSG 1 -> NSG 3
    b[8:14] = bytes.fromhex("400001370000")
    reply = sent(feed(conn, encode(b, text)))
    assert reply and reply[0][36] == 0 and conn.state is State.FULL_FEATURE
    return conn


def write_cmd(itt: int, blocks: int, cmdsn: int, immediate: bytes = b"", final: bool = True) -> bytes:
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.SCSI_COMMAND, (0x80 if final else 0) | 0x20 | 0x01
    struct.pack_into(">IIII", b, 16, itt, blocks * BS, cmdsn, 0)
    b[32:42] = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, blocks, 0)
    return encode(b, immediate)


def data_out(itt: int, ttt: int, datasn: int, offset: int, data: bytes, final: bool) -> bytes:
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.SCSI_DATA_OUT, 0x80 if final else 0
    struct.pack_into(">IIIIIII", b, 16, itt, ttt, 0, 0, 0, datasn, offset)
    return encode(b, data)


def r2ts(actions: list) -> list[tuple[int, int, int, int]]:  # type: ignore[type-arg]
    """(TTT, R2TSN, offset, length) of each R2T sent."""
    out = []
    for pdu in sent(actions):
        assert pdu[0] & 0x3F == Opcode.R2T
        ttt = struct.unpack_from(">I", pdu, 20)[0]
        r2tsn, offset, length = struct.unpack_from(">III", pdu, 36)
        out.append((ttt, r2tsn, offset, length))
    return out


def test_several_r2ts_outstanding_and_data_sequences() -> None:
    conn = logged_in("MaxOutstandingR2T=2\0MaxBurstLength=1024\0InitialR2T=Yes\0ImmediateData=No\0")
    assert conn.values["MaxOutstandingR2T"] == "2"
    first = r2ts(feed(conn, write_cmd(5, 6, 0)))  # 3072 bytes: three bursts of 1024
    assert [(r2tsn, off, n) for _, r2tsn, off, n in first] == [(0, 0, 1024), (1, 1024, 1024)]
    (ttt0, *_), (ttt1, *_) = first
    assert feed(conn, data_out(5, ttt0, 0, 0, bytes(512), False)) == []
    third = r2ts(feed(conn, data_out(5, ttt0, 1, 512, bytes(512), True)))  # sequence 0 done
    assert [(r2tsn, off, n) for _, r2tsn, off, n in third] == [(2, 2048, 1024)]
    assert feed(conn, data_out(5, ttt1, 0, 1024, bytes(1024), True)) == []  # DataSN restarts
    done = feed(conn, data_out(5, third[0][0], 0, 2048, b"\x01" * 1024, True))
    assert len(done) == 1 and isinstance(done[0], Execute) and len(done[0].task.data) == 3072


def test_unknown_ttt_is_rejected_and_a_bad_datasn_fails_only_that_command() -> None:
    conn = logged_in("MaxBurstLength=1024\0InitialR2T=Yes\0ImmediateData=No\0")
    ((ttt, *_),) = r2ts(feed(conn, write_cmd(9, 2, 0)))
    reject = sent(feed(conn, data_out(9, ttt + 100, 0, 0, bytes(512), False)))
    assert reject[0][0] & 0x3F == Opcode.REJECT
    feed(conn, data_out(9, ttt, 1, 0, bytes(512), False))  # DataSN 1 first: a lost PDU
    actions = feed(conn, data_out(9, ttt, 2, 512, bytes(512), True))
    (response,) = sent(actions)
    assert response[0] & 0x3F == Opcode.SCSI_RESPONSE and response[3] == 0x02  # CHECK CONDITION
    sense = response[BHS_LEN + 2:]
    assert sense[2] & 0x0F == 0x0B and (sense[12], sense[13]) == (0x4B, 0x00)  # ABORTED, DATA PHASE
    assert not any(isinstance(a, (Execute, Close)) for a in actions) and conn.state is State.FULL_FEATURE
    assert 9 not in conn.tasks


def test_abort_of_a_running_task_answers_after_it_and_suppresses_its_status() -> None:
    conn = logged_in("ImmediateData=Yes\0InitialR2T=No\0")
    (execute,) = feed(conn, write_cmd(3, 1, 0, immediate=bytes(512)))
    assert isinstance(execute, Execute)
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.TASK_MGMT_REQUEST | 0x40, 0x80 | 1  # ABORT TASK
    struct.pack_into(">III", b, 16, 0x50, 3, 1)
    assert feed(conn, encode(b)) == []  # the task is still running: no answer yet
    (tmf,) = sent(conn.task_done(execute.task, 0, None, None))  # its status is not sent...
    assert tmf[0] & 0x3F == Opcode.TASK_MGMT_RESPONSE and tmf[2] == 0  # ...only "function complete"
    assert struct.unpack_from(">I", tmf, 16)[0] == 0x50
