"""The Debian package built from the tree (debian/, scripts/deb.sh), installed on this machine
with apt as an operator would: Debian 12's own python3 packages satisfy it, it installs
/usr/bin/lazyiscsi, the unit (which systemd-analyze verifies where it is installed), the man pages
and the configuration, and the installed command serves a LUN that libiscsi and QEMU read. The
targetcli plugin lands beside targetcli's modules and works on Debian's configshell-fb; the D-Bus
policies of targetcli-plugin/dbus/ land where the system bus reads them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.background import DEB_BUILD_TIMEOUT_S
from tests.integration.peers import Lines, MiB, free_port, make_image, wait_listening, wait_until
from tests.kernel.tier import GUEST_BUILD_TIMEOUT_S

# whichever test comes first waits for the package (built in the background from collection, after
# the kernel tier's guest build when the tier runs too: tests/background.py) and installs it
INSTALL_TIMEOUT_S = 900
pytestmark = pytest.mark.timeout(GUEST_BUILD_TIMEOUT_S + DEB_BUILD_TIMEOUT_S + INSTALL_TIMEOUT_S)
UNIT = Path("/lib/systemd/system/lazyiscsi.service")
DEBIAN_DEPENDS = ("python3-configshell-fb", "python3-crc32c", "python3-gevent", "python3-jeepney",
                  "python3-rtslib-fb", "python3-structlog")
ROOT = Path(__file__).resolve().parents[2]
PLUGIN = Path("/usr/lib/python3/dist-packages/lazyiscsi_targetcli")
DBUS_POLICY_DIR = Path("/usr/share/dbus-1/system.d")
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


def test_installs_the_targetcli_plugin_beside_targetcli(installed: Path) -> None:
    """Importable by Debian's python3 from dist-packages, where targetcli-fb's own modules are,
    and built on the configshell copy targetcli-fb uses."""
    listing = subprocess.run(["dpkg", "-L", "lazyiscsi"], capture_output=True, text=True, check=True).stdout
    for module in ("__init__", "client", "framework", "nodes", "shell"):
        assert f"{PLUGIN}/{module}.py" in listing.splitlines(), module
    r = subprocess.run(["/usr/bin/python3", "-I", "-c",
                        "import lazyiscsi_targetcli.shell as s, lazyiscsi_targetcli.framework as f\n"
                        "print(s.__file__); print(f.configshell.__name__)"],
                       capture_output=True, text=True, cwd="/", env=installed_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    path, configshell = r.stdout.split()
    assert path == f"{PLUGIN}/shell.py"
    # targetcli-fb (setup.sh installs it) imports configshell_fb; without it, configshell
    targetcli = Path("/usr/lib/python3/dist-packages/targetcli/ui_root.py").exists()
    assert configshell == ("configshell_fb" if targetcli else "configshell")


def test_installs_the_dbus_policies_of_the_tree(installed: Path) -> None:
    """Every targetcli-plugin/dbus/*.conf, as it is in the tree, and nothing else of ours there."""
    policies = sorted((ROOT / "targetcli-plugin" / "dbus").glob("*.conf"))
    listing = subprocess.run(["dpkg", "-L", "lazyiscsi"], capture_output=True, text=True, check=True).stdout
    ours = sorted(line for line in listing.splitlines() if line.startswith(f"{DBUS_POLICY_DIR}/"))
    assert ours == [f"{DBUS_POLICY_DIR}/{p.name}" for p in policies]
    for policy in policies:
        assert (DBUS_POLICY_DIR / policy.name).read_bytes() == policy.read_bytes()
        assert (DBUS_POLICY_DIR / policy.name).stat().st_mode & 0o777 == 0o644


def test_installed_shell_manages_the_installed_daemon(installed: Path, tmp_path: Path) -> None:
    """`lazyiscsi shell` one-shot, as targetcli is used, on Debian's configshell-fb: create,
    ls, pause; checked with `lazyiscsi status --json`."""
    make_image(tmp_path / "src.img", 4 * MiB)
    env = {**installed_env(), "LAZYISCSI_CONTROL": str(tmp_path / "control.sock"), "HOME": str(tmp_path)}

    def lazyiscsi(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["/usr/bin/lazyiscsi", *args], capture_output=True, text=True, cwd="/", env=env,
                              timeout=120, stdin=subprocess.DEVNULL)

    proc = subprocess.Popen(["/usr/bin/lazyiscsi", "--log-level", "warning", "serve", "--frontend", "portal",
                             "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd="/", env=env)
    assert proc.stderr is not None
    err = Lines(proc.stderr)
    try:
        wait_until(lambda: lazyiscsi("status").returncode == 0, "the installed serve answers", proc=proc)
        r = lazyiscsi("shell", "/lazy", "create", "vm1", str(tmp_path / "src.img"), "rate=64K")
        assert r.returncode == 0 and "Created volume vm1" in r.stdout, r.stdout + r.stderr
        r = lazyiscsi("shell", "/lazy/vm1", "pause")
        assert r.returncode == 0, r.stderr
        r = lazyiscsi("shell", "/lazy", "ls")
        assert r.returncode == 0 and "o- vm1 " in r.stdout and "[paused " in r.stdout, r.stdout + r.stderr
        status = json.loads(lazyiscsi("status", "vm1", "--json").stdout)[0]
        assert status["state"] == "paused" and status["rate_limit_bps"] == 64 * 1024
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert proc.returncode == 0, err.text()
