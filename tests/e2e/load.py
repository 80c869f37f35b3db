"""A bounded HTTP load loop for tests: counts every request that did not get a 2xx answer."""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlsplit

MAX_DURATION = 120.0


@dataclass
class LoadResult:
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    bodies: set[bytes] = field(default_factory=set)


class Load:
    """``clients`` threads sending GETs to ``url`` until stopped (or ``MAX_DURATION``).

    ``keepalive=False`` opens a connection per request, as most flip tests should: a keep-alive
    client of nginx can see its idle connection closed by nginx's own reload (see README).
    """

    def __init__(self, url: str, *, clients: int = 2, keepalive: bool = False) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path or "/"
        self.keepalive = keepalive
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> LoadResult:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        return self.result

    def _loop(self) -> None:
        deadline = time.monotonic() + MAX_DURATION
        connection: http.client.HTTPConnection | None = None
        while not self._stop.is_set() and time.monotonic() < deadline:
            if connection is None:
                connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
            try:
                connection.request("GET", self.path)
                answer = connection.getresponse()
                body = answer.read()
                good = 200 <= answer.status < 300
                error = None if good else f"HTTP {answer.status}: {body[:200]!r}"
            except (OSError, http.client.HTTPException) as exc:
                good, body, error = False, b"", f"{type(exc).__name__}: {exc}"
                connection.close()
                connection = None
            with self._lock:
                if good:
                    self.result.ok += 1
                    self.result.bodies.add(body)
                else:
                    self.result.failed += 1
                    self.result.errors.append(error or "?")
            if connection is not None and not self.keepalive:
                connection.close()
                connection = None
        if connection is not None:
            connection.close()
