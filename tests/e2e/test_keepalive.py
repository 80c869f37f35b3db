"""What a keep-alive client of nginx sees across flips.

nginx's reload retires its old workers gracefully, but an old worker closes its clients' idle
keep-alive connections; a client that sends its next request on such a connection just as it is
closed gets no response (connection reset, or closed before the status line). That is the one
failure a flip can expose to clients, and it is nginx's, not the upstream's: the bound the design
promises is that a client following the usual retry rule (an idempotent request that failed on a
*reused* connection before any response is retried once on a *fresh* connection, as browsers
and most HTTP client libraries do) sees zero failures. A client that never retries sees a few;
the test prints how many (the README quotes the numbers) but does not bound them.

Without a reload there is nothing to close: on a fixed port with no proxy step, even clients that
never retry lose nothing (the second test).
"""

from __future__ import annotations

import http.client
import subprocess
import time

import jinja2
import psutil

from tests.e2e.load import MAX_DURATION, Load
from tests.e2e.test_fixed_port import fixed_port_config
from tests.e2e.test_flip import answers, flip_to, program, start_serving
from tests.fixtures.flipvisor import TEMPLATE, Flipvisor
from tests.fixtures.nginx import Nginx, free_port
from tests.waiting import wait_until

FLIPS = 5
CLIENTS = 3


class NoResponse(Exception):
    """The request failed before any byte of a response arrived."""


class RetryingLoad(Load):
    """Keep-alive clients that retry, once and on a fresh connection, a GET that failed on a
    reused connection before any response. ``retries`` counts how often that rule was needed."""

    def __init__(self, url: str, *, clients: int) -> None:
        super().__init__(url, clients=clients, keepalive=True)
        self.retries = 0

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=10)

    def _exchange(self, connection: http.client.HTTPConnection) -> tuple[int, bytes]:
        try:
            connection.request("GET", self.path)
            answer = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise NoResponse(f"{type(exc).__name__}: {exc}") from exc
        # A failure from here on happened after the response began: never retried.
        return answer.status, answer.read()

    def _loop(self) -> None:
        deadline = time.monotonic() + MAX_DURATION
        connection = self._connect()
        while not self._stop.is_set() and time.monotonic() < deadline:
            # http.client reconnects by itself after a "Connection: close" answer (sock is None).
            reused = connection.sock is not None
            error: str | None = None
            try:
                try:
                    status, body = self._exchange(connection)
                except NoResponse:
                    if not reused:
                        raise
                    connection.close()
                    connection = self._connect()
                    with self._lock:
                        self.retries += 1
                    status, body = self._exchange(connection)
            except (NoResponse, OSError, http.client.HTTPException) as exc:
                status, body, error = 0, b"", f"{type(exc).__name__}: {exc}"
                connection.close()
                connection = self._connect()
            if error is None and not 200 <= status < 300:
                error = f"HTTP {status}: {body[:200]!r}"
            with self._lock:
                if error is None:
                    self.result.ok += 1
                    self.result.bodies.add(body)
                else:
                    self.result.failed += 1
                    self.result.errors.append(error)
        connection.close()


def test_keepalive_clients_across_flips(flipvisor: Flipvisor, nginx: Nginx) -> None:
    start_serving(flipvisor, nginx, program(nginx, "1"))
    plain = Load(nginx.url("/"), clients=CLIENTS, keepalive=True)
    retrying = RetryingLoad(nginx.url("/"), clients=CLIENTS)
    with plain, retrying:
        for version in range(2, 2 + FLIPS):
            config = {"programs": {"web": program(nginx, str(version))}}
            flip_to(flipvisor, nginx, config, str(version))
        plain_outcome = plain.stop()
        retrying_outcome = retrying.stop()

    print(
        f"\nkeep-alive across {FLIPS} flips, {CLIENTS} clients each: "
        f"without retry {plain_outcome.failed} failed of "
        f"{plain_outcome.ok + plain_outcome.failed} ({sorted(set(plain_outcome.errors))}); "
        f"with the retry rule {retrying_outcome.failed} failed of "
        f"{retrying_outcome.ok + retrying_outcome.failed}, {retrying.retries} retried"
    )
    assert retrying_outcome.failed == 0, retrying_outcome.errors[:5]
    assert retrying_outcome.ok > 50 and plain_outcome.ok > 50
    # Whatever the plain client lost, it lost to closed connections, never to an error answer
    # (a 502 would mean nginx reached a generation that was not serving).
    assert not [e for e in plain_outcome.errors if e.startswith("HTTP ")], plain_outcome.errors


def test_keepalive_clients_lose_nothing_on_a_fixed_port_without_a_reload(
    flipvisor: Flipvisor, nginx: Nginx
) -> None:
    """The README's other answer: a fixed port (one socket kept across generations) with
    readiness notify and no proxy step. nginx's upstream is written once and nginx never
    reloads, so even clients that never retry lose nothing."""
    port = free_port()
    snippet = jinja2.Template(TEMPLATE.read_text()).render(
        program="web",
        generation=1,
        host="127.0.0.1",
        port=port,
        pids=[],
        upstreams=[f"127.0.0.1:{port}"],
        listen=nginx.listen,
    )
    (nginx.conf_dir / "web.conf").write_text(snippet)
    subprocess.run(nginx.reload_cmd, check=True, capture_output=True, timeout=30)
    notify = {"notify": True, "timeout": 10}
    flipvisor.start(fixed_port_config(port, "1", **notify))
    flipvisor.wait_serving("web")
    wait_until(lambda: answers(nginx), message="nginx to proxy to the fixed port")
    master = nginx.master_pid()
    assert master is not None
    nginx_workers = {child.pid for child in psutil.Process(master).children()}
    with Load(nginx.url("/"), clients=CLIENTS, keepalive=True) as plain:
        for version in range(2, 2 + FLIPS):
            flip_to(flipvisor, nginx, fixed_port_config(port, str(version), **notify), str(version))
        outcome = plain.stop()
    assert outcome.failed == 0, outcome.errors[:5]
    assert outcome.ok > 50
    # The same nginx workers throughout: nothing was reloaded.
    assert {child.pid for child in psutil.Process(master).children()} == nginx_workers
