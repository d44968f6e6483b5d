"""What the kernel tier runs, started in the background at collection (tests/conftest.py,
tests/background.py) so that the guest works while the host tests run: the guest's build, then
tests/kernel/inguest in it twice, against Debian's kernel with LIO, target_core_user and
open-iscsi (the LIO frontend, and the embedded portal under the kernel's own initiator): once,
the tests that drive the libraries, with this checkout's code in a venv of the newest PyPI
releases of what setup.py asks for (rtslib-fb 2.2.x), as `pip install` gives a user; then every
test, from the Debian package built from this tree (installed in the guest with dpkg;
/usr/bin/lazyiscsi on Debian 12's python3 packages, rtslib-fb 2.1.75). The runs take turns: two
guests at once would share the same two cores. test_guest.py checks what each run reported."""

from __future__ import annotations

import os
import shlex
from concurrent.futures import Future, wait
from pathlib import Path

from tests import background

GUEST = Path(__file__).parent / "guest"
# the first time: the kernel, debootstrap and wheels from the mirror and PyPI
GUEST_BUILD_TIMEOUT_S = 1200
# boot plus the in-guest suite under TCG, on a machine that may be busy (the Debian package's run
# took 660 s on a quiet host with nothing else running)
GUEST_RUN_TIMEOUT_S = 2700
# run.sh's own limit on the guest (GUEST_TIMEOUT, 900 s by default): a little less than ours, so
# that a guest that overruns is stopped and its console shown rather than our wait timing out
GUEST_TIMEOUT_S = GUEST_RUN_TIMEOUT_S - 120
#: the longest a test of the tier may wait for its run: the package, the guest, both runs
TIER_TIMEOUT_S = background.DEB_BUILD_TIMEOUT_S + GUEST_BUILD_TIMEOUT_S + 2 * GUEST_RUN_TIMEOUT_S
PYPI_VENV_PYTHON = "/opt/lazyiscsi/pypi/bin/python"
PYTEST = "LAZYISCSI_IN_GUEST=1 python3 -m pytest -v -p no:cacheprovider --color=no -rA --durations=8"
ALL = tuple(f"tests/kernel/inguest/{f.name}"
            for f in sorted((Path(__file__).parent / "inguest").glob("test_*.py")))
# The PyPI run is there for the libraries, not for the kernel: every test that drives rtslib
# (exports, ACLs and CHAP, configfs changes, backstores made and deleted), a hydrating LUN read
# through LIO, and the portal's CRC32C digests (crc32c) negotiated with the kernel's initiator;
# not the crash tests, which exercise the kernel and our store alike on either, nor the portal's
# data tests under open-iscsi (fio, whole-device reads, discard, mkfs: 90-100 s under TCG), whose
# libraries (gevent, crc32c) are these same PyPI releases in the host suite's venv.
# From test_targetcli.py, the daemon's own D-Bus service (jeepney) and its LIO attach (rtslib-fb
# 2.2.x) under stock targetcli: its test with tcmu-runner (ten restores, 130 s under TCG) adds the
# same libraries' HandlerManager1 call, and passes there by hand.
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
#: the runs, by name: what each installs and selects
SELECTIONS = {"pypi": PYPI_SELECTION, "debian": ALL}

_runs: dict[str, Future[background.Finished]] = {}


def start(names: set[str]) -> None:
    """Start the guest's build and the runs ``names`` (of SELECTIONS), once per session."""
    if _runs or not names:
        return
    # the environment as the session began: a test's monkeypatch.setenv must not reach the guest's runs
    env = {**os.environ, "GUEST_TIMEOUT": str(GUEST_TIMEOUT_S)}
    guest = background.submit("kernel-guest-build", lambda: _build(env))
    if "debian" in names:
        background.debian_package(after=guest)
    previous: Future[background.Finished] | None = None
    for name in SELECTIONS:  # the PyPI run first: it needs no package
        if name in names:
            _runs[name] = background.submit(f"kernel-tier-{name}",
                                            lambda n=name, p=previous: _run(n, guest, p, env))
            previous = _runs[name]


def result(name: str) -> background.Finished:
    """What run ``name`` reported, once it has ended (started here if collection did not)."""
    start({name})
    if name not in _runs:
        raise RuntimeError(f"the kernel tier's {name} run was not started at collection (tests/conftest.py)")
    return _runs[name].result()


def _build(env: dict[str, str]) -> None:
    r = background.run(["bash", str(GUEST / "build.sh"), "--if-needed"], GUEST_BUILD_TIMEOUT_S, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"the guest build failed {r.why}\n{r.stdout[-3000:]}{r.stderr[-3000:]}")


def _run(name: str, guest: Future[None], previous: Future[background.Finished] | None,
         env: dict[str, str]) -> background.Finished:
    guest.result()  # its failure is this run's
    if previous is not None:
        wait([previous])  # however it ended
    files: list[Path] = []
    if name == "debian":
        # nothing of the project share on the path: the package's files and Debian's python3 packages
        deb = background.debian_package().result()
        files.append(deb)
        command = (f"dpkg -i /control/{shlex.quote(deb.name)} >/dev/null"
                   f" && (cd / && PYTHONPATH= /usr/bin/python3 -I -c {shlex.quote(WHICH)})"
                   f" && PYTHONPATH= LAZYISCSI_COMMAND=/usr/bin/lazyiscsi")
    else:
        command = (f"{PYPI_VENV_PYTHON} -c {shlex.quote(WHICH)}"
                   f" && LAZYISCSI_COMMAND={shlex.quote(PYPI_VENV_PYTHON + ' -m lazyiscsi.cli')}")
    argv = ["bash", str(GUEST / "run.sh")]
    for f in files:
        argv += ["-f", str(f)]
    argv.append(f"{command} {PYTEST} {' '.join(SELECTIONS[name])}")
    return background.run(argv, GUEST_RUN_TIMEOUT_S, env=env)
