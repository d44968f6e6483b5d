"""Negotiation rules (RFC 7143 6.2 and section 13) row by row."""

from __future__ import annotations

import pytest

from lazyiscsi.iscsi.params import (
    NOT_UNDERSTOOD,
    REJECT,
    format_text,
    negotiate,
    parse_text,
    session_defaults,
)


@pytest.mark.parametrize(("key", "offered", "ours", "answer"), [
    ("InitialR2T", "No", "Yes", "Yes"),  # OR
    ("InitialR2T", "No", "No", "No"),
    ("ImmediateData", "Yes", "No", "No"),  # AND
    ("ImmediateData", "Yes", "Yes", "Yes"),
    ("MaxBurstLength", "1048576", "262144", "262144"),  # MIN
    ("FirstBurstLength", "4096", "65536", "4096"),
    ("DefaultTime2Wait", "0", "2", "2"),  # MAX
    ("ErrorRecoveryLevel", "2", "0", "0"),
    ("HeaderDigest", "CRC32C,None", "None,CRC32C", "CRC32C"),  # LIST: the initiator's order
    ("DataDigest", "CRC32C", "None", REJECT),
    ("AuthMethod", "KRB5,CHAP,None", "CHAP", "CHAP"),
    ("MaxBurstLength", "100", "262144", REJECT),  # below 512
    ("MaxBurstLength", "lots", "262144", REJECT),
    ("InitialR2T", "Maybe", "Yes", REJECT),
    ("X-com.example.Foo", "1", "", NOT_UNDERSTOOD),
    ("MaxRecvDataSegmentLength", "65536", "8192", None),  # declarative
    ("MaxRecvDataSegmentLength", "99", "8192", REJECT),
])
def test_negotiate(key: str, offered: str, ours: str, answer: str | None) -> None:
    assert negotiate(key, offered, ours) == answer


def test_text_round_trip_and_errors() -> None:
    pairs = [("InitiatorName", "iqn.2024-01.test:i"), ("SessionType", "Normal")]
    assert parse_text(format_text(pairs)) == pairs
    with pytest.raises(ValueError, match="twice"):
        parse_text(b"A=1\0A=2\0")
    with pytest.raises(ValueError, match="key=value"):
        parse_text(b"garbage\0")


def test_session_defaults() -> None:
    d = session_defaults()
    assert d["InitialR2T"] == "Yes" and d["MaxBurstLength"] == "262144" and d["HeaderDigest"] == "None"
    assert "TargetName" not in d  # declarative keys without a default
