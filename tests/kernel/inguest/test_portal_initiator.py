"""The embedded userspace portal (``serve --frontend portal``) under the Linux kernel's own
initiator (open-iscsi + iscsi_tcp), which until now only ever met LIO: SendTargets discovery,
a login with CRC32C header and data digests (RFC 7143 13.1, checked as negotiated), the SCSI
commands sg3_utils sends (SPC-4 INQUIRY and its VPD pages, REPORT LUNS, PERSISTENT RESERVE IN;
SBC-3 READ CAPACITY), the whole LUN read while it hydrates and equal to the source, fio's random
reads and writes verified (libaio, O_DIRECT, 16 deep), blkdiscard (SBC-4 UNMAP, as the kernel
chooses from our Logical Block Provisioning and Block Limits VPD pages) reading back zeros, a
filesystem made and checked clean, and a clean logout.

The tests run in file order on one LUN; each region below belongs to one test, and the filesystem
test, which takes the whole LUN, comes after them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.inguest.conftest import (
    NBD_PORT,
    SOURCE_SIZE,
    WORK,
    Daemon,
    disk_of,
    kernel_errors,
    login,
    logout,
    read_direct,
    run,
    serve_argv,
    sha,
    source_bytes,
)

IQN = "iqn.2026-11.io.lazyiscsi:ktp"
# beside LIO's portal (3260), which the other in-guest tests own
PORTAL = "127.0.0.1:3262"
SOURCE = source_bytes()
READ_CHUNK = 4 << 20
MIB = 1 << 20
# fio's two jobs: [16, 24) MiB in 4 KiB blocks, [24, 32) MiB in a mix of 4 KiB and 64 KiB blocks;
# small, because the guest runs under TCG emulation
FIO_4K = (16 * MIB, 8 * MIB)
FIO_MIXED = (24 * MIB, 8 * MIB)
# blkdiscard: 8 MiB on whole allocation units, then a few blocks across a unit boundary
DISCARD = (40 * MIB, 8 * MIB)
DISCARD_SMALL_AT = 52 * MIB
DISCARD_SMALL_LEN = 8192


@pytest.fixture(scope="module")
def daemon(source: Path) -> Iterator[Daemon]:
    # 1 MiB/s of background copy: the 64 MiB LUN is still hydrating while the tests read it
    d = Daemon(serve_argv("ktp", "--source", f"nbd://127.0.0.1:{NBD_PORT}", "--iqn", IQN, "--rate", "1M",
                          "--cache", str(WORK / "ktp.cache"), frontend="portal", portal=PORTAL),
               WORK / "ktp.log")
    d.start()
    yield d
    logout(IQN, PORTAL)
    if d.proc is not None and d.proc.poll() is None:
        d.stop()
    print((WORK / "ktp.log").read_text()[-6000:])


@pytest.fixture(scope="module")
def disk(daemon: Daemon) -> str:
    """Discovered, then logged in with both digests required (the node record asks for CRC32C
    only, so a target that refused them would fail the login, not silently fall back)."""
    targets = run("iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", PORTAL).stdout
    assert re.search(rf"^{re.escape(PORTAL)},\d+ {re.escape(IQN)}$", targets, re.M), targets
    for key in ("HeaderDigest", "DataDigest"):
        run("iscsiadm", "-m", "node", "-T", IQN, "-p", PORTAL, "-o", "update",
            "-n", f"node.conn[0].iscsi.{key}", "-v", "CRC32C")
    return login(IQN, discover=False, portal=PORTAL)


def test_discovery_and_login_negotiate_crc32c_digests(disk: str) -> None:
    session = run("iscsiadm", "-m", "session", "-P", "2").stdout
    block = session[session.index(f"Target: {IQN}"):]
    assert re.search(r"HeaderDigest: CRC32C", block) and re.search(r"DataDigest: CRC32C", block), block
    # data through both digests (the kernel drops a PDU whose digest is wrong, RFC 7143 7.8): a
    # region the other tests do not write, fetched on demand
    offset = SOURCE_SIZE - READ_CHUNK
    assert sha(read_direct(disk, offset, READ_CHUNK)) == sha(SOURCE[offset:]), "read through CRC32C digests"
    assert not kernel_errors()


def test_sg3_utils_commands(daemon: Daemon, disk: str) -> None:
    inq = run("sg_inq", disk).stdout
    assert "LAZYISCS" in inq and re.search(r"Peripheral device type: disk", inq), inq
    serial = run("sg_vpd", "--page=0x80", disk).stdout
    assert re.search(r"Unit serial number: \S+", serial), serial
    ids = run("sg_vpd", "--page=0x83", disk).stdout
    assert "designator" in ids.lower() and "NAA" in ids, ids
    limits = run("sg_vpd", "--page=0xb0", disk).stdout
    assert "Maximum transfer length" in limits, limits
    lbp = run("sg_vpd", "--page=0xb2", disk).stdout
    assert re.search(r"Unmap command supported \(LBPU\): 1", lbp), lbp
    cap = run("sg_readcap", "--16", disk).stdout
    assert f"Last LBA={SOURCE_SIZE // 512 - 1}" in cap and "Logical block length=512" in cap, cap
    luns = run("sg_luns", disk).stdout
    assert re.search(r"^\s+0000000000000000$", luns, re.M), luns
    keys = run("sg_persist", "--in", "--read-keys", disk).stdout
    assert "there are NO registered reservation keys" in keys, keys


def test_whole_device_read_while_hydrating_equals_the_source(daemon: Daemon, disk: str) -> None:
    assert daemon.status("vol0")["local_bytes"] < SOURCE_SIZE, "nothing left to fetch on demand"
    for offset in range(0, SOURCE_SIZE, READ_CHUNK):
        assert read_direct(disk, offset, READ_CHUNK) == SOURCE[offset:offset + READ_CHUNK], offset
    st = daemon.status("vol0")
    assert st["misses"] > 0, st
    assert not kernel_errors()


def fio_job(name: str, region: tuple[int, int], *options: str) -> list[str]:
    offset, size = region
    return [f"--name={name}", f"--offset={offset}", f"--size={size}", *options]


def test_fio_random_read_write_verified(disk: str) -> None:
    """Random reads and writes 16 deep through libaio with O_DIRECT, every written block checked
    against its CRC32C when read back (verify_fatal: the first bad block fails the job)."""
    r = run("fio", "--output-format=json", f"--filename={disk}", "--direct=1", "--ioengine=libaio",
            "--iodepth=16", "--rw=randrw", "--rwmixread=50", "--verify=crc32c", "--do_verify=1",
            "--verify_fatal=1", "--verify_state_save=0", "--randrepeat=0",
            *fio_job("rand4k", FIO_4K, "--bs=4k"),
            *fio_job("mixed", FIO_MIXED, "--bssplit=4k/50:64k/50"),
            check=False, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    jobs = {job["jobname"]: job for job in json.loads(r.stdout[r.stdout.index("{"):])["jobs"]}
    assert set(jobs) == {"rand4k", "mixed"}, jobs.keys()
    for name, job in jobs.items():
        assert job["error"] == 0, (name, job["error"])
        assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0, (name, job["write"], job["read"])
    for offset, size in (FIO_4K, FIO_MIXED):  # fio's blocks reached the target, not only a cache
        assert read_direct(disk, offset, size) != SOURCE[offset:offset + size], offset
    assert read_direct(disk, 0, FIO_4K[0]) == SOURCE[:FIO_4K[0]], "fio wrote outside its region"
    assert not kernel_errors()


def test_blkdiscard_reads_back_zeros(disk: str) -> None:
    """The kernel picks UNMAP from our VPD pages (LBPU in the SBC-4 Logical Block Provisioning
    page, a maximum UNMAP LBA count in Block Limits); the discarded blocks read zeros (LBPRZ=1),
    whole units and a few blocks across a unit boundary alike, and their neighbours are untouched."""
    queue = Path("/sys/block") / Path(disk).name
    (mode,) = (queue / "device" / "scsi_disk").glob("*/provisioning_mode")
    assert mode.read_text().strip() == "unmap"
    assert int((queue / "queue" / "discard_max_bytes").read_text()) > 0
    granularity = int((queue / "queue" / "discard_granularity").read_text())
    small = DISCARD_SMALL_AT + max(granularity, DISCARD_SMALL_LEN) - DISCARD_SMALL_LEN // 2
    expected = bytearray(SOURCE)
    for offset, length in (DISCARD, (small, DISCARD_SMALL_LEN)):
        assert any(read_direct(disk, offset, length)), "nothing to discard"
        run("blkdiscard", "-o", str(offset), "-l", str(length), disk)
        expected[offset:offset + length] = bytes(length)
    start = FIO_MIXED[0] + FIO_MIXED[1]
    for offset in range(start, SOURCE_SIZE, READ_CHUNK):  # digests: pytest's diff of 4 MiB takes minutes
        assert sha(read_direct(disk, offset, READ_CHUNK)) == sha(expected[offset:offset + READ_CHUNK]), offset
    assert not kernel_errors()


def test_mkfs_and_fsck_clean(disk: str) -> None:
    run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0", disk)
    fsck = run("e2fsck", "-f", "-n", disk, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert not kernel_errors()


def test_clean_logout(daemon: Daemon, disk: str) -> None:
    run("iscsiadm", "-m", "node", "-T", IQN, "-p", PORTAL, "--logout")
    assert disk_of(IQN) is None
    sessions = run("iscsiadm", "-m", "session", check=False)
    assert IQN not in sessions.stdout
    assert daemon.proc is not None and daemon.proc.poll() is None, "serve went down with the session"
