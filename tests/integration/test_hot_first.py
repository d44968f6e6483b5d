"""Hot-first copy and coalesced misses against a real NBD server (issue 15): nbdkit serving an
image behind its ``delay`` filter (a WAN's round trip on every read) and its ``log`` filter,
whose log says which reads reached the server, in which order and how large."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import gevent
from structlog.testing import capture_logs

from lazyiscsi.source import open_source
from lazyiscsi.source.base import Priority
from lazyiscsi.source.nbd import FOREGROUND_CONNECTIONS, FOREGROUND_PIECE
from lazyiscsi.store.fetch import MAX_COALESCED
from lazyiscsi.store.hotspots import NEIGHBOURHOOD
from lazyiscsi.store.hydrator import Hydrator, JobState
from lazyiscsi.store.lazydisk import LazyDisk
from tests.integration.peers import WAIT_S, MiB, Nbdkit, free_port, make_image

SIZE = 64 * MiB
KiB = 1 << 10
#: where the guest's burst of misses lands: far past where LBA order would be by then
HOT = 48 * MiB
_READ = re.compile(r" Read id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)")


def _server(tmp_path: Path, nbdkit: list[Nbdkit]) -> tuple[Nbdkit, bytes, Path]:
    image = tmp_path / "disk.img"
    data = make_image(image, SIZE)
    log = tmp_path / "nbdkit.log"
    server = Nbdkit(["--filter=log", "--filter=delay", "file", str(image), f"logfile={log}",
                     "rdelay=20ms"], free_port()).start()
    nbdkit.append(server)
    return server, data, log


def _wait(condition: Callable[[], bool], what: str) -> None:
    """``peers.wait_until`` for conditions the hub must run to reach (it sleeps the thread)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {WAIT_S:g} s"
        gevent.sleep(0.02)


def _reads(log: Path) -> list[tuple[int, int]]:
    """(offset, length) of every read the server was asked for, in the order it was asked."""
    return [(int(m[1], 16), int(m[2], 16)) for m in _READ.finditer(log.read_text())]


def test_the_copier_fetches_around_a_burst_of_misses_before_lba_order(tmp_path: Path,
                                                                      nbdkit: list[Nbdkit]) -> None:
    server, data, log = _server(tmp_path, nbdkit)
    disk = LazyDisk.open(str(tmp_path / "cache"), open_source(server.url), autocommit_s=None)
    # a slow copy (4 MiB/s) so that LBA order is far from HOT for many seconds
    job = Hydrator(disk, rate=4 * MiB)
    job.start()
    _wait(lambda: disk.local_bytes > 0, "the copy started")
    before = len(_reads(log))  # the open's identity samples and the copy so far
    offsets = [HOT + i * 256 * KiB for i in range(8)]  # 8 misses over two neighbourhoods
    readers = [gevent.spawn(disk.read, off, 4096) for off in offsets]
    gevent.joinall(readers, raise_error=True)
    assert [g.value for g in readers] == [data[off:off + 4096] for off in offsets]
    hot = (HOT, HOT + 2 * NEIGHBOURHOOD)

    _wait(lambda: next(disk.missing_runs(hot[0], hot[1] - hot[0]), None) is None,
          "the neighbourhoods of the misses are local")
    assert disk.local_bytes < HOT // 2, "the hot region came only when LBA order reached it"
    assert job.query().hot_bytes >= NEIGHBOURHOOD
    # the server's own order: every read of the hot region before any LBA read past HOT/2
    reads = _reads(log)[before:]
    last_hot = max(i for i, (off, _) in enumerate(reads) if hot[0] <= off < hot[1])
    # (4 KiB reads are the identity samples a new connection is checked with, not the copy's)
    lba_late = [i for i, (off, n) in enumerate(reads) if HOT // 2 <= off < hot[0] and n > 4096]
    assert not lba_late or last_hot < min(lba_late)
    # the rest in LBA order, every unit copied once
    job.set_rate(0)
    assert job.wait(120) and job.state is JobState.COMPLETED
    st = disk.stats()
    assert st.fetched_foreground + st.fetched_background == SIZE
    disk.close()
    assert (tmp_path / "cache").read_bytes() == data


def test_adjacent_concurrent_misses_share_requests(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    """Eight 64 KiB misses side by side, all at once (a guest reading a file with a queue
    depth of 8): on main each was its own request; merged, they take 512 KiB / MAX_COALESCED."""
    server, data, log = _server(tmp_path, nbdkit)
    disk = LazyDisk.open(str(tmp_path / "cache"), open_source(server.url), autocommit_s=None)
    base, n, size = 9 * MiB, 8, 64 * KiB  # clear of the identity's samples
    readers = [gevent.spawn(disk.read, base + i * size, size) for i in range(n)]
    gevent.joinall(readers, raise_error=True)
    assert b"".join(g.value for g in readers) == data[base:base + n * size]
    reads = [r for r in _reads(log) if base <= r[0] < base + n * size]
    assert sum(length for _, length in reads) == n * size  # each byte asked for once
    assert len(reads) == n * size // MAX_COALESCED, reads
    disk.close()


def test_a_large_guest_read_goes_out_in_pieces(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    """A 1 MiB miss is sent as pieces of FOREGROUND_PIECE (a small miss beside it waits on the
    wire behind one piece at most); a background run of the same size is one request."""
    server, data, log = _server(tmp_path, nbdkit)
    source = open_source(server.url)
    disk = LazyDisk.open(str(tmp_path / "cache"), source, autocommit_s=None)
    # clear of the identity's samples (every eighth of the disk)
    assert disk.read(17 * MiB, MiB) == data[17 * MiB:18 * MiB]
    reads = [r for r in _reads(log) if 17 * MiB <= r[0] < 18 * MiB]
    assert sorted(reads) == [(17 * MiB + i, FOREGROUND_PIECE) for i in range(0, MiB, FOREGROUND_PIECE)]
    disk.populate(33 * MiB, MiB)
    assert [r for r in _reads(log) if 33 * MiB <= r[0] < 34 * MiB] == [(33 * MiB, MiB)]
    disk.close()


_CONNECTION = re.compile(r"connection=(\d+) Read id=\d+ offset=0x([0-9a-f]+)")


def test_a_burst_of_misses_spreads_over_a_bounded_number_of_connections(
        tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    """Guests' reads use up to FOREGROUND_CONNECTIONS connections (each read the least busy),
    the copier its own; however many reads are in flight, no more are opened."""
    server, data, log = _server(tmp_path, nbdkit)
    src = open_source(server.url)
    src.read(20 * MiB, 4096, Priority.BACKGROUND)  # the copier's connection
    for _ in range(3):  # bursts of misses, far more than the connections
        offsets = [21 * MiB + i * 128 * KiB for i in range(16)]
        readers = [gevent.spawn(src.read, off, 4096) for off in offsets]
        gevent.joinall(readers, raise_error=True)
        assert [bytes(g.value) for g in readers] == [data[o:o + 4096] for o in offsets]
    text = log.read_text()
    assert text.count(" Connect ") == 1 + FOREGROUND_CONNECTIONS
    burst = {int(c) for c, off in _CONNECTION.findall(text) if 21 * MiB <= int(off, 16) < 23 * MiB}
    assert len(burst) == FOREGROUND_CONNECTIONS > 1, "the burst did not spread over the connections"
    src.close()


def test_a_server_with_no_client_slot_to_spare_is_asked_once(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    """qemu-nbd --shared=2: the guests' first connection and the copier's take both slots.
    The dial of a second foreground connection gets no handshake: it is given up after a
    deadline, said once, and never tried again; reads go on over the connections there are."""
    image = tmp_path / "q.img"
    data = make_image(image, 16 * MiB)
    port = free_port()
    server = Nbdkit(["-r", "-t", "-e", "2", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-x", "disk",
                     str(image)], port, command=["qemu-nbd"]).start()
    nbdkit.append(server)
    with capture_logs() as events:
        src = open_source(f"nbd://127.0.0.1:{port}/disk", deadline=1.0)
        src.read(0, 4096, Priority.BACKGROUND)

        def burst() -> None:
            offsets = [MiB + i * 64 * KiB for i in range(16)]
            readers = [gevent.spawn(src.read, off, 4096) for off in offsets]
            gevent.joinall(readers, raise_error=True)
            assert [bytes(g.value) for g in readers] == [data[o:o + 4096] for o in offsets]

        burst()
        refused = "source_foreground_connection_refused"
        _wait(lambda: any(e["event"] == refused for e in events), "the refused dial said so")
        for _ in range(3):
            burst()
        gevent.sleep(1.5)  # past another deadline: a second dial would have been given up too
        src.close()
    assert [e["event"] for e in events].count(refused) == 1
