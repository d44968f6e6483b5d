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

from lazyiscsi.source.base import SourceProtocolError
from lazyiscsi.source.nbd.constants import (
    CHUNK_ERROR_BIT,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    Cmd,
    Errno,
    ReplyFlag,
)

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")  # magic, error, cookie
_STRUCTURED_REST = struct.Struct(">HHQI")  # flags, type, cookie, length (after the magic)
_DESCRIPTOR = struct.Struct(">II")  # block status: length, flags
#: largest chunk we read whole (an error's message). Data and block status chunks are not read
#: whole: data lands in the request's buffer, block status is parsed in slices (``StatusChunk``)
MAX_META_CHUNK = 1 << 22
#: The most runs (adjacent descriptors of equal flags merged) one block status chunk, and one
#: ``extents``/``dirty_runs`` query, may hold: a memory bound a server cannot push past (a
#: ``Status`` is about 100 bytes: 6.5 MiB per context). A server's answer beyond it is cut (a
#: shorter answer, which the protocol allows); a query beyond it reports the rest of its range
#: in the state that is never wrong (DATA, dirty). 2^16 runs hold 4 GiB of a 64 KiB-granular
#: bitmap even when every other granule is dirty; QEMU's own server sends at most 2^17
#: descriptors per chunk (nbd/server.c, NBD_MAX_BLOCK_STATUS_EXTENTS).
MAX_STATUS_RUNS = 1 << 16
#: how much of a block status chunk is read at a time (a multiple of 8: whole descriptors)
STATUS_SLICE = 1 << 16


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
    if kind not in (Chunk.OFFSET_DATA, Chunk.BLOCK_STATUS) and length > MAX_META_CHUNK:
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


@dataclass(frozen=True, slots=True)
class Status:
    """A run of one metadata context: ``flags`` as the context defines them (base:allocation:
    ``StateFlag``; qemu:dirty-bitmap: ``DirtyFlag``)."""

    offset: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.offset + self.length


class StatusChunk:
    """One NBD_REPLY_TYPE_BLOCK_STATUS chunk, fed in slices as it arrives (sans I/O).

    NBD document, NBD_REPLY_TYPE_BLOCK_STATUS: a 32-bit context id, then descriptors (32-bit
    length, MUST be nonzero; 32-bit flags). "the sum of the *length* fields of the first N-1
    extents (if any) MUST be less than the requested length", while the last one may run past
    it (clipped here): a descriptor after the one that reached the request's end is refused. A
    server may describe less than asked (the caller asks again from where the runs end) and
    "SHOULD NOT send more than 2^20 extents in a single reply chunk": one that sends millions,
    say for a 512-byte-granular bitmap alternating over a 1 GiB query, must not grow our memory
    or hold the CPU with them. So at most ``max_runs`` runs are kept (adjacent descriptors with
    equal flags merged); once the cap cuts the answer short (which the protocol allows), the
    rest of the chunk is read past without being parsed: nothing of it is used. ``feed`` never
    raises, so that the transport reads the whole chunk and the stream stays in step; ``result``
    raises the first violation seen, for this request only.
    """

    def __init__(self, length: int, req_offset: int, req_length: int, max_runs: int) -> None:
        self._offset, self._end = req_offset, req_offset + req_length
        self._max_runs = max_runs
        self._pending = b""  # a context id or descriptor split across slices
        self._context: int | None = None
        self._runs: list[Status] = []
        self._pos = req_offset  # where the kept runs end
        self._count = 0
        self._cut = False  # the cap was reached: the rest of the chunk is not looked at
        self.error: SourceProtocolError | None = None
        if length < 12 or (length - 4) % 8:
            self.error = SourceProtocolError(f"block status chunk of {length} bytes "
                                             "(must be 4 + a positive multiple of 8)")

    def feed(self, data: bytes) -> None:
        if self.error is not None or self._cut:
            return
        buf = self._pending + data if self._pending else data
        if self._context is None:
            if len(buf) < 4:
                self._pending = bytes(buf)
                return
            (self._context,) = struct.unpack_from(">I", buf)
            buf = buf[4:]
        whole = len(buf) - len(buf) % 8
        self._pending = bytes(buf[whole:])
        for length, flags in _DESCRIPTOR.iter_unpack(memoryview(buf)[:whole]):
            if not self._descriptor(length, flags):
                return

    def _descriptor(self, length: int, flags: int) -> bool:
        """Keep one descriptor; False when the rest of the chunk is not to be looked at."""
        if length == 0:
            self.error = SourceProtocolError("block status descriptor of length 0")
            return False
        if self._pos >= self._end:
            self.error = SourceProtocolError(
                f"block status descriptors run past the request [{self._offset}, "
                f"+{self._end - self._offset}) (descriptor {self._count + 1})")
            return False
        self._count += 1
        if self._runs and self._runs[-1].flags == flags:
            last = self._runs[-1]
            n = min(length, self._end - self._pos)
            self._runs[-1] = Status(last.offset, last.length + n, flags)
        elif len(self._runs) >= self._max_runs:
            self._cut = True
            return False
        else:
            n = min(length, self._end - self._pos)
            self._runs.append(Status(self._pos, n, flags))
        self._pos += n
        return True

    def result(self) -> tuple[int, list[Status]]:
        """(context id, runs from the request's offset, at most to its end)."""
        if self.error is None and not self._cut and (self._pending or not self._count):
            self.error = SourceProtocolError("block status chunk ended inside a descriptor")
        if self.error is not None:
            raise self.error
        assert self._context is not None
        return self._context, self._runs


def errno_name(error: int) -> str:
    try:
        return Errno(error).name
    except ValueError:
        return f"error {error}"
