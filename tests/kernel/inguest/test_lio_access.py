"""Who may log in through LIO, and what the kernel may change under a running volume: ACLs and
CHAP written by rtslib from the TOML file, the write cache switched in configfs (RECONFIG_DEVICE),
and a backstore deleted behind the daemon's back (REMOVED_DEVICE)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.inguest.conftest import (
    NBD_PORT,
    PORTAL,
    WORK,
    Daemon,
    disk_of,
    login,
    logout,
    read_direct,
    remove_lio_objects,
    run,
    serve_argv,
    source_bytes,
    wait_for,
)

IQN = "iqn.2026-11.io.lazyiscsi:kta"
USER, SECRET = "kt-user", "kt-secret-0123456789"
SOURCE = source_bytes()


def initiator_name() -> str:
    for line in Path("/etc/iscsi/initiatorname.iscsi").read_text().splitlines():
        if line.startswith("InitiatorName="):
            return line.split("=", 1)[1].strip()
    raise AssertionError("open-iscsi has no initiator name")


@pytest.fixture(scope="module")
def daemon(source: Path) -> Iterator[Daemon]:
    config = WORK / "kta.toml"
    config.write_text(f"""
[portal]
listen = "{PORTAL}"

[[volume]]
name = "kta"
source = "nbd://127.0.0.1:{NBD_PORT}"
cache = "{WORK / 'kta.cache'}"
target = "{IQN}"
allowed_initiators = ["{initiator_name()}"]
chap = {{ user = "{USER}", secret = "{SECRET}" }}
""")
    d = Daemon(serve_argv("kta", "--config", str(config)), WORK / "kta.log")
    d.start()
    yield d
    logout(IQN)
    if d.proc is not None and d.proc.poll() is None:
        d.stop()
    remove_lio_objects(IQN, "kta")  # a configured volume's stay for its restart: not after this file
    print((WORK / "kta.log").read_text()[-6000:])


def set_auth(secret: str) -> None:
    for name, value in (("node.session.auth.authmethod", "CHAP"), ("node.session.auth.username", USER),
                        ("node.session.auth.password", secret)):
        run("iscsiadm", "-m", "node", "-T", IQN, "-p", PORTAL, "-o", "update", "-n", name, "-v", value)


def test_chap_is_required_and_checked(daemon: Daemon) -> None:
    run("iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", PORTAL)
    assert run("iscsiadm", "-m", "node", "-T", IQN, "-p", PORTAL, "--login", check=False).returncode != 0
    set_auth("not-the-secret-at-all")
    assert run("iscsiadm", "-m", "node", "-T", IQN, "-p", PORTAL, "--login", check=False).returncode != 0
    assert disk_of(IQN) is None
    set_auth(SECRET)
    disk = login(IQN, discover=False)
    assert read_direct(disk, 1 << 20, 1 << 20) == SOURCE[1 << 20:2 << 20]
    assert SECRET not in (WORK / "kta.log").read_text()


def cache_type(disk: str) -> str:
    name = Path(disk).name
    run("sh", "-c", f"echo 1 > /sys/block/{name}/device/rescan")
    (entry,) = Path(f"/sys/block/{name}/device/scsi_disk").iterdir()
    return (entry / "cache_type").read_text().strip()


def test_write_cache_follows_configfs(daemon: Daemon) -> None:
    disk = disk_of(IQN) or login(IQN, discover=False)
    assert cache_type(disk) == "write back"
    (attrib,) = Path("/sys/kernel/config/target/core").glob("user_*/kta/attrib/emulate_write_cache")
    attrib.write_text("0\n")
    wait_for("the initiator to see write-through", lambda: cache_type(disk) == "write through", 30, 0.5)
    attrib.write_text("1\n")
    wait_for("the initiator to see write-back", lambda: cache_type(disk) == "write back", 30, 0.5)


def test_backstore_deleted_behind_the_daemon(daemon: Daemon) -> None:
    logout(IQN)
    run("python3", "-c", "import rtslib_fb; rtslib_fb.UserBackedStorageObject('kta').delete()")
    wait_for("the daemon to let the device go",
             lambda: '"tcmu_detached"' in (WORK / "kta.log").read_text().split('"tcmu_event"')[-1], 30)
    assert not [p for p in Path("/sys/class/uio").glob("uio*/name") if "/kta/" in p.read_text()]
    assert daemon.status("kta")["volume"] == "kta"  # the daemon and the volume are still there


RECREATE = f"""
import rtslib_fb as r
so = r.UserBackedStorageObject("kta", config="lazy/kta", size={len(SOURCE)}, control="nl_reply_supported=-1")
tpg = r.TPG(r.Target(r.FabricModule("iscsi"), "{IQN}", mode="lookup"), 1, mode="lookup")
lun = r.LUN(tpg, 0, so)
for acl in tpg.node_acls:
    r.MappedLUN(acl, 0, lun)
"""


def test_backstore_made_by_the_operator_is_served_at_once(daemon: Daemon) -> None:
    """As targetcli or targetctl restore would: the kernel announces the device (ADDED_DEVICE) and
    the daemon attaches to it because its config names a volume it has."""
    run("python3", "-c", RECREATE)
    wait_for("the daemon to attach", lambda: (WORK / "kta.log").read_text().count('"tcmu_attached"') >= 2, 30)
    disk = login(IQN, discover=False)
    assert read_direct(disk, 3 << 20, 1 << 20) == SOURCE[3 << 20:4 << 20]
    logout(IQN)
    assert daemon.stop(signal.SIGTERM) == 0
