"""The operator's verbs that talk to a running ``serve`` through its control socket: volume
create/list/delete, status (with --watch), pause, resume, rate, detach, verify and cutover."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from lazyiscsi import sourcearg
from lazyiscsi.config import live_problem
from lazyiscsi.control import DEFAULT_SOCKET, NoDaemon, call
from lazyiscsi.progress import bar_line, human_bytes, human_eta, terminal_columns

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_MISMATCH, EXIT_INTERRUPTED = 0, 1, 2, 4, 130
#: `status --watch` asks the daemon no more often than this: faster only loads it
MIN_WATCH_INTERVAL = 0.1
#: `status` when no daemon runs: LSB's "program is not running" (init-functions, status action)
EXIT_NOT_RUNNING = 3
#: states after which nothing more will move
_FINAL = frozenset({"complete", "detached", "failed", "cancelled", "unopened"})


def default_control() -> str:
    return os.environ.get("LAZYISCSI_CONTROL", DEFAULT_SOCKET)


_NAME_HELP = "the volume's name (1-64 of A-Z a-z 0-9 _ . -); its target is <iqn prefix>:NAME"
#: how ``config.live_problem`` names the options on the command line
CLI_LIVE_NAMES = ("--live", "--dirty-bitmap")
LIVE_HELP = ("the source is still in use by a running VM (live migration): the LUN refuses writes "
             "(DATA PROTECT) until `lazyiscsi cutover`, and without --dirty-bitmap nothing is cached "
             "before it")
BITMAP_HELP = ("with --live and an nbd:// source: the name of the source's QEMU dirty bitmap (NBD meta "
               "context qemu:dirty-bitmap:NAME); the copy then runs before the cutover, which "
               "fetches again only what the bitmap marks dirty")


def add_live_options(parser: argparse.ArgumentParser) -> None:
    """--live and --dirty-bitmap, for ``serve`` and ``volume create``."""
    parser.add_argument("--live", action="store_true", help=LIVE_HELP)
    parser.add_argument("--dirty-bitmap", metavar="NAME", help=BITMAP_HELP)


def add_parsers(sub: Any, size_arg: Callable[[str], int], seconds_arg: Callable[[str], float],
                common: argparse.ArgumentParser) -> None:
    """Register the verbs on the main parser's subcommands; ``common`` holds the options every
    verb also takes after its name (--control)."""
    def verb(parent: Any, name: str, **kw: Any) -> argparse.ArgumentParser:
        return parent.add_parser(name, parents=[common], **kw)  # type: ignore[no-any-return]

    v = sub.add_parser("volume", help="create, list or delete the volumes a running serve manages")
    vs = v.add_subparsers(dest="volume_command", metavar="VERB", parser_class=type(v))
    vs.required = True
    c = verb(vs, "create", help="start serving a new volume (target <iqn prefix>:NAME, LUN 0)")
    c.add_argument("name", metavar="NAME", help=_NAME_HELP)
    sourcearg.add_options(c, "where the data lives (as for hydrate)")
    c.add_argument("--unit", type=size_arg, default=None, metavar="SIZE",
                   help="tracking unit of the new cache: a power of two from 512 to 1M")
    c.add_argument("--rate", type=size_arg, default=0, metavar="BYTES_PER_S",
                   help="limit the background copy (0: none)")
    c.add_argument("--source-id", metavar="ID",
                   help="your name for the source disk (its UUID, say), bound into the new cache's "
                        "identity, as serve --source-id")
    add_live_options(c)
    c.add_argument("--backstore-only", action="store_true",
                   help="LIO: make no target of our own; serve the user:lazy backstore the operator "
                        "creates with targetcli (cfgstring=NAME)")
    c.add_argument("--json", action="store_true", help="print the new volume's status as JSON")
    c.set_defaults(func=_create)
    ls = verb(vs, "list", help="every volume, one line each")
    ls.add_argument("--json", action="store_true", help="machine-readable, one JSON document")
    ls.set_defaults(func=lambda a: _status(a, None))
    d = verb(vs, "delete", help="stop serving a volume and delete its cache")
    d.add_argument("name", metavar="NAME", help="the volume to delete")
    d.set_defaults(func=lambda a: _simple(a, "volume.delete", f"deleted {a.name}"))

    s = verb(sub, "status", help="progress, rate, ETA, miss latency and source health",
             epilog="Exit status: 0 shown; 1 an error; 3 no daemon runs at the control socket (LSB).")
    s.add_argument("name", nargs="?", metavar="NAME", help="only this volume (default: every volume)")
    s.add_argument("--json", action="store_true", help="machine-readable, one JSON document")
    s.add_argument("--watch", action="store_true", help="redraw until every volume shown is complete")
    s.add_argument("--interval", type=_watch_interval(seconds_arg), default=1.0, metavar="SECONDS",
                   help=f"for --watch: seconds between redraws (at least {MIN_WATCH_INTERVAL})")
    s.set_defaults(func=lambda a: _watch(a) if a.watch else _status(a, a.name))

    for name, text in (("pause", "stop the background copy (on-demand reads still fetch)"),
                       ("resume", "restart the background copy")):
        p = verb(sub, name, help=text)
        p.add_argument("name", metavar="NAME", help="the volume")
        p.set_defaults(func=lambda a, op=name: _simple(a, op, None))
    r = verb(sub, "rate", help="change the background copy's rate limit at once")
    r.add_argument("name", metavar="NAME", help="the volume")
    r.add_argument("rate", type=size_arg, metavar="BYTES_PER_S",
                   help="the new limit, e.g. 50M (binary) or 50MB (decimal); 0: no limit")
    r.set_defaults(func=lambda a: _simple(a, "rate", None, rate=a.rate))
    dt = verb(sub, "detach", help="let the source go once every byte is local")
    dt.add_argument("name", metavar="NAME", help="the volume")
    dt.add_argument("--force", action="store_true",
                    help="detach an incomplete volume: bytes not yet copied become unreadable for good")
    dt.set_defaults(func=lambda a: _simple(a, "detach", None, force=a.force))
    vf = verb(sub, "verify", help="compare every local unit the guest did not write with the source",
              epilog="Exit status: 0 every compared unit matches; 4 a mismatch (listed); 1 an error.")
    vf.add_argument("name", metavar="NAME", help="the volume")
    vf.add_argument("--json", action="store_true", help="machine-readable, one JSON document")
    vf.set_defaults(func=_verify)
    co = verb(sub, "cutover", help="a live volume's source VM has stopped: make the LUN writable",
              description=("Run after the source VM has stopped (QEMU migration completed) and before the "
                           "destination VM runs (`cont`). With a dirty bitmap, one final read of it "
                           "invalidates every unit cached before the VM's last write to it; then the LUN "
                           "accepts writes (each initiator gets one UNIT ATTENTION, MODE PARAMETERS "
                           "CHANGED) and the copy runs to completion."),
              epilog=("Exit status: 0 post-copy has started; 1 refused, with the reason (source "
                      "unreachable, bitmap not offered, not live or already cut over): nothing changed."))
    co.add_argument("name", metavar="NAME", help="the volume")
    co.add_argument("--json", action="store_true", help="print the volume's status as JSON")
    co.set_defaults(func=_cutover)


def _watch_interval(seconds_arg: Callable[[str], float]) -> Callable[[str], float]:
    def convert(text: str) -> float:
        value = seconds_arg(text)  # finite and not negative, or an argparse error naming it
        if value < MIN_WATCH_INTERVAL:
            raise argparse.ArgumentTypeError(f"{text!r} is below {MIN_WATCH_INTERVAL}")
        return value

    return convert


def _call(args: argparse.Namespace, op: str, timeout: float | None = 30.0, **kw: Any) -> Any:
    """The daemon's answer; a refusal raises ControlError, which ``main`` prints as one line."""
    return call(args.control, op, kw, timeout=timeout)


def _simple(args: argparse.Namespace, op: str, done: str | None, **kw: Any) -> int:
    result = _call(args, op, name=args.name, **kw)
    print(done if done is not None else _line(result))
    return EXIT_OK


def _create(args: argparse.Namespace) -> int:
    try:
        source = sourcearg.resolve(args, required=True)
    except sourcearg.SourceArgError as e:
        sys.stderr.write(f"lazyiscsi: error: {e}\n")
        return EXIT_USAGE
    problem = live_problem(source, args.live, args.dirty_bitmap, names=CLI_LIVE_NAMES)
    if problem is not None:
        sys.stderr.write(f"lazyiscsi: error: {problem}\n")
        return EXIT_USAGE
    result = _call(args, "volume.create", timeout=None, name=args.name, source=source, unit=args.unit,
                   rate=args.rate, live=args.live or None, dirty_bitmap=args.dirty_bitmap,
                   backstore_only=args.backstore_only or None, source_id=args.source_id)
    print(json.dumps(result) if args.json else f"created {_line(result)}")
    return EXIT_OK


def _cutover(args: argparse.Namespace) -> int:
    result = _call(args, "cutover", timeout=None, name=args.name)
    print(json.dumps(result) if args.json else f"cut over {_line(result)}")
    return EXIT_OK


def _status(args: argparse.Namespace, name: str | None) -> int:
    try:
        result = _call(args, "status", name=name)
    except NoDaemon as e:
        sys.stderr.write(f"lazyiscsi: {e}\n")
        return EXIT_NOT_RUNNING
    if args.json:
        print(json.dumps(result, indent=1))
    elif not result:
        print("no volumes")
    else:
        for vol in result:
            print(_line(vol))
    return EXIT_OK


def _watch(args: argparse.Namespace) -> int:
    """Redraw in place on a TTY (a bar per volume), a line per volume per interval otherwise;
    return once every volume shown has stopped moving."""
    tty = sys.stdout.isatty()
    drawn = 0
    try:
        while True:
            vols = _call(args, "status", name=args.name)
            if tty and drawn:
                sys.stdout.write(f"\x1b[{drawn}F")
            columns = terminal_columns()
            for vol in vols:
                text = bar_line(vol["percent"] / 100, _line(vol), columns) if tty else _line(vol)
                sys.stdout.write((text + "\x1b[K\n") if tty else text + "\n")
            sys.stdout.flush()
            drawn = len(vols)
            if all(v["state"] in _FINAL for v in vols):
                return EXIT_OK
            time.sleep(args.interval)
    except NoDaemon as e:
        sys.stderr.write(f"lazyiscsi: {e}\n")
        return EXIT_NOT_RUNNING
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _verify(args: argparse.Namespace) -> int:
    report = _call(args, "verify", timeout=None, name=args.name)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"verify {report['volume']}: compared {human_bytes(report['compared_bytes'])}, skipped "
              f"{human_bytes(report['skipped_written_bytes'])} written by the guest and "
              f"{human_bytes(report['skipped_missing_bytes'])} not yet local")
        for m in report["mismatches"]:
            print(f"MISMATCH offset={m['offset']} length={m['length']}")
        print(f"{len(report['mismatches'])} mismatching range(s)")
    return EXIT_MISMATCH if report["mismatches"] else EXIT_OK


def _hot(v: dict[str, Any]) -> str:
    """Bytes the copy fetched where the guest reads, out of LBA order (none: nothing shown)."""
    return f" hot={human_bytes(v['hot_bytes'])}" if v.get("hot_bytes") else ""


def _line(v: dict[str, Any]) -> str:
    limit = f" limit={human_bytes(v['rate_limit_bps'])}/s" if v.get("rate_limit_bps") else ""
    miss = ""
    if v.get("miss_p99_ms") is not None:
        miss = f" miss_p50={v['miss_p50_ms']:.1f}ms miss_p99={v['miss_p99_ms']:.1f}ms"
    phase = f" phase={v['phase']}" if v.get("phase") else ""
    if v.get("dirty_bytes") is not None:
        phase += (f" dirty={human_bytes(v['dirty_bytes'])}"
                  f" dirty_rate={human_bytes(v['dirty_rate_bps'] or 0)}/s")
    if v.get("fetched_after_cutover_bytes") is not None:
        phase += (f" after_cutover={human_bytes(v['fetched_after_cutover_bytes'])}"
                  f" (dirty {human_bytes(v['dirty_at_cutover_bytes'])}"
                  f" + not reached {human_bytes(v['not_reached_bytes'])})")
    if v.get("verify_offset") is not None and v["size"]:
        phase += f" verifying={100.0 * v['verify_offset'] / v['size']:.1f}%"
    return (f"{v['volume']} {v['state']}{phase} {v['percent']:.1f}% {human_bytes(v['local_bytes'])}/"
            f"{human_bytes(v['size'])} {human_bytes(v['rate_bps'])}/s eta={human_eta(v['eta_s'])}{limit}"
            f" misses={v['misses']}{_hot(v)}{miss} source={v['source_health']} target={v['target']}"
            f" lun={v['lun']}")

