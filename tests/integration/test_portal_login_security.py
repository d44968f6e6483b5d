"""The portal's login phase against raw PDUs on real sockets, a real `lazyiscsi serve` behind
(issue 14): CHAP cannot be skipped by turning a session into a discovery session, half-open
logins neither lock other initiators out nor hold memory, and a new login of the same initiator
port reinstates the session: the old connection ends and cannot release what the new one holds
(RFC 7143 6.3.5)."""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lazyiscsi.iscsi.pdu import BHS_LEN, Opcode
from tests.integration.peers import MiB, free_port, make_image, wait_listening

OPEN = "iqn.2026-11.io.lazyiscsi:open"
LOCKED = "iqn.2026-11.io.lazyiscsi:locked"
USER, SECRET = "host1", "a-secret-of-16-ch"
LOGIN_TIMEOUT = 3.0
GOOD, CHECK_CONDITION, RESERVATION_CONFLICT = 0x00, 0x02, 0x18


@dataclass
class Serve:
    proc: subprocess.Popen[str]
    port: int
    image: bytes
    log: Path  # its stderr: the events

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """Two targets: OPEN (no authentication) and LOCKED (CHAP), each with an 8 MiB LUN."""
    image = make_image(tmp_path / "src.img", 8 * MiB)
    port = free_port()
    (tmp_path / "c.toml").write_text(f"""
[portal]
listen = "127.0.0.1:{port}"
[[volume]]
name = "open"
source = "{tmp_path / 'src.img'}"
cache = "{tmp_path / 'open.img'}"
target = "{OPEN}"
[[volume]]
name = "locked"
source = "{tmp_path / 'src.img'}"
cache = "{tmp_path / 'locked.img'}"
target = "{LOCKED}"
chap = {{ user = "{USER}", secret = "{SECRET}" }}
""")
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lazyiscsi.cli", "--log-level", "info",
         "--control", str(tmp_path / "ctl.sock"), "serve", "--config", str(tmp_path / "c.toml"),
         "--state-dir", str(tmp_path / "state"),
         "--frontend", "portal", "--nop-interval", "0", "--login-timeout", str(LOGIN_TIMEOUT)],
        stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    wait_listening(port, proc)  # type: ignore[arg-type]
    assert proc.stdout is not None
    while not (line := proc.stdout.readline()).startswith("  control:"):  # both targets are in
        assert line, "serve exited"
    yield Serve(proc, port, image, log)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert "Traceback" not in log.read_text()


# -- a raw initiator -----------------------------------------------------------------------------

def pdu(opcode: int, flags: int, data: bytes = b"", *, fields: bytes = b"", itt: int = 1,
        immediate: bool = False, isid: bytes = b"") -> bytes:
    b = bytearray(BHS_LEN)
    b[0], b[1] = opcode | (0x40 if immediate else 0), flags
    b[5:8] = len(data).to_bytes(3, "big")
    b[8:8 + len(isid)] = isid
    struct.pack_into(">I", b, 16, itt)
    b[20:20 + len(fields)] = fields
    return bytes(b) + data + bytes(-len(data) % 4)


def recv_pdu(sock: socket.socket) -> tuple[bytes, bytes]:
    buf = b""
    while len(buf) < BHS_LEN:
        chunk = sock.recv(BHS_LEN - len(buf))
        if not chunk:
            raise ConnectionError("closed by the target")
        buf += chunk
    n = int.from_bytes(buf[5:8], "big")
    n += -n % 4
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed by the target")
        data += chunk
    return buf, data


def closed_by_target(sock: socket.socket, within: float) -> bool:
    """True once the target has closed ``sock`` (EOF or reset) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass
    return True


def login_pdu(keys: str, csg: int, nsg: int | None, isid: bytes) -> bytes:
    flags = (0x80 | nsg if nsg is not None else 0) | csg << 2
    return pdu(Opcode.LOGIN_REQUEST, flags, keys.encode(), immediate=True, isid=isid)


class Initiator:
    """One session's connection, driven PDU by PDU."""

    def __init__(self, port: int, name: str = "iqn.2024-01.test:raw", isid: str = "400001370000",
                 target: str = OPEN, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        self.name, self.isid, self.target = name, bytes.fromhex(isid), target
        self.cmdsn, self.itt = 0, 1

    def login(self) -> Initiator:
        keys = (f"InitiatorName={self.name}\0TargetName={self.target}\0SessionType=Normal\0AuthMethod=None\0"
                "HeaderDigest=None\0DataDigest=None\0MaxRecvDataSegmentLength=262144\0")
        self.sock.sendall(login_pdu(keys, 0, 3, self.isid))
        bhs, _ = recv_pdu(self.sock)
        assert bhs[0] & 0x3F == Opcode.LOGIN_RESPONSE and bhs[36:38] == b"\0\0" and bhs[1] & 0x80, bhs.hex()
        return self

    def command(self, cdb: bytes, read: int = 0) -> tuple[int, bytes]:
        """Status and Data-In of one SCSI command expecting ``read`` bytes."""
        self.itt += 1
        fields = struct.pack(">III", read, self.cmdsn, 0) + cdb.ljust(16, b"\0")
        self.sock.sendall(pdu(Opcode.SCSI_COMMAND, 0x80 | (0x40 if read else 0), fields=fields, itt=self.itt))
        self.cmdsn += 1
        data = b""
        while True:
            bhs, seg = recv_pdu(self.sock)
            if bhs[0] & 0x3F == Opcode.SCSI_DATA_IN:
                data += seg[:int.from_bytes(bhs[5:8], "big")]
                if bhs[1] & 0x01:  # status with the last Data-In
                    return bhs[3], data
            else:
                assert bhs[0] & 0x3F == Opcode.SCSI_RESPONSE, bhs.hex()
                return bhs[3], data


def inquiry_and_read(port: int, image: bytes, source: str) -> None:
    ini = Initiator(port, name="iqn.2024-01.test:other", source=source).login()
    status, data = ini.command(bytes([0x12, 0, 0, 0, 96, 0]), 96)
    assert status == GOOD and data[8:16].startswith(b"LAZYISCS")
    status, data = ini.command(bytes([0x28, 0, 0, 0, 0, 16, 0, 0, 8, 0]), 4096)  # READ(10) LBA 16
    assert status == GOOD and data == image[16 * 512:24 * 512]
    ini.sock.close()


# -- finding 1: CHAP bypass ------------------------------------------------------------------------

def test_chap_target_cannot_be_entered_by_turning_into_a_discovery_session(serve: Serve) -> None:
    """First PDU: a normal session with the CHAP target's name, no AuthMethod; second: the same
    login declared Discovery, moving to full feature. It used to reach full feature and read the
    LUN; the session type is bound by the first PDU (RFC 7143 6.3): initiator error, closed."""
    isid = bytes.fromhex("400001370000")
    sock = socket.create_connection(("127.0.0.1", serve.port), timeout=10)
    sock.sendall(login_pdu(f"InitiatorName=iqn.2024-01.test:x\0TargetName={LOCKED}\0SessionType=Normal\0",
                           0, None, isid))
    bhs, _ = recv_pdu(sock)
    assert bhs[36:38] == b"\0\0"
    sock.sendall(login_pdu("SessionType=Discovery\0", 0, 3, isid))
    bhs, _ = recv_pdu(sock)
    assert bhs[0] & 0x3F == Opcode.LOGIN_RESPONSE and (bhs[36], bhs[37]) == (0x02, 0x00), bhs.hex()
    assert closed_by_target(sock, 10)
    # a real discovery session gets SendTargets, but a SCSI command there is rejected
    sock = socket.create_connection(("127.0.0.1", serve.port), timeout=10)
    sock.sendall(login_pdu("InitiatorName=iqn.2024-01.test:x\0SessionType=Discovery\0", 1, 3, isid))
    bhs, _ = recv_pdu(sock)
    assert bhs[36:38] == b"\0\0" and bhs[1] & 0x80
    read = struct.pack(">III", 4096, 0, 0) + bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]).ljust(16, b"\0")
    sock.sendall(pdu(Opcode.SCSI_COMMAND, 0xC0, fields=read, itt=5))
    bhs, data = recv_pdu(sock)
    assert bhs[0] & 0x3F == Opcode.REJECT and bhs[2] == 0x04, bhs.hex()  # protocol error
    text_fields = struct.pack(">II", 0xFFFFFFFF, 0)  # TTT, CmdSN
    sock.sendall(pdu(Opcode.TEXT_REQUEST, 0x80, b"SendTargets=All\0", fields=text_fields, itt=6,
                     immediate=True))
    bhs, data = recv_pdu(sock)
    assert bhs[0] & 0x3F == Opcode.TEXT_RESPONSE and f"TargetName={LOCKED}".encode() in data
    sock.close()
    # and with CHAP a real initiator gets in
    url = f"iscsi://{USER}%{SECRET}@127.0.0.1:{serve.port}/{LOCKED}/0"
    r = subprocess.run(["iscsi-inq", "-i", "iqn.2024-01.test:chap", url], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and "DIRECT_ACCESS" in r.stdout, r.stderr


# -- finding 2: login-phase denial of service ----------------------------------------------------

def test_half_open_logins_neither_lock_out_others_nor_hold_memory(serve: Serve) -> None:
    """300 connections from one address that never finish a login: a third send half a header,
    a third announce a 200,000-byte Login data segment and send 10 bytes, a third send a first
    Login PDU and no more. Another initiator (127.0.0.2) logs in and reads within 5 s meanwhile;
    every one of the 300 is closed by LOGIN_TIMEOUT, the daemon grows < 96 MiB, and then the
    first address may log in again."""
    rss_before = serve.rss()
    isid = bytes.fromhex("400001370000")
    half_open: list[socket.socket] = []
    for i in range(300):
        sock = socket.create_connection(("127.0.0.1", serve.port), timeout=10)
        if i % 3 == 0:
            sock.sendall(login_pdu("InitiatorName=iqn.2024-01.test:dos\0", 0, None, isid)[:20])
        elif i % 3 == 1:
            b = bytearray(login_pdu("", 0, None, isid))
            b[5:8] = (200_000).to_bytes(3, "big")
            sock.sendall(bytes(b) + b"InitiatorN")
        else:
            sock.sendall(login_pdu(f"InitiatorName=iqn.2024-01.test:dos\0TargetName={OPEN}\0", 0, None, isid))
        half_open.append(sock)
    for sock in half_open[1:64:3]:  # served ones: a login data segment is at most 8192 (13.12)
        assert closed_by_target(sock, LOGIN_TIMEOUT / 2), "a 200,000-byte Login PDU was awaited"
    start = time.monotonic()
    inquiry_and_read(serve.port, serve.image, "127.0.0.2")
    assert time.monotonic() - start < 5
    deadline = time.monotonic() + LOGIN_TIMEOUT + 20
    for sock in half_open:
        left = max(0.1, deadline - time.monotonic())
        assert closed_by_target(sock, left), "a half-open login outlived its timeout"
        sock.close()
    assert serve.rss() - rss_before < 96 * MiB
    inquiry_and_read(serve.port, serve.image, "127.0.0.1")
    events = serve.log.read_text()
    assert "login_timeout" in events
    # 236 refused (64 served from one address), in one event: a flood does not flood the journal
    assert 1 <= events.count("connection_refused") <= 2 and '"refused": ' in events


# -- finding 6: session reinstatement --------------------------------------------------------------

def test_a_new_login_of_the_same_initiator_port_reinstates_the_session(serve: Serve) -> None:
    """RFC 7143 6.3.5: a login with the InitiatorName and ISID of a live session closes the old
    connection first. The old one's nexus loss is reported then, not when its socket finally
    goes: it used to release the RESERVE the new session made."""
    reserve, tur = bytes([0x16, 0, 0, 0, 0, 0]), bytes(6)
    old = Initiator(serve.port).login()
    assert old.command(reserve) == (GOOD, b"")
    new = Initiator(serve.port).login()  # same InitiatorName, same ISID
    assert closed_by_target(old.sock, 10), "the old connection of a reinstated session stayed open"
    assert new.command(tur) == (GOOD, b"")  # the old one's reservation ended with it
    assert new.command(reserve) == (GOOD, b"")
    old.sock.close()
    other = Initiator(serve.port, name="iqn.2024-01.test:other").login()
    status, _ = other.command(reserve)
    assert status == RESERVATION_CONFLICT  # the new session still holds it
    new.sock.close()
    deadline = time.monotonic() + 10
    while other.command(reserve)[0] != GOOD:  # until the portal notices the new one is gone
        assert time.monotonic() < deadline, "the reservation outlived its session"
        time.sleep(0.1)
