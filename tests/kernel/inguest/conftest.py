"""What the in-guest tests share: the kernel modules, iscsid, an nbdkit source with WAN-like delay,
``lazyiscsi serve`` on the LIO frontend, and open-iscsi sessions to it. Everything here is the
real thing: Debian's kernel with LIO and target_core_user, open-iscsi, nbdkit."""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

WORK = Path("/var/tmp/lazyiscsi-kernel-tier")
#: the lazyiscsi under test: tier.py runs these tests once with the installed package's
#: /usr/bin/lazyiscsi and once with the PyPI venv's python; by hand, this checkout's code
LAZYISCSI = shlex.split(os.environ.get("LAZYISCSI_COMMAND", "")) or [sys.executable, "-m", "lazyiscsi.cli"]
if "LAZYISCSI_COMMAND" not in os.environ:
    # this checkout's targetcli plugin too (``lazyiscsi shell``), which an install puts beside it
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).parents[3] / "targetcli-plugin"), os.environ.get("PYTHONPATH")) if p)
PORTAL = "127.0.0.1:3260"
NBD_PORT = 10809
SOURCE_SIZE = 64 << 20
#: serve's start: Python compiles every module it imports from the 9p share (no bytecode is
#: written there) under TCG, which takes over a minute when the host's cores are busy
SERVE_READY_TIMEOUT_S = 240


def run(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def wait_for(what: str, predicate, timeout: float = 60.0, interval: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def source_bytes(size: int = SOURCE_SIZE) -> bytes:
    """Every 4 KiB block names its own offset, so a block read from the wrong place shows."""
    block = 4096
    out = bytearray()
    for i in range(size // block):
        label = f"src block {i:08d} ".encode()
        out += (label * (block // len(label) + 1))[:block]
    return bytes(out)


class Daemon:
    """``lazyiscsi serve --frontend lio`` in the background, restartable like systemd would."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv, self.log = argv, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Returns once serve has printed its summary: every volume is exported by then (the
        control socket alone exists earlier)."""
        start = self.log.stat().st_size if self.log.exists() else 0
        out = self.log.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=out, env=env)
        wait_for("serve to be ready",
                 lambda: self._alive() and "  control:  " in self.log.read_text()[start:],
                 SERVE_READY_TIMEOUT_S)

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
        return True

    def cli(self, *args: str) -> str:
        control = self.argv[self.argv.index("--control") + 1]
        return run(*LAZYISCSI, "--control", control, *args).stdout

    def status(self, volume: str) -> dict:  # type: ignore[type-arg]
        (st,) = json.loads(self.cli("status", volume, "--json"))
        return st

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=90)


@pytest.fixture(scope="session")
def kernel() -> None:
    run("modprobe", "-a", "target_core_user", "iscsi_target_mod", "iscsi_tcp", "sd_mod")
    if subprocess.run(["pgrep", "-x", "iscsid"], capture_output=True).returncode != 0:
        run("iscsid")
    WORK.mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="session")
def source(kernel: None) -> Iterator[Path]:
    """nbdkit serving a 64 MiB file with 20 ms added to every read."""
    path = WORK / "source.img"
    path.write_bytes(source_bytes())
    proc = subprocess.Popen(["nbdkit", "-f", "-p", str(NBD_PORT), "--filter=delay", "file", str(path),
                             "rdelay=20ms"])
    wait_for("nbdkit", lambda: _port_open(NBD_PORT), 30)
    yield path
    proc.terminate()
    proc.wait(timeout=30)


def _port_open(port: int) -> bool:
    with contextlib.closing(socket.socket()) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def serve_argv(name: str, *extra: str, frontend: str = "lio", portal: str = PORTAL) -> list[str]:
    return [*LAZYISCSI, "--log-level", "info",
            "--control", str(WORK / f"{name}.sock"), "serve", "--frontend", frontend, "--listen", portal,
            "--state-dir", str(WORK / f"{name}-state"), *extra]


def login(iqn: str, *, discover: bool = True, portal: str = PORTAL) -> str:
    """Log in to ``iqn`` on ``portal``; the /dev name of its LUN 0. Discovery rewrites the node
    records, CHAP settings included: ``discover=False`` keeps them."""
    if discover:
        run("iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", portal)
    run("iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "--login")
    return wait_for(f"the disk of {iqn}", lambda: disk_of(iqn), 60)


def disk_of(iqn: str) -> str | None:
    r = run("iscsiadm", "-m", "session", "-P", "3", check=False)
    current = None
    for line in r.stdout.splitlines():
        m = re.match(r"\s*Target: (\S+)", line)
        if m:
            current = m.group(1)
        m = re.search(r"Attached scsi disk (\w+)\s+State: running", line)
        if m and current == iqn and Path(f"/dev/{m.group(1)}").exists():
            return f"/dev/{m.group(1)}"
    return None


def logout(iqn: str, portal: str = PORTAL) -> None:
    run("iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "--logout", check=False)


def read_direct(dev: str, offset: int, length: int) -> bytes:
    """Through the initiator, not the page cache."""
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT wants
        n = os.preadv(fd, [buf], offset)
        assert n == length, f"{dev}: short read {n} of {length} at {offset}"
        return bytes(buf)
    finally:
        os.close(fd)


def write_direct(dev: str, offset: int, data: bytes, *, dsync: bool = True) -> None:
    """Through the initiator; without ``dsync`` no FUA or cache flush follows (the LUN has its
    write cache on), so only the target's own care keeps it."""
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT | (os.O_DSYNC if dsync else 0))
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
    finally:
        os.close(fd)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def kernel_errors() -> list[str]:
    """What the kernel said went wrong with I/O (what a filesystem would have seen)."""
    r = run("dmesg", check=False)
    return [line for line in r.stdout.splitlines()
            if re.search(r"I/O error|Buffer I/O|EXT4-fs error|critical medium error", line)]


_REMOVE_LIO_OBJECTS = """import sys, rtslib_fb
root = rtslib_fb.RTSRoot()
for target in list(root.targets):
    if target.wwn == sys.argv[1]:
        target.delete()
for so in list(root.storage_objects):
    if so.plugin == "user" and so.name == sys.argv[2]:
        so.delete()
"""


def remove_lio_objects(iqn: str, backstore: str) -> None:
    """Delete what a stopped daemon left in LIO for a ``serve --source`` volume (its target and
    user backstore stay for its restart): the next test's ``vol0`` of another size starts clean
    instead of being refused as a mismatch."""
    run("python3", "-c", _REMOVE_LIO_OBJECTS, iqn, backstore)


SYSTEM_BUS_SOCKET = Path("/run/dbus/system_bus_socket")
SYSTEM_BUS_PID = Path("/run/dbus/pid")


@contextlib.contextmanager
def system_bus() -> Iterator[None]:
    """A system dbus-daemon for the tests that need one (targetcli lists ``user:`` backstores over
    it), stopped afterwards with its pid file and socket removed: dbus-daemon refuses to start
    while a pid file is left, so a bus left behind by one test file would fail the next one's."""
    Path("/run/dbus").mkdir(parents=True, exist_ok=True)
    for stale in (SYSTEM_BUS_PID, SYSTEM_BUS_SOCKET):
        stale.unlink(missing_ok=True)
    run("dbus-uuidgen", "--ensure")
    pid = int(run("dbus-daemon", "--system", "--fork", "--print-pid").stdout.split()[0])
    wait_for("the system bus", SYSTEM_BUS_SOCKET.exists, 60)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        wait_for("the system bus to stop", lambda: not Path(f"/proc/{pid}").exists(), 60)
        for left in (SYSTEM_BUS_PID, SYSTEM_BUS_SOCKET):
            left.unlink(missing_ok=True)
