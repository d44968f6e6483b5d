"""CPU time per 4 KiB READ in the portal's per-command path, without sockets: framer, connection
state machine, the session's action handling (portal.py: inline execution, what is owed, the
send queue), SCSI dispatch and response encoding, with a pread from a real file below.

    python bench/portal_cpu.py [--commands N] [--repeat R]

The reads come 16 to a receive, as iscsi-perf at QD16 sends them. The figure is process CPU time
(min and median of R rounds), so that other work on a shared machine inflates it much less than
a wall-clock rate: it tells what a change to the per-command path saves, not what IOPS it gives.
The image is read whole first: a page cache gone cold (DAMON reclaim) would measure the disk.
(Before 2026-12-01 06:00 UTC the figure left out the session, portal.py: about 3 us less.)
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import struct
import time

from wan import GiB, random_image

from lazyiscsi.iscsi.connection import Target
from lazyiscsi.iscsi.pdu import BHS_LEN, Framer, Opcode, encode
from lazyiscsi.iscsi.portal import Portal, _Session
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


class NoSocket:
    """What the session asks of its socket before any I/O (a fake below the unit measured)."""

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 3260)


def logged_in(lun: Lun) -> _Session:
    """A session in full feature phase; nothing is sent (the bench takes its queue)."""
    target = Target(IQN, {0: lun})
    session = _Session(NoSocket(), "bench", Portal([target], ("127.0.0.1", 0)))  # type: ignore[arg-type]
    conn = session.conn
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
    return session


def read10(itt: int, cmdsn: int, lba: int) -> bytes:
    b = bytearray(BHS_LEN)
    b[0], b[1] = Opcode.SCSI_COMMAND, 0xC0  # F, R
    struct.pack_into(">IIII", b, 16, itt, 4096, cmdsn, 0)
    b[32:42] = struct.pack(">BBIBHB", 0x28, 0, lba, 0, 8, 0)
    return bytes(b)


def run(session: _Session, lun: Lun, framer: Framer, commands: int, rng: random.Random) -> float:
    """CPU seconds for ``commands`` READs (their PDUs are made before the clock starts). The
    session runs each READ inline (a fully local LUN) and queues its Data-In; the queue is taken
    and counted sent after each receive, as the writer would (without the sendmsg)."""
    conn = session.conn
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
            session._perform(conn.receive(pdu))
        sent = session.out_bytes
        session.out, session.out_bytes = [], 0
        session._owe(-sent)
    assert not session.workers and len(session.out) == 0, "every READ ran inline"
    return time.process_time() - t0


def warm(fd: int) -> None:
    """Read the image whole, so that the measured preads hit the page cache."""
    offset = 0
    while chunk := os.pread(fd, 8 << 20, offset):
        offset += len(chunk)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commands", type=int, default=16000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    lun = Lun(FileBackend(str(random_image(GiB))), "cpu")  # type: ignore[arg-type]
    warm(lun.backend.fd)
    session = logged_in(lun)
    framer = Framer(max_data=262144)
    rng = random.Random(15)
    run(session, lun, framer, args.commands // 4, rng)  # warm-up
    per_command = [run(session, lun, framer, args.commands, rng) / args.commands * 1e6
                   for _ in range(args.repeat)]
    print(f"CPU per 4 KiB READ: min {min(per_command):.1f} us, "
          f"median {statistics.median(per_command):.1f} us ({args.repeat} rounds of {args.commands}; "
          f"load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
