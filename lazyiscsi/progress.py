"""Human-readable progress: a bar on a TTY, a plain line per interval otherwise.

A bar line never wraps: it is fitted to the terminal's width when drawn (a wrapped line breaks
the in-place redraw, ``\r`` returns to the start of the last row only). The bar shrinks first,
down to ``MIN_BAR``; then the text is cut. Hand-made rather than tqdm or rich: one bar and
one line need no dependency beyond what Debian's python3 packages give the .deb.
"""

from __future__ import annotations

import shutil
from typing import TextIO

from lazyiscsi.store.hydrator import Progress

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
#: widest and narrowest bar, in characters between the brackets
MAX_BAR, MIN_BAR = 30, 10


def terminal_columns() -> int:
    """The terminal's width now ($COLUMNS, the tty's size, else 80): it may change while we draw."""
    return shutil.get_terminal_size().columns


def bar_line(fraction: float, text: str, columns: int) -> str:
    """``[####------] text`` in at most ``columns - 1`` characters (the last column is left
    free: writing into it makes some terminals wrap at once)."""
    room = columns - 1
    width = max(MIN_BAR, min(MAX_BAR, room - len(text) - 3))
    filled = min(width, max(0, int(width * fraction)))
    line = f"[{'#' * filled}{'-' * (width - filled)}] {text}"
    return line[:max(room, 0)]


def human_bytes(n: float) -> str:
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def human_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def describe(p: Progress) -> str:
    """One line: how far, how fast, how long still, and how on-demand reads fare."""
    pct = 100.0 * p.current / p.total if p.total else 100.0
    miss = f" misses={p.misses}" + (f" hot={human_bytes(p.hot_bytes)}" if p.hot_bytes else "")
    if p.miss_p99_ms is not None:
        miss += f" miss_p50={p.miss_p50_ms:.1f}ms miss_p99={p.miss_p99_ms:.1f}ms"
    limit = f" limit={human_bytes(p.rate_limit)}/s" if p.rate_limit else ""
    return (f"{pct:5.1f}% {human_bytes(p.current)}/{human_bytes(p.total)} "
            f"{human_bytes(p.rate)}/s eta={human_eta(p.eta_s)} inflight={p.inflight_window}"
            f"{limit}{miss}")


class ProgressDisplay:
    """Redraws a bar in place on a TTY; prints a plain line each call otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()

    @property
    def tty(self) -> bool:
        return self._tty

    def show(self, p: Progress) -> None:
        if self._tty:
            line = bar_line(p.current / p.total if p.total else 1.0, describe(p), terminal_columns())
            self._stream.write(f"\r{line}\x1b[K")
        else:
            self._stream.write(f"progress {describe(p)}\n")
        self._stream.flush()

    def done(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()
