"""Block commands (SBC-4): READ, WRITE, VERIFY, WRITE AND VERIFY, SYNCHRONIZE CACHE, WRITE SAME,
UNMAP, READ CAPACITY. Each gets a command ``parse_block`` has already range-checked."""

from __future__ import annotations

import struct

from lazyiscsi.scsi.cdb import BlockCommand
from lazyiscsi.scsi.lun import MAX_COMPARE_AND_WRITE_BLOCKS, MAX_TRANSFER_BYTES, Lun
from lazyiscsi.scsi.sense import (
    Reason,
    SenseError,
    invalid_cdb,
    invalid_param,
)
from lazyiscsi.scsi.spc import truncate

#: a non-zero WRITE SAME pattern is written in chunks of about this size
_PATTERN_CHUNK = 1 << 20


def read(lun: Lun, cmd: BlockCommand) -> bytes | bytearray:
    return lun.backend.read(cmd.lba * lun.block_size, cmd.blocks * lun.block_size)


def write(lun: Lun, cmd: BlockCommand, data: memoryview) -> None:
    # with the write cache off every write is durable before GOOD (SBC-4 4.15, WCE=0)
    lun.backend.write(cmd.lba * lun.block_size, data, fua=cmd.fua or cmd.bytchk or not lun.write_cache)


def verify(lun: Lun, cmd: BlockCommand, data: memoryview | None) -> None:
    """BYTCHK 0: the blocks must be readable (for a lazy LUN that fetches them). BYTCHK 1:
    compare with the data-out; MISCOMPARE names the first differing byte (SBC-4 5.31)."""
    if cmd.blocks == 0:
        return
    stored = read(lun, cmd)
    if cmd.bytchk:
        assert data is not None
        if stored != data:
            first = next(i for i in range(len(stored)) if stored[i] != data[i])
            raise SenseError(Reason.MISCOMPARE_DURING_VERIFY, info=first)


def sync(lun: Lun, cmd: BlockCommand) -> None:
    lun.backend.flush()


def prefetch(lun: Lun, cmd: BlockCommand) -> None:
    """PRE-FETCH makes blocks local ahead of the reads that will want them: here that means
    fetching them from the source site now. At most one transfer's worth is fetched per command
    (SBC-4 5.9 lets a device prefetch less, and GOOD then says so); with IMMED the fetch runs
    after the status is sent."""
    length = min(cmd.blocks * lun.block_size, MAX_TRANSFER_BYTES)
    lun.backend.prefetch(cmd.lba * lun.block_size, length, wait=not cmd.immed)


def write_same(lun: Lun, cmd: BlockCommand, data: memoryview | None) -> None:
    """Zeros (NDOB, or an all-zero block, with or without UNMAP) go through write_zeroes, which deallocates
    whole units; any other pattern is written out in chunks (never one huge buffer)."""
    offset, length = cmd.lba * lun.block_size, cmd.blocks * lun.block_size
    block = bytes(lun.block_size) if cmd.ndob or data is None else bytes(data)
    # UNMAP may deallocate only where a deallocated block would read back as the pattern
    # (LBPRZ=1: zeros); with any other pattern the blocks are written (SBC-4 4.7.3.4)
    if not any(block):
        lun.backend.write_zeroes(offset, length, fua=not lun.write_cache)
        return
    per_chunk = max(1, _PATTERN_CHUNK // lun.block_size)
    chunk = block * per_chunk
    pos, end = offset, offset + length
    while pos < end:
        n = min(len(chunk), end - pos)
        lun.backend.write(pos, memoryview(chunk)[:n], fua=not lun.write_cache)
        pos += n


def unmap(lun: Lun, cdb: bytes, data: memoryview | None) -> None:
    """UNMAP parameter list (SBC-4 5.30.2): an 8-byte header and 16-byte block descriptors.
    Every descriptor is checked before any is applied, so a bad list changes nothing."""
    if cdb[1] & 0x01:
        raise invalid_cdb(1, 0)  # ANCHOR: not supported (ANC_SUP=0)
    param_len = struct.unpack_from(">H", cdb, 7)[0]
    if param_len == 0:
        return
    if data is None or len(data) < param_len:
        raise SenseError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    if param_len < 8:
        raise SenseError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    data_len, desc_len = struct.unpack_from(">HH", data, 0)
    if desc_len % 16 or desc_len + 8 > param_len or data_len + 2 > param_len:
        raise SenseError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    if desc_len // 16 > 256:
        raise invalid_param(2)
    ranges = []
    for i in range(desc_len // 16):
        lba, count = struct.unpack_from(">QI", data, 8 + 16 * i)
        if lba + count > lun.n_blocks:
            raise SenseError(Reason.LBA_OUT_OF_RANGE)
        if count > lun.max_write_same_blocks:
            raise invalid_param(8 + 16 * i + 8)
        ranges.append((lba, count))
    for lba, count in ranges:
        if count:
            lun.backend.write_zeroes(lba * lun.block_size, count * lun.block_size)


def compare_and_write(lun: Lun, cdb: bytes, data: memoryview | None) -> None:
    """SBC-4 5.3: read, compare with the first half of the data-out, and only if equal write
    the second half; no other COMPARE AND WRITE may run between the read and the write."""
    if cdb[1] & 0xE0:
        raise invalid_cdb(1, 7)  # WRPROTECT
    lba = struct.unpack_from(">Q", cdb, 2)[0]
    blocks = cdb[13]
    if blocks > MAX_COMPARE_AND_WRITE_BLOCKS:
        raise invalid_cdb(13)
    if lba + blocks > lun.n_blocks:
        raise SenseError(Reason.LBA_OUT_OF_RANGE)
    if blocks == 0:
        if data:  # no blocks, yet data: the initiator and its CDB disagree about the length
            raise invalid_cdb(13)
        return
    length = blocks * lun.block_size
    if data is None or len(data) != 2 * length:
        raise invalid_cdb(13)
    with lun.compare_lock:
        stored = bytearray(length)
        lun.backend.readinto(lba * lun.block_size, memoryview(stored))
        if stored != data[:length]:
            first = next(i for i in range(length) if stored[i] != data[i])
            raise SenseError(Reason.MISCOMPARE_DURING_VERIFY, info=first)
        lun.backend.write(lba * lun.block_size, data[length:], fua=bool(cdb[1] & 0x08) or not lun.write_cache)


def get_lba_status(lun: Lun, cdb: bytes) -> bytes:
    """One descriptor from the LBA to the end, mapped (SBC-4 5.7): the store does not track
    deallocation per block, and "mapped" is always a correct answer for a thin device."""
    lba = struct.unpack_from(">Q", cdb, 2)[0]
    alloc = struct.unpack_from(">I", cdb, 10)[0]
    if lba >= lun.n_blocks:
        raise SenseError(Reason.LBA_OUT_OF_RANGE)
    count = min(lun.n_blocks - lba, 0xFFFFFFFF)
    descriptor = struct.pack(">QIB3x", lba, count, 0)
    return truncate(struct.pack(">I4x", 4 + len(descriptor)) + descriptor, alloc)


def read_capacity_10(lun: Lun) -> bytes:
    last = lun.n_blocks - 1
    return struct.pack(">II", min(last, 0xFFFFFFFF), lun.block_size)


def read_capacity_16(lun: Lun, cdb: bytes) -> bytes:
    alloc = struct.unpack_from(">I", cdb, 10)[0]
    exponent = max(0, (lun.backend.unit // lun.block_size).bit_length() - 1)
    data = bytearray(32)
    struct.pack_into(">QI", data, 0, lun.n_blocks - 1, lun.block_size)
    data[13] = min(exponent, 15)  # LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT: the store's unit
    data[14] = 0x80 | 0x40  # LBPME (UNMAP works), LBPRZ (unmapped blocks read zeros)
    return truncate(bytes(data), alloc)
