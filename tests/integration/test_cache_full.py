"""The cache on a filesystem that fills up (a tmpfs mounted with a size limit): the guest gets
the sense codes of SBC-4's thin provisioning, never an internal error with a traceback, and a
read whose data could not be stored is not blamed on the source (issue 10, defect 9)."""

from __future__ import annotations

import contextlib
import os
import random
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from lazyiscsi.scsi.dispatch import Result, execute
from lazyiscsi.scsi.lun import Lun
from lazyiscsi.scsi.sense import SENSE_TABLE, Reason, Status
from lazyiscsi.store.errors import StoreError
from lazyiscsi.store.lazydisk import LazyDisk
from tests.unit.store_fakes import InstantSource

BS = 512
LUN_SIZE = 8 << 20
#: the filesystem under the cache: room for the side files and about 1 MiB of data
FS_SIZE = "1m"
CHUNK = 128 * 1024


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE}", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs (the test needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _cdb(op: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", op, 0, lba, 0, blocks, 0)


def _sense(r: Result) -> tuple[int, int, int]:
    assert r.status is Status.CHECK_CONDITION and r.sense is not None
    return r.sense[2] & 0x0F, r.sense[12], r.sense[13]


def test_cache_full_write_is_space_allocation_failed_and_read_is_not_the_sources(small_fs: Path) -> None:
    data = random.Random(5).randbytes(LUN_SIZE)
    disk = LazyDisk.open(str(small_fs / "cache"), InstantSource(data), autocommit_s=None)
    lun = Lun(disk, "vm1", block_size=BS)
    payload = random.Random(6).randbytes(CHUNK)
    with capture_logs() as logs:
        failed: Result | None = None
        for lba in range(0, LUN_SIZE // 2 // BS, CHUNK // BS):
            r = execute(lun, _cdb(0x2A, lba, CHUNK // BS), payload, "i")  # WRITE(10)
            if r.status is not Status.GOOD:
                failed = r
                break
        assert failed is not None, "4 MiB fitted in a 1 MiB filesystem"
        # SBC-4 4.7.3.7: DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT
        assert _sense(failed) == SENSE_TABLE[Reason.SPACE_ALLOCATION_FAILED] == (0x7, 0x27, 0x07)
        # a read of data still at the source: fetched, but it cannot be stored
        r = execute(lun, _cdb(0x28, LUN_SIZE // BS - 256, 256), None, "i")  # READ(10), last 128 KiB
        assert _sense(r) == SENSE_TABLE[Reason.CACHE_WRITE_FAULT]
        assert _sense(r)[0] != 0x3, "a full cache was reported as a medium error (the source's)"
        # what was written before the filesystem filled reads back
        r = execute(lun, _cdb(0x28, 0, CHUNK // BS), None, "i")
        assert r.status is Status.GOOD and bytes(r.data_in) == payload
    events = [e["event"] for e in logs]
    assert "scsi_internal_error" not in events, "ENOSPC surfaced as an internal error"
    assert not any(e.get("exc_info") for e in logs), "a traceback was logged"
    assert "cache_io_failed" in events
    # the map's pages have their blocks since the open: the full filesystem costs the writes
    # that need new cache blocks, not the volume (a commit used to fail-stop it for a map page)
    assert not any(e["event"] == "cache_failed" for e in logs)
    r = execute(lun, bytes([0x35]) + bytes(9), None, "i")  # SYNCHRONIZE CACHE(10)
    assert r.status is Status.GOOD, r.sense
    disk.close()
    disk = LazyDisk.open(str(small_fs / "cache"), InstantSource(data), autocommit_s=None)
    try:
        assert disk.read(0, CHUNK) == payload, "an acknowledged write was lost at the close"
        assert disk.local_bytes >= CHUNK
    finally:
        disk.close()


def test_a_filesystem_too_full_for_the_map_fails_the_open_in_one_line(small_fs: Path) -> None:
    """The map's blocks are taken at the open: where there is no room for them the open fails,
    naming the file and the reason, and a cache it was creating is removed again."""
    data = bytes(64 << 20)  # a 64 MiB LUN in 512-byte units: a 16 KiB map, a 16 KiB .written
    fd = os.open(small_fs / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):  # ENOSPC: the filesystem is full
            while True:
                os.write(fd, bytes(4096))
        os.ftruncate(fd, os.fstat(fd).st_size - 16 * 1024)  # room for .meta, not for the map
    finally:
        os.close(fd)
    with capture_logs() as logs, pytest.raises(StoreError, match=r"cache\.(map|written): cannot allocate"):
        LazyDisk.open(str(small_fs / "cache"), InstantSource(data), unit=BS, autocommit_s=None)
    assert not any(e.get("exc_info") for e in logs)
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"], "a failed creation left files"
