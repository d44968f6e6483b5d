"""PDU mutation: damage to single PDUs (bit flips, boundary values in BHS fields, another
opcode, a changed or oversized data segment, a stray AHS, a bad digest, a cut stream) and to
sequences (a PDU duplicated, two swapped, one dropped).

Each damaged PDU is damaged in one way, counted by kind in ``counts`` so that a run reports what
it exercised. The fields are those of the BHS common to all PDUs (RFC 7143 11.2.1) plus the
words that carry ITT, TTT/EDTL, CmdSN, ExpStatSN, DataSN and Buffer Offset.
"""

from __future__ import annotations

import random
from collections import Counter

from tests.fuzz.wire import BHS_LEN, Pdu

#: (name, offset, size) of the BHS fields whose values are replaced by boundary values
FIELDS: tuple[tuple[str, int, int], ...] = (
    ("opcode", 0, 1), ("flags", 1, 1), ("byte2", 2, 1), ("byte3", 3, 1), ("total_ahs", 4, 1),
    ("data_segment_length", 5, 3), ("lun", 8, 8), ("itt", 16, 4), ("ttt_or_edtl", 20, 4),
    ("cmdsn", 24, 4), ("expstatsn", 28, 4), ("word32", 32, 4), ("datasn", 36, 4),
    ("buffer_offset", 40, 4), ("word44", 44, 4),
)

#: the largest data segment an oversize mutation sends: past any MaxRecvDataSegmentLength the
#: portal declares (262144), yet cheap enough to send thousands of times in a CI run
OVERSIZE_MAX = 300_000

SEQUENCE_KINDS = ("duplicate", "reorder", "drop")
PDU_KINDS = ("bitflip", "field", "field", "field", "opcode", "data", "oversize", "ahs", "digest", "truncate")


def boundary_values(size: int, current: int, rng: random.Random) -> list[int]:
    """The values a field of ``size`` bytes is most likely to be mishandled at."""
    top = (1 << (8 * size)) - 1
    return [0, 1, top, top - 1, 1 << (8 * size - 1), (1 << (8 * size - 1)) - 1, (current + 1) & top,
            (current - 1) & top, rng.randrange(top + 1)]


class Mutator:
    """Damages a fraction ``rate`` of the PDUs it is given (and sequences at ``rate`` / 4)."""

    def __init__(self, rng: random.Random, rate: float) -> None:
        self.rng = rng
        self.rate = rate
        self.counts: Counter[str] = Counter()

    def __call__(self, pdus: list[Pdu], header_digest: bool, data_digest: bool) -> tuple[bytes, int, bool]:
        rng = self.rng
        seq = list(pdus)
        if len(seq) > 1 and rng.random() < self.rate / 4:
            kind = rng.choice(SEQUENCE_KINDS)
            self.counts[kind] += 1
            i = rng.randrange(len(seq) - 1)
            if kind == "duplicate":
                seq.insert(i, seq[i])
            elif kind == "reorder":
                seq[i], seq[i + 1] = seq[i + 1], seq[i]
            else:
                del seq[i]
        out: list[bytes] = []
        for n, pdu in enumerate(seq):
            if rng.random() >= self.rate:
                out.append(pdu.encode(header_digest=header_digest, data_digest=data_digest))
                continue
            kind = rng.choice(PDU_KINDS)
            if kind == "digest" and not (header_digest or data_digest):
                kind = "bitflip"
            self.counts[kind] += 1
            if kind == "truncate":
                whole = pdu.encode(header_digest=header_digest, data_digest=data_digest)
                out.append(whole[:rng.randrange(1, len(whole))])
                return b"".join(out), n + 1, True
            if kind == "digest":
                bad_header = header_digest and (not data_digest or not pdu.data or rng.random() < 0.5)
                out.append(pdu.encode(header_digest=header_digest, data_digest=data_digest,
                                      bad_header_digest=bad_header, bad_data_digest=not bad_header))
                continue
            damaged = Pdu(bytearray(pdu.bhs), pdu.ahs, pdu.data)
            _DAMAGE[kind](damaged, rng)
            out.append(damaged.encode(header_digest=header_digest, data_digest=data_digest))
        return b"".join(out), len(seq), False


def _set_length(pdu: Pdu) -> None:
    pdu.bhs[5:8] = len(pdu.data).to_bytes(3, "big")


def _bitflip(pdu: Pdu, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 3)):
        bit = rng.randrange(BHS_LEN * 8)
        pdu.bhs[bit // 8] ^= 0x80 >> (bit % 8)


def _field(pdu: Pdu, rng: random.Random) -> None:
    _name, offset, size = rng.choice(FIELDS)
    current = int.from_bytes(pdu.bhs[offset:offset + size], "big")
    value = rng.choice(boundary_values(size, current, rng))
    pdu.bhs[offset:offset + size] = value.to_bytes(size, "big")


def _opcode(pdu: Pdu, rng: random.Random) -> None:
    pdu.bhs[0] = rng.randrange(256) & 0x7F  # any opcode, initiator or target, I bit either way


def _data(pdu: Pdu, rng: random.Random) -> None:
    """A changed data segment with a matching length: the framing holds, the content does not
    (text keys without '=', without the final NUL, very long values, random bytes)."""
    data = bytearray(pdu.data)
    choice = rng.randrange(5)
    if choice == 0 and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif choice == 1:
        data += rng.choice([b"X", b"=", b"\0", b"Key", b"HeaderDigest=CRC32C,None", b"A=" + b"v" * 9000])
    elif choice == 2 and data:
        del data[rng.randrange(len(data)):]
    elif choice == 3:
        data = bytearray(rng.randbytes(rng.choice([1, 3, 48, 512, 4096])))
    else:
        data = bytearray(b"".join(f"K{i}={rng.randrange(1 << 32)}".encode() + b"\0"
                                  for i in range(rng.choice([1, 100, 2000]))))
    pdu.data = bytes(data)
    _set_length(pdu)


def _oversize(pdu: Pdu, rng: random.Random) -> None:
    """Past MaxRecvDataSegmentLength (RFC 7143 11.2.1.6): with the bytes behind it, or only
    announced (the target must not wait for 16 MiB it will never get, or buffer it)."""
    if rng.random() < 0.5:
        pdu.data = rng.randbytes(rng.randint(262145, OVERSIZE_MAX))
        _set_length(pdu)
    else:
        pdu.bhs[5:8] = rng.choice([0xFFFFFF, 262145, 1 << 23]).to_bytes(3, "big")


def _ahs(pdu: Pdu, rng: random.Random) -> None:
    """An AHS of any type (RFC 7143 11.2.2), with a TotalAHSLength that matches or does not."""
    body = rng.randbytes(rng.choice([0, 1, 3, 4, 16, 255]))
    ahs = (len(body) + 1).to_bytes(2, "big") + bytes([rng.choice([0, 1, 2, 0x3F, 0x40, 0xFF]), 0]) + body
    pdu.ahs = ahs + bytes(-len(ahs) % 4)
    pdu.bhs[4] = len(pdu.ahs) // 4 if rng.random() < 0.7 else rng.randrange(256)


_DAMAGE = {"bitflip": _bitflip, "field": _field, "opcode": _opcode, "data": _data, "oversize": _oversize,
           "ahs": _ahs}
