"""The volumes a running ``serve`` manages: opened, exported, copied, paused, verified, deleted.

Volumes created at runtime persist in the state directory (``volumes.json``, mode 0600: source
URLs may hold credentials) and come back when ``serve`` restarts; the copy resumes from the
cache's own map. Volumes from ``--config`` are served the same way but belong to that file.
Each runtime volume is a target of its own, ``<iqn prefix>:<name>``, LUN 0.

A restart must not take a guest's disk away because the WAN is down: a hydrating volume whose
source cannot be opened at start (refused, timed out, silent) is opened from its cache without it
and exported (``LazyDisk.open(awaiting_source=...)``), as a running volume keeps serving through
an outage: local units are read, missing ones fail NOT READY, ``status`` shows the reason.
``_reattach`` opens the source again with capped exponential backoff and attaches it, under the
store's identity rule; a source that comes back (or was at start) as another disk leaves the
volume ``source_changed``, serving what is local, never mixing two disks. A live volume before
its cutover is still left unopened, as before: every read it serves passes through to the source
or is trusted only with the source's dirty bitmap, and its VM still runs at the source site, so
an export that could only answer NOT READY would give nobody anything, and ``LazyDisk.open``
could not check a reopened live source against anything local.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import gevent
import structlog

from lazyiscsi.config import MAX_UNIT, MIN_UNIT, VOLUME_NAME, VolumeConfig, live_problem
from lazyiscsi.frontend import Frontend, FrontendError
from lazyiscsi.scsi.lun import Lun
from lazyiscsi.source import content_fingerprint, deadline_for, open_source
from lazyiscsi.source.base import Source, SourceError
from lazyiscsi.source.url import check as check_url
from lazyiscsi.source.url import redact
from lazyiscsi.store.errors import SourceMismatch, StoreError
from lazyiscsi.store.hydrator import DEFAULT_RUN, Hydrator, JobState, JobVerbError
from lazyiscsi.store.lazydisk import DEFAULT_IO_TIMEOUT, LazyDisk
from lazyiscsi.store.superblock import Phase, can_await_source, needs_source, opens_live
from lazyiscsi.store.verify import verify

log = structlog.get_logger("lazyiscsi.daemon")

NAME = VOLUME_NAME
STATE_FILE = "volumes.json"
#: the files of a cache at PATH: PATH itself, then those the store keeps beside it
CACHE_FILES = ("", ".meta", ".map", ".written", ".boot")
#: ``systemctl status`` shows one line: name this many volumes, count the rest
STATUS_VOLUMES = 8
#: The first retry of a source that could not be opened at start, after this many seconds;
#: each failure doubles the wait. A source site that reboots is back within minutes, and the
#: first retries should catch a short blip at once.
REATTACH_FIRST_S = 0.5
#: ... up to this: one connection attempt (at most the connect timeout) per half minute is
#: nothing to a source that is down, and a source that returns waits at most this long (plus
#: its open) before the copy resumes.
REATTACH_MAX_S = 30.0


class VolumeError(Exception):
    """A request the manager refuses; the message names what was wrong (one line)."""


@dataclass
class VolumeRecord:
    """A volume as configured, plus what the operator changed at runtime; runtime volumes are
    persisted as this."""

    volume: VolumeConfig
    paused: bool = False
    detached: bool = False  # the source is let go: never opened again
    static: bool = False  # from --config: not persisted, not deletable here

    def to_json(self) -> dict[str, Any]:
        volume = asdict(self.volume)
        volume.pop("chap")  # runtime volumes have none; static ones are never saved
        return {"volume": volume, "paused": self.paused, "detached": self.detached}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VolumeRecord:
        volume = dict(data["volume"])
        volume["allowed_initiators"] = tuple(volume.get("allowed_initiators", ()))
        return cls(VolumeConfig(**volume), paused=bool(data.get("paused")),
                   detached=bool(data.get("detached")))


@dataclass
class Volume:
    record: VolumeRecord
    disk: LazyDisk
    job: Hydrator
    lun: Lun
    verifying: bool = False
    #: how far a running verify has compared (bytes, in LUN order), from the moment its source is
    #: open; None: no verify is comparing
    verify_offset: int | None = None
    #: why the source is not attached (opened at start without it; ``_reattach`` retries), or None
    source_error: str | None = None
    reattach: gevent.Greenlet | None = None


class VolumeManager:
    def __init__(self, state_dir: str, frontend: Frontend, *, iqn_prefix: str,
                 connect_timeout: float, io_timeout: float = DEFAULT_IO_TIMEOUT) -> None:
        self.state_dir = Path(state_dir)
        self.io_timeout = io_timeout
        self.frontend = frontend
        self.iqn_prefix = iqn_prefix
        self.connect_timeout = connect_timeout
        self.volumes: dict[str, Volume] = {}
        #: names of creates in progress: a create yields while its source opens, and a second
        #: one of the same name must not take (or, failing, remove) the first one's cache files
        self._creating: set[str] = set()
        #: persisted volumes that could not be opened at this start: not served, still saved
        self._unopened: dict[str, VolumeRecord] = {}

    # -- lifecycle ------------------------------------------------------------------------

    def restore(self) -> None:
        """Bring back every persisted volume; one that cannot open is logged and kept on record."""
        path = self.state_dir / STATE_FILE
        if not path.exists():
            return
        try:
            records = [VolumeRecord.from_json(r) for r in json.loads(path.read_text())]
        except (ValueError, TypeError, KeyError) as e:
            raise VolumeError(f"{path}: not a volume list ({e})") from None
        # all at once: the portal listens only after this, and sources that are down must
        # cost one connect timeout in all, not one each
        gevent.joinall([gevent.spawn(self._restore, record) for record in records])
        order = {r.volume.name: i for i, r in enumerate(records)}  # static volumes first, then as saved
        self.volumes = dict(sorted(self.volumes.items(), key=lambda item: order.get(item[0], -1)))

    def _restore(self, record: VolumeRecord) -> None:
        try:
            self._open(record, at_start=True)
        except VolumeError as e:
            # kept on record (saved again with the others) for the next start to retry
            self._unopened[record.volume.name] = record
            log.error("volume_restore_failed", volume=record.volume.name, error=str(e))

    def add_static(self, volume: VolumeConfig) -> Volume:
        return self._open(VolumeRecord(volume, static=True), at_start=True)

    def close(self) -> None:
        """At the daemon's stop, after the frontend's: the volumes stay exported where the
        frontend keeps them (LIO), their disks close."""
        for vol in list(self.volumes.values()):
            self._stop(vol)

    # -- verbs ------------------------------------------------------------------------------

    def create(self, name: str, source: str, *, unit: int | None = None, rate: int = 0, live: bool = False,
               dirty_bitmap: str | None = None, backstore_only: bool = False,
               source_id: str | None = None) -> dict[str, Any]:
        """Open, export and persist a new volume; or, refused or failed, leave nothing behind:
        no volume, no export, no cache file it made, no record, the cache's lock released."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise VolumeError(f"volume name {name!r}: use 1-64 of A-Z a-z 0-9 _ . - "
                              "(not starting with _ . -)")
        if not isinstance(source, str):
            raise VolumeError(f"volume {name}: source: must be a URL or a path")
        try:
            check_url(source)
        except ValueError as e:
            raise VolumeError(f"volume {name}: source: {e}") from None
        if unit is not None and (isinstance(unit, bool) or not isinstance(unit, int) or unit & (unit - 1)
                                 or not MIN_UNIT <= unit <= MAX_UNIT):
            raise VolumeError(f"volume {name}: unit {unit!r}: must be a power of two from {MIN_UNIT} to "
                              f"{MAX_UNIT} (the background copy moves runs of {DEFAULT_RUN} bytes)")
        if isinstance(rate, bool) or not isinstance(rate, int) or rate < 0:
            raise VolumeError(f"volume {name}: rate {rate!r}: must be a whole number of bytes/s, >= 0")
        problem = live_problem(source, live, dirty_bitmap)
        if problem is not None:
            raise VolumeError(f"volume {name}: {problem}")
        if source_id is not None and (not source_id or not source_id.isprintable()):
            raise VolumeError(f"volume {name}: source id {source_id!r}: a non-empty printable string")
        if name in self.volumes or name in self._creating or name in self._unopened:
            raise VolumeError(f"volume {name} exists")
        self._creating.add(name)
        try:
            return self._create(name, source, unit, rate, live, dirty_bitmap, backstore_only, source_id)
        finally:
            self._creating.discard(name)

    def _create(self, name: str, source: str, unit: int | None, rate: int, live: bool,
                dirty_bitmap: str | None, backstore_only: bool, source_id: str | None) -> dict[str, Any]:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise VolumeError(f"volume {name}: state directory {self.state_dir}: {e.strerror}") from None
        cache = str(self.state_dir / f"{name}.cache")
        # a backstore_only volume's target is the operator's, made with targetcli
        target = "" if backstore_only else f"{self.iqn_prefix}:{name}"
        record = VolumeRecord(VolumeConfig(name=name, source=source, cache=cache, target=target, unit=unit,
                                           rate=rate, live=live, dirty_bitmap=dirty_bitmap,
                                           backstore_only=backstore_only, source_id=source_id))
        made = [cache + suffix for suffix in CACHE_FILES if not os.path.lexists(cache + suffix)]
        try:
            vol = self._open(record)
            try:
                self._save()
            except OSError as e:
                self._drop(vol)
                raise VolumeError(f"volume {name}: cannot save {self.state_dir / STATE_FILE} "
                                  f"({e.strerror}); nothing was created") from None
        except BaseException:
            for path in made:  # what this request created, and only that
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise
        log.info("volume_created", volume=name, source=redact(source), target=record.volume.target or None,
                 size=vol.disk.size, phase=vol.disk.phase.value, dirty_bitmap=dirty_bitmap,
                 backstore_only=backstore_only)
        return self._status(vol)

    def delete(self, name: str) -> None:
        unopened = self._unopened.get(name)
        vol = None if unopened is not None else self._get(name)
        record = unopened or vol.record  # type: ignore[union-attr]
        if record.static:
            raise VolumeError(f"volume {name} comes from the config file: remove it there")
        try:
            self.frontend.unexport(record.volume)  # LIO may still hold it from the last run
        except FrontendError as e:
            raise VolumeError(str(e)) from None
        if vol is not None:
            self._stop(vol)
            del self.volumes[name]
        self._unopened.pop(name, None)
        self._save()
        for suffix in CACHE_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(record.volume.cache + suffix)
        log.info("volume_deleted", volume=name)

    def status_line(self) -> str:
        """One line for ``systemctl status`` (sd_notify ``STATUS=``): each volume's state and
        how much of it is local."""
        if not self.volumes:
            return "no volumes"
        shown = []
        for vol in list(self.volumes.values())[:STATUS_VOLUMES]:
            s = self._status(vol)
            phase = "" if s["phase"] in ("post-copy", "complete") else f" {s['phase']}"
            shown.append(f"{s['volume']} {s['state']}{phase} {s['percent']:.1f}%")
        more = len(self.volumes) - len(shown)
        return f"{len(self.volumes)} volume(s): " + ", ".join(shown) + (f", +{more} more" if more else "")

    def list(self) -> list[dict[str, Any]]:
        return [self._status(v) for v in self.volumes.values()] + [
            _unopened_status(r) for r in self._unopened.values()]

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        if name in self._unopened:
            return [_unopened_status(self._unopened[name])]
        return [self._status(self._get(name))] if name else self.list()

    def pause(self, name: str) -> dict[str, Any]:
        vol = self._get(name)
        self._verb(vol, vol.job.pause)
        vol.record.paused = True
        self._save()
        return self._status(vol)

    def resume(self, name: str) -> dict[str, Any]:
        vol = self._get(name)
        self._verb(vol, vol.job.resume)
        vol.record.paused = False
        self._save()
        return self._status(vol)

    def rate(self, name: str, rate: int) -> dict[str, Any]:
        vol = self._get(name)
        if rate < 0:
            raise VolumeError(f"rate {rate}: must not be negative (0: no limit)")
        if vol.job.state in (JobState.RUNNING, JobState.PAUSED, JobState.CREATED):
            self._verb(vol, lambda: vol.job.set_rate(rate or None))
        vol.record.volume = replace(vol.record.volume, rate=rate)
        self._save()
        return self._status(vol)

    def cutover(self, name: str) -> dict[str, Any]:
        """The source VM has stopped: make the live volume writable (``LazyDisk.cutover``). A
        refusal changes nothing and says why in one line."""
        vol = self._get(name)
        try:
            vol.disk.cutover(content_fingerprint)
        except StoreError as e:
            raise VolumeError(f"volume {name}: {e}") from None
        return self._status(vol)

    def detach(self, name: str, *, force: bool = False) -> dict[str, Any]:
        vol = self._get(name)
        self._refuse_before_cutover(vol, "detach")
        missing = vol.disk.size - vol.disk.local_bytes
        if missing and not force:
            raise VolumeError(f"volume {name}: {missing} bytes are still only at the source; detaching "
                              "would make them unreadable for good (--force to accept that)")
        self._stop_reattach(vol)
        if vol.job.state in (JobState.RUNNING, JobState.PAUSED):
            vol.job.cancel()
        try:
            vol.disk.detach(force=force)
        except StoreError as e:
            raise VolumeError(str(e)) from None
        vol.record.detached = True
        self._save()
        event = log.warning if missing else log.info
        event("volume_detached", volume=name, missing_bytes=missing, forced=force)
        return self._status(vol)

    def verify(self, name: str) -> dict[str, Any]:
        """Compare every local unit the guest has not written with the source (a connection of
        its own, background priority)."""
        vol = self._get(name)
        if vol.record.detached:
            raise VolumeError(f"volume {name} is detached: there is no source to compare with")
        self._refuse_before_cutover(vol, "verify")
        if vol.verifying:
            raise VolumeError(f"volume {name}: a verify is already running")
        cfg = vol.record.volume
        vol.verifying = True  # before the open yields: a second verify is refused meanwhile
        try:
            source = open_source(cfg.source, timeout=self.connect_timeout, source_id=cfg.source_id,
                                 deadline=deadline_for(self.io_timeout))
        except SourceError as e:
            vol.verifying = False
            raise VolumeError(f"volume {name}: source: {e}") from None
        log.info("verify_started", volume=name)
        vol.verify_offset = 0

        def progress(done: int, _total: int) -> None:
            vol.verify_offset = done

        try:
            report = verify(vol.disk, source, progress=progress)
        except (SourceError, StoreError) as e:
            log.warning("verify_stopped", volume=name, offset=vol.verify_offset, error=str(e))
            raise VolumeError(f"volume {name}: verify stopped: {e}") from None
        finally:
            vol.verifying, vol.verify_offset = False, None
            source.close()
        result = {"volume": name, "compared_bytes": report.compared,
                  "skipped_written_bytes": report.skipped_written,
                  "skipped_missing_bytes": report.skipped_missing,
                  "mismatches": [{"offset": o, "length": n} for o, n in report.mismatches]}
        event = log.error if report.mismatches else log.info
        event("verify_finished", volume=name, compared_bytes=report.compared,
              mismatched_ranges=len(report.mismatches))
        return result

    # -- internals ------------------------------------------------------------------------

    def _get(self, name: str | None) -> Volume:
        vol = self.volumes.get(name or "")
        if vol is None:
            raise VolumeError(f"no volume {name!r}")
        return vol

    @staticmethod
    def _refuse_before_cutover(vol: Volume, verb: str) -> None:
        """Verbs that assume a frozen source: before the cutover it still changes."""
        if vol.disk.phase is not Phase.POST_COPY:
            raise VolumeError(f"volume {vol.record.volume.name}: cannot {verb} before its cutover "
                              f"(phase {vol.disk.phase.value}): the source is still in use")

    @staticmethod
    def _verb(vol: Volume, call: Any) -> None:
        try:
            call()
        except JobVerbError as e:
            raise VolumeError(f"volume {vol.record.volume.name}: {e}") from None

    def _open_source(self, cfg: VolumeConfig, live: bool) -> Source:
        return open_source(cfg.source, timeout=self.connect_timeout, source_id=cfg.source_id,
                           deadline=deadline_for(self.io_timeout), live=live,
                           dirty_bitmap=cfg.dirty_bitmap if live else None)

    def _open(self, record: VolumeRecord, *, at_start: bool = False) -> Volume:
        """Open, export and start a volume; on any failure, undo every step already taken (the
        disk closed, which releases its lock and source; the export withdrawn).

        ``at_start`` (a restart: persisted and configured volumes): a hydrating cache that
        ``can_await_source`` opens even when its source cannot be opened, or is another disk
        (module docstring); a create still needs its source."""
        cfg = record.volume
        if cfg.name in self.volumes:  # a runtime volume named like one of the config file
            raise VolumeError(f"volume {cfg.name} exists")
        try:
            # open by state: a complete or detached cache serves without its source
            wanted = not record.detached and needs_source(cfg.cache)
            # by phase: before its cutover a source is live, and only then its bitmap is read
            live = opens_live(cfg.cache, cfg.live)
            may_wait = at_start and wanted and can_await_source(cfg.cache)
        except StoreError as e:
            raise VolumeError(f"volume {cfg.name}: {e}") from None
        source, unreachable = None, None
        try:
            source = self._open_source(cfg, live) if wanted else None
        except SourceError as e:
            if not may_wait:
                raise VolumeError(f"volume {cfg.name}: source: {e}") from None
            unreachable = str(e)
        try:
            if may_wait:
                # opened without the source, which is attached at once if it opened: its
                # identity is then checked by ``attach_source``, which keeps a changed source's
                # volume served (source_changed) instead of refusing it
                disk = LazyDisk.open(cfg.cache, None, unit=cfg.unit, io_timeout=self.io_timeout,
                                     awaiting_source=unreachable or "not attached yet")
            else:
                disk = LazyDisk.open(cfg.cache, source, unit=cfg.unit, io_timeout=self.io_timeout,
                                     live=cfg.live)
        except BaseException as e:
            if source is not None:
                source.close()
            if isinstance(e, StoreError):
                raise VolumeError(f"volume {cfg.name}: {e}") from None
            raise
        if may_wait and source is not None:
            with contextlib.suppress(SourceMismatch):  # latched and logged (source_changed)
                disk.attach_source(source)
        with contextlib.ExitStack() as undo:
            undo.callback(disk.close)
            # a cache made elsewhere (hydrate --unit) may have units above the default run
            job = Hydrator(disk, run_size=max(DEFAULT_RUN, disk.unit), rate=cfg.rate or None)
            lun = Lun(disk, cfg.name, block_size=cfg.block_size, number=cfg.lun)
            try:
                self.frontend.export(cfg, lun)
            except FrontendError as e:
                raise VolumeError(str(e)) from None
            undo.callback(self._unexport_quietly, cfg)
            vol = Volume(record, disk, job, lun)
            self.volumes[cfg.name] = vol
            undo.callback(self.volumes.pop, cfg.name, None)
            if not disk.complete and not record.detached:
                job.start()
                undo.callback(self._cancel, job)
                if record.paused:
                    job.pause()
            undo.pop_all()
        if disk.awaiting_source is not None:
            vol.source_error = disk.awaiting_source
            log.warning("volume_source_unreachable", volume=cfg.name, source=redact(cfg.source),
                        error=vol.source_error, local_bytes=disk.local_bytes, size=disk.size,
                        action="serving local data; reads of missing data fail NOT READY until the "
                               "source is back (retried in the background)")
            vol.reattach = gevent.spawn(self._reattach, vol)
        return vol

    def _reattach(self, vol: Volume) -> None:
        """Open the source of a volume opened without it until it opens (``REATTACH_FIRST_S``
        doubling up to ``REATTACH_MAX_S``), then attach it: the copy starts (a paused one stays
        paused). One event when it is attached; a failed attempt only updates ``status``; a
        source that is another disk leaves the store's ``source_changed`` event."""
        cfg = vol.record.volume
        t0, delay, attempts = time.monotonic(), REATTACH_FIRST_S, 0
        while True:
            gevent.sleep(delay)
            delay = min(delay * 2, REATTACH_MAX_S)
            attempts += 1
            try:
                source = self._open_source(cfg, live=False)
            except SourceError as e:
                vol.source_error = str(e)
                continue
            try:
                vol.disk.attach_source(source)
            except SourceMismatch:
                vol.source_error = None  # status says "changed: ..." from now on
                return
            except StoreError as e:  # closed or detached meanwhile: nothing to attach to
                log.info("volume_source_not_attached", volume=cfg.name, reason=str(e))
                return
            vol.source_error = None
            log.info("volume_source_attached", volume=cfg.name, source=redact(cfg.source),
                     attempts=attempts, after_s=round(time.monotonic() - t0, 1),
                     missing_bytes=vol.disk.size - vol.disk.local_bytes, paused=vol.record.paused)
            return

    @staticmethod
    def _stop_reattach(vol: Volume) -> None:
        if vol.reattach is not None:
            vol.reattach.kill()
            vol.reattach = None

    def _drop(self, vol: Volume) -> None:
        """Undo ``_open`` of a volume nobody has seen yet (its record was never saved)."""
        self._unexport_quietly(vol.record.volume)
        self._stop(vol)
        self.volumes.pop(vol.record.volume.name, None)

    def _unexport_quietly(self, cfg: VolumeConfig) -> None:
        try:
            self.frontend.unexport(cfg)
        except FrontendError as e:  # already failing: the first error is the one reported
            log.error("volume_unexport_failed", volume=cfg.name, error=str(e))

    @staticmethod
    def _cancel(job: Hydrator) -> None:
        if job.state in (JobState.RUNNING, JobState.PAUSED):
            job.cancel()

    def _stop(self, vol: Volume) -> None:
        self._stop_reattach(vol)
        self._cancel(vol.job)
        vol.disk.close()

    def _save(self) -> None:
        """Atomically, mode 0600 from the start: the records hold source URLs."""
        records = [v.record.to_json() for v in self.volumes.values() if not v.record.static]
        records += [r.to_json() for r in self._unopened.values()]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / f".{STATE_FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(records, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_dir / STATE_FILE)

    def _status(self, vol: Volume) -> dict[str, Any]:
        cfg = vol.record.volume
        p = vol.job.query()
        st = vol.disk.stats()
        if vol.record.detached:
            state = "detached"
        elif vol.disk.complete:
            state = "complete"
        else:
            state = p.state.value
        return {
            "volume": cfg.name, "source": redact(cfg.source), "target": cfg.target,
            "lun": cfg.lun, "state": state, "size": p.total, "local_bytes": p.current,
            "percent": round(100.0 * p.current / p.total, 2) if p.total else 100.0,
            "rate_bps": round(p.rate), "eta_s": None if p.eta_s is None else round(p.eta_s, 1),
            "rate_limit_bps": cfg.rate or None, "fetched_bytes": p.fetched,
            "inflight_runs": p.inflight_runs, "hot_bytes": p.hot_bytes, "misses": p.misses,
            "miss_p50_ms": p.miss_p50_ms,
            "miss_p99_ms": p.miss_p99_ms, "source_health": _source_health(vol, p.error),
            "static": vol.record.static, "backstore_only": cfg.backstore_only,
            # issue 11: where a live migration stands, and the figures of its acceptance 3
            "phase": "complete" if vol.disk.complete else st.phase.value,
            "live": cfg.live, "dirty_bitmap": cfg.dirty_bitmap,
            "dirty_bytes": st.dirty_bytes,
            "dirty_rate_bps": None if st.dirty_rate_bps is None else round(st.dirty_rate_bps),
            "fetched_after_cutover_bytes": st.fetched_after_cutover,
            "dirty_at_cutover_bytes": st.dirty_at_cutover, "not_reached_bytes": st.not_reached,
            "verify_offset": vol.verify_offset,
        }


def _source_health(vol: Volume, error: str | None) -> str:
    if vol.record.detached:
        return "detached"
    if vol.disk.source_changed is not None:
        # permanent: the copy stopped, units not yet local fail their reads (MEDIUM ERROR)
        return f"changed: {vol.disk.source_changed}"
    if vol.source_error is not None:  # not attached since the start: being retried
        return f"error: {vol.source_error}"
    return f"error: {error}" if error else "ok"


def _unopened_status(record: VolumeRecord) -> dict[str, Any]:
    """A persisted volume this start could not open (its log event says why): not served;
    the next start tries again, ``volume delete`` forgets it."""
    cfg = record.volume
    return {
        "volume": cfg.name, "source": redact(cfg.source), "target": cfg.target, "lun": cfg.lun,
        "state": "unopened", "size": 0, "local_bytes": 0, "percent": 0.0, "rate_bps": 0, "eta_s": None,
        "rate_limit_bps": cfg.rate or None, "fetched_bytes": 0, "inflight_runs": 0, "hot_bytes": 0,
        "misses": 0,
        "miss_p50_ms": None, "miss_p99_ms": None,
        "source_health": "not opened at start (see volume_restore_failed)",
        "static": False, "backstore_only": cfg.backstore_only, "phase": None, "live": cfg.live,
        "dirty_bitmap": cfg.dirty_bitmap,
        "dirty_bytes": None, "dirty_rate_bps": None, "fetched_after_cutover_bytes": None,
        "dirty_at_cutover_bytes": None, "not_reached_bytes": None, "verify_offset": None,
    }
