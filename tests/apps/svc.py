#!/usr/bin/env python3
"""A stdlib-only HTTP test service: the worker every integration/e2e test and the demo runs.

It serves on the socket inherited as fd 3 (systemd socket activation: ``LISTEN_FDS`` with
``LISTEN_PID`` equal to our own PID), else binds ``--port`` itself. Knobs come from argv flags,
with ``FLIPVISOR_SVC_<FLAG>`` environment variables as fallback (``--ready-delay`` →
``FLIPVISOR_SVC_READY_DELAY``; boolean flags are on when the variable is ``1``/``true``/``yes``).

``GET /`` answers ``{"version": V, "pid": P, "generation": G, "worker": W}`` (G and W from
``FLIPVISOR_GENERATION``/``FLIPVISOR_WORKER``, as numbers when they are numeric, else null);
``GET /health`` answers 200 (503 with ``--health-fail``). SIGTERM/SIGINT: stop accepting, finish
in-flight requests, exit 0.

Gates, for tests whose premise must not depend on how fast the machine is: ``--serve-after PATH``
(serve only once PATH exists), ``--answer-after PATH`` (hold every answer until it exists) and
``--stop-after PATH`` (after a stop signal, finish the shutdown only once it exists). The test
creates the file once its premise is in place.

Signals are handled without Python handlers: they are blocked in every thread and the main thread
collects them with ``sigtimedwait``/``sigwaitinfo``, so nothing races ``serve_forever``.
Deliberately imports nothing from flipvisor, so it starts fast and tests stay honest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LISTEN_FDS_START = 3
CRASH_EXIT_CODE = 3
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
# A connection accepted just before a stop has sent (or is sending) its first request: it gets
# this long to arrive before the connection counts as idle. On a socket shared with the next
# generation (a fixed port) the old workers accept until the very end.
FIRST_REQUEST_GRACE = 1.0
NEW, BUSY, IDLE = "new", "busy", "idle"  # a connection's state
GATE_POLL = 0.05  # how often a closed gate (a file not there yet) is looked at


def _env(name: str) -> str | None:
    return os.environ.get(f"FLIPVISOR_SVC_{name}")


def _env_flag(name: str) -> bool:
    return (_env(name) or "").strip().lower() in {"1", "true", "yes", "on"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, each defaulting to its FLIPVISOR_SVC_* environment variable."""
    p = argparse.ArgumentParser(prog="svc", description=__doc__.splitlines()[0])
    p.add_argument("--version", default=_env("VERSION") or "0")
    p.add_argument("--host", default=_env("HOST") or "127.0.0.1")
    p.add_argument("--port", type=int, default=int(_env("PORT") or 0))
    p.add_argument("--ready-delay", type=float, default=float(_env("READY_DELAY") or 0))
    # Gates a test opens by creating the file, whatever the machine's load: serve only once it
    # exists; hold every answer until it exists; on a stop signal, stop accepting, then finish
    # the shutdown (and exit) only once it exists.
    p.add_argument("--serve-after", default=_env("SERVE_AFTER") or None)
    p.add_argument("--answer-after", default=_env("ANSWER_AFTER") or None)
    p.add_argument("--stop-after", default=_env("STOP_AFTER") or None)
    p.add_argument("--health-fail", action="store_true", default=_env_flag("HEALTH_FAIL"))
    p.add_argument("--crash-after", type=float, default=float(_env("CRASH_AFTER") or 0) or None)
    exit_default = _env("EXIT_AT_START")
    p.add_argument(
        "--exit-at-start",
        type=int,
        default=int(exit_default) if exit_default not in (None, "") else None,
    )
    p.add_argument("--ignore-term", action="store_true", default=_env_flag("IGNORE_TERM"))
    p.add_argument("--notify", action="store_true", default=_env_flag("NOTIFY"))
    p.add_argument("--markers", default=_env("MARKERS") or None)
    p.add_argument("--output-mb", type=float, default=float(_env("OUTPUT_MB") or 0))
    p.add_argument("--slow-ms", type=float, default=float(_env("SLOW_MS") or 0))
    return p.parse_args(argv)


def _number_or_none(value: str | None) -> int | str | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        return value


def mark(path: str | None, word: str) -> None:
    """Append ``WORD pid`` to the markers file (tests poll it with a deadline)."""
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{word} {os.getpid()}\n")


def inherited_socket() -> socket.socket | None:
    """The socket passed as fd 3, if LISTEN_FDS/LISTEN_PID say it is meant for us."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS") or 0) < 1:
        return None
    return socket.socket(fileno=LISTEN_FDS_START)


def own_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


def sd_notify(message: str) -> None:
    """Send ``message`` to $NOTIFY_SOCKET (abstract when it starts with '@'), if set."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), address)


class Server(ThreadingHTTPServer):
    """Tracks connections so a stop can close idle keep-alive ones, give new ones a moment to
    send their first request, and wait for busy ones."""

    daemon_threads = True

    def __init__(self, sock: socket.socket, opts: argparse.Namespace) -> None:
        super().__init__(sock.getsockname()[:2], Handler, bind_and_activate=False)
        # TCPServer.__init__ made a socket of its own we never use; swap in ours.
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()
        self.opts = opts
        self.cond = threading.Condition()
        self.stopping = False
        self.conns: dict[socket.socket, str] = {}  # connection → NEW, BUSY or IDLE

    def body(self) -> dict[str, Any]:
        return {
            "version": self.opts.version,
            "pid": os.getpid(),
            "generation": _number_or_none(os.environ.get("FLIPVISOR_GENERATION")),
            "worker": _number_or_none(os.environ.get("FLIPVISOR_WORKER")),
        }

    def process_request(self, request: Any, client_address: Any) -> None:
        # Registered here, in the accepting thread, so a drain that follows shutdown() can
        # never miss a connection whose handler thread has not started yet.
        with self.cond:
            self.conns[request] = NEW
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        try:
            super().shutdown_request(request)
        finally:
            with self.cond:
                self.conns.pop(request, None)
                self.cond.notify_all()

    def set_busy(self, conn: socket.socket, busy: bool) -> None:
        with self.cond:
            if conn in self.conns:
                self.conns[conn] = BUSY if busy else IDLE
            self.cond.notify_all()

    def drain(self) -> None:
        """After shutdown(): end idle connections, wait for busy ones to answer, and for new
        ones' first request up to ``FIRST_REQUEST_GRACE``."""
        grace_ends = time.monotonic() + FIRST_REQUEST_GRACE
        with self.cond:
            self.stopping = True
            while self.conns:
                grace_left = grace_ends - time.monotonic()
                for conn, state in self.conns.items():
                    if state == IDLE or (state == NEW and grace_left <= 0):
                        # SHUT_RD wakes the waiting reader with EOF; a request it already read
                        # can still be answered, since writing stays open.
                        with contextlib.suppress(OSError):
                            conn.shutdown(socket.SHUT_RD)
                self.cond.wait(timeout=grace_left if grace_left > 0 else None)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        finally:
            self.server.set_busy(self.connection, False)
            if self.server.stopping:
                self.close_connection = True

    def parse_request(self) -> bool:
        # Called once a request line has been read: from here on the connection is busy.
        self.server.set_busy(self.connection, True)
        return super().parse_request()

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        if self.server.opts.slow_ms:
            time.sleep(self.server.opts.slow_ms / 1000)
        while not _gate_open(self.server.opts.answer_after):
            time.sleep(GATE_POLL)
        data = (json.dumps(payload) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.server.stopping:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            if self.server.opts.health_fail:
                self._send(503, {"status": "failing", "pid": os.getpid()})
            else:
                self._send(200, {"status": "ok", "pid": os.getpid()})
        elif path == "/":
            self._send(200, self.server.body())
        else:
            self._send(404, {"error": "not found", "path": path})

    do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        # Quiet: request logs would swamp the captured output tests read.
        pass


def _gate_open(path: str | None) -> bool:
    return path is None or os.path.exists(path)


def write_output(megabytes: float) -> None:
    line = ("x" * 99) + "\n"
    count = int(megabytes * 1024 * 1024) // len(line)
    chunk = line * 1000
    for _ in range(count // 1000):
        sys.stdout.write(chunk)
    sys.stdout.write(line * (count % 1000))
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.exit_at_start is not None:
        print(f"svc {opts.version}: exiting at start with {opts.exit_at_start}", file=sys.stderr)
        sys.stderr.flush()
        return int(opts.exit_at_start)

    waited = {signal.SIGALRM} | (set() if opts.ignore_term else _STOP_SIGNALS)
    if opts.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Blocked before any thread starts, so every thread inherits the mask and only the main
    # thread's sigwait sees them.
    signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    if opts.crash_after:
        signal.setitimer(signal.ITIMER_REAL, opts.crash_after)

    mark(opts.markers, "START")
    if opts.output_mb:
        write_output(opts.output_mb)

    def on_signal(signum: int) -> int:
        if signum == signal.SIGALRM:
            print(f"svc {opts.version}: crashing (crash-after {opts.crash_after}s)", flush=True)
            os._exit(CRASH_EXIT_CODE)
        mark(opts.markers, "TERM")
        return 0

    deadline = time.monotonic() + opts.ready_delay
    while (left := deadline - time.monotonic()) > 0 or not _gate_open(opts.serve_after):
        info = signal.sigtimedwait(waited, left if left > 0 else GATE_POLL)
        if info is not None:
            code = on_signal(info.si_signo)
            mark(opts.markers, "STOP")
            return code

    sock = inherited_socket() or own_socket(opts.host, opts.port)
    # Workers share the socket: a blocking accept() after another worker took the connection
    # would hang this one, and with it the shutdown on SIGTERM.
    sock.setblocking(False)
    server = Server(sock, opts)
    serving = threading.Thread(target=server.serve_forever, args=(0.05,), name="serve", daemon=True)
    serving.start()
    print(f"svc {opts.version} serving on {sock.getsockname()[1]} pid {os.getpid()}", flush=True)
    if opts.notify:
        sd_notify("READY=1")

    info = signal.sigwaitinfo(waited)
    on_signal(info.si_signo)
    server.shutdown()  # stop accepting: serve_forever returns
    sock.close()
    while not _gate_open(opts.stop_after):
        time.sleep(GATE_POLL)
    server.drain()
    mark(opts.markers, "STOP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
