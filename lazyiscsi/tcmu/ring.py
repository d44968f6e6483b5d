"""The TCMU command ring, sans I/O: a view of the memory the kernel's target_core_user maps to
userspace (``/dev/uioN``, map0) and nothing else: no file descriptors, no threads, no greenlets,
so every corner of the protocol can be exercised on a bytearray laid out like the kernel's.

Layout (Linux ``include/uapi/linux/target_core_user.h``, mailbox version 2): a 128-byte mailbox
at offset 0 (version, flags, cmdr_off, cmdr_size and cmd_head written by the kernel; cmd_tail at
offset 64 written by us), the command ring of cmdr_size bytes at cmdr_off, then the data area the
iovecs point into. Entries are 8-byte aligned: a header (len_op with the opcode in its low three
bits, cmd_id, kflags, uflags), then for a command the iovec counts, the CDB's offset (from the
start of the map; the kernel puts the CDB inside the entry, after the iovecs) and the iovecs. The
response overlays the request in the same slot, so ``poll`` copies everything out first.

Two cursors: ``poll`` walks a private one from cmd_tail towards cmd_head and hands out what it
finds; ``flush_completions`` writes responses at cmd_tail and moves it, never past that cursor
(a slot not yet read must not be overwritten). With the mailbox's OOOC flag any response may go
into any command slot (the slot's cmd_id is rewritten to the one completed); without it slots are
answered in ring order.

A broken command *entry* becomes ``Malformed``: the caller fails that command with CHECK CONDITION
and the ring goes on. Only what cannot be walked past at all (a broken mailbox, a non-command
entry without a usable length, a command whose length cannot be recovered from its CDB) raises
``RingError``: that device stops, not the process.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAILBOX_VERSION = 2
MAILBOX_SIZE = 128  # sizeof(struct tcmu_mailbox): the smallest cmdr_off there can be

FLAG_CAP_OOOC = 1 << 0  # responses may be written into any command slot
FLAG_CAP_READ_LEN = 1 << 1  # rsp.read_len is honoured (short Data-In)
FLAG_CAP_TMR = 1 << 2  # TMR entries appear in the ring (attrib/tmr_notification)
FLAG_CAP_KEEP_BUF = 1 << 3  # data buffers may outlive the completion (not used by us)

OP_PAD, OP_CMD, OP_TMR = 0, 1, 2
OP_MASK = 0x7

UFLAG_UNKNOWN_OP = 0x1  # set by us on an entry we do not understand: the kernel fails it
UFLAG_READ_LEN = 0x2  # set by us when rsp.read_len is valid

SENSE_BUFFERSIZE = 96

#: tcmu_tmr_type, for logs
TMR_TYPES: dict[int, str] = {
    1: "ABORT_TASK",
    2: "ABORT_TASK_SET",
    3: "CLEAR_ACA",
    4: "CLEAR_TASK_SET",
    5: "LUN_RESET",
    6: "TARGET_WARM_RESET",
    7: "TARGET_COLD_RESET",
    128: "LUN_RESET_PRO",
}

MAILBOX = struct.Struct("<HHIII")  # version, flags, cmdr_off, cmdr_size, cmd_head: at 0
TAIL = struct.Struct("<I")  # cmd_tail, on its own cache line
TAIL_OFF = 64

HDR = struct.Struct("<IHBB")  # len_op, cmd_id, kflags, uflags: at entry + 0
LEN_OP = struct.Struct("<I")
HDR_CMD_ID = struct.Struct("<H")
HDR_CMD_ID_OFF = 4
HDR_UFLAGS_OFF = 7

REQ = struct.Struct("<III4xQ")  # iov_cnt, iov_bidi_cnt, iov_dif_cnt, cdb_off: at entry + 8
REQ_OFF = 8
IOV = struct.Struct("<QQ")  # iov_base (offset from the map's start), iov_len: at entry + 48 + 16 i
IOV_OFF = 48
CMD_ENTRY_SIZE = 112  # sizeof(struct tcmu_cmd_entry): the response needs all of it

RSP_STATUS_OFF = 8  # u8
RSP_READ_LEN = struct.Struct("<I")
RSP_READ_LEN_OFF = 12
RSP_SENSE = struct.Struct(f"<{SENSE_BUFFERSIZE}s")  # pads with zeros, truncates
RSP_SENSE_OFF = 16

TMR_HEAD = struct.Struct("<B3xI")  # tmr_type, cmd_cnt: at entry + 8
TMR_HEAD_OFF = 8
TMR_ID = struct.Struct("<H")
TMR_IDS_OFF = 32

ALIGN = 8  # every entry length and position

#: CDB length by group code (the opcode's top three bits), SPC-4 4.2.5.1; group 3 is 0x7F's
#: variable length, groups 6 and 7 are vendor specific
_CDB_LENGTH = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}
VARIABLE_LENGTH_CDB = 0x7F
_UNKNOWN_CDB_LENGTH = 16


def _round8(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def entry_size(iov_cnt: int, cdb_len: int) -> int:
    """The size the kernel gives a command entry: room for the iovecs but never less than the
    response needs, then the CDB. With ``cdb_len`` 0 it is where the CDB starts, the smallest
    offset a CDB may have in an entry with that many iovecs."""
    return _round8(max(IOV_OFF + IOV.size * iov_cnt, CMD_ENTRY_SIZE) + _round8(cdb_len))


class RingError(Exception):
    """The mailbox is not one we speak, or the ring cannot be walked further; names the field."""


@dataclass(frozen=True)
class Command:
    """A SCSI command copied out of its entry. ``iovs`` are the data area ranges (offset from the
    map's start, length) of its Data-Out or Data-In; for a bidirectional command ``bidi_iovs`` are
    the Data-In ranges. ``entry_off`` is where its entry sits in the map (for logs and tests)."""

    cmd_id: int
    cdb: bytes
    iovs: list[tuple[int, int]]
    bidi_iovs: list[tuple[int, int]]
    entry_off: int


@dataclass(frozen=True)
class Tmr:
    """Task management the kernel tells us about: informational only, since the kernel still
    waits for a response to every command it names."""

    tmr_type: int
    cmd_ids: list[int]

    @property
    def name(self) -> str:
        return TMR_TYPES.get(self.tmr_type, f"TMR_{self.tmr_type}")


@dataclass(frozen=True)
class Malformed:
    """A command entry that cannot be trusted. It still holds a slot and a cmd_id the kernel
    waits on, so the caller completes it (CHECK CONDITION) like any command."""

    cmd_id: int
    reason: str


Entry = Command | Tmr | Malformed


@dataclass(frozen=True)
class _Response:
    status: int
    sense: bytes
    read_len: int | None


class Ring:
    """The userspace half of one device's ring. ``poll`` for new entries, ``complete`` each
    command (and ``Malformed``) exactly once, ``flush_completions`` to hand responses back."""

    def __init__(self, buf: memoryview | bytearray) -> None:
        view = memoryview(buf)
        if view.readonly:
            raise RingError("map: read-only, responses could not be written")
        self.buf = view.cast("B")
        size = len(self.buf)
        if size < MAILBOX_SIZE:
            raise RingError(f"map size {size}: smaller than the {MAILBOX_SIZE}-byte mailbox")
        version, self.flags, self.cmdr_off, self.cmdr_size, head = MAILBOX.unpack_from(self.buf, 0)
        if version != MAILBOX_VERSION:
            raise RingError(f"mailbox version {version}: only version {MAILBOX_VERSION} is spoken")
        if self.cmdr_off < MAILBOX_SIZE or self.cmdr_off % ALIGN:
            raise RingError(f"cmdr_off {self.cmdr_off}: inside the mailbox or not 8-byte aligned")
        if self.cmdr_size == 0 or self.cmdr_size % ALIGN:
            raise RingError(f"cmdr_size {self.cmdr_size}: zero or not 8-byte aligned")
        self.data_off = self.cmdr_off + self.cmdr_size
        if self.data_off > size:
            raise RingError(
                f"cmdr_off {self.cmdr_off} + cmdr_size {self.cmdr_size}: past the map ({size} bytes)"
            )
        self._check_position("cmd_head", head)
        self._tail = TAIL.unpack_from(self.buf, TAIL_OFF)[0]
        self._check_position("cmd_tail", self._tail)
        self.ooo = bool(self.flags & FLAG_CAP_OOOC)
        self._cursor = self._tail  # a restarted handler resumes where the last one answered
        self._unanswered: set[int] = set()  # polled, no complete() yet
        self._queued: dict[int, _Response] = {}  # completed, not yet in the ring; oldest first

    @property
    def outstanding(self) -> int:
        """Commands polled whose response is not in the ring yet."""
        return len(self._unanswered) + len(self._queued)

    def _check_position(self, field: str, pos: int) -> None:
        if pos >= self.cmdr_size or pos % ALIGN:
            raise RingError(f"{field} {pos}: outside a ring of {self.cmdr_size} bytes or not 8-byte aligned")

    # -- what the kernel queued -----------------------------------------------------------------

    def poll(self) -> list[Entry]:
        """Every entry between the private cursor and cmd_head, in ring order, copied out."""
        head = MAILBOX.unpack_from(self.buf, 0)[4]
        self._check_position("cmd_head", head)
        out: list[Entry] = []
        while self._cursor != head:
            pos = self._cursor
            off = self.cmdr_off + pos
            # an entry may neither run past the ring's end nor past what the kernel published
            room = min(self.cmdr_size - pos, (head - pos) % self.cmdr_size)
            len_op, cmd_id, _kflags, uflags = HDR.unpack_from(self.buf, off)
            op, length = len_op & OP_MASK, len_op & ~OP_MASK
            if op == OP_CMD and 0 < length <= room and length < CMD_ENTRY_SIZE:
                # too short to hold a response without overwriting the next entry: the kernel
                # fails an UNKNOWN_OP command itself
                self.buf[off + HDR_UFLAGS_OFF] = uflags | UFLAG_UNKNOWN_OP
            elif op == OP_CMD:
                entry, length = self._command(pos, off, cmd_id, length, room)
                self._unanswered.add(cmd_id)
                out.append(entry)
            else:
                if not 0 < length <= room:
                    raise RingError(f"entry at {pos} (opcode {op}): length {length} with {room} bytes left")
                if op == OP_TMR:
                    out.append(self._tmr(off, length))
                elif op != OP_PAD:
                    self.buf[off + HDR_UFLAGS_OFF] = uflags | UFLAG_UNKNOWN_OP
            self._cursor = (pos + length) % self.cmdr_size
        return out

    def _command(
        self, pos: int, off: int, cmd_id: int, length: int, room: int
    ) -> tuple[Command | Malformed, int]:
        """The command at ``off`` and the length to step over it."""
        if 0 < length <= room:
            return self._parse_command(off, cmd_id, length), length
        # The kernel puts the CDB right at the end of its entry, so the CDB tells the true
        # length. Written back into len_op, it keeps the kernel's completion walk in step.
        if room < CMD_ENTRY_SIZE:
            raise RingError(f"command at {pos}: length {length} with only {room} bytes left")
        _iov_cnt, _bidi_cnt, _dif_cnt, cdb_off = REQ.unpack_from(self.buf, off + REQ_OFF)
        cdb = self._cdb(cdb_off, off + CMD_ENTRY_SIZE, off + room)
        if isinstance(cdb, str):
            raise RingError(f"command at {pos}: length {length}, and its {cdb}")
        true_length = _round8(cdb_off + len(cdb) - off)
        LEN_OP.pack_into(self.buf, off, true_length | OP_CMD)
        reason = f"length {length}: zero or past the ring (sized {true_length} by its CDB)"
        return Malformed(cmd_id, reason), true_length

    def _parse_command(self, off: int, cmd_id: int, length: int) -> Command | Malformed:
        """Every range is checked before the command is handed out: a bad iovec must fail its
        command, not become a write into the ring or the mailbox (or a SIGBUS off the map)."""
        iov_cnt, bidi_cnt, dif_cnt, cdb_off = REQ.unpack_from(self.buf, off + REQ_OFF)
        n_iovs = iov_cnt + bidi_cnt + dif_cnt
        if IOV_OFF + IOV.size * n_iovs > length:
            return Malformed(cmd_id, f"{n_iovs} iovecs do not fit an entry of {length} bytes")
        cdb = self._cdb(cdb_off, off + entry_size(n_iovs, 0), off + length)
        if isinstance(cdb, str):
            return Malformed(cmd_id, cdb)
        iovs: list[tuple[int, int]] = []
        for i in range(iov_cnt + bidi_cnt):  # DIF iovecs: never asked for, the kernel sends none
            base, n = IOV.unpack_from(self.buf, off + IOV_OFF + IOV.size * i)
            if not self.data_off <= base <= base + n <= len(self.buf):
                return Malformed(cmd_id, f"iovec {i} ({base}+{n}) outside the data area")
            iovs.append((base, n))
        return Command(cmd_id, cdb, iovs[:iov_cnt], iovs[iov_cnt:], off)

    def _cdb(self, cdb_off: int, start: int, end: int) -> bytes | str:
        """The CDB at ``cdb_off`` if it lies within [start, end) of the map, else why not."""
        if not start <= cdb_off < end:
            return f"CDB offset {cdb_off} outside its entry ({start}..{end})"
        opcode = self.buf[cdb_off]
        if opcode == VARIABLE_LENGTH_CDB:
            if cdb_off + 8 > end:
                return f"variable-length CDB at {cdb_off}: its length byte is past the entry"
            cdb_len = 8 + self.buf[cdb_off + 7]
        else:
            # vendor-specific groups: the SCSI layer refuses the opcode, 16 bytes is plenty
            cdb_len = _CDB_LENGTH.get(opcode >> 5, min(_UNKNOWN_CDB_LENGTH, end - cdb_off))
        if cdb_off + cdb_len > end:
            return f"CDB of {cdb_len} bytes at {cdb_off} runs past its entry"
        return bytes(self.buf[cdb_off : cdb_off + cdb_len])

    def _tmr(self, off: int, length: int) -> Tmr:
        tmr_type, count = TMR_HEAD.unpack_from(self.buf, off + TMR_HEAD_OFF)
        count = min(count, max(0, (length - TMR_IDS_OFF) // TMR_ID.size))  # never read past the entry
        ids = [TMR_ID.unpack_from(self.buf, off + TMR_IDS_OFF + TMR_ID.size * i)[0] for i in range(count)]
        return Tmr(tmr_type, ids)

    def iov_view(self, offset: int, length: int) -> memoryview:
        """A window on the data area, for reading Data-Out and writing Data-In in place (preadv
        and pwritev straight into the map). Anything outside the data area is refused: the ring
        and mailbox are not data, and a stray offset must not become a stray write."""
        if length < 0 or not self.data_off <= offset <= offset + length <= len(self.buf):
            raise ValueError(f"data range {offset}+{length} outside the data area")
        return self.buf[offset : offset + length]

    # -- our answers --------------------------------------------------------------------------

    def complete(self, cmd_id: int, status: int, sense: bytes = b"", read_len: int | None = None) -> None:
        """Queue the response to a polled command; ``flush_completions`` writes it once a slot
        is free for it. Checked here, because a response to a command the kernel does not have
        in flight would break the kernel's ring, and a bad value must not fail halfway through
        writing a slot. Sense longer than the kernel's buffer is cut."""
        if cmd_id not in self._unanswered:
            raise ValueError(f"cmd_id {cmd_id}: not a polled command awaiting its response")
        if not 0 <= status <= 0xFF:
            raise ValueError(f"status {status}: not a SCSI status byte")
        if read_len is not None and not 0 <= read_len <= 0xFFFFFFFF:
            raise ValueError(f"read_len {read_len}: not a 32-bit length")
        self._unanswered.remove(cmd_id)
        self._queued[cmd_id] = _Response(status, bytes(sense[:SENSE_BUFFERSIZE]), read_len)

    def flush_completions(self) -> bool:
        """Write queued responses at cmd_tail and advance it over them (and over PAD, TMR and
        unknown entries, which need no response). Returns whether cmd_tail moved: then the caller
        tells the kernel (a 4-byte write to the uio device)."""
        tail = self._tail
        while tail != self._cursor:
            off = self.cmdr_off + tail
            len_op, slot_id, _kflags, uflags = HDR.unpack_from(self.buf, off)
            if len_op & OP_MASK == OP_CMD and not uflags & UFLAG_UNKNOWN_OP:
                if self.ooo:
                    cmd_id = next(iter(self._queued), None)
                else:
                    cmd_id = slot_id if slot_id in self._queued else None
                if cmd_id is None:
                    break
                self._respond(off, cmd_id, self._queued.pop(cmd_id))
            tail = (tail + (len_op & ~OP_MASK)) % self.cmdr_size
        if tail == self._tail:
            return False
        self._tail = tail
        TAIL.pack_into(self.buf, TAIL_OFF, tail)  # last: the responses before it are complete
        return True

    def _respond(self, off: int, cmd_id: int, rsp: _Response) -> None:
        HDR_CMD_ID.pack_into(self.buf, off + HDR_CMD_ID_OFF, cmd_id)
        self.buf[off + RSP_STATUS_OFF] = rsp.status
        if rsp.read_len is not None:
            # a kernel without CAP_READ_LEN ignores the flag; the field was padding there
            self.buf[off + HDR_UFLAGS_OFF] |= UFLAG_READ_LEN
            RSP_READ_LEN.pack_into(self.buf, off + RSP_READ_LEN_OFF, rsp.read_len)
        RSP_SENSE.pack_into(self.buf, off + RSP_SENSE_OFF, rsp.sense)
