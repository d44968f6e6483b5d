"""iSCSI PDUs (RFC 7143 section 11), sans I/O: the 48-byte BHS, AHS, padding and digests.

``Framer`` takes bytes as they arrive and returns whole ``RawPdu`` s, checking digests and the
data segment bound (MaxRecvDataSegmentLength) as it goes; ``decode`` turns a raw initiator PDU
into an event; the ``build_*`` functions produce target PDUs. No socket and no clock here.

These run once per PDU, tens of thousands of times a second at 4 KiB: the records are slotted,
not frozen, dataclasses (a frozen one sets each field through ``object.__setattr__``, four times
the cost), the framer consumes its buffer by moving an offset (no memmove of what follows per
PDU), and opcodes are looked up as plain ints (no Enum call).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import crc32c

BHS_LEN = 48


class Opcode(enum.IntEnum):
    """RFC 7143 11.1.1 (initiator opcodes 0x00-0x1f, target opcodes 0x20-0x3f)."""

    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    SCSI_DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    SCSI_DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


class RejectReason(enum.IntEnum):
    """RFC 7143 11.17.1."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    DEPRECATED = 0x0B
    WAITING_FOR_LOGOUT = 0x0C


class RemoteProtocolError(Exception):
    """The initiator broke the protocol. ``reject`` is the Reject reason to answer with, or None
    when the connection must be dropped (framing is lost: nothing after this can be trusted)."""

    def __init__(self, message: str, reject: RejectReason | None = None, header: bytes = b"") -> None:
        super().__init__(message)
        self.reject = reject
        self.header = header


def digest(data: bytes | memoryview) -> bytes:
    """CRC32C as iSCSI carries it: least significant byte first (RFC 7143 13.1, RFC 3720 B.4)."""
    return struct.pack("<I", crc32c.crc32c(data))


def pad(n: int) -> int:
    return -n % 4


@dataclass(slots=True)
class RawPdu:
    """A framed PDU: the BHS, its AHS and its data segment (padding and digests removed)."""

    bhs: bytes
    ahs: bytes
    data: bytes
    #: False when the data segment failed its digest: the header holds, the data is discarded
    data_intact: bool = True

    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F

    @property
    def immediate(self) -> bool:
        return bool(self.bhs[0] & 0x40)

    @property
    def final(self) -> bool:
        return bool(self.bhs[1] & 0x80)

    @property
    def itt(self) -> int:
        return struct.unpack_from(">I", self.bhs, 16)[0]


class Framer:
    """Cuts a byte stream into PDUs. Digest settings change after login (``set_digests``)."""

    def __init__(self, max_data: int = 8192) -> None:
        self.max_data = max_data
        self.header_digest = False
        self.data_digest = False
        #: what was received and not yet framed starts at _pos. It is the received bytes object
        #: itself while a receive holds whole PDUs (the common case: no copy), a bytearray
        #: while a PDU is split across receives
        self._buf: bytes | bytearray = b""
        self._pos = 0

    def set_digests(self, header: bool, data: bool) -> None:
        self.header_digest, self.data_digest = header, data

    def receive_data(self, data: bytes) -> None:
        if self._pos == len(self._buf):
            self._buf = bytes(data)  # no copy of a bytes object (what recv returns)
        elif isinstance(self._buf, bytes):
            self._buf = bytearray(memoryview(self._buf)[self._pos:]) + data
        else:
            del self._buf[:self._pos]  # once per receive, not once per PDU
            self._buf += data
        self._pos = 0

    def next_pdu(self) -> RawPdu | None:
        """The next whole PDU, or None when more bytes are needed."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < BHS_LEN:
            return None
        header_end = pos + BHS_LEN
        bhs = bytes(buf[pos:header_end])
        ahs_len = bhs[4] * 4
        data_len = int.from_bytes(bhs[5:8], "big")
        if data_len > self.max_data:
            # RFC 7143 11.2.1.6 bounds it by MaxRecvDataSegmentLength; we cannot skip it safely
            raise RemoteProtocolError(f"data segment of {data_len} bytes exceeds {self.max_data}",
                                      header=bhs)
        hd = 4 if self.header_digest else 0
        dd = 4 if self.data_digest and data_len else 0
        end = header_end + ahs_len + hd + data_len + (-data_len % 4) + dd  # (pad(), without the call)
        if len(buf) < end:
            return None
        self._pos = end
        ahs = bytes(buf[header_end:header_end + ahs_len]) if ahs_len else b""
        header_end += ahs_len
        if hd and bytes(buf[header_end:header_end + 4]) != digest(bytes(buf[pos:header_end])):
            # a bad header digest means the lengths above cannot be trusted: drop the connection
            raise RemoteProtocolError("header digest mismatch", header=bhs)
        data_start = header_end + hd
        data = bytes(buf[data_start:data_start + data_len]) if data_len else b""
        if dd and bytes(buf[end - 4:end]) != digest(buf[data_start:end - 4]):
            # the header (and its digest) held, so the next PDU starts where this one ends: the
            # connection goes on, the PDU is answered with a Reject (RFC 7143 7.8)
            return RawPdu(bhs, ahs, b"", data_intact=False)
        return RawPdu(bhs, ahs, data)


def encode_parts(bhs: bytearray, data: bytes | memoryview = b"", *, header_digest: bool = False,
                 data_digest: bool = False) -> list[bytes | bytearray | memoryview]:
    """Serialize a target PDU as the buffers to send one after another (a gathered write):
    fill DataSegmentLength, pad, add the negotiated digests. The data itself is not copied,
    so a Data-In PDU costs one copy from the page cache into the read buffer and one into
    the socket."""
    bhs[5:8] = len(data).to_bytes(3, "big")
    parts: list[bytes | bytearray | memoryview] = [bhs]
    if header_digest:
        parts.append(digest(bhs))
    if len(data):
        padding = bytes(pad(len(data)))
        parts.append(data)
        if padding:
            parts.append(padding)
        if data_digest:
            parts.append(struct.pack("<I", crc32c.crc32c(padding, crc32c.crc32c(data))))
    return parts


def encode(bhs: bytearray, data: bytes | memoryview = b"", *, header_digest: bool = False,
           data_digest: bool = False) -> bytes:
    """A target PDU as one buffer (for initiators in tests and small PDUs)."""
    return b"".join(encode_parts(bhs, data, header_digest=header_digest, data_digest=data_digest))


# -- decoded initiator PDUs (the fields the target acts on) ----------------------------------

@dataclass(slots=True)
class ScsiCommand:
    immediate: bool
    final: bool
    read: bool
    write: bool
    attributes: int
    lun: int
    itt: int
    expected_length: int
    cmdsn: int
    expstatsn: int
    cdb: bytes
    data: bytes


@dataclass(slots=True)
class DataOut:
    final: bool
    lun: int
    itt: int
    ttt: int
    expstatsn: int
    datasn: int
    offset: int
    data: bytes


@dataclass(slots=True)
class NopOut:
    immediate: bool
    lun: int
    itt: int
    ttt: int
    cmdsn: int
    expstatsn: int
    data: bytes


@dataclass(slots=True)
class LoginRequest:
    transit: bool
    cont: bool
    csg: int
    nsg: int
    version_max: int
    version_min: int
    isid: bytes
    tsih: int
    itt: int
    cid: int
    cmdsn: int
    expstatsn: int
    data: bytes


@dataclass(slots=True)
class TextRequest:
    immediate: bool
    final: bool
    cont: bool
    itt: int
    ttt: int
    cmdsn: int
    expstatsn: int
    data: bytes


@dataclass(slots=True)
class LogoutRequest:
    immediate: bool
    reason: int
    itt: int
    cid: int
    cmdsn: int
    expstatsn: int


@dataclass(slots=True)
class TaskManagementRequest:
    immediate: bool
    function: int
    lun: int
    itt: int
    rtt: int
    cmdsn: int
    expstatsn: int
    refcmdsn: int


Event = ScsiCommand | DataOut | NopOut | LoginRequest | TextRequest | LogoutRequest | TaskManagementRequest


def _lun(bhs: bytes) -> int:
    """The LUN field as a number (single-level peripheral or flat addressing, SAM-5 4.7)."""
    return ((bhs[8] & 0x3F) << 8) | bhs[9]


#: a SCSI Command's ITT, Expected Data Transfer Length, CmdSN and ExpStatSN (BHS bytes 16-31), by a
#: Struct compiled once: every command is decoded here
_ITT_EDTL_CMDSN_EXPSTATSN = struct.Struct(">IIII").unpack_from


def _scsi_command(p: RawPdu) -> ScsiCommand:
    b = p.bhs
    flags = b[1]
    if flags & 0x18:
        raise RemoteProtocolError("reserved bits set in a SCSI Command", RejectReason.INVALID_PDU_FIELD, b)
    cdb = b[32:48]
    if p.ahs:  # an Extended CDB AHS (type 1) carries the bytes past the first 16 (RFC 7143 11.2.2.3)
        ahs_len, ahs_type = struct.unpack_from(">HB", p.ahs)
        if ahs_type == 1:
            cdb += p.ahs[4:4 + ahs_len - 1]
    # (p.immediate and _lun(b) written out: every command comes here)
    return ScsiCommand(bool(b[0] & 0x40), bool(flags & 0x80), bool(flags & 0x40), bool(flags & 0x20),
                       flags & 0x07, ((b[8] & 0x3F) << 8) | b[9], *_ITT_EDTL_CMDSN_EXPSTATSN(b, 16), cdb,
                       p.data)


#: the decoder of the PDU most sent, called by name where the connection knows the opcode
decode_scsi_command = _scsi_command


def _data_out(p: RawPdu) -> DataOut:
    b = p.bhs
    itt, ttt, _r, expstatsn, _r2, datasn, offset = struct.unpack_from(">IIIIIII", b, 16)
    return DataOut(p.final, _lun(b), itt, ttt, expstatsn, datasn, offset, p.data)


def _nop_out(p: RawPdu) -> NopOut:
    b = p.bhs
    return NopOut(p.immediate, _lun(b), *struct.unpack_from(">IIII", b, 16), p.data)


def _login(p: RawPdu) -> LoginRequest:
    b = p.bhs
    flags = b[1]
    tsih, itt, cid = struct.unpack_from(">HIH", b, 14)
    cmdsn, expstatsn = struct.unpack_from(">II", b, 24)
    return LoginRequest(bool(flags & 0x80), bool(flags & 0x40), (flags >> 2) & 3, flags & 3, b[2], b[3],
                        b[8:14], tsih, itt, cid, cmdsn, expstatsn, p.data)


def _text(p: RawPdu) -> TextRequest:
    b = p.bhs
    return TextRequest(p.immediate, p.final, bool(b[1] & 0x40), *struct.unpack_from(">IIII", b, 16), p.data)


def _logout(p: RawPdu) -> LogoutRequest:
    b = p.bhs
    itt, cid = struct.unpack_from(">IH", b, 16)
    cmdsn, expstatsn = struct.unpack_from(">II", b, 24)
    return LogoutRequest(p.immediate, b[1] & 0x7F, itt, cid, cmdsn, expstatsn)


def _task_mgmt(p: RawPdu) -> TaskManagementRequest:
    b = p.bhs
    itt, rtt, cmdsn, expstatsn, refcmdsn = struct.unpack_from(">IIIII", b, 16)
    return TaskManagementRequest(p.immediate, b[1] & 0x7F, _lun(b), itt, rtt, cmdsn, expstatsn, refcmdsn)


#: by opcode as a plain int (an IntEnum member hashes as its value): no Enum call per PDU
DECODERS = {
    Opcode.SCSI_COMMAND: _scsi_command,
    Opcode.SCSI_DATA_OUT: _data_out,
    Opcode.NOP_OUT: _nop_out,
    Opcode.LOGIN_REQUEST: _login,
    Opcode.TEXT_REQUEST: _text,
    Opcode.LOGOUT_REQUEST: _logout,
    Opcode.TASK_MGMT_REQUEST: _task_mgmt,
}


def decode(p: RawPdu) -> Event:
    """A raw initiator PDU as an event; an opcode we do not take is rejected (RFC 7143 11.17)."""
    decoder = DECODERS.get(p.bhs[0] & 0x3F)
    if decoder is None:
        raise RemoteProtocolError(f"opcode {p.opcode:#04x} not supported",
                                  RejectReason.COMMAND_NOT_SUPPORTED, p.bhs)
    return decoder(p)


# -- target PDUs ---------------------------------------------------------------------------

def _bhs(opcode: Opcode, flags: int) -> bytearray:
    b = bytearray(BHS_LEN)
    b[0], b[1] = opcode, flags
    return b


def build_scsi_response(itt: int, status: int, statsn: int, expcmdsn: int, maxcmdsn: int, *,
                        sense: bytes = b"", residual: int = 0) -> tuple[bytearray, bytes]:
    """SCSI Response (RFC 7143 11.4). ``residual`` > 0 is an underflow, < 0 an overflow.
    Sense travels in the data segment behind its 2-byte length (11.4.7.2)."""
    flags = 0x80 | (0x02 if residual > 0 else 0) | (0x04 if residual < 0 else 0)
    b = _bhs(Opcode.SCSI_RESPONSE, flags)
    b[3] = status
    # ITT, SNACK tag, StatSN, ExpCmdSN, MaxCmdSN, ExpDataSN, bidirectional residual, residual
    struct.pack_into(">IIIIIIII", b, 16, itt, 0, statsn, expcmdsn, maxcmdsn, 0, 0, abs(residual))
    data = struct.pack(">H", len(sense)) + sense if sense else b""
    return b, data


def build_data_in(itt: int, lun: int, datasn: int, offset: int, data_len: int, *, final: bool,
                  status: int | None, statsn: int, expcmdsn: int, maxcmdsn: int,
                  residual: int = 0) -> bytearray:
    """SCSI Data-In (RFC 7143 11.7). With ``status`` set on the final PDU, the response is
    collapsed into it (S bit): no separate SCSI Response follows."""
    b = bytearray(BHS_LEN)
    if status is None:
        b[0], b[1] = Opcode.SCSI_DATA_IN, 0x80 if final else 0
        statsn = 0
    else:
        flags = 0x81 if final else 0x01
        if residual:
            flags |= 0x02 if residual > 0 else 0x04
        b[0], b[1], b[3] = Opcode.SCSI_DATA_IN, flags, status
    # DataSegmentLength (3 bytes after TotalAHSLength 0), LUN, ITT, TTT, StatSN, ExpCmdSN, MaxCmdSN,
    # DataSN, Buffer Offset, Residual Count
    struct.pack_into(">I2BxxxxxxIIIIIIII", b, 4, data_len, (lun >> 8) & 0x3F, lun & 0xFF, itt, 0xFFFFFFFF,
                     statsn, expcmdsn, maxcmdsn, datasn, offset, abs(residual))
    return b


def build_r2t(itt: int, lun: int, ttt: int, statsn: int, expcmdsn: int, maxcmdsn: int, r2tsn: int,
              offset: int, length: int) -> bytearray:
    b = _bhs(Opcode.R2T, 0x80)
    b[8], b[9] = (lun >> 8) & 0x3F, lun & 0xFF
    struct.pack_into(">IIIIIIII", b, 16, itt, ttt, statsn, expcmdsn, maxcmdsn, r2tsn, offset, length)
    return b


def build_reject(reason: RejectReason, statsn: int, expcmdsn: int, maxcmdsn: int,
                 header: bytes) -> tuple[bytearray, bytes]:
    """Reject (RFC 7143 11.17): the data segment is the offending PDU's header."""
    b = _bhs(Opcode.REJECT, 0x80)
    b[2] = reason
    struct.pack_into(">IIIII", b, 16, 0xFFFFFFFF, 0, statsn, expcmdsn, maxcmdsn)
    return b, header[:BHS_LEN]
