"""Issue 13, acceptance 3: an initiator that logs in the instant `serve` accepts connections
finds its target, even when the source takes seconds to open. A hypervisor reconnecting while
the daemon restarts is that initiator; told "Target not found" (RFC 7143 11.13.5, 0x0203) it
gives up for good, while a refused connection is retried."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.peers import MiB, Nbdkit, free_port, make_image

IQN = "iqn.2026-11.io.lazyiscsi:slow"
#: what nbdkit's delay filter adds to every NBD connection's open: longer than starting serve
OPEN_DELAY_S = 3


def test_a_login_the_moment_the_portal_accepts_finds_its_target(
        tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    img = tmp_path / "src.img"
    make_image(img, 4 * MiB)
    source = Nbdkit(["--filter=delay", "file", str(img), f"delay-open={OPEN_DELAY_S}"],
                    free_port()).start()
    nbdkit.append(source)
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "lazyiscsi.cli", "serve", "--source", source.url,
                             "--cache", str(tmp_path / "c.img"), "--iqn", IQN,
                             "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # as eagerly as an initiator retrying a refused connection
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "serve never listened"
            time.sleep(0.01)
        accepted_after = time.monotonic() - t0
        inq = subprocess.run(["iscsi-inq", "-i", "iqn.2024-01.test:eager",
                              f"iscsi://127.0.0.1:{port}/{IQN}/0"],
                             capture_output=True, text=True, timeout=60)
        assert inq.returncode == 0 and "LAZYISCS" in inq.stdout, inq.stdout + inq.stderr
        # the portal waited for the source: it did not accept before the volume could open
        assert accepted_after >= OPEN_DELAY_S, accepted_after
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
