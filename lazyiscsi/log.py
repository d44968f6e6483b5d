"""Logging: structlog, one event per state change or fault, with key=value context.

Three sinks, chosen once per process:

* under systemd (``$JOURNAL_STREAM`` names our stderr) each event goes to journald's native
  socket as fields of its own: ``journalctl -u lazyiscsi -o json`` shows ``VOLUME``,
  ``OFFSET``... beside ``MESSAGE`` and ``PRIORITY`` (``$LAZYISCSI_JOURNAL_SOCKET`` points it
  elsewhere, which is how the tests listen);
* on a TTY the console renderer (readable);
* otherwise JSON lines, which log shippers take as they are.

Events name what happened (``cache_opened``, ``source_disconnected``); the context says where
(path, offset, bytes). Secrets never reach an event: sources log only redacted URLs.

An event logged with ``exc_info`` (a lazyiscsi bug: ``internal_error``,
``control_request_crashed``) carries its traceback as a field: a list of frames under
``exception`` in JSON lines, the formatted text in journald's ``EXCEPTION`` field. Never the
frames' local variables, which may hold a source URL's password. On a terminal the traceback
is shown only with ``--log-level debug``; the operator sees the one-line error.

``notify`` is sd_notify(3) for ``Type=notify``: READY, STOPPING, ``STATUS=`` (the line
``systemctl status`` shows) and ``WATCHDOG=1`` pings when the unit sets ``WatchdogSec=``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import sys
from typing import Any

import structlog
from structlog.tracebacks import ExceptionDictTransformer

LEVELS = ("debug", "info", "warning", "error")
JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
_FIELD = re.compile(r"[^A-Z0-9_]")


def configure(level: str = "info", *, stream=None) -> None:  # type: ignore[no-untyped-def]
    """Set up structlog for a command. ``level`` is one of ``LEVELS``."""
    stream = stream or sys.stderr
    journal = journal_socket(stream)
    sink: list[Any]
    if journal is not None:
        sink = [structlog.processors.format_exc_info, JournalSender(journal)]
    elif stream.isatty():
        sink = [] if level == "debug" else [_drop_traceback]
        sink.append(structlog.dev.ConsoleRenderer(colors=False))
    else:
        sink = [structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
                structlog.processors.JSONRenderer(sort_keys=True)]
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *sink,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def _drop_traceback(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """On a terminal below debug level: the event without its traceback (the command prints
    the one-line error itself)."""
    event.pop("exc_info", None)
    return event


def journal_socket(stream: Any) -> str | None:
    """journald's socket if events should go there: when told so, or when systemd connected
    our stderr to the journal (``$JOURNAL_STREAM`` is its device:inode)."""
    override = os.environ.get("LAZYISCSI_JOURNAL_SOCKET")
    if override:
        return override
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return None
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return JOURNAL_SOCKET if expected == f"{st.st_dev}:{st.st_ino}" else None


def journal_fields(event: dict[str, Any]) -> list[tuple[str, str]]:
    """An event as journald fields: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, and every context key
    upper-cased (``volume`` -> ``VOLUME``); non-string values as JSON."""
    event = dict(event)
    level = str(event.pop("level", "info"))
    name = str(event.pop("event", ""))
    event.pop("timestamp", None)
    fields = [("MESSAGE", _message(name, event)), ("PRIORITY", str(_PRIORITY.get(level, 6))),
              ("SYSLOG_IDENTIFIER", "lazyiscsi"), ("EVENT", name)]
    for key, value in event.items():
        field = _FIELD.sub("_", key.upper()).lstrip("_")[:64] or "FIELD"
        if field in ("MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "EVENT"):
            field = "LAZYISCSI_" + field
        fields.append((field, value if isinstance(value, str) else json.dumps(value, default=str)))
    return fields


def encode_journal(fields: list[tuple[str, str]]) -> bytes:
    """journald's native protocol: ``KEY=value`` lines; a value holding a newline is sent as
    ``KEY``, newline, its length as 64-bit little endian, the bytes, newline."""
    out = bytearray()
    for key, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalSender:
    """The last structlog processor under systemd: send, and print nothing. If journald cannot
    be reached, or cannot keep up, the event falls back to a JSON line on stderr (which systemd
    also collects): never lost silently, and never a stall."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def __call__(self, _logger: Any, _method: str, event: dict[str, Any]) -> str:
        try:
            # never block the daemon on a slow journald: a full queue sends this event to stderr
            self._sock.sendto(encode_journal(journal_fields(event)), socket.MSG_DONTWAIT, self.path)
        except OSError:
            return json.dumps(event, sort_keys=True, default=str)
        raise structlog.DropEvent


def _message(name: str, context: dict[str, Any]) -> str:
    # the traceback has a field of its own (EXCEPTION): MESSAGE stays one line
    pairs = " ".join(f"{k}={v}" for k, v in context.items() if k not in ("exc_info", "exception"))
    return f"{name} {pairs}".rstrip()


def notify(state: str) -> None:
    """sd_notify: tell systemd (Type=notify) about a state change; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(state.encode(), address)
        except OSError as e:
            structlog.get_logger("lazyiscsi").warning("sd_notify_failed", error=e.strerror)


def notify_ready() -> None:
    notify("READY=1")


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings when systemd asks for them (``WatchdogSec=`` sets
    ``$WATCHDOG_USEC``, and ``$WATCHDOG_PID`` when set names the process meant), else None.
    Half the timeout, as sd_watchdog_enabled(3) recommends, so that one late ping is not fatal."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
