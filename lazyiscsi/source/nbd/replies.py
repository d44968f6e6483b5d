"""NBD transmission-phase framing, sans I/O: requests out, reply headers and chunks in.

The transport reads exactly the byte counts these functions name, and lets reply payloads
land straight in the request's buffer (``OFFSET_DATA``), so nothing here copies data. Every
field a server sends is checked against the request it answers; a violation raises
``SourceProtocolError`` and the transport drops that connection (its requests are resent on
a new one).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from lazyiscsi.source.base import Extent, SourceProtocolError
from lazyiscsi.source.nbd.constants import (
    CHUNK_ERROR_BIT,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    Cmd,
    Errno,
    ReplyFlag,
    StateFlag,
)

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")  # magic, error, cookie
_STRUCTURED_REST = struct.Struct(">HHQI")  # flags, type, cookie, length (after the magic)
#: largest non-data chunk we accept (errors carry a message; block status a descriptor list)
MAX_META_CHUNK = 1 << 22


def request(cmd: Cmd, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return _REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


@dataclass(frozen=True)
class SimpleHeader:
    error: int
    cookie: int


@dataclass(frozen=True)
class ChunkHeader:
    done: bool
    type: int
    cookie: int
    length: int

    @property
    def is_error(self) -> bool:
        return bool(self.type & CHUNK_ERROR_BIT)


def magic_of(first4: bytes) -> int:
    (magic,) = struct.unpack(">I", first4)
    if magic not in (SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC):
        raise SourceProtocolError(f"bad reply magic {magic:#x}")
    return magic


def parse_simple(header16: bytes) -> SimpleHeader:
    _magic, error, cookie = _SIMPLE.unpack(header16)
    return SimpleHeader(error, cookie)


def parse_chunk_header(rest16: bytes) -> ChunkHeader:
    """The 16 bytes after a structured reply's magic."""
    flags, kind, cookie, length = _STRUCTURED_REST.unpack(rest16)
    if flags & ~int(ReplyFlag.DONE):  # ~ of an IntFlag keeps only defined bits: use int
        raise SourceProtocolError(f"structured reply with unknown flags {flags:#x}")
    header = ChunkHeader(bool(flags & ReplyFlag.DONE), kind, cookie, length)
    if kind not in (Chunk.OFFSET_DATA,) and length > MAX_META_CHUNK:
        raise SourceProtocolError(f"structured reply chunk of {length} bytes (type {kind})")
    return header


def check_chunk_for(cmd: Cmd, header: ChunkHeader) -> None:
    """Which chunk types may answer which command (NBD document, "Structured reply chunk
    message types"): data and holes only for reads, block status only for block status."""
    if header.is_error:
        return  # any error type (known or not) starts with errno and message: parse_error
    if header.type not in _CHUNKS_FOR.get(cmd, frozenset()):
        raise SourceProtocolError(f"chunk type {header.type} in reply to {cmd.name}")
    if header.type == Chunk.NONE and (header.length or not header.done):
        raise SourceProtocolError("NBD_REPLY_TYPE_NONE must be empty and final")


_CHUNKS_FOR: dict[Cmd, frozenset[int]] = {
    Cmd.READ: frozenset({Chunk.OFFSET_DATA, Chunk.OFFSET_HOLE, Chunk.NONE}),
    Cmd.BLOCK_STATUS: frozenset({Chunk.BLOCK_STATUS, Chunk.NONE}),
}


def data_range(header: ChunkHeader, offset8: bytes, req_offset: int, req_length: int) -> tuple[int, int]:
    """Where an OFFSET_DATA chunk's data goes: (position in the request buffer, length)."""
    if header.length <= 8:
        raise SourceProtocolError("NBD_REPLY_TYPE_OFFSET_DATA without data")
    (offset,) = struct.unpack(">Q", offset8)
    return _inside(offset, header.length - 8, req_offset, req_length, "data")


def hole_range(header: ChunkHeader, payload: bytes, req_offset: int, req_length: int) -> tuple[int, int]:
    if header.length != 12:
        raise SourceProtocolError(f"NBD_REPLY_TYPE_OFFSET_HOLE of {header.length} bytes (expected 12)")
    offset, size = struct.unpack(">QI", payload)
    if size == 0:
        raise SourceProtocolError("NBD_REPLY_TYPE_OFFSET_HOLE of length 0")
    return _inside(offset, size, req_offset, req_length, "hole")


def _inside(offset: int, length: int, req_offset: int, req_length: int, what: str) -> tuple[int, int]:
    if offset < req_offset or offset + length > req_offset + req_length:
        raise SourceProtocolError(f"{what} chunk [{offset}, +{length}) outside the request "
                                  f"[{req_offset}, +{req_length})")
    return offset - req_offset, length


def parse_error(header: ChunkHeader, payload: bytes) -> tuple[int, str]:
    """(errno, message) of an error chunk."""
    if len(payload) < 6:
        raise SourceProtocolError(f"error chunk of {len(payload)} bytes")
    error, msglen = struct.unpack_from(">IH", payload)
    extra = 8 if header.type == Chunk.ERROR_OFFSET else 0
    if 6 + msglen + extra != len(payload):
        raise SourceProtocolError("error chunk length does not match its message length")
    if error == 0:
        raise SourceProtocolError("error chunk with error 0")
    return error, payload[6:6 + msglen].decode(errors="replace")


def parse_block_status(payload: bytes, context_id: int, req_offset: int, req_length: int) -> list[Extent]:
    """Extents of a BLOCK_STATUS chunk for ``context_id``, clipped to the request.

    A server may describe less than asked (the caller asks again from where it stopped) and
    may run its last extent past the end (clipped here)."""
    if len(payload) < 12 or (len(payload) - 4) % 8:
        raise SourceProtocolError(f"block status chunk of {len(payload)} bytes")
    (ctx,) = struct.unpack_from(">I", payload)
    if ctx != context_id:
        raise SourceProtocolError(f"block status for unknown context {ctx}")
    out: list[Extent] = []
    pos, end = req_offset, req_offset + req_length
    for i in range(4, len(payload), 8):
        length, flags = struct.unpack_from(">II", payload, i)
        if length == 0:
            raise SourceProtocolError("block status descriptor of length 0")
        if pos >= end:
            break
        n = min(length, end - pos)
        zero = bool(flags & StateFlag.ZERO)
        if out and out[-1].zero == zero:
            out[-1] = Extent(out[-1].offset, out[-1].length + n, zero)
        else:
            out.append(Extent(pos, n, zero))
        pos += n
    return out


def errno_name(error: int) -> str:
    try:
        return Errno(error).name
    except ValueError:
        return f"error {error}"
