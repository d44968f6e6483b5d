"""Configuration errors: one line, naming the file and the field, never a secret."""

from __future__ import annotations

import re

import pytest

from lazyiscsi.config import ConfigError, load, parse

GOOD = {"name": "vm1", "source": "nbd://h/e", "cache": "/c1", "target": "iqn.2026-11.t:a"}


def test_good_config_with_two_luns_on_one_target() -> None:
    cfg = parse({"portal": {"listen": "127.0.0.1:3299"},
                 "volume": [GOOD, {**GOOD, "name": "vm2", "cache": "/c2", "lun": 1, "block_size": 4096}]})
    assert cfg.listen == ("127.0.0.1", 3299)
    assert [(v.name, v.lun, v.block_size) for v in cfg.volumes] == [("vm1", 0, 512), ("vm2", 1, 4096)]


@pytest.mark.parametrize(("volume", "field"), [
    ({**GOOD, "lun": -1}, "volume[0].lun"),
    ({**GOOD, "lun": "zero"}, "volume[0].lun"),
    ({**GOOD, "unit": 3000}, "volume[0].unit"),
    ({**GOOD, "block_size": 1024}, "volume[0].block_size"),
    ({**GOOD, "target": "vm1"}, "volume[0].target"),
    ({**GOOD, "source": ""}, "volume[0].source"),
    ({**GOOD, "colour": "red"}, "volume[0].colour"),
    ({**GOOD, "allowed_initiators": "iqn.x"}, "volume[0].allowed_initiators"),
    ({**GOOD, "chap": {"user": "u"}}, "volume[0].chap"),
    ({**GOOD, "chap": {"user": "u", "secret": "s3cr3t"}}, "volume[0].chap"),
])
def test_bad_values_name_the_field(volume: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as err:
        parse({"volume": [volume]}, "lazy.toml")
    message = str(err.value)
    assert message.startswith(f"lazy.toml: {field}") and "\n" not in message
    assert "s3cr3t" not in message


def test_conflicts_between_volumes() -> None:
    with pytest.raises(ConfigError, match=re.escape("LUN 0 of iqn.2026-11.t:a is used twice")):
        parse({"volume": [GOOD, {**GOOD, "name": "b", "cache": "/c2"}]})
    with pytest.raises(ConfigError, match="must share"):
        parse({"volume": [GOOD, {**GOOD, "name": "b", "cache": "/c2", "lun": 1,
                                 "allowed_initiators": ["iqn.x:y"]}]})
    with pytest.raises(ConfigError, match=r"portal\.listen"):
        parse({"portal": {"listen": "h:port"}, "volume": [GOOD]})
    with pytest.raises(ConfigError, match=re.escape("array of tables ([[volume]])")):
        parse({"volume": {"name": "x"}})
    assert parse({"portal": {"listen": "127.0.0.1:3261"}}).volumes == ()  # runtime volumes only


def test_file_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[[volume]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(str(bad))


@pytest.mark.parametrize(("volume", "reason"), [
    ({**GOOD, "dirty_bitmap": "mig"}, "dirty_bitmap needs live"),
    ({**GOOD, "live": True, "dirty_bitmap": "mig", "source": "https://h/disk.raw"},
     "dirty_bitmap needs an nbd:// source"),
    ({**GOOD, "live": True, "dirty_bitmap": "mig", "source": "/var/lib/disk.raw"},
     "dirty_bitmap needs an nbd:// source"),
    ({**GOOD, "live": True, "source": "http://h/disk.raw"}, "live needs an nbd:// source or a file"),
    ({**GOOD, "live": True, "dirty_bitmap": "no spaces"}, "dirty_bitmap 'no spaces'"),
    ({**GOOD, "live": "yes"}, "live: true or false"),
    ({**GOOD, "live": True, "dirty_bitmap": 7}, "dirty_bitmap: a string"),
])
def test_live_and_dirty_bitmap_combinations(volume: dict, reason: str) -> None:  # type: ignore[type-arg]
    """Issue 11: a bitmap without live, or with a source that cannot carry one, is one line."""
    with pytest.raises(ConfigError) as err:
        parse({"volume": [volume]}, "lazy.toml")
    assert str(err.value).startswith("lazy.toml: volume[0]") and reason in str(err.value)


def test_live_volume_with_bitmap() -> None:
    (v,) = parse({"volume": [{**GOOD, "live": True, "dirty_bitmap": "mig"}]}).volumes
    assert v.live and v.dirty_bitmap == "mig"
    (v,) = parse({"volume": [{**GOOD, "live": True, "source": "/dev/vg/disk"}]}).volumes
    assert v.live and v.dirty_bitmap is None


def test_backstore_only_volumes_leave_target_and_acls_to_targetcli() -> None:
    bare = {"name": "vm1", "source": "nbd://h/e", "cache": "/c1", "backstore_only": True}
    cfg = parse({"volume": [bare, {**bare, "name": "vm2", "cache": "/c2"}]})
    assert [(v.backstore_only, v.target) for v in cfg.volumes] == [(True, ""), (True, "")]
    for key, value in (("target", "iqn.2026-11.t:a"), ("lun", 1), ("allowed_initiators", ["iqn.x"])):
        with pytest.raises(ConfigError, match=rf"volume\[0\]\.{key}: with backstore_only = true, targetcli"):
            parse({"volume": [{**bare, key: value}]})
    with pytest.raises(ConfigError, match=r"volume\[0\]\.backstore_only: true or false"):
        parse({"volume": [{**bare, "backstore_only": "yes"}]})
