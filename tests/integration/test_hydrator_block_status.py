"""The hydrator against a real NBD server whose block status is slow (nbdkit's sh plugin, one
request at a time per connection, as a server that walks a large image's allocation would be):
a guest's read must not wait for the copier's status query."""

from __future__ import annotations

import time
from pathlib import Path

import gevent

from lazyiscsi.source import open_source
from lazyiscsi.store.hydrator import Hydrator
from lazyiscsi.store.lazydisk import LazyDisk
from tests.integration.peers import MiB, Nbdkit, free_port

SIZE = 64 * MiB
#: how long the server takes to answer one block status query
STATUS_S = 6.0

PLUGIN = """#!/bin/sh
case "$1" in
  get_size) echo {size} ;;
  thread_model) echo serialize_requests ;;
  can_extents) exit 0 ;;
  pread) head -c "$3" /dev/zero | tr '\\0' 'x' ;;
  extents) touch {marker}; sleep {delay}; echo "$4 $3 0" ;;
  *) exit 2 ;;
esac
"""


def test_block_status_does_not_delay_guest_reads(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    """Issue 10, defect 13d: the copier's block status went on the guests' connection, so a
    read queued behind a slow status query waited for all of it (here 6 s)."""
    marker = tmp_path / "status-asked"
    script = tmp_path / "slow-status.sh"
    script.write_text(PLUGIN.format(size=SIZE, marker=marker, delay=STATUS_S))
    script.chmod(0o755)
    server = Nbdkit(["sh", str(script)], free_port()).start()
    nbdkit.append(server)
    disk = LazyDisk.open(str(tmp_path / "cache"), open_source(server.url), autocommit_s=None)
    job = Hydrator(disk)
    job.start()
    with gevent.Timeout(30):
        while not marker.exists():  # the server is now busy with the copier's query
            gevent.sleep(0.02)
    t0 = time.monotonic()
    assert disk.read(40 * MiB, 4096) == b"x" * 4096
    latency = time.monotonic() - t0
    assert job.query().current < SIZE // 2  # the query was still out: the copy had not begun
    print(f"guest read during a {STATUS_S:g} s block status query: {latency * 1000:.0f} ms")
    assert latency < STATUS_S / 3, f"a guest read took {latency:.2f} s behind block status"
    job.cancel()
    disk.close()
