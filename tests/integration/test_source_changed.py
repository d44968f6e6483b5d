"""A source that changes during the copy is a permanent fault, not a transient one (issue 10):
``lazyiscsi hydrate`` stops at once with one line and exit status 4; ``serve`` stops that
volume's copy with one ``source_changed`` event, says why in ``status``, fails reads of units not
yet local with MEDIUM ERROR / UNRECOVERED READ ERROR, and keeps serving the local ones. Real
changing sources: a file modified in place, an nbdkit export replaced behind its URL (the server
restarted on another disk), an nginx object replaced (tests/integration/test_source_identity.py)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.peers import MiB, Nbdkit, free_port, make_image, wait_until
from tests.integration.test_cli_source_faults import LAZYISCSI, Serve, read10
from tests.integration.test_portal_bad_input import login
from tests.integration.test_source_identity import EXIT_SOURCE_CHANGED, assert_only_old_bytes, local_units

#: how soon after the change the copy must have stopped: a redial (at most half a request
#: deadline apart, 5 s by default) and its check, far below the stall timeout the fault used to
#: wait for
STOP_WITHIN_S = 30.0
CHECK_CONDITION, MEDIUM_ERROR = 0x02, 0x3
SIZE = 16 * MiB


def events(err: str, name: str) -> list[dict[str, object]]:
    out = []
    for line in err.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == name:
                out.append(event)
    return out


class ChangingSource:
    """A source at a fixed URL, and how to change it under a running copy."""

    def __init__(self, kind: str, tmp_path: Path, nbdkit: list[Nbdkit], rate: str) -> None:
        self.kind = kind
        self.img = tmp_path / "src.img"
        self.image = make_image(self.img, SIZE)
        self.other = tmp_path / "other.img"
        make_image(self.other, SIZE, seed=99)  # same size, other content: another VM's disk
        self._nbdkit = nbdkit
        if kind == "file":
            self.url = str(self.img)
        else:
            # nbdkit's rate filter counts bits per second
            args = ["--filter=rate", "file", str(self.img), f"rate={rate}"]
            self.server = Nbdkit(args, free_port()).start()
            nbdkit.append(self.server)
            self.url = self.server.url

    def change(self) -> None:
        if self.kind == "file":
            with open(self.img, "r+b") as f:  # in place: same inode, same size, a new mtime
                f.seek(SIZE // 2)
                f.write(b"written at the source site after the copy began")
        else:
            self.server.kill()  # the source site restarted its server on another disk
            self.server = Nbdkit(["file", str(self.other)], self.server.port).start()
            self._nbdkit.append(self.server)


@pytest.fixture(params=["file", "nbd"])
def changing(request: pytest.FixtureRequest, tmp_path: Path,
             nbdkit: list[Nbdkit]) -> Iterator[ChangingSource]:
    yield ChangingSource(request.param, tmp_path, nbdkit, "16M")


def test_hydrate_stops_at_once_with_one_line_and_exit_4(changing: ChangingSource, tmp_path: Path) -> None:
    """Before: the copy retried the changed source pass after pass until --stall-timeout (600 s
    by default), then exited 3 as if the source were merely gone."""
    cache = tmp_path / "cache.img"
    argv = [*LAZYISCSI, "--log-level", "info", "hydrate", "--source", changing.url, "--cache", str(cache),
            "--progress-interval", "0"]
    if changing.kind == "file":
        argv += ["--rate", "2M"]  # a file source is read at disk speed
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(local_units(cache)) * 4096 >= 2 * MiB, "progress", proc=proc)
        changing.change()
        t0 = time.monotonic()
        _out, err = proc.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_SOURCE_CHANGED, err
    assert took < STOP_WITHIN_S, f"stopped {took:.1f} s after the change"
    last = err.strip().splitlines()[-1]
    assert last.startswith("lazyiscsi: error: ") and "changed" in last and "start over" in last, last
    assert len(events(err, "source_changed")) == 1, err
    assert "hydration_run_failed" not in err and "hydration_retry_pass" not in err, err
    assert "Traceback" not in err, err
    assert_only_old_bytes(cache, changing.image)


def status(name: str = "vol0") -> dict[str, object]:
    r = subprocess.run([*LAZYISCSI, "status", name, "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (st,) = json.loads(r.stdout)
    return st  # type: ignore[no-any-return]


def test_serve_stops_the_copy_and_fails_only_reads_of_missing_units(
        changing: ChangingSource, tmp_path: Path) -> None:
    image = changing.image
    serve = Serve(changing.url, tmp_path / "cache.img", "--rate", "512K")
    sock = login(serve.port)
    sock.settimeout(60)
    try:
        code, data, _ = read10(sock, 0, 8, itt=0)
        assert code == 0 and data == image[:4096]
        assert str(status()["source_health"]) == "ok"
        changing.change()
        far = 12 * MiB  # far ahead of a copy limited to 512 KB/s
        code, _, sense = read10(sock, far // 512, 8, itt=1)
        assert code == CHECK_CONDITION, (code, sense.hex())
        # MEDIUM ERROR, UNRECOVERED READ ERROR: that block is lost for good, not "retry later"
        assert (sense[2] & 0x0F, sense[12], sense[13]) == (MEDIUM_ERROR, 0x11, 0x00), sense.hex()
        st: dict[str, object] = wait_until(
            lambda: (s := status())["state"] == "failed" and s, "the copy stopped", STOP_WITHIN_S)
        health = str(st["source_health"])
        assert health.startswith("changed: ") and "changed since" in health, st
        before = st["local_bytes"]
        code, data, sense = read10(sock, 0, 8, itt=2)  # local units are still served
        assert code == 0 and data == image[:4096], (code, sense.hex())
        code, _, sense = read10(sock, far // 512, 8, itt=3)  # and the lost ones stay lost
        assert code == CHECK_CONDITION and sense[2] & 0x0F == MEDIUM_ERROR, sense.hex()
        assert status()["local_bytes"] == before
    finally:
        sock.close()
        err = serve.stop()
    assert len(events(err, "source_changed")) == 1, err
    assert "hydration_failed" not in err, err
    assert_only_old_bytes(tmp_path / "cache.img", image)
