"""Issue 10, acceptance 4 through the kernel target: after cutover the source site may be gone.
A cache hydrated to completion is exported by ``serve --frontend lio`` with its source URL
unreachable (nothing listens there), and open-iscsi reads every byte of it, and writes, through
LIO and our TCMU handler. The portal half of the same acceptance is in
tests/integration/test_cli_source_faults.py."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from tests.kernel.inguest.conftest import (
    LAZYISCSI,
    NBD_PORT,
    WORK,
    Daemon,
    _port_open,
    kernel_errors,
    login,
    logout,
    read_direct,
    remove_lio_objects,
    run,
    serve_argv,
    source_bytes,
    wait_for,
    write_direct,
)

IQN = "iqn.2026-11.io.lazyiscsi:ktgone"
#: a source of its own: the module-wide nbdkit on NBD_PORT must stay up for the other tests
PORT = NBD_PORT + 7
SIZE = 16 << 20
CHUNK = 4 << 20


def test_a_complete_cache_serves_through_lio_with_its_source_unreachable(kernel: None) -> None:
    image = source_bytes(SIZE)
    src = WORK / "ktgone-source.img"
    src.write_bytes(image)
    cache = WORK / "ktgone.cache"
    for suffix in ("", ".meta", ".map", ".written", ".boot"):
        Path(f"{cache}{suffix}").unlink(missing_ok=True)
    url = f"nbd://127.0.0.1:{PORT}"
    nbdkit = subprocess.Popen(["nbdkit", "-f", "-r", "-p", str(PORT), "file", str(src)])
    try:
        wait_for("nbdkit", lambda: _port_open(PORT), 30)
        run(*LAZYISCSI, "--log-level", "warning", "hydrate", "--source", url, "--cache", str(cache),
            timeout=600)
    finally:
        nbdkit.terminate()
        nbdkit.wait(timeout=30)
    assert not _port_open(PORT), "the source site must be gone"

    log = WORK / "ktgone.log"
    daemon = Daemon(serve_argv("ktgone", "--source", url, "--iqn", IQN, "--cache", str(cache),
                               "--connect-timeout", "1"), log)
    daemon.start()
    try:
        st = daemon.status("vol0")
        assert st["state"] == "complete" and st["local_bytes"] == SIZE, st
        disk = login(IQN)
        for offset in range(0, SIZE, CHUNK):
            assert read_direct(disk, offset, CHUNK) == image[offset:offset + CHUNK], offset
        # a complete LUN takes writes as well: they land in the cache, no source involved
        data = bytes(range(256)) * 16 * 64
        write_direct(disk, 5 << 20, data)
        assert read_direct(disk, 5 << 20, len(data)) == data
        assert not kernel_errors()
    finally:
        logout(IQN)
        with contextlib.suppress(AssertionError):
            daemon.stop()
        remove_lio_objects(IQN, "vol0")
    text = log.read_text()
    # opened by state: no connection to the source was even tried
    for event in ("source_connected", "source_reconnect", "volume_restore_failed", "Traceback"):
        assert event not in text, text[-4000:]
