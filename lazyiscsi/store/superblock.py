"""The superblock: what a cache is (size, unit, which source) and how far it is.

Kept as a small JSON file beside the cache (``<cache>.meta``), replaced atomically: a temp
file created exclusively, fsync'd, renamed over the old one, then the directory fsync'd
(rtslib's ``save_to_file`` pattern plus the directory sync it omits), so a crash leaves either
the old or the new superblock, never a mix.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
from dataclasses import asdict, dataclass, replace

from lazyiscsi.store.errors import CacheConfigError

MAGIC = "lazyiscsi-cache"
#: written for a cache whose source is frozen; a live cache before its cutover is written as
#: ``LIVE_VERSION``, which a lazyiscsi that knows no phases refuses instead of serving
#: writes over a source still in use
VERSION = 1
LIVE_VERSION = 2


class CacheState(enum.Enum):
    HYDRATING = "hydrating"  # some units still live only at the source
    COMPLETE = "complete"  # every unit is local; the source is no longer needed
    DETACHED = "detached"  # the source was let go (possibly forced before completion)


class Phase(enum.Enum):
    """Where a live migration stands (DESIGN "Live migration: phases of a volume"). A cache of a
    frozen source is post-copy from the start; ``complete`` is the cache's state, not a phase."""

    PRE_COPY = "pre-copy"  # the source is in use: writes refused, nothing read may be trusted later
    CUTOVER = "cutover"  # begun and not finished (a crash): writes refused until it is redone
    POST_COPY = "post-copy"  # the source is frozen: writes land, the copy finishes


@dataclass(frozen=True)
class Superblock:
    size: int
    unit: int
    source_url: str  # redacted: never holds a password
    #: what the cache is bound to (``Source.identity``): the client's fingerprint, and the
    #: operator's ``--source-id`` when one was given (``:id=...``). Checked only while
    #: hydrating: a complete or detached cache never asks its source (``needs_source``).
    source_identity: str
    state: CacheState
    phase: Phase = Phase.POST_COPY
    #: set at cutover (acceptance 3 of issue 11): the final dirty set, and the bytes neither dirty
    #: nor copied yet; what post-copy fetches is at most their sum
    dirty_at_cutover: int | None = None
    not_reached: int | None = None
    #: bytes fetched after the cutover, as of the last clean close (a crash loses some)
    fetched_after_cutover: int | None = None

    def with_state(self, state: CacheState) -> Superblock:
        return replace(self, state=state)

    def to_json(self) -> str:
        d = asdict(self)
        d["state"] = self.state.value
        d["phase"] = self.phase.value
        version = VERSION if self.phase is Phase.POST_COPY else LIVE_VERSION
        return json.dumps({"magic": MAGIC, "version": version, **d}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Superblock:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise CacheConfigError(f"{where}: not a lazyiscsi superblock ({e})") from None
        if not isinstance(d, dict) or d.get("magic") != MAGIC:
            raise CacheConfigError(f"{where}: not a lazyiscsi superblock (bad magic)")
        if d.get("version") not in (VERSION, LIVE_VERSION):
            raise CacheConfigError(f"{where}: superblock version {d.get('version')!r} is not supported "
                                   f"(this lazyiscsi reads versions {VERSION} and {LIVE_VERSION})")
        try:
            sb = cls(size=int(d["size"]), unit=int(d["unit"]), source_url=str(d["source_url"]),
                     source_identity=str(d["source_identity"]), state=CacheState(d["state"]),
                     phase=Phase(d.get("phase", Phase.POST_COPY.value)),
                     dirty_at_cutover=_opt_int(d.get("dirty_at_cutover")),
                     not_reached=_opt_int(d.get("not_reached")),
                     fetched_after_cutover=_opt_int(d.get("fetched_after_cutover")))
        except (KeyError, ValueError, TypeError) as e:
            raise CacheConfigError(f"{where}: damaged superblock field {e}") from None
        if sb.size <= 0 or sb.unit < 512 or sb.unit & (sb.unit - 1):
            raise CacheConfigError(f"{where}: damaged superblock (size {sb.size}, unit {sb.unit})")
        return sb


def _opt_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def read_superblock(path: str) -> Superblock | None:
    """The superblock at ``path``, or None if there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            return Superblock.from_json(f.read(), path)
    except FileNotFoundError:
        return None


def write_superblock(path: str, sb: Superblock) -> None:
    """Replace the superblock atomically and durably (see the module docstring)."""
    tmp = f"{path}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by a crash during an earlier write
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, sb.to_json().encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def needs_source(cache_path: str) -> bool:
    """Whether opening the cache at ``cache_path`` needs its source: only a hydrating cache (or
    one not made yet) does. A complete or detached one opens and serves without it, with no
    identity check against a source that may be gone: after cutover the source site may be
    decommissioned, which is the point of the migration."""
    sb = read_superblock(f"{cache_path}.meta")
    return sb is None or sb.state is CacheState.HYDRATING


def opens_live(cache_path: str, live: bool) -> bool:
    """Whether the source of the cache at ``cache_path`` must be opened as a live one (its
    identity not sampled from content that still changes): before the cache's cutover, or,
    for a cache not made yet, when ``live`` asks for one. The superblock decides for an
    existing cache: a restart during pre-copy stays live whatever the configuration says."""
    sb = read_superblock(f"{cache_path}.meta")
    return live if sb is None else sb.phase is not Phase.POST_COPY


def can_await_source(cache_path: str) -> bool:
    """Whether the cache at ``cache_path`` may open without its source and wait for it
    (``LazyDisk.open(awaiting_source=...)``): a hydrating cache after its cutover, or of a
    frozen source. Not one that is not made yet (nothing local to serve), nor one before its
    cutover (``LazyDisk.attach_source`` says why)."""
    sb = read_superblock(f"{cache_path}.meta")
    return sb is not None and sb.state is CacheState.HYDRATING and sb.phase is Phase.POST_COPY
