"""The one entry point both frontends call: ``execute(lun, cdb, data_out, nexus) -> Result``.

Opcodes map to handlers in one table; a handler returns data-in (or None) or raises a reason.
Errors become sense data here and nowhere else. Transports ask ``data_out_length`` how much
data a command carries before they solicit it.

A transport that receives a WRITE(10/12/16)'s data-out in pieces (the embedded portal) may hand
it over as it comes instead of gathering it whole: ``WriteStream`` runs the command's checks once,
when it is made (parse, then execute: LBA range, transfer length, unit attention, reservation,
write protection), then writes each piece through the store's ordinary write path, which keeps
the store's rule that a unit the guest wrote is never written by a fetch. A command that fails
its checks writes nothing. One whose store write fails part-way (or whose later data-out fails
its digest or sequence check in the transport) ends with CHECK CONDITION and leaves the blocks
of its range indeterminate: some pieces may have been written, others not, as SBC allows
for a WRITE that ends with an error. Only the plain WRITEs stream: COMPARE AND WRITE, WRITE
SAME, WRITE AND VERIFY and the parameter lists (MODE SELECT, PERSISTENT RESERVE OUT, UNMAP) are
judged whole, so they are still gathered.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

import structlog

from lazyiscsi.scsi import sbc, spc
from lazyiscsi.scsi.cdb import (
    LAYOUTS,
    READ_FIELDS,
    MaintenanceIn,
    Op,
    ServiceActionIn,
    check_length,
    parse_block,
    parse_read,
)
from lazyiscsi.scsi.lun import MAX_TRANSFER_BYTES, Lun
from lazyiscsi.scsi.reservations import Conflict, PrIn, PrOut
from lazyiscsi.scsi.sense import (
    Reason,
    SenseError,
    Status,
    fixed_sense,
    invalid_cdb,
    reason_for_store_error,
)
from lazyiscsi.store.errors import StoreError

log = structlog.get_logger("lazyiscsi.scsi")


@dataclass(slots=True)
class Result:
    status: Status
    #: a memoryview only when it is the caller's own ``data_in_buffer``, already filled
    data_in: bytes | bytearray | memoryview | None = None
    sense: bytes | None = None


Handler = Callable[[Lun, bytes, memoryview | None, str], "bytes | bytearray | None"]


#: opcode byte -> Op, a dict lookup where ``Op(byte)`` is an Enum call (a few us, per command)
_OPS: dict[int, Op] = {int(op): op for op in Op}


def _block(lun: Lun, cdb: bytes, data: memoryview | None, nexus: str, *,
           into: memoryview | None = None) -> bytes | bytearray | memoryview | None:
    if cdb[0] in READ_FIELDS:  # the common case, decoded by one unpack (cdb.READ_FIELDS)
        lba, blocks = parse_read(cdb, lun.n_blocks, lun.max_transfer_blocks)
        size = lun.block_size
        if into is not None and len(into) >= blocks * size:
            into = into[:blocks * size]
            lun.backend.readinto(lba * size, into)
            return into
        return lun.backend.read(lba * size, blocks * size)
    op = _OPS[cdb[0]]
    cmd = parse_block(cdb, op, lun.n_blocks, lun.max_write_same_blocks
                      if LAYOUTS[op][1] == "write_same" else lun.max_transfer_blocks)
    kind = cmd.kind
    want = data_out_length(cdb, lun.block_size)
    got = len(data) if data is not None else 0
    if kind == "write":
        # the initiator may send more than the CDB describes (only that much is written) or less
        # (the whole blocks that came are written, as LIO does); the transport reports residuals
        if got < want:
            cmd = replace(cmd, blocks=got // lun.block_size)
    elif want and got != want:
        raise invalid_cdb(LAYOUTS[op][0].blocks[0])  # compare and pattern data must be exact
    if kind == "write":
        if cmd.blocks:
            assert data is not None
            sbc.write(lun, cmd, data[:cmd.blocks * lun.block_size])
    elif kind == "verify":
        sbc.verify(lun, cmd, data)
    elif kind == "sync":
        sbc.sync(lun, cmd)
    elif kind == "prefetch":
        sbc.prefetch(lun, cmd)
    else:
        sbc.write_same(lun, cmd, data)
    return None


def _service_action_in(lun: Lun, cdb: bytes, data: memoryview | None, nexus: str) -> bytes:
    action = cdb[1] & 0x1F
    if action == ServiceActionIn.READ_CAPACITY_16:
        return sbc.read_capacity_16(lun, cdb)
    if action == ServiceActionIn.GET_LBA_STATUS:
        return sbc.get_lba_status(lun, cdb)
    raise invalid_cdb(1, 4)


def _start_stop(lun: Lun, cdb: bytes, data: memoryview | None, nexus: str) -> None:
    """Accepted without effect: the medium is always there and cannot be ejected; LOEJ on a
    non-removable medium is refused (SBC-4 5.25)."""
    if cdb[4] & 0x02:
        raise invalid_cdb(4, 1)
    return None


def _prevent_allow(lun: Lun, cdb: bytes, data: memoryview | None, nexus: str) -> None:
    """Nothing to lock on a non-removable medium; PREVENT is accepted (SBC-4 5.13 lets a device
    without removable media ignore it)."""
    return None


def _reserve(lun: Lun, cdb: bytes, data: memoryview | None, nexus: str) -> None:
    """RESERVE(6/10) of the whole LUN; third-party and extent reservations are obsolete."""
    if cdb[1] & (0x01 if cdb[0] == Op.RESERVE_6 else 0x12):
        raise invalid_cdb(1)
    lun.reservations.reserve(nexus)


def _maintenance_in(lun: Lun, cdb: bytes, data: memoryview | None, nexus: str) -> bytes:
    if cdb[1] & 0x1F != MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES:
        raise invalid_cdb(1, 4)
    return spc.report_supported_opcodes(cdb, SUPPORTED)


def _persistent_in(lun: Lun, cdb: bytes, data: memoryview | None, nexus: str) -> bytes:
    return spc.truncate(lun.reservations.persistent_in(cdb), struct.unpack_from(">H", cdb, 7)[0])


def _persistent_out(lun: Lun, cdb: bytes, data: memoryview | None, nexus: str) -> None:
    lun.reservations.persistent_out(cdb, data, nexus, lun.unit_attentions)


HANDLERS: dict[Op, Handler] = {
    Op.TEST_UNIT_READY: lambda lun, cdb, data, nexus: None,
    Op.INQUIRY: lambda lun, cdb, data, nexus: spc.inquiry(lun, cdb),
    Op.REQUEST_SENSE: lambda lun, cdb, data, nexus: spc.request_sense(lun, cdb, nexus),
    Op.MODE_SENSE_6: lambda lun, cdb, data, nexus: spc.mode_sense(lun, cdb, ten=False),
    Op.MODE_SENSE_10: lambda lun, cdb, data, nexus: spc.mode_sense(lun, cdb, ten=True),
    Op.REPORT_LUNS: lambda lun, cdb, data, nexus: spc.report_luns(lun.target_luns, cdb),
    Op.READ_CAPACITY_10: lambda lun, cdb, data, nexus: sbc.read_capacity_10(lun),
    Op.SERVICE_ACTION_IN_16: _service_action_in,
    Op.MODE_SELECT_6: lambda lun, cdb, data, nexus: spc.mode_select(lun, cdb, data, ten=False),
    Op.MODE_SELECT_10: lambda lun, cdb, data, nexus: spc.mode_select(lun, cdb, data, ten=True),
    Op.UNMAP: lambda lun, cdb, data, nexus: sbc.unmap(lun, cdb, data),
    Op.COMPARE_AND_WRITE: lambda lun, cdb, data, nexus: sbc.compare_and_write(lun, cdb, data),
    Op.START_STOP_UNIT: _start_stop,
    Op.PREVENT_ALLOW_MEDIUM_REMOVAL: _prevent_allow,
    Op.RESERVE_6: _reserve,
    Op.RESERVE_10: _reserve,
    Op.RELEASE_6: lambda lun, cdb, data, nexus: lun.reservations.release(nexus),
    Op.RELEASE_10: lambda lun, cdb, data, nexus: lun.reservations.release(nexus),
    Op.PERSISTENT_RESERVE_IN: _persistent_in,
    Op.PERSISTENT_RESERVE_OUT: _persistent_out,
    Op.MAINTENANCE_IN: _maintenance_in,
    **dict.fromkeys(LAYOUTS, _block),
}

#: the service actions each multiplexed opcode runs
SERVICE_ACTIONS: dict[Op, tuple[int, ...]] = {
    Op.SERVICE_ACTION_IN_16: tuple(ServiceActionIn),
    Op.MAINTENANCE_IN: tuple(MaintenanceIn),
    Op.PERSISTENT_RESERVE_IN: tuple(PrIn),
    Op.PERSISTENT_RESERVE_OUT: tuple(PrOut),
}

#: opcode byte -> (Op, its handler): what ``_admit`` finds for every command in one lookup
_RUNS: dict[int, tuple[Op, Handler]] = {int(op): (op, handler) for op, handler in HANDLERS.items()}

#: (opcode, service action or None) for REPORT SUPPORTED OPERATION CODES
SUPPORTED: list[tuple[int, int | None]] = sorted(
    [(int(op), None) for op in HANDLERS if op not in SERVICE_ACTIONS]
    + [(int(op), int(sa)) for op, actions in SERVICE_ACTIONS.items() for sa in actions],
    key=lambda c: (c[0], c[1] or 0))

#: commands that run even with a unit attention pending (SAM-5 5.14, SPC-4 6.6/6.33/6.39)
_UA_EXEMPT = frozenset({Op.INQUIRY, Op.REPORT_LUNS, Op.REQUEST_SENSE})
#: commands that change the medium: refused with DATA PROTECT while the backend is not
#: writable (a live volume before its cutover, issue 11). SYNCHRONIZE CACHE is not among them:
#: with nothing written there is nothing to flush, and initiators flush at close.
WRITE_OPS = frozenset({Op.WRITE_6, Op.WRITE_10, Op.WRITE_12, Op.WRITE_16, Op.WRITE_AND_VERIFY_10,
                       Op.WRITE_AND_VERIFY_12, Op.WRITE_AND_VERIFY_16, Op.WRITE_SAME_10,
                       Op.WRITE_SAME_16, Op.UNMAP, Op.COMPARE_AND_WRITE})


def data_out_length(cdb: bytes, block_size: int) -> int:
    """Bytes of data-out the command carries, from its CDB alone (0 if none or malformed:
    the command will then fail in ``execute`` with the right sense)."""
    try:
        op = _OPS[cdb[0]]
        check_length(cdb)
    except (KeyError, IndexError, SenseError):
        return 0
    length = _data_out_length(op, cdb, block_size)
    # more than any command takes: solicit nothing, and let the command fail on its CDB
    return length if length <= MAX_TRANSFER_BYTES else 0


def _data_out_length(op: Op, cdb: bytes, block_size: int) -> int:
    if op in (Op.UNMAP, Op.MODE_SELECT_10):
        return struct.unpack_from(">H", cdb, 7)[0]
    if op is Op.PERSISTENT_RESERVE_OUT:
        return struct.unpack_from(">I", cdb, 5)[0]
    if op is Op.MODE_SELECT_6:
        return cdb[4]
    if op is Op.COMPARE_AND_WRITE:
        return 2 * cdb[13] * block_size
    row = LAYOUTS.get(op)
    if row is None:
        return 0
    layout, kind = row
    off, size = layout.blocks
    blocks = int.from_bytes(cdb[off:off + size], "big") or (256 if layout.zero_is_256 else 0)
    if kind == "write":
        return blocks * block_size
    if kind == "verify":
        return blocks * block_size if cdb[1] & 0x06 else 0
    if kind == "write_same":
        return 0 if op is Op.WRITE_SAME_16 and cdb[1] & 0x01 else block_size
    return 0


#: block commands that only read the medium: a store error there is reported as a read's
_READING_KINDS = frozenset({"read", "verify", "prefetch"})


def _writes(cdb: bytes) -> bool:
    """Whether a command changes the medium (WRITE, WRITE SAME, UNMAP, COMPARE AND WRITE,
    SYNCHRONIZE CACHE...), which picks the column of ``STORE_ERRORS``."""
    row = LAYOUTS.get(Op(cdb[0]))
    return row is None or row[1] not in _READING_KINDS


def execute_no_lun(cdb: bytes, target_luns: list[int]) -> Result:
    """A command addressed to a LUN the target does not have (SPC-4 4.6.4): REPORT LUNS still
    answers, INQUIRY says no device is connected (qualifier 011b, type 1Fh), all else fails."""
    try:
        if cdb and cdb[0] == Op.REPORT_LUNS:
            check_length(cdb)
            return Result(Status.GOOD, spc.report_luns(target_luns, cdb))
        if cdb and cdb[0] == Op.INQUIRY:
            check_length(cdb)
            return Result(Status.GOOD, spc.inquiry_no_lun(cdb))
    except SenseError as e:
        return Result(Status.CHECK_CONDITION, sense=fixed_sense(e.reason, field=e.field, info=e.info))
    return Result(Status.CHECK_CONDITION, sense=fixed_sense(Reason.LUN_NOT_SUPPORTED))


def _admit(lun: Lun, cdb: bytes, nexus: str) -> tuple[Op, Handler]:
    """The checks every command passes before it runs, in SAM-5's order: a known opcode of the
    right CDB length, a pending unit attention, a reservation conflict, write protection."""
    if not cdb:
        raise SenseError(Reason.INVALID_OPCODE)
    known = _RUNS.get(cdb[0])
    if known is None:
        raise SenseError(Reason.INVALID_OPCODE)
    op, handler = known
    check_length(cdb)
    writable = lun.note_writable(nexus)
    pending = lun.unit_attentions.get(nexus)
    if pending and op not in _UA_EXEMPT:
        raise SenseError(pending.pop(0))
    lun.reservations.check(op, cdb, nexus)  # type: ignore[arg-type]
    if not writable and op in WRITE_OPS:
        raise SenseError(Reason.WRITE_PROTECTED)
    return op, handler


def execute(lun: Lun, cdb: bytes, data_out: bytes | bytearray | memoryview | None, nexus: str, *,
            data_in_buffer: memoryview | None = None) -> Result:
    """Run one command to completion (it may block on the store) and say how it ended. A READ
    fills ``data_in_buffer`` in place when it is given and large enough (TCMU's mapped data area:
    the store reads straight into the kernel's pages), and returns it as the data-in."""
    try:
        _op, handler = _admit(lun, cdb, nexus)
        data = memoryview(data_out) if data_out is not None else None
        if handler is _block and data_in_buffer is not None:
            return Result(Status.GOOD, _block(lun, cdb, data, nexus, into=data_in_buffer))
        return Result(Status.GOOD, handler(lun, cdb, data, nexus))
    except Exception as e:  # every failure becomes a status: _failure
        return _failure(lun, cdb, e)


def _failure(lun: Lun, cdb: bytes, error: Exception) -> Result:
    """How a command that raised ``error`` ends: the one place errors become status and sense."""
    if isinstance(error, Conflict):
        return Result(Status.RESERVATION_CONFLICT)
    if isinstance(error, SenseError):
        sense = fixed_sense(error.reason, field=error.field, info=error.info)
        return Result(Status.CHECK_CONDITION, sense=sense)
    if isinstance(error, StoreError):
        reason = reason_for_store_error(error, writing=_writes(cdb))
        log.warning("scsi_command_failed", lun=lun.name, opcode=f"{cdb[0]:#04x}", reason=reason.value,
                    error=str(error))
        return Result(Status.CHECK_CONDITION, sense=fixed_sense(reason))
    # a lazyiscsi bug: the initiator still gets an answer, the log the details
    log.error("scsi_internal_error", lun=lun.name, cdb=cdb.hex(), exc_info=error)
    return Result(Status.CHECK_CONDITION, sense=fixed_sense(Reason.INTERNAL_ERROR))


#: the commands whose data-out a transport may hand over piece by piece (``WriteStream``): the
#: plain WRITEs of a transport that carries large transfers (WRITE(6) moves at most 256 blocks)
STREAMED_WRITES = frozenset({int(Op.WRITE_10), int(Op.WRITE_12), int(Op.WRITE_16)})


def write_start(cdb: bytes, block_size: int) -> int | None:
    """Where on the LUN (in bytes) a streamable WRITE's data begins, from its CDB alone (its LBA
    is checked later, by ``WriteStream``); None for every command whose data-out is gathered."""
    if not cdb or cdb[0] not in STREAMED_WRITES:
        return None
    try:
        check_length(cdb)
    except SenseError:
        return None
    off, size = LAYOUTS[_OPS[cdb[0]]][0].lba
    return int.from_bytes(cdb[off:off + size], "big") * block_size


class WriteStream:
    """One WRITE(10/12/16) whose ``length`` bytes of data-out come in pieces (module docstring).

    The checks run here, once, before any piece; ``write(offset, data)`` puts one piece (at
    ``offset`` in the data-out) through the store's write path, and ``finish()`` says how the
    command ended, after a flush where the data must be durable before GOOD (FUA, or the write
    cache off: SBC-4 4.15). After the first failure nothing more is written: the failure is the
    command's status. May block on the store; never raises."""

    def __init__(self, lun: Lun, cdb: bytes, nexus: str, length: int) -> None:
        self.lun, self.cdb = lun, cdb
        #: set once the command has failed (its checks, or a store write): its final status
        self.failed: Result | None = None
        self._start = self._end = 0
        self._fua = False
        try:
            op, _handler = _admit(lun, cdb, nexus)
            if op.value not in STREAMED_WRITES:
                raise ValueError(f"opcode {cdb[0]:#04x} does not stream")
            cmd = parse_block(cdb, op, lun.n_blocks, lun.max_transfer_blocks)
            # the whole blocks of what the initiator sends are written (as ``_block`` does)
            blocks = min(cmd.blocks, length // lun.block_size)
            self._start = cmd.lba * lun.block_size
            self._end = self._start + blocks * lun.block_size
            self._fua = cmd.fua or not lun.write_cache
        except Exception as e:  # every failure becomes a status: _failure
            self.failed = _failure(lun, cdb, e)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.failed is not None:
            return
        pos = self._start + offset
        n = min(len(data), self._end - pos)
        if n <= 0:
            return
        try:
            self.lun.backend.write(pos, memoryview(data)[:n] if n < len(data) else data)
        except Exception as e:
            self.failed = _failure(self.lun, self.cdb, e)

    def finish(self) -> Result:
        if self.failed is not None:
            return self.failed
        try:
            if self._fua and self._end > self._start:
                self.lun.backend.flush()
        except Exception as e:
            return _failure(self.lun, self.cdb, e)
        return Result(Status.GOOD)
