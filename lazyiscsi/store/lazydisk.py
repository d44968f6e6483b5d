"""LazyDisk: a LUN backed by a local cache file that fills itself from a remote source.

A copy-on-read filter in the manner of QEMU's copy-on-read driver: a read walks its range,
serves local units from the cache file and fetches only the missing ones (``fetch.Fetcher``);
a write lands in the cache and marks its units local. The background copier calls
``populate``, the same fill path a read uses, never a second writer.

Files (all beside ``path``): ``path`` itself is the cache, a plain raw image (offset N of the
LUN is offset N of the file), usable by any tool once complete; ``path.map`` is the bitmap
(see extentmap); ``path.meta`` is the superblock.

Durability invariant, enforced in ``commit`` and nowhere else: a unit's bit reaches the map
file only after the data it vouches for is durable in the cache file (cache fdatasync, then
map page write, then map fdatasync). A crash therefore leaves every set bit backed by durable
data; a unit whose bit did not make it is fetched again, which is harmless because the source
never changes and the guest never flushed a write to it.

That covers a power loss. A daemon that is killed while the machine runs on loses nothing the
kernel held: the cache file's page cache survives it, so a guest write acknowledged but not yet
flushed is still in the file, and fetching that unit again would overwrite it with source data.
So every guest write also sets its unit in ``path.written`` with a plain write, before it is
acknowledged, and ``path.boot`` names the boot the cache was opened in. Reopened in the same
boot, units written but not in the map are adopted (cache fdatasync, then their map bits);
reopened after a reboot, those written bits are dropped instead, since their data may not
have reached the medium, and the units are fetched again (what a write-back cache may do to
unflushed writes at a power loss).

Source data never lands on a unit the guest wrote. ``_fill`` checks which units are still
missing at each write into the cache, holding ``_data_lock``, which every guest write, discard
and zero marking also holds around its own write and map update. A fill yields between its
runs (writeback start goes to the thread pool, whose ``spawn`` yields when it is busy), so a
check made once per fill would be stale by its second run (issue 10, defect 1).

A failed fdatasync of the cache is fail-stop (``_fail_stop``): Linux reports a writeback error
once and marks the pages clean, so the next fdatasync succeeds without the data; retrying the
commit would let the map vouch for data that never reached the medium (issue 10, defect 2). The
volume goes read-only-failed: every later write and flush fails, local data stays readable,
and ``path.boot`` is cleared so that a successor in this boot does not adopt unflushed writes.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import gevent
import gevent.lock
import structlog

from lazyiscsi.source.base import Priority, Source
from lazyiscsi.source.url import redact
from lazyiscsi.store.cachefile import BlockFile, FileOpener, OsFile
from lazyiscsi.store.errors import (
    CacheConfigError,
    CacheFailed,
    CacheFull,
    CacheIOError,
    CacheReadError,
    OutOfRange,
    SourceMismatch,
    SourceTimeout,
    StoreError,
)
from lazyiscsi.store.extentmap import PAGE_BYTES, ExtentMap, only_in
from lazyiscsi.store.fetch import Fetcher, RetryPolicy
from lazyiscsi.store.newcache import size_new_cache, undo_new_cache
from lazyiscsi.store.superblock import CacheState, Superblock, read_superblock, write_superblock

log = structlog.get_logger("lazyiscsi.store")

DEFAULT_UNIT = 4096
DEFAULT_READAHEAD = 64 * 1024
DEFAULT_IO_TIMEOUT = 30.0
#: how often fetched data and guest writes are committed without a flush from the guest
DEFAULT_AUTOCOMMIT_S = 1.0
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def current_boot_id() -> str:
    """This boot of the machine ("" if unknown, which is never trusted): the page cache
    outlives a process, not a boot."""
    try:
        with open(BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class DiskStats:
    """A snapshot of the store's counters, readable at any moment."""

    size: int
    local_bytes: int
    state: CacheState
    fetched_foreground: int
    fetched_background: int
    misses: int
    miss_p50_ms: float | None
    miss_p99_ms: float | None


class LazyDisk:
    """One LUN: cache file + extent map + (while hydrating) a source. Use ``LazyDisk.open``."""

    def __init__(
        self,
        path: str,
        sb: Superblock,
        cache: BlockFile,
        mapfile: BlockFile,
        emap: ExtentMap,
        source: Source | None,
        written: tuple[BlockFile, ExtentMap],
        *,
        readahead: int,
        io_timeout: float,
        autocommit_s: float | None,
        retry: RetryPolicy | None,
        opener: FileOpener,
    ) -> None:
        self.path = path
        self._opener = opener
        self._sb = sb
        self.size = sb.size
        self.unit = sb.unit
        self._cache = cache
        self._mapfile = mapfile
        self._map = emap
        # units the guest wrote (or discarded): they may differ from the source, so ``verify``
        # skips them, and a restart in the same boot adopts them (module docstring). Written
        # before each write is acknowledged, synced only at close: a power loss may lose the
        # last bits, and verify then reports those units (a false alarm, never a miss).
        self._writtenfile, self._written = written
        self._io_timeout = io_timeout
        self._complete = emap.complete
        self._commit_lock = gevent.lock.Semaphore()
        # held around every write into the cache and the map update that goes with it
        self._data_lock = gevent.lock.Semaphore()
        # .written pages are written one at a time, each with the bits of that moment: two
        # writers racing could otherwise land an older image of a page over a newer one
        self._written_lock = gevent.lock.Semaphore()
        #: why the volume is fail-stopped (an fdatasync failed), or None while it is healthy
        self._failed: str | None = None
        self._closed = False
        self._misses = 0
        self._miss_ms: collections.deque[float] = collections.deque(maxlen=4096)
        self._fetcher = Fetcher(source, emap, self.unit, self.size, self._fill,
                                readahead_units=max(1, readahead // self.unit), retry=retry,
                                label=path)
        self._finisher: gevent.Greenlet | None = None
        self._committer: gevent.Greenlet | None = None
        if autocommit_s and not self._complete:
            self._committer = gevent.spawn(self._autocommit, autocommit_s)
        if self._complete and sb.state is CacheState.HYDRATING:
            # complete on disk but the superblock never said so (crash in between)
            self._finisher = gevent.spawn(self._finish)

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str,
        source: Source | None,
        *,
        unit: int | None = None,
        readahead: int = DEFAULT_READAHEAD,
        io_timeout: float = DEFAULT_IO_TIMEOUT,
        autocommit_s: float | None = DEFAULT_AUTOCOMMIT_S,
        retry: RetryPolicy | None = None,
        opener: FileOpener = OsFile,
    ) -> LazyDisk:
        """Open the cache at ``path``, creating it from ``source`` if there is none.

        An existing cache resumes from its map. It refuses, with ``CacheConfigError``, a
        source of another size or identity (``SourceMismatch``) while hydrating, a ``unit``
        other than the one it was made with, and a ``path`` that holds some other file. A
        complete or detached cache needs no source (``superblock.needs_source``).
        """
        if unit is not None and (unit < 512 or unit & (unit - 1)):
            raise CacheConfigError(f"unit {unit}: must be a power of two of at least 512 bytes")
        meta_path = f"{path}.meta"
        sb = read_superblock(meta_path)
        if sb is None:
            if source is None:
                raise CacheConfigError(f"{path}: no cache here yet, and no source to fill one from")
            existed = os.path.lexists(path)
            cache = opener(path, create=True)
            try:
                if cache.size() != 0:
                    raise CacheConfigError(f"{path}: exists and is not a lazyiscsi cache "
                                           f"(no {meta_path}); remove it or choose another path")
                sb = Superblock(size=source.size, unit=unit or DEFAULT_UNIT, source_url=redact(source.url),
                                source_identity=source.identity, state=CacheState.HYDRATING)
                try:
                    # Side files left by an earlier cache at this path (its cache and .meta
                    # deleted to start over) describe another disk: emptied, durably, before the
                    # superblock makes them ours (issue 10, defect 7).
                    _fresh_side_files(opener, path)
                    # The superblock comes first: a cache file without one is never taken for ours.
                    write_superblock(meta_path, sb)
                    size_new_cache(cache, sb.size, path)  # EFBIG: an error naming the limit
                except BaseException:
                    undo_new_cache(path, remove_cache=not existed)
                    raise
            except BaseException:
                cache.close()
                raise
            log.info("cache_created", path=path, size=sb.size, unit=sb.unit, source=sb.source_url)
        else:
            if unit is not None and unit != sb.unit:
                raise CacheConfigError(f"{path}: made with unit {sb.unit}, not {unit}; "
                                       "omit the unit or use the cache's own")
            # open by state: only a hydrating cache still reads its source, so only it is bound
            # to the source's identity; a complete or detached one opens without asking it
            if sb.state is CacheState.HYDRATING and source is not None and (
                    source.size != sb.size or source.identity != sb.source_identity):
                raise SourceMismatch(
                    f"{path}: the source {redact(source.url)} (size {source.size}) is not the disk "
                    f"this cache was filled from ({sb.source_url}, size {sb.size}); refusing to mix "
                    "two disks")
            cache = opener(path, create=True)
            if cache.size() < sb.size:
                cache.truncate(sb.size)  # created but not yet sized when a crash hit
        try:
            mapfile = opener(f"{path}.map", create=True)
        except BaseException:
            cache.close()
            raise
        try:
            writtenfile = opener(f"{path}.written", create=True)
        except BaseException:
            cache.close()
            mapfile.close()
            raise
        n_units = -(-sb.size // sb.unit)
        emap = ExtentMap(n_units)
        if sb.state is CacheState.COMPLETE:
            emap.set_local(0, n_units)
            emap.take_dirty()
        else:
            _load_map(mapfile, emap)
        written = ExtentMap(n_units)
        _load_map(writtenfile, written)
        orphans = list(only_in(written, emap, 0, n_units))
        same_boot = _same_boot(opener, path)
        if not same_boot:
            # After a reboot the page cache is empty anyway; after a fail-stop in this boot
            # (which cleared .boot) it may hold pages whose writeback failed: clean, readable,
            # never on the medium. What we serve and vouch for from now on is the medium's.
            try:
                cache.drop_cache()
            except OSError as e:
                log.warning("cache_drop_failed", path=path, error=e.strerror)
        if orphans and not same_boot:
            # only the pages that lose bits are rewritten: a 1 TiB LUN's whole file is 32 MiB
            written.intersect(emap)
            for page, data in written.take_dirty().items():
                writtenfile.pwrite(data, page * PAGE_BYTES)
            log.info("cache_unflushed_writes_dropped", path=path, units=sum(b - a for a, b in orphans),
                     reason="opened after a reboot: their data may not have reached the disk")
            orphans = []
        _record_boot(opener, path)
        if sb.state is not CacheState.HYDRATING and source is not None:
            source.close()  # not needed: everything is local
            source = None
        disk = cls(path, sb, cache, mapfile, emap, source, (writtenfile, written), readahead=readahead,
                   io_timeout=io_timeout, autocommit_s=autocommit_s, retry=retry, opener=opener)
        if orphans:
            # the previous process died in this boot: its acknowledged writes are in the page
            # cache; commit syncs them before their map bits
            for a, b in orphans:
                disk._mark_local(a, b)
            disk.commit()
            log.info("cache_writes_adopted", path=path, units=sum(b - a for a, b in orphans))
        log.info("cache_opened", path=path, state=sb.state.value, local_bytes=disk.local_bytes,
                 size=sb.size)
        return disk

    # -- the I/O interface the SCSI layer uses --------------------------------------------

    @property
    def state(self) -> CacheState:
        return self._sb.state

    @property
    def complete(self) -> bool:
        return self._complete

    @property
    def failed(self) -> str | None:
        """Why the volume is fail-stopped (read-only-failed), or None."""
        return self._failed

    @property
    def local_bytes(self) -> int:
        return min(self._map.local_units * self.unit, self.size)

    @property
    def source(self) -> Source | None:
        return self._fetcher.source

    @property
    def source_changed(self) -> str | None:
        """Why the source is no longer this cache's disk (permanent), or None."""
        return self._fetcher.changed

    def read(self, offset: int, length: int) -> bytes:
        """The LUN's bytes at ``offset``, fetching what is not local, in a new buffer."""
        self._check(offset, length)
        if not self._complete:
            a, b = self._units(offset, length)
            if next(self._map.missing_runs(a, b), None) is not None:
                self._await(a, b)
        try:
            return self._cache.pread(length, offset)
        except OSError as e:
            raise self._cache_error(e, "read") from None

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the LUN's bytes at ``offset``, fetching what is not local."""
        self._check(offset, len(buf))
        if not self._complete:
            a, b = self._units(offset, len(buf))
            if next(self._map.missing_runs(a, b), None) is not None:
                self._await(a, b)
        try:
            self._cache.preadinto(buf, offset)
        except OSError as e:
            raise self._cache_error(e, "read") from None

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        """Write guest data. Units it covers only partly are fetched first (read-modify-write);
        whole units never wait for the source."""
        self._check(offset, len(data))
        self._check_writable()
        if len(data):
            a, b = self._units(offset, len(data))
            end = offset + len(data)
            if not self._complete:
                if offset % self.unit and not self._map.is_local(a):
                    self._await(a, a + 1)
                if end % self.unit and end != self.size and not self._map.is_local(b - 1):
                    self._await(b - 1, b)
            with self._data_lock:
                self._check_writable()  # the volume may have failed while we waited
                self._cache_write(self._cache.pwrite, data, offset)
                self._mark_local(a, b)
            self._note_written(a, b)
        if fua:
            self.commit()

    def discard(self, offset: int, length: int) -> None:
        """Deallocate whole units in the range: they read as zeros and are never fetched.
        Units the range covers only partly are left as they are (discard is advisory)."""
        self._check(offset, length)
        self._check_writable()
        a = -(-offset // self.unit)
        end = offset + length
        b = self._map.n_units if end == self.size else end // self.unit
        if a < b:
            start = a * self.unit
            with self._data_lock:
                self._check_writable()
                self._cache_write(self._cache.punch, start, min(b * self.unit, self.size) - start)
                self._mark_local(a, b)
            self._note_written(a, b)

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Make the range read as zeros: whole units are deallocated, partial ones written."""
        self._check(offset, length)
        self._check_writable()
        end = offset + length
        head_end = min(end, -(-offset // self.unit) * self.unit)
        tail_start = max(head_end, (end // self.unit) * self.unit if end != self.size else end)
        # fetch both partial units first, so that a failed fetch leaves nothing half done
        for part_start, part_end in ((offset, head_end), (tail_start, end)):
            u = part_start // self.unit
            if part_end > part_start and not self._complete and not self._map.is_local(u):
                self._await(u, u + 1)
        if head_end > offset:
            self.write(offset, bytes(head_end - offset))
        if tail_start < end:
            self.write(tail_start, bytes(end - tail_start))
        if tail_start > head_end:
            self.discard(head_end, tail_start - head_end)
        if fua:
            self.commit()

    def flush(self) -> None:
        """Make every write acknowledged so far durable, with its map bits."""
        self.commit()

    def prefetch(self, offset: int, length: int, *, wait: bool = True) -> None:
        """Fetch the range ahead of the reads that will want it (SCSI PRE-FETCH), at foreground
        priority. Without ``wait`` it runs in the background and a failure is only logged: the
        reads that follow fetch again, and fail, on their own."""
        self._check(offset, length)
        if self._complete or not length:
            return
        a, b = self._units(offset, length)
        if next(self._map.missing_runs(a, b), None) is None:
            return
        if wait:
            self._await(a, b)
        else:
            gevent.spawn(self._prefetch_quietly, a, b)

    def _prefetch_quietly(self, a: int, b: int) -> None:
        try:
            self._await(a, b)
        except StoreError as e:
            log.warning("prefetch_failed", path=self.path, offset=a * self.unit,
                        length=(b - a) * self.unit, error=str(e))

    # -- what the hydrator uses ------------------------------------------------------------

    def missing_runs(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """Missing byte runs ``(offset, length)`` in the range, clipped to the LUN."""
        a, b = self._units(offset, length)
        for ua, ub in self._map.missing_runs(a, b):
            start = ua * self.unit
            yield start, min(ub * self.unit, self.size) - start

    def populate(self, offset: int, length: int) -> None:
        """Make the range local at background priority (the hydrator's one call to fill)."""
        self._check(offset, length)
        a, b = self._units(offset, length)
        self._fetcher.ensure_local(a, b, Priority.BACKGROUND)

    def mark_zero(self, offset: int, length: int) -> None:
        """The source promises these bytes are zero: make the whole units inside the range
        local without reading them (punching the cache, in case a lost unflushed write left
        data there)."""
        a = -(-offset // self.unit)
        end = offset + length
        b = self._map.n_units if end >= self.size else end // self.unit
        while True:
            with self._data_lock:  # checked at each punch, as in ``_fill``
                self._check_writable()
                run = next(self._map.missing_runs(a, b), None)
                if run is None:
                    return
                ua, a = run
                start = ua * self.unit
                self._cache_write(self._cache.punch, start, min(a * self.unit, self.size) - start)
                self._mark_local(ua, a)

    def verifiable_runs(self, start_unit: int, end_unit: int) -> Iterator[tuple[int, int]]:
        """Unit runs in ``[start_unit, end_unit)`` that are local and not written by the guest:
        those must equal the source, byte for byte."""
        return only_in(self._map, self._written, start_unit, end_unit)

    def missing_unit_runs(self, start_unit: int, end_unit: int) -> Iterator[tuple[int, int]]:
        return self._map.missing_runs(start_unit, end_unit)

    def read_local(self, offset: int, length: int) -> bytes:
        """The cache's bytes as they are, never fetching (for ``verify``)."""
        self._check(offset, length)
        return self._cache.pread(length, offset)

    def wait_foreground_idle(self, timeout: float | None) -> bool:
        """Block while on-demand fetches are running (the hydrator yields to them)."""
        return self._fetcher.fg_idle.wait(timeout)

    @property
    def inflight_units(self) -> int:
        return self._fetcher.inflight_units

    def fetching(self, offset: int) -> Priority | None:
        """Whether the unit at ``offset`` is being fetched, and for whom (the miss-latency
        benchmark measures misses inside the copier's runs with it)."""
        return self._fetcher.priority_at(offset // self.unit)

    def stats(self) -> DiskStats:
        lat = sorted(self._miss_ms)
        return DiskStats(
            size=self.size,
            local_bytes=self.local_bytes,
            state=self._sb.state,
            fetched_foreground=self._fetcher.bytes_fetched[Priority.FOREGROUND],
            fetched_background=self._fetcher.bytes_fetched[Priority.BACKGROUND],
            misses=self._misses,
            miss_p50_ms=_percentile(lat, 0.50),
            miss_p99_ms=_percentile(lat, 0.99),
        )

    # -- durability --------------------------------------------------------------------------

    def commit(self) -> None:
        """Make all data written so far durable, then the map bits that vouch for it.

        The order is the store's crash-safety invariant (module docstring): the dirty map pages
        are copied *before* the cache is synced, so a bit set while the sync runs (its data
        perhaps not yet durable) waits for the next commit.
        """
        with self._commit_lock:
            self._check_writable()
            pages = self._map.take_dirty()
            try:
                self._cache.sync()
                for page, data in pages.items():
                    self._mapfile.pwrite(data, page * PAGE_BYTES)
                if pages:
                    self._mapfile.sync()
            except OSError as e:
                # never put ``pages`` back: the next fdatasync would succeed without the data
                self._fail_stop(e)

    def detach(self, *, force: bool = False) -> None:
        """Let the source go. Without ``force`` only a complete cache may detach; with it,
        units still missing become unreadable (each such read fails with an error)."""
        if not self._complete and not force:
            missing = self.size - self.local_bytes
            raise StoreError(f"{self.path}: {missing} bytes are still only at the source; "
                             "detaching now would make them unreadable (force to do it anyway)")
        self.commit()
        self._set_state(CacheState.COMPLETE if self._complete else CacheState.DETACHED)
        self._drop_source()

    def close(self) -> None:
        """Stop fetching, commit what is local, release the files and the source."""
        if self._closed:
            return
        self._closed = True
        if self._committer is not None:
            self._committer.kill()
        if self._finisher is not None:
            self._finisher.join()  # a completed cache should say so on disk before we go
        self._fetcher.close()
        try:
            if self._failed is None:
                self.commit()
                self._writtenfile.sync()
        except OSError as e:
            raise self._cache_error(e, "sync the written-units file") from None
        finally:
            self._cache.close()
            self._mapfile.close()
            self._writtenfile.close()
            self._drop_source()
        log.info("cache_closed", path=self.path, local_bytes=self.local_bytes, size=self.size)

    # -- internals -------------------------------------------------------------------------

    def _note_written(self, a: int, b: int) -> None:
        """Record guest-written units in the file at once (no fdatasync: a flush of the guest
        costs one sync, not two), so that a killed daemon's successor adopts them."""
        self._written.set_local(a, b)
        try:
            # taken after our bits are set: if an earlier writer's image already holds them,
            # its write is finished (it held the lock) before we acknowledge ours
            with self._written_lock:
                for page, data in self._written.take_dirty().items():
                    self._writtenfile.pwrite(data, page * PAGE_BYTES)
        except OSError as e:
            raise self._cache_error(e, "record a guest write in .written") from None

    def _check_writable(self) -> None:
        if self._failed is not None:
            raise CacheFailed(self._failed)

    def _cache_error(self, e: OSError, what: str) -> CacheIOError:
        """The typed reason for a failed cache operation (never the source's fault)."""
        cls: type[CacheIOError] = CacheIOError
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            cls = CacheFull
        elif what == "read":
            cls = CacheReadError
        log.error("cache_io_failed", path=self.path, what=what, error=e.strerror)
        return cls(f"{self.path}: cannot {what} ({e.strerror})")

    def _cache_write(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(*args)
        except OSError as e:
            raise self._cache_error(e, "write the cache") from None

    def _fail_stop(self, e: OSError) -> None:
        """An fdatasync failed: the volume becomes read-only-failed, said once in the log."""
        if self._failed is None:
            self._failed = (f"{self.path}: the cache could not be made durable ({e.strerror}); "
                            "the volume is failed (read-only) until it is reopened")
            log.error("cache_failed", path=self.path, error=e.strerror,
                      action="every write and flush now fails; reopen after fixing the disk")
            # a successor in this boot must not adopt units written since the last good sync
            with contextlib.suppress(OSError, CacheConfigError):
                f = self._opener(f"{self.path}.boot", create=True)
                try:
                    f.truncate(0)
                finally:
                    f.close()
        raise CacheFailed(self._failed)

    def _check(self, offset: int, length: int) -> None:
        if self._closed:
            raise StoreError(f"{self.path}: closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(f"I/O at offset {offset} length {length} is past the end ({self.size})")

    def _units(self, offset: int, length: int) -> tuple[int, int]:
        return offset // self.unit, -(-(offset + length) // self.unit)

    def _await(self, a: int, b: int) -> None:
        """Wait, at foreground priority and at most the I/O timeout, for units to be local."""
        t0 = time.monotonic()
        self._misses += 1
        try:
            with gevent.Timeout(self._io_timeout, SourceTimeout(
                    f"source did not deliver offset {a * self.unit} within {self._io_timeout:g} s")):
                self._fetcher.ensure_local(a, b, Priority.FOREGROUND)
        finally:
            self._miss_ms.append((time.monotonic() - t0) * 1000.0)

    def _fill(self, start: int, end: int, data: memoryview, priority: Priority = Priority.BACKGROUND) -> int:
        """Write source data for units ``[start, end)`` where they are still missing.

        The one place that enforces "a unit the guest wrote is never written by a fetch": the
        missing run is found under ``_data_lock`` right before each write into the cache, and
        marked local before the lock is let go; a guest write holds the same lock around its
        own write and bits. Between runs (writeback start) the fill yields, and a guest write
        may land: the next run's check sees it.

        Only background fills start writeback. Handing it to the thread pool waits for a free
        thread, and while the copier keeps the pool busy a guest's miss waited there too, after
        its data had arrived (measured: 36-75 ms on a loaded machine). A miss's few KiB are left
        to the next commit's fdatasync, which costs it nothing measurable.
        """
        filled = 0
        base = start * self.unit
        pos = start
        while True:
            with self._data_lock:
                self._check_writable()
                run = next(self._map.missing_runs(pos, end), None)
                if run is None:
                    return filled
                a, pos = run
                off = a * self.unit
                length = min(pos * self.unit, self.size) - off
                self._cache_write(self._cache.pwrite, data[off - base:off - base + length], off)
                filled += self._mark_local(a, pos)
            if priority is Priority.BACKGROUND:
                self._cache.start_writeback(off, length)

    def _mark_local(self, a: int, b: int) -> int:
        added = self._map.set_local(a, b)
        if added and self._map.complete and not self._complete:
            self._complete = True  # bits are all set: map checks can no longer say "missing"
            self._finisher = gevent.spawn(self._finish)
        return added

    def _finish(self) -> None:
        """Every unit is local: make it durable, record it, let the source go."""
        try:
            self.commit()
        except StoreError:
            return  # logged by commit; the cache says HYDRATING until a commit succeeds
        self._set_state(CacheState.COMPLETE)
        stats = self.stats()
        log.info("hydration_completed", path=self.path, size=self.size,
                 fetched_bytes=stats.fetched_foreground + stats.fetched_background, misses=stats.misses)
        self._drop_source()
        if self._committer is not None:
            self._committer.kill(block=False)

    def _set_state(self, state: CacheState) -> None:
        if state is not self._sb.state:
            self._sb = self._sb.with_state(state)
            write_superblock(f"{self.path}.meta", self._sb)
            log.info("cache_state", path=self.path, state=state.value)

    def _drop_source(self) -> None:
        source, self._fetcher.source = self._fetcher.source, None
        if source is not None:
            source.close()

    def _autocommit(self, interval: float) -> None:
        while self._failed is None:
            gevent.sleep(interval)
            # a failure is logged by commit; the next round or the guest's flush tries again
            with contextlib.suppress(StoreError):
                self.commit()


def _fresh_side_files(opener: FileOpener, path: str) -> None:
    """Empty the map, written-units and boot files of a cache being created, durably."""
    for suffix in (".map", ".written", ".boot"):
        f = opener(f"{path}{suffix}", create=True)
        try:
            if f.size():
                f.truncate(0)
                f.sync()
        finally:
            f.close()


def _same_boot(opener: FileOpener, path: str) -> bool:
    """Whether the cache was last opened in this very boot (``path.boot``)."""
    boot = current_boot_id()
    try:
        f = opener(f"{path}.boot", create=False)
    except (OSError, CacheConfigError):  # none yet (an older cache), or unreadable: careful
        return False
    try:
        return bool(boot) and f.pread(f.size(), 0).decode("ascii", "replace") == boot
    finally:
        f.close()


def _record_boot(opener: FileOpener, path: str) -> None:
    """No fdatasync: lost at a power loss, it only makes the next open more careful."""
    f = opener(f"{path}.boot", create=True)
    try:
        f.truncate(0)
        f.pwrite(current_boot_id().encode("ascii"), 0)
    finally:
        f.close()


def _load_map(mapfile: BlockFile, emap: ExtentMap) -> None:
    """Read the on-disk bitmap page by page (never the whole file at once: RSS)."""
    have = mapfile.size()
    want = emap.n_pages * PAGE_BYTES
    if have < want:
        mapfile.truncate(want)
    buf = bytearray(PAGE_BYTES)
    view = memoryview(buf)
    zero = bytes(PAGE_BYTES)
    for page in range(min(emap.n_pages, -(-have // PAGE_BYTES))):
        mapfile.preadinto(view, page * PAGE_BYTES)
        if buf != zero:
            emap.load_page(page, buf)


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))], 3)
