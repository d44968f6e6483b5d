"""The TCMU ring against a kernel played in Python, on ring images laid out exactly as the
kernel's structs (target_core_user.h, mailbox version 2): entries placed at cmd_head with their
CDB inside and their iovecs in the data area, PAD entries where an entry does not fit before the
ring's end, TMR entries, and completions read back the way tcmu_handle_completions does (an
unknown cmd_id there would break the ring: here it fails the test)."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyiscsi.tcmu.ring import (
    FLAG_CAP_OOOC,
    HDR,
    IOV,
    MAILBOX,
    OP_CMD,
    OP_PAD,
    OP_TMR,
    REQ,
    TAIL,
    TAIL_OFF,
    UFLAG_READ_LEN,
    UFLAG_UNKNOWN_OP,
    Command,
    Malformed,
    Ring,
    RingError,
    Tmr,
)

CMDR_OFF = 128


def entry_size(iov_cnt: int, cdb_len: int) -> int:
    """The kernel's sizing: max(48 + 16 iovecs, 112) plus the CDB rounded up to 8."""
    return max(48 + 16 * iov_cnt, 112) + -(-cdb_len // 8) * 8


class KernelSide:
    """target_core_user's half of the ring, enough to drive the handler."""

    def __init__(self, cmdr_size: int = 8192, data_size: int = 1 << 16, ooo: bool = True) -> None:
        self.cmdr_size = cmdr_size
        self.data_off = CMDR_OFF + cmdr_size
        self.buf = bytearray(self.data_off + data_size)
        MAILBOX.pack_into(self.buf, 0, 2, FLAG_CAP_OOOC if ooo else 0, CMDR_OFF, cmdr_size, 0)
        self.head = 0
        self.cleaned = 0  # the kernel's own cursor over completions
        self.outstanding: dict[int, int] = {}  # cmd_id -> entry length
        self.iovs: dict[int, list[tuple[int, int]]] = {}  # cmd_id -> its data ranges
        self.done: dict[int, tuple[int, bytes, int | None]] = {}
        self.next_id = 1
        self.data_next = 0

    def free(self) -> int:
        tail = TAIL.unpack_from(self.buf, TAIL_OFF)[0]
        return self.cmdr_size - ((self.head - tail) % self.cmdr_size) - 8

    def _place(self, length: int) -> int | None:
        """Where an entry of ``length`` goes, padding to the ring's end if it does not fit."""
        room_to_end = self.cmdr_size - self.head
        need = length + (room_to_end if room_to_end < length else 0)
        if need > self.free():
            return None
        if room_to_end < length:
            HDR.pack_into(self.buf, CMDR_OFF + self.head, room_to_end | OP_PAD, 0, 0, 0)
            self.head = 0
        return self.head

    def _publish(self, length: int) -> None:
        self.head = (self.head + length) % self.cmdr_size
        struct.pack_into("<I", self.buf, 12, self.head)

    def submit(self, cdb: bytes, data: bytes = b"", *, n_iovs: int = 1, iov_len: int = 512,
               raw: dict[str, int] | None = None) -> int | None:
        length = entry_size(n_iovs, len(cdb))
        at = self._place(length)
        if at is None:
            return None
        cmd_id = self.next_id
        self.next_id = self.next_id % 0xFFFF + 1
        off = CMDR_OFF + at
        self.buf[off:off + length] = bytes(length)
        HDR.pack_into(self.buf, off, length | OP_CMD, cmd_id, 0, 0)
        cdb_off = off + length - -(-len(cdb) // 8) * 8
        REQ.pack_into(self.buf, off + 8, n_iovs, 0, 0, cdb_off)
        self.buf[cdb_off:cdb_off + len(cdb)] = cdb
        for i in range(n_iovs):
            base = self.data_off + (self.data_next % (len(self.buf) - self.data_off - iov_len))
            self.data_next += iov_len
            IOV.pack_into(self.buf, off + 48 + 16 * i, base, iov_len)
            self.iovs.setdefault(cmd_id, []).append((base, iov_len))
            chunk = data[i * iov_len:(i + 1) * iov_len]
            self.buf[base:base + len(chunk)] = chunk
        self.iovs.setdefault(cmd_id, [])
        for name, value in (raw or {}).items():  # corruption for the malformed-entry tests
            if name == "cdb_off":
                struct.pack_into("<Q", self.buf, off + 24, value)
            elif name == "iov_base":
                struct.pack_into("<Q", self.buf, off + 48, value)
            elif name == "iov_cnt":
                struct.pack_into("<I", self.buf, off + 8, value)
        self.outstanding[cmd_id] = length
        self._publish(length)
        return cmd_id

    def submit_tmr(self, tmr_type: int, ids: list[int]) -> None:
        length = -(-(32 + 2 * len(ids)) // 8) * 8
        at = self._place(length)
        assert at is not None
        off = CMDR_OFF + at
        self.buf[off:off + length] = bytes(length)
        HDR.pack_into(self.buf, off, length | OP_TMR, 0, 0, 0)
        struct.pack_into("<B3xI", self.buf, off + 8, tmr_type, len(ids))
        struct.pack_into(f"<{len(ids)}H", self.buf, off + 32, *ids)
        self._publish(length)

    def submit_raw(self, len_op: int) -> None:
        at = self._place(len_op & ~7)
        assert at is not None
        HDR.pack_into(self.buf, CMDR_OFF + at, len_op, 0, 0, 0)
        self._publish(len_op & ~7)

    def data(self, cmd_id: int) -> bytes:
        return b"".join(bytes(self.buf[base:base + n]) for base, n in self.iovs[cmd_id])

    def reap(self) -> list[int]:
        """Walk from the last cleaned entry to cmd_tail, as tcmu_handle_completions does."""
        tail = TAIL.unpack_from(self.buf, TAIL_OFF)[0]
        reaped = []
        while self.cleaned != tail:
            off = CMDR_OFF + self.cleaned
            len_op, cmd_id, _k, uflags = HDR.unpack_from(self.buf, off)
            op, length = len_op & 7, len_op & ~7
            if op == OP_CMD and not uflags & UFLAG_UNKNOWN_OP:
                assert cmd_id in self.outstanding, f"unknown cmd_id {cmd_id}: the kernel would break the ring"
                del self.outstanding[cmd_id]
                read_len = (struct.unpack_from("<I", self.buf, off + 12)[0] if uflags & UFLAG_READ_LEN
                            else None)
                self.done[cmd_id] = (self.buf[off + 8], bytes(self.buf[off + 16:off + 112]), read_len)
                reaped.append(cmd_id)
            self.cleaned = (self.cleaned + length) % self.cmdr_size
        return reaped


READ10 = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0)
WRITE10 = struct.pack(">BBIBHB", 0x2A, 0, 8, 0, 1, 0)


def test_commands_round_trip_with_data_in_the_data_area() -> None:
    k = KernelSide()
    ring = Ring(k.buf)
    w = k.submit(WRITE10, b"\xab" * 512)
    r = k.submit(READ10)
    write, read = ring.poll()
    assert isinstance(write, Command) and isinstance(read, Command)
    assert (write.cmd_id, write.cdb, read.cmd_id, read.cdb) == (w, WRITE10, r, READ10)
    assert bytes(ring.iov_view(*write.iovs[0])) == b"\xab" * 512
    ring.iov_view(*read.iovs[0])[:] = b"\x5a" * 512  # a READ fills its iovecs in place
    ring.complete(read.cmd_id, 0, read_len=512)
    ring.complete(write.cmd_id, 0)
    assert ring.flush_completions()
    assert sorted(k.reap()) == [w, r] and not k.outstanding
    assert k.done[r][2] == 512 and k.done[w][2] is None
    base, n = read.iovs[0]
    assert bytes(k.buf[base:base + n]) == b"\x5a" * 512
    assert ring.outstanding == 0 and not ring.flush_completions()


def test_check_condition_writes_status_and_sense_at_the_kernels_offsets() -> None:
    k = KernelSide()
    ring = Ring(k.buf)
    cmd_id = k.submit(READ10)
    (cmd,) = ring.poll()
    sense = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0]) + bytes(4)
    ring.complete(cmd.cmd_id, 0x02, sense, read_len=0)
    ring.flush_completions()
    off = CMDR_OFF + 0
    assert k.buf[off + 8] == 0x02 and struct.unpack_from("<I", k.buf, off + 12)[0] == 0
    assert bytes(k.buf[off + 16:off + 16 + len(sense)]) == sense
    assert bytes(k.buf[off + 16 + len(sense):off + 112]) == bytes(96 - len(sense))  # rest zeroed
    assert k.buf[off + 7] & UFLAG_READ_LEN
    k.reap()
    assert k.done[cmd_id][0] == 0x02


def test_wraparound_with_pad_entries_over_many_laps() -> None:
    k = KernelSide(cmdr_size=1024, ooo=False)
    ring = Ring(k.buf)
    rng = random.Random(3)
    submitted = completed = pads_seen = 0
    while completed < 500:
        for _ in range(rng.randint(1, 4)):
            n = rng.randint(1, 3)
            if k.submit(WRITE10 if n % 2 else READ10, n_iovs=n) is None:
                break
            submitted += 1
        for entry in ring.poll():
            assert isinstance(entry, Command)
            ring.complete(entry.cmd_id, 0)
        if ring.flush_completions():
            completed += len(k.reap())
        pads_seen += k.head < 112  # the head just wrapped
    assert completed == submitted and not k.outstanding and pads_seen > 10


def test_tmr_entries_are_reported_and_stepped_over() -> None:
    k = KernelSide()
    ring = Ring(k.buf)
    a = k.submit(READ10)
    k.submit_tmr(1, [a])  # ABORT TASK of a
    b = k.submit(READ10)
    entries = ring.poll()
    assert [type(e) for e in entries] == [Command, Tmr, Command]
    assert entries[1] == Tmr(1, (a,))
    ring.complete(b, 0)
    ring.complete(a, 0)  # aborted commands are still completed
    ring.flush_completions()
    assert sorted(k.reap()) == sorted([a, b])
    assert TAIL.unpack_from(k.buf, TAIL_OFF)[0] == k.head


def test_out_of_order_completion_with_oooc() -> None:
    k = KernelSide(ooo=True)
    ring = Ring(k.buf)
    ids = [k.submit(READ10) for _ in range(5)]
    ring.poll()
    ring.complete(ids[4], 0)  # the last one finishes first: it takes the first slot
    assert ring.flush_completions()
    assert k.reap() == [ids[4]]
    for cmd_id in reversed(ids[:4]):
        ring.complete(cmd_id, 0)
    ring.flush_completions()
    assert sorted(k.reap()) == sorted(ids[:4]) and not k.outstanding


def test_in_order_completion_without_oooc() -> None:
    k = KernelSide(ooo=False)
    ring = Ring(k.buf)
    first, second = k.submit(READ10), k.submit(READ10)
    ring.poll()
    ring.complete(second, 0)
    assert not ring.flush_completions()  # waits for the first slot's own command
    ring.complete(first, 0)
    assert ring.flush_completions()
    assert k.reap() == [first, second]


@pytest.mark.parametrize(("raw", "why"), [
    ({"cdb_off": 1 << 40}, "CDB offset"),
    ({"iov_base": 64}, "outside the data area"),
    ({"iov_base": (1 << 30)}, "outside the data area"),
    ({"iov_cnt": 1000}, "do not fit"),
])
def test_malformed_entries_fail_the_command_not_the_ring(raw: dict[str, int], why: str) -> None:
    k = KernelSide()
    ring = Ring(k.buf)
    bad = k.submit(READ10, raw=raw)
    good = k.submit(READ10)
    first, second = ring.poll()
    assert isinstance(first, Malformed) and first.cmd_id == bad and why in first.reason
    assert isinstance(second, Command) and second.cmd_id == good
    ring.complete(bad, 0x02, bytes([0x70, 0, 0x04]))
    ring.complete(good, 0)
    ring.flush_completions()
    assert sorted(k.reap()) == sorted([bad, good])
    assert k.done[bad][0] == 0x02 and k.done[good][0] == 0
    assert k.submit(READ10) is not None and isinstance(ring.poll()[0], Command)  # and it goes on


def test_unknown_entry_opcode_is_flagged_for_the_kernel() -> None:
    k = KernelSide()
    ring = Ring(k.buf)
    k.submit_raw(64 | 5)
    after = k.submit(READ10)
    (cmd,) = ring.poll()
    assert cmd.cmd_id == after  # type: ignore[union-attr]
    assert k.buf[CMDR_OFF + 7] & UFLAG_UNKNOWN_OP
    ring.complete(after, 0)
    ring.flush_completions()
    assert TAIL.unpack_from(k.buf, TAIL_OFF)[0] == k.head


def test_broken_mailbox_and_ring_are_refused_with_the_field_named() -> None:
    k = KernelSide()
    struct.pack_into("<H", k.buf, 0, 1)
    with pytest.raises(RingError, match="mailbox version 1"):
        Ring(k.buf)
    k = KernelSide()
    struct.pack_into("<I", k.buf, 8, 1 << 30)
    with pytest.raises(RingError, match="past the map"):
        Ring(k.buf)
    k = KernelSide()
    ring = Ring(k.buf)
    k.submit_raw(0 | OP_CMD)  # a zero-length entry: nothing after it can be found
    struct.pack_into("<I", k.buf, 12, 64)
    with pytest.raises(RingError, match="length 0"):
        ring.poll()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 1 << 16)), min_size=1, max_size=80),
       st.randoms(use_true_random=False))
def test_every_command_completes_exactly_once_in_any_order(batches: list[tuple[int, int]],
                                                           rnd: random.Random) -> None:
    k = KernelSide(cmdr_size=2048, ooo=True)
    ring = Ring(k.buf)
    pending: list[int] = []
    total = 0
    for n_iovs, _seed in batches:
        if k.submit(READ10, n_iovs=n_iovs) is not None:
            total += 1
        pending += [e.cmd_id for e in ring.poll()]  # type: ignore[union-attr]
        rnd.shuffle(pending)
        for cmd_id in pending[:rnd.randint(0, len(pending))]:
            ring.complete(cmd_id, 0)
            pending.remove(cmd_id)
        ring.flush_completions()
        k.reap()
    for cmd_id in pending:
        ring.complete(cmd_id, 0)
    ring.flush_completions()
    k.reap()
    assert len(k.done) == total and not k.outstanding
    assert TAIL.unpack_from(k.buf, TAIL_OFF)[0] == k.head and ring.outstanding == 0
