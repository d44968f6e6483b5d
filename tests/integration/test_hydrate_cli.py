"""`lazyiscsi hydrate` end to end against real nbdkit servers: faults, kill -9 and resume,
bad arguments, and a 1 TiB sparse source."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.peers import Lines, MiB, Nbdkit, free_port, make_image, wait_until

LAZYISCSI = [sys.executable, "-m", "lazyiscsi.cli"]


def hydrate(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAZYISCSI, "--log-level", "warning", "hydrate", *args],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def fetched_of(out: str) -> int:
    m = re.search(r"fetched=(\d+)", out)
    assert m, out
    return int(m.group(1))


def persisted_local_bytes(cache: Path, unit: int = 4096) -> int:
    """Bytes whose bits reached the map file: what a rerun will not fetch again (none before the
    map exists)."""
    path = cache.parent / (cache.name + ".map")
    bits = path.read_bytes() if path.exists() else b""
    return sum(b.bit_count() for b in bits) * unit


def test_completes_with_ten_percent_read_errors(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    img = tmp_path / "src.img"
    data = make_image(img, 48 * MiB)
    server = Nbdkit(["--filter=error", "file", str(img), "error-pread=EIO", "error-pread-rate=10%"],
                    free_port()).start()
    nbdkit.append(server)
    cache = tmp_path / "cache.img"
    r = hydrate("--source", server.url, "--cache", str(cache))
    assert r.returncode == 0, r.stderr
    assert cache.read_bytes() == data


UNITS = {"B": 1, "KiB": 1 << 10, "MiB": MiB, "GiB": 1 << 30}


def progress_bytes(line: str) -> int:
    """Local bytes of a non-TTY progress line (``progress  50.0% 32.0 MiB/64.0 MiB ...``), else 0."""
    m = re.match(r"progress +[\d.]+% +([\d.]+) (B|KiB|MiB|GiB)/", line)
    return int(float(m.group(1)) * UNITS[m.group(2)]) if m else 0


def test_survives_source_killed_and_restarted(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    img = tmp_path / "src.img"
    size = 64 * MiB
    data = make_image(img, size)
    port = free_port()
    # 10 MB/s with a bucket of 0.2 s (nbdkit's default lets 2 s through at once): the copy
    # takes about 6 s, so the source dies in the middle of it
    args = ["--filter=rate", "file", str(img), "rate=80M", "burstiness=0.2"]
    server = Nbdkit(args, port).start()
    nbdkit.append(server)
    cache = tmp_path / "cache.img"
    proc = subprocess.Popen([*LAZYISCSI, "hydrate", "--source", server.url, "--cache", str(cache),
                             "--progress-interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    err = Lines(proc.stderr)
    wait_until(lambda: any(0 < progress_bytes(x) < size for x in err.since(0)),
               "a progress line with part of the source copied", proc=proc)
    server.kill()  # the source site goes away mid-copy
    seen = len(err.lines)
    # whichever connection learns it first says so: an idle one sees the close, a busy one
    # fails its request and redials into a refusal
    noticed = ("source_disconnected", "source_read_retry", "source_reconnect")
    wait_until(lambda: any(event in x for x in err.since(seen) for event in noticed),
               "hydrate notices that the source is gone", proc=proc)
    assert proc.poll() is None, "hydrate must wait for the source, not give up"
    restarted = Nbdkit(args, port).start()
    nbdkit.append(restarted)
    proc.wait(timeout=120)
    assert proc.returncode == 0, err.text()
    assert cache.read_bytes() == data


def test_kill_9_then_rerun_is_identical_and_moves_only_the_missing_part(
        tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    img = tmp_path / "src.img"
    size = 96 * MiB
    data = make_image(img, size)
    # 10 MB/s with a small bucket: about 10 s for the whole copy, and each run below is killed
    # within a commit or two (autocommit: 1 s), so no run can finish before its kill
    server = Nbdkit(["--filter=rate", "file", str(img), "rate=80M", "burstiness=0.2"], free_port())
    nbdkit.append(server)

    def restart_source() -> None:
        """A new nbdkit on the same port for each run: 1.32 aborts (raw_send_socket: Assertion
        `sock >= 0') when a client dies while the rate filter holds one of its requests."""
        server.kill()
        server.start()

    cache = tmp_path / "cache.img"
    rnd = random.Random(3)
    committed = 0
    for run in range(3):
        restart_source()
        proc = subprocess.Popen([*LAZYISCSI, "hydrate", "--source", server.url, "--cache", str(cache)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # killed at a different point each time, but only once this run committed something:
        # a kill before the first commit would test nothing
        target = committed + rnd.randint(1, 4) * MiB
        committed = wait_until(lambda target=target: (n := persisted_local_bytes(cache)) >= target and n,
                               f"run {run}: the map vouches for {target} bytes", proc=proc)
        assert proc.poll() is None, f"run {run} finished before it was killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    restart_source()
    missing_on_disk = size - persisted_local_bytes(cache)
    assert 0 < missing_on_disk < size, missing_on_disk
    r = hydrate("--source", server.url, "--cache", str(cache))
    assert r.returncode == 0, r.stderr
    assert cache.read_bytes() == data
    # the rerun fetched exactly what the map did not vouch for: nothing local was copied twice
    assert fetched_of(r.stdout) <= missing_on_disk


def test_rerun_of_a_complete_cache_moves_nothing(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    img = tmp_path / "src.img"
    make_image(img, 8 * MiB)
    server = Nbdkit(["file", str(img)], free_port()).start()
    nbdkit.append(server)
    cache = tmp_path / "cache.img"
    assert hydrate("--source", server.url, "--cache", str(cache)).returncode == 0
    r = hydrate("--source", server.url, "--cache", str(cache))
    assert r.returncode == 0, r.stderr
    assert fetched_of(r.stdout) == 0


def test_refuses_a_different_source(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    """A hydrating cache refuses another disk; a complete one no longer asks any source (issue
    10, defect 4: open by state), so it neither refuses nor reads the other disk."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    data = make_image(a, 4 * MiB, seed=1)
    make_image(b, 4 * MiB, seed=2)
    sa = Nbdkit(["--filter=rate", "file", str(a), "rate=8M"], free_port()).start()  # 1 MB/s
    sb = Nbdkit(["file", str(b)], free_port()).start()
    nbdkit.extend([sa, sb])
    cache = tmp_path / "cache.img"
    proc = subprocess.Popen([*LAZYISCSI, "hydrate", "--source", sa.url, "--cache", str(cache)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while persisted_local_bytes(cache) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    r = hydrate("--source", sb.url, "--cache", str(cache))
    assert r.returncode == 1
    assert "not the disk this cache was filled from" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    sa.kill()
    nbdkit.append(sa := Nbdkit(["file", str(a)], sa.port).start())
    assert hydrate("--source", sa.url, "--cache", str(cache)).returncode == 0
    r = hydrate("--source", sb.url, "--cache", str(cache))
    assert r.returncode == 0 and fetched_of(r.stdout) == 0, r.stderr
    assert cache.read_bytes() == data


@pytest.mark.parametrize(("args", "names"), [
    (["--source", "x", "--cache", "c", "--rate", "fast"], "--rate"),
    (["--source", "x", "--cache", "c", "--unit", "3000"], "--unit"),
    (["--source", "x", "--cache", "c", "--unit", "256"], "--unit"),
    (["--source", "x", "--cache", "c", "--stall-timeout", "-1"], "--stall-timeout"),
    (["--cache", "c"], "--source"),
    (["--source", "gopher://h/x", "--cache", "c"], "gopher"),
])
def test_bad_arguments_give_one_line_naming_them(tmp_path: Path, args: list[str], names: str) -> None:
    r = subprocess.run([*LAZYISCSI, "hydrate", *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode in (1, 2)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_unreachable_source_fails_fast(tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = hydrate("--source", f"nbd://127.0.0.1:{free_port()}/", "--cache", str(tmp_path / "c"),
                "--connect-timeout", "1")
    assert r.returncode == 1
    assert time.monotonic() - t0 < 10
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "c").exists()


def test_password_in_url_never_printed(tmp_path: Path) -> None:
    r = hydrate("--source", f"http://op:s3cr3tpw@127.0.0.1:{free_port()}/disk.img",
                "--cache", str(tmp_path / "c"), "--connect-timeout", "1")
    assert r.returncode == 1
    assert "s3cr3tpw" not in r.stderr + r.stdout


def test_not_a_cache_is_refused(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    img = tmp_path / "src.img"
    make_image(img, 2 * MiB)
    server = Nbdkit(["file", str(img)], free_port()).start()
    nbdkit.append(server)
    precious = tmp_path / "precious.img"
    precious.write_bytes(b"do not overwrite me" * 1000)
    r = hydrate("--source", server.url, "--cache", str(precious))
    assert r.returncode == 1 and "not a lazyiscsi cache" in r.stderr
    assert precious.read_bytes() == b"do not overwrite me" * 1000


def test_help_explains_every_option() -> None:
    r = subprocess.run([*LAZYISCSI, "hydrate", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for option in ("--source", "--cache", "--rate", "--unit", "--run-size", "--stall-timeout",
                   "--connect-timeout", "--progress-interval", "Exit status"):
        assert option in r.stdout


def test_one_tib_sparse_source_opens_fast_in_little_memory(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    """Acceptance: a 1 TiB sparse source opens in under a second and the whole run stays under
    64 MiB RSS; block status lets it complete without moving the holes."""
    img = tmp_path / "big.img"
    with open(img, "wb") as f:
        f.truncate(1 << 40)
        f.seek(5 << 30)
        f.write(random.Random(1).randbytes(MiB))
    server = Nbdkit(["file", str(img)], free_port()).start()
    nbdkit.append(server)
    cache = tmp_path / "cache.img"
    r = hydrate("--source", server.url, "--cache", str(cache), timeout=300)
    assert r.returncode == 0, r.stderr
    print(f"1 TiB sparse hydrate: {r.stdout.strip()}")
    # the process's own VmHWM: wait4's ru_maxrss would count the pytest parent (vfork + exec)
    peak = int(re.search(r"peak_rss_kib=(\d+)", r.stdout).group(1))  # type: ignore[union-attr]
    assert 0 < peak < 64 * 1024, f"peak RSS {peak} KiB for a 1 TiB LUN"
    assert fetched_of(r.stdout) <= 2 * MiB
    with open(cache, "rb") as f:
        f.seek(5 << 30)
        assert f.read(MiB) == random.Random(1).randbytes(MiB)
    assert os.stat(cache).st_blocks * 512 < 64 * MiB


def test_one_tib_cache_opens_in_under_a_second(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    """Open = connect, fingerprint the source, create or load the map: under 1 s for 1 TiB,
    the first time and when resuming."""
    import gevent

    from lazyiscsi.source import open_source
    from lazyiscsi.store.lazydisk import LazyDisk

    img = tmp_path / "big.img"
    with open(img, "wb") as f:
        f.truncate(1 << 40)
    server = Nbdkit(["file", str(img)], free_port()).start()
    nbdkit.append(server)
    cache = str(tmp_path / "cache.img")
    for _ in range(2):  # create, then resume
        t0 = time.monotonic()
        disk = LazyDisk.open(cache, open_source(server.url))
        elapsed = time.monotonic() - t0
        disk.populate(0, 1 << 20)  # make the map non-empty for the resume
        disk.close()
        gevent.sleep(0)
        print(f"1 TiB open: {elapsed * 1000:.0f} ms")
        assert elapsed < 1.0
