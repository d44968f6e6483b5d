"""Streamed WRITEs through the embedded portal with a real initiator (issue 15): QEMU's iscsi://
driver (libiscsi) writes 4-8 MiB commands, unaligned to the store's unit, to a lazy LUN whose
source is nbdkit with 20 ms of delay while the copier runs over the same range. What reads back
is what was written, never the source's data, and no command held more than its window of write
data, where gathering held each command's whole transfer.

The portal runs in the test process (its connection's counters are readable); qemu-io runs as a
child, through gevent's subprocess so that the portal's greenlets run meanwhile."""

from __future__ import annotations

import gc
import random
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import gevent.socket
import gevent.subprocess
import pytest

from lazyiscsi.iscsi import portal as portal_module
from lazyiscsi.iscsi.connection import STREAM_PIECE_BYTES, Connection, Target, stream_window
from lazyiscsi.iscsi.pdu import BHS_LEN, Opcode, RejectReason
from lazyiscsi.scsi.lun import MAX_TRANSFER_BYTES, Lun
from lazyiscsi.source import open_source
from lazyiscsi.store.hydrator import Hydrator, JobState
from lazyiscsi.store.lazydisk import LazyDisk
from tests.integration import test_portal_bounds as bounds
from tests.integration.peers import WAIT_S, MiB, Nbdkit, free_port, make_image
from tests.unit.store_fakes import ScriptedSource

IQN = "iqn.2026-12.io.lazyiscsi:stream"
SIZE = 32 * MiB
UNIT = 64 * 1024
BS = 512
#: the largest Data-Out the raw initiator sends (the portal's MaxRecvDataSegmentLength)
PDU = 256 * 1024
#: (offset, length, pattern) of each WRITE: none starts or ends on a unit; the largest is the
#: largest transfer the LUN takes (Block Limits VPD), which QEMU sends as one command
WRITES = [(UNIT + 512, MAX_TRANSFER_BYTES, 0xA1), (12 * MiB + 3584, 4 * MiB, 0xB2),
          (20 * MiB - 1024, 6 * MiB + 2048, 0xC3)]


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[Connection]:
    """The connection of every portal session started from now on (it holds no reference back)."""
    conns: list[Connection] = []

    class Recorded(portal_module._Session):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            conns.append(self.conn)

    monkeypatch.setattr(portal_module, "_Session", Recorded)
    return conns


@pytest.fixture
def lazy_portal(tmp_path: Path,
                nbdkit: list[Nbdkit]) -> Iterator[tuple[portal_module.Portal, LazyDisk, bytes, Path]]:
    image = tmp_path / "src.img"
    data = make_image(image, SIZE)
    server = Nbdkit(["--filter=delay", "file", str(image), "rdelay=20ms"], free_port()).start()
    nbdkit.append(server)
    cache = tmp_path / "cache"
    disk = LazyDisk.open(str(cache), open_source(server.url), unit=UNIT, autocommit_s=None)
    portal = portal_module.Portal([Target(IQN, {0: Lun(disk, "vm1")})], ("127.0.0.1", 0), nop_interval=0)
    portal.start()
    yield portal, disk, data, cache
    portal.stop()
    disk.close()


def qemu_io(port: int, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    r = gevent.subprocess.run([*args, f"iscsi://127.0.0.1:{port}/{IQN}/0"], capture_output=True, text=True,
                              timeout=120)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    assert "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    return r.stdout


def test_large_writes_stream_while_the_copier_runs(lazy_portal, connections, request) -> None:  # type: ignore[no-untyped-def]
    portal, disk, data, cache = lazy_portal
    # 1 MiB/s: the copy is in the written range while QEMU writes, and far from done (the
    # unwritten 14 MiB would take it 14 s)
    job = Hydrator(disk, rate=MiB)
    job.start()
    request.addfinalizer(lambda: job.state is JobState.COMPLETED or job.cancel())
    deadline = time.monotonic() + WAIT_S
    while disk.local_bytes == 0:
        assert time.monotonic() < deadline, "the copy did not start"
        gevent.sleep(0.02)
    port = portal.address[1]
    qemu_io(port, *(f"write -P {p:#x} {off} {n}" for off, n, p in WRITES))
    assert disk.local_bytes < SIZE, "the copy was over before the writes: it raced nothing"
    piece = max(STREAM_PIECE_BYTES, UNIT)
    assert connections and max(c.held_peak for c in connections) <= stream_window(piece)
    assert stream_window(piece) < min(n for _, n, _ in WRITES)  # gathered, each held it all
    # read back through the portal (while the copy still runs), then the whole disk once copied
    qemu_io(port, *(f"read -P {p:#x} {off} {n}" for off, n, p in WRITES))
    job.set_rate(0)
    assert job.wait(120) and job.state is JobState.COMPLETED
    expected = bytearray(data)
    for off, n, p in WRITES:
        expected[off:off + n] = bytes([p]) * n
    assert disk.read(0, SIZE) == expected  # no source byte over a written one, none lost around them
    disk.flush()
    assert cache.read_bytes() == expected


# -- task management and a dropped connection in the middle of a streamed WRITE ---------------------

def _live_greenlets() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, gevent.Greenlet) and not o.dead)


@pytest.mark.parametrize("end", ["abort", "lun_reset", "drop"])
def test_no_piece_is_written_after_an_abort_or_a_dropped_connection(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], connections: list[Connection], end: str) -> None:
    """The first piece of a 4 MiB WRITE waits on the source (its head unit is fetched first); the
    second has arrived behind it. ABORT TASK, LUN RESET (or the initiator going away) then: once the first
    piece lands, the command ends, the second is never written, the answer to the abort comes only
    after that, its worker greenlet is gone and nothing printed a traceback."""
    data = bytes(range(256)) * (16 * MiB // 256)
    source = ScriptedSource(data)
    disk = LazyDisk.open(str(tmp_path / "cache"), source, unit=UNIT, autocommit_s=None)  # type: ignore[arg-type]
    lun = Lun(disk, "vm1")
    portal = portal_module.Portal([Target(bounds.IQN, {0: lun})], ("127.0.0.1", 0), nop_interval=0)
    portal.start()
    try:
        baseline = _live_greenlets()
        ini = bounds.Initiator.login(portal.address[1], connect=gevent.socket.create_connection)
        first = STREAM_PIECE_BYTES - BS  # immediate data up to the first grid line (LBA 1 onwards)
        ini.sock.sendall(ini.command(bounds.write10(1, 4 * MiB // BS), write=4 * MiB, data=b"\x5a" * first))
        itt = ini.itt
        _until(lambda: source.pending, "the first piece's head unit is being fetched")
        header, _ = ini.recv()  # room in the window for the next piece: its R2T
        assert header[0] & 0x3F == Opcode.R2T
        ttt, offset, length = struct.unpack_from(">I", header, 20)[0], *struct.unpack_from(">II", header, 40)
        assert (offset, length) == (first, STREAM_PIECE_BYTES)
        out = bounds.bhs(Opcode.SCSI_DATA_OUT, 0x80, itt, struct.pack(">IIIIII", ttt, 0, 0, 0, 0, offset))
        ini.sock.sendall(bounds.frame(out, b"\xa5" * length))
        task = connections[0].tasks[itt]
        _until(lambda: task.cut == first + length, "the second piece is at the portal")
        if end != "drop":  # ABORT TASK of the WRITE, or LUN RESET of its LUN (RFC 7143 11.5.1)
            function, rtt = (1, itt) if end == "abort" else (5, 0xFFFFFFFF)
            fields = struct.pack(">III", rtt, ini.cmdsn, 0)
            tmf = bounds.bhs(Opcode.TASK_MGMT_REQUEST, 0x80 | function, 0x999, fields, immediate=True)
            ini.sock.sendall(bounds.frame(tmf))
            ini.sock.settimeout(0.5)
            with pytest.raises(TimeoutError):  # not answered while its first piece is being written
                ini.recv()
            ini.sock.settimeout(bounds.HEALTHY_WITHIN_S * 6)
        else:
            ini.close()
        while source.pending:
            source.complete(0)
        if end != "drop":
            header, _ = ini.recv()  # the abort's answer: "function complete", and no status for the WRITE
            assert header[0] & 0x3F == Opcode.TASK_MGMT_RESPONSE and header[2] == 0
            assert struct.unpack_from(">I", header, 16)[0] == 0x999
            ini.sock.sendall(ini.command(bounds.inquiry(), read=96))  # the connection goes on
            assert ini.response(ini.itt)[0] == 0
            ini.close()
        _until(lambda: _live_greenlets() <= baseline, "the session's greenlets ended")
        assert disk.read(BS, first) == b"\x5a" * first  # the piece being written when it ended
        second = (STREAM_PIECE_BYTES, STREAM_PIECE_BYTES)
        assert next(disk.missing_runs(*second), None) is not None  # never written
        assert "Traceback" not in capfd.readouterr().err
    finally:
        portal.stop()
        disk.close()


def _until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {WAIT_S:g} s"
        gevent.sleep(0.02)


def _scripted_portal(tmp_path: Path) -> tuple[portal_module.Portal, LazyDisk, ScriptedSource]:
    source = ScriptedSource(bytes(16 * MiB))
    disk = LazyDisk.open(str(tmp_path / "cache"), source, unit=UNIT, autocommit_s=None)  # type: ignore[arg-type]
    portal = portal_module.Portal([Target(bounds.IQN, {0: Lun(disk, "vm1")})], ("127.0.0.1", 0),
                                  nop_interval=0)
    portal.start()
    return portal, disk, source


def _write(ini: bounds.Initiator, source: ScriptedSource, lba: int, data: bytes,
           immediate: int) -> tuple[int, bytes, int, set[int]]:
    """One WRITE(10) of ``data`` with ``immediate`` bytes of it as immediate data, every R2T
    answered, every source read failed: (status, sense, bytes sent, offsets of the failed reads)."""
    cdb = bounds.write10(lba, len(data) // BS)
    ini.sock.sendall(ini.command(cdb, write=len(data), data=data[:immediate]))
    ini.sock.settimeout(0.2)
    failed_at: set[int] = set()  # (the store retries a failed read a few times)
    sent = immediate
    while True:
        if source.pending:
            failed_at.add(source.pending[0].offset)
            source.fail(0)
        try:
            header, payload = ini.recv()
        except TimeoutError:
            continue
        if header[0] & 0x3F == Opcode.SCSI_RESPONSE:
            ini.sock.settimeout(bounds.HEALTHY_WITHIN_S)
            return header[3], payload[2:], sent, failed_at
        assert header[0] & 0x3F == Opcode.R2T, header.hex()
        ttt = struct.unpack_from(">I", header, 20)[0]
        offset, length = struct.unpack_from(">II", header, 40)
        assert offset == sent
        for datasn, pos in enumerate(range(offset, offset + length, PDU)):  # MaxRecvDataSegmentLength
            n = min(PDU, offset + length - pos)
            fields = struct.pack(">IIIIII", ttt, 0, 0, 0, datasn, pos)
            out = bounds.bhs(Opcode.SCSI_DATA_OUT, 0x80 if pos + n == offset + length else 0, ini.itt, fields)
            ini.sock.sendall(bounds.frame(out, data[pos:pos + n]))
        sent += length


@pytest.mark.parametrize("keys", ["InitialR2T=No\0ImmediateData=Yes\0", "InitialR2T=Yes\0ImmediateData=No\0"])
def test_a_write_failing_mid_stream_consumes_its_data_and_writes_nothing_more(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keys: str) -> None:
    """The source fails the fetch of the first piece's partial head unit: the command ends with
    the sense a gathered WRITE gets for it (MEDIUM ERROR, unrecovered read error), after the
    initiator has sent all of its data-out, and none of its later pieces reached the store."""
    monkeypatch.setattr(bounds, "KEYS", bounds.KEYS.replace("InitialR2T=No\0ImmediateData=Yes\0", keys))
    portal, disk, source = _scripted_portal(tmp_path)
    try:
        ini = bounds.Initiator.login(portal.address[1], connect=gevent.socket.create_connection)
        data = b"\x33" * (2 * MiB)
        immediate = STREAM_PIECE_BYTES - BS if "ImmediateData=Yes" in keys else 0
        status, sense, sent, failed_at = _write(ini, source, 1, data, immediate)
        assert sent == len(data)  # every byte of its data-out was asked for and taken
        assert status == 0x02 and (sense[2] & 0x0F, sense[12], sense[13]) == (0x03, 0x11, 0x00)
        # nothing after the failed piece: not even the fetch of the last piece's partial tail unit
        assert failed_at == {0} and disk.local_bytes == 0
        ini.sock.sendall(ini.command(bounds.inquiry(), read=96))  # the connection goes on
        assert ini.response(ini.itt)[0] == 0
        ini.close()
    finally:
        portal.stop()
        disk.close()


def test_a_write_failing_its_checks_writes_no_piece(tmp_path: Path) -> None:
    """Another initiator holds a reservation, then a 2 MiB WRITE past the LUN's last block: both
    take all their data-out and end with their status (RESERVATION CONFLICT; ILLEGAL REQUEST, LBA
    out of range), having written nothing and fetched nothing, not even their partial head unit."""
    portal, disk, source = _scripted_portal(tmp_path)
    try:
        other = bounds.Initiator.login(portal.address[1], isid=0x400001370042,
                                       connect=gevent.socket.create_connection)
        other.sock.sendall(other.command(bytes([0x16, 0, 0, 0, 0, 0])))  # RESERVE(6)
        assert other.response(other.itt)[0] == 0
        ini = bounds.Initiator.login(portal.address[1], connect=gevent.socket.create_connection)
        data = b"\x44" * (2 * MiB)
        status, _, sent, _ = _write(ini, source, 1, data, STREAM_PIECE_BYTES - BS)
        assert status == 0x18 and sent == len(data)  # RESERVATION CONFLICT
        other.sock.sendall(other.command(bytes([0x17, 0, 0, 0, 0, 0])))  # RELEASE(6)
        assert other.response(other.itt)[0] == 0
        last = 16 * MiB // BS - 1
        status, sense, sent, _ = _write(ini, source, last, data, STREAM_PIECE_BYTES - BS)
        assert status == 0x02 and (sense[2] & 0x0F, sense[12]) == (0x05, 0x21) and sent == len(data)
        assert source.reads == 0 and disk.local_bytes == 0
        for i in (ini, other):
            i.close()
    finally:
        portal.stop()
        disk.close()


def test_a_segment_with_a_bad_data_digest_is_never_written(tmp_path: Path) -> None:
    """A 1 MiB WRITE over a session with DataDigest=CRC32C: its first piece (immediate data) is
    written; the Data-Out of the next burst arrives with a bad digest, is rejected (RFC 7143
    11.17.1) and never written; the command ends with ABORTED COMMAND, protocol service CRC error
    (11.4.7.2), as a gathered one does, and nothing after its first piece reached the store."""
    portal, disk, source = _scripted_portal(tmp_path)
    try:
        ini = bounds.Initiator.login(portal.address[1], data_digest=True,
                                     connect=gevent.socket.create_connection)
        data = random.Random(5).randbytes(MiB)
        first = STREAM_PIECE_BYTES
        ini.sock.sendall(ini.command(bounds.write10(0, len(data) // BS), write=len(data), data=data[:first]))
        header, _ = ini.recv()
        assert header[0] & 0x3F == Opcode.R2T
        ttt, (offset, length) = struct.unpack_from(">I", header, 20)[0], struct.unpack_from(">II", header, 40)
        assert (offset, length) == (first, STREAM_PIECE_BYTES)
        fields = struct.pack(">IIIIII", ttt, 0, 0, 0, 0, offset)
        pdu = bytearray(bounds.frame(bounds.bhs(Opcode.SCSI_DATA_OUT, 0x80, ini.itt, fields),
                                     data[offset:offset + length], data_digest=True))
        pdu[BHS_LEN + 100] ^= 0xFF  # damaged on the way: its digest no longer matches
        ini.sock.sendall(pdu)
        seen = []
        while (header := ini.recv())[0][0] & 0x3F != Opcode.SCSI_RESPONSE:
            seen.append(header[0][0] & 0x3F)
            if seen[-1] == Opcode.REJECT:
                assert header[0][2] == RejectReason.DATA_DIGEST_ERROR
        assert Opcode.REJECT in seen
        (response, payload) = header
        sense = payload[2:]
        assert response[3] == 0x02 and (sense[2] & 0x0F, sense[12], sense[13]) == (0x0B, 0x47, 0x05)
        assert next(disk.missing_runs(0, first), None) is None  # the piece before it: written
        assert disk.read(0, first) == data[:first]
        assert next(disk.missing_runs(first, len(data) - first), None) == (first, len(data) - first)
        assert source.reads == 0
        ini.close()
    finally:
        portal.stop()
        disk.close()
