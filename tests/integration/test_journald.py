"""Under systemd, events reach journald as native fields. The test plays journald: it binds the
datagram socket `serve` is pointed at and decodes what arrives (the native protocol, both the
KEY=value and the length-prefixed forms)."""

from __future__ import annotations

import contextlib
import os
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
    assert notify.recv(256) == b"STOPPING=1"
    notify.close()
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
