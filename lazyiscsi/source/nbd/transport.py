"""The NBD transport: the only part of the NBD client with sockets.

A ``Connection`` is one negotiated socket with one reader greenlet and a table of requests in
flight, matched by cookie. When anything goes wrong with the stream (EOF, reset, a protocol
violation) the connection dies whole: every request in flight fails with ``ConnectionLost``.

A ``Channel`` is a connection that comes back: callers ask it for a connection, and the first
one to find it dead reconnects with exponential backoff while the others wait. Requests that
died with a connection are simply sent again on the next one: every request this client makes
(READ, BLOCK_STATUS) is idempotent. A caller that gives up (a gevent.Timeout) abandons its
cookie; the reader then swallows the late reply.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent
import gevent.lock
import structlog
from gevent import socket as gsocket
from gevent.event import AsyncResult

from lazyiscsi.source.base import (
    Extent,
    SourceError,
    SourceProtocolError,
    SourceReadError,
    SourceUnavailable,
)
from lazyiscsi.source.nbd import replies
from lazyiscsi.source.nbd.constants import (
    SIMPLE_HEADER,
    SIMPLE_REPLY_MAGIC,
    Chunk,
    Cmd,
)
from lazyiscsi.source.nbd.handshake import Handshake, Negotiated

log = structlog.get_logger("lazyiscsi.source.nbd")

#: How a transport reaches the server: returns a connected socket. The seam where nbds://
#: will upgrade to TLS after NBD_OPT_STARTTLS.
Dialer = Callable[[float], socket.socket]


class ConnectionLost(Exception):
    """The connection a request was on died; the request may be sent again."""


def tcp_dialer(host: str, port: int) -> Dialer:
    def dial(timeout: float) -> socket.socket:
        sock = gsocket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    return dial


def unix_dialer(path: str) -> Dialer:
    def dial(timeout: float) -> socket.socket:
        sock = gsocket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return sock

    return dial


@dataclass(eq=False)
class _Request:
    cmd: Cmd
    offset: int
    length: int
    buf: bytearray | None = None
    filled: int = 0
    extents: list[Extent] = field(default_factory=list)
    error: SourceError | None = None
    result: AsyncResult = field(default_factory=AsyncResult)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionLost("the server closed the connection")
        view = view[n:]


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return bytes(buf)


class Connection:
    """One negotiated NBD connection with many requests in flight."""

    def __init__(self, sock: socket.socket, info: Negotiated, label: str) -> None:
        self.sock = sock
        self.info = info
        self.label = label
        self.alive = True
        self._cookies = itertools.count(1)
        self._inflight: dict[int, _Request] = {}
        self._abandoned: dict[int, _Request] = {}
        self._send_lock = gevent.lock.Semaphore()
        self._reader = gevent.spawn(self._read_loop)

    @classmethod
    def open(cls, dial: Dialer, export: str, timeout: float, label: str) -> Connection:
        sock = dial(timeout)
        try:
            hs = Handshake(export)
            while hs.result is None:
                out = hs.data_to_send()
                if out:
                    sock.sendall(out)
                data = sock.recv(65536)
                if not data:
                    raise SourceUnavailable("the server closed the connection during the handshake")
                hs.receive(data)
            sock.settimeout(None)  # the transmission phase has no fixed deadline; callers do
            return cls(sock, hs.result, label)
        except BaseException:
            sock.close()
            raise

    def call(self, cmd: Cmd, offset: int, length: int) -> _Request:
        """Send one request and wait for its whole reply. Raises ``ConnectionLost`` if the
        connection dies first, the request's ``SourceError`` if the server refused it."""
        if not self.alive:
            raise ConnectionLost("connection is closed")
        req = _Request(cmd, offset, length, bytearray(length) if cmd is Cmd.READ else None)
        cookie = next(self._cookies)
        self._inflight[cookie] = req
        try:
            with self._send_lock:
                self.sock.sendall(replies.request(cmd, cookie, offset, length))
            req.result.get()
        except OSError as e:
            self.kill(f"send failed: {e}")
            raise ConnectionLost(str(e)) from None
        finally:
            if self._inflight.pop(cookie, None) is not None and not req.result.ready():
                # given up (timeout): the reply may still come and must be read past
                self._abandoned[cookie] = req
        if req.error is not None:
            raise req.error
        return req

    def kill(self, why: str) -> None:
        if not self.alive:
            return
        self.alive = False
        for req in list(self._inflight.values()):
            req.result.set_exception(ConnectionLost(why))
        self._inflight.clear()
        self._abandoned.clear()
        with contextlib.suppress(OSError):
            self.sock.close()
        if gevent.getcurrent() is not self._reader:
            self._reader.kill(block=False)

    def disconnect(self) -> None:
        """NBD_CMD_DISC, then close: the polite way to leave (NBD document, "Terminating")."""
        if self.alive:
            with contextlib.suppress(OSError), self._send_lock:
                self.sock.sendall(replies.request(Cmd.DISC, 0, 0, 0))
        self.kill("closed")

    # -- the reader ------------------------------------------------------------------------

    def _read_loop(self) -> None:
        try:
            while True:
                first = _recv(self.sock, 4)
                if replies.magic_of(first) == SIMPLE_REPLY_MAGIC:
                    self._on_simple(first + _recv(self.sock, SIMPLE_HEADER - 4))
                else:
                    self._on_chunk(replies.parse_chunk_header(_recv(self.sock, 16)))
        except ConnectionLost as e:
            self._die(str(e))
        except SourceProtocolError as e:
            log.error("source_protocol_error", connection=self.label, error=str(e))
            self._die(f"protocol violation: {e}")
        except OSError as e:
            self._die(e.strerror or str(e))

    def _die(self, why: str) -> None:
        if self.alive:
            log.warning("source_disconnected", connection=self.label, error=why)
        self.kill(why)

    def _lookup(self, cookie: int) -> tuple[_Request, bool]:
        req = self._inflight.get(cookie)
        if req is not None:
            return req, False
        req = self._abandoned.get(cookie)
        if req is None:
            raise SourceProtocolError(f"reply for unknown cookie {cookie}")
        return req, True

    def _on_simple(self, header16: bytes) -> None:
        h = replies.parse_simple(header16)
        req, abandoned = self._lookup(h.cookie)
        if self.info.structured and req.cmd is Cmd.READ and h.error == 0:
            raise SourceProtocolError("simple reply to a read after structured replies were agreed")
        if h.error:
            req.error = SourceReadError(f"the server failed {req.cmd.name} at {req.offset} "
                                        f"({req.length} bytes): {replies.errno_name(h.error)}")
        elif req.cmd is Cmd.READ:
            assert req.buf is not None
            _recv_into(self.sock, memoryview(req.buf))
            req.filled = req.length
        self._finish(h.cookie, req, abandoned)

    def _on_chunk(self, h: replies.ChunkHeader) -> None:
        req, abandoned = self._lookup(h.cookie)
        replies.check_chunk_for(req.cmd, h)
        if h.type == Chunk.OFFSET_DATA:
            pos, n = replies.data_range(h, _recv(self.sock, 8), req.offset, req.length)
            assert req.buf is not None
            _recv_into(self.sock, memoryview(req.buf)[pos:pos + n])
            req.filled += n
        elif h.type == Chunk.OFFSET_HOLE:
            pos, n = replies.hole_range(h, _recv(self.sock, h.length), req.offset, req.length)
            assert req.buf is not None
            req.buf[pos:pos + n] = bytes(n)  # a retried request may reuse nothing: explicit
            req.filled += n
        elif h.type == Chunk.BLOCK_STATUS:
            ctx = self.info.meta_context_id
            if ctx is None:
                raise SourceProtocolError("block status without a negotiated context")
            req.extents = replies.parse_block_status(_recv(self.sock, h.length), ctx, req.offset,
                                                     req.length)
        elif h.is_error:
            error, msg = replies.parse_error(h, _recv(self.sock, h.length))
            req.error = SourceReadError(f"the server failed {req.cmd.name} at {req.offset} "
                                        f"({req.length} bytes): {replies.errno_name(error)}"
                                        + (f" ({msg})" if msg else ""))
        if h.done:
            if (req.cmd is Cmd.READ and req.error is None and req.filled != req.length):
                raise SourceProtocolError(f"read at {req.offset} answered {req.filled} of "
                                          f"{req.length} bytes")
            if req.cmd is Cmd.BLOCK_STATUS and req.error is None and not req.extents:
                raise SourceProtocolError("block status reply without extents")
            self._finish(h.cookie, req, abandoned)

    def _finish(self, cookie: int, req: _Request, abandoned: bool) -> None:
        if abandoned:
            del self._abandoned[cookie]
        else:
            req.result.set(None)


class Channel:
    """A connection that reconnects: what one priority class of requests goes through."""

    def __init__(self, dial: Dialer, export: str, label: str, *, timeout: float,
                 first: Connection | None = None) -> None:
        self._dial = dial
        self._export = export
        self._label = label
        self._timeout = timeout
        self._conn = first
        self._lock = gevent.lock.Semaphore()
        self._closed = False

    def call(self, cmd: Cmd, offset: int, length: int) -> _Request:
        """Send a request, resending it on a new connection as often as connections die."""
        while True:
            conn = self._connection()
            try:
                return conn.call(cmd, offset, length)
            except ConnectionLost:
                if self._closed:
                    raise SourceUnavailable("closed") from None

    def _connection(self) -> Connection:
        conn = self._conn
        if conn is not None and conn.alive:
            return conn
        with self._lock:  # one greenlet reconnects, the rest wait for it
            if self._conn is not None and self._conn.alive:
                return self._conn
            delay = 0.1
            while True:
                if self._closed:
                    raise SourceUnavailable("closed")
                try:
                    self._conn = Connection.open(self._dial, self._export, self._timeout, self._label)
                    log.info("source_connected", connection=self._label)
                    return self._conn
                except (OSError, SourceUnavailable) as e:
                    wait = delay * random.uniform(0.75, 1.25)
                    log.warning("source_reconnect", connection=self._label, error=str(e),
                                retry_in_s=round(wait, 2))
                    gevent.sleep(wait)
                    delay = min(delay * 2, 5.0)

    def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.disconnect()

