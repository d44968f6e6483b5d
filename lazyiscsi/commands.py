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

from lazyiscsi.control import DEFAULT_SOCKET, call
from lazyiscsi.progress import human_bytes, human_eta

EXIT_OK, EXIT_ERROR, EXIT_MISMATCH, EXIT_INTERRUPTED = 0, 1, 4, 130
#: states after which nothing more will move
_FINAL = frozenset({"complete", "detached", "failed", "cancelled"})


def default_control() -> str:
    return os.environ.get("LAZYISCSI_CONTROL", DEFAULT_SOCKET)


def add_parsers(sub: Any, size_arg: Callable[[str], int]) -> None:
    """Register the verbs on the main parser's subcommands."""
    v = sub.add_parser("volume", help="create, list or delete the volumes a running serve manages")
    vs = v.add_subparsers(dest="volume_command", metavar="VERB", parser_class=type(v))
    vs.required = True
    c = vs.add_parser("create", help="start serving a new volume (target <iqn prefix>:NAME, LUN 0)")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--source", required=True, metavar="URL", help="where the data lives")
    c.add_argument("--unit", type=size_arg, default=None, metavar="SIZE", help="cache unit (power of two)")
    c.add_argument("--rate", type=size_arg, default=0, metavar="BYTES_PER_S",
                   help="limit the background copy (0: none)")
    c.add_argument("--json", action="store_true", help="print the new volume's status as JSON")
    c.set_defaults(func=_create)
    ls = vs.add_parser("list", help="every volume, one line each")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=lambda a: _status(a, None))
    d = vs.add_parser("delete", help="stop serving a volume and delete its cache")
    d.add_argument("name", metavar="NAME")
    d.set_defaults(func=lambda a: _simple(a, "volume.delete", f"deleted {a.name}"))

    s = sub.add_parser("status", help="progress, rate, ETA, miss latency and source health")
    s.add_argument("name", nargs="?", metavar="NAME")
    s.add_argument("--json", action="store_true", help="machine-readable, one JSON document")
    s.add_argument("--watch", action="store_true", help="redraw until every volume shown is complete")
    s.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="for --watch")
    s.set_defaults(func=lambda a: _watch(a) if a.watch else _status(a, a.name))

    for verb, text in (("pause", "stop the background copy (on-demand reads still fetch)"),
                       ("resume", "restart the background copy")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("name", metavar="NAME")
        p.set_defaults(func=lambda a, verb=verb: _simple(a, verb, None))
    r = sub.add_parser("rate", help="change the background copy's rate limit at once")
    r.add_argument("name", metavar="NAME")
    r.add_argument("rate", type=size_arg, metavar="BYTES_PER_S", help="0: no limit")
    r.set_defaults(func=lambda a: _simple(a, "rate", None, rate=a.rate))
    dt = sub.add_parser("detach", help="let the source go once every byte is local")
    dt.add_argument("name", metavar="NAME")
    dt.add_argument("--force", action="store_true",
                    help="detach an incomplete volume: bytes not yet copied become unreadable for good")
    dt.set_defaults(func=lambda a: _simple(a, "detach", None, force=a.force))
    vf = sub.add_parser("verify", help="compare every local unit the guest did not write with the source")
    vf.add_argument("name", metavar="NAME")
    vf.add_argument("--json", action="store_true")
    vf.set_defaults(func=_verify)


def _call(args: argparse.Namespace, op: str, timeout: float | None = 30.0, **kw: Any) -> Any:
    """The daemon's answer; a refusal raises ControlError, which ``main`` prints as one line."""
    return call(args.control, op, kw, timeout=timeout)


def _simple(args: argparse.Namespace, op: str, done: str | None, **kw: Any) -> int:
    result = _call(args, op, name=args.name, **kw)
    print(done if done is not None else _line(result))
    return EXIT_OK


def _create(args: argparse.Namespace) -> int:
    result = _call(args, "volume.create", timeout=None, name=args.name, source=args.source, unit=args.unit,
                   rate=args.rate)
    print(json.dumps(result) if args.json else f"created {_line(result)}")
    return EXIT_OK


def _status(args: argparse.Namespace, name: str | None) -> int:
    result = _call(args, "status", name=name)
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
            for vol in vols:
                text = _bar(vol) if tty else _line(vol)
                sys.stdout.write((text + "\x1b[K\n") if tty else text + "\n")
            sys.stdout.flush()
            drawn = len(vols)
            if all(v["state"] in _FINAL for v in vols):
                return EXIT_OK
            time.sleep(args.interval)
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


def _bar(v: dict[str, Any], width: int = 30) -> str:
    filled = int(width * v["percent"] / 100)
    return f"[{'#' * filled}{'-' * (width - filled)}] {_line(v)}"
