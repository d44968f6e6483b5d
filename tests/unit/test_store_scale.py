"""The store at the sizes it is meant for (a 1 TiB LUN of 4 KiB units: a 32 MiB bitmap):
what a reopen writes, against a real file under an opener that counts the bytes; a cache
larger than the filesystem takes."""

from __future__ import annotations

import errno
import os
from collections import Counter
from pathlib import Path

import pytest

from lazyiscsi.store.cachefile import OsFile
from lazyiscsi.store.errors import CacheConfigError
from lazyiscsi.store.extentmap import PAGE_BYTES, UNITS_PER_PAGE
from lazyiscsi.store.lazydisk import LazyDisk
from tests.unit.test_verify import _ZeroSource

UNIT = 4096
TiB = 1 << 40


class _CountingFile(OsFile):
    """The real file, counting the bytes written to it by name."""

    def __init__(self, path: str, *, create: bool, opener: _CountingOpener) -> None:
        super().__init__(path, create=create)
        self._opener = opener

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        self._opener.written[os.path.basename(self.path)] += len(data)
        super().pwrite(data, offset)


class _CountingOpener:
    def __init__(self) -> None:
        self.written: Counter[str] = Counter()
        self.files: list[_CountingFile] = []

    def __call__(self, path: str, *, create: bool) -> _CountingFile:
        f = _CountingFile(path, create=create, opener=self)
        self.files.append(f)
        return f

    def kill(self) -> None:
        """The process dies: its descriptors close, nothing is committed."""
        for f in self.files:
            f.close()


def _bit(path: Path, unit: int) -> bool:
    with open(path, "rb") as f:
        f.seek(unit // 8)
        return bool(f.read(1)[0] >> (unit % 8) & 1)


def test_reopen_after_reboot_rewrites_only_changed_written_pages(tmp_path: Path) -> None:
    """Issue 10, defect 13b: reopened after a reboot with writes never flushed, the store
    dropped their .written bits by rewriting the whole file (32 MiB per TiB, 8192 page writes);
    only the pages that lose bits need writing."""
    path = tmp_path / "cache"
    source = _ZeroSource(TiB)
    first = _CountingOpener()
    disk = LazyDisk.open(str(path), source, unit=UNIT, autocommit_s=None, opener=first)
    flushed, unflushed = 10 * UNITS_PER_PAGE + 3, 5000 * UNITS_PER_PAGE + 7
    disk.write(flushed * UNIT, b"\x01" * UNIT)
    disk.flush()
    disk.write(unflushed * UNIT, b"\x02" * UNIT)  # acknowledged, never flushed
    first.kill()
    (tmp_path / "cache.boot").write_text("an earlier boot")  # the machine rebooted since
    second = _CountingOpener()
    disk = LazyDisk.open(str(path), _ZeroSource(TiB), opener=second, autocommit_s=None)
    assert second.written["cache.written"] == PAGE_BYTES  # 1f914fe: 32 MiB
    assert _bit(tmp_path / "cache.written", flushed) and not _bit(tmp_path / "cache.written", unflushed)
    assert list(disk.missing_unit_runs(unflushed, unflushed + 1)) == [(unflushed, unflushed + 1)]
    assert not list(disk.missing_unit_runs(flushed, flushed + 1))
    disk.close()


class _SmallFsFile(OsFile):
    """A real file on a filesystem whose largest file is ``LIMIT`` bytes (ext4's EFBIG)."""

    LIMIT = 16 * TiB - 4096

    def truncate(self, size: int) -> None:
        if size > self.LIMIT:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        super().truncate(size)


def test_cache_past_the_largest_file_names_both_and_keeps_the_operators_file(tmp_path: Path) -> None:
    """Issue 10, defect 13a: 64 TiB on ext4 was an internal error that left .meta behind. Now
    one error names the size and the limit; the side files go, and an empty file the operator
    made for the cache stays (tests/integration/test_cache_efbig.py does it on a real ext4)."""
    path = tmp_path / "vm.img"
    path.touch()
    with pytest.raises(CacheConfigError) as e:
        LazyDisk.open(str(path), _ZeroSource(64 * TiB), opener=_SmallFsFile, autocommit_s=None)
    assert f"{64 * TiB} bytes (64 TiB)" in str(e.value)
    assert f"at most {_SmallFsFile.LIMIT} bytes (15.999 TiB)" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.img"] and path.stat().st_size == 0
