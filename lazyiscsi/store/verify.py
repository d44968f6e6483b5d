"""Proof that the copy is right: every local unit the guest has not written must equal the
source. ``verify`` reads both sides in chunks and reports the ranges that differ; it changes
nothing (repairing would need to know which side is wrong).

Its source reads go at foreground priority, on a source opened for the verify alone: they take
nothing from the guests' connection, and a source that stops answering fails the verify after
two request deadlines (``base.PATIENCE``) with the source's reason. At background priority
they would wait for the source for ever, and the operator's command with them.

The maps are walked one map page of units at a time (a span), never one unit at a time: the
runs to compare and the units still missing come from word-level scans (see extentmap), so a
1 TiB LUN of 4 KiB units costs about a second of CPU beside its reads, not minutes, and the
hub runs other greenlets between spans. Several source reads are in flight at once: one at a
time, a WAN's round trip bounds verify at a chunk per RTT (1 MiB per 20 ms: 6 hours a TiB).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import gevent

from lazyiscsi.source.base import Priority, Source
from lazyiscsi.store.extentmap import UNITS_PER_PAGE
from lazyiscsi.store.lazydisk import LazyDisk

#: bytes compared per source read
CHUNK = 1 << 20
#: source reads in flight at once (memory: this many chunks)
READS_IN_FLIGHT = 8


@dataclass
class VerifyReport:
    compared: int = 0  # bytes compared
    skipped_written: int = 0  # bytes the guest wrote: not comparable
    skipped_missing: int = 0  # bytes not local yet: nothing to compare
    mismatches: list[tuple[int, int]] = field(default_factory=list)  # (offset, length), merged


def verify(disk: LazyDisk, source: Source, *,
           progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Compare ``disk`` against ``source``; ``progress(done, total)`` is called per chunk
    compared and per span scanned, in LUN order."""
    report = VerifyReport()
    # chunks (a, b, their read) and span ends (None, end, None), settled in the order queued
    queue: collections.deque[tuple[int | None, int, gevent.Greenlet | None]] = collections.deque()
    reads = 0
    for a, b in _work(disk, report):
        if a is None:
            queue.append((None, b, None))
            continue
        offset = a * disk.unit
        queue.append((a, b, gevent.spawn(_read, source, offset, min(b * disk.unit, disk.size) - offset)))
        reads += 1
        while reads >= READS_IN_FLIGHT:
            reads -= _settle(disk, report, queue.popleft(), progress)
    while queue:
        _settle(disk, report, queue.popleft(), progress)
    return report


def _work(disk: LazyDisk, report: VerifyReport) -> Iterator[tuple[int | None, int]]:
    """Chunks to compare ``(a, b)`` in LUN order, each span followed by ``(None, end)``; the
    skipped figures are counted as each span is scanned."""
    unit = disk.unit
    n_units = -(-disk.size // unit)
    per_chunk = max(1, CHUNK // unit)

    def nbytes(a: int, b: int) -> int:
        return min(b * unit, disk.size) - a * unit

    for first in range(0, n_units, UNITS_PER_PAGE):
        # verify runs in the daemon's hub: a span with nothing to read never yields on its
        # own, and a 64 TiB LUN is half a million spans; the guests' I/O goes first
        gevent.sleep(0)
        last = min(n_units, first + UNITS_PER_PAGE)
        # one snapshot of the span, taken with no yield in between, so the three figures add up
        runs = list(disk.verifiable_runs(first, last))
        missing = sum(nbytes(a, b) for a, b in disk.missing_unit_runs(first, last))
        local = sum(nbytes(a, b) for a, b in runs)
        report.skipped_missing += missing
        report.skipped_written += nbytes(first, last) - local - missing
        for start, end in runs:
            for a in range(start, end, per_chunk):
                yield a, min(end, a + per_chunk)
        yield None, min(last * unit, disk.size)


def _read(source: Source, offset: int, length: int) -> bytes | Exception:
    """A source read that returns its error rather than dying with it (a greenlet that dies
    with an exception prints a traceback)."""
    try:
        return source.read(offset, length, Priority.FOREGROUND)
    except Exception as e:
        return e


def _settle(disk: LazyDisk, report: VerifyReport,
            item: tuple[int | None, int, gevent.Greenlet | None],
            progress: Callable[[int, int], None] | None) -> int:
    """Compare one queued chunk (or pass a span's end); returns the reads it took off."""
    a, b, read = item
    if a is None or read is None:
        if progress is not None:
            progress(b, disk.size)
        return 0
    theirs = read.get()
    if isinstance(theirs, Exception):
        # verify stops at the first failed read; the reads still in flight are left to end on
        # their own (killing a greenlet inside a source call could cut a request in half)
        raise theirs
    _compare(disk, a, b, theirs, report)
    if progress is not None:
        progress(min(b * disk.unit, disk.size), disk.size)
    return 1


def _compare(disk: LazyDisk, a: int, b: int, theirs: bytes, report: VerifyReport) -> None:
    unit = disk.unit
    offset = a * unit
    length = min(b * unit, disk.size) - offset
    ours = disk.read_local(offset, length)
    report.compared += length
    if theirs == ours:
        return
    for u in range(a, b):  # only in a chunk that differs: find the units
        lo = (u - a) * unit
        hi = min(lo + unit, length)
        if theirs[lo:hi] != ours[lo:hi] and _still_differs(disk, u, theirs[lo:hi]):
            _add(report.mismatches, offset + lo, hi - lo)


def _still_differs(disk: LazyDisk, u: int, theirs: bytes) -> bool:
    """The guest may have written the unit while the source was being read: only a unit
    still unwritten, read again, counts."""
    if next(disk.verifiable_runs(u, u + 1), None) is None:
        return False
    return disk.read_local(u * disk.unit, len(theirs)) != theirs


def _add(ranges: list[tuple[int, int]], offset: int, length: int) -> None:
    if ranges and ranges[-1][0] + ranges[-1][1] == offset:
        ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
    else:
        ranges.append((offset, length))
