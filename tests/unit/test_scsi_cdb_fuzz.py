"""The fuzzer's CDBs (tests/fuzz/cdbs.py: boundary and random CDBs for every opcode of the
dispatch table, with data-out that matches the CDB or not) straight through
``dispatch.execute``, many thousands a second: none may end in INTERNAL ERROR, the answer to
a lazyiscsi bug (issue 14). The portal campaign (tests/integration/test_fuzz_portal.py) sends
the same CDBs over iSCSI, far fewer of them."""

from __future__ import annotations

import os
import random
from pathlib import Path

from lazyiscsi.scsi.dispatch import HANDLERS, data_out_length, execute
from lazyiscsi.scsi.lun import Lun
from lazyiscsi.scsi.sense import SENSE_TABLE, Reason
from lazyiscsi.store.lazydisk import LazyDisk
from tests.fuzz.cdbs import fuzz_command
from tests.unit.store_fakes import InstantSource

BS = 512
SIZE = 1 << 20
#: CDBs per run: a few seconds' worth
CASES = 30_000


def test_fuzzed_cdbs_never_end_in_internal_error(tmp_path: Path) -> None:
    seed = int(os.environ.get("LAZYISCSI_FUZZ_SEED") or random.SystemRandom().getrandbits(32))
    print(f"CDB fuzz seed {seed} (LAZYISCSI_FUZZ_SEED={seed} replays it)")
    rng = random.Random(seed)
    disk = LazyDisk.open(str(tmp_path / "cache"), InstantSource(rng.randbytes(SIZE)), autocommit_s=None)
    lun = Lun(disk, "fuzz", block_size=BS)
    opcodes = sorted(int(op) for op in HANDLERS)
    internal = SENSE_TABLE[Reason.INTERNAL_ERROR]
    nexuses = [f"iqn.test:i{n},i,0x40000000000{n}" for n in range(3)]  # reservations meet
    for _ in range(CASES):
        case = fuzz_command(opcodes, SIZE // BS, BS, rng)
        data_out_length(case.cdb, BS)  # what the transports ask first must not raise either
        r = execute(lun, case.cdb, case.data or None, rng.choice(nexuses))
        if r.sense is not None:
            got = (r.sense[2] & 0x0F, r.sense[12], r.sense[13])
            assert got != internal, f"seed {seed}: CDB {case.cdb.hex()} data {case.data[:64].hex()}"
