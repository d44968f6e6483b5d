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
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command[0]} exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.command[0]} did not listen on {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"


def make_image(path: Path, size: int, seed: int = 7) -> bytes:
    rnd = random.Random(seed)
    data = b"".join(rnd.randbytes(MiB) for _ in range(size // MiB))
    path.write_bytes(data)
    return data


