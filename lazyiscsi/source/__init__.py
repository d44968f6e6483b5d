"""Source clients, one module per scheme; ``open_source`` picks one from the URL."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from lazyiscsi.source.base import (
    DEFAULT_REQUEST_DEADLINE,
    DirtyRun,
    DirtyTracking,
    Extent,
    Priority,
    Source,
    SourceChanged,
    SourceConfigError,
    SourceError,
    SourceNotFound,
    SourceProtocolError,
    SourceReadError,
    SourceUnavailable,
    SourceUnreachable,
    deadline_for,
)
from lazyiscsi.source.url import redact

__all__ = [
    "DEFAULT_REQUEST_DEADLINE",
    "DirtyRun",
    "DirtyTracking",
    "Extent",
    "Priority",
    "Source",
    "SourceChanged",
    "SourceConfigError",
    "SourceError",
    "SourceNotFound",
    "SourceProtocolError",
    "SourceReadError",
    "SourceUnavailable",
    "SourceUnreachable",
    "content_fingerprint",
    "deadline_for",
    "open_source",
    "redact",
]


#: what an operator's source id may hold: it is stored in the superblock and shown in errors
_SOURCE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def open_source(url: str, *, timeout: float = 30.0, deadline: float = DEFAULT_REQUEST_DEADLINE,
                source_id: str | None = None, dirty_bitmap: str | None = None,
                live: bool = False) -> Source:
    """Open the source named by ``url``: connect, learn its size and identity.

    ``timeout`` bounds how long opening keeps trying to reach the source; ``deadline`` is each
    request's (``base.DEFAULT_REQUEST_DEADLINE``; ``deadline_for(io_timeout)`` fits a store's
    I/O timeout). ``source_id``, an operator's name for the disk (its UUID, say), becomes part
    of the identity a cache is bound to. Raises ``SourceConfigError`` for a URL no client
    accepts, and the client's own ``SourceError`` when the source cannot be used.

    ``live``: the source is still in use (a running VM's disk, issue 11). Its identity then
    names the disk without sampling its content (which changes meanwhile); call
    ``content_fingerprint`` at the cutover. NBD and file sources can be live; an HTTP object
    cannot (its validator, checked on every read, changes with every write).
    ``dirty_bitmap``: the NBD export's dirty bitmap of that name; the source is then also a
    ``DirtyTracking`` (``dirty_runs``), or opening fails with ``SourceNotFound`` when the export
    does not offer it. Only NBD carries dirty bitmaps.
    """
    if source_id is not None and not _SOURCE_ID.fullmatch(source_id):
        raise SourceConfigError(f"source id {source_id!r}: use 1-128 of A-Z a-z 0-9 . _ : - "
                                "(a disk UUID, a VM name)")
    if not deadline > 0:
        raise SourceConfigError(f"request deadline {deadline!r}: must be a positive number of seconds")
    scheme = urlsplit(url).scheme.lower() if "://" in url else "file"
    if dirty_bitmap is not None and scheme not in ("nbd", "nbd+unix"):
        raise SourceConfigError(f"dirty bitmap {dirty_bitmap[:40]!r} with source {redact(url)!r}: "
                                "dirty bitmaps need an nbd:// source (an NBD export with the "
                                "qemu:dirty-bitmap meta context)")
    if scheme in ("nbd", "nbd+unix"):
        from lazyiscsi.source.nbd import open_nbd

        return open_nbd(url, timeout=timeout, deadline=deadline, source_id=source_id,
                        dirty_bitmap=dirty_bitmap, live=live)
    if scheme in ("http", "https"):
        if live:
            raise SourceConfigError(f"source {redact(url)!r}: a live source must be nbd:// or a file: an "
                                    "HTTP object cannot be read while it changes (its validator changes "
                                    "with every write and every read would fail)")
        from lazyiscsi.source.http import open_http

        return open_http(url, timeout=timeout, deadline=deadline, source_id=source_id)
    if scheme == "file":
        from lazyiscsi.source.file import open_file

        return open_file(url, source_id=source_id, live=live)
    raise SourceConfigError(f"source URL {redact(url)!r}: unknown scheme {scheme!r} "
                            "(expected nbd, nbd+unix, http, https, file or a path)")


def content_fingerprint(source: Source) -> str:
    """Pin a live source's identity to its content, at the cutover (issue 11).

    A live open (``open_source(..., live=True)``) identifies the disk by name and size only: its
    bytes change while the VM runs, so samples taken then would not match the same disk a minute
    later. Once the source VM has stopped, the content is final: this samples it now, makes the
    result the source's ``identity`` (and, for a file, re-arms the per-read change check), and
    returns it; it equals the identity a frozen open of the same disk computes, so a cache bound
    to it resumes later with a plain ``open_source`` (without ``live``). Raises the client's
    ``SourceError`` when the source cannot be read, and ``SourceConfigError`` for a client that
    cannot be live.
    """
    pin = getattr(source, "content_fingerprint", None)
    if pin is None:
        raise SourceConfigError(f"source {source.url!r}: not a source that can be live (nbd:// or a file)")
    result: str = pin()
    return result
