"""``/lazy`` and its volumes as configshell nodes, in targetcli's manner: a verb is a
``ui_command_<verb>`` method whose docstring is its ``help``, ``ui_complete_<verb>`` completes
its parameters, and ``summary()`` is the bracketed text ``ls`` prints beside the node
(``(text, healthy)``: green, red, or plain for None).

The nodes hold no state of their own: ``/lazy`` asks the daemon for every volume's status once
per command line (the shell marks it stale before each, see shell.py) and adds or drops a child
node per volume; a verb's answer (the volume's new status) updates its node at once.
"""

from __future__ import annotations

import argparse
from typing import Any

from lazyiscsi import sourcearg
from lazyiscsi.control import ControlError
from lazyiscsi.progress import human_bytes, human_eta
from lazyiscsi.sizes import parse_size
from lazyiscsi.source.url import has_secret
from lazyiscsi_targetcli.client import REQUEST_TIMEOUT, Daemon
from lazyiscsi_targetcli.framework import ConfigNode, ExecutionError

#: the colour ``ls`` gives a volume's state: True green (serving as it should), False red (the
#: operator must act), None plain (stopped on purpose, or not started yet)
_HEALTHY: dict[str, bool | None] = {
    "running": True, "complete": True, "detached": True,
    "paused": None, "created": None, "cancelled": None,
    "failed": False, "unopened": False,
}
#: verbs that mean something only for a live volume before its cutover; hidden elsewhere
_BEFORE_CUTOVER_VERBS = ("cutover",)
_BOOLS = ("true", "false")

#: phases worth a word in ``ls``: every volume not live is in post-copy from the start
_TELLING_PHASES = ("pre-copy", "cutover")


def summary_text(v: dict[str, Any]) -> str:
    """One volume as ``ls`` shows it: phase (while a live volume is before its cutover, the one
    time it says more than the state), state, how much is local, rate, ETA and the rate limit."""
    phase = v.get("phase")
    head = f"{phase} {v['state']}" if phase in _TELLING_PHASES else v["state"]
    text = (f"{head} {v['percent']:.1f}% {human_bytes(v['local_bytes'])}/{human_bytes(v['size'])} "
            f"{human_bytes(v['rate_bps'])}/s eta {human_eta(v['eta_s'])}")
    if v.get("rate_limit_bps"):
        text += f" limit {human_bytes(v['rate_limit_bps'])}/s"
    return text


def _size(param: str, text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise ExecutionError(f"{param}: {e}") from None


def _complete_from(options: list[str] | tuple[str, ...], text: str) -> list[str]:
    """configshell's convention: a single match ends with a space, so that typing goes on."""
    matches = [o for o in options if o.startswith(text)]
    return [matches[0] + " "] if len(matches) == 1 else matches


class UILazy(ConfigNode):  # type: ignore[misc]
    """``/lazy``: the volumes of the daemon at the control socket."""

    help_intro = """
        LAZYISCSI VOLUMES
        =================
        Each child is a volume of the lazyiscsi daemon: an iSCSI LUN whose data is copied
        from its source in the background while it is served. `ls` shows each volume's
        state, how much is local, the copy's rate and its ETA. `create` and `delete` work
        here; cd into a volume for pause, resume, rate, verify, detach and info.
        """

    def __init__(self, daemon: Daemon, parent: Any) -> None:
        super().__init__("lazy", parent)
        self.daemon = daemon
        self.error: str | None = None
        self._stale = True

    # -- the children come from the daemon ---------------------------------------------------

    def invalidate(self) -> None:
        """Ask the daemon again at the next look at the children."""
        self._stale = True

    @property
    def children(self) -> Any:
        self._sync()
        return self._children

    def get_child(self, name: str) -> Any:
        self._sync()
        return super().get_child(name)

    def _sync(self) -> None:
        if not self._stale:
            return
        self._stale = False
        try:
            volumes = self.daemon.volumes()
            self.error = None
        except ControlError as e:
            volumes, self.error = [], str(e)
        shown = {v["volume"]: v for v in volumes}
        for child in list(self._children):
            if child.name not in shown:
                self.remove_child(child)
        known = {child.name: child for child in self._children}
        for name, status in shown.items():
            if name in known:
                known[name].status = status
            else:
                UIVolume(status, self)

    def summary(self) -> tuple[str, bool | None]:
        count = len(self.children)  # asks the daemon first, which sets self.error
        if self.error is not None:
            return self.error, False
        return f"Volumes: {count}", None

    def volume_names(self) -> list[str]:
        return sorted(child.name for child in self.children)

    # -- verbs ------------------------------------------------------------------------------

    def ui_command_create(self, name: str, source: str | None = None, source_file: str | None = None,
                          unit: str | None = None, rate: str | None = None) -> None:
        """
        Creates a volume and serves it at once: target <iqn prefix>:NAME, LUN 0. Its data
        is fetched from the source on demand and copied in the background.

        name: 1-64 of A-Z a-z 0-9 _ . - (not starting with _ . -).
        source: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, http(s)://...,
        file:///PATH or a path. A URL holding a password or token is refused here (the
        shell's history and log would keep it): give source_file=PATH (the URL on its
        first line, mode 0600) or set $LAZYISCSI_SOURCE instead.
        unit: tracking unit of the new cache, a power of two from 512 to 1M (e.g. 64K).
        rate: limit of the background copy in bytes/s, e.g. 50M (binary) or 50MB
        (decimal); 0 or none: no limit.
        """
        if source is not None and has_secret(source):
            raise ExecutionError("source: the URL holds a password or token, which the shell's history "
                                 "and log would keep; use source_file=PATH or $LAZYISCSI_SOURCE")
        try:
            url = sourcearg.resolve(argparse.Namespace(source=source, source_file=source_file),
                                    required=True)
        except sourcearg.SourceArgError as e:
            message = str(e).replace("--source-file", "source_file").replace("--source", "source")
            raise ExecutionError(message) from None
        args: dict[str, Any] = {"name": name, "source": url}
        if unit is not None:
            args["unit"] = _size("unit", unit)
        if rate is not None:
            args["rate"] = _size("rate", rate)
        status = self.daemon.call("volume.create", timeout=None, **args)
        self.invalidate()
        self.shell.log.info(f"Created volume {name}: {status['target']} LUN {status['lun']}, "
                            f"{human_bytes(status['size'])}.")

    def ui_command_delete(self, name: str) -> None:
        """
        Stops serving the volume NAME and deletes its cache. Its target and LUN go away;
        bytes the guest wrote that exist nowhere else are lost.
        """
        self.daemon.call("volume.delete", name=name)
        self.invalidate()
        self.shell.log.info(f"Deleted volume {name}.")

    def ui_complete_delete(self, parameters: dict[str, str], text: str, current_param: str) -> list[str]:
        if current_param != "name":
            return []
        return _complete_from(self.volume_names(), text)


class UIVolume(ConfigNode):  # type: ignore[misc]
    """One volume; its verbs act on it alone."""

    help_intro = """
        LAZYISCSI VOLUME
        ================
        A volume of the lazyiscsi daemon. `ls` shows its state, how much is local, the
        background copy's rate and its ETA; `info` every figure the daemon reports.
        """

    def __init__(self, status: dict[str, Any], parent: UILazy) -> None:
        super().__init__(status["volume"], parent)
        self.status = status

    @property
    def daemon(self) -> Daemon:
        return self.parent.daemon  # type: ignore[no-any-return]

    def summary(self) -> tuple[str, bool | None]:
        healthy = _HEALTHY.get(self.status["state"])
        if str(self.status.get("source_health", "ok")).startswith("error"):
            healthy = False
        return summary_text(self.status), healthy

    def list_commands(self) -> tuple[str, ...]:
        """configshell's list, less ``cutover`` unless this is a live volume before its cutover
        (help, completion and execution all read it): elsewhere it could only be refused."""
        before = self.status.get("live") and self.status.get("phase") in _TELLING_PHASES
        return tuple(c for c in super().list_commands() if before or c not in _BEFORE_CUTOVER_VERBS)

    def _verb(self, op: str, done: str, timeout: float | None = REQUEST_TIMEOUT, **args: Any) -> None:
        self.status = self.daemon.call(op, timeout=timeout, name=self.name, **args)
        self.shell.log.info(f"{done}: {summary_text(self.status)}")

    # -- verbs ------------------------------------------------------------------------------

    def ui_command_info(self) -> None:
        """
        Shows every figure the daemon reports for this volume: state, progress, rate, ETA,
        rate limit, on-demand misses and their latency, source health, target and LUN.
        """
        status = self.daemon.call("status", name=self.name)[0]
        self.status = status
        width = max(len(k) for k in status)
        for key, value in status.items():
            self.shell.con.display(f"{key.ljust(width)}  {'' if value is None else value}")

    def ui_command_pause(self) -> None:
        """
        Stops the background copy. Reads of data not yet local still fetch it from the
        source; the pause outlasts a restart of the daemon.
        """
        self._verb("pause", "Paused")

    def ui_command_resume(self) -> None:
        """
        Restarts the background copy where it stopped.
        """
        self._verb("resume", "Resumed")

    def ui_command_rate(self, rate: str) -> None:
        """
        Changes the background copy's rate limit at once: bytes per second, e.g. 50M
        (binary) or 50MB (decimal); 0: no limit. On-demand reads are never limited.
        """
        self._verb("rate", "Rate set", rate=_size("rate", rate))

    def ui_command_verify(self) -> None:
        """
        Compares every local unit the guest did not write with the source, and lists the
        ranges that differ. Units not yet local and units the guest wrote are skipped.
        """
        report = self.daemon.call("verify", timeout=None, name=self.name)
        self.shell.log.info(f"Verify {self.name}: compared {human_bytes(report['compared_bytes'])}, "
                            f"skipped {human_bytes(report['skipped_written_bytes'])} written by the guest "
                            f"and {human_bytes(report['skipped_missing_bytes'])} not yet local.")
        for m in report["mismatches"]:
            self.shell.con.display(f"MISMATCH offset={m['offset']} length={m['length']}")
        if report["mismatches"]:
            raise ExecutionError(f"verify {self.name}: {len(report['mismatches'])} mismatching range(s)")

    def ui_command_detach(self, force: str = "false") -> None:
        """
        Lets the source go: the volume no longer needs it to be read or to restart. Refused
        while bytes are still only at the source, unless force=true: those bytes then become
        unreadable for good.
        """
        if force not in _BOOLS:
            raise ExecutionError(f"force: {force!r} is not true or false")
        self._verb("detach", "Detached", force=force == "true")

    def ui_complete_detach(self, parameters: dict[str, str], text: str, current_param: str) -> list[str]:
        return _complete_from(_BOOLS, text) if current_param == "force" else []

    def ui_command_cutover(self) -> None:
        """
        Ends the pre-copy of a live source: run it once the source VM has stopped and before
        the destination VM runs. The final dirty bitmap is read, what it marks is fetched
        again, and the LUN becomes writable.
        """
        self._verb("cutover", "Cut over", timeout=None)
