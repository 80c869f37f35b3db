#!/usr/bin/env python3
"""The seed's self-registering service: it binds port 0, serves, then writes its own etcd keys.

Nobody supervises it: once its HTTP server answers, it promotes itself the seed's way in one etcd
transaction through the v3 HTTP/JSON gateway (``/v3/kv/txn``, base64 keys; etcd 3.4 has it):
``port/previous`` ← the old ``port/current``, ``port/current`` ← its port, ``pid/previous`` ← the
old ``pid/current``, ``pid/current`` ← its PID, and a ``generation/current`` JSON record with its
PID and start time as ``flipvisor.starttime.start_time_of`` reports it (psutil's create_time: boot
time plus /proc/self/stat field 22 in clock ticks). The transaction compares the mod revisions of
the keys it replaces, so two services registering at once cannot lose each other's ``previous``.

``GET /`` answers ``{"version": V, "pid": P, ...}`` (the HTTP side is ``svc.py``'s). On SIGTERM
it prints who sent it (``SIGTERM from pid N``, from ``sigwaitinfo``), stops accepting, answers its
in-flight requests and exits 0. Stdlib only; imports nothing from flipvisor.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import svc  # the sibling test service: its HTTP server with a graceful drain

REGISTER_DEADLINE = 20.0  # etcd may be starting, or another service may be registering


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="selfregister", description=__doc__.splitlines()[0])
    p.add_argument("--version", default="0")
    p.add_argument("--prefix", default="uswitch")
    p.add_argument("--program", default="experiment")
    p.add_argument("--etcd", default="http://127.0.0.1:2379", help="etcd client URL")
    return p.parse_args(argv)


def start_time() -> float:
    """This process's start time in seconds since the epoch, computed as psutil does."""
    stat = Path("/proc/self/stat").read_text()
    # Field 2 (comm) may hold spaces and parentheses: count fields after its closing ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[22 - 3])
    with open("/proc/stat", encoding="ascii") as f:
        boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _call(etcd: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{etcd.rstrip('/')}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        loaded: dict[str, Any] = json.loads(answer.read())
        return loaded


def _read_folder(etcd: str, folder: str) -> dict[str, tuple[str, int]]:
    """key -> (value, mod_revision) for every key under ``folder``."""
    end = folder[:-1] + chr(ord(folder[-1]) + 1)
    answer = _call(etcd, "/v3/kv/range", {"key": _b64(folder), "range_end": _b64(end)})
    return {
        base64.b64decode(kv["key"]).decode(): (
            base64.b64decode(kv.get("value", "")).decode(),
            int(kv.get("mod_revision", 0)),
        )
        for kv in answer.get("kvs", [])
    }


def _try_register(opts: argparse.Namespace, folder: str, port: int, me: dict[str, Any]) -> int:
    """One attempt: the generation number registered, or 0 if a concurrent writer won.

    Raises:
        OSError, ValueError: etcd could not be reached or answered nonsense.
    """
    found = _read_folder(opts.etcd, folder)
    before: Any = json.loads(found.get(folder + "generation/current", ("{}", 0))[0])
    number = int(before.get("generation", 0)) + 1 if isinstance(before, dict) else 1
    record = {
        "generation": number,
        "port": port,
        "pids": [me],
        "host": socket.gethostname(),
        "command": sys.argv,
        "promoted_at": time.time(),
    }
    values = {
        "port/current": str(port),
        "pid/current": str(os.getpid()),
        "generation/current": json.dumps(record),
    }
    ops: list[dict[str, Any]] = [
        {"request_put": {"key": _b64(folder + k), "value": _b64(v)}} for k, v in values.items()
    ]
    for what in ("port", "pid"):
        old = found.get(f"{folder}{what}/current")
        key = _b64(f"{folder}{what}/previous")
        if old is None:
            ops.append({"request_delete_range": {"key": key}})
        else:
            ops.append({"request_put": {"key": key, "value": _b64(old[0])}})
    # What this transaction replaces must be what was read (mod revision 0: absent).
    compare = [
        {
            "key": _b64(folder + suffix),
            "target": "MOD",
            "result": "EQUAL",
            "mod_revision": found.get(folder + suffix, ("", 0))[1],
        }
        for suffix in ("port/current", "pid/current", "generation/current")
    ]
    answer = _call(opts.etcd, "/v3/kv/txn", {"compare": compare, "success": ops})
    return number if answer.get("succeeded") else 0


def register(opts: argparse.Namespace, port: int) -> None:
    """Promote this process in one transaction; retried while etcd is away or another wins."""
    folder = f"{opts.prefix.strip('/')}/{opts.program}/"
    me = {"pid": os.getpid(), "started": start_time()}
    deadline = time.monotonic() + REGISTER_DEADLINE
    problem = "lost to concurrent writers"
    while time.monotonic() < deadline:
        try:
            number = _try_register(opts, folder, port, me)
        except (OSError, ValueError) as exc:
            number, problem = 0, str(exc)
        if number:
            print(
                f"selfregister {opts.version}: registered port {port} pid {os.getpid()}"
                f" as generation {number}",
                flush=True,
            )
            return
        time.sleep(0.1)
    raise SystemExit(f"selfregister {opts.version}: could not register: {problem}")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # Blocked before the server thread starts, so only the main thread's sigwait sees them.
    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    sock = svc.own_socket("127.0.0.1", 0)
    sock.setblocking(False)
    server = svc.Server(sock, svc.parse_args(["--version", opts.version]))
    serving = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    serving.start()
    port = int(sock.getsockname()[1])
    print(f"selfregister {opts.version} serving on {port} pid {os.getpid()}", flush=True)
    register(opts, port)

    info = signal.sigwaitinfo(stops)
    print(
        f"selfregister {opts.version}: {signal.Signals(info.si_signo).name} from pid {info.si_pid}",
        flush=True,
    )
    server.shutdown()  # stop accepting
    sock.close()
    server.drain()  # answer what was already accepted
    print(f"selfregister {opts.version}: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
