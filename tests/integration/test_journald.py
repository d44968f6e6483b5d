"""Under systemd, events reach journald as native fields. The test plays journald: it binds the
datagram socket `serve` is pointed at and decodes what arrives (the native protocol, both the
KEY=value and the length-prefixed forms); and systemd's notify socket (READY, STATUS, WATCHDOG).
No journald runs on the test host, so `journalctl -o json` itself is not asked."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.integration.peers import MiB, free_port, make_image


def decode(datagram: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(datagram):
        nl = datagram.index(b"\n", pos)
        line = datagram[pos:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            pos = nl + 1
        else:  # KEY \n <u64 le length> <value> \n
            key = line
            (n,) = struct.unpack_from("<Q", datagram, nl + 1)
            value = datagram[nl + 9:nl + 9 + n]
            assert datagram[nl + 9 + n:nl + 10 + n] == b"\n"
            pos = nl + 10 + n
        fields[key.decode()] = value.decode()
    return fields


def test_events_arrive_as_journal_fields_without_secrets(tmp_path: Path) -> None:
    journal_path = str(tmp_path / "journal.sock")
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(journal_path)
    journal.settimeout(0.2)
    events: list[dict[str, str]] = []
    listening = threading.Event()
    listening.set()

    def drain() -> None:  # as journald does: read all the time
        while listening.is_set():
            with contextlib.suppress(TimeoutError):
                events.append(decode(journal.recv(1 << 16)))

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    image = tmp_path / "src.img"
    make_image(image, 4 * MiB)
    port = free_port()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # as systemd does for Type=notify
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(20)
    env = {**os.environ, "LAZYISCSI_JOURNAL_SOCKET": journal_path,
           "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    proc = subprocess.Popen([sys.executable, "-m", "lazyiscsi.cli", "serve", "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    secret = "hunter2-but-longer"
    try:
        assert notify.recv(256) == b"READY=1"
        # ready means ready: the portal accepts and the control socket exists already
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert Path(os.environ["LAZYISCSI_CONTROL"]).exists()
        cli = [sys.executable, "-m", "lazyiscsi.cli"]
        subprocess.run([*cli, "volume", "create", "vm1", "--source", str(image)], check=True,
                       capture_output=True, timeout=60)
        bad = subprocess.run([*cli, "volume", "create", "vm2", "--source",
                              f"https://bob:{secret}@127.0.0.1:1/x.img"], capture_output=True, text=True)
        assert bad.returncode == 1 and secret not in bad.stderr
        for wanted in ("volume_created", "control_request_failed"):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(e.get("EVENT") == wanted for e in list(events)):
                time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        listening.clear()
        reader.join()
        journal.close()
    notes = []
    while (note := notify.recv(256)) != b"STOPPING=1":
        notes.append(note)
    notify.close()
    assert notes and all(n.startswith(b"STATUS=") for n in notes), notes
    assert stderr.strip() == "", stderr  # everything went to the journal, nothing to stderr
    created = next(e for e in events if e["EVENT"] == "volume_created")
    assert created["VOLUME"] == "vm1" and created["SIZE"] == str(4 * MiB)
    assert created["PRIORITY"] == "6" and created["SYSLOG_IDENTIFIER"] == "lazyiscsi"
    assert created["MESSAGE"].startswith("volume_created ") and "volume=vm1" in created["MESSAGE"]
    failed = next(e for e in events if e["EVENT"] == "control_request_failed")
    assert failed["PRIORITY"] == "4" and failed["VOLUME"] == "vm2" and failed["OP"] == "volume.create"
    for event in events:
        assert all(secret not in value for value in event.values()), event
        assert all(key.isupper() and not key.startswith("_") for key in event), event


class Journal:
    """A datagram socket read as journald reads its own, decoded into field dicts."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.events: list[dict[str, str]] = []
        self._running = threading.Event()
        self._running.set()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while self._running.is_set():
            with contextlib.suppress(TimeoutError):
                self.events.append(decode(self.sock.recv(1 << 20)))

    def wait_for(self, event: str, seconds: float = 30) -> dict[str, str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = [e for e in list(self.events) if e.get("EVENT") == event]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no {event} in {[e.get('EVENT') for e in self.events]}")

    def close(self) -> None:
        self._running.clear()
        self._reader.join()
        self.sock.close()


#: `serve` with a bug planted in the volume manager: `status` raises KeyError (a lazyiscsi bug
#: as the control socket meets it: neither a refusal nor a bad argument)
PLANTED_BUG = ("import sys; from lazyiscsi import daemon; "
               "daemon.VolumeManager.status = lambda self, name=None: {}['planted_bug']; "
               "from lazyiscsi.cli import main; sys.exit(main(sys.argv[1:]))")


def test_internal_error_traceback_reaches_journal_and_json_fields(tmp_path: Path) -> None:
    """Issue 13: a forced internal error shows its traceback as a field (journald: EXCEPTION,
    JSON lines: exception frames); the client still gets its one answer."""
    journal = Journal(tmp_path / "journal.sock")
    port = free_port()
    env = {**os.environ, "LAZYISCSI_JOURNAL_SOCKET": journal.path}
    proc = subprocess.Popen([sys.executable, "-c", PLANTED_BUG, "serve", "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        journal.wait_for("control_listening")
        r = subprocess.run([sys.executable, "-m", "lazyiscsi.cli", "status"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 1 and "status: internal error in the daemon" in r.stderr, r.stderr
        crashed = journal.wait_for("control_request_crashed")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        journal.close()
    assert crashed["PRIORITY"] == "3" and crashed["OP"] == "status"
    assert crashed["EXCEPTION"].startswith("Traceback (most recent call last):")
    assert "KeyError: 'planted_bug'" in crashed["EXCEPTION"] and "control.py" in crashed["EXCEPTION"]
    assert "\n" not in crashed["MESSAGE"]  # the traceback has its own field
    assert sum(e.get("EVENT") == "control_request_crashed" for e in journal.events) == 1

    # the same daemon logging JSON lines (no journal): the traceback as structured frames
    proc = subprocess.Popen([sys.executable, "-c", PLANTED_BUG, "serve", "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not Path(os.environ["LAZYISCSI_CONTROL"]).exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        r = subprocess.run([sys.executable, "-m", "lazyiscsi.cli", "status"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 1 and "internal error" in r.stderr, r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    (event,) = [json.loads(line) for line in stderr.splitlines()
                if line.startswith("{") and "control_request_crashed" in line]
    (exc,) = event["exception"]
    assert exc["exc_type"] == "KeyError" and "planted_bug" in exc["exc_value"]
    assert any(f["filename"].endswith("control.py") for f in exc["frames"])
    assert all("locals" not in f or f["locals"] is None for f in exc["frames"])  # may hold a password


def test_status_and_watchdog_reach_systemd(tmp_path: Path) -> None:
    """Issue 13: `systemctl status` shows the volumes (STATUS=), and with WatchdogSec= the
    daemon pings (WATCHDOG=1) at half the interval systemd gives in $WATCHDOG_USEC."""
    image = tmp_path / "src.img"
    make_image(image, 4 * MiB)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(20)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([sys.executable, "-m", "lazyiscsi.cli", "serve", "--source", str(image),
                             "--cache", str(tmp_path / "c.img"), "--listen", f"127.0.0.1:{free_port()}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    notes: list[tuple[float, bytes]] = []
    try:
        assert notify.recv(256) == b"READY=1"
        while sum(n == b"WATCHDOG=1" for _, n in notes) < 5:
            notes.append((time.monotonic(), notify.recv(256)))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        notify.close()
    status = [n for _, n in notes if n.startswith(b"STATUS=")]
    assert status and status[0].startswith(b"STATUS=1 volume(s): vol0 "), status
    assert re.search(rb"vol0 \w+ \d+\.\d%", status[0]), status
    pings = [t for t, n in notes if n == b"WATCHDOG=1"]
    gaps = sorted(b - a for a, b in itertools.pairwise(pings))
    # about every 0.2 s (half of WatchdogSec); the median, so that a loaded host's one late ping
    # does not fail the test, yet a daemon pinging at its 5 s STATUS pace does
    assert 0.1 < gaps[len(gaps) // 2] < 0.4, gaps


def test_a_cli_internal_error_is_one_line_plus_its_traceback_in_the_log(tmp_path: Path) -> None:
    """The command's own bug (not the daemon's): one line for the operator, and the
    internal_error event with the traceback's frames in the JSON log line."""
    planted = ("import sys; from lazyiscsi import commands; "
               "commands._status = lambda args, name: {}['planted_bug']; "
               "from lazyiscsi.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", planted, "status"], capture_output=True, text=True, timeout=60)
    lines = r.stderr.splitlines()
    assert r.returncode == 1 and lines[-1].startswith("lazyiscsi: error: internal error: KeyError"), r.stderr
    (event,) = [json.loads(line) for line in lines if line.startswith("{")]
    assert event["event"] == "internal_error" and event["level"] == "error"
    (exc,) = event["exception"]
    assert exc["exc_type"] == "KeyError" and any(f["name"] == "<lambda>" for f in exc["frames"])


JOURNALD = "/lib/systemd/systemd-journald"
#: a journald of its own in a private mount namespace (tmpfs over /run/systemd and /run/log, and
#: cgroup2 at /sys/fs/cgroup where nothing is mounted there, as in a container or a chroot):
#: the host's journal, if any, is never touched; `journalctl -D` reads what it stored
REAL_JOURNAL = """
set -eu
mkdir -p /run/systemd /run/log
mount -t tmpfs tmpfs /run/systemd
mount -t tmpfs tmpfs /run/log
mkdir -p /run/systemd/journal
# journald gives up without a cgroup filesystem; a booted system has one, a bare namespace may not
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup
{journald} & JD=$!
trap 'kill $JD' EXIT
n=0; until [ -S /run/systemd/journal/socket ]; do n=$((n+1)); [ $n -lt 600 ]; sleep 0.05; done
LAZYISCSI_JOURNAL_SOCKET=/run/systemd/journal/socket {python} -c "$PLANTED" serve --listen 127.0.0.1:{port} \\
    2>/dev/null & S=$!
n=0; until [ -S "$LAZYISCSI_CONTROL" ]; do n=$((n+1)); [ $n -lt 1200 ]; sleep 0.05; done
{python} -m lazyiscsi.cli status >/dev/null 2>&1 || true
kill -TERM $S; wait $S
n=0
until journalctl -D /run/log/journal -o json EVENT=control_request_crashed | grep -q EXCEPTION; do
    n=$((n+1)); [ $n -lt 600 ]; sleep 0.05
done
journalctl -D /run/log/journal -o json EVENT=control_request_crashed
"""


def test_a_real_journald_shows_the_traceback_in_journalctl_json(tmp_path: Path) -> None:
    """Issue 13, acceptance 5, with systemd's own journald and journalctl (no unit: the
    daemon is pointed at that journald's socket as systemd would connect it)."""
    script = REAL_JOURNAL.format(journald=JOURNALD, python=sys.executable, port=free_port())
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "PLANTED": PLANTED_BUG})
    assert r.returncode == 0, r.stdout + r.stderr
    entries = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(entries) == 1, r.stdout
    (entry,) = entries
    assert entry["SYSLOG_IDENTIFIER"] == "lazyiscsi" and entry["PRIORITY"] == "3" and entry["OP"] == "status"
    assert entry["EXCEPTION"].startswith("Traceback (most recent call last):")
    assert "KeyError: 'planted_bug'" in entry["EXCEPTION"]
