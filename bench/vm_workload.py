# needs matplotlib for its plots: .venv/bin/pip install -e '.[bench]'
"""A VM whose disk is a lazy LUN, over an emulated WAN, running a workload; timed against the
same VM on other disks in the same run (issue 15: the seed's evaluation, redone).

    cd bench && ../.venv/bin/python vm_workload.py [--workload synthetic|debian] [--count N]
        [--slow-count N] [--links 100M+20ms 1G+20ms]
        [--disks local tgtd lazy-complete nbd lazy lazy-before qsd] [--lazy-tree DIR]
        [--files N] [--ops N] [--write-mib N] [--from-json vm_workload.json]

Two workloads (``--workload``), both on Debian's kernel under QEMU TCG with 1 vCPU, each VM
built once by its script in bench/vm/ (common.sh: what they share):

* ``synthetic`` (bench/vm/build.sh, the default): 128 MiB, a busybox initramfs whose init
  (bench/vm/init) waits for its disk, hot-plugged once the kernel is up (a migrated VM meets its
  disk running; no copier gets a head start from a boot that reads no disk), then mounts the
  disk's ext4 and runs: read /boot (boot), read 500 small files (files), 500 random 4 KiB
  O_DIRECT accesses in a 64 MiB file, one in 4 a write, then sync (db), write 8 MiB and sync
  (write). The disk is a 256 MiB ext4 image (build.sh says what it holds). Its time: the
  guest's clock from mount to the last sync.
* ``debian`` (bench/vm/build-debian.sh): issue 15's "Debian VM booting from a lazy LUN": 512
  MiB, the disk (a 1 GiB ext4 image, a debootstrapped bookworm root with systemd, udev, python3
  and the kernel's modules) is the VM's root from its start; the initramfs mounts it and hands
  over to systemd, whose boot ends in a unit that reads 2,000 files of /usr/lib/python3* and
  /usr/share (files), imports 40 Python modules (imports), makes the synthetic workload's 500
  random 4 KiB O_DIRECT accesses (one in 4 a write, then sync) in a 64 MiB file of random data
  (db), writes 8 MiB and syncs (write), then powers the VM off. Its time: the host's wall clock
  from QEMU's start to its exit; the phases (kernel, initramfs, boot, files, imports, db, write)
  from the guest's clock.

Both report each phase's start and the disk's sectors read and written every 0.5 s on the
console. The disk is reached as:

* ``local``: a copy of the image, QEMU's file driver (no link);
* ``tgtd``: a copy of the image served by tgtd, QEMU's iSCSI driver (no link): the cost of the
  iSCSI path itself (libiscsi in QEMU, a userspace target, TCP on loopback) against ``local``;
* ``lazy-complete``: ``lazyiscsi serve`` on the embedded portal, its cache already complete
  (``lazyiscsi hydrate`` before serve starts), QEMU's iSCSI driver (no link): our portal and
  store against tgtd, and the floor ``lazy`` would reach if every read were local;
* ``nbd``: a copy behind nbdkit on the emulated WAN, QEMU's NBD driver (plain remote disk, no
  copy; writes cross the link too);
* ``lazy``: ``lazyiscsi serve`` on the embedded portal, source the image behind nbdkit on the
  emulated WAN, QEMU's iSCSI driver; started just before the disk is attached (debian: before
  the VM starts), its copier runs meanwhile;
* ``lazy-before``: ``lazy`` with the serve of another checkout, ``--lazy-tree DIR`` (run by
  this venv's interpreter with DIR first on PYTHONPATH): issue 15's "before", e.g. ``git
  worktree add /var/tmp/lazyiscsi-before b715eb8^`` (the copy before hot-first);
* ``qsd``: qemu-storage-daemon, a qcow2 overlay over the image behind nbdkit on the WAN,
  copy-on-read on top, exported over NBD on a Unix socket to QEMU; ``block-stream`` started
  just before the disk is attached.

The WAN is bench/wan.py's: nbdkit's delay filter (every request waits the delay) and rate
filter (shared by all connections). ``local``, ``tgtd`` and ``lazy-complete`` do not depend on
the link: they run once per repetition, and every ratio is against ``local`` of the same run
(``--disks local tgtd lazy-complete`` runs only them). ``nbd`` and ``qsd`` run ``--slow-count``
times (plain NBD takes minutes). Per cell: the median of N runs of the workload's time, of each
phase and of the VM's wall time (synthetic: the disk attached to the VM powered off). Output: a
table, the same per phase, the ratios that split lazy / local into its parts (tgtd / local: the
iSCSI path; lazy-complete / tgtd: our portal against tgtd; lazy / lazy-complete: being lazy;
lazy-before / lazy: the change), ``vm_workload.json`` (debian: ``vm_debian.json``; every run,
its phases and I/O series) and two plots, ``vm_workload_times.png`` and
``vm_workload_throughput.png`` (``vm_debian_*.png``), in bench/. ``--from-json`` prints and
plots a saved run again without running anything.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from iscsi_perf import start_tgtd, stop_tgtd
from wan import ROOT, Link, MiB, cpu_ticks, free_port, nbdkit_source, steal_since

sys.path.insert(0, str(ROOT.parent))  # the migration test's process and QMP helpers
from lazyiscsi.control import ControlError
from lazyiscsi.control import call as control_call
from tests.integration.peers import wait_listening, wait_until
from tests.migration.harness import Procs
from tests.migration.qmp import Qmp


@dataclass(frozen=True)
class Workload:
    """What a VM runs and how it meets its disk (``--workload``)."""

    build: Path  # bench/vm/ script that builds the VM, --if-needed
    env: str  # the variable naming its output directory
    default_dir: str
    memory_mib: int
    # hot-plugged once the kernel is up (the synthetic workload's init waits for it), or the
    # VM's root from its start (the Debian VM boots from it)
    hotplug: bool
    # the marks' origin: the first phase mark (synthetic: mount), or 0, the kernel's start
    # (Debian: its phases cover the whole boot; the first, "kernel", ends when the initramfs runs)
    from_kernel: bool
    # the time acceptance 1 judges: the guest's workload (mount to the last sync) or the host's
    # wall time from the VM's start to its power-off
    metric: str
    stem: str  # the JSON's and the plots' name in --out
    what: str  # the plots' words for the metric

    @property
    def vm_dir(self) -> Path:
        return Path(os.environ.get(self.env, self.default_dir))


WORKLOADS = {
    "synthetic": Workload(ROOT / "vm" / "build.sh", "LAZYISCSI_BENCH_VM", "/var/tmp/lazyiscsi-bench-vm", 128,
                          hotplug=True, from_kernel=False, metric="workload_s", stem="vm_workload",
                          what="workload completion time (s), the guest's clock"),
    # 512 MiB: systemd, udev and python3 with room for a page cache
    "debian": Workload(ROOT / "vm" / "build-debian.sh", "LAZYISCSI_BENCH_DEBIAN",
                       "/var/tmp/lazyiscsi-bench-debian", 512, hotplug=False, from_kernel=True,
                       metric="wall_s", stem="vm_debian",
                       what="VM start to power-off (s), host wall clock"),
}
# the first build downloads the kernel package (about 70 MB) from the host's apt mirror; the
# Debian one debootstraps a root too (about 100 MB more)
VM_BUILD_TIMEOUT_S = 1800
LAZYISCSI = [sys.executable, "-m", "lazyiscsi.cli"]
IQN = "iqn.2026-11.io.lazyiscsi:vmbench"
# the kernel's boot under TCG on a loaded 2-core host, to the synthetic init's "LZW ready"
BOOT_S = 300.0
# one VM run at most: plain NBD at 100 Mbit/s + 50 ms is the slowest
RUN_S = 1200.0
LINKS = {
    "100M+20ms": Link(10**8, 20),
    "1G+20ms": Link(10**9, 20),
    "100M+50ms": Link(10**8, 50),
    "1G+50ms": Link(10**9, 50),
}
DISKS = ("local", "tgtd", "lazy-complete", "nbd", "lazy", "lazy-before", "qsd")
# the disks that reach nothing over the link: one run per repetition, not one per link
NO_LINK = ("local", "tgtd", "lazy-complete")
# the group NO_LINK's disks are tabled, plotted and kept in the JSON's summary under
NONE = "none"
# run --count times; the others (the slow peers) --slow-count times
FAST = (*NO_LINK, "lazy", "lazy-before")
# issue 15, acceptance 1: the lazy LUN's workload time over the local file's, at most
TARGETS = {"100M+20ms": 1.3, "1G+20ms": 1.1}
COLOURS = {"local": "tab:green", "tgtd": "tab:purple", "lazy-complete": "tab:cyan", "nbd": "tab:red",
           "lazy": "tab:blue", "lazy-before": "tab:gray", "qsd": "tab:orange"}
LABELS = {"local": "local file", "tgtd": "tgtd (iSCSI, no link)",
          "lazy-complete": "lazyiscsi LUN, copy complete (no link)", "nbd": "plain remote NBD",
          "lazy": "lazyiscsi LUN", "lazy-before": "lazyiscsi LUN before hot-first (--lazy-tree)",
          "qsd": "qemu-storage-daemon COR + stream"}
# what each quotient of two cells' medians isolates: (numerator, denominator, what it is)
PARTS = (("tgtd", "local", "the iSCSI path (QEMU's libiscsi, a userspace target) against QEMU's file driver"),
         ("lazy-complete", "tgtd", "our portal and store against tgtd, both local"),
         ("lazy", "lazy-complete", "being lazy: misses and the copier against the same LUN complete"),
         ("lazy-before", "lazy", "--lazy-tree's serve (before hot-first) against this tree's"))
# a hydrate of the 256 MiB image from a local file: seconds, on a loaded machine
HYDRATE_S = 300
PHASE = re.compile(r"^LZW phase (\w+) ([\d.]+)\r?$", re.M)
SAMPLE = re.compile(r"^LZW io ([\d.]+) (\d+) (\d+)\r?$", re.M)
SECTOR = 512  # /sys/block/*/stat counts 512-byte sectors whatever the device's block size
# a metric's ratio to the local file's, in the summary
OVER_LOCAL = {"workload_s": "over_local", "wall_s": "wall_over_local"}


@dataclass
class Run:
    disk: str
    link: str | None
    # synthetic: the disk attached to QEMU exited; debian: QEMU started (with its disk) to exited
    wall_s: float
    # the guest's clock: synthetic, mount to the end of the last phase; debian, the kernel's start
    # to the end of the workload (its last sync)
    workload_s: float
    phases: dict[str, float]  # name -> seconds, in order
    samples: list[tuple[float, int, int]]  # seconds since mount, bytes read, bytes written
    extra: dict[str, Any] = field(default_factory=dict)
    # the 1-minute load average when the VM started and when it powered off (the machine is shared)
    load: tuple[float, float] = (0.0, 0.0)
    # the share of the machine's CPU time its hypervisor gave to others while the VM ran
    # (/proc/stat's steal: on a shared cloud machine, the noise the load average does not show)
    steal: float = 0.0


def parse_console(text: str, from_kernel: bool = False) -> tuple[dict[str, float], float,
                                                               list[tuple[float, int, int]]]:
    """The workload's phases (name -> seconds), its total and its I/O series, from the console;
    an error quoting the console's end if the workload did not finish. ``from_kernel``: the
    first phase, "kernel", runs from the kernel's start (uptime 0) to the first mark."""
    if "LZW done" not in text or "LZW FATAL" in text:
        raise RuntimeError("the workload did not finish; the console ends:\n" + text[-1500:])
    marks = [("kernel", 0.0)] if from_kernel else []
    marks += [(m[1], float(m[2])) for m in PHASE.finditer(text)]
    t0 = marks[0][1]
    # /proc/uptime has centiseconds
    phases = {name: round(end - start, 2) for (name, start), (_, end) in itertools.pairwise(marks)}
    samples = [(round(float(m[1]) - t0, 2), int(m[2]) * SECTOR, int(m[3]) * SECTOR)
               for m in SAMPLE.finditer(text)]
    return phases, round(marks[-1][1] - t0, 2), samples


Disk = Iterator[tuple[str, Callable[[], dict[str, Any]]]]  # QEMU's drive, what to ask after the run


def write_out(path: Path) -> None:
    """fsync ``path``: a file just written is written out before the disk is attached (its
    writeback must not compete with the workload)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fresh_copy(image: Path, copy: Path) -> None:
    """The image as the workload finds it, written out."""
    subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
    write_out(copy)


@contextlib.contextmanager
def disk_local(image: Path, link: Link | None, work: Path, procs: Procs, tree: Path | None) -> Disk:
    copy = work / "disk.img"
    fresh_copy(image, copy)
    yield f"file={copy}", dict


@contextlib.contextmanager
def disk_nbd(image: Path, link: Link | None, work: Path, procs: Procs, tree: Path | None) -> Disk:
    assert link is not None
    copy = work / "remote.img"
    fresh_copy(image, copy)
    with nbdkit_source(copy, link, writable=True) as url:
        yield f"file={url}", dict


@contextlib.contextmanager
def disk_tgtd(image: Path, link: Link | None, work: Path, procs: Procs, tree: Path | None) -> Disk:
    copy = work / "tgtd.img"
    fresh_copy(image, copy)
    proc, url, ctl = start_tgtd(copy)  # bench/iscsi_perf.py's: its own port and control socket
    try:
        yield f"file={url}", dict
    finally:
        stop_tgtd(proc, ctl)


def lazyiscsi(tree: Path | None) -> list[str]:
    """The CLI of this checkout, or of ``tree`` (another checkout's lazyiscsi/ first on the path,
    run by the same interpreter and venv: ``--lazy-tree``)."""
    return ["env", f"PYTHONPATH={tree}", *LAZYISCSI] if tree else LAZYISCSI


@contextlib.contextmanager
def serve_portal(source: str, work: Path, procs: Procs, tree: Path | None = None) -> Disk:
    """``lazyiscsi serve`` on the embedded portal, LUN 0 from ``source`` into ``work/cache.img``
    (created, or resumed if there), from ``tree``'s code if given; what to ask after the run:
    its volume's status."""
    control, port = work / "control.sock", free_port()
    serve = procs.start("serve", [
        *lazyiscsi(tree), "--log-level", "warning", "--control", str(control), "serve",
        "--frontend", "portal", "--state-dir", str(work / "state"), "--source", source,
        "--cache", str(work / "cache.img"), "--iqn", IQN, "--listen", f"127.0.0.1:{port}"])
    wait_listening(port, serve)
    wait_until(control.exists, "serve's control socket", proc=serve)
    done = CopyDone(str(control))

    def status() -> dict[str, Any]:
        r = subprocess.run([*lazyiscsi(tree), "--control", str(control), "status", "vol0", "--json"],
                           capture_output=True, text=True, timeout=60)
        (vol,) = json.loads(r.stdout)
        # the guest's misses (how many, how long) and the bytes fetched (more than local: twice)
        return {"tree": str(tree or ROOT.parent), "copy_done_at": done.at,
                **{k: vol.get(k) for k in ("state", "size", "local_bytes", "fetched_bytes", "hot_bytes",
                                           "misses", "miss_p50_ms", "miss_p99_ms")}}

    try:
        yield f"file=iscsi://127.0.0.1:{port}/{IQN}/0", status
    finally:
        done.stop()
        procs.stop(serve)


class CopyDone:
    """When the LUN's copy ended (time.monotonic(); None: not while this watched), from the
    daemon's status once every POLL_S on its control socket, in a thread: a VM that ran slower
    than lazy-complete although few reads missed may have shared the link, or the CPU, with
    the copier."""

    POLL_S = 1.0

    def __init__(self, control: str) -> None:
        self.at: float | None = None
        self._stop = threading.Event()
        self._control = control
        threading.Thread(target=self._watch, name="copy-done", daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(self.POLL_S):
            try:
                (vol,) = control_call(self._control, "status", {"name": "vol0"}, timeout=10)
            except (ControlError, OSError, ValueError):  # (a read that timed out is an OSError)
                continue  # a missed poll costs a second of precision, no more
            if vol.get("state") == "complete":
                self.at = time.monotonic()
                return

    def stop(self) -> None:
        self._stop.set()


@contextlib.contextmanager
def lazy_over_link(image: Path, link: Link | None, work: Path, procs: Procs, tree: Path | None) -> Disk:
    assert link is not None
    with nbdkit_source(image, link) as url, serve_portal(url, work, procs, tree) as disk:
        yield disk


@contextlib.contextmanager
def disk_lazy(image: Path, link: Link | None, work: Path, procs: Procs, tree: Path | None) -> Disk:
    """This checkout's serve, whatever ``--lazy-tree`` says."""
    with lazy_over_link(image, link, work, procs, None) as disk:
        yield disk


@contextlib.contextmanager
def disk_lazy_before(image: Path, link: Link | None, work: Path, procs: Procs, tree: Path | None) -> Disk:
    """``lazy`` with ``--lazy-tree``'s serve (issue 15's "before": the copy before hot-first)."""
    if tree is None:
        raise RuntimeError("the lazy-before disk needs --lazy-tree")
    with lazy_over_link(image, link, work, procs, tree) as disk:
        yield disk


@contextlib.contextmanager
def disk_lazy_complete(image: Path, link: Link | None, work: Path, procs: Procs, tree: Path | None) -> Disk:
    """The same LUN as ``lazy``'s, its cache hydrated from the image (a local file, read-only)
    before serve starts, so no read can miss and no copier runs; the cache written out first,
    as ``fresh_copy``'s copies are."""
    cache = work / "cache.img"
    r = subprocess.run([*LAZYISCSI, "--log-level", "warning", "hydrate", "--source", str(image),
                        "--cache", str(cache)], capture_output=True, text=True, timeout=HYDRATE_S)
    if r.returncode != 0:
        raise RuntimeError(f"lazyiscsi hydrate exited with {r.returncode}: {r.stderr[-800:]}")
    for path in work.glob("cache.img*"):  # the data, its map and its meta
        write_out(path)
    with serve_portal(str(image), work, procs) as (drive, status):
        if (state := status()["state"]) != "complete":
            raise RuntimeError(f"the hydrated LUN is {state}, not complete")
        yield drive, status


@contextlib.contextmanager
def disk_qsd(image: Path, link: Link | None, work: Path, procs: Procs, tree: Path | None) -> Disk:
    assert link is not None
    overlay, sock, qmp_path = work / "overlay.qcow2", work / "qsd.sock", work / "qsd.qmp"
    with nbdkit_source(image, link) as url:
        host, port = url.removeprefix("nbd://").rstrip("/").split(":")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", url, str(overlay)],
                       check=True)
        proc = procs.start("qsd", [
            "qemu-storage-daemon",
            "--blockdev", f"driver=nbd,node-name=src,server.type=inet,server.host={host},"
                          f"server.port={port},read-only=on",
            "--blockdev", f"driver=file,node-name=ovl-file,filename={overlay}",
            "--blockdev", "driver=qcow2,node-name=ovl,file=ovl-file,backing=src",
            "--blockdev", "driver=copy-on-read,node-name=cor,file=ovl",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=exp0,node-name=cor,name=lun0,writable=on",
            "--chardev", f"socket,id=qmp0,path={qmp_path},server=on,wait=off",
            "--monitor", "chardev=qmp0"])
        wait_until(sock.exists, "qemu-storage-daemon's NBD socket", proc=proc)
        qmp = Qmp(qmp_path, proc)
        qmp.command("block-stream", {"job-id": "s0", "device": "ovl"})

        def after() -> dict[str, Any]:
            jobs = qmp.command("query-block-jobs")
            return {"stream_done": not jobs, "stream_offset": jobs[0]["offset"] if jobs else None}

        try:
            yield f"file=nbd+unix:///lun0?socket={sock}", after
        finally:
            qmp.close()
            procs.stop(proc)


# image, link, work dir, processes, --lazy-tree -> the disk
SETUP: dict[str, Callable[[Path, Link | None, Path, Procs, Path | None],
                          contextlib.AbstractContextManager[Any]]] = {
    "local": disk_local, "tgtd": disk_tgtd, "lazy-complete": disk_lazy_complete, "nbd": disk_nbd,
    "lazy": disk_lazy, "lazy-before": disk_lazy_before, "qsd": disk_qsd}


def vm_argv(wl: Workload, console: Path, qmp: Path, kernel_args: str, drive: str | None) -> list[str]:
    """tests/migration/harness.py's VM, with this bench's kernel, initramfs and workload; its
    disk ``drive`` (as ``attach`` adds it) from the start, or none yet (``attach`` hot-plugs it
    once the guest is up)."""
    disk = ["-drive", f"if=none,id=disk0,format=raw,{drive}", "-device",
            "virtio-blk-pci,drive=disk0,id=vda"] if drive else []
    return ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", str(wl.memory_mib),
            "-display", "none", "-nodefaults", "-no-reboot", "-nic", "none",
            "-chardev", f"file,id=serial0,path={console}", "-serial", "chardev:serial0",
            "-qmp", f"unix:{qmp},server=on,wait=off", *disk,
            "-kernel", str(wl.vm_dir / "vmlinux"), "-initrd", str(wl.vm_dir / "initrd.img"),
            "-append", f"console=ttyS0 panic=-1 quiet loglevel=1 {kernel_args}"]


def attach(qmp: Qmp, drive: str) -> None:
    """The disk as the VM would have had it from the start (``-drive ...,if=none`` and a
    virtio-blk-pci device), hot-plugged: HMP's drive_add takes -drive's syntax, so every disk
    kind is one drive string."""
    said = qmp.command("human-monitor-command",
                       {"command-line": f"drive_add 0 if=none,id=disk0,format=raw,{drive}"})
    if "OK" not in said:
        raise RuntimeError(f"drive_add {drive}: {said.strip()}")
    qmp.command("device_add", {"driver": "virtio-blk-pci", "drive": "disk0", "id": "vda"})


def run_once(wl: Workload, disk: str, link_name: str | None, kernel_args: str, tree: Path | None) -> Run:
    image = wl.vm_dir / "disk.img"
    link = LINKS[link_name] if link_name else None
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="lazyiscsi-vmbench-") as d, \
            contextlib.closing(Procs(Path(d))) as procs, contextlib.ExitStack() as stack:
        work = Path(d)
        console, qmp_path = work / "console", work / "vm.qmp"
        load_start = os.getloadavg()[0]
        ticks = cpu_ticks()
        if wl.hotplug:
            vm = procs.start("vm", vm_argv(wl, console, qmp_path, kernel_args, None))
            qmp = Qmp(qmp_path, vm)
            wait_until(lambda: "LZW ready" in console.read_text(errors="replace"), "the VM's boot",
                       BOOT_S, vm)
            drive, after = stack.enter_context(SETUP[disk](image, link, work, procs, tree))
            t0 = time.monotonic()
            attach(qmp, drive)
        else:  # the disk is ready (a lazy LUN's copier running) when the VM starts from it
            drive, after = stack.enter_context(SETUP[disk](image, link, work, procs, tree))
            t0 = time.monotonic()
            vm = procs.start("vm", vm_argv(wl, console, qmp_path, kernel_args, drive))
            qmp = Qmp(qmp_path, vm)
        try:
            vm.wait(RUN_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the VM ran over {RUN_S:.0f} s") from None
        wall = time.monotonic() - t0
        steal = steal_since(ticks)
        extra = after()
        if (done_at := extra.pop("copy_done_at", None)) is not None:
            extra["copy_done_s"] = round(done_at - t0, 1)  # from the VM's start (or the disk's attach)
        stack.close()
        qmp.close()
        text = console.read_text(errors="replace")
        if vm.returncode != 0:
            log = (work / "vm.log").read_text(errors="replace")
            raise RuntimeError(f"QEMU exited with {vm.returncode}: {log[-800:]}")
        phases, workload, samples = parse_console(text, wl.from_kernel)
    return Run(disk, link_name, wall, workload, phases, samples, extra, (load_start, os.getloadavg()[0]),
               steal)


def build_vm(wl: Workload) -> None:
    r = subprocess.run(["bash", str(wl.build), "--if-needed"], capture_output=True, text=True,
                       timeout=VM_BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL,
                       env={**os.environ, wl.env: str(wl.vm_dir)})
    if r.returncode != 0:
        raise SystemExit(f"{wl.build} failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")


def cells(runs: list[Run], links: list[str], disks: list[str]) -> dict[str, dict[str, list[Run]]]:
    """group -> disk -> its runs: the disks that reach nothing over the link under ``NONE``, the
    others under each link."""
    groups = {NONE: [d for d in disks if d in NO_LINK]}
    groups |= {ln: [d for d in disks if d not in NO_LINK] for ln in links}
    return {g: {d: [r for r in runs if r.disk == d and r.link == (None if g == NONE else g)] for d in ds}
            for g, ds in groups.items() if ds}


def median(runs: list[Run], what: str) -> float | None:
    return statistics.median(getattr(r, what) for r in runs) if runs else None


def quotient(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summary(table: dict[str, dict[str, list[Run]]]) -> dict[str, Any]:
    """group -> disk -> medians (workload, VM wall time, each phase) and their ratios to the
    local file's of the same run."""
    out: dict[str, Any] = {}
    local_runs = table.get(NONE, {}).get("local", [])
    local, local_wall = median(local_runs, "workload_s"), median(local_runs, "wall_s")
    local_phases = {p: statistics.median(r.phases[p] for r in local_runs) for p in local_runs[0].phases} \
        if local_runs else {}
    for g, by_disk in table.items():
        row: dict[str, Any] = {}
        for d, runs in by_disk.items():
            w, wall = median(runs, "workload_s"), median(runs, "wall_s")
            phases = {p: statistics.median(r.phases[p] for r in runs) for p in runs[0].phases} if runs else {}
            row[d] = {"runs": len(runs), "workload_s": w, "wall_s": wall,
                      "workload_s_range": [min(r.workload_s for r in runs), max(r.workload_s for r in runs)]
                      if runs else None,
                      "wall_s_range": [min(r.wall_s for r in runs), max(r.wall_s for r in runs)]
                      if runs else None,
                      "phases_s": phases,
                      "over_local": quotient(w, local), "wall_over_local": quotient(wall, local_wall),
                      "phases_over_local": {p: quotient(v, local_phases.get(p)) for p, v in phases.items()}}
        out[g] = row
    return out


def cell(summ: dict[str, Any], group: str, disk: str) -> dict[str, Any] | None:
    c = summ.get(group, {}).get(disk)
    return c if c and c["runs"] else None


def parts(summ: dict[str, Any], metric: str = "workload_s") -> list[dict[str, Any]]:
    """lazy / local split into its factors (``PARTS``), each a ratio of two cells' medians (of
    ``metric``), total and per phase: how much of the lazy LUN's time is the iSCSI path, how much
    our portal, how much being lazy on each link."""
    out = []
    links = [g for g in summ if g != NONE]
    for num, den, what in PARTS:
        for g in ([NONE] if num in NO_LINK else links):
            a, b = cell(summ, g, num), cell(summ, NONE if den in NO_LINK else g, den)
            if a and b:
                out.append({"ratio": f"{num} / {den}", "link": None if g == NONE else g, "what": what,
                            "workload": quotient(a[metric], b[metric]),
                            "phases": {p: quotient(v, b["phases_s"].get(p))
                                       for p, v in a["phases_s"].items()}})
    return out


def print_table(summ: dict[str, Any], split: list[dict[str, Any]]) -> None:
    print(f"\n{'link':<11} {'disk':<13} {'n':>2} {'workload s':>11} {'[min-max]':>15} {'x local':>8} "
          f"{'VM wall s':>10} {'[min-max]':>15} {'x local':>8}")
    for g, row in summ.items():
        for d, c in row.items():
            if not c["runs"]:
                print(f"{g:<11} {d:<13}  0 (every run failed)")
                continue
            lo, hi = c["workload_s_range"]
            wlo, whi = c["wall_s_range"]
            print(f"{g:<11} {d:<13} {c['runs']:>2} {c['workload_s']:>11.2f} {f'[{lo:.2f}-{hi:.2f}]':>15} "
                  f"{c['over_local'] or 0:>8.2f} {c['wall_s']:>10.2f} {f'[{wlo:.2f}-{whi:.2f}]':>15} "
                  f"{c['wall_over_local'] or 0:>8.2f}")
    names = next((list(c["phases_s"]) for row in summ.values() for c in row.values() if c["runs"]), [])
    print(f"\nper phase: median s (x local's)\n{'link':<11} {'disk':<13} "
          + " ".join(f"{p:>14}" for p in names))
    for g, row in summ.items():
        for d, c in row.items():
            if c["runs"]:
                pairs = [f"{c['phases_s'][p]:.2f} ({c['phases_over_local'][p] or 0:.2f})" for p in names]
                print(f"{g:<11} {d:<13} " + " ".join(f"{pair:>14}" for pair in pairs))
    if split:
        print(f"\nparts of lazy / local (ratios of medians)\n{'ratio':<22} {'link':<11} {'workload':>8} "
              + " ".join(f"{p:>7}" for p in names))
        for s in split:
            print(f"{s['ratio']:<22} {s['link'] or NONE:<11} {s['workload'] or 0:>8.2f} "
                  + " ".join(f"{s['phases'].get(p) or 0:>7.2f}" for p in names) + f"  ({s['what']})")


def throughput(samples: list[tuple[float, int, int]]) -> tuple[list[float], list[float]]:
    """MiB/s read + written between consecutive samples, at the interval's end."""
    ts, rates = [], []
    for (t1, r1, w1), (t2, r2, w2) in itertools.pairwise(samples):
        if t2 > t1:
            ts.append(t2)
            rates.append((r2 - r1 + w2 - w1) / (t2 - t1) / MiB)
    return ts, rates


def group_label(group: str) -> str:
    if group == NONE:
        return "no link"
    return group.replace("+", " + ").replace("M", " Mbit/s").replace("G", " Gbit/s")


def plot(table: dict[str, dict[str, list[Run]]], summ: dict[str, Any], out: Path, title: str,
         wl: Workload) -> list[Path]:
    """Completion time (``wl.metric``) per cell (bars, grouped: no link, then each link) and the
    median run's I/O over time per group. Legends go right of the axes, never over a bar or a
    line."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("matplotlib is missing: .venv/bin/pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(table)
    shown = {g: [d for d in DISKS if cell(summ, g, d)] for g in groups}
    width = 0.8 / max(len(ds) for ds in shown.values())
    fig, ax = plt.subplots(figsize=(10, 5))
    labelled: set[str] = set()
    for j, g in enumerate(groups):
        for i, d in enumerate(shown[g]):
            c = summ[g][d]
            lo, hi = c[f"{wl.metric}_range"]
            v = c[wl.metric]
            x = j + (i - (len(shown[g]) - 1) / 2) * width
            ax.bar([x], [v], width, yerr=[[v - lo], [hi - v]],
                   capsize=3, color=COLOURS[d], label=None if d in labelled else LABELS[d])
            labelled.add(d)
            if ratio := c[OVER_LOCAL[wl.metric]]:  # above the error bar, which bar_label's text would cross
                ax.annotate(f"{ratio:.2f}x", (x, hi), xytext=(0, 3), textcoords="offset points",
                            ha="center", fontsize=8)
    if local := cell(summ, NONE, "local"):
        ax.axhline(local[wl.metric], color=COLOURS["local"], linestyle="--", linewidth=0.8,
                   label="local file's median")
    ax.set_xticks(range(len(groups)), [group_label(g) for g in groups])
    ax.set_xlabel("emulated WAN (nbdkit rate + delay)")
    ax.set_ylabel(f"{wl.what}, median; bars: min-max", fontsize=9)
    ax.margins(y=0.08)
    ax.set_title(f"VM workload on each disk, label: time / local file's\n{title}", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    times = out / f"{wl.stem}_times.png"
    fig.savefig(times, dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 3.4 * len(groups)), squeeze=False)
    handles: dict[str, Any] = {}
    for (rate_ax, done_ax), g in zip(axes, groups, strict=True):
        # each link's row has the local file's run too, as the reference
        reference = table.get(NONE, {}).get("local", []) if g != NONE else []
        for d, runs in ([("local", reference)] if reference else []) + list(table[g].items()):
            if not runs:
                continue
            run = sorted(runs, key=lambda r: r.workload_s)[len(runs) // 2]  # the median run
            ts, rates = throughput(run.samples)
            rate_ax.plot(ts, rates, color=COLOURS[d], linewidth=1.1, drawstyle="steps-pre")
            done = [(t, (r + w) / MiB) for t, r, w in run.samples if t >= 0]
            (handles[d],) = done_ax.plot([t for t, _ in done], [m for _, m in done], color=COLOURS[d],
                                         linewidth=1.4)
            done_ax.plot([run.workload_s], [done[-1][1]], "o", color=COLOURS[d])
        rate_ax.set_title(f"{group_label(g)}: throughput, the median run of each disk", fontsize=10)
        rate_ax.set_ylabel("guest disk I/O (MiB/s)")
        done_ax.set_title(f"{group_label(g)}: I/O done (dot: the workload's end)", fontsize=10)
        done_ax.set_ylabel("MiB read + written since boot")
        for ax in (rate_ax, done_ax):
            ax.set_xlabel("time since the kernel started (s)" if wl.from_kernel
                          else "time since the workload began (s)")
            ax.set_xlim(left=0)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    order = [d for d in DISKS if d in handles]
    fig.legend([handles[d] for d in order], [LABELS[d] for d in order], loc="upper left",
               bbox_to_anchor=(1.0, 0.95), fontsize=8)
    fig.suptitle(f"the VM's disk throughput (read + written, between samples asked every 0.5 s), {title}",
                 fontsize=10)
    fig.tight_layout()
    series = out / f"{wl.stem}_throughput.png"
    fig.savefig(series, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [times, series]


def run_all(args: argparse.Namespace, wl: Workload, links: list[str],
            kernel_args: str) -> tuple[list[Run], list[dict[str, Any]]]:
    """Every cell's runs, repetition by repetition (a repetition runs each cell once, so that
    the machine's drift falls on all cells alike): the disks with no link once, the others once
    per link; the failures, kept and counted rather than ending the run."""
    plan: list[tuple[str, str | None]] = [(d, None) for d in args.disks if d in NO_LINK]
    plan += [(d, ln) for ln in links for d in args.disks if d not in NO_LINK]
    runs: list[Run] = []
    failures: list[dict[str, Any]] = []
    for i in range(max(args.count, args.slow_count)):
        for disk, ln in plan:
            if i >= (args.count if disk in FAST else args.slow_count):
                continue
            try:
                r = run_once(wl, disk, ln, kernel_args, args.lazy_tree)
            except Exception as e:
                failures.append({"disk": disk, "link": ln, "error": str(e)[-500:]})
                print(f"  run {i + 1} {disk} {ln or ''} failed: {e}", flush=True)
                continue
            runs.append(r)
            phases = " ".join(f"{p}={s:.1f}" for p, s in r.phases.items())
            print(f"  run {i + 1} {disk:<13} {ln or '-':<10} workload {r.workload_s:6.2f} s, "
                  f"VM {r.wall_s:6.2f} s ({phases}) load {r.load[0]:.2f}-{r.load[1]:.2f} "
                  f"steal {r.steal:.0%} {r.extra or ''}",
                  flush=True)
    return runs, failures


def report(runs: list[Run], wl: Workload, links: list[str], disks: list[str], count: int, slow_count: int,
           loads: tuple[list[float], list[float]], out: Path) -> dict[str, Any]:
    """Print the tables and acceptance 1's verdicts (on ``wl.metric``), draw the plots; the
    summary for the JSON."""
    table = cells(runs, links, disks)
    summ = summary(table)
    split = parts(summ, wl.metric)
    print_table(summ, split)
    (load_start, load_end) = loads
    print(f"load average at the start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, "
          f"at the end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    over = OVER_LOCAL[wl.metric]
    for ln in links:
        for d in ("lazy", "lazy-before"):
            c = cell(summ, ln, d)
            if ln in TARGETS and c and c[over]:
                verdict = "met" if c[over] <= TARGETS[ln] else "NOT met"
                print(f"acceptance 1 at {ln}: {d} / local = {c[over]:.2f} of {wl.metric} "
                      f"(at most {TARGETS[ln]}): {verdict}")
    fast = ", ".join(d for d in FAST if d in disks)
    slow = ", ".join(d for d in disks if d not in FAST)
    title = (f"{fast}: median of {count} runs" + (f"; {slow}: {slow_count}" if slow else "")
             + f"; load average {load_start[0]:.1f}-{load_end[0]:.1f}")
    for p in plot(table, summ, out, title, wl):
        print(f"wrote {p}")
    return {"summary": summ, "parts": split}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=list(WORKLOADS), default="synthetic",
                    help="synthetic: busybox init, the disk hot-plugged, mount/boot/files/db/write; "
                         "debian: the VM boots Debian from the disk and runs files/imports/db/write")
    ap.add_argument("--count", type=int, default=3, help=f"runs per cell of {', '.join(FAST)} (medians)")
    ap.add_argument("--slow-count", type=int, default=1,
                    help="runs per cell of nbd and qsd (the peers: the slowest, plain NBD most)")
    ap.add_argument("--links", nargs="*", default=["100M+20ms", "1G+20ms"], choices=list(LINKS),
                    help=f"the links of the disks that use one (all but {', '.join(NO_LINK)})")
    ap.add_argument("--disks", nargs="*", choices=list(DISKS),
                    help="default: all, lazy-before only with --lazy-tree")
    ap.add_argument("--lazy-tree", type=Path, metavar="DIR",
                    help="another checkout (e.g. a git worktree of b715eb8^, before hot-first) whose "
                         "lazyiscsi serves the lazy-before disk, run with DIR on PYTHONPATH by this venv")
    ap.add_argument("--files", type=int, help="files read in the files phase (synthetic 500, debian 2000)")
    ap.add_argument("--ops", type=int, default=500, help="4 KiB random accesses in the db phase")
    ap.add_argument("--write-every", type=int, default=4, help="every Nth db access is a write")
    ap.add_argument("--write-mib", type=int, default=8, help="MiB written in the write phase")
    ap.add_argument("--out", type=Path, default=ROOT, help="where the JSON and the plots go")
    ap.add_argument("--from-json", type=Path, metavar="JSON",
                    help="print the tables and draw the plots of a saved run (its vm_workload.json or "
                         "vm_debian.json) into --out; runs nothing")
    args = ap.parse_args()
    # a kill unwinds like ^C: every VM, target and server a run started is stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        wl = WORKLOADS[saved.get("workload", "synthetic")]
        runs = [Run(**r) for r in saved["runs"]]
        links = [ln for ln in LINKS if any(r.link == ln for r in runs)]
        disks = [d for d in DISKS if any(r.disk == d for r in runs)]
        print(f"{saved['command']}: {len(runs)} runs; {saved['kernel_args']}")
        report(runs, wl, links, disks, saved["count"], saved["slow_count"],
               (saved["load_average_start"], saved["load_average_end"]), args.out)
        return
    wl = WORKLOADS[args.workload]
    if args.disks is None:
        args.disks = [d for d in DISKS if d != "lazy-before" or args.lazy_tree]
    if "lazy-before" in args.disks:
        if args.lazy_tree is None or not (args.lazy_tree / "lazyiscsi" / "cli.py").is_file():
            raise SystemExit("the lazy-before disk needs --lazy-tree DIR, a checkout with lazyiscsi/cli.py")
        args.lazy_tree = args.lazy_tree.resolve()
    for tool in ("qemu-system-x86_64", "qemu-storage-daemon", "nbdkit", "qemu-img", "tgtd", "tgtadm"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: bash scripts/setup.sh installs it")
    links = args.links if any(d not in NO_LINK for d in args.disks) else []
    build_vm(wl)
    files = args.files or (2000 if args.workload == "debian" else 500)
    kernel_args = (f"lzw.files={files} lzw.ops={args.ops} lzw.wevery={args.write_every} "
                   f"lzw.write_mib={args.write_mib}")
    with open(wl.vm_dir / "disk.img", "rb") as f:  # the source image in the page cache for every disk alike
        while f.read(8 * MiB):
            pass
    load_start = list(os.getloadavg())
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average "
          f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}; {kernel_args}", flush=True)
    runs, failures = run_all(args, wl, links, kernel_args)
    load_end = list(os.getloadavg())
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}: done", flush=True)
    summ = report(runs, wl, links, args.disks, args.count, args.slow_count, (load_start, load_end), args.out)
    saved = {"command": " ".join(sys.argv), "workload": args.workload, "kernel_args": kernel_args,
             "lazy_tree": str(args.lazy_tree) if args.lazy_tree else None, "count": args.count,
             "slow_count": args.slow_count, "load_average_start": load_start, "load_average_end": load_end,
             **summ, "failures": failures, "runs": [asdict(r) for r in runs]}
    path = args.out / f"{wl.stem}.json"
    path.write_text(json.dumps(saved, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
