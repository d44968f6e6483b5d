"""The reader's own sends (portal._Session._flush): PDUs queued by the reader go out from the
reader in one non-waiting sendmsg, with no switch to the writer greenlet; what the socket does
not take stays queued for the writer, and nothing the reader queued overtakes a batch the writer
holds. Over a real TCP connection with small buffers, so that short writes and a full socket
happen for real; the initiator end is read from this greenlet."""

from __future__ import annotations

import socket
import struct

import gevent
import gevent.socket

from lazyiscsi.iscsi.connection import Send
from lazyiscsi.iscsi.portal import MAX_OUTSTANDING_BYTES, Portal, _Session

PART = 1024  # bytes per queued buffer
#: small socket buffers: a few dozen parts fill them
BUFFER = 8192


def pair() -> tuple[gevent.socket.socket, gevent.socket.socket]:
    """(target end, as the portal has it; initiator end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.socket()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
        peer.connect(listener.getsockname())
        conn, _ = listener.accept()
    target = gevent.socket.socket(fileno=conn.detach())
    target.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
    return target, gevent.socket.socket(fileno=peer.detach())


def part(i: int) -> bytes:
    return struct.pack(">I", i) * (PART // 4)


def queue(session: _Session, first: int, count: int) -> None:
    for i in range(first, first + count):
        session._perform([Send([part(i)])])


def receive(peer: gevent.socket.socket, n: int) -> bytes:
    """``n`` bytes (waiting for them lets the writer greenlet run)."""
    got = bytearray()
    while len(got) < n:
        chunk = peer.recv(n - len(got))
        assert chunk, "connection closed early"
        got += chunk
    return bytes(got)


def receive_now(peer: gevent.socket.socket) -> bytes:
    """What has arrived, without waiting (no other greenlet runs meanwhile)."""
    got = bytearray()
    peer.setblocking(False)
    try:
        while chunk := peer.recv(65536):
            got += chunk
    except BlockingIOError:
        pass
    finally:
        peer.setblocking(True)
    return bytes(got)


def test_reader_sends_what_fits_and_the_writer_the_rest_in_order() -> None:
    target, peer = pair()
    session = _Session(target, "test", Portal([], ("127.0.0.1", 0)))
    writer = gevent.spawn(session._write_loop)
    try:
        queue(session, 0, 4)
        session._flush()  # room in the socket: all of it goes, from here
        assert (session.out, session.out_bytes, session.owed) == ([], 0, 0)
        assert receive(peer, 4 * PART) == b"".join(part(i) for i in range(4))

        queue(session, 4, 500)  # far more than the socket buffers hold
        session._flush()
        left = session.out_bytes
        assert 0 < left < 500 * PART, "a short write: part sent, the rest still queued"
        assert session.owed == left  # only what went out is counted off
        assert not writer.dead and not session.sending  # the writer has not run: no switch

        gevent.sleep(0)  # the writer takes the rest, and waits for the socket (peer not reading)
        assert session.sending and session.out == []
        queue(session, 504, 8)  # queued behind the writer's batch
        early = receive_now(peer)  # room in the socket again, before the writer runs
        assert early
        session._flush()
        assert len(session.out) == 8, "the reader sent past the writer's unsent batch"

        session.writer_done = True
        session.wake_writer.set()
        got = early + receive(peer, 508 * PART - len(early))
        assert got == b"".join(part(i) for i in range(4, 512))
        writer.join(timeout=10)
        assert writer.dead and session.owed == 0
    finally:
        writer.kill()
        target.close()
        peer.close()


def test_a_socket_that_takes_nothing_leaves_everything_to_the_writer() -> None:
    target, peer = pair()
    session = _Session(target, "test", Portal([], ("127.0.0.1", 0)))
    try:
        queue(session, 0, 500)
        before: list[object] = []
        for _ in range(100):  # until the socket (and the peer's buffer) is full
            before = list(session.out)
            session._flush()  # at last EAGAIN: nothing sent, nothing lost, nothing raised
            if session.out == before:
                break
        assert session.out == before and 0 < session.owed == session.out_bytes < 500 * PART
    finally:
        target.close()
        peer.close()


def test_what_the_reader_queues_wakes_the_writer_only_for_what_the_socket_left() -> None:
    """The reader sends its own answers: queuing them does not wake the writer (no switch to it
    and back per batch). What a short write leaves must wake it, or it would wait for ever."""
    target, peer = pair()
    session = _Session(target, "test", Portal([], ("127.0.0.1", 0)))
    session.reader = gevent.getcurrent()  # this greenlet plays the reader
    writer = gevent.spawn(session._write_loop)
    try:
        gevent.sleep(0)  # the writer waits for a wake-up
        queue(session, 0, 4)
        assert not session.wake_writer.is_set()
        session._flush()
        assert session.out == [] and not session.wake_writer.is_set()
        assert receive(peer, 4 * PART) == b"".join(part(i) for i in range(4))

        queue(session, 4, 500)  # more than the socket takes at once
        assert not session.wake_writer.is_set()
        session._flush()
        assert session.out and session.wake_writer.is_set(), "the rest is the writer's"
        with gevent.Timeout(10, AssertionError("the writer was not woken for what was left")):
            got = receive(peer, 500 * PART)
        assert got == b"".join(part(i) for i in range(4, 504))
        gevent.sleep(0)
        assert session.out == [] and session.owed == 0
    finally:
        writer.kill()
        target.close()
        peer.close()


def test_a_reader_out_of_room_sends_what_it_queued_before_it_waits() -> None:
    """Backpressure (``MAX_OUTSTANDING_BYTES``): a reader that queued past the limit waits for
    room, and room comes only once those bytes are sent: it must hand them on first."""
    target, peer = pair()
    session = _Session(target, "test", Portal([], ("127.0.0.1", 0)))
    session.reader = gevent.getcurrent()
    writer = gevent.spawn(session._write_loop)
    drained = bytearray()

    def drain() -> None:
        while chunk := peer.recv(1 << 16):
            drained.extend(chunk)

    reader_end = gevent.spawn(drain)
    try:
        gevent.sleep(0)
        count = MAX_OUTSTANDING_BYTES // PART + 1
        queue(session, 0, count)
        assert not session.room.is_set() and not session.wake_writer.is_set()
        with gevent.Timeout(30, AssertionError("the reader waited for room it held back itself")):
            session._wait_for_room()
        assert session.room.is_set()
        with gevent.Timeout(30):
            while len(drained) < count * PART:
                gevent.sleep(0.01)
        assert bytes(drained) == b"".join(part(i) for i in range(count))
    finally:
        writer.kill()
        reader_end.kill()
        target.close()
        peer.close()
