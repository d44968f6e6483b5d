"""The contract every source client keeps, and the typed reasons a source may fail with.

A source is a read-only block device at the source site (QEMU's BlockDriver reduced to
``bdrv_co_preadv`` + ``bdrv_co_block_status``). The store above it knows nothing of the
protocol; it only relies on what this module states:

* ``read`` returns exactly ``length`` bytes or raises a ``SourceError``; reads are idempotent,
  so a client may resend them after a reconnect.
* No request waits for ever: each one has a deadline (``deadline``, restarted by every byte its
  connection delivers, so a slow link that still moves is not taken for a dead one). Past it the
  connection is presumed dead even though no RST came (a WAN path that went silent): it is
  closed, redialled, and what was in flight is sent again. TCP keepalive finds a dead idle
  connection before a request is sent into it. A read keeps resending for ``PATIENCE`` of its
  priority, then raises ``SourceUnreachable``.
* A source that changes under a copy raises ``SourceChanged`` on every later read: its bytes
  would mix two disks. What each client's identity can and cannot notice is in its module.
* ``extents`` covers the asked range exactly with DATA and ZERO runs, in order. It takes a
  ``priority`` as ``read`` does: block status over a large range can keep a server busy for
  a long time, and the copier's queries must not delay a guest's reads (NBD: the background
  connection). A client whose
  protocol cannot tell says DATA for everything: ZERO is a promise the store relies on to skip
  bytes, so it must never be a guess. At background priority they wait for a source that went
  away as background reads do.
* A ``DirtyTracking`` source (a live NBD export with QEMU's dirty bitmap, issue 11) also has
  ``dirty_runs``: it covers the asked range exactly with clean and dirty runs, in order,
  adjacent runs merged, at BACKGROUND priority unless told (the copier polls it). Dirty is never
  a guess in the wrong direction: where the client cannot tell (a server that cut the range
  into more runs than a query may hold) it says dirty, which costs a re-fetch, never a stale block.
* Every method is safe to call from many greenlets at once.
* Error messages never contain secrets: they name the redacted URL only.
"""

from __future__ import annotations

import enum
import hashlib
import socket
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class Priority(enum.Enum):
    """Who is waiting for a read: a guest (foreground) or the background copier.

    Clients that can keep the two apart (NBD: one connection each) must never let a
    foreground read queue behind background ones.
    """

    FOREGROUND = "foreground"
    BACKGROUND = "background"


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of the source: ``zero`` means the source promises the bytes read as zero."""

    offset: int
    length: int
    zero: bool

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class DirtyRun:
    """A run of the source's dirty bitmap: ``dirty`` means written since the bitmap was made."""

    offset: int
    length: int
    dirty: bool

    @property
    def end(self) -> int:
        return self.offset + self.length


class SourceError(Exception):
    """Base of every source failure. ``str()`` is a one-line, secret-free explanation."""

    #: Whether trying the same read again later may succeed.
    transient: bool = False


class SourceUnavailable(SourceError):
    """The source cannot be reached now (refused, dropped, timed out). Retrying may help."""

    transient = True


class SourceUnreachable(SourceUnavailable):
    """A read got no answer within its priority's patience: its connections were refused,
    reset, or silent past the request deadline, and every redial failed too. The source may
    come back; the store reports LOGICAL UNIT NOT READY meanwhile."""


class SourceChanged(SourceError):
    """The source is no longer the disk it was when opened (another object behind the URL, a
    file modified in place). Retrying will not help: every later read fails the same way."""


class SourceReadError(SourceError):
    """The source answered a read with an error (NBD EIO, HTTP 5xx). Retrying may help."""

    transient = True


class SourceNotFound(SourceError):
    """The named export, object or file does not exist. Retrying will not help."""


class SourceProtocolError(SourceError):
    """The source broke its protocol (bad magic, short reply, wrong length). A server bug or
    not the server we think; the connection that saw it is dropped."""


class SourceConfigError(SourceError):
    """The URL itself is wrong: unknown scheme, missing export, bad port."""


#: How long one request may wait without its connection delivering a byte before the connection
#: is presumed dead, closed and redialled, and the request sent again. A third of the store's
#: default I/O timeout (``lazydisk.DEFAULT_IO_TIMEOUT``, 30 s; see ``deadline_for``) so that a
#: guest's read whose connection went silent is resent, and answered, within the guest's own
#: timeout: one deadline on the dead connection, one for the redial and its reply.
DEFAULT_REQUEST_DEADLINE = 10.0
#: request deadlines per I/O timeout (see ``DEFAULT_REQUEST_DEADLINE``)
DEADLINES_PER_IO_TIMEOUT = 3

#: How many request deadlines a read keeps resending for, per priority, before it raises
#: ``SourceUnreachable``. A guest's read gives up after two (one on the connection that went
#: silent, one on a redialled one), inside the store's I/O timeout, so the guest learns
#: NOT READY from the source's own reason (``verify`` reads the same way, on its own source). The
#: background copier waits for the source to come back, however long: it then resumes within one
#: redial (``None``: for ever).
PATIENCE: dict[Priority, int | None] = {Priority.FOREGROUND: 2, Priority.BACKGROUND: None}

#: TCP keepalive on every source socket (tcp(7)): probes start after this many deadlines of
#: idleness, every third of a deadline, and this many unanswered probes drop the connection.
#: It finds a dead idle connection (nothing in flight, so no request deadline running) before
#: the next request is sent into it.
_KEEPALIVE_IDLE_DEADLINES = 1
_KEEPALIVE_PROBES = 3


def deadline_for(io_timeout: float) -> float:
    """The request deadline that fits a store I/O timeout (``DEFAULT_REQUEST_DEADLINE``)."""
    return io_timeout / DEADLINES_PER_IO_TIMEOUT


def live_identity(kind: str, size: int, extra: str) -> str:
    """The identity of a source opened live (still in use, ``open_source(..., live=True)``): what
    it is (size, name) without what it holds. Content samples would change under the running VM,
    so a cache bound to them would refuse to resume a minute later; ``content_fingerprint``
    pins the content once the source has stopped changing (the cutover)."""
    return f"{kind}:size={size}:live:{extra}"


def redial_delay_cap(deadline: float) -> float:
    """The longest wait between two redials: half a deadline, so that a path that comes back
    is in use again within half a deadline (plus the handshake)."""
    return deadline / 2


def set_keepalive(sock: socket.socket, deadline: float) -> None:
    """Turn TCP keepalive on for a source socket (see ``_KEEPALIVE_IDLE_DEADLINES``)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # a Unix socket has no path to lose
    idle = max(1, int(deadline * _KEEPALIVE_IDLE_DEADLINES))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(deadline / 3)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, _KEEPALIVE_PROBES)


@runtime_checkable
class Source(Protocol):
    """What the store needs of a source site."""

    #: The URL with any password removed: safe for logs, errors and the superblock.
    url: str
    #: Size in bytes.
    size: int
    #: A stable string that changes when the source is a different disk (see ``fingerprint``).
    identity: str

    def read(self, offset: int, length: int, priority: Priority = Priority.FOREGROUND) -> bytes: ...

    def extents(self, offset: int, length: int, priority: Priority = Priority.FOREGROUND) -> list[Extent]: ...

    def close(self) -> None: ...


#: Where ``fingerprint`` samples, as fractions of the size. Fixed forever: changing them
#: changes every identity and would make every existing cache refuse to resume.
_SAMPLE_POINTS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
_SAMPLE_LEN = 4096


def sample_ranges(size: int) -> list[tuple[int, int]]:
    """The (offset, length) ranges ``fingerprint`` hashes, for clients that fetch them in parallel."""
    ranges = []
    for frac in _SAMPLE_POINTS:
        off = (int(size * frac) // _SAMPLE_LEN) * _SAMPLE_LEN
        length = min(_SAMPLE_LEN, size - off)
        if length > 0 and (off, length) not in ranges:
            ranges.append((off, length))
    if size > _SAMPLE_LEN:
        tail = (size - _SAMPLE_LEN, _SAMPLE_LEN)
        if tail not in ranges:
            ranges.append(tail)
    return ranges


def fingerprint(kind: str, size: int, samples: list[bytes], extra: str = "") -> str:
    """A content identity for protocols that carry none (NBD, plain files).

    Hashes the size and a few 4 KiB samples spread over the disk: cheap to compute at open
    (a handful of reads) and different for any two disks a migration could confuse. It is a
    guard against pointing a cache at the wrong disk, not a checksum of the whole source.
    """
    h = hashlib.sha256()
    h.update(f"{kind}\0{size}\0{extra}\0".encode())
    for s in samples:
        h.update(len(s).to_bytes(8, "little"))
        h.update(s)
    return f"{kind}:size={size}:sha256={h.hexdigest()[:32]}" + (f":{extra}" if extra else "")


@runtime_checkable
class DirtyTracking(Protocol):
    """A source that reports which of its blocks were written since a point in time (QEMU's
    dirty bitmap, NBD meta context ``qemu:dirty-bitmap:NAME``)."""

    dirty_bitmap: str

    def dirty_runs(self, offset: int, length: int,
                   priority: Priority = Priority.BACKGROUND) -> list[DirtyRun]: ...
