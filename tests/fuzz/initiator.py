"""One initiator connection on gevent sockets, for the fuzzer and for the well-behaved session.

A reader greenlet parses what the target sends, answers its R2Ts (with Data-Out cut to the
target's MaxRecvDataSegmentLength) and its pings, tracks ExpStatSN, and completes commands by
ITT. Sending goes through ``damage`` when one is given: the fuzzing lanes pass the mutator, the
well-behaved session passes none and so sends exactly what the builders made.
"""

from __future__ import annotations

import contextlib
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent
import gevent.event
import gevent.lock
import gevent.queue
import gevent.socket

from tests.fuzz import wire
from tests.fuzz.wire import ALL_ONES, Op, Pdu, Response

#: what we declare as our MaxRecvDataSegmentLength (RFC 7143 13.12): the target must cut to it
MAX_RECV = 65536
#: how long a login step may take before the session is given up (the daemon is under load)
LOGIN_TIMEOUT = 10.0

#: commands a connection keeps unanswered at most: well inside the portal's CmdSN window
#: (QUEUE_DEPTH 64), so the target runs what the fuzzer sends instead of ignoring it as
#: out of window (RFC 7143 4.2.2.1)
WINDOW = 16

#: Damage hook: (pdus, header digest on, data digest on) -> (bytes to send, PDUs in them, stream cut)
Damage = Callable[[list[Pdu], bool, bool], tuple[bytes, int, bool]]


@dataclass
class Completion:
    """How a command ended: the final PDU's opcode, its status or response byte, and data-in."""

    opcode: int
    status: int
    sense: bytes = b""
    data: bytes = b""


@dataclass
class Stats:
    """What the initiators of a campaign did and saw, summed over all of them."""

    pdus: int = 0
    bytes: int = 0
    responses: int = 0
    connections: int = 0
    logins: int = 0
    framing_errors: list[str] = field(default_factory=list)
    #: the same from sessions whose own login was damaged: what they declared is not known for
    #: sure (a damaged key may have overridden it), so these are reported, not counted as bugs
    framing_notes: list[str] = field(default_factory=list)
    cdb_opcodes: Counter[int] = field(default_factory=Counter)  # fuzzed CDBs by opcode
    login_kinds: Counter[str] = field(default_factory=Counter)  # logins that reached full feature


@dataclass
class _Write:
    lun: int
    data: bytes


class Initiator:
    """A connection to ``address``. ``login`` first; then ``send`` (fire and forget, with a window
    of commands in flight) or ``call`` (send one command and wait for how it ended)."""

    def __init__(self, address: tuple[str, int], stats: Stats, damage: Damage | None = None, *,
                 connect_timeout: float = 10.0) -> None:
        self.sock = gevent.socket.create_connection(address, timeout=connect_timeout)
        self.sock.settimeout(None)
        self.stats = stats
        stats.connections += 1
        self.damage = damage
        self.reader = wire.Reader(MAX_RECV)
        self.header_digest = self.data_digest = False
        self.max_send = 8192  # the target's MaxRecvDataSegmentLength (its declaration)
        self.first_burst = 65536
        self.immediate_data = True
        self.initial_r2t = False
        self.cmdsn = 0
        self.expstatsn = 0
        self.itt = 0x1000
        self.isid = b"\x40\x00\x01\x37\x00\x00"
        self.tsih = 0
        self.closed = gevent.event.Event()
        self.cut = False  # the stream was cut mid-PDU: nothing more may be sent
        self.strict = True  # the target's framing errors are bugs (see Stats.framing_notes)
        self._login_keys: dict[str, str] = {}  # what the target answered in all login responses
        self._lock = gevent.lock.Semaphore()
        self._login_replies: gevent.queue.Queue = gevent.queue.Queue()
        self._writes: dict[int, _Write] = {}
        self._waiting: dict[int, gevent.event.AsyncResult] = {}
        self._data_in: dict[int, bytearray] = {}
        self._inflight: set[int] = set()
        self._window_open = gevent.event.Event()
        self._window_open.set()
        self._reader = gevent.spawn(self._read_loop)

    # -- sending -------------------------------------------------------------------------------

    def next_itt(self) -> int:
        self.itt = (self.itt + 1) & 0x7FFFFFFF or 1
        return self.itt

    def next_cmdsn(self) -> int:
        """The CmdSN for a non-immediate command (RFC 7143 4.2.2.1), advanced."""
        n = self.cmdsn
        self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
        return n

    def send(self, pdus: list[Pdu], *, track: tuple[int, ...] = (),
             write: tuple[int, int, bytes] | None = None, clean: bool = False) -> bool:
        """Send ``pdus`` (damaged unless ``clean``). ``track``: ITTs whose answer counts against
        the window; ``write``: (itt, lun, data) to answer R2Ts from. False once the connection is
        gone or the stream was cut."""
        if self.closed.is_set() or self.cut:
            return False
        if write is not None:
            self._writes[write[0]] = _Write(write[1], write[2])
        self._inflight.update(track)
        if len(self._inflight) >= WINDOW:
            self._window_open.clear()
        if self.damage is not None and not clean:
            payload, count, cut = self.damage(pdus, self.header_digest, self.data_digest)
        else:
            payload = b"".join(p.encode(header_digest=self.header_digest, data_digest=self.data_digest)
                               for p in pdus)
            count, cut = len(pdus), False
        try:
            with self._lock:
                self.sock.sendall(payload)
        except OSError:
            self.closed.set()
            return False
        self.stats.pdus += count
        self.stats.bytes += len(payload)
        if cut:
            self.cut = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(gevent.socket.SHUT_WR)
        return not cut

    def wait_window(self, timeout: float) -> None:
        """Wait until fewer than ``WINDOW`` tracked commands are unanswered; what a damaged PDU
        left unanswered is forgotten after ``timeout``."""
        if not self._window_open.wait(timeout):
            self._inflight.clear()
            self._window_open.set()

    def call(self, pdus: list[Pdu], itt: int, *, timeout: float, write: bytes | None = None,
             lun: int = 0) -> Completion:
        """Send one command cleanly and wait for how it ended (TimeoutError if it did not)."""
        result = gevent.event.AsyncResult()
        self._waiting[itt] = result
        self._data_in[itt] = bytearray()
        if not self.send(pdus, write=(itt, lun, write) if write is not None else None, clean=True):
            raise ConnectionError("the connection is gone")
        try:
            return result.get(timeout=timeout)  # type: ignore[no-any-return]
        except gevent.Timeout:
            raise TimeoutError(f"no answer to ITT {itt:#x} within {timeout} s") from None
        finally:
            self._waiting.pop(itt, None)
            self._data_in.pop(itt, None)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        self._reader.kill()
        self.closed.set()

    # -- login ---------------------------------------------------------------------------------

    def login_step(self, pdu: Pdu, *, clean: bool) -> Response | None:
        """Send one Login PDU and wait for its response (None: refused, silent or closed)."""
        if not self.send([pdu], clean=clean):
            return None
        try:
            reply: Response | None = self._login_replies.get(timeout=LOGIN_TIMEOUT)
        except gevent.queue.Empty:
            return None
        return reply

    def login(self, pairs_by_stage: list[tuple[int, int, list[tuple[str, str]]]], *,
              chap: tuple[str, str] | None, clean: bool) -> dict[str, str] | None:
        """Walk the login stages [(CSG, NSG, keys)], answering a CHAP challenge on the way
        (RFC 7143 12.1.3). Returns the negotiated keys once in full feature phase, else None."""
        negotiated: dict[str, str] = {}
        itt = self.next_itt()
        stages = list(pairs_by_stage)
        while stages:
            csg, nsg, keys = stages.pop(0)
            pdu = wire.login(isid=self.isid, tsih=self.tsih, itt=itt, cid=1, cmdsn=self.cmdsn,
                             expstatsn=self.expstatsn, csg=csg, nsg=nsg, transit=True,
                             text=wire.format_text(keys))
            reply = self.login_step(pdu, clean=clean)
            if reply is None or reply.bhs[36] != 0:
                return None
            answer = wire.parse_text(reply.data)
            negotiated.update(answer)
            if chap is not None and answer.get("AuthMethod") == "CHAP":
                stages.insert(0, (0, nsg, [("CHAP_A", "5")]))
            elif chap is not None and "CHAP_C" in answer:
                try:
                    r = wire.chap_response(int(answer["CHAP_I"], 0), chap[1], answer["CHAP_C"])
                except (ValueError, KeyError):
                    return None
                stages.insert(0, (0, nsg, [("CHAP_N", chap[0]), ("CHAP_R", r)]))
            elif not reply.flags & 0x80 and not stages:
                return None  # the target did not let us go on
            if reply.flags & 0x80 and reply.flags & 0x03 == 3:
                self.tsih = int(struct.unpack_from(">H", reply.bhs, 14)[0])
                self._enter_full_feature(negotiated)
                return negotiated
        return None

    def _enter_full_feature(self, negotiated: dict[str, str]) -> None:
        self.header_digest = negotiated.get("HeaderDigest") == "CRC32C"
        self.data_digest = negotiated.get("DataDigest") == "CRC32C"
        self.max_send = _number(negotiated.get("MaxRecvDataSegmentLength"), 8192)
        self.first_burst = _number(negotiated.get("FirstBurstLength"), 65536)
        self.immediate_data = negotiated.get("ImmediateData", "Yes") == "Yes"
        self.initial_r2t = negotiated.get("InitialR2T", "Yes") == "Yes"
        self.stats.logins += 1

    # -- receiving -----------------------------------------------------------------------------

    def _read_loop(self) -> None:
        try:
            while True:
                chunk = self.sock.recv(262144)
                if not chunk:
                    return
                self.reader.feed(chunk)
                while (r := self.reader.next_response()) is not None:
                    self.stats.responses += 1
                    self._handle(r)
        except wire.TargetFramingError as e:
            (self.stats.framing_errors if self.strict else self.stats.framing_notes).append(str(e))
        except OSError:
            pass
        finally:
            self.closed.set()
            for result in self._waiting.values():
                result.set_exception(ConnectionError("the connection closed"))
            self._window_open.set()

    def _handle(self, r: Response) -> None:
        op = r.opcode
        if op in _CARRIES_STATSN and (op != Op.DATA_IN or r.flags & 0x01) and \
                (op != Op.NOP_IN or r.itt != ALL_ONES):
            self.expstatsn = (r.word(24) + 1) & 0xFFFFFFFF
        if op == Op.LOGIN_RESPONSE:
            self._login_keys.update(wire.parse_text(r.data))
            if r.flags & 0x80 and r.flags & 0x03 == 3 and r.bhs[36] == 0:
                # the target uses the digests from its next PDU on: switch before parsing it
                answer = self._login_keys
                self.reader.header_digest = answer.get("HeaderDigest") == "CRC32C"
                self.reader.data_digest = answer.get("DataDigest") == "CRC32C"
            self._login_replies.put(r)
        elif op == Op.R2T:
            self._answer_r2t(r)
        elif op == Op.NOP_IN and r.word(20) != ALL_ONES:
            # a ping from the target: answer with its TTT, ITT all ones, CmdSN not advanced (11.18)
            gevent.spawn(self.send, [wire.nop_out(itt=ALL_ONES, ttt=r.word(20), cmdsn=self.cmdsn,
                                                  expstatsn=self.expstatsn, immediate=True)])
        elif op == Op.DATA_IN:
            buf = self._data_in.get(r.itt)
            if buf is not None:
                offset = r.word(40)
                if len(buf) < offset + len(r.data):
                    buf.extend(bytes(offset + len(r.data) - len(buf)))
                buf[offset:offset + len(r.data)] = r.data
            if r.flags & 0x01:
                self._complete(r.itt, Completion(op, r.bhs[3]))
        elif op == Op.REJECT:
            rejected = r.data[16:20]
            if len(rejected) == 4:
                self._complete(int.from_bytes(rejected, "big"), Completion(op, r.bhs[2]))
        elif op == Op.SCSI_RESPONSE:
            sense = r.data[2:2 + int.from_bytes(r.data[:2], "big")] if len(r.data) >= 2 else b""
            self._complete(r.itt, Completion(op, r.bhs[3], sense))
        elif op in (Op.TASK_MGMT_RESPONSE, Op.LOGOUT_RESPONSE, Op.NOP_IN) or \
                (op == Op.TEXT_RESPONSE and r.flags & 0x80):
            self._complete(r.itt, Completion(op, r.bhs[2]))

    def _complete(self, itt: int, completion: Completion) -> None:
        self._writes.pop(itt, None)
        self._inflight.discard(itt)
        if len(self._inflight) < WINDOW:
            self._window_open.set()
        result = self._waiting.get(itt)
        if result is not None:
            completion.data = bytes(self._data_in.get(itt, b""))
            result.set(completion)

    def _answer_r2t(self, r: Response) -> None:
        """Data-Out for the burst an R2T asks for (RFC 7143 11.8), cut to MaxRecvDataSegmentLength."""
        task = self._writes.get(r.itt)
        if task is None:
            return
        ttt, offset, length = r.word(20), r.word(40), r.word(44)
        pdus = []
        pos, datasn = offset, 0
        end = offset + min(length, 1 << 24)
        while pos < end:
            n = min(self.max_send, end - pos)
            chunk = task.data[pos:pos + n].ljust(n, b"\0")
            pdus.append(wire.data_out(itt=r.itt, lun=task.lun, ttt=ttt, expstatsn=self.expstatsn,
                                      datasn=datasn, offset=pos, data=chunk, final=pos + n >= end))
            pos += n
            datasn += 1
        if pdus:
            gevent.spawn(self.send, pdus)


_CARRIES_STATSN = frozenset({Op.SCSI_RESPONSE, Op.TASK_MGMT_RESPONSE, Op.LOGIN_RESPONSE, Op.TEXT_RESPONSE,
                             Op.LOGOUT_RESPONSE, Op.REJECT, Op.NOP_IN, Op.DATA_IN})


def _number(value: str | None, default: int) -> int:
    try:
        return int(value, 0) if value is not None else default
    except ValueError:
        return default
