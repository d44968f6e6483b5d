"""The portal's connection caps, in process on gevent sockets (issue 14, finding 2): past the cap
per address, or in all, a new connection is closed at once, and the ones already served go on;
a slot freed is usable again."""

from __future__ import annotations

import contextlib
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import gevent
import pytest
from gevent import socket

from lazyiscsi.iscsi.connection import Target
from lazyiscsi.iscsi.pdu import BHS_LEN, Opcode
from lazyiscsi.iscsi.portal import MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS, Portal

IQN = "iqn.2026-11.test:caps"


@pytest.fixture
def portal() -> Iterator[Portal]:
    p = Portal([Target(IQN, {})], ("127.0.0.1", 0), max_connections=5, max_per_address=3, nop_interval=0)
    p.start()
    yield p
    p.stop(timeout=1)


def connect(port: int, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def served(sock: socket.socket) -> bool:
    """The target answers a first Login PDU (True) or closes the connection (False)."""
    text = f"InitiatorName=iqn.test:caps\0TargetName={IQN}\0".encode()
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.LOGIN_REQUEST | 0x40, 0x00
    b[5:8] = len(text).to_bytes(3, "big")
    struct.pack_into(">I", b, 16, 1)
    try:
        sock.sendall(bytes(b) + text + bytes(-len(text) % 4))
        reply = sock.recv(BHS_LEN, socket.MSG_WAITALL)
        if len(reply) < BHS_LEN:
            return False
        n = int.from_bytes(reply[5:8], "big")
        sock.recv(n + -n % 4, socket.MSG_WAITALL)  # the answer's text: read, not judged here
    except OSError:
        return False
    return reply[0] & 0x3F == Opcode.LOGIN_RESPONSE


def test_caps_per_address_and_in_all(portal: Portal) -> None:
    assert MAX_CONNECTIONS_PER_ADDRESS < MAX_CONNECTIONS  # one address never takes them all
    port = portal.address[1]
    first = [connect(port, "127.0.0.1") for _ in range(3)]
    assert all(served(s) for s in first)
    assert not served(connect(port, "127.0.0.1"))  # a fourth from the same address
    second = [connect(port, "127.0.0.2") for _ in range(2)]
    assert all(served(s) for s in second)  # another address still gets in...
    assert not served(connect(port, "127.0.0.3"))  # ...up to five in all
    first.pop().close()
    deadline = time.monotonic() + 10
    while not served(connect(port, "127.0.0.3")):  # once the portal has seen the close
        assert time.monotonic() < deadline, "a freed slot was not served again"
        gevent.sleep(0.05)
    assert all(served(s) for s in first + second)  # the first ones never noticed


def test_stop_ends_the_sessions_still_open() -> None:
    """The caps are counted by the portal, not by a bounded pool; stop() must still end every
    connection it serves (the daemon closes the volumes under them next)."""
    p = Portal([Target(IQN, {})], ("127.0.0.1", 0), nop_interval=0)
    p.start()
    sock = connect(p.address[1], "127.0.0.1")
    assert served(sock)
    p.stop(timeout=1)
    sock.settimeout(10)
    with contextlib.suppress(ConnectionResetError):  # closed: EOF or a reset, not a timeout
        assert sock.recv(1) == b""


@pytest.mark.parametrize("value", ["0", "nan", "inf", "-1"])
def test_a_login_timeout_that_never_fires_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="login timeout"):
        Portal([], ("127.0.0.1", 0), login_timeout=float(value))
    r = subprocess.run([sys.executable, "-m", "lazyiscsi.cli", "serve", "--frontend", "portal",
                        "--login-timeout", value, "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--login-timeout" in r.stderr, r.stderr
