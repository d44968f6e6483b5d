"""4 KiB reads of cold blocks through iSCSI while the LUN hydrates from a source 20 ms away:
QEMU's initiator (qemu-io, one session, one read at a time) against `lazyiscsi serve`.

    python bench/iscsi_cold_reads.py [--reads N]

The reads land at random offsets in the last half of a 1 GiB LUN, ahead of the sequential
copier; each read's time comes from qemu-io's own per-command figure.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from wan import OUT, ROOT, GiB, Link, free_port, nbdkit_source, random_image

LAZYISCSI = str(ROOT.parent / ".venv" / "bin" / "lazyiscsi")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reads", type=int, default=150)
    args = ap.parse_args()
    link = Link(10**9, 20)
    rnd = random.Random(7)
    offsets = [rnd.randrange(GiB // 2, GiB - 4096) // 4096 * 4096 for _ in range(args.reads)]
    with nbdkit_source(random_image(GiB), link) as url, tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        port = free_port()
        iqn = "iqn.2026-11.io.lazyiscsi:cold"
        serve = subprocess.Popen([LAZYISCSI, "--log-level", "warning", "--control", str(Path(d) / "ctl.sock"),
                                  "serve", "--source", url, "--state-dir", str(Path(d) / "state"),
                                  "--cache", str(Path(d) / "cache.img"), "--iqn", iqn,
                                  "--listen", f"127.0.0.1:{port}"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.5)
            cmd = ["qemu-io", "-f", "raw"]
            for off in offsets:
                cmd += ["-c", f"read {off} 4k"]
            out = subprocess.run([*cmd, f"iscsi://127.0.0.1:{port}/{iqn}/0"], capture_output=True,
                                 text=True, timeout=600).stdout
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(60)
    rates = [float(x) for x in re.findall(r"and ([0-9.]+) ops/sec", out)]
    if len(rates) != len(offsets):
        raise SystemExit(f"qemu-io reported {len(rates)} of {len(offsets)} reads:\n{out[-500:]}")
    lat = sorted(1000.0 / r for r in rates)
    p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    print(f"{len(lat)} cold 4 KiB reads through iSCSI during hydration ({link.name}): "
          f"p50 {p50:.1f} ms ({p50 / link.delay_ms:.2f}x delay), "
          f"p99 {p99:.1f} ms ({p99 / link.delay_ms:.2f}x)")
    OUT.mkdir(exist_ok=True)
    report = {"p50_ms": p50, "p99_ms": p99, "latencies_ms": lat}
    (OUT / "iscsi_cold_reads.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
