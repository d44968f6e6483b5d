"""nginx on loopback for the HTTP source tests: our own instance and config, never the system's."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.integration.peers import free_port, wait_listening, wait_until


class Nginx:
    def __init__(self, root: Path, workdir: Path, *, tls: tuple[Path, Path] | None = None,
                 htpasswd: Path | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        listen = f"127.0.0.1:{self.port}" + (" ssl" if tls else "")
        tls_conf = f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};" if tls else ""
        auth = f'auth_basic "lazy"; auth_basic_user_file {htpasswd};' if htpasswd else ""
        conf = workdir / "nginx.conf"
        conf.write_text(f"""
daemon off;
user root;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 64; }}
http {{
  log_format conn '$connection';
  access_log {workdir}/access.log conn;
  client_body_temp_path {workdir}/body; proxy_temp_path {workdir}/proxy;
  fastcgi_temp_path {workdir}/fastcgi; uwsgi_temp_path {workdir}/uwsgi; scgi_temp_path {workdir}/scgi;
  keepalive_requests 10000;
  server {{ listen {listen}; root {root}; {tls_conf} {auth} }}
}}
""")
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.port, self.proc)
        self.scheme = "https" if tls else "http"

    def url(self, name: str, auth: str = "") -> str:
        return f"{self.scheme}://{auth}127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def connections_seen(self, requests: int) -> int:
        """Distinct connections in the access log (the $connection serial of each request),
        once it holds at least ``requests`` requests: nginx writes a line after its response
        went out, so the client can be done before the log is."""
        log = self.workdir / "access.log"
        serials = wait_until(lambda: len(s := log.read_text().split()) >= requests and s,
                             f"{requests} requests in nginx's access log")
        return len(set(serials))
