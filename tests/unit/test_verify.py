"""``verify`` against a source: a planted corruption in the cache is found to the unit, guest
writes are not mistaken for corruption (also after a reopen), missing units are skipped."""

from __future__ import annotations

import random
from pathlib import Path

from lazyiscsi.store.lazydisk import LazyDisk
from lazyiscsi.store.verify import verify
from tests.unit.store_fakes import InstantSource

UNIT = 4096
SIZE = 3 << 20


def test_verify_finds_planted_corruption_and_skips_guest_writes(tmp_path: Path) -> None:
    data = random.Random(5).randbytes(SIZE)
    source = InstantSource(data)
    path = str(tmp_path / "cache")
    disk = LazyDisk.open(path, source, unit=UNIT, autocommit_s=None)
    disk.populate(0, 2 << 20)  # the first 2 MiB are local, the last 1 MiB is not
    disk.write(100 * UNIT + 10, b"guest")  # a guest write: differs from the source, legitimately
    disk.discard(200 * UNIT, 2 * UNIT)
    disk.close()
    with open(path, "r+b") as f:  # bit rot under the cache, where the guest never wrote
        f.seek(300 * UNIT + 7)
        f.write(b"\xff\xfe")
        f.seek(301 * UNIT)
        f.write(b"\x00" * 3)
    disk = LazyDisk.open(path, InstantSource(data), autocommit_s=None)
    seen: list[tuple[int, int]] = []
    report = verify(disk, InstantSource(data), progress=lambda done, total: seen.append((done, total)))
    assert report.mismatches == [(300 * UNIT, 2 * UNIT)]  # the two adjacent units, merged
    assert report.skipped_written == 3 * UNIT  # the unit written and the two discarded
    assert report.skipped_missing == 1 << 20
    assert report.compared == (2 << 20) - 3 * UNIT
    assert seen[-1] == (SIZE, SIZE)
    disk.close()


def test_verify_of_a_clean_copy_reports_nothing(tmp_path: Path) -> None:
    data = random.Random(6).randbytes(SIZE)
    disk = LazyDisk.open(str(tmp_path / "cache"), InstantSource(data), unit=UNIT, autocommit_s=None)
    disk.populate(0, SIZE)
    report = verify(disk, InstantSource(data))
    assert report.mismatches == [] and report.compared == SIZE and report.skipped_missing == 0
    disk.close()
