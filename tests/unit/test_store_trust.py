"""Regression tests for issue 10 ("store trust"): each names its defect. The schedules are
spelled out step by step on the gate below the store (``store_fakes.Gate``): every cache write,
writeback start, fdatasync and source reply waits there until the test lets it go."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import gevent
import pytest
from structlog.testing import capture_logs

from lazyiscsi.scsi.sense import SENSE_TABLE, Reason, SenseKey, reason_for_store_error
from lazyiscsi.source.base import Priority, SourceReadError, SourceUnavailable
from lazyiscsi.store.errors import (
    CacheFailed,
    CacheFull,
    SourceChangedError,
    SourceIOError,
    SourceTimeout,
    SourceUnreachable,
    StoreError,
)
from lazyiscsi.store.fetch import RetryPolicy
from lazyiscsi.store.hydrator import Hydrator, JobState
from lazyiscsi.store.lazydisk import LazyDisk
from tests.unit.store_fakes import Gate, GatedDisk, GatedSource, InstantSource, Parked, settle

UNIT = 512
N_UNITS = 8


def _data(n_units: int = N_UNITS, seed: int = 3) -> bytes:
    import random

    return random.Random(seed).randbytes(n_units * UNIT).replace(b"\0", b"\1")


class Rig:
    """A LazyDisk over gated files and a gated source."""

    def __init__(self, tmp: Path, *, n_units: int = N_UNITS, readahead_units: int = 1,
                 retry: RetryPolicy | None = None) -> None:
        self.gate = Gate()
        self.files = GatedDisk(self.gate)
        self.data = _data(n_units)
        self.source = GatedSource(self.gate, self.data)
        self.path = str(tmp / "cache")
        self.gate.passthrough = True
        self.disk = LazyDisk.open(self.path, self.source, unit=UNIT, readahead=readahead_units * UNIT,
                                  io_timeout=30, autocommit_s=None,
                                  retry=retry or RetryPolicy(attempts=2, first_delay=0), opener=self.files)
        self.gate.passthrough = False

    def reopen(self) -> None:
        """The process dies (nothing of it runs on) and a new one opens the same files."""
        self.gate.passthrough = True
        self.source = GatedSource(self.gate, self.data)
        self.disk = LazyDisk.open(self.path, self.source, unit=UNIT, readahead=UNIT, io_timeout=30,
                                  autocommit_s=None, retry=RetryPolicy(attempts=2, first_delay=0),
                                  opener=self.files)
        self.gate.passthrough = False

    def file(self, suffix: str):  # type: ignore[no-untyped-def]
        return self.files.files[self.path + suffix]

    def run_until(self, done: Callable[[], bool], hold: Callable[[Parked], bool] = lambda p: False,
                  error: Callable[[Parked], BaseException | None] = lambda p: None, *,
                  newest_first: bool = False) -> None:
        """Let parked operations go, oldest first, skipping those ``hold`` keeps, until ``done``."""
        for _ in range(1000):
            settle()
            if done():
                return
            order = reversed(self.gate.parked) if newest_first else iter(self.gate.parked)
            p = next((p for p in order if not hold(p)), None)
            assert p is not None, f"nothing left to release, still parked: {self.gate.parked}"
            self.gate.release(self.gate.parked.index(p), error(p))
        raise AssertionError("schedule did not finish")

    def finish(self, g: gevent.Greenlet):  # type: ignore[no-untyped-def]
        self.run_until(g.ready)
        return g.get()

    def parked(self, kind: str) -> bool:
        return any(p.kind == kind for p in self.gate.parked)


def test_fill_never_overwrites_a_guest_write_landed_between_its_runs(tmp_path: Path) -> None:
    """Issue 10, defect 1: a fill yields between its runs (writeback start goes to the thread
    pool); a guest write landing then must not be overwritten by the fill's next run."""
    rig = Rig(tmp_path)
    fill = gevent.spawn(rig.disk.populate, 0, 4 * UNIT)
    settle()
    # a guest write to unit 1 while the fetch is in flight splits the fill into two runs
    w1 = gevent.spawn(rig.disk.write, 1 * UNIT, b"A" * UNIT)
    rig.run_until(w1.ready, hold=lambda p: p.kind == "source")
    w1.get()
    # the source answers; the fill writes its first run and yields at writeback start
    rig.run_until(lambda: rig.parked("writeback"))
    w2 = gevent.spawn(rig.disk.write, 2 * UNIT, b"B" * UNIT)
    rig.run_until(w2.ready, hold=lambda p: p.kind == "writeback")
    w2.get()
    rig.finish(fill)
    got = rig.finish(gevent.spawn(rig.disk.read, 0, 4 * UNIT))
    assert got[UNIT:2 * UNIT] == b"A" * UNIT
    assert got[2 * UNIT:3 * UNIT] == b"B" * UNIT, "the fetch overwrote an acknowledged guest write"
    assert got[3 * UNIT:] == rig.data[3 * UNIT:4 * UNIT]


def test_zero_marking_never_punches_a_guest_write(tmp_path: Path) -> None:
    """Issue 10, defect 1 (the hydrator's other writer): ``mark_zero`` punches run by run and
    yields at each punch; a guest write landing meanwhile is kept."""
    rig = Rig(tmp_path)
    rig.run_until(lambda: True)
    w0 = gevent.spawn(rig.disk.write, 1 * UNIT, b"A" * UNIT)
    rig.finish(w0)
    mark = gevent.spawn(rig.disk.mark_zero, 0, 4 * UNIT)
    settle()  # punching unit 0
    w = gevent.spawn(rig.disk.write, 2 * UNIT, b"B" * UNIT)
    rig.run_until(w.ready)
    rig.finish(mark)
    got = rig.finish(gevent.spawn(rig.disk.read, 0, 4 * UNIT))
    assert got[2 * UNIT:3 * UNIT] == b"B" * UNIT, "zero marking punched an acknowledged guest write"


def test_failed_cache_sync_is_fail_stop(tmp_path: Path) -> None:
    """Issue 10, defect 2: after a failed fdatasync (Linux reports it once, then the next one
    succeeds without the data) every later flush and write fails, the map never vouches for
    the lost data, and the failure is one log event."""
    rig = Rig(tmp_path)
    rig.finish(gevent.spawn(rig.disk.write, 0, b"W" * UNIT))
    rig.file("").sync_errors = 1
    with capture_logs() as logs:
        with pytest.raises(StoreError):
            rig.finish(gevent.spawn(rig.disk.flush))
        for _ in range(2):
            with pytest.raises(StoreError):
                rig.finish(gevent.spawn(rig.disk.flush))
            with pytest.raises(StoreError):
                rig.finish(gevent.spawn(rig.disk.write, UNIT, b"X" * UNIT))
            with pytest.raises(StoreError):
                rig.finish(gevent.spawn(rig.disk.discard, 0, 2 * UNIT))
    assert rig.disk.failed
    mapped = rig.file(".map").durable
    assert not any(mapped), "the map vouches for data whose fdatasync failed"
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["cache_failed"]
    # local data stays readable (read-only-failed); a successor in this boot adopts nothing
    assert rig.finish(gevent.spawn(rig.disk.read, 0, UNIT)) == b"W" * UNIT
    assert rig.file(".boot").view == b""
    rig.finish(gevent.spawn(rig.disk.close))


def test_written_pages_never_land_out_of_order(tmp_path: Path) -> None:
    """Found by the schedule model (issue 10): two guest writes record their units in .written;
    if the second one's page image lands first and the first one's (older) image after it, the
    second write's bit is gone, and a successor in this boot refetches an acknowledged write."""
    rig = Rig(tmp_path)
    w1 = gevent.spawn(rig.disk.write, 1 * UNIT, b"A" * UNIT)
    w2 = gevent.spawn(rig.disk.write, 4 * UNIT, b"B" * UNIT)
    settle()
    for _ in range(2):  # w1 then w2 write their data, then record their units in .written
        i = next(i for i, p in enumerate(rig.gate.parked) if p.where == "cache" and p.kind == "pwrite")
        rig.gate.release(i)
        settle()
    rig.run_until(lambda: w1.ready() and w2.ready(), newest_first=True)
    bits = rig.file(".written").view[0]
    assert bits == 0b10010, f".written holds {bits:#x}: an older page image landed last"


def test_successor_of_a_failed_sync_serves_the_medium(tmp_path: Path) -> None:
    """Found by the schedule model (issue 10, defect 2): after a failed fdatasync the page cache
    holds pages that never reached the medium (Linux marks them clean). A successor in the same
    boot that served them, then flushed (nothing to sync), lost them at the next power loss:
    it must serve what the medium holds."""
    rig = Rig(tmp_path)
    rig.finish(gevent.spawn(rig.disk.write, 0, b"1" * UNIT))
    rig.finish(gevent.spawn(rig.disk.flush))
    rig.finish(gevent.spawn(rig.disk.write, 0, b"2" * UNIT))
    rig.file("").sync_errors = 1
    with pytest.raises(StoreError):
        rig.finish(gevent.spawn(rig.disk.flush))
    rig.reopen()  # killed; the same boot
    served = rig.finish(gevent.spawn(rig.disk.read, 0, UNIT))
    rig.finish(gevent.spawn(rig.disk.flush))
    import random

    for f in rig.files.files.values():
        f.crash(random.Random(1))  # power loss
    rig.reopen()
    after = rig.finish(gevent.spawn(rig.disk.read, 0, UNIT))
    assert after == served, "data served and flushed after the failure was not on the medium"


def test_waiter_succeeds_when_the_guest_wrote_the_unit_of_a_failed_fetch(tmp_path: Path) -> None:
    """Issue 10, defect 10: a read whose unit the guest wrote while the fetch was failing gets
    the guest's data, not the fetch's error."""
    rig = Rig(tmp_path)
    reader = gevent.spawn(rig.disk.read, 0, UNIT)
    settle()
    writer = gevent.spawn(rig.disk.write, 0, b"W" * UNIT)
    rig.run_until(writer.ready, hold=lambda p: p.kind == "source")
    eio = SourceReadError("injected EIO")
    rig.run_until(reader.ready, error=lambda p: eio if p.kind == "source" else None)
    assert reader.get() == b"W" * UNIT


def test_retry_after_completion_dropped_the_source(tmp_path: Path) -> None:
    """Issue 10, defect 10: while a fetch waits to retry, guest writes complete the cache and
    ``_finish`` lets the source go; the retry must see there is nothing left to fetch (it died
    with AttributeError on None)."""
    rig = Rig(tmp_path, n_units=2, retry=RetryPolicy(attempts=3, first_delay=0.3))
    reader = gevent.spawn(rig.disk.read, 0, UNIT)
    settle()
    rig.gate.release(0, SourceUnavailable("injected: no answer"))  # the flight sleeps 0.3 s
    writer = gevent.spawn(rig.disk.write, 0, b"W" * 2 * UNIT)
    rig.run_until(lambda: writer.ready() and rig.disk.source is None)
    writer.get()
    assert reader.get(timeout=5) == b"W" * UNIT


def test_hydrator_cancel_right_after_start_does_not_hang(tmp_path: Path) -> None:
    """Issue 10, defect 11: cancelled before its greenlet ran, the job's ``finally`` never ran
    and ``wait`` hung for ever."""
    disk = LazyDisk.open(str(tmp_path / "cache"), InstantSource(_data()), unit=UNIT, autocommit_s=None)
    job = Hydrator(disk, run_size=UNIT)
    job.start()
    job.cancel()
    assert job.wait(5), "cancel right after start left wait() hanging"
    assert job.state is JobState.CANCELLED
    disk.close()


def test_close_in_the_same_hub_turn_as_a_miss_wakes_the_reader(tmp_path: Path) -> None:
    """Issue 10, defect 11: ``close`` killed the miss's fetch before it started; its ``finally``
    never ran and the reader waited its whole I/O timeout (30 s) instead of failing at once."""
    disk = LazyDisk.open(str(tmp_path / "cache"), InstantSource(_data()), unit=UNIT,
                         io_timeout=30, autocommit_s=None)
    reader = gevent.spawn(disk.read, 0, UNIT)
    closer = gevent.spawn(disk.close)  # runs right after the reader spawned the fetch
    t0 = time.monotonic()
    reader.join(timeout=5)
    assert reader.ready(), "the reader was not woken by close"
    assert isinstance(reader.exception, StoreError)
    assert time.monotonic() - t0 < 5
    closer.get(timeout=5)


def test_create_never_reuses_old_side_files(tmp_path: Path) -> None:
    """Issue 10, defect 7: a cache deleted with its .meta (to start over from another source)
    left its .map and .written behind; the new cache took them for its own and served holes
    as local data: a silent mix of two disks."""
    path = str(tmp_path / "cache")
    first = _data(seed=1)
    disk = LazyDisk.open(path, InstantSource(first), unit=UNIT, autocommit_s=None)
    disk.read(0, 4 * UNIT)
    disk.write(5 * UNIT, b"G" * UNIT)
    disk.close()
    os.unlink(path)
    os.unlink(path + ".meta")
    second = _data(seed=2)
    disk = LazyDisk.open(path, InstantSource(second), unit=UNIT, autocommit_s=None)
    assert disk.local_bytes == 0
    assert disk.read(0, len(second)) == second, "the new cache served the old cache's map"
    assert list(disk.verifiable_runs(0, N_UNITS)) == [(0, N_UNITS)], "the old .written was kept"
    disk.close()


def test_foreground_miss_inside_a_background_run_sends_its_own_read(tmp_path: Path) -> None:
    """Issue 10, defect 8: a guest miss on a unit inside a background flight joined it and
    waited for the whole run. It must send its own foreground read and finish while the
    background run is still outstanding."""
    rig = Rig(tmp_path)
    bg = gevent.spawn(rig.disk.populate, 0, N_UNITS * UNIT)
    settle()
    reader = gevent.spawn(rig.disk.read, 5 * UNIT, UNIT)
    settle()
    fg_reads = [p for p in rig.gate.parked if p.kind == "source" and p.where == Priority.FOREGROUND.value]
    assert [(p.offset, p.length) for p in fg_reads] == [(5 * UNIT, UNIT)], \
        "the miss waits for the background run instead of reading its unit"
    rig.run_until(reader.ready, hold=lambda p: p.kind == "source" and p.where == "background")
    assert reader.get() == rig.data[5 * UNIT:6 * UNIT]
    rig.finish(bg)
    assert rig.finish(gevent.spawn(rig.disk.read, 0, N_UNITS * UNIT)) == rig.data


class _SlowBackground(InstantSource):
    """Background reads take ``bg_s``, foreground ones ``fg_s`` (separate connections)."""

    def __init__(self, data: bytes, fg_s: float, bg_s: float) -> None:
        super().__init__(data)
        self.fg_s, self.bg_s = fg_s, bg_s

    def read(self, offset: int, length: int, priority: Priority = Priority.FOREGROUND) -> bytes:
        gevent.sleep(self.fg_s if priority is Priority.FOREGROUND else self.bg_s)
        return super().read(offset, length, priority)


def test_miss_latency_inside_a_background_run(tmp_path: Path) -> None:
    """Issue 10, defect 8, timed: a 4 KiB miss inside a 1 MiB background run that takes 2 s
    answers in about the foreground delay."""
    data = _data(2048)
    disk = LazyDisk.open(str(tmp_path / "cache"), _SlowBackground(data, fg_s=0.02, bg_s=2.0),
                         autocommit_s=None)
    bg = gevent.spawn(disk.populate, 0, 1 << 20)
    gevent.sleep(0.05)
    t0 = time.monotonic()
    assert disk.read(512 * 1024, 4096) == data[512 * 1024:512 * 1024 + 4096]
    assert time.monotonic() - t0 < 1.0, "the miss waited for the background run"
    bg.get(timeout=10)
    disk.close()


def test_a_miss_is_answered_while_writeback_is_stuck(tmp_path: Path) -> None:
    """Issue 10, acceptance 5: a guest's miss must not wait for the thread pool after its data
    arrived. Writeback start (``sync_file_range`` in gevent's pool, whose ``spawn`` waits for a
    free thread while the copier keeps it busy) held for ever: the read still completes, and a
    background fill still starts writeback for what it wrote."""
    rig = Rig(tmp_path)
    reader = gevent.spawn(rig.disk.read, 0, UNIT)
    rig.run_until(reader.ready, hold=lambda p: p.kind == "writeback")
    assert reader.value == rig.data[:UNIT]
    assert not [p for p in rig.gate.parked if p.kind == "writeback"]
    copier = gevent.spawn(rig.disk.populate, UNIT, UNIT)
    settle()
    rig.run_until(lambda: any(p.kind == "writeback" for p in rig.gate.parked),
                  hold=lambda p: p.kind == "writeback")
    assert not copier.ready()  # a background fill hands its writeback over first
    rig.run_until(copier.ready)


@pytest.mark.parametrize(("error", "expect"), [
    (SourceUnavailable("no answer"), SourceUnreachable),
    (SourceReadError("EIO"), SourceIOError),
])
def test_source_failure_reasons(tmp_path: Path, error: Exception, expect: type) -> None:
    """Issue 10, defect 9: a source that does not answer fails the read as unreachable (NOT
    READY, whatever the protocol); one that answers with an error as a read error."""
    rig = Rig(tmp_path)
    reader = gevent.spawn(rig.disk.read, 0, UNIT)
    rig.run_until(reader.ready, error=lambda p: error if p.kind == "source" else None)
    assert type(reader.exception) is expect


@pytest.mark.parametrize(("error", "writing", "reason"), [
    (SourceUnreachable("x"), False, Reason.SOURCE_UNREACHABLE),
    (SourceTimeout("x"), False, Reason.SOURCE_UNREACHABLE),
    (SourceUnreachable("x"), True, Reason.SOURCE_UNREACHABLE),
    (SourceIOError("x"), False, Reason.UNRECOVERED_READ_ERROR),
    (SourceChangedError("x"), False, Reason.SOURCE_CHANGED),
    (SourceChangedError("x"), True, Reason.SOURCE_CHANGED),
    (CacheFull("x"), True, Reason.SPACE_ALLOCATION_FAILED),
    (CacheFull("x"), False, Reason.CACHE_WRITE_FAULT),
    (CacheFailed("x"), True, Reason.WRITE_ERROR),
])
def test_store_errors_map_to_one_sense_each(error: StoreError, writing: bool, reason: Reason) -> None:
    """Issue 10, defect 9: one table; unreachable is NOT READY / LOGICAL UNIT NOT READY however
    the source failed to answer, and a full cache is never a MEDIUM ERROR."""
    assert reason_for_store_error(error, writing=writing) is reason
    assert SENSE_TABLE[Reason.SOURCE_UNREACHABLE] == (SenseKey.NOT_READY, 0x04, 0x00)
    # a changed source: those blocks are lost for good (not retried), the LUN stays
    assert SENSE_TABLE[Reason.SOURCE_CHANGED] == (SenseKey.MEDIUM_ERROR, 0x11, 0x00)
