"""The NBD client against real servers: nbdkit (file, sparse-random, memory; error, delay and
blocksize filters) and qemu-nbd. Data is compared byte for byte; holes through block status."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import gevent
import pytest
from structlog.testing import capture_logs

from lazyiscsi.source import (
    Priority,
    SourceConfigError,
    SourceNotFound,
    SourceReadError,
    SourceUnavailable,
    nbd,
    open_source,
)
from lazyiscsi.source.nbd import NbdSource
from tests.integration.faultproxy import FaultProxy
from tests.integration.peers import MiB, Nbdkit, free_port, make_image, wait_until


def _random_reads(src: NbdSource, image: bytes, n: int, seed: int, max_len: int = 3 * MiB) -> None:
    rnd = random.Random(seed)
    for _ in range(n):
        off = rnd.randrange(len(image) - 1)
        length = rnd.randrange(1, min(max_len, len(image) - off) + 1)
        prio = rnd.choice(list(Priority))
        assert src.read(off, length, prio) == image[off:off + length], (off, length)


def test_file_plugin_concurrent_reads(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    img = tmp_path / "a.img"
    image = make_image(img, 32 * MiB)
    server = Nbdkit(["file", str(img)], free_port()).start()
    nbdkit.append(server)
    src = open_source(server.url)
    assert src.size == len(image) and src.url == server.url
    jobs = [gevent.spawn(_random_reads, src, image, 40, seed) for seed in range(8)]
    gevent.joinall(jobs, raise_error=True)
    assert src.extents(0, src.size) == [src.extents(0, src.size)[0]] and not src.extents(0, 4096)[0].zero
    src.close()
    with pytest.raises(SourceUnavailable):
        src.read(0, 1)


def test_reads_larger_than_the_servers_maximum_are_split(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    img = tmp_path / "a.img"
    image = make_image(img, 8 * MiB)
    server = Nbdkit(["--filter=blocksize", "file", str(img), "maxdata=65536"], free_port()).start()
    nbdkit.append(server)
    src = open_source(server.url)
    # nbdkit's blocksize filter splits on its side; our client must still get every byte
    assert src.read(1000, 5 * MiB) == image[1000:1000 + 5 * MiB]
    src.close()


def test_sparse_file_holes_by_block_status(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    img = tmp_path / "sparse.img"
    data = random.Random(2).randbytes(MiB)
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(10 * MiB)
        f.write(data)
    server = Nbdkit(["file", str(img)], free_port()).start()
    nbdkit.append(server)
    src = open_source(server.url)
    ext = src.extents(0, src.size)
    assert [(e.offset, e.length, e.zero) for e in ext] == [
        (0, 10 * MiB, True), (10 * MiB, MiB, False), (11 * MiB, 53 * MiB, True)]
    assert src.read(0, 4096) == bytes(4096)
    assert src.read(10 * MiB - 100, 200) == bytes(100) + data[:100]
    src.close()


def test_sparse_random_plugin(nbdkit: list[Nbdkit]) -> None:
    """sparse-random: mostly holes, with random data blocks; reads of a ZERO extent are zeros."""
    server = Nbdkit(["sparse-random", "size=256M", "seed=7", "percent=10"], free_port()).start()
    nbdkit.append(server)
    src = open_source(server.url)
    ext = src.extents(0, src.size)
    assert sum(e.length for e in ext) == src.size
    zeros = [e for e in ext if e.zero]
    data = [e for e in ext if not e.zero]
    assert zeros and data
    for e in zeros[:20]:
        n = min(e.length, 65536)
        assert src.read(e.offset, n) == bytes(n)
    assert any(src.read(e.offset, min(e.length, 4096)) != bytes(min(e.length, 4096)) for e in data[:20])
    src.close()


@pytest.mark.parametrize("shared", [1, 4])
def test_qemu_nbd_interop(tmp_path: Path, nbdkit: list[Nbdkit], shared: int) -> None:
    """qemu-nbd serves one client at a time by default (--shared=1): then background reads
    share the foreground connection instead of waiting for ever for a second one."""
    img = tmp_path / "q.img"
    image = bytearray(make_image(img, 16 * MiB))
    with open(img, "r+b") as f:
        f.truncate(24 * MiB)  # a hole at the end for block status to find
    image += bytes(8 * MiB)
    port = free_port()
    server = Nbdkit(["-r", "-t", "-e", str(shared), "-f", "raw", "-b", "127.0.0.1", "-p", str(port),
                     "-x", "disk", str(img)], port, command=["qemu-nbd"]).start()
    nbdkit.append(server)
    src = open_source(f"nbd://127.0.0.1:{port}/disk")
    with gevent.Timeout(30):
        _random_reads(src, bytes(image), 30, seed=4)
    ext = src.extents(0, src.size)
    assert sum(e.length for e in ext) == src.size and ext[-1].zero and ext[-1].end == 24 * MiB
    src.close()
    with pytest.raises(SourceNotFound, match="'other'"):
        open_source(f"nbd://127.0.0.1:{port}/other", timeout=5)


def test_unix_socket_and_memory_plugin(tmp_path: Path) -> None:
    import subprocess

    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "memory", "8M"])
    try:
        wait_until(sock.exists, "nbdkit's socket", proc=proc)
        src = open_source(f"nbd+unix:///?socket={sock}")
        assert src.size == 8 * MiB
        assert src.read(0, MiB) == bytes(MiB)
        src.close()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(("url", "match"), [
    ("nbd:///x", "no host"),
    ("nbd://h:99999999/x", "bad port"),
    ("nbd+unix:///x", "socket=PATH"),
    ("nbd+unix://host/x?socket=/s", "no host"),
])
def test_bad_urls(url: str, match: str) -> None:
    with pytest.raises(SourceConfigError, match=match):
        open_source(url)


def test_refused_within_the_timeout() -> None:
    t0 = time.monotonic()
    with pytest.raises(SourceUnavailable, match="cannot reach"):
        open_source(f"nbd://127.0.0.1:{free_port()}/", timeout=1.0)
    assert time.monotonic() - t0 < 3


def test_read_errors_are_per_request(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    img = tmp_path / "a.img"
    image = make_image(img, 4 * MiB)
    switch = tmp_path / "fail"
    server = Nbdkit(["--filter=error", "file", str(img), "error-pread=EIO", "error-pread-rate=100%",
                     f"error-pread-file={switch}"], free_port()).start()
    nbdkit.append(server)
    src = open_source(server.url)
    switch.touch()
    with pytest.raises(SourceReadError, match="EIO"):
        src.read(0, 4096)
    switch.unlink()
    # the same connection still serves
    assert src.read(4096, 4096) == image[4096:8192]
    src.close()


def test_reads_survive_a_server_restart(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    img = tmp_path / "a.img"
    image = make_image(img, 8 * MiB)
    port = free_port()
    server = Nbdkit(["--filter=delay", "file", str(img), "rdelay=200ms"], port).start()
    nbdkit.append(server)
    src = open_source(server.url)
    pending = [gevent.spawn(src.read, i * MiB, MiB, Priority.BACKGROUND) for i in range(8)]
    gevent.sleep(0.05)
    server.kill()  # replies never come: the connection dies with 8 reads in flight
    gevent.sleep(0.5)
    assert not any(g.ready() for g in pending)
    nbdkit.append(Nbdkit(["file", str(img)], port).start())
    gevent.joinall(pending, timeout=20, raise_error=True)
    assert b"".join(g.value for g in pending) == image
    src.close()


def test_abandoned_read_does_not_break_the_connection(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    img = tmp_path / "a.img"
    image = make_image(img, 4 * MiB)
    server = Nbdkit(["--filter=delay", "file", str(img), "rdelay=300ms"], free_port()).start()
    nbdkit.append(server)
    src = open_source(server.url)
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.05):
        src.read(0, MiB)
    # the late reply for the abandoned cookie is read past; the next read is correct
    assert src.read(MiB, 4096) == image[MiB:MiB + 4096]
    src.close()


def test_foreground_not_queued_behind_background(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    """Background reads on their own connection fill nbdkit's per-connection request queue
    (slow reads); a foreground read on the other connection answers in one delay."""
    img = tmp_path / "a.img"
    make_image(img, 64 * MiB)
    server = Nbdkit(["--threads=4", "--filter=delay", "file", str(img), "rdelay=100ms"],
                    free_port()).start()
    nbdkit.append(server)
    src = open_source(server.url)
    t0 = time.monotonic()
    busy = [gevent.spawn(src.read, i * MiB, MiB, Priority.BACKGROUND) for i in range(32)]
    gevent.sleep(0.05)
    t1 = time.monotonic()
    src.read(40 * MiB, 4096, Priority.FOREGROUND)
    fg = time.monotonic() - t1
    gevent.joinall(busy, raise_error=True)
    bg = time.monotonic() - t0
    # 32 background reads through 4 threads take 8 delays (~800 ms); the foreground read takes
    # one. Compared with the background's own time, so that a loaded host slows both alike:
    # queued behind them, it would take about as long as they do.
    assert fg < bg / 3, (fg, bg)
    src.close()


def test_a_refused_foreground_connection_is_dialled_again(tmp_path: Path, nbdkit: list[Nbdkit],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """One more foreground connection that met a refusal (a blip of the path, a server at its
    client limit) is tried again after ``FOREGROUND_REDIAL_S``; it used to be given up for the
    life of the source, leaving a burst of guest misses queued on one connection. The refusal
    is logged once, the connection taken later once."""
    monkeypatch.setattr(nbd, "FOREGROUND_REDIAL_S", 0.5)
    img = tmp_path / "a.img"
    image = make_image(img, 16 * MiB)
    server = Nbdkit(["--threads=8", "--filter=delay", "file", str(img), "rdelay=200ms"], free_port()).start()
    nbdkit.append(server)
    proxy = FaultProxy(("127.0.0.1", server.port))
    try:
        with capture_logs() as logs:
            src = open_source(f"nbd://127.0.0.1:{proxy.port}/")
            assert src.read(0, 4096, Priority.BACKGROUND) == image[:4096]  # its own connection
            assert proxy.accepted == 2

            def burst(n: int) -> None:
                reads = [gevent.spawn(src.read, i * MiB, 4096, Priority.FOREGROUND) for i in range(n)]
                for i, r in enumerate(reads):
                    assert r.get(timeout=30) == image[i * MiB:i * MiB + 4096]

            def until(condition: Callable[[], bool], what: str) -> None:
                with gevent.Timeout(30, AssertionError(f"{what}: not within 30 s")):
                    while not condition():
                        gevent.sleep(0.05)  # the dial runs in a greenlet of this hub

            proxy.refuse(1)
            burst(4)  # a read waits on the first connection: one more is dialled, and refused
            until(lambda: proxy.accepted == 3, "the third dial")
            burst(4)  # within FOREGROUND_REDIAL_S: not dialled again
            assert proxy.accepted == 3
            gevent.sleep(0.6)
            burst(4)
            until(lambda: any(e["event"] == "source_foreground_connection_added" for e in logs),
                  "the connection taken on the next try")
            assert proxy.accepted == 4
            burst(8)  # two foreground connections now: no more dials
            assert proxy.accepted == 4
            src.close()
        refused = [e for e in logs if e["event"] == "source_foreground_connection_refused"]
        assert len(refused) == 1 and refused[0]["retry_s"] == 0.5
    finally:
        proxy.close()


def test_block_status_never_delays_a_guest_read(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    """Issue 10, defect 13: block status went through the foreground connection, so with a
    server that serializes a connection's requests (nbdkit noparallel) a guest's read waited
    behind the copier's slow block status. It goes on the background connection now."""
    img = tmp_path / "a.img"
    image = make_image(img, 8 * MiB)
    server = Nbdkit(["--filter=noparallel", "--filter=delay", "file", str(img), "serialize=requests",
                     "delay-extents=2"], free_port()).start()
    nbdkit.append(server)
    src = open_source(server.url)
    status = gevent.spawn(src.extents, 0, src.size, Priority.BACKGROUND)
    gevent.sleep(0.2)  # the block status request is in the server
    t0 = time.monotonic()
    assert src.read(MiB, 4096, Priority.FOREGROUND) == image[MiB:MiB + 4096]
    assert time.monotonic() - t0 < 1.0
    assert sum(e.length for e in status.get(timeout=30)) == src.size
    src.close()
