"""Fetching missing units from the source: single flight, read-ahead, no stale overwrite.

Every unit has at most one fetch in flight (``Flight``); whoever needs a unit that is being
fetched waits for that flight instead of asking the source again. A flight runs in its own
greenlet so that a caller that gives up (an on-demand read past its I/O timeout) does not
abandon the fetch other callers share.

When a flight's data arrives, only the units that are *still missing* are written: a guest
write that landed meanwhile set those units' bits and must not be overwritten by the older
source data. That check is made by ``fill`` (``LazyDisk._fill``) at each write into the cache,
under the lock guest writes take, never once per flight: a fill may yield between its runs.

Concurrent adjacent misses share a request (a *plug*, as the Linux block layer merges bios
before it unplugs): a foreground flight is sent from its own greenlet, which runs only once the
greenlets that were ready with it have run. Until then it is not sent, and a foreground miss
starting where it ends (or ending where it begins) grows it instead of starting a flight of
its own, up to ``MAX_COALESCED``. The portal and TCMU run a burst of commands that way (one
greenlet each, all ready at once), so a guest that reads 16 adjacent blocks at once costs a
few requests, not 16.

A live migration's cutover starts a new *epoch* (``Fetcher.epoch``): every flight remembers the
epoch it was started in, before its source read went out, and hands it to ``fill``, which
drops what a flight of an earlier epoch read for a unit the cutover invalidated (its bytes may
predate the source VM's last write).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import gevent
import structlog
from gevent.event import AsyncResult, Event

from lazyiscsi.source.base import Priority, Source, SourceChanged, SourceError, SourceUnavailable
from lazyiscsi.store.errors import NoSource, SourceChangedError, SourceIOError, SourceUnreachable, StoreError
from lazyiscsi.store.extentmap import ExtentMap

log = structlog.get_logger("lazyiscsi.store")

#: The largest foreground flight that merging adjacent misses makes. Each miss merged into a
#: flight waits for all of it: 256 KiB is 21 ms of wire time at 100 Mbit/s, about one WAN round
#: trip, so the first miss waits at most about one more delay, and a burst of 64 KiB misses
#: takes a quarter of the requests.
MAX_COALESCED = 256 << 10


@dataclass(eq=False)
class Flight:
    """One source read covering units ``[start, end)``."""

    start: int
    end: int
    priority: Priority
    epoch: int = 0
    result: AsyncResult = field(default_factory=AsyncResult)
    #: its read has gone out: its range is fixed from then on (module docstring: the plug)
    sent: bool = False


@dataclass
class RetryPolicy:
    """How a flight retries transient source errors before failing its waiters."""

    attempts: int = 5
    first_delay: float = 0.05
    max_delay: float = 2.0


class Fetcher:
    """Fills missing units of the cache from the source.

    ``fill`` is the store's single writer for source data: called with a run and its bytes, it
    writes the still-missing parts and marks them local (their durability is ``commit``'s).
    """

    def __init__(
        self,
        source: Source | None,
        emap: ExtentMap,
        unit: int,
        size: int,
        fill: Callable[[int, int, memoryview, Priority, int], int],
        *,
        readahead_units: int = 16,
        retry: RetryPolicy | None = None,
        label: str = "",
    ) -> None:
        self.source = source
        self._map = emap
        self._unit = unit
        self._size = size
        self._fill = fill
        self._readahead = max(1, readahead_units)
        self._retry = retry or RetryPolicy()
        self._inflight: dict[int, Flight] = {}
        self._greenlets: set[gevent.Greenlet] = set()
        self._closed = False
        self._label = label
        #: why the source is no longer this cache's disk, once a read said so: for good
        self.changed: str | None = None
        #: why the source of a cache opened without it (``LazyDisk.open(awaiting_source=...)``)
        #: is not attached yet: a miss then fails as unreachable (it may come back), not as a
        #: read error
        self.awaiting: str | None = None
        self._fg_active = 0
        self.fg_idle = Event()
        self.fg_idle.set()
        #: bytes read from the source by flights, foreground and background
        self.bytes_fetched = {Priority.FOREGROUND: 0, Priority.BACKGROUND: 0}
        #: bumped by a cutover (module docstring)
        self.epoch = 0
        #: bytes read by flights started in the current epoch (after the cutover, if any)
        self.epoch_bytes = 0

    def ensure_local(self, start: int, end: int, priority: Priority) -> None:
        """Return once every unit of ``[start, end)`` is local; raise the ``StoreError`` of a
        fetch it needed that failed. Foreground callers also start read-ahead around a miss.

        A flight's failure is ours only while units we need from it are still missing: a
        guest write may have made them local meanwhile (issue 10, defect 10)."""
        fg = priority is Priority.FOREGROUND
        if fg:
            self._fg_active += 1
            self.fg_idle.clear()
        try:
            while True:
                flights = self._flights_for(start, end, priority)
                if not flights:
                    return
                for f in flights:
                    try:
                        f.result.get()
                    except StoreError:
                        if next(self._map.missing_runs(max(start, f.start), min(end, f.end)), None):
                            raise
        finally:
            if fg:
                self._fg_active -= 1
                if self._fg_active == 0:
                    self.fg_idle.set()

    def _flights_for(self, start: int, end: int, priority: Priority) -> list[Flight]:
        """The flights that will make ``[start, end)`` local, starting the missing ones.

        A foreground caller never joins a background flight: that run may be a whole MiB
        queued behind others on a slow link, and the guest would wait for all of it (issue
        10, defect 8). It sends its own read of the units it needs; whichever answer lands
        first fills them, and the other skips them (``fill`` writes only missing units)."""
        fg = priority is Priority.FOREGROUND

        def joinable(f: Flight | None) -> bool:
            return f is not None and (not fg or f.priority is Priority.FOREGROUND)

        flights: list[Flight] = []
        for a, b in list(self._map.missing_runs(start, end)):
            u = a
            while u < b:
                f = self._inflight.get(u)
                if f is not None and joinable(f):
                    if not flights or flights[-1] is not f:
                        flights.append(f)
                    u = f.end
                    continue
                v = u + 1
                while v < b and not joinable(self._inflight.get(v)):
                    v += 1
                flights.append(self._start(u, v, priority))
                u = v
        return flights

    def _start(self, a: int, b: int, priority: Priority) -> Flight:
        if self._closed:
            raise NoSource("the cache is closing: no more fetches")
        if self.changed is not None:  # first: a source found to be another disk is not attached
            raise SourceChangedError(self.changed)
        if self.source is None and self.awaiting is not None:
            raise SourceUnreachable(f"the data is not local yet and the source is not attached: "
                                    f"{self.awaiting}")
        if self.source is None:
            raise NoSource("the data is not local yet and no source is attached")
        if priority is Priority.FOREGROUND:
            a, b = self._widen(a, b)
            merged = self._coalesce(a, b)
            if merged is not None:
                return merged
        flight = Flight(a, b, priority, self.epoch)
        for u in range(a, b):
            self._inflight[u] = flight
        g = gevent.Greenlet(self._run, flight)
        self._greenlets.add(g)
        # A greenlet killed before it starts never runs its ``finally`` (issue 10, defect 11):
        # its link still runs, and settles the flight so that no waiter hangs.
        g.link(lambda g, flight=flight: self._landed(g, flight))
        g.start()
        return flight

    def _widen(self, a: int, b: int) -> tuple[int, int]:
        """Read-ahead: grow a foreground miss to its aligned window, but only over units that
        are still missing and not already in flight (never fetch a byte twice)."""
        lo = (a // self._readahead) * self._readahead
        hi = min(-(-b // self._readahead) * self._readahead, self._map.n_units)
        while a > lo and a - 1 not in self._inflight and not self._map.is_local(a - 1):
            a -= 1
        while b < hi and b not in self._inflight and not self._map.is_local(b):
            b += 1
        return a, b

    def _coalesce(self, a: int, b: int) -> Flight | None:
        """Grow a foreground flight not yet sent that ends at ``a`` or begins at ``b`` to cover
        ``[a, b)`` too, if it stays within ``MAX_COALESCED`` (module docstring: the plug)."""
        for f in (self._inflight.get(a - 1), self._inflight.get(b)):
            if (f is None or f.sent or f.priority is not Priority.FOREGROUND or f.epoch != self.epoch
                    or (f.end != a and f.start != b)):
                continue
            lo, hi = min(f.start, a), max(f.end, b)
            if (hi - lo) * self._unit > MAX_COALESCED:
                continue
            for u in range(a, b):
                self._inflight[u] = f
            f.start, f.end = lo, hi
            return f
        return None

    def _run(self, flight: Flight) -> None:
        flight.sent = True
        offset = flight.start * self._unit
        length = min(flight.end * self._unit, self._size) - offset
        delay = self._retry.first_delay
        attempt = 0
        try:
            # Each attempt first asks whether anything is still missing: a guest write may have
            # covered the run while a retry waited, and completed the cache (which lets the
            # source go: issue 10, defect 10).
            while next(self._map.missing_runs(flight.start, flight.end), None) is not None:
                source = self.source
                if source is None:
                    raise NoSource(f"offset {offset} is not local yet and no source is attached")
                attempt += 1
                try:
                    data = source.read(offset, length, flight.priority)
                except SourceChanged as e:
                    raise self._source_changed(e) from None
                except SourceError as e:
                    if not e.transient or attempt >= self._retry.attempts:
                        raise store_error_class(e)(f"source read at offset {offset} ({length} bytes) failed "
                                         f"after {attempt} attempt(s): {e}") from None
                    log.warning("source_read_retry", offset=offset, bytes=length, attempt=attempt,
                                error=str(e), retry_in_s=round(delay, 3))
                    gevent.sleep(delay)
                    delay = min(delay * 2, self._retry.max_delay)
                    continue
                self.bytes_fetched[flight.priority] += length
                if flight.epoch == self.epoch:
                    self.epoch_bytes += length
                self._fill(flight.start, flight.end, memoryview(data), flight.priority, flight.epoch)
                break
        except StoreError as e:
            flight.result.set_exception(e)
        except BaseException as e:  # killed (close) or a bug: waiters must not hang
            flight.result.set_exception(SourceIOError(f"fetch at offset {offset} aborted: {e!r}"))
            raise
        else:
            flight.result.set(None)
        finally:
            self._forget(flight)

    def _source_changed(self, e: SourceChanged) -> SourceChangedError:
        return self.latch_changed(str(e))

    def latch_changed(self, reason: str) -> SourceChangedError:
        """Latch a change of the source, said once: it is permanent, so no later fetch asks the
        source again (nor retries), and every miss fails at once with the same reason."""
        if self.changed is None:
            self.changed = reason
            log.error("source_changed", path=self._label, error=self.changed,
                      action="the copy stops; reads of units not yet local fail, local units are "
                             "still served")
        return SourceChangedError(self.changed)

    def _landed(self, g: gevent.Greenlet, flight: Flight) -> None:
        self._greenlets.discard(g)
        if not flight.result.ready():  # killed before it ran
            flight.result.set_exception(SourceIOError(
                f"fetch at offset {flight.start * self._unit} aborted before it started"))
            self._forget(flight)

    def _forget(self, flight: Flight) -> None:
        for u in range(flight.start, flight.end):
            if self._inflight.get(u) is flight:
                del self._inflight[u]

    @property
    def inflight_units(self) -> int:
        return len(self._inflight)

    def priority_at(self, unit: int) -> Priority | None:
        """Who the flight fetching ``unit`` is for, or None if none is."""
        f = self._inflight.get(unit)
        return f.priority if f is not None else None

    def new_epoch(self) -> None:
        self.epoch += 1
        self.epoch_bytes = 0

    def close(self) -> None:
        """Abort every flight and refuse new ones; waiters get ``SourceIOError`` at once."""
        self._closed = True
        gevent.killall(list(self._greenlets), block=True)


def store_error_class(e: SourceError) -> type[SourceIOError]:
    """A source that did not answer is NOT READY to the guest (it may come back); one that
    answered with an error is a read error (issue 10, defect 9)."""
    return SourceUnreachable if isinstance(e, SourceUnavailable) else SourceIOError
