"""Primary commands (SPC-4): INQUIRY and its VPD pages, MODE SENSE, REPORT LUNS, REQUEST SENSE."""

from __future__ import annotations

import enum
import struct

from lazyiscsi import __version__
from lazyiscsi.scsi.cdb import cdb_length
from lazyiscsi.scsi.lun import MAX_COMPARE_AND_WRITE_BLOCKS, Lun
from lazyiscsi.scsi.sense import Reason, SenseError, fixed_sense, invalid_cdb, invalid_param

VENDOR = b"LAZYISCS"
PRODUCT = b"LAZY DISK".ljust(16)
REVISION = __version__.encode()[:4].ljust(4)


class Vpd(enum.IntEnum):
    SUPPORTED_PAGES = 0x00
    UNIT_SERIAL_NUMBER = 0x80
    DEVICE_IDENTIFICATION = 0x83
    BLOCK_LIMITS = 0xB0
    BLOCK_DEVICE_CHARACTERISTICS = 0xB1
    LOGICAL_BLOCK_PROVISIONING = 0xB2


class ModePage(enum.IntEnum):
    CACHING = 0x08
    CONTROL = 0x0A
    ALL = 0x3F


def truncate(data: bytes, allocation_length: int) -> bytes:
    """Return no more than the initiator made room for (SPC-4 4.2.5.6)."""
    return data[:allocation_length]


# -- INQUIRY ---------------------------------------------------------------------------------

def inquiry(lun: Lun, cdb: bytes) -> bytes:
    evpd = cdb[1] & 0x01
    if cdb[1] & 0xFE:
        raise invalid_cdb(1)  # CMDDT (obsolete) and reserved bits
    page = cdb[2]
    alloc = struct.unpack_from(">H", cdb, 3)[0]
    if not evpd:
        if page:
            raise invalid_cdb(2)  # a page code needs EVPD=1 (SPC-4 6.6.1)
        return truncate(_standard_inquiry(), alloc)
    try:
        builder = VPD_PAGES[Vpd(page)]
    except ValueError:
        raise invalid_cdb(2) from None
    body = builder(lun)
    return truncate(bytes([0x00, page]) + struct.pack(">H", len(body)) + body, alloc)


def inquiry_no_lun(cdb: bytes) -> bytes:
    """Standard INQUIRY data for an address with no logical unit behind it."""
    data = bytearray(_standard_inquiry())
    data[0] = 0x7F  # peripheral qualifier 011b, device type 1Fh: not capable of a device here
    return truncate(bytes(data), struct.unpack_from(">H", cdb, 3)[0])


#: version descriptors (SPC-4 Table 34): SAM-5, iSCSI, SPC-4, SBC-3
VERSION_DESCRIPTORS = (0x00A0, 0x0960, 0x0460, 0x04C0)


def _standard_inquiry() -> bytes:
    data = bytearray(58 + 2 * 8)
    data[0] = 0x00  # connected direct-access block device
    data[2] = 0x06  # SPC-4
    data[3] = 0x12  # HISUP, response data format 2
    data[4] = len(data) - 5
    data[7] = 0x02  # CMDQUE: the device takes tagged commands
    data[8:16] = VENDOR
    data[16:32] = PRODUCT
    data[32:36] = REVISION
    for i, descriptor in enumerate(VERSION_DESCRIPTORS):
        struct.pack_into(">H", data, 58 + 2 * i, descriptor)
    return bytes(data)


def _vpd_supported(lun: Lun) -> bytes:
    return bytes(sorted(VPD_PAGES))


def _vpd_serial(lun: Lun) -> bytes:
    return lun.serial.encode()


def _designator(code_set: int, kind: int, value: bytes, association: int = 0) -> bytes:
    return bytes([code_set, (association << 4) | kind, 0, len(value)]) + value


def _vpd_identification(lun: Lun) -> bytes:
    # NAA (binary, type 3) and T10 vendor ID (ASCII, type 1), both for the logical unit
    return (_designator(0x1, 0x3, lun.naa)
            + _designator(0x2, 0x1, VENDOR + lun.serial.encode()))


def _vpd_block_limits(lun: Lun) -> bytes:
    body = bytearray(0x3C)
    body[0] = 0x01  # WSNZ: WRITE SAME needs a non-zero length
    body[1] = MAX_COMPARE_AND_WRITE_BLOCKS  # maximum COMPARE AND WRITE length
    granularity = max(1, lun.backend.unit // lun.block_size)
    struct.pack_into(">H", body, 2, granularity)  # optimal transfer length granularity
    struct.pack_into(">I", body, 4, lun.max_transfer_blocks)  # maximum transfer length
    struct.pack_into(">I", body, 8, lun.max_transfer_blocks)  # optimal transfer length
    struct.pack_into(">I", body, 16, lun.max_write_same_blocks)  # maximum UNMAP LBA count
    struct.pack_into(">I", body, 20, 256)  # maximum UNMAP block descriptor count
    struct.pack_into(">I", body, 24, granularity)  # optimal UNMAP granularity
    struct.pack_into(">Q", body, 32, lun.max_write_same_blocks)  # maximum WRITE SAME length
    return bytes(body)


def _vpd_characteristics(lun: Lun) -> bytes:
    body = bytearray(0x3C)
    struct.pack_into(">H", body, 0, 1)  # medium rotation rate 1: non-rotating
    return bytes(body)


def _vpd_provisioning(lun: Lun) -> bytes:
    # LBPU, LBPWS, LBPWS10; LBPRZ=1: UNMAP and WRITE SAME(UNMAP) go through write_zeroes, so an
    # unmapped block reads as zeros; ANC_SUP=0; provisioning type 2: thin (holes are punched)
    return bytes([0, 0x80 | 0x40 | 0x20 | (1 << 2), 0x02, 0])


VPD_PAGES = {
    Vpd.SUPPORTED_PAGES: _vpd_supported,
    Vpd.UNIT_SERIAL_NUMBER: _vpd_serial,
    Vpd.DEVICE_IDENTIFICATION: _vpd_identification,
    Vpd.BLOCK_LIMITS: _vpd_block_limits,
    Vpd.BLOCK_DEVICE_CHARACTERISTICS: _vpd_characteristics,
    Vpd.LOGICAL_BLOCK_PROVISIONING: _vpd_provisioning,
}


# -- MODE SENSE ----------------------------------------------------------------------------

def _caching_page(lun: Lun, pc: int) -> bytes:
    page = bytearray(20)
    page[0], page[1] = ModePage.CACHING, 18
    if pc == 1:  # changeable values: only WCE
        page[2] = 0x04
    elif lun.write_cache or pc == 2:
        page[2] = 0x04  # WCE (default: on)
    return bytes(page)


def _control_page(lun: Lun, pc: int) -> bytes:
    page = bytearray(12)
    page[0], page[1] = ModePage.CONTROL, 10
    if pc != 1:
        page[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
    return bytes(page)


MODE_PAGES = {ModePage.CACHING: _caching_page, ModePage.CONTROL: _control_page}


def mode_sense(lun: Lun, cdb: bytes, ten: bool) -> bytes:
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    pc, code, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    alloc = struct.unpack_from(">H", cdb, 7)[0] if ten else cdb[4]
    if pc == 3:
        raise SenseError(Reason.SAVING_PARAMETERS_NOT_SUPPORTED)
    if code == ModePage.ALL:
        if subpage not in (0x00, 0xFF):
            raise invalid_cdb(3)
        pages = b"".join(build(lun, pc) for build in MODE_PAGES.values())
    else:
        try:
            build = MODE_PAGES[ModePage(code)]
        except ValueError:
            raise invalid_cdb(2, 5) from None
        if subpage:
            raise invalid_cdb(3)
        pages = build(lun, pc)
    blocks = lun.n_blocks
    if dbd:
        descriptor = b""
    elif llbaa:
        descriptor = struct.pack(">QII", blocks, 0, lun.block_size)
    else:
        descriptor = struct.pack(">II", min(blocks, 0xFFFFFFFF), lun.block_size & 0xFFFFFF)
    device_specific = 0x10  # DPOFUA: FUA is honoured; WP=0
    if ten:
        header = struct.pack(">HBBBBH", 6 + len(descriptor) + len(pages), 0, device_specific,
                             0x01 if llbaa else 0, 0, len(descriptor))
    else:
        header = struct.pack(">BBBB", 3 + len(descriptor) + len(pages), 0, device_specific,
                             len(descriptor))
    return truncate(header + descriptor + pages, alloc)


def mode_select(lun: Lun, cdb: bytes, data: memoryview | None, ten: bool) -> None:
    """Only WCE may change; every other byte of a page sent must equal the current value
    (SPC-4 6.11: a field that is not changeable must not be changed)."""
    if cdb[1] & 0x01:
        raise invalid_cdb(1, 0)  # SP: saving parameters is not supported
    length = struct.unpack_from(">H", cdb, 7)[0] if ten else cdb[4]
    if length == 0:
        return
    if data is None or len(data) < length:
        raise SenseError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    params = bytes(data[:length])
    header = 8 if ten else 4
    if len(params) < header:
        raise SenseError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    bd_len = struct.unpack_from(">H", params, 6)[0] if ten else params[3]
    pos = header + bd_len
    if pos > len(params):
        raise SenseError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    new_wce = lun.write_cache
    while pos < len(params):
        if pos + 2 > len(params):
            raise SenseError(Reason.PARAMETER_LIST_LENGTH_ERROR)
        code, plen = params[pos] & 0x3F, params[pos + 1]
        if params[pos] & 0x40:
            raise invalid_param(pos, 6)  # SPF: no subpages here
        page = params[pos:pos + 2 + plen]
        try:
            build = MODE_PAGES[ModePage(code)]
        except (ValueError, KeyError):  # 3Fh names all pages for MODE SENSE only (SPC-4 7.5.1)
            raise invalid_param(pos) from None
        current = build(lun, 0)
        if len(page) != len(current):
            raise invalid_param(pos + 1)
        if code == ModePage.CACHING:
            new_wce = bool(page[2] & 0x04)
            page = page[:2] + bytes([(page[2] & ~0x04) | (current[2] & 0x04)]) + page[3:]
        diff = next((i for i in range(2, len(page)) if page[i] != current[i]), None)
        if diff is not None:
            raise invalid_param(pos + diff)
        pos += len(page)
    lun.write_cache = new_wce


# -- REPORT LUNS, REQUEST SENSE ------------------------------------------------------------

def report_luns(lun_numbers: list[int], cdb: bytes) -> bytes:
    if cdb[2] not in (0x00, 0x01, 0x02):
        raise invalid_cdb(2)  # SELECT REPORT: well-known and administrative LUNs are none here
    alloc = struct.unpack_from(">I", cdb, 6)[0]
    if alloc < 16:
        raise invalid_cdb(6)  # SPC-4 6.33: the allocation length must be at least 16
    entries = b"".join(_lun_entry(n) for n in sorted(lun_numbers))
    return truncate(struct.pack(">II", len(entries), 0) + entries, alloc)


def _lun_entry(number: int) -> bytes:
    """Single-level LUN: peripheral addressing below 256, flat space addressing above (SAM-5 4.7)."""
    if number < 256:
        return bytes([0, number]) + bytes(6)
    return bytes([0x40 | (number >> 8), number & 0xFF]) + bytes(6)


def request_sense(lun: Lun, cdb: bytes, nexus: str) -> bytes:
    if cdb[1] & 0x01:
        raise invalid_cdb(1, 0)  # descriptor format sense is not supported
    pending = lun.unit_attentions.get(nexus)
    reason = pending.pop(0) if pending else Reason.NO_SENSE
    return truncate(fixed_sense(reason), cdb[4])


def report_supported_opcodes(cdb: bytes, commands: list[tuple[int, int | None]]) -> bytes:
    """REPORT SUPPORTED OPERATION CODES (SPC-4 6.35): ``commands`` lists (opcode, service
    action or None) for everything ``execute`` runs. Timeout descriptors carry no figures (0:
    not specified): a command's time depends on the source site, not on the device."""
    rctd = bool(cdb[2] & 0x80)
    options = cdb[2] & 0x07
    alloc = struct.unpack_from(">I", cdb, 6)[0]
    timeout = struct.pack(">HBBII", 0x0A, 0, 0, 0, 0) if rctd else b""
    if options == 0:
        body = bytearray()
        for opcode, action in commands:
            flags = (0x02 if rctd else 0) | (0x01 if action is not None else 0)
            body += struct.pack(">BxHxBH", opcode, action or 0, flags, cdb_length(opcode) or 0) + timeout
        return truncate(struct.pack(">I", len(body)) + bytes(body), alloc)
    opcode, wanted = cdb[3], struct.unpack_from(">H", cdb, 4)[0]
    with_actions = {op for op, action in commands if action is not None}
    if options == 1 and opcode in with_actions:
        raise invalid_cdb(2, 2)  # this opcode has service actions: ask with one
    if options == 2 and opcode not in with_actions and (opcode, None) in commands:
        raise invalid_cdb(2, 2)  # no service actions to ask about
    if options not in (1, 2, 3):
        raise invalid_cdb(2, 2)
    action = wanted if opcode in with_actions else None
    if (opcode, action) not in commands:
        return truncate(struct.pack(">xBH", 0x01, 0), alloc)  # SUPPORT 001b: not supported
    size = cdb_length(opcode) or 0
    usage = bytearray(b"\xff" * size)
    usage[0] = opcode
    if action is not None:
        usage[1] = action  # the service action where the CDB carries it (byte 1 in these forms)
    usage[size - 1] = 0x04  # CONTROL: only NACA is looked at (and must be 0)
    return truncate(struct.pack(">xBH", (0x80 if rctd else 0) | 0x03, size) + bytes(usage) + timeout, alloc)
