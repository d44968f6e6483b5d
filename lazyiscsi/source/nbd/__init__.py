"""The NBD source: ``nbd://host[:port]/export`` and ``nbd+unix:///export?socket=PATH``.

Two channels, one per priority: a guest's on-demand read never waits behind background
runs in the same TCP stream (nor in the server's per-connection queue). The background one
connects on first use, so a source that is only read on demand costs one connection. Guests'
reads may use up to ``FOREGROUND_CONNECTIONS`` connections, each read the least busy one: a
second is dialled, in the background, when a read finds the first busy, and only once the
background channel has a connection of its own (a server with few client slots, such as
qemu-nbd's ``--shared``, gives them to the priorities first).

Identity (what a cache is bound to, checked when a hydrating cache resumes): the export's size,
nine 4 KiB samples spread over it, the export name, and the operator's ``source_id`` if one was
given. NBD carries no content identity of its own. What it guards: a cache resumed against
another export, another size, or any disk whose samples differ (a different OS image, a disk
that was written to in the sampled places). What it cannot: two clones of one template served
under the same export name whose writes missed every sample look alike; and a disk written to
during the copy is not noticed (no NBD server reports a change). The operator's ``--source-id``
(the VM's disk UUID, say) closes the first gap; the second needs a frozen source (or the
pre-copy phase with a dirty bitmap). An export *replaced* behind the URL (the server restarted
on another disk) is noticed when the client redials: every new connection is checked against the
identity (size and samples) before it carries a request, and a mismatch stops every later read
with ``SourceChanged``. A replacement between two requests on a connection that never dropped
cannot happen with a real server (a restart drops the connection).

A live source (``live=True``: the disk is still in use by a running VM, issue 11) is identified
without its samples: the size, the export name and the ``source_id``. Samples taken while the VM
writes would differ from samples taken a minute later, and a cache bound to them would refuse to
resume against the very disk it copies; they also cost reads the bitmap would then report dirty.
What a live identity still guards: another export, another size, another operator id. At the
cutover, when the VM has stopped, ``content_fingerprint`` samples the disk and pins the identity
to the fingerprint a frozen open would compute, so the cache is bound to the content from then on.

Dirty bitmap (``dirty_bitmap=NAME``): every connection negotiates ``qemu:dirty-bitmap:NAME``
beside ``base:allocation`` in one NBD_OPT_SET_META_CONTEXT; a server that does not select it
(QEMU: no such bitmap in the export's ``bitmaps``) makes the open fail with ``SourceNotFound``.
NBD_CMD_BLOCK_STATUS then answers both contexts in every reply, one chunk each (the client
cannot pick one per request without extended headers): ``extents`` reads one, ``dirty_runs``
the other, on the same connections.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from urllib.parse import parse_qs, unquote, urlsplit

import gevent
import gevent.lock
import structlog

from lazyiscsi.source.base import (
    DEFAULT_REQUEST_DEADLINE,
    PATIENCE,
    DirtyRun,
    Extent,
    Priority,
    SourceChanged,
    SourceConfigError,
    SourceError,
    SourceNotFound,
    SourceProtocolError,
    SourceReadError,
    SourceUnavailable,
    fingerprint,
    live_identity,
    sample_ranges,
)
from lazyiscsi.source.nbd import replies
from lazyiscsi.source.nbd.constants import BASE_ALLOCATION, QEMU_DIRTY_BITMAP, Cmd, DirtyFlag, StateFlag
from lazyiscsi.source.nbd.transport import (
    Channel,
    Connection,
    ConnectionLost,
    Dialer,
    tcp_dialer,
    unix_dialer,
)
from lazyiscsi.source.url import redact

__all__ = ["NbdBitmapSource", "NbdSource", "open_nbd", "parse_nbd_url"]

log = structlog.get_logger("lazyiscsi.source.nbd")

DEFAULT_PORT = 10809
#: A guest's read larger than this goes out as pieces of this size, all in flight at once on
#: the foreground connection. The server may answer them in any order (NBD document,
#: "Reordering"; nbdkit and qemu-nbd serve a connection's requests in parallel), so a small
#: miss sent meanwhile waits on the wire behind at most a piece, not a whole 1 MiB reply:
#: 256 KiB is 21 ms at 100 Mbit/s, about one WAN round trip.
FOREGROUND_PIECE = 256 << 10
#: How many connections carry guests' reads. A burst of misses spreads over them, so a small
#: reply does not wait in one TCP stream behind a large one of another miss. Small: each is a
#: socket and a client slot of the server, and on one bottleneck link more streams win the
#: guest no more bandwidth.
FOREGROUND_CONNECTIONS = 2
#: After the server did not take one more foreground connection, the next try waits this long.
#: A server at its client limit (qemu-nbd's --shared) refuses every time, and each try costs it
#: an accept and us a dial; but a dial that met a blip of the path must not leave guests' misses
#: on one connection for the life of the volume.
FOREGROUND_REDIAL_S = 30.0
#: block status asks at most this much per request (the length field is 32 bits)
_MAX_STATUS = 1 << 31
#: what a bitmap name may be: no control characters (it is shown in errors and logs), at most
#: QEMU's limit in UTF-8 bytes (BDRV_BITMAP_MAX_NAME_SIZE), which also keeps the context name
#: within the NBD document's 4096-byte strings
_BITMAP_NAME = re.compile(r"[^\x00-\x1f\x7f]+")
_MAX_BITMAP_NAME = 1023


def parse_nbd_url(url: str) -> tuple[Dialer, str]:
    """(dialer, export name) for an NBD URL (the NBD URI specification's forms)."""
    parts = urlsplit(url)
    shown = redact(url)
    scheme = parts.scheme.lower()
    export = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    if scheme == "nbd":
        if not parts.hostname:
            raise SourceConfigError(f"source URL {shown!r}: no host (nbd://HOST[:PORT]/EXPORT)")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise SourceConfigError(f"source URL {shown!r}: bad port") from None
        return tcp_dialer(parts.hostname, port), export
    if scheme == "nbd+unix":
        if parts.netloc:
            raise SourceConfigError(f"source URL {shown!r}: nbd+unix takes no host (nbd+unix:///EXPORT?socket=PATH)")
        sockets = parse_qs(parts.query).get("socket")
        if not sockets or not sockets[0]:
            raise SourceConfigError(f"source URL {shown!r}: missing ?socket=PATH")
        return unix_dialer(sockets[0]), export
    raise SourceConfigError(f"source URL {shown!r}: not an NBD URL")


class NbdSource:
    """A read-only NBD export."""

    def __init__(self, url: str, dial: Dialer, export: str, first: Connection, *, deadline: float,
                 source_id: str | None = None, live: bool = False, bitmap: str | None = None) -> None:
        self.url = redact(url)
        info = first.info
        self.size = info.size
        self._max_payload = info.max_payload
        self._block_status = BASE_ALLOCATION in info.contexts
        self._dial, self._export, self._deadline, self._bitmap = dial, export, deadline, bitmap
        #: why this is no longer the export it was at open, once a connection showed it
        self._changed: str | None = None
        #: whether ``identity`` holds samples a redialled connection can be checked against (a
        #: live source's does not until the cutover pins it: its content changes meanwhile)
        self._sampled = False
        self.identity = ""  # until the samples are in: a redial meanwhile checks the size only
        foreground = Channel(dial, export, f"{self.url} foreground", deadline=deadline, first=first,
                             bitmap=bitmap, check=self._same_export)
        self._channels = {Priority.FOREGROUND: foreground}
        #: foreground channels past the first (``FOREGROUND_CONNECTIONS``)
        self._more: list[Channel] = []
        #: a dial for one more is under way: no second one is started meanwhile
        self._dialling = False
        #: when the server last did not take one more (monotonic), None once one was taken:
        #: the next try waits ``FOREGROUND_REDIAL_S``; only the first refusal is logged
        self._refused_at: float | None = None
        self._bg_lock = gevent.lock.Semaphore()
        self._closed = False
        self._extra = f"export={export!r}" + (f":id={source_id}" if source_id else "")
        self.identity = live_identity("nbd", self.size, self._extra) if live else self.content_fingerprint()

    def content_fingerprint(self) -> str:
        """The identity a frozen open computes (size, samples, export, id), from the disk as it is
        now; it becomes this source's ``identity`` (see the module docstring: a live source is
        pinned at the cutover, when it has stopped changing)."""
        samples = _parallel([(self._sample, off, n) for off, n in sample_ranges(self.size)])
        self.identity = fingerprint("nbd", self.size, samples, extra=self._extra)
        self._sampled = True
        return self.identity

    def _sample(self, offset: int, length: int) -> bytes:
        """A fingerprint read: retried a few times, since one EIO must not fail an open."""
        for attempt in range(4):
            try:
                return bytes(self.read(offset, length))
            except SourceReadError:
                if attempt == 3:
                    raise
                gevent.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def _same_export(self, conn: Connection) -> None:
        """A new connection must reach the disk this source was opened on: same size, same
        samples. A server restarted behind the URL on another disk would otherwise hand the
        copy bytes of two disks. A sample that cannot be read now is not a verdict: the caller
        redials (``SourceUnavailable``)."""
        if self._changed is None:
            why = None
            if conn.info.size != self.size:
                why = f"the export's size is now {conn.info.size}, was {self.size}"
            elif self._sampled:
                reads = [(conn.call, Cmd.READ, off, n) for off, n in sample_ranges(self.size)]
                try:
                    samples = _parallel(reads)
                except (ConnectionLost, SourceError) as e:
                    raise SourceUnavailable(f"cannot check the export after a reconnect: {e}") from None
                if fingerprint("nbd", self.size, [bytes(r.buf) for r in samples],
                               extra=self._extra) != self.identity:
                    why = "a reconnect reached an export whose sampled content differs"
            if why is not None:
                self._changed = (f"{self.url}: the source changed since it was opened ({why}); "
                                 "refusing its bytes, which would mix two disks")
        if self._changed is not None:
            raise SourceChanged(self._changed)

    def read(self, offset: int, length: int, priority: Priority = Priority.FOREGROUND) -> bytes:
        self._check(offset, length)
        patience = self._patience(priority)
        piece = self._max_payload
        if priority is Priority.FOREGROUND:
            piece = min(piece, FOREGROUND_PIECE)
        if length <= piece:
            buf = self._channel(priority).call(Cmd.READ, offset, length, patience).buf
            assert buf is not None
            return buf  # type: ignore[return-value]  # a bytearray: bytes-like, and no copy
        # larger than the server takes in one request, or a guest's large read (see
        # FOREGROUND_PIECE): pieces in parallel, each on the least busy channel of its priority
        pieces = [(o, min(piece, offset + length - o)) for o in range(offset, offset + length, piece)]
        return b"".join(_parallel([(self._piece, priority, o, n, patience) for o, n in pieces]))

    def _piece(self, priority: Priority, offset: int, length: int, patience: float | None) -> bytearray:
        buf = self._channel(priority).call(Cmd.READ, offset, length, patience).buf
        assert buf is not None
        return buf

    def _channel(self, priority: Priority) -> Channel:
        """The channel a request of ``priority`` goes on: for a guest's, the least busy of the
        foreground ones, dialling one more (not waiting for it) when all are busy."""
        if priority is not Priority.FOREGROUND:
            return self._background()
        first = self._channels[Priority.FOREGROUND]
        channel = min([first, *self._more], key=lambda c: c.pending_bytes)
        if (channel.pending_bytes and not self._dialling and not self._closed
                and 1 + len(self._more) < FOREGROUND_CONNECTIONS
                and (self._refused_at is None or time.monotonic() - self._refused_at >= FOREGROUND_REDIAL_S)
                and self._channels.get(Priority.BACKGROUND, first) is not first):
            self._dialling = True
            gevent.spawn(self._dial_foreground)
        return channel

    def _dial_foreground(self) -> None:
        """One more foreground channel (``FOREGROUND_CONNECTIONS``). A server that does not take
        it is asked again after ``FOREGROUND_REDIAL_S``: guests' reads meanwhile share the
        connections there are."""
        label = f"{self.url} foreground {2 + len(self._more)}"
        try:
            first = Connection.open(self._dial, self._export, self._deadline, label, self._deadline,
                                    self._bitmap)
            try:
                self._same_export(first)
            except BaseException:
                first.kill("not the export it was")
                raise
        except (OSError, SourceError) as e:
            first_refusal, self._refused_at = self._refused_at is None, time.monotonic()
            if self._closed or not first_refusal:
                return  # the dial met the close, or the refusal was said already
            log.warning("source_foreground_connection_refused", url=self.url,
                        error=str(e) or type(e).__name__, retry_s=FOREGROUND_REDIAL_S,
                        hint="guests' reads share the connections there are (qemu-nbd: a larger --shared)")
            return
        finally:
            self._dialling = False
        channel = Channel(self._dial, self._export, label, deadline=self._deadline, first=first,
                          bitmap=self._bitmap, check=self._same_export)
        if self._closed:
            channel.close()
            return
        self._more.append(channel)
        if self._refused_at is not None:  # taken after a refusal: the state changed back
            self._refused_at = None
            log.info("source_foreground_connection_added", url=self.url, connections=1 + len(self._more))

    def _patience(self, priority: Priority) -> float | None:
        deadlines = PATIENCE[priority]
        return None if deadlines is None else deadlines * self._deadline

    def _background(self) -> Channel:
        """The background channel, connected on first use. A server that serves one client at a
        time (qemu-nbd's default --shared=1) never answers a second connection: then background
        reads share the foreground connection, slower for guests but never stalled."""
        with self._bg_lock:
            if Priority.BACKGROUND not in self._channels:
                try:
                    first = Connection.open(self._dial, self._export, self._deadline,
                                            f"{self.url} background", self._deadline, self._bitmap)
                    try:
                        self._same_export(first)  # opened later than the identity was taken
                    except BaseException:
                        first.kill("not the export it was")
                        raise
                    channel = Channel(self._dial, self._export, f"{self.url} background",
                                      deadline=self._deadline, first=first, bitmap=self._bitmap,
                                      check=self._same_export)
                except (OSError, SourceUnavailable) as e:
                    log.warning("source_single_connection", url=self.url, error=str(e) or type(e).__name__,
                                hint="the server takes one client at a time (qemu-nbd: use --shared=2 "
                                     "or more); background copies share the guests' connection")
                    channel = self._channels[Priority.FOREGROUND]
                self._channels[Priority.BACKGROUND] = channel
            return self._channels[Priority.BACKGROUND]

    def extents(self, offset: int, length: int, priority: Priority = Priority.FOREGROUND) -> list[Extent]:
        self._check(offset, length)
        if not self._block_status:
            return [Extent(offset, length, False)]
        # a connection redialled to a server that no longer offers base:allocation: DATA
        runs = self._status(BASE_ALLOCATION, offset, length, priority, _is_zero, unsure=False)
        return [Extent(off, n, zero) for off, n, zero in runs or [(offset, length, False)]]

    def _status(self, context: str, offset: int, length: int, priority: Priority,
                state_of: Callable[[int], bool], *, unsure: bool) -> list[tuple[int, int, bool]] | None:
        """Block status runs of one context over the range, as (offset, length, state) with
        adjacent equal states merged; None when the connection that answered did not select
        ``context``. The server may describe less than asked: ask again from where it stopped.
        At most ``MAX_STATUS_RUNS`` runs (a server cutting a large range very fine must not grow
        our memory): the rest of the range is then one run of state ``unsure``, the state that
        is never wrong (DATA, dirty)."""
        out: list[tuple[int, int, bool]] = []
        pos, end = offset, offset + length
        # the copier's block status goes on the background connection: a server busy with a
        # slow status query would otherwise hold up the guests' reads queued behind it
        channel = self._channels.get(priority) or self._background()
        while pos < end:
            if len(out) >= replies.MAX_STATUS_RUNS:
                log.warning("source_status_truncated", url=self.url, context=context, offset=pos,
                            length=end - pos, runs=len(out), state=unsure,
                            hint="the server cut the range finer than one query may hold; the rest "
                                 "is taken as DATA/dirty (a copy, never a stale block)")
                _merge(out, pos, end - pos, unsure)
                break
            req = channel.call(Cmd.BLOCK_STATUS, pos, min(end - pos, _MAX_STATUS), self._patience(priority))
            runs = req.status.get(context)
            if runs is None:
                return None
            for run in runs:
                _merge(out, run.offset, run.length, state_of(run.flags))
            pos = runs[-1].end  # StatusChunk keeps at least one run of nonzero length
        return out

    def close(self) -> None:
        self._closed = True
        for channel in {*self._channels.values(), *self._more}:
            channel.close()

    def _check(self, offset: int, length: int) -> None:
        if self._closed:
            raise SourceUnavailable(f"{self.url}: closed")
        if self._changed is not None:
            raise SourceChanged(self._changed)
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise SourceProtocolError(f"read [{offset}, +{length}) outside the export ({self.size} bytes)")


class NbdBitmapSource(NbdSource):
    """An NBD export with a dirty bitmap (``DirtyTracking``): the live source of issue 11."""

    def __init__(self, *args: object, bitmap: str, **kwargs: object) -> None:
        super().__init__(*args, bitmap=bitmap, **kwargs)  # type: ignore[arg-type]
        self.dirty_bitmap = bitmap
        self._context = QEMU_DIRTY_BITMAP + bitmap

    def dirty_runs(self, offset: int, length: int,
                   priority: Priority = Priority.BACKGROUND) -> list[DirtyRun]:
        """Which of ``[offset, offset+length)`` the bitmap marks dirty (flag bit 0 of
        ``qemu:dirty-bitmap:NAME``, QEMU docs/interop/nbd.txt). Raises ``SourceNotFound`` when
        a redialled connection no longer offers the bitmap: clean must never be a guess."""
        self._check(offset, length)
        runs = self._status(self._context, offset, length, priority, _is_dirty, unsure=True)
        if runs is None:
            raise SourceNotFound(_no_bitmap(self.url, self._export, self.dirty_bitmap, "no longer offers"))
        return [DirtyRun(off, n, dirty) for off, n, dirty in runs]


_ZERO, _DIRTY = int(StateFlag.ZERO), int(DirtyFlag.DIRTY)  # plain ints: IntFlag's & is slow per run


def _is_zero(flags: int) -> bool:
    """base:allocation: ZERO promises zeros; HOLE alone does not (NBD document, base:allocation)."""
    return bool(flags & _ZERO)


def _is_dirty(flags: int) -> bool:
    return bool(flags & _DIRTY)


def _merge(out: list[tuple[int, int, bool]], offset: int, length: int, state: bool) -> None:
    if out and out[-1][2] == state and out[-1][0] + out[-1][1] == offset:
        out[-1] = (out[-1][0], out[-1][1] + length, state)
    else:
        out.append((offset, length, state))


def _no_bitmap(url: str, export: str, bitmap: str, verb: str) -> str:
    return (f"{url}: export {export!r} {verb} dirty bitmap {bitmap!r} (meta context "
            f"{QEMU_DIRTY_BITMAP}{bitmap}; qemu-storage-daemon: block-export-add ... bitmaps: [{bitmap!r}], "
            f"qemu-nbd: -B {bitmap})")


def _parallel(calls: list[tuple]) -> list:  # type: ignore[type-arg]
    """Run calls in greenlets and return their results in order, re-raising the first error
    in the caller (a greenlet that dies with an exception would print a traceback)."""

    def guarded(fn, *args):  # type: ignore[no-untyped-def]
        try:
            return True, fn(*args)
        except Exception as e:
            return False, e

    jobs = [gevent.spawn(guarded, *call) for call in calls]
    gevent.joinall(jobs)
    out = []
    for job in jobs:
        ok, value = job.value
        if not ok:
            raise value
        out.append(value)
    return out


def open_nbd(url: str, *, timeout: float = 30.0, deadline: float = DEFAULT_REQUEST_DEADLINE,
             source_id: str | None = None, dirty_bitmap: str | None = None,
             live: bool = False) -> NbdSource:
    """Connect and negotiate, retrying a refused or unreachable server until ``timeout``. With
    ``dirty_bitmap`` the source is an ``NbdBitmapSource``, or ``SourceNotFound`` when the export
    does not offer that bitmap; ``live``: see the module docstring."""
    if dirty_bitmap is not None and not (_BITMAP_NAME.fullmatch(dirty_bitmap)
                                         and len(dirty_bitmap.encode()) <= _MAX_BITMAP_NAME):
        raise SourceConfigError(f"dirty bitmap name {dirty_bitmap[:40]!r}: use 1-{_MAX_BITMAP_NAME} bytes, "
                                "no control characters (QEMU's bitmap name)")
    dial, export = parse_nbd_url(url)
    give_up = time.monotonic() + timeout
    delay = 0.1
    while True:
        try:
            first = Connection.open(dial, export, max(0.5, min(deadline, give_up - time.monotonic())),
                                    f"{redact(url)} foreground", deadline, dirty_bitmap)
            break
        except (OSError, SourceUnavailable) as e:
            if time.monotonic() + delay > give_up:
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise SourceUnavailable(f"cannot reach {redact(url)}: {why or type(e).__name__}") from None
            gevent.sleep(delay)
            delay = min(delay * 2, 2.0)
    if dirty_bitmap is None:
        return NbdSource(url, dial, export, first, deadline=deadline, source_id=source_id, live=live)
    if QEMU_DIRTY_BITMAP + dirty_bitmap not in first.info.contexts:
        first.disconnect()
        why = "does not offer" if first.info.structured else "cannot offer (no structured replies) the"
        raise SourceNotFound(_no_bitmap(redact(url), export, dirty_bitmap, why))
    return NbdBitmapSource(url, dial, export, first, deadline=deadline, source_id=source_id, live=live,
                           bitmap=dirty_bitmap)
