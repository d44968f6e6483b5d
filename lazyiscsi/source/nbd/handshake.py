"""The NBD newstyle fixed handshake, sans I/O.

Feed it what the server sent (``receive``), send what it asks (``data_to_send``), until
``result`` is set. No socket, no clock: the transport owns both. States are named after the
message the client waits for, grouped as libnbd groups them:

    NEWSTYLE                 wait for "NBDMAGIC" "IHAVEOPT" + handshake flags
    OPT_STRUCTURED_REPLY     wait for the reply to NBD_OPT_STRUCTURED_REPLY
    OPT_SET_META_CONTEXT     wait for META_CONTEXT replies then ACK for "base:allocation"
                             (and "qemu:dirty-bitmap:NAME" when a bitmap is wanted)
    OPT_GO                   wait for INFO replies then ACK for NBD_OPT_GO
    READY                    negotiated: the transmission phase may begin

Refusals that only cost a feature (no structured replies, no block status) are accepted and
recorded; refusals of the export itself become typed ``SourceError`` reasons. Whether a wanted
dirty bitmap was granted is the caller's to judge (``Negotiated.contexts``): a server ignores a
context it does not offer rather than refusing it (NBD document, NBD_OPT_SET_META_CONTEXT: "The
server MAY ignore queries that do not select a single metadata context").
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from lazyiscsi.source.base import SourceError, SourceNotFound, SourceProtocolError, SourceUnavailable
from lazyiscsi.source.nbd.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    QEMU_DIRTY_BITMAP,
    REP_ERROR_BIT,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)

_OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
#: the NBD document caps option replies far below this; a bigger one is a broken server
_MAX_OPT_REPLY = 1 << 20
DEFAULT_MAX_PAYLOAD = 32 << 20


class State(enum.Enum):
    NEWSTYLE = "NEWSTYLE"
    OPT_STRUCTURED_REPLY = "OPT_STRUCTURED_REPLY"
    OPT_SET_META_CONTEXT = "OPT_SET_META_CONTEXT"
    OPT_GO = "OPT_GO"
    READY = "READY"


#: which option's reply each state waits for
_WAITS_FOR: dict[State, Opt] = {
    State.OPT_STRUCTURED_REPLY: Opt.STRUCTURED_REPLY,
    State.OPT_SET_META_CONTEXT: Opt.SET_META_CONTEXT,
    State.OPT_GO: Opt.GO,
}

#: option errors that refuse the export: reason class and wording
_EXPORT_ERRORS: dict[Rep, tuple[type[SourceError], str]] = {
    Rep.ERR_UNKNOWN: (SourceNotFound, "the server has no export named {name!r}"),
    Rep.ERR_POLICY: (SourceError, "the server refuses export {name!r} by policy (access denied)"),
    Rep.ERR_TLS_REQD: (SourceError, "the server requires TLS for export {name!r} (use nbds://)"),
    Rep.ERR_SHUTDOWN: (SourceUnavailable, "the server is shutting down"),
    Rep.ERR_INVALID: (SourceProtocolError, "the server calls our request for {name!r} invalid"),
    Rep.ERR_PLATFORM: (SourceError, "the server cannot serve {name!r} on its platform"),
    Rep.ERR_BLOCK_SIZE_REQD: (SourceProtocolError, "the server requires block size negotiation"),
    Rep.ERR_TOO_BIG: (SourceProtocolError, "the server found our request too big"),
    Rep.ERR_UNSUP: (SourceProtocolError, "the server does not support NBD_OPT_GO (too old)"),
}


@dataclass(frozen=True)
class Negotiated:
    """What the handshake settled: everything the transmission phase needs."""

    size: int
    flags: TransmissionFlag
    structured: bool
    #: the metadata contexts the server selected, name -> id. The ids are the server's, valid on
    #: this connection only (NBD document: "clients MUST therefore treat the ID as an opaque
    #: value and not (for instance) cache it between connections")
    contexts: dict[str, int]
    min_block: int
    preferred_block: int
    max_payload: int


class Handshake:
    """One handshake for export ``name``."""

    def __init__(self, name: str, *, structured: bool = True, block_status: bool = True,
                 bitmap: str | None = None) -> None:
        self.name = name
        self._want_structured = structured
        #: the contexts NBD_OPT_SET_META_CONTEXT asks for, in order
        self._queries = ([BASE_ALLOCATION] if block_status else []) + (
            [QEMU_DIRTY_BITMAP + bitmap] if bitmap is not None else [])
        self.state = State.NEWSTYLE
        self._in = bytearray()
        self._out = bytearray()
        self._structured = False
        self._contexts: dict[str, int] = {}
        self._size: int | None = None
        self._flags = TransmissionFlag(0)
        self._blocks = (1, 4096, DEFAULT_MAX_PAYLOAD)
        self._no_zeroes = False
        self.result: Negotiated | None = None

    # -- the sans-I/O interface ----------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Take bytes from the server and advance as far as they allow."""
        self._in += data
        while self.result is None:
            if not self._step():
                break

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    # -- steps -----------------------------------------------------------------------------

    def _step(self) -> bool:
        if self.state is State.NEWSTYLE:
            if len(self._in) < 18:
                return False
            magic, opt, flags = struct.unpack_from(">QQH", self._in)
            del self._in[:18]
            if magic != NBDMAGIC:
                raise SourceProtocolError("not an NBD server (bad greeting magic)")
            if opt != IHAVEOPT:
                raise SourceProtocolError("the server speaks only oldstyle NBD (no options)")
            hflags = HandshakeFlag(flags & 3)
            if not hflags & HandshakeFlag.FIXED_NEWSTYLE:
                raise SourceProtocolError("the server does not offer fixed newstyle negotiation")
            cflags = ClientFlag.C_FIXED_NEWSTYLE
            if hflags & HandshakeFlag.NO_ZEROES:
                cflags |= ClientFlag.C_NO_ZEROES
            self._out += struct.pack(">I", cflags)
            self._next_option_after(State.NEWSTYLE)
            return True
        if len(self._in) < _OPT_REPLY.size:
            return False
        magic, opt, rep, length = _OPT_REPLY.unpack_from(self._in)
        if magic != OPT_REPLY_MAGIC:
            raise SourceProtocolError(f"bad option reply magic {magic:#x}")
        if length > _MAX_OPT_REPLY:
            raise SourceProtocolError(f"option reply of {length} bytes is implausibly large")
        if len(self._in) < _OPT_REPLY.size + length:
            return False
        payload = bytes(self._in[_OPT_REPLY.size:_OPT_REPLY.size + length])
        del self._in[:_OPT_REPLY.size + length]
        expected = _WAITS_FOR[self.state]
        if opt != expected:
            raise SourceProtocolError(f"reply to option {opt} while waiting for {expected.name}")
        _REPLY_HANDLERS[self.state](self, rep, payload)
        return True

    def _next_option_after(self, state: State) -> None:
        """Send the next option in the sequence and move to the state that waits for it."""
        if state is State.NEWSTYLE and self._want_structured:
            self._send_option(Opt.STRUCTURED_REPLY, b"")
            self.state = State.OPT_STRUCTURED_REPLY
        elif state in (State.NEWSTYLE, State.OPT_STRUCTURED_REPLY) and self._structured and self._queries:
            # NBD document, NBD_OPT_SET_META_CONTEXT: export name, number of queries, queries; one
            # option with every query, since each SET_META_CONTEXT replaces the previous selection
            name = self.name.encode()
            data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(self._queries))
            for query in self._queries:
                data += struct.pack(">I", len(query.encode())) + query.encode()
            self._send_option(Opt.SET_META_CONTEXT, data)
            self.state = State.OPT_SET_META_CONTEXT
        else:
            name = self.name.encode()
            infos = (Info.EXPORT, Info.BLOCK_SIZE)
            self._send_option(Opt.GO, struct.pack(">I", len(name)) + name
                              + struct.pack(f">H{len(infos)}H", len(infos), *infos))
            self.state = State.OPT_GO

    def _send_option(self, opt: Opt, data: bytes) -> None:
        self._out += struct.pack(">QII", IHAVEOPT, opt, len(data)) + data

    # -- reply handlers, one per waiting state --------------------------------------------

    def _on_structured_reply(self, rep: int, payload: bytes) -> None:
        if rep == Rep.ACK:
            self._structured = True
        elif not rep & REP_ERROR_BIT:
            raise SourceProtocolError(f"unexpected reply {rep} to NBD_OPT_STRUCTURED_REPLY")
        # any error: carry on with simple replies (no holes, no block status)
        self._next_option_after(State.OPT_STRUCTURED_REPLY)

    def _on_meta_context(self, rep: int, payload: bytes) -> None:
        if rep == Rep.META_CONTEXT:
            if len(payload) < 4:
                raise SourceProtocolError("short NBD_REP_META_CONTEXT")
            (ctx,) = struct.unpack_from(">I", payload)
            name = payload[4:].decode(errors="replace")
            # every context the server selects gets one chunk in every block status reply, so
            # one we did not ask for (or a repeated name or id) is a server we cannot follow
            if name not in self._queries:
                raise SourceProtocolError(f"the server selected meta context {name[:80]!r}, "
                                          "which we did not ask for")
            if name in self._contexts or ctx in self._contexts.values():
                raise SourceProtocolError(f"meta context {name!r} (id {ctx}) selected twice")
            self._contexts[name] = ctx
            return  # more may follow; ACK ends the list
        if rep != Rep.ACK and not rep & REP_ERROR_BIT:
            raise SourceProtocolError(f"unexpected reply {rep} to NBD_OPT_SET_META_CONTEXT")
        if rep & REP_ERROR_BIT:
            # "replaces all previously-set metadata contexts (including when this command
            # fails)": no block status; everything reads as DATA, a wanted bitmap is missing
            self._contexts = {}
        self._next_option_after(State.OPT_SET_META_CONTEXT)

    def _on_go(self, rep: int, payload: bytes) -> None:
        if rep == Rep.INFO:
            self._on_info(payload)
            return
        if rep == Rep.ACK:
            if self._size is None:
                raise SourceProtocolError("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
            lo, pref, hi = self._blocks
            self.state = State.READY
            self.result = Negotiated(size=self._size, flags=self._flags, structured=self._structured,
                                     contexts=dict(self._contexts), min_block=lo, preferred_block=pref,
                                     max_payload=hi)
            return
        if rep & REP_ERROR_BIT:
            try:
                reason, text = _EXPORT_ERRORS[Rep(rep)]
            except (KeyError, ValueError):
                reason, text = SourceError, "the server refused export {name!r} (error " + str(rep) + ")"
            detail = payload.decode(errors="replace").strip()
            msg = text.format(name=self.name) + (f": {detail}" if detail else "")
            raise reason(msg)
        raise SourceProtocolError(f"unexpected reply {rep} to NBD_OPT_GO")

    def _on_info(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise SourceProtocolError("short NBD_REP_INFO")
        (kind,) = struct.unpack_from(">H", payload)
        if kind == Info.EXPORT:
            if len(payload) != 12:
                raise SourceProtocolError(f"NBD_INFO_EXPORT of {len(payload)} bytes (expected 12)")
            self._size, flags = struct.unpack_from(">QH", payload, 2)
            self._flags = TransmissionFlag(flags)
        elif kind == Info.BLOCK_SIZE:
            if len(payload) != 14:
                raise SourceProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes (expected 14)")
            lo, pref, hi = struct.unpack_from(">III", payload, 2)
            if not (lo and pref and hi) or lo > pref or lo > hi:
                raise SourceProtocolError(f"inconsistent block sizes {lo}/{pref}/{hi}")
            self._blocks = (lo, pref, min(hi, DEFAULT_MAX_PAYLOAD))
        # other INFO kinds (name, description) are optional: ignore


_REPLY_HANDLERS = {
    State.OPT_STRUCTURED_REPLY: Handshake._on_structured_reply,
    State.OPT_SET_META_CONTEXT: Handshake._on_meta_context,
    State.OPT_GO: Handshake._on_go,
}
