"""The command line's shape (issue 13): --control after the verb, LSB exit status 3 from
`status` without a daemon, help for every positional, progress bars that fit the terminal; and
where a source URL may come from (issue 14, finding 7)."""

from __future__ import annotations

import argparse
import dataclasses
import io
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from lazyiscsi import sourcearg
from lazyiscsi.cli import build_parser, main
from lazyiscsi.progress import MAX_BAR, MIN_BAR, ProgressDisplay, bar_line, describe
from lazyiscsi.store.hydrator import JobState, Progress


@pytest.mark.parametrize(("argv", "control"), [
    (["--control", "/a", "status"], "/a"),
    (["status", "--control", "/b"], "/b"),
    (["--control", "/a", "status", "--control", "/b"], "/b"),
    (["volume", "create", "v", "--source", "/x", "--control", "/c"], "/c"),
    (["serve", "--control", "/d"], "/d"),
    (["hydrate", "--source", "/x", "--cache", "/y", "--control", "/e"], "/e"),
])
def test_control_before_or_after_the_verb(argv: list[str], control: str) -> None:
    assert build_parser().parse_args(argv).control == control


def test_control_default_comes_from_the_environment() -> None:
    import os

    assert build_parser().parse_args(["status"]).control == os.environ["LAZYISCSI_CONTROL"]


def parsers(parser: argparse.ArgumentParser, path: str = "lazyiscsi"):  # type: ignore[no-untyped-def]
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, f"{path} {name}")


def test_every_positional_and_option_has_help() -> None:
    missing = [f"{path}: {action.dest}" for path, parser in parsers(build_parser())
               for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction) and not action.help]
    assert missing == []


@pytest.fixture
def logs_reset() -> Iterator[None]:
    """main() points structlog at this test's captured stderr: later tests must not log there."""
    yield
    structlog.reset_defaults()


@pytest.mark.usefixtures("logs_reset")
def test_status_without_a_daemon_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """LSB init-functions: status 3, "program is not running"; also for the socket a killed
    daemon left behind (it refuses connections)."""
    assert main(["status", "--control", str(tmp_path / "none.sock")]) == 3
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
        assert main(["--control", str(stale), "status", "--json"]) == 3
        assert main(["--control", str(stale), "status", "--watch"]) == 3
        assert main(["--control", str(stale), "pause", "vm1"]) == 1  # other verbs: an error
    assert "no daemon at" in capsys.readouterr().err


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


PROGRESS = Progress(state=JobState.RUNNING, current=3 << 30, total=10 << 30, fetched=3 << 30, rate=52e6,
                    eta_s=3600.0, inflight_window=8, inflight_runs=3, hot_bytes=0, rate_limit=None,
                    misses=12345, miss_p50_ms=20.5, miss_p99_ms=180.25, error=None)


@pytest.mark.parametrize("columns", [20, 40, 80, 132, 300])
def test_the_bar_fits_the_terminal(monkeypatch: pytest.MonkeyPatch, columns: int) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    out = Tty()
    display = ProgressDisplay(out)
    display.show(PROGRESS)
    line = out.getvalue().removeprefix("\r").removesuffix("\x1b[K")
    assert 0 < len(line) <= columns - 1, (columns, line)
    bar = line[1:line.index("]")]
    assert MIN_BAR <= len(bar) <= MAX_BAR and bar.count("#") == len(bar) * 3 // 10


def test_the_progress_line_shows_hot_bytes_once_there_are_any() -> None:
    assert " hot=" not in describe(PROGRESS)
    assert " hot=3.0 MiB" in describe(dataclasses.replace(PROGRESS, hot_bytes=3 << 20))


def test_bar_line_cuts_text_not_the_bar() -> None:
    assert bar_line(1.0, "x" * 100, 40) == "[" + "#" * MIN_BAR + "] " + "x" * 26
    assert bar_line(0.5, "short", 80) == "[" + "#" * 15 + "-" * 15 + "] short"


def args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"source": None, "source_file": None, **kw})


def test_source_from_each_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sourcearg.ENV, raising=False)
    url = "https://u:pw@h/d?sig=s"
    assert sourcearg.resolve(args(source="-"), required=True, stdin=io.StringIO(url + "\nmore\n")) == url
    f = tmp_path / "url"
    f.write_text(f"  {url}  \n")
    assert sourcearg.resolve(args(source_file=str(f)), required=True) == url
    assert sourcearg.resolve(args(), required=False) is None
    monkeypatch.setenv(sourcearg.ENV, url)
    assert sourcearg.resolve(args(), required=True) == url
    assert sourcearg.resolve(args(source="/given"), required=True) == "/given"  # the option wins


@pytest.mark.parametrize(("given", "stdin", "message"), [
    (args(), "", "a source is required"),
    (args(source="-"), "", "--source - (standard input): no URL"),
    (args(source="-"), "x" * (sourcearg.MAX_URL + 10), "longer than"),
    (args(source_file="/nonexistent"), "", "--source-file /nonexistent: cannot read"),
    (args(source="http://[::1"), "", "--source: not a valid URL"),
])
def test_source_refusals_name_the_option(monkeypatch: pytest.MonkeyPatch, given: argparse.Namespace,
                                         stdin: str, message: str) -> None:
    monkeypatch.delenv(sourcearg.ENV, raising=False)
    with pytest.raises(sourcearg.SourceArgError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        sourcearg.resolve(given, required=True, stdin=io.StringIO(stdin))


def test_a_secret_on_the_command_line_is_warned_about_once_without_the_secret() -> None:
    with capture_logs() as events:
        assert sourcearg.resolve(args(source="https://u:pw0rd@h/d"), required=True) == "https://u:pw0rd@h/d"
        sourcearg.resolve(args(source="https://h/d?part=1"), required=True)
    (warning,) = events
    assert warning["event"] == "source_secret_on_command_line" and warning["log_level"] == "warning"
    assert "pw0rd" not in repr(warning) and warning["source"] == "https://u:***@h/d"


@pytest.mark.usefixtures("logs_reset")
@pytest.mark.parametrize(("argv", "reason"), [
    (["serve", "--source", "nbd://h/e", "--cache", "/c", "--dirty-bitmap", "mig"],
     "--dirty-bitmap needs --live"),
    (["serve", "--source", "/x.img", "--cache", "/c", "--live", "--dirty-bitmap", "mig"],
     "--dirty-bitmap needs an nbd:// source"),
    (["serve", "--source", "https://h/x.img", "--cache", "/c", "--live"], "--live needs an nbd:// source"),
    (["serve", "--config", "/l.toml", "--live"], "--config and --live/--dirty-bitmap exclude"),
    (["volume", "create", "v", "--source", "nbd://h/e", "--dirty-bitmap", "mig"],
     "--dirty-bitmap needs --live"),
    (["volume", "create", "v", "--source", "file:///x", "--live", "--dirty-bitmap", "mig"],
     "--dirty-bitmap needs an nbd:// source"),
])
def test_live_option_refusals(argv: list[str], reason: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 11: bad --live/--dirty-bitmap combinations exit 2 with one line, before anything
    is opened or a daemon is asked."""
    assert main([*argv, "--control", str(tmp_path / "none.sock")]) == 2
    err = capsys.readouterr().err
    assert reason in err and err.count("\n") == 1


@pytest.mark.usefixtures("logs_reset")
def test_hydrate_refuses_a_live_cache_before_its_cutover(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 11: a pre-copy cache belongs to `serve` and its cutover; hydrate would copy a source
    still in use. One line, exit 1, the cache untouched."""
    from lazyiscsi.store.lazydisk import LazyDisk
    from tests.unit.store_fakes import LiveSource

    src = tmp_path / "src.img"
    src.write_bytes(bytes(1 << 20))
    cache = tmp_path / "cache"
    LazyDisk.open(str(cache), LiveSource(bytes(1 << 20), bitmap=None), autocommit_s=None, live=True).close()
    meta = (tmp_path / "cache.meta").read_bytes()
    assert main(["hydrate", "--source", str(src), "--cache", str(cache)]) == 1
    err = capsys.readouterr().err
    assert "before its cutover" in err and err.count("\n") == 1
    assert (tmp_path / "cache.meta").read_bytes() == meta
