"""Slow work that the session starts as soon as collection shows a selected test needs it, and
that runs in a thread while the other tests run: the Debian package (dpkg-buildpackage, unit tests
included) and the kernel tier's guest build and runs (tests/kernel/tier.py). The tier's guest
under TCG leaves the host's two cores about 40 % idle, and the host tests wait on sockets and
timers more than they compute: run one after the other, the suite took 29 minutes on a fresh
root and 34 in CI.

Every command runs in its own process group: an interrupted session (``stop``, at unconfigure)
kills it with what it started (QEMU under ``timeout``), rather than leaving it to run on."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
# dpkg-buildpackage with the unit tests (Debian's python3 packages) and, the first time, apt
# installing the build dependencies
DEB_BUILD_TIMEOUT_S = 1800

_running: set[subprocess.Popen[str]] = set()
_stopping = threading.Event()
_lock = threading.Lock()
_deb: Future[Path] | None = None
_scratch: list[str] = []


@dataclass(frozen=True)
class Finished:
    """What a command left: its exit status (None: stopped or out of time, ``why`` says which)
    and its output."""

    returncode: int | None
    stdout: str
    stderr: str
    why: str = ""


def run(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> Finished:
    """``argv`` to completion, in its own process group, killed whole after ``timeout`` s."""
    with _lock:
        if _stopping.is_set():
            return Finished(None, "", "", "the session stopped before it started")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True, env=env)
        _running.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, err = proc.communicate()
        return Finished(None, out, err, f"{argv[:2]} still running after {timeout:.0f} s")
    finally:
        with _lock:
            _running.discard(proc)
    return Finished(proc.returncode, out, err, "" if not _stopping.is_set() else "the session stopped")


def _kill(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def submit(name: str, work: Callable[[], T]) -> Future[T]:
    """``work()`` in a daemon thread; its result (or exception) in the future."""
    future: Future[T] = Future()

    def thread() -> None:
        try:
            future.set_result(work())
        except BaseException as e:  # the test that waits for it reports it
            future.set_exception(e)

    threading.Thread(target=thread, name=name, daemon=True).start()
    return future


def stop() -> None:
    """The session ends: kill what still runs, remove what the builds wrote."""
    with _lock:
        _stopping.set()
        for proc in _running:
            _kill(proc)
    for path in _scratch:
        shutil.rmtree(path, ignore_errors=True)


def debian_package(after: Future[None] | None = None) -> Future[Path]:
    """The .deb that scripts/deb.sh builds from this tree, once per session (started on first
    use), once ``after`` has ended if given: the kernel tier's guest build, which also asks apt
    for its lists and downloads."""
    global _deb
    with _lock:
        if _deb is None:
            out = tempfile.mkdtemp(prefix="lazyiscsi-test-deb.")
            _scratch.append(out)
            env = dict(os.environ)  # as it is now: not as a test running meanwhile may have changed it
            _deb = submit("debian-package", lambda: _build_deb(Path(out), after, env))
        return _deb


def _build_deb(out: Path, after: Future[None] | None, env: dict[str, str]) -> Path:
    if after is not None:
        wait([after])  # however it ended
    r = run(["bash", str(ROOT / "scripts" / "deb.sh"), str(out)], DEB_BUILD_TIMEOUT_S, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"scripts/deb.sh failed {r.why}\n{r.stdout[-6000:]}{r.stderr[-3000:]}")
    deb = Path(r.stdout.strip().splitlines()[-1])
    if not (deb.is_file() and deb.parent == out):
        raise RuntimeError(f"scripts/deb.sh made no .deb in {out}: {r.stdout[-2000:]}")
    return deb
