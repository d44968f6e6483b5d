"""The store's writer thread: large writes into the cache file, off the gevent hub.

Why: writing 1 MiB of fetched data into fresh pages of the cache file costs 3-5 ms of the
calling thread (page allocation, copy; measured at ~3 us/KiB on ext4 here), and longer when the
filesystem makes it wait (a journal handle while jbd2 commits, dirty-page throttling). Done on
the hub, every greenlet (an on-demand miss, every session of every LUN) waits for it: during a
1 Gbit/s copy the hub spent more than half of its time in such writes (bench/REPORT.md, "Cache
writes off the hub"). ``os.pwrite`` releases the GIL, so in a thread the copy runs beside the
hub.

Why a thread of its own and not gevent's shared pool: that pool also carries the fdatasyncs of
every volume and the copier's writeback starts, and its ``spawn`` waits for a free thread; a
write queued behind them would hold ``LazyDisk._data_lock`` (and so every guest write) for
as long. One thread per volume: writes of one volume are serialised by that lock anyway, and a
slow disk under one volume does not hold up another's.

Small writes stay in-line (``OFFLOAD_MIN_BYTES``): a hand-off and the wake-up back on the hub
cost 70-100 us here, while a 4 KiB write into the page cache costs 2-5 us.

A write handed over is waited for to its end, whatever happens to the greenlet that handed it
(``wait_out``): the store's rules are stated about writes that have landed, and a write still
running in the thread after its caller let ``_data_lock`` go could land after a guest write it
must precede, or after ``close`` closed the file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import gevent.threadpool
from gevent.event import AsyncResult

#: Writes of at least this many bytes go to the writer thread. Measured on this project's test
#: machine (ext4, fresh pages, bench/REPORT.md): 16 KiB in-line 8 us, 64 KiB 190 us, 1 MiB
#: 3.4 ms; a hand-off 70-100 us. A miss's own unit stays in-line; the copier's 1 MiB runs, a
#: miss's read-ahead window (64 KiB) and large guest writes go to the thread.
OFFLOAD_MIN_BYTES = 64 * 1024


class WriteThread(Protocol):
    """Where the store's large cache writes run. The store decides nothing about order: it
    waits for each write before it hands over the next one under the same lock."""

    def offloads(self, nbytes: int) -> bool:
        """Whether a write of ``nbytes`` goes to the thread (else it is done in-line)."""
        ...

    def submit(self, fn: Callable[..., Any], *args: Any) -> AsyncResult:
        """Start ``fn(*args)`` in the thread; the result is set (or its error) once it ran."""
        ...

    def close(self) -> None: ...


class CacheWriter:
    """The real one: one native thread (a gevent ``ThreadPool`` of its own, size 1)."""

    def __init__(self, offload_min: int = OFFLOAD_MIN_BYTES) -> None:
        self._offload_min = offload_min
        self._pool: gevent.threadpool.ThreadPool | None = None  # started at the first large write

    def offloads(self, nbytes: int) -> bool:
        return nbytes >= self._offload_min

    def submit(self, fn: Callable[..., Any], *args: Any) -> AsyncResult:
        if self._pool is None:
            self._pool = gevent.threadpool.ThreadPool(1)
        return self._pool.spawn(fn, *args)

    def close(self) -> None:
        """Every write handed over was waited for (``wait_out``): the thread is idle."""
        if self._pool is not None:
            self._pool.kill()
            self._pool = None


def wait_out(done: AsyncResult) -> None:
    """Wait for a write handed to the writer thread to end, even if this greenlet is killed or
    its timeout fires meanwhile (that is raised once the write has ended); then raise the
    write's own error, if any (an ``OSError`` such as ENOSPC or EIO)."""
    interrupted: BaseException | None = None
    while not done.ready():
        try:
            done.wait()
        except BaseException as e:  # GreenletExit, gevent.Timeout: the thread writes on
            interrupted = interrupted or e
    if interrupted is not None:
        raise interrupted
    done.get()
