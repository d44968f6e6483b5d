"""A logical unit: a block backend seen as a direct-access device of a given block size."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import gevent.lock

from lazyiscsi.scsi.reservations import Reservations
from lazyiscsi.scsi.sense import Reason

#: the most blocks one READ/WRITE/VERIFY may move (advertised in the Block Limits VPD page)
MAX_TRANSFER_BYTES = 8 << 20
#: the most blocks one WRITE SAME or UNMAP descriptor may cover (1 Mi blocks of 512 bytes)
MAX_WRITE_SAME_BYTES = 512 << 20
#: the most blocks one COMPARE AND WRITE may cover (Block Limits VPD page, byte 5)
MAX_COMPARE_AND_WRITE_BLOCKS = 32


class BlockBackend(Protocol):
    """What the SCSI layer needs of a store (LazyDisk keeps it): byte addressed, may block."""

    size: int
    unit: int
    #: every byte is local: I/O never waits for a source
    complete: bool
    #: writes are allowed (a live volume refuses them until its cutover)
    writable: bool

    def read(self, offset: int, length: int) -> bytes | bytearray: ...

    def readinto(self, offset: int, buf: memoryview) -> None: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None: ...

    def flush(self) -> None: ...

    def prefetch(self, offset: int, length: int, *, wait: bool = True) -> None: ...


@dataclass
class Lun:
    """One LUN. ``name`` seeds its serial number and NAA identifier, so both stay the same
    across restarts and between the two frontends."""

    backend: BlockBackend
    name: str
    block_size: int = 512
    number: int = 0
    write_cache: bool = True  # WCE in the caching mode page
    #: every LUN number of the target this LUN belongs to (REPORT LUNS answers with them)
    target_luns: list[int] = field(default_factory=list)
    unit_attentions: dict[str, list[Reason]] = field(default_factory=dict)  # nexus -> pending
    #: COMPARE AND WRITE holds it from its read to its write; plain writes do not take it, as
    #: SBC-4 5.3 asks atomicity only against other COMPARE AND WRITE commands here
    compare_lock: gevent.lock.Semaphore = field(default_factory=gevent.lock.Semaphore)
    reservations: Reservations = field(default_factory=Reservations)
    #: nexuses that sent a command while the backend refused writes: each is owed one UNIT
    #: ATTENTION, MODE PARAMETERS CHANGED once it accepts them (``note_writable``)
    read_only_seen: set[str] = field(default_factory=set)
    #: where the target's configuration keeps the unit serial number (LIO's
    #: ``wwn/vpd_unit_serial``, which targetcli shows and may set after the device exists): read
    #: at each INQUIRY, so targetcli and the initiator agree; None or "" there: our own serial
    unit_serial: Callable[[], str | None] | None = None

    def __post_init__(self) -> None:
        if self.block_size not in (512, 4096):
            raise ValueError(f"block size {self.block_size}: must be 512 or 4096")
        if not self.target_luns:
            self.target_luns = [self.number]

    def note_writable(self, nexus: str) -> bool:
        """Whether the backend accepts writes now; a nexus that saw it refuse them is told,
        once, that it changed (SAM-5 5.14: a unit attention for every I_T nexus whose view of
        the logical unit changed; a nexus that came after the change saw no other). The
        set holds nexuses of live sessions only (``nexus_lost``), so it is bounded by the
        frontend's connection limit."""
        if not self.backend.writable:
            self.read_only_seen.add(nexus)
            return False
        if self.read_only_seen and nexus in self.read_only_seen:
            self.read_only_seen.discard(nexus)
            self.unit_attentions.setdefault(nexus, []).append(Reason.MODE_PARAMETERS_CHANGED)
        return True

    def nexus_lost(self, nexus: str) -> None:
        """The I_T nexus ended: nothing is owed to it any more."""
        self.read_only_seen.discard(nexus)

    @property
    def n_blocks(self) -> int:
        """Capacity in blocks; a trailing partial block of the source is not addressable."""
        return self.backend.size // self.block_size

    @property
    def max_transfer_blocks(self) -> int:
        return MAX_TRANSFER_BYTES // self.block_size

    @property
    def max_write_same_blocks(self) -> int:
        return MAX_WRITE_SAME_BYTES // self.block_size

    @property
    def serial(self) -> str:
        return (self.unit_serial() if self.unit_serial else None) or self.default_serial

    @property
    def default_serial(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()[:20]

    @property
    def naa(self) -> bytes:
        """NAA 6 (IEEE Registered Extended) designator, 16 bytes: the 24-bit OUI field holds a
        locally administered value and the rest comes from the name's hash (SPC-4 7.8.6.6.4).
        With a unit serial from LIO, the designator LIO itself forms from it: OUI 00-14-05 and
        the serial's hex digits as the vendor specific identifier (target_core_spc.c,
        spc_gen_naa_6h_vendor_specific), so ``naa.6001405...`` matches what targetcli shows."""
        serial = self.serial
        if serial != self.default_serial:
            digits = "".join(c for c in serial.lower() if c in "0123456789abcdef")
            return bytes.fromhex(("6001405" + digits + "0" * 32)[:32])
        digest = hashlib.sha256(b"lazyiscsi-naa\0" + self.name.encode()).digest()
        oui = 0x000000  # no registered OUI: zero, as LIO does for its default designator
        value = (0x6 << 124) | (oui << 100) | (int.from_bytes(digest[:13], "big") >> 4)
        return value.to_bytes(16, "big")
