"""Proof that the copy is right: every local unit the guest has not written must equal the
source. ``verify`` reads both sides in chunks at background priority and reports the ranges that
differ; it changes nothing (repairing would need to know which side is wrong).

The maps are walked one map page of units at a time (a span), never one unit at a time: the
runs to compare and the units still missing come from word-level scans (see extentmap), so a
1 TiB LUN of 4 KiB units costs about a second of CPU beside its reads, not minutes, and the
hub runs other greenlets between spans.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import gevent

from lazyiscsi.source.base import Priority, Source
from lazyiscsi.store.extentmap import UNITS_PER_PAGE
from lazyiscsi.store.lazydisk import LazyDisk

#: bytes compared per source read
CHUNK = 1 << 20


@dataclass
class VerifyReport:
    compared: int = 0  # bytes compared
    skipped_written: int = 0  # bytes the guest wrote: not comparable
    skipped_missing: int = 0  # bytes not local yet: nothing to compare
    mismatches: list[tuple[int, int]] = field(default_factory=list)  # (offset, length), merged


def verify(disk: LazyDisk, source: Source, *,
           progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Compare ``disk`` against ``source``; ``progress(done, total)`` is called per chunk
    compared and per span scanned."""
    report = VerifyReport()
    unit = disk.unit
    n_units = -(-disk.size // unit)

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
        for a, b in _chunks(runs, max(1, CHUNK // unit)):
            _compare(disk, source, a, b, report)
            if progress is not None:
                progress(min(b * unit, disk.size), disk.size)
        if progress is not None:
            progress(min(last * unit, disk.size), disk.size)
    return report


def _chunks(runs: list[tuple[int, int]], most: int) -> list[tuple[int, int]]:
    """Cut unit runs into pieces of at most ``most`` units (one source read each)."""
    return [(a, min(b, a + most)) for start, b in runs for a in range(start, b, most)]


def _compare(disk: LazyDisk, source: Source, a: int, b: int, report: VerifyReport) -> None:
    unit = disk.unit
    offset = a * unit
    length = min(b * unit, disk.size) - offset
    theirs = source.read(offset, length, Priority.BACKGROUND)
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
