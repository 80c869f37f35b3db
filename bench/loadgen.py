"""A connection-per-request HTTP client, run as its own process (``python3 -m bench.loadgen``):
``--threads`` loops send GETs until stdin closes (or ``--max`` seconds), pausing ``--pause``
between requests, and write one ``start latency status`` line per request (status 0: no answer;
times on CLOCK_MONOTONIC, which the harness shares)."""

from __future__ import annotations

import argparse
import http.client
import sys
import threading
import time
from urllib.parse import urlsplit


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pause", type=float, default=0.002)
    parser.add_argument("--max", type=float, default=120.0)
    args = parser.parse_args()
    parts = urlsplit(args.url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    stop = threading.Event()
    records: list[list[tuple[float, float, int]]] = [[] for _ in range(args.threads)]

    def loop(mine: list[tuple[float, float, int]]) -> None:
        deadline = time.monotonic() + args.max
        while not stop.is_set() and time.monotonic() < deadline:
            start = time.monotonic()
            connection = http.client.HTTPConnection(host, port, timeout=10)
            try:
                connection.request("GET", path, headers={"Connection": "close"})
                answer = connection.getresponse()
                answer.read()
                status = answer.status
            except (OSError, http.client.HTTPException):
                status = 0
            finally:
                connection.close()
            mine.append((start, time.monotonic() - start, status))
            if args.pause:
                time.sleep(args.pause)

    threads = [threading.Thread(target=loop, args=(mine,), daemon=True) for mine in records]
    for thread in threads:
        thread.start()
    print("started", flush=True)
    sys.stdin.read()  # the harness closes our stdin to stop us
    stop.set()
    for thread in threads:
        thread.join(timeout=15)
    with open(args.out, "w") as out:
        for mine in records:
            out.writelines(f"{s:.6f} {lat:.6f} {st}\n" for s, lat, st in mine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
