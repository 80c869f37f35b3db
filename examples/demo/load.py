#!/usr/bin/env python3
"""The demo's own load client: GETs through nginx on a new TCP connection per request.

A connection per request is the strict test of a flip: every request does a full
connect/send/receive against whatever nginx routes to at that instant, so a refused or reset
connection anywhere on the path is counted. (A keep-alive client such as wrk can additionally see
nginx itself close an idle connection during ``nginx -s reload``; see the demo's summary.)

Runs ``--clients`` threads until SIGTERM/SIGINT or ``--max-seconds``, then prints one summary
line and, with ``--out``, writes ``{"ok", "failed", "versions", "errors"}`` as JSON.
Stdlib only.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import signal
import sys
import threading  # noqa: TID251 -- a tiny blocking load generator, not supervisor code
import time
from typing import Any


class Counts:
    """Totals shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok = 0
        self.failed = 0
        self.versions: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []

    def record(self, version: str | None, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.ok += 1
                self.versions[version or "?"] += 1
            else:
                self.failed += 1
                if len(self.errors) < 20:
                    self.errors.append(f"{time.strftime('%H:%M:%S')} {error}")


def one_request(host: str, port: int, path: str) -> tuple[str | None, str | None]:
    """One GET on a fresh connection: (version, None) on a 2xx, else (None, why)."""
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        body = answer.read()
        if not 200 <= answer.status < 300:
            return None, f"HTTP {answer.status}: {body[:120]!r}"
        try:
            return str(json.loads(body).get("version")), None
        except (ValueError, AttributeError):
            return "?", None
    except (OSError, http.client.HTTPException) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()


def client(args: argparse.Namespace, counts: Counts, stop: threading.Event) -> None:
    deadline = time.monotonic() + args.max_seconds
    while not stop.is_set() and time.monotonic() < deadline:
        counts.record(*one_request(args.host, args.port, args.path))


def summary(counts: Counts) -> dict[str, Any]:
    return {
        "ok": counts.ok,
        "failed": counts.failed,
        "versions": dict(sorted(counts.versions.items())),
        "errors": counts.errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--out", help="write the totals here as JSON")
    args = parser.parse_args(argv)

    counts = Counts()
    stop = threading.Event()
    # Blocked before any thread starts, so the main thread alone takes them, with sigtimedwait.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    threads = [threading.Thread(target=client, args=(args, counts, stop), daemon=True)
               for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    signal.sigtimedwait(stop_signals, args.max_seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=15)

    result = summary(counts)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f)
    versions = ", ".join(f"{v}: {n}" for v, n in result["versions"].items()) or "none"
    print(f"python client (a connection per request): {result['ok']} served, "
          f"{result['failed']} failed; versions answered: {versions}", flush=True)
    for error in result["errors"][:5]:
        print(f"  failed: {error}", file=sys.stderr)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
