"""CDB fuzzing: random and boundary CDBs for a list of opcodes (the campaign passes the portal's
own opcode table, so a new command is fuzzed the day it is added), each with a data-out
length and direction chosen to match the CDB or to contradict it.

The CDB length comes from the group code (SPC-4 4.2.5.1); the LBA and transfer length sit where
SBC-4 puts them for each length (5.x). Values cluster at the edges of the LUN and of each field.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

#: SPC-4 4.2.5.1: CDB length by group code (the top three bits of the opcode); 3, 6, 7 vary
LENGTH_BY_GROUP = {0: 6, 1: 10, 2: 10, 3: 16, 4: 16, 5: 12, 6: 16, 7: 16}
#: (LBA offset, LBA size, length offset, length size) by CDB length (SBC-4 5.x)
FIELDS_BY_LENGTH = {6: (1, 3, 4, 1), 10: (2, 4, 7, 2), 12: (2, 4, 6, 4), 16: (2, 8, 10, 4)}
#: opcodes that carry data to the target, so that most of their fuzz cases send some
DATA_OUT = frozenset({0x0A, 0x15, 0x2A, 0x2E, 0x2F, 0x41, 0x42, 0x55, 0x5F, 0x89, 0x8A, 0x8E, 0x8F, 0x93,
                      0xAA, 0xAE, 0xAF})
#: (offset, size) of the parameter list length of the commands that carry one: MODE SELECT
#: (6)/(10) (SPC-4 6.11, 6.12), UNMAP (SBC-4 5.30), PERSISTENT RESERVE OUT (SPC-4 6.16)
PARAMETER_LIST_LENGTH = {0x15: (4, 1), 0x55: (7, 2), 0x42: (7, 2), 0x5F: (5, 4)}
#: opcodes that take a service action in byte 1 (SPC-4 4.2.5.2), with the actions worth hitting
SERVICE_ACTIONS = {0x9E: (0x10, 0x12), 0xA3: (0x0C,), 0x5E: (0, 1, 2, 3), 0x5F: tuple(range(9))}


@dataclass(frozen=True)
class FuzzCommand:
    cdb: bytes
    edtl: int
    read: bool
    write: bool
    data: bytes  # all the data-out the command will carry (immediate, unsolicited, solicited)


def cdb_length(opcode: int) -> int:
    return LENGTH_BY_GROUP[opcode >> 5]


def boundary_cdb(opcode: int, n_blocks: int, rng: random.Random) -> bytes:
    """A CDB whose LBA, length, flags and control byte sit at the edges."""
    n = cdb_length(opcode)
    cdb = bytearray(n)
    cdb[0] = opcode
    lba_at, lba_size, len_at, len_size = FIELDS_BY_LENGTH[n]
    lba_top = (1 << (8 * lba_size)) - 1 if n != 6 else 0x1FFFFF
    length_top = (1 << (8 * len_size)) - 1
    length = min(rng.choice([0, 1, 2, 8, 128, 256, 2048, length_top, length_top - 1,
                             rng.randrange(length_top + 1)]), length_top)
    lba = rng.choice([0, 1, n_blocks - 1, n_blocks, n_blocks + 1, max(n_blocks - length, 0), lba_top,
                      lba_top - 1, rng.randrange(n_blocks)]) & lba_top
    cdb[lba_at:lba_at + lba_size] = lba.to_bytes(lba_size, "big")
    cdb[len_at:len_at + len_size] = length.to_bytes(len_size, "big")
    if opcode in SERVICE_ACTIONS:
        actions = SERVICE_ACTIONS[opcode]
        cdb[1] = (cdb[1] & 0xE0) | (rng.choice(actions) if rng.random() < 0.8 else rng.randrange(32))
    elif n != 6:
        cdb[1] = rng.choice([0, 0, 0x02, 0x04, 0x08, 0x10, 0x18, 0x20, 0xE0, 0xFF])
    if rng.random() < 0.3:  # allocation lengths and parameter list lengths elsewhere in the CDB
        at = rng.randrange(1, n - 2)
        cdb[at:at + 2] = rng.choice([0, 1, 4, 0xFF, 0x100, 0xFFFF]).to_bytes(2, "big")
    cdb[n - 1] = rng.choice([0, 0, 0, 0x01, 0x04, 0x80, 0xFF])  # control: NACA, LINK, vendor bits
    return bytes(cdb)


def random_cdb(opcode: int, rng: random.Random) -> bytes:
    """The opcode and random bytes, sometimes of the wrong length (short or an extended CDB)."""
    n = rng.choice([cdb_length(opcode)] * 6 + [1, 6, 10, 12, 16, 32])
    return bytes([opcode]) + rng.randbytes(n - 1)


def fuzz_command(opcodes: list[int], n_blocks: int, block_size: int, rng: random.Random) -> FuzzCommand:
    """One fuzz case: a boundary or random CDB for one of ``opcodes`` (sometimes another opcode),
    with an EDTL, direction and data-out that agree with the CDB or deliberately do not."""
    opcode = rng.randrange(256) if rng.random() < 0.05 else rng.choice(opcodes)
    cdb = boundary_cdb(opcode, n_blocks, rng) if rng.random() < 0.6 else random_cdb(opcode, rng)
    blocks = int.from_bytes(cdb[FIELDS_BY_LENGTH.get(len(cdb), (1, 3, 4, 1))[2]:][:2], "big") or 1
    natural = min(blocks, 128) * block_size
    sends = opcode in DATA_OUT if rng.random() < 0.9 else rng.random() < 0.5
    edtl = rng.choice([natural, natural, 0, block_size, 24, 4096, 65536, natural + 512,
                       max(natural - 512, 0)])
    if opcode in PARAMETER_LIST_LENGTH and len(cdb) == cdb_length(opcode) and rng.random() < 0.6:
        # a parameter list whose length the CDB states truly, so that its content is parsed
        at, size = PARAMETER_LIST_LENGTH[opcode]
        edtl = rng.choice([8, 12, 24, 28, 40, 64, 200])
        cdb = cdb[:at] + edtl.to_bytes(size, "big") + cdb[at + size:]
        sends = True
    if sends:
        data = _data_out(opcode, edtl, n_blocks, rng)
        return FuzzCommand(cdb, edtl, read=rng.random() < 0.05, write=True, data=data)
    return FuzzCommand(cdb, edtl, read=rng.random() < 0.95, write=rng.random() < 0.05, data=b"")


def _data_out(opcode: int, length: int, n_blocks: int, rng: random.Random) -> bytes:
    """Data-out for ``opcode``: UNMAP block descriptors at the LUN's edges (SBC-4 5.30.2),
    random parameter lists for MODE SELECT / PERSISTENT RESERVE OUT, zeros or random blocks."""
    if opcode == 0x42 and length >= 8:
        descriptors = b"".join(
            rng.choice([0, n_blocks - 1, n_blocks, 1 << 63, rng.randrange(n_blocks)]).to_bytes(8, "big")
            + rng.choice([0, 1, 8, 0xFFFFFFFF, n_blocks]).to_bytes(4, "big") + bytes(4)
            for _ in range(rng.randint(0, 8)))
        header = (len(descriptors) + 6).to_bytes(2, "big") + len(descriptors).to_bytes(2, "big") + bytes(4)
        return (header + descriptors)[:length].ljust(length, b"\0")
    if opcode in (0x15, 0x55) and rng.random() < 0.7:
        return _mode_parameters(opcode == 0x55, length, rng)
    if opcode == 0x5F and rng.random() < 0.7:
        # PERSISTENT RESERVE OUT parameters (SPC-4 6.16.3): keys from a small set, so that
        # registrations, reservations and preemptions of different sessions meet
        keys = [0, 1, 0xFFFFFFFFFFFFFFFF, 0x1234]
        params = (rng.choice(keys).to_bytes(8, "big") + rng.choice(keys).to_bytes(8, "big") + bytes(4)
                  + bytes([rng.choice([0, 1, 4, 5, 0xFF])]) + bytes(3) + rng.randbytes(rng.choice([0, 24])))
        return params[:length].ljust(length, b"\0")
    if rng.random() < 0.3:
        return bytes(length)
    return rng.randbytes(length)


def _mode_parameters(ten: bool, length: int, rng: random.Random) -> bytes:
    """A MODE SELECT parameter list (SPC-4 7.5.4): a header, maybe a block descriptor, then
    pages with the codes a target knows (caching 08h, control 0Ah), 3Fh and others, with
    lengths that fit or do not."""
    descriptor = rng.choice([b"", bytes(8), rng.randbytes(8)])
    # the block descriptor length: bytes 6-7 of the 10-byte form's header, byte 3 of the 6-byte
    header = bytes(6) + len(descriptor).to_bytes(2, "big") if ten else bytes(3) + bytes([len(descriptor)])
    pages = b""
    for _ in range(rng.randint(0, 3)):
        code = rng.choice([0x08, 0x0A, 0x3F, 0x48, 0x00, rng.randrange(64)])
        size = rng.choice([0x12, 0x0A, 0, 1, 0xFF])
        pages += bytes([code, size]) + rng.choice([bytes(size), rng.randbytes(size)])
    params = header + descriptor + pages
    return params[:length].ljust(length, b"\0")
