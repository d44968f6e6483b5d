"""A minimal QMP client (QEMU Machine Protocol, docs/interop/qmp-spec.rst): one JSON object per
line over a Unix socket; commands answer ``return`` or ``error`` in order, events may come
between. Enough for QEMU and qemu-storage-daemon in the migration tests; synchronous, since the
harness drives one step at a time."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

# a command's answer on a busy machine (QEMU under TCG, `quit` draining a disk)
ANSWER_S = 120.0


class QmpError(RuntimeError):
    """A command QEMU answered with ``error``: its class and description."""


class Qmp:
    def __init__(self, path: Path, proc: subprocess.Popen[bytes], seconds: float = 60.0) -> None:
        """Connects to ``path`` once ``proc`` (the QEMU that serves it) listens there; fails at
        once when ``proc`` exits first (its log says why)."""
        deadline = time.monotonic() + seconds
        while True:
            self.sock = socket.socket(socket.AF_UNIX)
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before its QMP "
                                       f"socket {path} listened") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(ANSWER_S)
        self.file = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self._line()  # the greeting
        self.command("qmp_capabilities")

    def _line(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise ConnectionError("QMP: the connection closed")
        return json.loads(line)

    def command(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run ``name`` and return its ``return`` value; events read meanwhile go to ``events``."""
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._line()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise QmpError(f"{name}: {reply['error'].get('class')}: {reply['error'].get('desc')}")
            elif "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()
