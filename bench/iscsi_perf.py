"""A fully local 1 GiB LUN through lazyiscsi's embedded portal against tgtd on the same data, in
the same run, at QD16: 1 MiB sequential reads and 4 KiB random reads with libiscsi's iscsi-perf,
4 KiB writes with QEMU's iSCSI driver (``qemu-img bench -w``: iscsi-perf only reads).

    python bench/iscsi_perf.py [--count N] [--seconds S] [--cases seq-1MiB,rand-4KiB,write-4KiB]
                               [--max-steal SHARE]

Targets: sequential >= 1.0x tgtd (issue 3), random reads >= 0.8x tgtd (issue 15); writes are
reported, with no target. Runs alternate tgtd, lazyiscsi, tgtd, lazyiscsi... and each is
preceded by a read of both backing files: on a machine whose page cache is reclaimed in the
background (DAMON), a file gone cold would measure the disk, not the target. Each run's share
of CPU time stolen by the hypervisor is printed, and the medians again over only the runs with
at most ``--max-steal`` of it; out/iscsi_perf.json holds every run's IOPS and steal.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from wan import OUT, ROOT, GiB, cpu_ticks, free_port, random_image, steal_since

LAZYISCSI = str(ROOT.parent / ".venv" / "bin" / "lazyiscsi")
INITIATOR = "iqn.2024-01.test:perf"
CASES = {"seq-1MiB": ["-b", "2048"], "rand-4KiB": ["-b", "8", "-r"], "write-4KiB": []}
#: qemu-img bench has no random mode: each write is this far past the last, modulo the LUN (a prime
#: number of 4 KiB blocks, about 390 MiB), so no two writes in a row touch the same or adjacent units
WRITE_STEP = 4096 * 100003
#: writes per qemu-img bench run
WRITE_COUNT = 20000
#: tgtd -C refuses a control port above this ("out of range"; a short in tgtd's options)
TGTD_MAX_CONTROL_PORT = 32767


def perf(url: str, case: str, seconds: int) -> float:
    """Average IOPS at 16 commands in flight: iscsi-perf's for ``seconds`` (reads), or
    qemu-img bench's count over its time (writes)."""
    if case == "write-4KiB":
        count = WRITE_COUNT if seconds > 2 else WRITE_COUNT // 10
        w = subprocess.run(["qemu-img", "bench", "-f", "raw", "-w", "-d", "16", "-s", "4096",
                            "-c", str(count), "-S", str(WRITE_STEP), url],
                           capture_output=True, text=True, timeout=600)
        t = re.findall(r"Run completed in ([\d.]+) seconds", w.stdout)
        if not t:
            raise RuntimeError(w.stdout[-300:] + w.stderr[-300:])
        return count / float(t[-1])
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
    ctl = str(1000 + os.getpid() % (TGTD_MAX_CONTROL_PORT - 1000))
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


def stop_tgtd(proc: subprocess.Popen[bytes], ctl: str) -> None:
    """tgtd ignores SIGTERM while it has targets: delete ours, then kill it."""
    subprocess.run(["tgtadm", "-C", ctl, "--lld", "iscsi", "--mode", "target", "--op", "delete",
                    "--force", "--tid", "1"], capture_output=True)
    proc.kill()
    proc.wait()


def warm(*paths: Path) -> None:
    """Read files whole, so that their pages are in the page cache for the next run."""
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(8 << 20):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--max-steal", type=float, default=0.05, metavar="SHARE",
                    help="also print the medians of only the runs during which the hypervisor stole "
                         "at most this share of the CPU time (a shared cloud machine's noise)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    args = ap.parse_args()
    cases = args.cases.split(",")
    if unknown := set(cases) - set(CASES):
        ap.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    image = random_image(GiB)
    results: dict[str, dict[str, list[float]]] = {c: {"lazyiscsi": [], "tgtd": []} for c in cases}
    # the steal share of each of those runs, in the same order
    stolen: dict[str, dict[str, list[float]]] = {c: {"lazyiscsi": [], "tgtd": []} for c in cases}
    loads: list[float] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        tgt_image = Path(d) / "tgtd.img"  # a copy: the write case must not change the shared image
        shutil.copyfile(image, tgt_image)
        lazy, lazy_url = start_lazyiscsi(image, Path(d))
        try:
            tgt, tgt_url, ctl = start_tgtd(tgt_image)
        except BaseException:
            lazy.kill()  # not left serving (and spinning on its copy) after a failed start
            lazy.wait()
            raise
        files = (tgt_image, Path(d) / "cache.img")
        try:
            for case in cases:
                warm(*files)
                perf(tgt_url, case, 2)  # warm-up, discarded
                perf(lazy_url, case, 2)
                for i in range(args.count):
                    for env, url in (("tgtd", tgt_url), ("lazyiscsi", lazy_url)):
                        warm(*files)
                        ticks = cpu_ticks()
                        iops = perf(url, case, args.seconds)
                        steal = steal_since(ticks)
                        loads.append(os.getloadavg()[0])
                        results[case][env].append(iops)
                        stolen[case][env].append(steal)
                        print(f"  {case} {env} run {i + 1}: {iops:.0f} IOPS (load average {loads[-1]:.1f}, "
                              f"steal {steal:.0%})", flush=True)
        finally:
            lazy.send_signal(signal.SIGTERM)
            lazy.wait(30)
            stop_tgtd(tgt, ctl)
    print(f"\n{'case':<12} {'lazyiscsi IOPS':<26} {'tgtd IOPS':<26} {'lazy/tgtd':>9}")
    for case, cells in results.items():
        lz, tg = statistics.median(cells["lazyiscsi"]), statistics.median(cells["tgtd"])
        spread = {k: f"{statistics.median(v):.0f} [{min(v):.0f}-{max(v):.0f}]" for k, v in cells.items()}
        print(f"{case:<12} {spread['lazyiscsi']:<26} {spread['tgtd']:<26} {lz / tg:>9.2f}")
    steals = [st for cells in stolen.values() for runs in cells.values() for st in runs]
    print(f"load average (1 min) after each run: median {statistics.median(loads):.1f} "
          f"[{min(loads):.1f}-{max(loads):.1f}]; CPU time stolen by the hypervisor: median "
          f"{statistics.median(steals):.0%} [{min(steals):.0%}-{max(steals):.0%}]")
    OUT.mkdir(exist_ok=True)
    print(f"\nonly the runs with at most {args.max_steal:.0%} of the CPU time stolen (at least 3 of each):")
    for case, cells in results.items():
        calm = {k: [v for v, st in zip(runs, stolen[case][k], strict=True) if st <= args.max_steal]
                for k, runs in cells.items()}
        if min(len(v) for v in calm.values()) < 3:
            print(f"{case:<12} too few: {', '.join(f'{k} {len(v)}' for k, v in calm.items())}")
            continue
        lz, tg = statistics.median(calm["lazyiscsi"]), statistics.median(calm["tgtd"])
        spread = {k: f"{statistics.median(v):.0f} [{min(v):.0f}-{max(v):.0f}] n={len(v)}"
                  for k, v in calm.items()}
        print(f"{case:<12} {spread['lazyiscsi']:<26} {spread['tgtd']:<26} {lz / tg:>9.2f}")
    (OUT / "iscsi_perf.json").write_text(json.dumps({"iops": results, "steal": stolen}, indent=1))


if __name__ == "__main__":
    main()
