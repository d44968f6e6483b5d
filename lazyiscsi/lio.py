"""The LIO frontend: the kernel's iSCSI target in front of our TCMU handler.

For each volume, rtslib-fb writes to configfs a ``user`` backstore with config ``lazy/<volume>``
(control ``nl_reply_supported=-1``, so tcmu-runner's answers never race ours; ``hw_max_sectors``
and ``hw_block_size`` as the LUN reports them, or the kernel would refuse what our Block Limits
page allows), an iSCSI target with TPG 1, the LUN, the network portal, and either one ACL per
allowed initiator (with CHAP when configured: LIO keeps CHAP per ACL) or demo mode (any initiator
may log in) when none is listed. Everything that already exists as wanted is reused, so a
restarted daemon takes over its own configuration under logged-in initiators.

A daemon that stops leaves the kernel's configuration in place and its devices blocked: sessions
stay logged in and their commands are answered BUSY, which initiators retry, until the next
daemon attaches. Only ``volume delete`` removes a volume's LUN, backstore and (when it was the
last LUN) target. Nothing here logs or repeats a CHAP secret.

A new target's TPG is enabled only once our handler serves its backstore: until then LIO answers
a login to it "Service Unavailable" (RFC 7143 11.13.5, status 0x0301), which initiators retry,
never "Target not found".

A ``backstore_only`` volume gets none of that: the operator creates ``user:lazy`` with
cfgstring NAME, its target, LUN and ACLs in targetcli, which finds our handler over D-Bus
(``lazyiscsi.dbus.tcmuservice``); we serve the device once it appears. ``volume delete`` then
refuses while that device exists: deleting it is the operator's, in targetcli.

Works with Debian 12's rtslib-fb 2.1.75 and PyPI's 2.2.x (2.2.4 renamed ``RTSLibNotInCFS`` to
``RTSLibNotInCFSError``; every other name used here is unchanged).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import structlog

from lazyiscsi.config import VolumeConfig
from lazyiscsi.dbus.tcmuservice import SYSTEM_BUS, TcmuService
from lazyiscsi.frontend import FrontendError
from lazyiscsi.scsi.lun import Lun
from lazyiscsi.tcmu import uio
from lazyiscsi.tcmu.handler import Handler
from lazyiscsi.tcmu.netlink import tcmu_available

log = structlog.get_logger("lazyiscsi.lio")

TPG_TAG = 1
#: what targetcli's ``help create`` prints under CFGSTRING FORMAT for user:lazy
CONFIG_DESC = ("cfgstring=NAME, the name of a volume the lazyiscsi daemon holds and no device serves "
               "yet: lazyiscsi volume create NAME --source URL --backstore-only. size= must be the "
               "volume's size (lazyiscsi status NAME --json: size).")
MODULES = ("target_core_user", "iscsi_target_mod")


def not_in_cfs(rts: Any) -> type[Exception]:
    """rtslib-fb's "no such object in configfs" exception, under its 2.2.4 name or the older one."""
    return getattr(rts, "RTSLibNotInCFSError", None) or rts.RTSLibNotInCFS  # type: ignore[no-any-return]


def load_modules() -> None:
    """Ask for LIO's modules; harmless where they are loaded or absent (the caller checks)."""
    if shutil.which("modprobe"):
        subprocess.run(["modprobe", "-q", "-a", *MODULES], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def lio_available() -> tuple[bool, str]:
    """Whether this host can serve through LIO, and why (not)."""
    load_modules()
    ok, why = tcmu_available()
    if not ok:
        return ok, why
    try:
        import rtslib_fb  # noqa: F401
    except ImportError:
        return False, "rtslib-fb is not installed (python3-rtslib-fb)"
    return True, "the kernel offers target_core_user"


class LioFrontend:
    name = "lio"

    def __init__(self, listen: tuple[str, int]) -> None:
        import rtslib_fb

        self.rts = rtslib_fb
        self.not_in_cfs = not_in_cfs(rtslib_fb)
        self.address = listen
        self.handler = Handler()
        self.dbus = TcmuService(uio.SUBTYPE, CONFIG_DESC, self.handler.check_config,
                                address=os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS,
                                on_runner=lambda: self.handler.kernel_replies(False))
        self._fabric: rtslib_fb.FabricModule | None = None

    def start(self) -> None:
        try:
            self._fabric = self.rts.FabricModule("iscsi")
            self.handler.start()
        except (self.rts.RTSLibError, OSError) as e:
            raise FrontendError(f"LIO: {e}") from None
        self.dbus.start()
        log.info("lio_started", listen=f"{self.address[0]}:{self.address[1]}")

    def listen(self) -> None:
        """Nothing to do: each target's TPG is enabled by ``export``, once its LUN is served."""

    def stop(self) -> None:
        self.dbus.stop()
        self.handler.stop()

    # -- volumes ----------------------------------------------------------------------------------

    def export(self, volume: VolumeConfig, lun: Lun) -> None:
        if volume.backstore_only:
            self.handler.serve(volume.name, lun)
            log.info("lio_backstore_awaited", volume=volume.name, size=lun.n_blocks * lun.block_size,
                     targetcli=f"/backstores/user:{uio.SUBTYPE} create name={volume.name} "
                               f"size={lun.n_blocks * lun.block_size} cfgstring={volume.name}")
            return
        if volume.chap is not None and not volume.allowed_initiators:
            raise FrontendError(f"volume {volume.name}: with LIO, CHAP needs allowed_initiators "
                                "(LIO keeps CHAP secrets per initiator ACL)")
        try:
            so = self._storage_object(volume, lun)
            tpg = self.rts.TPG(self.rts.Target(self._fabric, volume.target, mode="any"), TPG_TAG, mode="any")
            lio_lun = self._lun(tpg, volume.lun, so)
            self._portal(tpg)
            self._access(tpg, volume, lio_lun)
        except (self.rts.RTSLibError, OSError) as e:
            raise FrontendError(f"volume {volume.name}: LIO: {_without_secrets(str(e), volume)}") from None
        self.handler.serve(volume.name, lun)
        try:
            tpg.enable = True  # only now: a login before this is told to retry, not refused
        except (self.rts.RTSLibError, OSError) as e:
            self.handler.withdraw(volume.name)
            raise FrontendError(f"volume {volume.name}: LIO: enabling {volume.target}: {e}") from None
        log.info("lio_exported", volume=volume.name, target=volume.target, lun=volume.lun,
                 backstore=f"user/{volume.name}")

    def unexport(self, volume: VolumeConfig) -> None:
        if volume.backstore_only:
            present = uio.find().get(volume.name)
            if present is not None:
                raise FrontendError(f"volume {volume.name}: LIO device {present[1].device} still exists: "
                                    "delete it in targetcli first (it would stall its initiators)")
            self.handler.withdraw(volume.name)
            return
        self.handler.withdraw(volume.name)
        try:
            target = self.rts.Target(self._fabric, volume.target, mode="lookup")
            tpg = self.rts.TPG(target, TPG_TAG, mode="lookup")
            for lio_lun in tpg.luns:
                if lio_lun.lun == volume.lun:
                    lio_lun.delete()
            if not list(tpg.luns):
                target.delete()
        except self.not_in_cfs:
            pass
        except (self.rts.RTSLibError, OSError) as e:
            raise FrontendError(f"volume {volume.name}: LIO: {e}") from None
        try:
            self.rts.UserBackedStorageObject(volume.name).delete()
        except self.not_in_cfs:
            pass
        except (self.rts.RTSLibError, OSError) as e:
            raise FrontendError(f"volume {volume.name}: LIO backstore: {e}") from None
        log.info("lio_unexported", volume=volume.name, target=volume.target, lun=volume.lun)

    def _storage_object(self, volume: VolumeConfig, lun: Lun):  # type: ignore[no-untyped-def]
        config = f"{uio.SUBTYPE}/{volume.name}"
        size = lun.n_blocks * lun.block_size
        try:
            so = self.rts.UserBackedStorageObject(volume.name)
        except self.not_in_cfs:
            return self.rts.UserBackedStorageObject(
                volume.name, config=config, size=size, hw_max_sectors=lun.max_transfer_blocks, wwn=lun.serial,
                control=f"nl_reply_supported=-1,hw_block_size={lun.block_size}")
        if so.config != config or so.size != size:
            raise FrontendError(f"volume {volume.name}: LIO already has a user backstore of that name "
                                f"({so.config}, {so.size} bytes), not {config} of {size} bytes")
        return so

    def _lun(self, tpg, number: int, so):  # type: ignore[no-untyped-def]
        for lio_lun in tpg.luns:
            if lio_lun.lun == number:
                if lio_lun.storage_object.name != so.name:
                    raise FrontendError(f"LUN {number} of {tpg.parent_target.wwn} is already "
                                        f"{lio_lun.storage_object.plugin}/{lio_lun.storage_object.name}")
                return lio_lun
        return self.rts.LUN(tpg, number, so)

    def _portal(self, tpg) -> None:  # type: ignore[no-untyped-def]
        host, port = self.address
        ip = f"[{host}]" if ":" in host else host
        self.rts.NetworkPortal(tpg, ip, port, mode="any")

    def _access(self, tpg, volume: VolumeConfig, lio_lun) -> None:  # type: ignore[no-untyped-def]
        if not volume.allowed_initiators:
            for name, value in (("generate_node_acls", "1"), ("cache_dynamic_acls", "1"),
                                ("demo_mode_write_protect", "0"), ("authentication", "0")):
                tpg.set_attribute(name, value)
            return
        tpg.set_attribute("generate_node_acls", "0")
        tpg.set_attribute("authentication", "1" if volume.chap else "0")
        for initiator in volume.allowed_initiators:
            acl = self.rts.NodeACL(tpg, initiator, mode="any")
            if not any(m.mapped_lun == volume.lun for m in acl.mapped_luns):
                self.rts.MappedLUN(acl, volume.lun, lio_lun, write_protect=False)
            chap = volume.chap
            if chap is not None:
                acl.chap_userid, acl.chap_password = chap.user, chap.secret
                if chap.mutual_user is not None and chap.mutual_secret is not None:
                    acl.chap_mutual_userid, acl.chap_mutual_password = chap.mutual_user, chap.mutual_secret


def _without_secrets(text: str, volume: VolumeConfig) -> str:
    """rtslib quotes values it could not write; a CHAP secret must not reach the operator's log."""
    chap = volume.chap
    if chap is not None:
        for secret in (chap.secret, chap.mutual_secret):
            if secret:
                text = text.replace(secret, "<secret>")
    return text
