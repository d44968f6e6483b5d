"""Typed reasons the store fails with. The SCSI layer maps each to sense data in one table."""

from __future__ import annotations


class StoreError(Exception):
    """Base of store failures; ``str()`` is one secret-free line for an operator."""


class CacheConfigError(StoreError):
    """The cache cannot be used as asked: wrong unit, not a cache, in use, source mismatch."""


class SourceMismatch(CacheConfigError):
    """The source given at open is not the disk this cache was filled from."""


class OutOfRange(StoreError):
    """An I/O reaches past the end of the LUN."""


class CacheIOError(StoreError):
    """The local cache file refused a write (the source is not to blame)."""


class CacheReadError(CacheIOError):
    """The local cache file failed a read of data that is local."""


class CacheFull(CacheIOError):
    """The cache's filesystem has no space left (ENOSPC, EDQUOT) for data the LUN must hold."""


class CacheFailed(CacheIOError):
    """The volume is fail-stopped: an fdatasync of the cache failed, so data acknowledged
    earlier may never reach the medium. Every later write and flush fails; reads of local data
    still work (read-only-failed) until the volume is reopened."""


class SourceIOError(StoreError):
    """Data the guest asked for could not be read from the source (after retries)."""


class SourceUnreachable(SourceIOError):
    """The source did not answer (connection refused, dropped or silent), after retries."""


class SourceChangedError(SourceIOError):
    """The source is no longer the disk this cache was filled from (a file modified in place, an
    HTTP object or NBD export replaced behind its URL). Permanent: no unit that is not local yet
    can ever be fetched, so the copy stops; units already local are still served."""


class SourceTimeout(SourceUnreachable):
    """The source did not answer an on-demand read within the I/O timeout."""


class NoSource(SourceIOError):
    """A missing unit was asked for while no source is attached."""


class WriteProtected(StoreError):
    """A write before a live volume's cutover: the source is still in use, and a write here would
    diverge from it (issue 11). The SCSI layer answers DATA PROTECT, WRITE PROTECTED."""


class CutoverRefused(StoreError):
    """A cutover that could not be made (source unreachable, bitmap not offered, already cut
    over); the volume is exactly as it was."""
