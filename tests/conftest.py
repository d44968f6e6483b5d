"""Every test gets its own control socket and state directory: ``lazyiscsi serve`` started by
a test (or the verbs it runs) never meets another test's daemon, or a real one on this host.
The Debian package is built once per run, for the tests of the installed package and for the
kernel tier's guest."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# dpkg-buildpackage with the unit tests (Debian's python3 packages) and, the first time, apt
# installing the build dependencies
DEB_BUILD_TIMEOUT_S = 1800


@pytest.fixture(autouse=True)
def _private_daemon_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAZYISCSI_CONTROL", str(tmp_path / "control.sock"))
    monkeypatch.setenv("LAZYISCSI_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture(scope="session")
def debian_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb that scripts/deb.sh builds from this tree."""
    out = tmp_path_factory.mktemp("deb")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "deb.sh"), str(out)], capture_output=True, text=True,
                       timeout=DEB_BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    deb = Path(r.stdout.strip().splitlines()[-1])
    assert deb.is_file() and deb.parent == out, r.stdout
    return deb
