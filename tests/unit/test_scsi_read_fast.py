"""The READ fast path (cdb.parse_read, taken by dispatch for READ(6/10/12/16)) answers every
CDB exactly as the general block decoder (cdb.parse_block) does: the same LBA and length, or the
same CHECK CONDITION (sense key, ASC/ASCQ, field pointer, information, detail). Table-driven on
the boundaries of every field, then hypothesis on arbitrary CDB bytes; and through
``dispatch.execute``, a READ returns the bytes of its range and fails with that same sense."""

from __future__ import annotations

import itertools
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from lazyiscsi.scsi.cdb import READ_FIELDS, Op, check_length, parse_block, parse_read
from lazyiscsi.scsi.dispatch import execute
from lazyiscsi.scsi.lun import Lun
from lazyiscsi.scsi.sense import SenseError, Status, fixed_sense

N_BLOCKS = 1 << 21  # 1 GiB of 512-byte blocks: past READ(6)'s 21-bit LBA by one
MAX_BLOCKS = 16384  # MAX_TRANSFER_BYTES of 512-byte blocks
READS = (Op.READ_6, Op.READ_10, Op.READ_12, Op.READ_16)


def general(cdb: bytes, n_blocks: int = N_BLOCKS, max_blocks: int = MAX_BLOCKS) -> object:
    """What the general decoder makes of a READ CDB: (lba, blocks) or the sense it fails with."""
    try:
        cmd = parse_block(cdb, Op(cdb[0]), n_blocks, max_blocks)
    except SenseError as e:
        return (fixed_sense(e.reason, field=e.field, info=e.info), str(e))
    return (cmd.lba, cmd.blocks)


def fast(cdb: bytes, n_blocks: int = N_BLOCKS, max_blocks: int = MAX_BLOCKS) -> object:
    try:
        return parse_read(cdb, n_blocks, max_blocks)
    except SenseError as e:
        return (fixed_sense(e.reason, field=e.field, info=e.info), str(e))


def read_cdb(op: Op, lba: int, blocks: int, flags: int = 0, control: int = 0) -> bytes:
    """A READ CDB with its fields where SBC-4 5.14-5.17 put them (values truncated to their width)."""
    if op is Op.READ_6:
        return struct.pack(">BBHBB", op, (lba >> 16) & 0xFF | flags, lba & 0xFFFF, blocks & 0xFF, control)
    if op is Op.READ_10:
        return struct.pack(">BBIBHB", op, flags, lba & 0xFFFFFFFF, 0, blocks & 0xFFFF, control)
    if op is Op.READ_12:
        return struct.pack(">BBIIBB", op, flags, lba & 0xFFFFFFFF, blocks & 0xFFFFFFFF, 0, control)
    return struct.pack(">BBQIBB", op, flags, lba & (2**64 - 1), blocks & 0xFFFFFFFF, 0, control)


LBAS = [0, 1, N_BLOCKS - 16384, N_BLOCKS - 8, N_BLOCKS - 1, N_BLOCKS, N_BLOCKS + 1, 0x1FFFFF, 0x200000,
        0xFFFFFFFF, 2**63, 2**64 - 1]
LENGTHS = [0, 1, 8, 255, 256, MAX_BLOCKS - 1, MAX_BLOCKS, MAX_BLOCKS + 1, 0xFFFF, 0xFFFFFFFF]
FLAGS = [0, 0x01, 0x02, 0x08, 0x10, 0x18, 0x20, 0x40, 0x80, 0xE0, 0xFF]


def test_every_boundary_read_decodes_as_the_general_path() -> None:
    cases = 0
    for op, lba, blocks, flags in itertools.product(READS, LBAS, LENGTHS, FLAGS):
        cdb = read_cdb(op, lba, blocks, flags if op is not Op.READ_6 else flags & 0xE0)
        assert fast(cdb) == general(cdb), f"CDB {cdb.hex()}"
        cases += 1
    assert cases == 4 * len(LBAS) * len(LENGTHS) * len(FLAGS)
    # and the fields are where the decoder looks: a mis-placed unpack would decode these wrong
    assert parse_read(read_cdb(Op.READ_10, 1000, 8), N_BLOCKS, MAX_BLOCKS) == (1000, 8)
    assert parse_read(read_cdb(Op.READ_12, 70000, 300), N_BLOCKS, MAX_BLOCKS) == (70000, 300)
    assert parse_read(read_cdb(Op.READ_16, N_BLOCKS - 1, 1), N_BLOCKS, MAX_BLOCKS) == (N_BLOCKS - 1, 1)
    assert parse_read(read_cdb(Op.READ_6, 0x1FFF00, 0), N_BLOCKS, MAX_BLOCKS) == (0x1FFF00, 256)
    assert parse_read(bytes([Op.READ_6, 0xE1, 0, 0, 1, 0]), N_BLOCKS, MAX_BLOCKS) == (0x10000, 1)


def test_the_fast_path_rejects_what_sbc_rejects() -> None:
    """Each rejection of a READ, with its sense: RDPROTECT set, a transfer length past the
    Block Limits page's (judged before the range), a range past the medium."""
    rdprotect = fast(read_cdb(Op.READ_10, 0, 8, flags=0x20))
    assert rdprotect == general(read_cdb(Op.READ_10, 0, 8, flags=0x20))
    sense = rdprotect[0]  # type: ignore[index]
    assert (sense[2] & 0x0F, sense[12], sense[13]) == (0x05, 0x24, 0x00)  # INVALID FIELD IN CDB
    assert sense[15] & 0x80 and sense[15] & 0x07 == 7 and sense[17] == 1  # byte 1, bit 7
    too_long = fast(read_cdb(Op.READ_16, N_BLOCKS + 5, MAX_BLOCKS + 1))[0]  # type: ignore[index]
    assert too_long[17] == 10  # the length field (byte 10), not the range
    past = fast(read_cdb(Op.READ_12, N_BLOCKS - 1, 2))[0]  # type: ignore[index]
    assert (past[2] & 0x0F, past[12], past[13]) == (0x05, 0x21, 0x00)  # LBA OUT OF RANGE


@settings(max_examples=1500, deadline=None)
@given(op=st.sampled_from(READS), body=st.binary(min_size=15, max_size=15),
       n_blocks=st.sampled_from([1, 8, 255, 256, N_BLOCKS, 2**32, 2**40]),
       max_blocks=st.sampled_from([1, 8, 128, MAX_BLOCKS, 0xFFFFFFFF]))
def test_arbitrary_read_cdbs_decode_as_the_general_path(op: Op, body: bytes, n_blocks: int,
                                                         max_blocks: int) -> None:
    cdb = bytes([op]) + body
    try:
        check_length(cdb)  # dispatch runs this first, for every command: NACA and the length
    except SenseError:
        return
    assert fast(cdb, n_blocks, max_blocks) == general(cdb, n_blocks, max_blocks)


def test_every_read_opcode_has_a_fast_form() -> None:
    assert set(READ_FIELDS) == {int(op) for op in READS}


class Blocks:
    """A byte-addressed backend over a bytes object (a fake below the SCSI layer)."""

    unit = 1 << 20
    complete = True
    writable = True

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]

    def readinto(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset:offset + len(buf)]


def test_execute_reads_the_range_and_fails_with_the_general_sense() -> None:
    data = bytes(range(256)) * 64  # 32 blocks
    lun = Lun(Blocks(data), "fast")  # type: ignore[arg-type]
    nexus = "iqn.test:i,i,0x400000000001"
    for op in READS:
        r = execute(lun, read_cdb(op, 3, 2), None, nexus)
        assert (r.status, r.data_in) == (Status.GOOD, data[3 * 512:5 * 512]), op
        into = memoryview(bytearray(4096))  # TCMU's data area: filled in place
        r = execute(lun, read_cdb(op, 5, 1), None, nexus, data_in_buffer=into)
        assert bytes(r.data_in) == data[5 * 512:6 * 512] and r.data_in.obj is into.obj  # type: ignore[union-attr]
        for bad in (read_cdb(op, 31, 2), read_cdb(op, 0, 1, flags=0x40 if op is not Op.READ_6 else 0)):
            r = execute(lun, bad, None, nexus)
            want = general(bad, 32, lun.max_transfer_blocks)
            if isinstance(want[0], int):  # (READ(6) has no RDPROTECT: it reads)
                assert r.status == Status.GOOD
                continue
            assert (r.status, r.sense) == (Status.CHECK_CONDITION, want[0]), (op, bad.hex())
