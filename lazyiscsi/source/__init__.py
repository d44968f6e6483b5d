"""Source clients, one module per scheme; ``open_source`` picks one from the URL."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from lazyiscsi.source.base import (
    DEFAULT_REQUEST_DEADLINE,
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
    sample_ranges,
)
from lazyiscsi.source.url import redact

__all__ = [
    "DEFAULT_REQUEST_DEADLINE",
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
    """
    if dirty_bitmap is not None:  # interim, until the NBD meta-context client (branch nbdmeta)
        raise SourceConfigError(f"dirty bitmap {dirty_bitmap!r}: this build cannot read dirty bitmaps yet")
    if source_id is not None and not _SOURCE_ID.fullmatch(source_id):
        raise SourceConfigError(f"source id {source_id!r}: use 1-128 of A-Z a-z 0-9 . _ : - "
                                "(a disk UUID, a VM name)")
    if not deadline > 0:
        raise SourceConfigError(f"request deadline {deadline!r}: must be a positive number of seconds")
    scheme = urlsplit(url).scheme.lower() if "://" in url else "file"
    if scheme in ("nbd", "nbd+unix"):
        from lazyiscsi.source.nbd import open_nbd

        return open_nbd(url, timeout=timeout, deadline=deadline, source_id=source_id)
    if scheme in ("http", "https"):
        from lazyiscsi.source.http import open_http

        return open_http(url, timeout=timeout, deadline=deadline, source_id=source_id)
    if scheme == "file":
        from lazyiscsi.source.file import open_file

        return open_file(url, source_id=source_id)
    raise SourceConfigError(f"source URL {redact(url)!r}: unknown scheme {scheme!r} "
                            "(expected nbd, nbd+unix, http, https, file or a path)")


def content_fingerprint(source: Source) -> str:
    """Pin a live source's identity at the cutover. Interim, until branch nbdmeta's: the
    samples are read (a source that cannot be reached refuses the cutover), the identity is
    the one the source was opened with."""
    for offset, length in sample_ranges(source.size):
        source.read(offset, length)
    return source.identity
