"""Every test gets its own control socket and state directory: ``lazyiscsi serve`` started by
a test (or the verbs it runs) never meets another test's daemon, or a real one on this host.
The Debian package and the kernel tier's guest runs start in the background as soon as
collection shows a selected test needs them (tests/background.py), and the tier's tests run
last, when the guest has had the other tests' time."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import background
from tests.kernel import tier


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected what they do
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.option.collectonly:
        return
    runs = {marker.args[0] for item in items if (marker := item.get_closest_marker("kernel_tier"))}
    tier.start(runs)  # first: the package waits for the guest's build (background.debian_package)
    if any("debian_package" in getattr(item, "fixturenames", ()) for item in items):
        background.debian_package()
    # stable: the rest keep their order
    items.sort(key=lambda item: item.get_closest_marker("kernel_tier") is not None)


def pytest_unconfigure(config: pytest.Config) -> None:
    background.stop()


@pytest.fixture(autouse=True)
def _private_daemon_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAZYISCSI_CONTROL", str(tmp_path / "control.sock"))
    monkeypatch.setenv("LAZYISCSI_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture(scope="session")
def debian_package() -> Path:
    """The .deb that scripts/deb.sh builds from this tree (started at collection)."""
    return background.debian_package().result()
