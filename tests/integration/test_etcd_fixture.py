"""The etcd test fixture: an etcd whose port another process took is never taken for healthy,
even when that other process answers ``/health`` as an etcd would (another test's etcd)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import require_binary
from tests.fixtures.etcd import EtcdServer, PortTaken


class _HealthyAnswer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"health":"true"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def another_etcd_s_port() -> Iterator[int]:
    """A port where something else answers ``/health`` with etcd's healthy answer."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HealthyAnswer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_an_etcd_whose_port_was_taken_is_not_healthy(
    tmp_path: Path, another_etcd_s_port: int
) -> None:
    server = EtcdServer(
        binary=require_binary("etcd"),
        data_dir=tmp_path / "etcd-data",
        client_port=another_etcd_s_port,
    )
    try:
        with pytest.raises(PortTaken, match="address already in use"):
            server.start()
    finally:
        server.stop()
