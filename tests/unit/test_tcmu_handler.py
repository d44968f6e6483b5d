"""The handler's decisions about devices targetcli makes (issue 12): what CheckConfig answers, a
new device's size and block size checked against the volume before it is served, a fresh device
attached without block/reset (the kernel refuses block_dev until LIO has configured it), and the
SET_FEATURES message that turns the kernel's netlink replies off when tcmu-runner appears. The
configfs tree is a directory laid out as the kernel's; attaching (the uio mmap) is recorded."""

from __future__ import annotations

import errno
import struct
import types
from pathlib import Path

import pytest
import structlog

from lazyiscsi.scsi.lun import Lun
from lazyiscsi.tcmu import handler as handlermod
from lazyiscsi.tcmu import uio
from lazyiscsi.tcmu.handler import Handler
from lazyiscsi.tcmu.netlink import DeviceEvent, TcmuAttr, TcmuCmd, set_features

SIZE = 64 << 20


@pytest.fixture
def handler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Handler:
    monkeypatch.setattr(uio, "CONFIGFS_CORE", tmp_path)
    monkeypatch.setattr(uio, "find", lambda: {})
    h = Handler()
    h.luns["vm1"] = Lun(types.SimpleNamespace(size=SIZE), "vm1")  # type: ignore[arg-type]
    h.attached = []  # type: ignore[attr-defined]
    monkeypatch.setattr(h, "_attach", lambda volume, minor, name, fresh=False:
                        h.attached.append((volume, minor, fresh)))  # type: ignore[attr-defined]
    return h


def device(root: Path, name: str, size: int, block: int = 512, serial: str = "") -> DeviceEvent:
    d = root / "user_1" / name
    (d / "attrib").mkdir(parents=True)
    (d / "wwn").mkdir()
    (d / "attrib" / "dev_size").write_text(f"{size}\n")
    (d / "attrib" / "hw_block_size").write_text(f"{block}\n")
    (d / "attrib" / "nl_reply_supported").write_text("0\n")
    (d / "wwn" / "vpd_unit_serial").write_text(f"T10 VPD Unit Serial Number: {serial}\n")
    (d / "enable").write_text("0\n")
    return DeviceEvent(TcmuCmd.ADDED_DEVICE, f"tcm-user/1/{name}/lazy/vm1", 4, device_id=1)


def test_check_config_accepts_a_held_volume_and_says_why_not_otherwise(
        handler: Handler, monkeypatch: pytest.MonkeyPatch) -> None:
    assert handler.check_config("lazy/vm1") is None
    for bad in ("lazy/", "lazy", "rbd/vm1", "lazy/vm 1", "lazy/-x", "lazy/a:b"):
        assert "expected lazy/<volume>" in (handler.check_config(bad) or ""), bad
    assert handler.check_config("lazy/vm2") == ("lazyiscsi serves no volume 'vm2': create it first "
                                                "(lazyiscsi volume create vm2 --source URL --backstore-only)")
    name = uio.UioName(1, "so1", "lazy", "vm1")
    monkeypatch.setattr(uio, "find", lambda: {"vm1": (4, name)})
    assert handler.check_config("lazy/vm1") == "volume 'vm1' already has an LIO device, so1"
    handler.served["vm1"] = types.SimpleNamespace(dev=types.SimpleNamespace(name=name))  # type: ignore[assignment]
    assert handler.check_config("lazy/vm1") == "volume 'vm1' is already served by LIO device so1"


def test_added_device_of_the_volume_size_is_attached_fresh(handler: Handler, tmp_path: Path) -> None:
    handler._on_event(device(tmp_path, "so1", SIZE))
    assert handler.attached == [("vm1", 4, True)]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("size", "block", "attribute"), [(SIZE + 512, 512, "dev_size"),
                                                          (SIZE, 4096, "hw_block_size")])
def test_added_device_of_another_size_is_refused_with_one_event(handler: Handler, tmp_path: Path, size: int,
                                                                block: int, attribute: str) -> None:
    with structlog.testing.capture_logs() as logs:
        handler._on_event(device(tmp_path, "so1", size, block))
    assert handler.attached == []  # type: ignore[attr-defined]
    (refused,) = [e for e in logs if e["event"] == "tcmu_device_refused"]
    assert refused["attribute"] == attribute and refused["volume_value"] == {"dev_size": SIZE,
                                                                            "hw_block_size": 512}[attribute]
    assert handler._check_device("vm1", uio.UioName(1, "so1", "lazy", "vm1")) == -errno.EINVAL


def test_inquiry_serial_follows_configfs_vpd_unit_serial(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uio, "CONFIGFS_CORE", tmp_path)
    device(tmp_path, "so1", SIZE, serial="5f2c0e7a-1b2c-4d5e-8f90-0123456789ab")
    lun = Lun(types.SimpleNamespace(size=SIZE), "vm1")  # type: ignore[arg-type]
    own = lun.serial
    lun.unit_serial = lambda: uio.unit_serial(uio.UioName(1, "so1", "lazy", "vm1"))
    assert lun.serial == "5f2c0e7a-1b2c-4d5e-8f90-0123456789ab"
    assert lun.naa.hex() == "60014055f2c0e7a1b2c4d5e8f9001234"  # as LIO forms naa.6001405<serial>
    (tmp_path / "user_1" / "so1" / "wwn" / "vpd_unit_serial").write_text("T10 VPD Unit Serial Number: \n")
    assert lun.serial == own  # none set: ours


def test_set_features_turns_kernel_replies_off() -> None:
    data = set_features(0x1A, 3, kernel_replies=False)
    length, kind, flags, seq, _pid = struct.unpack_from("<IHHII", data)
    assert (length, kind, flags, seq) == (len(data), 0x1A, 0x5, 3)
    assert struct.unpack_from("<BB", data, 16) == (TcmuCmd.SET_FEATURES, 2)
    assert data[20:25] == struct.pack("<HHB", 5, TcmuAttr.SUPP_KERN_CMD_REPLY, 0)
    assert handlermod.Handler().kernel_replies(False) is None  # not started: nothing to tell
