"""The valid sessions the fuzzer damages, generated from a seed: logins (without and with CHAP,
with and without digests, discovery), then SendTargets, INQUIRY, READ, WRITE with immediate
data, unsolicited Data-Out and R2T-solicited Data-Out, task management (ABORT TASK, ABORT TASK
SET, LUN RESET and the rest), NOP-Out, Text, SNACK, fuzzed CDBs, and Logout.

Every PDU of a session goes through the mutator at the session's own rate (sessions mix light
and heavy damage, so some go deep into the full feature phase and some die in login).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass

import gevent

from tests.fuzz import cdbs, wire
from tests.fuzz.initiator import MAX_RECV, Initiator, Stats
from tests.fuzz.mutate import Mutator
from tests.fuzz.wire import ALL_ONES, Pdu

#: damage rates a session draws from: most sessions live long, some are shredded from the start
RATES = (0.005, 0.02, 0.05, 0.15, 0.4)
#: how long a session waits for room in its window of commands before it forgets the missing
#: answers (a damaged PDU may never be answered: that is allowed, a crash is not)
WINDOW_TIMEOUT = 2.0
#: how long the end of a session waits for the Logout Response or the close
LOGOUT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Layout:
    """What the daemon under test serves, as the fuzzer needs to know it."""

    address: tuple[str, int]
    target: str
    luns: dict[int, int]  # LUN -> blocks
    chap_target: str
    chap: tuple[str, str]  # user, secret
    block_size: int
    opcodes: tuple[int, ...]


class Session:
    """One fuzzing session: a connection, a login of some kind, ``ops`` operations, a logout."""

    def __init__(self, layout: Layout, seed: int, stats: Stats) -> None:
        self.layout = layout
        self.seed = seed
        self.rng = random.Random(seed)
        self.stats = stats
        self.mutator = Mutator(self.rng, self.rng.choice(RATES))
        self.ini: Initiator | None = None
        self.lun = 0

    def run(self, keep_going: Callable[[], bool] = lambda: True) -> None:
        """The whole session, or as much of it as ``keep_going`` allows."""
        rng = self.rng
        try:
            ini = self.ini = Initiator(self.layout.address, self.stats, self.mutator)
        except OSError:
            return
        try:
            kind = rng.choices(list(_LOGINS), weights=[w for w, _ in _LOGINS.values()])[0]
            keys = _LOGINS[kind][1](self)
            if keys is None:
                return
            self.stats.login_kinds[kind] += 1
            discovery = kind == "discovery"
            ops = _DISCOVERY_OPS if discovery else _OPS
            names, weights = list(ops), [w for w, _ in ops.values()]
            for _ in range(rng.randint(10, 300)):
                if ini.closed.is_set() or ini.cut or not keep_going():
                    return
                ini.wait_window(WINDOW_TIMEOUT)
                # now and then a LUN the target does not have (SPC-4 4.6.4)
                luns = list(self.layout.luns)
                self.lun = rng.choice(luns) if rng.random() < 0.97 else rng.randrange(1 << 14)
                ops[rng.choices(names, weights)[0]][1](self)
            itt = ini.next_itt()
            ini.send([wire.logout(itt=itt, reason=rng.choice([0, 0, 0, 1, 2, 3]), cid=1,
                                  cmdsn=ini.next_cmdsn(), expstatsn=ini.expstatsn)])
            ini.closed.wait(LOGOUT_TIMEOUT)
        finally:
            ini.close()

    # -- login ---------------------------------------------------------------------------------

    def _initiator_name(self) -> str:
        return f"iqn.2026-11.test.fuzz:i{self.rng.randrange(8)}"

    def _operational(self, digests: bool) -> list[tuple[str, str]]:
        rng = self.rng
        # mostly large: a 512-byte limit makes every READ dozens of Data-In PDUs (slow to fuzz)
        declared = rng.choices([512, 8192, MAX_RECV], weights=[1, 4, 15])[0]
        assert self.ini is not None
        self.ini.reader.max_data = declared
        keys = [("MaxRecvDataSegmentLength", str(declared)),
                ("InitialR2T", rng.choice(["Yes", "No"])), ("ImmediateData", rng.choice(["Yes", "No"])),
                ("FirstBurstLength", str(rng.choice([512, 8192, 65536, 262144]))),
                ("MaxBurstLength", str(rng.choice([512, 16384, 262144, 1048576]))),
                ("MaxOutstandingR2T", str(rng.choice([1, 4]))), ("ErrorRecoveryLevel", "0"),
                ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes")]
        if digests:
            keys += [("HeaderDigest", rng.choice(["CRC32C", "CRC32C,None"])),
                     ("DataDigest", rng.choice(["CRC32C", "None", "CRC32C,None"]))]
        else:
            keys += [("HeaderDigest", "None"), ("DataDigest", "None")]
        rng.shuffle(keys)
        return keys

    def _login_normal(self, *, digests: bool = False, chap: bool = False, clean: bool = True,
                      discovery: bool = False) -> dict[str, str] | None:
        rng = self.rng
        assert self.ini is not None
        ini = self.ini
        ini.isid = bytes([0x40 | rng.randrange(0x40)]) + rng.randbytes(5)
        ini.cmdsn = rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF, rng.randrange(1 << 32)])
        security = [("InitiatorName", self._initiator_name()),
                    ("SessionType", "Discovery" if discovery else "Normal")]
        if not discovery:
            security.append(("TargetName", self.layout.chap_target if chap else self.layout.target))
        security.append(("AuthMethod", "CHAP,None" if chap else "None"))
        if not chap and rng.random() < 0.2:
            # straight from security to full feature with every operational key at its default
            # (MaxRecvDataSegmentLength 8192, RFC 7143 13.12)
            self.ini.reader.max_data = 8192
            stages = [(0, 3, security)]
        else:
            stages = [(0, 1, security), (1, 3, self._operational(digests))]
        if clean:
            return ini.login(stages, chap=self.layout.chap if chap else None, clean=True)
        for _csg, _nsg, keys in stages:  # keys out of place, repeated, unknown or out of range
            keys += rng.sample(_LOGIN_INJECTIONS, rng.randint(0, 3))
        ini.strict = False  # our own declarations may be among the damage
        rate = self.mutator.rate
        self.mutator.rate = max(rate, 0.3)  # damage the login itself, whatever the session's rate
        try:
            return ini.login(stages, chap=self.layout.chap if chap else None, clean=False)
        finally:
            self.mutator.rate = rate

    # -- operations ----------------------------------------------------------------------------

    def command(self, cdb: bytes, *, edtl: int, read: bool, write: bool, data: bytes = b"",
                immediate: bool = False) -> int:
        """A SCSI Command with the data-out the session's negotiation allows unsolicited
        (immediate data, then Data-Out with TTT all ones up to FirstBurstLength, RFC 7143
        3.2.4.2); the rest goes out when the target's R2Ts ask for it."""
        assert self.ini is not None
        ini, rng = self.ini, self.rng
        itt = ini.next_itt()
        cmdsn = ini.cmdsn if immediate else ini.next_cmdsn()
        first = min(len(data), ini.first_burst)
        imm = data[:min(first, ini.max_send)] if ini.immediate_data else b""
        unsolicited: list[Pdu] = []
        if not ini.initial_r2t and len(imm) < first and rng.random() < 0.8:
            pos, datasn = len(imm), 0
            while pos < first:
                n = min(ini.max_send, first - pos)
                unsolicited.append(wire.data_out(itt=itt, lun=self.lun, ttt=ALL_ONES, expstatsn=ini.expstatsn,
                                                 datasn=datasn, offset=pos, data=data[pos:pos + n],
                                                 final=pos + n >= first))
                pos += n
                datasn += 1
        pdu = wire.scsi_command(itt=itt, lun=self.lun, cmdsn=cmdsn, expstatsn=ini.expstatsn, cdb=cdb,
                                edtl=edtl, read=read, write=write, final=not unsolicited,
                                immediate=immediate, data=imm, attributes=rng.choice([1, 1, 1, 0, 2, 4]))
        ini.send([pdu, *unsolicited], track=(itt,), write=(itt, self.lun, data) if data else None)
        return itt

    def _blocks(self) -> tuple[int, int]:
        n_blocks = self.layout.luns.get(self.lun, 8192)
        count = self.rng.choices([1, 8, 16, 64, 256, 1024], weights=[6, 4, 2, 2, 1, 0.2])[0]
        return self.rng.randrange(max(n_blocks - count, 1)), count

    def op_read(self) -> None:
        lba, count = self._blocks()
        if self.rng.random() < 0.5:
            cdb = struct.pack(">BBIBHB", 0x28, 0, lba, 0, count, 0)
        else:
            cdb = struct.pack(">BBQIBB", 0x88, 0, lba, count, 0, 0)
        self.command(cdb, edtl=count * self.layout.block_size, read=True, write=False)

    def op_write(self) -> None:
        lba, count = self._blocks()  # (1024 blocks: a streamed WRITE, more than one piece)
        fua = self.rng.choice([0, 0, 0x08])
        cdb = struct.pack(">BBIBHB", 0x2A, fua, lba, 0, count, 0)
        data = self.rng.randbytes(count * self.layout.block_size)
        self.command(cdb, edtl=len(data), read=False, write=True, data=data)

    def op_inquiry(self) -> None:
        page = self.rng.choice([None, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2, 0x86, 0xFF])
        alloc = self.rng.choice([36, 96, 255, 4096, 0, 1])
        cdb = struct.pack(">BBBHB", 0x12, 0 if page is None else 1, page or 0, alloc, 0)
        self.command(cdb, edtl=alloc, read=True, write=False, immediate=self.rng.random() < 0.2)

    def op_misc(self) -> None:
        rng = self.rng
        cdb = rng.choice([bytes(6), struct.pack(">B9x", 0x25), struct.pack(">BB8xIBB", 0x9E, 0x10, 32, 0, 0),
                          struct.pack(">BxBxxxIxx", 0xA0, 0, 4096), struct.pack(">BxBxBx", 0x1A, 0x3F, 255),
                          struct.pack(">BxxxBx", 0x03, 18), struct.pack(">B9x", 0x35),
                          struct.pack(">BB5xHx", 0x5E, 0, 255)])
        self.command(cdb, edtl=rng.choice([0, 8, 18, 32, 255, 4096]), read=True, write=False)

    def op_cdb_fuzz(self) -> None:
        n_blocks = self.layout.luns.get(self.lun, 8192)
        fc = cdbs.fuzz_command(list(self.layout.opcodes), n_blocks, self.layout.block_size, self.rng)
        self.stats.cdb_opcodes[fc.cdb[0]] += 1
        self.command(fc.cdb, edtl=fc.edtl, read=fc.read, write=fc.write, data=fc.data)

    def op_task_mgmt(self) -> None:
        """ABORT TASK of a command just sent (it may be running, gathering data or done),
        ABORT TASK SET, CLEAR ACA, CLEAR TASK SET, LUN RESET, TARGET WARM/COLD RESET, TASK
        REASSIGN, or a function that does not exist (RFC 7143 11.5.1)."""
        assert self.ini is not None
        ini, rng = self.ini, self.rng
        victim = 0
        if rng.random() < 0.6:
            blocks = rng.choice([64, 64, 2048])  # gathered, or streamed (more than one piece)
            victim = self.command(struct.pack(">BBIBHB", 0x2A, 0, rng.randrange(64), 0, blocks, 0),
                                  edtl=blocks * self.layout.block_size, read=False, write=True,
                                  data=bytes(blocks * self.layout.block_size))
        function = rng.choice([1, 1, 1, 2, 3, 4, 5, 5, 6, 7, 8, 0, 15, 0x7F])
        itt = ini.next_itt()
        ini.send([wire.task_mgmt(function=function, itt=itt, rtt=victim or rng.randrange(1 << 32),
                                 lun=self.lun, cmdsn=ini.cmdsn, expstatsn=ini.expstatsn,
                                 refcmdsn=(ini.cmdsn - 1) & 0xFFFFFFFF)], track=(itt,))

    def op_nop(self) -> None:
        assert self.ini is not None
        ini, rng = self.ini, self.rng
        if rng.random() < 0.2:  # no answer wanted: ITT all ones, immediate (RFC 7143 11.18.1)
            ini.send([wire.nop_out(itt=ALL_ONES, ttt=ALL_ONES, cmdsn=ini.cmdsn, expstatsn=ini.expstatsn,
                                   immediate=True)])
            return
        itt = ini.next_itt()
        immediate = rng.random() < 0.5
        ini.send([wire.nop_out(itt=itt, ttt=ALL_ONES, cmdsn=ini.cmdsn if immediate else ini.next_cmdsn(),
                               expstatsn=ini.expstatsn, data=rng.randbytes(rng.choice([0, 4, 48, 4096])),
                               immediate=immediate)], track=(itt,))

    def op_text(self) -> None:
        assert self.ini is not None
        ini, rng = self.ini, self.rng
        body = rng.choice([wire.format_text([("SendTargets", "All")]),
                           wire.format_text([("SendTargets", self.layout.target)]),
                           wire.format_text([("SendTargets", "")]),
                           wire.format_text([("MaxBurstLength", "65536"), ("X-unknown", "1")]),
                           wire.format_text([("HeaderDigest", "CRC32C")])])
        itt = ini.next_itt()
        ini.send([wire.text(itt=itt, cmdsn=ini.next_cmdsn(), expstatsn=ini.expstatsn, body=body)],
                 track=(itt,))

    def op_snack(self) -> None:
        assert self.ini is not None
        ini, rng = self.ini, self.rng
        ini.send([wire.snack(itt=rng.choice([ini.itt, ALL_ONES]), kind=rng.randrange(4), ttt=ALL_ONES,
                             expstatsn=ini.expstatsn, begrun=0, runlength=rng.choice([0, 1]))])

    def op_idle(self) -> None:
        """A short pause, so the target's own timers (pings) meet the session mid-stream."""
        gevent.sleep(self.rng.choice([0.001, 0.01, 0.05]))


#: keys a damaged login slips into its stages: session keys in a later PDU (RFC 7143 6.3: only
#: the first may carry them), declarative keys twice, values out of range or malformed, unknown keys
_LOGIN_INJECTIONS = [
    ("SessionType", "Discovery"), ("SessionType", "Normal"), ("SessionType", "Bogus"),
    ("TargetName", "iqn.2026-11.test.fuzz:chap"), ("TargetName", ""),
    ("InitiatorName", "iqn.2026-11.test.fuzz:other"), ("AuthMethod", "None"), ("AuthMethod", "CHAP"),
    ("CHAP_A", "5"), ("CHAP_R", "0x00"), ("CHAP_N", "nobody"), ("MaxConnections", "2"),
    ("ErrorRecoveryLevel", "2"), ("MaxRecvDataSegmentLength", "0"), ("MaxRecvDataSegmentLength", "16777216"),
    ("MaxBurstLength", "1"), ("FirstBurstLength", "99999999999999999999"), ("HeaderDigest", "CRC32C,Bogus"),
    ("DefaultTime2Wait", "-1"), ("X-com.example.fuzz", "v" * 255), ("TargetAlias", "not-yours"),
    ("MaxOutstandingR2T", "0"), ("InitialR2T", "Maybe"), ("MaxRecvDataSegmentLength", "0x1000"),
]

_Op = Callable[[Session], None]
#: full feature operations: name -> (weight, operation)
_OPS: dict[str, tuple[int, _Op]] = {
    "read": (18, Session.op_read), "write": (14, Session.op_write), "inquiry": (8, Session.op_inquiry),
    "misc": (8, Session.op_misc), "cdb_fuzz": (30, Session.op_cdb_fuzz),
    "task_mgmt": (5, Session.op_task_mgmt), "nop": (5, Session.op_nop), "text": (3, Session.op_text),
    "snack": (1, Session.op_snack), "idle": (1, Session.op_idle),
}
#: a discovery session may only use Text, NOP and Logout: the rest is there to be refused
_DISCOVERY_OPS: dict[str, tuple[int, _Op]] = {
    "text": (10, Session.op_text), "nop": (5, Session.op_nop), "inquiry": (2, Session.op_inquiry),
    "write": (1, Session.op_write), "task_mgmt": (1, Session.op_task_mgmt),
}
#: login kinds: name -> (weight, how); a damaged login ends most sessions early
_LOGINS: dict[str, tuple[int, Callable[[Session], dict[str, str] | None]]] = {
    "plain": (45, lambda s: s._login_normal()),
    "digests": (20, lambda s: s._login_normal(digests=True)),
    "chap": (15, lambda s: s._login_normal(chap=True, digests=s.rng.random() < 0.3)),
    "discovery": (10, lambda s: s._login_normal(discovery=True, digests=s.rng.random() < 0.3)),
    "damaged": (10, lambda s: s._login_normal(clean=False, chap=s.rng.random() < 0.3,
                                              discovery=s.rng.random() < 0.2)),
}
