"""Generic netlink for the TCM-USER family: the bytes (sans I/O) and one small blocking socket.

The kernel's target_core_user announces devices on the TCM-USER family's "config" multicast
group (ADDED_DEVICE, REMOVED_DEVICE, RECONFIG_DEVICE) and, when a device asks for it, waits for
the matching *_DONE reply. Messages are a netlink header (length, type = the family's id,
flags, sequence, port), a generic netlink header (command, version) and attributes (length,
type, value padded to 4 bytes). Family ids are dynamic: ``GenlSocket.resolve`` asks nlctrl.
Resolving TCM-USER is also how ``serve`` learns whether the kernel offers LIO's userspace
backstores at all (``NoFamily`` when target_core_user is not loaded).
"""

from __future__ import annotations

import enum
import errno
import os
import socket
import struct
from dataclasses import dataclass, field

NETLINK_GENERIC = 16
NLMSG_HDR = struct.Struct("<IHHII")  # len, type, flags, seq, pid
GENL_HDR = struct.Struct("<BBH")  # cmd, version, reserved
NLA_HDR = struct.Struct("<HH")  # len, type
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP = 270, 1

GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME, CTRL_ATTR_VERSION, CTRL_ATTR_MCAST_GROUPS = 1, 2, 3, 7
CTRL_ATTR_MCAST_GRP_NAME, CTRL_ATTR_MCAST_GRP_ID = 1, 2

TCMU_FAMILY = "TCM-USER"
TCMU_GROUP = "config"
TCMU_VERSION = 2


class TcmuCmd(enum.IntEnum):
    ADDED_DEVICE = 1
    REMOVED_DEVICE = 2
    RECONFIG_DEVICE = 3
    ADDED_DEVICE_DONE = 4
    REMOVED_DEVICE_DONE = 5
    RECONFIG_DEVICE_DONE = 6
    SET_FEATURES = 7


class TcmuAttr(enum.IntEnum):
    DEVICE = 1
    MINOR = 2
    DEV_CFG = 4
    DEV_SIZE = 5
    WRITECACHE = 6
    CMD_STATUS = 7
    DEVICE_ID = 8
    SUPP_KERN_CMD_REPLY = 9


#: the reply each event wants, when the kernel waits for one
DONE = {TcmuCmd.ADDED_DEVICE: TcmuCmd.ADDED_DEVICE_DONE, TcmuCmd.REMOVED_DEVICE: TcmuCmd.REMOVED_DEVICE_DONE,
        TcmuCmd.RECONFIG_DEVICE: TcmuCmd.RECONFIG_DEVICE_DONE}


class NetlinkError(Exception):
    """A malformed message, or the kernel's negative answer (``errno`` set)."""

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


class NoFamily(NetlinkError):
    """The kernel has no such generic netlink family (for TCM-USER: no target_core_user)."""


@dataclass(frozen=True)
class Message:
    type: int
    flags: int
    seq: int
    cmd: int
    version: int
    attrs: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceEvent:
    """What an ADDED / REMOVED / RECONFIG_DEVICE event says about one device."""

    cmd: TcmuCmd
    device: str  # the uio name: tcm-user/<hba>/<name>/<subtype>/<cfg>
    minor: int  # /dev/uio<minor>
    device_id: int | None = None  # to echo in the *_DONE reply
    dev_cfg: str | None = None
    dev_size: int | None = None
    writecache: bool | None = None


# -- bytes ------------------------------------------------------------------------------------

def attr(kind: int, value: bytes) -> bytes:
    return NLA_HDR.pack(NLA_HDR.size + len(value), kind) + value + bytes(-len(value) % 4)


def encode(msg_type: int, flags: int, seq: int, cmd: int, version: int, attrs: bytes = b"") -> bytes:
    payload = GENL_HDR.pack(cmd, version, 0) + attrs
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(payload), msg_type, flags, seq, 0) + payload


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Attributes by type (flags stripped); nested ones are parsed again by the caller."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + NLA_HDR.size <= len(data):
        length, kind = NLA_HDR.unpack_from(data, pos)
        if length < NLA_HDR.size or pos + length > len(data):
            raise NetlinkError(f"attribute at {pos}: length {length} past the message")
        out[kind & NLA_TYPE_MASK] = bytes(data[pos + NLA_HDR.size:pos + length])
        pos += (length + 3) & ~3
    return out


def decode(data: bytes) -> list[Message]:
    """Every message in a datagram. A kernel error becomes NetlinkError (errno set); an
    acknowledgement (error 0) and NLMSG_DONE are skipped."""
    out: list[Message] = []
    pos = 0
    while pos + NLMSG_HDR.size <= len(data):
        length, msg_type, flags, seq, _pid = NLMSG_HDR.unpack_from(data, pos)
        if length < NLMSG_HDR.size or pos + length > len(data):
            raise NetlinkError(f"message at {pos}: length {length} past the datagram")
        body = data[pos + NLMSG_HDR.size:pos + length]
        pos += (length + 3) & ~3
        if msg_type == NLMSG_ERROR:
            (err,) = struct.unpack_from("<i", body, 0)
            if err:
                raise NetlinkError(f"kernel: {os.strerror(-err)}", -err)
            continue
        if msg_type == NLMSG_DONE:
            continue
        if len(body) < GENL_HDR.size:
            raise NetlinkError(f"message of type {msg_type}: no generic netlink header")
        cmd, version, _ = GENL_HDR.unpack_from(body, 0)
        out.append(Message(msg_type, flags, seq, cmd, version, parse_attrs(body[GENL_HDR.size:])))
    return out


def _string(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode("utf-8", "replace")


def device_event(msg: Message) -> DeviceEvent:
    """A TCM-USER event; NetlinkError if it is not one or lacks what every event carries."""
    try:
        cmd = TcmuCmd(msg.cmd)
    except ValueError:
        raise NetlinkError(f"TCM-USER command {msg.cmd}: not an event") from None
    a = msg.attrs
    if TcmuAttr.DEVICE not in a or TcmuAttr.MINOR not in a:
        raise NetlinkError(f"{cmd.name} without DEVICE or MINOR")
    return DeviceEvent(
        cmd=cmd,
        device=_string(a[TcmuAttr.DEVICE]),
        minor=struct.unpack("<I", a[TcmuAttr.MINOR][:4])[0],
        device_id=struct.unpack("<I", a[TcmuAttr.DEVICE_ID][:4])[0] if TcmuAttr.DEVICE_ID in a else None,
        dev_cfg=_string(a[TcmuAttr.DEV_CFG]) if TcmuAttr.DEV_CFG in a else None,
        dev_size=struct.unpack("<Q", a[TcmuAttr.DEV_SIZE][:8])[0] if TcmuAttr.DEV_SIZE in a else None,
        writecache=bool(a[TcmuAttr.WRITECACHE][0]) if TcmuAttr.WRITECACHE in a else None,
    )


def done_reply(family: int, seq: int, event: DeviceEvent, status: int) -> bytes:
    """The *_DONE answer to ``event``: 0, or a negative errno refusing it."""
    attrs = attr(TcmuAttr.CMD_STATUS, struct.pack("<i", status))
    if event.device_id is not None:
        attrs += attr(TcmuAttr.DEVICE_ID, struct.pack("<I", event.device_id))
    return encode(family, NLM_F_REQUEST | NLM_F_ACK, seq, DONE[event.cmd], TCMU_VERSION, attrs)


def set_features(family: int, seq: int, *, kernel_replies: bool) -> bytes:
    """SET_FEATURES: whether the kernel waits for *_DONE replies to the devices it configures
    from now on (module-wide; tcmu-runner turns it on at its start)."""
    attrs = attr(TcmuAttr.SUPP_KERN_CMD_REPLY, bytes([int(kernel_replies)]))
    return encode(family, NLM_F_REQUEST | NLM_F_ACK, seq, TcmuCmd.SET_FEATURES, TCMU_VERSION, attrs)


# -- the socket -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    id: int
    version: int
    groups: dict[str, int]


class GenlSocket:
    """A generic netlink socket (blocking; under gevent's monkey patching it yields)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self.sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def request(self, data_for_seq: bytes) -> list[Message]:
        """Send one request (its seq already set) and collect the answer up to its ack."""
        self.sock.send(data_for_seq)
        (want,) = struct.unpack_from("<I", data_for_seq, 8)
        out: list[Message] = []
        while True:
            data = self.sock.recv(1 << 16)
            acked = _acked(data, want)
            out += [m for m in decode(data) if m.seq == want]
            if acked:
                return out

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def resolve(self, name: str) -> Family:
        """Look a family up by name (nlctrl's GETFAMILY)."""
        request = encode(GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, self.next_seq(), CTRL_CMD_GETFAMILY, 1,
                         attr(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"))
        try:
            (reply,) = self.request(request)
        except NetlinkError as e:
            if e.errno == errno.ENOENT:
                raise NoFamily(f"the kernel has no generic netlink family {name}", e.errno) from None
            raise
        groups = {}
        for group in parse_attrs(reply.attrs.get(CTRL_ATTR_MCAST_GROUPS, b"")).values():
            g = parse_attrs(group)
            groups[_string(g[CTRL_ATTR_MCAST_GRP_NAME])] = struct.unpack("<I", g[CTRL_ATTR_MCAST_GRP_ID])[0]
        return Family(struct.unpack("<H", reply.attrs[CTRL_ATTR_FAMILY_ID][:2])[0],
                      struct.unpack("<I", reply.attrs.get(CTRL_ATTR_VERSION, bytes(4))[:4])[0], groups)

    def join(self, group: int) -> None:
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)


def _acked(data: bytes, seq: int) -> bool:
    """Whether the datagram holds the ack (or error, or DONE) that ends request ``seq``."""
    pos = 0
    while pos + NLMSG_HDR.size <= len(data):
        length, msg_type, _flags, msg_seq, _pid = NLMSG_HDR.unpack_from(data, pos)
        if msg_seq == seq and msg_type in (NLMSG_ERROR, NLMSG_DONE):
            return True
        pos += max((length + 3) & ~3, NLMSG_HDR.size)
    return False


def tcmu_available() -> tuple[bool, str]:
    """Whether this kernel offers TCMU backstores (the TCM-USER family exists), and why not."""
    try:
        sock = GenlSocket()
    except OSError as e:
        return False, f"no generic netlink socket ({e.strerror or e})"
    try:
        sock.resolve(TCMU_FAMILY)
    except NoFamily:
        return False, "the kernel has no target_core_user (no TCM-USER netlink family)"
    except (NetlinkError, OSError) as e:
        return False, f"TCM-USER lookup failed: {e}"
    finally:
        sock.close()
    return True, "the kernel offers target_core_user"
