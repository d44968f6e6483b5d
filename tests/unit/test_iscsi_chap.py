"""Target-side CHAP, driven as an initiator would drive it."""

from __future__ import annotations

import secrets

import pytest

from lazyiscsi.iscsi.chap import ChapError, ChapExchange, ChapSecrets, decode_binary, encode_binary, response

CREDS = ChapSecrets("alice", "initiator-secret-1", "target", "target-secret-22")


def _answer(ex: ChapExchange, secret: str, user: str = "alice", **extra: str) -> list[tuple[str, str]]:
    sent = dict(ex.challenge("7,5"))
    r = response(int(sent["CHAP_I"]), secret, decode_binary(sent["CHAP_C"]))
    return ex.verify({"CHAP_N": user, "CHAP_R": encode_binary(r), **extra})


def test_one_way_ok_and_wrong_secret() -> None:
    assert _answer(ChapExchange(CREDS), "initiator-secret-1") == []
    with pytest.raises(ChapError, match="failed") as err:
        _answer(ChapExchange(CREDS), "wrong-secret-xxxx")
    assert "secret" not in str(err.value).replace("failed", "")  # the message names no secret
    with pytest.raises(ChapError):
        _answer(ChapExchange(CREDS), "initiator-secret-1", user="mallory")


def test_mutual_response_is_right() -> None:
    challenge = secrets.token_bytes(16)
    out = dict(_answer(ChapExchange(CREDS), "initiator-secret-1", CHAP_I="9",
                       CHAP_C=encode_binary(challenge)))
    assert out["CHAP_N"] == "target"
    assert decode_binary(out["CHAP_R"]) == response(9, "target-secret-22", challenge)


def test_mutual_refuses_reflection_and_short_challenges() -> None:
    ex = ChapExchange(CREDS)
    sent = dict(ex.challenge("5"))
    r = encode_binary(response(int(sent["CHAP_I"]), "initiator-secret-1", decode_binary(sent["CHAP_C"])))
    with pytest.raises(ChapError, match="reflected"):
        ex.verify({"CHAP_N": "alice", "CHAP_R": r, "CHAP_I": "1", "CHAP_C": sent["CHAP_C"]})
    with pytest.raises(ChapError, match="shorter"):
        _answer(ChapExchange(CREDS), "initiator-secret-1", CHAP_I="1", CHAP_C="0x0102")


def test_bad_input() -> None:
    with pytest.raises(ChapError, match="algorithm"):
        ChapExchange(CREDS).challenge("7")
    with pytest.raises(ChapError, match="hex"):
        decode_binary("zz")
    with pytest.raises(ValueError, match="12"):
        ChapSecrets("u", "short")
    with pytest.raises(ValueError, match="differ"):
        ChapSecrets("u", "same-secret-123", "t", "same-secret-123")
    assert "initiator-secret-1" not in repr(CREDS)
