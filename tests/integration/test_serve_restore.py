"""A restart with sources that are down: `serve` listens after one connect timeout, not one per
volume (it opens every volume before it listens, so they are opened together); the hydrating
volumes whose sources did not open are served from their caches anyway (`source_health` says
why, test_serve_restart_source_down.py tests what they serve), kept on record through later
saves, and a volume that has no cache yet to serve is shown as `unopened` until a later start."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.peers import MiB, Nbdkit, free_port, make_image, wait_listening, wait_until

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


def statuses() -> dict[str, dict[str, object]]:
    r = cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return {v["volume"]: v for v in json.loads(r.stdout)}


def states() -> dict[str, str]:
    return {name: str(v["state"]) for name, v in statuses().items()}


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
        # served from their caches, the copy waiting for the source (before: "unopened")
        assert states() == {"v0": "running", "v1": "running", "v2": "running"}
        assert all(str(v["source_health"]).startswith("error: ") for v in statuses().values())
        # another volume's create saves the record: the unopened ones stay in it
        assert cli("volume", "create", "w", "--source", str(image)).returncode == 0
        r = cli("volume", "delete", "v2")
        assert r.returncode == 0, r.stderr
        # a volume waiting for its source can still be let go of: the retries stop
        r = cli("detach", "v1", "--force")
        assert r.returncode == 0, r.stderr
        assert statuses()["v1"]["state"] == "detached" and statuses()["v1"]["source_health"] == "detached"
        wait_until(lambda: states()["w"] == "complete", "w's copy from a local file")
    finally:
        stop(proc)
    for source in sources:
        source.start()
    proc = serve(port, log)
    try:
        assert states() == {"v0": "running", "v1": "detached", "w": "complete"}, states()
    finally:
        stop(proc)
    assert log.read_text().count('"volume_source_unreachable"') == 3
    assert '"volume_restore_failed"' not in log.read_text()


def test_a_volume_with_no_cache_yet_is_unopened(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    """Nothing local to serve: its cache is gone (deleted by hand) and so is its source."""
    image = tmp_path / "src.img"
    make_image(image, 8 * MiB)
    source = Nbdkit(["--filter=rate", "file", str(image), "rate=1M"], free_port()).start()
    nbdkit.append(source)
    port, log = free_port(), tmp_path / "serve.log"
    proc = serve(port, log)
    assert cli("volume", "create", "v0", "--source", source.url).returncode == 0
    stop(proc)
    source.kill()
    for path in (tmp_path / "state").glob("v0.cache*"):
        path.unlink()
    proc = serve(port, log, "--connect-timeout", str(CONNECT_TIMEOUT_S))
    try:
        assert states() == {"v0": "unopened"}
    finally:
        stop(proc)
    assert log.read_text().count('"volume_restore_failed"') == 1


def test_a_live_volume_before_its_cutover_is_unopened_without_its_source(tmp_path: Path) -> None:
    """Before its cutover every read of a live volume needs the source (daemon.py says why it is
    not served from its cache): a restart without the source leaves it unopened, as before."""
    image = tmp_path / "live.img"
    make_image(image, 8 * MiB)
    port, log = free_port(), tmp_path / "serve.log"
    proc = serve(port, log)
    r = cli("volume", "create", "lv", "--source", str(image), "--live")
    assert r.returncode == 0, r.stderr
    stop(proc)
    image.rename(tmp_path / "gone.img")
    proc = serve(port, log, "--connect-timeout", str(CONNECT_TIMEOUT_S))
    try:
        assert states() == {"lv": "unopened"}
    finally:
        stop(proc)
    assert log.read_text().count('"volume_restore_failed"') == 1
    assert '"volume_source_unreachable"' not in log.read_text()
