"""Finding our devices among the uio devices sysfs lists (a sysfs tree laid out like the kernel's,
in a temporary directory: the code under test only reads it)."""

from __future__ import annotations

from pathlib import Path

from lazyiscsi.tcmu.uio import UioName, find


def test_names_split_at_most_four_times() -> None:
    name = UioName.parse("tcm-user/3/vm1/lazy/vm1/with/slashes\n")
    assert name == UioName(3, "vm1", "lazy", "vm1/with/slashes")
    assert name is not None and str(name.configfs).endswith("/target/core/user_3/vm1")


def test_names_that_are_not_tcm_user_are_none() -> None:
    for text in ("uio_pci_generic", "tcm-user/x/vm1/lazy/a", "tcm-user/1/vm1/lazy", "tcmu/1/a/lazy/b", ""):
        assert UioName.parse(text) is None, text


def test_find_keeps_only_our_subtype(tmp_path: Path) -> None:
    for minor, text in ((0, "tcm-user/0/a/lazy/a"), (1, "tcm-user/0/b/rbd/pool/img"), (2, "uio_hv_generic"),
                        (7, "tcm-user/1/c/lazy/c")):
        (tmp_path / f"uio{minor}").mkdir()
        (tmp_path / f"uio{minor}" / "name").write_text(text + "\n")
    (tmp_path / "uio9").mkdir()  # removed while we looked: no name file
    found = find(root=tmp_path)
    assert sorted(found) == ["a", "c"]
    assert found["c"] == (7, UioName(1, "c", "lazy", "c"))


def test_find_without_uio_is_empty(tmp_path: Path) -> None:
    assert find(root=tmp_path / "absent") == {}
