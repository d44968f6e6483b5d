"""A live volume (issue 11) through `serve`, its control socket and the embedded portal, with
real initiators (QEMU's iSCSI driver: qemu-io, qemu-img) and a source still in use: before the
cutover every write is refused with DATA PROTECT while another initiator reads the whole LUN;
after it writes land, read back, and never reach the source; a refused cutover changes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.integration.peers import MiB, Nbdkit, free_port, make_image, wait_until
from tests.integration.test_daemon import Serve, cli, status

SIZE = 8 * MiB
IQN_PREFIX = "iqn.2026-11.io.lazyiscsi"


def lun_url(port: int, name: str) -> str:
    return f"iscsi://127.0.0.1:{port}/{IQN_PREFIX}:{name}/0"


def qemu_io(url: str, *commands: str) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    return subprocess.run([*args, url], capture_output=True, text=True, timeout=120)


def read_lun(url: str, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-O", "raw", url, str(out)], check=True, timeout=300)
    return out.read_bytes()


def write_refused(url: str) -> bool:
    """QEMU maps DATA PROTECT to EACCES (block/iscsi.c, iscsi_translate_sense)."""
    r = qemu_io(url, "write -P 0x77 0 64k")
    return "write failed: Permission denied" in r.stdout + r.stderr


def vm_write(image: Path, offset: int, data: bytes) -> None:
    """The source VM writes its disk (nbdkit's file plugin reads the file at every request)."""
    with image.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def test_live_without_bitmap_refuses_writes_until_cutover(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    image = tmp_path / "src.img"
    make_image(image, SIZE, seed=5)
    src = Nbdkit(["file", str(image)], free_port()).start()
    nbdkit.append(src)
    serve = Serve(free_port(), tmp_path / "serve.log")
    serve.start()
    url = lun_url(serve.port, "vm1")
    try:
        r = cli("volume", "create", "vm1", "--source", src.url, "--live")
        assert r.returncode == 0, r.stderr
        vol = status("vm1")
        assert vol["phase"] == "pre-copy" and vol["dirty_bytes"] is None
        assert write_refused(url)
        # a second initiator reads the whole LUN; the VM goes on writing; reads see its writes
        assert read_lun(url, tmp_path / "a.raw") == image.read_bytes()
        vm_write(image, 3 * MiB + 100, b"\xee" * 5000)
        assert read_lun(url, tmp_path / "b.raw") == image.read_bytes()
        assert status("vm1")["local_bytes"] == 0  # nothing was cached, nothing copied
        final = image.read_bytes()
        r = cli("cutover", "vm1")
        assert r.returncode == 0 and "post-copy" in r.stdout, r.stdout + r.stderr
        r = qemu_io(url, "write -P 0x5a 1M 256k", "write -P 0x33 102401 5000", "read -P 0x5a 1M 256k")
        assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr
        expected = bytearray(final)
        expected[MiB:MiB + 256 * 1024] = b"\x5a" * 256 * 1024
        expected[102401:107401] = b"\x33" * 5000
        wait_until(lambda: status("vm1")["phase"] == "complete", "the copy to complete")
        assert read_lun(url, tmp_path / "c.raw") == bytes(expected)
        assert image.read_bytes() == final, "the destination's writes reached the source"
        vol = status("vm1")
        assert vol["fetched_after_cutover_bytes"] <= vol["dirty_at_cutover_bytes"] + vol["not_reached_bytes"]
        r = cli("cutover", "vm1")
        assert r.returncode == 1 and "already cut over" in r.stderr and r.stderr.count("\n") == 1
    finally:
        serve.stop()


def test_refused_cutover_leaves_the_volume_as_it_was(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    """Acceptance 2, last sentence: the source is down, the cutover refused in one line, and
    the volume is as it was: phase, cache, writes still refused."""
    image = tmp_path / "src.img"
    make_image(image, SIZE, seed=6)
    src = Nbdkit(["file", str(image)], free_port()).start()
    nbdkit.append(src)
    serve = Serve(free_port(), tmp_path / "serve.log")
    serve.start()
    url = lun_url(serve.port, "vm2")
    try:
        assert cli("volume", "create", "vm2", "--source", src.url, "--live").returncode == 0
        meta = Path(tmp_path / "state" / "vm2.cache.meta").read_bytes()
        before: dict[str, Any] = status("vm2")
        src.kill()
        r = cli("--log-level", "error", "cutover", "vm2")
        assert r.returncode == 1 and "nothing changed" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        after = status("vm2")
        assert {k: after[k] for k in ("phase", "local_bytes", "state")} == \
            {k: before[k] for k in ("phase", "local_bytes", "state")}
        assert Path(tmp_path / "state" / "vm2.cache.meta").read_bytes() == meta
        assert write_refused(url)
        # JSON status names the phase for scripts
        r = subprocess.run([sys.executable, "-m", "lazyiscsi.cli", "status", "--json"], capture_output=True,
                           text=True, timeout=60)
        assert json.loads(r.stdout)[0]["phase"] == "pre-copy"
    finally:
        serve.stop()


def source_bytes(url: str, out: Path) -> bytes:
    """What the source holds now, read through an NBD export with qemu-img."""
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(out)], check=True, timeout=300)
    return out.read_bytes()


def test_precopy_with_a_qemu_dirty_bitmap(tmp_path: Path) -> None:
    """The pre-copy path against a real qemu-storage-daemon (the source VM writes through its own
    export, the daemon's bitmap records it): the copy runs before the cutover and skips what is
    dirty; a restart in pre-copy stays live; after the cutover the LUN is the source's final
    state plus the destination's writes, the source holds none of those, and (acceptance 3)
    the bytes fetched after the cutover are at most the final dirty set plus what the copy had
    not reached."""
    from tests.integration.peers import BITMAP, start_dirty_bitmap_source

    image = tmp_path / "src.img"
    make_image(image, 16 * MiB, seed=8)
    qsd = start_dirty_bitmap_source(image, tmp_path)
    serve = Serve(free_port(), tmp_path / "serve.log")
    serve.start()
    url = lun_url(serve.port, "vm1")
    try:
        r = cli("volume", "create", "vm1", "--source", qsd.lazy_url, "--live", "--dirty-bitmap", BITMAP)
        assert r.returncode == 0, r.stderr
        qsd.write(MiB, 64 * 1024, 0x11)  # dirty before the copy reaches it, or after: either way
        wait_until(lambda: status("vm1")["local_bytes"] >= 16 * MiB - 64 * 1024, "the pre-copy")
        # the copy may be through before the next bitmap poll (every DIRTY_POLL_INTERVAL) saw the write
        wait_until(lambda: status("vm1")["dirty_bytes"], "the poll to see the first write")
        vol = status("vm1")
        assert vol["phase"] == "pre-copy" and vol["dirty_bytes"] == 64 * 1024, vol
        assert write_refused(url)
        qsd.write(5 * MiB + 4096, 4096, 0x22)  # copied already: invalidated at the cutover
        wait_until(lambda: status("vm1")["dirty_bytes"] == 2 * 64 * 1024, "the poll to see the write")
        serve.stop()
        serve.start()
        assert status("vm1")["phase"] == "pre-copy" and write_refused(url)
        qsd.write(9 * MiB, 3 * 64 * 1024, 0x33)  # the VM's last writes
        final = source_bytes(qsd.vm_url, tmp_path / "final.raw")
        assert cli("pause", "vm1").returncode == 0  # post-copy waits for the restart below
        r = cli("cutover", "vm1")
        assert r.returncode == 0, r.stderr
        vol = status("vm1")
        assert vol["phase"] == "post-copy" and vol["dirty_at_cutover_bytes"] == 5 * 64 * 1024
        assert vol["not_reached_bytes"] == 0, vol
        # a restart in post-copy opens the source as a frozen one: its sampled identity is the
        # one pinned at the cutover, so the volume resumes (not "unopened")
        serve.stop()
        serve.start()
        vol = status("vm1")
        assert vol["phase"] == "post-copy" and vol["state"] == "paused", vol
        assert cli("resume", "vm1").returncode == 0
        assert qemu_io(url, "write -P 0x5a 2M 128k").returncode == 0
        wait_until(lambda: status("vm1")["phase"] == "complete", "the post-copy")
        expected = bytearray(final)
        expected[2 * MiB:2 * MiB + 128 * 1024] = b"\x5a" * 128 * 1024
        assert read_lun(url, tmp_path / "lun.raw") == bytes(expected)
        after = source_bytes(qsd.vm_url, tmp_path / "after.raw")
        assert after == final, "a destination write reached the source"
        vol = status("vm1")
        fetched, dirty, not_reached = (vol["fetched_after_cutover_bytes"], vol["dirty_at_cutover_bytes"],
                                       vol["not_reached_bytes"])
        print(f"\nafter cutover: fetched {fetched} <= dirty {dirty} + not reached {not_reached}")
        assert 0 < fetched <= dirty + not_reached
        log = (tmp_path / "serve.log").read_text()
        assert "cutover_completed" in log and "not_reached_bytes" in log
    finally:
        serve.stop()
        qsd.stop()


def test_cutover_refused_when_the_bitmap_is_gone(tmp_path: Path) -> None:
    """The source site restarted its export without the bitmap: the cutover cannot know what
    changed, and refuses, changing nothing; with the bitmap back it succeeds."""
    from tests.integration.peers import BITMAP, start_dirty_bitmap_source

    image = tmp_path / "src.img"
    make_image(image, 4 * MiB, seed=9)
    qsd = start_dirty_bitmap_source(image, tmp_path)
    serve = Serve(free_port(), tmp_path / "serve.log")
    serve.start()
    url = lun_url(serve.port, "vm3")
    try:
        r = cli("volume", "create", "vm3", "--source", qsd.lazy_url, "--live", "--dirty-bitmap", BITMAP)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: status("vm3")["local_bytes"] == 4 * MiB, "the pre-copy")
        meta = Path(tmp_path / "state" / "vm3.cache.meta").read_bytes()
        qsd.qmp.execute("block-export-del", id="lazy", mode="hard")
        qsd.qmp.execute("block-export-add", type="nbd", id="lazy-plain", name="lazy", writable=True,
                        **{"node-name": "disk"})
        r = cli("cutover", "vm3")
        assert r.returncode == 1 and "nothing changed" in r.stderr and BITMAP in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1
        vol = status("vm3")
        assert vol["phase"] == "pre-copy" and vol["local_bytes"] == 4 * MiB
        assert Path(tmp_path / "state" / "vm3.cache.meta").read_bytes() == meta
        assert write_refused(url)
        qsd.qmp.execute("block-export-del", id="lazy-plain", mode="hard")
        qsd.qmp.execute("block-export-add", type="nbd", id="lazy-again", name="lazy", writable=True,
                        bitmaps=[BITMAP], **{"node-name": "disk"})
        r = cli("cutover", "vm3")
        assert r.returncode == 0, r.stderr
    finally:
        serve.stop()
        qsd.stop()


def test_cutover_before_the_precopy_finished(tmp_path: Path) -> None:
    """Acceptance 3 with both terms: the copy is slowed so that the cutover comes while most of
    the disk is still at the source; what post-copy fetches is at most the final dirty set plus
    what the copy had not reached, and the LUN ends as the source's final state."""
    from tests.integration.peers import BITMAP, start_dirty_bitmap_source

    image = tmp_path / "src.img"
    make_image(image, 16 * MiB, seed=10)
    qsd = start_dirty_bitmap_source(image, tmp_path)
    serve = Serve(free_port(), tmp_path / "serve.log")
    serve.start()
    url = lun_url(serve.port, "vm4")
    try:
        r = cli("volume", "create", "vm4", "--source", qsd.lazy_url, "--live", "--dirty-bitmap", BITMAP,
                "--rate", "1M")
        assert r.returncode == 0, r.stderr
        wait_until(lambda: status("vm4")["local_bytes"] >= 2 * MiB, "part of the pre-copy")
        qsd.write(0, 128 * 1024, 0x44)  # copied already
        qsd.write(15 * MiB, 128 * 1024, 0x55)  # not reached yet (the copy goes in order)
        final = source_bytes(qsd.vm_url, tmp_path / "final.raw")
        wait_until(lambda: status("vm4")["dirty_bytes"] == 256 * 1024, "the poll to see the writes")
        assert cli("cutover", "vm4").returncode == 0
        assert cli("rate", "vm4", "0").returncode == 0
        wait_until(lambda: status("vm4")["phase"] == "complete", "the post-copy")
        assert read_lun(url, tmp_path / "lun.raw") == final
        vol = status("vm4")
        fetched, dirty, not_reached = (vol["fetched_after_cutover_bytes"], vol["dirty_at_cutover_bytes"],
                                       vol["not_reached_bytes"])
        print(f"\nafter cutover: fetched {fetched} <= dirty {dirty} + not reached {not_reached}")
        assert dirty == 256 * 1024 and not_reached > 0
        assert fetched <= dirty + not_reached
    finally:
        serve.stop()
        qsd.stop()
