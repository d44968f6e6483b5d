"""Hot-first copy (issue 15): how soon what the guest reads becomes local, with the copier's order
following the guest (``hot``) against plain LBA order (``lba``: the same code with the
hotspots never asked), over the same emulated WAN, in the same run.

    python bench/hot_first.py [--links 100M 1G] [--count N] [--orders hot lba]

Each run opens a fresh cache of a 1 GiB image behind nbdkit's delay and rate filters, starts the
copier and, once it has copied for a second, plays a guest:

* *burst*: 8 misses of 4 KiB spread over 2 MiB at three quarters of the disk (a file opened:
  its blocks, its neighbours); reported: seconds until those 2 MiB are all local;
* *stream*: then 16 MiB read sequentially at five eighths of the disk, 128 KiB per read, one
  at a time (a file copied); reported: seconds for the whole read, and how many reads missed.

and the bytes fetched twice by then (a miss of units a background run is fetching sends its own
read: issue 10, defect 8).

Medians over N runs; the two orders interleaved, so that machine noise falls on both alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import gevent
from wan import GiB, Link, MiB, nbdkit_source, random_image

from lazyiscsi import log as logsetup
from lazyiscsi.source import open_source
from lazyiscsi.store.hydrator import Hydrator
from lazyiscsi.store.lazydisk import LazyDisk

LINKS = {"1G": Link(10**9, 20), "100M": Link(10**8, 20)}
ORDERS = ("hot", "lba")
KiB = 1 << 10
BURST_SPAN = 2 * MiB
STREAM = 16 * MiB
STREAM_READ = 128 * KiB


def _local_after(disk: LazyDisk, offset: int, t0: float, seconds: float = 300.0) -> float:
    """Seconds from ``t0`` until the burst's region is all local."""
    while next(disk.missing_runs(offset, BURST_SPAN), None) is not None:
        if time.monotonic() > t0 + seconds:
            raise TimeoutError(f"the burst's region was not local within {seconds:g} s")
        gevent.sleep(0.005)
    return time.monotonic() - t0


def one_run(url: str, order: str) -> tuple[float, float, int, int]:
    """(burst time-to-local s, stream s, stream reads that missed, bytes fetched twice)."""
    with tempfile.TemporaryDirectory(prefix="lazyiscsi-hot-") as tmp:
        disk = LazyDisk.open(str(Path(tmp) / "cache"), open_source(url), autocommit_s=None)
        if order == "lba":
            disk.hotspots.next_run = lambda: None  # type: ignore[method-assign]
        job = Hydrator(disk)
        job.start()
        try:
            gevent.sleep(1.0)
            burst = disk.size * 3 // 4
            t0 = time.monotonic()
            gevent.joinall([gevent.spawn(disk.read, burst + i * BURST_SPAN // 8, 4096) for i in range(8)],
                           raise_error=True)
            # the stream starts at once; the burst's region is watched meanwhile
            watcher = gevent.spawn(_local_after, disk, burst, t0)
            start = disk.size * 5 // 8
            missed = 0
            t1 = time.monotonic()
            for off in range(start, start + STREAM, STREAM_READ):
                missed += next(disk.missing_runs(off, STREAM_READ), None) is not None
                disk.read(off, STREAM_READ)
            stream_s = time.monotonic() - t1
            burst_s = watcher.get()
            st = disk.stats()
            # a guest's miss never waits for a background run of the same units: it sends its own
            # read, and the later of the two answers is dropped (bytes fetched twice)
            twice = st.fetched_foreground + st.fetched_background - disk.local_bytes
            return burst_s, stream_s, missed, twice
        finally:
            job.cancel()
            disk.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--links", nargs="+", default=["100M", "1G"], choices=sorted(LINKS))
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--orders", nargs="+", default=list(ORDERS), choices=ORDERS)
    args = ap.parse_args()
    logsetup.configure(level="warning")
    image = random_image(GiB)
    rows = []
    for name in args.links:
        link = LINKS[name]
        results: dict[str, list[tuple[float, float, int, int]]] = {o: [] for o in args.orders}
        with nbdkit_source(image, link) as url:
            for i in range(args.count):
                for order in args.orders:
                    r = one_run(url, order)
                    results[order].append(r)
                    print(f"  {link.name} {order} run {i + 1}: burst {r[0]:.2f} s, stream {r[1]:.2f} s, "
                          f"{r[2]} of {STREAM // STREAM_READ} reads missed, "
                          f"{r[3] / MiB:.1f} MiB fetched twice", flush=True)
        for order in args.orders:
            burst = statistics.median(r[0] for r in results[order])
            stream = statistics.median(r[1] for r in results[order])
            missed = statistics.median(r[2] for r in results[order])
            twice = statistics.median(r[3] for r in results[order])
            rows.append((link.name, order, burst, stream, missed, twice, len(results[order])))
    print("\n| link | order | runs | burst: 2 MiB local after s | stream: 16 MiB read in s | reads missed "
          "| MiB fetched twice |")
    print("|---|---|---|---|---|---|---|")
    for link_name, order, burst, stream, missed, twice, n in rows:
        print(f"| {link_name} | {order} | {n} | {burst:.2f} | {stream:.2f} | {missed:g} of "
              f"{STREAM // STREAM_READ} | {twice / MiB:.1f} |")


if __name__ == "__main__":
    main()
