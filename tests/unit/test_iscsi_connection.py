"""The sans-I/O connection state machine driven with hand-made PDUs: login, then the write
data path (R2Ts, DataSN, TTTs) and task management, checked PDU by PDU (RFC 7143)."""

from __future__ import annotations

import struct
from collections.abc import Callable

from lazyiscsi.iscsi.connection import (
    MAX_IMMEDIATE_TASKS,
    MAX_SOLICITED_BYTES,
    QUEUE_DEPTH,
    Close,
    Connection,
    Execute,
    Fault,
    Send,
    State,
    Target,
)
from lazyiscsi.iscsi.pdu import BHS_LEN, Framer, Opcode, RejectReason, encode
from lazyiscsi.scsi.dispatch import Result
from lazyiscsi.scsi.sense import Reason, Status, fixed_sense

IQN = "iqn.2026-11.test:target"
BS = 512
MiB = 1 << 20


def feed(conn: Connection, raw: bytes) -> list:  # type: ignore[type-arg]
    framer = Framer(max_data=1 << 20)
    framer.receive_data(raw)
    pdu = framer.next_pdu()
    assert pdu is not None
    return conn.receive(pdu)


def sent(actions: list) -> list[bytes]:  # type: ignore[type-arg]
    return [b"".join(bytes(p) for p in a.parts) for a in actions if isinstance(a, Send)]


def logged_in(keys: str, digest: str = "None",
              run_now: Callable[[object, bytes, str], Result | None] | None = None) -> Connection:
    conn = Connection(lambda name: Target(IQN, {0: object()}) if name == IQN else None, lambda: [],
                      lambda cdb, lun: struct.unpack_from(">H", cdb, 7)[0] * BS, run_now=run_now)
    text = (f"InitiatorName=iqn.test:i\0TargetName={IQN}\0SessionType=Normal\0AuthMethod=None\0"
            f"HeaderDigest={digest}\0DataDigest={digest}\0{keys}").encode()
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


# -- bounds (issue 14) ---------------------------------------------------------------------------

def read_cmd(itt: int, cmdsn: int, immediate: bool = False) -> bytes:
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.SCSI_COMMAND | (0x40 if immediate else 0), 0x80 | 0x40 | 0x01
    struct.pack_into(">IIII", b, 16, itt, BS, cmdsn, 0)
    b[32:42] = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0)
    return encode(b)


def window(pdu: bytes) -> tuple[int, int]:
    """(ExpCmdSN, MaxCmdSN) a target PDU carries."""
    return struct.unpack_from(">II", pdu, 28)


def test_commands_outside_the_cmdsn_window_are_ignored_and_maxcmdsn_follows_completions() -> None:
    """RFC 7143 4.2.2.1: MaxCmdSN advances only as commands finish, and "the target MUST silently
    ignore any non-immediate command outside of this range" (issue 14, finding 3)."""
    conn = logged_in("")
    running = [feed(conn, read_cmd(i, i))[0].task for i in range(QUEUE_DEPTH)]
    assert len(conn.tasks) == QUEUE_DEPTH
    # the window is full: CmdSN == MaxCmdSN + 1 is ignored, no task, no answer, no greenlet
    assert [a for a in feed(conn, read_cmd(1000, QUEUE_DEPTH)) if not isinstance(a, Fault)] == []
    assert feed(conn, read_cmd(1001, QUEUE_DEPTH + 1)) == []  # only the first one is logged
    assert len(conn.tasks) == QUEUE_DEPTH and 1000 not in conn.tasks
    (done,) = sent(conn.task_done(running[0], 0, bytes(BS), None))
    assert window(done) == (QUEUE_DEPTH, QUEUE_DEPTH)  # one finished: one more place
    (execute,) = feed(conn, read_cmd(1002, QUEUE_DEPTH))
    assert isinstance(execute, Execute)
    assert feed(conn, read_cmd(1003, QUEUE_DEPTH - 5)) == []  # a duplicate below ExpCmdSN too
    assert conn.state is State.FULL_FEATURE


def test_immediate_commands_beyond_their_allowance_are_rejected() -> None:
    """Immediate commands bypass the window; past MAX_IMMEDIATE_TASKS running they get Reject
    "Immediate command reject" (RFC 7143 11.17.1) instead of a task."""
    conn = logged_in("")
    for i in range(MAX_IMMEDIATE_TASKS):
        assert isinstance(feed(conn, read_cmd(i, 0, immediate=True))[0], Execute)
    (reject,) = sent(feed(conn, read_cmd(99, 0, immediate=True)))
    assert reject[0] & 0x3F == Opcode.REJECT and reject[2] == RejectReason.IMMEDIATE_COMMAND_REJECT
    assert 99 not in conn.tasks


def test_unsolicited_data_is_held_to_first_burst_length() -> None:
    """RFC 7143 13.14: unsolicited data (immediate and unsolicited Data-Out) is at most
    FirstBurstLength per command; past it each PDU is rejected and nothing of it kept, however
    large the initiator's own Expected Data Transfer Length (issue 14, finding 4)."""
    conn = logged_in("InitialR2T=No\0ImmediateData=Yes\0FirstBurstLength=1024\0MaxBurstLength=4096\0")
    b = bytearray(write_cmd(7, 1, 0, immediate=bytes(512), final=False))
    struct.pack_into(">I", b, 20, 1 << 30)  # EDTL 1 GiB for a one-block WRITE
    assert feed(conn, bytes(b)) == []
    assert feed(conn, data_out(7, 0xFFFFFFFF, 0, 512, bytes(512), False)) == []  # 1024: the limit
    for n in range(3):
        (reject,) = sent(feed(conn, data_out(7, 0xFFFFFFFF, 1 + n, 1024, bytes(1024), False)))
        assert reject[0] & 0x3F == Opcode.REJECT and reject[2] == RejectReason.PROTOCOL_ERROR
    assert len(conn.tasks[7].data) == 1024 and conn.state is State.FULL_FEATURE


def test_unsolicited_data_where_the_session_forbids_it_is_rejected() -> None:
    """ImmediateData=No: no data in the command PDU (13.11); InitialR2T=Yes: no unsolicited
    Data-Out, so no command with F=0 (13.10)."""
    conn = logged_in("InitialR2T=Yes\0ImmediateData=No\0")
    (reject,) = sent(feed(conn, write_cmd(1, 1, 0, immediate=bytes(512))))
    assert reject[0] & 0x3F == Opcode.REJECT and 1 not in conn.tasks
    (reject,) = sent(feed(conn, write_cmd(2, 1, 1, final=False)))
    assert reject[0] & 0x3F == Opcode.REJECT and 2 not in conn.tasks
    ((ttt, *_),) = r2ts(feed(conn, write_cmd(3, 1, 2)))  # a proper one still works
    (reject,) = sent(feed(conn, data_out(3, 0xFFFFFFFF, 0, 0, bytes(512), True)))
    assert reject[0] & 0x3F == Opcode.REJECT  # unsolicited after all
    (execute,) = feed(conn, data_out(3, ttt, 0, 0, bytes(512), True))
    assert isinstance(execute, Execute)


def test_solicited_data_beyond_its_r2t_is_rejected() -> None:
    """Solicited Data-Out stays inside the burst its R2T asked for (RFC 7143 11.8.3)."""
    conn = logged_in("InitialR2T=Yes\0ImmediateData=No\0MaxBurstLength=1024\0")
    b = bytearray(write_cmd(4, 4, 0))
    struct.pack_into(">I", b, 20, 1 << 30)  # EDTL far beyond the CDB's 2048 bytes
    ((ttt, *_),) = r2ts(feed(conn, bytes(b)))
    (reject,) = sent(feed(conn, data_out(4, ttt, 0, 0, bytes(4096), False)))
    assert reject[0] & 0x3F == Opcode.REJECT and len(conn.tasks[4].data) == 0


def digest_feed(conn: Connection, raw: bytes) -> list:  # type: ignore[type-arg]
    framer = Framer(max_data=1 << 20)
    framer.set_digests(False, True)
    framer.receive_data(raw)
    pdu = framer.next_pdu()
    assert pdu is not None
    return conn.receive(pdu)


def corrupt(raw: bytes) -> bytes:
    bad = bytearray(raw)
    bad[BHS_LEN] ^= 0xFF
    return bytes(bad)


def test_a_data_digest_error_is_rejected_and_the_connection_kept() -> None:
    """RFC 7143 7.8 / 11.17.1: Reject with reason Data Digest Error, the PDU discarded, the
    connection kept (ERL 0 drops the command, not the connection). A Data-Out's command fails at
    the end of its burst with PROTOCOL SERVICE CRC ERROR (11.4.7.2) (issue 14, finding 9)."""
    conn = logged_in("InitialR2T=No\0ImmediateData=Yes\0")
    conn.data_digest = True
    raw = encode(bytearray(write_cmd(1, 1, 0)[:BHS_LEN]), bytes(512), data_digest=True)
    actions = digest_feed(conn, corrupt(raw))
    (reject,) = sent(actions)
    assert reject[0] & 0x3F == Opcode.REJECT and reject[2] == RejectReason.DATA_DIGEST_ERROR
    assert reject[BHS_LEN:BHS_LEN + BHS_LEN] == raw[:BHS_LEN]  # the header it refers to
    assert not any(isinstance(a, (Close, Execute)) for a in actions) and conn.state is State.FULL_FEATURE
    assert window(reject)[0] == 1  # its CmdSN counts as received: the next command is in order
    # two blocks, the first as immediate data, the second unsolicited: its Data-Out goes bad
    assert digest_feed(conn, encode(bytearray(write_cmd(2, 2, 1, final=False)[:BHS_LEN]), bytes(512),
                                    data_digest=True)) == []
    bad = corrupt(encode(bytearray(data_out(2, 0xFFFFFFFF, 0, 512, b"", True)[:BHS_LEN]), bytes(512),
                         data_digest=True))
    reject, response = sent(digest_feed(conn, bad))
    assert reject[0] & 0x3F == Opcode.REJECT and reject[2] == RejectReason.DATA_DIGEST_ERROR
    assert response[0] & 0x3F == Opcode.SCSI_RESPONSE and response[3] == 0x02
    sense = response[BHS_LEN + 2:]
    assert sense[2] & 0x0F == 0x0B and (sense[12], sense[13]) == (0x47, 0x05)
    assert 2 not in conn.tasks and conn.state is State.FULL_FEATURE


def test_solicited_write_data_is_admitted_within_max_solicited_bytes() -> None:
    """Write data is solicited (R2T) only while what the connection holds and has asked for fits
    in MAX_SOLICITED_BYTES: later commands wait, in order, for earlier ones to finish or be
    aborted, instead of each being sent its R2Ts at once."""
    conn = logged_in("InitialR2T=Yes\0ImmediateData=No\0MaxBurstLength=1048576\0")
    blocks = (MAX_SOLICITED_BYTES // 2 - MiB) // BS  # two fit, a third does not
    assert len(r2ts(feed(conn, write_cmd(1, blocks, 0)))) == 1
    ((ttt2, *_),) = r2ts(feed(conn, write_cmd(2, blocks, 1)))
    assert feed(conn, write_cmd(3, blocks, 2)) == [] and feed(conn, write_cmd(4, blocks, 3)) == []
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.TASK_MGMT_REQUEST | 0x40, 0x80 | 1  # ABORT TASK 1, still gathering data
    struct.pack_into(">III", b, 16, 0x50, 1, 4)
    actions = feed(conn, encode(b))
    assert [pdu[0] & 0x3F for pdu in sent(actions)] == [Opcode.R2T, Opcode.TASK_MGMT_RESPONSE]
    assert struct.unpack_from(">I", sent(actions)[0], 16)[0] == 3  # the first in line goes on
    offset, ttt = 0, ttt2
    while True:  # task 2's data, burst by burst
        actions = feed(conn, data_out(2, ttt, 0, offset, bytes(MiB), True))
        offset += MiB
        if offset == blocks * BS:
            break
        ((ttt, *_),) = r2ts(actions)
    (execute,) = actions
    assert isinstance(execute, Execute)
    response, r2t = sent(conn.task_done(execute.task, 0, None, None))
    assert response[0] & 0x3F == Opcode.SCSI_RESPONSE and r2t[0] & 0x3F == Opcode.R2T
    assert struct.unpack_from(">I", r2t, 16)[0] == 4  # task 4's turn now


# -- the Data-In of a READ (phase collapse) -----------------------------------------------------

def test_a_single_pdu_read_answer_frames_with_and_without_digests_and_padding() -> None:
    """A READ that fits one PDU is answered by one Data-In with F and S set and the status in it
    (phase collapse, RFC 7143 11.7.4); its header states the data segment's length and the bytes
    sent frame back into exactly that data: whole words bare (the common case, built without the
    general encoder), an odd length padded (11.2.1.6), digests where negotiated (13.1)."""
    for digests, length in ((False, 4096), (False, 510), (True, 4096), (True, 510)):
        conn = logged_in("", "CRC32C" if digests else "None")
        assert conn.header_digest is digests and conn.data_digest is digests
        (execute,) = feed(conn, read_cmd(9, 0))
        data = bytes(range(256)) * 16
        (pdu,) = sent(conn.task_done(execute.task, 0, data[:length], None))
        framer = Framer(max_data=1 << 20)
        framer.set_digests(digests, digests)
        framer.receive_data(pdu)
        raw = framer.next_pdu()
        assert raw is not None and framer.next_pdu() is None, (digests, length)
        assert raw.data_intact and raw.data == data[:min(length, BS)], (digests, length)
        assert raw.bhs[0] & 0x3F == Opcode.SCSI_DATA_IN and raw.bhs[1] & 0x81 == 0x81  # F, S
        assert int.from_bytes(raw.bhs[5:8], "big") == min(length, BS)
        assert len(pdu) == BHS_LEN + (-min(length, BS) % 4 + min(length, BS)) + (8 if digests else 0)


def test_a_command_run_at_once_is_answered_without_a_task_and_frees_its_place() -> None:
    """``run_now`` (the portal's READs of a fully local LUN): the answer goes out as the command
    is read, with no task and no Execute; the command took its CmdSN and MaxCmdSN stays where
    a finished command leaves it. A command that moves data-out, one whose tag is in use and one
    outside the window are never offered to it; what it declines becomes a task as before."""
    offered: list[tuple[bytes, str]] = []
    answers: list[Result | None] = []

    def run_now(lun: object, cdb: bytes, nexus: str) -> Result | None:
        offered.append((cdb[:1], nexus))
        return answers.pop(0)

    conn = logged_in("ImmediateData=Yes\0InitialR2T=No\0", run_now=run_now)
    answers.append(Result(Status.GOOD, bytes(range(256)) * 2))
    (pdu,) = sent(feed(conn, read_cmd(7, 0)))
    assert offered == [(b"\x28", conn.nexus)] and conn.tasks == {}
    assert pdu[0] & 0x3F == Opcode.SCSI_DATA_IN and pdu[1] & 0x81 == 0x81  # F, S: status in it
    assert pdu[BHS_LEN:] == bytes(range(256)) * 2
    assert struct.unpack_from(">I", pdu, 16)[0] == 7
    assert window(pdu) == (1, QUEUE_DEPTH)  # CmdSN 0 taken; its place is free again

    answers.append(Result(Status.CHECK_CONDITION, sense=fixed_sense(Reason.LBA_OUT_OF_RANGE)))
    (pdu,) = sent(feed(conn, read_cmd(8, 1)))
    assert pdu[0] & 0x3F == Opcode.SCSI_RESPONSE and pdu[3] == Status.CHECK_CONDITION
    assert pdu[BHS_LEN + 2 + 12] == 0x21  # ASC LOGICAL BLOCK ADDRESS OUT OF RANGE, in the sense data

    answers.append(None)  # declined: a task, as without run_now
    (execute,) = feed(conn, read_cmd(9, 2))
    assert isinstance(execute, Execute) and conn.tasks == {9: execute.task}
    offered.clear()
    (reject,) = sent(feed(conn, read_cmd(9, 3)))  # its tag is in use: refused before running
    assert reject[0] & 0x3F == Opcode.REJECT and offered == []
    (ignored,) = feed(conn, read_cmd(10, 4 + QUEUE_DEPTH))  # outside the window
    assert isinstance(ignored, Fault) and offered == []
    assert isinstance(feed(conn, write_cmd(11, 2, 4, immediate=bytes(2 * BS)))[0], Execute)
    assert r2ts(feed(conn, write_cmd(12, 2, 5))) == [(1, 0, 0, 2 * BS)]  # data-out to come: R2T first
    assert offered == []
    assert answers == []


def test_a_scsi_command_is_executed_only_in_the_full_feature_phase() -> None:
    """A SCSI Command goes straight to its handler in a logged-in normal session; once the
    session has ended (Logout, RFC 7143 11.14) one is a protocol error that runs nothing."""
    conn = logged_in("")
    (execute,) = feed(conn, read_cmd(1, 0))
    assert isinstance(execute, Execute)
    conn.task_done(execute.task, 0, bytes(BS), None)
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.LOGOUT_REQUEST | 0x40, 0x80
    struct.pack_into(">II", b, 24, 1, 0)
    assert isinstance(feed(conn, encode(b))[-1], Close) and conn.state is State.CLOSED
    after = feed(conn, read_cmd(2, 1))
    assert not any(isinstance(a, Execute) for a in after) and isinstance(after[-1], Close)
