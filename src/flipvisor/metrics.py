"""The optional Prometheus endpoint (``metrics: {listen: HOST:PORT}``): counters and gauges read
from the programs' status at scrape time (totals each program keeps, so a dropped event cannot
make them wrong), the flip duration histogram fed by every lifecycle event as it is emitted;
served over HTTP/1.0.

prometheus-client's own HTTP server runs in a thread (banned here), so ``/metrics`` is answered
by a small anyio TCP listener with ``generate_latest`` of a registry of our own.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import anyio
from anyio.abc import SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .accepting import serve_listener
from .errors import ConfigError
from .events import Event, EventLog
from .states import ProgramState
from .usable import host_port, listen_error, parse_listen

log = logging.getLogger(__name__)

# Flips span a service that is ready at once (tens of ms) to a slow start plus drain (minutes).
FLIP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
MAX_REQUEST = 8192
# A scraper that connects and says nothing must not hold a task forever.
REQUEST_TIMEOUT = 5.0

# One program's ``Program.status()`` (the contract's shape, as ``status --json`` shows it).
Status = dict[str, Any]
# What the gauges are read from: the status of every program.
StatusSource = Callable[[], Iterable[Status]]


class _StatusCollector(Collector):
    """Gauges of what is true now, computed from the programs' status on each scrape."""

    def __init__(self, statuses: StatusSource) -> None:
        self._statuses = statuses

    def collect(self) -> Iterator[Metric]:
        families = [
            (kind(name, text, labels=["program"]), value) for kind, name, text, value in PER_PROGRAM
        ]
        state = GaugeMetricFamily(
            "flipvisor_program_state",
            "1 for the program's current state, 0 for the others",
            labels=["program", "state"],
        )
        for status in self._statuses():
            name = status["name"]
            for family, value in families:
                family.add_metric([name], value(status))
            for option in ProgramState:
                state.add_metric([name, option.value], 1 if status["state"] == option.value else 0)
        yield from (family for family, _ in families)
        yield state


def _serving(status: Status) -> dict[str, Any] | None:
    """The program's serving generation, from its status (None: none serves)."""
    return next((g for g in status.get("generations", []) if g["state"] == "serving"), None)


def _workers_up(status: Status) -> int:
    current = _serving(status)
    return len(current["pids"]) if current else 0


def _generation_serving(status: Status) -> int:
    current = _serving(status)
    return int(current["generation"]) if current else 0


def _leftover_processes(status: Status) -> int:
    left = status.get("leftovers")
    return len(left["pids"]) if left else 0


# Each metric of one value per program, in the order a scrape lists them: its kind, name and
# help, and its value read from the program's status. The counters are totals the programs keep
# themselves: exact even if events were dropped.
PER_PROGRAM: tuple[
    tuple[type[GaugeMetricFamily | CounterMetricFamily], str, str, Callable[[Status], int]], ...
] = (
    (
        GaugeMetricFamily,
        "flipvisor_workers_up",
        "Running worker processes of the program's serving generation",
        _workers_up,
    ),
    (
        GaugeMetricFamily,
        "flipvisor_processes",
        "Running worker processes of the program, any generation (two during a flip)",
        lambda status: sum(len(g["pids"]) for g in status.get("generations", [])),
    ),
    (
        GaugeMetricFamily,
        "flipvisor_generation_serving",
        "Number of the program's serving generation (0: none serves)",
        _generation_serving,
    ),
    (
        GaugeMetricFamily,
        "flipvisor_leftover_processes",
        "Processes a killed supervisor left serving the program, not drained yet",
        _leftover_processes,
    ),
    (
        GaugeMetricFamily,
        "flipvisor_flip_in_progress",
        "1 while a flip of the program runs",
        lambda status: 1 if status.get("flip") else 0,
    ),
    (
        CounterMetricFamily,
        "flipvisor_flips",
        "Flips finished (start, flip, restart, rollback), whatever the outcome",
        lambda status: status.get("flips", 0),
    ),
    (
        CounterMetricFamily,
        "flipvisor_flip_failures",
        "Flips that failed and were rolled back",
        lambda status: status.get("flip_failures", 0),
    ),
    (
        CounterMetricFamily,
        "flipvisor_restarts",
        "Worker restarts after an exit",
        lambda status: status.get("restarts", 0),
    ),
)


class Metrics:
    """Serves the gauges and counters read from status, and times each finished flip."""

    def __init__(self, listen: str, events: EventLog, statuses: StatusSource) -> None:
        self.host, self.port = parse_listen(listen)
        self.events = events
        self._statuses = statuses
        self.registry = CollectorRegistry()
        self.registry.register(_StatusCollector(statuses))
        self.durations = Histogram(
            "flipvisor_flip_duration_seconds",
            "How long flips took, from request to the old generation drained (or rolled back)",
            ["program", "outcome"],
            buckets=FLIP_BUCKETS,
            registry=self.registry,
        )
        self._timed: set[tuple[str, str]] = set()  # the durations' label sets

    def observe(self, event: Event) -> None:
        """Time one finished flip (the counters come from the programs' own totals)."""
        if event.kind == "flip-finished":
            ok = bool(event.fields.get("ok"))
            duration = event.fields.get("duration")
            if isinstance(duration, int | float):
                outcome = "ok" if ok else "abandoned" if event.fields.get("abandoned") else "failed"
                self.durations.labels(event.program, outcome).observe(duration)
                self._timed.add((event.program, outcome))

    def render(self) -> bytes:
        """The text exposition format of every metric.

        The durations of a program a reload removed go with its other metrics: kept, they would
        outlive it, and count on from there if it came back while its counters start at 0.
        """
        if self._timed:
            names = {status["name"] for status in self._statuses()}
            for labels in [labels for labels in self._timed if labels[0] not in names]:
                self.durations.remove(*labels)
                self._timed.discard(labels)
        return generate_latest(self.registry)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen, count events, and answer scrapes until cancelled.

        Raises:
            ConfigError: the listen address cannot be bound.
        """
        try:
            listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self.port)
        except OSError as exc:
            # By its cause: "choose a free port" is wrong for an address that does not exist.
            raise ConfigError(f"metrics.listen: {listen_error(self.host, self.port, exc)}") from exc
        # A listener, not a subscription: a burst of events cannot make the histogram miss a flip.
        with self.events.listening(self.observe):
            async with listener, anyio.create_task_group() as scrapes:
                where = host_port(self.host, self.port)
                log.info("metrics on http://%s/metrics", where)
                task_status.started()
                await serve_listener(
                    listener, self._answer, scrapes, what=f"the metrics endpoint {where}"
                )

    async def _answer(self, stream: SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(REQUEST_TIMEOUT):
                    head = await BufferedByteReceiveStream(stream).receive_until(
                        b"\r\n\r\n", MAX_REQUEST
                    )
                    await stream.send(self._response(head))
            except (
                TimeoutError,
                anyio.EndOfStream,
                anyio.IncompleteRead,
                anyio.DelimiterNotFound,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                ConnectionError,
            ):
                pass  # a scraper that went away or never finished its request: nothing to answer
            except Exception:
                # The boundary of one scrape: a bug in answering it (rendering a status) must
                # fail that scrape, not the endpoint.
                log.exception("a metrics scrape failed")
                with contextlib.suppress(Exception), anyio.move_on_after(REQUEST_TIMEOUT):
                    await stream.send(_http(500, b"internal error: see the supervisor's log\n"))

    def _response(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3:
            return _http(400, b"bad request\n")
        method, target, _version = parts
        if method != b"GET":
            return _http(405, b"only GET\n")
        path = target.split(b"?", 1)[0]
        if path == b"/metrics":
            return _http(200, self.render(), CONTENT_TYPE_LATEST)
        if path == b"/":
            return _http(200, b'<a href="/metrics">/metrics</a>\n', "text/html")
        return _http(404, b"not found: try /metrics\n")


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}


def _http(code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.0 {code} {_REASONS[code]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


__all__ = ["Metrics", "parse_listen"]
