"""The embedded portal: the only iSCSI module with sockets.

One reader greenlet per connection feeds the framer and the connection state machine; every
SCSI command that may wait runs in its own greenlet (a slow on-demand fetch never holds up
another command), a READ of a fully local LUN runs inline in the reader, as the connection reads
it (``run_now``: no task, no greenlet); one writer greenlet sends PDUs in the order the state
machine produced them.

Per command cost is what bounds small random I/O (a 4 KiB READ is mostly bookkeeping): the
reader frames every whole PDU a receive brought before it reads again, PDUs to send are
appended to one list that the writer takes whole (one wake-up and one sendmsg for everything
produced since it last ran, not a queue operation per PDU). What the reader itself queued
(the inline READs) it sends itself, once per receive (every ``_YIELD_EVERY`` PDUs of a larger
one) and before it may wait, in one sendmsg that never waits (``_flush``): no switch to the
writer and back, and the writer is woken only for what that left. The writer sends that, and
everything while it holds a batch, so PDUs go out in the order queued.

The portal owns the clock and the bookkeeping across connections that the sans-I/O connection
cannot: the login timeout (fed in as ``login_timed_out``), the connection caps, checked as a
connection is accepted, and the live sessions by initiator port, for session reinstatement
(RFC 7143 6.3.5), which is also where the old session's I_T nexus loss is reported.

Backpressure, not buffering: what a connection owes its initiator (PDUs queued and not yet sent,
plus the data-in of READs still running) is counted, and while it exceeds
``MAX_OUTSTANDING_BYTES`` the reader takes no further PDU from the socket. An initiator that does
not read its responses thus stops being read itself (TCP's window then stops its sending), and
the CmdSN window (connection.py) bounds the commands it may have running meanwhile.

A streamed WRITE (connection.py: WRITE(10/12/16)) gets its greenlet when the command arrives: it
runs the command's checks (``dispatch.WriteStream``), then writes the pieces the connection cuts
from the data-out, in order, from a queue the reader fills, reporting each one written so that
the connection may ask for more; it ends at ``StreamEnd``. Aborted, or its connection gone, it
writes no further piece: the piece being written when that happened is the last. Like a running
command's, these greenlets are bounded by the CmdSN window; one whose initiator stops sending
data waits, holding at most its window, until the data comes, an abort, or the connection ends.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections import Counter

import gevent
import gevent.event
import gevent.pool
import gevent.queue
import structlog
from gevent.server import StreamServer

from lazyiscsi.iscsi.connection import (
    Action,
    Close,
    Connection,
    Execute,
    Fault,
    Piece,
    Reset,
    Send,
    State,
    Stream,
    StreamEnd,
    Target,
    Task,
)
from lazyiscsi.iscsi.pdu import Framer, RemoteProtocolError
from lazyiscsi.iscsi.text import LOGIN_MAX_DATA
from lazyiscsi.scsi import dispatch
from lazyiscsi.scsi.cdb import Op
from lazyiscsi.scsi.lun import MAX_TRANSFER_BYTES, Lun
from lazyiscsi.scsi.sense import Status

log = structlog.get_logger("lazyiscsi.iscsi")

#: queued PDUs go out in gathered writes of about this many bytes, each counted off what the
#: connection owes as soon as it is out (so the reader resumes while the rest is still going)
_COALESCE = 256 * 1024
#: and no more buffers than one sendmsg takes (IOV_MAX is 1024 on Linux)
_MAX_IOV = 512
#: while framing the PDUs of one receive, the reader sends what is ready every this many PDUs
#: (and lets commands running in greenlets have a turn), so that a receive of very many commands
#: does not hold every answer until its last one is run. Each send is a system call that also
#: runs the loopback peer's receive: at QD16 (16 commands a receive), every 4 PDUs gave 4 KiB
#: random reads 0.74-0.79x tgtd's IOPS, every 16 0.79-0.81x (a 2-vCPU machine, 2026-12-01;
#: with one core kept busy by another process, 0.69x against 0.79x). Before the reader sent
#: its own answers (``_flush``), the writer greenlet sent them, and every 4 was much faster
#: than once at the end.
_YIELD_EVERY = 16
#: every this many PDUs the reader lets every other greenlet run (other connections, the copier,
#: the control socket). A gevent socket's recv does not yield while data is waiting, and a READ
#: of a fully local LUN runs in the reader: an initiator that keeps its socket full (60,000
#: one-block READs are 2.9 MB) held the whole process for as long as their answers fit in
#: MAX_OUTSTANDING_BYTES, 2 s here (``test_portal_bounds``). 256 such READs take about 3 ms.
#: The turn is ``gevent.idle()``: the reader goes on once the loop has polled every socket and
#: run what was ready. Not ``sleep(0)``: gevent runs a yielded greenlet again from its callback
#: queue and polls sockets only every 50 callbacks, so the others still waited for 50 turns
#: (0.5 s). Not a short timer: libev then sits in epoll for at least 1 ms whenever nothing else
#: is ready, which at QD16 (a turn every 16 receives) is most turns.
TURN_EVERY_PDUS = 256
#: How long a connection may take to reach full feature (login done). A login is a handful of
#: round trips; one left half-way (a half-sent header, a data segment announced and never sent,
#: a CHAP exchange never finished) would otherwise hold its socket, greenlets and buffers for
#: ever. LIO's default login_timeout is 15 s too.
LOGIN_TIMEOUT = 15.0
#: Connections served at once. Each costs a socket (a file descriptor: the default soft limit
#: is 1024, shared with caches and sources) and two greenlets; beyond this, new connections
#: are closed at once rather than left waiting in the listen backlog.
MAX_CONNECTIONS = 256
#: Connections from one address at once: a hypervisor has one per target it uses (and one
#: per path), well under this; one address alone then cannot take every connection and lock
#: other initiators out, whatever it leaves half-open until LOGIN_TIMEOUT.
MAX_CONNECTIONS_PER_ADDRESS = 64
#: Under a flood of connections, the first refusal is logged at once, then at most one
#: connection_refused event per this many seconds, carrying the count refused since the last:
#: the journal must not be the next thing a flood fills.
REFUSAL_LOG_INTERVAL = 10.0
#: what one connection may owe its initiator (queued PDUs and the data-in of running READs) before
#: its reader stops reading: one largest transfer (MAX_TRANSFER_BYTES) plus as much again in
#: flight, which keeps loopback and a 10 GbE link at 5 ms RTT busy while bounding the memory an
#: initiator that never reads can hold (DESIGN: never hand a peer unbounded memory)
MAX_OUTSTANDING_BYTES = 2 * MAX_TRANSFER_BYTES
#: READ(6/10/12/16) opcodes
_INLINE_READS = frozenset(int(op) for op in (Op.READ_6, Op.READ_10, Op.READ_12, Op.READ_16))


class Portal:
    """Serves ``targets`` on ``listen`` (host, port)."""

    def __init__(self, targets: list[Target], listen: tuple[str, int], *,
                 max_connections: int = MAX_CONNECTIONS, max_per_address: int = MAX_CONNECTIONS_PER_ADDRESS,
                 nop_interval: float = 15.0, login_timeout: float = LOGIN_TIMEOUT) -> None:
        if not 0 < login_timeout < float("inf"):  # also refuses nan
            raise ValueError("the login timeout must be a finite number of seconds above 0")
        self._targets = {t.iqn: t for t in targets}
        self._listen = listen
        self.nop_interval = nop_interval
        self.login_timeout = login_timeout
        self._max_connections, self._max_per_address = max_connections, max_per_address
        self._open: Counter[str] = Counter()  # connections served, by peer address
        self._refused = 0  # since the last connection_refused event
        self._refusal_logged = -REFUSAL_LOG_INTERVAL
        #: live sessions by initiator port and target, for reinstatement (RFC 7143 6.3.5)
        self.sessions: dict[tuple[str, bytes, str], _Session] = {}
        # the caps are checked in _handle, which closes the excess at once; a bounded pool
        # would instead stop accepting, and leave every other initiator waiting in the backlog.
        # The pool (unbounded) is what lets stop() end the sessions still running.
        self._server = StreamServer(listen, self._handle, spawn=gevent.pool.Pool())

    def target(self, iqn: str) -> Target | None:
        return self._targets.get(iqn)

    def all_targets(self) -> list[Target]:
        """Every target served, for SendTargets."""
        return list(self._targets.values())

    def add_target(self, target: Target) -> None:
        """Serve one more target from now on (new logins and SendTargets see it at once)."""
        self._targets[target.iqn] = target
        log.info("target_added", target=target.iqn)

    def remove_target(self, iqn: str) -> None:
        """New logins no longer find it; sessions already in it keep their LUN objects until
        they end (the LUN's store is closed under them, so their I/O fails cleanly)."""
        if self._targets.pop(iqn, None) is not None:
            log.info("target_removed", target=iqn)

    @property
    def address(self) -> tuple[str, int]:
        return self._server.address  # type: ignore[no-any-return]

    def start(self) -> None:
        self._server.start()
        log.info("portal_listening", address=f"{self.address[0]}:{self.address[1]}",
                 targets=sorted(self._targets))

    def stop(self, timeout: float = 5.0) -> None:
        self._server.stop(timeout)

    def _handle(self, sock: socket.socket, address: tuple[str, int]) -> None:
        host, peer = address[0], f"{address[0]}:{address[1]}"
        if self._open.total() >= self._max_connections or self._open[host] >= self._max_per_address:
            sock.close()
            self._refused += 1
            if time.monotonic() - self._refusal_logged >= REFUSAL_LOG_INTERVAL:
                self._refusal_logged = time.monotonic()
                cap = "per address" if self._open[host] >= self._max_per_address else "in all"
                log.warning("connection_refused", peer=peer, reason=f"too many connections {cap}",
                            refused=self._refused, open=self._open.total(), from_address=self._open[host])
                self._refused = 0
            return
        self._open[host] += 1
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _Session(sock, peer, self).run()
        finally:
            self._open[host] -= 1
            if not self._open[host]:
                del self._open[host]


class _Session:
    def __init__(self, sock: socket.socket, peer: str, portal: Portal) -> None:
        self.sock, self.peer = sock, peer
        self.portal = portal
        self.nop_interval = portal.nop_interval
        self.last_heard = time.monotonic()
        # a plain function, not a bound method: the connection must not refer back to the
        # session, or a closed session would wait for the cyclic garbage collector
        self.conn = Connection(portal.target, portal.all_targets, _data_out_length,
                               address=target_address(sock.getsockname()), stream_plan=_stream_plan,
                               run_now=_read_now)
        self.key: tuple[str, bytes, str] | None = None  # in portal.sessions while live
        self.reinstated = False
        #: buffers to send, in order, and how many bytes they hold; the writer takes them whole
        self.out: list[bytes | bytearray | memoryview] = []
        self.out_bytes = 0
        self.wake_writer = gevent.event.Event()
        #: the writer holds a batch it has not sent whole (it may be waiting for the socket):
        #: until it is out, nothing queued after it may be sent by the reader (``_flush``)
        self.sending = False
        #: the greenlet that runs ``run``: what it queues it sends itself (``_flush``)
        self.reader: gevent.Greenlet | None = None
        self.writer_done = False  # set once nothing more will be queued: the writer drains and ends
        self.workers: set[gevent.Greenlet] = set()
        #: the pieces of each streamed WRITE not yet written (None: no more come)
        self.streams: dict[Task, gevent.queue.SimpleQueue[Piece | None]] = {}
        self.closing = False
        self.owed = 0  # bytes queued to send plus the data-in reserved by running READs
        self.room = gevent.event.Event()  # set while ``owed`` is within MAX_OUTSTANDING_BYTES
        self.room.set()

    def _lun(self, number: int) -> Lun | None:
        target = self.conn.login.target
        return target.luns.get(number) if target is not None else None  # type: ignore[return-value]

    def _owe(self, n: int) -> None:
        self.owed += n
        within = self.owed <= MAX_OUTSTANDING_BYTES
        if within != self.room.is_set():  # only a crossing of the limit touches the event
            if within:
                self.room.set()
            else:
                self.room.clear()

    def _wait_for_room(self) -> None:
        """Read no further PDU while the initiator has not taken what it is owed. The timeout
        only re-checks ``closing``: every path that frees bytes sets ``room``. What the reader
        queued goes first: it is what must be sent for the room to come."""
        self._flush()
        while not self.room.is_set() and not self.closing:
            self.room.wait(1.0)

    def run(self) -> None:
        self.reader = gevent.getcurrent()
        writer = gevent.spawn(self._write_loop)
        pinger = gevent.spawn(self._ping_loop) if self.nop_interval > 0 else None
        login_timer = gevent.spawn_later(self.portal.login_timeout, self._login_expired)
        framer = Framer(max_data=LOGIN_MAX_DATA)  # RFC 7143 13.12: the default, during login
        try:
            conn, room, recv = self.conn, self.room, self.sock.recv
            since_turn = 0  # PDUs framed since the reader last let everyone else run
            while not self.closing:
                self._wait_for_room()
                data = recv(262144)
                if not data:
                    break
                self.last_heard = time.monotonic()
                framer.receive_data(data)
                taken = 0
                while not self.closing and (pdu := framer.next_pdu()) is not None:
                    if not room.is_set():
                        self._wait_for_room()
                    taken += 1
                    if not taken % _YIELD_EVERY and self.out:
                        self._flush()  # what is ready goes now (see _YIELD_EVERY)
                        if self.workers:
                            gevent.sleep(0)  # and the commands running in greenlets get a turn
                    since_turn += 1
                    if since_turn >= TURN_EVERY_PDUS:
                        since_turn = 0
                        gevent.idle()  # everyone else gets a turn (see TURN_EVERY_PDUS)
                    if conn.state is State.LOGIN:
                        actions = conn.receive(pdu)
                        if conn.state is State.FULL_FEATURE:
                            login_timer.kill()
                            framer.set_digests(conn.header_digest, conn.data_digest)
                            framer.max_data = conn.max_recv
                            self._started()  # before the last Login Response goes out
                        self._perform(actions)
                    else:
                        self._perform(conn.receive(pdu))
                self._flush()  # before the next receive, which may wait
        except RemoteProtocolError as e:
            log.warning("connection_dropped", peer=self.peer, error=str(e))
        except OSError as e:
            log.info("connection_lost", peer=self.peer, error=e.strerror or str(e))
        finally:
            self.closing = True
            login_timer.kill()
            if pinger is not None:
                pinger.kill()
            if self.key is not None and self.portal.sessions.get(self.key) is self:
                del self.portal.sessions[self.key]
            self._end_streams()
            gevent.joinall(list(self.workers), timeout=30)
            if not self.reinstated:  # else the nexus loss was reported when the new one came
                self._nexus_lost()
            self.writer_done = True
            self.wake_writer.set()
            writer.join(timeout=5)
            with contextlib.suppress(OSError):
                self.sock.close()

    def _started(self) -> None:
        """Full feature reached. A session of the same initiator port (InitiatorName + ISID)
        with the same target is reinstated (RFC 7143 6.3.5): it is closed and its commands have
        finished, and its I_T nexus loss reported, before this session's first response, so
        nothing of the old one can act on (or release) what the new one does."""
        conn = self.conn
        target = conn.target.iqn if conn.target else ""
        log.info("session_started", peer=self.peer, initiator=conn.initiator, target=target or "discovery")
        if conn.discovery:
            return
        self.key = (conn.initiator, conn.login.isid, target)
        old = self.portal.sessions.get(self.key)
        if old is not None:
            log.info("session_reinstated", peer=self.peer, old_peer=old.peer, initiator=conn.initiator,
                     target=target)
            old.reinstate()
        self.portal.sessions[self.key] = self

    def reinstate(self) -> None:
        """End this session for the one that replaces it (see ``_started``)."""
        self.reinstated = True
        self._perform(self.conn.reinstated())
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        gevent.joinall(list(self.workers), timeout=30)
        self._nexus_lost()

    def _nexus_lost(self) -> None:
        """The I_T nexus is gone: so are its SPC-2 reservations (SPC-2 5.5.1) and the unit
        attentions owed to it."""
        for lun in self._luns(None):
            lun.reservations.nexus_lost(self.conn.nexus)
            lun.nexus_lost(self.conn.nexus)

    def _login_expired(self) -> None:
        actions = self.conn.login_timed_out()
        if actions:
            log.warning("login_timeout", peer=self.peer, initiator=self.conn.initiator or None,
                        timeout_s=self.portal.login_timeout)
            self._perform(actions)
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            kind = type(action)
            if kind is Send:
                parts = action.parts  # type: ignore[union-attr]
                n = 0
                for part in parts:
                    n += len(part)
                self.out += parts
                self.out_bytes += n
                self._owe(n)
                # the reader flushes what it queued before it may wait (``_flush`` wakes the
                # writer for what the socket does not take); anyone else leaves it to the writer
                if not self.wake_writer.is_set() and gevent.getcurrent() is not self.reader:
                    self.wake_writer.set()
            elif kind is Execute:
                # every command that may wait (a fetch from the source, an fdatasync) gets its own
                # greenlet, so that it never holds up the commands behind it (``_read_now``: those
                # that cannot wait never become tasks)
                task = action.task  # type: ignore[union-attr]
                lun = self._lun(task.lun)
                # its data-in counts as owed from now on: READs running at once are bounded too
                reserved = min(task.expected, MAX_TRANSFER_BYTES) if task.read else 0
                self._owe(reserved)
                g = gevent.spawn(self._execute, task, lun, reserved)
                self.workers.add(g)
                g.link(self.workers.discard)
            elif kind is Piece:
                queue = self.streams.get(action.task)  # type: ignore[union-attr]
                if queue is not None:  # (gone only once the connection is)
                    queue.put(action)  # type: ignore[arg-type]
            elif kind is Stream:
                task = action.task  # type: ignore[union-attr]
                queue: gevent.queue.SimpleQueue[Piece | None] = gevent.queue.SimpleQueue()
                self.streams[task] = queue
                g = gevent.spawn(self._stream, task, queue)
                self.workers.add(g)
                g.link(self.workers.discard)
            elif kind is StreamEnd:
                queue = self.streams.get(action.task)  # type: ignore[union-attr]
                if queue is not None:
                    queue.put(None)
            elif kind is Fault:
                log.warning("initiator_fault", peer=self.peer, initiator=self.conn.initiator,
                            error=action.message)  # type: ignore[union-attr]
            elif kind is Reset:
                lun_number = action.lun  # type: ignore[union-attr]
                for lun in self._luns(lun_number):
                    lun.reservations.reset()
                log.info("lun_reset" if lun_number is not None else "target_reset", peer=self.peer,
                         initiator=self.conn.initiator, lun=lun_number)
            elif kind is Close:
                log.info("connection_closing", peer=self.peer, reason=action.reason)  # type: ignore[union-attr]
                self.closing = True
                self._end_streams()

    def _end_streams(self) -> None:
        """The connection is going: every streamed WRITE stops after the piece it is writing."""
        for queue in self.streams.values():
            queue.put(None)

    def _luns(self, number: int | None) -> list[Lun]:
        """The LUN ``number`` of this session's target, or all of them for None."""
        target = self.conn.target
        if target is None:
            return []
        luns: list[Lun] = list(target.luns.values())  # type: ignore[arg-type]
        return [lun for lun in luns if number is None or lun.number == number]

    def _execute(self, task: Task, lun: Lun | None, reserved: int) -> None:
        """Run ``task`` on ``lun`` (None: the target has no such LUN) and queue its response;
        ``reserved`` bytes of data-in were counted as owed for it when it started."""
        try:
            if lun is None:
                target = self.conn.target
                result = dispatch.execute_no_lun(task.cdb, sorted(target.luns) if target else [])
            else:
                data = task.data if task.data else None  # no copy: the task is done growing
                result = dispatch.execute(lun, task.cdb, data, self.conn.nexus)
            self._perform(self.conn.task_done(task, result.status, result.data_in, result.sense))
        finally:
            if reserved:
                self._owe(-reserved)  # its PDUs, if any, are counted in the queue now

    def _stream(self, task: Task, queue: gevent.queue.SimpleQueue[Piece | None]) -> None:
        """A streamed WRITE: its checks, then its pieces in order, then its status (module
        docstring). Once it has failed its pieces are still taken and reported, unwritten: the
        initiator sends the rest of its data-out, and the command ends when that is in."""
        try:
            lun = self._lun(task.lun)
            assert lun is not None  # only a LUN's commands stream (_stream_plan)
            write = dispatch.WriteStream(lun, task.cdb, self.conn.nexus, task.want_out)
            while (piece := queue.get()) is not None:
                if not (task.aborted or self.closing):
                    write.write(piece.offset, piece.data)
                self._perform(self.conn.piece_written(task, len(piece.data)))
            if task.aborted or self.closing:  # no status goes out (or can)
                self._perform(self.conn.task_done(task, Status.GOOD, None, None))
                return
            failure = task.data_failure()
            if failure is not None:
                self._perform(self.conn.task_done(task, Status.CHECK_CONDITION, None, failure))
                return
            result = write.finish()
            self._perform(self.conn.task_done(task, result.status, None, result.sense))
        finally:
            self.streams.pop(task, None)

    def _ping_loop(self) -> None:
        """After ``nop_interval`` of silence, ping; after as long again without an answer (or
        anything else) from the initiator, drop the connection (as LIO's nopin timeouts do)."""
        while not self.closing:
            gevent.sleep(self.nop_interval / 3)
            silent = time.monotonic() - self.last_heard
            if self.conn.ping_outstanding is not None and silent >= 2 * self.nop_interval:
                log.warning("initiator_not_responding", peer=self.peer, initiator=self.conn.initiator,
                            silent_s=round(silent, 1))
                self.closing = True
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)
                return
            if silent >= self.nop_interval:
                self._perform(self.conn.ping())

    def _flush(self) -> None:
        """Send what is queued from the reader itself, in one sendmsg that does not wait: the
        common case (4 KiB reads answered inline) then costs no switch to the writer greenlet and
        back. Only while the writer holds no batch (``sending``: it takes what is queued once
        that is out), or PDUs would overtake it; what the socket does not take at once (or an
        error, which the writer meets and acts on) is left to the writer, woken here."""
        if self.sending or not self.out:
            return
        if len(self.out) > _MAX_IOV:
            self.wake_writer.set()
            return
        batch = self.out
        try:
            sent = self.sock.sendmsg(batch, (), socket.MSG_DONTWAIT)
        except OSError:  # BlockingIOError (socket full) included
            self.wake_writer.set()
            return
        total = sent
        if sent == self.out_bytes:
            self.out, self.out_bytes = [], 0
        else:  # a short write: the rest, in order, for the writer
            i = 0
            while sent >= len(batch[i]):
                sent -= len(batch[i])
                i += 1
            rest = batch[i:]
            if sent:
                rest[0] = memoryview(rest[0])[sent:]
            self.out, self.out_bytes = rest, self.out_bytes - total
            self.wake_writer.set()
        self._owe(-total)

    def _write_loop(self) -> None:
        """Send PDUs in order. Whatever has been queued meanwhile goes out in one gathered write:
        many small responses (4 KiB reads at QD16) then cost one system call, not one each, and
        Data-In payloads go to the socket straight from the read buffer."""
        while True:
            if not self.out:  # checked before waiting: a wake-up for what is queued is never lost
                if self.writer_done:
                    return
                self.wake_writer.wait()
                self.wake_writer.clear()
                continue
            batch = self.out
            self.out, self.out_bytes = [], 0
            self.sending = True
            start = 0
            while start < len(batch):
                end, size = start, 0
                while end < len(batch) and size < _COALESCE and end - start < _MAX_IOV:
                    size += len(batch[end])
                    end += 1
                try:
                    _send_all(self.sock, batch[start:end])
                except OSError:
                    self.closing = True
                    self.room.set()  # a reader waiting for room must see the connection is gone
                    return
                self._owe(-size)
                start = end
            self.sending = False


def _send_all(sock: socket.socket, buffers: list[bytes | bytearray | memoryview]) -> None:
    """sendmsg until every byte is out, resuming mid-buffer after a short write. Every buffer
    is a byte buffer (bytes, bytearray or a memoryview of bytes): its len() is its size in bytes."""
    i = 0
    while i < len(buffers):
        sent = sock.sendmsg(buffers[i:] if i else buffers)
        while i < len(buffers) and sent >= len(buffers[i]):
            sent -= len(buffers[i])
            i += 1
        if sent:
            buffers[i] = memoryview(buffers[i])[sent:]


def _read_now(lun: object, cdb: bytes, nexus: str) -> dispatch.Result | None:
    """A READ of a fully local LUN is a pread from the page cache: the connection runs it as it
    reads the command, in the reader, with no task, greenlet or switch (None: anything else, which
    becomes a task)."""
    assert isinstance(lun, Lun)
    if cdb[0] in _INLINE_READS and lun.backend.complete:
        return dispatch.execute(lun, cdb, None, nexus)
    return None


def _data_out_length(cdb: bytes, lun: object) -> int:
    """Bytes of data-out a command to ``lun`` (a Lun of the session's target) carries."""
    assert isinstance(lun, Lun)
    return dispatch.data_out_length(cdb, lun.block_size)


def _stream_plan(cdb: bytes, lun: object) -> tuple[int, int] | None:
    """Whether a command's data-out streams (``dispatch.STREAMED_WRITES``): where on the LUN it
    begins and the LUN's unit, the grid its pieces are cut on (connection.py)."""
    assert isinstance(lun, Lun)
    start = dispatch.write_start(cdb, lun.block_size)
    return None if start is None else (start, lun.backend.unit)


def target_address(sockname: tuple) -> str:  # type: ignore[type-arg]
    """SendTargets' TargetAddress for a connection that arrived at ``sockname`` (RFC 7143 13.8).

    The address the initiator reached, not the one we listen on: a portal bound to 0.0.0.0 or
    ``::`` (or to port 0) would otherwise advertise an address no initiator can use. An IPv6
    address is bracketed, as 13.8 requires, so its colons are not taken for the port's.
    """
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
