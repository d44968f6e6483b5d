"""How a source URL reaches the CLI without every local user reading it.

A command line is public on Linux: any local user reads ``/proc/PID/cmdline`` (``ps -ef``). So
a URL with a password or a token can also come from a file (``--source-file PATH``), from the
environment (``$LAZYISCSI_SOURCE``: ``/proc/PID/environ`` is readable by the process's owner
only) or from standard input (``--source -``). Given with ``--source`` all the same, it works,
with a warning event that names the safer ways (and not the secret).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

import structlog

from lazyiscsi.source.url import check, has_secret, redact

ENV = "LAZYISCSI_SOURCE"
STDIN = "-"
#: a source URL is a line; reading stops here so that ``--source-file /dev/zero`` or a
#: runaway pipe is refused instead of filling memory (real URLs, presigned ones included, are
#: a few KiB at most)
MAX_URL = 64 * 1024

SAFER = f"--source-file PATH, ${ENV} or --source - (standard input)"


class SourceArgError(Exception):
    """No usable source URL; the message names the option."""


def add_options(parser: argparse.ArgumentParser, url_help: str) -> None:
    """--source and --source-file, one or the other."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--source", metavar="URL",
                       help=f"{url_help}; '-' reads it from standard input. A URL holding a password "
                            f"or token is visible to every local user on the command line: use {SAFER}")
    group.add_argument("--source-file", metavar="PATH",
                       help=f"read the source URL from the first line of PATH (keep it mode 0600); "
                            f"without --source or --source-file, ${ENV} is used")


def resolve(args: argparse.Namespace, *, required: bool, stdin: TextIO | None = None) -> str | None:
    """The source URL the options name: --source, --source-file, or else $LAZYISCSI_SOURCE;
    None when there is none and none is ``required``. Raises SourceArgError naming the option."""
    if args.source == STDIN:
        option = "--source - (standard input)"
        url = _line((stdin or sys.stdin).readline(MAX_URL + 1), option)
    elif args.source is not None:
        url, option = args.source, "--source"
        if has_secret(url):
            structlog.get_logger("lazyiscsi.cli").warning(
                "source_secret_on_command_line", source=redact(url),
                reason="every local user can read the command line in /proc/PID/cmdline (ps)",
                instead=SAFER)
    elif args.source_file is not None:
        option = f"--source-file {args.source_file}"
        url = _read_file(args.source_file)
    elif os.environ.get(ENV):
        url, option = os.environ[ENV].strip(), f"${ENV}"
    elif required:
        raise SourceArgError(f"a source is required: --source URL, --source-file PATH or ${ENV}")
    else:
        return None
    try:
        check(url)
    except ValueError as e:
        raise SourceArgError(f"{option}: {e}") from None
    return url


def _read_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return _line(f.readline(MAX_URL + 1), f"--source-file {path}")
    except OSError as e:
        raise SourceArgError(f"--source-file {path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise SourceArgError(f"--source-file {path}: not UTF-8 text") from None


def _line(text: str, option: str) -> str:
    if len(text) > MAX_URL:
        raise SourceArgError(f"{option}: the first line is longer than {MAX_URL} bytes")
    url = text.strip()
    if not url:
        raise SourceArgError(f"{option}: no URL (the first line is empty)")
    return url
