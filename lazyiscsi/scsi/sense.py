"""Why a command failed, and the one table that turns each reason into SCSI sense data.

Lower layers raise typed reasons (``SenseError(Reason.X)``, or the store's exceptions, mapped
in ``STORE_ERRORS``); nothing else in lazyiscsi spells a sense key or an ASC.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from lazyiscsi.store.errors import (
    CacheFull,
    CacheIOError,
    CacheReadError,
    OutOfRange,
    SourceChangedError,
    SourceIOError,
    SourceUnreachable,
    StoreError,
    WriteProtected,
)


class Status(enum.IntEnum):
    """SAM-5 status codes."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28


class SenseKey(enum.IntEnum):
    NO_SENSE = 0x0
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB
    MISCOMPARE = 0xE


class Reason(enum.Enum):
    NO_SENSE = "no sense"
    INVALID_OPCODE = "invalid command operation code"
    INVALID_FIELD_IN_CDB = "invalid field in CDB"
    INVALID_FIELD_IN_PARAMETER_LIST = "invalid field in parameter list"
    PARAMETER_LIST_LENGTH_ERROR = "parameter list length error"
    LBA_OUT_OF_RANGE = "logical block address out of range"
    LUN_NOT_SUPPORTED = "logical unit not supported"
    SAVING_PARAMETERS_NOT_SUPPORTED = "saving parameters not supported"
    UNRECOVERED_READ_ERROR = "unrecovered read error"
    WRITE_ERROR = "write error"
    SPACE_ALLOCATION_FAILED = "space allocation failed write protect"
    WRITE_PROTECTED = "write protected"
    CACHE_WRITE_FAULT = "peripheral device write fault"
    SOURCE_UNREACHABLE = "source site not answering"
    SOURCE_CHANGED = "source changed: data not yet local is lost"
    MISCOMPARE_DURING_VERIFY = "miscompare during verify operation"
    POWER_ON_OR_RESET = "power on, reset, or bus device reset occurred"
    MODE_PARAMETERS_CHANGED = "mode parameters changed"
    CAPACITY_CHANGED = "capacity data has changed"
    RESERVATIONS_PREEMPTED = "reservations preempted"
    RESERVATIONS_RELEASED = "reservations released"
    REGISTRATIONS_PREEMPTED = "registrations preempted"
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION = "invalid release of persistent reservation"
    DATA_PHASE_ERROR = "data phase error"
    PROTOCOL_SERVICE_CRC_ERROR = "protocol service CRC error"
    INTERNAL_ERROR = "internal target failure"


#: Reason -> (sense key, ASC, ASCQ). SPC-4 Table D.1 spells every ASC/ASCQ.
SENSE_TABLE: dict[Reason, tuple[SenseKey, int, int]] = {
    Reason.NO_SENSE: (SenseKey.NO_SENSE, 0x00, 0x00),  # NO ADDITIONAL SENSE INFORMATION
    Reason.INVALID_OPCODE: (SenseKey.ILLEGAL_REQUEST, 0x20, 0x00),  # INVALID COMMAND OPERATION CODE
    Reason.INVALID_FIELD_IN_CDB: (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00),  # INVALID FIELD IN CDB
    # INVALID FIELD IN PARAMETER LIST
    Reason.INVALID_FIELD_IN_PARAMETER_LIST: (SenseKey.ILLEGAL_REQUEST, 0x26, 0x00),
    Reason.PARAMETER_LIST_LENGTH_ERROR: (SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00),  # PARAMETER LIST LENGTH ERROR
    Reason.LBA_OUT_OF_RANGE: (SenseKey.ILLEGAL_REQUEST, 0x21, 0x00),  # LOGICAL BLOCK ADDRESS OUT OF RANGE
    Reason.LUN_NOT_SUPPORTED: (SenseKey.ILLEGAL_REQUEST, 0x25, 0x00),  # LOGICAL UNIT NOT SUPPORTED
    # SAVING PARAMETERS NOT SUPPORTED
    Reason.SAVING_PARAMETERS_NOT_SUPPORTED: (SenseKey.ILLEGAL_REQUEST, 0x39, 0x00),
    Reason.UNRECOVERED_READ_ERROR: (SenseKey.MEDIUM_ERROR, 0x11, 0x00),  # UNRECOVERED READ ERROR
    Reason.WRITE_ERROR: (SenseKey.MEDIUM_ERROR, 0x0C, 0x00),  # WRITE ERROR
    # The cache's filesystem is full: SPACE ALLOCATION FAILED WRITE PROTECT, the thin-provisioning
    # resource-exhaustion answer to a write (SBC-4 4.7.3.7); the initiator's write fails, reads go on.
    Reason.SPACE_ALLOCATION_FAILED: (SenseKey.DATA_PROTECT, 0x27, 0x07),
    # A live volume before its cutover (issue 11): DATA PROTECT, WRITE PROTECTED (27h/00h,
    # SPC-4 Table D.1). The WP bit of MODE SENSE stays clear: QEMU's iSCSI driver
    # refuses to open a LUN that sets it, and the destination VM must open it before cutover.
    Reason.WRITE_PROTECTED: (SenseKey.DATA_PROTECT, 0x27, 0x00),
    # A read whose data came from the source but could not be stored in the cache (full or
    # failed): PERIPHERAL DEVICE WRITE FAULT, the target's own medium, not the source's fault.
    Reason.CACHE_WRITE_FAULT: (SenseKey.HARDWARE_ERROR, 0x03, 0x00),
    # The source did not answer within the I/O timeout: NOT READY, LOGICAL UNIT NOT READY, CAUSE
    # NOT REPORTABLE. Initiators retry NOT READY (the source may come back); a MEDIUM ERROR would
    # be taken for a bad sector and surface as an I/O error at once.
    Reason.SOURCE_UNREACHABLE: (SenseKey.NOT_READY, 0x04, 0x00),
    # The source is no longer the disk the cache was filled from: the blocks not yet local are
    # lost for good, the local ones are fine. MEDIUM ERROR, UNRECOVERED READ ERROR says exactly
    # that of each block read (SPC-4 4.5.6: "an error in the recorded data"), and initiators
    # fail it at once without retrying or failing the path over (Linux: ASC 11h is not retried).
    # Not NOT READY (retried as if it could pass), not MEDIUM NOT PRESENT (3Ah: the whole LUN
    # would be taken away, its good blocks with it), not a UNIT ATTENTION (a one-time notice
    # that the initiator clears and retries through).
    Reason.SOURCE_CHANGED: (SenseKey.MEDIUM_ERROR, 0x11, 0x00),
    Reason.MISCOMPARE_DURING_VERIFY: (SenseKey.MISCOMPARE, 0x1D, 0x00),  # MISCOMPARE DURING VERIFY OPERATION
    # POWER ON, RESET, OR BUS DEVICE RESET OCCURRED
    Reason.POWER_ON_OR_RESET: (SenseKey.UNIT_ATTENTION, 0x29, 0x00),
    Reason.MODE_PARAMETERS_CHANGED: (SenseKey.UNIT_ATTENTION, 0x2A, 0x01),  # MODE PARAMETERS CHANGED
    Reason.CAPACITY_CHANGED: (SenseKey.UNIT_ATTENTION, 0x2A, 0x09),  # CAPACITY DATA HAS CHANGED
    Reason.RESERVATIONS_PREEMPTED: (SenseKey.UNIT_ATTENTION, 0x2A, 0x03),  # RESERVATIONS PREEMPTED
    Reason.RESERVATIONS_RELEASED: (SenseKey.UNIT_ATTENTION, 0x2A, 0x04),  # RESERVATIONS RELEASED
    Reason.REGISTRATIONS_PREEMPTED: (SenseKey.UNIT_ATTENTION, 0x2A, 0x05),  # REGISTRATIONS PREEMPTED
    # INVALID RELEASE OF PERSISTENT RESERVATION
    Reason.INVALID_RELEASE_OF_PERSISTENT_RESERVATION: (SenseKey.ILLEGAL_REQUEST, 0x26, 0x04),
    # the transport lost or reordered data-out: ABORTED COMMAND, which initiators retry
    Reason.DATA_PHASE_ERROR: (SenseKey.ABORTED_COMMAND, 0x4B, 0x00),
    # the transport's data digest failed (the iSCSI condition of RFC 7143 11.4.7.2): ABORTED
    # COMMAND, PROTOCOL SERVICE CRC ERROR
    Reason.PROTOCOL_SERVICE_CRC_ERROR: (SenseKey.ABORTED_COMMAND, 0x47, 0x05),
    Reason.INTERNAL_ERROR: (SenseKey.HARDWARE_ERROR, 0x44, 0x00),  # INTERNAL TARGET FAILURE
}


@dataclass(frozen=True)
class FieldPointer:
    """Sense-key specific field pointer (SPC-4 4.5.2.4.2): which byte (and bit) was wrong."""

    byte: int
    bit: int | None = None
    in_cdb: bool = True


class SenseError(Exception):
    """A command ends in CHECK CONDITION for ``reason``."""

    def __init__(self, reason: Reason, *, field: FieldPointer | None = None, info: int | None = None,
                 detail: str = "") -> None:
        super().__init__(detail or reason.value)
        self.reason = reason
        self.field = field
        self.info = info


def invalid_cdb(byte: int, bit: int | None = None) -> SenseError:
    return SenseError(Reason.INVALID_FIELD_IN_CDB, field=FieldPointer(byte, bit))


def invalid_param(byte: int, bit: int | None = None) -> SenseError:
    return SenseError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=FieldPointer(byte, bit, in_cdb=False))


#: The store's failures, mapped once: (error, reason for a command that reads, reason for one
#: that writes), most specific class first. A source that does not answer is NOT READY whatever
#: the protocol (an initiator retries it; NBD, HTTP and file say the same); a source that
#: answered with an error, after retries, is a MEDIUM ERROR; a cache that cannot take data is
#: the target's own fault, never reported as the source's.
STORE_ERRORS: tuple[tuple[type[StoreError], Reason, Reason], ...] = (
    (OutOfRange, Reason.LBA_OUT_OF_RANGE, Reason.LBA_OUT_OF_RANGE),
    (WriteProtected, Reason.WRITE_PROTECTED, Reason.WRITE_PROTECTED),
    (SourceUnreachable, Reason.SOURCE_UNREACHABLE, Reason.SOURCE_UNREACHABLE),
    (SourceChangedError, Reason.SOURCE_CHANGED, Reason.SOURCE_CHANGED),
    (SourceIOError, Reason.UNRECOVERED_READ_ERROR, Reason.UNRECOVERED_READ_ERROR),
    (CacheFull, Reason.CACHE_WRITE_FAULT, Reason.SPACE_ALLOCATION_FAILED),
    (CacheReadError, Reason.UNRECOVERED_READ_ERROR, Reason.UNRECOVERED_READ_ERROR),
    (CacheIOError, Reason.CACHE_WRITE_FAULT, Reason.WRITE_ERROR),
    (StoreError, Reason.UNRECOVERED_READ_ERROR, Reason.WRITE_ERROR),
)


def reason_for_store_error(error: StoreError, *, writing: bool) -> Reason:
    for cls, on_read, on_write in STORE_ERRORS:
        if isinstance(error, cls):
            return on_write if writing else on_read
    raise AssertionError("StoreError is the last row")


def fixed_sense(reason: Reason, *, field: FieldPointer | None = None, info: int | None = None) -> bytes:
    """Fixed-format sense data, response code 0x70 (SPC-4 4.5.3)."""
    key, asc, ascq = SENSE_TABLE[reason]
    sense = bytearray(18)
    sense[0] = 0x70 | (0x80 if info is not None else 0)  # VALID: INFORMATION is meaningful
    sense[2] = key
    if info is not None:
        struct.pack_into(">I", sense, 3, info & 0xFFFFFFFF)
    sense[7] = 10  # additional sense length
    sense[12], sense[13] = asc, ascq
    if field is not None:
        sksv = 0x80 | (0x40 if field.in_cdb else 0)
        if field.bit is not None:
            sksv |= 0x08 | field.bit  # BPV: the bit pointer is valid
        sense[15] = sksv
        struct.pack_into(">H", sense, 16, field.byte)
    return bytes(sense)
