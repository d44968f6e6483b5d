"""Sizes as an operator types them (``64K``, ``1MiB``, ``100MB``): the CLI's options and the
targetcli plugin's ``rate`` take the same spelling."""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(text: str) -> int:
    """``4096``, ``4K``/``4KiB`` (binary), ``4KB`` (decimal). Raises ValueError with the reason."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 64K, 1MiB, 100MB)")
    number, prefix, suffix = m.group(1), m.group(2).lower(), m.group(3).lower()
    base = 1000 if suffix == "b" and prefix else 1024
    value = float(number) * base ** _POWERS[prefix]
    if value != int(value):
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)
