"""`lazyiscsi hydrate` and `serve` when the path to the source fails or the source goes away
(issue 10, acceptance 3 and 4): real nbdkit and nginx behind the fault proxy."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazyiscsi.iscsi.pdu import Opcode
from tests.integration.faultproxy import FaultProxy, Mode
from tests.integration.http_servers import Nginx
from tests.integration.peers import MiB, Nbdkit, free_port, make_image, wait_listening, wait_until
from tests.integration.test_portal_bad_input import IQN, login, recv_pdu, scsi

LAZYISCSI = [sys.executable, "-m", "lazyiscsi.cli"]
#: the store's I/O timeout in these tests; each source request gets a third of it
IO_TIMEOUT = 4.5
#: per connection and direction while the path is up: the copy takes a few seconds
RATE = {"nbd": 4_000_000, "http": 600_000}
NOT_READY = 0x2


@pytest.fixture(params=["nbd", "http"])
def slow_source(request: pytest.FixtureRequest, tmp_path: Path,
                nbdkit: list[Nbdkit]) -> Iterator[tuple[str, FaultProxy, bytes, str]]:
    """A real server behind the proxy, slowed so that the copy takes a few seconds."""
    root = tmp_path / "www"
    root.mkdir()
    image = make_image(root / "disk.img", 16 * MiB)
    nginx = None
    if request.param == "nbd":
        server = Nbdkit(["file", str(root / "disk.img")], free_port()).start()
        nbdkit.append(server)
        proxy = FaultProxy(("127.0.0.1", server.port))
        url = f"nbd://127.0.0.1:{proxy.port}/"
    else:
        nginx = Nginx(root, tmp_path / "nginx")
        proxy = FaultProxy(("127.0.0.1", nginx.port))
        url = f"http://127.0.0.1:{proxy.port}/disk.img"
    proxy.set_mode(Mode.SLOW, RATE[request.param])
    yield url, proxy, image, request.param
    proxy.close()
    if nginx is not None:
        nginx.stop()


def local_units(cache: Path) -> int:
    try:
        return sum(b.bit_count() for b in (cache.parent / (cache.name + ".map")).read_bytes())
    except FileNotFoundError:
        return 0


def test_hydrate_through_a_path_that_goes_silent_completes_after_it_comes_back(
        slow_source: tuple[str, FaultProxy, bytes, str], tmp_path: Path) -> None:
    """Acceptance 3: the path goes silent mid-copy (no RST, sockets open) and loses its
    connections' state; when it comes back the copy completes, byte-identical, within twice
    the I/O timeout. Before issue 10 the copy hung for ever on the dead connections."""
    url, proxy, image, _ = slow_source
    rate = proxy.rate
    cache = tmp_path / "cache.img"
    proc = subprocess.Popen([*LAZYISCSI, "--log-level", "info", "hydrate", "--source", url, "--cache",
                             str(cache), "--io-timeout", str(IO_TIMEOUT), "--progress-interval", "0.5",
                             "--stall-timeout", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: local_units(cache) * 4096 >= len(image) // 8 or proc.poll() is not None,
                   "the copy under way")
        assert proc.poll() is None, proc.communicate()
        before = proxy.accepted
        proxy.set_mode(Mode.SILENT)
        proxy.lose()  # the connections open now never recover: only a redial gets through
        # the deadline (a third of the I/O timeout) fires and the client redials into the silence
        wait_until(lambda: proxy.accepted > before, "a redial after the request deadline", 3 * IO_TIMEOUT)
        time.sleep(IO_TIMEOUT / 3)  # a further deadline of silence, redials included
        assert proc.poll() is None, "hydrate must wait for the path, not give up"
        assert local_units(cache) * 4096 < len(image)
        proxy.set_mode(Mode.SLOW, rate)
        back = time.monotonic()
        _out, err = proc.communicate(timeout=120)
        took = time.monotonic() - back
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert cache.read_bytes() == image
    assert "source_request_deadline" in err
    assert took <= 2 * IO_TIMEOUT, f"completed {took:.1f} s after the path came back"


class Serve:
    def __init__(self, source: str, cache: Path, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [*LAZYISCSI, "--log-level", "warning", "serve", "--source", source, "--cache", str(cache),
             "--iqn", IQN, "--listen", f"127.0.0.1:{self.port}", "--connect-timeout", "2", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_listening(self.port, self.proc)  # type: ignore[arg-type]
        # the portal listens before the volumes are open: their "serving" line says they are
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("serving"), line + self.proc.communicate(timeout=30)[1]

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        _out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        assert "Traceback" not in err, err
        return err


def read10(sock, lba: int, blocks: int, itt: int) -> tuple[int, bytes, bytes]:  # type: ignore[no-untyped-def]
    """READ(10) on an open session: (SCSI status, data, sense)."""
    sock.sendall(scsi(bytes([0x28, 0]) + struct.pack(">I", lba) + bytes([0]) + struct.pack(">H", blocks)
                      + bytes(1), itt=itt, cmdsn=itt, expected=blocks * 512))
    data = b""
    while True:
        bhs, seg = recv_pdu(sock)
        op = bhs[0] & 0x3F
        if op == Opcode.SCSI_DATA_IN:
            data += seg
            if bhs[1] & 0x01:  # S bit: status is in this PDU
                return bhs[3], data, b""
        elif op == Opcode.SCSI_RESPONSE:
            return bhs[3], data, seg[2:]
        # NOP-In and the like: keep reading


def test_serve_fails_reads_with_not_ready_while_silent_and_recovers(
        slow_source: tuple[str, FaultProxy, bytes, str], tmp_path: Path) -> None:
    """Acceptance 3, serve: while the path is silent a read of data not yet local fails with
    NOT READY (within the I/O timeout and a little); when it comes back the same read succeeds,
    on the same session, without a restart."""
    url, proxy, image, _ = slow_source
    serve = Serve(url, tmp_path / "cache.img", "--io-timeout", str(IO_TIMEOUT), "--rate", "64K")
    sock = login(serve.port)
    sock.settimeout(60)
    try:
        status, data, _ = read10(sock, 0, 8, itt=0)
        assert status == 0 and data == image[:4096]
        proxy.set_mode(Mode.SILENT)
        proxy.lose()
        lba = (12 * MiB) // 512  # far ahead of a copy limited to 64 KB/s
        t0 = time.monotonic()
        status, _, sense = read10(sock, lba, 8, itt=1)
        took = time.monotonic() - t0
        assert status == 0x02 and sense[2] & 0x0F == NOT_READY, (status, sense.hex())
        assert took < IO_TIMEOUT + 3
        proxy.set_mode(Mode.PASS)
        status, data, sense = read10(sock, lba, 8, itt=2)
        assert status == 0 and data == image[12 * MiB:12 * MiB + 4096], (status, sense.hex())
    finally:
        sock.close()
        serve.stop()


def test_a_complete_cache_serves_with_its_source_gone(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    """Acceptance 4 (defect 4): after cutover the source site may be gone. A complete cache
    opens and serves with its source URL unreachable; no identity check, no connection.
    Before issue 10 `serve` refused to start (it opened the source first)."""
    img = tmp_path / "src.img"
    image = make_image(img, 8 * MiB)
    server = Nbdkit(["file", str(img)], free_port()).start()
    nbdkit.append(server)
    cache = tmp_path / "cache.img"
    r = subprocess.run([*LAZYISCSI, "--log-level", "warning", "hydrate", "--source", server.url,
                        "--cache", str(cache)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    server.kill()  # the source site is decommissioned
    serve = Serve(server.url, cache)
    try:
        inq = subprocess.run(["iscsi-inq", "-i", "iqn.2024-01.test:good", f"iscsi://127.0.0.1:{serve.port}/{IQN}/0"],
                             capture_output=True, text=True, timeout=30)
        assert inq.returncode == 0 and "DIRECT_ACCESS" in inq.stdout, inq.stderr
        out = tmp_path / "out.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", f"iscsi://127.0.0.1:{serve.port}/{IQN}/0",
                        str(out)], check=True, timeout=120)
        assert out.read_bytes() == image
    finally:
        serve.stop()
    # hydrate of a complete cache with the source gone: nothing to do, exit 0
    r = subprocess.run([*LAZYISCSI, "--log-level", "warning", "hydrate", "--source", server.url,
                        "--cache", str(cache), "--connect-timeout", "1"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def test_a_complete_runtime_volume_comes_back_with_its_source_gone(
        tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    """Acceptance 4 through the daemon's own path (the one LIO volumes take too): a runtime
    volume hydrated to completion is restored by a restarted `serve` although its source is
    gone, and reads through iSCSI. Before issue 10 its restore failed on the source."""
    img = tmp_path / "src.img"
    image = make_image(img, 8 * MiB)
    server = Nbdkit(["file", str(img)], free_port()).start()
    nbdkit.append(server)
    port = free_port()

    def serve() -> subprocess.Popen[str]:
        proc = subprocess.Popen([*LAZYISCSI, "--log-level", "info", "serve", "--listen", f"127.0.0.1:{port}",
                                 "--connect-timeout", "2", "--frontend", "portal"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_listening(port, proc)  # type: ignore[arg-type]
        wait_until(lambda: Path(os.environ["LAZYISCSI_CONTROL"]).exists(), "the control socket")
        return proc

    def state() -> str:
        r = subprocess.run([*LAZYISCSI, "status", "vm1", "--json"], capture_output=True, text=True,
                           timeout=60)
        return str(json.loads(r.stdout)[0]["state"]) if r.returncode == 0 else r.stderr

    proc = serve()
    try:
        r = subprocess.run([*LAZYISCSI, "volume", "create", "vm1", "--source", server.url],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: state() == "complete", "the volume complete")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    server.kill()  # the source site is gone
    proc = serve()
    try:
        wait_until(lambda: state() == "complete", "the volume restored", 30)
        out = tmp_path / "out.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw",
                        f"iscsi://127.0.0.1:{port}/iqn.2026-11.io.lazyiscsi:vm1/0", str(out)],
                       check=True, timeout=120)
        assert out.read_bytes() == image
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert "volume_restore_failed" not in err and "Traceback" not in err, err


def test_verify_through_a_path_that_goes_silent_stops_with_the_reason_and_runs_again(
        slow_source: tuple[str, FaultProxy, bytes, str], tmp_path: Path) -> None:
    """`lazyiscsi verify` while its source goes silent mid-compare: it stops within two request
    deadlines with the source's reason, `status` shows no verify running any more, and the same
    verify runs to the end once the path is back. Before, its reads waited for the source for
    ever at background priority: the command never returned and every later verify of the
    volume was refused as "already running"."""
    url, proxy, _image, _ = slow_source
    control = tmp_path / "ctl.sock"
    serve = Serve(url, tmp_path / "cache.img", "--io-timeout", str(IO_TIMEOUT), "--control", str(control))
    cli = [*LAZYISCSI, "--control", str(control)]

    def status() -> dict:  # type: ignore[type-arg]
        out = subprocess.run([*cli, "status", "--json"], capture_output=True, text=True, timeout=30,
                             check=True)
        (vol,) = json.loads(out.stdout)
        return vol

    try:
        wait_until(lambda: status()["local_bytes"] >= 4 * MiB, "4 MiB local to compare")
        subprocess.run([*cli, "pause", "vol0"], check=True, timeout=30)
        proxy.set_mode(Mode.SLOW, 64_000)  # >= 4 MiB to compare at 64 KB/s: a minute of reads
        verify = subprocess.Popen([*cli, "verify", "vol0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        # its source open, its first reads in flight (1 MiB each: 16 s at this rate)
        wait_until(lambda: status()["verify_offset"] is not None, "verify comparing", proc=verify)
        proxy.set_mode(Mode.SILENT)
        proxy.lose()
        t0 = time.monotonic()
        _out, err = verify.communicate(timeout=6 * IO_TIMEOUT)
        took = time.monotonic() - t0
        assert verify.returncode == 1, err
        assert err.startswith("lazyiscsi: error: volume vol0: verify stopped: "), err
        assert "Traceback" not in err, err
        assert took <= IO_TIMEOUT + 5, f"verify stopped {took:.1f} s after the path went silent"
        assert status()["verify_offset"] is None
        proxy.set_mode(Mode.PASS)
        again = subprocess.run([*cli, "verify", "vol0"], capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert again.stdout.endswith("0 mismatching range(s)\n"), again.stdout
    finally:
        serve.stop()
