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
VERSION = 1


class CacheState(enum.Enum):
    HYDRATING = "hydrating"  # some units still live only at the source
    COMPLETE = "complete"  # every unit is local; the source is no longer needed
    DETACHED = "detached"  # the source was let go (possibly forced before completion)


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

    def with_state(self, state: CacheState) -> Superblock:
        return replace(self, state=state)

    def to_json(self) -> str:
        d = asdict(self)
        d["state"] = self.state.value
        return json.dumps({"magic": MAGIC, "version": VERSION, **d}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Superblock:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise CacheConfigError(f"{where}: not a lazyiscsi superblock ({e})") from None
        if not isinstance(d, dict) or d.get("magic") != MAGIC:
            raise CacheConfigError(f"{where}: not a lazyiscsi superblock (bad magic)")
        if d.get("version") != VERSION:
            raise CacheConfigError(f"{where}: superblock version {d.get('version')!r} is not supported "
                                   f"(this lazyiscsi reads version {VERSION})")
        try:
            sb = cls(size=int(d["size"]), unit=int(d["unit"]), source_url=str(d["source_url"]),
                     source_identity=str(d["source_identity"]), state=CacheState(d["state"]))
        except (KeyError, ValueError, TypeError) as e:
            raise CacheConfigError(f"{where}: damaged superblock field {e}") from None
        if sb.size <= 0 or sb.unit < 512 or sb.unit & (sb.unit - 1):
            raise CacheConfigError(f"{where}: damaged superblock (size {sb.size}, unit {sb.unit})")
        return sb


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
