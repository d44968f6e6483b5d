"""Dirty bitmaps over NBD (issue 11, acceptance 4): ``qemu:dirty-bitmap:NAME`` negotiated beside
``base:allocation`` and read with NBD_CMD_BLOCK_STATUS, against the real peers a live migration
uses (qemu-storage-daemon owning the image and the bitmap with two exports; qemu-nbd ``-B`` on a
qcow2 with a persistent bitmap), and against a scripted server that breaks the rules."""

from __future__ import annotations

import itertools
import random
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import pytest

from lazyiscsi.source import (
    DirtyRun,
    DirtyTracking,
    Extent,
    Priority,
    SourceConfigError,
    SourceNotFound,
    SourceProtocolError,
    open_source,
)
from lazyiscsi.source.nbd import replies
from lazyiscsi.source.nbd.constants import BASE_ALLOCATION, QEMU_DIRTY_BITMAP
from lazyiscsi.source.nbd.replies import MAX_STATUS_RUNS
from tests.integration.peers import (
    BITMAP,
    DirtyBitmapSource,
    MiB,
    Nbdkit,
    ScriptedNbd,
    free_port,
    make_qcow2_with_bitmap,
    qemu_io,
    qemu_nbd_with_bitmap,
    start_dirty_bitmap_source,
)

SIZE = 16 * MiB
GRAIN = 64 << 10  # the bitmap's granularity: QEMU marks whole granules dirty


def expected(size: int, dirty: list[tuple[int, int]], offset: int = 0,
             length: int | None = None) -> list[DirtyRun]:
    """What ``dirty_runs(offset, length)`` must say when the (sorted, disjoint) ``dirty`` ranges
    are dirty: the range covered exactly, adjacent runs merged."""
    end = size if length is None else offset + length
    out: list[DirtyRun] = []
    pos = offset
    for start, n in dirty:
        lo, hi = max(start, offset), min(start + n, end)
        if lo >= hi:
            continue
        if lo > pos:
            out.append(DirtyRun(pos, lo - pos, False))
        if out and out[-1].dirty and out[-1].end == lo:
            out[-1] = DirtyRun(out[-1].offset, hi - out[-1].offset, True)
        else:
            out.append(DirtyRun(lo, hi - lo, True))
        pos = hi
    if pos < end:
        out.append(DirtyRun(pos, end - pos, False))
    return out


def granules(offset: int, length: int) -> tuple[int, int]:
    """The granule-aligned range QEMU marks dirty for a write of [offset, +length)."""
    start = offset // GRAIN * GRAIN
    return start, -(-(offset + length) // GRAIN) * GRAIN - start


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[DirtyBitmapSource]:
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(SIZE)  # sparse: base:allocation has holes to report
    peer = start_dirty_bitmap_source(image, tmp_path, granularity=GRAIN)
    yield peer
    peer.stop()


# the writes of the "source VM": aligned, unaligned, adjacent, and the last granule of the disk
WRITES = [(1 * MiB, 2 * GRAIN), (1 * MiB + 2 * GRAIN, GRAIN), (3 * MiB + 100, 10), (5 * MiB - 1, 2),
          (SIZE - GRAIN, GRAIN)]


def test_qemu_storage_daemon_bitmap_reports_exactly_the_written_granules(qsd: DirtyBitmapSource) -> None:
    src = open_source(qsd.lazy_url, dirty_bitmap=BITMAP, live=True)
    try:
        assert isinstance(src, DirtyTracking) and src.dirty_bitmap == BITMAP
        assert src.dirty_runs(0, SIZE) == [DirtyRun(0, SIZE, False)]  # nothing written yet
        for offset, length in WRITES:
            qsd.write(offset, length)
        dirty = sorted(granules(o, n) for o, n in WRITES)
        # merged: [1 MiB, +3 granules) is one run though written by two requests
        assert src.dirty_runs(0, SIZE) == expected(SIZE, dirty)
        assert DirtyRun(1 * MiB, 3 * GRAIN, True) in src.dirty_runs(0, SIZE)
        # the end of the disk, both priorities
        for priority in Priority:
            assert src.dirty_runs(SIZE - 100, 100, priority) == [DirtyRun(SIZE - 100, 100, True)]
            assert src.dirty_runs(SIZE - GRAIN - 1, 2, priority) == [DirtyRun(SIZE - GRAIN - 1, 1, False),
                                                                     DirtyRun(SIZE - GRAIN, 1, True)]
        # unaligned queries, clipped exactly to what was asked
        rnd = random.Random(11)
        for _ in range(200):
            offset = rnd.randrange(SIZE - 1)
            length = rnd.randrange(1, min(6 * MiB, SIZE - offset) + 1)
            assert src.dirty_runs(offset, length) == expected(SIZE, dirty, offset, length), (offset, length)
    finally:
        src.close()


def test_many_greenlets_poll_the_bitmap_while_the_vm_writes(qsd: DirtyBitmapSource) -> None:
    """The copier polls from many greenlets on the background connection while guests read on
    the foreground one: every answer covers its range exactly, and the final one is the truth."""
    src = open_source(qsd.lazy_url, dirty_bitmap=BITMAP, live=True)
    try:
        def poll(seed: int) -> None:
            rnd = random.Random(seed)
            for _ in range(30):
                offset = rnd.randrange(0, SIZE, 4096)
                length = rnd.randrange(4096, SIZE - offset + 1, 4096) if offset < SIZE - 4096 else 4096
                runs = src.dirty_runs(offset, length)
                assert runs[0].offset == offset and runs[-1].end == offset + length
                assert all(a.end == b.offset and a.dirty != b.dirty for a, b in itertools.pairwise(runs))
                src.read(offset, 4096, Priority.FOREGROUND)

        jobs = [gevent.spawn(poll, seed) for seed in range(6)]
        written = [(i * MiB, GRAIN) for i in range(0, 16, 3)]
        for offset, length in written:
            qsd.write(offset, length)
        gevent.joinall(jobs, raise_error=True)
        assert src.dirty_runs(0, SIZE) == expected(SIZE, written)
    finally:
        src.close()


def test_extents_and_the_bitmap_on_the_same_connection(qsd: DirtyBitmapSource) -> None:
    """Both contexts are negotiated on each connection and every block status reply carries a
    chunk for each: ``extents`` (base:allocation) reads one, ``dirty_runs`` the other."""
    qsd.write(2 * MiB, GRAIN)
    src = open_source(qsd.lazy_url, dirty_bitmap=BITMAP, live=True)
    try:
        for priority in Priority:
            assert src.extents(0, SIZE, priority) == [Extent(0, 2 * MiB, True), Extent(2 * MiB, GRAIN, False),
                                                      Extent(2 * MiB + GRAIN, SIZE - 2 * MiB - GRAIN, True)]
            assert src.dirty_runs(0, SIZE, priority) == expected(SIZE, [(2 * MiB, GRAIN)])
        contexts = {priority: set(channel._conn.info.contexts)  # type: ignore[union-attr]
                    for priority, channel in src._channels.items()}  # type: ignore[attr-defined]
        assert contexts == {p: {BASE_ALLOCATION, QEMU_DIRTY_BITMAP + BITMAP} for p in Priority}
        assert src.read(2 * MiB, 16) == b"\xab" * 16
    finally:
        src.close()


def test_a_bitmap_the_export_does_not_offer_is_not_found(qsd: DirtyBitmapSource) -> None:
    # the VM's export has no bitmaps; the lazy export offers BITMAP only
    for url, name in ((qsd.vm_url, BITMAP), (qsd.lazy_url, "other")):
        with pytest.raises(SourceNotFound) as e:
            open_source(url, dirty_bitmap=name, live=True, timeout=5)
        assert f"dirty bitmap {name!r}" in str(e.value) and "qemu:dirty-bitmap:" + name in str(e.value)
        assert url.split("?")[0] in str(e.value) and "socket=***" in str(e.value)  # redacted


@pytest.mark.parametrize("url", ["/var/tmp/disk.img", "file:///var/tmp/disk.img", "http://127.0.0.1:9/disk"])
def test_a_bitmap_needs_an_nbd_source(url: str) -> None:
    with pytest.raises(SourceConfigError, match="dirty bitmaps need an nbd:// source"):
        open_source(url, dirty_bitmap=BITMAP)


@pytest.mark.parametrize("name", ["", "a\nb", "x" * 1024, "\u00e9" * 512])
def test_a_bad_bitmap_name_is_a_config_error(name: str) -> None:
    with pytest.raises(SourceConfigError, match="dirty bitmap name"):
        open_source("nbd://127.0.0.1:9/x", dirty_bitmap=name, timeout=1)


def test_qemu_nbd_with_a_persistent_qcow2_bitmap(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    """``qemu-img bitmap --add`` then ``qemu-nbd -B``: writes made before the export (qemu-io on
    the file: the bitmap is persistent) and through it are both reported."""
    image = make_qcow2_with_bitmap(tmp_path / "disk.qcow2", SIZE, granularity=GRAIN)
    qemu_io(str(image), f"write -P 0x11 {4 * MiB} {GRAIN}", fmt="qcow2")
    port = free_port()
    server = qemu_nbd_with_bitmap(image, port).start()
    nbdkit.append(server)
    url = server.url + "disk"
    src = open_source(url, dirty_bitmap=BITMAP)
    try:
        plain = open_source(url)
        assert not isinstance(plain, DirtyTracking)  # no bitmap asked, none given
        plain.close()
        assert src.dirty_runs(0, SIZE) == expected(SIZE, [(4 * MiB, GRAIN)])
        qemu_io(url, f"write -P 0x22 {7 * MiB + 5} 100")
        assert src.dirty_runs(0, SIZE) == expected(SIZE, [(4 * MiB, GRAIN), granules(7 * MiB + 5, 100)])
        assert src.read(7 * MiB + 5, 100) == b"\x22" * 100
        with pytest.raises(SourceNotFound, match="'nope'"):
            open_source(url, dirty_bitmap="nope")
    finally:
        src.close()


# -- a server that breaks the rules (libnbd's test_errors_server_* idea, with a scripted peer) --

@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedNbd]]:
    servers: list[ScriptedNbd] = []

    def start(answer: Callable[[int, int], list[bytes]], **kwargs: object) -> ScriptedNbd:
        servers.append(ScriptedNbd(answer, **kwargs))  # type: ignore[arg-type]
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _honest(offset: int, length: int) -> list[bytes]:
    """One descriptor per context covering the request: allocated data, clean."""
    return [struct.pack(">III", 1, length, 0), struct.pack(">III", 2, length, 0)]


def _millions(scripted: Callable[..., ScriptedNbd]) -> ScriptedNbd:
    """A server that answers every block status with alternating 512-byte descriptors (clean,
    dirty; DATA, HOLE), up to 2^21 per context (the NBD document: servers SHOULD NOT send more
    than 2^20 per chunk), never past the request."""
    n = 1 << 21
    alternating = struct.pack(">IIII", 512, 0, 512, 1) * (n // 2)
    full = [struct.pack(">I", 1) + alternating, struct.pack(">I", 2) + alternating]

    def answer(offset: int, length: int) -> list[bytes]:
        if length >= 512 * n:
            return full  # built once: the test measures the client's memory, not the server's
        descriptors = alternating[:8 * -(-length // 512)]
        return [struct.pack(">I", 1) + descriptors, struct.pack(">I", 2) + descriptors]

    return scripted(answer)


def test_a_peer_that_cuts_a_query_into_millions_of_runs_is_cut_short(
        scripted: Callable[..., ScriptedNbd]) -> None:
    """A 1 GiB query answered with 2^21 alternating descriptors per context (32 MiB of them):
    the answer keeps MAX_STATUS_RUNS runs and reports the rest dirty (and DATA), which is
    never wrong; no second request is sent for a query already full."""
    server = _millions(scripted)
    src = open_source(server.url, dirty_bitmap=BITMAP, live=True, timeout=5)
    try:
        runs = src.dirty_runs(0, 1 << 30)
        assert len(runs) == MAX_STATUS_RUNS and server.status_requests == 1
        assert runs[:4] == [DirtyRun(0, 512, False), DirtyRun(512, 512, True), DirtyRun(1024, 512, False),
                            DirtyRun(1536, 512, True)]
        # the last run kept is dirty (an even count, starting clean): the rest merges into it
        last = 512 * (MAX_STATUS_RUNS - 1)
        assert runs[-1] == DirtyRun(last, (1 << 30) - last, True)
        assert all(a.end == b.offset for a, b in itertools.pairwise(runs))
        # base:allocation flags 0 and 1 (HOLE) are both DATA: merged, so the query asks on
        extents = src.extents(0, 64 * MiB, Priority.BACKGROUND)
        assert extents == [Extent(0, 64 * MiB, False)] and server.status_requests == 3
    finally:
        src.close()


def test_memory_for_a_query_is_bounded_by_the_cap_not_by_the_peer(
        scripted: Callable[..., ScriptedNbd], monkeypatch: pytest.MonkeyPatch) -> None:
    """What one query holds is bounded by MAX_STATUS_RUNS whatever the server sends: with the
    cap at 1024 runs, 2^21 descriptors per context cost well under 4 MiB (kept, they would cost
    some 400 MiB). Measured with a small cap: tracemalloc makes each kept run slow to count."""
    monkeypatch.setattr(replies, "MAX_STATUS_RUNS", 1024)
    server = _millions(scripted)
    src = open_source(server.url, dirty_bitmap=BITMAP, live=True, timeout=5)
    try:
        tracemalloc.start()
        runs = src.dirty_runs(0, 1 << 30)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert len(runs) == 1024 and runs[-1].end == 1 << 30
        assert peak < 4 * MiB, f"{peak / MiB:.1f} MiB for one query"
    finally:
        src.close()


def _unknown_context(offset: int, length: int) -> list[bytes]:
    return [struct.pack(">III", 1, length, 0), struct.pack(">III", 9, length, 1)]


def _bitmap_missing(offset: int, length: int) -> list[bytes]:
    return [struct.pack(">III", 1, length, 0)]


def _bitmap_twice(offset: int, length: int) -> list[bytes]:
    return [*_honest(offset, length), struct.pack(">III", 2, length, 1)]


def _overrun(offset: int, length: int) -> list[bytes]:
    return [struct.pack(">III", 1, length, 0), struct.pack(">IIIII", 2, length, 1, 512, 0)]


def _zero_length(offset: int, length: int) -> list[bytes]:
    return [struct.pack(">III", 1, length, 0), struct.pack(">IIIII", 2, 512, 1, 0, 0)]


@pytest.mark.parametrize(("answer", "match"), [
    (_unknown_context, "context id 9"),
    (_bitmap_missing, "without qemu:dirty-bitmap:lazyiscsi-mig"),
    (_bitmap_twice, "two block status chunks for qemu:dirty-bitmap:lazyiscsi-mig"),
    (_overrun, "run past the request"),
    (_zero_length, "length 0"),
])
@pytest.mark.parametrize("priority", list(Priority))
def test_block_status_replies_that_break_the_rules_fail_the_query(
        scripted: Callable[..., ScriptedNbd], answer: Callable[[int, int], list[bytes]], match: str,
        priority: Priority) -> None:
    """A reply the client cannot trust fails that query with SourceProtocolError, at once, even
    at background priority (which resends for ever what a lost connection dropped: a server that
    answers the same wrong way every time must not make the copier spin). The connection read
    the whole reply and stays in step: the next request on it is answered."""
    server = scripted(answer)
    src = open_source(server.url, dirty_bitmap=BITMAP, live=True, timeout=5)
    try:
        with gevent.Timeout(30):
            with pytest.raises(SourceProtocolError, match=match):
                src.dirty_runs(0, 1 << 20, priority)
            assert server.status_requests == 1
            assert src.read(0, 4096, priority) == bytes(4096)
    finally:
        src.close()


def test_a_redialled_connection_without_the_bitmap_is_not_clean(scripted: Callable[..., ScriptedNbd]) -> None:
    """The bitmap was offered at open but a later connection (the background one here; a
    redial after a restart is the same) does not select it: ``dirty_runs`` says SourceNotFound,
    never "clean"."""
    contexts = {BASE_ALLOCATION: 1, QEMU_DIRTY_BITMAP + BITMAP: 2}

    def answer(offset: int, length: int) -> list[bytes]:  # only what the server now offers
        return [struct.pack(">III", ctx, length, 0) for ctx in contexts.values()]

    server = scripted(answer, contexts=contexts)
    src = open_source(server.url, dirty_bitmap=BITMAP, live=True, timeout=5)
    try:
        assert src.dirty_runs(0, 4096, Priority.FOREGROUND) == [DirtyRun(0, 4096, False)]
        del contexts[QEMU_DIRTY_BITMAP + BITMAP]
        with pytest.raises(SourceNotFound, match="no longer offers dirty bitmap 'lazyiscsi-mig'"):
            src.dirty_runs(0, 4096, Priority.BACKGROUND)
        assert src.extents(0, 4096, Priority.BACKGROUND) == [Extent(0, 4096, False)]
    finally:
        src.close()


def test_nbdkit_offers_no_dirty_bitmap(nbdkit: list[Nbdkit]) -> None:
    """nbdkit selects base:allocation only: asked for a bitmap it ignores the query, which is
    the refusal the client must turn into SourceNotFound (a source without the bitmap would
    otherwise read as all clean)."""
    server = Nbdkit(["memory", "size=16M"], free_port()).start()
    nbdkit.append(server)
    with pytest.raises(SourceNotFound, match=f"does not offer dirty bitmap '{BITMAP}'"):
        open_source(server.url, dirty_bitmap=BITMAP, live=True, timeout=5)
    src = open_source(server.url, live=True, timeout=5)  # the same export without a bitmap opens
    assert src.extents(0, 16 * MiB) == [Extent(0, 16 * MiB, True)]
    src.close()


def test_bitmap_polls_never_delay_a_guest_read(scripted: Callable[..., ScriptedNbd]) -> None:
    """``dirty_runs`` defaults to BACKGROUND priority: the copier's polls go on the background
    connection, so a guest's read is answered while the server is still busy with a slow poll
    (this server answers each connection in order, as a single-threaded server would)."""
    slow = threading.Event()  # the server runs in an OS thread

    def answer(offset: int, length: int) -> list[bytes]:
        slow.wait(60)  # released once the read below has been answered
        return [struct.pack(">III", 1, length, 0), struct.pack(">III", 2, length, 1)]

    server = scripted(answer)
    src = open_source(server.url, dirty_bitmap=BITMAP, live=True, timeout=5)
    try:
        poll = gevent.spawn(src.dirty_runs, 0, 1 << 20)
        with gevent.Timeout(30):  # gevent's sleep: the poll greenlet must run meanwhile
            while server.status_requests < 1:
                gevent.sleep(0.01)
        with gevent.Timeout(10):
            assert src.read(0, 4096, Priority.FOREGROUND) == bytes(4096)
        assert not poll.ready()
        slow.set()
        assert poll.get(timeout=30) == [DirtyRun(0, 1 << 20, True)]
    finally:
        slow.set()
        src.close()


def test_a_poll_the_server_never_answers_is_resent_after_the_deadline(
        scripted: Callable[..., ScriptedNbd]) -> None:
    """The request deadline holds for bitmap polls as for reads: a connection silent past it is
    dropped, redialled, and the poll sent again (NBD_CMD_BLOCK_STATUS is idempotent)."""
    released = threading.Event()

    def answer(offset: int, length: int) -> list[bytes]:
        if server.status_requests == 1:
            released.wait(60)  # the first poll is never answered while the client waits
        return [struct.pack(">III", 1, length, 0), struct.pack(">III", 2, length, 1)]

    server = scripted(answer)
    src = open_source(server.url, dirty_bitmap=BITMAP, live=True, timeout=5, deadline=1.0)
    try:
        t0 = time.monotonic()
        with gevent.Timeout(30):
            assert src.dirty_runs(0, 1 << 20) == [DirtyRun(0, 1 << 20, True)]
        assert server.status_requests == 2 and time.monotonic() - t0 >= 1.0
    finally:
        released.set()
        src.close()
