"""Issue 12, acceptance 1 and 2: a ``backstore_only`` volume configured from Debian's stock
targetcli-fb, which finds ``user:lazy`` over the system bus (dbus-daemon), first without
tcmu-runner (we own ``org.kernel.TCMUService1``), then with Debian's tcmu-runner running (we
register through its HandlerManager1), through saveconfig, clearconfig and ``targetctl restore``
ten times, and a tcmu-runner restart. open-iscsi reads the source's bytes through the LUN while
it hydrates. The tests run in file order on one daemon, as an operator's day would.

Time: each targetcli or targetctl process costs 15-35 s under TCG (Python, GObject introspection,
rtslib's configfs walk), so the commands run in stock targetcli's own shell kept in this process
(``ConfigShell`` + ``UIRoot``, what ``/usr/bin/targetcli`` builds, one line at a time), and nine
of the ten restores call what ``targetctl`` calls (rtslib's ``clear_existing`` and
``restore_from_file``); ``targetcli ls``, the first ``targetctl restore`` and the unknown
cfgstring's refusal are the real commands."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.inguest.conftest import (
    NBD_PORT,
    SOURCE_SIZE,
    WORK,
    Daemon,
    login,
    logout,
    read_direct,
    run,
    serve_argv,
    source_bytes,
    system_bus,
    wait_for,
    write_direct,
)

IQN = "iqn.2026-11.io.lazyiscsi:tc1"
PORTAL_IP, PORTAL_PORT = "127.0.0.1", 3261  # not the other tests' 3260
PORTAL = f"{PORTAL_IP}:{PORTAL_PORT}"
POLICY = Path("/project/targetcli-plugin/dbus/org.kernel.TCMUService1.HandlerManager1.lazy.conf")
POLICY_DIRS = (Path("/usr/share/dbus-1/system.d"), Path("/etc/dbus-1/system.d"))
ACTIVATION = Path("/usr/share/dbus-1/system-services/org.kernel.TCMUService1.service")
SOURCE = source_bytes()
RESTORES = 10
#: one targetcli command under TCG: Python, rtslib's configfs walk and GObject's D-Bus proxies
TARGETCLI_TIMEOUT_S = 180
#: the daemon's D-Bus side retries an absent bus this often (lazyiscsi.dbus.tcmuservice.RECONNECT),
#: and tcmu-runner takes seconds to start under TCG
BUS_WAIT_S = 120


def targetcli(*words: str, check: bool = True) -> str:
    """The targetcli command, once; what it printed."""
    r = run("targetcli", *words, check=check, timeout=TARGETCLI_TIMEOUT_S)
    return r.stdout + r.stderr


class Shell:
    """Stock targetcli's shell in this process: a command line as the operator types it; an error
    raises (configshell's ExecutionError, with targetcli's message)."""

    def __init__(self) -> None:
        import runpy

        from targetcli import UIRoot

        # the script's own shell class: its default preferences (auto_enable_tpgt...) come with it
        shell_class = runpy.run_path(shutil.which("targetcli") or "/usr/bin/targetcli")["TargetCLI"]
        self.shell = shell_class("~/.targetcli")
        UIRoot(self.shell, as_root=True).refresh()  # user:<subtype> come from D-Bus here

    def __call__(self, line: str) -> None:
        self.shell.run_cmdline(line)


def restore(with_targetctl: bool) -> None:
    """clearconfig, then restore what saveconfig wrote: the targetctl command, or the two rtslib
    calls it makes."""
    if with_targetctl:
        Shell()("clearconfig confirm=True")
        run("targetctl", "restore", timeout=TARGETCLI_TIMEOUT_S)
        return
    import rtslib_fb

    rtslib_fb.RTSRoot().clear_existing(confirm=True)
    errors = rtslib_fb.RTSRoot().restore_from_file()
    assert not errors, errors


class Runner:
    """Debian's tcmu-runner in the foreground, as its systemd unit runs it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (WORK / "tcmu-runner.out").open("ab")
        self.proc = subprocess.Popen(["tcmu-runner"], stdout=log, stderr=log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def bus(kernel: None) -> Iterator[None]:
    """The system bus (conftest's), with our policy file where dbus looks for it (the package's
    place when it is installed, else copied from the project). tcmu-runner's activation file is
    moved aside: with it, the first targetcli would start tcmu-runner (as on an installed host),
    and acceptance 1 is the host without tcmu-runner; acceptance 2 starts it by hand."""
    if not any((d / POLICY.name).exists() for d in POLICY_DIRS):
        shutil.copy(POLICY, POLICY_DIRS[1] / POLICY.name)
    if ACTIVATION.exists():
        ACTIVATION.rename(WORK / ACTIVATION.name)
    try:
        with system_bus():
            yield
    finally:
        if (WORK / ACTIVATION.name).exists():
            (WORK / ACTIVATION.name).rename(ACTIVATION)


@pytest.fixture(scope="module")
def runner() -> Iterator[Runner]:
    r = Runner()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def daemon(source: Path, bus: None, runner: Runner) -> Iterator[Daemon]:
    d = Daemon(serve_argv("tc1"), WORK / "tc1.log")
    d.start()
    yield d
    logout(IQN, PORTAL)
    import rtslib_fb

    rtslib_fb.RTSRoot().clear_existing(confirm=True)
    runner.stop()  # before the daemon: nothing may answer for user:lazy after this module
    if d.proc is not None and d.proc.poll() is None:
        d.stop()
    print(d.log.read_text()[-8000:])


def events(daemon: Daemon, name: str) -> int:
    return len(re.findall(rf"\b{name}\b", daemon.log.read_text()))


def subtree(listing: str, node: str) -> list[str]:
    """The lines of ``targetcli ls`` below ``node`` (deeper than it), from their ``o-`` on."""
    lines = listing.splitlines()
    for i, line in enumerate(lines):
        depth = line.find(f"o- {node} ")
        if depth >= 0:
            below = []
            for child in lines[i + 1:]:
                if child.find("o- ") <= depth:
                    break
                below.append(child[child.find("o- "):])
            return below
    return []


def lists_user_lazy() -> bool:
    r = run("dbus-send", "--system", "--print-reply", "--dest=org.kernel.TCMUService1",
            "/org/kernel/TCMUService1", "org.freedesktop.DBus.ObjectManager.GetManagedObjects", check=False)
    return '"/org/kernel/TCMUService1/lazy"' in r.stdout


def configure_with_targetcli(daemon: Daemon, *, command: bool) -> None:
    """The operator's session (README "Using targetcli"), after an unknown cfgstring is refused
    with our reason (by the targetcli ``command``, or in the shell)."""
    why = "cfgstring invalid: lazyiscsi serves no volume 'nope'"
    tc = Shell()
    if command:
        refused = targetcli("/backstores/user:lazy", "create", "name=nope", "size=1M", "cfgstring=nope",
                            check=False)
        assert why in refused, refused
    else:
        with pytest.raises(Exception, match=re.escape(why)):
            tc("/backstores/user:lazy create name=nope size=1M cfgstring=nope")
    tc("set global auto_add_default_portal=false")
    tc(f"/backstores/user:lazy create name=vm1 size={SOURCE_SIZE} cfgstring=vm1")
    tc(f"/iscsi create {IQN}")
    tc(f"/iscsi/{IQN}/tpg1/portals create {PORTAL_IP} {PORTAL_PORT}")
    tc(f"/iscsi/{IQN}/tpg1/luns create /backstores/user:lazy/vm1")
    tc(f"/iscsi/{IQN}/tpg1 set attribute authentication=0 demo_mode_write_protect=0 generate_node_acls=1 "
       "cache_dynamic_acls=1")


def read_write_while_hydrating(daemon: Daemon, offsets: tuple[int, ...]) -> None:
    disk = login(IQN, portal=PORTAL)
    for offset in offsets:
        assert read_direct(disk, offset, 1 << 20) == SOURCE[offset:offset + (1 << 20)], offset
    st = daemon.status("vm1")
    assert st["state"] == "running" and st["local_bytes"] < SOURCE_SIZE, st
    data = os.urandom(64 << 10)
    write_direct(disk, 20 << 20, data)
    assert read_direct(disk, 20 << 20, len(data)) == data
    logout(IQN, PORTAL)


def test_targetcli_without_tcmu_runner_creates_and_exports_user_lazy(daemon: Daemon) -> None:
    """Acceptance 1: our daemon owns org.kernel.TCMUService1 on the system bus."""
    daemon.cli("volume", "create", "vm1", "--source", f"nbd://127.0.0.1:{NBD_PORT}", "--rate", "64K",
               "--backstore-only")
    wait_for("user:lazy on the system bus", lists_user_lazy, BUS_WAIT_S)
    # a size that is not the source's: the device is refused, with one event saying why
    Shell()("/backstores/user:lazy create name=bad size=32M cfgstring=vm1")
    wait_for("the refusal", lambda: events(daemon, "tcmu_device_refused"), 60)
    Shell()("/backstores/user:lazy delete bad")
    configure_with_targetcli(daemon, command=True)
    read_write_while_hydrating(daemon, (0, 40 << 20))
    listing = targetcli("ls")
    # under user:lazy, whatever other tests left beside it
    assert any(re.match(r"o- vm1 \.+ \[vm1 \(64\.0MiB\) activated\]$", line)
               for line in subtree(listing, "user:lazy")), listing
    assert re.search(rf"o- {re.escape(IQN)} .*\n.*o- tpg1 ", listing), listing
    assert "o- lun0 " in listing and "[user/vm1 " in listing and f"o- {PORTAL} " in listing, listing
    assert events(daemon, "dbus_service_owned") >= 1 and events(daemon, "dbus_handler_registered") == 0


def test_targetcli_with_tcmu_runner_survives_saveconfig_restore_and_its_restart(daemon: Daemon,
                                                                                 runner: Runner) -> None:
    """Acceptance 2: tcmu-runner owns the service; we register through HandlerManager1."""
    Shell()("clearconfig confirm=True")
    runner.start()
    wait_for("our registration with tcmu-runner",
             lambda: events(daemon, "dbus_handler_registered") == 1, BUS_WAIT_S)
    assert events(daemon, "tcmu_kernel_replies") == 1
    wait_for("user:lazy through tcmu-runner", lists_user_lazy, BUS_WAIT_S)
    configure_with_targetcli(daemon, command=False)  # CheckConfig now goes tcmu-runner -> us
    Shell()("saveconfig")
    for i in range(RESTORES):
        attached = events(daemon, "tcmu_attached")
        restore(with_targetctl=i == 0)
        wait_for(f"restore {i + 1}: the LUN served again",
                 lambda a=attached: events(daemon, "tcmu_attached") > a, 120)
    assert events(daemon, "tcmu_attach_failed") == 0
    runner.stop()
    runner.start()
    wait_for("our registration again", lambda: events(daemon, "dbus_handler_registered") == 2, BUS_WAIT_S)
    attached = events(daemon, "tcmu_attached")
    restore(with_targetctl=False)
    wait_for("the LUN served after tcmu-runner's restart",
             lambda: events(daemon, "tcmu_attached") > attached, 120)
    read_write_while_hydrating(daemon, (56 << 20,))
    assert "o- vm1 " in targetcli("ls", "/backstores/user:lazy")  # listed through tcmu-runner
