"""iSCSI PDU framing and decoding fed hand-made bytes (RFC 7143 section 11)."""

from __future__ import annotations

import struct

import pytest

from lazyiscsi.iscsi.pdu import (
    BHS_LEN,
    DataOut,
    Framer,
    LoginRequest,
    Opcode,
    RejectReason,
    RemoteProtocolError,
    ScsiCommand,
    build_data_in,
    build_reject,
    build_scsi_response,
    decode,
    digest,
    encode,
)


def scsi_command_bhs(itt: int = 7, cdb: bytes = bytes([0x28]) + bytes(15), flags: int = 0xC0,
                     length: int = 4096, lun: int = 3) -> bytearray:
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.SCSI_COMMAND, flags
    b[9] = lun
    struct.pack_into(">IIII", b, 16, itt, length, 11, 5)
    b[32:48] = cdb
    return b


def test_crc32c_matches_rfc_3720_example() -> None:
    # RFC 3720 B.4: 32 bytes of zeros give CRC aa 36 91 8a on the wire
    assert digest(bytes(32)) == bytes.fromhex("aa36918a")


def test_scsi_command_with_immediate_data_split_anywhere() -> None:
    raw = encode(scsi_command_bhs(flags=0xA0), b"hello")
    framer = Framer()
    for i in range(len(raw)):
        framer.receive_data(raw[i:i + 1])
        pdu = framer.next_pdu()
        if i < len(raw) - 1:
            assert pdu is None
    assert pdu is not None and pdu.data == b"hello"  # padding removed
    cmd = decode(pdu)
    assert isinstance(cmd, ScsiCommand)
    assert (cmd.itt, cmd.lun, cmd.expected_length, cmd.cmdsn, cmd.expstatsn) == (7, 3, 4096, 11, 5)
    assert cmd.write and not cmd.read and cmd.final and cmd.cdb[0] == 0x28


def test_digests_are_checked() -> None:
    raw = encode(scsi_command_bhs(flags=0xA0), b"payload!", header_digest=True, data_digest=True)
    framer = Framer()
    framer.set_digests(True, True)
    framer.receive_data(raw)
    assert framer.next_pdu().data == b"payload!"  # type: ignore[union-attr]
    bad_data = bytearray(raw)
    bad_data[BHS_LEN + 4] ^= 1
    framer.receive_data(bytes(bad_data) + raw)
    damaged = framer.next_pdu()  # the header held: the PDU comes out, its data marked bad
    assert damaged is not None and not damaged.data_intact and damaged.bhs == raw[:BHS_LEN]
    assert framer.next_pdu().data == b"payload!"  # type: ignore[union-attr]  # framing kept
    bad_header = bytearray(raw)
    bad_header[20] ^= 1
    framer = Framer()
    framer.set_digests(True, True)
    framer.receive_data(bytes(bad_header))
    with pytest.raises(RemoteProtocolError, match="header digest") as err:
        framer.next_pdu()
    assert err.value.reject is None  # framing lost: the connection goes


def test_oversized_data_segment_is_refused_before_buffering() -> None:
    b = scsi_command_bhs()
    b[5:8] = (1 << 20).to_bytes(3, "big")
    framer = Framer(max_data=8192)
    framer.receive_data(bytes(b))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        framer.next_pdu()


def test_unknown_opcode_and_reserved_bits_are_rejected() -> None:
    framer = Framer()
    b = bytearray(BHS_LEN)
    b[0] = 0x1C
    framer.receive_data(bytes(b))
    with pytest.raises(RemoteProtocolError) as err:
        decode(framer.next_pdu())  # type: ignore[arg-type]
    assert err.value.reject is RejectReason.COMMAND_NOT_SUPPORTED
    framer.receive_data(encode(scsi_command_bhs(flags=0x88)))
    with pytest.raises(RemoteProtocolError) as err:
        decode(framer.next_pdu())  # type: ignore[arg-type]
    assert err.value.reject is RejectReason.INVALID_PDU_FIELD


def test_login_and_data_out_decode() -> None:
    b = bytearray(BHS_LEN)
    b[0], b[1], b[2], b[3] = 0x40 | Opcode.LOGIN_REQUEST, 0x80 | (1 << 2) | 3, 0, 0
    b[8:14] = bytes.fromhex("400001370000")
    struct.pack_into(">HIH", b, 14, 0, 0x1234, 1)
    struct.pack_into(">II", b, 24, 1, 0)
    framer = Framer()
    framer.receive_data(encode(b, b"InitiatorName=iqn.x\0"))
    login = decode(framer.next_pdu())  # type: ignore[arg-type]
    assert isinstance(login, LoginRequest)
    assert login.transit and (login.csg, login.nsg) == (1, 3) and login.itt == 0x1234 and login.cid == 1
    d = bytearray(BHS_LEN)
    d[0], d[1] = Opcode.SCSI_DATA_OUT, 0x80
    struct.pack_into(">IIIIIII", d, 16, 7, 0x99, 0, 5, 0, 2, 8192)
    framer.receive_data(encode(d, b"x" * 512))
    out = decode(framer.next_pdu())  # type: ignore[arg-type]
    assert isinstance(out, DataOut)
    assert (out.ttt, out.datasn, out.offset, len(out.data)) == (0x99, 2, 8192, 512)


def test_target_pdus_layout() -> None:
    bhs, data = build_scsi_response(7, 0x02, 100, 12, 44, sense=b"\x70" + bytes(17), residual=512)
    assert bhs[0] == Opcode.SCSI_RESPONSE and bhs[1] == 0x82 and bhs[3] == 0x02
    assert struct.unpack_from(">I", bhs, 44)[0] == 512 and data[:2] == b"\x00\x12"
    din = build_data_in(7, 3, 0, 0, 4096, final=True, status=0, statsn=100, expcmdsn=12, maxcmdsn=44)
    assert din[1] == 0x81 and int.from_bytes(din[5:8], "big") == 4096  # F and S: status collapsed
    rej, hdr = build_reject(RejectReason.PROTOCOL_ERROR, 1, 2, 3, bytes(range(48)))
    assert rej[0] == Opcode.REJECT and rej[2] == 0x04 and hdr == bytes(range(48))
    wire = encode(rej, hdr, header_digest=True)
    assert len(wire) == BHS_LEN + 4 + 48
