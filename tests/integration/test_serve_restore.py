"""A restart with sources that are down: `serve` listens after one connect timeout, not one per
volume (it opens every volume before it listens, so they are opened together); the volumes it
could not open are shown as `unopened`, kept on record through later saves, and come back at the
next start once their sources do."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.peers import MiB, Nbdkit, free_port, make_image, wait_listening

LAZYISCSI = [sys.executable, "-m", "lazyiscsi.cli"]
#: --connect-timeout of the restart: three volumes opened one after the other would take 3x this
CONNECT_TIMEOUT_S = 5


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAZYISCSI, *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def serve(port: int, log: Path, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([*LAZYISCSI, "serve", "--listen", f"127.0.0.1:{port}", *extra],
                            stdout=subprocess.DEVNULL, stderr=log.open("a"), text=True)
    wait_listening(port, proc, seconds=60)  # type: ignore[arg-type]
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def states() -> dict[str, str]:
    r = cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return {v["volume"]: v["state"] for v in json.loads(r.stdout)}


def test_sources_down_at_restart(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    image = tmp_path / "src.img"
    make_image(image, 8 * MiB)
    # slow sources (1 Mbit/s): the volumes are still hydrating when serve stops, so they need
    # their sources to open again (a complete cache opens without one: issue 10, defect 4)
    sources = [Nbdkit(["--filter=rate", "file", str(image), "rate=1M"], free_port()).start()
               for _ in range(3)]
    nbdkit.extend(sources)
    port, log = free_port(), tmp_path / "serve.log"
    proc = serve(port, log)
    for i, source in enumerate(sources):
        assert cli("volume", "create", f"v{i}", "--source", source.url).returncode == 0
    stop(proc)
    for source in sources:
        source.kill()
    t0 = time.monotonic()
    proc = serve(port, log, "--connect-timeout", str(CONNECT_TIMEOUT_S))
    listening_after = time.monotonic() - t0
    try:
        assert listening_after < 2 * CONNECT_TIMEOUT_S, listening_after  # not one timeout per volume
        assert states() == {"v0": "unopened", "v1": "unopened", "v2": "unopened"}
        # another volume's create saves the record: the unopened ones stay in it
        assert cli("volume", "create", "w", "--source", str(image)).returncode == 0
        r = cli("volume", "delete", "v2")
        assert r.returncode == 0, r.stderr
    finally:
        stop(proc)
    for source in sources:
        source.start()
    proc = serve(port, log)
    try:
        assert set(states()) == {"v0", "v1", "w"} and "unopened" not in states().values()
    finally:
        stop(proc)
    assert log.read_text().count('"volume_restore_failed"') == 3
