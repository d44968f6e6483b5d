"""Streamed WRITEs (issue 15): the connection state machine cuts a WRITE(10/12/16)'s data-out into
pieces on the LUN's grid as it arrives and asks for no more than its window holds; the SCSI
layer's ``WriteStream`` runs the command's checks once, before any piece, and writes nothing
after a failure. Driven with hand-made PDUs; below the SCSI layer a recording backend."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

import pytest

from lazyiscsi.iscsi.connection import (
    STREAM_PIECE_BYTES,
    Connection,
    Execute,
    Piece,
    Send,
    State,
    Stream,
    StreamEnd,
    Target,
    stream_window,
)
from lazyiscsi.iscsi.pdu import BHS_LEN, Opcode, RejectReason, encode
from lazyiscsi.scsi import dispatch
from lazyiscsi.scsi.lun import Lun
from lazyiscsi.scsi.sense import Status
from lazyiscsi.store.errors import CacheFull
from tests.unit.test_iscsi_connection import IQN, corrupt, data_out, digest_feed, feed, r2ts, sent

BS = 512
KiB, MiB = 1 << 10, 1 << 20
UNIT = 64 * KiB
#: keys of an initiator that sends immediate and unsolicited data and takes several R2Ts
KEYS = ("ImmediateData=Yes\0InitialR2T=No\0FirstBurstLength=262144\0MaxBurstLength=1048576\0"
        "MaxOutstandingR2T=4\0")


def logged_in(keys: str = KEYS, unit: int = UNIT) -> Connection:
    def plan(cdb: bytes, lun: object) -> tuple[int, int] | None:
        start = dispatch.write_start(cdb, BS)
        return None if start is None else (start, unit)

    conn = Connection(lambda name: Target(IQN, {0: object()}) if name == IQN else None, lambda: [],
                      lambda cdb, lun: dispatch.data_out_length(cdb, BS), stream_plan=plan)
    text = (f"InitiatorName=iqn.test:i\0TargetName={IQN}\0SessionType=Normal\0AuthMethod=None\0"
            f"HeaderDigest=None\0DataDigest=None\0MaxRecvDataSegmentLength=65536\0{keys}").encode()
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.LOGIN_REQUEST | 0x40, 0x80 | (1 << 2) | 3
    b[8:14] = bytes.fromhex("400001370000")
    reply = sent(feed(conn, encode(b, text)))
    assert reply and reply[0][36] == 0 and conn.state is State.FULL_FEATURE
    return conn


def write16(itt: int, lba: int, blocks: int, cmdsn: int, immediate: bytes = b"", final: bool = True,
            opcode: int = 0x8A) -> bytes:
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.SCSI_COMMAND, (0x80 if final else 0) | 0x20 | 0x01
    struct.pack_into(">IIII", b, 16, itt, blocks * BS, cmdsn, 0)
    b[32:48] = struct.pack(">BBQIBB", opcode, 0, lba, blocks, 0, 0)
    return encode(b, immediate)


@dataclass
class Wire:
    """The initiator's side (answers R2Ts with Data-Out of at most 64 KiB) and the portal's (writes
    each piece at once, or holds them back with ``lag``), with what the connection handed out."""

    conn: Connection
    itt: int
    data: bytes
    actions: list = field(default_factory=list)  # type: ignore[type-arg]
    pieces: list[Piece] = field(default_factory=list)

    def run(self, actions: list, *, lag: int = 0) -> None:  # type: ignore[type-arg]
        """Play the exchange until no R2T is left unanswered and ``lag`` pieces are unwritten."""
        queue = list(actions)
        unwritten: list[Piece] = []
        while queue:
            a = queue.pop(0)
            self.actions.append(a)
            if isinstance(a, Piece):
                self.pieces.append(a)
                unwritten.append(a)
            elif isinstance(a, Send) and sent([a])[0][0] & 0x3F == Opcode.R2T:
                ((ttt, _, offset, length),) = r2ts([a])
                for pos in range(offset, offset + length, 64 * KiB):
                    n = min(64 * KiB, offset + length - pos)
                    queue += feed(self.conn, data_out(self.itt, ttt, (pos - offset) // (64 * KiB), pos,
                                                      self.data[pos:pos + n], pos + n == offset + length))
            while len(unwritten) > lag or (not queue and unwritten and lag == 0):
                p = unwritten.pop(0)
                queue += self.conn.piece_written(p.task, len(p.data))


@pytest.mark.parametrize(("lba", "blocks", "immediate", "unsolicited", "unit"), [
    (3, 8 * MiB // BS, 64 * KiB, 192 * KiB, UNIT),  # unaligned start, immediate + unsolicited burst
    (128, 4 * MiB // BS + 5, 0, 0, UNIT),          # unit-aligned start, ends mid-unit, R2Ts only
    (7, 2048, 256 * KiB, 0, UNIT),                 # immediate data only, a whole first burst
    (5, 6 * MiB // BS, 128 * KiB, 0, MiB),         # a unit larger than a piece: pieces of a unit
])
def test_pieces_come_in_order_cut_on_unit_boundaries_within_the_window(lba: int, blocks: int, immediate: int,
                                                                       unsolicited: int, unit: int) -> None:
    conn = logged_in(unit=unit)
    data = random.Random(lba).randbytes(blocks * BS)
    start = lba * BS
    first = feed(conn, write16(1, lba, blocks, 0, data[:immediate], final=not unsolicited))
    assert isinstance(first[0], Stream)  # before any piece: the checks run first
    wire = Wire(conn, 1, data)
    wire.run(first)
    if unsolicited:
        burst = data[immediate:immediate + unsolicited]
        wire.run(feed(conn, data_out(1, 0xFFFFFFFF, 0, immediate, burst, True)))
    pieces = wire.pieces
    assert isinstance(wire.actions[-1], StreamEnd) and wire.actions[-1].task is pieces[0].task
    assert not any(isinstance(a, Execute) for a in wire.actions)
    assert b"".join(p.data for p in pieces) == data  # every byte once, in order
    piece = max(STREAM_PIECE_BYTES, unit)
    offsets = [p.offset for p in pieces]
    assert offsets == sorted(offsets) and offsets[0] == 0
    for p in pieces[:-1]:  # every cut but the command's own end is on the grid (so on a unit)
        assert (start + p.offset + len(p.data)) % piece == 0 and 0 < len(p.data) <= piece
    assert conn.held_peak <= stream_window(piece) < len(data)


def test_r2ts_wait_for_pieces_to_be_written() -> None:
    """The store is slow: no R2T asks for data beyond the window while pieces are unwritten."""
    conn = logged_in()
    data = random.Random(1).randbytes(4 * MiB)
    wire = Wire(conn, 1, data)
    wire.run(feed(conn, write16(1, 0, len(data) // BS, 0)), lag=2)  # the portal sits on 2 pieces
    task = wire.pieces[0].task
    assert task.received - task.written <= stream_window(STREAM_PIECE_BYTES)
    assert task.received < len(data) and not task.stream_ended  # stalled until pieces are written
    for p in wire.pieces[-2:]:
        wire.run(conn.piece_written(p.task, len(p.data)))
    assert task.stream_ended and b"".join(p.data for p in wire.pieces) == data
    assert conn.held_peak <= stream_window(STREAM_PIECE_BYTES)


def test_other_commands_and_writes_of_one_piece_are_gathered_whole() -> None:
    """WRITE AND VERIFY (and every other command with data-out) executes with all of it; so
    does a WRITE that fits in one piece (streaming it would hold as much)."""
    conn = logged_in()
    actions = feed(conn, write16(1, 0, 1, 0, bytes(BS), opcode=0x8E))
    assert [type(a) for a in actions] == [Execute] and len(actions[0].task.data) == BS
    small = bytes(STREAM_PIECE_BYTES)
    actions = feed(conn, write16(2, 3, len(small) // BS, 1, small))
    assert [type(a) for a in actions] == [Execute] and actions[0].task.data == small
    actions = feed(conn, write16(3, 3, len(small) // BS + 1, 2, small))  # one block more: streamed
    assert [type(a) for a in actions] == [Stream, Piece, Send]  # a piece up to the grid, an R2T


def test_nothing_is_cut_after_a_bad_datasn_and_the_command_fails_after_its_burst() -> None:
    conn = logged_in()
    data = random.Random(2).randbytes(MiB)
    actions = feed(conn, write16(1, 0, len(data) // BS, 0))
    ((ttt, _, offset, length), *_) = r2ts(actions)
    assert (offset, length) == (0, STREAM_PIECE_BYTES)
    got = feed(conn, data_out(1, ttt, 0, 0, data[:64 * KiB], False))
    assert got == []  # a partial piece: held
    got = feed(conn, data_out(1, ttt, 2, 64 * KiB, data[64 * KiB:128 * KiB], False))  # DataSN 1 lost
    got += feed(conn, data_out(1, ttt, 3, 128 * KiB, data[128 * KiB:256 * KiB], True))
    assert not any(isinstance(a, Piece) for a in got)  # neither the PDU after the gap nor the rest
    assert [type(a).__name__ for a in got if not isinstance(a, Send)] == ["Fault", "StreamEnd"]
    task = conn.tasks[1]
    sense = task.data_failure()
    assert sense is not None and sense[2] & 0x0F == 0x0B and (sense[12], sense[13]) == (0x4B, 0x00)
    assert conn.piece_written(task, 0) == []  # no more R2Ts for it
    (response,) = sent(conn.task_done(task, Status.CHECK_CONDITION, None, sense))
    assert response[0] & 0x3F == Opcode.SCSI_RESPONSE and response[3] == 0x02


def test_a_segment_with_a_bad_data_digest_is_never_handed_out() -> None:
    conn = logged_in()
    conn.data_digest = True
    actions = digest_feed(conn, encode(bytearray(write16(1, 0, 1024, 0)[:BHS_LEN]), b"", data_digest=True))
    ((ttt, *_), *_) = r2ts(actions)
    good = encode(bytearray(data_out(1, ttt, 0, 0, b"", False)[:BHS_LEN]), bytes(128 * KiB), data_digest=True)
    assert digest_feed(conn, good) == []
    header = bytearray(data_out(1, ttt, 1, 128 * KiB, b"", True)[:BHS_LEN])
    bad = corrupt(encode(header, b"\x01" * (128 * KiB), data_digest=True))
    got = digest_feed(conn, bad)
    assert not any(isinstance(a, Piece) for a in got) and isinstance(got[-1], StreamEnd)
    (reject,) = sent(got)
    assert reject[2] == RejectReason.DATA_DIGEST_ERROR
    sense = got[-1].task.data_failure()
    assert sense is not None and (sense[12], sense[13]) == (0x47, 0x05)


def test_abort_ends_the_stream_and_is_answered_after_the_task() -> None:
    conn = logged_in()
    data = bytes(2 * MiB)
    actions = feed(conn, write16(1, 0, len(data) // BS, 0))
    ((ttt, *_), *_) = r2ts(actions)
    (piece,) = feed(conn, data_out(1, ttt, 0, 0, data[:STREAM_PIECE_BYTES], True))
    assert isinstance(piece, Piece)
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.TASK_MGMT_REQUEST | 0x40, 0x80 | 1  # ABORT TASK
    struct.pack_into(">III", b, 16, 0x50, 1, 1)
    got = feed(conn, encode(b))
    assert [type(a) for a in got] == [StreamEnd]  # no answer while its piece may be being written
    task = piece.task
    assert task.aborted and conn.piece_written(task, len(piece.data)) == []  # no R2T after it
    assert feed(conn, data_out(1, ttt + 1, 0, STREAM_PIECE_BYTES, bytes(512), False))[0].parts[0][0] & 0x3F \
        == Opcode.REJECT  # more data for it: no task
    (tmf,) = sent(conn.task_done(task, Status.GOOD, None, None))
    assert tmf[0] & 0x3F == Opcode.TASK_MGMT_RESPONSE and tmf[2] == 0


# -- the SCSI layer's side: checks once, before any piece; nothing after a failure ---------------

class Recording:
    """A block backend that records writes (below the SCSI layer); ``fail_after`` writes it raises
    the store's ENOSPC."""

    def __init__(self, size: int, fail_after: int | None = None) -> None:
        self.size, self.unit, self.complete, self.writable = size, UNIT, True, True
        self.writes: list[tuple[int, bytes]] = []
        self.flushes = 0
        self.fail_after = fail_after

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        if self.fail_after is not None and len(self.writes) >= self.fail_after:
            raise CacheFull("no space left on the cache device")
        self.writes.append((offset, bytes(data)))

    def flush(self) -> None:
        self.flushes += 1


def cdb16(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0x08 if fua else 0, lba, blocks, 0, 0)


def test_a_write_failing_its_checks_writes_no_piece() -> None:
    backend = Recording(MiB)
    lun = Lun(backend, "vm1")  # type: ignore[arg-type]
    beyond = dispatch.WriteStream(lun, cdb16(MiB // BS - 1, 2), "a", 2 * BS)  # past the last LBA
    lun.reservations.reserve("other")
    conflict = dispatch.WriteStream(lun, cdb16(0, 2), "a", 2 * BS)
    for stream in (beyond, conflict):
        stream.write(0, bytes(2 * BS))
    assert backend.writes == []
    assert beyond.finish().sense[12] == 0x21  # type: ignore[index]  LOGICAL BLOCK ADDRESS OUT OF RANGE
    assert conflict.finish().status is Status.RESERVATION_CONFLICT


def test_a_store_error_mid_stream_stops_the_writes_and_fails_the_command() -> None:
    backend = Recording(MiB, fail_after=1)
    lun = Lun(backend, "vm1")  # type: ignore[arg-type]
    stream = dispatch.WriteStream(lun, cdb16(0, 1024), "a", 1024 * BS)
    for off in range(0, 1024 * BS, 128 * KiB):
        stream.write(off, b"\x07" * (128 * KiB))
    assert [off for off, _ in backend.writes] == [0]  # the first piece landed, nothing after
    result = stream.finish()
    assert result.status is Status.CHECK_CONDITION and result.sense is not None
    assert (result.sense[2] & 0x0F, result.sense[12], result.sense[13]) == (0x07, 0x27, 0x07)


def test_fua_flushes_after_the_last_piece_and_a_short_transfer_writes_whole_blocks() -> None:
    backend = Recording(MiB)
    lun = Lun(backend, "vm1")  # type: ignore[arg-type]
    stream = dispatch.WriteStream(lun, cdb16(2, 4, fua=True), "a", 3 * BS + 100)  # EDTL short
    stream.write(0, bytes(3 * BS + 100))
    assert backend.flushes == 0
    assert stream.finish().status is Status.GOOD and backend.flushes == 1
    assert [(off, len(d)) for off, d in backend.writes] == [(2 * BS, 3 * BS)]
