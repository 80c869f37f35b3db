"""The metrics endpoint over real TCP on 127.0.0.1: a scrape that fails inside (a bug in reading
a status) is answered 500 and logged, and the endpoint answers the next one."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from flipvisor.events import EventLog
from flipvisor.metrics import Metrics
from tests.fixtures.nginx import free_port

DEADLINE = 10.0


async def _scrape(port: int) -> bytes:
    with anyio.fail_after(DEADLINE):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"GET /metrics HTTP/1.0\r\n\r\n")
            received = b""
            try:
                while True:
                    received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return received


async def test_a_failing_scrape_is_answered_500_and_the_next_one_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = True

    def statuses() -> list[dict[str, Any]]:
        if broken:
            raise RuntimeError("a bug in a program's status")
        return [{"name": "web", "state": "running", "restarts": 2}]

    port = free_port()
    metrics = Metrics(f"127.0.0.1:{port}", EventLog(), statuses)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(DEADLINE):
            await tg.start(metrics.run)
        failed = await _scrape(port)
        broken = False
        served = await _scrape(port)
        tg.cancel_scope.cancel()
    assert failed.startswith(b"HTTP/1.0 500 Internal Server Error\r\n"), failed
    assert served.startswith(b"HTTP/1.0 200 OK\r\n"), served
    assert b'flipvisor_restarts_total{program="web"} 2.0' in served
    assert "a metrics scrape failed" in caplog.text
    assert "a bug in a program's status" in caplog.text
