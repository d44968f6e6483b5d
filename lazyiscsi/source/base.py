"""The contract every source client keeps, and the typed reasons a source may fail with.

A source is a read-only block device at the source site (QEMU's BlockDriver reduced to
``bdrv_co_preadv`` + ``bdrv_co_block_status``). The store above it knows nothing of the
protocol; it only relies on what this module states:

* ``read`` returns exactly ``length`` bytes or raises a ``SourceError``; reads are idempotent,
  so a client may resend them after a reconnect.
* ``extents`` covers the asked range exactly with DATA and ZERO runs, in order. It takes a
  ``priority`` as ``read`` does: block status over a large range can keep a server busy for
  a long time, and the copier's queries must not delay a guest's reads (NBD: the background
  connection). A client whose
  protocol cannot tell says DATA for everything: ZERO is a promise the store relies on to skip
  bytes, so it must never be a guess.
* Every method is safe to call from many greenlets at once.
* Error messages never contain secrets: they name the redacted URL only.
"""

from __future__ import annotations

import enum
import hashlib
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


class SourceError(Exception):
    """Base of every source failure. ``str()`` is a one-line, secret-free explanation."""

    #: Whether trying the same read again later may succeed.
    transient: bool = False


class SourceUnavailable(SourceError):
    """The source cannot be reached now (refused, dropped, timed out). Retrying may help."""

    transient = True


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
