"""``lazyiscsi shell``: targetcli's tree with ``/lazy`` on it, or ``/lazy`` alone.

Used as targetcli is: with a command line it runs that one line and exits (``lazyiscsi shell
/lazy ls``), 0 when it worked, 1 with one line on stderr when not; without one, on a terminal,
it is interactive, with history and tab completion, and on targetcli's tree it saves targetcli's
configuration on exit when targetcli's ``auto_save_on_exit`` preference says so (as targetcli
does); without one and without a terminal it runs the command lines of its standard input as
a script (configshell's interactive loop needs readline on a terminal).

targetcli's tree needs LIO (``RTSRoot()`` mounts configfs and reads the kernel's modules) and
the system bus (its ``user:`` backstores are asked over D-Bus). Where either fails (a container,
a host without target_core_mod, no dbus-daemon) the shell offers ``/lazy`` alone, which
needs only the daemon, and says why in the summary of ``/`` (``ls /``) and in the interactive
banner; one-shot commands and scripts stay quiet about it (their output is for a program).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from lazyiscsi_targetcli import framework
from lazyiscsi_targetcli.client import Daemon
from lazyiscsi_targetcli.framework import ConfigNode, ConfigShell, ExecutionError
from lazyiscsi_targetcli.nodes import UILazy

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 130
#: where targetcli keeps its preferences and history; our shell on its tree shares them
TARGETCLI_HOME = os.environ.get("TARGETCLI_HOME", "~/.targetcli")
#: ours, for the shell without targetcli's tree
LAZY_HOME = os.environ.get("LAZYISCSI_SHELL_HOME", "~/.lazyiscsi")

#: the preferences targetcli's nodes read, with targetcli's defaults (targetcli-fb's
#: ``TargetCLI.default_prefs``): configshell answers None for a missing one, which would turn
#: e.g. the default portal of a new TPG off
TARGETCLI_PREFS: dict[str, Any] = {
    "export_backstore_name_as_model": True, "auto_enable_tpgt": True, "auto_add_mapped_luns": True,
    "auto_cd_after_create": False, "auto_save_on_exit": True, "max_backup_files": "10",
    "auto_add_default_portal": True, "auto_use_daemon": False, "daemon_use_batch_mode": False,
}


class LazyShell(ConfigShell):  # type: ignore[misc]
    """configshell's shell; ``/lazy`` asks the daemon afresh for each command line and each
    completion, so that ``ls`` shows progress as it is now."""

    lazy: UILazy

    def run_cmdline(self, cmdline: str) -> None:
        self.lazy.invalidate()
        super().run_cmdline(cmdline)

    def _complete(self, text: str, state: int) -> str | None:
        if state == 0:  # readline asks for state 0, 1, ... of one completion
            self.lazy.invalidate()
        return super()._complete(text, state)  # type: ignore[no-any-return]


class TargetcliShell(LazyShell):
    """The shell on targetcli's tree, with targetcli's preferences."""

    default_prefs = {**ConfigShell.default_prefs, **TARGETCLI_PREFS}


class UIStandaloneRoot(ConfigNode):  # type: ignore[misc]
    """``/`` where targetcli's tree is not available: it holds ``/lazy`` only."""

    help_intro = """
        LAZYISCSI SHELL
        ===============
        The volumes of the lazyiscsi daemon are under /lazy (`cd /lazy`, `ls`, `help`).
        Installed with targetcli-fb on a host with LIO, this shell shows targetcli's own
        tree beside them.
        """

    def __init__(self, shell: LazyShell, note: str | None) -> None:
        super().__init__("/", shell=shell)
        self.note = note

    def summary(self) -> tuple[str, bool | None]:
        return (self.note or "", None)


@dataclass
class Session:
    shell: LazyShell
    root: Any
    #: why targetcli's tree is not shown (None: it is, or targetcli is not installed)
    note: str | None
    targetcli: bool


def _targetcli_root(shell: LazyShell, daemon: Daemon) -> Any:
    """targetcli's root, which rebuilds its children on ``refresh`` (and ``clearconfig``,
    ``restoreconfig``): ``/lazy`` is hung on again each time."""

    class LazyUIRoot(framework.UIRoot):  # type: ignore[misc,name-defined]
        def refresh(self) -> None:
            super().refresh()
            shell.lazy = UILazy(daemon, self)

    root = LazyUIRoot(shell, as_root=os.geteuid() == 0)
    root.refresh()
    return root


def open_session(control: str, *, prefs_dir: str | None = None) -> Session:
    """The shell with its tree: targetcli's where it can be built, else ``/lazy`` alone."""
    daemon = Daemon(control)
    note = None
    if framework.UIRoot is not None:
        shell = TargetcliShell(prefs_dir or TARGETCLI_HOME)
        try:
            return Session(shell, _targetcli_root(shell, daemon), None, True)
        except Exception as e:  # as targetcli's own main: its tree fails with
            # whatever its environment lacks (rtslib: no configfs; GLib: no system bus for the
            # user: backstores), and says why; the first failure is the reason (rtslib's
            # fallback then fails again, reading /proc/modules)
            first = e.__context__ if e.__context__ is not None else e
            note = f"targetcli's tree is not available here ({first}); showing /lazy only"
    else:
        shell = LazyShell(prefs_dir or LAZY_HOME)
    root = UIStandaloneRoot(shell, note)
    shell.lazy = UILazy(daemon, root)
    return Session(shell, root, note, False)


def _errors() -> tuple[type[BaseException], ...]:
    """What a command line may fail with that is the operator's to read: configshell's
    refusals and, on targetcli's tree, rtslib's."""
    if framework.UIRoot is None:
        return (ExecutionError,)
    from rtslib_fb.utils import RTSLibError

    return (ExecutionError, RTSLibError)


def run(control: str, line: list[str], *, prefs_dir: str | None = None) -> int:
    """``lazyiscsi shell [LINE...]``: the exit status."""
    session = open_session(control, prefs_dir=prefs_dir)
    if line:
        return _one_line(session.shell, " ".join(line))
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return _script(session.shell, sys.stdin)
    return _interactive(session)


def _one_line(shell: LazyShell, text: str, where: str = "") -> int:
    try:
        shell.run_cmdline(text)
    except _errors() as e:
        sys.stderr.write(f"lazyiscsi: error: {where}{e}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK


def _script(shell: LazyShell, lines: TextIO) -> int:
    """Command lines from a pipe or a file, as a script: blank lines and ``#`` comments
    skipped, the first failure ends it (with its line number) and ``exit`` too."""
    for number, text in enumerate(lines, 1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        status = _one_line(shell, text, f"line {number}: ")
        if status != EXIT_OK or shell._exit:
            return status
    return EXIT_OK


def _interactive(session: Session) -> int:
    shell = session.shell
    if session.note:
        shell.log.warning(session.note)
    shell.con.display("lazyiscsi shell: volumes under /lazy. For help on commands, type 'help'.\n")
    while not shell._exit:
        try:
            shell.run_interactive()
        except _errors() as e:
            shell.log.error(str(e))
    if session.targetcli and shell.prefs["auto_save_on_exit"] and os.geteuid() == 0:
        shell.log.info("Global pref auto_save_on_exit=true")
        session.root.ui_command_saveconfig()
    return EXIT_OK
