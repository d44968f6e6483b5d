"""CDB decoding: bytes in, a frozen ``Command`` out, or ``SenseError``. Parse, then execute
(as LIO's ``sbc_parse_cdb``): every range and field check happens here, once, before any I/O.

The block commands come in 6/10/12/16-byte forms that differ only in where the fields sit,
so each form is a row of ``LAYOUTS``, not a branch of code (SBC-4 5.x tables).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

from lazyiscsi.scsi.sense import Reason, SenseError, invalid_cdb


class Op(enum.IntEnum):
    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    RESERVE_6 = 0x16
    RELEASE_6 = 0x17
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    WRITE_AND_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    PRE_FETCH_10 = 0x34
    SYNCHRONIZE_CACHE_10 = 0x35
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    MODE_SELECT_10 = 0x55
    RESERVE_10 = 0x56
    RELEASE_10 = 0x57
    MODE_SENSE_10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    PRE_FETCH_16 = 0x90
    WRITE_16 = 0x8A
    WRITE_AND_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    MAINTENANCE_IN = 0xA3
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    WRITE_AND_VERIFY_12 = 0xAE
    VERIFY_12 = 0xAF


class ServiceActionIn(enum.IntEnum):
    READ_CAPACITY_16 = 0x10
    GET_LBA_STATUS = 0x12


class MaintenanceIn(enum.IntEnum):
    REPORT_SUPPORTED_OPERATION_CODES = 0x0C


CDB_LENGTH_BY_GROUP = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}


@dataclass(frozen=True)
class Layout:
    """Where a block command keeps its fields: LBA (offset, size), transfer length (offset,
    size), and whether a length of 0 means 256 (the 6-byte forms, SBC-4 5.14)."""

    lba: tuple[int, int]
    blocks: tuple[int, int]
    zero_is_256: bool = False


_L6 = Layout((1, 3), (4, 1), zero_is_256=True)
_L10 = Layout((2, 4), (7, 2))
_L12 = Layout((2, 4), (6, 4))
_L16 = Layout((2, 8), (10, 4))

#: block commands by opcode: their layout and their kind (what the executor does)
LAYOUTS: dict[Op, tuple[Layout, str]] = {
    Op.READ_6: (_L6, "read"), Op.READ_10: (_L10, "read"), Op.READ_12: (_L12, "read"),
    Op.READ_16: (_L16, "read"),
    Op.WRITE_6: (_L6, "write"), Op.WRITE_10: (_L10, "write"), Op.WRITE_12: (_L12, "write"),
    Op.WRITE_16: (_L16, "write"),
    Op.VERIFY_10: (_L10, "verify"), Op.VERIFY_12: (_L12, "verify"), Op.VERIFY_16: (_L16, "verify"),
    Op.WRITE_AND_VERIFY_10: (_L10, "write"), Op.WRITE_AND_VERIFY_12: (_L12, "write"),
    Op.WRITE_AND_VERIFY_16: (_L16, "write"),
    Op.SYNCHRONIZE_CACHE_10: (_L10, "sync"), Op.SYNCHRONIZE_CACHE_16: (_L16, "sync"),
    Op.WRITE_SAME_10: (_L10, "write_same"), Op.WRITE_SAME_16: (_L16, "write_same"),
    Op.PRE_FETCH_10: (_L10, "prefetch"), Op.PRE_FETCH_16: (_L16, "prefetch"),
}

_WRITE_AND_VERIFY = frozenset({Op.WRITE_AND_VERIFY_10, Op.WRITE_AND_VERIFY_12, Op.WRITE_AND_VERIFY_16})


@dataclass(slots=True)
class BlockCommand:
    """A decoded block command, range-checked against the LUN."""

    op: Op
    kind: str
    lba: int
    blocks: int
    fua: bool = False
    bytchk: bool = False
    unmap: bool = False
    ndob: bool = False
    immed: bool = False


def _field(cdb: bytes, where: tuple[int, int]) -> int:
    off, size = where
    return int.from_bytes(cdb[off:off + size], "big")


def cdb_length(opcode: int) -> int | None:
    return CDB_LENGTH_BY_GROUP.get(opcode >> 5)


def check_length(cdb: bytes) -> None:
    want = cdb_length(cdb[0])
    if want is None or len(cdb) < want:
        raise SenseError(Reason.INVALID_OPCODE, detail=f"CDB of {len(cdb)} bytes for opcode {cdb[0]:#x}")
    # CONTROL byte (SAM-5 5.2): NACA is not supported, so it must be zero
    if cdb[want - 1] & 0x04:
        raise invalid_cdb(want - 1, 2)


def parse_block(cdb: bytes, op: Op, n_blocks: int, max_blocks: int) -> BlockCommand:
    """Decode a READ/WRITE/VERIFY/SYNCHRONIZE CACHE/WRITE SAME CDB and check its range."""
    layout, kind = LAYOUTS[op]
    lba = _field(cdb, layout.lba)
    if layout is _L6:
        lba &= 0x1FFFFF
    blocks = _field(cdb, layout.blocks)
    if layout.zero_is_256 and blocks == 0:
        blocks = 256
    flags = cdb[1] if layout is not _L6 else 0
    # RDPROTECT/WRPROTECT/VRPROTECT (bits 7-5): no protection information here (SBC-4 4.22)
    if flags & 0xE0 and kind in ("read", "write", "verify", "write_same"):
        raise invalid_cdb(1, 7)
    fua = bool(flags & 0x08) and kind in ("read", "write")
    bytchk = bool(flags & 6) if kind == "verify" else op in _WRITE_AND_VERIFY and bool(flags & 2)
    unmap = kind == "write_same" and bool(flags & 0x08)
    ndob = op is Op.WRITE_SAME_16 and bool(flags & 0x01)
    if kind == "verify" and (flags >> 1) & 0x03 == 2:
        raise invalid_cdb(1, 2)  # BYTCHK 10b is reserved (SBC-4 5.31)
    if kind == "write_same":
        if flags & 0x10:  # ANCHOR: we report ANC_SUP=0 in the provisioning VPD page
            raise invalid_cdb(1, 4)
        if blocks == 0:  # WSNZ=1 in the block limits page: a length is required
            raise invalid_cdb(layout.blocks[0])
        if blocks > max_blocks:
            raise invalid_cdb(layout.blocks[0])
    if kind in ("sync", "prefetch") and blocks == 0:
        blocks = max(0, n_blocks - lba)  # 0: to the end of the medium (SBC-4 5.9, 5.24)
    # the transfer length is judged before the range, as LIO does (sbc_parse_cdb)
    if kind in ("read", "write", "verify") and blocks > max_blocks:
        raise invalid_cdb(layout.blocks[0])
    if lba > n_blocks or lba + blocks > n_blocks:
        raise SenseError(Reason.LBA_OUT_OF_RANGE, detail=f"LBA {lba}+{blocks} past {n_blocks}")
    immed = kind in ("sync", "prefetch") and bool(flags & 0x02)
    return BlockCommand(op, kind, lba, blocks, fua=fua, bytchk=bytchk, unmap=unmap, ndob=ndob, immed=immed)


#: the READs (SBC-4 5.14-5.17) by opcode byte: one precompiled unpack of their (flags, LBA,
#: transfer length) and the byte where the transfer length sits. A READ is most of what a guest
#: sends (4 KiB random reads are bound by per-command cost): ``parse_read`` decodes it with one
#: struct call and builds no ``BlockCommand``. READ(6) has no flags byte, a 21-bit LBA and 0
#: meaning 256 blocks. ``parse_block`` stays the decoder of every block command, READs
#: included; tests/unit/test_scsi_read_fast.py holds the two to the same answers.
READ_FIELDS: dict[int, tuple[Callable[[bytes], tuple[int, int, int]], int]] = {
    Op.READ_6: (lambda cdb: (0, int.from_bytes(cdb[1:4], "big") & 0x1FFFFF, cdb[4] or 256), 4),
    Op.READ_10: (struct.Struct(">xBIxH").unpack_from, 7),  # type: ignore[dict-item]
    Op.READ_12: (struct.Struct(">xBII").unpack_from, 6),  # type: ignore[dict-item]
    Op.READ_16: (struct.Struct(">xBQI").unpack_from, 10),  # type: ignore[dict-item]
}


def parse_read(cdb: bytes, n_blocks: int, max_blocks: int) -> tuple[int, int]:
    """A READ(6/10/12/16) CDB (its length checked: ``check_length``) as (LBA, blocks), with the
    checks ``parse_block`` makes of a READ, in its order and with its sense: RDPROTECT (no
    protection information, SBC-4 4.22), the transfer length before the range (as LIO), the
    range. DPO and FUA ask nothing of a read served from the cache file and are not kept."""
    unpack, length_byte = READ_FIELDS[cdb[0]]
    flags, lba, blocks = unpack(cdb)
    if flags & 0xE0:
        raise invalid_cdb(1, 7)
    if blocks > max_blocks:
        raise invalid_cdb(length_byte)
    if lba > n_blocks or lba + blocks > n_blocks:
        raise SenseError(Reason.LBA_OUT_OF_RANGE, detail=f"LBA {lba}+{blocks} past {n_blocks}")
    return lba, blocks


def allocation_length(cdb: bytes, where: tuple[int, int]) -> int:
    return _field(cdb, where)

