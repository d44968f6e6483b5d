"""NBD protocol numbers (the NBD protocol document, doc/proto.md of the reference implementation)."""

from __future__ import annotations

import enum

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle negotiation, and every option request
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: "Transmission phase: Request message" is 28 bytes; reply headers 16 (simple) / 20 (structured)
REQUEST_SIZE = 28
SIMPLE_HEADER = 16
STRUCTURED_HEADER = 20

BASE_ALLOCATION = "base:allocation"
#: QEMU's dirty bitmap context, followed by the bitmap's exported name (QEMU docs/interop/nbd.txt,
#: "qemu:dirty-bitmap:<dirty-bitmap-export-name>")
QEMU_DIRTY_BITMAP = "qemu:dirty-bitmap:"


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1
    NO_ZEROES = 2


class ClientFlag(enum.IntFlag):
    C_FIXED_NEWSTYLE = 1
    C_NO_ZEROES = 2


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


_ERR = 1 << 31


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR + 1
    ERR_POLICY = _ERR + 2
    ERR_INVALID = _ERR + 3
    ERR_PLATFORM = _ERR + 4
    ERR_TLS_REQD = _ERR + 5
    ERR_UNKNOWN = _ERR + 6
    ERR_SHUTDOWN = _ERR + 7
    ERR_BLOCK_SIZE_REQD = _ERR + 8
    ERR_TOO_BIG = _ERR + 9


REP_ERROR_BIT = _ERR


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class ReplyFlag(enum.IntFlag):
    DONE = 1


class Chunk(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


CHUNK_ERROR_BIT = 1 << 15


class StateFlag(enum.IntFlag):
    """base:allocation descriptor flags. HOLE alone does not promise zeros; ZERO does."""

    HOLE = 1
    ZERO = 2


class DirtyFlag(enum.IntFlag):
    """qemu:dirty-bitmap:NAME descriptor flags (QEMU docs/interop/nbd.txt): bit 0 set means the
    extent is dirty; every other bit is reserved and ignored."""

    DIRTY = 1


class Errno(enum.IntEnum):
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108
