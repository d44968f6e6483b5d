"""The NBD sans-I/O cores fed hand-made bytes: the handshake and the reply checks."""

from __future__ import annotations

import struct

import pytest

from lazyiscsi.source.base import SourceNotFound, SourceProtocolError
from lazyiscsi.source.nbd import _is_dirty, _is_zero, replies
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
    assert (hs.result.size, hs.result.structured) == (1 << 30, True)
    assert hs.result.contexts == {"base:allocation": 7}
    assert hs.result.max_payload == 1 << 20


def test_server_without_structured_replies_gets_plain_reads() -> None:
    hs = Handshake("")
    hs.receive(greeting())
    hs.data_to_send()
    hs.receive(opt_reply(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP))
    assert hs.state is State.OPT_GO  # no meta context without structured replies
    hs.receive(opt_reply(Opt.GO, Rep.INFO, export_info(4096)) + opt_reply(Opt.GO, Rep.ACK))
    assert hs.result is not None and not hs.result.structured and hs.result.contexts == {}


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


def status_chunk(payload: bytes, offset: int, length: int, slices: int = 1,
                 max_runs: int = replies.MAX_STATUS_RUNS) -> tuple[int, list[replies.Status]]:
    """Feed a block status payload to ``StatusChunk`` in ``slices`` pieces, as the transport does."""
    parser = replies.StatusChunk(len(payload), offset, length, max_runs)
    step = max(1, len(payload) // slices)
    for i in range(0, len(payload), step):
        parser.feed(payload[i:i + step])
    return parser.result()


def descriptors(*pairs: tuple[int, int]) -> bytes:
    return b"".join(struct.pack(">II", n, flags) for n, flags in pairs)


@pytest.mark.parametrize("slices", [1, 3, 40])
def test_block_status_zero_needs_the_zero_bit(slices: int) -> None:
    # HOLE alone (1) is DATA for us; HOLE|ZERO (3) and ZERO (2) are zero
    payload = struct.pack(">I", 7) + descriptors((100, 1), (100, 3), (100, 2), (500, 0))
    ctx, runs = status_chunk(payload, 0, 450, slices)
    assert ctx == 7
    # runs keep the flags; the last one is clipped to the request
    assert runs == [replies.Status(0, 100, 1), replies.Status(100, 100, 3), replies.Status(200, 100, 2),
                    replies.Status(300, 150, 0)]
    assert [_is_zero(r.flags) for r in runs] == [False, True, True, False]


def test_dirty_is_bit_0_of_the_bitmap_context() -> None:
    """QEMU docs/interop/nbd.txt: qemu:dirty-bitmap:NAME, bit 0 set = dirty; other bits reserved."""
    _, runs = status_chunk(struct.pack(">I", 3) + descriptors((512, 1), (512, 1), (1024, 0), (512, 3)),
                           4096, 2560)
    assert runs == [replies.Status(4096, 1024, 1), replies.Status(5120, 1024, 0),
                    replies.Status(6144, 512, 3)]
    assert [_is_dirty(r.flags) for r in runs] == [True, False, True]


@pytest.mark.parametrize(("payload", "match"), [
    (struct.pack(">III", 7, 0, 0), "length 0"),
    (struct.pack(">II", 7, 1), "4 \\+ a positive multiple of 8"),
    (struct.pack(">I", 7) + descriptors((100, 0), (100, 1), (100, 0)), "run past the request"),
    (struct.pack(">I", 7) + descriptors((300, 0), (1, 1)), "run past the request"),
])
def test_block_status_chunks_that_break_the_rules(payload: bytes, match: str) -> None:
    """NBD document, NBD_REPLY_TYPE_BLOCK_STATUS: lengths MUST be nonzero, the chunk 4 + 8*N
    bytes, and the first N-1 descriptors MUST sum to less than the request's length."""
    with pytest.raises(SourceProtocolError, match=match):
        status_chunk(payload, 0, 200)


def test_a_chunk_with_too_many_runs_is_cut_not_kept() -> None:
    """A server that sends more runs than ``MAX_STATUS_RUNS`` gets a shorter answer (which the
    protocol allows): the kept runs stop at the cap, and nothing after the cut is merged into
    them (a later run with the same flags is not adjacent)."""
    alternating = [(512, i % 2) for i in range(1000)]
    ctx, runs = status_chunk(struct.pack(">I", 9) + descriptors(*alternating), 0, 512 * 1000, slices=7,
                             max_runs=10)
    assert ctx == 9 and len(runs) == 10
    assert runs[-1].end == 10 * 512 and [r.flags for r in runs] == [0, 1] * 5
    # equal flags merge before they count: 1000 descriptors of one state are one run
    _, runs = status_chunk(struct.pack(">I", 9) + descriptors(*[(512, 0)] * 1000), 0, 512 * 1000, max_runs=1)
    assert runs == [replies.Status(0, 512 * 1000, 0)]


def test_the_default_cap_bounds_memory() -> None:
    """MAX_STATUS_RUNS: a 1 GiB query answered with 2^21 alternating 512-byte descriptors keeps
    at most the cap (a Status is ~100 bytes: the cap bounds one chunk to a few MiB)."""
    n = 1 << 21
    payload = struct.pack(">I", 1) + b"".join(
        struct.pack(">IIII", 512, 0, 512, 1) for _ in range(n // 2))
    parser = replies.StatusChunk(len(payload), 0, 512 * n, replies.MAX_STATUS_RUNS)
    for i in range(0, len(payload), replies.STATUS_SLICE):
        parser.feed(payload[i:i + replies.STATUS_SLICE])
    _, runs = parser.result()
    assert len(runs) == replies.MAX_STATUS_RUNS and runs[-1].end == 512 * replies.MAX_STATUS_RUNS


def test_handshake_asks_for_the_bitmap_beside_base_allocation() -> None:
    hs = Handshake("lazy", bitmap="mig")
    hs.receive(greeting())
    hs.data_to_send()
    hs.receive(opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    sent = hs.data_to_send()
    # NBD_OPT_SET_META_CONTEXT: export name, then both queries in one option
    _, opt, _ = struct.unpack_from(">QII", sent)
    assert opt == Opt.SET_META_CONTEXT
    assert sent[16:] == (struct.pack(">I", 4) + b"lazy" + struct.pack(">I", 2)
                         + struct.pack(">I", 15) + b"base:allocation"
                         + struct.pack(">I", 21) + b"qemu:dirty-bitmap:mig")
    # the server may answer in any order, with ids of its own
    hs.receive(opt_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT,
                         struct.pack(">I", 5) + b"qemu:dirty-bitmap:mig"))
    hs.receive(opt_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, struct.pack(">I", 2) + b"base:allocation"))
    hs.receive(opt_reply(Opt.SET_META_CONTEXT, Rep.ACK))
    hs.receive(opt_reply(Opt.GO, Rep.INFO, export_info(1 << 20)) + opt_reply(Opt.GO, Rep.ACK))
    assert hs.result is not None
    assert hs.result.contexts == {"qemu:dirty-bitmap:mig": 5, "base:allocation": 2}


def _at_meta_context(bitmap: str | None = "mig") -> Handshake:
    hs = Handshake("lazy", bitmap=bitmap)
    hs.receive(greeting())
    hs.receive(opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    assert hs.state is State.OPT_SET_META_CONTEXT
    return hs


def test_a_bitmap_the_server_ignores_is_not_negotiated() -> None:
    """A server skips a context it does not offer (QEMU and nbdkit both do): the result says so
    and the caller refuses the open (see the integration tests)."""
    hs = _at_meta_context()
    hs.receive(opt_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, struct.pack(">I", 2) + b"base:allocation")
               + opt_reply(Opt.SET_META_CONTEXT, Rep.ACK)
               + opt_reply(Opt.GO, Rep.INFO, export_info(1 << 20)) + opt_reply(Opt.GO, Rep.ACK))
    assert hs.result is not None and hs.result.contexts == {"base:allocation": 2}


@pytest.mark.parametrize(("replies_", "match"), [
    ([(3, b"qemu:dirty-bitmap:other")], "did not ask for"),
    ([(3, b"base:allocation"), (3, b"qemu:dirty-bitmap:mig")], "selected twice"),
    ([(3, b"base:allocation"), (4, b"base:allocation")], "selected twice"),
])
def test_meta_context_replies_we_cannot_follow(replies_: list[tuple[int, bytes]], match: str) -> None:
    """Every selected context gets a chunk in every block status reply (NBD document): one we
    did not ask for, or a name or id given twice, is refused at the handshake."""
    hs = _at_meta_context()
    with pytest.raises(SourceProtocolError, match=match):
        for ctx, name in replies_:
            hs.receive(opt_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, struct.pack(">I", ctx) + name))


def test_a_refused_meta_context_option_selects_nothing() -> None:
    hs = _at_meta_context()
    hs.receive(opt_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, struct.pack(">I", 2) + b"base:allocation")
               + opt_reply(Opt.SET_META_CONTEXT, Rep.ERR_TOO_BIG)
               + opt_reply(Opt.GO, Rep.INFO, export_info(1 << 20)) + opt_reply(Opt.GO, Rep.ACK))
    assert hs.result is not None and hs.result.contexts == {}
