"""Fakes *below* the store, for the model-based tests: a file that can crash and a source whose
reads complete when the test says so, in any order. The store itself is the real code."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from gevent.event import AsyncResult

from lazyiscsi.source.base import Extent, Priority, SourceReadError, SourceUnavailable


class VolatileFile:
    """A file whose writes are volatile until ``sync``; ``crash`` decides what survives.

    ``durable`` is what the medium holds; ``pending`` is the list of writes since the last sync
    (offset, bytes), replayed in order over ``durable`` to give what a read sees.
    """

    def __init__(self, disk: VolatileDisk) -> None:
        self.disk = disk
        self.durable = bytearray()
        self.durable_size = 0
        self.pending: list[tuple[int, bytes | None, int]] = []  # (offset, data or None=truncate, size)
        self.view = bytearray()
        self.open = False
        self.syncs = 0

    def size(self) -> int:
        return len(self.view)

    def truncate(self, size: int) -> None:
        self._apply(self.view, 0, None, size)
        self.pending.append((0, None, size))

    def preadinto(self, buf: memoryview, offset: int) -> None:
        chunk = self.view[offset:offset + len(buf)]
        buf[:len(chunk)] = chunk
        buf[len(chunk):] = bytes(len(buf) - len(chunk))

    def pread(self, length: int, offset: int) -> bytes:
        chunk = bytes(self.view[offset:offset + length])
        return chunk + bytes(length - len(chunk))

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        data = bytes(data)
        self._apply(self.view, offset, data, 0)
        self.pending.append((offset, data, 0))

    def punch(self, offset: int, length: int) -> None:
        end = min(offset + length, len(self.view))
        if end > offset:
            self.pwrite(bytes(end - offset), offset)

    def sync(self) -> None:
        """Like fdatasync in a thread: other greenlets run meanwhile, and while the disk's
        gate is shut the sync waits for the test to release it (a crash may come first)."""
        if self.disk.gate:
            release = AsyncResult()
            self.disk.pending_syncs.append(release)
            release.get()
        self.durable = bytearray(self.view)
        self.pending.clear()
        self.syncs += 1

    def start_writeback(self, offset: int, length: int) -> None:
        """Writeback without durability: nothing a crash test can observe."""

    def close(self) -> None:
        self.open = False

    def crash(self, keep: bool) -> None:
        """Power loss: unsynced writes are all kept (``keep``) or all lost."""
        if keep:
            self.durable = bytearray(self.view)
        self.view = bytearray(self.durable)
        self.pending.clear()

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


class VolatileDisk:
    """The opener the store is given: one VolatileFile per path, surviving "reopen"."""

    def __init__(self) -> None:
        self.files: dict[str, VolatileFile] = {}
        self.gate = False
        self.pending_syncs: list[AsyncResult] = []

    def release_sync(self, index: int) -> None:
        self.pending_syncs.pop(index).set(None)

    def __call__(self, path: str, *, create: bool) -> VolatileFile:
        f = self.files.get(path)
        if f is None:
            if not create:
                raise FileNotFoundError(path)
            f = self.files[path] = VolatileFile(self)
        f.open = True
        return f


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
