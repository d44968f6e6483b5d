"""What the LIO frontend refuses before it touches configfs, and what it never repeats."""

from __future__ import annotations

import types

import pytest

from lazyiscsi.config import VolumeConfig
from lazyiscsi.frontend import FrontendError
from lazyiscsi.iscsi.chap import ChapSecrets
from lazyiscsi.lio import LioFrontend, _without_secrets, not_in_cfs
from lazyiscsi.scsi.lun import Lun

CHAP = ChapSecrets("user1", "a-secret-of-16ch", "tgt", "another-secret-16")


def volume(**kw: object) -> VolumeConfig:
    return VolumeConfig(name="vm1", source="nbd://h/e", cache="/c", target="iqn.2026-11.x:vm1", **kw)  # type: ignore[arg-type]


def test_chap_without_an_acl_is_refused_by_name() -> None:
    with pytest.raises(FrontendError, match=r"volume vm1: .*CHAP needs allowed_initiators"):
        LioFrontend(("127.0.0.1", 3260)).export(volume(chap=CHAP), Lun(None, "vm1"))  # type: ignore[arg-type]


def test_rtslib_errors_lose_the_secrets() -> None:
    text = "Cannot set a-secret-of-16ch or another-secret-16 for user1"
    assert _without_secrets(text, volume(chap=CHAP)) == "Cannot set <secret> or <secret> for user1"
    assert _without_secrets(text, volume()) == text


def test_works_with_the_installed_rtslib_names() -> None:
    """Issue 13: rtslib-fb 2.2.4 (PyPI) renamed RTSLibNotInCFS to RTSLibNotInCFSError, and
    `unexport` of a volume LIO never had died with AttributeError. rtslib's objects are
    replaced by ones that raise its own, installed, not-in-configfs exception."""
    import rtslib_fb

    missing = getattr(rtslib_fb, "RTSLibNotInCFSError", None) or rtslib_fb.RTSLibNotInCFS

    def absent(*_args: object, **_kw: object) -> None:
        raise missing("no such object in configfs")

    frontend = LioFrontend(("127.0.0.1", 3260))
    frontend.rts = types.SimpleNamespace(**{**vars(rtslib_fb), "Target": absent, "TPG": absent,
                                            "UserBackedStorageObject": absent})
    frontend.unexport(volume())  # nothing to remove: not an error


def test_not_in_cfs_under_either_name() -> None:
    class Old(Exception):
        pass

    class New(Exception):
        pass

    assert not_in_cfs(types.SimpleNamespace(RTSLibNotInCFS=Old)) is Old  # Debian 12: 2.1.75
    assert not_in_cfs(types.SimpleNamespace(RTSLibNotInCFSError=New)) is New  # PyPI: 2.2.4


class _Recorder:
    """rtslib-fb's objects and our TCMU handler as far as `export` uses them, writing down the
    order of what reaches configfs and the handler (a fake below the frontend under test)."""

    def __init__(self) -> None:
        self.events: list[str] = []
        recorder = self

        class TPG:
            luns: list[object] = []

            def __init__(self, *_a: object, **_kw: object) -> None:
                pass

            def set_attribute(self, name: str, value: str) -> None:
                recorder.events.append(f"attribute {name}")

            @property
            def enable(self) -> bool:
                return False

            @enable.setter
            def enable(self, value: bool) -> None:
                recorder.events.append(f"enable {value}")

        def absent(*_a: object, **_kw: object) -> object:
            if _kw:  # created
                recorder.events.append("backstore")
                return types.SimpleNamespace(name="vm1")
            raise RuntimeError("not in configfs")

        def made(what: str):  # type: ignore[no-untyped-def]
            return lambda *_a, **_kw: recorder.events.append(what)

        self.rts = types.SimpleNamespace(RTSLibError=OSError, RTSLibNotInCFSError=RuntimeError,
                                         RTSLibNotInCFS=RuntimeError, UserBackedStorageObject=absent,
                                         Target=made("target"), TPG=TPG, LUN=made("lun"),
                                         NetworkPortal=made("portal"))
        self.handler = types.SimpleNamespace(serve=lambda volume, lun: self.events.append(f"serve {volume}"),
                                             withdraw=made("withdraw"))


def test_a_target_is_enabled_only_once_its_backstore_is_served() -> None:
    """Issue 13, acceptance 3 for LIO: a login to a TPG not yet enabled is answered "Service
    Unavailable" (retried); enabled before our handler serves the backstore, it would reach a
    LUN nobody answers."""
    recorder = _Recorder()
    frontend = LioFrontend(("127.0.0.1", 3260))
    frontend.rts, frontend.not_in_cfs, frontend.handler = recorder.rts, RuntimeError, recorder.handler
    lun = types.SimpleNamespace(n_blocks=8, block_size=512, max_transfer_blocks=8, serial="0123")
    frontend.export(volume(), lun)  # type: ignore[arg-type]
    events = recorder.events
    assert events.index("serve vm1") < events.index("enable True") == len(events) - 1, events
    assert events.index("backstore") < events.index("serve vm1")
