"""What the daemon needs from a frontend, and the embedded portal's side of it.

Two frontends export the same LUNs (the SCSI layer over the store): the embedded userspace iSCSI
portal, and the kernel's LIO target through TCMU (``lazyiscsi.lio``). The daemon calls ``start``
(ready to export, nothing offered to initiators yet), ``export`` for each volume it opens at
startup, then ``listen``; later ``export`` when a volume is created, ``unexport`` when one is
deleted, and ``stop`` when the daemon stops; what survives a stop differs (the portal's sessions
end; LIO's stay logged in, see there).

Why ``listen`` comes after the startup exports: an initiator that logs in the moment the port
accepts (a hypervisor reconnecting while the daemon restarts) must find its target. Told "Target
not found" (RFC 7143 11.13.5, status 0x0203) it gives up for good; a refused connection it retries.
"""

from __future__ import annotations

from typing import Protocol

from lazyiscsi.config import VolumeConfig
from lazyiscsi.iscsi.connection import Target
from lazyiscsi.iscsi.portal import Portal
from lazyiscsi.scsi.lun import Lun


class FrontendError(Exception):
    """A volume the frontend cannot export; the message names the volume and the reason."""


class Frontend(Protocol):
    name: str
    #: host:port initiators log in to
    address: tuple[str, int]

    def start(self) -> None: ...

    def listen(self) -> None: ...

    def stop(self) -> None: ...

    def export(self, volume: VolumeConfig, lun: Lun) -> None: ...

    def unexport(self, volume: VolumeConfig) -> None: ...


class PortalFrontend:
    """Volumes as LUNs of targets on the embedded portal; a target lives while it has LUNs."""

    name = "portal"

    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    @property
    def address(self) -> tuple[str, int]:
        return self.portal.address

    def start(self) -> None:
        """Nothing to prepare: targets are added to the portal before it listens."""

    def listen(self) -> None:
        self.portal.start()

    def stop(self) -> None:
        self.portal.stop()

    def export(self, volume: VolumeConfig, lun: Lun) -> None:
        if volume.backstore_only:
            raise FrontendError(f"volume {volume.name}: backstore_only needs the LIO frontend (targetcli "
                                "creates the backstore there); this daemon serves the embedded portal")
        target = self.portal.target(volume.target)
        if target is None:
            target = Target(volume.target, {}, frozenset(volume.allowed_initiators), volume.chap)
            self.portal.add_target(target)
        target.luns[volume.lun] = lun
        for other in target.luns.values():
            other.target_luns = sorted(target.luns)

    def unexport(self, volume: VolumeConfig) -> None:
        if volume.backstore_only:
            return
        target = self.portal.target(volume.target)
        if target is not None:
            target.luns.pop(volume.lun, None)
            if not target.luns:
                self.portal.remove_target(target.iqn)
