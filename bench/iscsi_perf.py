"""A fully local 1 GiB LUN through lazyiscsi's embedded portal against tgtd on the same file, in
the same run, with libiscsi's iscsi-perf at QD16: 1 MiB sequential reads and 4 KiB random reads.

    python bench/iscsi_perf.py [--count N] [--seconds S]

Targets (issue 3): sequential >= 1.0x tgtd, random >= 0.5x tgtd.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from wan import OUT, ROOT, GiB, free_port, random_image

LAZYISCSI = str(ROOT.parent / ".venv" / "bin" / "lazyiscsi")
INITIATOR = "iqn.2024-01.test:perf"
CASES = {"seq-1MiB": ["-b", "2048"], "rand-4KiB": ["-b", "8", "-r"]}


def perf(url: str, case: str, seconds: int) -> float:
    """Average IOPS iscsi-perf reports over ``seconds`` at 16 commands in flight."""
    r = subprocess.run(["iscsi-perf", "-i", INITIATOR, "-m", "16", "-t", str(seconds), *CASES[case], url],
                       capture_output=True, text=True, timeout=seconds + 60)
    m = re.findall(r"iops average (\d+)", r.stdout)
    if not m:
        raise RuntimeError(r.stdout[-300:] + r.stderr[-300:])
    return float(m[-1])


def start_lazyiscsi(image: Path, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    iqn = "iqn.2026-11.io.lazyiscsi:perf"
    proc = subprocess.Popen([LAZYISCSI, "--log-level", "warning", "--control", str(work / "ctl.sock"),
                             "serve", "--source", str(image), "--state-dir", str(work / "state"),
                             "--cache", str(work / "cache.img"), "--iqn", iqn,
                             "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = work / "cache.img.meta"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # fully local before measuring
        if meta.exists() and '"complete"' in meta.read_text():
            return proc, f"iscsi://127.0.0.1:{port}/{iqn}/0"
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the LUN did not become fully local")


def start_tgtd(image: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    # tgtd's control "port" names its socket (/var/run/tgtd/socket.N): one of our own, not a
    # fixed one another run on the machine may hold
    port = free_port()
    ctl = str(1000 + os.getpid() % 60000)
    proc = subprocess.Popen(["tgtd", "-f", "-C", ctl, "--iscsi", f"portal=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while subprocess.run(["tgtadm", "-C", ctl, "--lld", "iscsi", "--mode", "sys", "--op", "show"],
                         capture_output=True).returncode:  # until tgtd answers (slow on a loaded machine)
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("tgtd did not start")
        time.sleep(0.2)
    iqn = "iqn.2024-01.test:tgtperf"
    for args in (["--mode", "target", "--op", "new", "--tid", "1", "--targetname", iqn],
                 ["--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1",
                  "--backing-store", str(image)],
                 ["--mode", "target", "--op", "bind", "--tid", "1", "--initiator-address", "ALL"]):
        subprocess.run(["tgtadm", "-C", ctl, "--lld", "iscsi", *args], check=True, capture_output=True)
    return proc, f"iscsi://127.0.0.1:{port}/{iqn}/1", ctl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    args = ap.parse_args()
    image = random_image(GiB)
    results: dict[str, dict[str, list[float]]] = {c: {"lazyiscsi": [], "tgtd": []} for c in CASES}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        lazy, lazy_url = start_lazyiscsi(image, Path(d))
        tgt, tgt_url, ctl = start_tgtd(image)
        try:
            for case in CASES:
                perf(lazy_url, case, 2)  # warm-up, discarded
                perf(tgt_url, case, 2)
                for i in range(args.count):
                    for env, url in (("lazyiscsi", lazy_url), ("tgtd", tgt_url)):
                        iops = perf(url, case, args.seconds)
                        results[case][env].append(iops)
                        print(f"  {case} {env} run {i + 1}: {iops:.0f} IOPS", flush=True)
        finally:
            lazy.send_signal(signal.SIGTERM)
            lazy.wait(30)
            subprocess.run(["tgtadm", "-C", ctl, "--lld", "iscsi", "--mode", "target", "--op", "delete",
                            "--force", "--tid", "1"], capture_output=True)
            tgt.kill()
            tgt.wait()
    print(f"\n{'case':<12} {'lazyiscsi IOPS':<26} {'tgtd IOPS':<26} {'lazy/tgtd':>9}")
    for case, cells in results.items():
        lz, tg = statistics.median(cells["lazyiscsi"]), statistics.median(cells["tgtd"])
        spread = {k: f"{statistics.median(v):.0f} [{min(v):.0f}-{max(v):.0f}]" for k, v in cells.items()}
        print(f"{case:<12} {spread['lazyiscsi']:<26} {spread['tgtd']:<26} {lz / tg:>9.2f}")
    OUT.mkdir(exist_ok=True)
    (OUT / "iscsi_perf.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
