"""A local file or block device as a source (``file:///path`` or a plain path).

Reads are plain ``os.pread`` in the calling greenlet: a local read from the page cache or an
SSD takes microseconds, less than handing it to a thread would cost. Holes are found with
SEEK_DATA/SEEK_HOLE, which every Linux filesystem that matters answers exactly.

Identity: for a regular file, the file itself (device and inode numbers), its size, its
modification time in nanoseconds and nine 4 KiB samples; for a block device, the device it is
(``st_rdev``), its size and the samples. What it guards: a cache resumed against another file,
a file replaced by another (a new inode), and a file modified in place (a new mtime), also
*during* the copy: every read re-checks the open file's size and mtime (one fstat, a
microsecond), and a change stops every later read with ``SourceChanged`` (the store that
reads says so in one ``source_changed`` event). What it cannot: a block device's node has no
mtime that writes change, so writes to the device go unnoticed (use a frozen snapshot); a file restored with
its old mtime (``touch -d``, ``cp -p``) to the same inode looks unchanged; and a copy of the file
moved to another filesystem is a different inode, so resuming from it is refused although its
bytes are the same (pass the original path).

A live file (``live=True``: a running VM's disk, issue 11) changes by design: its identity is the
file (device and inode, or the device node) and its size, without mtime or samples, and reads do
not check for changes (nothing read before the cutover is trusted anyway). ``content_fingerprint``
at the cutover computes the frozen identity and re-arms the per-read check from then on.
"""

from __future__ import annotations

import errno
import os
import stat
from urllib.parse import unquote, urlsplit

from lazyiscsi.source.base import (
    Extent,
    Priority,
    SourceChanged,
    SourceConfigError,
    SourceError,
    SourceNotFound,
    SourceProtocolError,
    SourceUnavailable,
    fingerprint,
    live_identity,
    sample_ranges,
)
from lazyiscsi.source.url import redact


def path_of(url: str) -> str:
    """The filesystem path a ``file://`` URL or a plain path names."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise SourceConfigError(f"source URL {redact(url)!r}: file URLs name a local path (file:///path)")
    if not parts.path:
        raise SourceConfigError(f"source URL {redact(url)!r}: no path")
    return unquote(parts.path)


class FileSource:
    """A read-only local file or block device."""

    def __init__(self, url: str, *, source_id: str | None = None, live: bool = False) -> None:
        path = path_of(url)
        self.url = redact(url)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceNotFound(f"{path}: no such file") from None
        except PermissionError:
            raise SourceError(f"{path}: permission denied") from None
        except OSError as e:
            raise SourceError(f"{path}: cannot open ({e.strerror})") from None
        st = os.fstat(fd)
        mode = st.st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            os.close(fd)
            what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise SourceConfigError(f"{path}: {what}; a source is a regular file or a block device")
        self._fd = fd
        self._path = path
        self.size = os.lseek(fd, 0, os.SEEK_END)  # st_size is 0 for block devices
        if self.size == 0:
            os.close(fd)
            raise SourceConfigError(f"{path}: is empty")
        self._holes = stat.S_ISREG(mode)
        self._changed: str | None = None
        #: what every read re-checks: a regular file's size and mtime (see the module docstring);
        #: None for a device, and for a live file until ``content_fingerprint``
        self._stamp: tuple[int, int] | None = None
        self._id = f":id={source_id}" if source_id else ""
        where = f"dev={st.st_dev}:ino={st.st_ino}" if self._holes else f"rdev={st.st_rdev}"
        self.identity = (live_identity("file", self.size, where + self._id) if live
                         else self.content_fingerprint())

    def content_fingerprint(self) -> str:
        """The identity a frozen open computes, from the file as it is now; it becomes this
        source's ``identity``, and reads check for changes from now on (a live file is pinned at
        the cutover, when it has stopped changing: see the module docstring)."""
        fd = self._live_fd()
        st = os.fstat(fd)
        if os.lseek(fd, 0, os.SEEK_END) != self.size:
            raise SourceChanged(f"{self._path}: the source changed size since it was opened")
        self._stamp = _stamp(st) if self._holes else None
        samples = [self.read(off, length) for off, length in sample_ranges(self.size)]
        where = (f"dev={st.st_dev}:ino={st.st_ino}:mtime_ns={st.st_mtime_ns}" if self._holes
                 else f"rdev={st.st_rdev}")
        self.identity = fingerprint("file", self.size, samples, extra=where + self._id)
        return self.identity

    def read(self, offset: int, length: int, priority: Priority = Priority.FOREGROUND) -> bytes:
        fd = self._live_fd()
        data = os.pread(fd, length, offset)
        # after the read: a change that raced with it is caught now, not by the next read
        self._check_unchanged(fd)
        if len(data) != length:
            # a short read past the end: the file shrank under us
            raise SourceProtocolError(f"{self._path}: short read at {offset} ({len(data)} of {length} "
                                      "bytes): the source changed size")
        return data

    def _check_unchanged(self, fd: int) -> None:
        if self._changed is None and self._stamp is not None:
            now = _stamp(os.fstat(fd))
            if now != self._stamp:
                why = (f"size {self._stamp[0]} -> {now[0]}, mtime_ns {self._stamp[1]} -> {now[1]}")
                self._changed = (f"{self._path}: the source file changed since it was opened ({why}); "
                                 "refusing its bytes, which would mix two disks")
        if self._changed is not None:
            raise SourceChanged(self._changed)

    def extents(self, offset: int, length: int, priority: Priority = Priority.FOREGROUND) -> list[Extent]:
        fd = self._live_fd()
        end = offset + length
        if not self._holes:
            return [Extent(offset, length, False)]
        out: list[Extent] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos: a hole to the end
                    data = end
                elif e.errno == errno.EINVAL:  # filesystem without SEEK_DATA
                    return [Extent(offset, length, False)]
                else:
                    raise SourceError(f"{self._path}: cannot map holes ({e.strerror})") from None
            data = min(data, end)
            if data > pos:
                out.append(Extent(pos, data - pos, True))
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            out.append(Extent(data, hole - data, False))
            pos = hole
        # the holes of a file modified meanwhile would be marked local as zeros of this disk
        self._check_unchanged(fd)
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _live_fd(self) -> int:
        if self._fd < 0:
            raise SourceUnavailable(f"{self.url}: closed")
        return self._fd


def _stamp(st: os.stat_result) -> tuple[int, int]:
    return st.st_size, st.st_mtime_ns


def open_file(url: str, *, source_id: str | None = None, live: bool = False) -> FileSource:
    return FileSource(url, source_id=source_id, live=live)
