"""What a long-running supervisor (PID 1 for months) meets from its clients: control connections
that never finish their request, and running out of file descriptors (its RLIMIT_NOFILE lowered
with prlimit) while accepting on the control socket or the metrics endpoint (QA pass 12)."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
from collections.abc import Iterator
from functools import partial

import pytest

from tests.e2e.test_lifecycle import program
from tests.fixtures.flipvisor import Flipvisor
from tests.fixtures.nginx import free_port
from tests.waiting import wait_until

# control.py REQUEST_TIMEOUT is 5 s (as the metrics endpoint's): this is generous.
REQUEST_PATIENCE = 20.0


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _connected(path: str) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    return client


@contextlib.contextmanager
def _clients(path: str, count: int) -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            held.append(_connected(path))
        yield held
    finally:
        for client in held:
            client.close()


def test_a_control_client_that_never_finishes_its_request_is_closed(
    flipvisor: Flipvisor,
) -> None:
    """Scenario: a client connects to <state_dir>/flipvisor.sock and sends nothing; another
    sends the first bytes of a request (`{"command": "sta`) and hangs (a CLI stopped with ^Z,
    a monitoring script wedged mid-write, a `socat` left open).
    Before (QA 12): the supervisor holds both connections (and their fds and tasks) indefinitely:
    control.py `_converse` reads the request line with no deadline (only the 1 MiB bound), so
    70 such clients held 70 more fds for as long as they stayed (checked 15 s and more), and
    every one of them is a task in the conversations task group. The metrics endpoint, by
    contrast, closes a scraper that does not send its request within 5 s.
    Expected: a connection that has not sent its whole request line within a bound (seconds)
    is closed (with an error answer, or just closed), so stuck clients cannot pile up.
    Fixed in: control.py `_converse`: read the request under `anyio.fail_after(...)` (only the
    request; `events -f` and a flip's progress go on as long as they need)."""
    flipvisor.start({"programs": {"web": program("--version", "1")}})
    flipvisor.wait_serving("web")
    path = str(flipvisor.state_dir / "flipvisor.sock")
    with _clients(path, 2) as (silent, partial):
        partial.sendall(b'{"command": "sta')
        for client in (silent, partial):
            client.settimeout(REQUEST_PATIENCE)
            try:
                answer = client.recv(65536)  # b"" (closed) or an error line, then closed
            except TimeoutError:
                pytest.fail(f"the supervisor still holds the connection after {REQUEST_PATIENCE}s")
            assert answer == b"" or b'"ok":false' in answer, answer


def test_the_supervisor_survives_running_out_of_fds_on_its_control_socket(
    flipvisor: Flipvisor,
) -> None:
    """Scenario: the supervisor's soft RLIMIT_NOFILE is small (systemd's default is 1024; here
    lowered to its open fds + 16 so that the test is quick) and more control clients connect
    than it has fds left (with the finding above, clients that never send their request are
    enough: each is held forever). Then they all go away.
    Before (QA 12): the accept that fails with EMFILE ends control.py `serve` (anyio's
    `listener.serve` raises the OSError): the socket file is unlinked and the listener closed,
    nothing is logged, and from then on every CLI command says "its control socket ... is gone
    (removed by hand, or by a temp cleaner?)", although the fds were given back long ago. The
    supervisor is wedged as well: its worker and output keeper are left as zombies (not
    reaped), and a SIGTERM kills it outright (exit -15, no drain, nothing logged).
    Expected: an accept failing for lack of fds is logged and retried after a short pause
    (the connection waits in the backlog), the supervisor keeps supervising, and the control
    socket answers again once fds are free.
    Fixed in: control.py `serve` (accept EMFILE/ENFILE/ENOBUFS/ENOMEM: log, sleep, go on, instead
    of letting `listener.serve` end), and look at why the error leaves the supervisor wedged
    rather than failing loudly (supervisor.py root task group)."""
    flipvisor.start({"programs": {"web": program("--version", "1")}})
    flipvisor.wait_serving("web")
    assert flipvisor.process is not None
    pid = flipvisor.process.pid
    path = flipvisor.state_dir / "flipvisor.sock"
    limit = _open_fds(pid) + 16
    original = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, original[1]))
    try:
        with _clients(str(path), 40):
            wait_until(
                lambda: not path.exists() or _open_fds(pid) >= limit,
                timeout=15,
                message="the supervisor to run out of fds accepting them",
            )
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, original)
    # The clients are gone and the limit is back: the supervisor must answer again.
    wait_until(
        lambda: flipvisor.cli("status").returncode == 0,
        timeout=20,
        message="`flipvisor status` to be answered again once the fds are free",
    )
    assert flipvisor.process.poll() is None, flipvisor.output()
    assert flipvisor.serving("web") is not None
    assert "cannot accept a connection: Too many open files" in flipvisor.output()


def test_the_supervisor_survives_running_out_of_fds_on_its_metrics_endpoint(
    flipvisor: Flipvisor,
) -> None:
    """Scenario: `metrics: {listen: ...}` on, the supervisor's soft RLIMIT_NOFILE small
    (systemd's default 1024; here its open fds + 16, so that the test is quick), and a burst of
    TCP connections to the metrics port (many scrapers, a port scanner, a load balancer's
    health checks: each is held up to the 5 s REQUEST_TIMEOUT) takes the fds that are left.
    Before (QA 12): the accept that fails with EMFILE raises out of metrics.py `run`
    (`listener.serve`), through the root task group: the supervisor logs an ExceptionGroup
    traceback, drains every program (`draining`/`stopped` web) and exits 1. A burst of
    connections to the metrics port, from anyone who can reach it, takes every supervised
    program down.
    Expected: an accept failing for lack of fds is logged and retried after a short pause;
    the programs keep running and the endpoint answers again once fds are free.
    Fixed in: metrics.py `run` (and control.py `serve`, the same for the control socket): do not
    let `listener.serve` end on EMFILE/ENFILE/ENOBUFS/ENOMEM; a supervisor-wide helper that
    serves a listener with that back-off would fit both."""
    port = free_port()
    flipvisor.start(
        {"metrics": {"listen": f"127.0.0.1:{port}"}, "programs": {"web": program("--version", "1")}}
    )
    flipvisor.wait_serving("web")
    assert flipvisor.process is not None
    pid = flipvisor.process.pid
    limit = _open_fds(pid) + 16
    original = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, original[1]))
    held: list[socket.socket] = []
    try:
        for _ in range(40):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        wait_until(
            lambda: (
                flipvisor.process is None
                or flipvisor.process.poll() is not None
                or _open_fds(pid) >= limit
            ),
            timeout=15,
            message="the supervisor to run out of fds accepting them",
        )
    finally:
        for client in held:
            client.close()
        if flipvisor.process.poll() is None:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, original)

    wait_until(
        partial(_scraped, flipvisor, port), timeout=20, message="the metrics endpoint to answer"
    )
    assert flipvisor.serving("web") is not None
    assert "the metrics endpoint 127.0.0.1:" in flipvisor.output()
    assert "cannot accept a connection: Too many open files" in flipvisor.output()


def _scraped(flipvisor: Flipvisor, port: int) -> bool:
    """Whether the metrics endpoint answers a scrape; the supervisor must not have exited."""
    assert flipvisor.process is not None
    assert flipvisor.process.poll() is None, "the supervisor exited:\n" + flipvisor.output()
    with (
        contextlib.suppress(OSError),
        socket.create_connection(("127.0.0.1", port), timeout=5) as scraper,
    ):
        scraper.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        return scraper.recv(64).startswith(b"HTTP/1.0 200")
    return False
