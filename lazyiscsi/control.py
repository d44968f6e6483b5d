"""The local control API: a UNIX socket (mode 0600, and only root or the daemon's own user may
talk to it, checked with SO_PEERCRED), one JSON object per line each way.

Request: ``{"op": "status", "args": {"name": "vm1"}}``. Reply: ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "one line naming what was wrong"}``. One client's bad request never
touches another's: each connection is its own greenlet, and a request that fails only fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from collections.abc import Callable
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


def _ops(m: VolumeManager) -> dict[str, Callable[[dict[str, Any]], Any]]:
    return {
        "volume.create": lambda a: m.create(a["name"], a["source"], unit=a.get("unit"),
                                            rate=int(a.get("rate", 0))),
        "volume.list": lambda a: m.list(),
        "volume.delete": lambda a: m.delete(a["name"]),
        "status": lambda a: m.status(a.get("name")),
        "pause": lambda a: m.pause(a["name"]),
        "resume": lambda a: m.resume(a["name"]),
        "rate": lambda a: m.rate(a["name"], int(a["rate"])),
        "detach": lambda a: m.detach(a["name"], force=bool(a.get("force"))),
        "verify": lambda a: m.verify(a["name"]),
    }


class ControlServer:
    def __init__(self, manager: VolumeManager, path: str) -> None:
        self.path = path
        self._ops = _ops(manager)
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
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
        uid = _peer_uid(sock)
        if uid not in (0, os.getuid()):
            log.warning("control_refused", uid=uid)
            sock.close()
            return
        f = sock.makefile("rwb")
        try:
            while True:
                line = f.readline(MAX_LINE + 1)
                if not line:
                    return
                reply = self._answer(line)
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()
        except OSError:
            return
        finally:
            f.close()
            sock.close()

    def _answer(self, line: bytes) -> dict[str, Any]:
        if len(line) > MAX_LINE:
            return {"ok": False, "error": f"request longer than {MAX_LINE} bytes"}
        try:
            request = json.loads(line)
            op, args = request["op"], request.get("args", {})
            if not isinstance(args, dict):
                raise TypeError("args must be an object")
        except (ValueError, KeyError, TypeError) as e:
            return {"ok": False, "error": f"malformed request: {e}"}
        handler = self._ops.get(op)
        if handler is None:
            return {"ok": False, "error": f"unknown op {op!r}"}
        try:
            return {"ok": True, "result": handler(args)}
        except VolumeError as e:
            error = str(e)
        except KeyError as e:
            error = f"{op}: missing argument {e}"
        except (TypeError, ValueError) as e:
            error = f"{op}: bad argument ({e})"
        log.warning("control_request_failed", op=op, volume=args.get("name"), error=error)
        return {"ok": False, "error": error}


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
    except FileNotFoundError:
        raise ControlError(f"no daemon at {path} (is `lazyiscsi serve` running? --control PATH)") from None
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
    reply = json.loads(line)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "unknown error"))
    return reply.get("result")
