"""One iSCSI connection's state machine, sans I/O (h11's shape: events in, actions out).

Theory of operation (RFC 7143, error recovery level 0, one connection per session):

    LOGIN  --(the login state machine reaches full feature, login.py)-->  FULL_FEATURE
    LOGIN  --(login refused, or login_timed_out() from the portal's clock)-->  CLOSED
    FULL_FEATURE  --(Logout, or reinstated() by a new login of the same initiator port)-->  CLOSED
    any state  --(a protocol error that loses framing)-->  CLOSED

``receive(pdu)`` takes one framed PDU and returns actions: bytes to send, a SCSI task ready to
execute (all its data-out gathered), a streamed WRITE's pieces, or close. ``task_done(task,
result)`` turns a finished command into Data-In/Response PDUs. Execution itself (which may
block on the store) belongs to the caller: this module has no socket, no greenlet and no clock;
timeouts are events the portal feeds in (``login_timed_out``, ``ping``). A command the caller can
run without waiting (its ``run_now``: the portal's READs of a fully local LUN) is run through it
as it is read and answered in the same actions, with no task.

The login phase, its stages, keys and refusals, lives in ``login.py``; this module hands it each
Login Request and takes over when it reaches full feature. A discovery session's full feature
phase takes only ``DISCOVERY_EVENTS`` (RFC 7143 4.3); anything else there is rejected.

Sequence numbers: CmdSN advances for every non-immediate command; the window offered to the
initiator is ExpCmdSN..MaxCmdSN. It is ``QUEUE_DEPTH`` wide less the commands still running, so
MaxCmdSN moves on only as commands finish, and a command outside it is ignored (RFC 7143 4.2.2.1):
an initiator that pipelines more than the window gets no more tasks, greenlets or buffers for it.
Unsolicited data (immediate data and Data-Out before the first R2T) is held to what the session
negotiated (InitialR2T, ImmediateData, FirstBurstLength); solicited data to the R2T that asked for
it, and R2Ts go out only while the write data a connection holds fits ``MAX_SOLICITED_BYTES``.
StatSN counts responses.

Streamed writes. A WRITE(10/12/16) (``stream_plan`` says which: the SCSI layer's choice) of more
than ``STREAM_PIECE_BYTES`` is not gathered whole: ``Stream(task)`` starts it as soon as the
command arrives (the caller runs its checks then, before any data), its data-out is cut into
``Piece``s as it comes, and ``StreamEnd(task)`` says that no more will come (all of it arrived, or
the data failed a digest or DataSN check, or the task was aborted). Pieces are cut on a grid of
``piece`` bytes on the LUN (the larger of ``STREAM_PIECE_BYTES`` and the LUN's unit, a whole
number of units): every cut but the command's own first and last byte is unit-aligned, so each
piece covers only whole units apart from the command's own partial head and tail, which the store
fetches before it writes them, as for any write. The caller reports each piece written
(``piece_written``), and R2Ts ask only for data that keeps what a command holds (arrived and not
yet written) within ``stream_window(piece)``: two pieces, one being written while the next
arrives. The unsolicited burst (FirstBurstLength, at most the 256 KiB we offer) fits in one piece.
After a digest or DataSN error no more of the command's data is handed out (a bad segment never
is), the rest of its data-out is consumed as before and the command fails with the same sense as a
gathered one; whatever pieces were written before stay written (SBC-4: the range of a failed WRITE
is indeterminate).
"""

from __future__ import annotations

import collections
import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lazyiscsi.iscsi import params
from lazyiscsi.iscsi.login import Login, Refused, Reply, Stage, Target, refusal
from lazyiscsi.iscsi.login import build_response as build_login_response
from lazyiscsi.iscsi.pdu import (
    BHS_LEN,
    DataOut,
    LoginRequest,
    LogoutRequest,
    NopOut,
    Opcode,
    RawPdu,
    RejectReason,
    RemoteProtocolError,
    ScsiCommand,
    TaskManagementRequest,
    TextRequest,
    build_data_in,
    build_r2t,
    build_reject,
    build_scsi_response,
    decode,
    decode_scsi_command,
    encode_parts,
)
from lazyiscsi.iscsi.text import Incoming, Outgoing, TextTooLong
from lazyiscsi.scsi.sense import Reason, Status, fixed_sense

if TYPE_CHECKING:
    from lazyiscsi.scsi.dispatch import Result

#: the CmdSN window (RFC 7143 4.2.2.1): at most this many non-immediate commands are outstanding,
#: since MaxCmdSN advances only when one finishes. 64 keeps a 10 GbE link busy with 1 MiB I/O
#: (Linux's open-iscsi queues 32 per session by default) and bounds tasks per connection
QUEUE_DEPTH = 64
#: immediate commands bypass the window (RFC 7143 4.2.2.1); past this many running at once they get
#: Reject "Immediate command reject" (RFC 7143 11.17.1), so they cannot widen it without limit
MAX_IMMEDIATE_TASKS = 8
#: write data a connection solicits (R2T) and holds until its command has run. The target sends
#: R2Ts when it is ready for the data (RFC 7143 11.8): a command is admitted to them whole, in
#: arrival order, while its data fits, and one always is; the others wait for a command to finish.
#: 16 MiB is two of the largest transfers (MAX_TRANSFER_BYTES), sixteen 1 MiB writes in flight
MAX_SOLICITED_BYTES = 16 << 20
#: the Target Transfer Tag of unsolicited Data-Out (RFC 7143 11.7.4)
UNSOLICITED_TTT = 0xFFFFFFFF
#: the pieces a streamed WRITE's data-out is handed to the store in (at least one unit of the
#: LUN): large enough that a piece is one large cache write (the store's writer thread takes
#: writes from 64 KiB) and one R2T of a fast link's worth, small enough that 8 MiB commands at
#: the full CmdSN window hold 2 x 256 KiB each rather than 8 MiB. It equals the FirstBurstLength
#: we offer (login.py), so the unsolicited burst fits in one piece too
STREAM_PIECE_BYTES = 256 << 10


def stream_window(piece: int) -> int:
    """What one streamed WRITE may hold (arrived and not yet written): a piece being written
    and the next one arriving, so the link does not wait for the store between pieces."""
    return 2 * piece


class State(enum.Enum):
    LOGIN = "login"
    FULL_FEATURE = "full-feature"
    CLOSED = "closed"


@dataclass(eq=False, slots=True)
class Task:
    """One SCSI command in flight (compared by identity: two commands are never the same one)."""

    itt: int
    lun: int
    cdb: bytes
    read: bool
    expected: int  # the initiator's Expected Data Transfer Length
    want_out: int  # bytes of data-out to gather (no more than expected)
    cdb_out: int = 0  # bytes of data-out the CDB itself describes (for the residual)
    immediate: bool = False  # sent for immediate delivery: outside the CmdSN window
    #: unsolicited Data-Out may still come: the command had F=0 and no unsolicited PDU had F=1 yet
    unsolicited_open: bool = False
    unsolicited: int = 0  # bytes of unsolicited data received (immediate data included)
    finished: bool = False  # no longer counted against the window
    admitted: int = 0  # bytes of solicited data reserved for it (MAX_SOLICITED_BYTES)
    data: bytearray = field(default_factory=bytearray)  # held: gathered, or not yet cut (streamed)
    received: int = 0  # bytes of data-out arrived (offset of the next one)
    #: a streamed WRITE (module docstring): the LUN byte offset of its data-out's first byte,
    #: the grid its pieces are cut on; -1 for a gathered command
    stream_start: int = -1
    piece: int = 0
    cut: int = 0  # data-out offset up to which pieces were handed out
    written: int = 0  # ... and up to which the caller reported them written
    stream_ended: bool = False  # StreamEnd went out: no piece follows
    #: outstanding R2Ts: Target Transfer Tag -> end offset of the burst it asked for
    r2ts: dict[int, int] = field(default_factory=dict)
    solicited_to: int = -1  # data-out offset up to which R2Ts were sent (-1: none yet)
    r2tsn: int = 0
    seq_ttt: int = 0xFFFFFFFF  # the sequence now arriving (all ones: the unsolicited one)
    next_datasn: int = 0  # of that sequence (RFC 7143 11.7.5)
    sequence_error: str = ""  # why its data-out cannot be trusted: it fails, it is not run
    digest_error: bool = False  # the reason is a data digest error
    executing: bool = False
    aborted: bool = False  # an ABORT TASK (or a reset) came while it ran: no status goes out

    @property
    def streamed(self) -> bool:
        return self.stream_start >= 0

    def data_failure(self) -> bytes | None:
        """The sense a command gets whose data-out went wrong on the way (None: it did not):
        "protocol service CRC error" after a data digest error (RFC 7143 11.4.7.2), else
        "data phase error"; ABORTED COMMAND either way, which initiators retry."""
        if not self.sequence_error:
            return None
        crc = self.digest_error
        return fixed_sense(Reason.PROTOCOL_SERVICE_CRC_ERROR if crc else Reason.DATA_PHASE_ERROR)


@dataclass
class _PendingTmf:
    """A task management response that waits for the running tasks it aborted to finish:
    SAM-5 has the function complete only once those tasks can no longer affect the medium."""

    itt: int
    response: int
    waiting: set[int]


@dataclass(slots=True)
class Send:
    """One PDU, as the buffers that make it up (header, data, padding, digests)."""

    parts: list[bytes | bytearray | memoryview]


@dataclass(slots=True)
class Execute:
    task: Task


@dataclass(slots=True)
class Stream:
    """A streamed WRITE arrived: run its checks now, then write its ``Piece``s in order."""

    task: Task


@dataclass(slots=True)
class Piece:
    """``data`` of a streamed WRITE's data-out at ``offset`` in it: write it, then say so
    (``Connection.piece_written``)."""

    task: Task
    offset: int
    data: bytes | bytearray


@dataclass(slots=True)
class StreamEnd:
    """No more pieces come for a streamed WRITE: finish it (``task_done``), unless it was aborted
    (``task.aborted``) or its data failed (``task.data_failure()``)."""

    task: Task


@dataclass(slots=True)
class Close:
    reason: str


@dataclass(slots=True)
class Fault:
    """Something the initiator did wrong that does not end the connection: for the log."""

    message: str


@dataclass(slots=True)
class Reset:
    """A LUN RESET (``lun``) or TARGET WARM RESET (``lun`` None) for the SCSI layer to apply."""

    lun: int | None


Action = Send | Execute | Stream | Piece | StreamEnd | Close | Reset | Fault
# (actions and tasks are slotted, not frozen, dataclasses: one of each per command, and a frozen
# one costs four times as much to build)


#: what a discovery session may send once logged in: SendTargets, NOP-Out and Logout
#: (RFC 7143 4.3); a SCSI command or task management there is a protocol error
DISCOVERY_EVENTS = frozenset({TextRequest, NopOut, LogoutRequest})


class Connection:
    """Target side of one connection. ``find_target(name)`` looks targets up by IQN;
    ``all_targets()`` lists them for SendTargets; ``data_out_length(cdb, lun)`` says how many
    bytes a command to that LUN object (one of ``Target.luns``' values) carries, and
    ``stream_plan(cdb, lun)`` whether its data-out streams: (the LUN byte offset of its first
    byte, the LUN's unit), or None to gather it (module docstring). ``run_now(lun, cdb, nexus)``
    runs a command that moves no data-out to completion at once, if it can without waiting, and
    returns how it ended; None: it becomes a task for the frontend (``Execute``). ``address`` is
    where this connection reached us, as SendTargets' TargetAddress spells it (empty: not said)."""

    def __init__(self, find_target: Callable[[str], Target | None], all_targets: Callable[[], list[Target]],
                 data_out_length: Callable[[bytes, object], int], *, max_recv: int = 262144,
                 address: str = "",
                 stream_plan: Callable[[bytes, object], tuple[int, int] | None] | None = None,
                 run_now: Callable[[object, bytes, str], Result | None] | None = None) -> None:
        self.address = address
        self._find = find_target
        self._all = all_targets
        self._data_out_length = data_out_length
        self._stream_plan = stream_plan
        self._run_now = run_now
        self.state = State.LOGIN
        self.max_recv = max_recv  # what we accept per PDU (declared to the initiator)
        self.login = Login(find_target, max_recv)
        self._text_in, self._text_out = Incoming(), Outgoing()  # a Text exchange's continuations
        self._text_ttt = 0xFFFFFFFF  # the tag that asks for the rest of a Text Response
        self.header_digest = self.data_digest = False
        self.statsn = 0
        self.expcmdsn = 0
        self.tasks: dict[int, Task] = {}
        self._in_window = 0  # non-immediate tasks not finished: they hold MaxCmdSN back
        self._immediate_tasks = 0  # immediate tasks not finished
        self.ignored_commands = 0  # non-immediate commands outside the window (RFC 7143 4.2.2.1)
        self._solicited = 0  # bytes admitted tasks may send or hold (MAX_SOLICITED_BYTES)
        self._r2t_queue: collections.deque[Task] = collections.deque()  # tasks waiting to be admitted
        self._pending_tmfs: list[_PendingTmf] = []
        self.ping_outstanding: int | None = None  # Target Transfer Tag of an unanswered ping
        self._ttt = 1
        self._nexus = ""
        #: a discovery session: kept once the login is done (every PDU asks); in the full feature
        #: phase of a normal session a SCSI Command goes straight to its handler
        self._discovery = False
        #: the most write data one command held at once (arrived, not yet executed or written):
        #: what streaming bounds, for the tests and the status
        self.held_peak = 0

    @property
    def nexus(self) -> str:
        """The initiator port name (RFC 7143 13.1): what SCSI calls this I_T nexus. It is fixed
        once the login is done (kept then: it is asked for every command)."""
        if self._nexus:
            return self._nexus
        nexus = f"{self.initiator},i,0x{self.login.isid.hex()}"
        if self.state is State.FULL_FEATURE:
            self._nexus = nexus
        return nexus

    # what the login settled: the session's target, initiator and negotiated values
    @property
    def target(self) -> Target | None:
        return self.login.target

    @property
    def initiator(self) -> str:
        return self.login.initiator

    @property
    def discovery(self) -> bool:
        return self.login.discovery

    @property
    def values(self) -> dict[str, str]:
        return self.login.values

    @property
    def max_send(self) -> int:
        """What the initiator accepts per PDU (its MaxRecvDataSegmentLength)."""
        return self.login.max_send

    # -- entry points --------------------------------------------------------------------------

    def receive(self, raw: RawPdu) -> list[Action]:
        try:
            if not raw.data_intact:
                return self._data_digest_error(raw)
            if raw.bhs[0] & 0x3F == Opcode.SCSI_COMMAND and self.state is State.FULL_FEATURE \
                    and not self._discovery:
                # most PDUs: the one handler they can have, without the tables (the same checks)
                return self._scsi_command(decode_scsi_command(raw))
            event = decode(raw)
            handler = _HANDLERS.get((self.state, type(event)))
            if self.state is State.FULL_FEATURE and self._discovery and type(event) not in DISCOVERY_EVENTS:
                # the refused command still takes its CmdSN (RFC 7143 4.2.2.1), or every later
                # one would look out of order; one outside the window is ignored as anywhere else
                if isinstance(event, (ScsiCommand, TaskManagementRequest)) and \
                        not self._window(event.immediate, event.cmdsn):
                    return self._ignored(event.cmdsn)
                raise RemoteProtocolError(f"{type(event).__name__} in a discovery session (RFC 7143 4.3)",
                                          RejectReason.PROTOCOL_ERROR, raw.bhs)
            if handler is None:
                raise RemoteProtocolError(f"{type(event).__name__} not allowed in {self.state.value}",
                                          RejectReason.PROTOCOL_ERROR, raw.bhs)
            return handler(self, event)
        except RemoteProtocolError as e:
            if e.reject is None or self.state is not State.FULL_FEATURE:
                self.state = State.CLOSED
                return [Close(str(e))]
            return [self._reject(e.reject, e.header or raw.bhs)]

    def task_done(self, task: Task, status: int, data_in: bytes | bytearray | None,
                  sense: bytes | None) -> list[Action]:
        if self.tasks.get(task.itt) is task:
            del self.tasks[task.itt]
        self._finish(task)
        if self.state is State.CLOSED:
            return []
        if task.aborted:
            out = self._tmf_progress(task.itt)
        else:
            out = self._response(task.itt, task.lun, task.read, task.expected, task.cdb_out, status,
                                 data_in, sense)
        return out + self._admit_waiting() if self._r2t_queue else out

    def _response(self, itt: int, lun: int, read: bool, expected: int, cdb_out: int, status: int,
                  data_in: bytes | bytearray | memoryview | None, sense: bytes | None) -> list[Action]:
        """A command's Data-In and status: ``read`` and ``expected`` are its R bit and Expected
        Data Transfer Length, ``cdb_out`` the data-out its CDB describes."""
        moved = len(data_in) if read and data_in is not None else 0
        n = min(moved, expected)
        # RFC 7143 11.4.5: residual = expected - what the command moves (negative: overflow)
        residual = expected - (moved if read else cdb_out)
        if n and sense is None:
            # Data-In with status in the last PDU (phase collapse, RFC 7143 11.7.4); slices of a
            # memoryview: the data is not copied until it goes into the socket
            max_send = self.login.max_send
            if n <= max_send:  # one PDU (every 4 KiB read): no slicing, no loop
                bhs = build_data_in(itt, lun, 0, 0, n, final=True, status=status,
                                    statsn=self._next_statsn(), expcmdsn=self.expcmdsn,
                                    maxcmdsn=self._maxcmdsn(), residual=residual)
                payload = data_in if n == moved else memoryview(data_in)[:n]  # type: ignore[arg-type]
                if n & 3 or self.header_digest or self.data_digest:
                    return [Send(self._encode(bhs, payload))]
                # build_data_in wrote DataSegmentLength; whole words need no padding (11.2.1.6)
                return [Send([bhs, payload])]
            data = memoryview(data_in)  # type: ignore[arg-type]
            out: list[Action] = []
            pos = 0
            datasn = 0
            while pos < n:
                size = min(max_send, n - pos)
                last = pos + size == n
                statsn = self._next_statsn() if last else self.statsn
                bhs = build_data_in(itt, lun, datasn, pos, size, final=last,
                                    status=status if last else None, statsn=statsn,
                                    expcmdsn=self.expcmdsn, maxcmdsn=self._maxcmdsn(), residual=residual)
                out.append(Send(self._encode(bhs, data[pos:pos + size])))
                pos += size
                datasn += 1
            return out
        bhs, payload = build_scsi_response(itt, status, self._next_statsn(), self.expcmdsn,
                                           self._maxcmdsn(), sense=sense or b"", residual=residual)
        return [Send(self._encode(bhs, payload))]

    # -- login -----------------------------------------------------------------------------------

    def _login(self, req: LoginRequest) -> list[Action]:
        """One Login Request through the login state machine (``login.py``)."""
        self.expcmdsn = req.cmdsn
        try:
            reply = self.login.receive(req)
        except Refused as e:
            self.state = State.CLOSED
            return [Send(self._login_response(refusal(e.status, req), req)),
                    Close(f"login refused ({e.status.name}): {e}")]
        out: list[Action] = [Send(self._login_response(reply, req))]  # without digests: still login
        if self.login.stage is Stage.FULL_FEATURE:
            self.state = State.FULL_FEATURE
            self._discovery = self.login.discovery
            self.header_digest, self.data_digest = self.login.header_digest, self.login.data_digest
        return out

    def _login_response(self, reply: Reply, req: LoginRequest) -> list[bytes | bytearray | memoryview]:
        bhs = build_login_response(reply, req, self._next_statsn(), self.expcmdsn, self._maxcmdsn())
        return self._encode(bhs, reply.text)

    def login_timed_out(self) -> list[Action]:
        """The portal's clock: the login did not reach full feature within its time
        (``portal.LOGIN_TIMEOUT``). The connection ends with no answer, as a target may end a
        login at any point (RFC 7143 6.3); a login still in progress would hold its socket and
        buffers for as long as the initiator likes."""
        if self.state is not State.LOGIN:
            return []
        self.state = State.CLOSED
        return [Close("login not finished in time")]

    def reinstated(self) -> list[Action]:
        """A new login of the same initiator port (InitiatorName + ISID) to the same target
        replaces this session (RFC 7143 6.3.5): its tasks end with no response, nothing more
        goes out, the connection closes."""
        self.state = State.CLOSED
        for task in self.tasks.values():
            task.aborted = True
        self.tasks.clear()
        self._pending_tmfs.clear()
        return [Close("session reinstated by a new login of the same initiator port")]

    # -- full feature phase ----------------------------------------------------------------------

    def _window(self, immediate: bool, cmdsn: int) -> bool:
        """Whether a command is delivered (RFC 7143 4.2.2.1). Immediate ones always are; the
        target "MUST silently ignore any non-immediate command outside of this range"
        (ExpCmdSN..MaxCmdSN, compared in serial number arithmetic, RFC 1982)."""
        if immediate:
            return True
        ahead = (cmdsn - self.expcmdsn) & 0xFFFFFFFF
        room = (self._maxcmdsn() - self.expcmdsn + 1) & 0xFFFFFFFF
        if ahead >= room:
            self.ignored_commands += 1
            return False
        if ahead:
            # inside the window but not the next one: a single-connection session only ever
            # sees the next one (TCP keeps the order), so the initiator lost count of its CmdSN
            raise RemoteProtocolError(f"CmdSN {cmdsn} while expecting {self.expcmdsn}")
        self.expcmdsn = (self.expcmdsn + 1) & 0xFFFFFFFF
        return True

    def _ignored(self, cmdsn: int) -> list[Action]:
        """Nothing goes to the initiator; the log hears of the first one only (a flood of them
        is one fault, not one line each)."""
        if self.ignored_commands > 1:
            return []
        return [Fault(f"CmdSN {cmdsn} outside the window {self.expcmdsn}..{self._maxcmdsn()}: ignored "
                      "(RFC 7143 4.2.2.1), as are any more")]

    def _finish(self, task: Task) -> None:
        """The task no longer holds its place: MaxCmdSN may move on by one, and the write data
        it was admitted for no longer counts."""
        if task.finished:
            return
        task.finished = True
        if task.immediate:
            self._immediate_tasks -= 1
        else:
            self._in_window -= 1
        self._solicited -= task.admitted
        task.admitted = 0
        if self._r2t_queue and task in self._r2t_queue:
            self._r2t_queue.remove(task)

    def _admit(self, task: Task, *, queued: bool = False) -> bool:
        """Reserve what is left of a task's write data, if it fits in MAX_SOLICITED_BYTES behind
        the tasks already waiting (or nothing else is reserved: one task always goes on)."""
        need = task.want_out - task.received
        if task.streamed:  # it never holds more than its window (module docstring)
            need = min(need, stream_window(task.piece))
        if self._r2t_queue and not queued:
            return False
        if self._solicited and self._solicited + need > MAX_SOLICITED_BYTES:
            return False
        task.admitted = need
        self._solicited += need
        return True

    def _admit_waiting(self) -> list[Action]:
        """R2Ts for the waiting tasks that fit now, in the order they came."""
        out: list[Action] = []
        while self._r2t_queue and self._admit(self._r2t_queue[0], queued=True):
            out += self._advance(self._r2t_queue.popleft())
        return out

    def _scsi_command(self, cmd: ScsiCommand) -> list[Action]:
        if not self._window(cmd.immediate, cmd.cmdsn):
            return self._ignored(cmd.cmdsn)
        target = self.login.target
        if target is None:  # a discovery session has no LUNs (RFC 7143 4.3)
            raise RemoteProtocolError("SCSI Command in a discovery session", RejectReason.PROTOCOL_ERROR)
        if cmd.itt in self.tasks:
            raise RemoteProtocolError(f"Initiator Task Tag {cmd.itt:#x} is in use",
                                      RejectReason.INVALID_PDU_FIELD)
        if cmd.immediate and self._immediate_tasks >= MAX_IMMEDIATE_TASKS:
            raise RemoteProtocolError(f"more than {MAX_IMMEDIATE_TASKS} immediate commands running",
                                      RejectReason.IMMEDIATE_COMMAND_REJECT)
        if cmd.data or not cmd.final:  # (most commands carry no unsolicited data: no lookups)
            self._check_unsolicited(cmd)
        lun = target.luns.get(cmd.lun)
        # a READ's residual is counted from the data it returns, not from its CDB (_response)
        reads_only = cmd.read and not cmd.write
        cdb_out = self._data_out_length(cmd.cdb, lun) if lun is not None and not reads_only else 0
        want = min(cdb_out, cmd.expected_length) if cmd.write else 0
        if not want and cmd.final and self._run_now is not None and lun is not None and not cmd.data:
            result = self._run_now(lun, cmd.cdb, self.nexus)
            if result is not None:
                # done before anything else was read: it never held a tag or a place in the
                # window, so no task management function or R2T could have seen it
                return self._response(cmd.itt, cmd.lun, cmd.read, cmd.expected_length, cdb_out,
                                      result.status, result.data_in, result.sense)
        task = Task(cmd.itt, cmd.lun, cmd.cdb, cmd.read, cmd.expected_length, want, cdb_out,
                    immediate=cmd.immediate, unsolicited_open=not cmd.final, unsolicited=len(cmd.data))
        self.tasks[cmd.itt] = task
        if cmd.immediate:
            self._immediate_tasks += 1
        else:
            self._in_window += 1
        out: list[Action] = []
        # a command whose data fits in one piece gains nothing from streaming: it is gathered
        plan = self._stream_plan(cmd.cdb, lun) \
            if want > STREAM_PIECE_BYTES and self._stream_plan is not None else None
        if plan is not None:
            task.stream_start, unit = plan
            task.piece = -(-STREAM_PIECE_BYTES // unit) * unit
            task.executing = True  # its checks run now, and a task management function waits for it
            out.append(Stream(task))
        if cmd.data:
            out += self._take(task, cmd.data)
        if not cmd.final:
            return out  # F=0: unsolicited Data-Out PDUs follow (InitialR2T=No, RFC 7143 11.3.1)
        return out + self._advance(task)

    def _check_unsolicited(self, cmd: ScsiCommand) -> None:
        """Immediate data only where ImmediateData=Yes, F=0 (unsolicited Data-Out to follow) only
        where InitialR2T=No, and never more than FirstBurstLength of it (RFC 7143 13.10, 13.11,
        13.14): what the initiator sends unasked is what we hold before any R2T bounds it."""
        if cmd.data and self.values.get("ImmediateData") != "Yes":
            raise RemoteProtocolError("immediate data while ImmediateData=No", RejectReason.PROTOCOL_ERROR)
        if not cmd.final and self.values.get("InitialR2T") != "No":
            raise RemoteProtocolError("F=0 (unsolicited Data-Out) while InitialR2T=Yes",
                                      RejectReason.PROTOCOL_ERROR)
        if len(cmd.data) > self._first_burst():
            raise RemoteProtocolError(f"{len(cmd.data)} bytes of immediate data exceed FirstBurstLength "
                                      f"{self._first_burst()}", RejectReason.PROTOCOL_ERROR)

    def _first_burst(self) -> int:
        return int(self.values.get("FirstBurstLength", "65536"))

    def _take(self, task: Task, data: bytes | bytearray | memoryview) -> list[Action]:
        """Data-out that arrived (checked): held whole for a gathered command; for a streamed
        one, cut into the pieces it completes (module docstring)."""
        task.received += len(data)
        if not task.streamed:
            task.data += data
            if len(task.data) > self.held_peak:
                self.held_peak = len(task.data)
            return []
        end = min(task.received, task.want_out)  # past the CDB's length nothing is written
        room = end - task.cut - len(task.data)
        if room > 0:
            task.data += data[:room] if room < len(data) else data
        out: list[Action] = []
        while task.cut < end:
            cut = min(task.want_out, self._next_cut(task, task.cut))
            if cut > end:
                break  # the rest of this piece is still to come
            n = cut - task.cut
            if n == len(task.data):
                piece, task.data = task.data, bytearray()
            else:
                piece = task.data[:n]
                del task.data[:n]
            out.append(Piece(task, task.cut, piece))
            task.cut = cut
        if end - task.written > self.held_peak:
            self.held_peak = end - task.written
        return out

    @staticmethod
    def _next_cut(task: Task, offset: int) -> int:
        """The data-out offset of the first grid line (a multiple of ``task.piece`` on the LUN)
        after ``offset``."""
        at = task.stream_start + offset
        return (at // task.piece + 1) * task.piece - task.stream_start

    def piece_written(self, task: Task, n: int) -> list[Action]:
        """The caller wrote (or, once the command had failed, dropped) a piece of ``n`` bytes:
        room in the task's window, so more of its data may be asked for."""
        task.written += n
        if task.stream_ended or task.solicited_to < 0 or self.tasks.get(task.itt) is not task \
                or self.state is not State.FULL_FEATURE:
            return []  # (R2Ts start at the end of the unsolicited burst, or on admission)
        return self._advance(task)

    def _end_stream(self, task: Task) -> list[Action]:
        """No more pieces for a streamed task (data complete, data failed, or aborted)."""
        if task.stream_ended:
            return []
        task.stream_ended = True
        task.data = bytearray()  # what was not cut is never written
        if self._r2t_queue and task in self._r2t_queue:
            self._r2t_queue.remove(task)  # and no R2T asks for more of it
        return [StreamEnd(task)]

    def _advance(self, task: Task) -> list[Action]:
        """Execute once all data-out is in; until then keep up to MaxOutstandingR2T R2Ts of at
        most MaxBurstLength each outstanding, in offset order (DataSequenceInOrder=Yes). A
        streamed task's R2Ts end on its grid and stay within its window (module docstring)."""
        if task.stream_ended:
            return []
        if task.received >= task.want_out:
            if task.stream_start >= 0:  # (task.streamed, without the call: every command comes here)
                return self._end_stream(task)
            task.executing = True
            # an initiator may send up to its EDTL: each command judges what it got (scsi layer)
            return [Execute(task)]
        if task.solicited_to < 0:
            if not task.admitted and not self._admit(task):
                self._r2t_queue.append(task)  # its R2Ts come when write data of others is done
                return []
            task.solicited_to = task.received  # after the unsolicited burst, if any
        burst = int(self.values.get("MaxBurstLength", "262144"))
        most = int(self.values.get("MaxOutstandingR2T", "1"))
        window = stream_window(task.piece)
        out: list[Action] = []
        while len(task.r2ts) < most and task.solicited_to < task.want_out:
            offset = task.solicited_to
            length = min(burst, task.want_out - offset)
            if task.streamed:
                length = min(length, self._next_cut(task, offset) - offset)
                if offset + length - task.written > window:
                    break  # asked for again as pieces are written (piece_written)
            ttt = self._ttt
            self._ttt = (self._ttt + 1) & 0x7FFFFFFF or 1
            task.r2ts[ttt] = offset + length
            task.solicited_to = offset + length
            bhs = build_r2t(task.itt, task.lun, ttt, self.statsn, self.expcmdsn, self._maxcmdsn(), task.r2tsn,
                            offset, length)
            task.r2tsn += 1
            out.append(Send(self._encode(bhs)))
        return out

    def _data_out(self, d: DataOut) -> list[Action]:
        task = self.tasks.get(d.itt)
        if task is None or (task.executing and (not task.streamed or task.stream_ended)):
            raise RemoteProtocolError(f"Data-Out for unknown task {d.itt:#x}", RejectReason.INVALID_PDU_FIELD)
        out: list[Action] = []
        if not task.sequence_error:
            # once the data cannot be trusted nothing more is kept: the rest of the burst only
            # has to arrive for the command to fail
            self._check_data_out(task, d)
            if d.ttt != task.seq_ttt:
                task.seq_ttt, task.next_datasn = d.ttt, 0  # the next sequence begins
            if d.datasn != task.next_datasn:
                # a lost or reordered Data-Out: the data cannot be trusted, but the connection can
                task.sequence_error = f"Data-Out DataSN {d.datasn} while expecting {task.next_datasn}"
            task.next_datasn = d.datasn + 1
            if task.sequence_error and task.streamed:
                task.data = bytearray()  # nothing more of it is written
                task.received += len(d.data)
            else:
                out = self._take(task, d.data)
            if d.ttt == UNSOLICITED_TTT:
                task.unsolicited += len(d.data)
        if not d.final:
            return out
        return out + self._burst_end(task, d.ttt)

    def _check_data_out(self, task: Task, d: DataOut) -> None:
        """Data-Out within what was allowed: unsolicited only while the command's unsolicited
        burst is open and up to FirstBurstLength (RFC 7143 13.10, 13.14), solicited only inside
        the burst its R2T asked for (RFC 7143 11.8.3), never past the initiator's own Expected
        Data Transfer Length. The PDU is refused (Reject) and nothing of it is kept."""
        end = task.received + len(d.data)
        if d.offset != task.received or end > task.expected:
            raise RemoteProtocolError("Data-Out out of order or beyond the expected length",
                                      RejectReason.PROTOCOL_ERROR)
        if d.ttt == UNSOLICITED_TTT:
            if not task.unsolicited_open:
                raise RemoteProtocolError("unsolicited Data-Out the session or the command does not allow",
                                          RejectReason.PROTOCOL_ERROR)
            if task.unsolicited + len(d.data) > self._first_burst():
                raise RemoteProtocolError(f"unsolicited data beyond FirstBurstLength {self._first_burst()}",
                                          RejectReason.PROTOCOL_ERROR)
            return
        burst_end = task.r2ts.get(d.ttt)
        if burst_end is None:
            raise RemoteProtocolError(f"Data-Out with Target Transfer Tag {d.ttt:#x} that no R2T gave",
                                      RejectReason.INVALID_PDU_FIELD)
        if end > burst_end:
            raise RemoteProtocolError(f"Data-Out past the end of its R2T's burst ({burst_end})",
                                      RejectReason.PROTOCOL_ERROR)

    def _burst_end(self, task: Task, ttt: int) -> list[Action]:
        """A Data-Out with F=1 closed a burst, unsolicited or solicited: execute, solicit the
        rest, or fail the command if its data went wrong on the way."""
        if ttt == UNSOLICITED_TTT:
            task.unsolicited_open = False
        task.r2ts.pop(ttt, None)
        if task.sequence_error:
            # at the end of the burst: fail the command (ABORTED COMMAND, which initiators retry)
            # instead of writing data that may be in the wrong place. A streamed one ends once
            # the caller has finished the piece it may be writing (StreamEnd, then task_done)
            if task.streamed:
                return [Fault(task.sequence_error), *self._end_stream(task)]
            del self.tasks[task.itt]
            return [Fault(task.sequence_error), *self.task_done(
                task, Status.CHECK_CONDITION, None, task.data_failure())]
        return self._advance(task)

    def _data_digest_error(self, raw: RawPdu) -> list[Action]:
        """A PDU whose data segment failed its digest (RFC 7143 7.8): the header is sound, so
        framing holds and the connection stays. The PDU is discarded and answered with Reject
        (reason Data Digest Error, 11.17.1). A Data-Out's command then fails at the end of its
        burst with "protocol service CRC error" (11.4.7.2); there is no recovery of the data at
        ErrorRecoveryLevel 0. A discarded command leaves a gap in CmdSN that only a retry with the
        same CmdSN (ERL 1 and up) would fill; at ERL 0 nothing does, so its CmdSN counts as
        received: the commands behind it stay in order and the initiator's abort of it finds no
        task (11.6.1), after which it sends the command again as a new one."""
        if self.state is not State.FULL_FEATURE:
            self.state = State.CLOSED
            return [Close("data digest error during login")]
        if raw.opcode in _NUMBERED:
            self._window(raw.immediate, struct.unpack_from(">I", raw.bhs, 24)[0])
        out: list[Action] = [self._reject(RejectReason.DATA_DIGEST_ERROR, raw.bhs)]
        task = self.tasks.get(raw.itt) if raw.opcode == Opcode.SCSI_DATA_OUT else None
        if task is not None and (not task.executing or (task.streamed and not task.stream_ended)):
            if not task.sequence_error:
                task.sequence_error, task.digest_error = "data digest error in a Data-Out", True
                if task.streamed:
                    task.data = bytearray()  # nothing more of it is written
            if raw.final:
                out += self._burst_end(task, struct.unpack_from(">I", raw.bhs, 20)[0])
        return out

    def ping(self) -> list[Action]:
        """A target NOP-In that asks for an answer (RFC 7143 11.19): the portal sends one when
        the initiator has been silent, and drops the connection if ``ping_outstanding`` stays
        set, so that a dead initiator's tasks and reservations do not linger."""
        if self.state is not State.FULL_FEATURE or self.ping_outstanding is not None:
            return []
        ttt = self._ttt
        self._ttt = (self._ttt + 1) & 0x7FFFFFFF or 1
        self.ping_outstanding = ttt
        b = bytearray(BHS_LEN)
        b[0], b[1] = Opcode.NOP_IN, 0x80
        # StatSN is the current one, not advanced: a ping carries no status (RFC 7143 11.19.3)
        struct.pack_into(">IIIII", b, 16, 0xFFFFFFFF, ttt, self.statsn, self.expcmdsn, self._maxcmdsn())
        return [Send(self._encode(b))]

    def _nop_out(self, nop: NopOut) -> list[Action]:
        if nop.itt == 0xFFFFFFFF:
            if nop.ttt == self.ping_outstanding:
                self.ping_outstanding = None  # the answer to our ping
            return []
        if not self._window(nop.immediate, nop.cmdsn):
            return self._ignored(nop.cmdsn)
        if len(nop.data) > self.max_send:
            # the ping data comes back in the NOP-In (RFC 7143 11.19), which may not exceed the
            # initiator's MaxRecvDataSegmentLength (13.12): refused as LIO refuses it
            raise RemoteProtocolError(f"ping data of {len(nop.data)} bytes exceeds the initiator's "
                                      f"MaxRecvDataSegmentLength {self.max_send}",
                                      RejectReason.PROTOCOL_ERROR)
        b = bytearray(BHS_LEN)
        b[0], b[1] = Opcode.NOP_IN, 0x80
        struct.pack_into(">IIIII", b, 16, nop.itt, 0xFFFFFFFF, self._next_statsn(), self.expcmdsn,
                         self._maxcmdsn())
        return [Send(self._encode(b, nop.data))]

    def _text(self, req: TextRequest) -> list[Action]:
        """SendTargets (RFC 7143 Appendix C). The request may come in continuation PDUs (C bit),
        each answered empty until the last; an answer longer than the initiator's
        MaxRecvDataSegmentLength goes out in pieces, each but the last with C=1, F=0 and a
        Target Transfer Tag the initiator returns in an empty request for the next (11.10, 11.11)."""
        if not self._window(req.immediate, req.cmdsn):
            return self._ignored(req.cmdsn)
        if req.ttt != 0xFFFFFFFF and req.ttt != self._text_ttt:
            raise RemoteProtocolError(f"Text Request with Target Transfer Tag {req.ttt:#x} that "
                                      "continues no exchange", RejectReason.PROTOCOL_ERROR)
        if req.ttt != 0xFFFFFFFF and self._text_out.pending and not req.data:
            return self._text_response(req, *self._text_out.next(self.max_send))
        try:
            text = self._text_in.add(req.data, req.cont)
        except TextTooLong as e:
            raise RemoteProtocolError(str(e), RejectReason.PROTOCOL_ERROR) from None
        if text is None:
            return self._text_response(req, b"", False)
        try:
            keys = dict(params.parse_text(text))
        except ValueError as e:
            raise RemoteProtocolError(str(e), RejectReason.PROTOCOL_ERROR) from None
        pairs: list[tuple[str, str]] = []
        if "SendTargets" in keys:
            wanted = keys["SendTargets"]
            for target in self._all():
                if wanted not in ("All", target.iqn) and not (wanted == "" and target is self.target):
                    continue
                if target.allowed_initiators and self.initiator not in target.allowed_initiators:
                    continue
                pairs.append(("TargetName", target.iqn))
                if self.address:  # every target is behind this one portal group (tag 1)
                    pairs.append(("TargetAddress", f"{self.address},1"))
        return self._text_response(req, *self._text_out.first(params.format_text(pairs), self.max_send))

    def _text_response(self, req: TextRequest, data: bytes, more: bool) -> list[Action]:
        """A Text Response: final, or (``more``) one piece with C=1 and a tag to ask for the next.
        An empty non-final one answers a request piece with C=1."""
        final = not more and not self._text_in.pending
        ttt = 0xFFFFFFFF
        if not final:
            ttt = self._text_ttt = self._ttt
            self._ttt = (self._ttt + 1) & 0x7FFFFFFF or 1
        b = bytearray(BHS_LEN)
        b[0], b[1] = Opcode.TEXT_RESPONSE, (0x80 if final else 0) | (0x40 if more else 0)
        struct.pack_into(">IIIII", b, 16, req.itt, ttt, self._next_statsn(), self.expcmdsn,
                         self._maxcmdsn())
        return [Send(self._encode(b, data))]

    def _logout(self, req: LogoutRequest) -> list[Action]:
        if not self._window(req.immediate, req.cmdsn):
            return self._ignored(req.cmdsn)
        b = bytearray(BHS_LEN)
        b[0], b[1] = Opcode.LOGOUT_RESPONSE, 0x80
        struct.pack_into(">IIIII", b, 16, req.itt, 0, self._next_statsn(), self.expcmdsn, self._maxcmdsn())
        self.state = State.CLOSED
        return [Send(self._encode(b)), Close("logout")]

    def _task_mgmt(self, req: TaskManagementRequest) -> list[Action]:
        """ABORT TASK and friends. A task still gathering data is dropped at once; a running
        one cannot be recalled from the store, so it is marked aborted, its status is never
        sent, and the response waits until it has finished (RFC 7143 11.5.1, SAM-5 7.2).
        A task not found is "task does not exist" (RFC 7143 11.6.1)."""
        if not self._window(req.immediate, req.cmdsn):
            return self._ignored(req.cmdsn)
        response = 0  # function complete
        hit: list[Task] = []
        if req.function == 1:  # ABORT TASK
            task = self.tasks.get(req.rtt)
            if task is None:
                response = 1  # task does not exist
            else:
                hit = [task]
        elif req.function in (2, 5):  # ABORT TASK SET, LUN RESET: the tasks of that LUN
            hit = [t for t in self.tasks.values() if t.lun == req.lun]
        elif req.function in (3, 6):  # CLEAR ACA, TARGET WARM RESET
            hit = list(self.tasks.values())
        else:
            response = 5  # task management function not supported
        waiting = set()
        actions: list[Action] = []
        for task in hit:
            if task.executing:
                task.aborted = True  # it holds its place in the window until it has finished
                waiting.add(task.itt)
                if task.streamed:  # no piece is written after the one being written, if any
                    actions += self._end_stream(task)
            else:
                self._finish(task)
            del self.tasks[task.itt]
        if req.function in (5, 6):
            actions.append(Reset(req.lun if req.function == 5 else None))
        actions += self._admit_waiting()  # what the dropped tasks had reserved is free again
        pending = _PendingTmf(req.itt, response, waiting)
        if waiting:
            self._pending_tmfs.append(pending)
            return actions
        return [*actions, self._tmf_response(pending)]

    def _tmf_progress(self, itt: int) -> list[Action]:
        """An aborted task finished: send the responses that were waiting only for it."""
        out: list[Action] = []
        for pending in list(self._pending_tmfs):
            pending.waiting.discard(itt)
            if not pending.waiting:
                self._pending_tmfs.remove(pending)
                out.append(self._tmf_response(pending))
        return out

    def _tmf_response(self, pending: _PendingTmf) -> Send:
        b = bytearray(BHS_LEN)
        b[0], b[1], b[2] = Opcode.TASK_MGMT_RESPONSE, 0x80, pending.response
        struct.pack_into(">IIIII", b, 16, pending.itt, 0, self._next_statsn(), self.expcmdsn,
                         self._maxcmdsn())
        return Send(self._encode(b))

    # -- helpers ---------------------------------------------------------------------------------

    def _maxcmdsn(self) -> int:
        """Every command received moves ExpCmdSN and takes a place, every one finished gives its
        place back: MaxCmdSN never goes back (RFC 7143 4.2.2.1 has initiators ignore a smaller one)."""
        return (self.expcmdsn + QUEUE_DEPTH - 1 - self._in_window) & 0xFFFFFFFF

    def _reject(self, reason: RejectReason, header: bytes) -> Send:
        bhs, data = build_reject(reason, self.statsn, self.expcmdsn, self._maxcmdsn(), header)
        return Send(self._encode(bhs, data))

    def _next_statsn(self) -> int:
        s = self.statsn
        self.statsn = (self.statsn + 1) & 0xFFFFFFFF
        return s

    def _encode(self, bhs: bytearray, data: bytes | memoryview = b"") -> list[bytes | bytearray | memoryview]:
        if not (data or self.header_digest):  # a bare header (SCSI Response, R2T, NOP-In)
            bhs[5:8] = b"\0\0\0"
            return [bhs]
        return encode_parts(bhs, data, header_digest=self.header_digest, data_digest=self.data_digest)


#: initiator PDUs that carry a CmdSN (RFC 7143 11.1: bytes 24-27 of their BHS)
_NUMBERED = frozenset({Opcode.SCSI_COMMAND, Opcode.NOP_OUT, Opcode.TEXT_REQUEST, Opcode.TASK_MGMT_REQUEST,
                       Opcode.LOGOUT_REQUEST})

_HANDLERS: dict[tuple[State, type], Callable[[Connection, object], list[Action]]] = {
    (State.LOGIN, LoginRequest): Connection._login,  # type: ignore[dict-item]
    (State.FULL_FEATURE, ScsiCommand): Connection._scsi_command,  # type: ignore[dict-item]
    (State.FULL_FEATURE, DataOut): Connection._data_out,  # type: ignore[dict-item]
    (State.FULL_FEATURE, NopOut): Connection._nop_out,  # type: ignore[dict-item]
    (State.FULL_FEATURE, TextRequest): Connection._text,  # type: ignore[dict-item]
    (State.FULL_FEATURE, LogoutRequest): Connection._logout,  # type: ignore[dict-item]
    (State.FULL_FEATURE, TaskManagementRequest): Connection._task_mgmt,  # type: ignore[dict-item]
}
