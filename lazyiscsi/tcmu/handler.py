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
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

import gevent
import gevent.socket
import structlog

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
            self._attach(volume, *present)

    def withdraw(self, volume: str) -> None:
        """Stop serving ``volume`` (its device is about to be deleted)."""
        self.luns.pop(volume, None)
        if volume in self.served:
            self._detach(volume, keep_blocked=False)

    # -- devices ----------------------------------------------------------------------------------

    def _attach(self, volume: str, minor: int, name: uio.UioName) -> None:
        try:
            dev = uio.UioDevice(minor, name)
        except (uio.UioError, RingError) as e:
            log.error("tcmu_attach_failed", volume=volume, device=name.device, error=str(e))
            return
        served = _Served(dev, Device(dev.ring, self.luns[volume], dev.notify, name=name.device))
        self.served[volume] = served
        served.loop = gevent.spawn(self._run, volume, served)
        log.info("tcmu_attached", volume=volume, device=name.device, uio=f"uio{minor}",
                 ooo=dev.ring.ooo, ring_bytes=dev.ring.cmdr_size)

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
                self._attach(volume, minor, name)

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
            elif volume not in self.served:
                self._attach(volume, event.minor, name)
        elif event.cmd == TcmuCmd.REMOVED_DEVICE:
            if volume in self.served:
                self.served[volume].stopping = True
                gevent.spawn(self._detach, volume, keep_blocked=False)
        elif event.cmd == TcmuCmd.RECONFIG_DEVICE:
            status = self._reconfig(volume, event)
        if self._wants_reply(name):
            self._reply(event, status)

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
