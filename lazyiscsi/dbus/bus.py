"""A D-Bus connection on a gevent socket: jeepney's sans-I/O codec for the messages, our own
socket, framing and dispatch. No GLib main loop, no jeepney.io threads: one reader greenlet per
connection hands replies to the greenlet waiting for them, method calls to ``on_call`` and
signals to ``on_signal``.

Bounds (a bus peer controls what reaches us): a message longer than ``MAX_MESSAGE`` ends the
connection before it is buffered (jeepney's own Parser would buffer it whole, so the framing is
ours and each complete message goes to jeepney's ``Message.from_buffer``); every call we make
waits at most its caller's named timeout; at most ``MAX_PENDING_CALLS`` calls wait at once.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
from collections.abc import Callable

import gevent
import gevent.event
import gevent.socket
import structlog
from jeepney import DBusAddress, MessageType, new_error, new_method_call
from jeepney.auth import BEGIN, Authenticator
from jeepney.bus import get_connectable_addresses
from jeepney.low_level import HeaderFields, Message, MessageFlag

log = structlog.get_logger("lazyiscsi.dbus")

#: the largest message we accept. What reaches us is small: CheckConfig's string, the bus's
#: replies and NameOwnerChanged signals. The D-Bus spec allows 128 MiB, which a peer on the
#: system bus could make us buffer.
MAX_MESSAGE = 1 << 20
#: the SASL exchange (AUTH EXTERNAL, OK, BEGIN) and Hello: a local bus answers in milliseconds
CONNECT_TIMEOUT = 10.0
#: calls we may have waiting for replies at once (we make a handful: names, matches, one
#: RegisterHandler)
MAX_PENDING_CALLS = 64
#: the fixed part of every message header (D-Bus spec, "Message Format"): endianness, type,
#: flags, version, body length, serial, header field array length
FIXED_HEADER = 16
RECV_SIZE = 1 << 16

BUS = DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus", interface="org.freedesktop.DBus")

Reply = Message | None


class BusError(Exception):
    """The bus is absent, refused us, sent what we cannot take, or answered a call with an error
    (``name`` is the D-Bus error name then)."""

    def __init__(self, message: str, name: str = "") -> None:
        super().__init__(message)
        self.name = name


def message_size(fixed: bytes) -> int:
    """The whole length of the message whose first ``FIXED_HEADER`` bytes are ``fixed``: the
    header fields array is padded to 8 bytes before the body."""
    if fixed[:1] not in (b"l", b"B"):
        raise BusError(f"message endianness byte {fixed[:1]!r}: not 'l' or 'B'")
    order = "<" if fixed[:1] == b"l" else ">"
    body, fields = struct.unpack_from(order + "I4xI", fixed, 4)
    header = FIXED_HEADER + fields
    return header + (-header % 8) + body


class Connection:
    """One authenticated connection to a bus. ``closed`` is set when it ends, for any reason."""

    def __init__(self, address: str, *, on_call: Callable[[Message], Reply],
                 on_signal: Callable[[Message], None]) -> None:
        self.address = address
        self.on_call, self.on_signal = on_call, on_signal
        self.unique_name = ""
        self.closed = gevent.event.Event()
        self._sock: socket.socket | None = None
        self._serials = itertools.count(1)
        self._pending: dict[int, gevent.event.AsyncResult] = {}
        self._reader: gevent.Greenlet | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def connect(self) -> None:
        """Connect, authenticate (EXTERNAL: our uid) and say Hello; BusError if any step fails."""
        try:
            paths = list(get_connectable_addresses(self.address))
        except (RuntimeError, ValueError) as e:
            raise BusError(f"bus address {self.address!r}: {e}") from None
        sock = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            silent = BusError(f"no answer from the bus in {CONNECT_TIMEOUT:g} s")
            with gevent.Timeout(CONNECT_TIMEOUT, silent):
                sock.connect(paths[0])
                auth = Authenticator()
                for line in auth:
                    sock.sendall(line)
                    data = sock.recv(1024)
                    if not data:
                        raise BusError("the bus closed the connection during authentication")
                    auth.feed(data)
                sock.sendall(BEGIN)  # the Authenticator stops at OK; the caller begins
            self._sock = sock
        except OSError as e:
            sock.close()
            raise BusError(f"bus {paths[0]}: {e.strerror or e}") from None
        except BaseException as e:
            sock.close()
            if isinstance(e, BusError | gevent.Timeout):
                raise
            raise BusError(f"bus {paths[0]}: authentication refused: {e}") from None
        self._reader = gevent.spawn(self._read)
        try:
            (self.unique_name,) = self.call(new_method_call(BUS, "Hello"), timeout=CONNECT_TIMEOUT).body
        except BusError:
            self.close()
            raise

    def close(self) -> None:
        if self._reader is not None and self._reader is not gevent.getcurrent():
            self._reader.kill()
        if self._sock is not None:
            self._sock.close()
        self._end(BusError("the connection is closed"))

    def _end(self, error: BusError) -> None:
        for waiter in self._pending.values():
            waiter.set_exception(error)
        self._pending.clear()
        self.closed.set()

    # -- messages ---------------------------------------------------------------------------------

    def send(self, msg: Message) -> int:
        """Send ``msg`` with the next serial; returns the serial."""
        if self._sock is None or self.closed.is_set():
            raise BusError("the connection is closed")
        serial = next(self._serials)
        try:
            self._sock.sendall(msg.serialise(serial=serial))
        except OSError as e:
            raise BusError(f"sending to the bus: {e.strerror or e}") from None
        return serial

    def call(self, msg: Message, *, timeout: float) -> Message:
        """Send a method call and wait up to ``timeout`` s for its reply; an error reply raises
        BusError with its name and text."""
        if len(self._pending) >= MAX_PENDING_CALLS:
            raise BusError(f"{MAX_PENDING_CALLS} calls already wait for a reply")
        waiter: gevent.event.AsyncResult = gevent.event.AsyncResult()
        serial = self.send(msg)
        self._pending[serial] = waiter
        member = msg.header.fields.get(HeaderFields.member, "?")
        try:
            reply: Message = waiter.get(timeout=timeout)
        except gevent.Timeout:
            raise BusError(f"{member}: no reply in {timeout:g} s") from None
        finally:
            self._pending.pop(serial, None)
        if reply.header.message_type is MessageType.error:
            name = reply.header.fields.get(HeaderFields.error_name, "")
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise BusError(f"{member}: {name}: {text}", name)
        return reply

    def _read(self) -> None:
        assert self._sock is not None
        buf = bytearray()
        error = BusError("the bus closed the connection")
        try:
            while True:
                data = self._sock.recv(RECV_SIZE)
                if not data:
                    break
                buf += data
                while len(buf) >= FIXED_HEADER:
                    size = message_size(bytes(buf[:FIXED_HEADER]))
                    if size > MAX_MESSAGE:
                        raise BusError(f"a message of {size} bytes (we take at most {MAX_MESSAGE})")
                    if len(buf) < size:
                        break
                    raw, buf = bytes(buf[:size]), buf[size:]
                    try:
                        msg = Message.from_buffer(raw)
                    except (ValueError, KeyError, IndexError, struct.error) as e:
                        raise BusError(f"a malformed message: {e}") from None
                    self._dispatch(msg)
        except BusError as e:
            error = e
        except OSError as e:
            error = BusError(f"reading from the bus: {e.strerror or e}")
        log.warning("dbus_disconnected", error=str(error))
        with contextlib.suppress(OSError):
            self._sock.close()
        self._end(error)

    def _dispatch(self, msg: Message) -> None:
        kind = msg.header.message_type
        if kind in (MessageType.method_return, MessageType.error):
            waiter = self._pending.get(msg.header.fields.get(HeaderFields.reply_serial, 0))
            if waiter is not None:
                waiter.set(msg)
        elif kind is MessageType.signal:
            self.on_signal(msg)
        elif kind is MessageType.method_call:
            try:
                reply = self.on_call(msg)
            except Exception:  # a bug answering one call must not end the connection
                log.exception("dbus_call_failed", member=msg.header.fields.get(HeaderFields.member))
                reply = new_error(msg, "org.freedesktop.DBus.Error.Failed", "s", ("internal error",))
            if reply is not None and not msg.header.flags & MessageFlag.no_reply_expected:
                self.send(reply)
