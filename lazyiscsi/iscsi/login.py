"""The login phase of one connection (RFC 7143 6.3, 11.12, 11.13), sans I/O, as tables.

Theory of operation. A Login Request names its current stage (CSG), whether it asks to move on
(T) and to which stage (NSG). ``STEPS`` turns those three fields into a ``Step``; ``TRANSITIONS``
says, for the stage the login is in, which steps are allowed and where each leads:

    START        --security step------->  SECURITY      (the first PDU: leading keys bound)
    START        --operational step---->  OPERATIONAL   (only when the target needs no CHAP)
    SECURITY     --security step------->  SECURITY | OPERATIONAL | FULL_FEATURE
    OPERATIONAL  --operational step---->  OPERATIONAL | FULL_FEATURE

A (stage, step) pair not in the table, such as a return to the security stage, refuses the login
with one named reason (RFC 7143 11.13.5: class 2, initiator error). Guards the table cannot
express are checked in one place each:

- the leading keys (``LEADING_KEYS``: InitiatorName, SessionType, TargetName) are bound by the
  first PDU (RFC 7143 6.3: they "MUST" be in the first Login Request); a later PDU may repeat
  them (libiscsi does) but not change them: a session cannot turn from Normal to Discovery after
  the target was chosen, which is how a target's CHAP could otherwise be skipped;
- a target that requires CHAP is left only through the security stage with the exchange done
  (RFC 7143 12.1.3): the operational stage is entered only after it;
- a transition is granted only when the answer fits one PDU: a longer answer goes out in
  continuation PDUs first, the login staying where it is (``text.Outgoing``).

Discovery sessions (SessionType=Discovery, RFC 7143 4.3) bind no target; after login they may
send only Text (SendTargets), NOP-Out and Logout, which ``connection`` enforces.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

from lazyiscsi.iscsi import params
from lazyiscsi.iscsi.chap import ChapError, ChapExchange, ChapSecrets
from lazyiscsi.iscsi.pdu import BHS_LEN, LoginRequest, Opcode
from lazyiscsi.iscsi.text import LOGIN_MAX_DATA, Incoming, Outgoing, TextTooLong

#: Stage numbers as Login PDUs carry them in CSG and NSG (RFC 7143 11.12.3)
SECURITY_CSG, OPERATIONAL_CSG, FULL_FEATURE_NSG = 0, 1, 3

#: RFC 7143 4.2.7.1: an iSCSI name is at most 223 bytes; longer is no name (and would only
#: lengthen every log line that carries it)
MAX_NAME_BYTES = 223
#: keys the first Login Request binds for the whole login (RFC 7143 6.3, 13.4, 13.5, 13.21)
LEADING_KEYS = ("InitiatorName", "SessionType", "TargetName")
#: declarations that need no answer in the operational stage
_DECLARED = frozenset({"InitiatorName", "TargetName", "SessionType", "InitiatorAlias"})
#: the keys of the security stage itself (RFC 7143 12.1, 12.2): AuthMethod and CHAP's
_SECURITY_KEYS = frozenset({"AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"})
#: what we offer in the operational stage (RFC 7143 13): digests either way, one connection,
#: unsolicited data allowed, ERL 0
OURS = {"HeaderDigest": "None,CRC32C", "DataDigest": "None,CRC32C", "MaxConnections": "1",
        "InitialR2T": "No", "ImmediateData": "Yes", "MaxBurstLength": "1048576",
        "FirstBurstLength": "262144", "DefaultTime2Wait": "2", "DefaultTime2Retain": "0",
        "MaxOutstandingR2T": "8", "DataPDUInOrder": "Yes", "DataSequenceInOrder": "Yes",
        "ErrorRecoveryLevel": "0"}
#: operational keys a discovery session negotiates. RFC 7143 13.2, 13.10, 13.11, 13.13, 13.14,
#: 13.17-13.19 make MaxConnections, InitialR2T, ImmediateData, the burst lengths,
#: MaxOutstandingR2T and the ordering keys "Irrelevant when: SessionType=Discovery"; the digests
#: (13.1), DefaultTime2Wait/Retain (13.15, 13.16) and ErrorRecoveryLevel (13.20) are not, and
#: open-iscsi refuses a discovery login answered "ErrorRecoveryLevel=Irrelevant".
_DISCOVERY_KEYS = frozenset({"HeaderDigest", "DataDigest", "DefaultTime2Wait", "DefaultTime2Retain",
                             "ErrorRecoveryLevel"})


class LoginStatus(enum.IntEnum):
    """Status-Class << 8 | Status-Detail (RFC 7143 11.13.5)."""

    SUCCESS = 0x0000
    INITIATOR_ERROR = 0x0200
    AUTH_FAILED = 0x0201
    NOT_AUTHORIZED = 0x0202
    NOT_FOUND = 0x0203
    UNSUPPORTED_VERSION = 0x0205
    MISSING_PARAMETER = 0x0207
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    TARGET_ERROR = 0x0300


class Stage(enum.Enum):
    START = "start"
    SECURITY = "security"
    OPERATIONAL = "operational"
    FULL_FEATURE = "full-feature"


class Step(enum.Enum):
    """What one Login Request asks for."""

    SECURITY = "security"
    SECURITY_TO_OPERATIONAL = "security -> operational"
    SECURITY_TO_FULL_FEATURE = "security -> full feature"
    OPERATIONAL = "operational"
    OPERATIONAL_TO_FULL_FEATURE = "operational -> full feature"


#: (CSG, T, NSG) -> step; NSG is reserved when T=0 (RFC 7143 11.12.3), hence None there
STEPS: dict[tuple[int, bool, int | None], Step] = {
    (SECURITY_CSG, False, None): Step.SECURITY,
    (SECURITY_CSG, True, OPERATIONAL_CSG): Step.SECURITY_TO_OPERATIONAL,
    (SECURITY_CSG, True, FULL_FEATURE_NSG): Step.SECURITY_TO_FULL_FEATURE,
    (OPERATIONAL_CSG, False, None): Step.OPERATIONAL,
    (OPERATIONAL_CSG, True, FULL_FEATURE_NSG): Step.OPERATIONAL_TO_FULL_FEATURE,
}


@dataclass(frozen=True)
class Transition:
    """The stage a step negotiates in, and the one it leads to when the target grants T=1."""

    current: Stage
    next: Stage


_SEC, _OP, _FULL = Stage.SECURITY, Stage.OPERATIONAL, Stage.FULL_FEATURE
TRANSITIONS: dict[tuple[Stage, Step], Transition] = {
    (Stage.START, Step.SECURITY): Transition(_SEC, _SEC),
    (Stage.START, Step.SECURITY_TO_OPERATIONAL): Transition(_SEC, _OP),
    (Stage.START, Step.SECURITY_TO_FULL_FEATURE): Transition(_SEC, _FULL),
    (Stage.START, Step.OPERATIONAL): Transition(_OP, _OP),
    (Stage.START, Step.OPERATIONAL_TO_FULL_FEATURE): Transition(_OP, _FULL),
    (Stage.SECURITY, Step.SECURITY): Transition(_SEC, _SEC),
    (Stage.SECURITY, Step.SECURITY_TO_OPERATIONAL): Transition(_SEC, _OP),
    (Stage.SECURITY, Step.SECURITY_TO_FULL_FEATURE): Transition(_SEC, _FULL),
    (Stage.OPERATIONAL, Step.OPERATIONAL): Transition(_OP, _OP),
    (Stage.OPERATIONAL, Step.OPERATIONAL_TO_FULL_FEATURE): Transition(_OP, _FULL),
}


class Refused(Exception):
    """The login is refused: ``status`` goes in the Login Response, the message to the log."""

    def __init__(self, status: LoginStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Target:
    """What a connection needs to know about the target it may log into."""

    iqn: str
    luns: dict[int, object]  # LUN number -> scsi Lun (opaque here)
    allowed_initiators: frozenset[str] = frozenset()  # empty: any
    chap: ChapSecrets | None = None


@dataclass(frozen=True)
class Reply:
    """One Login Response to send: the stage it answers in, T, NSG, C and its text."""

    status: LoginStatus
    csg: int
    transit: bool
    nsg: int
    cont: bool
    text: bytes
    tsih: int


_CSG = {Stage.SECURITY: SECURITY_CSG, Stage.OPERATIONAL: OPERATIONAL_CSG}
_NSG = {**_CSG, Stage.FULL_FEATURE: FULL_FEATURE_NSG}
#: the TSIH of every session: one connection per session, and sessions are told apart by
#: InitiatorName + ISID (RFC 7143 6.3.5), so it need not be unique to work; nonzero says "new"
SESSION_TSIH = 1


class Login:
    """The target side of one connection's login. ``find_target(name)`` looks a target up by
    IQN; ``max_recv`` is what we accept per PDU once in full feature (declared to the initiator)."""

    def __init__(self, find_target: Callable[[str], Target | None], max_recv: int) -> None:
        self._find = find_target
        self.max_recv = max_recv
        self.stage = Stage.START
        self.leading: dict[str, str] = {}
        self.isid = b""
        self.target: Target | None = None
        self.values = params.session_defaults()
        self.max_send = LOGIN_MAX_DATA  # what the initiator accepts per PDU after login
        self._chap: ChapExchange | None = None
        self._authenticated = False
        self._incoming = Incoming()
        self._outgoing = Outgoing()
        self._declared: set[str] = set()  # our declarations go out once per login

    @property
    def initiator(self) -> str:
        return self.leading.get("InitiatorName", "")

    @property
    def discovery(self) -> bool:
        return self.leading.get("SessionType") == "Discovery"

    @property
    def header_digest(self) -> bool:
        return self.values.get("HeaderDigest") == "CRC32C"

    @property
    def data_digest(self) -> bool:
        return self.values.get("DataDigest") == "CRC32C"

    def receive(self, req: LoginRequest) -> Reply:
        """Answer one Login Request. Raises ``Refused``: send its status, then close."""
        if req.version_min > 0:
            raise Refused(LoginStatus.UNSUPPORTED_VERSION, f"version {req.version_min} (we speak 0)")
        if req.cont and req.transit:
            raise Refused(LoginStatus.INITIATOR_ERROR, "C and T both set (RFC 7143 11.12.2)")
        if self.stage is Stage.START:
            if req.tsih:
                # a nonzero TSIH asks to join an existing session (RFC 7143 6.3, 11.12.6); no
                # session here takes a second connection (MaxConnections=1) and reinstatement is a
                # TSIH=0 login (6.3.5), so the named session is not one this login can reach:
                # "Session does not exist" (11.13.5), never a new session under a stale TSIH
                raise Refused(LoginStatus.SESSION_DOES_NOT_EXIST, f"TSIH {req.tsih} names no session to join")
            self.isid = req.isid
        elif req.isid != self.isid:
            raise Refused(LoginStatus.INITIATOR_ERROR, "the ISID changed during login (RFC 7143 11.12.5)")
        step = STEPS.get((req.csg, req.transit, req.nsg if req.transit else None))
        transition = TRANSITIONS.get((self.stage, step)) if step is not None else None
        if transition is None:
            asked = f"CSG={req.csg} T={int(req.transit)} NSG={req.nsg}"
            raise Refused(LoginStatus.INITIATOR_ERROR, f"Login {asked} in the {self.stage.value} stage")
        if self._outgoing.pending:
            # the initiator asks for the rest of our answer with an empty request (RFC 7143 11.13.3)
            if req.data or req.cont:
                raise Refused(LoginStatus.INITIATOR_ERROR, "new text before the rest of the answer")
            piece, more = self._outgoing.next(LOGIN_MAX_DATA)
            return self._reply(transition.current, False, piece, more)
        try:
            text = self._incoming.add(req.data, req.cont)
        except TextTooLong as e:
            raise Refused(LoginStatus.INITIATOR_ERROR, str(e)) from None
        if text is None:
            # more of the request follows: an empty answer asks for it (RFC 7143 11.12.2)
            if self.stage is Stage.START:
                self.stage = transition.current
            return self._reply(transition.current, False, b"", False)
        try:
            keys = dict(params.parse_text(text))
        except ValueError as e:
            raise Refused(LoginStatus.INITIATOR_ERROR, str(e)) from None
        self._bind_leading(keys)
        if transition.current is Stage.SECURITY:
            answer = self._security(keys)
        else:
            if self._needs_auth() and not self._authenticated:
                raise Refused(LoginStatus.AUTH_FAILED, "the target requires CHAP: security stage first")
            answer = self._operational(keys)
        self.stage = transition.current
        transit = transition.next is not transition.current
        if transit and self._needs_auth() and not self._authenticated:
            if self._chap is None:
                raise Refused(LoginStatus.AUTH_FAILED, "the target requires CHAP")
            transit = False  # the CHAP exchange is under way: stay (RFC 7143 11.13.3)
        text = params.format_text(answer)
        piece, more = self._outgoing.first(text, LOGIN_MAX_DATA)
        if more:
            transit = False  # first the rest of the answer, then the move
        if transit:
            self.stage = transition.next
            return self._reply(transition.next, True, piece, False, from_stage=transition.current)
        return self._reply(transition.current, False, piece, more)

    def _reply(self, stage: Stage, transit: bool, text: bytes, cont: bool, *,
               from_stage: Stage | None = None) -> Reply:
        csg = _CSG[from_stage or stage]
        nsg = _NSG[stage] if transit else 0
        tsih = SESSION_TSIH if stage is Stage.FULL_FEATURE else 0
        return Reply(LoginStatus.SUCCESS, csg, transit, nsg, cont, text, tsih)

    def _bind_leading(self, keys: dict[str, str]) -> None:
        """The first request binds the leading keys; later ones may only repeat them."""
        if self.leading:
            for key in LEADING_KEYS:
                # SessionType defaulted to Normal in the first PDU: a later Discovery is a change
                if key in keys and keys[key] != self.leading.get(key, keys[key]):
                    raise Refused(LoginStatus.INITIATOR_ERROR, f"{key} changed after the first Login PDU")
            return
        initiator = keys.get("InitiatorName", "")
        if not initiator:
            raise Refused(LoginStatus.MISSING_PARAMETER, "no InitiatorName in the first Login PDU")
        for key in ("InitiatorName", "TargetName"):
            if len(keys.get(key, "").encode()) > MAX_NAME_BYTES:
                raise Refused(LoginStatus.INITIATOR_ERROR, f"{key} longer than {MAX_NAME_BYTES} bytes")
        session_type = keys.get("SessionType", "Normal")
        if session_type not in ("Normal", "Discovery"):
            raise Refused(LoginStatus.SESSION_TYPE_NOT_SUPPORTED, f"SessionType {session_type[:40]!r}")
        self.leading = {"InitiatorName": initiator, "SessionType": session_type}
        if session_type == "Discovery":
            return  # a discovery session binds no target; a TargetName there is ignored
        name = keys.get("TargetName", "")
        if not name:
            raise Refused(LoginStatus.MISSING_PARAMETER, "no TargetName in the first Login PDU")
        target = self._find(name)
        if target is None:
            raise Refused(LoginStatus.NOT_FOUND, f"no target {name!r}")
        if target.allowed_initiators and initiator not in target.allowed_initiators:
            raise Refused(LoginStatus.NOT_AUTHORIZED, "initiator not in the ACL")
        self.leading["TargetName"] = name
        self.target = target

    def _needs_auth(self) -> bool:
        return self.target is not None and self.target.chap is not None

    def _security(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        """The security keys, then any operational ones the request carries: a request may go
        from the security stage straight to full feature (CSG=0, NSG=3) with no operational
        stage (RFC 7143 6.3), and a MaxRecvDataSegmentLength it declares binds us as much as
        one said later (13.12); ignored, our Data-In would exceed what the initiator takes."""
        try:
            out = self._chap_step(keys)
        except ChapError as e:
            raise Refused(LoginStatus.AUTH_FAILED, str(e)) from None
        operational = {k: v for k, v in keys.items() if k not in _SECURITY_KEYS}
        return out + self._operational(operational) if operational.keys() - _DECLARED else out

    def _chap_step(self, keys: dict[str, str]) -> list[tuple[str, str]]:
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
        if self._chap is not None and "CHAP_A" in keys:
            out += self._chap.challenge(keys["CHAP_A"])
        elif self._chap is not None and "CHAP_R" in keys:
            out += self._chap.verify(keys)
            self._authenticated = True
        if not self._needs_auth():
            self._authenticated = True
        if self.target is not None:
            self._declare(out, "TargetPortalGroupTag", "1")
        return out

    def _declare(self, out: list[tuple[str, str]], key: str, value: str) -> None:
        """A declarative key of ours (RFC 7143 6.2), stated once in the login: repeated in a
        later response it would be a key "sent twice" to a strict initiator."""
        if key not in self._declared:
            self._declared.add(key)
            out.append((key, value))

    def _operational(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        """One answer per key offered (RFC 7143 6.2), and our own MaxRecvDataSegmentLength."""
        out: list[tuple[str, str]] = []
        for key, value in keys.items():
            if key in _DECLARED:
                continue
            if key == "MaxRecvDataSegmentLength":
                if params.negotiate(key, value, "") == params.REJECT:
                    # answered once, with Reject: the initiator keeps the default (8192) for us
                    out.append((key, params.REJECT))
                    self._declared.add(key)
                else:
                    self.max_send = int(value, 0)
                continue
            if self.discovery and key not in _DISCOVERY_KEYS:
                out.append((key, params.IRRELEVANT))
                continue
            answer = params.negotiate(key, value, OURS.get(key, params.KEYS[key].default)
                                      if key in params.KEYS else "")
            if answer is not None:
                out.append((key, answer))
                if answer not in (params.REJECT, params.NOT_UNDERSTOOD):
                    self.values[key] = answer
        self._declare(out, "MaxRecvDataSegmentLength", str(self.max_recv))
        return out


def build_response(reply: Reply, req: LoginRequest, statsn: int, expcmdsn: int, maxcmdsn: int) -> bytearray:
    """The Login Response's BHS (RFC 7143 11.13); the data segment is ``reply.text``."""
    b = bytearray(BHS_LEN)
    b[0] = Opcode.LOGIN_RESPONSE
    b[1] = (0x80 if reply.transit else 0) | (0x40 if reply.cont else 0) | (reply.csg << 2) | reply.nsg
    b[8:14] = req.isid
    struct.pack_into(">HI", b, 14, reply.tsih, req.itt)
    struct.pack_into(">III", b, 24, statsn, expcmdsn, maxcmdsn)
    b[36], b[37] = reply.status >> 8, reply.status & 0xFF
    return b


def refusal(status: LoginStatus, req: LoginRequest) -> Reply:
    """The Login Response that refuses: no text, no transition, the stage the request was in."""
    csg = req.csg if req.csg in _CSG.values() else SECURITY_CSG
    return Reply(status, csg, False, 0, False, b"", 0)
