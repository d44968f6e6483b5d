"""CPU time per 4 KiB READ in the portal's per-command path, without sockets: framer, connection
state machine, SCSI dispatch and response encoding, with a pread from a real file below.

    python bench/portal_cpu.py [--commands N] [--repeat R]

The reads come 16 to a receive, as iscsi-perf at QD16 sends them. The figure is process CPU time
(min and median of R rounds), so that other work on a shared machine inflates it much less than
a wall-clock rate: it tells what a change to the per-command path saves, not what IOPS it gives.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import struct
import time

from wan import GiB, random_image

from lazyiscsi.iscsi.connection import Connection, Execute, Target
from lazyiscsi.iscsi.pdu import BHS_LEN, Framer, Opcode, encode
from lazyiscsi.iscsi.portal import _data_out_length
from lazyiscsi.scsi import dispatch
from lazyiscsi.scsi.lun import Lun

IQN = "iqn.2026-11.io.lazyiscsi:cpu"
QUEUE = 16


class FileBackend:
    """A fully local LUN: pread from the benchmark image (a fake only below the unit measured)."""

    unit = 1 << 20
    complete = True
    writable = True

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)


def logged_in(lun: Lun) -> Connection:
    conn = Connection(lambda name: Target(IQN, {0: lun}) if name == IQN else None, lambda: [],
                      _data_out_length)
    text = (f"InitiatorName=iqn.2026-11.io.lazyiscsi:bench\0TargetName={IQN}\0SessionType=Normal\0"
            "AuthMethod=None\0HeaderDigest=None\0DataDigest=None\0").encode()
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.LOGIN_REQUEST | 0x40, 0x80 | (1 << 2) | 3  # T=1, CSG 1 -> NSG 3
    b[8:14] = bytes.fromhex("400001370000")
    framer = Framer(max_data=1 << 20)
    framer.receive_data(encode(b, text))
    pdu = framer.next_pdu()
    assert pdu is not None
    conn.receive(pdu)
    return conn


def read10(itt: int, cmdsn: int, lba: int) -> bytes:
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.SCSI_COMMAND, 0xC0  # F, R
    struct.pack_into(">IIII", b, 16, itt, 4096, cmdsn, 0)
    b[32:42] = struct.pack(">BBIBHB", 0x28, 0, lba, 0, 8, 0)
    return bytes(b)


def run(conn: Connection, lun: Lun, framer: Framer, commands: int, rng: random.Random) -> float:
    """CPU seconds for ``commands`` READs (their PDUs are made before the clock starts)."""
    last_lba = lun.n_blocks - 8
    receives = []
    for _ in range(commands // QUEUE):
        cmdsn = conn.expcmdsn + len(receives) * QUEUE
        receives.append(b"".join(read10(cmdsn + i, cmdsn + i, rng.randrange(0, last_lba, 8))
                                 for i in range(QUEUE)))
    t0 = time.process_time()
    for data in receives:
        framer.receive_data(data)
        while (pdu := framer.next_pdu()) is not None:
            for action in conn.receive(pdu):
                if isinstance(action, Execute):
                    task = action.task
                    result = dispatch.execute(lun, task.cdb, None, conn.nexus)
                    conn.task_done(task, result.status, result.data_in, result.sense)
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commands", type=int, default=16000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    lun = Lun(FileBackend(str(random_image(GiB))), "cpu")  # type: ignore[arg-type]
    conn = logged_in(lun)
    framer = Framer(max_data=262144)
    rng = random.Random(15)
    run(conn, lun, framer, args.commands // 4, rng)  # warm-up
    per_command = [run(conn, lun, framer, args.commands, rng) / args.commands * 1e6
                   for _ in range(args.repeat)]
    print(f"CPU per 4 KiB READ: min {min(per_command):.1f} us, "
          f"median {statistics.median(per_command):.1f} us ({args.repeat} rounds of {args.commands}; "
          f"load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
