"""Real peers for the integration tests: nbdkit and qemu-nbd on loopback, started and torn
down by fixtures (``--exit-with-parent`` where the server has it, so none outlives the run)."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nbdkit:
    """One NBD server on 127.0.0.1:port, restartable on the same port. nbdkit by default;
    ``command`` replaces the program and its listening arguments (qemu-nbd)."""

    def __init__(self, args: list[str], port: int, command: list[str] | None = None) -> None:
        self.args, self.port = args, port
        self.command = command or ["nbdkit", "-f", "-r", "--exit-with-parent", "-i", "127.0.0.1",
                                   "-p", str(port)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nbdkit:
        self.proc = subprocess.Popen([*self.command, *self.args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.port, self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"


def wait_listening(port: int, proc: subprocess.Popen[bytes], seconds: float = 10) -> None:
    """Return once something accepts on 127.0.0.1:port; fail if ``proc`` dies first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args[0]} did not listen on {port}")


def make_image(path: Path, size: int, seed: int = 7) -> bytes:
    rnd = random.Random(seed)
    data = b"".join(rnd.randbytes(MiB) for _ in range(size // MiB))
    path.write_bytes(data)
    return data


