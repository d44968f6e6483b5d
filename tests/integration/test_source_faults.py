"""The fault-injection tier for the source clients: real nbdkit and nginx behind a proxy that goes
silent without a RST, resets, slows down and comes back (``faultproxy``). Issue 10, defect 3: a
silent path used to hang the copy for ever (no deadline, no keepalive, no redial)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import pytest

from lazyiscsi.source import Priority, SourceUnreachable, open_source
from lazyiscsi.source.base import PATIENCE
from tests.integration.faultproxy import FaultProxy, Mode
from tests.integration.http_servers import Nginx
from tests.integration.peers import MiB, Nbdkit, free_port, make_image

#: short deadlines keep the tier fast; every bound below is stated in deadlines
DEADLINE = 0.5


def wait_for(cond: Callable[[], bool], seconds: float = 30.0, what: str = "condition") -> None:
    """Wait for a condition (never a fixed sleep), failing with ``what`` after ``seconds``."""
    end = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        gevent.sleep(0.02)


@pytest.fixture(params=["nbd", "http"])
def path(request: pytest.FixtureRequest, tmp_path: Path,
         nbdkit: list[Nbdkit]) -> Iterator[tuple[str, FaultProxy, bytes]]:
    """(URL through the proxy, the proxy, the image) for a real NBD or HTTP server."""
    root = tmp_path / "www"
    root.mkdir()
    image = make_image(root / "disk.img", 16 * MiB)
    nginx = None
    if request.param == "nbd":
        server = Nbdkit(["file", str(root / "disk.img")], free_port()).start()
        nbdkit.append(server)
        proxy = FaultProxy(("127.0.0.1", server.port))
        url = f"nbd://127.0.0.1:{proxy.port}/"
    else:
        nginx = Nginx(root, tmp_path / "nginx")
        proxy = FaultProxy(("127.0.0.1", nginx.port))
        url = f"http://127.0.0.1:{proxy.port}/disk.img"
    yield url, proxy, image
    proxy.close()
    if nginx is not None:
        nginx.stop()


def test_proxy_silence_holds_bytes_and_reset_sends_rst(tmp_path: Path) -> None:
    """The proxy itself: silent keeps the connection open and delivers later; reset is a RST."""
    echo = socket.create_server(("127.0.0.1", 0))
    proxy = FaultProxy(("127.0.0.1", echo.getsockname()[1]))
    try:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        server, _ = echo.accept()
        proxy.set_mode(Mode.SILENT)
        client.sendall(b"held")
        server.settimeout(0.3)
        with pytest.raises(TimeoutError):
            server.recv(10)
        proxy.set_mode(Mode.PASS)
        server.settimeout(10)
        assert server.recv(10) == b"held"
        server.settimeout(0.3)
        proxy.lose()
        client.sendall(b"lost")
        with pytest.raises(TimeoutError):
            server.recv(10)
        fresh = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        server2, _ = echo.accept()
        fresh.sendall(b"new")
        assert server2.recv(10) == b"new"
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            client.recv(10)
    finally:
        proxy.close()
        echo.close()


@pytest.mark.parametrize("priority", list(Priority))
def test_reads_on_a_silent_path_are_resent_when_it_comes_back(
        path: tuple[str, FaultProxy, bytes], priority: Priority) -> None:
    """Reads in flight when the path goes silent and loses its connections: past the deadline
    each connection is dropped and redialled (a new connection reaches the proxy), and when the
    path comes back every read completes with the right bytes. Background reads wait however
    long it takes. Before issue 10 they waited for ever on the lost connection."""
    url, proxy, image = path
    src = open_source(url, deadline=DEADLINE)
    assert src.read(0, 4096, priority) == image[:4096]
    before = proxy.accepted
    proxy.set_mode(Mode.SILENT)
    proxy.lose()  # and its connections never recover: only a redial gets through
    pending = [gevent.spawn(src.read, i * MiB, MiB, priority) for i in range(8)]
    wait_for(lambda: proxy.accepted > before, 20 * DEADLINE, "a redial after the deadline")
    if PATIENCE[priority] is None:
        gevent.sleep(0)
        assert not any(g.ready() for g in pending)
    proxy.set_mode(Mode.PASS)
    back = time.monotonic()
    gevent.joinall(pending, timeout=60)
    if PATIENCE[priority] is None:
        assert all(g.successful() for g in pending), [g.exception for g in pending]
        assert b"".join(g.value for g in pending) == image[:8 * MiB]
        assert time.monotonic() - back < 4 * DEADLINE + 2, "resumed within a redial"
    else:
        # a guest's read gives up on its own with the typed reason, or got its bytes
        for i, g in enumerate(pending):
            assert g.ready()
            assert isinstance(g.exception, SourceUnreachable) or g.value == image[i * MiB:(i + 1) * MiB]
    assert src.read(3 * MiB, MiB, priority) == image[3 * MiB:4 * MiB]  # and it serves again
    src.close()


def test_a_foreground_read_gives_up_with_a_typed_reason(path: tuple[str, FaultProxy, bytes]) -> None:
    """On a path silent for good, a guest's read ends with SourceUnreachable after its patience
    (two deadlines, plus the watchdog's granularity), not never."""
    url, proxy, _ = path
    src = open_source(url, deadline=DEADLINE)
    proxy.set_mode(Mode.SILENT)
    t0 = time.monotonic()
    with pytest.raises(SourceUnreachable), gevent.Timeout(30):
        src.read(5 * MiB, 65536, Priority.FOREGROUND)
    patience = PATIENCE[Priority.FOREGROUND]
    assert patience is not None
    assert time.monotonic() - t0 < (patience + 1) * DEADLINE + 1.0
    src.close()


def test_a_slow_path_that_still_moves_is_not_taken_for_dead(path: tuple[str, FaultProxy, bytes]) -> None:
    """A 2 MiB read at 1 MB/s takes 4 deadlines; bytes keep coming, so the connection lives:
    no redial, no resend (a fixed per-request timeout would resend it for ever)."""
    url, proxy, image = path
    src = open_source(url, deadline=DEADLINE)
    src.read(0, 4096, Priority.BACKGROUND)  # the background connection (NBD) exists before
    before = proxy.accepted
    proxy.set_mode(Mode.SLOW, rate=1_000_000)
    t0 = time.monotonic()
    with gevent.Timeout(60):
        assert src.read(MiB, 2 * MiB, Priority.BACKGROUND) == image[MiB:3 * MiB]
    assert time.monotonic() - t0 > 3 * DEADLINE  # it was slow indeed
    assert proxy.accepted == before
    src.close()


def test_reads_survive_a_reset(path: tuple[str, FaultProxy, bytes]) -> None:
    url, proxy, image = path
    src = open_source(url, deadline=DEADLINE)
    assert src.read(0, 4096) == image[:4096]
    proxy.reset()
    with gevent.Timeout(30):
        assert src.read(MiB, MiB, Priority.BACKGROUND) == image[MiB:2 * MiB]
        assert src.read(2 * MiB, 4096) == image[2 * MiB:2 * MiB + 4096]
    src.close()


def test_source_sockets_have_tcp_keepalive(path: tuple[str, FaultProxy, bytes]) -> None:
    """An idle connection whose path died is found by keepalive probes, before a request is
    sent into it: every source socket has SO_KEEPALIVE with probes within a few deadlines."""
    url, _, _ = path
    src = open_source(url, deadline=3.0)
    src.read(0, 4096, Priority.BACKGROUND)
    socks = _sockets_of(src)
    assert socks
    for s in socks:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 3
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 1
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    src.close()


def _sockets_of(src: object) -> list[socket.socket]:
    """The open sockets of a source (its connections are private; the test looks anyway)."""
    found = []
    for channel in getattr(src, "_channels", {}).values():
        conn = channel._conn
        if conn is not None and conn.alive:
            found.append(conn.sock)
    for pool in getattr(src, "_pools", {}).values():
        found.extend(c.sock for c in list(pool.queue) if c.sock is not None)
    return found
