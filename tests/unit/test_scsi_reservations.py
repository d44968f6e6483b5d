"""Reservations and REPORT SUPPORTED OPERATION CODES through ``execute``, with two I_T nexuses on
one LUN over a real LazyDisk. The access matrix is SPC-4's (and what libiscsi's ProutReserve
tests check over the wire in tests/conformance)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from lazyiscsi.scsi.dispatch import SUPPORTED, Result, execute
from lazyiscsi.scsi.lun import Lun
from lazyiscsi.scsi.reservations import PrType, transport_id
from lazyiscsi.scsi.sense import SENSE_TABLE, Reason, Status
from lazyiscsi.store.lazydisk import LazyDisk
from tests.unit.store_fakes import InstantSource

A = "iqn.test:a,i,0x000000000001"
B = "iqn.test:b,i,0x000000000002"
READ10 = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0)
WRITE10 = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0)
TUR = bytes(6)


@pytest.fixture
def lun(tmp_path: Path) -> Lun:
    disk = LazyDisk.open(str(tmp_path / "cache"), InstantSource(bytes(1 << 20)), autocommit_s=None)
    return Lun(disk, "vm1")


def status(lun: Lun, nexus: str, cdb: bytes, data: bytes | None = None) -> Status:
    return execute(lun, cdb, data, nexus).status


def prout(lun: Lun, nexus: str, action: int, key: int = 0, sa_key: int = 0, pr_type: int = 0,
          flags: int = 0) -> Result:
    cdb = struct.pack(">BBBxxIB", 0x5F, action, pr_type, 24, 0)
    return execute(lun, cdb, struct.pack(">QQ4xBxH", key, sa_key, flags, 0), nexus)


def prin(lun: Lun, nexus: str, action: int, alloc: int = 8192) -> bytes:
    r = execute(lun, struct.pack(">BB5xHB", 0x5E, action, alloc, 0), None, nexus)
    assert r.status is Status.GOOD and r.data_in is not None
    return bytes(r.data_in)


def ua(lun: Lun, nexus: str) -> Reason | None:
    """The pending unit attention a TEST UNIT READY reports (and clears)."""
    r = execute(lun, TUR, None, nexus)
    if r.status is Status.GOOD:
        return None
    assert r.sense is not None
    sense = r.sense
    return next(reason for reason, (_, asc, ascq) in SENSE_TABLE.items()
                if (asc, ascq) == (sense[12], sense[13]))


def test_reserve6_excludes_other_nexus_until_release_or_nexus_loss(lun: Lun) -> None:
    assert status(lun, A, bytes([0x16, 0, 0, 0, 0, 0])) is Status.GOOD
    assert status(lun, A, bytes([0x16, 0, 0, 0, 0, 0])) is Status.GOOD  # again: still ours
    assert status(lun, B, bytes([0x16, 0, 0, 0, 0, 0])) is Status.RESERVATION_CONFLICT
    assert status(lun, B, READ10) is Status.RESERVATION_CONFLICT
    assert status(lun, B, bytes([0x17, 0, 0, 0, 0, 0])) is Status.GOOD  # RELEASE by a non-holder: no-op
    assert status(lun, B, bytes([0x12, 0, 0, 0, 36, 0])) is Status.GOOD  # INQUIRY is always allowed
    assert status(lun, A, READ10) is Status.GOOD
    lun.reservations.nexus_lost(A)
    assert status(lun, B, bytes([0x56] + [0] * 9)) is Status.GOOD  # RESERVE(10)
    lun.reservations.reset()
    assert status(lun, A, READ10) is Status.GOOD


@pytest.mark.parametrize(("pr_type", "registered", "unregistered"), [
    # (can read, can write) for the other nexus, registered and not: SPC-4 table 66
    (PrType.WRITE_EXCLUSIVE, (True, False), (True, False)),
    (PrType.EXCLUSIVE_ACCESS, (False, False), (False, False)),
    (PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, (True, True), (True, False)),
    (PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY, (True, True), (False, False)),
    (PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, (True, True), (True, False)),
    (PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS, (True, True), (False, False)),
])
def test_persistent_reservation_access(lun: Lun, pr_type: PrType, registered: tuple[bool, bool],
                                       unregistered: tuple[bool, bool]) -> None:
    def access(nexus: str) -> tuple[bool, bool]:
        return (status(lun, nexus, READ10) is Status.GOOD,
                status(lun, nexus, WRITE10, bytes(512)) is Status.GOOD)

    assert prout(lun, A, 6, sa_key=0xA).status is Status.GOOD
    assert prout(lun, B, 6, sa_key=0xB).status is Status.GOOD
    assert prout(lun, A, 1, key=0xA, pr_type=pr_type).status is Status.GOOD
    _, length, key, _, _, scope_type, _ = struct.unpack(">IIQIBBH", prin(lun, A, 1))
    all_registrants = pr_type >= PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS
    assert (length, key, scope_type) == (16, 0 if all_registrants else 0xA, pr_type)
    assert access(A) == (True, True)
    assert access(B) == registered
    assert prout(lun, B, 0, key=0xB, sa_key=0).status is Status.GOOD  # unregister B
    assert access(B) == unregistered
    assert status(lun, B, TUR) is Status.GOOD  # TEST UNIT READY is never in conflict
    assert prout(lun, A, 2, key=0xA, pr_type=pr_type).status is Status.GOOD  # RELEASE
    assert access(B) == (True, True)


def test_register_reserve_rules_and_generation(lun: Lun) -> None:
    assert prout(lun, A, 0, key=5, sa_key=1).status is Status.RESERVATION_CONFLICT  # wrong key
    assert prout(lun, A, 0, sa_key=1).status is Status.GOOD
    assert prout(lun, A, 0, key=2, sa_key=3).status is Status.RESERVATION_CONFLICT
    assert prout(lun, A, 0, key=1, sa_key=3).status is Status.GOOD  # change the key
    assert prout(lun, B, 1, key=0, pr_type=1).status is Status.RESERVATION_CONFLICT  # unregistered
    gen, length, key = struct.unpack(">IIQ", prin(lun, B, 0))
    assert (gen, length, key) == (2, 8, 3)
    assert prin(lun, B, 0, alloc=8) == struct.pack(">II", 2, 8)  # truncated, length unchanged
    assert prout(lun, A, 1, key=3, pr_type=3).status is Status.GOOD
    assert prout(lun, A, 1, key=3, pr_type=1).status is Status.RESERVATION_CONFLICT  # other type
    r = prout(lun, A, 2, key=3, pr_type=1)
    assert r.status is Status.CHECK_CONDITION and r.sense is not None
    assert (r.sense[12], r.sense[13]) == (0x26, 0x04)  # INVALID RELEASE OF PERSISTENT RESERVATION
    assert status(lun, A, bytes([0x16, 0, 0, 0, 0, 0])) is Status.RESERVATION_CONFLICT  # no RESERVE(6)
    assert prout(lun, A, 0, key=3, sa_key=0).status is Status.GOOD  # unregistering releases it
    assert prin(lun, A, 1) == struct.pack(">II", 3, 0)  # register, change, unregister


def test_preempt_and_clear_tell_the_others(lun: Lun) -> None:
    prout(lun, A, 6, sa_key=1)
    prout(lun, B, 6, sa_key=2)
    prout(lun, A, 1, key=1, pr_type=PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)
    assert prout(lun, B, 4, key=2, sa_key=9, pr_type=1).status is Status.RESERVATION_CONFLICT  # no key 9
    assert prout(lun, B, 4, key=2, sa_key=1, pr_type=PrType.WRITE_EXCLUSIVE).status is Status.GOOD
    assert ua(lun, A) is Reason.REGISTRATIONS_PREEMPTED
    assert ua(lun, A) is None
    _, _, key, _, _, scope_type, _ = struct.unpack(">IIQIBBH", prin(lun, A, 1))
    assert (key, scope_type) == (2, PrType.WRITE_EXCLUSIVE)  # B took the reservation over
    prout(lun, A, 6, sa_key=7)
    assert prout(lun, B, 3, key=2).status is Status.GOOD  # CLEAR
    assert ua(lun, A) is Reason.RESERVATIONS_PREEMPTED
    assert prin(lun, A, 0) == struct.pack(">II", lun.reservations.generation, 0)


def test_refused_parameters(lun: Lun) -> None:
    def asc(r: Result) -> tuple[int, int]:
        assert r.status is Status.CHECK_CONDITION and r.sense is not None
        return r.sense[12], r.sense[13]

    assert asc(prout(lun, A, 6, sa_key=1, flags=0x01)) == (0x26, 0x00)  # APTPL: not kept over restarts
    assert asc(prout(lun, A, 6, sa_key=1, flags=0x08)) == (0x26, 0x00)  # SPEC_I_PT
    short = execute(lun, struct.pack(">BBBxxIB", 0x5F, 6, 0, 12, 0), bytes(12), A)
    assert asc(short) == (0x1A, 0x00)
    prout(lun, A, 6, sa_key=1)
    assert asc(prout(lun, A, 1, key=1, pr_type=2)) == (0x24, 0x00)  # type 2 does not exist
    assert asc(prout(lun, A, 1, key=1, pr_type=0x11)) == (0x24, 0x00)  # scope other than LU
    assert asc(execute(lun, struct.pack(">BB5xHB", 0x5E, 4, 100, 0), None, A)) == (0x24, 0x00)


def test_report_capabilities_and_full_status(lun: Lun) -> None:
    length, flags, tmv, mask = struct.unpack_from(">HBBH", prin(lun, A, 2))
    assert (length, flags, tmv) == (8, 0x10, 0x80)
    assert mask == 0xEA01  # all six types
    prout(lun, A, 6, sa_key=0x77)
    prout(lun, A, 1, key=0x77, pr_type=PrType.WRITE_EXCLUSIVE)
    full = prin(lun, B, 3)
    tid = transport_id(A)
    assert struct.unpack_from(">II", full) == (2 - 1, 24 + len(tid))
    key, holder, scope_type, port, tid_len = struct.unpack_from(">Q4xBB4xHI", full, 8)
    assert (key, holder, scope_type, port, tid_len) == (0x77, 1, 1, 1, len(tid))
    assert full[32:] == tid and tid[0] == 0x45 and len(tid) % 4 == 0 and tid[4:].rstrip(b"\0") == A.encode()


def _rsoc(lun: Lun, options: int, opcode: int = 0, sa: int = 0, rctd: bool = False) -> Result:
    cdb = struct.pack(">BBBBHIBB", 0xA3, 0x0C, (0x80 if rctd else 0) | options, opcode, sa, 65535, 0, 0)
    return execute(lun, cdb, None, A)


def test_report_supported_operation_codes(lun: Lun) -> None:
    r = _rsoc(lun, 0)
    assert r.status is Status.GOOD and r.data_in is not None
    data = bytes(r.data_in)
    length = struct.unpack_from(">I", data)[0]
    listed = []
    for pos in range(4, 4 + length, 8):
        opcode, sa, flags, cdb_len = struct.unpack_from(">BxHxBH", data, pos)
        listed.append((opcode, sa if flags & 1 else None))
        assert cdb_len in (6, 10, 12, 16)
    assert listed == SUPPORTED
    assert (0x28, None) in listed and (0x9E, 0x10) in listed and (0x5F, 6) in listed
    # every listed command answers when asked alone, and names its opcode first
    for opcode, sa in listed:
        one = _rsoc(lun, 2 if sa is not None else 1, opcode, sa or 0)
        assert one.status is Status.GOOD and one.data_in is not None
        assert one.data_in[1] & 0x07 == 3 and one.data_in[4] == opcode
        wrong = _rsoc(lun, 1 if sa is not None else 2, opcode, sa or 0)
        assert wrong.status is Status.CHECK_CONDITION
    assert _rsoc(lun, 1, 0xC0).data_in == struct.pack(">xBH", 1, 0)  # not supported
    with_timeouts = _rsoc(lun, 0, rctd=True).data_in
    assert with_timeouts is not None and with_timeouts[4 + 5] & 0x02  # CTDP
    assert struct.unpack_from(">H", with_timeouts, 4 + 8)[0] == 0x0A
