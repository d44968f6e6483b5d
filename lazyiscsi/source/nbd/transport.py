"""The NBD transport: the only part of the NBD client with sockets.

A ``Connection`` is one negotiated socket with one reader greenlet and a table of requests in
flight, matched by cookie. When anything goes wrong with the stream (EOF, reset, a protocol
violation) the connection dies whole: every request in flight fails with ``ConnectionLost``.

A connection that goes silent without a RST (a WAN path that died) is found by its watchdog:
when a request has waited ``deadline`` seconds and the connection has delivered no byte for as
long, the connection is killed like one that was reset. Every byte received restarts the clock,
so a slow link still moving is never mistaken for a dead one; the price is that a server that
keeps answering other requests but never one is not caught (that is a server bug, not a path).
TCP keepalive (``base.set_keepalive``) covers a dead connection with nothing in flight.

A ``Channel`` is a connection that comes back: callers ask it for a connection, and the first
one to find it dead reconnects with exponential backoff (at most half a deadline apart) while
the others wait. Requests that died with a connection are simply sent again on the next one:
every request this client makes (READ, BLOCK_STATUS) is idempotent. A request gives up after its
``patience`` with ``SourceUnreachable``. A caller that gives up (a gevent.Timeout) abandons its
cookie; the reader then swallows the late reply.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent
import gevent.lock
import structlog
from gevent import socket as gsocket
from gevent.event import AsyncResult

from lazyiscsi.source.base import (
    SourceError,
    SourceProtocolError,
    SourceReadError,
    SourceUnavailable,
    SourceUnreachable,
    redial_delay_cap,
    set_keepalive,
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
    #: block status: the runs of each metadata context, by context name
    status: dict[str, list[replies.Status]] = field(default_factory=dict)
    error: SourceError | None = None
    result: AsyncResult = field(default_factory=AsyncResult)
    sent: float = 0.0  # time.monotonic() when it was handed to the socket


class Connection:
    """One negotiated NBD connection with many requests in flight."""

    def __init__(self, sock: socket.socket, info: Negotiated, label: str, deadline: float) -> None:
        self.sock = sock
        self.info = info
        self.label = label
        self.deadline = deadline
        self.alive = True
        self._names = {ctx: name for name, ctx in info.contexts.items()}
        self._cookies = itertools.count(1)
        self._inflight: dict[int, _Request] = {}
        self._abandoned: dict[int, _Request] = {}
        self._send_lock = gevent.lock.Semaphore()
        self._last_rx = time.monotonic()
        self._reader = gevent.spawn(self._read_loop)
        self._watchdog = gevent.spawn(self._watch)

    @classmethod
    def open(cls, dial: Dialer, export: str, timeout: float, label: str, deadline: float,
             bitmap: str | None = None) -> Connection:
        """Dial and negotiate (with the dirty bitmap's context too, when ``bitmap`` is named);
        ``timeout`` bounds the connect and each handshake read."""
        sock = dial(timeout)
        try:
            set_keepalive(sock, deadline)
            hs = Handshake(export, bitmap=bitmap)
            while hs.result is None:
                out = hs.data_to_send()
                if out:
                    sock.sendall(out)
                data = sock.recv(65536)
                if not data:
                    raise SourceUnavailable("the server closed the connection during the handshake")
                hs.receive(data)
            sock.settimeout(None)  # the transmission phase: the watchdog keeps the deadline
            return cls(sock, hs.result, label, deadline)
        except BaseException:
            sock.close()
            raise

    def call(self, cmd: Cmd, offset: int, length: int) -> _Request:
        """Send one request and wait for its whole reply. Raises ``ConnectionLost`` if the
        connection dies first, the request's ``SourceError`` if the server refused it."""
        if not self.alive:
            raise ConnectionLost("connection is closed")
        req = _Request(cmd, offset, length, bytearray(length) if cmd is Cmd.READ else None)
        if cmd is Cmd.BLOCK_STATUS and not self._names:
            # NBD document: a client "MUST NOT send NBD_CMD_BLOCK_STATUS unless ... the server
            # returned at least one metadata context": no runs for any context, said at once
            return req
        cookie = next(self._cookies)
        self._inflight[cookie] = req
        try:
            with self._send_lock:
                req.sent = time.monotonic()
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
        for g in (self._reader, self._watchdog):
            if gevent.getcurrent() is not g:
                g.kill(block=False)

    def disconnect(self) -> None:
        """NBD_CMD_DISC, then close: the polite way to leave (NBD document, "Terminating")."""
        if self.alive:
            # bounded: on a silent path with a full send buffer, leaving must not hang
            with contextlib.suppress(OSError), gevent.Timeout(self.deadline, False), self._send_lock:
                self.sock.sendall(replies.request(Cmd.DISC, 0, 0, 0))
        self.kill("closed")

    # -- the watchdog ----------------------------------------------------------------------

    def overdue(self, now: float) -> bool:
        """Whether a request has waited a whole deadline with the connection silent as long."""
        if not self._inflight:
            return False
        oldest = min(req.sent or now for req in self._inflight.values())
        return now - max(oldest, self._last_rx) >= self.deadline

    def _watch(self) -> None:
        """Checks four times a deadline: a silent connection dies at most 1.25 deadlines after
        the last byte it delivered."""
        while self.alive:
            gevent.sleep(self.deadline / 4)
            if self.overdue(time.monotonic()):
                log.warning("source_request_deadline", connection=self.label, deadline_s=self.deadline,
                            inflight=len(self._inflight),
                            hint="no reply and no byte within the deadline: the path may be dead; "
                                 "redialling and resending")
                self.kill(f"no reply within the {self.deadline:g} s deadline")

    # -- the reader ------------------------------------------------------------------------

    def _recv_into(self, view: memoryview) -> None:
        while view:
            n = self.sock.recv_into(view)
            if n == 0:
                raise ConnectionLost("the server closed the connection")
            self._last_rx = time.monotonic()
            view = view[n:]

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _read_loop(self) -> None:
        try:
            while True:
                first = self._recv(4)
                if replies.magic_of(first) == SIMPLE_REPLY_MAGIC:
                    self._on_simple(first + self._recv(SIMPLE_HEADER - 4))
                else:
                    self._on_chunk(replies.parse_chunk_header(self._recv(16)))
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
        if req.cmd is Cmd.BLOCK_STATUS and h.error == 0:
            # "For a successful return, the server MUST use a structured reply": no runs came;
            # the stream is still in step, so only this request fails
            req.error = SourceProtocolError("simple reply without block status to NBD_CMD_BLOCK_STATUS")
        if h.error:
            req.error = SourceReadError(f"the server failed {req.cmd.name} at {req.offset} "
                                        f"({req.length} bytes): {replies.errno_name(h.error)}")
        elif req.cmd is Cmd.READ:
            assert req.buf is not None
            self._recv_into(memoryview(req.buf))
            req.filled = req.length
        self._finish(h.cookie, req, abandoned)

    def _on_chunk(self, h: replies.ChunkHeader) -> None:
        req, abandoned = self._lookup(h.cookie)
        replies.check_chunk_for(req.cmd, h)
        if h.type == Chunk.OFFSET_DATA:
            pos, n = replies.data_range(h, self._recv(8), req.offset, req.length)
            assert req.buf is not None
            self._recv_into(memoryview(req.buf)[pos:pos + n])
            req.filled += n
        elif h.type == Chunk.OFFSET_HOLE:
            pos, n = replies.hole_range(h, self._recv(h.length), req.offset, req.length)
            assert req.buf is not None
            req.buf[pos:pos + n] = bytes(n)  # a retried request may reuse nothing: explicit
            req.filled += n
        elif h.type == Chunk.BLOCK_STATUS:
            self._on_status(h, req)
        elif h.is_error:
            error, msg = replies.parse_error(h, self._recv(h.length))
            req.error = SourceReadError(f"the server failed {req.cmd.name} at {req.offset} "
                                        f"({req.length} bytes): {replies.errno_name(error)}"
                                        + (f" ({msg})" if msg else ""))
        if h.done:
            if (req.cmd is Cmd.READ and req.error is None and req.filled != req.length):
                raise SourceProtocolError(f"read at {req.offset} answered {req.filled} of "
                                          f"{req.length} bytes")
            if req.cmd is Cmd.BLOCK_STATUS and req.error is None:
                # "exactly one chunk of type NBD_REPLY_TYPE_BLOCK_STATUS per selected context id"
                missing = sorted(set(self.info.contexts) - set(req.status))
                if missing:
                    req.error = SourceProtocolError(f"block status reply without {', '.join(missing)}")
            self._finish(h.cookie, req, abandoned)

    def _on_status(self, h: replies.ChunkHeader, req: _Request) -> None:
        """Read one block status chunk in slices (bounded memory however long the server made
        it) and keep its runs under its context's name. What is wrong with its content fails
        this request with ``SourceProtocolError`` (its caller learns why, rather than resending
        it for ever to a server that will answer the same); the connection stays: it read the
        whole chunk, so it is still in step."""
        chunk = replies.StatusChunk(h.length, req.offset, req.length, replies.MAX_STATUS_RUNS)
        left = h.length
        while left:
            data = self._recv(min(left, replies.STATUS_SLICE))
            chunk.feed(data)
            left -= len(data)
        try:
            ctx, runs = chunk.result()
            name = self._names.get(ctx)
            if name is None:
                raise SourceProtocolError(f"block status for context id {ctx}, which the server "
                                          "did not select for this connection")
            if name in req.status:
                raise SourceProtocolError(f"two block status chunks for {name}")
            req.status[name] = runs
        except SourceProtocolError as e:
            log.error("source_protocol_error", connection=self.label, error=str(e))
            req.error = req.error or e

    def _finish(self, cookie: int, req: _Request, abandoned: bool) -> None:
        if abandoned:
            del self._abandoned[cookie]
        else:
            req.result.set(None)


class Channel:
    """A connection that reconnects: what one priority class of requests goes through."""

    def __init__(self, dial: Dialer, export: str, label: str, *, deadline: float,
                 first: Connection | None = None, bitmap: str | None = None,
                 check: Callable[[Connection], None] | None = None) -> None:
        self._dial = dial
        self._bitmap = bitmap
        #: run on every redialled connection before it carries a request: raises
        #: ``SourceChanged`` if it reached another disk, ``SourceUnavailable`` to redial again
        self._check = check
        self._export = export
        self._label = label
        self._deadline = deadline
        self._conn = first
        self._lock = gevent.lock.Semaphore()
        self._closed = False
        #: bytes of reads sent and not yet answered: which of several channels is least busy
        self.pending_bytes = 0

    def call(self, cmd: Cmd, offset: int, length: int, patience: float | None) -> _Request:
        """Send a request, resending it on a new connection as often as connections die, for
        at most ``patience`` seconds (None: until the channel is closed)."""
        give_up = None if patience is None else time.monotonic() + patience
        weight = length if cmd is Cmd.READ else 0
        self.pending_bytes += weight
        try:
            while True:
                conn = self._connection(give_up)
                try:
                    return conn.call(cmd, offset, length)
                except ConnectionLost as e:
                    if self._closed:
                        raise SourceUnavailable("closed") from None
                    if give_up is not None and time.monotonic() >= give_up:
                        raise SourceUnreachable(f"{self._label}: no answer within {patience:g} s ({e})") \
                            from None
        finally:
            self.pending_bytes -= weight

    def _connection(self, give_up: float | None) -> Connection:
        conn = self._conn
        if conn is not None and conn.alive:
            return conn
        # one greenlet reconnects, the rest wait for it (or for their patience)
        if not self._lock.acquire(timeout=None if give_up is None else max(0.0, give_up - time.monotonic())):
            raise SourceUnreachable(f"{self._label}: cannot reconnect")
        try:
            if self._conn is not None and self._conn.alive:
                return self._conn
            delay = 0.1
            while True:
                if self._closed:
                    raise SourceUnavailable("closed")
                left = None if give_up is None else give_up - time.monotonic()
                try:
                    if left is not None and left <= 0:
                        raise SourceUnreachable(f"{self._label}: cannot reconnect")
                    handshake = self._deadline if left is None else min(left, self._deadline)
                    conn = Connection.open(self._dial, self._export, handshake, self._label,
                                           self._deadline, self._bitmap)
                    if self._check is not None:
                        try:
                            self._check(conn)
                        except BaseException:
                            conn.kill("not the export it was")
                            raise
                    self._conn = conn
                    log.info("source_connected", connection=self._label)
                    return conn
                except SourceUnreachable:
                    raise
                except (OSError, SourceUnavailable) as e:
                    wait = delay * random.uniform(0.75, 1.25)
                    if left is not None:
                        wait = min(wait, max(0.0, give_up - time.monotonic()))  # type: ignore[operator]
                    log.warning("source_reconnect", connection=self._label, error=str(e) or type(e).__name__,
                                retry_in_s=round(wait, 2))
                    gevent.sleep(wait)
                    delay = min(delay * 2, redial_delay_cap(self._deadline))
        finally:
            self._lock.release()

    def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.disconnect()

