"""Fakes *below* the store, for the model-based and schedule tests: files that can crash and
a source, whose every operation parks on a gate until the test lets it go, in any order, and
sources that answer at once or over a simulated link. The store itself is the real code."""

from __future__ import annotations

import errno
import hashlib
import os
import random
from dataclasses import dataclass, field

import gevent
from gevent.event import AsyncResult

from lazyiscsi.source.base import Extent, Priority, SourceReadError, SourceUnavailable

#: the page cache's unit of writeback
PAGE = 4096


class Parked:
    """One operation below the store, stopped at its yield point until the test releases it."""

    def __init__(self, kind: str, where: str, offset: int, length: int) -> None:
        self.kind, self.where, self.offset, self.length = kind, where, offset, length
        self.result: AsyncResult = AsyncResult()

    def __repr__(self) -> str:
        return f"<{self.kind} {self.where} {self.offset}+{self.length}>"


class Gate:
    """The schedule: every I/O point below the store parks here, and the test (or a seeded
    scheduler) picks which parked operation goes on next, and whether it fails.

    The points are those where the real code can yield to the hub: a cache or map write
    (in-line today, but the store must not rely on it), the start of writeback and fdatasync
    (both handed to gevent's thread pool, whose ``spawn`` also yields when the pool is busy),
    and every source reply. While ``passthrough`` is set nothing parks (opening a cache).
    """

    def __init__(self) -> None:
        self.parked: list[Parked] = []
        self.passthrough = False
        self.points = 0  # yield points reached: how much of a schedule the test explored

    def park(self, kind: str, where: str, offset: int = 0, length: int = 0) -> None:
        if self.passthrough:
            return
        p = Parked(kind, where, offset, length)
        self.parked.append(p)
        self.points += 1
        try:
            p.result.get()
        finally:
            if p in self.parked:
                self.parked.remove(p)

    def release(self, index: int, error: BaseException | None = None) -> Parked:
        p = self.parked.pop(index)
        if error is None:
            p.result.set(None)
        else:
            p.result.set_exception(error)
        return p


def settle() -> None:
    """Run every greenlet that can run until each is parked, blocked or done."""
    gevent.idle()
    gevent.idle()


class GatedFile:
    """A file whose writes are volatile until a sync, and whose every write, writeback start
    and sync parks on the gate.

    ``view`` is what reads see (the page cache); ``durable`` what the medium holds; ``pending``
    the writes made since they were last made durable, in order. A sync makes durable the
    pages of the writes that were complete when it began, as they are in the page cache when it
    ends (fdatasync promises no more than those writes, and writes back whole pages). A
    sync released with an error behaves as Linux does after a failed writeback: those writes
    stay readable but will never be durable, the error is reported once, and the next sync
    succeeds.
    """

    def __init__(self, gate: Gate, name: str) -> None:
        self.gate = gate
        self.name = name
        self.view = bytearray()
        self.durable = bytearray()
        # (offset, data or None for a truncate, size, the pages it touched as they were after it)
        self.pending: list[tuple[int, bytes | None, int, dict[int, bytes]]] = []
        self.sync_errors = 0

    def size(self) -> int:
        return len(self.view)

    def truncate(self, size: int) -> None:
        self._apply(self.view, 0, None, size)
        self.pending.append((0, None, size, {}))

    def preadinto(self, buf: memoryview, offset: int) -> None:
        chunk = self.view[offset:offset + len(buf)]
        buf[:len(chunk)] = chunk
        buf[len(chunk):] = bytes(len(buf) - len(chunk))

    def pread(self, length: int, offset: int) -> bytes:
        chunk = bytes(self.view[offset:offset + length])
        return chunk + bytes(length - len(chunk))

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        data = bytes(data)
        self.gate.park("pwrite", self.name, offset, len(data))
        self._write(offset, data)

    def punch(self, offset: int, length: int) -> None:
        self.gate.park("punch", self.name, offset, length)
        end = min(offset + length, len(self.view))
        if end > offset:
            self._write(offset, bytes(end - offset))

    def sync(self) -> None:
        """fdatasync in the thread pool: other greenlets run until the gate lets it finish."""
        covered = len(self.pending)
        self.gate.park("sync", self.name)
        done, self.pending = self.pending[:covered], self.pending[covered:]
        if self.sync_errors:
            self.sync_errors -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))  # ``done`` is lost to the medium
        for offset, data, size, _ in done:
            if data is None:
                self._apply(self.durable, offset, data, size)
                continue
            # the kernel writes back whole pages of the page cache, with whatever they hold now
            lo = offset // PAGE * PAGE
            hi = min(len(self.view), -(-(offset + len(data)) // PAGE) * PAGE)
            self._apply(self.durable, lo, bytes(self.view[lo:hi]), 0)

    def start_writeback(self, offset: int, length: int) -> None:
        """A thread-pool spawn: it yields when the pool is busy. No durability is promised."""
        self.gate.park("writeback", self.name, offset, length)

    def drop_cache(self) -> None:
        """Clean pages go (reads see the medium); dirty ones stay as they are."""
        old, self.view = self.view, bytearray(self.durable)
        self._apply(self.view, 0, None, len(old))
        for _, _, _, pages in self.pending:
            for page in pages:
                self.view[page * PAGE:(page + 1) * PAGE] = old[page * PAGE:(page + 1) * PAGE]

    def close(self) -> None:
        pass

    def crash(self, rnd: random.Random) -> None:
        """Power loss: each page holds what it held after some prefix of the unsynced writes to
        it (the kernel writes a page back with everything written to it so far; pages go in
        any order)."""
        versions: dict[int, list[bytes]] = {}  # page -> its contents after each pending write
        for offset, data, size, pages in self.pending:
            if data is None:
                self._apply(self.durable, offset, data, size)
            for page, content in pages.items():
                versions.setdefault(page, []).append(content)
        for page, contents in versions.items():
            k = rnd.randint(0, len(contents))
            if k:
                self._apply(self.durable, page * PAGE, contents[k - 1], 0)
        self.view = bytearray(self.durable)
        self.pending.clear()

    def _write(self, offset: int, data: bytes) -> None:
        self._apply(self.view, offset, data, 0)
        pages = {page: bytes(self.view[page * PAGE:(page + 1) * PAGE])
                 for page in range(offset // PAGE, -(-(offset + len(data)) // PAGE))}
        self.pending.append((offset, data, 0, pages))

    @staticmethod
    def _apply(buf: bytearray, offset: int, data: bytes | None, size: int) -> None:
        if data is None:
            if size < len(buf):
                del buf[size:]
            else:
                buf.extend(bytes(size - len(buf)))
            return
        if offset + len(data) > len(buf):
            buf.extend(bytes(offset + len(data) - len(buf)))
        buf[offset:offset + len(data)] = data


class GatedDisk:
    """The opener the store is given: one GatedFile per path, surviving a reopen."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.files: dict[str, GatedFile] = {}

    def __call__(self, path: str, *, create: bool) -> GatedFile:
        f = self.files.get(path)
        if f is None:
            if not create:
                raise FileNotFoundError(path)
            f = self.files[path] = GatedFile(self.gate, os.path.basename(path))
        return f


class GatedWriter:
    """The store's writer thread (``lazyiscsi.store.writer``), below the store: each write handed
    over runs in a greenlet of its own, so that, as in a thread, killing the greenlet that
    handed it over does not stop it; it lands when the gate lets its ``pwrite`` go. Writes of
    at least ``offload_min`` bytes are handed over (the real threshold is 64 KiB; the tests'
    units are 512 bytes). No order among writes is promised: the real thread runs them in
    order, the fake promises less. ``die`` is the process dying: writes not landed never do."""

    def __init__(self, offload_min: int) -> None:
        self.offload_min = offload_min
        #: writes handed over and not ended, with the result their waiter waits on
        self.threads: dict[gevent.Greenlet, AsyncResult] = {}
        self.handed = 0  # writes handed over: the tests check the path was taken
        self.dead = False  # the process died: a write handed over now never runs

    def offloads(self, nbytes: int) -> bool:
        return nbytes >= self.offload_min

    def submit(self, fn, *args) -> AsyncResult:  # type: ignore[no-untyped-def]
        done: AsyncResult = AsyncResult()
        if self.dead:  # the model kills a dead process's greenlets one by one: one may get here
            done.set_exception(gevent.GreenletExit("the process died"))
            return done
        self.handed += 1

        def run() -> None:
            try:
                fn(*args)
            except BaseException as e:
                done.set_exception(e)
            else:
                done.set(None)

        g = gevent.spawn(run)
        self.threads[g] = done
        g.link(lambda g: self.threads.pop(g, None))
        return done

    def die(self) -> None:
        """The writes not landed never land; their waiters are told so (a write killed before
        its greenlet first ran would otherwise leave its waiter, which ``wait_out`` keeps
        waiting through its own kill, waiting for ever: the model kills the waiters next)."""
        self.dead = True
        pending = list(self.threads.items())
        gevent.killall([g for g, _ in pending])
        for _, done in pending:
            if not done.ready():
                done.set_exception(gevent.GreenletExit("the process died"))

    def close(self) -> None:
        assert not self.threads, "closed with writes still in the writer thread"


class GatedSource:
    """A source whose every reply parks on the gate; the test releases it as data or as an
    error (``SourceReadError``: the server answered EIO; ``SourceUnavailable``: no answer)."""

    def __init__(self, gate: Gate, data: bytes) -> None:
        self.gate = gate
        self.data = data
        self.size = len(data)
        self.url = "gated://test"
        self.identity = "gated:" + hashlib.sha256(data).hexdigest()[:16]
        self.closed = False

    def read(self, offset: int, length: int, priority: Priority = Priority.FOREGROUND) -> bytes:
        if self.closed:
            raise SourceUnavailable("closed")
        assert offset >= 0 and offset + length <= self.size, (offset, length)
        self.gate.park("source", priority.value, offset, length)
        return self.data[offset:offset + length]

    def extents(self, offset: int, length: int) -> list[Extent]:
        return [Extent(offset, length, False)]

    def close(self) -> None:
        self.closed = True


@dataclass(eq=False)
class PendingRead:
    offset: int
    length: int
    priority: Priority
    result: AsyncResult = field(default_factory=AsyncResult)


class ScriptedSource:
    """A source whose reads wait until the test completes or fails them."""

    def __init__(self, data: bytes, zero_ranges: list[tuple[int, int]] | None = None) -> None:
        self.data = data
        self.size = len(data)
        self.url = "scripted://test"
        self.identity = "scripted:" + hashlib.sha256(data).hexdigest()[:16]
        self.pending: list[PendingRead] = []
        self.zero_ranges = zero_ranges or []
        self.closed = False
        self.reads = 0

    def read(self, offset: int, length: int, priority: Priority = Priority.FOREGROUND) -> bytes:
        if self.closed:
            raise SourceUnavailable("closed")
        assert offset >= 0 and offset + length <= self.size, (offset, length)
        p = PendingRead(offset, length, priority)
        self.pending.append(p)
        self.reads += 1
        try:
            return p.result.get()
        finally:
            if p in self.pending:
                self.pending.remove(p)

    def complete(self, index: int) -> None:
        p = self.pending.pop(index)
        p.result.set(self.data[p.offset:p.offset + p.length])

    def fail(self, index: int) -> None:
        p = self.pending.pop(index)
        p.result.set_exception(SourceReadError("injected EIO"))

    def extents(self, offset: int, length: int, priority: Priority = Priority.FOREGROUND) -> list[Extent]:
        return [Extent(offset, length, False)]

    def close(self) -> None:
        self.closed = True


class InstantSource(ScriptedSource):
    """A ScriptedSource whose reads complete at once (for tests that do not script order)."""

    def read(self, offset: int, length: int, priority: Priority = Priority.FOREGROUND) -> bytes:
        self.reads += 1
        return self.data[offset:offset + length]

    def extents(self, offset: int, length: int, priority: Priority = Priority.FOREGROUND) -> list[Extent]:
        out: list[Extent] = []
        pos, end = offset, offset + length
        for zs, zl in sorted(self.zero_ranges):
            za, zb = max(zs, pos), min(zs + zl, end)
            if za >= zb:
                continue
            if za > pos:
                out.append(Extent(pos, za - pos, False))
            out.append(Extent(za, zb - za, True))
            pos = zb
        if pos < end:
            out.append(Extent(pos, end - pos, False))
        return out


class LinkSource(InstantSource):
    """Reads cross a simulated WAN: each waits ``delay`` seconds, and the bytes share one wire
    of ``rate`` bytes/s in arrival order (a FIFO bottleneck, like a router's queue)."""

    def __init__(self, data: bytes, *, delay: float, rate: float, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(data, **kw)
        self.delay = delay
        self.rate = rate
        self._wire_free = 0.0

    def read(self, offset: int, length: int, priority: Priority = Priority.FOREGROUND) -> bytes:
        import time

        import gevent

        self.reads += 1
        now = time.monotonic()
        start = max(now + self.delay / 2, self._wire_free)  # request reaches the far end
        self._wire_free = start + length / self.rate
        gevent.sleep(self._wire_free + self.delay / 2 - now)
        return self.data[offset:offset + length]


class LiveSource(InstantSource):
    """A source still in use by a VM (issue 11), with QEMU's dirty bitmap: ``vm_write`` changes
    its bytes and sets the bitmap, which is cumulative (nothing clears it, as over NBD). Each
    read takes its bytes when it is asked, then may park on ``gate`` (a reply in the air: it
    can land after a later VM write). ``down`` makes every request fail as an unreachable
    source; without ``bitmap`` it is a live source without one."""

    def __init__(self, data: bytes, *, bitmap: str | None = "mig", granularity: int = 4096,
                 gate: Gate | None = None) -> None:
        super().__init__(data)
        self.data = bytearray(data)
        self.granularity = granularity
        self.dirty: set[int] = set()  # bitmap granules
        self.gate = gate
        self.down = False
        self.identity = f"live:size={len(data)}"
        self.bitmap_queries = 0
        if bitmap is not None:
            self.dirty_bitmap = bitmap

    def vm_write(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data
        g = self.granularity
        self.dirty.update(range(offset // g, -(-(offset + len(data)) // g)))

    def read(self, offset: int, length: int, priority: Priority = Priority.FOREGROUND) -> bytes:
        if self.down or self.closed:
            raise SourceUnavailable("injected: no answer")
        self.reads += 1
        data = bytes(self.data[offset:offset + length])
        if self.gate is not None:
            self.gate.park("source", priority.value, offset, length)
        return data

    def dirty_runs(self, offset: int, length: int, priority: Priority = Priority.BACKGROUND) -> list:
        from lazyiscsi.source.base import DirtyRun

        if self.down:
            raise SourceUnavailable("injected: no answer")
        self.bitmap_queries += 1
        runs: list[DirtyRun] = []
        pos, end, g = offset, offset + length, self.granularity
        while pos < end:
            dirty = pos // g in self.dirty
            stop = min(end, (pos // g + 1) * g)
            while stop < end and (stop // g in self.dirty) == dirty:
                stop = min(end, stop + g)
            runs.append(DirtyRun(pos, stop - pos, dirty))
            pos = stop
        return runs


def content_identity(source: LiveSource) -> str:
    """The pinned identity at cutover, as ``content_fingerprint`` gives it: from the bytes."""
    if source.down:
        raise SourceUnavailable("injected: no answer")
    return "pinned:" + hashlib.sha256(bytes(source.data)).hexdigest()[:16]
