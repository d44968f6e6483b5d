"""A fuzzing campaign against a real ``lazyiscsi serve``: the daemon in a subprocess (file
sources in a work directory, port 0, its own state directory and control socket, JSON logs to a
file), one well-behaved session logged in first and checked throughout, ``lanes`` fuzzing
sessions at a time until a PDU count or a time is reached, and the daemon's RSS, threads and
greenlets sampled all along.

``run(...)`` returns a ``Report``; ``Report.problems()`` lists every broken expectation (empty
when the daemon survived, logged no traceback or internal error, answered the well-behaved
session correctly every time and stayed within its memory bounds).
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gevent
import gevent.event

from tests.fuzz import wire
from tests.fuzz.corpus import Layout, Session
from tests.fuzz.initiator import Initiator, Stats
from tests.fuzz.wire import Op

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 512
MiB = 1 << 20
FUZZ_TARGET = "iqn.2026-11.test.fuzz:target"
CHAP_TARGET = "iqn.2026-11.test.fuzz:chap"
GOOD_TARGET = "iqn.2026-11.test.fuzz:good"
GOOD_INITIATOR = "iqn.2026-11.test.good:monitor"
CHAP = ("fuzzuser", "fuzz-secret-0123")
#: sizes of the fuzzed LUNs and of the well-behaved session's LUN
FUZZ_LUN_SIZE = 4 * MiB
GOOD_LUN_SIZE = 8 * MiB
#: how long one command of the well-behaved session may take, with the daemon under fuzzing on
#: a loaded 2-core machine, before it counts as disturbed
GOOD_COMMAND_TIMEOUT = 20.0
#: RSS growth bounds (issue 14 acceptance 2 uses the same figures for its attacks): during the
#: run over the start, and after the fuzzing sessions are gone
RSS_PEAK_GROWTH = 96 * MiB
RSS_FINAL_GROWTH = 32 * MiB
#: greenlets the daemon may hold per fuzzing connection at the peak (reader, writer, pinger and
#: one per command in flight: the lanes keep 16 in flight, damaged ones may linger a little)
GREENLETS_PER_LANE = 64
#: and above its start once the fuzzing connections are gone (greenlets not yet collected)
GREENLETS_FINAL_GROWTH = 32
#: log lines that mean a bug rather than a refused input
_BAD_LOG = re.compile(r"Traceback|internal_error|internal error| failed with "
                      r"|\"level\": \"(error|critical)\"")


@dataclass
class Report:
    seed: int
    lanes: int = 0
    pdus: int = 0
    bytes: int = 0
    responses: int = 0
    connections: int = 0
    logins: int = 0
    sessions: int = 0
    seconds: float = 0.0
    daemon_cpu_s: float = 0.0
    fuzzer_cpu_s: float = 0.0
    good_rounds: int = 0
    good_errors: list[str] = field(default_factory=list)
    good_worst_s: float = 0.0
    rss_start: int = 0
    rss_peak: int = 0
    rss_end: int = 0
    threads_peak: int = 0
    greenlets_start: int = 0
    greenlets_peak: int = 0
    greenlets_end: int = 0
    exit_code: int | None = None
    died_during_run: bool = False
    log_problems: list[str] = field(default_factory=list)
    framing_errors: list[str] = field(default_factory=list)
    framing_notes: list[str] = field(default_factory=list)
    mutations: Counter[str] = field(default_factory=Counter)
    cdb_opcodes: Counter[int] = field(default_factory=Counter)
    login_kinds: Counter[str] = field(default_factory=Counter)
    recent_seeds: list[int] = field(default_factory=list)
    log_path: str = ""

    @property
    def rate(self) -> float:
        return self.pdus / self.seconds if self.seconds else 0.0

    def problems(self) -> list[str]:
        out = []
        if self.died_during_run:
            out.append(f"the daemon died during the run (exit {self.exit_code})")
        elif self.exit_code != 0:
            out.append(f"the daemon exited with {self.exit_code} on SIGTERM")
        out += [f"log: {line}" for line in self.log_problems[:10]]
        out += [f"target framing: {e}" for e in self.framing_errors[:10]]
        out += [f"well-behaved session: {e}" for e in self.good_errors[:10]]
        if self.good_rounds < 3:
            out.append(f"the well-behaved session ran only {self.good_rounds} rounds")
        if self.rss_peak - self.rss_start > RSS_PEAK_GROWTH:
            out.append(f"RSS grew by {(self.rss_peak - self.rss_start) / MiB:.0f} MiB during the run")
        if self.rss_end - self.rss_start > RSS_FINAL_GROWTH:
            out.append(f"RSS stayed {(self.rss_end - self.rss_start) / MiB:.0f} MiB above the start")
        if self.greenlets_peak - self.greenlets_start > GREENLETS_PER_LANE * self.lanes:
            out.append(f"{self.greenlets_peak} greenlets at the peak for {self.lanes} fuzzing connections")
        if self.greenlets_end - self.greenlets_start > GREENLETS_FINAL_GROWTH:
            out.append(f"{self.greenlets_end} greenlets after the run (started with {self.greenlets_start})")
        return out

    def summary(self) -> str:
        top = ",".join(f"{k}={v}" for k, v in self.mutations.most_common())
        kinds = ",".join(f"{k}={v}" for k, v in self.login_kinds.most_common())
        return (f"fuzz_portal seed={self.seed} pdus={self.pdus} rate={self.rate:.0f}/s "
                f"seconds={self.seconds:.1f} "
                f"cpu_s[daemon={self.daemon_cpu_s:.1f},fuzzer={self.fuzzer_cpu_s:.1f}] "
                f"sessions={self.sessions} logins={self.logins}[{kinds}] "
                f"responses={self.responses} good_rounds={self.good_rounds} "
                f"good_worst={self.good_worst_s:.2f}s rss_start={self.rss_start / MiB:.1f}MiB "
                f"rss_peak={self.rss_peak / MiB:.1f}MiB rss_end={self.rss_end / MiB:.1f}MiB "
                f"threads_peak={self.threads_peak} greenlets={self.greenlets_start}/"
                f"{self.greenlets_peak}/{self.greenlets_end} problems={len(self.problems())} "
                f"framing_notes={len(self.framing_notes)} "
                f"mutations[{top}]")


class Daemon:
    """``lazyiscsi serve`` (through ``sampled_serve``) on three fuzz volumes and one good one."""

    def __init__(self, work: Path, log_level: str = "info") -> None:
        self.work = work
        self.images: dict[str, bytes] = {}
        volumes = []
        for name, target, lun, size, extra in (
                ("fuzz0", FUZZ_TARGET, 0, FUZZ_LUN_SIZE, ""),
                ("fuzz1", FUZZ_TARGET, 1, FUZZ_LUN_SIZE, ""),
                ("chap", CHAP_TARGET, 0, FUZZ_LUN_SIZE,
                 f'chap = {{ user = "{CHAP[0]}", secret = "{CHAP[1]}" }}\n'),
                ("good", GOOD_TARGET, 0, GOOD_LUN_SIZE, f'allowed_initiators = ["{GOOD_INITIATOR}"]\n')):
            data = random.Random(name).randbytes(size)
            (work / f"{name}.src").write_bytes(data)
            self.images[name] = data
            volumes.append(f'[[volume]]\nname = "{name}"\nsource = "{work / (name + ".src")}"\n'
                           f'cache = "{work / (name + ".img")}"\ntarget = "{target}"\nlun = {lun}\n{extra}')
        config = work / "fuzz.toml"
        config.write_text('[portal]\nlisten = "127.0.0.1:0"\n\n' + "\n".join(volumes))
        config.chmod(0o600)
        self.samples = work / "greenlets.txt"
        self.log = work / "daemon.log"
        env = dict(os.environ, LAZYISCSI_FUZZ_SAMPLES=str(self.samples), LAZYISCSI_FUZZ_INTERVAL="1")
        env.pop("JOURNAL_STREAM", None)
        env.pop("LAZYISCSI_JOURNAL_SOCKET", None)
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fuzz.sampled_serve", "--log-level", log_level,
             "--control", str(work / "control.sock"), "serve", "--config", str(config),
             "--state-dir", str(work / "state"), "--frontend", "portal", "--nop-interval", "5"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self._log_file, text=True)
        self.port = self._port()

    def _port(self) -> int:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = re.search(r"sendtargets -p 127\.0\.0\.1:(\d+)", line)
            if m:
                return int(m.group(1))
        raise RuntimeError(f"serve exited ({self.proc.wait()}) before listening: see {self.log}")

    def rss_threads(self) -> tuple[int, int]:
        """VmRSS in bytes and the thread count, from /proc/PID/status."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return 0, 0
        rss, threads = re.search(r"VmRSS:\s+(\d+) kB", status), re.search(r"Threads:\s+(\d+)", status)
        return (int(rss.group(1)) * 1024 if rss else 0), (int(threads.group(1)) if threads else 0)

    def cpu_seconds(self) -> float:
        """User + system CPU the daemon used so far (/proc/PID/stat, in clock ticks)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def greenlets(self) -> int:
        """The last greenlet count the daemon wrote (0 before the first)."""
        try:
            lines = self.samples.read_text().split("\n")
        except FileNotFoundError:
            return 0
        last = [line for line in lines if line.strip()]
        return int(last[-1].split()[1]) if last else 0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log_file.close()
        return code

    def log_problems(self) -> list[str]:
        text = self.log.read_text(errors="replace")
        return [line[:400] for line in text.splitlines() if _BAD_LOG.search(line)]


class GoodSession:
    """The well-behaved initiator: logged in before the fuzzing, then INQUIRY, READ (compared
    with the source), WRITE and READ-back in rounds until stopped. Every failure is recorded."""

    def __init__(self, address: tuple[str, int], source: bytes) -> None:
        self.stats = Stats()
        self.source = source
        self.model = bytearray(source)  # what the LUN must hold: the source plus our writes
        self.errors: list[str] = []
        self.rounds = 0
        self.worst = 0.0
        self.rng = random.Random(0x600D)
        self.ini = Initiator(address, self.stats)
        keys = self.ini.login([(0, 1, [("InitiatorName", GOOD_INITIATOR), ("TargetName", GOOD_TARGET),
                                       ("SessionType", "Normal"), ("AuthMethod", "None")]),
                               (1, 3, [("HeaderDigest", "None"), ("DataDigest", "None"),
                                       ("MaxRecvDataSegmentLength", "65536"), ("InitialR2T", "No"),
                                       ("ImmediateData", "Yes")])], chap=None, clean=True)
        if keys is None:
            raise RuntimeError("the well-behaved session could not log in")

    def _call(self, name: str, cdb: bytes, edtl: int, *, read: bool, data: bytes = b"") -> bytes | None:
        ini = self.ini
        itt = ini.next_itt()
        imm = data[:min(len(data), ini.max_send, ini.first_burst)] if ini.immediate_data else b""
        pdu = wire.scsi_command(itt=itt, lun=0, cmdsn=ini.next_cmdsn(), expstatsn=ini.expstatsn, cdb=cdb,
                                edtl=edtl, read=read, write=bool(data), data=imm)
        started = time.monotonic()
        try:
            done = ini.call([pdu], itt, timeout=GOOD_COMMAND_TIMEOUT, write=data or None)
        except (TimeoutError, ConnectionError) as e:
            self.errors.append(f"{name}: {e}")
            return None
        self.worst = max(self.worst, time.monotonic() - started)
        if done.opcode not in (Op.SCSI_RESPONSE, Op.DATA_IN) or done.status != 0:
            self.errors.append(f"{name}: opcode {done.opcode:#x} status {done.status:#x} sense "
                               f"{done.sense.hex()}")
            return None
        return done.data

    def round(self) -> None:
        rng = self.rng
        inq = self._call("INQUIRY", struct.pack(">BBBHB", 0x12, 0, 0, 96, 0), 96, read=True)
        if inq is not None and (len(inq) < 36 or inq[0] & 0x1F != 0):
            self.errors.append(f"INQUIRY: {inq[:8].hex()}")
        half = len(self.source) // BLOCK // 2
        # 1024 blocks: a WRITE streamed into the store in pieces (read back below)
        lba, count = rng.randrange(half - 1024), rng.choice([1, 8, 64, 1024])
        got = self._call("READ", struct.pack(">BBIBHB", 0x28, 0, lba, 0, count, 0), count * BLOCK, read=True)
        if got is not None and got != bytes(self.model[lba * BLOCK:(lba + count) * BLOCK]):
            self.errors.append(f"READ of LBA {lba}+{count}: data differs from the source")
        lba = half + rng.randrange(half - 1024)
        data = rng.randbytes(count * BLOCK)
        if self._call("WRITE", struct.pack(">BBIBHB", 0x2A, 0, lba, 0, count, 0), len(data), read=False,
                      data=data) is not None:
            self.model[lba * BLOCK:(lba + count) * BLOCK] = data
        got = self._call("READ back", struct.pack(">BBIBHB", 0x28, 0, lba, 0, count, 0), count * BLOCK,
                         read=True)
        if got is not None and got != bytes(self.model[lba * BLOCK:(lba + count) * BLOCK]):
            self.errors.append(f"READ back of LBA {lba}+{count}: not what was written")
        self.rounds += 1

    def run(self, stop: gevent.event.Event, interval: float) -> None:
        while not stop.is_set() and not self.ini.closed.is_set():
            self.round()
            stop.wait(interval)
        if self.ini.closed.is_set():
            self.errors.append("the connection was closed by the target")


def run(work: Path, *, seed: int, pdus: int | None = None, seconds: float | None = None, lanes: int = 16,
        opcodes: tuple[int, ...], log_level: str = "info", replay: tuple[int, ...] = (),
        progress=None) -> Report:  # type: ignore[no-untyped-def]
    """Fuzz until ``pdus`` PDUs were sent or ``seconds`` passed (whichever comes first). With
    ``replay``, run only those session seeds (from a report's ``recent_seeds``), one at a time."""
    report = Report(seed=seed, lanes=lanes)
    daemon = Daemon(work, log_level)
    report.log_path = str(daemon.log)
    stats = Stats()
    stop = gevent.event.Event()
    try:
        address = ("127.0.0.1", daemon.port)
        good = GoodSession(address, daemon.images["good"])
        good.round()
        report.rss_start, _ = daemon.rss_threads()
        report.greenlets_start = daemon.greenlets()
        layout = Layout(address, FUZZ_TARGET, {0: FUZZ_LUN_SIZE // BLOCK, 1: FUZZ_LUN_SIZE // BLOCK},
                        CHAP_TARGET, CHAP, BLOCK, opcodes)
        master = random.Random(seed)
        sessions: list[Session] = []
        started = time.monotonic()
        cpu_start = daemon.cpu_seconds()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        fuzzer_cpu_start = usage.ru_utime + usage.ru_stime
        deadline = started + seconds if seconds else float("inf")

        def budget_left() -> bool:
            return (pdus is None or stats.pdus < pdus) and time.monotonic() < deadline \
                and daemon.proc.poll() is None

        queue = list(replay)

        def next_seed() -> int | None:
            if not replay:
                return master.getrandbits(64) if budget_left() else None
            return queue.pop(0) if queue and daemon.proc.poll() is None else None

        def lane() -> None:
            while (session_seed := next_seed()) is not None:
                session = Session(layout, session_seed, stats)
                sessions.append(session)
                report.recent_seeds = [s.seed for s in sessions[-2 * lanes:]]
                session.run(budget_left if not replay else lambda: daemon.proc.poll() is None)

        def sample() -> None:
            while not stop.is_set():
                if daemon.proc.poll() is not None:
                    return
                rss, threads = daemon.rss_threads()
                report.rss_peak = max(report.rss_peak, rss)
                report.threads_peak = max(report.threads_peak, threads)
                report.greenlets_peak = max(report.greenlets_peak, daemon.greenlets())
                if progress is not None:
                    progress(stats, time.monotonic() - started)
                stop.wait(0.5)

        watchers = [gevent.spawn(good.run, stop, 0.3), gevent.spawn(sample)]
        workers = [gevent.spawn(lane) for _ in range(1 if replay else lanes)]
        gevent.joinall(workers)
        report.seconds = time.monotonic() - started
        report.daemon_cpu_s = daemon.cpu_seconds() - cpu_start
        usage = resource.getrusage(resource.RUSAGE_SELF)
        report.fuzzer_cpu_s = usage.ru_utime + usage.ru_stime - fuzzer_cpu_start
        report.died_during_run = daemon.proc.poll() is not None
        stop.set()
        gevent.joinall(watchers, timeout=GOOD_COMMAND_TIMEOUT * 5)
        if not report.died_during_run:
            good.round()  # and once more after the storm
            report.rss_end, report.greenlets_end = _settle(daemon, report.rss_start)
        for s in sessions:
            report.mutations.update(s.mutator.counts)
        good.ini.close()
        report.sessions = len(sessions)
        report.good_rounds, report.good_errors, report.good_worst_s = good.rounds, good.errors, good.worst
    finally:
        stop.set()
        report.exit_code = daemon.stop()
    report.pdus, report.bytes, report.responses = stats.pdus, stats.bytes, stats.responses
    report.connections, report.logins, report.framing_errors = stats.connections, stats.logins, \
        stats.framing_errors
    report.framing_notes = stats.framing_notes
    report.cdb_opcodes, report.login_kinds = stats.cdb_opcodes, stats.login_kinds
    report.log_problems = daemon.log_problems()
    return report


def _settle(daemon: Daemon, rss_start: int, seconds: float = 20.0) -> tuple[int, int]:
    """RSS and greenlets once the fuzzing connections are gone: wait (up to ``seconds``) for RSS
    to come back within the final bound, as the daemon's closed sessions are freed."""
    deadline = time.monotonic() + seconds
    rss, _ = daemon.rss_threads()
    while rss - rss_start > RSS_FINAL_GROWTH and time.monotonic() < deadline:
        gevent.sleep(0.5)
        rss, _ = daemon.rss_threads()
    gevent.sleep(1.5)  # one more greenlet sample after the last session ended
    return rss, daemon.greenlets()


def to_json(report: Report) -> str:
    d = dict(report.__dict__)
    d["mutations"] = dict(report.mutations)
    d["cdb_opcodes"] = {f"{op:#04x}": n for op, n in sorted(report.cdb_opcodes.items())}
    d["rate"] = report.rate
    d["problems"] = report.problems()
    return json.dumps(d, indent=1)
