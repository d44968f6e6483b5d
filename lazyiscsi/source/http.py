"""HTTP(S) sources: an object served by a web server or object store with Range support.

Each read is one ``GET`` with ``Range: bytes=a-b`` (RFC 9110, 14.2) over a keep-alive
connection from a pool, one pool per priority so that a guest's read never waits for a
connection the copier holds. The stdlib's HTTP parser runs over gevent sockets (``connect`` is
overridden), so nothing is monkey-patched.

Identity: the object's size and its validator, seen at open. A strong ``ETag`` (not ``W/``) is
the validator of choice: it changes with every change of the bytes (RFC 9110, 8.8.3), and every
ranged read carries it in ``If-Match`` (13.1.1), so a server answers 412 instead of bytes of
another object, and every 206's own ``ETag`` is compared too (a server or a cache in between that
ignores If-Match). With no strong ETag, ``Last-Modified`` is the weaker fallback, sent as
``If-Unmodified-Since`` (13.1.4) and compared on every 206: it has a one-second granularity, so
an object replaced twice within the second it was opened in may go unnoticed (8.8.2.2); a
warning says so at open. With neither, the source is refused: nothing could tell that the
object changed mid-copy, and the cache would silently mix two disks. A change stops every later
read with ``SourceChanged`` (the store says so in one ``source_changed`` event). What the
validator cannot guard: a server that keeps the same ETag for different bytes (a misconfigured
cluster whose nodes compute ETags differently is the opposite case and is refused as a change).

A request's deadline is the socket timeout of each read from the connection (RFC 9112 has no
request id, so one request per connection at a time): past it the connection is closed and
the request sent again on a new one, for the priority's ``PATIENCE``.
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import ssl
import time
from urllib.parse import unquote, urlsplit

import gevent
import gevent.lock
import gevent.queue
import structlog
from gevent import socket as gsocket

from lazyiscsi.source.base import (
    DEFAULT_REQUEST_DEADLINE,
    PATIENCE,
    Extent,
    Priority,
    SourceChanged,
    SourceConfigError,
    SourceError,
    SourceNotFound,
    SourceProtocolError,
    SourceReadError,
    SourceUnavailable,
    SourceUnreachable,
    fingerprint,
    redial_delay_cap,
    set_keepalive,
)
from lazyiscsi.source.url import redact

log = structlog.get_logger("lazyiscsi.source.http")

POOL_SIZE = 8
#: the precondition header that carries each kind of validator (RFC 9110, 13.1.1 and 13.1.4)
_PRECONDITION = {"etag": "If-Match", "last-modified": "If-Unmodified-Since"}
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class _Conn(http.client.HTTPConnection):
    """``timeout`` is the request deadline: the connect and every read from the socket."""

    def connect(self) -> None:
        self.sock = gsocket.create_connection((self.host, self.port), self.timeout)
        self.sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        assert self.timeout is not None
        set_keepalive(self.sock, self.timeout)


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

    def __init__(self, url: str, *, timeout: float, deadline: float = DEFAULT_REQUEST_DEADLINE,
                 cafile: str | None = None, source_id: str | None = None) -> None:
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
        self._deadline = deadline
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
        #: the header a 206 must repeat unchanged, and its value (see the module docstring)
        self._validator: tuple[str, str] | None = None
        self._changed: str | None = None
        self.size, self.identity = self._probe(timeout, source_id)

    # -- open ------------------------------------------------------------------------------

    def _probe(self, timeout: float, source_id: str | None) -> tuple[int, str]:
        """Size and validator from a one-byte ranged GET: it also proves Range support."""
        status, headers, _ = self._request(Priority.FOREGROUND, {"Range": "bytes=0-0"}, timeout)
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
            self._validator = ("etag", etag)
        elif modified:
            self._validator = ("last-modified", modified)
            log.warning("source_weak_validator", url=self.url, last_modified=modified,
                        hint="no strong ETag: a change within one second of the open may go "
                             "unnoticed; prefer a server that sends a strong ETag")
        else:
            raise SourceConfigError(
                f"{self.url}: the server sends no strong ETag and no Last-Modified, so a change to "
                "the object during the copy could not be noticed and the cache would mix two "
                "disks; serve it from a server that sends validators (nginx, S3 and most object "
                "stores do)")
        extra = f"validator={self._validator[1]}" + (f":id={source_id}" if source_id else "")
        return size, fingerprint("http", size, [], extra=extra)

    # -- the Source interface ----------------------------------------------------------------

    def read(self, offset: int, length: int, priority: Priority = Priority.FOREGROUND) -> bytes:
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise SourceProtocolError(f"read [{offset}, +{length}) outside the object ({self.size} bytes)")
        return self._read(offset, length, priority)

    def extents(self, offset: int, length: int, priority: Priority = Priority.FOREGROUND) -> list[Extent]:
        return [Extent(offset, length, False)]  # HTTP cannot say where holes are

    def close(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            while not pool.empty():
                pool.get_nowait().close()

    # -- internals ---------------------------------------------------------------------------

    def _read(self, offset: int, length: int, priority: Priority) -> bytes:
        if self._changed:
            raise SourceChanged(self._changed)
        assert self._validator is not None
        header, value = self._validator
        headers = {"Range": f"bytes={offset}-{offset + length - 1}",
                   _PRECONDITION[header]: value}
        deadlines = PATIENCE[priority]
        status, reply, body = self._request(priority, headers,
                                            None if deadlines is None else deadlines * self._deadline)
        if status == 412:
            self._stop_changed(f"the server answers 412 to {_PRECONDITION[header]}: {value}")
        if status in (200, 206) and reply.get(header, value) != value:
            self._stop_changed(f"{header} is now {reply.get(header)!r}, was {value!r}")
        if status == 200:
            raise SourceProtocolError(f"{self.url}: the server answered a range request with the "
                                      "whole object")
        if status != 206:
            raise self._status_error(status, f"read at {offset}")
        m = _CONTENT_RANGE.match(reply.get("content-range", ""))
        if not m or (int(m.group(1)), int(m.group(2))) != (offset, offset + length - 1) \
                or (m.group(3) != "*" and int(m.group(3)) != self.size):
            raise SourceProtocolError(f"{self.url}: asked bytes {offset}-{offset + length - 1}, got "
                                      f"Content-Range {reply.get('content-range')!r}")
        if len(body) != length:
            raise SourceProtocolError(f"{self.url}: {len(body)} bytes for a {length}-byte range")
        return body

    def _stop_changed(self, why: str) -> None:
        """The object is not the one the cache was started from: refuse it from now on."""
        if self._changed is None:
            self._changed = (f"{self.url}: the source changed since it was opened ({why}); "
                             "refusing its bytes, which would mix two disks")
        raise SourceChanged(self._changed)

    def _request(self, priority: Priority, headers: dict[str, str],
                 patience: float | None) -> tuple[int, dict[str, str], bytes]:
        """One GET on a pooled connection, sent again on a new connection whenever one fails
        (refused, reset, or silent past the deadline) until ``patience`` runs out (None: until
        closed). The first resend goes at once: a kept-alive connection the server closed
        while idle is the common case. The request is idempotent."""
        if self._auth:
            headers["Authorization"] = self._auth
        give_up = None if patience is None else time.monotonic() + patience
        delay = 0.0
        with self._slots[priority]:
            pool = self._pools[priority]
            while True:
                if self._closed:  # closed while this request waited to be resent
                    raise SourceUnavailable(f"{self.url}: closed")
                conn = pool.get_nowait() if not pool.empty() else self._connect()
                try:
                    conn.request("GET", self._path, headers=headers)
                    resp = conn.getresponse()
                    if resp.status == 200:
                        # a whole object where a range was asked: never download it; the
                        # caller refuses it anyway
                        conn.close()
                        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, b""
                    body = resp.read()
                except ssl.SSLCertVerificationError:
                    conn.close()
                    raise  # no retry makes a certificate trusted; open_http says so
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    if self._closed:
                        raise SourceUnavailable(f"{self.url}: closed") from None
                    why = f"{e.__class__.__name__}: {e}" if str(e) else e.__class__.__name__
                    if isinstance(e, TimeoutError):
                        why = f"no answer within the {self._deadline:g} s deadline"
                        log.warning("source_request_deadline", url=self.url, deadline_s=self._deadline,
                                    hint="the path may be dead; redialling and resending")
                    if give_up is not None and time.monotonic() + delay >= give_up:
                        raise SourceUnreachable(f"{self.url}: no answer within {patience:g} s "
                                                f"({why})") from None
                    log.warning("source_request_retry", url=self.url, error=why, retry_in_s=round(delay, 2))
                    gevent.sleep(delay)
                    delay = min(max(0.1, delay * 2), redial_delay_cap(self._deadline))
                    continue
                if resp.will_close:
                    conn.close()
                else:
                    pool.put_nowait(conn)
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body

    def _connect(self) -> _Conn:
        if self._tls is not None:
            return _TlsConn(self._host, self._port, self._deadline, self._tls)
        return _Conn(self._host, self._port, timeout=self._deadline)

    def _status_error(self, status: int, what: str) -> SourceError:
        if status in (404, 410):
            return SourceNotFound(f"{self.url}: no such object (HTTP {status})")
        if status in (401, 403):
            return SourceError(f"{self.url}: access denied (HTTP {status})")
        if status >= 500:
            return SourceReadError(f"{self.url}: server error on {what} (HTTP {status})")
        return SourceProtocolError(f"{self.url}: unexpected HTTP {status} on {what}")


def open_http(url: str, *, timeout: float = 30.0, deadline: float = DEFAULT_REQUEST_DEADLINE,
              cafile: str | None = None, source_id: str | None = None) -> HttpSource:
    try:
        return HttpSource(url, timeout=timeout, deadline=deadline, cafile=cafile, source_id=source_id)
    except ssl.SSLError as e:
        raise SourceError(f"{redact(url)}: TLS failed ({e.reason or e})") from None
