"""The daemon as the shell's nodes ask it: lazyiscsi's own control client
(``lazyiscsi.control.call``), with a refusal turned into configshell's ExecutionError, which the
shell prints as one line."""

from __future__ import annotations

from typing import Any

from lazyiscsi.control import ControlError, NoDaemon, call
from lazyiscsi_targetcli.framework import ExecutionError

#: seconds a quick request (status, pause, rate...) may take; create and verify read the
#: source and have no limit, as ``lazyiscsi volume create`` and ``lazyiscsi verify``
REQUEST_TIMEOUT = 30.0
#: the control protocol's answer to an op the daemon does not have (control.py)
_UNKNOWN_OP = "unknown op"


class Daemon:
    """One daemon's control socket; each call is one request on its own connection."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._offers: dict[str, bool] = {}

    def call(self, op: str, *, timeout: float | None = REQUEST_TIMEOUT, **args: Any) -> Any:
        try:
            return call(self.path, op, args, timeout=timeout)
        except ControlError as e:
            raise ExecutionError(str(e)) from None

    def volumes(self) -> list[dict[str, Any]]:
        """Every volume's status; ControlError when the daemon cannot say (the caller shows it)."""
        result = call(self.path, "status", {}, timeout=REQUEST_TIMEOUT)
        return list(result)

    def offers(self, op: str) -> bool:
        """Whether this daemon has ``op``, asked once: a request with no arguments is refused
        either as an unknown op or for its missing argument, and changes nothing either way.
        No daemon: not offered, and asked again next time (one may start meanwhile)."""
        if op not in self._offers:
            try:
                call(self.path, op, {}, timeout=REQUEST_TIMEOUT)
                self._offers[op] = True
            except NoDaemon:
                return False
            except ControlError as e:
                self._offers[op] = not str(e).startswith(_UNKNOWN_OP)
        return self._offers[op]
