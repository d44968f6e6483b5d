"""The records the migration VM's workload (vm/init) writes, on the host side: the initial disk,
the bytes of a record at a generation, and what a disk holds at each record's place.

A record is one 4 KiB block (one lazyiscsi unit at the default unit size): a 64-byte header
``LZREC IIIIIIII GGGGGGGG <md5>`` padded with spaces and a newline, then ``IIIIIIII:GGGGGGGG;``
repeated over the other 4032 bytes, whose MD5 the header carries. Record I sits at block
``I * stride + 1``: spread over the disk, and never on the blocks a source's identity samples
(the first and the eighths), so writing records does not change a non-live source's identity.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

RECORD = 4096
HEADER = 64
BODY = RECORD - HEADER
MAGIC = b"LZREC"


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the records are: ``records`` of them (a power of two, so that the workload's
    steps 37*S and 11*S+5 visit every one), ``stride`` blocks of 4 KiB apart."""

    records: int = 64
    stride: int = 256

    @property
    def size(self) -> int:
        """The disk's size: one stride per record."""
        return self.records * self.stride * RECORD

    def offset(self, index: int) -> int:
        return (index * self.stride + 1) * RECORD

    def kernel_args(self) -> str:
        return f"lzvm.records={self.records} lzvm.stride={self.stride}"


def record(index: int, gen: int) -> bytes:
    """The 4096 bytes the workload writes for record ``index`` at generation ``gen``."""
    unit = b"%08d:%08d;" % (index, gen)
    body = (unit * (BODY // len(unit) + 1))[:BODY]
    header = b"LZREC %08d %08d %s" % (index, gen, hashlib.md5(body).hexdigest().encode())
    return header.ljust(HEADER - 1) + b"\n" + body


def generation(block: bytes, index: int) -> int | None:
    """The generation of record ``index`` that ``block`` holds intact, else None."""
    fields = block[:HEADER].split()
    if len(fields) != 4 or fields[0] != MAGIC or not fields[2].isdigit() or fields[1] != b"%08d" % index:
        return None
    gen = int(fields[2])
    return gen if block == record(index, gen) else None


def generations(image: bytes, layout: Layout) -> list[int | None]:
    """Each record's generation in a disk image (None where a record is not intact)."""
    return [generation(image[layout.offset(i):layout.offset(i) + RECORD], i) for i in range(layout.records)]


def make_disk(path: Path, layout: Layout, seed: int = 11) -> None:
    """The VM's disk before it boots: random bytes (so that a comparison of whole disks means
    something everywhere) with every record at generation 0."""
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(layout.size))
    for i in range(layout.records):
        data[layout.offset(i):layout.offset(i) + RECORD] = record(i, 0)
    path.write_bytes(bytes(data))


def overlay(image: bytes, layout: Layout, gens: dict[int, int]) -> bytes:
    """``image`` with record I at generation ``gens[I]`` for each I given: the state a disk
    reaches when those writes land on it."""
    data = bytearray(image)
    for i, gen in gens.items():
        data[layout.offset(i):layout.offset(i) + RECORD] = record(i, gen)
    return bytes(data)
