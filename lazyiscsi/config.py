"""The daemon's TOML configuration: volumes, the targets and LUNs they appear as, ACLs and CHAP.

    [portal]
    listen = "0.0.0.0:3260"

    [[volume]]
    name = "vm1"
    source = "nbd://src.example/vm1"
    cache = "/var/lib/lazyiscsi/vm1.img"
    target = "iqn.2026-11.com.example:vm1"
    lun = 0                       # optional, default 0
    unit = 4096                   # optional: tracking unit of a new cache
    block_size = 512              # optional: 512 or 4096
    rate = 0                      # optional: background copy limit in bytes/s
    allowed_initiators = ["iqn.1993-08.org.debian:01:host1"]   # optional ACL of the target
    chap = { user = "host1", secret = "at-least-12-chars" }    # optional, for the target
    live = false                  # optional: the source is still in use by a running VM
    dirty_bitmap = "mig"          # optional, with live and an nbd:// source: QEMU's dirty bitmap

Volumes naming the same target become LUNs of one target; its ACL and CHAP must then agree.
A file may define no volume at all (the portal then serves only the runtime volumes of
``lazyiscsi volume create``).
Every mistake is one line naming the file, the field and the reason (``ConfigError``).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from lazyiscsi.iscsi.chap import ChapSecrets
from lazyiscsi.source.url import check as check_url
from lazyiscsi.store.hydrator import DEFAULT_RUN

#: the largest tracking unit: the background copy moves whole units in runs of DEFAULT_RUN
#: bytes, so a larger unit makes a cache no copy can fill (the hydrator refuses it)
MAX_UNIT = DEFAULT_RUN
MIN_UNIT = 512
DEFAULT_PORT = 3260
#: a dirty bitmap's name: it becomes the NBD meta context ``qemu:dirty-bitmap:NAME`` and is
#: shown in status and logs; QEMU's own names (node names, bitmap names) fit this
DIRTY_BITMAP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
#: sources that can be live (in use by a running VM): an NBD export or a local file
LIVE_SCHEMES = ("nbd", "nbd+unix", "file")
NBD_SCHEMES = ("nbd", "nbd+unix")


#: a volume's name: it is also the LIO backstore's name and cfgstring, and a file name
VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ConfigError(Exception):
    """A bad configuration value; ``str()`` names the file and the field."""


@dataclass(frozen=True)
class VolumeConfig:
    name: str
    source: str = field(repr=False)  # may hold a password: never printed whole
    cache: str
    target: str
    lun: int = 0
    unit: int | None = None
    block_size: int = 512
    rate: int = 0
    allowed_initiators: tuple[str, ...] = ()
    chap: ChapSecrets | None = None
    source_id: str | None = None  # the operator's name for the source disk (its identity)
    live: bool = False  # the source is in use: pre-copy until ``lazyiscsi cutover`` (issue 11)
    dirty_bitmap: str | None = None  # with live: the source's dirty bitmap (NBD only)
    #: the operator makes the LIO objects with targetcli (``user:lazy``, cfgstring = name); we
    #: only serve the device once it appears (no target, LUN or ACL of ours)
    backstore_only: bool = False


@dataclass(frozen=True)
class Config:
    listen: tuple[str, int]
    volumes: tuple[VolumeConfig, ...]


_VOLUME_KEYS = {"name", "source", "cache", "target", "lun", "unit", "block_size", "rate",
                "allowed_initiators", "chap", "source_id", "live", "dirty_bitmap", "backstore_only"}
#: what targetcli owns for a backstore_only volume: we do not make them, so they may not be set
_TARGETCLI_KEYS = ("target", "lun", "allowed_initiators", "chap")
_CHAP_KEYS = {"user", "secret", "mutual_user", "mutual_secret"}


def is_iscsi_name(name: str) -> bool:
    """The three iSCSI name formats (RFC 7143 4.2.7.2): iqn., eui. and naa. prefixes."""
    return name.startswith(("iqn.", "eui.", "naa."))


def live_problem(source: str, live: bool, dirty_bitmap: str | None, *,
                 names: tuple[str, str] = ("live", "dirty_bitmap")) -> str | None:
    """Why ``live``/``dirty_bitmap`` do not fit ``source`` (one phrase naming the option as
    ``names`` spell them: the TOML keys, or the CLI's options), or None. A bitmap only means
    something for a live source, and only NBD carries one (the meta context
    ``qemu:dirty-bitmap:NAME``); an HTTP object is never a running VM's disk."""
    live_name, bitmap_name = names
    scheme = urlsplit(source).scheme.lower() if "://" in source else "file"
    if dirty_bitmap is not None:
        if not live:
            return f"{bitmap_name} needs {live_name} (a bitmap tracks a source still in use)"
        if not DIRTY_BITMAP_NAME.fullmatch(dirty_bitmap):
            return (f"{bitmap_name} {dirty_bitmap!r}: use 1-128 of A-Z a-z 0-9 . _ : - "
                    "(the name given to QEMU's block-dirty-bitmap-add)")
        if scheme not in NBD_SCHEMES:
            return f"{bitmap_name} needs an nbd:// source (dirty bitmaps travel over NBD), not {scheme}"
    if live and scheme not in LIVE_SCHEMES:
        return f"{live_name} needs an nbd:// source or a file (a running VM's disk), not {scheme}"
    return None


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST``, ``[IPV6]:PORT``, ``[IPV6]`` or a bare IPv6 address (then the
    port is 3260). Raises ValueError naming the fault."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: an IPv6 address is written [ADDRESS]:PORT")
        _ipv6(host, text)
        return host, _port(rest[1:] if rest else str(DEFAULT_PORT), text)
    if text.count(":") > 1:  # a bare IPv6 address: its colons are not a port separator
        _ipv6(text, text)
        return text, DEFAULT_PORT
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    return host or "0.0.0.0", _port(port, text)


def _ipv6(host: str, text: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None


def _port(port: str, text: str) -> int:
    if not port.isdigit():
        raise ValueError(f"{text!r}: the port must be a number (HOST:PORT)")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"{text!r}: port out of range")
    return number


def load(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8 (TOML 1.0, "Spec")
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") \
            from None
    return parse(data, path)


def parse(data: dict, path: str = "config") -> Config:  # type: ignore[type-arg]
    unknown = set(data) - {"portal", "volume"}
    if unknown:
        raise ConfigError(f"{path}: unknown section {sorted(unknown)[0]!r} (expected portal, volume)")
    portal = data.get("portal", {})
    if not isinstance(portal, dict):
        raise ConfigError(f"{path}: portal: must be a table ([portal])")
    unknown = set(portal) - {"listen"}
    if unknown:
        raise ConfigError(f"{path}: portal.{sorted(unknown)[0]}: unknown key")
    listen_text = portal.get("listen", f"0.0.0.0:{DEFAULT_PORT}")
    if not isinstance(listen_text, str):
        raise ConfigError(f"{path}: portal.listen: must be a string, HOST:PORT")
    try:
        listen = parse_listen(listen_text)
    except ValueError as e:
        raise ConfigError(f"{path}: portal.listen: {e}") from None
    raw_volumes = data.get("volume", [])
    if not isinstance(raw_volumes, list):
        raise ConfigError(f"{path}: volume must be an array of tables ([[volume]])")
    volumes = tuple(_volume(v, f"{path}: volume[{i}]") for i, v in enumerate(raw_volumes))
    _check_consistency(volumes, path)
    return Config(listen, volumes)


def _volume(v: object, where: str) -> VolumeConfig:
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(v) - _VOLUME_KEYS
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key")
    backstore_only = v.get("backstore_only", False)
    if not isinstance(backstore_only, bool):
        raise ConfigError(f"{where}.backstore_only: true or false")
    if backstore_only:
        for key in _TARGETCLI_KEYS:
            if key in v:
                raise ConfigError(f"{where}.{key}: with backstore_only = true, targetcli makes the "
                                  "target, LUN and ACLs: leave it out")
        v = {**v, "target": ""}
    for key in ("name", "source", "cache", *(() if backstore_only else ("target",))):
        if not isinstance(v.get(key), str) or not v[key]:
            raise ConfigError(f"{where}.{key}: required, a non-empty string")
    try:
        check_url(v["source"])
    except ValueError as e:
        raise ConfigError(f"{where}.source: {e}") from None
    if not backstore_only and not is_iscsi_name(v["target"]):
        raise ConfigError(f"{where}.target: {v['target']!r} is not an iSCSI name (iqn., eui. or naa.)")
    lun = _int(v, "lun", 0, 0, 16383, where)
    unit = v.get("unit")
    if unit is not None:
        unit = _int(v, "unit", 0, MIN_UNIT, MAX_UNIT, where)
        if unit & (unit - 1):
            raise ConfigError(f"{where}.unit: {unit} is not a power of two")
    block_size = _int(v, "block_size", 512, 512, 4096, where)
    if block_size not in (512, 4096):
        raise ConfigError(f"{where}.block_size: must be 512 or 4096")
    rate = _int(v, "rate", 0, 0, 1 << 62, where)
    acl = v.get("allowed_initiators", [])
    if not isinstance(acl, list) or not all(isinstance(a, str) and a for a in acl):
        raise ConfigError(f"{where}.allowed_initiators: a list of initiator names")
    source_id = v.get("source_id")
    if source_id is not None and (not isinstance(source_id, str) or not source_id):
        raise ConfigError(f"{where}.source_id: a non-empty string")
    live = v.get("live", False)
    if not isinstance(live, bool):
        raise ConfigError(f"{where}.live: true or false")
    bitmap = v.get("dirty_bitmap")
    if bitmap is not None and not isinstance(bitmap, str):
        raise ConfigError(f"{where}.dirty_bitmap: a string, the bitmap's name")
    problem = live_problem(v["source"], live, bitmap)
    if problem is not None:
        raise ConfigError(f"{where}: {problem}")
    return VolumeConfig(v["name"], v["source"], v["cache"], v["target"], lun, unit, block_size, rate,
                        tuple(acl), _chap(v.get("chap"), f"{where}.chap"), source_id, live, bitmap,
                        backstore_only)


def _int(v: dict, key: str, default: int, low: int, high: int, where: str) -> int:  # type: ignore[type-arg]
    value = v.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where}.{key}: must be an integer from {low} to {high}")
    return value


def _chap(c: object, where: str) -> ChapSecrets | None:
    if c is None:
        return None
    if not isinstance(c, dict):
        raise ConfigError(f"{where}: must be a table with user and secret")
    unknown = set(c) - _CHAP_KEYS
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key")
    if not isinstance(c.get("user"), str) or not isinstance(c.get("secret"), str):
        raise ConfigError(f"{where}: user and secret are required strings")
    if ("mutual_user" in c) != ("mutual_secret" in c):
        raise ConfigError(f"{where}: mutual_user and mutual_secret go together")
    try:
        return ChapSecrets(c["user"], c["secret"], c.get("mutual_user"), c.get("mutual_secret"))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None  # the message never holds the secret


def _check_consistency(volumes: tuple[VolumeConfig, ...], path: str) -> None:
    names: set[str] = set()
    caches: set[str] = set()
    luns: set[tuple[str, int]] = set()
    by_target: dict[str, VolumeConfig] = {}
    for i, vol in enumerate(volumes):
        where = f"{path}: volume[{i}]"
        if vol.name in names:
            raise ConfigError(f"{where}.name: {vol.name!r} is used twice")
        if vol.cache in caches:
            raise ConfigError(f"{where}.cache: {vol.cache!r} is used by another volume")
        names.add(vol.name)
        caches.add(vol.cache)
        if vol.backstore_only:
            continue
        if (vol.target, vol.lun) in luns:
            raise ConfigError(f"{where}.lun: LUN {vol.lun} of {vol.target} is used twice")
        first = by_target.setdefault(vol.target, vol)
        if first.allowed_initiators != vol.allowed_initiators or first.chap != vol.chap:
            raise ConfigError(f"{where}: volumes of target {vol.target} must share its "
                              "allowed_initiators and chap")
        luns.add((vol.target, vol.lun))
