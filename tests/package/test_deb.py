"""The Debian package built from the tree (debian/, scripts/deb.sh), installed on this machine
with apt as an operator would: Debian 12's own python3 packages satisfy it, it installs
/usr/bin/lazyiscsi, the unit (which systemd-analyze verifies where it is installed), the man pages
and the configuration, and the installed command serves a LUN that libiscsi and QEMU read."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import DEB_BUILD_TIMEOUT_S
from tests.integration.peers import Lines, MiB, free_port, make_image, wait_listening, wait_until

# whichever test comes first builds the package (tests/conftest.py) and installs it
INSTALL_TIMEOUT_S = 900
pytestmark = pytest.mark.timeout(DEB_BUILD_TIMEOUT_S + INSTALL_TIMEOUT_S)
UNIT = Path("/lib/systemd/system/lazyiscsi.service")
DEBIAN_DEPENDS = ("python3-crc32c", "python3-gevent", "python3-jeepney", "python3-rtslib-fb",
                  "python3-structlog")
INITIATOR = "iqn.2024-01.test:initiator"


def installed_env() -> dict[str, str]:
    """Nothing of this checkout or its venv on the path: what runs is what the package installed."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    return env


@pytest.fixture(scope="module")
def installed(debian_package: Path) -> Path:
    # --reinstall: a rebuilt tree keeps its version number, and apt would keep the older build
    r = subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q",
                        "--no-install-recommends", "--reinstall", str(debian_package)],
                       capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, stdin=subprocess.DEVNULL,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return debian_package


def test_depends_on_debian_python3_packages(installed: Path) -> None:
    depends = subprocess.run(["dpkg-deb", "-f", str(installed), "Depends"], capture_output=True, text=True,
                             check=True).stdout
    for name in DEBIAN_DEPENDS:
        assert name in depends, depends
    # and they are Debian's, where the package's code imports them from
    r = subprocess.run(["/usr/bin/python3", "-I", "-c",
                        "import crc32c, gevent, jeepney, lazyiscsi, rtslib_fb, structlog\n"
                        "for m in (crc32c, gevent, jeepney, lazyiscsi, rtslib_fb, structlog):\n"
                        "    print(m.__file__)"],
                       capture_output=True, text=True, cwd="/", env=installed_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    paths = r.stdout.split()
    assert len(paths) == 6 and all(p.startswith("/usr/lib/python3/dist-packages/") for p in paths), paths


def test_installs_command_unit_man_pages_and_configuration(installed: Path) -> None:
    listing = subprocess.run(["dpkg", "-L", "lazyiscsi"], capture_output=True, text=True, check=True).stdout
    for path in ("/usr/bin/lazyiscsi", str(UNIT), "/usr/share/man/man8/lazyiscsi.8.gz",
                 "/usr/share/man/man5/lazyiscsi.toml.5.gz", "/etc/lazyiscsi/lazyiscsi.toml",
                 "/usr/share/doc/lazyiscsi/examples/lazyiscsi.toml"):
        assert path in listing.splitlines() and Path(path).exists(), path
    # it holds CHAP secrets (lazyiscsi.toml(5)); a conffile, so an operator's edits survive upgrades
    assert Path("/etc/lazyiscsi/lazyiscsi.toml").stat().st_mode & 0o777 == 0o600
    conffiles = subprocess.run(["dpkg-query", "-W", "-f", "${Conffiles}", "lazyiscsi"], capture_output=True,
                               text=True, check=True).stdout
    assert "/etc/lazyiscsi/lazyiscsi.toml" in conffiles
    r = subprocess.run(["/usr/bin/lazyiscsi", "--version"], capture_output=True, text=True, cwd="/",
                       env=installed_env(), timeout=60)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_installed_unit_verifies(installed: Path) -> None:
    text = UNIT.read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert exec_start.split("=", 1)[1].split()[0] == "/usr/bin/lazyiscsi"
    assert "--config /etc/lazyiscsi/lazyiscsi.toml" in exec_start
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(UNIT)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def test_installed_command_serves_a_lun(installed: Path, tmp_path: Path) -> None:
    """Debian's gevent, structlog and crc32c under a real initiator (the build-time unit tests
    cover the rest of the code on them)."""
    image = make_image(tmp_path / "src.img", 8 * MiB)
    port = free_port()
    iqn = "iqn.2026-11.io.lazyiscsi:deb"
    proc = subprocess.Popen(
        ["/usr/bin/lazyiscsi", "--log-level", "warning", "--control", str(tmp_path / "control.sock"), "serve",
         "--frontend", "portal", "--state-dir", str(tmp_path / "state"),
         "--source", str(tmp_path / "src.img"), "--cache", str(tmp_path / "cache.img"),
         "--iqn", iqn, "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/", env=installed_env())
    assert proc.stdout is not None and proc.stderr is not None
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    try:
        # the summary comes once every volume is exported
        wait_until(lambda: any(x.startswith("  control:  ") for x in out.since(0)), "serve's summary",
                   proc=proc)
        wait_listening(port, proc)  # type: ignore[arg-type]
        url = f"iscsi://127.0.0.1:{port}/{iqn}/0"
        inq = subprocess.run(["iscsi-inq", "-i", INITIATOR, url], capture_output=True, text=True, timeout=60)
        assert "DIRECT_ACCESS" in inq.stdout, inq.stdout + inq.stderr
        read = tmp_path / "read.img"
        subprocess.run(["qemu-img", "convert", "-O", "raw", url, str(read)], check=True, timeout=120)
        assert read.read_bytes() == image
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert proc.returncode == 0, err.text()
