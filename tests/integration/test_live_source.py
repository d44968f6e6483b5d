"""Live sources (issue 11): a disk still in use by a running VM is identified without sampling
its content, and ``content_fingerprint`` pins the content at the cutover. NBD against
qemu-storage-daemon (the VM writing through its own export) and a scripted server that counts
reads; files modified in place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lazyiscsi.source import (
    SourceChanged,
    SourceConfigError,
    content_fingerprint,
    open_source,
)
from tests.integration.peers import BITMAP, MiB, ScriptedNbd, free_port, make_image, start_dirty_bitmap_source


def _honest(offset: int, length: int) -> list[bytes]:
    return []  # no block status asked in these tests


def identity(url: str, **options: object) -> str:
    """The identity an open computes, the source closed again."""
    src = open_source(url, **options)  # type: ignore[arg-type]
    src.close()
    return src.identity


def test_a_live_nbd_open_reads_nothing() -> None:
    """Samples taken while the VM writes would bind the cache to bytes that are gone a minute
    later: a live open sends no READ (a frozen open sends one per sample)."""
    server = ScriptedNbd(_honest, size=64 * MiB)
    try:
        live = open_source(server.url, live=True, timeout=5)
        assert server.reads == 0
        assert live.identity == "nbd:size=67108864:live:export='x'"
        frozen = open_source(server.url, timeout=5)
        assert server.reads > 0 and frozen.identity != live.identity
        assert content_fingerprint(live) == frozen.identity == live.identity
        live.close()
        frozen.close()
    finally:
        server.close()


def test_a_live_nbd_identity_survives_the_vm_writing_and_is_pinned_at_cutover(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    make_image(image, 8 * MiB)
    peer = start_dirty_bitmap_source(image, tmp_path, port=free_port())  # the TCP form
    try:
        url = peer.lazy_url
        assert url.startswith("nbd://127.0.0.1:")
        before = open_source(url, live=True, source_id="vm-1", dirty_bitmap=BITMAP)
        frozen_before = identity(url)
        peer.write(0, 4096, 0x5A)  # the first sample's place
        after = open_source(url, live=True, source_id="vm-1", dirty_bitmap=BITMAP)
        assert before.identity == after.identity  # a cache resumes across the VM's writes
        assert "id=vm-1" in before.identity and "export='lazy'" in before.identity
        assert identity(url) != frozen_before  # a frozen identity would have refused
        # the cutover: the VM stopped; pin the content, which a frozen open now agrees with
        pinned = content_fingerprint(before)
        assert before.identity == pinned == identity(url, source_id="vm-1")
        assert pinned != after.identity
        before.close()
        after.close()
    finally:
        peer.stop()


def test_a_live_file_is_read_while_it_changes_and_checked_once_pinned(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    make_image(path, 4 * MiB)
    src = open_source(str(path), live=True)
    try:
        live_identity = src.identity
        assert ":live:" in live_identity and "mtime" not in live_identity
        with open(path, "r+b") as f:
            f.write(b"\x01" * 4096)
        os.utime(path, ns=(1, 1))
        assert src.read(0, 4) == b"\x01" * 4  # live: the change is expected, not refused
        assert identity(str(path), live=True) == live_identity
        pinned = content_fingerprint(src)
        assert pinned == src.identity == identity(str(path))
        with open(path, "r+b") as f:  # after the cutover a change is another disk again
            f.write(b"\x02" * 4096)
        os.utime(path, ns=(2, 2))
        with pytest.raises(SourceChanged):
            src.read(0, 4)
    finally:
        src.close()


def test_an_http_source_cannot_be_live() -> None:
    with pytest.raises(SourceConfigError, match="live source must be nbd:// or a file"):
        open_source("http://127.0.0.1:9/disk.img", live=True)
