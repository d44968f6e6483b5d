"""``lazyiscsi shell`` (issue 12, acceptance 3) against a real ``lazyiscsi serve`` on the embedded
portal: through configshell's own command interface (``run_cmdline``, and readline's completion
entry point with readline's line buffer faked below it), and as one-shot commands and scripts in
a subprocess. Each verb is checked with ``lazyiscsi status --json``, never with the shell's own
view.

The same file runs under Debian's python3 with python3-configshell-fb (1.1.x) and
targetcli-fb, from test_shell_debian.py; here it runs on the PyPI configshell-fb the project's
install pulls (acceptance 4). targetcli's own tree needs LIO (configfs): on a host without it
the shell says so and shows /lazy alone (test_targetcli_tree_without_lio_*); the tree itself is
tested in the kernel guest.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lazyiscsi_targetcli import framework as configshell_framework
from lazyiscsi_targetcli import shell as lazyshell

from tests.integration.peers import MiB, make_image, wait_until

LAZYISCSI = [sys.executable, "-m", "lazyiscsi.cli"]
#: big and slow enough (rate-limited) that a volume is still copying while a test acts on it
IMAGE_SIZE = 16 * MiB
SLOW_RATE = "256K"
ExecutionError = configshell_framework.ExecutionError


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAZYISCSI, *args], capture_output=True, text=True, timeout=120,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)


def status(name: str) -> dict[str, Any]:
    r = cli("status", name, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]  # type: ignore[no-any-return]


def names() -> list[str]:
    r = cli("volume", "list", "--json")
    assert r.returncode == 0, r.stderr
    return sorted(v["volume"] for v in json.loads(r.stdout))


def control_path() -> str:
    return os.environ["LAZYISCSI_CONTROL"]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source.img"
    make_image(path, IMAGE_SIZE)
    return path


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """serve on the embedded portal, port 0, the test's own control socket and state dir."""
    proc = subprocess.Popen([*LAZYISCSI, "serve", "--frontend", "portal", "--listen", "127.0.0.1:0"],
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "serve.log").open("w"),
                            text=True)
    wait_until(lambda: cli("status").returncode == 0, "serve answers on its control socket", proc=proc)
    yield proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, (tmp_path / "serve.log").read_text()[-3000:]


@pytest.fixture
def vm1(daemon: subprocess.Popen[str], source: Path) -> str:
    r = cli("volume", "create", "vm1", "--source", str(source), "--rate", SLOW_RATE)
    assert r.returncode == 0, r.stderr
    return "vm1"


class Session:
    """The shell as configshell's API drives it: each command line's output and refusals."""

    def __init__(self, tmp_path: Path) -> None:
        self.out, self.err = io.StringIO(), io.StringIO()
        self.session = lazyshell.open_session(control_path(), prefs_dir=str(tmp_path / "prefs"))
        self.shell = self.session.shell
        # configshell's Console is a Borg: this one's streams become every console's
        configshell_framework.Console(stdout=self.out, stderr=self.err)
        self.shell.prefs["color_mode"] = False

    def run(self, line: str) -> str:
        """The command line's output; ExecutionError when refused."""
        start = len(self.out.getvalue())
        self.shell.run_cmdline(line)
        return self.out.getvalue()[start:]

    def refused(self, line: str) -> str:
        with pytest.raises(ExecutionError) as e:
            self.shell.run_cmdline(line)
        return str(e.value)

    def complete(self, line: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        """What tab offers at the end of ``line``: configshell's completer, called as readline
        calls it (state 0, 1, ... until None), with readline's line buffer faked."""
        text = re.split(r"[\s]", line)[-1]
        fake = _Readline(line, len(line) - len(text), len(line))
        monkeypatch.setattr(sys.modules[configshell_framework.ConfigShell.__module__], "readline", fake,
                            raising=False)
        found = []
        while (match := self.shell._complete(text, len(found))) is not None:
            found.append(match)
        return found


class _Readline:
    def __init__(self, line: str, begin: int, end: int) -> None:
        self.line, self.begin, self.end = line, begin, end

    def get_line_buffer(self) -> str:
        return self.line

    def get_begidx(self) -> int:
        return self.begin

    def get_endidx(self) -> int:
        return self.end


@pytest.fixture
def sh(tmp_path: Path) -> Session:
    return Session(tmp_path)


# -- ls and cd --------------------------------------------------------------------------------

SUMMARY = re.compile(r"o- vm1 \.+ \[(?P<state>\w+) (?P<pct>\d+\.\d)% [\d.]+ \w+/16\.0 MiB [\d.]+ \w+/s "
                     r"eta (?P<eta>--:--|\d+:\d\d(:\d\d)?) limit 256\.0 KiB/s\]")


def test_ls_shows_each_volume_state_percent_rate_and_eta(vm1: str, sh: Session, source: Path) -> None:
    assert cli("volume", "create", "vm2", "--source", str(source)).returncode == 0
    out = sh.run("ls /lazy")
    assert re.search(r"o- lazy \.+ \[Volumes: 2\]", out), out
    m = SUMMARY.search(out)
    assert m and m["state"] == "running", out
    assert 0.0 <= float(m["pct"]) <= 100.0
    wait_until(lambda: status("vm2")["state"] == "complete", "vm2 (no rate limit) completes")
    assert re.search(r"o- vm2 \.+ \[complete 100\.0% 16\.0 MiB/16\.0 MiB ", sh.run("ls /lazy")), out
    # the root lists /lazy with its volumes, as targetcli lists /backstores
    assert re.search(r"o- / .*\n  o- lazy .*\n    o- vm1 .*\n    o- vm2 ", sh.run("ls /")), sh.run("ls /")


def test_cd_into_a_volume_and_back(vm1: str, sh: Session) -> None:
    sh.run("cd /lazy/vm1")
    assert sh.run("pwd").strip() == "/lazy/vm1"
    assert "pause" in sh.run("help")  # the volume's verbs, here
    sh.run("cd ..")
    assert sh.run("pwd").strip() == "/lazy"
    assert "No such path /lazy/nope" in sh.refused("cd nope")
    assert sh.run("pwd").strip() == "/lazy"


def test_the_tree_follows_the_daemon_between_command_lines(vm1: str, sh: Session, source: Path) -> None:
    """A volume made or deleted by someone else appears and goes at the next command line."""
    assert "vm3" not in sh.run("ls /lazy")
    assert cli("volume", "create", "vm3", "--source", str(source)).returncode == 0
    assert "o- vm3 " in sh.run("ls /lazy")
    assert cli("volume", "delete", "vm3").returncode == 0
    assert "vm3" not in sh.run("ls /lazy")


# -- each verb does what it says ---------------------------------------------------------------


def test_pause_and_resume(vm1: str, sh: Session) -> None:
    assert "Paused: paused" in sh.run("/lazy/vm1 pause")
    assert status("vm1")["state"] == "paused"
    assert "[paused " in sh.run("ls /lazy/vm1")
    assert "Resumed: running" in sh.run("/lazy/vm1 resume")
    assert status("vm1")["state"] == "running"


def test_rate(vm1: str, sh: Session) -> None:
    sh.run("/lazy/vm1 rate 2M")
    assert status("vm1")["rate_limit_bps"] == 2 * MiB
    sh.run("/lazy/vm1 rate 3MB")
    assert status("vm1")["rate_limit_bps"] == 3_000_000
    sh.run("/lazy/vm1 rate 0")
    assert status("vm1")["rate_limit_bps"] is None


def test_create_and_delete(daemon: subprocess.Popen[str], sh: Session, source: Path, tmp_path: Path) -> None:
    out = sh.run(f"/lazy create vm4 {source} rate=1M unit=64K")
    assert "Created volume vm4: iqn.2026-11.io.lazyiscsi:vm4 LUN 0, 16.0 MiB." in out
    v = status("vm4")
    assert v["rate_limit_bps"] == MiB and v["target"] == "iqn.2026-11.io.lazyiscsi:vm4"
    # the URL from a file, as --source-file: what the shell's history would otherwise keep
    url_file = tmp_path / "vm5.url"
    url_file.write_text(f"file://{source}\n")
    sh.run("cd /lazy")
    sh.run(f"create vm5 source_file={url_file}")
    assert status("vm5")["source"] == f"file://{source}"
    assert names() == ["vm4", "vm5"]
    assert "Deleted volume vm4." in sh.run("delete vm4")
    assert names() == ["vm5"]
    assert "o- vm4" not in sh.run("ls")


def test_verify(vm1: str, sh: Session) -> None:
    out = sh.run("/lazy/vm1 verify")
    assert re.search(r"Verify vm1: compared [\d.]+ \w+, skipped 0 B written by the guest and [\d.]+ \w+ "
                     r"not yet local\.", out), out
    assert "MISMATCH" not in out


def test_detach_refused_while_incomplete_then_forced(vm1: str, sh: Session) -> None:
    sh.run("/lazy/vm1 pause")
    assert "still only at the source" in sh.refused("/lazy/vm1 detach")
    assert status("vm1")["state"] == "paused"
    assert "force: 'maybe' is not true or false" in sh.refused("/lazy/vm1 detach force=maybe")
    sh.run("/lazy/vm1 detach force=true")
    assert status("vm1")["state"] == "detached"


def test_info_shows_every_figure(vm1: str, sh: Session) -> None:
    out = sh.run("/lazy/vm1 info")
    assert re.search(r"^target +iqn\.2026-11\.io\.lazyiscsi:vm1$", out, re.MULTILINE), out
    assert re.search(r"^rate_limit_bps +262144$", out, re.MULTILINE), out


# -- help and completion ----------------------------------------------------------------------


def test_help_lists_the_verbs_and_shows_their_docstrings(vm1: str, sh: Session) -> None:
    out = sh.run("/lazy help")
    assert "create name [source] [source_file] [unit] [rate]" in out and "delete name" in out
    out = sh.run("/lazy/vm1 help")
    for verb in ("pause", "resume", "rate rate", "verify", "detach [force]", "info"):
        assert f"  - {verb} " in out, out
    out = sh.run("/lazy/vm1 help rate")
    assert "Changes the background copy's rate limit at once" in out, out


def test_cutover_only_on_a_live_volume_before_its_cutover(vm1: str, sh: Session, source: Path) -> None:
    """A frozen volume has no cutover to make: the verb is hidden there; a live one offers it until
    it is done, and the shell's cutover is the daemon's (writes allowed, phase post-copy)."""
    assert "cutover" not in sh.run("/lazy/vm1 help")
    assert "Command not found cutover" in sh.refused("/lazy/vm1 cutover")
    assert status("vm1")["state"] == "running"
    assert cli("volume", "create", "vm3", "--source", str(source), "--live").returncode == 0
    assert status("vm3")["phase"] == "pre-copy"
    assert "  - cutover" in sh.run("/lazy/vm3 help")
    sh.run("/lazy/vm3 cutover")
    assert status("vm3")["phase"] in ("post-copy", "complete")
    assert "cutover" not in sh.run("/lazy/vm3 help")


def test_completion_of_verbs_and_volume_names(vm1: str, sh: Session, source: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli("volume", "create", "vm2", "--source", str(source)).returncode == 0
    assert sh.complete("/lazy/vm1 pa", monkeypatch) == ["pause "]
    assert sorted(sh.complete("/lazy/vm1 r", monkeypatch)) == ["rate", "resume"]
    verbs = sh.complete("/lazy/vm1 ", monkeypatch)
    assert {"pause", "resume", "rate", "verify", "detach", "info", "help", "ls", "cd"} <= set(verbs)
    assert "cutover" not in verbs
    assert sorted(sh.complete("/lazy/v", monkeypatch)) == ["/lazy/vm1/", "/lazy/vm2/"]  # readline sorts
    sh.run("cd /lazy")
    assert sh.complete("delete v", monkeypatch) == ["vm1", "vm2"]
    assert sh.complete("delete vm2", monkeypatch) == ["vm2 "]
    assert sh.complete("cr", monkeypatch) == ["create "]
    assert sh.complete("vm1/ detach force=t", monkeypatch) == ["force=true "]
    # a volume made meanwhile is offered at the next tab
    assert cli("volume", "create", "vm3", "--source", str(source)).returncode == 0
    assert sh.complete("delete vm", monkeypatch) == ["vm1", "vm2", "vm3"]


# -- bad input: one clear line, no traceback --------------------------------------------------


def test_refusals_name_what_was_wrong(vm1: str, sh: Session) -> None:
    assert sh.refused("/lazy/nope pause") == "No such path /lazy/nope"
    assert sh.refused("/lazy delete nope") == "no volume 'nope'"
    assert sh.refused("/lazy/vm1 rate fast") == ("rate: 'fast' is not a size "
                                                 "(examples: 4096, 64K, 1MiB, 100MB)")
    assert "volume vm1 exists" in sh.refused("/lazy create vm1 /dev/null")
    assert "a source is required" in sh.refused("/lazy create vm9")
    secret = sh.refused("/lazy create vm9 http://user:hunter2@example.invalid/disk")
    assert "password or token" in secret and "hunter2" not in secret
    assert "vm9" not in names()
    assert status("vm1")["rate_limit_bps"] == 256 * 1024


BAD_ONE_SHOTS = [
    (["/lazy/nope", "pause"], "No such path /lazy/nope"),
    (["/lazy", "delete", "nope"], "no volume 'nope'"),
    (["/lazy/vm1", "rate", "fast"], "rate: 'fast' is not a size (examples: 4096, 64K, 1MiB, 100MB)"),
    (["/lazy/vm1", "frobnicate"], "Command not found frobnicate"),
]


@pytest.mark.parametrize(("line", "error"), BAD_ONE_SHOTS, ids=["unknown-volume", "delete-unknown",
                                                                  "bad-rate", "unknown-verb"])
def test_one_shot_refusal_is_one_line(vm1: str, line: list[str], error: str) -> None:
    r = cli("shell", *line)
    assert r.returncode == 1, r
    assert r.stderr.splitlines() == [f"lazyiscsi: error: {error}"], r.stderr
    assert "Traceback" not in r.stderr + r.stdout


# -- one-shot and script use, as targetcli ----------------------------------------------------


def test_one_shot_ls_and_verb(vm1: str) -> None:
    r = cli("shell", "/lazy", "ls")
    assert r.returncode == 0 and r.stderr == "", r
    assert re.search(r"o- lazy \.+ \[Volumes: 1\]\n  o- vm1 \.+ \[running ", r.stdout), r.stdout
    r = cli("shell", "/lazy/vm1", "pause")
    assert r.returncode == 0, r.stderr
    assert status("vm1")["state"] == "paused"
    r = cli("shell", "--control", control_path(), "/lazy/vm1", "resume")
    assert r.returncode == 0, r.stderr
    assert status("vm1")["state"] == "running"


def test_script_on_standard_input_stops_at_the_first_failure(vm1: str) -> None:
    r = cli("shell", stdin="# pause, then a typo\ncd /lazy/vm1\npause\n\nrate fast\nresume\n")
    assert r.returncode == 1, r
    assert r.stderr.strip() == "lazyiscsi: error: line 5: rate: 'fast' is not a size " \
                               "(examples: 4096, 64K, 1MiB, 100MB)"
    assert status("vm1")["state"] == "paused"  # line 6 did not run
    r = cli("shell", stdin="cd /lazy/vm1\nresume\nexit\npause\n")
    assert r.returncode == 0, r.stderr
    assert status("vm1")["state"] == "running"  # nothing after exit


def test_without_a_daemon_ls_says_so_and_verbs_fail(tmp_path: Path) -> None:
    r = cli("shell", "/lazy", "ls")
    assert r.returncode == 0, r.stderr
    assert f"[no daemon at {control_path()}" in r.stdout, r.stdout
    r = cli("shell", "/lazy", "create", "vm1", "/dev/null")
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"lazyiscsi: error: no daemon at {control_path()} (is `lazyiscsi serve` "
                                     "running? --control PATH)"], r.stderr


def test_without_configshell_the_cli_says_what_to_install() -> None:
    """configshell-fb missing (sys.modules None: what `import` does for a module not there)."""
    code = ("import sys; sys.modules['configshell'] = sys.modules['configshell_fb'] = None; "
            "from lazyiscsi.cli import main; sys.exit(main(['shell', '/lazy', 'ls']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r
    assert r.stderr.splitlines() == [
        "lazyiscsi: error: shell: needs configshell-fb (configshell cannot be imported): apt install "
        "python3-configshell-fb, or pip install configshell-fb"], r.stderr


# -- targetcli's tree -------------------------------------------------------------------------


LIO = os.path.isdir("/sys/kernel/config/target")


@pytest.mark.skipif(LIO, reason="LIO is there: the guest tests targetcli's tree (test_shell_targetcli.py)")
def test_without_targetcli_s_tree_the_root_holds_lazy_alone(vm1: str) -> None:
    """Without targetcli installed (the project's virtualenv) the root is the shell's own, with
    /lazy only; with targetcli but no configfs (Debian's python3 here, test_shell_debian.py)
    targetcli's UIRoot cannot be built, and the root says why."""
    r = cli("shell", "ls")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    if configshell_framework.UIRoot is None:
        assert re.search(r"^o- / \.+ \[\.\.\.\]\n  o- lazy .*\[Volumes: 1\]\n    o- vm1 ", r.stdout), r.stdout
    else:
        assert re.search(r"o- / \.+ \[targetcli's tree is not available here \(Cannot mount configfs\); "
                         r"showing /lazy only\]\n  o- lazy .*\[Volumes: 1\]\n    o- vm1 ", r.stdout), r.stdout


def test_the_shell_uses_targetcli_s_configshell_copy() -> None:
    """Debian's targetcli-fb builds on configshell_fb, PyPI's targetcli on configshell: the
    nodes must subclass the same copy, or targetcli's shell refuses them."""
    fw = configshell_framework
    if fw.UIRoot is None:
        assert fw.configshell.__name__ == "configshell"
    else:
        assert issubclass(fw.UIRoot, fw.ConfigNode)
        assert fw.ExecutionError.__module__.split(".")[0] == fw.UIRoot.__mro__[-2].__module__.split(".")[0]
