"""Source identity that means something (issue 10, defects 5 and 6): a cache is bound to the disk
it was filled from, and a source that changes under a copy stops it. Real files, nbdkit,
qemu-nbd and nginx; the cache through ``lazyiscsi hydrate`` and ``LazyDisk``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lazyiscsi.source import SourceChanged, open_source
from lazyiscsi.store.errors import SourceMismatch
from lazyiscsi.store.lazydisk import LazyDisk
from tests.integration.faultproxy import FaultProxy, Mode
from tests.integration.http_servers import Nginx
from tests.integration.peers import MiB, Nbdkit, free_port, make_image, wait_listening, wait_until

LAZYISCSI = [sys.executable, "-m", "lazyiscsi.cli"]
UNIT = 4096
#: hydrate's exit status for a source that changed under the copy (cli.EXIT_SOURCE_CHANGED)
EXIT_SOURCE_CHANGED = 4


def local_units(cache: Path) -> list[int]:
    """The units whose bits reached the map file."""
    try:
        bits = (cache.parent / (cache.name + ".map")).read_bytes()
    except FileNotFoundError:
        return []
    return [i * 8 + j for i, b in enumerate(bits) if b for j in range(8) if b >> j & 1]


def assert_only_old_bytes(cache: Path, old: bytes) -> None:
    """Every local unit of the cache holds the disk the copy started from: no unit of the
    changed source was taken."""
    data = cache.read_bytes()
    units = local_units(cache)
    assert units, "the copy made progress before the change"
    bad = [u for u in units if data[u * UNIT:(u + 1) * UNIT] != old[u * UNIT:(u + 1) * UNIT]]
    assert not bad, f"{len(bad)} units hold bytes of the changed source, first at {bad[0] * UNIT}"


def test_file_modified_in_place_stops_every_later_read(tmp_path: Path) -> None:
    img = tmp_path / "src.img"
    image = make_image(img, 4 * MiB)
    src = open_source(str(img))
    assert src.read(0, UNIT) == image[:UNIT]
    with open(img, "r+b") as f:  # a write in place: same inode, same size, a new mtime
        f.seek(3 * MiB)
        f.write(b"new data")
    with pytest.raises(SourceChanged, match="mtime"):
        src.read(0, UNIT)  # not even the untouched bytes: which others changed is unknown
    src.close()


def test_a_replaced_file_is_another_disk(tmp_path: Path) -> None:
    """Defect 5: size and samples were the whole identity, so a copy of the disk (another
    inode, maybe another snapshot) resumed a cache. Same bytes, same mtime: refused."""
    img = tmp_path / "src.img"
    make_image(img, 4 * MiB)
    cache = str(tmp_path / "cache.img")
    disk = LazyDisk.open(cache, open_source(str(img)))
    disk.populate(0, MiB)
    disk.close()
    other = tmp_path / "copy.img"
    shutil.copy2(img, other)  # copy2 keeps the mtime
    os.replace(other, img)
    with pytest.raises(SourceMismatch, match="not the disk"):
        LazyDisk.open(cache, open_source(str(img)))
    LazyDisk.open(cache, None).close()  # the cache itself is intact


def _hydrate_slowly(source: str, cache: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*LAZYISCSI, "--log-level", "info", "hydrate", "--source", source, "--cache",
                             str(cache), "--progress-interval", "0.5", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_hydrate_from_a_file_modified_mid_copy_takes_none_of_its_new_bytes(tmp_path: Path) -> None:
    img = tmp_path / "src.img"
    image = make_image(img, 16 * MiB)
    cache = tmp_path / "cache.img"
    proc = _hydrate_slowly(str(img), cache, "--rate", "4M")
    wait_until(lambda: len(local_units(cache)) * UNIT >= 2 * MiB or proc.poll() is not None, "progress")
    with open(img, "r+b") as f:
        f.write(os.urandom(len(image)))  # the whole disk rewritten in place
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_SOURCE_CHANGED and "source_changed" in err, err
    assert_only_old_bytes(cache, image)


def test_hydrate_from_an_http_object_replaced_mid_copy_takes_none_of_its_new_bytes(
        tmp_path: Path) -> None:
    """Defect 6 with a real nginx: the object is replaced while the copy runs (slowed by the
    proxy); If-Match makes nginx answer 412, the copy stops at once (exit 4, not after the
    stall timeout) with a source_changed event, and no byte of the new object reaches the cache."""
    root = tmp_path / "www"
    root.mkdir()
    image = make_image(root / "disk.img", 16 * MiB)
    nginx = Nginx(root, tmp_path / "nginx")
    proxy = FaultProxy(("127.0.0.1", nginx.port))
    proxy.set_mode(Mode.SLOW, 500_000)
    cache = tmp_path / "cache.img"
    try:
        proc = _hydrate_slowly(f"http://127.0.0.1:{proxy.port}/disk.img", cache)
        wait_until(lambda: len(local_units(cache)) * UNIT >= 2 * MiB or proc.poll() is not None, "progress")
        new = root / "disk.new"
        make_image(new, 16 * MiB, seed=99)
        os.replace(new, root / "disk.img")  # nginx's ETag is mtime-size: a new ETag
        st = (root / "disk.img").stat()
        os.utime(root / "disk.img", ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
        _out, err = proc.communicate(timeout=120)
    finally:
        proxy.close()
        nginx.stop()
    assert proc.returncode == EXIT_SOURCE_CHANGED and "source_changed" in err, err
    assert_only_old_bytes(cache, image)


def _clone(template: bytes, path: Path) -> bytes:
    """A clone of ``template`` the guest wrote to away from every identity sample."""
    data = bytearray(template)
    data[3 * MiB + 12345:3 * MiB + 12345 + 8] = b"divergen"
    path.write_bytes(data)
    return bytes(data)


def test_source_id_tells_two_clones_of_one_template_apart(tmp_path: Path, nbdkit: list[Nbdkit]) -> None:
    """Defect 5: two clones of one template, served in turn at the same URL, had the same
    identity, so a cache begun from one resumed on the other (mixed bytes, no error). With the
    operator's --source-id the second is refused; with the right id the copy completes."""
    template = make_image(tmp_path / "template.img", 8 * MiB)
    a = _clone(template, tmp_path / "a.img")
    _clone(template, tmp_path / "b.img")
    port = free_port()
    cache = tmp_path / "cache.img"
    first = Nbdkit(["--filter=rate", "file", str(tmp_path / "a.img"), "rate=16M"], port).start()
    nbdkit.append(first)
    proc = _hydrate_slowly(first.url, cache, "--source-id", "vm-a")
    wait_until(lambda: len(local_units(cache)) > 0 or proc.poll() is not None, "progress")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    first.kill()
    second = Nbdkit(["file", str(tmp_path / "b.img")], port).start()  # the other clone, same URL
    nbdkit.append(second)
    r = subprocess.run([*LAZYISCSI, "hydrate", "--source", second.url, "--cache", str(cache),
                        "--source-id", "vm-b"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "not the disk this cache was filled from" in r.stderr, r.stderr
    second.kill()
    third = Nbdkit(["file", str(tmp_path / "a.img")], port).start()
    nbdkit.append(third)
    r = subprocess.run([*LAZYISCSI, "hydrate", "--source", third.url, "--cache", str(cache),
                        "--source-id", "vm-a"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert cache.read_bytes() == a


def test_nbd_identity_includes_the_export_name(tmp_path: Path) -> None:
    """The same bytes exported under two names are two disks (qemu-nbd serves the name)."""
    img = tmp_path / "d.img"
    make_image(img, 4 * MiB)
    identities = []
    for name in ("vm1", "vm2"):
        port = free_port()
        proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "raw", "-b", "127.0.0.1", "-p", str(port),
                                 "-x", name, str(img)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(port, proc)
            src = open_source(f"nbd://127.0.0.1:{port}/{name}")
            identities.append(src.identity)
            src.close()
        finally:
            proc.kill()
            proc.wait()
    assert identities[0] != identities[1]


@pytest.mark.parametrize("bad", ["", "has space", "x" * 129, "semi;colon"])
def test_a_bad_source_id_is_refused_with_its_reason(tmp_path: Path, bad: str) -> None:
    img = tmp_path / "d.img"
    make_image(img, MiB)
    r = subprocess.run([*LAZYISCSI, "hydrate", "--source", str(img), "--cache", str(tmp_path / "c.img"),
                        "--source-id", bad], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "source id" in r.stderr and "Traceback" not in r.stderr, r.stderr
