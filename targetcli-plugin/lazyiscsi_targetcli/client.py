"""The daemon as the shell's nodes ask it: lazyiscsi's own control client
(``lazyiscsi.control.call``), with a refusal turned into configshell's ExecutionError, which the
shell prints as one line."""

from __future__ import annotations

from typing import Any

from lazyiscsi.control import ControlError, call
from lazyiscsi_targetcli.framework import ExecutionError

#: seconds a quick request (status, pause, rate...) may take; create and verify read the
#: source and have no limit, as ``lazyiscsi volume create`` and ``lazyiscsi verify``
REQUEST_TIMEOUT = 30.0
class Daemon:
    """One daemon's control socket; each call is one request on its own connection."""

    def __init__(self, path: str) -> None:
        self.path = path

    def call(self, op: str, *, timeout: float | None = REQUEST_TIMEOUT, **args: Any) -> Any:
        try:
            return call(self.path, op, args, timeout=timeout)
        except ControlError as e:
            raise ExecutionError(str(e)) from None

    def volumes(self) -> list[dict[str, Any]]:
        """Every volume's status; ControlError when the daemon cannot say (the caller shows it)."""
        result = call(self.path, "status", {}, timeout=REQUEST_TIMEOUT)
        return list(result)
