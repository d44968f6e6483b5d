"""Text carried by Login and Text PDUs across continuation PDUs (RFC 7143 6.1, 11.10-11.13), pure.

A request whose text does not fit one PDU arrives in several, each but the last with the C bit
set; the target answers each of those with an empty response and acts once the last is in
(``Incoming``). A response longer than what the initiator accepts per PDU
(MaxRecvDataSegmentLength; 8192 during login, RFC 7143 13.12) goes out in pieces, each but the
last with the C bit set; the initiator asks for the next with an empty request (``Outgoing``).
Both directions are bounded: a peer decides how much text it sends, never how much we keep.
"""

from __future__ import annotations

#: RFC 7143 13.12: during login both sides use the default MaxRecvDataSegmentLength, 8192
LOGIN_MAX_DATA = 8192
#: The whole text of one login or text exchange, continuation PDUs included. Real initiators
#: send a few hundred bytes (open-iscsi's and libiscsi's longest, CHAP with mutual CHAP, is
#: under 1 KiB); 64 KiB is eight full login PDUs, and keeps what one connection can make us
#: hold, and answer (every key gets at most one answer, a few bytes longer), small.
MAX_TEXT_BYTES = 65536


class TextTooLong(Exception):
    """The initiator's text, with its continuations, exceeds ``MAX_TEXT_BYTES``."""


class Incoming:
    """Gathers one request's text across PDUs with the C bit set."""

    def __init__(self, limit: int = MAX_TEXT_BYTES) -> None:
        self.limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    @property
    def pending(self) -> bool:
        return bool(self._parts)

    def add(self, data: bytes, cont: bool) -> bytes | None:
        """Take one PDU's data; the whole text once the last PDU (C=0) is in, else None."""
        self._size += len(data)
        if self._size > self.limit:
            self._parts, self._size = [], 0  # the next request starts afresh
            raise TextTooLong(f"text of more than {self.limit} bytes across continuation PDUs")
        self._parts.append(data)
        if cont:
            return None
        whole = b"".join(self._parts)
        self._parts, self._size = [], 0
        return whole


class Outgoing:
    """The part of a response not sent yet."""

    def __init__(self) -> None:
        self._rest = b""

    @property
    def pending(self) -> bool:
        return bool(self._rest)

    def first(self, text: bytes, max_data: int) -> tuple[bytes, bool]:
        """The first piece of ``text`` and whether more follows (the C bit)."""
        self._rest = text
        return self.next(max_data)

    def next(self, max_data: int) -> tuple[bytes, bool]:
        """The next piece and whether more follows. Pieces end at a NUL where one lies within
        ``max_data``, so that no key=value pair is cut where an initiator need not expect it
        (RFC 7143 6.1 allows it to be cut anywhere; whole pairs are kinder)."""
        piece = self._rest[:max_data]
        if len(self._rest) > max_data:
            end = piece.rfind(b"\0")
            piece = piece[:end + 1] if end >= 0 else piece
        self._rest = self._rest[len(piece):]
        return piece, bool(self._rest)
