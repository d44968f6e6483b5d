"""The TCMU handler for subtype ``lazy``: which LUN each kernel device serves, and the loop that
serves it.

A device's configfs config is ``lazy/<volume>``; the daemon says which LUN a volume is
(``serve``) and the handler attaches to the device as soon as its ``/dev/uioN`` exists: at once
when it is already there (created by us a moment ago, or left by a previous daemon, then recovered
as ``uio.UioDevice`` explains), or when the kernel announces it on the TCM-USER netlink family
(created later by targetcli or ``targetctl restore``). REMOVED_DEVICE ends a device's loop;
RECONFIG_DEVICE changes the write cache, and a change of size or config that the volume cannot
follow is logged and refused when the kernel waits for an answer.

Devices we create carry ``nl_reply_supported=-1``: the kernel then expects no *_DONE reply, which
keeps us from racing tcmu-runner (which answers every device, refusing the subtypes it lacks). For
a device created without it the kernel may wait for a reply; we give one when its
``attrib/nl_reply_supported`` asks.

Devices the operator creates with targetcli (``backstore_only`` volumes) or that ``targetctl
restore`` recreates carry no such control: rtslib drops ``nl_reply_supported`` from what
``saveconfig`` keeps. Once tcmu-runner runs it has switched the kernel's module-wide reply flag on
(SET_FEATURES at its start), the kernel waits for the first ADDED_DEVICE reply, and tcmu-runner's
"could not find handler" (-ENOENT) wins the race against ours every time: the backstore is never
created (tcmu-runner issue #678). So whenever tcmu-runner takes its D-Bus name (``kernel_replies``,
called by the D-Bus side) we switch the flag off again. The cost, weighed: tcmu-runner's own
devices created afterwards no longer report a failed open synchronously to targetcli, which is how
tcmu-runner works on kernels before 4.14 (its "degraded mode"); its devices still open and serve.
The alternatives lose: answering faster than tcmu-runner is a race, and asking operators to type
``control=nl_reply_supported=-1`` is undone by every ``saveconfig``/``restore``.

An ADDED_DEVICE is checked before we serve it: the device's size (``attrib/dev_size``) and block
size must be the volume's, else the device is refused (one event, -EINVAL when the kernel waits).
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

import gevent
import gevent.socket
import structlog

from lazyiscsi.config import VOLUME_NAME
from lazyiscsi.scsi.lun import Lun
from lazyiscsi.tcmu import netlink, uio
from lazyiscsi.tcmu.device import Device
from lazyiscsi.tcmu.netlink import DeviceEvent, GenlSocket, NetlinkError, TcmuCmd
from lazyiscsi.tcmu.ring import RingError

log = structlog.get_logger("lazyiscsi.tcmu")

DRAIN_TIMEOUT = 30.0  # the kernel's own default cmd_time_out: after that it fails them itself


@dataclass
class _Served:
    dev: uio.UioDevice
    device: Device
    loop: gevent.Greenlet | None = None
    stopping: bool = False


class Handler:
    """Serves the ``lazy`` devices whose volume the daemon has registered."""

    def __init__(self) -> None:
        self.luns: dict[str, Lun] = {}  # volume -> LUN
        self.served: dict[str, _Served] = {}  # volume -> its attached device
        self._events: GenlSocket | None = None
        self._replies: GenlSocket | None = None
        self._family: netlink.Family | None = None
        self._listener: gevent.Greenlet | None = None

    def check_config(self, config: str) -> str | None:
        """Why ``config`` (``lazy/<volume>``, what targetcli's CheckConfig passes) cannot name a
        new device, or None when it can: a volume the daemon holds and no device serves yet."""
        subtype, sep, volume = config.partition("/")
        if subtype != uio.SUBTYPE or not sep or not volume or not VOLUME_NAME.fullmatch(volume):
            return (f"{config!r}: expected {uio.SUBTYPE}/<volume>, a volume name of 1-64 of "
                    "A-Z a-z 0-9 _ . - (cfgstring=<volume> in targetcli)")
        if volume not in self.luns:
            return (f"lazyiscsi serves no volume {volume!r}: create it first "
                    f"(lazyiscsi volume create {volume} --source URL --backstore-only)")
        served = self.served.get(volume)
        if served is not None:
            return f"volume {volume!r} is already served by LIO device {served.dev.name.device}"
        present = uio.find().get(volume)
        if present is not None:
            return f"volume {volume!r} already has an LIO device, {present[1].device}"
        return None

    def kernel_replies(self, enabled: bool) -> None:
        """Set the kernel's module-wide netlink reply flag (SET_FEATURES); see the module doc."""
        if self._replies is None or self._family is None:
            return
        try:
            self._replies.request(netlink.set_features(self._family.id, self._replies.next_seq(),
                                                       kernel_replies=enabled))
        except (NetlinkError, OSError) as e:
            log.warning("tcmu_set_features_failed", kernel_replies=enabled, error=str(e))
            return
        log.info("tcmu_kernel_replies", enabled=enabled,
                 reason="tcmu-runner appeared: it would refuse our devices first")

    def start(self) -> None:
        """Listen for device events: raises NetlinkError (NoFamily without target_core_user)."""
        self._replies = GenlSocket()
        self._family = self._replies.resolve(netlink.TCMU_FAMILY)
        self._events = GenlSocket()
        self._events.join(self._family.groups[netlink.TCMU_GROUP])
        self._listener = gevent.spawn(self._listen)

    def stop(self) -> None:
        """Drain and close every device, leaving it blocked: the kernel answers new commands
        BUSY (initiators retry) until a daemon attaches again and unblocks it."""
        if self._listener is not None:
            self._listener.kill()
        for volume in list(self.served):
            self._detach(volume, keep_blocked=True)
        for sock in (self._events, self._replies):
            if sock is not None:
                sock.close()

    # -- the daemon's side ----------------------------------------------------------------------

    def serve(self, volume: str, lun: Lun) -> None:
        """Serve ``volume``'s device with ``lun`` now if it exists, else once it appears."""
        self.luns[volume] = lun
        present = uio.find().get(volume)
        if present is not None and volume not in self.served:
            minor, name = present
            # not configured yet: just created, its ADDED_DEVICE came before we knew the volume
            self._attach(volume, minor, name, fresh=not uio.configured(name))

    def withdraw(self, volume: str) -> None:
        """Stop serving ``volume`` (its device is about to be deleted)."""
        self.luns.pop(volume, None)
        if volume in self.served:
            self._detach(volume, keep_blocked=False)

    # -- devices ----------------------------------------------------------------------------------

    def _attach(self, volume: str, minor: int, name: uio.UioName, *, fresh: bool = False) -> None:
        try:
            dev = uio.UioDevice(minor, name, fresh=fresh)
        except (uio.UioError, RingError) as e:
            log.error("tcmu_attach_failed", volume=volume, device=name.device, error=str(e))
            return
        lun = self.luns[volume]
        lun.unit_serial = lambda: uio.unit_serial(name)  # INQUIRY 0x80/0x83 say what targetcli shows
        served = _Served(dev, Device(dev.ring, lun, dev.notify, name=name.device))
        self.served[volume] = served
        served.loop = gevent.spawn(self._run, volume, served)
        log.info("tcmu_attached", volume=volume, device=name.device, uio=f"uio{minor}",
                 ooo=dev.ring.ooo, ring_bytes=dev.ring.cmdr_size, fresh=fresh)

    def _run(self, volume: str, served: _Served) -> None:
        try:
            served.device.process()  # what was queued before we attached
            while served.dev.wait():
                served.device.process()
        except RingError as e:  # this device's ring is unusable; the others go on
            log.error("tcmu_ring_broken", volume=volume, device=served.dev.name.device, error=str(e))
        if not served.stopping:
            log.warning("tcmu_device_gone", volume=volume, device=served.dev.name.device)
            gevent.spawn(self._detach, volume, keep_blocked=False)

    def _detach(self, volume: str, *, keep_blocked: bool) -> None:
        served = self.served.pop(volume, None)
        if served is None:
            return
        served.stopping = True
        try:
            if keep_blocked:
                served.dev.block(True)
                # what reached the ring before the block is answered now rather than failed
                # BUSY at the next attach
                served.device.process()
        except (uio.UioError, RingError) as e:
            log.warning("tcmu_block_failed", volume=volume, error=str(e))
        drained = served.device.wait(timeout=DRAIN_TIMEOUT)
        if served.loop is not None:
            served.loop.kill()
        served.dev.close()
        log.info("tcmu_detached", volume=volume, device=served.dev.name.device, drained=drained,
                 blocked=keep_blocked)

    # -- netlink ----------------------------------------------------------------------------------

    def _listen(self) -> None:
        assert self._events is not None
        sock = self._events.sock
        while True:
            gevent.socket.wait_read(sock.fileno())
            try:
                data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # events were dropped: the sysfs scan below repairs
                    log.warning("tcmu_events_lost")
                    self._rescan()
                    continue
                raise
            try:
                events = [netlink.device_event(m) for m in netlink.decode(data)]
            except NetlinkError as e:
                log.warning("tcmu_bad_event", error=str(e))
                continue
            for event in events:
                try:
                    self._on_event(event)
                except Exception:  # a bug on one event must not stop the listener
                    log.exception("tcmu_event_failed", kind=event.cmd.name, device=event.device)

    def _rescan(self) -> None:
        for volume, (minor, name) in uio.find().items():
            if volume in self.luns and volume not in self.served:
                self._attach(volume, minor, name, fresh=not uio.configured(name))

    def _on_event(self, event: DeviceEvent) -> None:
        name = uio.UioName.parse(event.device)
        if name is None or name.subtype != uio.SUBTYPE:
            return  # another handler's device: tcmu-runner's, say
        volume = name.config
        log.info("tcmu_event", kind=event.cmd.name, volume=volume, device=name.device)
        status = 0
        if event.cmd == TcmuCmd.ADDED_DEVICE:
            if volume not in self.luns:
                log.warning("tcmu_unknown_volume", volume=volume, device=name.device)
                status = -errno.ENOENT
            elif volume in self.served:
                log.warning("tcmu_second_device", volume=volume, device=name.device,
                            served_by=self.served[volume].dev.name.device)
                status = -errno.EEXIST
            else:
                status = self._check_device(volume, name)
                if not status:
                    self._attach(volume, event.minor, name, fresh=True)
        elif event.cmd == TcmuCmd.REMOVED_DEVICE:
            if volume in self.served:
                self.served[volume].stopping = True
                gevent.spawn(self._detach, volume, keep_blocked=False)
        elif event.cmd == TcmuCmd.RECONFIG_DEVICE:
            status = self._reconfig(volume, event)
        if self._wants_reply(name):
            self._reply(event, status)

    def _check_device(self, volume: str, name: uio.UioName) -> int:
        """0 when the new device is the volume's size and block size; else one event, -EINVAL."""
        lun = self.luns[volume]
        want = {"dev_size": lun.n_blocks * lun.block_size, "hw_block_size": lun.block_size}
        for attribute, wanted in want.items():
            text = uio.read_attribute(name, "attrib", attribute)
            if text is None or not text.isdigit():
                continue  # an older kernel without the attribute: nothing to compare
            if int(text) != wanted:
                log.error("tcmu_device_refused", volume=volume, device=name.device, attribute=attribute,
                          device_value=int(text), volume_value=wanted,
                          error=f"the device's {attribute} is {text}, the volume's {wanted} (as its "
                                f"source): delete it and create it with size={wanted}"
                                if attribute == "dev_size" else
                                f"the device's {attribute} is {text}, the volume's {wanted}")
                return -errno.EINVAL
        return 0

    def _reconfig(self, volume: str, event: DeviceEvent) -> int:
        lun = self.luns.get(volume)
        if lun is None:
            return -errno.ENOENT
        if event.writecache is not None:
            lun.write_cache = event.writecache
            log.info("tcmu_write_cache", volume=volume, enabled=event.writecache)
        if event.dev_size is not None and event.dev_size != lun.n_blocks * lun.block_size:
            log.warning("tcmu_reconfig_refused", volume=volume, size=event.dev_size,
                        error=f"the volume is {lun.n_blocks * lun.block_size} bytes, as its source")
            return -errno.EINVAL
        if event.dev_cfg is not None and event.dev_cfg != f"{uio.SUBTYPE}/{volume}":
            log.warning("tcmu_reconfig_refused", volume=volume, config=event.dev_cfg,
                        error="a device keeps the volume it was made for")
            return -errno.EINVAL
        return 0

    @staticmethod
    def _wants_reply(name: uio.UioName) -> bool:
        try:
            return int((name.configfs / "attrib" / "nl_reply_supported").read_text()) > 0
        except (OSError, ValueError):
            return False

    def _reply(self, event: DeviceEvent, status: int) -> None:
        assert self._replies is not None and self._family is not None
        try:
            seq = self._replies.next_seq()
            self._replies.request(netlink.done_reply(self._family.id, seq, event, status))
        except (NetlinkError, OSError) as e:
            log.warning("tcmu_reply_failed", kind=event.cmd.name, device=event.device, error=str(e))
