"""The kernel tier: what its two guest runs (tests/kernel/tier.py, started in the background at
collection) reported. Every selected in-guest test passed, none skipped, and the code under test
came from where the run says: the Debian package's files on Debian 12's python3 packages
(rtslib-fb 2.1.75), or this checkout's code on the newest PyPI releases (rtslib-fb 2.2.x). These
tests, marked kernel_tier with their run's name, come last in the session (tests/conftest.py),
when the runs have had the host tests' time."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.kernel import tier

#: how much of the in-guest failure sections an assertion message quotes
MAX_FAILURE_REPORT = 30000
pytestmark = pytest.mark.timeout(tier.TIER_TIMEOUT_S)


def count_tests(selection: tuple[str, ...]) -> int:
    """How many tests the in-guest pytest must report passed for ``selection`` (directories,
    files, node ids): every one, none skipped."""
    n = 0
    for item in selection:
        if "::" in item:
            n += 1
            continue
        path = Path(__file__).parents[2] / item
        for f in ([path] if path.is_file() else sorted(path.glob("test_*.py"))):
            n += len(re.findall(r"^def test_", f.read_text(), re.M))
    return n


def failures(output: str) -> str:
    """pytest's ERRORS and FAILURES sections of the in-guest run: with -rA every passed test's
    captured output follows them, and the tail alone can miss why a test failed."""
    m = re.search(r"^=+ (ERRORS|FAILURES) =+$.*?(?=^=+ (warnings summary|PASSES|short test summary))",
                  output, re.M | re.S)
    return m.group(0)[:MAX_FAILURE_REPORT] + "\n[...]\n" if m else ""


def passed(name: str) -> dict[str, tuple[str, str]]:
    """Run ``name``'s in-guest tests all passed; what WHICH printed: {distribution: (version, file)}."""
    r = tier.result(name)
    print(r.stdout[-20000:])
    assert r.returncode == 0, r.why + "\n" + failures(r.stdout) + r.stdout[-8000:] + r.stderr[-2000:]
    expected = count_tests(tier.SELECTIONS[name])
    summary = re.search(r"=+ (\d+) passed in [^=]*=+\s*$", r.stdout.split("guest: exit")[0], re.M)
    assert summary and int(summary.group(1)) == expected, f"expected {expected} in-guest tests to pass"
    which = {m.group(1): (m.group(2), m.group(3))
             for m in re.finditer(r"^which: (\S+) (\S+) (\S+)$", r.stdout, re.M)}
    assert len(which) == 6, r.stdout[:4000]
    return which


@pytest.mark.kernel_tier("pypi")
def test_kernel_tier_on_the_pypi_versions() -> None:
    which = passed("pypi")
    assert which["lazyiscsi"][1] == "/project/lazyiscsi/__init__.py", which
    for dist in ("rtslib-fb", "gevent", "structlog", "crc32c", "jeepney"):
        assert which[dist][1].startswith("/opt/lazyiscsi/pypi/"), which
    assert which["rtslib-fb"][0].startswith("2.2."), which


@pytest.mark.kernel_tier("debian")
def test_kernel_tier_from_the_debian_package() -> None:
    which = passed("debian")
    for dist, (_version, path) in which.items():
        assert path.startswith("/usr/lib/python3/dist-packages/"), (dist, path)
    assert which["rtslib-fb"][0] == "2.1.75", which
