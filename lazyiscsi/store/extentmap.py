"""Which tracking units of the LUN are local: a bitmap, kept in two levels.

One bit per unit (default 4 KiB) is 32 MiB for a 1 TiB LUN: too much to hold in memory for
every LUN of a daemon. So the map is split into *pages* of 32768 units (one 4 KiB page of the
on-disk bitmap), and each page is held as EMPTY, FULL or, only while it is partly local, as a
Python int of 32768 bits. A fresh or finished LUN costs one byte per page (8 KiB per TiB);
only the pages being filled hold bits. Python ints give word-at-a-time bit operations
(intersections, counts) for free; runs are found in the page's bytes with a regular-expression
search for the first byte that is not 0x00 (or not 0xff), which runs in C: a scan costs a few
operations per run and per 4 KiB page, never one per unit (a per-unit loop is ~8 CPU-minutes
per TiB of 4 KiB units).

Bit ``u % 32768`` of page ``u // 32768`` is bit ``u % 8`` of byte ``(u % 32768) // 8``:
little-endian, so ``int.from_bytes(page, "little")`` is the page and the on-disk file is a
plain bitmap any tool can read.

Bits only go from 0 to 1 (a local unit never becomes missing), which is what makes a torn
page write on disk harmless: every sector of it holds either the old bits or a superset. The
one exception is a live migration's cutover (``clear``), which invalidates units the source
changed: a torn page then may keep a stale bit on the medium, which is harmless because the
cutover is redone, from the source's final bitmap, until the phase after it is durable.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterator

PAGE_BYTES = 4096
UNITS_PER_PAGE = PAGE_BYTES * 8
_EMPTY_PAGE = bytes(PAGE_BYTES)
_FULL_PAGE = b"\xff" * PAGE_BYTES
_ANY_SET = re.compile(rb"[^\x00]")
_ANY_CLEAR = re.compile(rb"[^\xff]")


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
        return _merged(_scan(self.n_units, start, end, lambda page: ~self._raw(page)))

    def _raw(self, page: int) -> int:
        """The page's bits for bitwise work: -1 (every bit set) when FULL, 0 when EMPTY."""
        state = self._state[page]
        if state == PageState.PARTIAL:
            return self._bits[page]
        return -1 if state == PageState.FULL else 0

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

    def clear(self, start: int, end: int) -> int:
        """Mark ``[start, end)`` missing (cutover only: see the module docstring). Returns how
        many units were local."""
        end = min(end, self.n_units)
        removed = 0
        unit = start
        while unit < end:
            page, lo = divmod(unit, UNITS_PER_PAGE)
            hi = min(self._page_units(page), lo + (end - unit))
            old = self._raw(page) & ((1 << self._page_units(page)) - 1)
            new = old & ~(((1 << (hi - lo)) - 1) << lo)
            if new != old:
                removed += (old ^ new).bit_count()
                self._shrink(page, new)
            unit = page * UNITS_PER_PAGE + hi
        self._local -= removed
        return removed

    def intersect(self, other: ExtentMap) -> None:
        """Keep only the units also local in ``other``; pages that changed become dirty, so
        ``take_dirty`` hands out exactly what must be rewritten.

        The one way bits go from 1 to 0, and only for a map whose torn pages are harmless (the
        guest-written map dropping units after a reboot: see lazydisk), never the extent map
        itself."""
        if other.n_units != self.n_units:
            raise ValueError("maps of different sizes")
        for page in range(self.n_pages):
            if self._state[page] == PageState.EMPTY or other._state[page] == PageState.FULL:
                continue
            full = (1 << self._page_units(page)) - 1
            old = self._raw(page) & full
            new = old & other._raw(page)
            if new == old:
                continue
            self._local -= (old ^ new).bit_count()
            self._shrink(page, new)

    def _shrink(self, page: int, new: int) -> None:
        """Give a page the bits ``new``, fewer than it had (so never FULL): it must be rewritten."""
        self._dirty.add(page)
        self._bits.pop(page, None)
        if new:
            self._state[page] = PageState.PARTIAL
            self._bits[page] = new
        else:
            self._state[page] = PageState.EMPTY

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


def only_in(a: ExtentMap, b: ExtentMap, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Maximal runs of units within ``[start, end)`` local in ``a`` and missing in ``b``
    (``verify``: fetched but not written by the guest; reopen: written but not in the map)."""
    if a.n_units != b.n_units:
        raise ValueError("maps of different sizes")
    return _merged(_scan(a.n_units, start, end, lambda page: a._raw(page) & ~b._raw(page)))


def _scan(n_units: int, start: int, end: int, select: Callable[[int], int]) -> Iterator[tuple[int, int]]:
    """Runs of the units whose bit is set in ``select(page)``, page by page (not merged
    across page boundaries). ``select`` may return -1 or 0 for a page that is all or none."""
    end = min(end, n_units)
    unit = start
    while unit < end:
        page, lo = divmod(unit, UNITS_PER_PAGE)
        hi = min(UNITS_PER_PAGE, lo + (end - unit))
        base = page * UNITS_PER_PAGE
        raw = select(page)
        if raw == -1:  # all: no 32768-bit mask to build for an empty or full page
            yield base + lo, base + hi
        elif raw:
            mask = (1 << (hi - lo)) - 1
            bits = (raw >> lo) & mask
            if bits == mask:
                yield base + lo, base + hi
            elif bits:
                for a, b in _one_runs(bits, hi - lo):
                    yield base + lo + a, base + lo + b
        unit = base + hi


def _merged(runs: Iterator[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Join runs that touch (a run that ends where the next page's begins)."""
    pending: tuple[int, int] | None = None
    for a, b in runs:
        if pending is not None and pending[1] == a:
            pending = (pending[0], b)
            continue
        if pending is not None:
            yield pending
        pending = (a, b)
    if pending is not None:
        yield pending


def _one_runs(bits: int, width: int) -> Iterator[tuple[int, int]]:
    """Runs of 1 bits of ``bits`` (non-negative, below ``1 << width``): found in its bytes,
    so that whole bytes of 0x00 or 0xff are skipped by a search in C, not bit by bit."""
    buf = bits.to_bytes((width + 7) // 8, "little")
    pos = 0
    while pos < width:
        first = _next_bit(buf, pos, width, _ANY_SET, 0)
        if first >= width:
            return
        stop = _next_bit(buf, first, width, _ANY_CLEAR, 0xFF)
        yield first, stop
        pos = stop


def _next_bit(buf: bytes, pos: int, width: int, other_byte: re.Pattern[bytes], flip: int) -> int:
    """The first bit at or after ``pos`` that is set (``flip`` 0) or clear (``flip`` 0xff),
    or ``width`` if none. ``other_byte`` finds the first byte that is not all the opposite."""
    i, shift = divmod(pos, 8)
    byte = (buf[i] ^ flip) >> shift
    if byte:
        return min(width, pos + _lowest_bit(byte))
    m = other_byte.search(buf, i + 1)
    if m is None:
        return width
    j = m.start()
    return min(width, 8 * j + _lowest_bit(buf[j] ^ flip))


def _lowest_bit(byte: int) -> int:
    return (byte & -byte).bit_length() - 1
