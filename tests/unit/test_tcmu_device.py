"""A TCMU device over a real LazyDisk whose source sits on a simulated slow link, driven through
ring images by the kernel side of test_tcmu_ring: commands run through the shared SCSI layer,
data moves through the mapped iovecs, a slow fetch does not hold up a local read, and bad
entries or bad CDBs end in CHECK CONDITION in the ring."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import gevent

from lazyiscsi.scsi.lun import Lun
from lazyiscsi.store.lazydisk import LazyDisk
from lazyiscsi.tcmu.device import Device
from lazyiscsi.tcmu.ring import Ring
from tests.unit.store_fakes import LinkSource
from tests.unit.test_tcmu_ring import KernelSide

SIZE = 4 << 20


def rw10(op: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", op, 0, lba, 0, blocks, 0)


def make_device(tmp_path: Path) -> tuple[KernelSide, Device, bytes, list[int]]:
    """(Not ``setup``: pytest 7, Debian 12's, calls a module-level ``setup()`` as a nose fixture.)"""
    data = random.Random(8).randbytes(SIZE)
    disk = LazyDisk.open(str(tmp_path / "cache"), LinkSource(data, delay=0.3, rate=1e9), unit=4096,
                         autocommit_s=None)
    kernel = KernelSide(cmdr_size=8192, data_size=1 << 16, ooo=True)
    notified: list[int] = []
    device = Device(Ring(kernel.buf), Lun(disk, "vm1"), lambda: notified.append(1), name="vm1")
    return kernel, device, data, notified


def test_write_then_read_back_through_the_ring(tmp_path: Path) -> None:
    kernel, device, _data, notified = make_device(tmp_path)
    w = kernel.submit(rw10(0x2A, 16, 1), b"\x42" * 512)
    assert device.process() == 1 and device.wait(5)
    kernel.reap()
    assert kernel.done[w][0] == 0 and notified
    r = kernel.submit(rw10(0x28, 16, 1))
    device.process()
    device.wait(5)
    kernel.reap()
    status, _sense, read_len = kernel.done[r]
    assert status == 0 and read_len == 512 and kernel.data(r) == b"\x42" * 512


def test_a_slow_fetch_does_not_hold_up_a_local_read(tmp_path: Path) -> None:
    kernel, device, data, _ = make_device(tmp_path)
    kernel.submit(rw10(0x2A, 0, 1), b"\x11" * 512)
    device.process()
    device.wait(5)
    kernel.reap()
    cold = kernel.submit(rw10(0x28, 4096, 1))  # at 2 MiB: fetched over a 300 ms link
    warm = kernel.submit(rw10(0x28, 0, 1))  # written above: local
    device.process()
    gevent.sleep(0.1)
    assert kernel.reap() == [warm]  # answered while the cold read still waits for the source
    device.wait(5)
    assert kernel.reap() == [cold]
    assert kernel.done[cold][0] == 0 and kernel.done[warm][0] == 0
    assert kernel.data(cold) == data[2 << 20:(2 << 20) + 512] and kernel.data(warm) == b"\x11" * 512


def test_bad_cdbs_and_malformed_entries_end_in_check_condition(tmp_path: Path) -> None:
    kernel, device, _data, _ = make_device(tmp_path)
    oob = kernel.submit(rw10(0x28, SIZE // 512, 1))
    unknown = kernel.submit(bytes([0xC7]) + bytes(15))
    broken = kernel.submit(rw10(0x28, 0, 1), raw={"iov_base": 64})
    fine = kernel.submit(bytes(6))  # TEST UNIT READY
    device.process()
    device.wait(5)
    kernel.reap()

    def asc(cmd_id: int) -> tuple[int, int, int]:
        status, sense, _ = kernel.done[cmd_id]
        return status, sense[12], sense[2] & 0x0F
    assert asc(oob) == (0x02, 0x21, 0x05)  # LBA out of range
    assert asc(unknown) == (0x02, 0x20, 0x05)  # invalid opcode
    assert asc(broken) == (0x02, 0x24, 0x05)  # the entry itself was bad
    assert kernel.done[fine][0] == 0 and not kernel.outstanding


def test_a_read_lands_straight_in_the_mapped_data_area(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """No intermediate buffer: the store fills the command's iovec (its copying read is off)."""
    kernel, device, data, _ = make_device(tmp_path)

    def copying_read(offset: int, length: int) -> bytes:
        raise AssertionError("read into a new buffer instead of the mapped iovec")

    monkeypatch.setattr(device.lun.backend, "read", copying_read)
    r = kernel.submit(rw10(0x28, 8, 16), iov_len=16 * 512)
    device.process()
    device.wait(5)
    kernel.reap()
    status, _sense, read_len = kernel.done[r]
    assert status == 0 and read_len == 16 * 512 and kernel.data(r) == data[8 * 512:24 * 512]
