"""The kernel tier: builds (or reuses) the guest, boots it once and runs tests/kernel/inguest there,
against Debian's kernel with LIO, target_core_user and open-iscsi."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

GUEST = Path(__file__).parent / "guest"


def test_kernel_tier_in_the_guest() -> None:
    build = subprocess.run(["bash", str(GUEST / "build.sh"), "--if-needed"], capture_output=True, text=True,
                           timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    r = subprocess.run(
        ["bash", str(GUEST / "run.sh"),
         "LAZYISCSI_IN_GUEST=1 python3 -m pytest -v -p no:cacheprovider --color=no -rA tests/kernel/inguest"],
        capture_output=True, text=True, timeout=1500)
    print(r.stdout[-20000:])
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-2000:]
    expected = sum(len(re.findall(r"^def test_", f.read_text(), re.M))
                   for f in (Path(__file__).parent / "inguest").glob("test_*.py"))
    summary = re.search(r"=+ (\d+) passed in [^=]*=+\s*$", r.stdout.split("guest: exit")[0], re.M)
    assert summary and int(summary.group(1)) == expected, f"expected {expected} in-guest tests to pass"
