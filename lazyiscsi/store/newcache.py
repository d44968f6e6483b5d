"""Creating a cache: giving the new file its size, and undoing a creation that failed.

A cache is a raw image as large as the LUN, so the filesystem under it must take a file that
large: ext4 with 4 KiB blocks stops at 16 TiB, ext4 with 1 KiB blocks at 4 TiB (XFS and btrfs
go to exabytes). Past its limit ftruncate(2) fails with EFBIG, and so it does past the
process's RLIMIT_FSIZE (``ulimit -f``, systemd's ``LimitFSIZE=``; Python ignores the SIGXFSZ
that comes with it). Linux has no call that tells the limit, so it is found the way it bites:
by sizing the still-empty file, bisecting between what worked and what did not (about 45
ftruncate calls on an empty inode, no data written).

A creation that fails leaves nothing behind: a ``.meta`` without a sized cache, or side files
of a cache that never was, would be taken for a cache on the next run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource

from lazyiscsi.store.cachefile import BlockFile
from lazyiscsi.store.errors import CacheConfigError

#: files beside a cache, all made by ``LazyDisk.open``; ``.meta.tmp`` is write_superblock's
SIDE_FILES = (".meta", ".meta.tmp", ".map", ".written", ".boot")


def size_new_cache(cache: BlockFile, size: int, path: str) -> None:
    """Give the new, empty cache file its ``size``; a size it cannot take is a
    ``CacheConfigError`` naming the size and the limit, with the file left empty."""
    try:
        cache.truncate(size)
    except OSError as e:
        if e.errno != errno.EFBIG:
            raise CacheConfigError(f"{path}: cannot size the cache to {size} bytes ({e.strerror})") from None
        limit = _largest_size(cache, size)
        with contextlib.suppress(OSError):
            cache.truncate(0)
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY and soft <= size:
            what = "this process's file size limit (RLIMIT_FSIZE: ulimit -f, systemd LimitFSIZE=)"
        else:
            what = ("the filesystem's largest file; put the cache on a filesystem that takes "
                    "larger files (XFS; ext4 stops at 16 TiB with 4 KiB blocks)")
        raise CacheConfigError(f"{path}: the source is {_size(size)} but files here can be at most "
                               f"{_size(limit)}: {what}") from None


def undo_new_cache(path: str, *, remove_cache: bool) -> None:
    """Remove what a failed creation made: the side files, and the cache file if it did not
    exist before (an operator's own empty file stays)."""
    for suffix in SIDE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")
    if remove_cache:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    # durable, or a crash could bring back a .meta over an unsized cache
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _largest_size(cache: BlockFile, too_big: int) -> int:
    """The largest size ``cache`` can be truncated to, below ``too_big`` (which failed)."""
    fits, fails = 0, too_big
    while fails - fits > 1:
        mid = (fits + fails) // 2
        try:
            cache.truncate(mid)
        except OSError:
            fails = mid
        else:
            fits = mid
    return fits


def _size(n: int) -> str:
    """``n`` bytes exactly, and in the largest binary unit, truncated to three decimals (never
    rounded up: ext4's limit, 16 TiB less 4 KiB, must not read as the 16 TiB it refuses)."""
    for shift, name in ((60, "EiB"), (50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift:
            return f"{n} bytes ({(n * 1000 >> shift) / 1000:g} {name})"
    return f"{n} bytes"
