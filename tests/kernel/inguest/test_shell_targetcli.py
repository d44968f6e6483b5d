"""``lazyiscsi shell`` on targetcli's real tree (issue 12, acceptance 3): in the guest, with LIO
and Debian's targetcli-fb, the shell's root is targetcli's own (``/backstores``, ``/iscsi`` with
the target our LIO frontend made) with ``/lazy`` beside it, the verbs act on the daemon, and
targetcli's ``refresh`` (which rebuilds the root's children) keeps ``/lazy``. On the host, where
targetcli cannot build its tree without configfs, tests/integration/test_shell.py covers the rest.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.inguest.conftest import (
    LAZYISCSI,
    NBD_PORT,
    WORK,
    Daemon,
    remove_lio_objects,
    serve_argv,
    system_bus,
)

# targetcli-fb is in the guest whose recipe the D-Bus work extends (issue 12); not in older ones
pytest.importorskip("targetcli", reason="this guest has no targetcli-fb")

IQN = "iqn.2026-11.io.lazyiscsi:sh1"


@pytest.fixture(scope="module")
def bus(kernel: None) -> Iterator[None]:
    """targetcli lists its user: backstores over the system bus, and builds no tree without one."""
    with system_bus():
        yield


@pytest.fixture(scope="module")
def daemon(source: Path, bus: None) -> Iterator[Daemon]:
    d = Daemon(serve_argv("sh1", "--source", f"nbd://127.0.0.1:{NBD_PORT}", "--iqn", IQN, "--rate", "256K",
                          "--cache", str(WORK / "sh1.cache")), WORK / "sh1.log")
    d.start()
    yield d
    d.stop()
    remove_lio_objects(IQN, "vol0")  # the next file's targetcli listing starts without them


def shell(*line: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # targetcli's preferences and history of this test alone
    env = {**os.environ, "TARGETCLI_HOME": str(WORK / "sh1-targetcli")}
    return subprocess.run([*LAZYISCSI, "--control", str(WORK / "sh1.sock"), "shell", *line],
                          capture_output=True, text=True, timeout=240, env=env, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


def test_the_root_is_targetcli_s_tree_with_lazy_beside_it(daemon: Daemon) -> None:
    r = shell("ls")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    for node in ("backstores", "fileio", "iscsi", "lazy"):
        assert re.search(rf"^[ |]*o- {node} \.", r.stdout, re.MULTILINE), r.stdout
    assert f"o- {IQN} " in r.stdout, r.stdout  # our LIO frontend's target, as targetcli reads configfs
    assert re.search(r"o- vol0 \.+ \[(running|complete) \d+\.\d% ", r.stdout), r.stdout


def test_verbs_on_targetcli_s_tree(daemon: Daemon) -> None:
    """64 MiB at 256 KiB/s, then 128 KiB/s: the copy runs for minutes, long past these steps
    (each a Python start under TCG)."""
    assert shell("/lazy/vol0", "pause").returncode == 0
    assert daemon.status("vol0")["state"] == "paused"
    assert shell("/lazy/vol0", "rate", "128K").returncode == 0
    assert daemon.status("vol0")["rate_limit_bps"] == 128 << 10
    assert shell("/lazy/vol0", "resume").returncode == 0
    assert daemon.status("vol0")["state"] == "running"
    r = shell("/lazy/vol0", "rate", "fast")
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "lazyiscsi: error: rate: 'fast' is not a size (examples: 4096, 64K, 1MiB, 100MB)"], r.stderr


def test_targetcli_refresh_keeps_lazy(daemon: Daemon) -> None:
    """targetcli's refresh (and clearconfig, restoreconfig) rebuilds the root's children."""
    r = shell(stdin="refresh\nls /lazy\n")
    assert r.returncode == 0, r.stderr
    assert re.search(r"o- lazy \.+ \[Volumes: 1\]\n  o- vol0 ", r.stdout), r.stdout
    r = shell("/", "help")
    assert "saveconfig" in r.stdout  # targetcli's root verbs are there too
