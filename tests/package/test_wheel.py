"""`pip install` stays a way to install lazyiscsi: the wheel built from the tree holds the
targetcli plugin (targetcli-plugin/lazyiscsi_targetcli, mapped by setup.py's package_dir), it
imports from the wheel alone, and the wheel requires configshell-fb."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_the_targetcli_plugin(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("lazyiscsi-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    for module in ("__init__", "client", "framework", "nodes", "shell"):
        assert f"lazyiscsi_targetcli/{module}.py" in names, names
    assert "Requires-Dist: configshell-fb>=1.1.28" in metadata.splitlines()
    # importable from the wheel itself (zipimport), not from this checkout
    code = (f"import sys; sys.path.insert(0, {str(wheel)!r}); "
            "import lazyiscsi_targetcli.shell as s, lazyiscsi.control as c; "
            "print(s.__file__); print(c.__file__)")
    r = subprocess.run([sys.executable, "-I", "-c", code],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert all(line.startswith(f"{wheel}/") for line in r.stdout.split()), r.stdout
