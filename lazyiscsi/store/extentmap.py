"""Which tracking units of the LUN are local: a bitmap, kept in two levels.

One bit per unit (default 4 KiB) is 32 MiB for a 1 TiB LUN: too much to hold in memory for
every LUN of a daemon. So the map is split into *pages* of 32768 units (one 4 KiB page of the
on-disk bitmap), and each page is held as EMPTY, FULL or, only while it is partly local, as a
Python int of 32768 bits. A fresh or finished LUN costs one byte per page (8 KiB per TiB);
only the pages being filled hold bits. Python ints give word-at-a-time bit scans for free.

Bit ``u % 32768`` of page ``u // 32768`` is bit ``u % 8`` of byte ``(u % 32768) // 8``:
little-endian, so ``int.from_bytes(page, "little")`` is the page and the on-disk file is a
plain bitmap any tool can read.

Bits only go from 0 to 1 (a local unit never becomes missing), which is what makes a torn
page write on disk harmless: every sector of it holds either the old bits or a superset.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

PAGE_BYTES = 4096
UNITS_PER_PAGE = PAGE_BYTES * 8
_EMPTY_PAGE = bytes(PAGE_BYTES)
_FULL_PAGE = b"\xff" * PAGE_BYTES


class PageState(enum.IntEnum):
    EMPTY = 0
    FULL = 1
    PARTIAL = 2


class ExtentMap:
    """The in-memory map. Persistence is the caller's (see ``page_bytes`` and ``load_page``)."""

    def __init__(self, n_units: int) -> None:
        if n_units <= 0:
            raise ValueError("a map needs at least one unit")
        self.n_units = n_units
        self.n_pages = (n_units + UNITS_PER_PAGE - 1) // UNITS_PER_PAGE
        self._state = bytearray(self.n_pages)  # PageState per page
        self._bits: dict[int, int] = {}  # page -> bits, PARTIAL pages only
        self._local = 0
        self._dirty: set[int] = set()

    # -- queries ---------------------------------------------------------------------------

    @property
    def local_units(self) -> int:
        return self._local

    @property
    def complete(self) -> bool:
        return self._local == self.n_units

    def _page_units(self, page: int) -> int:
        """Units in ``page``: the last page may be short."""
        return min(UNITS_PER_PAGE, self.n_units - page * UNITS_PER_PAGE)

    def is_local(self, unit: int) -> bool:
        page, bit = divmod(unit, UNITS_PER_PAGE)
        state = self._state[page]
        if state == PageState.PARTIAL:
            return bool((self._bits[page] >> bit) & 1)
        return state == PageState.FULL

    def missing_runs(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """Maximal runs ``[a, b)`` of missing units within ``[start, end)``, in order."""
        pending: tuple[int, int] | None = None
        for a, b in self._page_runs(start, min(end, self.n_units)):
            if pending is not None and pending[1] == a:
                pending = (pending[0], b)
                continue
            if pending is not None:
                yield pending
            pending = (a, b)
        if pending is not None:
            yield pending

    def _page_runs(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """Missing runs page by page (not merged across page boundaries)."""
        unit = start
        while unit < end:
            page, lo = divmod(unit, UNITS_PER_PAGE)
            hi = min(self._page_units(page), lo + (end - unit))
            base = page * UNITS_PER_PAGE
            state = self._state[page]
            if state == PageState.EMPTY:
                yield base + lo, base + hi
            elif state == PageState.PARTIAL:
                for a, b in _zero_runs(self._bits[page], lo, hi):
                    yield base + a, base + b
            unit = base + hi

    # -- updates ---------------------------------------------------------------------------

    def set_local(self, start: int, end: int) -> int:
        """Mark ``[start, end)`` local. Returns how many units were newly marked."""
        end = min(end, self.n_units)
        added = 0
        unit = start
        while unit < end:
            page, lo = divmod(unit, UNITS_PER_PAGE)
            page_units = self._page_units(page)
            hi = min(page_units, lo + (end - unit))
            state = self._state[page]
            if state != PageState.FULL:
                full = (1 << page_units) - 1
                old = self._bits.get(page, 0) if state == PageState.PARTIAL else 0
                new = old | (((1 << (hi - lo)) - 1) << lo)
                if new != old:
                    added += (new ^ old).bit_count()
                    self._dirty.add(page)
                    if new == full:
                        self._state[page] = PageState.FULL
                        self._bits.pop(page, None)
                    else:
                        self._state[page] = PageState.PARTIAL
                        self._bits[page] = new
            unit = page * UNITS_PER_PAGE + hi
        self._local += added
        return added

    # -- persistence -----------------------------------------------------------------------

    def take_dirty(self) -> dict[int, bytes]:
        """The on-disk image of every page changed since the last call, and forget them.

        The caller persists these after the data they describe is durable; taking a copy now
        (not reading the live bits later) is what keeps bits set meanwhile out of this commit.
        """
        pages = {p: self.page_bytes(p) for p in sorted(self._dirty)}
        self._dirty.clear()
        return pages

    def page_bytes(self, page: int) -> bytes:
        state = self._state[page]
        if state == PageState.EMPTY:
            return _EMPTY_PAGE
        if state == PageState.FULL and self._page_units(page) == UNITS_PER_PAGE:
            return _FULL_PAGE  # shared: committing a finished 1 TiB map costs no 32 MiB copy
        bits = (1 << self._page_units(page)) - 1 if state == PageState.FULL else self._bits[page]
        return bits.to_bytes(PAGE_BYTES, "little")

    def load_page(self, page: int, data: bytes) -> None:
        """Install a page read from disk (at open, before any update)."""
        page_units = self._page_units(page)
        bits = int.from_bytes(data, "little") & ((1 << page_units) - 1)
        count = bits.bit_count()
        old_state = self._state[page]
        if old_state != PageState.EMPTY:
            raise ValueError(f"map page {page} loaded twice")
        if count == page_units:
            self._state[page] = PageState.FULL
        elif count:
            self._state[page] = PageState.PARTIAL
            self._bits[page] = bits
        self._local += count


def _zero_runs(bits: int, lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """Runs of 0 bits of ``bits`` within ``[lo, hi)``."""
    pos = lo
    while pos < hi:
        rest = ~bits >> pos  # ones where units are missing, from pos on
        if rest & 1:
            first = pos
        else:
            first = pos + ((rest & -rest).bit_length() - 1)
            if first >= hi:
                return
        after = bits >> first
        stop = first + ((after & -after).bit_length() - 1) if after else hi
        stop = min(stop, hi)
        yield first, stop
        pos = stop
