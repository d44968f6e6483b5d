"""Login and text negotiation keys (RFC 7143 section 13), one table, one row per key.

A row says what kind of value a key takes and how the two offers combine (RFC 7143 6.2):
boolean AND/OR, numerical minimum/maximum, a list (the first value of the offer we accept), or
declarative (each side states its own; no result). ``negotiate`` answers one key as a target.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Rule(enum.Enum):
    AND = "and"
    OR = "or"
    MIN = "min"
    MAX = "max"
    LIST = "list"
    DECLARATIVE = "declarative"


@dataclass(frozen=True)
class Key:
    name: str
    rule: Rule
    default: str
    low: int = 0
    high: int = 0


_MAX24 = (1 << 24) - 1

KEYS: dict[str, Key] = {k.name: k for k in (
    Key("HeaderDigest", Rule.LIST, "None"),
    Key("DataDigest", Rule.LIST, "None"),
    Key("MaxConnections", Rule.MIN, "1", 1, 65535),
    Key("SendTargets", Rule.DECLARATIVE, ""),
    Key("TargetName", Rule.DECLARATIVE, ""),
    Key("InitiatorName", Rule.DECLARATIVE, ""),
    Key("TargetAlias", Rule.DECLARATIVE, ""),
    Key("InitiatorAlias", Rule.DECLARATIVE, ""),
    Key("TargetAddress", Rule.DECLARATIVE, ""),
    Key("TargetPortalGroupTag", Rule.DECLARATIVE, ""),
    Key("InitialR2T", Rule.OR, "Yes"),
    Key("ImmediateData", Rule.AND, "Yes"),
    Key("MaxRecvDataSegmentLength", Rule.DECLARATIVE, "8192", 512, _MAX24),
    Key("MaxBurstLength", Rule.MIN, "262144", 512, _MAX24),
    Key("FirstBurstLength", Rule.MIN, "65536", 512, _MAX24),
    Key("DefaultTime2Wait", Rule.MAX, "2", 0, 3600),
    Key("DefaultTime2Retain", Rule.MIN, "20", 0, 3600),
    Key("MaxOutstandingR2T", Rule.MIN, "1", 1, 65535),
    Key("DataPDUInOrder", Rule.OR, "Yes"),
    Key("DataSequenceInOrder", Rule.OR, "Yes"),
    Key("ErrorRecoveryLevel", Rule.MIN, "0", 0, 2),
    Key("SessionType", Rule.DECLARATIVE, "Normal"),
    Key("AuthMethod", Rule.LIST, "None"),
)}

#: RFC 7143 6.1: a key name is at most 63 bytes. Unknown keys are answered NotUnderstood by
#: name, so the bound also keeps that echo small.
MAX_KEY_NAME = 63

NOT_UNDERSTOOD = "NotUnderstood"
REJECT = "Reject"
IRRELEVANT = "Irrelevant"


def session_defaults() -> dict[str, str]:
    """What each key means when it was never negotiated (RFC 7143 section 13 defaults)."""
    return {name: key.default for name, key in KEYS.items() if key.default}


def parse_text(data: bytes) -> list[tuple[str, str]]:
    """``key=value`` pairs, NUL-separated (RFC 7143 6.1). Raises ValueError on a pair with no
    '=', a key name over ``MAX_KEY_NAME`` or a key sent twice in one PDU sequence."""
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in data.split(b"\0"):
        if not item:
            continue
        key, sep, value = item.decode("utf-8", errors="replace").partition("=")
        if not sep or not key:
            raise ValueError(f"text item {item[:40]!r} is not key=value")
        if len(key.encode()) > MAX_KEY_NAME:
            raise ValueError(f"key {key[:40]!r}... longer than {MAX_KEY_NAME} bytes (RFC 7143 6.1)")
        if key in seen:
            raise ValueError(f"key {key} sent twice")
        seen.add(key)
        pairs.append((key, value))
    return pairs


def format_text(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


def _number(key: Key, value: str) -> int | None:
    try:
        n = int(value, 0)
    except ValueError:
        return None
    return n if key.low <= n <= key.high else None


def negotiate(name: str, offered: str, ours: str) -> str | None:
    """Our answer to the initiator's ``name=offered`` given our own value or value list
    (comma-separated for LIST keys). None: nothing to answer (declarative keys)."""
    key = KEYS.get(name)
    if key is None:
        return NOT_UNDERSTOOD
    rule = key.rule
    if rule in (Rule.AND, Rule.OR):
        if offered not in ("Yes", "No"):
            return REJECT
        a, b = offered == "Yes", ours == "Yes"
        return "Yes" if (a and b if rule is Rule.AND else a or b) else "No"
    if rule in (Rule.MIN, Rule.MAX):
        n = _number(key, offered)
        if n is None:
            return REJECT
        mine = int(ours)
        return str(min(n, mine) if rule is Rule.MIN else max(n, mine))
    if rule is Rule.LIST:
        accepted = [v.strip() for v in ours.split(",")]
        for value in offered.split(","):
            if value.strip() in accepted:
                return value.strip()
        return REJECT
    if name == "MaxRecvDataSegmentLength" and _number(key, offered) is None:
        return REJECT
    return None
