"""The control socket as an operator and a client program meet it (issue 14, finding 8): a
`--control` path that is not a socket is refused and kept; each request line gets exactly one
answer, whatever it holds; a failed `volume create` leaves nothing behind; a unit the copy
cannot move is refused before anything is made."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.peers import MiB, free_port, make_image, wait_listening

LAZYISCSI = [sys.executable, "-m", "lazyiscsi.cli"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAZYISCSI, *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    port = free_port()
    proc = subprocess.Popen([*LAZYISCSI, "serve", "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "serve.log").open("w"), text=True)
    wait_listening(port, proc)  # type: ignore[arg-type]
    yield proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_a_control_path_that_is_not_a_socket_is_refused_and_kept(tmp_path: Path) -> None:
    precious = tmp_path / "notes.txt"
    precious.write_text("not a socket")
    r = cli("--control", str(precious), "serve", "--listen", f"127.0.0.1:{free_port()}")
    lines = [line for line in r.stderr.splitlines() if not line.startswith("{")]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "exists and is not a socket" in lines[0] and str(precious) in lines[0]
    assert precious.read_text() == "not a socket"


def exchange(path: str, payload: bytes) -> list[dict[str, object]]:
    """Send raw bytes, half-close, and read every answer line until the daemon closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(path)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_every_request_line_gets_exactly_one_answer(serve: subprocess.Popen[str]) -> None:
    path = os.environ["LAZYISCSI_CONTROL"]
    requests = [
        b"not json",
        b'["op"]',
        b'{"op": "nope"}',
        b'{"op": "status", "args": {"name": ["a", "list"]}}',
        b'{"op": "rate", "args": {"name": "x", "rate": "fast"}}',
        b'{"op": "rate", "args": {"name": "x", "rate": true}}',
        b'{"op": "pause", "args": {"name": "x", "colour": "red"}}',
        b'{"op": "pause", "args": {}}',
        b'{"op": "volume.create", "args": {"name": "v", "source": "http://[::1"}}',
        b'{"op": "status", "args": {}}',
    ]
    answers = exchange(path, b"\n".join(requests) + b"\n")
    assert len(answers) == len(requests), answers
    assert [a["ok"] for a in answers] == [False] * (len(requests) - 1) + [True]
    errors = [str(a.get("error")) for a in answers]
    for needle, error in zip(["malformed", "malformed", "unknown op", "'name' must be a string",
                              "'rate' must be an integer", "'rate' must be an integer",
                              "unknown argument 'colour'", "missing argument 'name'",
                              "Invalid IPv6 URL"], errors, strict=False):
        assert needle in error, (needle, error)
    # a line over the limit: one answer, then the connection ends (its tail is no request)
    long_line = b'{"op": "status", "args": {"name": "' + b"x" * 70000 + b'"}}\n'
    answers = exchange(path, long_line + b'{"op": "status"}\n')
    assert len(answers) == 1 and "longer than" in str(answers[0]["error"]), answers


def cache_files(state: Path) -> list[str]:
    return sorted(p.name for p in state.glob("vm1.cache*"))


def test_a_failed_create_leaves_nothing_behind(tmp_path: Path, serve: subprocess.Popen[str]) -> None:
    image = tmp_path / "src.img"
    make_image(image, 4 * MiB)
    state = Path(os.environ["LAZYISCSI_STATE_DIR"])
    state.mkdir(parents=True, exist_ok=True)
    (state / "volumes.json").mkdir()  # the record cannot be saved: the create fails last
    r = cli("volume", "create", "vm1", "--source", str(image))
    assert r.returncode == 1 and "cannot save" in r.stderr and "nothing was created" in r.stderr, r.stderr
    assert cache_files(state) == []
    assert cli("status").stdout.strip() == "no volumes"
    # the cache was closed and unlocked: the same volume can be created now
    (state / "volumes.json").rmdir()
    r = cli("volume", "create", "vm1", "--source", str(image))
    assert r.returncode == 0, r.stderr
    assert {"vm1.cache", "vm1.cache.map", "vm1.cache.meta"} <= set(cache_files(state))


@pytest.mark.parametrize(("unit", "reason"), [("2M", "from 512 to 1048576"), ("3000", "power of two"),
                                              ("256", "from 512")])
def test_a_unit_the_copy_cannot_move_is_refused(tmp_path: Path, serve: subprocess.Popen[str],
                                                unit: str, reason: str) -> None:
    image = tmp_path / "src.img"
    make_image(image, 4 * MiB)
    r = cli("volume", "create", "vm1", "--source", str(image), "--unit", unit)
    assert r.returncode == 1 and reason in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert cache_files(Path(os.environ["LAZYISCSI_STATE_DIR"])) == []


def test_hydrate_and_serve_refuse_a_unit_above_the_run_size(tmp_path: Path) -> None:
    image = tmp_path / "src.img"
    make_image(image, 4 * MiB)
    r = cli("hydrate", "--source", str(image), "--cache", str(tmp_path / "c"), "--unit", "2M",
            "--run-size", "1M")
    assert r.returncode == 2 and "--unit 2097152 is above --run-size 1048576" in r.stderr, r.stderr
    r = cli("serve", "--source", str(image), "--cache", str(tmp_path / "c"), "--unit", "2M",
            "--listen", f"127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "--unit 2097152 is above" in r.stderr, r.stderr
    assert not (tmp_path / "c").exists()
    # a unit that fits a larger run is fine for hydrate, and serve then serves that cache
    r = cli("hydrate", "--source", str(image), "--cache", str(tmp_path / "c"), "--unit", "2M",
            "--run-size", "2M")
    assert r.returncode == 0, r.stderr
    port = free_port()
    proc = subprocess.Popen([*LAZYISCSI, "serve", "--source", str(image), "--cache", str(tmp_path / "c"),
                             "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(port, proc)  # type: ignore[arg-type]
        (vol,) = json.loads(cli("status", "--json").stdout)
        assert vol["state"] == "complete"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_backstore_only_on_the_portal_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    """Issue 12: --backstore-only waits for targetcli's user:lazy, which only LIO has."""
    port = free_port()
    proc = subprocess.Popen([*LAZYISCSI, "serve", "--frontend", "portal", "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "serve.log").open("w"), text=True)
    try:
        wait_listening(port, proc)  # type: ignore[arg-type]
        image = tmp_path / "src.img"
        make_image(image, 4 * MiB)
        r = cli("volume", "create", "vm1", "--source", str(image), "--backstore-only")
        assert r.returncode == 1 and "backstore_only needs the LIO frontend" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1
        assert cache_files(Path(os.environ["LAZYISCSI_STATE_DIR"])) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_volume_create_binds_the_source_id_into_the_cache(tmp_path: Path,
                                                           serve: subprocess.Popen[str]) -> None:
    """`volume create --source-id` as `serve --source-id`: the id is part of the identity the
    new cache is bound to, and kept in the volume's record for the restart that checks it."""
    image = tmp_path / "src.img"
    make_image(image, 4 * MiB)
    r = cli("volume", "create", "vm1", "--source", str(image), "--source-id", "vm-a")
    assert r.returncode == 0, r.stderr
    state = Path(os.environ["LAZYISCSI_STATE_DIR"])
    assert ":id=vm-a" in json.loads((state / "vm1.cache.meta").read_text())["source_identity"]
    (record,) = json.loads((state / "volumes.json").read_text())
    assert record["volume"]["source_id"] == "vm-a"
    r = cli("volume", "create", "vm2", "--source", str(image), "--source-id", "")
    assert r.returncode == 1 and r.stderr == "lazyiscsi: error: volume vm2: source id '': a non-empty " \
                                             "printable string\n", r.stderr
