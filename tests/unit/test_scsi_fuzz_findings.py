"""What the portal fuzzer (tests/fuzz, issue 14) found in the SCSI layer, replayed through
``dispatch.execute``: each CDB and parameter list that once ended in INTERNAL ERROR (a
``scsi_internal_error`` event) instead of the sense data SPC-4 gives for it."""

from __future__ import annotations

import random
from pathlib import Path

from lazyiscsi.scsi.dispatch import execute
from lazyiscsi.scsi.lun import Lun
from lazyiscsi.scsi.sense import SENSE_TABLE, Reason, Status
from lazyiscsi.store.lazydisk import LazyDisk
from tests.unit.store_fakes import InstantSource

BS = 512


def lun(tmp_path: Path) -> Lun:
    data = random.Random(3).randbytes(1 << 20)
    cache = tmp_path / f"cache{len(list(tmp_path.iterdir()))}"
    return Lun(LazyDisk.open(str(cache), InstantSource(data), autocommit_s=None), "vm1", block_size=BS)


def test_mode_select_of_page_3f_is_an_invalid_parameter_not_an_internal_error(tmp_path: Path) -> None:
    """Fuzz finding (CDB 15 00 00 ff 9a 00 and MODE SELECT(10) alike): a page code 3Fh in the
    parameter list raised KeyError. 3Fh means "all pages" only to MODE SENSE (SPC-4 7.5.1); as a
    page to select it is an invalid field in the parameter list, at the page's first byte."""
    params = bytes(4) + bytes([0x3F, 0x02, 0, 0])  # 6-byte header without block descriptors
    for cdb in (bytes([0x15, 0x10, 0, 0, len(params), 0]), bytes([0x55, 0x10, 0, 0, 0, 0, 0, 0, 12, 0])):
        data = params if cdb[0] == 0x15 else bytes(8) + params[4:]
        r = execute(lun(tmp_path), cdb, data, "iqn.test:i")
        assert r.status is Status.CHECK_CONDITION and r.sense is not None
        key, asc, ascq = SENSE_TABLE[Reason.INVALID_FIELD_IN_PARAMETER_LIST]
        assert (r.sense[2] & 0x0F, r.sense[12], r.sense[13]) == (key, asc, ascq), r.sense.hex()
