"""The file source on real sparse files: data, holes, URL forms and errors."""

from __future__ import annotations

import random
from pathlib import Path

import gevent
import pytest

from lazyiscsi.source import SourceConfigError, SourceNotFound, open_source
from lazyiscsi.source.file import FileSource

MiB = 1 << 20


def _sparse(tmp_path: Path) -> tuple[Path, bytearray]:
    path = tmp_path / "sparse.img"
    image = bytearray(16 * MiB)
    rnd = random.Random(5)
    with open(path, "wb") as f:
        f.truncate(len(image))
        for off in (0, 5 * MiB, 15 * MiB):
            chunk = rnd.randbytes(MiB)
            f.seek(off)
            f.write(chunk)
            image[off:off + MiB] = chunk
    return path, image


@pytest.mark.parametrize("form", ["plain", "url"])
def test_reads_and_holes(tmp_path: Path, form: str) -> None:
    path, image = _sparse(tmp_path)
    src = open_source(str(path) if form == "plain" else f"file://{path}")
    assert isinstance(src, FileSource) and src.size == len(image)
    ext = src.extents(0, src.size)
    assert sum(e.length for e in ext) == src.size and ext[0].offset == 0
    assert [(e.offset, e.length, e.zero) for e in ext if not e.zero] == [
        (0, MiB, False), (5 * MiB, MiB, False), (15 * MiB, MiB, False)]
    rnd = random.Random(1)

    def check() -> None:
        for _ in range(50):
            off = rnd.randrange(src.size - 70000)
            n = rnd.randrange(1, 70000)
            assert src.read(off, n) == image[off:off + n]

    gevent.joinall([gevent.spawn(check) for _ in range(4)], raise_error=True)
    # a range inside a hole, and one that starts in data and ends in a hole
    assert src.extents(2 * MiB, MiB)[0].zero
    part = src.extents(MiB - 4096, 8192)
    assert [(e.length, e.zero) for e in part] == [(4096, False), (4096, True)]
    src.close()


def test_identity_follows_content(tmp_path: Path) -> None:
    path, _ = _sparse(tmp_path)
    first = open_source(str(path)).identity
    assert open_source(str(path)).identity == first
    with open(path, "r+b") as f:
        f.write(b"changed")
    assert open_source(str(path)).identity != first


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFound, match="no such file"):
        open_source(str(tmp_path / "missing"))
    with pytest.raises(SourceConfigError, match="directory"):
        open_source(str(tmp_path))
    with pytest.raises(SourceConfigError, match="local path"):
        open_source("file://otherhost/x")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(SourceConfigError, match="empty"):
        open_source(str(tmp_path / "empty"))
