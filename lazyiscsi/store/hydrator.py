"""The hydrator: a job that copies every missing unit of a LazyDisk from its source.

Shaped like QEMU's stream job (a job with explicit states and verbs, one pause/cancel point
and one rate-limit sleep per iteration) but with many runs in flight instead of one chunk:
a WAN with 20 ms of delay moves a 1 MiB run per round trip per request, so throughput is
``runs in flight x run size / RTT`` until the link is full. How many runs that takes is
learnt, not configured (``WindowTuner``): the window doubles while throughput still grows.

Foreground first: before each new run the hydrator lets on-demand fetches finish (their
sources use another connection, and the server sees less competing load), and every run goes
through ``LazyDisk.populate``, the same single-flight fill path a guest read uses.

Hot first (issue 15): each time a slot is free, the job first asks the disk's ``hotspots``
for a run where the guest reads (around its recent misses, ahead of its sequential streams),
and only then sends the next run of its LBA order. A hot run is a background run like any
other: it passes the same pause/rate point, takes a slot of the same window (so the link is no
fuller than before, and the copy no slower: a hot run replaces an LBA run, whose units the LBA
pass then finds local and skips), and a guest's miss never waits behind it. Hot runs are not
checked against block status first: that would cost them a round trip, and a hole read over
NBD structured replies comes back as a hole chunk, not as bytes.

Zero runs the source reports (NBD block status) are marked local without moving their bytes.
The hydrator asks for them at background priority, like its reads: a status query over a
large range can keep a server busy for seconds, and a guest's read must not queue behind it
(NBD: the background connection).

A live source before its cutover (issue 11): without a dirty bitmap the job waits for the
cutover (nothing may be cached); with one it copies what the disk says is worth copying
(``LazyDisk.missing_runs`` leaves out units already dirty), and, that done, waits for the
cutover to copy the rest.

A disk opened without its source (``LazyDisk.open(awaiting_source=...)``) makes the job wait,
running, for ``attach_source``: it copies once the source is bound, and fails with the store's
``source_changed`` reason if the source came back as another disk.
"""

from __future__ import annotations

import collections
import enum
import time
from collections.abc import Iterator
from dataclasses import dataclass

import gevent
import gevent.event
import structlog

from lazyiscsi.source.base import Extent, Priority, SourceChanged, SourceError
from lazyiscsi.store.errors import SourceChangedError, StoreError
from lazyiscsi.store.lazydisk import LazyDisk

log = structlog.get_logger("lazyiscsi.hydrator")

DEFAULT_RUN = 1 << 20
#: how much of the source one extents query covers
EXTENTS_WINDOW = 1 << 30
#: extents queries in flight ahead of the copy. Also a memory bound: a server may cut a window
#: into very many extents (data and holes alternating), and this many answers are held at once.
EXTENTS_AHEAD = 4
MAX_INFLIGHT_BYTES = 256 << 20


class JobState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Verb(enum.Enum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    SET_RATE = "set-rate"
    FINISH = "finish"  # internal: every unit is local
    FAIL = "fail"  # internal: the error policy gave up


#: (state, verb) -> next state. A verb missing here is refused in that state (QEMU's JobVerbTable
#: and JobSTT folded into one table). SET_RATE keeps the state.
TRANSITIONS: dict[tuple[JobState, Verb], JobState] = {
    (JobState.CREATED, Verb.START): JobState.RUNNING,
    (JobState.CREATED, Verb.CANCEL): JobState.CANCELLED,
    (JobState.CREATED, Verb.SET_RATE): JobState.CREATED,
    (JobState.RUNNING, Verb.PAUSE): JobState.PAUSED,
    (JobState.RUNNING, Verb.CANCEL): JobState.CANCELLED,
    (JobState.RUNNING, Verb.SET_RATE): JobState.RUNNING,
    (JobState.RUNNING, Verb.FINISH): JobState.COMPLETED,
    (JobState.RUNNING, Verb.FAIL): JobState.FAILED,
    (JobState.PAUSED, Verb.RESUME): JobState.RUNNING,
    (JobState.PAUSED, Verb.CANCEL): JobState.CANCELLED,
    (JobState.PAUSED, Verb.SET_RATE): JobState.PAUSED,
    (JobState.PAUSED, Verb.FINISH): JobState.COMPLETED,  # the guest's reads finished the copy
}


class JobVerbError(StoreError):
    """A verb that the job's state does not allow (pause a completed job, ...)."""


@dataclass(frozen=True)
class Progress:
    """What ``query`` answers: QMP's current/total plus rate, ETA and the miss figures."""

    state: JobState
    current: int  # bytes local
    total: int  # LUN size
    rate: float  # bytes/s becoming local, over the last few seconds
    eta_s: float | None
    fetched: int  # bytes read from the source, background and on demand
    inflight_window: int
    inflight_runs: int  # runs issued and not finished: 0 once a paused job has settled
    hot_bytes: int  # copied out of LBA order, where the guest reads (``hotspots``)
    rate_limit: int | None
    misses: int
    miss_p50_ms: float | None
    miss_p99_ms: float | None
    error: str | None


class TokenBucket:
    """Rate limit in bytes/s; ``None`` is unlimited. ``delay(n)`` reserves ``n`` bytes and says
    how long to sleep first, so that the average stays at the rate (one run may burst)."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self._next = time.monotonic()

    def set_rate(self, rate: int | None) -> None:
        self.rate = rate
        self._next = time.monotonic()

    def delay(self, n: int) -> float:
        if not self.rate:
            return 0.0
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + n / self.rate
        return start - now


class WindowTuner:
    """How many runs to keep in flight, learnt from throughput (no RTT or bandwidth setting).

    Slow start: the window doubles at the end of each epoch whose throughput beat the best
    seen by more than ``gain``; once a doubling brings less, the window settles on the
    smallest that reached the best. Every ``probe_every`` settled epochs it probes one size
    up again, so a link that got faster is found. An epoch lasts long enough to see the whole
    window complete a few times (at least ``min_epoch_s``).
    """

    def __init__(self, initial: int = 4, maximum: int = 64, gain: float = 1.10,
                 min_epoch_s: float = 0.3, probe_every: int = 10) -> None:
        self.window = initial
        self._max = maximum
        self._gain = gain
        self._min_epoch = min_epoch_s
        self._probe_every = probe_every
        self._best_rate = 0.0
        self._best_window = initial
        self._settled = False
        self._epochs_settled = 0
        self._epoch_start = time.monotonic()
        self._epoch_bytes = 0
        self._latency = collections.deque(maxlen=32)
        self._saturated = True

    def note_starved(self) -> None:
        """The epoch had fewer runs to send than the window: its rate says nothing."""
        self._saturated = False

    def on_complete(self, nbytes: int, latency_s: float) -> None:
        self._epoch_bytes += nbytes
        self._latency.append(latency_s)
        now = time.monotonic()
        lat = sorted(self._latency)[len(self._latency) // 2]
        elapsed = now - self._epoch_start
        if elapsed < max(self._min_epoch, 3 * lat):
            return
        rate = self._epoch_bytes / elapsed
        saturated = self._saturated
        self._epoch_start, self._epoch_bytes, self._saturated = now, 0, True
        if not saturated:
            return
        if rate > self._best_rate * self._gain:
            self._best_rate, self._best_window = rate, self.window
            self._settled = False
            self.window = min(self._max, self.window * 2)
        elif not self._settled:
            self._settled, self._epochs_settled = True, 0
            self.window = self._best_window
            self._best_rate = max(self._best_rate, rate)
        else:
            self._best_rate = max(rate, self._best_rate * 0.9)  # let the record decay slowly
            self._epochs_settled += 1
            if self._epochs_settled >= self._probe_every:
                self._settled = False
                self.window = min(self._max, self.window * 2)


class Hydrator:
    """Copies every missing unit of ``disk`` in the background. Create, ``start()``, then use
    the verbs; ``wait()`` returns when the job ends."""

    def __init__(self, disk: LazyDisk, *, run_size: int = DEFAULT_RUN, rate: int | None = None,
                 max_window: int | None = None, retry_max_s: float = 30.0,
                 fg_yield_s: float = 0.1) -> None:
        if run_size < disk.unit or run_size % disk.unit:
            raise StoreError(f"run size {run_size} must be a multiple of the unit ({disk.unit})")
        self.disk = disk
        self.run_size = run_size
        self._bucket = TokenBucket(rate)
        self._tuner = WindowTuner(maximum=max_window or max(1, MAX_INFLIGHT_BYTES // run_size))
        self._retry_max = retry_max_s
        self._fg_yield = fg_yield_s
        self.state = JobState.CREATED
        self._resumed = gevent.event.Event()
        self._resumed.set()
        self._done = gevent.event.Event()
        self._active: set[gevent.Greenlet] = set()
        self._issuing = 0  # 1 while _issue waits to send a run (see Progress.inflight_runs)
        self._slot = gevent.event.Event()
        self._main: gevent.Greenlet | None = None
        self._error: str | None = None
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)
        self._failed_runs = 0
        #: pieces of the current hot run still to send (``_next_hot``)
        self._hot: collections.deque[tuple[int, int]] = collections.deque()
        self._hot_bytes = 0

    # -- verbs -----------------------------------------------------------------------------

    def _apply(self, verb: Verb) -> None:
        nxt = TRANSITIONS.get((self.state, verb))
        if nxt is None:
            raise JobVerbError(f"cannot {verb.value} a {self.state.value} hydration job")
        if nxt is not self.state:
            log.info("hydration_state", path=self.disk.path, old=self.state.value, new=nxt.value,
                     verb=verb.value)
        self.state = nxt

    def start(self) -> None:
        self._apply(Verb.START)
        self._main = gevent.spawn(self._run)
        # a link, not a ``finally`` in _run: a greenlet cancelled before it starts never runs
        # its ``finally``, and wait() would hang (issue 10, defect 11)
        self._main.link(lambda _g: self._done.set())

    def pause(self) -> None:
        """Stop issuing runs; those in flight finish (nothing is abandoned half-written)."""
        self._apply(Verb.PAUSE)
        self._resumed.clear()

    def resume(self) -> None:
        self._apply(Verb.RESUME)
        self._resumed.set()

    def cancel(self) -> None:
        self._apply(Verb.CANCEL)
        self._resumed.set()
        if self._main is not None:
            self._main.kill(block=False)

    def set_rate(self, rate: int | None) -> None:
        """Change the rate limit at once (bytes/s; None or 0 for none)."""
        if rate is not None and rate < 0:
            raise JobVerbError(f"rate {rate}: must be positive (or 0 for no limit)")
        self._apply(Verb.SET_RATE)
        self._bucket.set_rate(rate or None)
        log.info("hydration_rate", path=self.disk.path, rate_limit=rate or None)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    # -- progress --------------------------------------------------------------------------

    def query(self) -> Progress:
        st = self.disk.stats()
        now = time.monotonic()
        self._samples.append((now, st.local_bytes))
        while len(self._samples) > 2 and now - self._samples[0][0] > 5.0:
            self._samples.popleft()
        t0, b0 = self._samples[0]
        rate = (st.local_bytes - b0) / (now - t0) if now - t0 > 0.2 else 0.0
        remaining = st.size - st.local_bytes
        eta = 0.0 if remaining == 0 else (remaining / rate if rate > 0 else None)
        return Progress(
            state=self.state, current=st.local_bytes, total=st.size, rate=rate, eta_s=eta,
            fetched=st.fetched_foreground + st.fetched_background, inflight_window=self._tuner.window,
            inflight_runs=len(self._active) + self._issuing, hot_bytes=self._hot_bytes,
            rate_limit=self._bucket.rate,
            misses=st.misses, miss_p50_ms=st.miss_p50_ms,
            miss_p99_ms=st.miss_p99_ms, error=self._error)

    # -- the job ---------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.5
        try:
            while not self.disk.complete:
                if not self.disk.copy_allowed:
                    self.disk.wait_cutover()
                    continue
                if self.disk.source is None:
                    if self.disk.awaiting_source is None and self.disk.source_changed is None:
                        raise StoreError("units are missing and no source is attached")
                    # opened without its source (a restart while it was down): the copy starts
                    # when ``attach_source`` binds it, as a running copy resumes when it returns.
                    # A paused job stays paused (the pause point first, as in ``_checkpoint``),
                    # and a source found to be another disk stops it as a change met mid-copy does.
                    self.disk.wait_source()
                    self._resumed.wait()
                    self._check_source()
                    continue
                if self.disk.failed:  # fail-stopped: no run can land any more
                    raise StoreError(self.disk.failed)
                self._check_source()
                failed_before = self._failed_runs
                for offset, length in self._plan():
                    # hot runs go first, each after its own checkpoint; the planned run once
                    # none is left, unless they (or the guest's writes) made it local meanwhile
                    while self._has_missing(offset, offset + length):
                        self._checkpoint()
                        if self._issue(offset, length):
                            break
                self._drain()
                if self.disk.complete:
                    break
                if self._failed_runs == failed_before:
                    if not self.disk.wait_cutover(0):
                        # pre-copy: every unit worth copying before the cutover is local
                        self.disk.wait_cutover()
                        continue
                    # nothing failed, yet units are missing: a guest fetch still in flight
                    gevent.sleep(0.05)
                    continue
                log.warning("hydration_retry_pass", path=self.disk.path,
                            missing_bytes=self.disk.size - self.disk.local_bytes, retry_in_s=backoff)
                gevent.sleep(backoff)
                backoff = min(backoff * 2, self._retry_max)
            self._drain()
            self._apply(Verb.FINISH)
        except gevent.GreenletExit:
            gevent.killall(list(self._active))
        except SourceChangedError as e:
            # permanent: no retry pass could ever fetch what is missing. The store said so in its
            # one ``source_changed`` event; the job's state change is the only other one. Runs
            # still in flight are dropped, not waited for: none of them can land.
            gevent.killall(list(self._active))
            self._error = str(e)
            self._apply(Verb.FAIL)
        except Exception as e:  # a bug or a dead cache file: say so, never hang the waiter
            self._error = str(e) or repr(e)
            log.error("hydration_failed", path=self.disk.path, error=self._error)
            self._apply(Verb.FAIL)

    def _checkpoint(self) -> None:
        """The one pause/cancel/rate point of every iteration. The pause is looked at again
        after the rate limit's sleep: a pause that came during it must hold the run back (the
        run is not in flight yet, and ``inflight_runs`` has told the operator so)."""
        self._resumed.wait()
        self._check_source()
        delay = self._bucket.delay(self.run_size)
        if delay > 0:
            gevent.sleep(delay)
            self._resumed.wait()
            self._check_source()

    def _check_source(self) -> None:
        """Stop at once when the source is no longer the cache's disk (not a transient error:
        retried until a stall timeout, it would only delay the operator's news)."""
        changed = self.disk.source_changed
        if changed is not None:
            raise SourceChangedError(changed)

    def _issue(self, offset: int, length: int) -> bool:
        """Send one run when a slot is free: a hot run if the guest's reads left one waiting
        (False), else the planned one (True)."""
        # counted as in flight from here: a run waiting for a slot when the job is paused is
        # still sent (pause lets what was issued finish), so "settled" must wait for it too.
        # Never across a checkpoint: a paused job must settle at 0.
        self._issuing = 1
        try:
            self._wait_slot()
            hot = self._next_hot()
            if hot is not None:
                self._spawn(*hot, hot=True)
                return False
            self._spawn(offset, length, hot=False)
            return True
        finally:
            self._issuing = 0

    def _wait_slot(self) -> None:
        while len(self._active) >= self._tuner.window:
            self._slot.clear()
            self._slot.wait()
        # foreground first: checked last, just before sending, so that a guest miss that
        # arrived while this run waited for a slot still goes out ahead of it
        self.disk.wait_foreground_idle(self._fg_yield)

    def _spawn(self, offset: int, length: int, *, hot: bool) -> None:
        g = gevent.spawn(self._copy, offset, length, hot)
        self._active.add(g)
        g.link(self._finished)

    def _next_hot(self) -> tuple[int, int] | None:
        """The next missing piece of a hot run (at most a run, aligned as the LBA runs are),
        or None when nothing where the guest reads is still missing."""
        while not self._hot:
            run = self.disk.hotspots.next_run()
            if run is None:
                return None
            for off, length in self.disk.missing_runs(run.offset, run.length):
                self._hot.extend(_split(off, length, self.run_size))
        return self._hot.popleft()

    def _finished(self, g: gevent.Greenlet) -> None:
        self._active.discard(g)
        self._slot.set()

    def _drain(self) -> None:
        self._tuner.note_starved()
        gevent.joinall(list(self._active))

    def _copy(self, offset: int, length: int, hot: bool) -> None:
        t0 = time.monotonic()
        # what this run is to fetch (a guest write or miss may have filled some since it was
        # planned): the hot figure counts bytes moved out of LBA order, not runs
        todo = sum(n for _, n in self.disk.missing_runs(offset, length)) if hot else 0
        try:
            self.disk.populate(offset, length)
        except SourceChangedError:
            return  # the job stops at its next checkpoint; the store logged why
        except StoreError as e:
            self._failed_runs += 1
            log.warning("hydration_run_failed", path=self.disk.path, offset=offset, bytes=length,
                        error=str(e))
            return
        self._hot_bytes += todo
        self._tuner.on_complete(length, time.monotonic() - t0)

    def _plan(self) -> Iterator[tuple[int, int]]:
        """Missing runs in order, at most ``run_size`` each and aligned to it, after marking
        the source's zero extents local. Extents of the next ``EXTENTS_AHEAD`` windows are
        asked for while the current one is being copied: a sparse LUN has nothing to copy
        between queries, and one query per round trip would bound it at a window per RTT
        (64 TiB of holes over 20 ms: 22 minutes of status alone).

        A window starts at the first missing unit after the one before it, so fully local
        stretches (guest writes, an earlier run) cost no query. Each answer is used only for
        the window it was asked for, and only if that window still has missing units once
        reached: an answer about another range must never stand in for the current one
        (issue 10, defect 12: a skipped window's look-ahead was taken for the next window's,
        which was then left for another pass over the whole LUN)."""
        planned: collections.deque[tuple[int, int, int, gevent.Greenlet]] = collections.deque()
        pos = 0
        while True:
            while len(planned) < EXTENTS_AHEAD:
                window = self._window_from(planned[-1][1] if planned else pos)
                if window is None:
                    break
                start, end = window
                # the epoch before the question: a cutover before the answer is applied makes
                # its zero runs stale (``mark_zero`` then drops them)
                planned.append((start, end, self.disk.epoch,
                                gevent.spawn(self._extents, start, end - start)))
            if not planned:
                return
            start, end, epoch, query = planned.popleft()
            pos = end
            if not self._has_missing(start, end):
                # local meanwhile: the answer is dropped, and the query left to finish on its
                # own (killing a greenlet inside a source call could cut a request in half)
                continue
            extents = query.get()
            self._check_source()  # a changed source's holes are not this disk's
            for ext in extents:
                if ext.zero:
                    self.disk.mark_zero(ext.offset, ext.length, epoch)
                    continue
                for off, length in list(self.disk.missing_runs(ext.offset, ext.length)):
                    yield from _split(off, length, self.run_size)

    def _window_from(self, pos: int) -> tuple[int, int] | None:
        """The next extents window: from the first missing unit at or after ``pos``."""
        size = self.disk.size
        first = next(self.disk.missing_runs(pos, size - pos), None) if pos < size else None
        if first is None:
            return None
        return first[0], min(size, first[0] + EXTENTS_WINDOW)

    def _has_missing(self, start: int, end: int) -> bool:
        return next(self.disk.missing_runs(start, end - start), None) is not None

    def _extents(self, offset: int, length: int) -> list[Extent]:
        source = self.disk.source
        if source is None:
            return [Extent(offset, length, False)]
        try:
            return source.extents(offset, length, Priority.BACKGROUND)
        except SourceChanged:
            # nothing marked zero from it; the run's read meets the change too and stops the copy
            return [Extent(offset, length, False)]
        except SourceError as e:
            # without block status every byte is copied: slower, never wrong
            log.warning("source_extents_failed", path=self.disk.path, offset=offset, error=str(e))
            return [Extent(offset, length, False)]


def _split(offset: int, length: int, run: int) -> Iterator[tuple[int, int]]:
    """Cut ``[offset, offset+length)`` at multiples of ``run``."""
    end = offset + length
    while offset < end:
        stop = min(end, (offset // run + 1) * run)
        yield offset, stop - offset
        offset = stop
