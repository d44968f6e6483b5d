"""Human-readable progress: a bar on a TTY, a plain line per interval otherwise."""

from __future__ import annotations

from typing import TextIO

from lazyiscsi.store.hydrator import Progress

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


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
    miss = f" misses={p.misses}"
    if p.miss_p99_ms is not None:
        miss += f" miss_p50={p.miss_p50_ms:.1f}ms miss_p99={p.miss_p99_ms:.1f}ms"
    limit = f" limit={human_bytes(p.rate_limit)}/s" if p.rate_limit else ""
    return (f"{pct:5.1f}% {human_bytes(p.current)}/{human_bytes(p.total)} "
            f"{human_bytes(p.rate)}/s eta={human_eta(p.eta_s)} inflight={p.inflight_window}"
            f"{limit}{miss}")


class ProgressDisplay:
    """Redraws a bar in place on a TTY; prints a plain line each call otherwise."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._width = width

    @property
    def tty(self) -> bool:
        return self._tty

    def show(self, p: Progress) -> None:
        if self._tty:
            filled = int(self._width * p.current / p.total) if p.total else self._width
            bar = "#" * filled + "-" * (self._width - filled)
            self._stream.write(f"\r[{bar}] {describe(p)}\x1b[K")
        else:
            self._stream.write(f"progress {describe(p)}\n")
        self._stream.flush()

    def done(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()
