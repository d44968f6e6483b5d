"""`lazyiscsi serve` with real initiators: libiscsi's tools and QEMU's iscsi:// driver, over a
lazily backed LUN whose source is nbdkit with 20 ms of delay."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.peers import MiB, Nbdkit, free_port, make_image, wait_listening

IQN = "iqn.2026-11.io.lazyiscsi:test"
INITIATOR = "iqn.2024-01.test:initiator"


class Serve:
    def __init__(self, source: str, cache: Path, port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lazyiscsi.cli", "serve", "--source", source, "--cache", str(cache),
             "--iqn", IQN, "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_listening(port, self.proc)  # type: ignore[arg-type]
        # the portal listens before the volume is open: its "serving" line says it is
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("serving"), line + self.proc.communicate(timeout=30)[1]

    @property
    def url(self) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{IQN}/0"

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        _out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        return err


@pytest.fixture
def lazy_lun(tmp_path: Path, nbdkit: list[Nbdkit]) -> Iterator[tuple[Serve, bytes, Path, str]]:
    img = tmp_path / "src.img"
    image = make_image(img, 32 * MiB)
    # 20 ms per read, 10 MB/s: the copy takes about 3 s, so the tests run while it hydrates
    server = Nbdkit(["--filter=delay", "--filter=rate", "file", str(img), "rdelay=20ms", "rate=80M"],
                    free_port()).start()
    nbdkit.append(server)
    cache = tmp_path / "cache.img"
    serve = Serve(server.url, cache, free_port())
    yield serve, image, cache, server.url
    if serve.proc.poll() is None:
        serve.proc.kill()
        serve.proc.wait()


def qemu_io(url: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    r = subprocess.run([*args, url], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    return r.stdout


def test_libiscsi_tools_see_the_target(lazy_lun) -> None:  # type: ignore[no-untyped-def]
    serve, image, _, _ = lazy_lun
    ls = subprocess.run(["iscsi-ls", "-i", INITIATOR, "-s", f"iscsi://127.0.0.1:{serve.port}"],
                        capture_output=True, text=True, timeout=30).stdout
    assert f"Target:{IQN}" in ls and "Lun:0" in ls and "DIRECT_ACCESS" in ls
    inq = subprocess.run(["iscsi-inq", "-i", INITIATOR, serve.url], capture_output=True, text=True,
                         timeout=30).stdout
    assert "DIRECT_ACCESS" in inq and "LAZYISCS" in inq
    serial = subprocess.run(["iscsi-inq", "-i", INITIATOR, "-e", "1", "-c", "128", serve.url],
                            capture_output=True, text=True, timeout=30).stdout
    assert re.search(r"[0-9a-f]{20}", serial), serial
    rc = subprocess.run(["iscsi-readcapacity16", "-i", INITIATOR, serve.url], capture_output=True, text=True,
                        timeout=30).stdout
    assert f"RETURNED LOGICAL BLOCK ADDRESS:{len(image) // 512 - 1}" in rc and "LBPME:1" in rc
    missing = subprocess.run(["iscsi-inq", "-i", INITIATOR, f"iscsi://127.0.0.1:{serve.port}/iqn.x:nope/0"],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0


def test_qemu_reads_while_hydrating_then_writes_survive_restart(  # type: ignore[no-untyped-def]
        lazy_lun, tmp_path: Path) -> None:
    serve, image, cache, source_url = lazy_lun
    out = tmp_path / "out.raw"
    t0 = time.monotonic()
    subprocess.run(["qemu-img", "convert", "-O", "raw", serve.url, str(out)], check=True, timeout=120)
    assert out.read_bytes() == image, "a read through iSCSI while hydrating differs from the source"
    assert time.monotonic() - t0 < 60
    # aligned and unaligned writes; the unaligned one needs its units fetched first
    qemu_io(serve.url, "write -P 0x5a 1M 256k", "write -P 0x33 102401 5000", "write -z 4M 64k")
    expected = bytearray(image)
    expected[MiB:MiB + 256 * 1024] = b"\x5a" * 256 * 1024
    expected[102401:107401] = b"\x33" * 5000
    expected[4 * MiB:4 * MiB + 65536] = bytes(65536)
    serve.stop()
    restarted = Serve(source_url, cache, serve.port)
    try:
        qemu_io(restarted.url, "read -P 0x5a 1M 256k", "read -P 0x33 102401 5000")
        subprocess.run(["qemu-img", "convert", "-O", "raw", restarted.url, str(out)], check=True, timeout=120)
        assert out.read_bytes() == bytes(expected), "written ranges or the source's data changed"
    finally:
        restarted.stop()
