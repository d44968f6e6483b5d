"""tests/kernel/guest/apt_mirror.py: the guest is built from the mirror the host's apt uses, read
from both source formats of sources.list(5), and the build stops with a clear line when there is
none (no mirror host is written into the project)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "guest" / "apt_mirror.py"


def mirror_of(root: Path, suite: str = "bookworm") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), suite, str(root)], capture_output=True, text=True,
                          timeout=30)


def sources(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "etc/apt" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_deb822_stanza_naming_the_suite(tmp_path: Path) -> None:
    root = sources(tmp_path, {"sources.list.d/debian.sources": (
        "Types: deb\n# http://snapshot.example/archive\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")})
    r = mirror_of(root)
    assert r.returncode == 0 and r.stdout == "http://mirror.example/debian\n", r.stderr


def test_one_line_format_with_options_and_other_suites(tmp_path: Path) -> None:
    root = sources(tmp_path, {
        "sources.list": "# deb http://commented.example/debian bookworm main\n"
                        "deb-src http://src.example/debian bookworm main\n"
                        "deb [arch=amd64 signed-by=/k.gpg] http://other.example/apt cloud-sdk-bookworm main\n"
                        "deb [ arch=amd64 ] http://mirror.example/debian bookworm main contrib\n",
        "sources.list.d/later.list": "deb http://later.example/debian bookworm main\n"})
    r = mirror_of(root)
    assert r.returncode == 0 and r.stdout == "http://mirror.example/debian\n", r.stderr


def test_no_entry_for_the_suite_is_a_clear_error(tmp_path: Path) -> None:
    root = sources(tmp_path, {
        "sources.list.d/x.sources": "Types: deb\nURIs: http://m.example/debian\nSuites: trixie\n",
        "sources.list.d/y.list.disabled": "deb http://m.example/debian bookworm main\n"})
    r = mirror_of(root)
    assert r.returncode == 1 and r.stdout == ""
    assert "no 'deb' entry for suite bookworm" in r.stderr and "Traceback" not in r.stderr
    r = mirror_of(tmp_path / "empty")
    assert r.returncode == 1 and "sources.list" in r.stderr


def test_the_build_asks_apt_mirror_and_names_no_mirror_host() -> None:
    build = (SCRIPT.parent / "build.sh").read_text()
    assert "apt_mirror.py" in build
    assert "deb.debian.org" not in build and "debian.org" not in build
