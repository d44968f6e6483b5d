"""Every test gets its own control socket and state directory: ``lazyiscsi serve`` started by
a test (or the verbs it runs) never meets another test's daemon, or a real one on this host."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _private_daemon_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAZYISCSI_CONTROL", str(tmp_path / "control.sock"))
    monkeypatch.setenv("LAZYISCSI_STATE_DIR", str(tmp_path / "state"))
