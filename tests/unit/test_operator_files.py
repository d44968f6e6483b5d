"""What ships for operators lints clean: the systemd unit (systemd-analyze verify), the man
pages (mandoc -T lint and groff -ww) and the example configuration (our own loader)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lazyiscsi import config

ROOT = Path(__file__).resolve().parents[2]


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "etc" / "lazyiscsi.service").read_text()
    assert "Type=notify" in unit and "Restart=on-failure" in unit
    # verify checks that ExecStart's program exists: point it at this checkout's
    local = tmp_path / "lazyiscsi.service"
    local.write_text(unit.replace("/usr/bin/lazyiscsi", str(Path(sys.executable).parent / "lazyiscsi")))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(local)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def test_man_pages_lint_clean() -> None:
    pages = [str(ROOT / "man" / "lazyiscsi.8"), str(ROOT / "man" / "lazyiscsi.toml.5")]
    r = subprocess.run(["mandoc", "-T", "lint", *pages], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    r = subprocess.run(["groff", "-ww", "-man", "-z", *pages], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_example_config_loads() -> None:
    cfg = config.load(str(ROOT / "etc" / "lazyiscsi.toml"))
    assert cfg.listen == ("0.0.0.0", 3260) and cfg.volumes == ()
