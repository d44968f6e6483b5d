"""The NBD sans-I/O cores fed hand-made bytes: the handshake and the reply checks."""

from __future__ import annotations

import struct

import pytest

from lazyiscsi.source.base import Extent, SourceNotFound, SourceProtocolError
from lazyiscsi.source.nbd import replies
from lazyiscsi.source.nbd.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    Chunk,
    Cmd,
    Info,
    Opt,
    Rep,
)
from lazyiscsi.source.nbd.handshake import Handshake, State


def greeting(flags: int = 3) -> bytes:
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags)


def opt_reply(opt: Opt, rep: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QIII", OPT_REPLY_MAGIC, opt, rep, len(payload)) + payload


def sent_options(data: bytes) -> list[int]:
    """Option numbers in what the client sent after its 4-byte flags."""
    out, pos = [], 4
    while pos < len(data):
        magic, opt, length = struct.unpack_from(">QII", data, pos)
        assert magic == IHAVEOPT
        out.append(opt)
        pos += 16 + length
    return out


def export_info(size: int, flags: int = 1) -> bytes:
    return struct.pack(">HQH", Info.EXPORT, size, flags)


def test_full_handshake_with_structured_replies_and_block_status() -> None:
    hs = Handshake("disk")
    hs.receive(greeting())
    out = hs.data_to_send()
    assert struct.unpack_from(">I", out)[0] == 3  # C_FIXED_NEWSTYLE | C_NO_ZEROES
    assert sent_options(out) == [Opt.STRUCTURED_REPLY]
    hs.receive(opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    assert hs.state is State.OPT_SET_META_CONTEXT
    hs.data_to_send()
    hs.receive(opt_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, struct.pack(">I", 7) + b"base:allocation"))
    hs.receive(opt_reply(Opt.SET_META_CONTEXT, Rep.ACK))
    assert hs.state is State.OPT_GO
    # replies may arrive split anywhere
    rest = (opt_reply(Opt.GO, Rep.INFO, export_info(1 << 30))
            + opt_reply(Opt.GO, Rep.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, 1, 4096, 1 << 20))
            + opt_reply(Opt.GO, Rep.ACK))
    for i in range(len(rest)):
        hs.receive(rest[i:i + 1])
    assert hs.result is not None
    assert (hs.result.size, hs.result.structured, hs.result.meta_context_id) == (1 << 30, True, 7)
    assert hs.result.max_payload == 1 << 20


def test_server_without_structured_replies_gets_plain_reads() -> None:
    hs = Handshake("")
    hs.receive(greeting())
    hs.data_to_send()
    hs.receive(opt_reply(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP))
    assert hs.state is State.OPT_GO  # no meta context without structured replies
    hs.receive(opt_reply(Opt.GO, Rep.INFO, export_info(4096)) + opt_reply(Opt.GO, Rep.ACK))
    assert hs.result is not None and not hs.result.structured and hs.result.meta_context_id is None


@pytest.mark.parametrize(("data", "match"), [
    (struct.pack(">QQH", 0x1234, IHAVEOPT, 3), "not an NBD server"),
    (struct.pack(">QQH", NBDMAGIC, 0x00420281861253, 3), "oldstyle"),
    (greeting(flags=0), "fixed newstyle"),
])
def test_bad_greetings(data: bytes, match: str) -> None:
    with pytest.raises(SourceProtocolError, match=match):
        Handshake("x").receive(data)


def _at_go() -> Handshake:
    hs = Handshake("vm1", structured=False)
    hs.receive(greeting())
    hs.data_to_send()
    assert hs.state is State.OPT_GO
    return hs


def test_missing_export_is_not_found() -> None:
    with pytest.raises(SourceNotFound, match="'vm1'"):
        _at_go().receive(opt_reply(Opt.GO, Rep.ERR_UNKNOWN, b"no such export"))


@pytest.mark.parametrize(("reply", "match"), [
    (opt_reply(Opt.GO, Rep.ACK), "without NBD_INFO_EXPORT"),
    (opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK), "while waiting for GO"),
    (struct.pack(">QIII", 0xBAD, Opt.GO, Rep.ACK, 0), "bad option reply magic"),
    (opt_reply(Opt.GO, Rep.INFO, struct.pack(">HQ", Info.EXPORT, 5)), "NBD_INFO_EXPORT of 10 bytes"),
    (opt_reply(Opt.GO, Rep.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, 4096, 512, 1 << 20)),
     "inconsistent block sizes"),
    (struct.pack(">QIII", OPT_REPLY_MAGIC, Opt.GO, Rep.INFO, 1 << 30), "implausibly large"),
])
def test_bad_go_replies(reply: bytes, match: str) -> None:
    with pytest.raises(SourceProtocolError, match=match):
        _at_go().receive(reply)


def chunk(kind: int, cookie: int, payload: bytes, done: bool = True) -> replies.ChunkHeader:
    return replies.parse_chunk_header(struct.pack(">HHQI", int(done), kind, cookie, len(payload)))


def test_request_layout() -> None:
    raw = replies.request(Cmd.READ, 9, 4096, 512)
    assert len(raw) == 28
    assert struct.unpack(">IHHQQI", raw) == (0x25609513, 0, Cmd.READ, 9, 4096, 512)


def test_chunk_checks() -> None:
    with pytest.raises(SourceProtocolError, match="bad reply magic"):
        replies.magic_of(b"\x00\x00\x00\x00")
    with pytest.raises(SourceProtocolError, match="unknown flags"):
        replies.parse_chunk_header(struct.pack(">HHQI", 6, Chunk.NONE, 1, 0))
    with pytest.raises(SourceProtocolError, match="chunk type 5 in reply to READ"):
        replies.check_chunk_for(Cmd.READ, chunk(Chunk.BLOCK_STATUS, 1, b"x" * 12))
    with pytest.raises(SourceProtocolError, match="empty and final"):
        replies.check_chunk_for(Cmd.READ, chunk(Chunk.NONE, 1, b"", done=False))
    replies.check_chunk_for(Cmd.READ, chunk(Chunk.ERROR, 1, b"x" * 6))  # errors are always allowed


def test_data_and_hole_chunks_must_stay_inside_the_request() -> None:
    h = chunk(Chunk.OFFSET_DATA, 1, b"\0" * (8 + 100))
    assert replies.data_range(h, struct.pack(">Q", 1100), 1000, 200) == (100, 100)
    with pytest.raises(SourceProtocolError, match="outside the request"):
        replies.data_range(h, struct.pack(">Q", 1101), 1000, 200)
    hole = chunk(Chunk.OFFSET_HOLE, 1, b"\0" * 12)
    assert replies.hole_range(hole, struct.pack(">QI", 1000, 50), 1000, 200) == (0, 50)
    with pytest.raises(SourceProtocolError, match="outside the request"):
        replies.hole_range(hole, struct.pack(">QI", 900, 50), 1000, 200)
    with pytest.raises(SourceProtocolError, match="length 0"):
        replies.hole_range(hole, struct.pack(">QI", 1000, 0), 1000, 200)
    with pytest.raises(SourceProtocolError, match="expected 12"):
        replies.hole_range(chunk(Chunk.OFFSET_HOLE, 1, b"\0" * 16), b"\0" * 16, 0, 10)


def test_error_chunks() -> None:
    payload = struct.pack(">IH", 5, 4) + b"oops"
    assert replies.parse_error(chunk(Chunk.ERROR, 1, payload), payload) == (5, "oops")
    with pytest.raises(SourceProtocolError, match="does not match"):
        bad = struct.pack(">IH", 5, 9) + b"oops"
        replies.parse_error(chunk(Chunk.ERROR, 1, bad), bad)
    with pytest.raises(SourceProtocolError, match="error 0"):
        zero = struct.pack(">IH", 0, 0)
        replies.parse_error(chunk(Chunk.ERROR, 1, zero), zero)


def test_block_status_zero_needs_the_zero_bit() -> None:
    # HOLE alone (1) is DATA for us; HOLE|ZERO (3) and ZERO (2) are zero
    payload = struct.pack(">I", 7) + struct.pack(">IIIIIIII", 100, 1, 100, 3, 100, 2, 500, 0)
    got = replies.parse_block_status(payload, 7, 0, 450)
    assert got == [Extent(0, 100, False), Extent(100, 200, True), Extent(300, 150, False)]
    with pytest.raises(SourceProtocolError, match="unknown context"):
        replies.parse_block_status(payload, 8, 0, 450)
    with pytest.raises(SourceProtocolError, match="length 0"):
        replies.parse_block_status(struct.pack(">III", 7, 0, 0), 7, 0, 10)
    with pytest.raises(SourceProtocolError, match="bytes"):
        replies.parse_block_status(struct.pack(">II", 7, 1), 7, 0, 10)
