"""A live volume (issue 11) through LIO and our TCMU handler, under the kernel's own initiator:
before the cutover the kernel's writes fail with DATA PROTECT, WRITE PROTECTED while its reads
go on; after `lazyiscsi cutover` the kernel sees one UNIT ATTENTION, MODE PARAMETERS CHANGED,
retries, and its writes land, in the cache and never in the source."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.inguest.conftest import (
    NBD_PORT,
    WORK,
    Daemon,
    login,
    logout,
    read_direct,
    remove_lio_objects,
    run,
    serve_argv,
    source_bytes,
    write_direct,
)

IQN = "iqn.2026-11.io.lazyiscsi:ktl"
SOURCE = source_bytes()


@pytest.fixture(scope="module")
def daemon(source: Path) -> Iterator[Daemon]:
    d = Daemon(serve_argv("ktl", "--source", f"nbd://127.0.0.1:{NBD_PORT}", "--iqn", IQN, "--live",
                          "--cache", str(WORK / "ktl.cache")), WORK / "ktl.log")
    d.start()
    yield d
    logout(IQN)
    if d.proc is not None and d.proc.poll() is None:
        d.stop()
    remove_lio_objects(IQN, "vol0")
    print((WORK / "ktl.log").read_text()[-4000:])


def test_live_lun_through_lio_refuses_writes_until_cutover(daemon: Daemon, source: Path) -> None:
    disk = login(IQN)
    run("dmesg", "-C")
    assert daemon.status("vol0")["phase"] == "pre-copy"
    assert read_direct(disk, 0, 1 << 20) == SOURCE[:1 << 20]
    data = os.urandom(64 * 1024)
    with pytest.raises(OSError) as refused:
        write_direct(disk, 1 << 20, data)
    # Linux fails a DATA PROTECT write as a target error (BLK_STS_TARGET: EREMOTEIO, "critical
    # target error"), no retry, and prints the sense it got
    assert refused.value.errno == errno.EREMOTEIO
    kernel = run("dmesg").stdout
    assert "critical target error" in kernel and "Write protected" in kernel, kernel[-3000:]
    assert daemon.status("vol0")["local_bytes"] == 0  # no bitmap: nothing cached before the cutover
    daemon.cli("cutover", "vol0")
    write_direct(disk, 1 << 20, data)  # the kernel gets the unit attention, and retries
    assert read_direct(disk, 1 << 20, len(data)) == data
    assert source.read_bytes()[1 << 20:(1 << 20) + len(data)] == SOURCE[1 << 20:(1 << 20) + len(data)]
    kernel = run("dmesg").stdout
    assert kernel.count("Mode parameters changed") == 1, kernel[-3000:]
    # the refused write left an I/O error in the kernel log on purpose; the other files assert
    # that there is none since they began
    run("dmesg", "-C")
