"""A TCP proxy that breaks the path between a client and a real server on command.

The fault-injection tier puts it in front of nbdkit or nginx: the server stays real, only the
path misbehaves, as a WAN does. Modes (``set_mode``):

* ``PASS``: bytes flow both ways.
* ``SILENT``: a path that died without a RST (a pulled cable, a firewall dropping state, a
  routing black hole): nothing is forwarded either way, every socket stays open, new
  connections are accepted but not connected onward. Bytes already sent wait, as TCP would
  keep retransmitting them; when the path comes back (``PASS``) they are delivered.
* ``SLOW``: bytes flow at ``rate`` bytes/s each way (per connection).
* ``lose()``: the path's state is lost (a NAT or stateful firewall restarted): every connection
  open now never delivers another byte either way, though its sockets stay open and no RST
  comes; connections made afterwards flow as the mode says. Only a client that drops a silent
  connection and redials gets through again.
* ``reset()``: every connection open now is closed with a RST (SO_LINGER 0) on both sides.
* ``refuse(n)``: the next ``n`` connections are accepted and closed at once with a RST (a server
  at its client limit, or a blip of the path while a connection is made).

Plain threads, not gevent: the tests that drive a subprocess block the test process's hub,
and the proxy must keep forwarding meanwhile.
"""

from __future__ import annotations

import contextlib
import enum
import select
import socket
import struct
import threading
import time

#: how often a blocked pump looks at its mode and at close; a latency the tests never see
_POLL_S = 0.05
_CHUNK = 65536


class Mode(enum.Enum):
    PASS = "pass"
    SILENT = "silent"
    SLOW = "slow"


def _rst_close(sock: socket.socket) -> None:
    """Close with a RST: SO_LINGER on with a zero timeout (tcp(7))."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()  # no shutdown first: that would send a FIN, not a RST


class FaultProxy:
    """Listens on 127.0.0.1:``port`` (0: any free port) and forwards to ``upstream``."""

    def __init__(self, upstream: tuple[str, int], port: int = 0) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(_POLL_S)
        self.port = int(self._listener.getsockname()[1])
        self.mode = Mode.PASS
        self.rate = 0
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket | None]] = []
        #: sockets of connections whose path state was lost (``lose``)
        self._lost: set[socket.socket] = set()
        #: connections accepted so far: a client that redials shows up here
        self.accepted = 0
        #: connections still to be refused (``refuse``)
        self._to_refuse = 0
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    # -- control ---------------------------------------------------------------------------

    def set_mode(self, mode: Mode, rate: int | None = None) -> None:
        """``rate`` (bytes/s per connection and direction) is kept for a later ``SLOW``."""
        self.mode = mode
        if rate is not None:
            self.rate = rate
        if mode is Mode.SILENT:
            self._flowing.clear()
        else:
            self._flowing.set()

    def lose(self) -> None:
        with self._lock:
            for client, server in self._pairs:
                self._lost.add(client)
                if server is not None:
                    self._lost.add(server)

    def reset(self) -> None:
        """Close every current connection with a RST on both sides; new ones are accepted."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, server in pairs:
            _rst_close(client)
            if server is not None:
                _rst_close(server)

    def refuse(self, n: int) -> None:
        self._to_refuse = n

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        self.reset()
        with contextlib.suppress(OSError):
            self._listener.close()
        for t in self._threads:
            t.join(5)

    # -- the pumps -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self._to_refuse:
                self._to_refuse -= 1
                _rst_close(client)
                continue
            t = threading.Thread(target=self._connect_onward, args=(client,), daemon=True)
            self._threads.append(t)
            t.start()

    def _connect_onward(self, client: socket.socket) -> None:
        """A connection made during a silence reaches the server only when the path is back."""
        client.setblocking(True)
        with self._lock:
            self._pairs.append((client, None))
        while self._blocked(client):
            if self._closed:
                return
        try:
            server = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _rst_close(client)
            return
        server.settimeout(None)
        with self._lock:
            if (client, None) not in self._pairs:  # reset meanwhile
                _rst_close(server)
                return
            self._pairs.remove((client, None))
            self._pairs.append((client, server))
        for src, dst in ((client, server), (server, client)):
            t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
            self._threads.append(t)
            t.start()

    def _blocked(self, sock: socket.socket) -> bool:
        """Whether bytes from ``sock`` must wait; waits a poll interval if so."""
        if sock in self._lost:
            time.sleep(_POLL_S)
            return True
        return not self._flowing.wait(_POLL_S)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._closed:
                if self._blocked(src):
                    continue  # silent: leave the bytes in the kernel's buffers
                ready, _, _ = select.select([src], [], [], _POLL_S)
                if not ready:
                    continue
                data = src.recv(_CHUNK)
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                while self._blocked(src):  # went silent while we held these
                    if self._closed:
                        return
                rate = self.rate if self.mode is Mode.SLOW else 0
                if rate:
                    for i in range(0, len(data), 4096):
                        piece = data[i:i + 4096]
                        dst.sendall(piece)
                        time.sleep(len(piece) / rate)
                else:
                    dst.sendall(data)
        except (OSError, ValueError):  # reset or closed under us (ValueError: fd -1)
            return
