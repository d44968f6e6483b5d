"""One iSCSI connection's state machine, sans I/O (h11's shape: events in, actions out).

Theory of operation (RFC 7143, error recovery level 0, one connection per session):

    LOGIN  --(Login with T=1 to NSG=FULL_FEATURE, accepted)-->  FULL_FEATURE
    FULL_FEATURE  --(Logout)-->  CLOSED
    any state  --(a protocol error that loses framing)-->  CLOSED

``receive(pdu)`` takes one framed PDU and returns actions: bytes to send, a SCSI task ready to
execute (all its data-out gathered), or close. ``task_done(task, result)`` turns a finished
command into Data-In/Response PDUs. Execution itself (which may block on the store) belongs to
the caller: this module has no socket, no greenlet and no clock.

Sequence numbers: CmdSN advances for every non-immediate command; the window offered to the
initiator is ExpCmdSN..MaxCmdSN (``QUEUE_DEPTH`` wide). StatSN counts responses.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from lazyiscsi.iscsi import params
from lazyiscsi.iscsi.chap import ChapError, ChapExchange, ChapSecrets
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
    encode_parts,
)
from lazyiscsi.scsi.sense import Reason, Status, fixed_sense

QUEUE_DEPTH = 64
SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3
#: operational keys a discovery session negotiates. RFC 7143 13.2, 13.10, 13.11, 13.13, 13.14,
#: 13.17-13.19 make MaxConnections, InitialR2T, ImmediateData, the burst lengths,
#: MaxOutstandingR2T and the ordering keys "Irrelevant when: SessionType=Discovery"; the digests
#: (13.1), DefaultTime2Wait/Retain (13.15, 13.16) and ErrorRecoveryLevel (13.20) are not, and
#: open-iscsi refuses a discovery login answered "ErrorRecoveryLevel=Irrelevant".
DISCOVERY_KEYS = frozenset({"HeaderDigest", "DataDigest", "DefaultTime2Wait", "DefaultTime2Retain",
                            "ErrorRecoveryLevel"})


class State(enum.Enum):
    LOGIN = "login"
    FULL_FEATURE = "full-feature"
    CLOSED = "closed"


@dataclass(frozen=True)
class Target:
    """What a connection needs to know about the target it may log into."""

    iqn: str
    luns: dict[int, object]  # LUN number -> scsi Lun (opaque here)
    allowed_initiators: frozenset[str] = frozenset()  # empty: any
    chap: ChapSecrets | None = None
    portal: str = ""


@dataclass
class Task:
    """One SCSI command in flight."""

    itt: int
    lun: int
    cdb: bytes
    read: bool
    expected: int  # the initiator's Expected Data Transfer Length
    want_out: int  # bytes of data-out to gather (no more than expected)
    cdb_out: int = 0  # bytes of data-out the CDB itself describes (for the residual)
    data: bytearray = field(default_factory=bytearray)
    #: outstanding R2Ts: Target Transfer Tag -> end offset of the burst it asked for
    r2ts: dict[int, int] = field(default_factory=dict)
    solicited_to: int = -1  # data-out offset up to which R2Ts were sent (-1: none yet)
    r2tsn: int = 0
    seq_ttt: int = 0xFFFFFFFF  # the sequence now arriving (all ones: the unsolicited one)
    next_datasn: int = 0  # of that sequence (RFC 7143 11.7.5)
    sequence_error: str = ""  # why its data-out cannot be trusted: it fails, it is not run
    executing: bool = False
    aborted: bool = False  # an ABORT TASK (or a reset) came while it ran: no status goes out


@dataclass
class _PendingTmf:
    """A task management response that waits for the running tasks it aborted to finish:
    SAM-5 has the function complete only once those tasks can no longer affect the medium."""

    itt: int
    response: int
    waiting: set[int]


@dataclass(frozen=True)
class Send:
    """One PDU, as the buffers that make it up (header, data, padding, digests)."""

    parts: list[bytes | bytearray | memoryview]


@dataclass(frozen=True)
class Execute:
    task: Task


@dataclass(frozen=True)
class Close:
    reason: str


@dataclass(frozen=True)
class Fault:
    """Something the initiator did wrong that does not end the connection: for the log."""

    message: str


@dataclass(frozen=True)
class Reset:
    """A LUN RESET (``lun``) or TARGET WARM RESET (``lun`` None) for the SCSI layer to apply."""

    lun: int | None


Action = Send | Execute | Close | Reset | Fault


class LoginStatus(enum.IntEnum):
    """Status-Class << 8 | Status-Detail (RFC 7143 11.13.5)."""

    SUCCESS = 0x0000
    AUTH_FAILED = 0x0201
    NOT_AUTHORIZED = 0x0202
    NOT_FOUND = 0x0203
    INITIATOR_ERROR = 0x0200
    MISSING_PARAMETER = 0x0207
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    TARGET_ERROR = 0x0300


class Connection:
    """Target side of one connection. ``find_target(name)`` looks targets up by IQN;
    ``all_targets()`` lists them for SendTargets; ``data_out_length(cdb, lun)`` says how many
    bytes a command carries."""

    def __init__(self, find_target: Callable[[str], Target | None], all_targets: Callable[[], list[Target]],
                 data_out_length: Callable[[bytes, int], int], *, max_recv: int = 262144) -> None:
        self._find = find_target
        self._all = all_targets
        self._data_out_length = data_out_length
        self.state = State.LOGIN
        self.target: Target | None = None
        self.initiator = ""
        self.discovery = False
        self.values = params.session_defaults()
        self.max_recv = max_recv  # what we accept per PDU (declared to the initiator)
        self.max_send = 8192  # what the initiator accepts per PDU (from its declaration)
        self.header_digest = self.data_digest = False
        self._chap: ChapExchange | None = None
        self._authenticated = False
        self._isid = b""
        self._tsih = 0
        self.statsn = 0
        self.expcmdsn = 0
        self.tasks: dict[int, Task] = {}
        self._pending_tmfs: list[_PendingTmf] = []
        self.ping_outstanding: int | None = None  # Target Transfer Tag of an unanswered ping
        self._ttt = 1

    @property
    def nexus(self) -> str:
        """The initiator port name (RFC 7143 13.1): what SCSI calls this I_T nexus."""
        return f"{self.initiator},i,0x{self._isid.hex()}"

    # -- entry points --------------------------------------------------------------------------

    def receive(self, raw: RawPdu) -> list[Action]:
        try:
            event = decode(raw)
            handler = _HANDLERS.get((self.state, type(event)))
            if handler is None:
                raise RemoteProtocolError(f"{type(event).__name__} not allowed in {self.state.value}",
                                          RejectReason.PROTOCOL_ERROR, raw.bhs)
            return handler(self, event)
        except RemoteProtocolError as e:
            if e.reject is None or self.state is not State.FULL_FEATURE:
                self.state = State.CLOSED
                return [Close(str(e))]
            bhs, data = build_reject(e.reject, self.statsn, self.expcmdsn, self._maxcmdsn(),
                                     e.header or raw.bhs)
            return [Send(self._encode(bhs, data))]

    def task_done(self, task: Task, status: int, data_in: bytes | bytearray | None,
                  sense: bytes | None) -> list[Action]:
        if self.tasks.get(task.itt) is task:
            del self.tasks[task.itt]
        if self.state is State.CLOSED:
            return []
        if task.aborted:
            return self._tmf_progress(task.itt)
        out: list[Action] = []
        full = memoryview(data_in) if task.read and data_in else memoryview(b"")
        data = full[:task.expected]  # slices of a memoryview: no copy until the PDU is encoded
        # RFC 7143 11.4.5: residual = expected - what the command moves (negative: overflow)
        residual = task.expected - (len(full) if task.read else task.cdb_out)
        if data and sense is None:
            # Data-In with status in the last PDU (phase collapse, RFC 7143 11.7.4)
            pos = 0
            datasn = 0
            while pos < len(data):
                n = min(self.max_send, len(data) - pos)
                last = pos + n == len(data)
                statsn = self._next_statsn() if last else self.statsn
                bhs = build_data_in(task.itt, task.lun, datasn, pos, n, final=last,
                                    status=status if last else None, statsn=statsn,
                                    expcmdsn=self.expcmdsn, maxcmdsn=self._maxcmdsn(), residual=residual)
                out.append(Send(self._encode(bhs, data[pos:pos + n])))
                pos += n
                datasn += 1
            return out
        bhs, payload = build_scsi_response(task.itt, status, self._next_statsn(), self.expcmdsn,
                                           self._maxcmdsn(), sense=sense or b"", residual=residual)
        return [Send(self._encode(bhs, payload))]

    # -- login -----------------------------------------------------------------------------------

    def _login(self, req: LoginRequest) -> list[Action]:
        try:
            pairs = params.parse_text(req.data)
        except ValueError as e:
            return self._login_reply(req, LoginStatus.INITIATOR_ERROR, [], str(e))
        keys = dict(pairs)
        if req.version_min > 0:
            return self._login_reply(req, LoginStatus.INITIATOR_ERROR, [], "unsupported version")
        self._isid = req.isid
        self.expcmdsn = req.cmdsn
        if "InitiatorName" in keys:
            self.initiator = keys["InitiatorName"]
        if not self.initiator:
            return self._login_reply(req, LoginStatus.MISSING_PARAMETER, [], "no InitiatorName")
        if "SessionType" in keys:
            if keys["SessionType"] not in ("Normal", "Discovery"):
                return self._login_reply(req, LoginStatus.SESSION_TYPE_NOT_SUPPORTED, [], "session type")
            self.discovery = keys["SessionType"] == "Discovery"
        if not self.discovery and self.target is None:
            name = keys.get("TargetName", "")
            target = self._find(name)
            if target is None:
                return self._login_reply(req, LoginStatus.NOT_FOUND, [], f"no target {name!r}")
            if target.allowed_initiators and self.initiator not in target.allowed_initiators:
                return self._login_reply(req, LoginStatus.NOT_AUTHORIZED, [], "initiator not in the ACL")
            self.target = target
        answer: list[tuple[str, str]] = []
        if req.csg == SECURITY:
            try:
                answer += self._security(keys)
            except ChapError as e:
                return self._login_reply(req, LoginStatus.AUTH_FAILED, [], str(e))
            if self._chap is not None and not self._authenticated:
                return self._login_reply(req, LoginStatus.SUCCESS, answer, "", transit=False)
        elif req.csg == OPERATIONAL:
            if self._needs_auth() and not self._authenticated:
                return self._login_reply(req, LoginStatus.AUTH_FAILED, [], "authentication required")
            answer += self._operational(keys)
        else:
            return self._login_reply(req, LoginStatus.INITIATOR_ERROR, [], "bad CSG")
        transit = req.transit
        if transit and req.nsg == FULL_FEATURE:
            if self._needs_auth() and not self._authenticated:
                return self._login_reply(req, LoginStatus.AUTH_FAILED, [], "authentication required")
            actions = self._login_reply(req, LoginStatus.SUCCESS, answer, "", transit=True)
            self.state = State.FULL_FEATURE
            self.header_digest = self.values.get("HeaderDigest") == "CRC32C"
            self.data_digest = self.values.get("DataDigest") == "CRC32C"
            return actions
        return self._login_reply(req, LoginStatus.SUCCESS, answer, "", transit=transit)

    def _needs_auth(self) -> bool:
        return not self.discovery and self.target is not None and self.target.chap is not None

    def _security(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if "AuthMethod" in keys:
            ours = "CHAP" if self._needs_auth() else "None"
            chosen = params.negotiate("AuthMethod", keys["AuthMethod"], ours) or params.REJECT
            if chosen == params.REJECT and self._needs_auth():
                raise ChapError("the initiator does not offer CHAP")
            out.append(("AuthMethod", chosen))
            if chosen == "CHAP":
                assert self.target is not None and self.target.chap is not None
                self._chap = ChapExchange(self.target.chap)
            else:
                self._authenticated = True
        if self._chap is not None and "CHAP_A" in keys:
            out += self._chap.challenge(keys["CHAP_A"])
        elif self._chap is not None and "CHAP_R" in keys:
            out += self._chap.verify(keys)
            self._authenticated = True
        if not self._needs_auth():
            self._authenticated = True
        if not self.discovery and self.target is not None:
            out.append(("TargetPortalGroupTag", "1"))
        return out

    def _operational(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        ours = {"HeaderDigest": "None,CRC32C", "DataDigest": "None,CRC32C", "MaxConnections": "1",
                "InitialR2T": "No", "ImmediateData": "Yes", "MaxBurstLength": "1048576",
                "FirstBurstLength": "262144", "DefaultTime2Wait": "2", "DefaultTime2Retain": "0",
                "MaxOutstandingR2T": "8", "DataPDUInOrder": "Yes", "DataSequenceInOrder": "Yes",
                "ErrorRecoveryLevel": "0"}
        out: list[tuple[str, str]] = []
        for key, value in keys.items():
            if key in ("InitiatorName", "TargetName", "SessionType", "InitiatorAlias"):
                continue
            if key == "MaxRecvDataSegmentLength":
                if params.negotiate(key, value, "") == params.REJECT:
                    out.append((key, params.REJECT))
                else:
                    self.max_send = int(value, 0)
                continue
            if self.discovery and key not in DISCOVERY_KEYS:
                out.append((key, params.IRRELEVANT))
                continue
            answer = params.negotiate(key, value, ours.get(key, params.KEYS[key].default)
                                      if key in params.KEYS else "")
            if answer is not None:
                out.append((key, answer))
                if answer not in (params.REJECT, params.NOT_UNDERSTOOD):
                    self.values[key] = answer
        out.append(("MaxRecvDataSegmentLength", str(self.max_recv)))
        return out

    def _login_reply(self, req: LoginRequest, status: LoginStatus, pairs: list[tuple[str, str]],
                     why: str, *, transit: bool | None = None) -> list[Action]:
        b = bytearray(BHS_LEN)
        b[0] = Opcode.LOGIN_RESPONSE
        ok = status is LoginStatus.SUCCESS
        t = bool(transit) and ok
        nsg = req.nsg if t else 0
        b[1] = (0x80 if t else 0) | (req.csg << 2) | nsg
        b[2], b[3] = 0, 0
        b[8:14] = req.isid
        if t and req.nsg == FULL_FEATURE:
            self._tsih = self._tsih or 1
        struct.pack_into(">HI", b, 14, self._tsih if t and req.nsg == FULL_FEATURE else 0, req.itt)
        statsn = self._next_statsn()
        struct.pack_into(">III", b, 24, statsn, self.expcmdsn, self._maxcmdsn())
        b[36], b[37] = status >> 8, status & 0xFF
        actions: list[Action] = [Send(self._encode(b, params.format_text(pairs) if ok else b""))]
        if not ok:
            self.state = State.CLOSED
            actions.append(Close(f"login refused ({status.name}): {why}"))
        return actions

    # -- full feature phase ----------------------------------------------------------------------

    def _window(self, immediate: bool, cmdsn: int, bhs: bytes) -> None:
        if immediate:
            return
        if cmdsn != self.expcmdsn:
            # RFC 7143 4.2.2.1: out of window commands are silently ignored at ERL 0; a
            # single-connection session only ever sees the next one, so anything else is an error
            raise RemoteProtocolError(f"CmdSN {cmdsn} while expecting {self.expcmdsn}", None, bhs)
        self.expcmdsn = (self.expcmdsn + 1) & 0xFFFFFFFF

    def _scsi_command(self, cmd: ScsiCommand) -> list[Action]:
        self._window(cmd.immediate, cmd.cmdsn, b"")
        assert self.target is not None
        lun = self.target.luns.get(cmd.lun)
        cdb_out = self._data_out_length(cmd.cdb, cmd.lun) if lun is not None else 0
        want = min(cdb_out, cmd.expected_length) if cmd.write else 0
        task = Task(cmd.itt, cmd.lun, cmd.cdb, cmd.read, cmd.expected_length, want, cdb_out)
        self.tasks[cmd.itt] = task
        task.data += cmd.data
        if not cmd.final:
            return []  # F=0: unsolicited Data-Out PDUs follow (InitialR2T=No, RFC 7143 11.3.1)
        return self._advance(task)

    def _advance(self, task: Task) -> list[Action]:
        """Execute once all data-out is in; until then keep up to MaxOutstandingR2T R2Ts of at
        most MaxBurstLength each outstanding, in offset order (DataSequenceInOrder=Yes)."""
        if len(task.data) >= task.want_out:
            task.executing = True
            # an initiator may send up to its EDTL: each command judges what it got (scsi layer)
            return [Execute(task)]
        if task.solicited_to < 0:
            task.solicited_to = len(task.data)  # after the unsolicited burst, if any
        burst = int(self.values.get("MaxBurstLength", "262144"))
        most = int(self.values.get("MaxOutstandingR2T", "1"))
        out: list[Action] = []
        while len(task.r2ts) < most and task.solicited_to < task.want_out:
            offset = task.solicited_to
            length = min(burst, task.want_out - offset)
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
        if task is None or task.executing:
            raise RemoteProtocolError(f"Data-Out for unknown task {d.itt:#x}", RejectReason.INVALID_PDU_FIELD)
        if d.offset != len(task.data) or len(task.data) + len(d.data) > task.expected:
            # beyond the Expected Data Transfer Length the initiator itself declared
            raise RemoteProtocolError("Data-Out out of order or beyond the expected length",
                                      RejectReason.PROTOCOL_ERROR)
        if d.ttt != 0xFFFFFFFF and d.ttt not in task.r2ts:
            raise RemoteProtocolError(f"Data-Out with Target Transfer Tag {d.ttt:#x} that no R2T gave",
                                      RejectReason.INVALID_PDU_FIELD)
        if d.ttt != task.seq_ttt:
            task.seq_ttt, task.next_datasn = d.ttt, 0  # the next sequence begins
        if d.datasn != task.next_datasn and not task.sequence_error:
            # a lost or reordered Data-Out: the data cannot be trusted, but the connection can
            task.sequence_error = f"Data-Out DataSN {d.datasn} while expecting {task.next_datasn}"
        task.next_datasn = d.datasn + 1
        task.data += d.data
        if not d.final:
            return []
        task.r2ts.pop(d.ttt, None)
        if task.sequence_error:
            # at the end of the burst: fail the command (ABORTED COMMAND, which initiators retry)
            # instead of writing data that may be in the wrong place
            del self.tasks[task.itt]
            return [Fault(task.sequence_error), *self.task_done(
                task, Status.CHECK_CONDITION, None, fixed_sense(Reason.DATA_PHASE_ERROR))]
        # the end of a burst, unsolicited or solicited: execute, or solicit the rest
        return self._advance(task)

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
        self._window(nop.immediate, nop.cmdsn, b"")
        b = bytearray(BHS_LEN)
        b[0], b[1] = Opcode.NOP_IN, 0x80
        struct.pack_into(">IIIII", b, 16, nop.itt, 0xFFFFFFFF, self._next_statsn(), self.expcmdsn,
                         self._maxcmdsn())
        return [Send(self._encode(b, nop.data))]

    def _text(self, req: TextRequest) -> list[Action]:
        self._window(req.immediate, req.cmdsn, b"")
        try:
            keys = dict(params.parse_text(req.data))
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
                if target.portal:
                    pairs.append(("TargetAddress", f"{target.portal},1"))
        b = bytearray(BHS_LEN)
        b[0], b[1] = Opcode.TEXT_RESPONSE, 0x80
        struct.pack_into(">IIIII", b, 16, req.itt, 0xFFFFFFFF, self._next_statsn(), self.expcmdsn,
                         self._maxcmdsn())
        return [Send(self._encode(b, params.format_text(pairs)))]

    def _logout(self, req: LogoutRequest) -> list[Action]:
        self._window(req.immediate, req.cmdsn, b"")
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
        self._window(req.immediate, req.cmdsn, b"")
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
        for task in hit:
            if task.executing:
                task.aborted = True
                waiting.add(task.itt)
            del self.tasks[task.itt]
        actions: list[Action] = []
        if req.function in (5, 6):
            actions.append(Reset(req.lun if req.function == 5 else None))
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
        return (self.expcmdsn + QUEUE_DEPTH - 1) & 0xFFFFFFFF

    def _next_statsn(self) -> int:
        s = self.statsn
        self.statsn = (self.statsn + 1) & 0xFFFFFFFF
        return s

    def _encode(self, bhs: bytearray, data: bytes | memoryview = b"") -> list[bytes | bytearray | memoryview]:
        return encode_parts(bhs, data, header_digest=self.header_digest, data_digest=self.data_digest)


_HANDLERS: dict[tuple[State, type], Callable[[Connection, object], list[Action]]] = {
    (State.LOGIN, LoginRequest): Connection._login,  # type: ignore[dict-item]
    (State.FULL_FEATURE, ScsiCommand): Connection._scsi_command,  # type: ignore[dict-item]
    (State.FULL_FEATURE, DataOut): Connection._data_out,  # type: ignore[dict-item]
    (State.FULL_FEATURE, NopOut): Connection._nop_out,  # type: ignore[dict-item]
    (State.FULL_FEATURE, TextRequest): Connection._text,  # type: ignore[dict-item]
    (State.FULL_FEATURE, LogoutRequest): Connection._logout,  # type: ignore[dict-item]
    (State.FULL_FEATURE, TaskManagementRequest): Connection._task_mgmt,  # type: ignore[dict-item]
}
