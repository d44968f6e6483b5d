"""Prints the Debian mirror this host's apt fetches SUITE from, so that the guest is built from
the same mirror as the host's own packages (no mirror host is written into the project).

    apt_mirror.py SUITE [ROOT]

Reads ``ROOT/etc/apt/sources.list`` and ``ROOT/etc/apt/sources.list.d/*.list`` (one-line
format, ``deb [options] URI SUITE COMPONENT...``) and ``*.sources`` (deb822 stanzas with
``Types``, ``URIs``, ``Suites`` and ``Enabled``), as sources.list(5) describes them, in the order
apt reads them. Exit status 1 with one line on stderr when no ``deb`` entry names SUITE.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path


def one_line_entries(text: str) -> Iterator[tuple[str, str]]:
    """(URI, suite) of every ``deb`` line; ``[...]`` options may hold spaces."""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        rest = line[4:].strip()
        if rest.startswith("["):
            rest = rest.partition("]")[2].strip()
        fields = rest.split()
        if len(fields) >= 2:
            yield fields[0], fields[1]


def deb822_entries(text: str) -> Iterator[tuple[str, str]]:
    """(URI, suite) pairs of every enabled ``Types: deb`` stanza; stanzas are separated by blank
    lines, continuation lines start with a space, ``#`` lines are comments."""
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                yield uri, suite


def entries(root: Path) -> Iterator[tuple[str, str]]:
    apt = root / "etc/apt"
    main = apt / "sources.list"
    if main.is_file():
        yield from one_line_entries(main.read_text(errors="replace"))
    for f in sorted((apt / "sources.list.d").glob("*")):
        if f.suffix == ".list":
            yield from one_line_entries(f.read_text(errors="replace"))
        elif f.suffix == ".sources":
            yield from deb822_entries(f.read_text(errors="replace"))


def mirror(suite: str, root: Path = Path("/")) -> str | None:
    return next((uri.rstrip("/") for uri, s in entries(root) if s == suite), None)


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: apt_mirror.py SUITE [ROOT]", file=sys.stderr)
        return 2
    root = Path(argv[1]) if len(argv) == 2 else Path("/")
    found = mirror(argv[0], root)
    if found is None:
        print(f"no 'deb' entry for suite {argv[0]} in {root / 'etc/apt/sources.list'} or sources.list.d/"
              "*.list, *.sources: add the Debian mirror this host should use", file=sys.stderr)
        return 1
    print(found)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
