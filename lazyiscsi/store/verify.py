"""Proof that the copy is right: every local unit the guest has not written must equal the
source. ``verify`` reads both sides in chunks at background priority and reports the ranges that
differ; it changes nothing (repairing would need to know which side is wrong)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lazyiscsi.source.base import Priority, Source
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
    """Compare ``disk`` against ``source``; ``progress(done, total)`` is called per chunk."""
    report = VerifyReport()
    unit = disk.unit
    per_chunk = max(1, CHUNK // unit)
    n_units = -(-disk.size // unit)
    for first in range(0, n_units, per_chunk):
        last = min(n_units, first + per_chunk)
        for a, b in disk.verifiable_runs(first, last):
            offset = a * unit
            length = min(b * unit, disk.size) - offset
            theirs = source.read(offset, length, Priority.BACKGROUND)
            ours = disk.read_local(offset, length)
            report.compared += length
            if theirs == ours:
                continue
            for u in range(a, b):
                lo = (u - a) * unit
                hi = min(lo + unit, length)
                if theirs[lo:hi] != ours[lo:hi] and _still_differs(disk, u, theirs[lo:hi]):
                    _add(report.mismatches, offset + lo, hi - lo)
        chunk_bytes = min(last * unit, disk.size) - first * unit
        local = sum(min(b * unit, disk.size) - a * unit for a, b in disk.verifiable_runs(first, last))
        missing = sum(min(b * unit, disk.size) - a * unit for a, b in disk.missing_unit_runs(first, last))
        report.skipped_missing += missing
        report.skipped_written += chunk_bytes - local - missing
        if progress is not None:
            progress(min(last * unit, disk.size), disk.size)
    return report


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
