"""Malformed input to the portal: Reject or CHECK CONDITION for what can be answered, the
connection closed for what breaks framing, and other sessions untouched throughout
(RFC 7143 11.17; "one bad client never hurts another")."""

from __future__ import annotations

import random
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lazyiscsi.iscsi.pdu import BHS_LEN, Opcode
from tests.integration.peers import free_port, make_image, wait_listening

IQN = "iqn.2026-11.io.lazyiscsi:bad"


@pytest.fixture
def portal(tmp_path: Path):  # type: ignore[no-untyped-def]
    img = tmp_path / "src.img"
    make_image(img, 8 << 20)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lazyiscsi.cli", "--log-level", "warning", "serve",
                             "--source", str(img), "--cache", str(tmp_path / "cache.img"), "--iqn", IQN,
                             "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_listening(port, proc)  # type: ignore[arg-type]
    yield port, img
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err


def pdu(opcode: int, flags: int = 0x80, data: bytes = b"", itt: int = 1, fields: bytes = b"",
        immediate: bool = False) -> bytes:
    b = bytearray(BHS_LEN)
    b[0] = opcode | (0x40 if immediate else 0)
    b[1] = flags
    b[5:8] = len(data).to_bytes(3, "big")
    struct.pack_into(">I", b, 16, itt)
    b[20:20 + len(fields)] = fields
    return bytes(b) + data + bytes(-len(data) % 4)


def recv_pdu(sock: socket.socket) -> tuple[bytes, bytes]:
    bhs = b""
    while len(bhs) < BHS_LEN:
        chunk = sock.recv(BHS_LEN - len(bhs))
        if not chunk:
            raise ConnectionError("closed")
        bhs += chunk
    n = int.from_bytes(bhs[5:8], "big")
    n += -n % 4
    data = b""
    while len(data) < n:
        data += sock.recv(n - len(data))
    return bhs, data


def login(port: int, isid: str = "400001370000") -> socket.socket:
    """A session of initiator port iqn.2024-01.test:bad + ``isid``: a second login with the same
    ISID reinstates the first (RFC 7143 6.3.5), closing it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    text = (f"InitiatorName=iqn.2024-01.test:bad\0TargetName={IQN}\0SessionType=Normal\0"
            "AuthMethod=None\0").encode()
    b = bytearray(pdu(Opcode.LOGIN_REQUEST, 0x80 | (0 << 2) | 1, text, immediate=True)[:BHS_LEN])
    b[8:14] = bytes.fromhex(isid)
    sock.sendall(bytes(b) + text + bytes(-len(text) % 4))
    bhs, _ = recv_pdu(sock)
    assert bhs[0] & 0x3F == Opcode.LOGIN_RESPONSE and bhs[36] == 0, bhs.hex()
    op = b"HeaderDigest=None\0DataDigest=None\0MaxRecvDataSegmentLength=65536\0"
    b = bytearray(pdu(Opcode.LOGIN_REQUEST, 0x80 | (1 << 2) | 3, op, immediate=True)[:BHS_LEN])
    b[8:14] = bytes.fromhex(isid)
    sock.sendall(bytes(b) + op + bytes(-len(op) % 4))
    bhs, _ = recv_pdu(sock)
    assert bhs[0] & 0x3F == Opcode.LOGIN_RESPONSE and bhs[36] == 0 and bhs[1] & 0x80, bhs.hex()
    return sock


def scsi(cdb: bytes, itt: int, cmdsn: int, expected: int = 0) -> bytes:
    return pdu(Opcode.SCSI_COMMAND, 0x80 | (0x40 if expected else 0), itt=itt,
               fields=struct.pack(">III", expected, cmdsn, 0) + cdb.ljust(16, b"\0"))


def healthy(port: int) -> None:
    """Another session works: a real initiator reads the LUN."""
    r = subprocess.run(["iscsi-inq", "-i", "iqn.2024-01.test:good", f"iscsi://127.0.0.1:{port}/{IQN}/0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "DIRECT_ACCESS" in r.stdout, r.stderr


def test_answerable_errors_keep_the_connection(portal) -> None:  # type: ignore[no-untyped-def]
    port, _ = portal
    sock = login(port)
    sock.sendall(pdu(0x1C, itt=9))  # an opcode no initiator may send
    bhs, data = recv_pdu(sock)
    assert bhs[0] & 0x3F == Opcode.REJECT and bhs[2] == 0x05 and data[:1] == b"\x1c"
    sock.sendall(scsi(bytes([0xFF]), itt=10, cmdsn=0))  # unknown SCSI opcode
    bhs, data = recv_pdu(sock)
    assert bhs[0] & 0x3F == Opcode.SCSI_RESPONSE and bhs[3] == 0x02 and data[2 + 12] == 0x20  # ASC 20h
    sock.sendall(scsi(bytes([0x28, 0]) + struct.pack(">I", 1 << 30) + bytes([0, 0, 1, 0]), 11, 1, 512))
    bhs, data = recv_pdu(sock)
    assert bhs[3] == 0x02 and data[2 + 12] == 0x21  # LBA out of range
    sock.sendall(scsi(bytes([0x00]) + bytes(5), itt=12, cmdsn=2))  # TEST UNIT READY still fine
    bhs, _ = recv_pdu(sock)
    assert bhs[0] & 0x3F == Opcode.SCSI_RESPONSE and bhs[3] == 0
    healthy(port)
    sock.close()


@pytest.mark.parametrize("kind", ["oversized", "garbage", "truncated"])
def test_framing_errors_close_only_that_connection(portal, kind: str) -> None:  # type: ignore[no-untyped-def]
    port, _ = portal
    sock = login(port)
    if kind == "oversized":
        b = bytearray(scsi(bytes(6), 1, 0))
        b[5:8] = (1 << 23).to_bytes(3, "big")
        sock.sendall(bytes(b))
    elif kind == "garbage":
        sock.sendall(random.Random(1).randbytes(4096))
    else:
        sock.sendall(scsi(bytes(6), 1, 0)[:30])
        sock.shutdown(socket.SHUT_WR)
    healthy(port)  # meanwhile, and after, another session works
    deadline = time.monotonic() + 10
    closed = False
    while time.monotonic() < deadline and not closed:
        try:
            closed = sock.recv(65536) == b""
        except (ConnectionError, TimeoutError, OSError):
            closed = True
    assert closed or kind == "garbage", "the portal kept a connection whose framing is lost"
    healthy(port)
    sock.close()


def test_login_to_an_unknown_target_is_refused(portal) -> None:  # type: ignore[no-untyped-def]
    port, _ = portal
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    text = b"InitiatorName=iqn.2024-01.test:x\0TargetName=iqn.nope:none\0SessionType=Normal\0"
    b = bytearray(pdu(Opcode.LOGIN_REQUEST, 0x80 | 1, text, immediate=True)[:BHS_LEN])
    sock.sendall(bytes(b) + text + bytes(-len(text) % 4))
    bhs, _ = recv_pdu(sock)
    assert bhs[0] & 0x3F == Opcode.LOGIN_RESPONSE and (bhs[36], bhs[37]) == (0x02, 0x03)  # not found
    healthy(port)
