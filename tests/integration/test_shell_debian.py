"""test_shell.py again, under Debian's python3 with Debian's python3-configshell-fb (1.1.x) and
targetcli-fb (issue 12, acceptance 4): test_shell.py itself runs on the PyPI configshell-fb in
the project's virtualenv. The tree is this checkout's (PYTHONPATH), the libraries Debian's."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEBIAN_PYTHON = "/usr/bin/python3"
#: the whole of test_shell.py, a serve per test, on a machine shared with other work
SUITE_TIMEOUT_S = 1200


def debian_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'targetcli-plugin'}"}


def test_debian_python_builds_on_targetcli_fb_and_its_configshell_fb() -> None:
    """Debian's targetcli-fb is importable and the nodes subclass its configshell copy."""
    code = ("import configshell_fb, lazyiscsi_targetcli.framework as f; "
            "print(f.configshell.__file__); print(f.UIRoot.__module__); print(configshell_fb.__version__)")
    r = subprocess.run([DEBIAN_PYTHON, "-c", code], capture_output=True, text=True, timeout=120,
                       env=debian_env(), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    module, root, version = r.stdout.split()
    assert module == "/usr/lib/python3/dist-packages/configshell_fb/__init__.py"
    assert root == "targetcli.ui_root" and version.startswith("1.1."), r.stdout


def test_shell_suite_on_debian_configshell_fb() -> None:
    r = subprocess.run([DEBIAN_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                        "tests/integration/test_shell.py"], cwd=ROOT, env=debian_env(), capture_output=True,
                       text=True, timeout=SUITE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    tail = r.stdout.strip().splitlines()[-1]
    # every test ran: the fallback from targetcli's tree too (targetcli-fb is there, LIO is not)
    assert re.match(r"\d+ passed", tail) and " skipped" not in tail and " failed" not in tail, tail
