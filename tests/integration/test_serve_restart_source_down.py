"""A daemon restarted while a hydrating volume's source is down, or has become another disk,
keeps serving the volume's local data, as the running daemon does through the same fault:

- source down at the restart: the LUN is exported, a local block reads back right, a missing
  block fails NOT READY (the running case's sense), ``status`` says why; the source comes back on
  the same URL and the copy resumes and completes, byte-identical, without another restart;
- another disk behind the URL at the restart: the LUN is exported, ``source_changed`` (the copy
  stopped, a missing block MEDIUM ERROR), a local block right; ``detach --force`` and ``volume
  delete`` still work.

Before: the volume was left ``unopened`` and its target was not exported at all."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazyiscsi.daemon import REATTACH_MAX_S
from tests.integration.faultproxy import FaultProxy, Mode
from tests.integration.peers import MiB, Nbdkit, free_port, make_image, wait_listening, wait_until
from tests.integration.test_cli_source_faults import LAZYISCSI, Serve, read10
from tests.integration.test_portal_bad_input import IQN, login
from tests.integration.test_source_changed import events
from tests.integration.test_source_identity import local_units

SIZE = 16 * MiB
#: the volume's name: its target is ``<default iqn prefix>:bad``, the IQN login() asks for
NAME = IQN.rsplit(":", 1)[1]
UNIT = 4096
CONNECT_TIMEOUT_S = 2
CHECK_CONDITION, NOT_READY, MEDIUM_ERROR = 0x02, 0x2, 0x3
#: how soon after the source is back the copy must be complete: the retry's wait (at most
#: REATTACH_MAX_S, far less this early), its open (at most the connect timeout), and the copy
#: of what is missing from a local nbdkit (well under a second unloaded; generous for a loaded
#: machine)
RESUMED_WITHIN_S = REATTACH_MAX_S + CONNECT_TIMEOUT_S + 60


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAZYISCSI, *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def status() -> dict[str, object]:
    r = cli("status", NAME, "--json")
    assert r.returncode == 0, r.stderr
    (st,) = json.loads(r.stdout)
    return st  # type: ignore[no-any-return]


class Daemon:
    """``lazyiscsi serve`` on a port of its own, its log in a file that outlives restarts."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.log = tmp_path / "serve.log"
        self.proc: subprocess.Popen[str] | None = None
        self._mark = 0

    def start(self) -> None:
        self._mark = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(
            [*LAZYISCSI, "--log-level", "info", "serve", "--listen", f"127.0.0.1:{self.port}",
             "--connect-timeout", str(CONNECT_TIMEOUT_S)],
            stdout=subprocess.DEVNULL, stderr=self.log.open("a"), text=True)
        wait_listening(self.port, self.proc, seconds=60)  # type: ignore[arg-type]

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(60) == 0, self.since_start()
        self.proc = None

    def since_start(self) -> str:
        """What this run of the daemon logged."""
        return self.log.read_bytes()[self._mark:].decode()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    yield d
    if d.proc is not None:
        d.proc.kill()
        d.proc.wait()


def served_then_restarted(tmp_path: Path, nbdkit: list[Nbdkit], daemon: Daemon, image: Path,
                          proxy: FaultProxy | None = None) -> tuple[Nbdkit, Path]:
    """A runtime volume on a slow nbdkit (2 Mbit/s: still hydrating when the daemon stops),
    behind ``proxy`` if one is given (made on the nbdkit's port), its first unit made local, the
    daemon stopped; returns the stopped source and the cache."""
    source = Nbdkit(["--filter=rate", "file", str(image), "rate=2M"], free_port()).start()
    nbdkit.append(source)
    url = source.url
    if proxy is not None:
        proxy.upstream = ("127.0.0.1", source.port)
        url = f"nbd://127.0.0.1:{proxy.port}/"
    daemon.start()
    r = cli("volume", "create", NAME, "--source", url)
    assert r.returncode == 0, r.stderr
    cache = tmp_path / "state" / f"{NAME}.cache"
    sock = login(daemon.port)
    sock.settimeout(60)
    try:
        code, data, sense = read10(sock, 0, 8, itt=0)  # made local by the guest's own read
        assert code == 0 and data == image.read_bytes()[:UNIT], (code, sense.hex())
    finally:
        sock.close()
    daemon.stop()  # commits the map: what it says is local is local
    source.kill()
    return source, cache


def missing_block(cache: Path) -> int:
    """An LBA (512-byte blocks) of a unit that is not local, as far from the copy as can be."""
    local = set(local_units(cache))
    assert 0 in local
    unit = max(u for u in range(SIZE // UNIT) if u not in local)
    return unit * UNIT // 512


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    p = FaultProxy(("127.0.0.1", 9))  # its upstream is set once the nbdkit behind it runs
    yield p
    p.close()


#: how each way of being down shows in ``status`` (the source's own one-line reason)
DOWN = {"refused": "refused", "silent": "timed out"}


@pytest.mark.parametrize("down", list(DOWN))
def test_source_down_at_restart_serves_local_data_and_resumes(
        tmp_path: Path, nbdkit: list[Nbdkit], daemon: Daemon, proxy: FaultProxy, down: str) -> None:
    """``refused``: the source's server is stopped (its port refuses); ``silent``: the path to
    it is a black hole (connections accepted, nothing answered) until it comes back."""
    img = tmp_path / "src.img"
    image = make_image(img, SIZE)
    silent = down == "silent"
    source, cache = served_then_restarted(tmp_path, nbdkit, daemon, img, proxy if silent else None)
    far = missing_block(cache)
    if silent:
        source.args = ["file", str(img)]  # at full speed once the path is back
        source.start()
        proxy.set_mode(Mode.SILENT)
    else:
        # the one-shot copy is unchanged: it exists to copy, so without its source it fails
        r = subprocess.run([*LAZYISCSI, "hydrate", "--source", source.url, "--cache", str(cache),
                            "--connect-timeout", str(CONNECT_TIMEOUT_S)],
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and last.startswith("lazyiscsi: error: ") and "refused" in last, r.stderr
        assert "Traceback" not in r.stderr
    daemon.start()
    sock = login(daemon.port)  # the target is exported (before: "unopened", no such target)
    sock.settimeout(60)
    try:
        code, data, sense = read10(sock, 0, 8, itt=0)
        assert code == 0 and data == image[:UNIT], (code, sense.hex())
        code, _, sense = read10(sock, far, 8, itt=1)
        # NOT READY, LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE: what a running volume's miss
        # answers while its source is down (scsi/sense.py, SOURCE_UNREACHABLE)
        assert code == CHECK_CONDITION, (code, sense.hex())
        assert (sense[2] & 0x0F, sense[12], sense[13]) == (NOT_READY, 0x04, 0x00), sense.hex()
        st = status()
        assert st["state"] == "running", st
        health = str(st["source_health"])
        assert health.startswith("error: ") and DOWN[down] in health, st
        down = daemon.since_start()
        assert len(events(down, "volume_source_unreachable")) == 1, down
        assert "volume_restore_failed" not in down and "Traceback" not in down, down
        # the source site is back, on the same URL and at full speed
        t0 = time.monotonic()
        if silent:
            proxy.set_mode(Mode.PASS)
        else:
            source.args = ["file", str(img)]
            source.start()
        wait_until(lambda: status()["state"] == "complete", "the copy resumed and completed",
                   RESUMED_WITHIN_S)
        took = time.monotonic() - t0
        code, data, sense = read10(sock, far, 8, itt=2)  # the same session: no restart, no relogin
        assert code == 0 and data == image[far * 512:far * 512 + 8 * 512], (code, sense.hex())
        assert status()["source_health"] == "ok"
    finally:
        sock.close()
    daemon.stop()
    log = daemon.since_start()
    assert len(events(log, "volume_source_attached")) == 1, log
    assert "source_changed" not in log and "Traceback" not in log, log
    assert cache.read_bytes() == image
    print(f"complete {took:.1f} s after the source came back")


def test_another_disk_at_restart_serves_local_data_as_source_changed(
        tmp_path: Path, nbdkit: list[Nbdkit], daemon: Daemon) -> None:
    img = tmp_path / "src.img"
    image = make_image(img, SIZE)
    other = tmp_path / "other.img"
    make_image(other, SIZE, seed=99)  # same size, other content: another VM's disk
    source, cache = served_then_restarted(tmp_path, nbdkit, daemon, img)
    far = missing_block(cache)
    source.args = ["file", str(other)]
    source.start()  # the source site came back serving another disk behind the same URL
    daemon.start()
    sock = login(daemon.port)
    sock.settimeout(60)
    try:
        code, data, sense = read10(sock, 0, 8, itt=0)
        assert code == 0 and data == image[:UNIT], (code, sense.hex())
        code, _, sense = read10(sock, far, 8, itt=1)
        # MEDIUM ERROR, UNRECOVERED READ ERROR: lost for good, as when the running copy meets it
        assert code == CHECK_CONDITION, (code, sense.hex())
        assert (sense[2] & 0x0F, sense[12], sense[13]) == (MEDIUM_ERROR, 0x11, 0x00), sense.hex()
        st = wait_until(lambda: (s := status())["state"] == "failed" and s, "the copy stopped")
        assert str(st["source_health"]).startswith("changed: "), st
        before = st["local_bytes"]
    finally:
        sock.close()
    log = daemon.since_start()
    assert len(events(log, "source_changed")) == 1, log
    assert "volume_restore_failed" not in log and "Traceback" not in log, log
    assert status()["local_bytes"] == before  # nothing of the other disk was taken
    r = cli("detach", NAME, "--force")
    assert r.returncode == 0, r.stderr
    assert status()["state"] == "detached"
    r = cli("volume", "delete", NAME)
    assert r.returncode == 0, r.stderr
    assert not cache.exists()
    daemon.stop()


def test_a_configured_volume_is_served_with_its_source_down_too(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    """``serve --source --cache`` (a configured volume) at a restart: before, serve exited with
    the source's error and the LUN was gone."""
    img = tmp_path / "src.img"
    image = make_image(img, SIZE)
    source = Nbdkit(["--filter=rate", "file", str(img), "rate=2M"], free_port()).start()
    nbdkit.append(source)
    cache = tmp_path / "cache.img"
    serve = Serve(source.url, cache)
    sock = login(serve.port)
    sock.settimeout(60)
    try:
        code, data, sense = read10(sock, 0, 8, itt=0)
        assert code == 0 and data == image[:UNIT], (code, sense.hex())
    finally:
        sock.close()
    serve.stop()
    source.kill()
    far = missing_block(cache)
    serve = Serve(source.url, cache)  # asserts the "serving" line: it did not exit
    sock = login(serve.port)
    sock.settimeout(60)
    try:
        code, data, sense = read10(sock, 0, 8, itt=0)
        assert code == 0 and data == image[:UNIT], (code, sense.hex())
        code, _, sense = read10(sock, far, 8, itt=1)
        assert code == CHECK_CONDITION, (code, sense.hex())
        assert (sense[2] & 0x0F, sense[12], sense[13]) == (NOT_READY, 0x04, 0x00), sense.hex()
    finally:
        sock.close()
    err = serve.stop()
    assert len(events(err, "volume_source_unreachable")) == 1, err
