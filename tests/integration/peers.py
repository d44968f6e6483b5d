"""Real peers for the integration tests: nbdkit and qemu-nbd on loopback, started and torn
down by fixtures (``--exit-with-parent`` where the server has it, so none outlives the run)."""

from __future__ import annotations

import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

MiB = 1 << 20
T = TypeVar("T")
# Generous: the suite shares small machines with other work; a condition that holds arrives
# long before this, one that never will fails the test with `what` named.
WAIT_S = 60.0
POLL_S = 0.05


def wait_until(condition: Callable[[], T | None], what: str, seconds: float = WAIT_S,
               proc: subprocess.Popen[str] | subprocess.Popen[bytes] | None = None) -> T:
    """Return ``condition()``'s first truthy value; fail naming ``what`` after ``seconds``, or at
    once when ``proc`` exits first (its condition can no longer come)."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: {proc.args!r} exited with {proc.returncode} first")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds:g} s")
        time.sleep(POLL_S)


class Lines:
    """A child's output read line by line in a thread, so that a test can wait for a line
    (an event, a progress line) while the child runs."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._lock:
                self.lines.append(line)

    def since(self, start: int) -> list[str]:
        with self._lock:
            return self.lines[start:]

    def text(self) -> str:
        """Everything read so far, the rest once the child closed the stream."""
        self._thread.join(timeout=WAIT_S)
        return "".join(self.since(0))


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


def wait_listening(port: int, proc: subprocess.Popen[bytes], seconds: float = WAIT_S) -> None:
    """Return once something accepts on 127.0.0.1:port; fail if ``proc`` dies first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        time.sleep(POLL_S)
    raise RuntimeError(f"{proc.args[0]} did not listen on {port}")


def make_image(path: Path, size: int, seed: int = 7) -> bytes:
    rnd = random.Random(seed)
    data = b"".join(rnd.randbytes(MiB) for _ in range(size // MiB))
    path.write_bytes(data)
    return data


