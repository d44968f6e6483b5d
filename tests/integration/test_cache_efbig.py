"""Issue 10, defect 13a: a cache larger than its filesystem takes (64 TiB on ext4) must fail
with one line naming the size and the limit, and leave no file behind: a real ext4 with a small
file size limit (1 KiB blocks, no extents: about 16 GiB) on a loop device, and the process's
RLIMIT_FSIZE, which makes the kernel fail the same ftruncate with the same EFBIG."""

from __future__ import annotations

import os
import re
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_hydrate_cli import LAZYISCSI

MiB, GiB = 1 << 20, 1 << 30


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(size // 2)
        f.write(b"not all zeros")
    return path


def _hydrate(source: Path, cache: Path, rlimit: int | None = None) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        if rlimit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (rlimit, rlimit))

    return subprocess.run([*LAZYISCSI, "hydrate", "--source", str(source), "--cache", str(cache)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          preexec_fn=limit)


def _limit_named(r: subprocess.CompletedProcess[str], size: int) -> int:
    """The one error line must name the size and a limit; returns the limit."""
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if str(size) in line]
    assert len(lines) == 1, r.stderr
    m = re.search(r"at most (\d+) bytes", lines[0])
    assert m, lines[0]
    return int(m.group(1))


@pytest.fixture
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB ext4 with 1 KiB blocks and block maps instead of extents, loop-mounted."""
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    mnt.mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "1024", "-O", "^extent,^huge_file,^64bit", str(image)],
                   check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_cache_past_the_filesystems_largest_file(tmp_path: Path, small_ext4: Path) -> None:
    size = 32 * GiB
    source = _sparse(tmp_path / "src.img", size)
    r = _hydrate(source, small_ext4 / "vm.img")
    limit = _limit_named(r, size)
    assert "filesystem" in r.stderr
    # the limit named is the filesystem's own: a file of that size fits, one byte more does not
    probe = os.open(small_ext4 / "probe", os.O_CREAT | os.O_RDWR)
    try:
        os.ftruncate(probe, limit)
        with pytest.raises(OSError, match="too large"):
            os.ftruncate(probe, limit + 1)
    finally:
        os.close(probe)
        os.unlink(small_ext4 / "probe")
    assert 16 * GiB <= limit < size
    assert sorted(p.name for p in small_ext4.iterdir()) == ["lost+found"]


def test_cache_past_the_processs_file_size_limit(tmp_path: Path) -> None:
    size = 64 * MiB
    source = _sparse(tmp_path / "src.img", size)
    r = _hydrate(source, tmp_path / "vm.img", rlimit=16 * MiB)
    assert _limit_named(r, size) == 16 * MiB
    assert "RLIMIT_FSIZE" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.img"]
