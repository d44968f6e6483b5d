"""LazyDisk: a LUN backed by a local cache file that fills itself from a remote source.

A copy-on-read filter in the manner of QEMU's copy-on-read driver: a read walks its range,
serves local units from the cache file and fetches only the missing ones (``fetch.Fetcher``);
a write lands in the cache and marks its units local. The background copier calls
``populate``, the same fill path a read uses, never a second writer; reads are noted in
``hotspots`` so that it copies where the guest reads first.

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
check made once per fill would be stale by its second run (issue 10, defect 1). A large write
also yields inside the lock: it runs in the store's writer thread (``writer``), off the hub,
and the lock is let go only once it has landed, even if the greenlet that made it is killed.

A failed fdatasync of the cache is fail-stop (``_fail_stop``): Linux reports a writeback error
once and marks the pages clean, so the next fdatasync succeeds without the data; retrying the
commit would let the map vouch for data that never reached the medium (issue 10, defect 2). The
volume goes read-only-failed: every later write and flush fails, local data stays readable,
and ``path.boot`` is cleared so that a successor in this boot does not adopt unflushed writes.

A live source (issue 11) is still in use by a running VM. Until its cutover (``Phase``, kept
in the superblock so that a restart stays live) every write is refused (``WriteProtected``),
and nothing read may be trusted later. Without a dirty bitmap nothing is cached: reads pass
through to the source and the copy waits. With one (``DirtyTracking``) the copy runs, skipping
units the bitmap already reports dirty (a QEMU bitmap is cumulative: its bits are never cleared
over NBD, so a unit dirty once is dirty at cutover and would be invalidated anyway); a poll
every ``DIRTY_POLL_INTERVAL`` keeps that set current. ``cutover`` reads the final bitmap and
invalidates every local unit it marks dirty, so what a copy or a read cached before the VM's
last write is fetched again; flights still in the air then are of an older epoch
(``fetch.Fetcher.epoch``) and ``_fill`` drops their bytes for invalidated units. The bitmap
must exist before the volume is created: a unit changed before the bitmap began is not in it.
Re-fetching dirty units during pre-copy (xNBD-style iterations) would need the bitmap cleared
after each pass, which NBD cannot do; with a cumulative bitmap a re-fetch before the VM stops
is always wasted, so the only pre-copy work worth doing is the clean units, once.

A hydrating cache may open without its source (``open(..., awaiting_source=why)``) when the
source cannot be reached, or turns out to be another disk, as a daemon restarts: what is local
is served, a miss fails as it does while a running volume's source is down (``SourceUnreachable``:
NOT READY, retry later), and ``attach_source`` later binds the source under the rule ``open``
applies, the superblock's size and identity. Another disk there latches ``source_changed``, the
permanent state a change met during the copy leads to: never two disks in one cache. A live
source before its cutover cannot wait like that (``attach_source`` says why).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import gevent
import gevent.event
import gevent.lock
import structlog

from lazyiscsi.source.base import DirtyTracking, Priority, Source, SourceError
from lazyiscsi.source.url import redact
from lazyiscsi.store.cachefile import BlockFile, FileOpener, OsFile
from lazyiscsi.store.errors import (
    CacheConfigError,
    CacheFailed,
    CacheFull,
    CacheIOError,
    CacheReadError,
    CutoverRefused,
    NoSource,
    OutOfRange,
    SourceMismatch,
    SourceTimeout,
    StoreError,
    WriteProtected,
)
from lazyiscsi.store.extentmap import PAGE_BYTES, ExtentMap, only_in
from lazyiscsi.store.fetch import Fetcher, RetryPolicy, store_error_class
from lazyiscsi.store.hotspots import Hotspots
from lazyiscsi.store.newcache import size_new_cache, undo_new_cache
from lazyiscsi.store.prioritylock import PriorityLock
from lazyiscsi.store.superblock import CacheState, Phase, Superblock, read_superblock, write_superblock
from lazyiscsi.store.writer import CacheWriter, WriteThread, wait_out

log = structlog.get_logger("lazyiscsi.store")

DEFAULT_UNIT = 4096
DEFAULT_READAHEAD = 64 * 1024
DEFAULT_IO_TIMEOUT = 30.0
#: how often fetched data and guest writes are committed without a flush from the guest
DEFAULT_AUTOCOMMIT_S = 1.0
BOOT_ID = "/proc/sys/kernel/random/boot_id"
#: How often pre-copy asks the source's dirty bitmap which units the running VM wrote. A unit
#: reported dirty is not copied any more (it will be invalidated at cutover), so a poll saves
#: the link one copy of every unit dirtied since the last one that the copier reaches meanwhile;
#: each poll is one block-status walk of the whole disk at background priority (a few replies
#: of a few KiB for a disk that is mostly clean). Once a second is also the resolution of
#: ``dirty_rate_bps``.
DIRTY_POLL_INTERVAL = 1.0
#: how much of the disk one dirty-bitmap query covers (NBD block status replies are bounded by
#: the server; this keeps each reply, and our memory for it, to one window)
DIRTY_QUERY_WINDOW = 1 << 30
#: seconds of dirty-set samples ``dirty_rate_bps`` is measured over
DIRTY_RATE_WINDOW_S = 5.0


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
    phase: Phase
    #: bytes the source's dirty bitmap reports written (pre-copy), or None without a bitmap
    dirty_bytes: int | None
    dirty_rate_bps: float | None
    #: issue 11, acceptance 3: fetched by flights started after the cutover, which is at most
    #: the final dirty set plus what the copy had not reached (None before a cutover)
    fetched_after_cutover: int | None
    dirty_at_cutover: int | None
    not_reached: int | None


@dataclass(frozen=True)
class CutoverReport:
    """What a cutover did (its log event says the same)."""

    dirty_bytes: int
    invalidated_bytes: int
    not_reached_bytes: int
    duration_ms: float


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
        writer: WriteThread,
        awaiting_source: str | None = None,
    ) -> None:
        self.path = path
        self._opener = opener
        #: large cache writes run here, off the hub (writer.py); small ones in-line
        self._writer = writer
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
        self._phase = sb.phase
        #: the source's dirty bitmap, while the cutover is still ahead
        self._tracker = source if isinstance(source, DirtyTracking) and sb.phase is not Phase.POST_COPY \
            else None
        #: units the bitmap reported dirty so far (pre-copy); the copier skips them
        self._dirty_seen = ExtentMap(emap.n_units) if self._tracker is not None else None
        self._dirty_samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)
        #: the final dirty set once a cutover began: fills of an older epoch skip these units
        self._invalid: ExtentMap | None = None
        self._cut_over = gevent.event.Event()
        if sb.phase is Phase.POST_COPY:
            self._cut_over.set()
        self._cutting = False
        # before the cutover the map may fill up (reads fetch dirty units too): that is no
        # completion, the cutover may still invalidate units
        self._complete = emap.complete and sb.phase is Phase.POST_COPY
        self._commit_lock = gevent.lock.Semaphore()
        # held around every write into the cache and the map update that goes with it; the
        # copier's fills and zero marking hold it as background, so that a guest's write or
        # miss waits for the write under way only, not for the copier's queue (prioritylock)
        self._data_lock = PriorityLock()
        # .written pages are written one at a time, each with the bits of that moment: two
        # writers racing could otherwise land an older image of a page over a newer one
        self._written_lock = gevent.lock.Semaphore()
        #: why the volume is fail-stopped (an fdatasync failed), or None while it is healthy
        self._failed: str | None = None
        self._closed = False
        self._misses = 0
        self._miss_ms: collections.deque[float] = collections.deque(maxlen=4096)
        #: where the guest reads while the disk is not complete: the copier goes there first
        self.hotspots = Hotspots(self.size)
        self._fetcher = Fetcher(source, emap, self.unit, self.size, self._fill,
                                readahead_units=max(1, readahead // self.unit), retry=retry,
                                label=path)
        if sb.fetched_after_cutover is not None:
            self._fetcher.epoch_bytes = sb.fetched_after_cutover  # counted on across restarts
        self._fetcher.awaiting = awaiting_source
        #: set once the source is attached or found to be another disk (``wait_source``)
        self._source_settled = gevent.event.Event()
        if awaiting_source is None:
            self._source_settled.set()
        self._poller = gevent.spawn(self._poll_dirty) if self._tracker is not None else None
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
        live: bool = False,
        awaiting_source: str | None = None,
        writer: Callable[[], WriteThread] = CacheWriter,
    ) -> LazyDisk:
        """Open the cache at ``path``, creating it from ``source`` if there is none.

        ``live``: a new cache's source is still in use (pre-copy until ``cutover``). An existing
        cache keeps the phase its superblock records, whatever ``live`` says.

        An existing cache resumes from its map. It refuses, with ``CacheConfigError``, a
        source of another size or identity (``SourceMismatch``) while hydrating, a ``unit``
        other than the one it was made with, and a ``path`` that holds some other file. A
        complete or detached cache needs no source (``superblock.needs_source``).

        ``awaiting_source``: why the source of an existing hydrating cache is not given (one
        secret-free line). The cache opens without it, misses fail as ``SourceUnreachable``
        until ``attach_source``; refused (``CacheConfigError``) for a cache not made yet and
        for one before its cutover (``attach_source`` says why).
        """
        if unit is not None and (unit < 512 or unit & (unit - 1)):
            raise CacheConfigError(f"unit {unit}: must be a power of two of at least 512 bytes")
        meta_path = f"{path}.meta"
        sb = read_superblock(meta_path)
        if awaiting_source is not None:
            if source is not None:
                raise CacheConfigError(f"{path}: a source given and awaited at once")
            if sb is not None and sb.state is CacheState.HYDRATING and sb.phase is not Phase.POST_COPY:
                raise CacheConfigError(f"{path}: phase {sb.phase.value}: a live volume before its cutover "
                                       f"cannot open without its source ({awaiting_source})")
            if sb is not None and sb.state is not CacheState.HYDRATING:
                awaiting_source = None  # everything is local (or let go): nothing to wait for
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
                                source_identity=source.identity, state=CacheState.HYDRATING,
                                phase=Phase.PRE_COPY if live else Phase.POST_COPY)
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
                   io_timeout=io_timeout, autocommit_s=autocommit_s, retry=retry, opener=opener,
                   awaiting_source=awaiting_source, writer=writer())
        if orphans:
            # the previous process died in this boot: its acknowledged writes are in the page
            # cache; commit syncs them before their map bits
            for a, b in orphans:
                disk._mark_local(a, b)
            disk.commit()
            log.info("cache_writes_adopted", path=path, units=sum(b - a for a, b in orphans))
        log.info("cache_opened", path=path, state=sb.state.value, phase=sb.phase.value,
                 local_bytes=disk.local_bytes, size=sb.size,
                 dirty_bitmap=getattr(disk._tracker, "dirty_bitmap", None),
                 awaiting_source=awaiting_source)
        return disk

    def attach_source(self, source: Source) -> None:
        """Attach the source of a cache opened ``awaiting_source``, once it opens again.

        The rule of ``open``: only the disk this cache was filled from (the superblock's size
        and identity) is attached. Another disk is never read from: the source is closed,
        ``source_changed`` is latched (one ``source_changed`` event, the state a change met
        during the copy leads to: local units served, missing ones failed for good) and
        ``SourceMismatch`` raised. The source is ours from the call on, closed on any refusal.

        Only a volume after its cutover (or of a frozen source) can wait for its source: before
        it, reads pass through to the source or need its dirty bitmap, and its identity is the
        live one of a disk still changing, which nothing local could check a reopened source
        against (``open`` refuses ``awaiting_source`` there).
        """
        if self._closed or self._fetcher.awaiting is None or self._sb.state is not CacheState.HYDRATING:
            source.close()
            raise StoreError(f"{self.path}: not waiting for a source (closed, attached, or no longer "
                             "hydrating)")
        if source.size != self.size or source.identity != self._sb.source_identity:
            source.close()
            self._fetcher.awaiting = None
            self._fetcher.latch_changed(
                f"the source {redact(source.url)} (size {source.size}) is not the disk this cache was "
                f"filled from ({self._sb.source_url}, size {self.size}); refusing to mix two disks")
            self._source_settled.set()
            raise SourceMismatch(f"{self.path}: {self._fetcher.changed}")
        self._fetcher.source = source
        self._fetcher.awaiting = None
        self._source_settled.set()

    @property
    def awaiting_source(self) -> str | None:
        """Why the source is not attached yet (``open(awaiting_source=...)``), or None."""
        return self._fetcher.awaiting

    def wait_source(self, timeout: float | None = None) -> bool:
        """Block until ``attach_source`` attached the source or found another disk (at once
        for a cache that was not opened waiting for one)."""
        return self._source_settled.wait(timeout)

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

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def writable(self) -> bool:
        """Whether writes are allowed: not before a live source's cutover (the SCSI layer asks,
        to answer DATA PROTECT before it decodes anything more)."""
        return self._phase is Phase.POST_COPY

    @property
    def copy_allowed(self) -> bool:
        """Whether the background copy may run: not before the cutover of a live source
        without a dirty bitmap (nothing read then can be trusted later)."""
        return self._phase is Phase.POST_COPY or self._tracker is not None

    def wait_cutover(self, timeout: float | None = None) -> bool:
        """Block until the volume is cut over (at once for a frozen source)."""
        return self._cut_over.wait(timeout)

    def read(self, offset: int, length: int) -> bytes:
        """The LUN's bytes at ``offset``, fetching what is not local, in a new buffer."""
        self._check(offset, length)
        if not self.copy_allowed:
            return self._passthrough(offset, length)
        if not self._complete:
            a, b = self._units(offset, length)
            missed = next(self._map.missing_runs(a, b), None) is not None
            self.hotspots.note_read(offset, length, missed)
            if missed:
                self._await(a, b)
        try:
            return self._cache.pread(length, offset)
        except OSError as e:
            raise self._cache_error(e, "read") from None

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the LUN's bytes at ``offset``, fetching what is not local."""
        self._check(offset, len(buf))
        if not self.copy_allowed:
            buf[:] = self._passthrough(offset, len(buf))
            return
        if not self._complete:
            a, b = self._units(offset, len(buf))
            missed = next(self._map.missing_runs(a, b), None) is not None
            self.hotspots.note_read(offset, len(buf), missed)
            if missed:
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
        self._check_cut_over()
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
                self._cache_write(self._cache.pwrite, data, offset, nbytes=len(data))
                self._mark_local(a, b)
            self._note_written(a, b)
        if fua:
            self.commit()

    def discard(self, offset: int, length: int) -> None:
        """Deallocate whole units in the range: they read as zeros and are never fetched.
        Units the range covers only partly are left as they are (discard is advisory)."""
        self._check(offset, length)
        self._check_writable()
        self._check_cut_over()
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
        self._check_cut_over()
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
        if self._complete or not length or not self.copy_allowed:
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
        """Byte runs ``(offset, length)`` in the range the copy should fetch now, clipped to
        the LUN: the missing ones, less (before the cutover) those the source's dirty bitmap
        reports written, which the cutover would invalidate anyway."""
        a, b = self._units(offset, length)
        runs = self._map.missing_runs(a, b)
        if self._dirty_seen is not None and self._phase is not Phase.POST_COPY:
            runs = self._clean(runs, self._dirty_seen)
        for ua, ub in runs:
            start = ua * self.unit
            yield start, min(ub * self.unit, self.size) - start

    def populate(self, offset: int, length: int) -> None:
        """Make the range local at background priority (the hydrator's one call to fill)."""
        self._check(offset, length)
        a, b = self._units(offset, length)
        self._fetcher.ensure_local(a, b, Priority.BACKGROUND)

    @property
    def epoch(self) -> int:
        """Taken before asking the source something whose answer is applied later
        (``mark_zero``): a cutover in between makes the answer stale."""
        return self._fetcher.epoch

    def mark_zero(self, offset: int, length: int, epoch: int | None = None) -> None:
        """The source promises these bytes are zero: make the whole units inside the range
        local without reading them (punching the cache, in case a lost unflushed write left
        data there). A promise of an earlier ``epoch`` is dropped (the copy reads the units)."""
        a = -(-offset // self.unit)
        end = offset + length
        b = self._map.n_units if end >= self.size else end // self.unit
        while True:
            with self._data_lock.background():  # checked at each punch, as in ``_fill``
                self._check_writable()
                if epoch is not None and epoch != self._fetcher.epoch:
                    return
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
            phase=self._phase,
            dirty_bytes=self._dirty_bytes(),
            dirty_rate_bps=self._dirty_rate(),
            fetched_after_cutover=None if self._sb.dirty_at_cutover is None else self._fetcher.epoch_bytes,
            dirty_at_cutover=self._sb.dirty_at_cutover,
            not_reached=self._sb.not_reached,
        )

    # -- live migration ----------------------------------------------------------------------

    def cutover(self, pin_identity: Callable[[Source], str]) -> CutoverReport:
        """The source VM has stopped: make the volume writable, and trust only what the source
        holds now (module docstring).

        Every question to the source comes first: the final dirty bitmap (all units without
        one) and its content fingerprint (``pin_identity``, the identity the cache is bound to
        from now on; a live source's open-time identity could not sample a disk that changed).
        A source that does not answer, or no longer offers the bitmap, refuses the cutover
        with ``CutoverRefused`` and nothing changed. Then, only local steps, each durable
        before the next: phase ``cutover``; every local unit the final bitmap marks dirty and
        the guest did not write is invalidated, and the invalidation committed; phase
        ``post-copy`` with the pinned identity. A crash anywhere in between leaves the volume
        before its cutover, writes still refused, and the next ``cutover`` does it all again
        (the final bitmap does not change once the VM has stopped).
        """
        if self._phase is Phase.POST_COPY:
            if self._sb.dirty_at_cutover is None:
                raise CutoverRefused(f"{self.path}: not a live volume (its source is frozen): "
                                     "there is nothing to cut over")
            raise CutoverRefused(f"{self.path}: already cut over")
        if self._cutting:
            raise CutoverRefused(f"{self.path}: a cutover is already running")
        source = self._fetcher.source
        if source is None:
            raise CutoverRefused(f"{self.path}: no source attached to cut over from")
        self._check_writable()  # a fail-stopped cache cannot make the invalidation durable
        self._cutting = True
        t0 = time.monotonic()
        try:
            try:
                final = self._final_dirty(source)
                identity = pin_identity(source)
            except SourceError as e:
                log.warning("cutover_refused", path=self.path, source=redact(source.url), error=str(e))
                raise CutoverRefused(f"cutover refused, nothing changed: {e}") from None
            self._sb = replace(self._sb, phase=Phase.CUTOVER)
            write_superblock(f"{self.path}.meta", self._sb)
            self._phase = Phase.CUTOVER
            log.info("cutover_started", path=self.path, dirty_bytes=self._bytes(final.local_units))
            with self._data_lock:
                # one step with the epoch change: a fill of the old epoch that lands after this
                # skips the final dirty units; one that landed before is invalidated here
                self._fetcher.new_epoch()
                self._invalid = final
                invalidated = sum(self._map.clear(a, b) for a, b in
                                  list(only_in(final, self._written, 0, final.n_units)))
                missing = self._map.n_units - self._map.local_units
                dirty_missing = sum(b - a for a, b in only_in(final, self._map, 0, final.n_units))
            self.commit()
            report = CutoverReport(dirty_bytes=self._bytes(final.local_units),
                                   invalidated_bytes=self._bytes(invalidated),
                                   not_reached_bytes=self._bytes(missing - dirty_missing),
                                   duration_ms=round((time.monotonic() - t0) * 1000.0, 3))
            self._sb = replace(self._sb, phase=Phase.POST_COPY, source_identity=identity,
                               dirty_at_cutover=report.dirty_bytes, not_reached=report.not_reached_bytes,
                               fetched_after_cutover=0)
            write_superblock(f"{self.path}.meta", self._sb)
            self._phase = Phase.POST_COPY
        finally:
            self._cutting = False
        self._tracker = None
        if self._poller is not None:
            self._poller.kill(block=False)
        self._cut_over.set()
        log.info("cutover_completed", path=self.path, phase=self._phase.value,
                 dirty_at_cutover_bytes=report.dirty_bytes, invalidated_bytes=report.invalidated_bytes,
                 not_reached_bytes=report.not_reached_bytes, duration_ms=report.duration_ms)
        if self._map.complete and not self._complete:
            self._complete = True
            self._finisher = gevent.spawn(self._finish)
        return report

    def _final_dirty(self, source: Source) -> ExtentMap:
        """The units the final bitmap marks dirty; every unit when there is no bitmap (then
        nothing was cached, but nothing cached before the cutover may be trusted either way).
        Asked at foreground priority: the background connection may be full of copy runs,
        and a source that does not answer must refuse the cutover, not stall it."""
        final = ExtentMap(self._map.n_units)
        if self._tracker is None:
            final.set_local(0, final.n_units)
            return final
        self._scan_dirty(self._tracker, final, Priority.FOREGROUND)
        return final

    def _scan_dirty(self, tracker: DirtyTracking, into: ExtentMap, priority: Priority) -> None:
        """Mark in ``into`` every unit a dirty run touches, even partly (a unit partly
        written is stale as a whole)."""
        for pos in range(0, self.size, DIRTY_QUERY_WINDOW):
            length = min(DIRTY_QUERY_WINDOW, self.size - pos)
            for run in tracker.dirty_runs(pos, length, priority):
                if run.dirty and run.length:
                    into.set_local(run.offset // self.unit, -(-run.end // self.unit))

    def _poll_dirty(self) -> None:
        """Pre-copy: keep the dirty set the copier skips current (``DIRTY_POLL_INTERVAL``)."""
        failing = False
        while self._tracker is not None and self._dirty_seen is not None:
            try:
                self._scan_dirty(self._tracker, self._dirty_seen, Priority.BACKGROUND)
            except SourceError as e:
                if not failing:
                    log.warning("dirty_bitmap_poll_failed", path=self.path, error=str(e))
                failing = True
            else:
                if failing:
                    log.info("dirty_bitmap_poll_recovered", path=self.path)
                failing = False
                self._dirty_seen.take_dirty()  # never persisted: keep no page list
                self._dirty_samples.append((time.monotonic(), self._dirty_seen.local_units))
            gevent.sleep(DIRTY_POLL_INTERVAL)

    def _dirty_bytes(self) -> int | None:
        if self._dirty_seen is None or self._phase is Phase.POST_COPY:
            return None
        return self._bytes(self._dirty_seen.local_units)

    def _dirty_rate(self) -> float | None:
        """Bytes/s the dirty set grew by over the last ``DIRTY_RATE_WINDOW_S``."""
        if self._dirty_bytes() is None:
            return None
        samples = [(t, n) for t, n in self._dirty_samples if t >= time.monotonic() - DIRTY_RATE_WINDOW_S]
        if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
            return 0.0
        return self._bytes(samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])

    def _bytes(self, units: int) -> int:
        return min(units * self.unit, self.size)

    def _clean(self, runs: Iterator[tuple[int, int]], dirty: ExtentMap) -> Iterator[tuple[int, int]]:
        """The parts of ``runs`` that are not set in ``dirty``."""
        for a, b in runs:
            yield from dirty.missing_runs(a, b)

    def _passthrough(self, offset: int, length: int) -> bytes:
        """A read before the cutover of a live source without a bitmap: straight from the
        source, nothing cached (it could be stale by the cutover, with no way to tell)."""
        source = self._fetcher.source
        if source is None:
            raise NoSource(f"offset {offset}: no source attached")
        try:
            with gevent.Timeout(self._io_timeout, SourceTimeout(
                    f"source did not deliver offset {offset} within {self._io_timeout:g} s")):
                data = source.read(offset, length, Priority.FOREGROUND)
        except SourceError as e:
            raise store_error_class(e)(f"source read at offset {offset} ({length} bytes) failed: {e}") \
                from None
        self._fetcher.bytes_fetched[Priority.FOREGROUND] += length
        return data

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
        """Stop fetching, commit what is local, release the files and the source. A fill whose
        write is in the writer thread ends with that write (``writer.wait_out``), so the commit
        covers it and no write lands in a closed file."""
        if self._closed:
            return
        self._closed = True
        if self._committer is not None:
            self._committer.kill()
        if self._poller is not None:
            self._poller.kill()
        if self._finisher is not None:
            self._finisher.join()  # a completed cache should say so on disk before we go
        self._fetcher.close()
        try:
            if self._failed is None:
                self.commit()
                self._writtenfile.sync()
                self._save_fetched_after_cutover()
        except OSError as e:
            raise self._cache_error(e, "sync the written-units file") from None
        finally:
            # a guest write still in the writer thread holds the lock: it ends before its file
            # is closed (the fills ended with their flights)
            with self._data_lock:
                self._cache.close()
            self._writer.close()
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

    def _check_cut_over(self) -> None:
        if self._phase is not Phase.POST_COPY:
            raise WriteProtected(f"{self.path}: read-only until the cutover (phase {self._phase.value}): "
                                 "the source is still in use")

    def _cache_error(self, e: OSError, what: str) -> CacheIOError:
        """The typed reason for a failed cache operation (never the source's fault)."""
        cls: type[CacheIOError] = CacheIOError
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            cls = CacheFull
        elif what == "read":
            cls = CacheReadError
        log.error("cache_io_failed", path=self.path, what=what, error=e.strerror)
        return cls(f"{self.path}: cannot {what} ({e.strerror})")

    def _cache_write(self, fn, *args, nbytes: int = 0) -> None:  # type: ignore[no-untyped-def]
        """One write into the cache, in-line or (``nbytes`` large) in the writer thread. Either
        way it has landed, or failed, when this returns: the caller holds ``_data_lock``
        across it, so a write handed over yields to the hub with the lock held, and no guest
        write or other fill of the same units can come between its check and its landing."""
        try:
            if nbytes and self._writer.offloads(nbytes):
                wait_out(self._writer.submit(fn, *args))
            else:
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

    def _fill(self, start: int, end: int, data: memoryview, priority: Priority, epoch: int) -> int:
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

        A flight of an epoch before the cutover's skips the units the cutover invalidated,
        checked at the same moment.
        """
        filled = 0
        base = start * self.unit
        pos = start
        while True:
            with self._data_lock if priority is Priority.FOREGROUND else self._data_lock.background():
                self._check_writable()
                runs = self._map.missing_runs(pos, end)
                if epoch != self._fetcher.epoch and self._invalid is not None:
                    runs = self._clean(runs, self._invalid)
                run = next(runs, None)
                if run is None:
                    return filled
                a, pos = run
                off = a * self.unit
                length = min(pos * self.unit, self.size) - off
                self._cache_write(self._cache.pwrite, data[off - base:off - base + length], off,
                                  nbytes=length)
                filled += self._mark_local(a, pos)
            if priority is Priority.BACKGROUND:
                self._cache.start_writeback(off, length)

    def _mark_local(self, a: int, b: int) -> int:
        added = self._map.set_local(a, b)
        if added and self._map.complete and not self._complete and self._phase is Phase.POST_COPY:
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
        self._save_fetched_after_cutover()
        stats = self.stats()
        log.info("hydration_completed", path=self.path, size=self.size,
                 fetched_bytes=stats.fetched_foreground + stats.fetched_background, misses=stats.misses,
                 fetched_after_cutover_bytes=stats.fetched_after_cutover,
                 dirty_at_cutover_bytes=stats.dirty_at_cutover, not_reached_bytes=stats.not_reached)
        self._drop_source()
        if self._committer is not None:
            self._committer.kill(block=False)

    def _set_state(self, state: CacheState) -> None:
        if state is not self._sb.state:
            self._sb = self._sb.with_state(state)
            write_superblock(f"{self.path}.meta", self._sb)
            log.info("cache_state", path=self.path, state=state.value)

    def _save_fetched_after_cutover(self) -> None:
        """Kept in the superblock so that the figure of acceptance 3 outlives a restart."""
        counted = self._fetcher.epoch_bytes
        if self._sb.dirty_at_cutover is not None and self._sb.fetched_after_cutover != counted:
            self._sb = replace(self._sb, fetched_after_cutover=self._fetcher.epoch_bytes)
            write_superblock(f"{self.path}.meta", self._sb)

    def _drop_source(self) -> None:
        """Let the source go (complete, detached or closed), or stop waiting for one."""
        self._fetcher.awaiting = None
        self._source_settled.set()
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
