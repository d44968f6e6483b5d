"""Reservations of one LUN: SPC-2 RESERVE/RELEASE and SPC-4 persistent reservations.

The embedded portal needs them (clusters fence each other with them); under LIO the kernel keeps
its own, so the TCMU frontend never calls in here. Registrations are kept in memory only: after a
restart they are gone, which REPORT CAPABILITIES says (PTPL_C=0) and APTPL=1 is refused, rather
than promising persistence through power loss that we would not keep.

An I_T nexus is named by its iSCSI initiator port name, ``iqn...,i,0x<ISID>`` (RFC 7143 13.1):
two sessions of one initiator are two nexuses, as they are to LIO.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from lazyiscsi.scsi.cdb import Op, ServiceActionIn
from lazyiscsi.scsi.sense import Reason, SenseError, invalid_cdb, invalid_param


class Conflict(Exception):
    """The command ends in RESERVATION CONFLICT status (SAM-5 5.3.1)."""


class PrType(enum.IntEnum):
    WRITE_EXCLUSIVE = 1
    EXCLUSIVE_ACCESS = 3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 8


class PrOut(enum.IntEnum):
    REGISTER = 0
    RESERVE = 1
    RELEASE = 2
    CLEAR = 3
    PREEMPT = 4
    PREEMPT_AND_ABORT = 5
    REGISTER_AND_IGNORE_EXISTING_KEY = 6


class PrIn(enum.IntEnum):
    READ_KEYS = 0
    READ_RESERVATION = 1
    REPORT_CAPABILITIES = 2
    READ_FULL_STATUS = 3


_WRITE_EXCLUSIVE = frozenset({PrType.WRITE_EXCLUSIVE, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
                              PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS})
_REGISTRANTS_ONLY = frozenset({PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
                               PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY})
_ALL_REGISTRANTS = frozenset({PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
                              PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS})

#: commands any nexus may send whatever is reserved (SPC-4 table 66 and SBC-4 table 13, "Allowed")
_ALWAYS_ALLOWED = frozenset({
    Op.INQUIRY, Op.REPORT_LUNS, Op.REQUEST_SENSE, Op.TEST_UNIT_READY, Op.READ_CAPACITY_10,
    Op.MAINTENANCE_IN, Op.PERSISTENT_RESERVE_IN, Op.PERSISTENT_RESERVE_OUT,
})
#: commands that only read the medium or its settings: allowed under the Write Exclusive types
_READS = frozenset({
    Op.READ_6, Op.READ_10, Op.READ_12, Op.READ_16, Op.VERIFY_10, Op.VERIFY_12, Op.VERIFY_16,
    Op.MODE_SENSE_6, Op.MODE_SENSE_10,
})
#: what a nexus that does not hold an SPC-2 reservation may still send (SPC-2 5.5.1)
_SPC2_ALLOWED = frozenset({Op.INQUIRY, Op.REPORT_LUNS, Op.REQUEST_SENSE, Op.RELEASE_6, Op.RELEASE_10})

#: PARAMETER LIST LENGTH of PERSISTENT RESERVE OUT without SPEC_I_PT (SPC-4 6.16.3)
PR_OUT_LENGTH = 24


def transport_id(nexus: str) -> bytes:
    """iSCSI TransportID with an initiator port name (format 01b, protocol 5; SPC-4 7.6.4.6):
    the name NUL-terminated, padded to a multiple of 4 bytes, at least 20 in all."""
    name = nexus.encode() + b"\0"
    name += bytes(-len(name) % 4)
    if len(name) < 16:
        name += bytes(16 - len(name))
    return bytes([0x45, 0]) + struct.pack(">H", len(name)) + name


@dataclass
class Reservations:
    generation: int = 0
    #: registered nexus -> its reservation key
    keys: dict[str, int] = field(default_factory=dict)
    #: the persistent reservation: its type (None: none), holder (None for the all-registrants
    #: types, where every registrant holds it) and the key it was made with
    type: PrType | None = None
    holder: str | None = None
    key: int = 0
    #: the SPC-2 reservation's holder
    spc2_holder: str | None = None

    # -- who may do what ----------------------------------------------------------------------

    def holds(self, nexus: str) -> bool:
        if self.type in _ALL_REGISTRANTS:
            return nexus in self.keys
        return self.type is not None and self.holder == nexus

    def check(self, op: Op, cdb: bytes, nexus: str) -> None:
        """Raise ``Conflict`` if a reservation keeps ``nexus`` from running this command."""
        if self.spc2_holder is not None and self.spc2_holder != nexus:
            if op not in _SPC2_ALLOWED:
                raise Conflict
            return
        if self.type is None or self.holds(nexus) or op in _ALWAYS_ALLOWED:
            return
        if self.type in _REGISTRANTS_ONLY and nexus in self.keys:
            return
        action = cdb[1] & 0x1F if op is Op.SERVICE_ACTION_IN_16 else None
        if action == ServiceActionIn.READ_CAPACITY_16:
            return  # READ CAPACITY is allowed under every type
        reads = op in _READS or action == ServiceActionIn.GET_LBA_STATUS
        if reads and self.type in _WRITE_EXCLUSIVE:
            return
        raise Conflict

    # -- SPC-2 RESERVE / RELEASE ---------------------------------------------------------------

    def reserve(self, nexus: str) -> None:
        """With registrations present RESERVE conflicts (SPC-4 5.13.3, what CRH=1 announces)."""
        if self.keys or self.type is not None:
            raise Conflict
        if self.spc2_holder not in (None, nexus):
            raise Conflict
        self.spc2_holder = nexus

    def release(self, nexus: str) -> None:
        """From a nexus that holds nothing, RELEASE is a no-op that succeeds (SPC-2 7.21)."""
        if self.spc2_holder == nexus:
            self.spc2_holder = None

    def nexus_lost(self, nexus: str) -> None:
        """Logout or a dropped connection ends an SPC-2 reservation; registrations stay."""
        self.release(nexus)

    def reset(self) -> None:
        """LUN or target reset: SPC-2 reservations end, persistent ones persist (SPC-4 5.13.2)."""
        self.spc2_holder = None

    # -- PERSISTENT RESERVE IN ------------------------------------------------------------------

    def persistent_in(self, cdb: bytes) -> bytes:
        action = cdb[1] & 0x1F
        if action == PrIn.READ_KEYS:
            keys = b"".join(struct.pack(">Q", k) for k in self.keys.values())
            return struct.pack(">II", self.generation, len(keys)) + keys
        if action == PrIn.READ_RESERVATION:
            if self.type is None:
                return struct.pack(">II", self.generation, 0)
            key = 0 if self.type in _ALL_REGISTRANTS else self.key
            return struct.pack(">IIQIBBH", self.generation, 16, key, 0, 0, self.type, 0)
        if action == PrIn.REPORT_CAPABILITIES:
            # CRH=1; SIP_C, ATP_C, PTPL_C = 0 (none supported); TMV=1, ALLOW COMMANDS 000b
            return struct.pack(">HBBHH", 8, 0x10, 0x80, _type_mask(), 0)
        if action == PrIn.READ_FULL_STATUS:
            out = bytearray()
            for nexus, key in self.keys.items():
                tid = transport_id(nexus)
                holder = self.holds(nexus)
                scope_type = self.type if holder and self.type is not None else 0
                out += struct.pack(">Q4xBB4xHI", key, int(holder), scope_type, 1, len(tid)) + tid
            return struct.pack(">II", self.generation, len(out)) + bytes(out)
        raise invalid_cdb(1, 4)

    # -- PERSISTENT RESERVE OUT -----------------------------------------------------------------

    def persistent_out(self, cdb: bytes, data: memoryview | None, nexus: str,
                       unit_attentions: dict[str, list[Reason]]) -> None:
        """Run one service action; ``unit_attentions`` receives what other nexuses must be told."""
        try:
            action = PrOut(cdb[1] & 0x1F)
        except ValueError:
            raise invalid_cdb(1, 4) from None  # REGISTER AND MOVE is not supported
        length = struct.unpack_from(">I", cdb, 5)[0]
        if length != PR_OUT_LENGTH or data is None or len(data) != PR_OUT_LENGTH:
            raise SenseError(Reason.PARAMETER_LIST_LENGTH_ERROR)
        key, sa_key = struct.unpack_from(">QQ", data, 0)
        flags = data[20]
        if flags & 0x08:
            raise invalid_param(20, 3)  # SPEC_I_PT: SIP_C=0
        if flags & 0x04:
            raise invalid_param(20, 2)  # ALL_TG_PT: ATP_C=0 (one target port)
        if flags & 0x01:
            raise invalid_param(20, 0)  # APTPL: registrations do not survive a restart (PTPL_C=0)
        if action in (PrOut.REGISTER, PrOut.REGISTER_AND_IGNORE_EXISTING_KEY):
            self._register(nexus, key, sa_key, ignore=action is PrOut.REGISTER_AND_IGNORE_EXISTING_KEY,
                           unit_attentions=unit_attentions)
            return
        if self.keys.get(nexus) != key:
            raise Conflict  # every other action needs this nexus registered with this key
        if action is PrOut.CLEAR:
            for other in self.keys:
                if other != nexus:
                    unit_attentions.setdefault(other, []).append(Reason.RESERVATIONS_PREEMPTED)
            self.keys.clear()
            self._drop_reservation()
            self.generation += 1
            return
        pr_type = _pr_type(cdb)
        if action is PrOut.RESERVE:
            if self.type is None:
                self.type, self.holder, self.key = pr_type, nexus, key
            elif not (self.holds(nexus) and self.type == pr_type):
                raise Conflict
        elif action is PrOut.RELEASE:
            if self.type is None or not self.holds(nexus):
                return
            if self.type != pr_type:
                raise SenseError(Reason.INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
            if self.type in _REGISTRANTS_ONLY | _ALL_REGISTRANTS:
                for other in self.keys:
                    if other != nexus:
                        unit_attentions.setdefault(other, []).append(Reason.RESERVATIONS_RELEASED)
            self._drop_reservation()
        else:
            self._preempt(nexus, key, sa_key, pr_type, unit_attentions)

    def _register(self, nexus: str, key: int, sa_key: int, *, ignore: bool,
                  unit_attentions: dict[str, list[Reason]]) -> None:
        current = self.keys.get(nexus)
        if not ignore and (key != (current if current is not None else 0)):
            raise Conflict
        if current is None and sa_key == 0:
            return  # unregistering what is not registered: nothing to do (SPC-4 5.13.7)
        if sa_key:
            self.keys[nexus] = sa_key
            if self.holder == nexus:
                self.key = sa_key
        else:
            self._unregister(nexus, unit_attentions)
        self.generation += 1

    def _unregister(self, nexus: str, unit_attentions: dict[str, list[Reason]]) -> None:
        """A holder unregistering releases the reservation; an all-registrants reservation lasts
        until its last registrant goes (SPC-4 5.13.11.2.2)."""
        del self.keys[nexus]
        if self.type is None:
            return
        if self.type in _ALL_REGISTRANTS:
            if not self.keys:
                self._drop_reservation()
        elif self.holder == nexus:
            if self.type in _REGISTRANTS_ONLY:
                for other in self.keys:
                    unit_attentions.setdefault(other, []).append(Reason.RESERVATIONS_RELEASED)
            self._drop_reservation()

    def _preempt(self, nexus: str, key: int, sa_key: int, pr_type: PrType,
                 unit_attentions: dict[str, list[Reason]]) -> None:
        """PREEMPT (and PREEMPT AND ABORT, whose aborts have nothing to stop here: commands of
        other sessions run to completion before their status is sent) (SPC-4 5.13.11.2.4)."""
        if self.type in _ALL_REGISTRANTS and sa_key == 0:
            victims = [n for n in self.keys if n != nexus]
            take = True
        else:
            if sa_key == 0:
                raise invalid_param(8)
            victims = [n for n, k in self.keys.items() if k == sa_key and n != nexus]
            take = self.type is not None and self.type not in _ALL_REGISTRANTS and self.key == sa_key
            if not victims and not take:
                raise Conflict
        for victim in victims:
            del self.keys[victim]
            unit_attentions.setdefault(victim, []).append(Reason.REGISTRATIONS_PREEMPTED)
        if take:
            self.type, self.holder, self.key = pr_type, nexus, key
        self.generation += 1

    def _drop_reservation(self) -> None:
        self.type, self.holder, self.key = None, None, 0


def _pr_type(cdb: bytes) -> PrType:
    if cdb[2] >> 4:
        raise invalid_cdb(2, 7)  # SCOPE: only LU_SCOPE (0h)
    try:
        return PrType(cdb[2] & 0x0F)
    except ValueError:
        raise invalid_cdb(2, 3) from None


def _type_mask() -> int:
    """PERSISTENT RESERVATION TYPE MASK (SPC-4 6.15.4): WR_EX_AR bit 15, EX_AC_RO 14, WR_EX_RO 13,
    EX_AC 11, WR_EX 9, EX_AC_AR 0. Every type is supported."""
    return (1 << 15) | (1 << 14) | (1 << 13) | (1 << 11) | (1 << 9) | 1
