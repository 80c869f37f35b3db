"""Load during deploys: wrk (keep-alive, per-response times through a LuaJIT FFI clock) and the
connection-per-request client in ``loadgen``; both stopped on demand, both give per-request
records ``(start, latency, status)`` on CLOCK_MONOTONIC."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import ROOT

WRK_SCRIPT = """
local ffi = require("ffi")
ffi.cdef[[ typedef struct { long tv_sec; long tv_nsec; } bench_ts;
           int clock_gettime(int, bench_ts*); ]]
local ts = ffi.new("bench_ts")
local function now()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC, as Python's time.monotonic()
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end
local counter = 0
function setup(thread) counter = counter + 1; thread:set("id", counter) end
function init(args)
  out = io.open(os.getenv("BENCH_WRK_OUT") .. "." .. id, "w")
  out:setvbuf("line")
  started = 0
  pending = false
end
-- One connection per thread, so request() and response() alternate and pair up. wrk calls
-- request() again, without a response(), after a connection failed under a request: that
-- request is recorded as lost (status 0). An idle keep-alive connection closed by the server
-- (nginx's reload does that) also counts in wrk's own read errors, but loses no request.
function request()
  local t = now()
  if pending then
    out:write(string.format("%%.6f %%.6f 0\\n", started, t - started))
  end
  pending = true
  started = t
  return wrk.format()
end
function response(status, headers, body)
  pending = false
  out:write(string.format("%%.6f %%.6f %%d\\n", started, now() - started, status))
end
function delay() return %(delay_ms)d end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCH {"requests": %%d, "connect": %%d, "read": %%d, ' ..
    '"write": %%d, "status": %%d, "timeout": %%d}\\n',
    summary.requests, e.connect, e.read, e.write, e.status, e.timeout))
end
"""

Record = tuple[float, float, int]


@dataclass
class LoadRun:
    records: list[Record] = field(default_factory=list)
    socket_errors: int = 0  # wrk's own count (connect/read/write/timeout), idle closes included
    summary: dict[str, Any] = field(default_factory=dict)


class Wrk:
    """wrk with ``threads`` threads of one keep-alive connection each."""

    def __init__(self, url: str, directory: Path, *, threads: int = 2, delay_ms: int = 2) -> None:
        self.url = url
        self.dir = directory
        self.threads = threads
        self.script = directory / "bench.lua"
        self.script.write_text(WRK_SCRIPT % {"delay_ms": delay_ms})
        self.out = directory / "wrk.out"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["wrk", "-t", str(self.threads), "-c", str(self.threads), "-d", "300",
             "--timeout", "10s", "-s", str(self.script), self.url],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, env={"BENCH_WRK_OUT": str(self.out), "PATH": "/usr/bin:/bin"},
        )

    def stop(self) -> LoadRun:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # wrk stops, prints, and calls done()
        try:
            output, _ = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate()
        run = LoadRun()
        for line in output.splitlines():
            if line.startswith("BENCH "):
                run.summary = json.loads(line[6:])
        errors = run.summary
        run.socket_errors = sum(int(errors.get(k, 0)) for k in ("connect", "read", "write",
                                                                 "timeout"))
        for n in range(1, self.threads + 1):
            path = Path(f"{self.out}.{n}")
            if path.exists():
                run.records += parse(path.read_text())
        run.records.sort()
        return run


class PyClient:
    """The connection-per-request client in its own process."""

    def __init__(self, url: str, directory: Path, *, threads: int = 2,
                 pause: float = 0.002) -> None:
        self.out = directory / "pyclient.out"
        self.argv = [sys.executable, "-m", "bench.loadgen", url, str(self.out),
                     "--threads", str(threads), "--pause", str(pause)]
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.process.stdout is not None
        self.process.stdout.readline()  # "started"

    def stop(self) -> LoadRun:
        assert self.process is not None
        try:
            self.process.communicate(input="", timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
        run = LoadRun()
        if self.out.exists():
            run.records = sorted(parse(self.out.read_text()))
        return run


def parse(text: str) -> list[Record]:
    records: list[Record] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            records.append((float(parts[0]), float(parts[1]), int(parts[2])))
    return records
