"""On-demand miss latency: 4 KiB guest reads of units not yet copied, through LazyDisk, while
the hydrator copies flat out over the same emulated WAN; and the same reads on an idle link.

    python bench/miss_latency.py [--seconds S] [--links 1G 100M]

Reports p50 and p99 and their ratio to the added delay (target: p99 <= 2x the delay).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import gevent
from wan import OUT, GiB, Link, nbdkit_source, random_image

from lazyiscsi import log as logsetup
from lazyiscsi.source import open_source
from lazyiscsi.store.hydrator import Hydrator
from lazyiscsi.store.lazydisk import LazyDisk

LINKS = {"1G": Link(10**9, 20), "100M": Link(10**8, 20)}


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def sample(link: Link, seconds: float, hydrating: bool) -> list[float]:
    """Latencies (ms) of sequential 4 KiB reads at random offsets the hydrator has not reached."""
    with nbdkit_source(random_image(GiB), link) as url, tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        disk = LazyDisk.open(str(Path(d) / "cache.img"), open_source(url))
        job = Hydrator(disk)
        job.start()
        if not hydrating:
            job.pause()
        gevent.sleep(2.0)  # let the window settle (or the link drain, when paused)
        rnd = random.Random(1)
        start_bytes, t_start = disk.local_bytes, time.monotonic()
        latencies: list[float] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not disk.complete:
            # a unit ahead of the sequential copier, not yet local (skip ones read-ahead fetched)
            low = disk.local_bytes + 64 * 2**20
            if low >= disk.size - 4096:
                break
            offset = rnd.randrange(low, disk.size - 4096) // 4096 * 4096
            if next(disk.missing_runs(offset, 4096), None) is None:
                continue
            t0 = time.monotonic()
            disk.read(offset, 4096)
            latencies.append((time.monotonic() - t0) * 1000)
            gevent.sleep(0.01)
        window = job.query().inflight_window
        copied = disk.local_bytes - start_bytes
        job.cancel()
        disk.close()
        print(f"  {link.name} {'hydrating' if hydrating else 'idle'}: {len(latencies)} reads, "
              f"copier at {copied / (time.monotonic() - t_start) / 2**20:.0f} MiB/s, window {window}",
              flush=True)
        return latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--links", nargs="*", default=list(LINKS))
    args = ap.parse_args()
    logsetup.configure("warning")
    report = {}
    print(f"{'link':<16} {'state':<10} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'p50/delay':>10} {'p99/delay':>10}")
    for name in args.links:
        link = LINKS[name]
        for hydrating in (True, False):
            lat = sample(link, args.seconds, hydrating)
            if not lat:
                continue
            p50, p99 = statistics.median(lat), _percentile(lat, 0.99)
            state = "hydrating" if hydrating else "idle"
            print(f"{link.name:<16} {state:<10} {len(lat):>4} {p50:>8.1f} {p99:>8.1f} "
                  f"{p50 / link.delay_ms:>10.2f} {p99 / link.delay_ms:>10.2f}", flush=True)
            report[f"{name}/{state}"] = {"n": len(lat), "p50_ms": p50, "p99_ms": p99,
                                         "delay_ms": link.delay_ms, "latencies_ms": lat}
    OUT.mkdir(exist_ok=True)
    (OUT / "miss_latency.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
