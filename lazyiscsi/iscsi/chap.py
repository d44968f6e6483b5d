"""CHAP for iSCSI login (RFC 7143 12.1.3, RFC 1994), target side, one-way and mutual. Pure.

The target sends CHAP_A (algorithm 5, MD5), CHAP_I and CHAP_C; the initiator answers CHAP_N
and CHAP_R = MD5(I || secret || C). For mutual CHAP the initiator also sends its own CHAP_I and
CHAP_C, and the target answers with its name and response. Secrets live only in ``ChapSecrets``
(whose repr hides them) and never appear in an error message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

CHAP_MD5 = "5"
#: RFC 7143 12.1.3: challenges shorter than 16 bytes... are not secure; ours are 32
CHALLENGE_BYTES = 32


class ChapError(Exception):
    """Authentication failed or the CHAP exchange was malformed (login status 0x0201 or 0x0200)."""


@dataclass(frozen=True)
class ChapSecrets:
    """Who may log in (user, secret), and for mutual CHAP the target's own (user, secret)."""

    user: str
    secret: str = field(repr=False)
    mutual_user: str | None = None
    mutual_secret: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # RFC 7143 12.1.3: secrets of at least 12 bytes (96 bits), and the two must differ
        if len(self.secret.encode()) < 12:
            raise ValueError("CHAP secret: at least 12 characters are required")
        if self.mutual_secret is not None:
            if len(self.mutual_secret.encode()) < 12:
                raise ValueError("mutual CHAP secret: at least 12 characters are required")
            if self.mutual_secret == self.secret:
                raise ValueError("mutual CHAP secret: must differ from the initiator's secret")


def encode_binary(data: bytes) -> str:
    return "0x" + data.hex()


def decode_binary(value: str) -> bytes:
    """A binary value in hex (0x) or base64 (0b) form (RFC 7143 6.1)."""
    try:
        if value[:2] in ("0x", "0X"):
            return bytes.fromhex(value[2:])
        if value[:2] in ("0b", "0B"):
            return base64.b64decode(value[2:], validate=True)
    except ValueError:
        pass
    raise ChapError("CHAP value is not hex (0x...) or base64 (0b...)")


def response(identifier: int, secret: str, challenge: bytes) -> bytes:
    return hashlib.md5(bytes([identifier]) + secret.encode() + challenge, usedforsecurity=False).digest()


class ChapExchange:
    """One target-side CHAP exchange."""

    def __init__(self, creds: ChapSecrets) -> None:
        self._creds = creds
        self._id = secrets.randbelow(256)
        self._challenge = secrets.token_bytes(CHALLENGE_BYTES)

    def challenge(self, offered_algorithms: str) -> list[tuple[str, str]]:
        """Answer the initiator's CHAP_A list with our algorithm, identifier and challenge."""
        if CHAP_MD5 not in [a.strip() for a in offered_algorithms.split(",")]:
            raise ChapError("the initiator offers no CHAP algorithm we support (MD5, 5)")
        return [("CHAP_A", CHAP_MD5), ("CHAP_I", str(self._id)), ("CHAP_C", encode_binary(self._challenge))]

    def verify(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        """Check the initiator's CHAP_N/CHAP_R; answer a mutual challenge if there is one."""
        name, resp = keys.get("CHAP_N"), keys.get("CHAP_R")
        if name is None or resp is None:
            raise ChapError("CHAP_N and CHAP_R are required")
        expected = response(self._id, self._creds.secret, self._challenge)
        # compare the user and the response without leaking which one failed, in constant time
        ok = hmac.compare_digest(decode_binary(resp), expected) & (name == self._creds.user)
        if not ok:
            raise ChapError(f"CHAP authentication failed for user {name!r}")
        if "CHAP_I" not in keys and "CHAP_C" not in keys:
            return []
        if self._creds.mutual_secret is None or self._creds.mutual_user is None:
            raise ChapError("the initiator asks for mutual CHAP, which is not configured")
        try:
            their_id = int(keys["CHAP_I"], 0)
        except (KeyError, ValueError):
            raise ChapError("mutual CHAP: bad or missing CHAP_I") from None
        their_challenge = decode_binary(keys.get("CHAP_C", ""))
        if not 0 <= their_id <= 255 or len(their_challenge) < 16:
            raise ChapError("mutual CHAP: CHAP_I out of range or challenge shorter than 16 bytes")
        if their_challenge == self._challenge:
            raise ChapError("mutual CHAP: the initiator reflected our own challenge")
        return [("CHAP_N", self._creds.mutual_user),
                ("CHAP_R", encode_binary(response(their_id, self._creds.mutual_secret, their_challenge)))]
