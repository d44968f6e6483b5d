"""`lazyiscsi serve --config`: several LUNs on one target, an ACL and CHAP, checked with libiscsi.
A refused session never disturbs another."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.integration.peers import MiB, free_port, make_image, wait_listening

SECRET = "chap-secret-for-tests"
ALLOWED = "iqn.2024-01.test:allowed"


def inq(url: str, initiator: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iscsi-inq", "-i", initiator, url], capture_output=True, text=True, timeout=30)


def test_luns_acl_and_chap(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_image(a, 4 * MiB, seed=1)
    make_image(b, 8 * MiB, seed=2)
    port = free_port()
    conf = tmp_path / "lazy.toml"
    conf.write_text(f"""
[portal]
listen = "127.0.0.1:{port}"

[[volume]]
name = "a"
source = "{a}"
cache = "{tmp_path / 'a.cache'}"
target = "iqn.2026-11.test:secure"
allowed_initiators = ["{ALLOWED}"]
chap = {{ user = "host1", secret = "{SECRET}" }}

[[volume]]
name = "b"
source = "{b}"
cache = "{tmp_path / 'b.cache'}"
target = "iqn.2026-11.test:secure"
lun = 1
block_size = 4096
allowed_initiators = ["{ALLOWED}"]
chap = {{ user = "host1", secret = "{SECRET}" }}

[[volume]]
name = "open"
source = "{a}"
cache = "{tmp_path / 'open.cache'}"
target = "iqn.2026-11.test:open"
""")
    proc = subprocess.Popen([sys.executable, "-m", "lazyiscsi.cli", "serve", "--config", str(conf)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(port, proc)  # type: ignore[arg-type]
        secure = f"iscsi://host1%{SECRET}@127.0.0.1:{port}/iqn.2026-11.test:secure"
        ok0, ok1 = inq(f"{secure}/0", ALLOWED), inq(f"{secure}/1", ALLOWED)
        assert ok0.returncode == 0 and ok1.returncode == 0, ok0.stderr + ok1.stderr
        rc = subprocess.run(["iscsi-readcapacity16", "-i", ALLOWED, f"{secure}/1"], capture_output=True,
                            text=True, timeout=30).stdout
        assert "LOGICAL BLOCK LENGTH IN BYTES:4096" in rc
        # wrong secret, no CHAP at all, an initiator outside the ACL: all refused
        wrong = f"iscsi://host1%wrong-secret-xyz@127.0.0.1:{port}/iqn.2026-11.test:secure/0"
        assert inq(wrong, ALLOWED).returncode != 0
        assert inq(f"iscsi://127.0.0.1:{port}/iqn.2026-11.test:secure/0", ALLOWED).returncode != 0
        assert inq(f"{secure}/0", "iqn.2024-01.test:stranger").returncode != 0
        # the open target and the secure one still serve
        open_url = f"iscsi://127.0.0.1:{port}/iqn.2026-11.test:open/0"
        assert inq(open_url, "iqn.2024-01.test:any").returncode == 0
        assert inq(f"{secure}/1", ALLOWED).returncode == 0
        listing = subprocess.run(["iscsi-ls", "-i", "iqn.2024-01.test:stranger", "-s",
                                  f"iscsi://127.0.0.1:{port}"],
                                 capture_output=True, text=True, timeout=30).stdout
        assert "test:open" in listing and "test:secure" not in listing  # discovery honours the ACL
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert SECRET not in out + err and "wrong-secret-xyz" not in out + err
    assert "Traceback" not in err


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text('[[volume]]\nname = "x"\nsource = "/x"\ncache = "/c"\ntarget = "iqn.x:y"\nlun = 99999\n')
    r = subprocess.run([sys.executable, "-m", "lazyiscsi.cli", "serve", "--config", str(conf)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "volume[0].lun" in r.stderr, r.stderr


def test_mutual_chap_with_libiscsi(tmp_path: Path) -> None:
    """The target proves itself too: libiscsi checks our CHAP_R against target_password and
    refuses a target that answers with another secret."""
    img = tmp_path / "m.img"
    make_image(img, 4 * MiB, seed=3)
    port = free_port()
    conf = tmp_path / "mutual.toml"
    conf.write_text(f"""
[portal]
listen = "127.0.0.1:{port}"

[[volume]]
name = "m"
source = "{img}"
cache = "{tmp_path / 'm.cache'}"
target = "iqn.2026-11.test:mutual"
chap = {{ user = "host1", secret = "{SECRET}", mutual_user = "tgt1", mutual_secret = "target-secret-123" }}
""")
    proc = subprocess.Popen([sys.executable, "-m", "lazyiscsi.cli", "serve", "--config", str(conf)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(port, proc)  # type: ignore[arg-type]
        base = f"iscsi://host1%{SECRET}@127.0.0.1:{port}/iqn.2026-11.test:mutual/0"
        good = inq(f"{base}?target_user=tgt1&target_password=target-secret-123", ALLOWED)
        assert good.returncode == 0 and "Vendor:LAZYISCS" in good.stdout, (
            good.stdout + good.stderr)
        bad = inq(f"{base}?target_user=tgt1&target_password=not-the-target-secret", ALLOWED)
        assert bad.returncode != 0, bad.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    for secret in (SECRET, "target-secret-123"):
        assert secret not in out + err


def test_frontend_lio_where_the_kernel_has_none_is_one_line(tmp_path: Path) -> None:
    """This machine's kernel has no target_core_user: asked for LIO, serve says so and stops."""
    r = subprocess.run([sys.executable, "-m", "lazyiscsi.cli", "serve", "--frontend", "lio",
                        "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0"],
                       capture_output=True, text=True, timeout=60)
    lines = [line for line in r.stderr.splitlines() if not line.startswith("{")]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "--frontend lio" in lines[0] and "target_core_user" in lines[0], lines
    assert "Traceback" not in r.stderr
