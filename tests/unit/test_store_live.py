"""The store's live-migration phases (issue 11) with a live source faked below the store
(``store_fakes.LiveSource``: a VM still writes to it, and a cumulative dirty bitmap records
it). The integration tests replay the same with a real qemu-storage-daemon."""

from __future__ import annotations

import random
from pathlib import Path

import gevent
import pytest

from lazyiscsi.source.base import Priority
from lazyiscsi.store import lazydisk
from lazyiscsi.store.errors import CutoverRefused, WriteProtected
from lazyiscsi.store.hotspots import NEIGHBOURHOOD
from lazyiscsi.store.hydrator import Hydrator, JobState
from lazyiscsi.store.lazydisk import LazyDisk
from lazyiscsi.store.superblock import Phase, read_superblock
from tests.unit.store_fakes import Gate, LiveSource, content_identity, settle

UNIT = 4096
SIZE = 64 * UNIT


def _data(seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(SIZE)


def _open(tmp_path: Path, source: LiveSource, **kw) -> LazyDisk:  # type: ignore[no-untyped-def]
    return LazyDisk.open(str(tmp_path / "cache"), source, unit=UNIT, autocommit_s=None, live=True, **kw)


def _wait(cond, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    with gevent.Timeout(timeout):
        while not cond():
            gevent.sleep(0.01)


@pytest.mark.parametrize("bitmap", [None, "mig"])
def test_writes_refused_before_cutover_land_after(tmp_path: Path, bitmap: str | None) -> None:
    src = LiveSource(_data(), bitmap=bitmap)
    disk = _open(tmp_path, src)
    assert disk.phase is Phase.PRE_COPY and not disk.writable
    for call in (lambda: disk.write(0, b"x" * UNIT), lambda: disk.discard(0, UNIT),
                 lambda: disk.write_zeroes(0, 100)):
        with pytest.raises(WriteProtected):
            call()
    disk.cutover(content_identity)
    assert disk.phase is Phase.POST_COPY and disk.writable
    disk.write(0, b"x" * UNIT)
    assert disk.read(0, UNIT) == b"x" * UNIT
    assert bytes(src.data[:UNIT]) != b"x" * UNIT  # the source never sees the destination's writes
    disk.close()


def test_without_bitmap_reads_pass_through_and_nothing_is_cached(tmp_path: Path) -> None:
    src = LiveSource(_data(), bitmap=None)
    disk = _open(tmp_path, src)
    job = Hydrator(disk, run_size=8 * UNIT)
    job.start()
    assert disk.read(UNIT, UNIT) == bytes(src.data[UNIT:2 * UNIT])
    src.vm_write(UNIT, b"v" * UNIT)
    assert disk.read(UNIT, UNIT) == b"v" * UNIT  # not a cached copy: the source's bytes now
    buf = bytearray(UNIT)
    disk.readinto(UNIT, memoryview(buf))
    assert buf == b"v" * UNIT
    settle()
    assert disk.local_bytes == 0 and job.state is JobState.RUNNING  # the copy waits
    src.vm_write(5 * UNIT, b"w" * 10)
    disk.cutover(content_identity)
    assert job.wait(30) and job.state is JobState.COMPLETED
    assert disk.read(0, SIZE) == bytes(src.data)
    disk.close()


def test_precopy_skips_dirty_units_and_cutover_invalidates_stale_copies(tmp_path: Path) -> None:
    src = LiveSource(_data())
    src.vm_write(10 * UNIT, b"a" * UNIT)  # dirty before the copy starts: never copied
    disk = _open(tmp_path, src)
    _wait(lambda: src.bitmap_queries > 0)
    job = Hydrator(disk, run_size=8 * UNIT)
    job.start()
    _wait(lambda: disk.local_bytes == SIZE - UNIT)  # every clean unit, not the dirty one
    assert not disk.complete and job.state is JobState.RUNNING
    assert disk.stats().dirty_bytes == UNIT
    # the VM writes units already copied, and finishes; a reader sees the stale copy meanwhile
    src.vm_write(20 * UNIT + 7, b"b" * 9)
    src.vm_write(30 * UNIT, b"c" * 2 * UNIT)
    report = disk.cutover(content_identity)
    assert report.dirty_bytes == 4 * UNIT
    assert report.invalidated_bytes == 3 * UNIT  # unit 10 was never local
    assert report.not_reached_bytes == 0
    assert job.wait(30) and job.state is JobState.COMPLETED
    assert disk.read(0, SIZE) == bytes(src.data)
    st = disk.stats()
    assert st.fetched_after_cutover is not None and st.dirty_at_cutover is not None
    assert st.fetched_after_cutover <= st.dirty_at_cutover + st.not_reached
    assert st.fetched_after_cutover == 4 * UNIT
    disk.close()
    sb = read_superblock(str(tmp_path / "cache.meta"))
    assert sb is not None and sb.source_identity == content_identity(src)
    assert sb.fetched_after_cutover == 4 * UNIT


def test_dirty_bytes_and_rate_from_the_polls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lazydisk, "DIRTY_POLL_INTERVAL", 0.05)
    src = LiveSource(_data())
    disk = _open(tmp_path, src)
    _wait(lambda: src.bitmap_queries > 0)
    assert disk.stats().dirty_bytes == 0
    src.vm_write(0, b"d" * 4 * UNIT)
    _wait(lambda: disk.stats().dirty_bytes == 4 * UNIT)
    rate = disk.stats().dirty_rate_bps
    assert rate is not None and rate > 0
    disk.close()


def test_a_frozen_volume_has_nothing_to_cut_over(tmp_path: Path) -> None:
    disk = LazyDisk.open(str(tmp_path / "cache"), LiveSource(_data()), unit=UNIT, autocommit_s=None)
    assert disk.writable and disk.stats().dirty_bytes is None
    with pytest.raises(CutoverRefused, match="not a live volume"):
        disk.cutover(content_identity)
    disk.close()


def test_restart_in_precopy_stays_live(tmp_path: Path) -> None:
    src = LiveSource(_data())
    disk = _open(tmp_path, src)
    disk.read(0, UNIT)
    disk.close()
    again = LazyDisk.open(str(tmp_path / "cache"), LiveSource(bytes(src.data)), unit=UNIT,
                          autocommit_s=None)  # no live=True: the superblock says so
    assert again.phase is Phase.PRE_COPY and not again.writable
    with pytest.raises(WriteProtected):
        again.write(0, b"x")
    again.close()


def test_refused_cutover_leaves_the_volume_as_it_was(tmp_path: Path) -> None:
    src = LiveSource(_data())
    disk = _open(tmp_path, src)
    disk.read(0, 4 * UNIT)
    src.vm_write(0, b"z")
    meta = (tmp_path / "cache.meta").read_bytes()
    local = disk.local_bytes
    src.down = True
    with pytest.raises(CutoverRefused, match="nothing changed"):
        disk.cutover(content_identity)
    assert (tmp_path / "cache.meta").read_bytes() == meta
    assert disk.local_bytes == local and disk.phase is Phase.PRE_COPY
    with pytest.raises(WriteProtected):
        disk.write(0, b"x")
    src.down = False
    disk.cutover(content_identity)
    with pytest.raises(CutoverRefused, match="already cut over"):
        disk.cutover(content_identity)
    assert disk.read(0, UNIT) == bytes(src.data[:UNIT])
    disk.close()


def test_crash_during_cutover_is_redone_by_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process dies after the invalidation was committed, before the post-copy phase was
    written: reopened, the volume is still before its cutover, and a new cutover finishes."""
    src = LiveSource(_data())
    disk = _open(tmp_path, src)
    disk.read(0, SIZE)
    src.vm_write(3 * UNIT, b"n" * UNIT)
    real = lazydisk.write_superblock

    def die_at_post_copy(path: str, sb) -> None:  # type: ignore[no-untyped-def]
        if sb.phase is Phase.POST_COPY:
            raise SystemExit("killed")
        real(path, sb)

    monkeypatch.setattr(lazydisk, "write_superblock", die_at_post_copy)
    with pytest.raises(SystemExit):
        disk.cutover(content_identity)
    monkeypatch.setattr(lazydisk, "write_superblock", real)
    # the process is gone: no close, no commit; its file locks go with it
    disk._fetcher.close()
    disk._poller.kill()
    for f in (disk._cache, disk._mapfile, disk._writtenfile):
        f.close()
    again = LazyDisk.open(str(tmp_path / "cache"), src, unit=UNIT, autocommit_s=None)
    assert again.phase is Phase.CUTOVER and not again.writable
    again.cutover(content_identity)
    assert again.writable
    assert again.read(0, SIZE) == bytes(src.data)
    again.close()


def test_fetch_in_flight_at_cutover_does_not_land_stale(tmp_path: Path) -> None:
    """A read asked before the VM's last write, answered after the cutover: its bytes for
    the unit the final bitmap marks dirty are dropped and fetched again."""
    gate = Gate()
    src = LiveSource(_data(), gate=gate)
    gate.passthrough = True
    disk = _open(tmp_path, src)
    gate.passthrough = False
    early = gevent.spawn(disk.populate, 0, 2 * UNIT)  # the background copy of units 0-1
    settle()
    assert len(gate.parked) == 1
    src.vm_write(UNIT, b"n" * UNIT)  # after the copy's read was answered at the source
    disk.cutover(content_identity)
    gate.release(0)  # the stale reply lands now
    settle()
    early.join(5)
    assert disk.read(0, UNIT) == bytes(src.data[:UNIT])  # unit 0 was clean: kept
    reader = gevent.spawn(disk.read, UNIT, UNIT)
    settle()
    while gate.parked:
        gate.release(0)
        settle()
    assert reader.get(timeout=5) == b"n" * UNIT
    disk.close()


class _LoggedLiveSource(LiveSource):
    """Records every read that reaches the source: (offset, length, priority)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.log: list[tuple[int, int, str]] = []

    def read(self, offset, length, priority=Priority.FOREGROUND):  # type: ignore[no-untyped-def]
        self.log.append((offset, length, priority.value))
        return super().read(offset, length, priority)


def test_hot_first_copy_keeps_the_precopy_rules(tmp_path: Path) -> None:
    """Issue 15: runs copied where the guest reads go through the one fill path, so pre-copy
    still leaves out the units the bitmap reports dirty, and no unit is read twice."""
    size = 1024 * UNIT
    src = _LoggedLiveSource(random.Random(3).randbytes(size))
    hot = 900 * UNIT
    src.vm_write(hot + 40 * UNIT, b"d" * UNIT)  # dirty, in the neighbourhood of the miss below
    disk = _open(tmp_path, src)
    _wait(lambda: src.bitmap_queries > 0)
    job = Hydrator(disk, run_size=64 * UNIT)
    disk.read(hot, UNIT)  # a miss far from where LBA order starts
    job.start()
    _wait(lambda: disk.local_bytes == size - UNIT)  # every clean unit, not the dirty one
    background = [o for o, _, p in src.log if p == "background"]
    region = hot - hot % NEIGHBOURHOOD
    assert region <= background[0] < region + NEIGHBOURHOOD, "the miss's neighbourhood was not first"
    assert job.query().hot_bytes > 0
    units = [u for o, n, _ in src.log for u in range(o // UNIT, (o + n) // UNIT)]
    assert len(units) == len(set(units)), "a unit was read from the source twice"
    assert hot // UNIT + 40 not in units  # dirty: left for after the cutover
    job.cancel()
    disk.close()
