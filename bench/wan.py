"""What the benchmarks share: images, an emulated WAN (nbdkit's delay and rate filters) and a
small simplebench-style runner (warm-up discarded, failures counted, median and spread)."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
IMAGES = Path(os.environ.get("LAZYISCSI_BENCH_IMAGES", "/var/tmp/lazyiscsi-bench"))


def cpu_ticks() -> tuple[int, int]:
    """(steal, all) of /proc/stat's CPU line, in ticks since boot: the share of the machine's
    CPU time its hypervisor gave to others between two readings is the noise of a shared cloud
    machine that the load average does not show."""
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:]]
    return ticks[7], sum(ticks[:8])  # user nice system idle iowait irq softirq steal


def steal_since(start: tuple[int, int]) -> float:
    """The share of CPU time stolen since ``start`` (a ``cpu_ticks()`` reading)."""
    steal, total = cpu_ticks()
    return round((steal - start[0]) / max(1, total - start[1]), 3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def random_image(size: int = GiB) -> Path:
    """Incompressible data, made once and kept between runs."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    path = IMAGES / f"random-{size >> 20}M.img"
    if not path.exists() or path.stat().st_size != size:
        subprocess.run(["dd", "if=/dev/urandom", f"of={path}.tmp", "bs=1M", f"count={size >> 20}",
                        "status=none"], check=True)
        os.replace(f"{path}.tmp", path)
    return path


def sparse_image(size: int = GiB, data_every: int = 4) -> Path:
    """One MiB of random data in every ``data_every`` MiB, holes elsewhere (75% holes at 4)."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    path = IMAGES / f"sparse-{size >> 20}M-1in{data_every}.img"
    if not path.exists():
        src = random_image(size)
        with open(src, "rb") as f, open(f"{path}.tmp", "wb") as out:
            out.truncate(size)
            for mib in range(0, size >> 20, data_every):
                f.seek(mib * MiB)
                out.seek(mib * MiB)
                out.write(f.read(MiB))
        os.replace(f"{path}.tmp", path)
    return path


@dataclass(frozen=True)
class Link:
    """An emulated WAN: ``delay_ms`` added to every read, ``rate_bits`` shared by all connections."""

    rate_bits: int
    delay_ms: int

    @property
    def name(self) -> str:
        rate = f"{self.rate_bits // 10**9}G" if self.rate_bits >= 10**9 else f"{self.rate_bits // 10**6}M"
        return f"{rate}bit/s+{self.delay_ms}ms"

    def ideal_s(self, nbytes: int) -> float:
        return nbytes * 8 / self.rate_bits


@contextmanager
def nbdkit_source(image: Path, link: Link, writable: bool = False) -> Iterator[str]:
    """nbdkit serving ``image`` read-only behind the link (``writable``: read-write, writes
    delayed as reads are). burstiness=0.2: the rate filter's bucket otherwise lets ~2 s of data
    through at full speed after idle, which would flatter whoever starts first."""
    port = free_port()
    mode = [f"wdelay={link.delay_ms}ms"] if writable else []
    proc = subprocess.Popen(
        ["nbdkit", "-f", *([] if writable else ["-r"]), "--exit-with-parent", "-i", "127.0.0.1",
         "-p", str(port), "--filter=delay", "--filter=rate", "file", str(image),
         f"rdelay={link.delay_ms}ms", *mode, f"rate={link.rate_bits}", "burstiness=0.2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("nbdkit did not start")
            time.sleep(0.05)
        yield f"nbd://127.0.0.1:{port}/"
    finally:
        proc.kill()
        proc.wait()


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)
    failed: int = 0

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def show(self) -> str:
        if not self.values:
            return f"failed x{self.failed}"
        spread = f" [{min(self.values):.2f}-{max(self.values):.2f}]" if len(self.values) > 1 else ""
        failed = f" n-failed={self.failed}" if self.failed else ""
        return f"{self.median:.2f}{spread} n={len(self.values)}{failed}"


def bench(test: Callable[[str, str], float], envs: list[str], cases: list[str], count: int,
          warmup: bool = True) -> dict[str, dict[str, Cell]]:
    """Run ``test(case, env)`` ``count`` times per cell (plus one discarded warm-up per case),
    interleaving envs so that machine noise falls on both alike."""
    results = {case: {env: Cell() for env in envs} for case in cases}
    for case in cases:
        if warmup:
            for env in envs:
                try:
                    test(case, env)
                except Exception as e:
                    print(f"  warm-up {case} {env} failed: {e}")
        for i in range(count):
            for env in envs:
                try:
                    value = test(case, env)
                    results[case][env].values.append(value)
                    print(f"  {case} {env} run {i + 1}: {value:.2f}", flush=True)
                except Exception as e:
                    results[case][env].failed += 1
                    print(f"  {case} {env} run {i + 1} failed: {e}", flush=True)
    return results
