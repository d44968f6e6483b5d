"""Bad input through the real command (issue 14, finding 9): each is one line on stderr naming
the field or option, exit status 2, never "internal error" or a traceback. And an IPv6 listen
address, which used to end in "internal error", works."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.peers import MiB, free_port, make_image

LAZYISCSI = [sys.executable, "-m", "lazyiscsi.cli"]

CONFIGS = {
    "portal_not_a_table": (b"portal = 5\n", "portal: must be a table"),
    "listen_not_a_string": (b"[portal]\nlisten = 5\n", "portal.listen: must be a string"),
    "listen_unclosed_ipv6": (b'[portal]\nlisten = "[::1:3260"\n', "portal.listen"),
    "portal_unknown_key": (b"[portal]\nlisten = \"127.0.0.1:1\"\nport = 3\n", "portal.port: unknown key"),
    "not_utf8": (b"\xff\xfe = 1\n", "not UTF-8 text (byte 0xff at offset 0)"),
    "unparsable_source": (b'[[volume]]\nname = "a"\nsource = "http://[::1"\ncache = "/c"\n'
                          b'target = "iqn.2026-11.t:a"\n', "volume[0].source: not a valid URL"),
    "unit_above_run": (b'[[volume]]\nname = "a"\nsource = "/x"\ncache = "/c"\ntarget = "iqn.2026-11.t:a"\n'
                       b"unit = 2097152\n", "volume[0].unit: must be an integer from 512 to 1048576"),
}


def one_line_usage_error(r: subprocess.CompletedProcess[str], needle: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_bad_config_files(tmp_path: Path, case: str) -> None:
    text, needle = CONFIGS[case]
    conf = tmp_path / "lazy.toml"
    conf.write_bytes(text)
    r = subprocess.run([*LAZYISCSI, "serve", "--config", str(conf)], capture_output=True, text=True,
                       timeout=60)
    one_line_usage_error(r, f"{conf}: {needle}")


@pytest.mark.parametrize(("args", "needle"), [
    (["serve", "--source", "http://[::1", "--cache", "c"], "--source: not a valid URL (Invalid IPv6 URL)"),
    (["hydrate", "--source", "http://[::1", "--cache", "c"], "--source: not a valid URL (Invalid IPv6 URL)"),
    (["hydrate", "--source", "nbd://h:99999/e", "--cache", "c"], "--source: not a valid URL"),
    (["volume", "create", "v", "--source", "http://[::1"], "--source: not a valid URL"),
    (["serve", "--nop-interval", "nan"], "--nop-interval: 'nan' is not a finite number"),
    (["serve", "--nop-interval", "inf"], "--nop-interval: 'inf' is not a finite number"),
    (["serve", "--nop-interval", "-1"], "--nop-interval: '-1' must not be negative"),
    (["status", "--watch", "--interval", "nan"], "--interval: 'nan' is not a finite number"),
    (["status", "--watch", "--interval", "0"], "--interval: '0' is below 0.1"),
    (["hydrate", "--source", "x", "--cache", "c", "--stall-timeout", "-inf"], "--stall-timeout"),
    (["serve", "--listen", "[::1"], "--listen: '[::1': an IPv6 address is written [ADDRESS]:PORT"),
    (["serve", "--listen", "[fe80::zz]:3260"], "is not an IPv6 address"),
    (["serve", "--listen", "127.0.0.1:70000"], "port out of range"),
    (["serve", "--iqn", "vm1"], "--iqn: 'vm1' is not an iSCSI name"),
    (["serve", "--iqn-prefix", "lazy"], "--iqn-prefix: 'lazy' is not an iSCSI name"),
    (["serve", "--source-file", "/nonexistent/url", "--cache", "c"],
     "--source-file /nonexistent/url: cannot read"),
])
def test_bad_options(tmp_path: Path, args: list[str], needle: str) -> None:
    r = subprocess.run([*LAZYISCSI, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       stdin=subprocess.DEVNULL)
    one_line_usage_error(r, needle)
    assert not (tmp_path / "c").exists()


def test_serve_listens_on_ipv6(tmp_path: Path) -> None:
    image = tmp_path / "src.img"
    make_image(image, 4 * MiB)
    port = free_port()
    proc = subprocess.Popen([*LAZYISCSI, "serve", "--source", str(image), "--cache", str(tmp_path / "c.img"),
                             "--listen", f"[::1]:{port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        first = proc.stdout.readline()  # type: ignore[union-attr]
        assert f"on [::1]:{port} (portal)" in first, first + proc.stderr.read()  # type: ignore[union-attr]
        url = proc.stdout.readline()  # type: ignore[union-attr]
        assert f"iscsi://[::1]:{port}/iqn.2026-11.io.lazyiscsi:vol0/0" in url, url
        with socket.create_connection(("::1", port), timeout=10):
            pass
        inq = subprocess.run(["iscsi-inq", "-i", "iqn.2024-01.test:v6", url.split()[-1]],
                             capture_output=True, text=True, timeout=60)
        assert inq.returncode == 0 and re.search(r"Vendor:\s*LAZYISCS", inq.stdout), inq.stdout + inq.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "internal error" not in err, err
