"""Initiator PDUs and the parsing of target PDUs (RFC 7143 section 11), for the fuzzer only.

A ``Pdu`` keeps its 48-byte BHS as a bytearray so that the mutator can damage any field after
the builder filled it; ``encode`` adds padding and digests but never recomputes a length, so a
damaged DataSegmentLength or TotalAHSLength reaches the target as it is.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import struct
from dataclasses import dataclass, field

import crc32c

BHS_LEN = 48
ALL_ONES = 0xFFFFFFFF


class Op(enum.IntEnum):
    """RFC 7143 11.1.1."""

    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT = 0x02
    LOGIN = 0x03
    TEXT = 0x04
    DATA_OUT = 0x05
    LOGOUT = 0x06
    SNACK = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


#: what a target may send (RFC 7143 11.1.1): anything else from it is a framing bug
TARGET_OPCODES = frozenset(op for op in Op if op >= 0x20)


def digest(data: bytes) -> bytes:
    """CRC32C, least significant byte first (RFC 7143 13.1)."""
    return struct.pack("<I", crc32c.crc32c(data))


@dataclass
class Pdu:
    """An initiator PDU. ``bhs`` is filled by a builder (lengths included) and may be damaged."""

    bhs: bytearray
    ahs: bytes = b""
    data: bytes = b""

    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F

    @property
    def itt(self) -> int:
        return int(struct.unpack_from(">I", self.bhs, 16)[0])

    def encode(self, *, header_digest: bool, data_digest: bool, bad_header_digest: bool = False,
               bad_data_digest: bool = False) -> bytes:
        header = bytes(self.bhs) + self.ahs
        out = [header]
        if header_digest:
            out.append(_spoil(digest(header)) if bad_header_digest else digest(header))
        if self.data:
            padded = self.data + bytes(-len(self.data) % 4)
            out.append(padded)
            if data_digest:
                out.append(_spoil(digest(padded)) if bad_data_digest else digest(padded))
        return b"".join(out)


def _spoil(crc: bytes) -> bytes:
    return bytes([crc[0] ^ 0x01]) + crc[1:]


def _bhs(opcode: Op, flags: int, *, immediate: bool = False, lun: int = 0, itt: int = 0,
         data: bytes = b"", ahs: bytes = b"") -> bytearray:
    b = bytearray(BHS_LEN)
    b[0] = opcode | (0x40 if immediate else 0)
    b[1] = flags
    b[4] = len(ahs) // 4
    b[5:8] = len(data).to_bytes(3, "big")
    b[8:16] = encode_lun(lun)
    struct.pack_into(">I", b, 16, itt)
    return b


def encode_lun(lun: int) -> bytes:
    """SAM-5 4.7: peripheral addressing below 256, flat space addressing above."""
    if lun < 256:
        return bytes([0, lun]) + bytes(6)
    return bytes([0x40 | (lun >> 8) & 0x3F, lun & 0xFF]) + bytes(6)


def login(*, isid: bytes, tsih: int, itt: int, cid: int, cmdsn: int, expstatsn: int, csg: int, nsg: int,
          transit: bool, text: bytes, cont: bool = False) -> Pdu:
    """Login Request (11.12); always immediate."""
    flags = (0x80 if transit else 0) | (0x40 if cont else 0) | (csg << 2) | (nsg if transit else 0)
    b = _bhs(Op.LOGIN, flags, immediate=True, itt=itt, data=text)
    b[8:14] = isid
    struct.pack_into(">HIH", b, 14, tsih, itt, cid)
    struct.pack_into(">II", b, 24, cmdsn, expstatsn)
    return Pdu(b, data=text)


def scsi_command(*, itt: int, lun: int, cmdsn: int, expstatsn: int, cdb: bytes, edtl: int, read: bool,
                 write: bool, final: bool = True, immediate: bool = False, data: bytes = b"",
                 attributes: int = 1) -> Pdu:
    """SCSI Command (11.3); a CDB past 16 bytes goes into an Extended CDB AHS (11.2.2.3)."""
    flags = (0x80 if final else 0) | (0x40 if read else 0) | (0x20 if write else 0) | attributes
    ahs = b""
    if len(cdb) > 16:
        extra = cdb[16:]
        ahs = struct.pack(">HB", len(extra) + 1, 1) + b"\0" + extra
        ahs += bytes(-len(ahs) % 4)
    b = _bhs(Op.SCSI_COMMAND, flags, immediate=immediate, lun=lun, itt=itt, data=data, ahs=ahs)
    struct.pack_into(">III", b, 20, edtl, cmdsn, expstatsn)
    b[32:48] = cdb[:16].ljust(16, b"\0")
    return Pdu(b, ahs, data)


def data_out(*, itt: int, lun: int, ttt: int, expstatsn: int, datasn: int, offset: int, data: bytes,
             final: bool) -> Pdu:
    """SCSI Data-Out (11.7)."""
    b = _bhs(Op.DATA_OUT, 0x80 if final else 0, lun=lun, itt=itt, data=data)
    struct.pack_into(">II", b, 20, ttt, 0)
    struct.pack_into(">I", b, 28, expstatsn)
    struct.pack_into(">II", b, 36, datasn, offset)
    return Pdu(b, data=data)


def nop_out(*, itt: int, ttt: int, cmdsn: int, expstatsn: int, data: bytes = b"", lun: int = 0,
            immediate: bool = False) -> Pdu:
    """NOP-Out (11.18): a ping (ITT set) or the answer to the target's (ITT all ones)."""
    b = _bhs(Op.NOP_OUT, 0x80, immediate=immediate, lun=lun, itt=itt, data=data)
    struct.pack_into(">III", b, 20, ttt, cmdsn, expstatsn)
    return Pdu(b, data=data)


def task_mgmt(*, function: int, itt: int, rtt: int, lun: int, cmdsn: int, expstatsn: int, refcmdsn: int,
              immediate: bool = True) -> Pdu:
    """Task Management Function Request (11.5)."""
    b = _bhs(Op.TASK_MGMT, 0x80 | function, immediate=immediate, lun=lun, itt=itt)
    struct.pack_into(">IIIII", b, 20, rtt, cmdsn, expstatsn, refcmdsn, 0)
    return Pdu(b)


def text(*, itt: int, cmdsn: int, expstatsn: int, body: bytes, ttt: int = ALL_ONES, final: bool = True,
         cont: bool = False, immediate: bool = False) -> Pdu:
    """Text Request (11.10)."""
    b = _bhs(Op.TEXT, (0x80 if final else 0) | (0x40 if cont else 0), immediate=immediate, itt=itt,
             data=body)
    struct.pack_into(">III", b, 20, ttt, cmdsn, expstatsn)
    return Pdu(b, data=body)


def logout(*, itt: int, reason: int, cid: int, cmdsn: int, expstatsn: int, immediate: bool = False) -> Pdu:
    """Logout Request (11.14)."""
    b = _bhs(Op.LOGOUT, 0x80 | reason, immediate=immediate, itt=itt)
    struct.pack_into(">HxxII", b, 20, cid, cmdsn, expstatsn)
    return Pdu(b)


def snack(*, itt: int, kind: int, ttt: int, expstatsn: int, begrun: int, runlength: int) -> Pdu:
    """SNACK Request (11.16): not supported at ERL 0, so the target must reject it."""
    b = _bhs(Op.SNACK, 0x80 | kind, itt=itt)
    struct.pack_into(">I", b, 20, ttt)
    struct.pack_into(">I", b, 28, expstatsn)
    struct.pack_into(">II", b, 40, begrun, runlength)
    return Pdu(b)


def format_text(pairs: list[tuple[str, str]]) -> bytes:
    """key=value pairs, each NUL-terminated (RFC 7143 6.1)."""
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


def parse_text(data: bytes) -> dict[str, str]:
    """The pairs of a target's text; a malformed pair is skipped (the target is checked elsewhere)."""
    out: dict[str, str] = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def chap_response(identifier: int, secret: str, challenge: str) -> str:
    """CHAP_R = MD5(identifier || secret || challenge) (RFC 1994 4.1, RFC 7143 12.1.3)."""
    binary = challenge[2:]
    raw = base64.b64decode(binary) if challenge[:2].lower() == "0b" else bytes.fromhex(binary)
    return "0x" + hashlib.md5(bytes([identifier & 0xFF]) + secret.encode() + raw).hexdigest()


@dataclass
class Response:
    """A target PDU as the fuzzer needs it."""

    bhs: bytes
    data: bytes = field(repr=False)

    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F

    @property
    def flags(self) -> int:
        return self.bhs[1]

    def word(self, offset: int) -> int:
        return int(struct.unpack_from(">I", self.bhs, offset)[0])

    @property
    def itt(self) -> int:
        return self.word(16)


class TargetFramingError(Exception):
    """The target sent something no target may send: that is a finding, not noise."""


class Reader:
    """Cuts the target's byte stream into ``Response`` s. Digests are checked once negotiated."""

    def __init__(self, max_data: int) -> None:
        self.max_data = max_data
        self.header_digest = self.data_digest = False
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk

    def next_response(self) -> Response | None:
        """The next whole target PDU, or None until more bytes come."""
        if len(self._buf) < BHS_LEN:
            return None
        bhs = bytes(self._buf[:BHS_LEN])
        if bhs[0] & 0x3F not in TARGET_OPCODES or bhs[0] & 0x80:
            raise TargetFramingError(f"target PDU with opcode byte {bhs[0]:#04x}: {bhs.hex()}")
        ahs = bhs[4] * 4
        n = int.from_bytes(bhs[5:8], "big")
        if n > self.max_data:
            raise TargetFramingError(f"target PDU {bhs[0] & 0x3F:#04x} with a data segment of {n} bytes, "
                                     f"past our MaxRecvDataSegmentLength {self.max_data}")
        hd = 4 if self.header_digest else 0
        dd = 4 if self.data_digest and n else 0
        total = BHS_LEN + ahs + hd + n + (-n % 4) + dd
        if len(self._buf) < total:
            return None
        raw = bytes(self._buf[:total])
        del self._buf[:total]
        if hd and raw[BHS_LEN + ahs:BHS_LEN + ahs + 4] != digest(raw[:BHS_LEN + ahs]):
            raise TargetFramingError("bad header digest from the target")
        start = BHS_LEN + ahs + hd
        if dd and raw[total - 4:] != digest(raw[start:total - 4]):
            raise TargetFramingError("bad data digest from the target")
        return Response(bhs, raw[start:start + n])
