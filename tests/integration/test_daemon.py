"""The operator's loop end to end: `serve` in the background, volumes created, watched, slowed,
paused, verified, detached and served with the source gone, all through the CLI and its control
socket, with nbdkit as the source and QEMU's iSCSI initiator reading the LUN."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.integration.http_servers import Nginx
from tests.integration.peers import MiB, Nbdkit, free_port, make_image, wait_listening, wait_until

#: large enough that the rate-limited phases below never finish the copy, even when a loaded
#: host stretches each of them over seconds
SIZE = 96 * MiB


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lazyiscsi.cli", *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def status(name: str) -> dict[str, Any]:
    r = cli("status", name, "--json")
    assert r.returncode == 0, r.stderr
    (vol,) = json.loads(r.stdout)
    return vol  # type: ignore[no-any-return]


#: bytes a rate-limited copy may be ahead of its limit at any moment: the token bucket lets one
#: 1 MiB run start at once, and one more may be landing when a status is read
BURST = 2 * MiB


def local_after(name: str, seconds: float) -> tuple[int, int, float]:
    """local_bytes before and after ``seconds``, and the most time that can have passed between
    the two readings (each `status` starts a process: seconds on a loaded host)."""
    t0 = time.monotonic()
    before = status(name)["local_bytes"]
    time.sleep(seconds)
    after = status(name)["local_bytes"]
    return before, after, time.monotonic() - t0


def settled(name: str, seconds: float = 60) -> int:
    """local_bytes once a paused volume's runs in flight (sent before the pause) have landed."""
    deadline = time.monotonic() + seconds
    while (vol := status(name))["inflight_runs"]:
        assert time.monotonic() < deadline, f"{name} still has runs in flight after {seconds} s"
        time.sleep(0.1)
    return int(vol["local_bytes"])


class Serve:
    def __init__(self, port: int, log: Path) -> None:
        self.port, self.log = port, log
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lazyiscsi.cli", "--log-level", "info", "serve",
             "--listen", f"127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=self.log.open("a"), text=True)
        wait_listening(self.port, self.proc)  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        while not Path(os.environ["LAZYISCSI_CONTROL"]).exists():
            assert time.monotonic() < deadline, "no control socket"
            time.sleep(0.05)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0


def test_volume_lifecycle_through_the_cli(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    image = tmp_path / "src.img"
    data = make_image(image, SIZE, seed=11)
    src = Nbdkit(["--filter=delay", "file", str(image), "rdelay=5ms"], free_port()).start()
    nbdkit.append(src)
    log = tmp_path / "serve.log"
    serve = Serve(free_port(), log)
    serve.start()
    try:
        r = cli("volume", "create", "vm1", "--source", src.url, "--rate", "1M")
        assert r.returncode == 0 and "created vm1" in r.stdout, r.stderr
        # progress moves, at about the limit
        a, b, elapsed = local_after("vm1", 2.0)
        assert 0 < b - a <= MiB * elapsed + BURST, (a, b, elapsed)
        # a higher limit speeds it up measurably: well above the old limit
        assert cli("rate", "vm1", "4M").returncode == 0
        c, d, elapsed = local_after("vm1", 1.0)
        assert d - c > 2 * MiB * elapsed, (d - c, elapsed)
        # pause stops the bytes (runs in flight finish first), resume restarts them
        assert cli("rate", "vm1", "2M").returncode == 0
        assert cli("pause", "vm1").returncode == 0
        e = settled("vm1")
        _, f, _ = local_after("vm1", 1.0)
        assert e == f and status("vm1")["state"] == "paused"
        # a restart brings the volume back, paused, with its progress
        serve.stop()
        serve.start()
        vol = status("vm1")
        assert vol["state"] == "paused" and vol["local_bytes"] >= f and vol["rate_limit_bps"] == 2 * MiB
        assert cli("resume", "vm1").returncode == 0
        g, h, _ = local_after("vm1", 1.0)
        assert h > g
        # a guest read far ahead of the copy: its neighbourhood is copied before its turn, and
        # status says how much was copied that way
        url = f"iscsi://127.0.0.1:{serve.port}/iqn.2026-11.io.lazyiscsi:vm1/0"
        read = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", f"read {SIZE - MiB} 4k", url],
                              capture_output=True, text=True, timeout=120)
        assert read.returncode == 0, read.stderr
        wait_until(lambda: status("vm1")["hot_bytes"] > 0, "status shows hot bytes")
        assert " hot=" in cli("status", "vm1").stdout
        assert status("vm1")["local_bytes"] < SIZE - MiB  # the copy had not reached it yet
        assert cli("rate", "vm1", "0").returncode == 0
        r = cli("status", "vm1", "--watch", "--interval", "0.2")
        assert r.returncode == 0 and "complete" in r.stdout.splitlines()[-1], r.stdout[-500:] + r.stderr
        # verify: clean, then a planted corruption is found to the unit, then clean again once repaired
        r = cli("verify", "vm1")
        assert r.returncode == 0 and "0 mismatching range(s)" in r.stdout, r.stdout + r.stderr
        cache = tmp_path / "state" / "vm1.cache"
        offset = 5 * MiB + 12345
        with cache.open("r+b") as fh:
            fh.seek(offset)
            fh.write(bytes(b ^ 0xFF for b in data[offset:offset + 100]))
        r = cli("verify", "vm1", "--json")
        assert r.returncode == 4, r.stdout + r.stderr
        (bad,) = json.loads(r.stdout)["mismatches"]
        assert bad["offset"] <= offset and offset + 100 <= bad["offset"] + bad["length"] <= offset + MiB
        with cache.open("r+b") as fh:
            fh.seek(offset)
            fh.write(data[offset:offset + 100])
        assert cli("verify", "vm1").returncode == 0
        # detach, then the source goes away: every read is served locally
        r = cli("detach", "vm1")
        assert r.returncode == 0 and "detached" in r.stdout, r.stderr
        src.kill()
        out = tmp_path / "out.img"
        conv = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(out)],
                              capture_output=True, text=True, timeout=120)
        assert conv.returncode == 0, conv.stderr
        assert out.read_bytes() == data
        assert status("vm1")["state"] == "detached"
    finally:
        serve.stop()
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    names = {e["event"] for e in events}
    assert {"volume_created", "hydration_state", "hydration_rate", "verify_finished", "volume_detached",
            "control_listening", "frontend_selected"} <= names
    frontend = next(e for e in events if e["event"] == "frontend_selected")
    assert frontend["frontend"] == "portal" and "target_core_user" in frontend["reason"]


def test_refusals_name_the_problem_and_never_show_secrets(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    serve = Serve(free_port(), log)
    serve.start()
    try:
        secret = "pa55-w0rd-never-shown"
        r = cli("volume", "create", "web", "--source", f"http://alice:{secret}@127.0.0.1:1/disk.img")
        lines = [line for line in r.stderr.splitlines() if not line.startswith("{")]  # log events
        assert r.returncode == 1 and lines[0].startswith("lazyiscsi: error: volume web: source:"), r.stderr
        assert secret not in r.stdout + r.stderr
        for args, needle in ((("volume", "create", "../x", "--source", "/dev/null"), "volume name '../x'"),
                             (("pause", "ghost"), "no volume 'ghost'"),
                             (("rate", "ghost", "fast"), "fast"),
                             (("detach",), "arguments")):
            r = cli(*args)
            assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert cli("status").stdout.strip() == "no volumes"
    finally:
        serve.stop()
    assert secret not in log.read_text()
    # a second daemon on the same control socket is refused, the first one untouched
    serve.start()
    try:
        r = cli("serve", "--listen", f"127.0.0.1:{free_port()}")
        assert r.returncode == 1 and "another lazyiscsi serve is listening" in r.stderr, r.stderr
        assert cli("status").returncode == 0
    finally:
        serve.stop()


def test_source_password_never_shown_by_status_verify_or_logs(tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    make_image(root / "disk.img", 2 * MiB)
    secret = "s3cret-in-the-url"
    hashed = subprocess.run(["openssl", "passwd", "-apr1", secret], check=True, capture_output=True,
                            text=True).stdout.strip()
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"op:{hashed}\n")
    server = Nginx(root, tmp_path / "nginx", htpasswd=htpasswd)
    log = tmp_path / "serve.log"
    serve = Serve(free_port(), log)
    serve.start()
    shown = ""
    try:
        r = cli("volume", "create", "web", "--source", server.url("disk.img", f"op:{secret}@"), "--json")
        assert r.returncode == 0, r.stderr
        shown += r.stdout + r.stderr
        assert json.loads(r.stdout)["source"].startswith("http://op:")
        for args in (("status",), ("status", "--json"), ("volume", "list", "--json"), ("verify", "web")):
            r = cli(*args)
            assert r.returncode == 0, (args, r.stderr)
            shown += r.stdout + r.stderr
    finally:
        serve.stop()
        server.stop()
    assert secret not in shown
    assert secret not in log.read_text()
    # the state file keeps it (a restart must reconnect), readable by root only
    state = tmp_path / "state" / "volumes.json"
    assert secret in state.read_text() and state.stat().st_mode & 0o777 == 0o600
