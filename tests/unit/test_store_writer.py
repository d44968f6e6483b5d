"""The store's writer thread (``lazyiscsi.store.writer``): large cache writes off the gevent hub.

The store's rules are about writes that have landed, so a write handed to the thread must have
landed before ``_data_lock`` is let go, whatever happens to the greenlet that handed it over.
The schedules below are spelled out on the gate (``store_fakes.Gate``) with the writer thread
faked below the store (``GatedWriter``: a write lands when the gate lets it, even after its
caller was killed, as in a thread); the last tests use the real thread.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import gevent
import pytest
from structlog.testing import capture_logs

from lazyiscsi.store.cachefile import OsFile
from lazyiscsi.store.errors import CacheFull
from lazyiscsi.store.fetch import RetryPolicy
from lazyiscsi.store.lazydisk import LazyDisk
from lazyiscsi.store.prioritylock import PriorityLock
from lazyiscsi.store.writer import OFFLOAD_MIN_BYTES, CacheWriter, wait_out
from tests.unit.store_fakes import Gate, GatedDisk, GatedSource, GatedWriter, InstantSource, settle

UNIT = 512


class Rig:
    """A LazyDisk over gated files, a gated source and a gated writer thread that takes writes
    of two units or more (one unit stays in-line)."""

    def __init__(self, tmp: Path, n_units: int = 8) -> None:
        import random

        self.gate = Gate()
        self.files = GatedDisk(self.gate)
        self.data = random.Random(5).randbytes(n_units * UNIT).replace(b"\0", b"\1")
        self.writer = GatedWriter(offload_min=2 * UNIT)
        self.path = str(tmp / "cache")
        self.gate.passthrough = True
        self.disk = LazyDisk.open(self.path, GatedSource(self.gate, self.data), unit=UNIT, readahead=UNIT,
                                  io_timeout=30, autocommit_s=None,
                                  retry=RetryPolicy(attempts=2, first_delay=0), opener=self.files,
                                  writer=lambda: self.writer)
        self.gate.passthrough = False

    def cache(self, u: int) -> bytes:
        """What unit ``u`` of the cache file holds now (the page cache)."""
        return bytes(self.files.files[self.path].view[u * UNIT:(u + 1) * UNIT])

    def release_newest_until(self, done) -> None:  # type: ignore[no-untyped-def]
        """Let parked operations go, the most recent first: a write that could overtake an
        older one does."""
        for _ in range(1000):
            settle()
            if done():
                return
            assert self.gate.parked, "nothing parked and not done"
            self.gate.release(len(self.gate.parked) - 1)
        raise AssertionError("schedule did not finish")

    def parked(self, kind: str, where: str) -> bool:
        return any(p.kind == kind and p.where == where for p in self.gate.parked)


def test_a_fill_killed_by_close_lands_before_a_guest_write_to_its_unit(tmp_path: Path) -> None:
    """``close`` kills the flights (``Fetcher.close``). A flight killed while its fill's write
    is in the writer thread must keep ``_data_lock`` until that write has landed: else a guest
    write waiting for the lock goes first, and the fill's source data lands over it after the
    guest was told its write is done."""
    rig = Rig(tmp_path)
    fill = gevent.spawn(rig.disk.populate, 0, 4 * UNIT)
    settle()
    rig.gate.release(next(i for i, p in enumerate(rig.gate.parked) if p.kind == "source"))
    settle()
    assert rig.parked("pwrite", "cache") and rig.writer.handed == 1, "the 4-unit fill was not handed over"
    guest = gevent.spawn(rig.disk.write, 1 * UNIT, b"G" * UNIT)  # waits for the lock
    closer = gevent.spawn(rig.disk.close)
    rig.release_newest_until(lambda: guest.ready() and closer.ready())
    guest.get()  # acknowledged
    closer.get()
    fill.join()
    assert rig.cache(1) == b"G" * UNIT, "the fill's write landed after an acknowledged guest write"


def test_a_killed_guest_write_lands_before_the_next_write_to_its_unit(tmp_path: Path) -> None:
    """A large guest write killed while it is in the writer thread (the portal's stop kills
    its command greenlets after a timeout) may or may not land, but never after a later write
    of the same unit (an initiator's retry) that was acknowledged."""
    rig = Rig(tmp_path)
    first = gevent.spawn(rig.disk.write, 0, b"1" * (2 * UNIT))
    settle()
    assert rig.parked("pwrite", "cache") and rig.writer.handed == 1
    first.kill(block=False)
    settle()
    retry = gevent.spawn(rig.disk.write, 0, b"2" * UNIT)
    rig.release_newest_until(lambda: retry.ready() and first.ready())
    retry.get()
    assert rig.cache(0) == b"2" * UNIT, "a killed write landed over a later acknowledged one"
    assert rig.cache(1) in (b"1" * UNIT, rig.data[UNIT:2 * UNIT])


def test_wait_out_raises_the_kill_once_the_write_has_landed() -> None:
    """Real thread: a greenlet killed while its write runs dies only after the write ended."""
    writer = CacheWriter(offload_min=1)
    started, release = threading.Event(), threading.Event()
    landed: list[bool] = []

    def slow_write() -> None:
        started.set()
        release.wait(30)
        landed.append(True)

    g = gevent.spawn(lambda: wait_out(writer.submit(slow_write)))
    while not started.is_set():
        gevent.sleep(0.001)
    g.kill(block=False)
    gevent.sleep(0.05)
    assert not g.dead, "the killed greenlet left while its write was still running"
    release.set()
    g.join(timeout=30)
    assert g.dead and landed == [True]
    assert isinstance(g.value, gevent.GreenletExit)
    writer.close()


class _FullFile(OsFile):
    """The real file, on a filesystem that is full for large writes (a fake below the store:
    ENOSPC from a pwrite run in the writer thread)."""

    def pwrite(self, data, offset: int) -> None:  # type: ignore[no-untyped-def]
        if len(data) >= OFFLOAD_MIN_BYTES and not self.path.endswith((".map", ".written", ".boot")):
            assert threading.current_thread() is not threading.main_thread(), "written on the hub"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().pwrite(data, offset)


def test_enospc_in_the_writer_thread_is_cache_full(tmp_path: Path) -> None:
    """An error of a write in the thread reaches the store's own handling: the guest gets
    ``CacheFull`` (SPACE ALLOCATION FAILED) with one log event, and the volume goes on."""
    size = 4 * OFFLOAD_MIN_BYTES
    source = InstantSource(bytes(range(256)) * (size // 256))
    disk = LazyDisk.open(str(tmp_path / "cache"), source, autocommit_s=None, opener=_FullFile)
    try:
        with capture_logs() as logs, pytest.raises(CacheFull):
            disk.write(0, b"W" * OFFLOAD_MIN_BYTES)
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["cache_io_failed"]
        disk.write(OFFLOAD_MIN_BYTES, b"S" * 4096)  # small writes stay in-line, and still work
        assert disk.read(OFFLOAD_MIN_BYTES, 4096) == b"S" * 4096
    finally:
        disk.close()


def test_large_writes_and_fills_through_the_real_thread_survive_a_reopen(tmp_path: Path) -> None:
    """The real thread end to end: large guest writes and fills land where they belong, the
    hub is not the thread that wrote them, and close leaves everything on the file."""
    size = 8 * 2**20
    data = os.urandom(size)
    writers: set[str] = set()

    class _Watched(OsFile):
        def pwrite(self, buf, offset: int) -> None:  # type: ignore[no-untyped-def]
            if len(buf) >= OFFLOAD_MIN_BYTES:
                writers.add(threading.current_thread().name)
            super().pwrite(buf, offset)

    path = str(tmp_path / "cache")
    disk = LazyDisk.open(path, InstantSource(data), autocommit_s=None, opener=_Watched)
    disk.write(2**20, b"G" * 2**20)
    disk.populate(0, size)
    assert disk.complete
    disk.close()
    assert writers and threading.main_thread().name not in writers
    with open(path, "rb") as f:
        got = f.read()
    assert got == data[:2**20] + b"G" * 2**20 + data[2 * 2**20:]


def test_data_lock_serves_urgent_waiters_before_the_copier_queue() -> None:
    """The guest's write or miss waits for the holder only, not for the copier's queued
    fills (prioritylock): urgent waiters go first, each class in order, a waiter killed while
    it waits leaves the queue, and ownership passes on at release."""
    lock = PriorityLock()
    order: list[str] = []

    def take(name: str, urgent: bool) -> None:
        lock.acquire(urgent)
        order.append(name)
        gevent.sleep(0)
        lock.release()

    lock.acquire()
    waiters = [gevent.spawn(take, f"bg{i}", False) for i in range(3)]
    settle()
    killed = gevent.spawn(take, "killed", True)
    waiters += [gevent.spawn(take, "fg0", True), gevent.spawn(take, "fg1", True)]
    settle()
    killed.kill()
    lock.release()
    gevent.joinall(waiters, timeout=10)
    assert order == ["fg0", "fg1", "bg0", "bg1", "bg2"]
    assert not lock.locked
