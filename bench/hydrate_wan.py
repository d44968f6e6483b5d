"""Time to hydrate 1 GiB over an emulated WAN: lazyiscsi against the link's ideal and against
qemu-storage-daemon's copy-on-read + block-stream, measured in the same run.

    python bench/hydrate_wan.py [--count N] [--slow-count N] [--cases ...]

Cases: 1 GiB of random data at 1 Gbit/s and at 100 Mbit/s, both with 20 ms added delay, no
lazyiscsi setting changed between them; and a 1 GiB image with 75% holes (block status) at
1 Gbit/s + 20 ms, reported against the fully allocated one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from wan import OUT, ROOT, GiB, Link, bench, nbdkit_source, random_image, sparse_image

LAZYISCSI = str(ROOT.parent / ".venv" / "bin" / "lazyiscsi")
FAST = Link(10**9, 20)
SLOW = Link(10**8, 20)
CASES = {
    "full@1G+20ms": (FAST, "full"),
    "sparse75@1G+20ms": (FAST, "sparse"),
    "full@100M+20ms": (SLOW, "full"),
}


def image_for(kind: str) -> Path:
    return random_image(GiB) if kind == "full" else sparse_image(GiB, 4)


def run_lazyiscsi(url: str, work: Path) -> float:
    cache = work / "cache.img"
    t0 = time.monotonic()
    r = subprocess.run([LAZYISCSI, "--log-level", "warning", "hydrate", "--source", url,
                        "--cache", str(cache), "--progress-interval", "0"],
                       capture_output=True, text=True, timeout=900)
    elapsed = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip()[-300:])
    return elapsed


def _qmp(sock: socket.socket, reader, command: dict) -> dict:  # type: ignore[no-untyped-def]
    sock.sendall((json.dumps(command) + "\n").encode())
    while True:
        msg = json.loads(reader.readline())
        if "return" in msg or "error" in msg:
            if "error" in msg:
                raise RuntimeError(msg["error"])
            return msg


def run_qsd(url: str, work: Path) -> float:
    """qcow2 overlay over the NBD source, copy-on-read on top, then block-stream; timed from
    the stream's start to its end (QEMU's own job, one 512 KiB chunk in flight)."""
    host_port = url.removeprefix("nbd://").rstrip("/")
    host, port = host_port.split(":")
    overlay = work / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", url, str(overlay)],
                   check=True)
    qmp_path = work / "qmp.sock"
    proc = subprocess.Popen([
        "qemu-storage-daemon",
        "--blockdev", f"driver=nbd,node-name=src,server.type=inet,server.host={host},"
                      f"server.port={port},read-only=on",
        "--blockdev", f"driver=file,node-name=ovl-file,filename={overlay}",
        "--blockdev", "driver=qcow2,node-name=ovl,file=ovl-file,backing=src",
        "--blockdev", "driver=copy-on-read,node-name=cor,file=ovl",
        "--chardev", f"socket,id=qmp0,path={qmp_path},server=on,wait=off",
        "--monitor", "chardev=qmp0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            if qmp_path.exists():
                break
            time.sleep(0.05)
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(qmp_path))
        reader = sock.makefile("r")
        json.loads(reader.readline())  # greeting
        _qmp(sock, reader, {"execute": "qmp_capabilities"})
        t0 = time.monotonic()
        _qmp(sock, reader, {"execute": "block-stream", "arguments": {"job-id": "s0", "device": "ovl"}})
        while _qmp(sock, reader, {"execute": "query-block-jobs"})["return"]:
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        sock.close()
        return elapsed
    finally:
        proc.kill()
        proc.wait()


def measure(case: str, env: str) -> float:
    link, kind = CASES[case]
    with nbdkit_source(image_for(kind), link) as url, tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        return (run_lazyiscsi if env == "lazyiscsi" else run_qsd)(url, Path(d))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=3, help="measured runs per cell at 1 Gbit/s")
    ap.add_argument("--slow-count", type=int, default=2, help="measured runs per cell at 100 Mbit/s")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    args = ap.parse_args()
    if not shutil.which("qemu-storage-daemon"):
        raise SystemExit("qemu-storage-daemon is missing: apt-get install qemu-system-common")
    results = {}
    for case in args.cases:
        slow = CASES[case][0] is SLOW
        envs = ["lazyiscsi", "qsd"] if CASES[case][1] == "full" else ["lazyiscsi"]
        print(f"case {case}: envs {envs}", flush=True)
        results.update(bench(measure, envs, [case], args.slow_count if slow else args.count,
                             warmup=not slow))
    report = {}
    print(f"\n{'case':<20} {'lazyiscsi s':<28} {'qsd s':<28} {'ideal s':>8} {'lazy/ideal':>11} "
          f"{'qsd/ideal':>10} {'lazy/qsd':>9}")
    for case, cells in results.items():
        link, _kind = CASES[case]
        ideal = link.ideal_s(GiB)
        lazy, qsd = cells["lazyiscsi"], cells.get("qsd")
        row = {"ideal_s": ideal, "lazyiscsi": lazy.values, "lazyiscsi_failed": lazy.failed}
        lm = lazy.median
        line = f"{case:<20} {lazy.show():<28} {(qsd.show() if qsd else '-'):<28} {ideal:>8.2f} "
        line += f"{(lm / ideal if lm else float('nan')):>11.3f} "
        if qsd and qsd.median and lm:
            row.update(qsd=qsd.values, qsd_failed=qsd.failed)
            line += f"{qsd.median / ideal:>10.3f} {lm / qsd.median:>9.3f}"
        print(line)
        report[case] = row
    if "sparse75@1G+20ms" in results and "full@1G+20ms" in results:
        s, f = results["sparse75@1G+20ms"]["lazyiscsi"].median, results["full@1G+20ms"]["lazyiscsi"].median
        if s and f:
            print(f"sparse (75% holes) / full at 1G+20ms: {s / f:.3f}")
            report["sparse_over_full"] = s / f
    OUT.mkdir(exist_ok=True)
    (OUT / "hydrate_wan.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
