"""The ``lazyiscsi`` command.

Every error an operator can cause (a bad argument, an unreachable source, a cache that is not
ours) ends in one line on stderr naming what was wrong, and a non-zero exit status; never a
traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, NoReturn

import gevent
import gevent.event
import structlog

from lazyiscsi import __version__, commands, config, sourcearg
from lazyiscsi import log as logsetup
from lazyiscsi.control import ControlError
from lazyiscsi.frontend import Frontend
from lazyiscsi.progress import ProgressDisplay, human_bytes
from lazyiscsi.sizes import parse_size
from lazyiscsi.source import SourceError, deadline_for, open_source, redact
from lazyiscsi.store.errors import StoreError
from lazyiscsi.store.hydrator import DEFAULT_RUN, Hydrator, JobState
from lazyiscsi.store.lazydisk import DEFAULT_IO_TIMEOUT, DEFAULT_UNIT, LazyDisk
from lazyiscsi.store.superblock import needs_source, opens_live

if TYPE_CHECKING:
    from lazyiscsi.daemon import VolumeManager

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_STALLED = 3
#: hydrate: the source changed during the copy; running again cannot help (the cache refuses it)
EXIT_SOURCE_CHANGED = 4
EXIT_INTERRUPTED = 130
#: seconds between sd_notify STATUS= updates under systemd (what `systemctl status` shows)
STATUS_INTERVAL = 5.0


def _size_arg(minimum: int = 0, power_of_two: bool = False):  # type: ignore[no-untyped-def]
    def convert(text: str) -> int:
        try:
            value = parse_size(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is below the minimum {minimum}")
        if power_of_two and value & (value - 1):
            raise argparse.ArgumentTypeError(f"{text!r} is not a power of two")
        return value

    return convert


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value):  # float() takes "nan" and "inf": neither is a duration
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


_CONTROL_HELP = "the daemon's control socket (default: $LAZYISCSI_CONTROL or {})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lazyiscsi", description="iSCSI LUNs that hydrate lazily from a source site.")
    parser.add_argument("--version", action="version", version=f"lazyiscsi {__version__}")
    parser.add_argument("--log-level", choices=logsetup.LEVELS, default="info",
                        help="least severe log event shown on stderr (default: info)")
    parser.add_argument("--control", default=commands.default_control(), metavar="PATH",
                        help=_CONTROL_HELP.format("%(default)s"))
    # --control also after the verb (`lazyiscsi status --control PATH`): the verb's parser has
    # it too, with no default of its own, so that the one before the verb is not overridden
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--control", default=argparse.SUPPRESS, metavar="PATH",
                        help=_CONTROL_HELP.format(commands.default_control()))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    h = sub.add_parser(
        "hydrate", parents=[common],
        help="fill a cache file from a source (pre-seed a destination before cutover)",
        description=(
            "Copy every byte of SOURCE into the cache file PATH, skipping runs the source reports "
            "as zero. The cache is a raw image of the source; beside it PATH.map records which "
            "units are local and PATH.meta which source they came from. Killed and run again with "
            "the same arguments, it resumes where the last durable commit left it (at most a "
            "second or so of copying is redone). A cache refuses a source of another size or "
            "content."),
        epilog=(
            "Sizes take binary suffixes K, M, G, T (also KiB, MiB...) or decimal ones KB, MB, GB. "
            "Exit status: 0 the cache is complete; 1 an error (named on stderr); 2 bad arguments; "
            "3 no progress for --stall-timeout seconds; 4 the source changed during the copy (running "
            "again cannot help: the cache holds the old disk's bytes); 130 interrupted (run again to "
            "resume). "
            "Progress: a bar on a TTY, otherwise one 'progress' line every --progress-interval "
            "seconds on stderr; a final 'complete' line with the totals on stdout."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sourcearg.add_options(h, "where the data lives: nbd://HOST[:PORT]/EXPORT, "
                             "nbd+unix:///EXPORT?socket=PATH, http(s)://..., file:///PATH or a plain path")
    h.add_argument("--cache", required=True, metavar="PATH",
                   help="the cache file to fill (created if missing; an existing cache resumes)")
    h.add_argument("--rate", type=_size_arg(), default=0, metavar="BYTES_PER_S",
                   help="limit the copy to this many bytes per second (0: no limit)")
    h.add_argument("--unit", type=_size_arg(512, power_of_two=True), default=None, metavar="SIZE",
                   help=f"tracking unit of a new cache, a power of two >= 512 and <= --run-size "
                        f"(default {DEFAULT_UNIT}); an existing cache keeps its own")
    h.add_argument("--run-size", type=_size_arg(4096, power_of_two=True), default=DEFAULT_RUN,
                   metavar="SIZE", help="bytes per background request; the number in flight self-tunes")
    h.add_argument("--stall-timeout", type=_seconds_arg, default=600.0, metavar="SECONDS",
                   help="give up (exit 3) after this long without progress, e.g. the source is gone "
                        "for good (0: wait for ever)")
    h.add_argument("--connect-timeout", type=_seconds_arg, default=30.0, metavar="SECONDS",
                   help="how long to keep trying to reach the source when starting (0: one attempt)")
    h.add_argument("--progress-interval", type=_seconds_arg, default=5.0, metavar="SECONDS",
                   help="seconds between progress lines when stderr is not a TTY")
    _source_args(h)
    h.set_defaults(func=cmd_hydrate)

    s = sub.add_parser(
        "serve", parents=[common],
        help="the daemon: export volumes as iSCSI LUNs (LIO or the embedded portal) while they hydrate",
        description=("Serve volumes as iSCSI LUNs, through the kernel's LIO target and our TCMU handler "
                     "where the kernel offers it, else on the embedded userspace portal: SOURCE as LUN 0 "
                     "(--source/--cache), the volumes of a TOML file (--config), and those created "
                     "at runtime with `lazyiscsi volume create`, kept in --state-dir across restarts. "
                     "Each LUN is usable at once: missing blocks are fetched on demand while the "
                     "background copy fills the cache; guest writes land in the cache."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument("--config", metavar="FILE",
                   help="serve the volumes of a TOML file (lazyiscsi.toml(5)); excludes --source")
    sourcearg.add_options(s, "where the data lives (as for hydrate); with --cache")
    s.add_argument("--cache", metavar="PATH", help="the cache file (created or resumed)")
    commands.add_live_options(s)
    s.add_argument("--iqn", type=_iscsi_name_arg, default="iqn.2026-11.io.lazyiscsi:vol0",
                   help="the target's IQN")
    s.add_argument("--listen", type=_listen_arg, default=("0.0.0.0", 3260), metavar="HOST:PORT",
                   help="where the portal listens (with --config: [portal] listen)")
    s.add_argument("--block-size", type=int, choices=(512, 4096), default=512, help="logical block size")
    s.add_argument("--unit", type=_size_arg(512, power_of_two=True), default=None, metavar="SIZE",
                   help=f"tracking unit of a new cache (512 to {config.MAX_UNIT}, a power of two)")
    s.add_argument("--rate", type=_size_arg(), default=0, metavar="BYTES_PER_S",
                   help="limit the background copy (0: none)")
    s.add_argument("--connect-timeout", type=_seconds_arg, default=30.0, metavar="SECONDS",
                   help="how long to keep trying to reach the source when starting")
    s.add_argument("--nop-interval", type=_seconds_arg, default=15.0, metavar="SECONDS",
                   help="ping an initiator silent this long; drop it after as long again (0: never)")
    s.add_argument("--login-timeout", type=_seconds_arg, default=None, metavar="SECONDS",
                   help="embedded portal: close a connection not logged in after this long (default 15)")
    s.add_argument("--state-dir", default=os.environ.get("LAZYISCSI_STATE_DIR", "/var/lib/lazyiscsi"),
                   metavar="DIR", help="runtime volumes and their caches (default: $LAZYISCSI_STATE_DIR)")
    s.add_argument("--frontend", choices=("auto", "lio", "portal"), default="auto",
                   help="auto: LIO when the kernel has target_core_user and rtslib-fb is installed")
    s.add_argument("--iqn-prefix", type=_iscsi_name_arg, default="iqn.2026-11.io.lazyiscsi", metavar="IQN",
                   help="runtime volume NAME is target IQN:NAME")
    _source_args(s)
    s.set_defaults(func=cmd_serve)
    commands.add_parsers(sub, _size_arg(), _seconds_arg, common)
    sh = sub.add_parser(
        "shell", parents=[common],
        help="targetcli's shell with the volumes under /lazy (configshell-fb)",
        description=("targetcli's tree (when targetcli-fb is installed and LIO is there) with a /lazy "
                     "branch: each volume's state, progress, rate and ETA in `ls`, and the verbs create, "
                     "delete, pause, resume, rate, verify, detach, with help and tab completion. "
                     "It talks to the daemon at --control only."),
        epilog=("Exit status (a COMMAND, or standard input's lines): 0 it worked; 1 a command failed "
                "(one line on stderr; the lines after it do not run)."))
    sh.add_argument("line", nargs=argparse.REMAINDER, metavar="COMMAND",
                    help="run this one command line and exit, as targetcli does (e.g. /lazy ls); "
                         "none: interactive on a terminal, else the command lines of standard input")
    sh.set_defaults(func=cmd_shell)
    return parser


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source-id", metavar="ID",
                   help="your name for the source disk (its UUID, say), bound into a new cache's "
                        "identity: a cache then resumes only with the same id (two clones of one "
                        "template look alike otherwise)")
    p.add_argument("--io-timeout", type=_seconds_arg, default=DEFAULT_IO_TIMEOUT, metavar="SECONDS",
                   help="how long a read waits for the source before it fails (NOT READY); each "
                        "source request gets a third of it before its connection is presumed dead, "
                        "redialled and the request resent")


def peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM), reported so that memory per LUN is measured."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _iscsi_name_arg(text: str) -> str:
    if not config.is_iscsi_name(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an iSCSI name (iqn., eui. or naa.)")
    return text


def _listen_arg(text: str) -> tuple[str, int]:
    try:
        return config.parse_listen(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def fail(message: str, code: int = EXIT_ERROR) -> int:
    sys.stderr.write(f"lazyiscsi: error: {message}\n")
    return code


class CliError(Exception):
    """Ends the command with one line on stderr and ``code``."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def source_url(args: argparse.Namespace) -> str:
    """The source URL from --source, --source-file, stdin or $LAZYISCSI_SOURCE (sourcearg)."""
    try:
        url = sourcearg.resolve(args, required=True)
    except sourcearg.SourceArgError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    assert url is not None  # required: resolve raises instead
    return url


def open_volume(args: argparse.Namespace, url: str) -> LazyDisk:
    """The cache (created or resumed) with its source ``url`` if it still needs one, or a
    one-line CliError. A complete cache opens without its source (open by state)."""
    source = None
    try:
        if opens_live(args.cache, False):
            raise CliError(f"{args.cache}: a live volume's cache before its cutover; `lazyiscsi serve` "
                           "it with its source, and run `lazyiscsi cutover` once the source VM stopped")
        if needs_source(args.cache):
            source = open_source(url, timeout=args.connect_timeout, source_id=args.source_id,
                                 deadline=deadline_for(args.io_timeout))
        return LazyDisk.open(args.cache, source, unit=args.unit, io_timeout=args.io_timeout)
    except SourceError as e:
        raise CliError(f"source: {e}") from None
    except StoreError as e:
        if source is not None:
            source.close()
        raise CliError(str(e)) from None


def cmd_hydrate(args: argparse.Namespace) -> int:
    log = structlog.get_logger("lazyiscsi.cli")
    source = source_url(args)
    if args.unit is not None and args.unit > args.run_size:
        raise CliError(f"--unit {args.unit} is above --run-size {args.run_size}: the copy moves whole "
                       "units, so a unit must fit in a run", EXIT_USAGE)
    disk = open_volume(args, source)

    try:
        job = Hydrator(disk, run_size=args.run_size, rate=args.rate or None)
    except StoreError as e:  # an existing cache's own unit above --run-size
        disk.close()
        raise CliError(f"--run-size: {e}", EXIT_USAGE) from None
    display = ProgressDisplay(sys.stderr)
    interrupted: list[int] = []

    def on_signal(signum: int) -> None:
        interrupted.append(signum)
        if job.state in (JobState.RUNNING, JobState.PAUSED, JobState.CREATED):
            job.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, on_signal, signum)

    t0 = time.monotonic()
    start_local = disk.local_bytes
    job.start()
    stalled = False
    last_bytes, last_change = disk.local_bytes, time.monotonic()
    last_line = 0.0
    tick = 0.2 if display.tty else min(1.0, args.progress_interval or 1.0)
    while not job.wait(tick):
        now = time.monotonic()
        progress = job.query()
        if progress.current != last_bytes:
            last_bytes, last_change = progress.current, now
        elif args.stall_timeout and now - last_change > args.stall_timeout:
            stalled = True
            log.error("hydration_stalled", path=args.cache, seconds=args.stall_timeout,
                      source=redact(source))
            job.cancel()
            break
        if display.tty or (args.progress_interval and now - last_line >= args.progress_interval):
            display.show(progress)
            last_line = now
    job.wait()
    final = job.query()
    changed = disk.source_changed
    display.show(final)
    display.done()
    elapsed = time.monotonic() - t0
    try:
        disk.close()
    except StoreError as e:
        return fail(str(e))
    if final.state is JobState.COMPLETED:
        moved = final.fetched
        sys.stdout.write(
            f"complete path={args.cache} size={final.total} fetched={moved} "
            f"zero_or_local_skipped={max(0, final.total - start_local - moved)} "
            f"elapsed_s={elapsed:.2f} rate={human_bytes(moved / elapsed if elapsed else 0)}/s "
            f"peak_rss_kib={peak_rss_kib()}\n")
        return EXIT_OK
    if stalled:
        return fail(f"no progress for {args.stall_timeout:g} s from {redact(source)}; "
                    f"{final.current} of {final.total} bytes are local, run again to resume",
                    EXIT_STALLED)
    if changed is not None:
        return fail(f"{changed}; the copy stopped with {final.current} of {final.total} bytes local "
                    f"from the old disk: delete {args.cache} and its side files to start over",
                    EXIT_SOURCE_CHANGED)
    if interrupted:
        return fail(f"interrupted; {final.current} of {final.total} bytes are local, run again to resume",
                    EXIT_INTERRUPTED)
    return fail(f"hydration {final.state.value}: {final.error or 'unknown reason'}")


def serve_config(args: argparse.Namespace) -> config.Config:
    """The static volumes: from --config, or the one volume --source/--cache describe, or none
    (then only the runtime volumes of --state-dir are served)."""
    if args.config:
        if args.source or args.source_file or args.cache:
            raise CliError("--config and --source/--source-file/--cache exclude each other", EXIT_USAGE)
        if args.live or args.dirty_bitmap:
            raise CliError("--config and --live/--dirty-bitmap exclude each other (set live and "
                           "dirty_bitmap in the volume's table)", EXIT_USAGE)
        try:
            return config.load(args.config)
        except config.ConfigError as e:
            raise CliError(str(e), EXIT_USAGE) from None
    if (args.source or args.source_file) and not args.cache:
        raise CliError("--source and --cache go together", EXIT_USAGE)
    if args.unit is not None and args.unit > config.MAX_UNIT:
        raise CliError(f"--unit {args.unit} is above {config.MAX_UNIT}: the background copy moves runs "
                       f"of {config.MAX_UNIT} bytes, and a unit must fit in a run", EXIT_USAGE)
    if not args.cache:  # $LAZYISCSI_SOURCE alone does not make a volume: it has no cache
        if args.live or args.dirty_bitmap:
            raise CliError("--live and --dirty-bitmap describe --source: give --source and --cache",
                           EXIT_USAGE)
        return config.Config(args.listen, ())
    source = source_url(args)
    problem = config.live_problem(source, args.live, args.dirty_bitmap, names=commands.CLI_LIVE_NAMES)
    if problem is not None:
        raise CliError(problem, EXIT_USAGE)
    volume = config.VolumeConfig(name="vol0", source=source, cache=args.cache, target=args.iqn,
                                 unit=args.unit, block_size=args.block_size, rate=args.rate,
                                 source_id=args.source_id, live=args.live, dirty_bitmap=args.dirty_bitmap)
    return config.Config(args.listen, (volume,))


def choose_frontend(args: argparse.Namespace, listen: tuple[str, int]) -> Frontend:
    """The frontend --frontend asks for; ``auto`` takes LIO where it can. Logs which and why."""
    from lazyiscsi.frontend import PortalFrontend
    from lazyiscsi.iscsi.portal import LOGIN_TIMEOUT, Portal

    login_timeout = LOGIN_TIMEOUT if args.login_timeout is None else args.login_timeout
    if not 0 < login_timeout < float("inf"):  # also refuses nan
        raise CliError("--login-timeout: must be a finite number of seconds above 0", EXIT_USAGE)
    if args.frontend != "portal":
        from lazyiscsi.lio import LioFrontend, lio_available

        available, why = lio_available()
        if available:
            structlog.get_logger("lazyiscsi.cli").info("frontend_selected", frontend="lio", reason=why)
            return LioFrontend(listen)
        if args.frontend == "lio":
            raise CliError(f"--frontend lio: {why}")
    else:
        why = "asked for with --frontend portal"
    structlog.get_logger("lazyiscsi.cli").info("frontend_selected", frontend="portal", reason=why)
    return PortalFrontend(Portal([], listen, nop_interval=args.nop_interval, login_timeout=login_timeout))


def cmd_serve(args: argparse.Namespace) -> int:
    from lazyiscsi.control import ControlError, ControlServer
    from lazyiscsi.daemon import VolumeError, VolumeManager
    from lazyiscsi.frontend import FrontendError

    cfg = serve_config(args)
    frontend = choose_frontend(args, cfg.listen)
    manager = VolumeManager(args.state_dir, frontend, iqn_prefix=args.iqn_prefix,
                            connect_timeout=args.connect_timeout, io_timeout=args.io_timeout)
    try:
        control = ControlServer(manager, args.control)
    except (ControlError, OSError) as e:
        raise CliError(f"control socket: {e}") from None
    # every volume is open and exported before initiators can connect (frontend.py says why)
    try:
        frontend.start()
        for vol in cfg.volumes:
            manager.add_static(vol)
        manager.restore()
        try:
            frontend.listen()
        except OSError as e:
            raise FrontendError(f"listen {_host_port(*cfg.listen)}: {e.strerror}") from None
    except (VolumeError, FrontendError, OSError) as e:
        frontend.stop()
        manager.close()
        control.stop()
        raise CliError(str(e)) from None
    control.start()
    host, port = frontend.address[:2]  # an IPv6 address comes with flow info and scope id
    shown = _host_port({"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host), port)
    for vol in manager.volumes.values():
        r = vol.record.volume
        if r.backstore_only:  # targetcli makes its target: only the backstore line is ours
            size = vol.lun.n_blocks * vol.lun.block_size
            sys.stdout.write(f"holding {redact(r.source)} for targetcli: /backstores/user:lazy create "
                             f"name={r.name} size={size} cfgstring={r.name}\n")
            continue
        sys.stdout.write(f"serving {redact(r.source)} as {r.target} LUN {r.lun} on {_host_port(host, port)} "
                         f"({frontend.name})\n"
                         f"  QEMU:     iscsi://{shown}/{r.target}/{r.lun}\n")
    sys.stdout.write(f"  iscsiadm: iscsiadm -m discovery -t sendtargets -p {shown}\n")
    targets = [v.record.volume.target for v in manager.volumes.values() if v.record.volume.target]
    if targets:
        sys.stdout.write(f"            iscsiadm -m node -T {targets[0]} -p {shown} --login\n")
    sys.stdout.write(f"  control:  {args.control}\n")
    sys.stdout.flush()
    logsetup.notify_ready()
    reporter = gevent.spawn(report_to_systemd, manager) if os.environ.get("NOTIFY_SOCKET") else None
    stop = gevent.event.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, stop.set)
    stop.wait()
    if reporter is not None:
        reporter.kill()
    logsetup.notify("STOPPING=1")
    control.stop()
    frontend.stop()
    manager.close()
    return EXIT_OK


def cmd_shell(args: argparse.Namespace) -> int:
    """The targetcli plugin is imported here only: lazyiscsi runs without configshell-fb."""
    try:
        from lazyiscsi_targetcli.shell import run
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.startswith("lazyiscsi_targetcli"):
            raise CliError("shell: the targetcli plugin (lazyiscsi_targetcli) is not installed") from None
        raise CliError(f"shell: needs configshell-fb ({e.name} cannot be imported): "
                       "apt install python3-configshell-fb, or pip install configshell-fb") from None
    return run(args.control, args.line)


def _host_port(host: str, port: int) -> str:
    """host:port, with an IPv6 address in brackets (RFC 3986 3.2.2, as iSCSI URLs write it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def report_to_systemd(manager: VolumeManager) -> None:
    """Under systemd: ``STATUS=`` (each volume's state and percentage, for ``systemctl status``)
    when it changes, and ``WATCHDOG=1`` at half the unit's WatchdogSec. The pings come from a
    greenlet of the hub every volume runs on, so a hub stalled by a blocking call misses them and
    systemd restarts the daemon."""
    watchdog = logsetup.watchdog_interval()
    tick = min(STATUS_INTERVAL, watchdog) if watchdog else STATUS_INTERVAL
    shown, last_status = "", 0.0
    while True:
        now = time.monotonic()
        if watchdog:
            logsetup.notify("WATCHDOG=1")
        if now - last_status >= STATUS_INTERVAL:
            line = manager.status_line()
            if line != shown:
                logsetup.notify(f"STATUS={line}")
                shown = line
            last_status = now
        gevent.sleep(tick)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logsetup.configure(args.log_level)
    try:
        return int(args.func(args))
    except CliError as e:
        return fail(str(e), e.code)
    except ControlError as e:
        return fail(str(e))
    except Exception as e:  # a lazyiscsi bug: one line for the operator, the traceback in the log
        structlog.get_logger("lazyiscsi.cli").error("internal_error", error=type(e).__name__, exc_info=True)
        return fail(f"internal error: {type(e).__name__} (the log shows where; on a terminal, "
                    "--log-level debug)")


if __name__ == "__main__":
    sys.exit(main())
