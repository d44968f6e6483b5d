"""The operator's verbs that talk to a running ``serve`` through its control socket: volume
create/list/delete, status (with --watch), pause, resume, rate, detach and verify."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from lazyiscsi import sourcearg
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
    result = _call(args, "volume.create", timeout=None, name=args.name, source=source, unit=args.unit,
                   rate=args.rate, backstore_only=args.backstore_only or None)
    print(json.dumps(result) if args.json else f"created {_line(result)}")
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


def _line(v: dict[str, Any]) -> str:
    limit = f" limit={human_bytes(v['rate_limit_bps'])}/s" if v.get("rate_limit_bps") else ""
    miss = ""
    if v.get("miss_p99_ms") is not None:
        miss = f" miss_p50={v['miss_p50_ms']:.1f}ms miss_p99={v['miss_p99_ms']:.1f}ms"
    return (f"{v['volume']} {v['state']} {v['percent']:.1f}% {human_bytes(v['local_bytes'])}/"
            f"{human_bytes(v['size'])} {human_bytes(v['rate_bps'])}/s eta={human_eta(v['eta_s'])}{limit}"
            f" misses={v['misses']}{miss} source={v['source_health']} target={v['target']} lun={v['lun']}")

