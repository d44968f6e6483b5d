"""Model-based tests of LazyDisk: random interleavings of guest I/O, background populates,
source completions in any order, source errors, flushes and crashes, checked after every step
against a reference model.

The model keeps, per unit, what a read must return now (``latest``) and every value the unit
held since the last flush (``history``, oldest = the durable value). After a crash a unit may
hold any value of its history and nothing else; a unit not written since the last flush must
hold exactly its durable value. That one rule says both "a flushed write is never lost" and
"source data never replaces a guest write" (source data is in a unit's history only while no
guest write to it has been flushed).

A crash is a power loss (a new boot: what was not synced may be gone). A kill is the daemon
dying while the machine runs on (the same boot: the files keep every write the kernel took);
then nothing a finished guest write put there may be lost, flushed or not.

Concurrent guest operations never overlap (as with a real initiator that orders its own
overlapping commands); populates and source completions overlap with anything.
"""

from __future__ import annotations

import os
import random

import gevent
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lazyiscsi.store import lazydisk
from lazyiscsi.store.errors import SourceIOError
from lazyiscsi.store.fetch import RetryPolicy
from lazyiscsi.store.lazydisk import LazyDisk
from tests.unit.store_fakes import ScriptedSource, VolatileDisk

UNIT = 512
MAX_UNITS = 20
EXAMPLES = int(os.environ.get("LAZYISCSI_MODEL_EXAMPLES", "2000" if os.environ.get("CI") else "300"))


def _settle() -> None:
    for _ in range(12):
        gevent.sleep(0)


class Op:
    def __init__(self, kind: str, offset: int, length: int, expect: bytes | None,
                 undo: dict[int, bytes] | None) -> None:
        self.kind, self.offset, self.length, self.expect, self.undo = kind, offset, length, expect, undo
        self.greenlet: gevent.Greenlet | None = None
        self.mark: list[int] = []

    @property
    def units(self) -> range:
        return range(self.offset // UNIT, -(-(self.offset + self.length) // UNIT))


class LazyDiskMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = None

    @initialize(n_units=st.integers(2, MAX_UNITS), tail=st.sampled_from([0, 0, 100]),
                readahead_units=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
    def setup(self, n_units: int, tail: int, readahead_units: int, seed: int) -> None:
        import tempfile

        self.tmp = tempfile.TemporaryDirectory()
        self.boot = 0
        self.real_boot_id = lazydisk.current_boot_id
        lazydisk.current_boot_id = lambda: f"model-boot-{self.boot}"  # type: ignore[assignment]
        rnd = random.Random(seed)
        self.size = n_units * UNIT - tail
        self.data = bytes(rnd.randrange(1, 256) for _ in range(self.size))
        self.path = os.path.join(self.tmp.name, "cache")
        self.vdisk = VolatileDisk()
        self.readahead = readahead_units * UNIT
        self.latest = bytearray(self.data)
        self.history: list[list[bytes]] = [[self._unit(self.latest, u)] for u in range(self._n_units)]
        self.syncs_at_flush = 0
        self.ops: list[Op] = []
        self.populates: list[gevent.Greenlet] = []
        self._open()

    # -- helpers ---------------------------------------------------------------------------

    @property
    def _n_units(self) -> int:
        return -(-self.size // UNIT)

    def _unit(self, buf: bytes | bytearray, u: int) -> bytes:
        return bytes(buf[u * UNIT:min((u + 1) * UNIT, self.size)])

    def _open(self) -> None:
        self.source = ScriptedSource(self.data)
        self.disk = LazyDisk.open(self.path, self.source, unit=UNIT, readahead=self.readahead,
                                  autocommit_s=None, retry=RetryPolicy(attempts=2, first_delay=0),
                                  opener=self.vdisk)

    @property
    def cache_file(self):  # type: ignore[no-untyped-def]
        return self.vdisk.files[self.path]

    def _busy_units(self) -> set[int]:
        return {u for op in self.ops for u in op.units}

    def _free(self, offset: int, length: int) -> bool:
        busy = self._busy_units()
        return not any(u in busy for u in range(offset // UNIT, -(-(offset + length) // UNIT)))

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        offset = data.draw(st.integers(0, self.size - 1))
        length = data.draw(st.integers(1, min(self.size - offset, 3 * UNIT)))
        return offset, length

    def _spawn(self, op: Op, fn, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        op.greenlet = gevent.spawn(fn, *args, **kwargs)
        self.ops.append(op)
        _settle()

    def _set_latest(self, offset: int, data: bytes) -> dict[int, bytes]:
        """Apply a guest write to the model; return the units' old values (to undo a failure)."""
        first, last = offset // UNIT, -(-(offset + len(data)) // UNIT)
        undo = {u: self._unit(self.latest, u) for u in range(first, last)}
        self.latest[offset:offset + len(data)] = data
        for u in range(first, last):
            self.history[u].append(self._unit(self.latest, u))
        return undo

    def _harvest(self) -> None:
        """Check every guest operation that has finished."""
        for op in [o for o in self.ops if o.greenlet.ready()]:
            self.ops.remove(op)
            exc = op.greenlet.exception
            if exc is not None:
                assert isinstance(exc, SourceIOError), f"{op.kind} raised {exc!r}"
                if op.undo:  # the write did not happen: nothing of it may show
                    for u, old in op.undo.items():
                        self.latest[u * UNIT:u * UNIT + len(old)] = old
                continue
            if op.kind == "flush":
                # the flush covers what was current when it began (no write was in flight then)
                self.history = [[self._unit(op.expect, u), *h[m:]]
                                for u, (h, m) in enumerate(zip(self.history, op.mark, strict=True))]
                # a write that ran during the flush may or may not be covered by it: until the
                # next clean flush a crash may keep it, so the exact check is off
                clean = all(len(h) == 1 for h in self.history)
                self.syncs_at_flush = self.cache_file.syncs if clean else -1
            elif op.kind == "read":
                got = bytes(op.greenlet.value)
                assert got == op.expect, f"read {op.offset}+{op.length} returned wrong data"

    # -- rules -----------------------------------------------------------------------------

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        offset, length = self._range(data)
        if self._free(offset, length):
            expect = bytes(self.latest[offset:offset + length])
            self._spawn(Op("read", offset, length, expect, None), self.disk.read, offset, length)

    @rule(data=st.data(), aligned=st.booleans(), fua=st.booleans())
    def write(self, data: st.DataObject, aligned: bool, fua: bool) -> None:
        offset, length = self._range(data)
        if aligned:
            offset = offset // UNIT * UNIT
            length = min(self.size - offset, -(-length // UNIT) * UNIT)
        if not self._free(offset, length):
            return
        payload = data.draw(st.binary(min_size=length, max_size=length))
        undo = self._set_latest(offset, payload)
        self._spawn(Op("write", offset, length, None, undo), self.disk.write, offset, payload, fua=fua)

    @rule(data=st.data(), zeroes=st.booleans())
    def discard(self, data: st.DataObject, zeroes: bool) -> None:
        offset, length = self._range(data)
        if not self._free(offset, length):
            return
        if zeroes:
            undo = self._set_latest(offset, bytes(length))
            self._spawn(Op("write_zeroes", offset, length, None, undo),
                        self.disk.write_zeroes, offset, length)
        else:
            end = offset + length
            a = -(-offset // UNIT) * UNIT
            b = self.size if end == self.size else end // UNIT * UNIT
            undo = self._set_latest(a, bytes(b - a)) if b > a else None
            self._spawn(Op("discard", offset, length, None, undo), self.disk.discard, offset, length)

    @rule(data=st.data())
    def populate(self, data: st.DataObject) -> None:
        offset, length = self._range(data)
        g = gevent.spawn(self.disk.populate, offset, length)
        self.populates.append(g)
        _settle()

    @precondition(lambda self: self.source.pending)
    @rule(data=st.data(), fail=st.sampled_from([False, False, False, True]))
    def source_answers(self, data: st.DataObject, fail: bool) -> None:
        i = data.draw(st.integers(0, len(self.source.pending) - 1))
        (self.source.fail if fail else self.source.complete)(i)
        _settle()

    @precondition(lambda self: not self.ops)
    @rule(gated=st.booleans())
    def flush(self, gated: bool) -> None:
        """A flush; when gated, its fdatasyncs wait for ``sync_completes`` (a crash may come
        first, which is how the order of data and map syncs inside a commit gets tested)."""
        self.vdisk.gate = gated
        op = Op("flush", 0, 0, None, None)
        # what each unit held when the flush began, and where later values start in history
        op.mark = [len(h) for h in self.history]
        op.expect = bytes(self.latest)
        self._spawn(op, self.disk.flush)

    @precondition(lambda self: self.vdisk.pending_syncs)
    @rule(data=st.data())
    def sync_completes(self, data: st.DataObject) -> None:
        self.vdisk.release_sync(data.draw(st.integers(0, len(self.vdisk.pending_syncs) - 1)))
        _settle()

    def _die(self) -> None:
        """The process dies: nothing of it runs on."""
        gevent.killall([op.greenlet for op in self.ops] + self.populates)
        self.disk._fetcher.close()
        for g in (self.disk._finisher, self.disk._committer):
            if g is not None:
                g.kill()
        self.ops, self.populates = [], []
        self.vdisk.pending_syncs.clear()
        self.vdisk.gate = False

    @rule()
    def kill(self) -> None:
        in_flight = {u for op in self.ops if op.kind != "flush" for u in op.units}
        self._die()
        self._open()  # same boot: the files hold every write the process made
        after = self._read_all()
        for u in range(self._n_units):
            got = self._unit(after, u)
            if u in in_flight:
                assert got in self.history[u], f"unit {u} holds data never written there"
            else:
                assert got == self._unit(self.latest, u), f"unit {u} lost a write the guest saw finish"
        self.latest = bytearray(after)
        for u in in_flight:
            self.history[u].append(self._unit(after, u))

    @rule(keep_cache=st.booleans(), keep_map=st.booleans(), keep_written=st.booleans())
    def crash(self, keep_cache: bool, keep_map: bool, keep_written: bool) -> None:
        exact = (not keep_cache and not keep_map and self.cache_file.syncs == self.syncs_at_flush
                 and not any(op.kind == "flush" for op in self.ops))
        self._die()
        # power loss: files keep only what the medium kept, and the machine boots again
        self.cache_file.crash(keep_cache)
        self.vdisk.files[self.path + ".map"].crash(keep_map)
        self.vdisk.files[self.path + ".written"].crash(keep_written)
        self.boot += 1
        self._open()
        after = self._read_all()
        for u in range(self._n_units):
            got = self._unit(after, u)
            if exact:
                assert got == self.history[u][0], f"unit {u} lost a flushed write or kept an unflushed one"
            else:
                assert got in self.history[u], f"unit {u} holds data never written there since the flush"
        self.latest = bytearray(after)
        self.history = [[self._unit(after, u)] for u in range(self._n_units)]
        # what the crash left in the files is what the medium holds now
        self.syncs_at_flush = self.cache_file.syncs

    def _read_all(self) -> bytes:
        g = gevent.spawn(self.disk.read, 0, self.size)
        for _ in range(10 * self._n_units + 20):
            _settle()
            if g.ready():
                break
            while self.source.pending:
                self.source.complete(0)
        return bytes(g.get(timeout=1))

    @invariant()
    def results_match_model(self) -> None:
        if self.tmp is not None:
            self._harvest()
            assert self.disk.local_bytes <= self.size

    def teardown(self) -> None:
        if self.tmp is None:
            return
        lazydisk.current_boot_id = self.real_boot_id  # type: ignore[assignment]
        try:
            # let everything finish, then the whole disk must equal the model
            self.vdisk.gate = False
            for _ in range(200):
                if not self.source.pending and all(o.greenlet.ready() for o in self.ops):
                    break
                while self.source.pending:
                    self.source.complete(0)
                while self.vdisk.pending_syncs:
                    self.vdisk.release_sync(0)
                _settle()
            self._harvest()
            assert bytes(self._read_all()) == bytes(self.latest)
            for _ in range(100):  # a finisher spawned late may still wait on a gated sync
                if not self.vdisk.pending_syncs:
                    break
                self.vdisk.release_sync(0)
                _settle()
            self.disk.close()
        finally:
            self.tmp.cleanup()


TestLazyDiskModel = LazyDiskMachine.TestCase
TestLazyDiskModel.settings = settings(max_examples=EXAMPLES, stateful_step_count=40, deadline=None,
                                      suppress_health_check=list(HealthCheck))

