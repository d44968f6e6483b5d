"""Logging: structlog, one event per line with key=value context.

On a TTY the console renderer (readable); otherwise JSON lines, which journald and log
shippers take as they are. Events name what happened (``cache_opened``, ``source_disconnected``);
the context says where (path, offset, bytes). Secrets never reach an event: sources log only
redacted URLs.
"""

from __future__ import annotations

import logging
import sys

import structlog

LEVELS = ("debug", "info", "warning", "error")


def configure(level: str = "info", *, stream=None) -> None:  # type: ignore[no-untyped-def]
    """Set up structlog for a command. ``level`` is one of ``LEVELS``."""
    stream = stream or sys.stderr
    renderer = (structlog.dev.ConsoleRenderer(colors=False) if stream.isatty()
                else structlog.processors.JSONRenderer(sort_keys=True))
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
