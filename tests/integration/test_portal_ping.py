"""Target NOP-In pings (RFC 7143 11.19): an initiator that answers keeps its connection, one
that stops answering loses it after twice the interval, and other sessions see nothing."""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

from lazyiscsi.iscsi.pdu import BHS_LEN, Opcode
from tests.integration.peers import free_port, make_image, wait_listening
from tests.integration.test_portal_bad_input import IQN, login, pdu, recv_pdu

INTERVAL = 0.5


def test_pings_keep_live_initiators_and_drop_silent_ones(tmp_path: Path) -> None:
    img = tmp_path / "src.img"
    make_image(img, 1 << 20)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lazyiscsi.cli", "--log-level", "info", "serve",
                             "--source", str(img), "--cache", str(tmp_path / "cache.img"), "--iqn", IQN,
                             "--listen", f"127.0.0.1:{port}", "--nop-interval", str(INTERVAL)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_listening(port, proc)  # type: ignore[arg-type]
        live, silent = login(port), login(port, isid="400001370001")
        pings = 0
        deadline = time.monotonic() + 6 * INTERVAL
        while time.monotonic() < deadline:
            bhs, _ = recv_pdu(live)
            assert bhs[0] & 0x3F == Opcode.NOP_IN, bhs.hex()
            itt, ttt, statsn = struct.unpack_from(">III", bhs, 16)
            assert itt == 0xFFFFFFFF and ttt != 0xFFFFFFFF  # a ping that wants an answer
            pings += 1
            answer = bytearray(pdu(Opcode.NOP_OUT, itt=0xFFFFFFFF, immediate=True))
            struct.pack_into(">III", answer, 20, ttt, 0, statsn)  # TTT echoed, CmdSN, ExpStatSN
            live.sendall(bytes(answer[:BHS_LEN]))
        assert pings >= 3
        # the silent one got its ping, did not answer, and is gone by now
        silent.settimeout(4 * INTERVAL)
        bhs, _ = recv_pdu(silent)
        assert bhs[0] & 0x3F == Opcode.NOP_IN
        try:
            while True:
                recv_pdu(silent)
        except (TimeoutError, ConnectionError) as e:
            assert isinstance(e, ConnectionError), "the silent initiator was not dropped"
        # and the live one still works: a NOP-Out of its own gets its NOP-In
        nop = bytearray(pdu(Opcode.NOP_OUT, itt=7, immediate=True))
        struct.pack_into(">I", nop, 20, 0xFFFFFFFF)
        live.sendall(bytes(nop))
        while True:
            bhs, _ = recv_pdu(live)
            if struct.unpack_from(">I", bhs, 16)[0] == 7:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert "initiator_not_responding" in out and "Traceback" not in out, out
