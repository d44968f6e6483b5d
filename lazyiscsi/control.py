"""The local control API: a UNIX socket (mode 0600, and only root or the daemon's own user may
talk to it, checked with SO_PEERCRED), one JSON object per line each way.

Request: ``{"op": "status", "args": {"name": "vm1"}}``. Reply: ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "one line naming what was wrong"}``. One client's bad request never
touches another's: each connection is its own greenlet, and a request that fails only fails.

Every request line gets exactly one reply line, whatever happens: arguments are checked against
the op's table before the manager sees them, a refusal (``VolumeError``) is answered with its
message, and anything else (a lazyiscsi bug) with "internal error" plus one ``control_request_
crashed`` event carrying the traceback. A line over ``MAX_LINE`` is answered, then the
connection closed (what follows it is not a request).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent.server
import gevent.socket
import structlog

from lazyiscsi.daemon import VolumeError, VolumeManager

log = structlog.get_logger("lazyiscsi.control")

DEFAULT_SOCKET = "/run/lazyiscsi/control.sock"
#: a request line longer than this is refused (the protocol's messages are small)
MAX_LINE = 64 * 1024


class ControlError(Exception):
    """The daemon refused the request or could not be reached; the message says which."""


class NoDaemon(ControlError):
    """Nothing listens at the control socket: no daemon runs there (``status`` exits 3)."""


class _BadArgument(Exception):
    """A request whose arguments do not fit its op; the message names the argument."""


#: the JSON type each argument must have, and how a refusal says it; an optional argument may
#: also be null (absent)
_ARG_TYPES: dict[str, tuple[type, str]] = {
    "name": (str, "a string"), "source": (str, "a string"), "unit": (int, "an integer"),
    "rate": (int, "an integer"), "force": (bool, "true or false"), "live": (bool, "true or false"),
    "dirty_bitmap": (str, "a string"), "backstore_only": (bool, "true or false"),
    "source_id": (str, "a string"),
}


@dataclass(frozen=True)
class _Op:
    call: Callable[..., Any]
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


def _ops(m: VolumeManager) -> dict[str, _Op]:
    return {
        "volume.create": _Op(m.create, ("name", "source"),
                             ("unit", "rate", "live", "dirty_bitmap", "backstore_only", "source_id")),
        "volume.list": _Op(m.list),
        "volume.delete": _Op(m.delete, ("name",)),
        "status": _Op(m.status, (), ("name",)),
        "pause": _Op(m.pause, ("name",)),
        "resume": _Op(m.resume, ("name",)),
        "rate": _Op(m.rate, ("name", "rate")),
        "detach": _Op(m.detach, ("name",), ("force",)),
        "verify": _Op(m.verify, ("name",)),
        "cutover": _Op(m.cutover, ("name",)),
    }


def _check_args(op: str, spec: _Op, args: dict[str, Any]) -> dict[str, Any]:
    """The arguments as the manager takes them, or _BadArgument naming the bad one."""
    unknown = set(args) - set(spec.required) - set(spec.optional)
    if unknown:
        raise _BadArgument(f"{op}: unknown argument {sorted(unknown)[0]!r}")
    checked = {}
    for key in (*spec.required, *spec.optional):
        value = args.get(key)
        if value is None:
            if key in spec.required:
                raise _BadArgument(f"{op}: missing argument {key!r}")
            continue
        wanted, described = _ARG_TYPES[key]
        # JSON true is a Python int too: a bool is only a bool
        if not isinstance(value, wanted) or (isinstance(value, bool) and wanted is not bool):
            raise _BadArgument(f"{op}: argument {key!r} must be {described}")
        checked[key] = value
    return checked


class ControlServer:
    def __init__(self, manager: VolumeManager, path: str) -> None:
        self.path = path
        self._ops = _ops(manager)
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise ControlError(f"{path}: exists and is not a socket; refusing to replace it "
                                   "(remove it, or choose another --control PATH)")
        if _answers(path):
            raise ControlError(f"{path}: another lazyiscsi serve is listening there (--control PATH)")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket of a daemon that is gone
        listener = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no window where others may connect
        try:
            listener.bind(path)
        finally:
            os.umask(old)
        listener.listen(16)
        self._server = gevent.server.StreamServer(listener, self._handle)

    def start(self) -> None:
        self._server.start()
        log.info("control_listening", path=self.path)

    def stop(self) -> None:
        self._server.stop(timeout=2)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _handle(self, sock: socket.socket, _address: Any) -> None:
        f = sock.makefile("rwb")
        try:
            uid = _peer_uid(sock)
            if uid not in (0, os.getuid()):
                log.warning("control_refused", uid=uid)
                f.write(_encode({"ok": False, "error": "permission denied (root or the daemon's user only)"}))
                return
            while True:
                line = f.readline(MAX_LINE + 1)
                if not line:
                    return
                f.write(self._answer(line))
                f.flush()
                if len(line) > MAX_LINE:
                    return
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                f.close()
            sock.close()

    def _answer(self, line: bytes) -> bytes:
        """Exactly one reply line for one request line."""
        op: Any = None
        name: Any = None
        try:
            if len(line) > MAX_LINE:
                return _encode({"ok": False, "error": f"request longer than {MAX_LINE} bytes"})
            try:
                request = json.loads(line)
                op, args = request["op"], request.get("args", {})
                if not isinstance(args, dict):
                    raise TypeError("args must be an object")
            except (ValueError, KeyError, TypeError) as e:
                return _encode({"ok": False, "error": f"malformed request: {e}"})
            name = args.get("name")
            spec = self._ops.get(op) if isinstance(op, str) else None
            if spec is None:
                return _encode({"ok": False, "error": f"unknown op {op!r}"})
            try:
                return _encode({"ok": True, "result": spec.call(**_check_args(op, spec, args))})
            except (VolumeError, _BadArgument) as e:
                error = str(e)
            log.warning("control_request_failed", op=op, volume=_shown(name), error=error)
            return _encode({"ok": False, "error": error})
        except Exception:  # a lazyiscsi bug: the client still gets its one answer, the log the traceback
            log.error("control_request_crashed", op=_shown(op), volume=_shown(name), exc_info=True)
            return _encode({"ok": False, "error": f"{_shown(op)}: internal error in the daemon "
                                                  "(its log has the traceback)"})


def _encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply).encode() + b"\n"


def _shown(value: Any) -> str | None:
    """A client-given op or name as it may be logged: a short string, or its type."""
    if value is None or (isinstance(value, str) and len(value) <= 64):
        return value
    return f"<{type(value).__name__}>"


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def call(path: str, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = 30.0) -> Any:
    """One request to the daemon at ``path``; its result, or ControlError with its message."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):  # no socket, or the socket of a daemon gone
        raise NoDaemon(f"no daemon at {path} (is `lazyiscsi serve` running? --control PATH)") from None
    except PermissionError:
        raise ControlError(f"{path}: permission denied (the control socket is root's)") from None
    except OSError as e:
        raise ControlError(f"{path}: {e.strerror or e}") from None
    with sock, sock.makefile("rwb") as f:
        f.write(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
        f.flush()
        line = f.readline()
    if not line:
        raise ControlError(f"{path}: the daemon closed the connection without answering")
    try:
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise ValueError("not an object")
    except ValueError:
        raise ControlError(f"{path}: the answer is not lazyiscsi's control protocol") from None
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "unknown error"))
    return reply.get("result")
