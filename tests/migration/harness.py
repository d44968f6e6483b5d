"""A VM live-migrated onto a lazy LUN, end to end, shared by tests/migration/test_live_migration.py
and scripts/demo-live-migration.sh (``python -m tests.migration.harness VARIANT``).

The source site is a qemu-storage-daemon that owns the VM's raw disk image and exports it twice
over NBD on a Unix socket: ``vm``, the source VM's disk, and ``lazy``, lazyiscsi's source (with
the dirty bitmap for pre-copy; writable then, since QEMU refuses an enabled bitmap on a read-only
export). The destination is ``lazyiscsi serve`` on the embedded portal; the destination QEMU opens
the LUN with its iSCSI driver and waits with ``-incoming`` and ``-S``. Its drive needs neither
``cache.direct=on`` nor ``auto-read-only``: before the cutover lazyiscsi refuses writes but does
not set WP in MODE SENSE, so QEMU's iSCSI driver opens the LUN read-write, and QEMU issues no
write while it is incoming or paused (``Result.writes_before_cont``, from query-blockstats).
QMP ``migrate`` moves the VM (its memory; the disk is "shared" as far as QEMU knows), then
``lazyiscsi cutover`` (live variants), then ``cont``. The VM's workload (vm/init) keeps
rewriting and re-reading records all along and says on its console whether a record it re-read
held what it last wrote there.

Variants: ``precopy`` (``--live --dirty-bitmap``), ``live`` (``--live``), ``static`` (no
``--live``: today's behaviour before live migration existed; the LUN hydrates while the source
VM still writes, so records the VM rewrote after they were copied are stale at the destination,
and the checks must find them).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.integration.peers import free_port, wait_listening, wait_until
from tests.migration import records
from tests.migration.qmp import Qmp

HERE = Path(__file__).resolve().parent
VM_BUILD = HERE / "vm" / "build.sh"
VM_DIR = Path(os.environ.get("LAZYISCSI_VM", "/var/tmp/lazyiscsi-vm"))
LAZYISCSI = [sys.executable, "-m", "lazyiscsi.cli"]
# small, so that migrating the VM's memory takes a second or two (the kernel and busybox fit)
VM_MEMORY_MIB = 128
BITMAP = "lazyiscsi-precopy"
IQN = "iqn.2026-11.io.lazyiscsi:livevm"
# the first build downloads the kernel package (about 70 MB) from the host's apt mirror
VM_BUILD_TIMEOUT_S = 900
# a VM under TCG on a loaded 2-core host: boot, a workload step, a migration
BOOT_S = 300.0
STEPS_S = 300.0
MIGRATE_S = 300.0
# migration: no bandwidth cap on loopback (QEMU's default caps it), and a downtime QEMU under TCG
# can meet without iterating for long
MIGRATE_PARAMETERS = {"max-bandwidth": 1 << 30, "downtime-limit": 1000}
# 32 records of 4 KiB, 1 MiB apart: a 32 MiB disk. Each run waits for a round of writes at the
# source (N steps) and of checks at the destination (N/2): under TCG on a loaded host a step
# takes a quarter to a whole second.
LAYOUT = records.Layout(records=32, stride=256)
# what marks a directory as a run's (the next run may empty it)
MARK = ".lazyiscsi-migration-run"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# a whole line: the console's last one may still be coming
STEP = re.compile(r"^LZVM step=(\d+) wrote=(\d+):(\d+):(\w+) checked=([-\w:,]+)\r?\n", re.M)


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    live: bool
    bitmap: str | None


VARIANTS = {v.name: v for v in (Variant("precopy", True, BITMAP), Variant("live", True, None),
                                Variant("static", False, None))}


@dataclass(frozen=True, slots=True)
class Check:
    """A record the workload re-read: the generation it expected, the one it found, the verdict
    (ok, STALE, AHEAD, BAD, EIO: vm/init)."""

    record: int
    want: int
    have: int | None
    verdict: str


@dataclass(frozen=True, slots=True)
class Step:
    """One line of the workload: the record it wrote (and whether the write succeeded), and
    the checks of the records it re-read."""

    n: int
    wrote: int
    gen: int
    write: str
    checks: tuple[Check, ...]


def parse_steps(text: str) -> list[Step]:
    steps = []
    for m in STEP.finditer(text):
        checks = []
        for field_ in m[5].split(","):
            record, want, have, verdict = field_.split(":")
            checks.append(Check(int(record), int(want), None if have == "-" else int(have), verdict))
        steps.append(Step(int(m[1]), int(m[2]), int(m[3]), m[4], tuple(checks)))
    return steps


@dataclass
class Result:
    """What a run measured and found; the test asserts on it, the demo prints it."""

    variant: str
    phases: dict[str, float] = field(default_factory=dict)  # name -> seconds, in order
    source_steps: int = 0
    dest_steps: list[Step] = field(default_factory=list)
    verdicts: dict[str, int] = field(default_factory=dict)  # of the destination's checks
    stale_records: list[int] = field(default_factory=list)  # what the destination found stale
    cache_mismatches: list[int] = field(default_factory=list)  # records the final LUN got wrong
    other_bytes_differ: bool = False  # a byte outside the records differs from the source's
    source_unchanged: bool = False  # the source image after the run == at migration's end
    dest_written: dict[int, int] = field(default_factory=dict)  # record -> newest gen written there
    source_holds_dest_writes: list[int] = field(default_factory=list)
    status_at_cutover: dict[str, Any] = field(default_factory=dict)
    status_final: dict[str, Any] = field(default_factory=dict)
    # what the destination QEMU wrote to the LUN while it waited (-incoming, then paused):
    # query-blockstats' wr_operations + failed_wr_operations, and BLOCK_IO_ERROR events
    writes_before_cont: int = -1
    block_io_errors: int = 0
    complete_after_serve_s: float = 0.0  # from `serve` started to the LUN complete
    cutover_event: dict[str, Any] = field(default_factory=dict)  # serve's cutover_completed

    def summary(self) -> list[str]:
        lines = [f"variant {self.variant}"]
        lines += [f"  {name:<10} {seconds:7.1f} s" for name, seconds in self.phases.items()]
        lines.append(f"  complete   {self.complete_after_serve_s:7.1f} s after the LUN was served")
        lines.append(f"  the destination QEMU wrote {self.writes_before_cont} times before `cont` "
                     f"({self.block_io_errors} I/O errors)")
        lines.append(f"  source VM steps {self.source_steps}, destination VM steps {len(self.dest_steps)}, "
                     f"destination checks {self.verdicts}")
        if self.cutover_event:
            e = self.cutover_event
            lines.append(f"  cutover: {e.get('duration_ms')} ms in serve; invalidated "
                         f"{e.get('invalidated_bytes')} bytes copied before the VM's last writes")
        if self.status_at_cutover:
            s = self.status_at_cutover
            lines.append(f"  before cutover: phase {s.get('phase')}, dirty {s.get('dirty_bytes')} bytes, "
                         f"local {s.get('local_bytes')} of {s.get('size')}")
        f = self.status_final
        if f.get("fetched_after_cutover_bytes") is not None:
            lines.append(f"  after cutover: fetched {f['fetched_after_cutover_bytes']} bytes; the final "
                         f"dirty set {f.get('dirty_at_cutover_bytes')} bytes, not reached by the copy "
                         f"{f.get('not_reached_bytes')} bytes")
        lines.append(f"  stale records found by the VM: {self.stale_records or 'none'}")
        lines.append("  final LUN vs the source's last state + the destination's writes: "
                     + ("equal" if self.cache_equal else
                        f"DIFFERENT (records {self.cache_mismatches}, other bytes "
                        f"{'differ' if self.other_bytes_differ else 'equal'})"))
        lines.append(f"  source image unchanged since migration: {self.source_unchanged}; holds a "
                     f"destination write: {self.source_holds_dest_writes or 'no'}")
        return lines

    @property
    def cache_equal(self) -> bool:
        return not self.cache_mismatches and not self.other_bytes_differ


class Procs:
    """The peers a run starts, stopped in reverse order however the run ends."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.work / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], seconds: float = 30) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(seconds)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when this process dies (prctl(2) PR_SET_PDEATHSIG), so
    a test killed by its timeout leaves no QEMU behind."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def build_vm(vm_dir: Path = VM_DIR) -> None:
    r = subprocess.run(["bash", str(VM_BUILD), "--if-needed"], capture_output=True, text=True,
                       timeout=VM_BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL,
                       env={**os.environ, "LAZYISCSI_VM": str(vm_dir)})
    if r.returncode != 0:
        raise RuntimeError(f"vm/build.sh failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")


def qemu_argv(vm_dir: Path, layout: records.Layout, drive: str, console: Path, qmp: Path) -> list[str]:
    """One VM; source and destination differ only in the drive's backend (and -incoming), as
    migration requires: the same devices, the same memory, the same CPU model."""
    return ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", str(VM_MEMORY_MIB),
            "-display", "none", "-nodefaults", "-no-reboot", "-nic", "none",
            "-chardev", f"file,id=serial0,path={console}", "-serial", "chardev:serial0",
            "-qmp", f"unix:{qmp},server=on,wait=off",
            "-kernel", str(vm_dir / "vmlinux"), "-initrd", str(vm_dir / "initrd.img"),
            "-append", f"console=ttyS0 panic=-1 quiet loglevel=1 {layout.kernel_args()}",
            "-drive", f"{drive},format=raw,if=none,id=disk0",
            "-device", "virtio-blk-pci,drive=disk0,id=vda"]


def lazyiscsi(control: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAZYISCSI, "--control", str(control), *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def status(control: Path) -> dict[str, Any]:
    r = lazyiscsi(control, "status", "vol0", "--json")
    if r.returncode != 0:
        raise RuntimeError(f"lazyiscsi status: {r.stderr.strip()}")
    (vol,) = json.loads(r.stdout)
    return vol  # type: ignore[no-any-return]


def hydrated(vol: dict[str, Any]) -> bool:
    return vol["state"] == "complete"


def console_text(*paths: Path) -> str:
    """The VM's console, in order: a line the source began and the destination finished is
    whole once the two are joined (the UART's state migrates mid-line)."""
    return "".join(p.read_text(errors="replace") if p.exists() else "" for p in paths)


def run(variant: Variant, work: Path, layout: records.Layout = LAYOUT, vm_dir: Path = VM_DIR,
        say: Callable[[str], None] = lambda line: None) -> Result:
    """Runs one migration in ``work`` and returns what it measured; the peers are stopped
    however it ends. ``work`` is emptied first: a run before (the demo run twice) left it, or it
    must be empty (a directory that is not ours is never removed)."""
    if work.exists() and any(work.iterdir()):
        if not (work / MARK).exists():
            raise RuntimeError(f"{work}: not empty and not a migration run's directory; give another one")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARK).touch()
    with contextlib.closing(Procs(work)) as procs:
        return _run(variant, work, layout, vm_dir, say, procs)


@contextlib.contextmanager
def phase(result: Result, name: str, say: Callable[[str], None]) -> Iterator[None]:
    t0 = time.monotonic()
    say(f"{name}: ...")
    yield
    result.phases[name] = time.monotonic() - t0
    say(f"{name}: {result.phases[name]:.1f} s")


def _run(variant: Variant, work: Path, layout: records.Layout, vm_dir: Path, say: Callable[[str], None],
         procs: Procs) -> Result:
    result = Result(variant.name)
    image, sock, control = work / "source.img", work / "qsd.sock", work / "control.sock"
    src_console, dst_console = work / "source-vm.console", work / "dest-vm.console"
    records.make_disk(image, layout)

    # the source site: qemu-storage-daemon owns the image, the source VM boots from its export
    qsd_proc = procs.start("qsd", [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file0,filename={image}",
        "--blockdev", "driver=raw,node-name=disk0,file=file0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=vm,node-name=disk0,name=vm,writable=on",
        "--chardev", f"socket,id=qmp0,path={work / 'qsd.qmp'},server=on,wait=off",
        "--monitor", "chardev=qmp0"])
    wait_until(sock.exists, "qemu-storage-daemon's NBD socket", proc=qsd_proc)
    qsd = Qmp(work / "qsd.qmp", qsd_proc)
    with phase(result, "boot", say):
        src = procs.start("source-vm", qemu_argv(vm_dir, layout, f"file=nbd+unix:///vm?socket={sock}",
                                                 src_console, work / "source-vm.qmp"))
        wait_until(lambda: "LZVM ready" in console_text(src_console), "the source VM's workload", BOOT_S, src)

    # the destination: the lazy LUN, from a second export (with the bitmap for pre-copy)
    export: dict[str, Any] = {"type": "nbd", "id": "lazy", "node-name": "disk0", "name": "lazy",
                              "writable": False}
    if variant.bitmap:
        qsd.command("block-dirty-bitmap-add", {"node": "disk0", "name": variant.bitmap})
        export.update(writable=True, bitmaps=[variant.bitmap])
    qsd.command("block-export-add", export)
    port = free_port()
    serve_argv = [*LAZYISCSI, "--log-level", "info", "--control", str(control), "serve",
                  "--frontend", "portal", "--state-dir", str(work / "state"), "--source", f"nbd+unix:///lazy?socket={sock}",
                  "--cache", str(work / "cache.img"), "--iqn", IQN, "--listen", f"127.0.0.1:{port}"]
    if variant.live:
        serve_argv.append("--live")
    if variant.bitmap:
        serve_argv += ["--dirty-bitmap", variant.bitmap]
    lun = f"iscsi://127.0.0.1:{port}/{IQN}/0"
    with phase(result, "pre-copy", say):
        served = time.monotonic()
        serve = procs.start("serve", serve_argv)
        wait_listening(port, serve)
        wait_until(control.exists, "serve's control socket", proc=serve)
        if variant.live and not variant.bitmap:
            # what a destination host's udev would do: read the new LUN before cutover (none of
            # it may be trusted after). Not with the bitmap: there the copier is what pre-copy
            # is about, and a read of everything would leave it nothing to do.
            probe = subprocess.run(["qemu-img", "convert", "-O", "raw", lun, str(work / "probe.img")],
                                   capture_output=True, text=True, timeout=STEPS_S)
            assert probe.returncode == 0, probe.stderr
            (work / "probe.img").unlink()
        if not variant.live or variant.bitmap:
            # the copy has been everywhere: every unit local, or (pre-copy) skipped as dirty
            wait_until(lambda: _copied(status(control), layout.size), "the copy's pass", STEPS_S, serve)
        # half the records rewritten at the source after the copy (or the probe) read them: the
        # half the destination's next N/2 steps do not write (step S writes 37*S mod N), so the
        # checks reach every one of them, and a stale one stays so in the final LUN
        first = len(parse_steps(console_text(src_console)))
        wait_until(lambda: len(parse_steps(console_text(src_console))) >= first + layout.records // 2,
                   "half a round of source writes", STEPS_S, src)

    dst_qmp_path = work / "dest-vm.qmp"
    mport = free_port()
    dst = procs.start("dest-vm", [*qemu_argv(vm_dir, layout, f"file={lun}", dst_console, dst_qmp_path),
                                  "-incoming", f"tcp:127.0.0.1:{mport}", "-S"])
    dst_qmp = Qmp(dst_qmp_path, dst)
    src_qmp = Qmp(work / "source-vm.qmp", src)
    with phase(result, "migration", say):
        src_qmp.command("migrate-set-parameters", MIGRATE_PARAMETERS)
        src_qmp.command("migrate", {"uri": f"tcp:127.0.0.1:{mport}"})
        info = wait_until(lambda: _finished(src_qmp.command("query-migrate")), "the migration", MIGRATE_S,
                          src)
        assert info["status"] == "completed", info
        dst_state = wait_until(lambda: _paused(dst_qmp.command("query-status")), "the destination paused",
                               MIGRATE_S, dst)
        assert dst_state == "paused", dst_state
        say(f"migration: {info.get('total-time')} ms in QEMU, downtime {info.get('downtime')} ms, "
            f"RAM {info.get('ram', {}).get('transferred', 0) >> 20} MiB; destination {dst_state}")
    src_qmp.command("quit")
    src_qmp.close()
    src.wait(60)
    result.source_steps = len(parse_steps(console_text(src_console)))
    snapshot = image.read_bytes()  # the source's last state: its VM is gone
    # QEMU under -incoming must not write the LUN: before the cutover a write is refused
    (stats,) = [b["stats"] for b in dst_qmp.command("query-blockstats") if b.get("device") == "disk0"]
    result.writes_before_cont = stats["wr_operations"] + stats["failed_wr_operations"]
    result.block_io_errors = sum(e["event"] == "BLOCK_IO_ERROR" for e in dst_qmp.events)

    if variant.live:
        result.status_at_cutover = status(control)
        with phase(result, "cutover", say):
            r = lazyiscsi(control, "cutover", "vol0")
            assert r.returncode == 0, f"lazyiscsi cutover: {r.stdout}{r.stderr}"
    dst_qmp.command("cont")
    with phase(result, "post-copy", say):
        start = len(parse_steps(console_text(dst_console)))
        wait_until(lambda: hydrated(status(control)), "hydration", STEPS_S, serve)
        result.complete_after_serve_s = time.monotonic() - served
    with phase(result, "checks", say):
        # a whole round of re-reads at the destination: the checks visit every record in N/2
        # steps, while the writes rewrite half of them (the other half stays as the source left it)
        wait_until(lambda: len(parse_steps(console_text(dst_console))) >= start + layout.records // 2,
                   "a round of destination checks", STEPS_S, dst)
    dst_qmp.command("stop")
    result.status_final = status(control)
    dst_qmp.command("quit")
    dst_qmp.close()
    dst.wait(60)

    final = work / "final.img"
    r2 = subprocess.run(["qemu-img", "convert", "-O", "raw", lun, str(final)], capture_output=True, text=True,
                        timeout=STEPS_S)
    assert r2.returncode == 0, r2.stderr
    procs.stop(serve)
    result.cutover_event = next(
        (e for e in _events(work / "serve.log") if e.get("event") == "cutover_completed"), {})
    qsd.command("quit")
    qsd.close()
    qsd_proc.wait(60)
    _verify(result, layout, snapshot, image.read_bytes(), final.read_bytes(),
            console_text(src_console, dst_console), console_text(dst_console))
    return result


def _events(log: Path) -> Iterator[dict[str, Any]]:
    """serve's structured events (JSON lines: its output is not a terminal)."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                yield json.loads(line)


def _copied(vol: dict[str, Any], size: int) -> bool:
    return bool(vol["local_bytes"] + (vol.get("dirty_bytes") or 0) >= size)


def _finished(info: dict[str, Any]) -> dict[str, Any] | None:
    return info if info.get("status") in ("completed", "failed", "cancelled") else None


def _paused(info: dict[str, Any]) -> str | None:
    """The destination's run state once the incoming migration is over (``paused``: -S)."""
    return None if info.get("status") == "inmigrate" else str(info["status"])


def _verify(result: Result, layout: records.Layout, snapshot: bytes, source_end: bytes, final: bytes,
            everything: str, dest: str) -> None:
    """Compares the final LUN with the source's last state plus the writes the VM made after it
    (each record at the newest generation the VM wrote), and the source with itself."""
    steps = parse_steps(everything)
    result.dest_steps = parse_steps(dest)
    for c in (c for s in result.dest_steps for c in s.checks):
        result.verdicts[c.verdict] = result.verdicts.get(c.verdict, 0) + 1
        if c.verdict == "STALE" and c.record not in result.stale_records:
            result.stale_records.append(c.record)
    newest = {s.wrote: s.gen for s in steps if s.write == "ok"}
    at_source = records.generations(snapshot, layout)
    expected = records.overlay(snapshot, layout, newest)
    # the VM was stopped mid-step: the step after its last line may have written its record
    nxt = (steps[-1].n + 1) * 37 % layout.records
    in_flight = records.overlay(expected, layout, {nxt: newest.get(nxt, 0) + 1})
    have = records.generations(final, layout)
    want = records.generations(expected, layout)
    alt = records.generations(in_flight, layout)
    result.cache_mismatches = [i for i in range(layout.records) if have[i] != want[i] and have[i] != alt[i]]
    masked = bytearray(final)
    for i in range(layout.records):
        masked[layout.offset(i):layout.offset(i) + records.RECORD] = expected[
            layout.offset(i):layout.offset(i) + records.RECORD]
    result.other_bytes_differ = bytes(masked) != expected
    result.source_unchanged = hashlib.sha256(source_end).digest() == hashlib.sha256(snapshot).digest()
    # the destination's writes: generations newer than the source's last state (the step that
    # straddled the migration may have written at the source and reported at the destination)
    for s in result.dest_steps:
        if s.write == "ok" and s.gen > (at_source[s.wrote] or 0):
            result.dest_written[s.wrote] = s.gen
    end_gens = records.generations(source_end, layout)
    result.source_holds_dest_writes = sorted(i for i in result.dest_written if end_gens[i] != at_source[i])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Live-migrates the record VM onto a lazy LUN.")
    ap.add_argument("variant", choices=sorted(VARIANTS))
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/lazyiscsi-demo-live"))
    args = ap.parse_args(argv)
    print("the VM: Debian's kernel and busybox from this host's apt sources (built once)", flush=True)
    try:
        build_vm()
        result = run(VARIANTS[args.variant], args.work, say=lambda line: print(line, flush=True))
    except (RuntimeError, AssertionError, OSError) as e:
        print(f"demo failed: {e}\n(the peers' logs are in {args.work})", file=sys.stderr)
        return 1
    print("\n".join(result.summary()))
    ok = (set(result.verdicts) == {"ok"} and result.cache_equal and result.source_unchanged
          and not result.source_holds_dest_writes)
    print("verified: the VM read no stale record and the LUN is the source's last state plus the"
          " destination's writes" if ok else "NOT verified: see above")
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
