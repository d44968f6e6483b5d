"""The kernel side of one TCMU device: its ``/dev/uioN`` (found by name in sysfs), the ring mapped
from it, the doorbell, and the configfs actions that make a restart safe.

The uio name is ``tcm-user/<hba>/<device>/<subtype>/<config>`` (the handler's config may itself
hold ``/``). The map must be mmap'd at exactly ``maps/map0/size``; the device can be open in one
process only (EBUSY otherwise), so a second daemon cannot steal a ring from a live one.

Restart recovery, the way libtcmu does it, once the device is ours (opened): block it (new
commands are answered BUSY instead of entering the ring), reset the ring (every command the
previous process left unanswered is failed with BUSY, which initiators retry; head and tail go
back to 0), map it, and unblock. A command that a killed daemon had executed but not answered
therefore runs again: every SCSI command we serve is idempotent when repeated whole, so nothing
acknowledged is lost and nothing unacknowledged is half-done in a way a retry would not repair.
A *fresh* device (just announced by ADDED_DEVICE, or not yet ``configured``) is mapped without
block and reset, as libtcmu's ``device_add`` does for a new one: nothing can have been queued, and
the kernel refuses ``block_dev`` ("Device is not configured") until LIO has finished setting it up.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gevent
import gevent.hub

from lazyiscsi.tcmu.ring import Ring, RingError

SYS_UIO = Path("/sys/class/uio")
CONFIGFS_CORE = Path("/sys/kernel/config/target/core")
PREFIX = "tcm-user"
SUBTYPE = "lazy"
RESET_RING_BUSY = 1  # fail what is outstanding with BUSY (2 would be CHECK CONDITION)
_DOORBELL = struct.pack("=I", 0)


class UioError(Exception):
    """A device that cannot be found, opened or mapped; names the device and the reason."""


@dataclass(frozen=True)
class UioName:
    """The parsed name of a tcm-user uio device."""

    hba: int
    device: str  # the storage object's name in configfs
    subtype: str
    config: str  # what follows ``<subtype>/``

    @classmethod
    def parse(cls, text: str) -> UioName | None:
        parts = text.strip().split("/", 4)
        if len(parts) != 5 or parts[0] != PREFIX or not parts[1].isdigit():
            return None
        return cls(int(parts[1]), parts[2], parts[3], parts[4])

    @property
    def configfs(self) -> Path:
        return CONFIGFS_CORE / f"user_{self.hba}" / self.device


def find(subtype: str = SUBTYPE, root: Path = SYS_UIO) -> dict[str, tuple[int, UioName]]:
    """Every tcm-user device of ``subtype`` now present: config -> (uio minor, name)."""
    found: dict[str, tuple[int, UioName]] = {}
    if not root.is_dir():
        return found
    for entry in root.iterdir():
        if not entry.name.startswith("uio") or not entry.name[3:].isdigit():
            continue
        try:
            name = UioName.parse((entry / "name").read_text())
        except OSError:  # removed while we looked
            continue
        if name is not None and name.subtype == subtype:
            found[name.config] = (int(entry.name[3:]), name)
    return found


def configured(name: UioName) -> bool:
    """Whether LIO has finished configuring the device (its ``enable`` reads 1). The kernel
    announces ADDED_DEVICE before that, and refuses ``block_dev`` until then."""
    try:
        return (name.configfs / "enable").read_text().strip() == "1"
    except OSError:
        return False


def read_attribute(name: UioName, *path: str) -> str | None:
    """A configfs file of the device, stripped; None when it cannot be read."""
    try:
        return name.configfs.joinpath(*path).read_text().strip()
    except OSError:
        return None


def unit_serial(name: UioName) -> str | None:
    """The serial LIO keeps for the device (``T10 VPD Unit Serial Number: <serial>``), or None."""
    text = read_attribute(name, "wwn", "vpd_unit_serial")
    return text.partition(":")[2].strip() or None if text else None


def _action(name: UioName, action: str, value: int) -> None:
    path = name.configfs / "action" / action
    try:
        path.write_text(f"{value}\n")
    except OSError as e:
        raise UioError(f"device {name.device}: {path}: {e.strerror}") from None


class UioDevice:
    """One opened and mapped device. ``wait`` blocks the calling greenlet until the kernel rings;
    ``notify`` rings back after responses were written."""

    def __init__(self, minor: int, name: UioName, *, fresh: bool = False) -> None:
        self.minor, self.name = minor, name
        sysdir = SYS_UIO / f"uio{minor}"
        try:
            size = int((sysdir / "maps" / "map0" / "size").read_text().strip(), 0)
        except (OSError, ValueError) as e:
            raise UioError(f"device {name.device}: map0 size of uio{minor}: {e}") from None
        # open first: a device another process holds (EBUSY) must not have its ring reset
        try:
            self.fd = os.open(f"/dev/uio{minor}", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            why = "held by another process" if e.errno == errno.EBUSY else e.strerror
            raise UioError(f"device {name.device}: /dev/uio{minor}: {why}") from None
        try:
            if fresh:  # nothing was ever queued: no one to fail, and block_dev is refused yet
                self._map(size)
            else:
                _action(name, "block_dev", 1)
                try:
                    _action(name, "reset_ring", RESET_RING_BUSY)
                    self._map(size)
                finally:
                    _action(name, "block_dev", 0)
        except OSError as e:
            os.close(self.fd)
            raise UioError(f"device {name.device}: mmap of {size} bytes: {e.strerror}") from None
        except BaseException:
            os.close(self.fd)
            raise
        self._watcher = gevent.get_hub().loop.io(self.fd, 1)

    def _map(self, size: int) -> None:
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            self.ring = Ring(memoryview(self.map))
        except RingError:
            self.map.close()
            raise

    def wait(self) -> bool:
        """Until the kernel has queued something (True) or the device is gone (False)."""
        gevent.get_hub().wait(self._watcher)
        try:
            os.read(self.fd, 4)  # clears the event count; the ring itself says what is new
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno in (errno.EIO, errno.ENODEV, errno.ENXIO):
                return False
            raise
        return True

    def notify(self) -> None:
        os.write(self.fd, _DOORBELL)

    def block(self, blocked: bool) -> None:
        _action(self.name, "block_dev", int(blocked))

    def close(self) -> None:
        self._watcher.close()
        os.close(self.fd)
        # a finished command's view may still be alive: then the map goes with it, later
        with contextlib.suppress(BufferError):
            self.ring.buf.release()
            self.map.close()
