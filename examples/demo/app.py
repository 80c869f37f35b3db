#!/usr/bin/env python3
"""The demo's sample service: what a program needs to do to be flipped with zero failed requests.

1. Serve on the socket flipvisor passes as fd 3 (systemd socket activation: ``LISTEN_FDS=1``,
   ``LISTEN_PID`` = our PID). Every worker of a generation shares it, so it is made non-blocking:
   all workers wake up for a new connection, one wins ``accept()``, the others must not block.
2. Answer ``GET /health`` (200 when ready) for the readiness probe; ``--health-fail`` answers 503,
   which is how the demo makes a version that never becomes ready.
3. On SIGTERM: stop accepting, close idle keep-alive connections, finish requests in flight, exit 0.

``GET /`` answers ``{"version", "pid", "generation", "worker"}``. Stdlib only; ``--port`` binds
its own socket instead (to try it without flipvisor).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading  # noqa: TID251 -- a small blocking example server, not supervisor code
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DRAIN_TIMEOUT = 10.0  # seconds to finish in-flight requests after SIGTERM


class Server(ThreadingHTTPServer):
    """Knows its open connections, so a stop can end the idle ones and wait for the busy ones."""

    daemon_threads = True

    def __init__(self, sock: socket.socket, opts: argparse.Namespace) -> None:
        super().__init__(sock.getsockname()[:2], Handler, bind_and_activate=False)
        self.socket.close()  # the base class made a socket of its own: use the inherited one
        self.socket = sock
        self.opts = opts
        self.cond = threading.Condition()
        self.busy: dict[socket.socket, bool] = {}  # open connection -> in the middle of a request
        self.stopping = False

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.cond:  # registered before its thread starts, so a stop never misses it
            self.busy[request] = False
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        try:
            super().shutdown_request(request)
        finally:
            with self.cond:
                self.busy.pop(request, None)
                self.cond.notify_all()

    def mark(self, conn: socket.socket, busy: bool) -> None:
        with self.cond:
            if conn in self.busy:
                self.busy[conn] = busy

    def drain(self) -> None:
        """After shutdown(): wake idle connections with EOF, let busy ones answer, then return."""
        with self.cond:
            self.stopping = True
            for conn, busy in self.busy.items():
                if not busy:
                    with contextlib.suppress(OSError):  # already closed by the client
                        conn.shutdown(socket.SHUT_RD)  # reading ends, an answer can still go out
            self.cond.wait_for(lambda: not self.busy, timeout=DRAIN_TIMEOUT)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as nginx's upstream pool uses it
    server: Server

    def parse_request(self) -> bool:
        self.server.mark(self.connection, True)  # a request line arrived: busy until answered
        return super().parse_request()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        finally:
            self.server.mark(self.connection, False)
            if self.server.stopping:
                self.close_connection = True

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/health":
            failing = self.server.opts.health_fail
            self.answer(503 if failing else 200, {"status": "failing" if failing else "ok"})
        else:
            self.answer(200, {
                "version": self.server.opts.version,
                "pid": os.getpid(),
                "generation": os.environ.get("FLIPVISOR_GENERATION"),
                "worker": os.environ.get("FLIPVISOR_WORKER"),
            })

    def answer(self, status: int, payload: dict[str, Any]) -> None:
        data = (json.dumps(payload) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.server.stopping:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would flood flipvisor's log under load


def listening_socket(port: int | None) -> socket.socket:
    """fd 3 when flipvisor (or systemd) passed it to us, else our own on ``port``."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and int(os.environ.get("LISTEN_FDS", "0")):
        sock = socket.socket(fileno=3)
    else:
        sock = socket.create_server(("127.0.0.1", port or 8000))
    # Shared with the generation's other workers: accept() must not block in the loser of a race.
    sock.setblocking(False)
    return sock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="v1")
    parser.add_argument("--health-fail", action="store_true", help="GET /health answers 503")
    parser.add_argument("--port", type=int, help="without flipvisor: bind this port")
    opts = parser.parse_args()

    # Blocked before any thread starts, so only sigwait below ever sees them.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    sock = listening_socket(opts.port)
    server = Server(sock, opts)
    serving = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True)
    serving.start()
    print(f"app {opts.version} pid {os.getpid()} serving on port {sock.getsockname()[1]}",
          flush=True)
    signal.sigwait(stop_signals)
    server.shutdown()  # serve_forever returns: nothing new is accepted
    sock.close()
    server.drain()
    print(f"app {opts.version} pid {os.getpid()} drained, exiting", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
