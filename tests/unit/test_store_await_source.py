"""A hydrating cache opened without its source (``LazyDisk.open(awaiting_source=...)``), as a
daemon restarted during a source outage opens it: local units served, misses unreachable (NOT
READY) rather than read errors, the copy waiting; ``attach_source`` binds the same disk (the copy
runs) or latches ``source_changed`` for another one (never two disks in one cache). Sources are
faked below the store."""

from __future__ import annotations

import random

import pytest

from lazyiscsi.store.errors import (
    CacheConfigError,
    SourceChangedError,
    SourceMismatch,
    SourceUnreachable,
    StoreError,
)
from lazyiscsi.store.hydrator import Hydrator, JobState
from lazyiscsi.store.lazydisk import LazyDisk
from tests.unit.store_fakes import InstantSource, LiveSource, settle

MiB = 1 << 20
UNIT = 4096
WHY = "cannot reach nbd://src/: Connection refused"


def _data(seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(2 * MiB)


def _half_local(tmp_path, data: bytes) -> str:  # type: ignore[no-untyped-def]
    """A hydrating cache whose first unit (and its read-ahead) is local, closed."""
    path = str(tmp_path / "cache")
    disk = LazyDisk.open(path, InstantSource(data), unit=UNIT, autocommit_s=None)
    assert disk.read(0, UNIT) == data[:UNIT]
    disk.close()
    return path


def _awaiting(path: str) -> LazyDisk:
    return LazyDisk.open(path, None, autocommit_s=None, awaiting_source=WHY)


def test_local_units_are_served_and_misses_are_unreachable_until_attached(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = _data()
    disk = _awaiting(_half_local(tmp_path, data))
    try:
        assert disk.awaiting_source == WHY and disk.source is None
        local = disk.local_bytes  # the first read's unit and its read-ahead
        assert disk.read(0, UNIT) == data[:UNIT]
        with pytest.raises(SourceUnreachable, match="Connection refused"):  # NOT READY, not MEDIUM ERROR
            disk.read(MiB, UNIT)
        job = Hydrator(disk, run_size=64 * 1024)
        job.start()
        settle()
        assert job.state is JobState.RUNNING and disk.local_bytes == local  # waiting, not failed
        source = InstantSource(data)
        disk.attach_source(source)
        assert disk.awaiting_source is None and disk.source is source
        assert job.wait(10) and job.state is JobState.COMPLETED
        assert disk.read(MiB, UNIT) == data[MiB:MiB + UNIT]
    finally:
        disk.close()
    assert (tmp_path / "cache").read_bytes() == data


def test_another_disk_is_never_attached(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = _data()
    disk = _awaiting(_half_local(tmp_path, data))
    try:
        job = Hydrator(disk, run_size=64 * 1024)
        job.start()
        settle()
        other = InstantSource(_data(seed=99))  # same size, another VM's disk
        with pytest.raises(SourceMismatch, match="refusing to mix two disks"):
            disk.attach_source(other)
        assert other.closed and other.reads == 0 and disk.source is None
        assert disk.source_changed is not None and disk.awaiting_source is None
        with pytest.raises(SourceChangedError):  # MEDIUM ERROR: lost for good
            disk.read(MiB, UNIT)
        assert disk.read(0, UNIT) == data[:UNIT]
        assert job.wait(10) and job.state is JobState.FAILED
        # the right disk afterwards changes nothing: the state is permanent
        right = InstantSource(data)
        with pytest.raises(StoreError):
            disk.attach_source(right)
        assert right.closed and disk.source is None
    finally:
        disk.close()


def test_a_paused_job_stays_paused_until_resumed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The record says paused: the job is paused before it ever ran; another disk found then
    must not fail it from ``paused`` (no such transition), only once it is resumed."""
    data = _data()
    disk = _awaiting(_half_local(tmp_path, data))
    try:
        job = Hydrator(disk, run_size=64 * 1024)
        job.start()
        job.pause()
        with pytest.raises(SourceMismatch):
            disk.attach_source(InstantSource(_data(seed=99)))
        settle()
        assert job.state is JobState.PAUSED
        job.resume()
        assert job.wait(10) and job.state is JobState.FAILED
    finally:
        disk.close()


def test_a_paused_job_does_not_copy_from_the_attached_source_until_resumed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = _data()
    disk = _awaiting(_half_local(tmp_path, data))
    try:
        job = Hydrator(disk, run_size=64 * 1024)
        job.start()
        job.pause()
        source = InstantSource(data)
        disk.attach_source(source)
        settle()
        assert job.state is JobState.PAUSED and source.reads == 0
        job.resume()
        assert job.wait(10) and job.state is JobState.COMPLETED
    finally:
        disk.close()
    assert (tmp_path / "cache").read_bytes() == data


def test_refused_where_nothing_could_be_served_or_checked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CacheConfigError, match="no cache here yet"):
        LazyDisk.open(str(tmp_path / "new"), None, awaiting_source=WHY)
    live = str(tmp_path / "live")
    LazyDisk.open(live, LiveSource(_data()), unit=UNIT, live=True, autocommit_s=None).close()
    with pytest.raises(CacheConfigError, match="before its cutover"):
        LazyDisk.open(live, None, awaiting_source=WHY)


def test_a_closed_disk_takes_no_source(tmp_path) -> None:  # type: ignore[no-untyped-def]
    disk = _awaiting(_half_local(tmp_path, _data()))
    disk.close()
    source = InstantSource(_data())
    with pytest.raises(StoreError, match="not waiting"):
        disk.attach_source(source)
    assert source.closed
