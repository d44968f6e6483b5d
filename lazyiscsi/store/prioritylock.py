"""A lock whose urgent waiters go before its background ones (the store's ``_data_lock``).

Why: a write into the cache holds ``LazyDisk._data_lock`` until it has landed, and the
copier's 1 MiB writes take milliseconds each in the writer thread. With a first-come lock a
guest's miss queued behind every copier run waiting for the lock (measured during a 1 Gbit/s
copy: 48 ms median, 0.7 s worst, bench/REPORT.md "Cache writes off the hub"). Here a guest
write or a miss's fill waits only for the write that holds the lock, never for the queue.

Ownership passes straight to the next waiter on release (no barging), so a background waiter
is not starved by a stream of uncontended urgent acquires either: it is next once the urgent
queue is empty.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

import gevent.event


class PriorityLock:
    """Mutual exclusion among greenlets of one hub; ``with lock:`` is an urgent hold."""

    def __init__(self) -> None:
        self._held = False
        #: waiters in order, urgent first: release hands the lock to the first of the first
        self._queues: tuple[collections.deque[gevent.event.Event], ...] = (collections.deque(),
                                                                          collections.deque())

    def acquire(self, urgent: bool = True) -> None:
        if not self._held and not any(self._queues):
            self._held = True
            return
        turn = gevent.event.Event()
        queue = self._queues[0 if urgent else 1]
        queue.append(turn)
        try:
            turn.wait()
        except BaseException:  # killed or timed out while waiting
            if turn.is_set():
                self.release()  # it was handed to us meanwhile: pass it on
            else:
                queue.remove(turn)
            raise

    def release(self) -> None:
        for queue in self._queues:
            if queue:
                queue.popleft().set()  # still held: it now belongs to that waiter
                return
        self._held = False

    @property
    def locked(self) -> bool:
        return self._held

    def __enter__(self) -> PriorityLock:
        self.acquire(urgent=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @contextlib.contextmanager
    def background(self) -> Iterator[None]:
        """Hold it as a background task: every urgent waiter goes first."""
        self.acquire(urgent=False)
        try:
            yield
        finally:
            self.release()
