"""One TCMU device: its ring's commands run through the shared SCSI layer.

Each command runs in its own greenlet (a slow on-demand fetch never holds up the others, as in
the portal); Data-Out is read from the iovecs, Data-In written into them, both straight in the
mapped data area. Responses are flushed to the ring as commands finish, and ``notify`` (a write
to the uio device in production) tells the kernel. The kernel keeps PR and RESERVE itself, so the
nexus handed to the SCSI layer is the device's own.
"""

from __future__ import annotations

from collections.abc import Callable

import gevent
import gevent.pool
import structlog

from lazyiscsi.scsi import dispatch
from lazyiscsi.scsi.lun import Lun
from lazyiscsi.scsi.sense import Reason, Status, fixed_sense
from lazyiscsi.tcmu.ring import Command, Malformed, Ring, Tmr

log = structlog.get_logger("lazyiscsi.tcmu")


class Device:
    def __init__(self, ring: Ring, lun: Lun, notify: Callable[[], None], *, name: str) -> None:
        self.ring, self.lun, self.notify, self.name = ring, lun, notify, name
        self._pool = gevent.pool.Group()

    def process(self) -> int:
        """Take what the kernel queued and start it; returns how many commands were started."""
        started = 0
        for entry in self.ring.poll():
            if isinstance(entry, Command):
                self._pool.spawn(self._run, entry)
                started += 1
            elif isinstance(entry, Malformed):
                log.warning("tcmu_malformed_entry", device=self.name, cmd_id=entry.cmd_id, error=entry.reason)
                self._finish(entry.cmd_id, Status.CHECK_CONDITION, fixed_sense(Reason.INVALID_FIELD_IN_CDB),
                             None)
            elif isinstance(entry, Tmr):
                log.info("tcmu_tmr", device=self.name, tmr=entry.name, cmd_ids=list(entry.cmd_ids))
        return started

    def wait(self, timeout: float | None = None) -> bool:
        """Until every started command has answered (a clean stop, or a test)."""
        return self._pool.join(timeout=timeout)

    def _run(self, cmd: Command) -> None:
        views = [self.ring.iov_view(base, n) for base, n in cmd.iovs]
        want_out = dispatch.data_out_length(cmd.cdb, self.lun.block_size)
        data_out = None
        if want_out:
            data_out = views[0] if len(views) == 1 else b"".join(views)
        # one contiguous Data-In range (the usual case): the store reads straight into it
        into = views[0] if len(views) == 1 and not want_out else None
        result = dispatch.execute(self.lun, cmd.cdb, data_out, f"tcmu:{self.name}", data_in_buffer=into)
        read_len = None
        if isinstance(result.data_in, memoryview):
            read_len = len(result.data_in)
        elif result.data_in is not None:
            read_len = _scatter(memoryview(result.data_in), views)
        self._finish(cmd.cmd_id, result.status, result.sense, read_len)

    def _finish(self, cmd_id: int, status: int, sense: bytes | None, read_len: int | None) -> None:
        self.ring.complete(cmd_id, status, sense or b"", read_len)
        if self.ring.flush_completions():
            self.notify()


def _scatter(data: memoryview, views: list[memoryview]) -> int:
    """Copy data-in into the iovecs in order; the number of bytes placed (READ_LEN)."""
    pos = 0
    for view in views:
        n = min(len(view), len(data) - pos)
        if n <= 0:
            break
        view[:n] = data[pos:pos + n]
        pos += n
    return pos
