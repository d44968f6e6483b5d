"""SendTargets' TargetAddress as a real initiator (libiscsi's iscsi-ls) receives it: the address
the initiator reached, bracketed for IPv6 (RFC 7143 13.8), never the wildcard the portal listens
on, which no initiator can connect to."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.peers import MiB, free_port, wait_listening

IQN = "iqn.2026-11.io.lazyiscsi:sendtargets"
INITIATOR = "iqn.2024-01.test:initiator"


@pytest.fixture
def serve_on(tmp_path: Path) -> Iterator[object]:
    procs: list[subprocess.Popen[str]] = []

    def start(listen_host: str) -> int:
        src = tmp_path / "src.img"
        src.write_bytes(b"\0" * MiB)
        port = free_port()
        listen = f"[{listen_host}]:{port}" if ":" in listen_host else f"{listen_host}:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "lazyiscsi.cli", "serve", "--source", f"file://{src}",
             "--cache", str(tmp_path / "cache.img"), "--state-dir", str(tmp_path / "state"),
             "--frontend", "portal", "--iqn", IQN, "--listen", listen],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        wait_listening(port, proc)  # type: ignore[arg-type]
        return port

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _portals(url: str) -> list[str]:
    out = subprocess.run(["iscsi-ls", "-i", INITIATOR, url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return [line.split("Portal:", 1)[1].strip() for line in out.stdout.splitlines() if "Portal:" in line]


def test_a_wildcard_portal_advertises_the_address_the_initiator_reached(serve_on) -> None:  # type: ignore[no-untyped-def]
    port = serve_on("0.0.0.0")
    assert _portals(f"iscsi://127.0.0.1:{port}") == [f"127.0.0.1:{port},1"]


def test_an_ipv6_portal_advertises_a_bracketed_address(serve_on) -> None:  # type: ignore[no-untyped-def]
    port = serve_on("::")
    assert _portals(f"iscsi://[::1]:{port}") == [f"[::1]:{port},1"]
