"""SCSI commands against a real LazyDisk whose source is faked below the store (so lazy
reads are exercised). Case names follow libiscsi's test-tool; 6/10/12/16 forms are one test."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import gevent
import pytest

from lazyiscsi.scsi.dispatch import Result, data_out_length, execute
from lazyiscsi.scsi.lun import Lun
from lazyiscsi.scsi.sense import SENSE_TABLE, Reason, SenseKey, Status
from lazyiscsi.store.lazydisk import LazyDisk
from tests.unit.store_fakes import InstantSource

BS = 512
SIZE = 4 << 20
NBLOCKS = SIZE // BS


@pytest.fixture
def env(tmp_path: Path) -> tuple[Lun, bytes, LazyDisk]:
    data = random.Random(9).randbytes(SIZE)
    disk = LazyDisk.open(str(tmp_path / "cache"), InstantSource(data), autocommit_s=None)
    return Lun(disk, "vm1", block_size=BS), data, disk


# -- expectations, named as libiscsi names them -----------------------------------------------

def expect_good(r: Result) -> Result:
    assert r.status is Status.GOOD, r.sense and r.sense.hex()
    return r


def expect_sense(r: Result, reason: Reason) -> bytes:
    assert r.status is Status.CHECK_CONDITION and r.sense is not None
    key, asc, ascq = SENSE_TABLE[reason]
    assert (r.sense[2] & 0x0F, r.sense[12], r.sense[13]) == (key, asc, ascq), r.sense.hex()
    return r.sense


def expect_lba_oob(r: Result) -> None:
    expect_sense(r, Reason.LBA_OUT_OF_RANGE)


def expect_invalid_field_in_cdb(r: Result, byte: int | None = None) -> None:
    sense = expect_sense(r, Reason.INVALID_FIELD_IN_CDB)
    if byte is not None:
        assert sense[15] & 0xC0 == 0xC0 and struct.unpack_from(">H", sense, 16)[0] == byte


def expect_invalid_opcode(r: Result) -> None:
    expect_sense(r, Reason.INVALID_OPCODE)


# -- CDB builders ------------------------------------------------------------------------------

def rw(op_kind: str, size: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    ops = {("read", 6): 0x08, ("read", 10): 0x28, ("read", 12): 0xA8, ("read", 16): 0x88,
           ("write", 6): 0x0A, ("write", 10): 0x2A, ("write", 12): 0xAA, ("write", 16): 0x8A,
           ("verify", 10): 0x2F, ("verify", 12): 0xAF, ("verify", 16): 0x8F,
           ("writeverify", 10): 0x2E, ("writeverify", 12): 0xAE, ("writeverify", 16): 0x8E,
           ("sync", 10): 0x35, ("sync", 16): 0x91, ("writesame", 10): 0x41, ("writesame", 16): 0x93}
    op = ops[(op_kind, size)]
    if size == 6:
        return struct.pack(">BBHBB", op, (lba >> 16) & 0x1F, lba & 0xFFFF, blocks & 0xFF, 0)
    if size == 10:
        return struct.pack(">BBIBHB", op, flags, lba, 0, blocks, 0)
    if size == 12:
        return struct.pack(">BBIIBB", op, flags, lba, blocks, 0, 0)
    return struct.pack(">BBQIBB", op, flags, lba, blocks, 0, 0)


def run(lun: Lun, cdb: bytes, data: bytes | None = None) -> Result:
    return execute(lun, cdb, data, "iqn.test:initiator")


# -- READ / WRITE --------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [6, 10, 12, 16])
def test_read_lazy_data_matches_source(env, size: int) -> None:  # type: ignore[no-untyped-def]
    lun, data, disk = env
    r = expect_good(run(lun, rw("read", size, 100, 9)))
    assert bytes(r.data_in) == data[100 * BS:109 * BS]
    assert disk.local_bytes > 0  # fetched on demand


@pytest.mark.parametrize("size", [10, 12, 16])
def test_read_beyond_eol(env, size: int) -> None:  # type: ignore[no-untyped-def]
    lun, _, _ = env
    expect_lba_oob(run(lun, rw("read", size, NBLOCKS - 1, 2)))
    expect_lba_oob(run(lun, rw("read", size, NBLOCKS, 1)))
    expect_good(run(lun, rw("read", size, NBLOCKS - 1, 1)))


@pytest.mark.parametrize("size", [6, 10, 12, 16])
def test_write_then_read_back_dpofua(env, size: int) -> None:  # type: ignore[no-untyped-def]
    lun, data, _ = env
    payload = bytes([size]) * 3 * BS
    cdb = rw("write", size, 7, 3, flags=0x08 if size != 6 else 0)  # FUA
    assert data_out_length(cdb, BS) == len(payload)
    expect_good(run(lun, cdb, payload))
    back = bytes(run(lun, rw("read", 10, 6, 5)).data_in)
    assert back == data[6 * BS:7 * BS] + payload + data[10 * BS:11 * BS]


@pytest.mark.parametrize("size", [10, 12, 16])
def test_read_wrprotect(env, size: int) -> None:  # type: ignore[no-untyped-def]
    lun, _, _ = env
    expect_invalid_field_in_cdb(run(lun, rw("read", size, 0, 1, flags=0x20)), byte=1)
    expect_invalid_field_in_cdb(run(lun, rw("write", size, 0, 1, flags=0x20), bytes(BS)), byte=1)


def test_read10_zero_blocks_and_read6_zero_means_256(env) -> None:  # type: ignore[no-untyped-def]
    lun, data, _ = env
    assert not expect_good(run(lun, rw("read", 10, 0, 0))).data_in
    assert bytes(expect_good(run(lun, rw("read", 6, 0, 0))).data_in) == data[:256 * BS]


def test_write_beyond_max_transfer_length(env) -> None:  # type: ignore[no-untyped-def]
    lun, _, _ = env
    expect_invalid_field_in_cdb(run(lun, rw("read", 16, 0, lun.max_transfer_blocks + 1)))


# -- VERIFY, WRITE AND VERIFY, SYNCHRONIZE CACHE -------------------------------------------------

@pytest.mark.parametrize("size", [10, 12, 16])
def test_verify_bytchk(env, size: int) -> None:  # type: ignore[no-untyped-def]
    lun, data, _ = env
    expect_good(run(lun, rw("verify", size, 20, 2)))
    expect_good(run(lun, rw("verify", size, 20, 2, flags=0x02), data[20 * BS:22 * BS]))
    wrong = bytearray(data[20 * BS:22 * BS])
    wrong[700] ^= 0xFF
    sense = expect_sense(run(lun, rw("verify", size, 20, 2, flags=0x02), bytes(wrong)),
                         Reason.MISCOMPARE_DURING_VERIFY)
    assert sense[0] & 0x80 and struct.unpack_from(">I", sense, 3)[0] == 700
    expect_lba_oob(run(lun, rw("verify", size, NBLOCKS, 1)))


@pytest.mark.parametrize("size", [10, 12, 16])
def test_writeverify(env, size: int) -> None:  # type: ignore[no-untyped-def]
    lun, _, _ = env
    expect_good(run(lun, rw("writeverify", size, 3, 1, flags=0x02), b"\x5a" * BS))
    assert bytes(run(lun, rw("read", 10, 3, 1)).data_in) == b"\x5a" * BS


@pytest.mark.parametrize("size", [10, 16])
def test_synchronizecache(env, size: int) -> None:  # type: ignore[no-untyped-def]
    lun, _, _ = env
    expect_good(run(lun, rw("sync", size, 0, 0)))
    expect_good(run(lun, rw("sync", size, 10, 10)))
    expect_lba_oob(run(lun, rw("sync", size, NBLOCKS, 1)))


# -- WRITE SAME, UNMAP ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [10, 16])
def test_write_same_patterns_and_unmap(env, size: int) -> None:  # type: ignore[no-untyped-def]
    lun, _, _ = env
    expect_good(run(lun, rw("writesame", size, 50, 300), b"\xab" * BS))
    assert bytes(run(lun, rw("read", 10, 50, 300)).data_in) == b"\xab" * BS * 300
    expect_good(run(lun, rw("writesame", size, 50, 16, flags=0x08), bytes(BS)))  # UNMAP bit
    assert bytes(run(lun, rw("read", 10, 50, 16)).data_in) == bytes(16 * BS)
    # UNMAP with a pattern that is not what deallocated blocks read as: the pattern is written
    expect_good(run(lun, rw("writesame", size, 51, 7, flags=0x08), b"\x01" * BS))
    assert bytes(run(lun, rw("read", 10, 50, 16)).data_in) == bytes(BS) + b"\x01" * 7 * BS + bytes(8 * BS)


@pytest.mark.parametrize("size", [10, 16])
def test_write_same_zero_blocks_and_beyond_eol(env, size: int) -> None:  # type: ignore[no-untyped-def]
    lun, _, _ = env
    expect_invalid_field_in_cdb(run(lun, rw("writesame", size, 0, 0), bytes(BS)))  # WSNZ=1
    expect_lba_oob(run(lun, rw("writesame", size, NBLOCKS - 1, 2), bytes(BS)))


def test_write_same16_ndob(env) -> None:  # type: ignore[no-untyped-def]
    lun, _, _ = env
    cdb = rw("writesame", 16, 8, 4, flags=0x01)
    assert data_out_length(cdb, BS) == 0
    expect_good(run(lun, cdb))
    assert bytes(run(lun, rw("read", 10, 8, 4)).data_in) == bytes(4 * BS)


def unmap_cdb(param_len: int, anchor: bool = False) -> bytes:
    return struct.pack(">BBIBHB", 0x42, int(anchor), 0, 0, param_len, 0)


def unmap_params(*ranges: tuple[int, int]) -> bytes:
    descs = b"".join(struct.pack(">QII", lba, n, 0) for lba, n in ranges)
    return struct.pack(">HHI", len(descs) + 6, len(descs), 0) + descs


def test_unmap_reads_zero_and_is_all_or_nothing(env) -> None:  # type: ignore[no-untyped-def]
    lun, data, _ = env
    params = unmap_params((1, 3), (100, 1))
    expect_good(run(lun, unmap_cdb(len(params)), params))
    assert bytes(run(lun, rw("read", 10, 0, 5)).data_in) == data[:BS] + bytes(3 * BS) + data[4 * BS:5 * BS]
    # one bad descriptor: nothing of the list is applied
    bad = unmap_params((200, 1), (NBLOCKS, 1))
    expect_lba_oob(run(lun, unmap_cdb(len(bad)), bad))
    assert bytes(run(lun, rw("read", 10, 200, 1)).data_in) == data[200 * BS:201 * BS]


def test_unmap_invalid_param_list_length(env) -> None:  # type: ignore[no-untyped-def]
    lun, _, _ = env
    params = unmap_params((1, 1))
    expect_sense(run(lun, unmap_cdb(4), params[:4]), Reason.PARAMETER_LIST_LENGTH_ERROR)
    broken = struct.pack(">HHI", 22, 17, 0) + params[8:] + b"\0"
    expect_sense(run(lun, unmap_cdb(len(broken)), broken), Reason.PARAMETER_LIST_LENGTH_ERROR)
    expect_invalid_field_in_cdb(run(lun, unmap_cdb(len(params), anchor=True), params), byte=1)
    expect_good(run(lun, unmap_cdb(0)))


# -- INQUIRY, capacity, mode pages, LUNs -------------------------------------------------------

def test_inquiry_standard_and_vpd(env) -> None:  # type: ignore[no-untyped-def]
    lun, _, _ = env
    std = expect_good(run(lun, bytes([0x12, 0, 0, 0, 96, 0]))).data_in
    assert std[0] == 0 and std[2] == 6 and std[8:16] == b"LAZYISCS" and len(std) == 74
    assert struct.unpack_from(">4H", std, 58) == (0x00A0, 0x0960, 0x0460, 0x04C0)
    assert len(run(lun, bytes([0x12, 0, 0, 0, 5, 0])).data_in) == 5  # allocation length
    pages = run(lun, bytes([0x12, 1, 0, 0, 255, 0])).data_in
    assert list(pages[4:]) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    serial = run(lun, bytes([0x12, 1, 0x80, 0, 255, 0])).data_in
    assert serial[4:].decode() == lun.serial
    ident = run(lun, bytes([0x12, 1, 0x83, 0, 255, 0])).data_in
    assert ident[5] & 0x0F == 3 and ident[7] == 16 and ident[8] >> 4 == 6  # NAA 6 designator
    limits = run(lun, bytes([0x12, 1, 0xB0, 0, 255, 0])).data_in
    assert struct.unpack_from(">I", limits, 8)[0] == lun.max_transfer_blocks and limits[4] & 1
    prov = run(lun, bytes([0x12, 1, 0xB2, 0, 255, 0])).data_in
    assert prov[5] & 0x80 and (prov[5] >> 2) & 7 == 1  # LBPU, LBPRZ
    expect_invalid_field_in_cdb(run(lun, bytes([0x12, 0, 0x80, 0, 255, 0])), byte=2)
    expect_invalid_field_in_cdb(run(lun, bytes([0x12, 1, 0x99, 0, 255, 0])), byte=2)


def test_readcapacity10_and_16(env) -> None:  # type: ignore[no-untyped-def]
    lun, _, _ = env
    assert run(lun, bytes(10).replace(b"\0", b"\x25", 1)).data_in == struct.pack(">II", NBLOCKS - 1, BS)
    rc16 = run(lun, bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2)).data_in
    last, bs = struct.unpack_from(">QI", rc16)
    assert (last, bs) == (NBLOCKS - 1, BS)
    assert rc16[13] == 3  # 4 KiB unit over 512 B blocks: 2^3 logical per physical
    assert rc16[14] & 0xC0 == 0xC0  # LBPME, LBPRZ
    expect_invalid_field_in_cdb(run(lun, bytes([0x9E, 0x11]) + bytes(14)))


def test_modesense_pages(env) -> None:  # type: ignore[no-untyped-def]
    lun, _, _ = env
    ms6 = expect_good(run(lun, bytes([0x1A, 0, 0x3F, 0, 255, 0]))).data_in
    assert ms6[0] == len(ms6) - 1 and ms6[3] == 8 and ms6[2] & 0x10  # DPOFUA
    caching = ms6[4 + 8:]
    assert caching[0] == 0x08 and caching[2] & 0x04  # WCE
    ms10 = expect_good(run(lun, bytes([0x5A, 0x18, 0x08, 0, 0, 0, 0, 1, 0, 0]))).data_in  # DBD
    assert struct.unpack_from(">H", ms10, 6)[0] == 0 and ms10[8] == 0x08
    expect_sense(run(lun, bytes([0x1A, 0, 0xC8, 0, 255, 0])), Reason.SAVING_PARAMETERS_NOT_SUPPORTED)
    expect_invalid_field_in_cdb(run(lun, bytes([0x1A, 0, 0x01, 0, 255, 0])))


def test_reportluns_and_unknown_opcodes(env) -> None:  # type: ignore[no-untyped-def]
    lun, _, _ = env
    lun.target_luns = [0, 3, 300]
    data = expect_good(run(lun, bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]))).data_in
    assert struct.unpack_from(">I", data)[0] == 24 and data[8:10] == b"\0\0" and data[16:18] == b"\0\x03"
    assert data[24:26] == bytes([0x41, 0x2C])  # 300, flat space addressing
    expect_invalid_field_in_cdb(run(lun, bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0])))
    expect_invalid_opcode(run(lun, bytes([0xC0]) + bytes(15)))
    expect_invalid_opcode(run(lun, b""))
    expect_invalid_opcode(run(lun, bytes([0x28, 0, 0])))  # truncated CDB
    expect_invalid_field_in_cdb(run(lun, bytes([0x00, 0, 0, 0, 0, 0x04])))  # NACA


def test_unit_attention_reported_once(env) -> None:  # type: ignore[no-untyped-def]
    lun, _, _ = env
    lun.unit_attentions["iqn.test:initiator"] = [Reason.POWER_ON_OR_RESET]
    expect_good(run(lun, bytes([0x12, 0, 0, 0, 36, 0])))  # INQUIRY is exempt
    sense = expect_sense(run(lun, bytes(6)), Reason.POWER_ON_OR_RESET)
    assert sense[2] == SenseKey.UNIT_ATTENTION
    expect_good(run(lun, bytes(6)))


def test_source_failure_is_a_medium_error(tmp_path: Path) -> None:
    from lazyiscsi.source.base import SourceReadError
    from lazyiscsi.store.fetch import RetryPolicy

    class Failing(InstantSource):
        def read(self, offset, length, priority=None):  # type: ignore[no-untyped-def]
            raise SourceReadError("EIO")

    disk = LazyDisk.open(str(tmp_path / "c"), Failing(bytes(SIZE)), autocommit_s=None,
                         retry=RetryPolicy(attempts=1))
    lun = Lun(disk, "bad")
    expect_sense(run(lun, rw("read", 10, 0, 1)), Reason.UNRECOVERED_READ_ERROR)
    disk.close()


# -- COMPARE AND WRITE, MODE SELECT, GET LBA STATUS ---------------------------------------------

def caw_cdb(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, flags, lba, blocks, 0, 0)


def test_compareandwrite_simple_and_miscompare(env) -> None:  # type: ignore[no-untyped-def]
    lun, data, _ = env
    old, new = data[10 * BS:12 * BS], b"\x77" * 2 * BS
    cdb = caw_cdb(10, 2)
    assert data_out_length(cdb, BS) == 4 * BS
    expect_good(run(lun, cdb, old + new))
    assert bytes(run(lun, rw("read", 10, 10, 2)).data_in) == new
    # the stored data is now `new`: comparing against `old` fails at byte 0 and writes nothing
    sense = expect_sense(run(lun, cdb, old + b"\x11" * 2 * BS), Reason.MISCOMPARE_DURING_VERIFY)
    assert struct.unpack_from(">I", sense, 3)[0] == 0
    assert bytes(run(lun, rw("read", 10, 10, 2)).data_in) == new


def test_compareandwrite_invalid(env) -> None:  # type: ignore[no-untyped-def]
    lun, _, _ = env
    expect_lba_oob(run(lun, caw_cdb(NBLOCKS - 1, 2), bytes(4 * BS)))
    expect_invalid_field_in_cdb(run(lun, caw_cdb(0, 33), bytes(66 * BS)), byte=13)
    expect_good(run(lun, caw_cdb(0, 0)))  # no blocks: nothing to do (SBC-4 5.3)
    expect_invalid_field_in_cdb(run(lun, caw_cdb(0, 0), bytes(2 * BS)), byte=13)  # yet data came
    expect_invalid_field_in_cdb(run(lun, caw_cdb(0, 1, flags=0x20), bytes(2 * BS)), byte=1)


def test_modeselect_changes_wce_only(env) -> None:  # type: ignore[no-untyped-def]
    lun, _, _ = env
    page = bytearray(run(lun, bytes([0x1A, 0x08, 0x08, 0, 255, 0])).data_in[4:])  # DBD: page only
    page[2] &= ~0x04  # WCE off
    params = bytes(4) + bytes(page)
    expect_good(run(lun, bytes([0x15, 0x10, 0, 0, len(params), 0]), params))
    assert lun.write_cache is False
    assert not run(lun, bytes([0x1A, 0x08, 0x08, 0, 255, 0])).data_in[4 + 2] & 0x04
    page[3] ^= 0xFF  # a byte that is not changeable
    bad = bytes(4) + bytes(page)
    sense = expect_sense(run(lun, bytes([0x15, 0x10, 0, 0, len(bad), 0]), bad),
                         Reason.INVALID_FIELD_IN_PARAMETER_LIST)
    assert struct.unpack_from(">H", sense, 16)[0] == 4 + 3
    expect_invalid_field_in_cdb(run(lun, bytes([0x15, 0x11, 0, 0, len(params), 0]), params), byte=1)


def test_getlbastatus(env) -> None:  # type: ignore[no-untyped-def]
    lun, _, _ = env
    cdb = bytes([0x9E, 0x12]) + struct.pack(">QI", 100, 64) + bytes(2)
    out = expect_good(run(lun, cdb)).data_in
    lba, count, status = struct.unpack_from(">QIB", out, 8)
    assert (lba, count, status) == (100, NBLOCKS - 100, 0)
    expect_lba_oob(run(lun, bytes([0x9E, 0x12]) + struct.pack(">QI", NBLOCKS, 64) + bytes(2)))


def test_commands_to_a_missing_lun() -> None:
    from lazyiscsi.scsi.dispatch import execute_no_lun

    inq = expect_good(execute_no_lun(bytes([0x12, 0, 0, 0, 36, 0]), [0])).data_in
    assert inq[0] == 0x7F
    luns = expect_good(execute_no_lun(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), [0, 1])).data_in
    assert struct.unpack_from(">I", luns)[0] == 16
    expect_sense(execute_no_lun(bytes(10).replace(b"\0", b"\x28", 1), [0]), Reason.LUN_NOT_SUPPORTED)


# -- PRE-FETCH -----------------------------------------------------------------------------------

def test_prefetch_makes_blocks_local_without_returning_data(env: tuple[Lun, bytes, LazyDisk]) -> None:
    lun, data, disk = env
    r = expect_good(run(lun, struct.pack(">BBIBHB", 0x34, 0, 64, 0, 16, 0)))  # PRE-FETCH(10)
    assert r.data_in is None
    assert list(disk.missing_runs(64 * BS, 16 * BS)) == []
    assert list(disk.missing_runs(SIZE // 2, 64 * BS)) != []  # not the whole LUN
    # IMMED: status first, the fetch follows in the background
    expect_good(run(lun, struct.pack(">BBQIBB", 0x90, 0x02, 2048, 8, 0, 0)))  # PRE-FETCH(16)
    gevent.sleep(0.1)
    assert list(disk.missing_runs(2048 * BS, 8 * BS)) == []
    # length 0 runs to the end of the LUN, of which one transfer's worth is fetched
    expect_good(run(lun, struct.pack(">BBIBHB", 0x34, 0, NBLOCKS - 4, 0, 0, 0)))
    assert list(disk.missing_runs(SIZE - 4 * BS, 4 * BS)) == []
    expect_lba_oob(run(lun, struct.pack(">BBIBHB", 0x34, 0, NBLOCKS - 1, 0, 2, 0)))
    assert bytes(expect_good(run(lun, rw("read", 10, 64, 16))).data_in or b"") == data[64 * BS:80 * BS]


# -- a live volume before and after its cutover (issue 11) ------------------------------------

#: every WRITE-type command, with its data-out: refused before the cutover
LIVE_WRITES = {
    **{f"write{n}": (rw("write", n, 1, 1), bytes(BS)) for n in (6, 10, 12, 16)},
    **{f"writeverify{n}": (rw("writeverify", n, 1, 1), bytes(BS)) for n in (10, 12, 16)},
    **{f"writesame{n}": (rw("writesame", n, 1, 2), bytes(BS)) for n in (10, 16)},
    "unmap": (unmap_cdb(24), unmap_params((1, 1))),
    "compare_and_write": (caw_cdb(1, 1), bytes(2 * BS)),
}


@pytest.fixture
def live(tmp_path: Path):  # type: ignore[no-untyped-def]
    from tests.unit.store_fakes import LiveSource

    src = LiveSource(random.Random(9).randbytes(SIZE))
    disk = LazyDisk.open(str(tmp_path / "cache"), src, autocommit_s=None, live=True)
    yield Lun(disk, "vm1", block_size=BS), src, disk
    disk.close()


@pytest.mark.parametrize("name", sorted(LIVE_WRITES))
def test_live_write_before_cutover_is_data_protect(live, name: str) -> None:  # type: ignore[no-untyped-def]
    lun, src, _ = live
    cdb, data = LIVE_WRITES[name]
    sense = expect_sense(run(lun, cdb, data), Reason.WRITE_PROTECTED)
    assert sense[2] & 0x0F == SenseKey.DATA_PROTECT and (sense[12], sense[13]) == (0x27, 0x00)
    # reads go on, and MODE SENSE does not set WP (QEMU's iSCSI driver would refuse the LUN)
    assert expect_good(run(lun, rw("read", 10, 0, 8))).data_in == bytes(src.data[:8 * BS])
    header = expect_good(run(lun, bytes([0x1A, 0, 0x3F, 0, 255, 0]))).data_in
    assert header is not None and not header[2] & 0x80


def test_live_cutover_unit_attention_once_per_nexus(live) -> None:  # type: ignore[no-untyped-def]
    from tests.unit.store_fakes import content_identity

    lun, _, disk = live
    a, b, late = "iqn.test:a", "iqn.test:b", "iqn.test:late"
    tur = bytes(6)
    for nexus in (a, b):
        expect_good(execute(lun, tur, None, nexus))
    disk.cutover(content_identity)
    for nexus in (a, b):
        # INQUIRY is exempt and leaves the attention pending; the next command reports it
        expect_good(execute(lun, bytes([0x12, 0, 0, 0, 36, 0]), None, nexus))
        expect_sense(execute(lun, rw("write", 10, 0, 1), bytes(BS), nexus), Reason.MODE_PARAMETERS_CHANGED)
        expect_good(execute(lun, rw("write", 10, 0, 1), bytes(BS), nexus))
    expect_good(execute(lun, tur, None, late))  # it never saw the LUN read-only
    assert not lun.read_only_seen
