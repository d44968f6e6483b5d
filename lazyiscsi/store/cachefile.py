"""The files under the store: the sparse cache file and the bitmap file.

The store reaches both through ``BlockFile`` so that the crash tests can put a file that
forgets unsynced writes underneath it (a fake below the unit under test, never in its place).
``OsFile`` is the real one.

Reads and small writes of a local file are done in-line: they hit the page cache and take
microseconds, less than a thread hand-off costs. Large writes into the cache file do not: the
store hands them to its own writer thread (``writer.py``; writing 1 MiB into fresh pages takes
milliseconds, and longer while the filesystem throttles). These methods stay plain blocking
calls either way; where they run is the store's choice. ``sync`` runs in gevent's thread pool:
an fdatasync can take tens of milliseconds, during which the whole gevent hub (every other LUN
and session) would stall.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Protocol

import gevent

from lazyiscsi.store.errors import CacheConfigError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class BlockFile(Protocol):
    """A file the store reads and writes at offsets, and makes durable on request."""

    def size(self) -> int: ...

    def truncate(self, size: int) -> None: ...

    def preadinto(self, buf: memoryview, offset: int) -> None: ...

    def pread(self, length: int, offset: int) -> bytes:
        """A new buffer of ``length`` bytes: no zero-filling first, unlike preadinto's."""
        ...

    def pwrite(self, data: bytes | memoryview, offset: int) -> None: ...

    def punch(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros, freeing the space where possible."""
        ...

    def sync(self) -> None:
        """Make every completed write durable (fdatasync)."""
        ...

    def start_writeback(self, offset: int, length: int) -> None:
        """Begin writing a range to the medium without waiting; durability still needs sync."""
        ...

    def drop_cache(self) -> None:
        """Forget the file's clean pages in the page cache, so reads see the medium."""
        ...

    def close(self) -> None: ...


class FileOpener(Protocol):
    def __call__(self, path: str, *, create: bool) -> BlockFile: ...


class OsFile:
    """A regular file opened read-write, locked against a second lazyiscsi process."""

    def __init__(self, path: str, *, create: bool) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            self._fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            raise CacheConfigError(f"{path}: missing") from None
        except OSError as e:
            raise CacheConfigError(f"{path}: cannot open ({e.strerror})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise CacheConfigError(f"{path}: in use by another lazyiscsi process") from None
            raise CacheConfigError(f"{path}: cannot lock ({e.strerror})") from None
        self.path = path
        self._punch_ok = True

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)

    def preadinto(self, buf: memoryview, offset: int) -> None:
        done = 0
        want = len(buf)
        while done < want:
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:
                # past the end of a file shorter than the LUN: the rest reads as zeros
                buf[done:] = bytes(want - done)
                return
            done += n

    def pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) == length:
            return data  # the common case: one system call, one copy
        buf = bytearray(length)
        self.preadinto(memoryview(buf), offset)
        return bytes(buf)

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n

    def punch(self, offset: int, length: int) -> None:
        if self._punch_ok:
            try:
                _fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._punch_ok = False  # e.g. tmpfs on old kernels: write zeros instead
        self.pwrite(bytes(length), offset)

    def sync(self) -> None:
        gevent.get_hub().threadpool.apply(os.fdatasync, (self._fd,))

    def start_writeback(self, offset: int, length: int) -> None:
        """Start writing a range back without waiting (sync_file_range WRITE).

        Why: on ext4 (data=ordered) a journal commit must first write out the dirty data it
        covers, and every other write to the filesystem waits for the commit meanwhile. Data
        written back as it arrives leaves each fdatasync little to do, so the hub is never
        stalled for long by a commit (measured: on-demand misses during hydration lost their
        70-90 ms outliers)."""
        gevent.get_hub().threadpool.spawn(_sync_file_range, self._fd, offset, length,
                                          _SYNC_FILE_RANGE_WRITE)

    def drop_cache(self) -> None:
        """posix_fadvise DONTNEED: clean pages go (dirty ones are kept until written). After a
        failed writeback the kernel marks pages clean without writing them; this drops them."""
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # also drops the flock
            self._fd = -1


def _load_fallocate():  # type: ignore[no-untyped-def]
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    fn.restype = ctypes.c_int
    return fn


_libc_fallocate = _load_fallocate()
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range():  # type: ignore[no-untyped-def]
    import ctypes
    import ctypes.util

    fn = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).sync_file_range
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode: Python's os.posix_fallocate cannot punch holes."""
    import ctypes

    if _libc_fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
