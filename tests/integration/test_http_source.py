"""The HTTP(S) source against a real nginx: ranged reads, keep-alive, changed objects, TLS,
basic auth, and servers that misbehave."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
from gevent.server import StreamServer

from lazyiscsi.source import (
    Priority,
    SourceChanged,
    SourceConfigError,
    SourceError,
    SourceNotFound,
    SourceUnavailable,
    SourceUnreachable,
    open_source,
)
from lazyiscsi.source.http import open_http
from tests.integration.http_servers import Nginx
from tests.integration.peers import MiB, free_port, make_image


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Nginx, bytes]]:
    root = tmp_path / "www"
    root.mkdir()
    image = make_image(root / "disk.img", 8 * MiB)
    server = Nginx(root, tmp_path / "nginx")
    yield server, image
    server.stop()


def test_ranged_reads_match(site: tuple[Nginx, bytes]) -> None:
    server, image = site
    src = open_source(server.url("disk.img"))
    assert src.size == len(image) and "validator" in src.identity
    rnd = random.Random(3)

    def reads(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(30):
            off = r.randrange(len(image) - 1)
            n = r.randrange(1, min(MiB, len(image) - off) + 1)
            assert src.read(off, n, r.choice(list(Priority))) == image[off:off + n]

    gevent.joinall([gevent.spawn(reads, rnd.random()) for _ in range(6)], raise_error=True)
    assert src.extents(0, src.size)[0].length == src.size
    # 180 reads over at most 2 x 8 pooled connections (plus the probe's): keep-alive works
    assert server.connections_seen(requests=6 * 30) <= 17
    src.close()
    with pytest.raises(SourceUnavailable):
        src.read(0, 1)


def test_missing_object(site: tuple[Nginx, bytes]) -> None:
    server, _ = site
    with pytest.raises(SourceNotFound, match="HTTP 404"):
        open_source(server.url("nope.img"))


def test_changed_object_is_refused(site: tuple[Nginx, bytes], tmp_path: Path) -> None:
    server, image = site
    src = open_source(server.url("disk.img"))
    assert src.read(0, 4096) == image[:4096]
    path = tmp_path / "www" / "disk.img"
    make_image(path, 8 * MiB, seed=99)
    st = path.stat()
    os.utime(path, (st.st_atime + 10, st.st_mtime + 10))  # nginx's ETag is mtime-size
    with pytest.raises(SourceChanged, match="412"):
        src.read(0, 4096)
    with pytest.raises(SourceChanged):  # and for good, even where the old bytes are asked
        src.read(4096, 4096)
    src.close()


def test_stopped_server_is_unavailable(site: tuple[Nginx, bytes]) -> None:
    server, _ = site
    src = open_source(server.url("disk.img"), deadline=0.5)
    server.stop()
    with pytest.raises(SourceUnreachable):  # after its patience: two deadlines of redialling
        src.read(0, 4096)
    src.close()


def test_https_with_a_private_ca(tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    image = make_image(root / "disk.img", MiB)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    server = Nginx(root, tmp_path / "nginx", tls=(cert, key))
    try:
        with pytest.raises(SourceError, match=r"TLS|certificate"):
            open_http(server.url("disk.img"), timeout=5)  # not trusted by the system store
        src = open_http(server.url("disk.img"), timeout=5, cafile=str(cert))
        assert src.read(1000, 5000) == image[1000:6000]
        src.close()
    finally:
        server.stop()


def test_basic_auth_and_no_password_in_errors(tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    image = make_image(root / "disk.img", MiB)
    hashed = subprocess.run(["openssl", "passwd", "-apr1", "right-pw"], check=True, capture_output=True,
                            text=True).stdout.strip()
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"op:{hashed}\n")
    server = Nginx(root, tmp_path / "nginx", htpasswd=htpasswd)
    try:
        src = open_source(server.url("disk.img", "op:right-pw@"))
        assert src.read(0, 100) == image[:100]
        assert "right-pw" not in src.url and "right-pw" not in src.identity
        src.close()
        with pytest.raises(SourceError, match="access denied") as err:
            open_source(server.url("disk.img", "op:wrong-pw@"))
        assert "wrong-pw" not in str(err.value)
    finally:
        server.stop()


def test_server_without_range_support(tmp_path: Path) -> None:
    body = b"x" * 100000

    def handle(sock, _addr) -> None:  # type: ignore[no-untyped-def]
        sock.recv(65536)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        sock.close()

    server = StreamServer(("127.0.0.1", free_port()), handle)
    server.start()
    try:
        with pytest.raises(SourceError, match="ignores Range"):
            open_source(f"http://127.0.0.1:{server.server_port}/disk")
    finally:
        server.stop()


class RangeServer:
    """A server that answers byte ranges of ``body`` with the validator headers a test gives,
    and ignores every precondition (as a careless proxy or object store might): what the
    client itself must check. It records each request's headers."""

    def __init__(self, body: bytes, validators: dict[str, str]) -> None:
        self.body, self.validators = body, validators
        self.requests: list[dict[str, str]] = []
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/disk"

    def _handle(self, sock, _addr) -> None:  # type: ignore[no-untyped-def]
        f = sock.makefile("rb")
        while True:
            line = f.readline()
            if not line:
                return
            headers = {}
            while (h := f.readline().strip()):
                k, _, v = h.decode().partition(":")
                headers[k.strip().lower()] = v.strip()
            self.requests.append(headers)
            a, b = (int(x) for x in headers["range"].removeprefix("bytes=").split("-"))
            part = self.body[a:b + 1]
            extra = "".join(f"{k}: {v}\r\n" for k, v in self.validators.items())
            sock.sendall(f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(part)}\r\n"
                         f"Content-Range: bytes {a}-{b}/{len(self.body)}\r\n{extra}\r\n".encode() + part)

    def stop(self) -> None:
        self.server.stop()


def test_every_range_carries_if_match_and_every_206_is_checked() -> None:
    """Issue 10, defect 6: a changed object was caught only by a server honouring If-Range. Here
    the server ignores preconditions; the client sends If-Match on every range and notices the
    206's new ETag itself."""
    body = random.Random(5).randbytes(MiB)
    server = RangeServer(body, {"ETag": '"v1"', "Last-Modified": "Mon, 30 Nov 2026 10:00:00 GMT"})
    try:
        src = open_source(server.url)
        assert src.read(1000, 5000) == body[1000:6000]
        assert server.requests[-1]["if-match"] == '"v1"'
        server.validators["ETag"] = '"v2"'  # the object behind the URL was replaced
        with pytest.raises(SourceChanged, match='"v2"'):
            src.read(0, 4096)
        n = len(server.requests)
        with pytest.raises(SourceChanged):
            src.read(8192, 4096)
        assert len(server.requests) == n, "a changed source is not asked again"
        src.close()
    finally:
        server.stop()


def test_last_modified_is_the_weaker_fallback() -> None:
    body = random.Random(6).randbytes(MiB)
    server = RangeServer(body, {"ETag": 'W/"weak"', "Last-Modified": "Mon, 30 Nov 2026 10:00:00 GMT"})
    try:
        src = open_source(server.url)
        assert src.read(0, 100) == body[:100]
        assert server.requests[-1]["if-unmodified-since"] == "Mon, 30 Nov 2026 10:00:00 GMT"
        assert "if-match" not in server.requests[-1]
        server.validators["Last-Modified"] = "Mon, 30 Nov 2026 10:00:01 GMT"
        with pytest.raises(SourceChanged, match="last-modified"):
            src.read(0, 100)
        src.close()
    finally:
        server.stop()


@pytest.mark.parametrize("validators", [{}, {"ETag": 'W/"only-weak"'}])
def test_an_object_without_a_validator_is_refused(validators: dict[str, str]) -> None:
    server = RangeServer(bytes(MiB), validators)
    try:
        with pytest.raises(SourceConfigError, match="no strong ETag and no Last-Modified"):
            open_source(server.url)
    finally:
        server.stop()
