"""TCM-USER generic netlink: events laid out byte by byte as target_core_user sends them, our
*_DONE replies checked field by field, kernel errors; and family lookup against this machine's
real kernel (nlctrl is always there; an unknown family is NoFamily, as TCM-USER is on a kernel
without target_core_user)."""

from __future__ import annotations

import errno
import struct

import pytest

from lazyiscsi.tcmu.netlink import (
    DeviceEvent,
    GenlSocket,
    NetlinkError,
    NoFamily,
    TcmuCmd,
    decode,
    device_event,
    done_reply,
)

FAMILY = 0x1A


def nla(kind: int, value: bytes) -> bytes:
    return struct.pack("<HH", 4 + len(value), kind) + value + bytes(-len(value) % 4)


def kernel_message(cmd: int, attrs: bytes, seq: int = 0) -> bytes:
    body = struct.pack("<BBH", cmd, 2, 0) + attrs
    return struct.pack("<IHHII", 16 + len(body), FAMILY, 0, seq, 0) + body


def test_added_device_event_as_the_kernel_sends_it() -> None:
    name = b"tcm-user/0/tcmu0/lazy/vm1\0"
    data = kernel_message(1, nla(1, name) + nla(2, struct.pack("<I", 3)) + nla(8, struct.pack("<I", 7)))
    (msg,) = decode(data)
    assert msg.type == FAMILY and msg.version == 2
    event = device_event(msg)
    assert event == DeviceEvent(TcmuCmd.ADDED_DEVICE, "tcm-user/0/tcmu0/lazy/vm1", 3, device_id=7)


def test_reconfig_events_carry_size_cache_or_config() -> None:
    base = nla(1, b"tcm-user/0/t/lazy/x\0") + nla(2, struct.pack("<I", 0))
    two = kernel_message(3, base + nla(5, struct.pack("<Q", 1 << 40))) + kernel_message(
        3, base + nla(6, b"\x01") + nla(4, b"lazy/y\0"))
    size, cache = (device_event(m) for m in decode(two))  # two messages in one datagram
    assert size.dev_size == 1 << 40 and size.writecache is None
    assert cache.writecache is True and cache.dev_cfg == "lazy/y"


def test_done_reply_layout() -> None:
    event = DeviceEvent(TcmuCmd.ADDED_DEVICE, "tcm-user/0/t/lazy/x", 0, device_id=9)
    data = done_reply(FAMILY, 5, event, -errno.EINVAL)
    length, kind, flags, seq, pid = struct.unpack_from("<IHHII", data)
    assert (length, kind, flags & 0x5, seq, pid) == (len(data), FAMILY, 0x5, 5, 0)
    assert struct.unpack_from("<BB", data, 16) == (TcmuCmd.ADDED_DEVICE_DONE, 2)
    assert data[20:28] == struct.pack("<HHi", 8, 7, -errno.EINVAL)  # CMD_STATUS
    assert data[28:36] == struct.pack("<HHI", 8, 8, 9)  # DEVICE_ID


def test_kernel_errors_and_malformed_datagrams() -> None:
    err = struct.pack("<IHHII", 36, 2, 0, 4, 0) + struct.pack("<i", -errno.ENOENT) + bytes(16)
    with pytest.raises(NetlinkError) as e:
        decode(err)
    assert e.value.errno == errno.ENOENT
    ack = struct.pack("<IHHII", 36, 2, 0, 4, 0) + struct.pack("<i", 0) + bytes(16)
    assert decode(ack) == []
    with pytest.raises(NetlinkError, match="past the message"):
        decode(kernel_message(1, struct.pack("<HH", 200, 1) + b"abcd"))
    with pytest.raises(NetlinkError, match="past the datagram"):
        decode(struct.pack("<IHHII", 99, FAMILY, 0, 0, 0) + struct.pack("<BBH", 1, 2, 0))
    with pytest.raises(NetlinkError, match="without DEVICE or MINOR"):
        device_event(decode(kernel_message(1, nla(2, struct.pack("<I", 0))))[0])


def test_family_lookup_against_the_real_kernel() -> None:
    sock = GenlSocket()
    try:
        ctrl = sock.resolve("nlctrl")
        assert ctrl.id == 0x10 and "notify" in ctrl.groups
        with pytest.raises(NoFamily, match="LAZYISCSI-NONE"):
            sock.resolve("LAZYISCSI-NONE")
        assert sock.resolve("nlctrl").id == 0x10  # the socket is still usable after a refusal
    finally:
        sock.close()
