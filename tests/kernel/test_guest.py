"""The kernel tier: builds (or reuses) the guest, then runs tests/kernel/inguest in it twice,
against Debian's kernel with LIO, target_core_user and open-iscsi (the LIO frontend, and the
embedded portal under the kernel's own initiator): once, every test, from the Debian package
built from this tree (installed in the guest with dpkg; /usr/bin/lazyiscsi on Debian 12's python3
packages, rtslib-fb 2.1.75); once, the tests that drive the libraries, with this checkout's code
in a venv of the newest PyPI releases of what setup.py asks for (rtslib-fb 2.2.x), as
`pip install` gives a user."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import DEB_BUILD_TIMEOUT_S

GUEST = Path(__file__).parent / "guest"
# the first time: the kernel, debootstrap and wheels from the mirror and PyPI
GUEST_BUILD_TIMEOUT_S = 1200
# boot plus the in-guest suite under TCG, on a machine that may be busy (the whole suite took
# 526 s on a loaded host before the targetcli and shell tests, which add 700 s there)
GUEST_RUN_TIMEOUT_S = 2700
# run.sh's own limit on the guest (GUEST_TIMEOUT, 900 s by default): a little less than ours, so
# that a guest that overruns is stopped and its console shown rather than our wait timing out
GUEST_TIMEOUT_S = GUEST_RUN_TIMEOUT_S - 120
PYPI_VENV_PYTHON = "/opt/lazyiscsi/pypi/bin/python"
#: how much of the in-guest failure sections an assertion message quotes
MAX_FAILURE_REPORT = 30000
PYTEST = "LAZYISCSI_IN_GUEST=1 python3 -m pytest -v -p no:cacheprovider --color=no -rA --durations=8"
ALL = tuple(f"tests/kernel/inguest/{f.name}"
            for f in sorted((Path(__file__).parent / "inguest").glob("test_*.py")))
# The second run is there for the libraries, not for the kernel: every test that drives rtslib
# (exports, ACLs and CHAP, configfs changes, backstores made and deleted), a hydrating LUN read
# through LIO, and the portal's CRC32C digests (crc32c) negotiated with the kernel's initiator;
# not the crash tests, which exercise the kernel and our store alike on either, nor the portal's
# data tests under open-iscsi (fio, whole-device reads, discard, mkfs: 90-100 s under TCG), whose
# libraries (gevent, crc32c) are these same PyPI releases in the host suite's venv.
# From test_targetcli.py, the daemon's own D-Bus service (jeepney) and its LIO attach (rtslib-fb
# 2.2.x) under stock targetcli: its test with tcmu-runner (ten restores, 130 s under TCG) adds the
# same libraries' HandlerManager1 call, passes there by hand, and would take CI past 30 minutes.
PYPI_SELECTION = ("tests/kernel/inguest/test_lio_access.py",
                  "tests/kernel/inguest/test_portal_initiator.py::test_discovery_and_login_negotiate_crc32c_digests",
                  "tests/kernel/inguest/test_lio.py::test_lazy_reads_through_the_kernel_target_equal_the_source",
                  "tests/kernel/inguest/test_lio.py::test_volume_delete_removes_the_lio_objects_and_the_device",
                  "tests/kernel/inguest/test_targetcli.py::"
                  "test_targetcli_without_tcmu_runner_creates_and_exports_user_lazy")
# printed before the suite: which lazyiscsi and which dependencies the code under test imports
WHICH = """import importlib, importlib.metadata as md
for dist, name in (("lazyiscsi", "lazyiscsi"), ("rtslib-fb", "rtslib_fb"), ("gevent", "gevent"),
                   ("structlog", "structlog"), ("crc32c", "crc32c"), ("jeepney", "jeepney")):
    try:
        version = md.version(dist)
    except md.PackageNotFoundError:
        version = "-"
    print("which:", dist, version, importlib.import_module(name).__file__)
"""


@pytest.fixture(scope="module")
def guest() -> None:
    build = subprocess.run(["bash", str(GUEST / "build.sh"), "--if-needed"], capture_output=True, text=True,
                           timeout=GUEST_BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]


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


def run_in_guest(command: str, selection: tuple[str, ...], *files: Path) -> dict[str, tuple[str, str]]:
    """Boots the guest and runs ``command`` there followed by the in-guest tests of
    ``selection``, which must all pass; what WHICH printed: {distribution: (version, file)}."""
    argv = ["bash", str(GUEST / "run.sh")]
    for f in files:
        argv += ["-f", str(f)]
    command += f" {PYTEST} {' '.join(selection)}"
    r = subprocess.run([*argv, command], capture_output=True, text=True, timeout=GUEST_RUN_TIMEOUT_S,
                       stdin=subprocess.DEVNULL, env={**os.environ, "GUEST_TIMEOUT": str(GUEST_TIMEOUT_S)})
    print(r.stdout[-20000:])
    assert r.returncode == 0, failures(r.stdout) + r.stdout[-8000:] + r.stderr[-2000:]
    expected = count_tests(selection)
    summary = re.search(r"=+ (\d+) passed in [^=]*=+\s*$", r.stdout.split("guest: exit")[0], re.M)
    assert summary and int(summary.group(1)) == expected, f"expected {expected} in-guest tests to pass"
    which = {m.group(1): (m.group(2), m.group(3))
             for m in re.finditer(r"^which: (\S+) (\S+) (\S+)$", r.stdout, re.M)}
    assert len(which) == 6, r.stdout[:4000]
    return which


@pytest.mark.timeout(DEB_BUILD_TIMEOUT_S + GUEST_BUILD_TIMEOUT_S + GUEST_RUN_TIMEOUT_S)
def test_kernel_tier_from_the_debian_package(guest: None, debian_package: Path) -> None:
    # nothing of the project share on the path: the package's files and Debian's python3 packages
    command = (f"dpkg -i /control/{shlex.quote(debian_package.name)} >/dev/null"
               f" && (cd / && PYTHONPATH= /usr/bin/python3 -I -c {shlex.quote(WHICH)})"
               f" && PYTHONPATH= LAZYISCSI_COMMAND=/usr/bin/lazyiscsi")
    which = run_in_guest(command, ALL, debian_package)
    for dist, (_version, path) in which.items():
        assert path.startswith("/usr/lib/python3/dist-packages/"), (dist, path)
    assert which["rtslib-fb"][0] == "2.1.75", which


@pytest.mark.timeout(GUEST_BUILD_TIMEOUT_S + GUEST_RUN_TIMEOUT_S)
def test_kernel_tier_on_the_pypi_versions(guest: None) -> None:
    command = (f"{PYPI_VENV_PYTHON} -c {shlex.quote(WHICH)}"
               f" && LAZYISCSI_COMMAND={shlex.quote(PYPI_VENV_PYTHON + ' -m lazyiscsi.cli')}")
    which = run_in_guest(command, PYPI_SELECTION)
    assert which["lazyiscsi"][1] == "/project/lazyiscsi/__init__.py", which
    for dist in ("rtslib-fb", "gevent", "structlog", "crc32c", "jeepney"):
        assert which[dist][1].startswith("/opt/lazyiscsi/pypi/"), which
    assert which["rtslib-fb"][0].startswith("2.2."), which
