"""HTTP(S) sources: an object served by a web server or object store with Range support.

Each read is one ``GET`` with ``Range: bytes=a-b`` (RFC 9110, 14.2) over a keep-alive
connection from a pool, one pool per priority so that a guest's read never waits for a
connection the copier holds. The stdlib's HTTP parser runs over gevent sockets (``connect`` is
overridden), so nothing is monkey-patched.

Every ranged read carries ``If-Range`` with the validator seen at open (RFC 9110, 13.1.5): if
the object changed, the server answers 200 with the whole new object instead of 206, and we
refuse to return bytes of a disk other than the one the cache was started from.
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import ssl
from urllib.parse import unquote, urlsplit

import gevent.lock
import gevent.queue
import structlog
from gevent import socket as gsocket

from lazyiscsi.source.base import (
    Extent,
    Priority,
    SourceConfigError,
    SourceError,
    SourceNotFound,
    SourceProtocolError,
    SourceReadError,
    SourceUnavailable,
    fingerprint,
    sample_ranges,
)
from lazyiscsi.source.url import redact

log = structlog.get_logger("lazyiscsi.source.http")

POOL_SIZE = 8
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class _Conn(http.client.HTTPConnection):
    def connect(self) -> None:
        self.sock = gsocket.create_connection((self.host, self.port), self.timeout)
        self.sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)


class _TlsConn(_Conn):
    def __init__(self, host: str, port: int | None, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout)
        self._context = context

    def connect(self) -> None:
        super().connect()
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)


def _tls_context(cafile: str | None) -> ssl.SSLContext:
    from gevent import ssl as gssl

    try:
        return gssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as e:
        raise SourceConfigError(f"CA file {cafile!r}: cannot load ({e})") from None


class HttpSource:
    """A read-only object over HTTP(S) with Range support."""

    def __init__(self, url: str, *, timeout: float, cafile: str | None = None) -> None:
        parts = urlsplit(url)
        self.url = redact(url)
        if not parts.hostname:
            raise SourceConfigError(f"source URL {self.url!r}: no host")
        try:
            port = parts.port
        except ValueError:
            raise SourceConfigError(f"source URL {self.url!r}: bad port") from None
        self._host, self._port = parts.hostname, port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._timeout = timeout
        self._tls = _tls_context(cafile or os.environ.get("LAZYISCSI_CA_FILE")) \
            if parts.scheme == "https" else None
        self._auth: str | None = None
        if parts.username is not None:
            cred = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self._auth = "Basic " + base64.b64encode(cred.encode()).decode()
        self._pools: dict[Priority, gevent.queue.LifoQueue] = {
            p: gevent.queue.LifoQueue(POOL_SIZE) for p in Priority}
        self._slots = {p: gevent.lock.BoundedSemaphore(POOL_SIZE) for p in Priority}
        self._closed = False
        self._validator: str | None = None
        self.size, self.identity = self._probe()

    # -- open ------------------------------------------------------------------------------

    def _probe(self) -> tuple[int, str]:
        """Size and validator from a one-byte ranged GET: it also proves Range support."""
        status, headers, _ = self._request(Priority.FOREGROUND, {"Range": "bytes=0-0"})
        if status == 200:
            raise SourceError(f"{self.url}: the server ignores Range requests; an HTTP source needs "
                              "a server that answers byte ranges (206)")
        if status != 206:
            raise self._status_error(status, "open")
        m = _CONTENT_RANGE.match(headers.get("content-range", ""))
        if not m or m.group(3) == "*":
            raise SourceProtocolError(f"{self.url}: no object size in Content-Range "
                                      f"{headers.get('content-range')!r}")
        size = int(m.group(3))
        if size == 0:
            raise SourceConfigError(f"{self.url}: the object is empty")
        etag = headers.get("etag")
        modified = headers.get("last-modified")
        if etag and not etag.startswith("W/"):
            self._validator = etag  # a strong validator: If-Range may use it (RFC 9110, 13.1.5)
        elif modified:
            self._validator = modified
        if self._validator:
            return size, fingerprint("http", size, [], extra=f"validator={self._validator}")
        samples = [self._read(off, n, Priority.FOREGROUND, size) for off, n in sample_ranges(size)]
        return size, fingerprint("http", size, samples)

    # -- the Source interface ----------------------------------------------------------------

    def read(self, offset: int, length: int, priority: Priority = Priority.FOREGROUND) -> bytes:
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise SourceProtocolError(f"read [{offset}, +{length}) outside the object ({self.size} bytes)")
        return self._read(offset, length, priority, self.size)

    def extents(self, offset: int, length: int, priority: Priority = Priority.FOREGROUND) -> list[Extent]:
        return [Extent(offset, length, False)]  # HTTP cannot say where holes are

    def close(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            while not pool.empty():
                pool.get_nowait().close()

    # -- internals ---------------------------------------------------------------------------

    def _read(self, offset: int, length: int, priority: Priority, size: int) -> bytes:
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        if self._validator:
            headers["If-Range"] = self._validator
        status, reply, body = self._request(priority, headers)
        if status == 200 or status == 412:
            raise SourceProtocolError(f"{self.url}: the source changed since it was opened "
                                      "(validator no longer matches); refusing its new bytes")
        if status != 206:
            raise self._status_error(status, f"read at {offset}")
        m = _CONTENT_RANGE.match(reply.get("content-range", ""))
        if not m or (int(m.group(1)), int(m.group(2))) != (offset, offset + length - 1) \
                or (m.group(3) != "*" and int(m.group(3)) != size):
            raise SourceProtocolError(f"{self.url}: asked bytes {offset}-{offset + length - 1}, got "
                                      f"Content-Range {reply.get('content-range')!r}")
        if len(body) != length:
            raise SourceProtocolError(f"{self.url}: {len(body)} bytes for a {length}-byte range")
        return body

    def _request(self, priority: Priority, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        """One GET on a pooled connection; a reused connection the server closed while idle is
        replaced once (the request is idempotent)."""
        if self._closed:
            raise SourceUnavailable(f"{self.url}: closed")
        if self._auth:
            headers["Authorization"] = self._auth
        with self._slots[priority]:
            pool = self._pools[priority]
            conn = pool.get_nowait() if not pool.empty() else None
            for attempt in (0, 1):
                reused = conn is not None
                if conn is None:
                    conn = self._connect()
                try:
                    conn.request("GET", self._path, headers=headers)
                    resp = conn.getresponse()
                    if resp.status == 200:
                        # a whole object where a range was asked (no Range support, or changed
                        # under If-Range): never download it; the caller refuses it anyway
                        conn.close()
                        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, b""
                    body = resp.read()
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                    conn.close()
                    conn = None
                    if reused and attempt == 0:
                        continue
                    raise SourceUnavailable(f"{self.url}: connection lost ({e.__class__.__name__})") from None
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    log.warning("source_request_failed", url=self.url, error=str(e) or type(e).__name__)
                    raise SourceUnavailable(f"{self.url}: {e.__class__.__name__}: {e}") from None
                if resp.will_close:
                    conn.close()
                else:
                    pool.put_nowait(conn)
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
        raise AssertionError("unreachable")

    def _connect(self) -> _Conn:
        if self._tls is not None:
            return _TlsConn(self._host, self._port, self._timeout, self._tls)
        return _Conn(self._host, self._port, timeout=self._timeout)

    def _status_error(self, status: int, what: str) -> SourceError:
        if status in (404, 410):
            return SourceNotFound(f"{self.url}: no such object (HTTP {status})")
        if status in (401, 403):
            return SourceError(f"{self.url}: access denied (HTTP {status})")
        if status >= 500:
            return SourceReadError(f"{self.url}: server error on {what} (HTTP {status})")
        return SourceProtocolError(f"{self.url}: unexpected HTTP {status} on {what}")


def open_http(url: str, *, timeout: float = 30.0, cafile: str | None = None) -> HttpSource:
    try:
        return HttpSource(url, timeout=timeout, cafile=cafile)
    except ssl.SSLError as e:
        raise SourceError(f"{redact(url)}: TLS failed ({e.reason or e})") from None
