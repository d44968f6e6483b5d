"""A source URL's credentials stay out of what other local users and the logs see (issue 14,
finding 7): `serve`, `hydrate` and `volume create` take the URL from a file, the environment or
standard input, so it never reaches /proc/PID/cmdline; given on the command line it still works,
with a warning naming the safer ways; and nothing the daemon shows (status, list, stdout, log
events) holds the password or any query value. The source is nginx behind HTTP basic auth."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.http_servers import Nginx
from tests.integration.peers import MiB, free_port, make_image, wait_listening

PASSWORD = "pw-only-root-may-know"
TOKEN = "query-token-also-secret"  # nginx ignores the query of a static file; we must hide it
LAZYISCSI = [sys.executable, "-m", "lazyiscsi.cli"]


@pytest.fixture
def protected_url(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "www"
    root.mkdir()
    make_image(root / "disk.img", 2 * MiB)
    hashed = subprocess.run(["openssl", "passwd", "-apr1", PASSWORD], check=True, capture_output=True,
                            text=True).stdout.strip()
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"op:{hashed}\n")
    server = Nginx(root, tmp_path / "nginx", htpasswd=htpasswd)
    yield server.url("disk.img", f"op:{PASSWORD}@") + f"?x-token={TOKEN}"
    server.stop()


def secret_free(text: str) -> bool:
    return PASSWORD not in text and TOKEN not in text


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def environ_of(pid: int) -> str:
    return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")


def how(form: str, url: str, tmp_path: Path) -> tuple[list[str], dict[str, str], str | None]:
    """The arguments, environment and standard input that hand ``url`` over in ``form``."""
    if form == "file":
        path = tmp_path / "source.url"
        path.write_text(url + "\n")
        path.chmod(0o600)
        return ["--source-file", str(path)], dict(os.environ), None
    if form == "env":
        return [], {**os.environ, "LAZYISCSI_SOURCE": url}, None
    return ["--source", "-"], dict(os.environ), url + "\n"


@pytest.mark.parametrize("form", ["file", "env", "stdin"])
def test_serve_keeps_the_password_off_the_command_line_and_out_of_sight(
        tmp_path: Path, protected_url: str, form: str) -> None:
    args, env, stdin = how(form, protected_url, tmp_path)
    port = free_port()
    read_end, write_end = os.pipe()  # a pipe, as `vault read ... | lazyiscsi serve --source -`
    os.write(write_end, (stdin or "").encode())
    os.close(write_end)
    proc = subprocess.Popen([*LAZYISCSI, "serve", *args, "--cache", str(tmp_path / "c.img"),
                             "--listen", f"127.0.0.1:{port}"], stdin=read_end,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    os.close(read_end)
    shown = ""
    try:
        wait_listening(port, proc)  # type: ignore[arg-type]
        assert secret_free(cmdline(proc.pid)), cmdline(proc.pid)
        if form == "env":  # the environment is the owner's only (mode 0400), not every user's
            assert os.stat(f"/proc/{proc.pid}/environ").st_mode & 0o077 == 0
            assert PASSWORD in environ_of(proc.pid)
        for verb in (["status"], ["status", "--json"], ["volume", "list", "--json"]):
            r = subprocess.run([*LAZYISCSI, *verb], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            shown += r.stdout + r.stderr
        (vol,) = json.loads(subprocess.run([*LAZYISCSI, "status", "--json"], capture_output=True,
                                           text=True, timeout=60).stdout)
        host_port = protected_url.split("@")[1].split("/")[0]
        assert vol["source"] == f"http://op:***@{host_port}/disk.img?x-token=***", vol
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "serving http://op:***@" in out
    assert "source_secret_on_command_line" not in err  # nothing to warn about
    assert secret_free(shown + out + err)


def test_hydrate_from_a_file_and_on_the_command_line_with_a_warning(
        tmp_path: Path, protected_url: str) -> None:
    args, env, _ = how("file", protected_url, tmp_path)
    r = subprocess.run([*LAZYISCSI, "hydrate", *args, "--cache", str(tmp_path / "a.img")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and "source_secret_on_command_line" not in r.stderr, r.stderr
    assert secret_free(r.stdout + r.stderr)
    # on the command line: it works, and says so, naming the safer ways and not the secret
    r = subprocess.run([*LAZYISCSI, "hydrate", "--source", protected_url, "--cache", str(tmp_path / "b.img")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (warning,) = [json.loads(line) for line in r.stderr.splitlines()
                  if "source_secret_on_command_line" in line]
    assert warning["level"] == "warning" and "/proc/PID/cmdline" in warning["reason"]
    assert all(way in warning["instead"] for way in ("--source-file", "LAZYISCSI_SOURCE", "--source -"))
    assert secret_free(r.stdout + r.stderr)
    assert (tmp_path / "a.img").read_bytes() == (tmp_path / "b.img").read_bytes()


def test_volume_create_takes_the_url_from_a_file_the_environment_or_stdin(
        tmp_path: Path, protected_url: str) -> None:
    port = free_port()
    serve = subprocess.Popen([*LAZYISCSI, "serve", "--listen", f"127.0.0.1:{port}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shown = ""
    try:
        wait_listening(port, serve)  # type: ignore[arg-type]
        for name, form in (("viafile", "file"), ("viaenv", "env"), ("viastdin", "stdin")):
            args, env, stdin = how(form, protected_url, tmp_path)
            r = subprocess.run([*LAZYISCSI, "volume", "create", name, *args, "--json"], input=stdin or "",
                               capture_output=True, text=True, timeout=120, env=env)
            assert r.returncode == 0, (form, r.stderr)
            assert json.loads(r.stdout)["size"] == 2 * MiB
            shown += r.stdout + r.stderr
        for verb in (["status"], ["volume", "list", "--json"]):
            r = subprocess.run([*LAZYISCSI, *verb], capture_output=True, text=True, timeout=60)
            names = ("viafile", "viaenv", "viastdin")
            assert r.returncode == 0 and all(n in r.stdout for n in names), r.stdout + r.stderr
            shown += r.stdout + r.stderr
        assert r.stdout.count("/disk.img?x-token=***") == 3, r.stdout
        # none given: one line naming the three ways
        env = {k: v for k, v in os.environ.items() if k != "LAZYISCSI_SOURCE"}
        r = subprocess.run([*LAZYISCSI, "volume", "create", "none"], capture_output=True, text=True,
                           timeout=60, env=env, stdin=subprocess.DEVNULL)
        assert r.returncode == 2 and "--source URL, --source-file PATH or $LAZYISCSI_SOURCE" in r.stderr
    finally:
        serve.send_signal(signal.SIGTERM)
        out, err = serve.communicate(timeout=30)
    assert secret_free(shown + out + err)


def test_a_restart_with_the_source_down_keeps_the_secret_out_of_status_and_log(tmp_path: Path) -> None:
    """The reason a restart could not open the source (``source_health: "error: ..."``, the
    ``volume_source_unreachable`` event) names the URL without its password or query."""
    root = tmp_path / "www"
    root.mkdir()
    make_image(root / "disk.img", 2 * MiB)
    hashed = subprocess.run(["openssl", "passwd", "-apr1", PASSWORD], check=True, capture_output=True,
                            text=True).stdout.strip()
    (tmp_path / "htpasswd").write_text(f"op:{hashed}\n")
    server = Nginx(root, tmp_path / "nginx", htpasswd=tmp_path / "htpasswd")
    url = server.url("disk.img", f"op:{PASSWORD}@") + f"?x-token={TOKEN}"
    port, log = free_port(), tmp_path / "serve.log"

    def serve() -> subprocess.Popen[str]:
        proc = subprocess.Popen([*LAZYISCSI, "serve", "--listen", f"127.0.0.1:{port}",
                                 "--connect-timeout", "2"],
                                stdout=subprocess.DEVNULL, stderr=log.open("a"), text=True)
        wait_listening(port, proc)  # type: ignore[arg-type]
        return proc

    def stop(proc: subprocess.Popen[str]) -> None:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0

    proc = serve()
    try:
        # 64 KB/s: still hydrating when serve stops, so the restart needs the source
        r = subprocess.run([*LAZYISCSI, "volume", "create", "vol", "--source", "-", "--rate", "64K"],
                           input=url + "\n", capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    finally:
        stop(proc)
        server.stop()
    proc = serve()
    try:
        r = subprocess.run([*LAZYISCSI, "status", "vol", "--json"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        (vol,) = json.loads(r.stdout)
        assert vol["state"] == "running" and vol["source_health"].startswith("error: "), vol
    finally:
        stop(proc)
    text = log.read_text()
    assert '"volume_source_unreachable"' in text, text
    assert secret_free(r.stdout + text), r.stdout + text
