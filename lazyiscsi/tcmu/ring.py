"""The TCMU command ring, sans I/O: a view of the shared memory the kernel's target_core_user
maps to userspace (``/dev/uioN``, map0), and nothing else: no file descriptors, no greenlets.

Layout (Linux ``include/uapi/linux/target_core_user.h``, mailbox version 2): a 128-byte mailbox
at offset 0 (version, flags, cmdr_off, cmdr_size, cmd_head written by the kernel; cmd_tail at
offset 64 written by us), then the command ring of cmdr_size bytes, then the data area the
iovecs point into. Entries are 8-byte aligned: a header (len_op with the opcode in its low 3 bits,
cmd_id, kflags, uflags), then for a command the iovec counts, the CDB's offset (from the start of
the map) and the iovecs; the response overlays the request in the same slot, so everything is
copied out of an entry before anything is written into it.

Two cursors: ``poll`` walks a private one from the tail towards cmd_head and hands out what it
finds; ``flush_completions`` writes responses at cmd_tail and moves it. With the mailbox's
OOOC flag a response may go into any command slot (its cmd_id is rewritten to the one
completed); without it, slots are answered in ring order.

A broken *entry* (a CDB or an iovec outside the map, too many iovecs for its length) becomes
``Malformed``: the handler fails that command with CHECK CONDITION and goes on. A broken *ring*
(a zero length, an entry running past the ring's end, a mailbox that is not version 2) cannot be
walked further: ``RingError``, and the device stops, not the process.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAILBOX_VERSION = 2
MAILBOX = struct.Struct("<HHIII")  # version, flags, cmdr_off, cmdr_size, cmd_head
MAILBOX_SIZE = 128
TAIL = struct.Struct("<I")
TAIL_OFF = 64

FLAG_CAP_OOOC = 1 << 0
FLAG_CAP_READ_LEN = 1 << 1
FLAG_CAP_TMR = 1 << 2

OP_PAD, OP_CMD, OP_TMR = 0, 1, 2
UFLAG_UNKNOWN_OP = 0x1
UFLAG_READ_LEN = 0x2

HDR = struct.Struct("<IHBB")  # len_op, cmd_id, kflags, uflags
REQ = struct.Struct("<III4xQ")  # iov_cnt, iov_bidi_cnt, iov_dif_cnt, (pad), cdb_off: at entry + 8
IOV = struct.Struct("<QQ")  # iov_base (offset from the map's start), iov_len: at entry + 48 + 16 i
IOV_OFF = 48
RSP_STATUS_OFF, RSP_READ_LEN_OFF, RSP_SENSE_OFF = 8, 12, 16
SENSE_BUFFERSIZE = 96
TMR_HEAD = struct.Struct("<B3xI")  # tmr_type, cmd_cnt: at entry + 8
TMR_IDS_OFF = 32

#: CDB length by group code (the top three bits of the opcode), SPC-4 4.2.5.1
_CDB_LENGTH = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}


class RingError(Exception):
    """The ring cannot be walked (or the mailbox is not one we speak); names the field."""


@dataclass(frozen=True)
class Command:
    """A SCSI command: its CDB, and the data area ranges (offset from the map's start, length)
    for Data-Out or Data-In; ``bidi_iovs`` are the Data-In ranges of a bidirectional command."""

    cmd_id: int
    cdb: bytes
    iovs: tuple[tuple[int, int], ...]
    bidi_iovs: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Tmr:
    """Task management the kernel tells us about (with tmr_notification): informational, the
    aborted commands are still completed."""

    tmr_type: int
    cmd_ids: tuple[int, ...]


@dataclass(frozen=True)
class Malformed:
    """A command entry that cannot be trusted: complete it with CHECK CONDITION."""

    cmd_id: int
    reason: str


Entry = Command | Tmr | Malformed


class Ring:
    def __init__(self, buf: memoryview | bytearray) -> None:
        self.buf = memoryview(buf).cast("B")
        if len(self.buf) < MAILBOX_SIZE:
            raise RingError(f"map of {len(self.buf)} bytes: smaller than the mailbox")
        version, self.flags, self.cmdr_off, self.cmdr_size, _head = MAILBOX.unpack_from(self.buf, 0)
        if version != MAILBOX_VERSION:
            raise RingError(f"mailbox version {version}: only {MAILBOX_VERSION} is supported")
        if self.cmdr_off < MAILBOX_SIZE or self.cmdr_size < 8 or self.cmdr_size % 8:
            raise RingError(f"cmdr_off {self.cmdr_off} / cmdr_size {self.cmdr_size}: not a ring")
        self.data_off = self.cmdr_off + self.cmdr_size
        if self.data_off > len(self.buf):
            raise RingError(f"cmdr_off + cmdr_size = {self.data_off}: past the map ({len(self.buf)} bytes)")
        self.ooo = bool(self.flags & FLAG_CAP_OOOC)
        self._cursor = self.tail  # where poll goes on from
        self._queued: dict[int, tuple[int, bytes, int | None]] = {}  # cmd_id -> response, oldest first
        self.outstanding = 0

    @property
    def head(self) -> int:
        return int(MAILBOX.unpack_from(self.buf, 0)[4])

    @property
    def tail(self) -> int:
        return int(TAIL.unpack_from(self.buf, TAIL_OFF)[0])

    # -- what the kernel queued ---------------------------------------------------------------

    def poll(self) -> list[Entry]:
        """Every entry between our cursor and cmd_head, in ring order."""
        out: list[Entry] = []
        head = self.head
        if head >= self.cmdr_size or head % 8:
            raise RingError(f"cmd_head {head}: outside a ring of {self.cmdr_size} bytes")
        while self._cursor != head:
            off = self.cmdr_off + self._cursor
            len_op, cmd_id, _kflags, uflags = HDR.unpack_from(self.buf, off)
            op, length = len_op & 0x7, len_op & ~0x7
            if length == 0 or self._cursor + length > self.cmdr_size:
                raise RingError(f"entry at {self._cursor}: length {length} in a ring of {self.cmdr_size}")
            if op == OP_CMD:
                out.append(self._command(off, cmd_id, length))
                self.outstanding += 1
            elif op == OP_TMR:
                out.append(self._tmr(off, length))
            elif op != OP_PAD:
                self.buf[off + 7] = uflags | UFLAG_UNKNOWN_OP  # the kernel fails it at completion
            self._cursor = (self._cursor + length) % self.cmdr_size
        return out

    def _command(self, off: int, cmd_id: int, length: int) -> Command | Malformed:
        iov_cnt, bidi_cnt, dif_cnt, cdb_off = REQ.unpack_from(self.buf, off + 8)
        n_iovs = iov_cnt + bidi_cnt + dif_cnt
        if IOV_OFF + 16 * n_iovs > length:
            return Malformed(cmd_id, f"{n_iovs} iovecs do not fit an entry of {length} bytes")
        iovs = []
        for i in range(iov_cnt + bidi_cnt):
            base, n = IOV.unpack_from(self.buf, off + IOV_OFF + 16 * i)
            if base < self.data_off or base + n > len(self.buf):
                return Malformed(cmd_id, f"iovec {i} ({base}+{n}) outside the data area")
            iovs.append((base, n))
        if not MAILBOX_SIZE <= cdb_off < len(self.buf):
            return Malformed(cmd_id, f"CDB offset {cdb_off} outside the map")
        opcode = self.buf[cdb_off]
        cdb_len = _CDB_LENGTH.get(opcode >> 5)
        if opcode == 0x7F and cdb_off + 8 <= len(self.buf):
            cdb_len = 8 + self.buf[cdb_off + 7]
        if cdb_len is None:
            cdb_len = 16  # vendor-specific groups: the SCSI layer refuses the opcode anyway
        if cdb_off + cdb_len > len(self.buf):
            return Malformed(cmd_id, f"CDB of {cdb_len} bytes at {cdb_off} runs past the map")
        cdb = bytes(self.buf[cdb_off:cdb_off + cdb_len])
        return Command(cmd_id, cdb, tuple(iovs[:iov_cnt]), tuple(iovs[iov_cnt:]))

    def _tmr(self, off: int, length: int) -> Tmr:
        tmr_type, count = TMR_HEAD.unpack_from(self.buf, off + 8)
        count = min(count, max(0, (length - TMR_IDS_OFF) // 2))
        ids = struct.unpack_from(f"<{count}H", self.buf, off + TMR_IDS_OFF)
        return Tmr(tmr_type, tuple(ids))

    def iov_view(self, offset: int, length: int) -> memoryview:
        """A window on the data area (for preadv/pwritev straight into the map)."""
        if offset < self.data_off or offset + length > len(self.buf):
            raise RingError(f"data range {offset}+{length} outside the data area")
        return self.buf[offset:offset + length]

    # -- our answers ------------------------------------------------------------------------

    def complete(self, cmd_id: int, status: int, sense: bytes = b"", read_len: int | None = None) -> None:
        """Queue a response; ``flush_completions`` writes it when a slot is free for it."""
        self._queued[cmd_id] = (status, sense, read_len)

    def flush_completions(self) -> bool:
        """Write queued responses at cmd_tail and advance it; True if it moved (then tell the
        kernel: write 4 bytes to the uio device)."""
        tail = self.tail
        moved = False
        while tail != self._cursor:
            off = self.cmdr_off + tail
            len_op, slot_id, _kflags, uflags = HDR.unpack_from(self.buf, off)
            op, length = len_op & 0x7, len_op & ~0x7
            if op == OP_CMD and not uflags & UFLAG_UNKNOWN_OP:
                if self.ooo:
                    cmd_id = next(iter(self._queued), None)
                else:
                    cmd_id = slot_id if slot_id in self._queued else None
                if cmd_id is None:
                    break
                self._respond(off, cmd_id, *self._queued.pop(cmd_id))
                self.outstanding -= 1
            tail = (tail + length) % self.cmdr_size
            TAIL.pack_into(self.buf, TAIL_OFF, tail)
            moved = True
        return moved

    def _respond(self, off: int, cmd_id: int, status: int, sense: bytes, read_len: int | None) -> None:
        struct.pack_into("<H", self.buf, off + 4, cmd_id)
        self.buf[off + RSP_STATUS_OFF] = status
        if read_len is not None:
            self.buf[off + 7] |= UFLAG_READ_LEN
            struct.pack_into("<I", self.buf, off + RSP_READ_LEN_OFF, read_len)
        sense = sense[:SENSE_BUFFERSIZE]
        self.buf[off + RSP_SENSE_OFF:off + RSP_SENSE_OFF + SENSE_BUFFERSIZE] = sense + bytes(
            SENSE_BUFFERSIZE - len(sense))
