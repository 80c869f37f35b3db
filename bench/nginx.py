"""A private nginx (master + one worker, ``daemon off``) in a temp prefix, in front of one tool."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import jinja2

from bench.common import TEMPLATE, free_port, launch, stop_tree, wait_until


@dataclass
class Nginx:
    prefix: Path
    listen: int
    process: subprocess.Popen[bytes]

    @property
    def conf(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def pidfile(self) -> Path:
        return self.prefix / "nginx.pid"

    @property
    def snippet(self) -> Path:
        return self.prefix / "conf.d" / "web.conf"

    def _cmd(self, *args: str) -> list[str]:
        return ["nginx", *args, "-c", str(self.conf), "-p", str(self.prefix),
                "-e", str(self.prefix / "logs" / "error.log")]

    @property
    def check_cmd(self) -> list[str]:
        return self._cmd("-t", "-q")

    @property
    def reload_cmd(self) -> list[str]:
        return self._cmd("-s", "reload")

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.listen}{path}"

    def route_to(self, port: int) -> None:
        """Write the snippet flipvisor would render (same template) for a fixed upstream port,
        and reload; for the peers, whose upstream never moves."""
        text = jinja2.Template(TEMPLATE.read_text()).render(
            program="web", port=port, host="127.0.0.1", generation=1, pids=[],
            upstreams=[f"127.0.0.1:{port}"], listen=self.listen,
        )
        self.snippet.write_text(text)
        subprocess.run(self.reload_cmd, check=True, capture_output=True)

    def stop(self) -> None:
        stop_tree(self.process, signal.SIGQUIT, grace=10)


def start_nginx(directory: Path) -> Nginx:
    """Start nginx in ``directory``; its http {} includes ``conf.d/*.conf``.

    Raises:
        TimeoutError: it did not come up.
    """
    prefix = directory / "nginx"
    for name in ("conf.d", "logs", "temp"):
        (prefix / name).mkdir(parents=True, exist_ok=True)
    health = free_port()
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = prefix / "temp"
    (prefix / "nginx.conf").write_text(f"""{user}daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
worker_shutdown_timeout 10s;
error_log {prefix}/logs/error.log notice;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {temp}/client_body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen 127.0.0.1:{health};
        location = /__health {{ return 200 "ok\\n"; }}
    }}
    include {prefix}/conf.d/*.conf;
}}
""")
    process = launch(["nginx", "-c", str(prefix / "nginx.conf"), "-p", str(prefix),
                      "-e", str(prefix / "logs" / "error.log")], prefix / "logs" / "stderr.log")
    server = Nginx(prefix, free_port(), process)
    from bench.common import http_ok
    try:
        wait_until(lambda: process.poll() is None and http_ok(health, "/__health"), 10,
                   "nginx to listen")
    except BaseException:
        server.stop()
        raise
    return server
