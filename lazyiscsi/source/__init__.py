"""Source clients, one module per scheme; ``open_source`` picks one from the URL."""

from __future__ import annotations

from urllib.parse import urlsplit

from lazyiscsi.source.base import (
    Extent,
    Priority,
    Source,
    SourceConfigError,
    SourceError,
    SourceNotFound,
    SourceProtocolError,
    SourceReadError,
    SourceUnavailable,
)
from lazyiscsi.source.url import redact

__all__ = [
    "Extent",
    "Priority",
    "Source",
    "SourceConfigError",
    "SourceError",
    "SourceNotFound",
    "SourceProtocolError",
    "SourceReadError",
    "SourceUnavailable",
    "open_source",
    "redact",
]


def open_source(url: str, *, timeout: float = 30.0) -> Source:
    """Open the source named by ``url``: connect, learn its size and identity.

    ``timeout`` bounds each connection attempt at open. Raises ``SourceConfigError`` for a URL
    no client accepts, and the client's own ``SourceError`` when the source cannot be used.
    """
    scheme = urlsplit(url).scheme.lower() if "://" in url else "file"
    if scheme in ("nbd", "nbd+unix"):
        from lazyiscsi.source.nbd import open_nbd

        return open_nbd(url, timeout=timeout)
    if scheme in ("http", "https"):
        from lazyiscsi.source.http import open_http

        return open_http(url, timeout=timeout)
    if scheme == "file":
        from lazyiscsi.source.file import open_file

        return open_file(url)
    raise SourceConfigError(f"source URL {redact(url)!r}: unknown scheme {scheme!r} "
                            "(expected nbd, nbd+unix, http, https, file or a path)")
