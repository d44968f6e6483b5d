"""The LIO path end to end: rtslib configuration, open-iscsi over the kernel's iSCSI target, our
TCMU handler serving the ring from a volume that hydrates from nbdkit with 20 ms of delay.

The tests run in file order on one daemon and one session, as an operator's day would: lazy reads,
a filesystem made and used while hydrating, a restart, a SIGKILL under I/O, a volume deleted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.inguest.conftest import (
    NBD_PORT,
    SOURCE_SIZE,
    WORK,
    Daemon,
    kernel_errors,
    login,
    logout,
    read_direct,
    run,
    serve_argv,
    sha,
    source_bytes,
    wait_for,
    write_direct,
)

IQN = "iqn.2026-11.io.lazyiscsi:kt1"
FS_SIZE = 32 << 20  # the filesystem covers the first half: the guest never writes past it
RAW_AT, RAW_LEN = 48 << 20, 1 << 20  # besides one raw write here
#: files the writer of restart_under_io fsyncs one by one; the daemon goes down after the 8th
#: (each costs two fsyncs of a journalled ext4 under TCG: 40 keep the stop well inside the run)
WRITES = 40
MNT = Path("/mnt/kt1")
SOURCE = source_bytes()


@pytest.fixture(scope="module")
def daemon(source: Path) -> Iterator[Daemon]:
    d = Daemon(serve_argv("kt1", "--source", f"nbd://127.0.0.1:{NBD_PORT}", "--iqn", IQN, "--rate", "1M",
                          "--cache", str(WORK / "kt1.cache")), WORK / "kt1.log")
    d.start()
    yield d
    run("umount", str(MNT), check=False)
    logout(IQN)
    if d.proc is not None and d.proc.poll() is None:
        d.stop()
    print((WORK / "kt1.log").read_text()[-6000:])


@pytest.fixture(scope="module")
def disk(daemon: Daemon) -> str:
    return login(IQN)


def test_lazy_reads_through_the_kernel_target_equal_the_source(daemon: Daemon, disk: str) -> None:
    assert daemon.status("vol0")["state"] == "running"
    for offset in (0, 40 << 20, SOURCE_SIZE - (1 << 20)):
        assert read_direct(disk, offset, 1 << 20) == SOURCE[offset:offset + (1 << 20)], offset
    assert Path(f"/sys/block/{Path(disk).name}/size").read_text().strip() == str(SOURCE_SIZE // 512)
    st = daemon.status("vol0")
    assert st["misses"] > 0 and st["local_bytes"] < SOURCE_SIZE, st


def test_filesystem_made_while_hydrating_survives_completion_and_restart(daemon: Daemon, disk: str) -> None:
    # the copy paused while the filesystem is made and used: what is not local yet is fetched on
    # demand (a guest under TCG on a loaded host may take longer than the whole copy otherwise)
    daemon.cli("pause", "vol0")
    # nodiscard: mkfs would otherwise UNMAP the whole LUN (legal, but then nothing is left to compare)
    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0", disk, str(FS_SIZE // 1024))
    st = daemon.status("vol0")
    assert st["state"] == "paused" and st["local_bytes"] < SOURCE_SIZE, st
    MNT.mkdir(parents=True, exist_ok=True)
    run("mount", disk, str(MNT))
    files = {f"f{i}.bin": os.urandom(1024 * (1 + 97 * i)) for i in range(12)}
    for name, data in files.items():
        (MNT / name).write_bytes(data)
    run("sync")
    raw = os.urandom(RAW_LEN)
    write_direct(disk, RAW_AT, raw)
    run("umount", str(MNT))

    daemon.cli("rate", "vol0", "0")
    daemon.cli("resume", "vol0")
    wait_for("hydration to complete", lambda: daemon.status("vol0")["state"] == "complete", 300, 1.0)
    assert daemon.stop() == 0
    daemon.start()

    run("mount", disk, str(MNT))  # the same session and disk: the initiator never logged out
    for name, data in files.items():
        assert sha((MNT / name).read_bytes()) == sha(data), name
    run("umount", str(MNT))
    assert read_direct(disk, RAW_AT, RAW_LEN) == raw
    rest = FS_SIZE
    while rest < SOURCE_SIZE:
        n = min(4 << 20, SOURCE_SIZE - rest)
        got = read_direct(disk, rest, n)
        want = bytearray(SOURCE[rest:rest + n])
        lo, hi = max(RAW_AT, rest), min(RAW_AT + RAW_LEN, rest + n)
        if lo < hi:
            want[lo - rest:hi - rest] = raw[lo - RAW_AT:hi - RAW_AT]
        assert got == want, f"LUN differs from the source in [{rest}, {rest + n})"
        rest += n
    assert not kernel_errors()


WRITER = r"""
import hashlib, os, sys
mnt, log, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(log, "a") as acked:
    for i in range(count):
        data = hashlib.sha256(b"%d" % i).digest() * (2048 * (1 + i % 4))
        path = os.path.join(mnt, "w%03d" % i)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        dfd = os.open(mnt, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        acked.write("%s %s\n" % (path, hashlib.sha256(data).hexdigest()))
        acked.flush()
"""


def restart_under_io(daemon: Daemon, disk: str, sig: signal.Signals) -> None:
    """A writer that fsyncs file after file and notes each one once fsync returned; the daemon
    goes down by ``sig`` in the middle and comes back. Every noted file must read back whole
    after a remount, and neither the writer nor the kernel may have seen an I/O error."""
    before = kernel_errors()
    MNT.mkdir(parents=True, exist_ok=True)
    run("mount", disk, str(MNT))
    acked = WORK / "acked.txt"
    acked.unlink(missing_ok=True)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(MNT), str(acked), str(WRITES)])
    wait_for("the writer to get going",
             lambda: acked.exists() and len(acked.read_text().splitlines()) >= 8, 120)
    rc = daemon.stop(sig)
    assert rc == (0 if sig == signal.SIGTERM else -sig), rc
    stopped_at = len(acked.read_text().splitlines())
    time.sleep(1)
    daemon.start()
    assert writer.wait(timeout=300) == 0, "the writer saw an I/O error"
    lines = acked.read_text().splitlines()
    assert len(lines) == WRITES and stopped_at < WRITES, (stopped_at, len(lines))
    run("umount", str(MNT))
    run("mount", disk, str(MNT))  # read back from the LUN, not the page cache
    for line in lines:
        path, digest = line.split()
        assert sha(Path(path).read_bytes()) == digest, path
    run("umount", str(MNT))
    assert kernel_errors() == before


def test_sigkill_under_io_loses_no_acknowledged_write(daemon: Daemon, disk: str) -> None:
    """Nothing drained: what the killed daemon left in the ring is failed BUSY at the next
    attach (reset_ring) and the initiator retries it."""
    restart_under_io(daemon, disk, signal.SIGKILL)


def test_sigterm_under_io_drains_and_blocks(daemon: Daemon, disk: str) -> None:
    """A clean stop answers what is in the ring, blocks the device (BUSY, retried) and leaves
    the session logged in until the next daemon attaches."""
    restart_under_io(daemon, disk, signal.SIGTERM)


def test_sigkill_right_after_unflushed_writes_during_hydration(daemon: Daemon, disk: str) -> None:
    """The hardest case for a lazy LUN: writes acknowledged with the write cache on (no flush)
    into units still at the source, then SIGKILL before any commit. The restarted daemon must
    keep them rather than fetch those units again over them."""
    daemon.cli("volume", "create", "kt3", "--source", f"nbd://127.0.0.1:{NBD_PORT}", "--rate", "256K")
    iqn3 = "iqn.2026-11.io.lazyiscsi:kt3"
    disk3 = login(iqn3)
    writes = {offset: os.urandom(64 << 10) for offset in (20 << 20, 33 << 20, (60 << 20) + 4096)}
    for offset, data in writes.items():
        write_direct(disk3, offset, data, dsync=False)
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    daemon.start()
    assert daemon.status("kt3")["state"] == "running"
    daemon.cli("rate", "kt3", "0")
    wait_for("kt3 to complete", lambda: daemon.status("kt3")["state"] == "complete", 300, 1.0)
    for offset, data in writes.items():
        assert read_direct(disk3, offset, len(data)) == data, f"the write at {offset} was lost"
    assert read_direct(disk3, 40 << 20, 1 << 20) == SOURCE[40 << 20:41 << 20]
    logout(iqn3)
    daemon.cli("volume", "delete", "kt3")


def test_volume_delete_removes_the_lio_objects_and_the_device(daemon: Daemon, disk: str) -> None:
    daemon.cli("volume", "create", "kt2", "--source", f"nbd://127.0.0.1:{NBD_PORT}")
    iqn2 = "iqn.2026-11.io.lazyiscsi:kt2"
    disk2 = login(iqn2)
    assert read_direct(disk2, 8 << 20, 1 << 20) == SOURCE[8 << 20:9 << 20]
    logout(iqn2)
    daemon.cli("volume", "delete", "kt2")
    core = Path("/sys/kernel/config/target/core")
    assert not list(core.glob("user_*/kt2"))
    assert not Path(f"/sys/kernel/config/target/iscsi/{iqn2}").exists()
    uio_names = [p.read_text() for p in Path("/sys/class/uio").glob("uio*/name")]
    assert not [n for n in uio_names if "/kt2/" in n], uio_names
    assert read_direct(disk, 0, 4096) != b""  # the other volume goes on
