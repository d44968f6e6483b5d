"""On-demand miss latency: 4 KiB guest reads of units not yet copied, through LazyDisk, while
the hydrator copies flat out over the same emulated WAN, in two regions: *ahead* of the copier
(at least 64 MiB past it) and *inside* its in-flight window (units a background run is fetching
at that moment); and the same reads on an idle link.

    python bench/miss_latency.py [--seconds S] [--links 1G 100M] [--count N] [--regions ahead inside idle]

Reports, per cell, the median over N runs of p50 and p99 and their ratio to the added delay
(target: p99 <= 2x the delay in every region), and the p99 of the event loop's lag: how late a
greenlet that sleeps 5 ms at a time wakes up. A miss cannot be answered faster than the loop
runs, so a lag that reaches the delay says the tail is the machine's (the process waiting for a
CPU), not the store's.
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
from lazyiscsi.source.base import Priority
from lazyiscsi.store.hydrator import Hydrator
from lazyiscsi.store.lazydisk import LazyDisk

LINKS = {"1G": Link(10**9, 20), "100M": Link(10**8, 20)}
#: where the reads go: (name, copier running)
REGIONS = (("ahead", True), ("inside", True), ("idle", False))
#: how far past the copier's first missing unit an in-flight run is looked for
INSIDE_SPAN = 64 * 2**20


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _ahead(disk: LazyDisk, rnd: random.Random) -> int | None:
    """A unit ahead of the sequential copier, not yet local (skip ones read-ahead fetched)."""
    low = disk.local_bytes + 64 * 2**20
    if low >= disk.size - 4096:
        return None
    offset = rnd.randrange(low, disk.size - 4096) // 4096 * 4096
    return offset if next(disk.missing_runs(offset, 4096), None) is not None else None


def _inside(disk: LazyDisk, rnd: random.Random) -> int | None:
    """A missing unit that a background run is fetching right now."""
    first = next(disk.missing_runs(0, disk.size), None)
    if first is None:
        return None
    for _ in range(64):
        offset = (first[0] + rnd.randrange(0, INSIDE_SPAN)) // 4096 * 4096
        if offset + 4096 <= disk.size and disk.fetching(offset) is Priority.BACKGROUND:
            return offset
    return None


#: the loop-lag probe's sleep: short against the delay, long enough to cost no CPU
LAG_TICK_S = 0.005


def _loop_lag(out: list[float]) -> None:
    """Append, for ever, how much later than asked (ms) each short sleep returned."""
    while True:
        t0 = time.monotonic()
        gevent.sleep(LAG_TICK_S)
        out.append(max(0.0, (time.monotonic() - t0 - LAG_TICK_S) * 1000))


def sample(link: Link, seconds: float, region: str, hydrating: bool) -> tuple[list[float], float]:
    """Latencies (ms) of sequential 4 KiB reads, one at a time, 10 ms apart, and the p99 of the
    loop's lag (ms) meanwhile."""
    pick = _inside if region == "inside" else _ahead
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
        lags: list[float] = []
        probe = gevent.spawn(_loop_lag, lags)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not disk.complete:
            offset = pick(disk, rnd)
            if offset is None:
                gevent.sleep(0.001)
                continue
            t0 = time.monotonic()
            disk.read(offset, 4096)
            latencies.append((time.monotonic() - t0) * 1000)
            gevent.sleep(0.01)
        probe.kill()
        window = job.query().inflight_window
        copied = disk.local_bytes - start_bytes
        job.cancel()
        job.wait()  # its runs end before the cache closes under them
        disk.close()
        print(f"  {link.name} {region}: {len(latencies)} reads, copier at "
              f"{copied / (time.monotonic() - t_start) / 2**20:.0f} MiB/s, window {window}", flush=True)
        return latencies, _percentile(lags, 0.99) if lags else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--links", nargs="*", default=list(LINKS))
    ap.add_argument("--count", type=int, default=1, help="runs per cell (medians are reported)")
    ap.add_argument("--regions", nargs="*", default=[name for name, _ in REGIONS])
    args = ap.parse_args()
    logsetup.configure("warning")
    report = {}
    rows = []
    for name in args.links:
        link = LINKS[name]
        for region, hydrating in [r for r in REGIONS if r[0] in args.regions]:
            samples = [sample(link, args.seconds, region, hydrating) for _ in range(args.count)]
            runs = [r for r, _lag in samples if r]
            if not runs:
                continue
            lag = statistics.median(lag for r, lag in samples if r)
            p50s = [statistics.median(r) for r in runs]
            p99s = [_percentile(r, 0.99) for r in runs]
            p50, p99 = statistics.median(p50s), statistics.median(p99s)
            n = sum(len(r) for r in runs)
            rows.append(f"{link.name:<16} {region:<8} {len(runs):>4} {n:>5} {p50:>8.1f} {p99:>8.1f} "
                        f"[{min(p99s):.1f}-{max(p99s):.1f}] {p50 / link.delay_ms:>6.2f} "
                        f"{p99 / link.delay_ms:>6.2f} {lag:>8.1f}")
            report[f"{name}/{region}"] = {"runs": len(runs), "n": n, "p50_ms": p50, "p99_ms": p99,
                                          "p99_runs_ms": p99s, "delay_ms": link.delay_ms,
                                          "loop_lag_p99_ms": lag}
    print(f"{'link':<16} {'region':<8} {'runs':>4} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'[p99 min-max]':>12} {'p50/d':>6} {'p99/d':>6} {'lag p99':>8}")
    print("\n".join(rows))
    OUT.mkdir(exist_ok=True)
    (OUT / "miss_latency.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
