# ruff: noqa: RUF001 (typographic signs are meant: they label results for people)
"""The workloads: each runs one tool once in its own directory and adds samples to Results.
Every daemon (tool, nginx, load generators) is stopped in ``finally``."""

from __future__ import annotations

import bisect
import contextlib
import itertools
import os
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.common import http_ok, kill_orphans, run_timed, wait_until
from bench.load import LoadRun, PyClient, Record, Wrk
from bench.nginx import start_nginx
from bench.procwatch import Fork, ProcWatch
from bench.results import Results
from bench.tools import Program, Tool

DEPLOYS = 5
DEPLOY_TAIL = 0.5  # a request started this long after a deploy returned still counts "during"
WARMUP = 0.5
BIN = 0.1  # plot resolution, seconds
DRAIN_DELAY = 0.5  # flipvisor's default drain.delay, which the bench config keeps


@dataclass
class Settings:
    quick: bool
    startup_sizes: tuple[int, ...]
    idle_seconds: float
    deploy_seconds: float
    idle_workers: int = 200


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# -- (b) crash → replacement ---------------------------------------------------------------
B_TARGET = "flipvisor ≥10× faster than both"


def crash(tool: Tool, res: Results, settings: Settings) -> None:
    """SIGKILL the worker once per fresh instance (a second kill would meet each tool's restart
    backoff). The kernel's proc connector times the replacement's fork, for every tool alike,
    and nothing is asked of the tool until it forked: a control request wakes a daemon's loop
    (supervisord, polled every 5 ms, forks in ~5 ms instead of ~1 s). Without the connector, the
    control interface is polled for the new PID, as before."""
    watch: ProcWatch | None = None
    why = ""
    try:
        tool.start([Program("web", "svc")])
        tool.wait_running()
        port = tool.port("web")
        wait_until(lambda: http_ok(port), 30, "the service to answer")
        old = tool.pids("web")[0]
        time.sleep(0.3)  # let the start-up settle (probes, log readers) before the crash
        watch, why = ProcWatch.open(tool.pid)  # receives from here on, before the kill
        killed = time.monotonic_ns()
        os.kill(old, signal.SIGKILL)
        fork = exited = None
        if watch is not None:
            # No status calls meanwhile: a request wakes the daemon whose reaction is timed.
            first = watch.first_fork(killed, 30)
            if first is None:
                raise TimeoutError(f"no process forked by {tool.name} within 30 s of the kill"
                                   f"{f' ({watch.error})' if watch.error else ''}")
            exited = watch.exit_ns(old, 5)
            if exited is None:
                res.errors.append(f"b {tool.name}: no exit event for PID {old}; timed the fork "
                                  "from just before the kill")
        new = wait_until(lambda: [p for p in tool.pids("web") if p != old], 30, "a new PID")[0]
        seen = time.monotonic_ns()
        wait_until(lambda: http_ok(port, timeout=5), 30, "the replacement to serve")
        serving = time.monotonic_ns() - killed
        if watch is not None:
            fork, problem = replacement_fork(watch, killed, new, first)
            if problem:
                res.errors.append(f"b {tool.name}: {problem}")
    finally:
        if watch is not None:
            watch.close()
        tool.stop()
    sample: dict[str, Any] = {"tool": tool.name, "old_pid": old, "new_pid": new,
                              "new_pid_reported_ms": _ns_ms(seen - killed),
                              "serves_ms": _ns_ms(serving)}
    if watch is not None and fork is not None:
        start = exited if exited is not None else killed
        sample.update(kill_to_exit_ms=_ns_ms(exited - killed) if exited is not None else None,
                      exit_to_fork_ms=_ns_ms(fork.ns - start), fork_pid=fork.child,
                      fork_to_serves_ms=_ns_ms(killed + serving - fork.ns),
                      tree_forks_after_kill=len(watch.forks_after(killed)),
                      events_lost=watch.lost)
        res.add("b.fork", tool.name, _ns_ms(fork.ns - start),
                label="SIGKILL → new process forked (kernel proc connector: worker's exit → "
                "fork)", unit="ms", group="b", target=B_TARGET)
    else:
        sample["polled"] = why
        print(f"  {tool.name}: proc connector unavailable ({why}); polling", flush=True)
        res.add("b.pid", tool.name, _ns_ms(seen - killed),
                label="SIGKILL → new PID seen (control interface polled every 5 ms: no proc "
                "connector)", unit="ms", group="b", target=B_TARGET)
    res.extra.setdefault("crash", []).append(sample)
    res.add("b.serve", tool.name, _ns_ms(serving),
            label="SIGKILL → replacement serves HTTP (GET every 5 ms; includes the service's own "
            "Python start-up, ~60–90 ms, which no supervisor shortens)", unit="ms", group="b",
            target=B_TARGET)


def replacement_fork(watch: ProcWatch, killed: int, new: int,
                     first: Fork) -> tuple[Fork, str]:
    """The fork that began the new worker: the earliest one after the kill on its line of
    descent (a daemon may fork a helper that then forks the worker). It should be ``first``,
    the first fork in the daemon's tree after the kill; if not, the problem says so."""
    line = set(watch.lineage(new))
    forks = [f for f in watch.forks_after(killed) if f.child in line]
    if not forks:
        return first, (f"new PID {new} was not forked in the daemon's tree after the kill; "
                       f"timed the first fork there (PID {first.child})")
    if forks[0] != first:
        return forks[0], (f"the first fork after the kill was PID {first.child}, not on the new "
                          f"worker's line {sorted(line)}; timed the worker's")
    return forks[0], ""


def _ns_ms(ns: int) -> float:
    return round(ns / 1e6, 3)


# -- (a) start-up ---------------------------------------------------------------------------
def startup(tool: Tool, res: Results, settings: Settings, size: int) -> None:
    rss = None
    try:
        launched = tool.start([Program(f"p{i}") for i in range(size)])
        tool.wait_running(timeout=180)
        elapsed = time.monotonic() - launched
        if size == 1:
            # What the daemon holds before it has much to supervise: (c)'s 200 workers less
            # this, per worker, is each tool's own cost of a program.
            time.sleep(2.0)  # as (c): start-up work is done
            rss = daemon_rss(tool.pid)
    finally:
        tool.stop()
    if rss is not None:
        res.add("c.rss1", tool.name, round(rss, 1), label="supervisor RSS (helpers included), 1 worker",
                unit="MiB", group="c")
    res.add(f"a.start{size}", tool.name, _ms(elapsed), label=f"start-up, {size} programs running",
            unit="ms", group="a", target="200 programs: ≤ ½ Circus" if size == 200 else "")


# -- (c) idle overhead and (d) control round trip, on the same 200 workers --------------------
def idle(tool: Tool, res: Results, settings: Settings) -> None:
    n = settings.idle_workers
    json_shell = 0.0
    try:
        tool.start([Program(f"p{i}") for i in range(n)])
        tool.wait_running(timeout=180)
        time.sleep(2.0)  # start-up work (log files, first ticks) is not idle time
        before = sum(map(cpu_ns, daemon_pids(tool.pid)))
        time.sleep(settings.idle_seconds)
        cpu = (sum(map(cpu_ns, daemon_pids(tool.pid))) - before) / 1e9
        rss = daemon_rss(tool.pid)
        api = []
        for _ in range(50):
            started = time.perf_counter()
            tool.status_call()
            api.append(time.perf_counter() - started)
        shell = [run_timed(tool.status_argv()) for _ in range(5)]
        if tool.name == "flipvisor":
            json_shell = statistics.median(
                run_timed([*tool.status_argv(), "--json"]) for _ in range(5))
    finally:
        tool.stop()
    res.add("c.cpu", tool.name, round(cpu, 4), label=f"CPU while idle {settings.idle_seconds:g} s, "
            f"{n} workers", unit="s", group="c", target="≤ ¼ of either")
    res.add("c.rss", tool.name, round(rss, 1), label=f"supervisor RSS (helpers included), {n} workers", unit="MiB",
            group="c", target="≤ supervisord's")
    res.add("d.api", tool.name, _ms(statistics.median(api)),
            label=f"status round trip, Python API, {n} programs", unit="ms", group="d",
            target="< 1 ms")
    res.add("d.shell", tool.name, _ms(statistics.median(shell)),
            label=f"status from the shell, {n} programs", unit="ms", group="d",
            target="< 100 ms")
    if tool.name == "flipvisor":
        res.add("d.shelljson", tool.name, _ms(json_shell),
                label=f"`status --json` from the shell, {n} programs", unit="ms", group="d",
                target="< 100 ms")


# -- (e) deploy under load, and (f) the flip's steps ------------------------------------------
# A daemon's own helper processes, counted with it: flipvisor's output keeper (one per
# supervisor, holding the workers' output pipes). Neither supervisord nor Circus starts one.
HELPERS = ("flipvisor.output_keeper",)


def daemon_pids(pid: int) -> list[int]:
    """``pid`` and its children that are its own helpers, not workers."""
    pids = [pid]
    for child in psutil.Process(pid).children():
        with contextlib.suppress(psutil.Error):
            if any(helper in child.cmdline() for helper in HELPERS):
                pids.append(child.pid)
    return pids


def daemon_rss(pid: int) -> float:
    """MiB resident in the daemon and its helpers (``daemon_pids``)."""
    total = 0
    for each in daemon_pids(pid):
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(each).memory_info().rss
    return total / 2**20


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` in ns (/proc schedstat: psutil's cpu_times counts
    in 10 ms ticks, too coarse for an idle daemon)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):  # the thread ended
            total += int((task / "schedstat").read_text().split()[0])
    return total


def deploy(tool: Tool, res: Results, settings: Settings, ready_delay: float,
           directory: Path) -> None:
    nginx = start_nginx(directory)
    wrk = Wrk(nginx.url("/"), directory)
    client = PyClient(nginx.url("/"), directory)
    reports: list[dict[str, Any]] = []
    windows: list[tuple[float, float]] = []
    runs: dict[str, LoadRun] = {}
    try:
        tool.start([Program("web", "svc", ready_delay)], nginx)
        tool.wait_running()
        wait_until(lambda: http_ok(nginx.listen, "/"), 30, "nginx to proxy to the service")
        wrk.start()
        client.start()
        begin = time.monotonic()
        spacing = (settings.deploy_seconds - 2.0) / DEPLOYS
        for i in range(DEPLOYS):
            time.sleep(max(0.0, begin + 1.0 + i * spacing - time.monotonic()))
            started = time.monotonic()
            reports.append(tool.deploy("web"))
            windows.append((started, time.monotonic()))
        end = max(begin + settings.deploy_seconds, windows[-1][1] + 1.0)
        time.sleep(max(0.0, end - time.monotonic()))
        runs["wrk"] = wrk.stop()
        runs["python"] = client.stop()
    finally:
        for load in (wrk, client):
            if load.process is not None and load.process.poll() is None:
                load.process.kill()
                load.process.wait()
        tool.stop()
        nginx.stop()
    scenario = f"ready{round(ready_delay * 1000)}ms"
    what = "ready at once" if not ready_delay else f"{ready_delay:g} s to start"
    for client_name, run in runs.items():
        kind = "keep-alive (wrk)" if client_name == "wrk" else "conn per request (python)"
        stats = analyze(run.records, windows, begin, end)
        prefix = f"e.{scenario}.{client_name}"
        common = {"group": "e"}
        if client_name == "wrk":
            res.add(f"{prefix}.sockerr", tool.name, run.socket_errors,
                    label=f"{what}, {kind}: wrk's socket errors (idle closes included)",
                    unit="", group="e-info")
        res.add(f"{prefix}.failed", tool.name, stats["failed"],
                label=f"{what}, {kind}: failed requests / {DEPLOYS} deploys", unit="",
                target="0", **common)
        res.add(f"{prefix}.gap", tool.name, _ms(stats["gap"]),
                label=f"{what}, {kind}: longest gap without a success", unit="ms", **common)
        res.add(f"{prefix}.p99in", tool.name, _ms(stats["p99_in"]),
                label=f"{what}, {kind}: p99 during deploys", unit="ms", **common)
        res.add(f"{prefix}.p99out", tool.name, _ms(stats["p99_out"]),
                label=f"{what}, {kind}: p99 outside deploys", unit="ms", **common)
        res.add(f"{prefix}.p99ratio", tool.name, round(stats["p99_in"] / stats["p99_out"], 2)
                if stats["p99_out"] else 0.0,
                label=f"{what}, {kind}: p99 during ÷ outside", unit="×",
                target="≤ 1.5", **common)
        res.add(f"{prefix}.requests", tool.name, stats["requests"],
                label=f"{what}, {kind}: requests", unit="", group="e-info")
        res.extra.setdefault("timelines", {}).setdefault(scenario, {}).setdefault(
            client_name, {})[tool.name] = timeline(run.records, windows, begin, end)
    res.add(f"e.{scenario}.deploy", tool.name,
            _ms(statistics.median(e - s for s, e in windows)),
            label=f"{what}: one deploy command (median)", unit="ms", group="e-info")
    bad = [r for r in reports if not r.get("ok", True) or r.get("exit_code", 0)]
    res.add(f"e.{scenario}.deployfailed", tool.name, len(bad),
            label=f"{what}: deploys that failed", unit="", group="e-info")
    if bad:
        res.errors.append(f"{tool.name} {scenario}: {len(bad)} deploys failed: {bad[0]}")
    if tool.name.startswith("flipvisor"):
        durations = [float(r["duration"]) for r in reports if "duration" in r]
        if durations:
            res.add(f"e.{scenario}.flip", tool.name, _ms(statistics.median(durations)),
                    label=f"{what}: the flip's own duration (median)", unit="ms",
                    group="e-info")
        if not ready_delay and tool.name == "flipvisor":
            flips(reports, res)


def flips(reports: list[dict[str, Any]], res: Results) -> None:
    """(f): each step's duration as the flip itself reports it (median over the deploys)."""
    steps: dict[str, list[float]] = {}
    for report in reports:
        for step in report.get("steps", []):
            steps.setdefault(step["step"], []).append(float(step.get("duration") or 0.0))
        if "duration" in report:
            steps.setdefault("total", []).append(float(report["duration"]))
    res.extra.setdefault("flip_reports", []).extend(reports[:1])
    for name, values in steps.items():
        res.add(f"f.{name}", "flipvisor", _ms(statistics.median(values)),
                label=f"flip step: {name}", unit="ms", group="f")
    # Its own share: what is left after the service's start and the probe interval (probe),
    # nginx's reload and its old workers' exit (reload, proxy-drain) and the drain delay.
    own = []
    for report in reports:
        took = {step["step"]: float(step.get("duration") or 0.0) for step in report["steps"]}
        if "duration" in report:
            own.append(float(report["duration"]) - took.get("probe", 0.0) - took.get(
                "reload", 0.0) - took.get("proxy-drain", 0.0) - DRAIN_DELAY)
    if own:
        res.add("f.own", "flipvisor", _ms(statistics.median(own)),
                label="its own share: total − probe − reload − proxy-drain − drain delay",
                unit="ms", group="f", target="< 100 ms")


def analyze(records: list[Record], windows: list[tuple[float, float]], begin: float,
            end: float) -> dict[str, float]:
    """Failures, the longest gap between successes, p99 latency inside/outside deploys."""
    window = [r for r in records if begin + WARMUP <= r[0] <= end]
    ok = sorted(s + lat for s, lat, status in window if 200 <= status < 300)
    points = [begin + WARMUP, *ok]
    starts = sorted(s for s, _, _ in window)
    # A gap counts only if a client started a request inside it: on a shared machine every
    # client can be descheduled at once, and that silence is not the tool's.
    gap = max((b - a for a, b in itertools.pairwise(points)
               if bisect.bisect_right(starts, a) < bisect.bisect_left(starts, b)), default=0.0)

    def during(start: float) -> bool:
        return any(s <= start <= e + DEPLOY_TAIL for s, e in windows)

    inside = [lat for s, lat, _ in window if during(s)]
    outside = [lat for s, lat, _ in window if not during(s)]
    return {
        "failed": sum(1 for _, _, status in window if not 200 <= status < 300),
        "gap": gap,
        "p99_in": p99(inside),
        "p99_out": p99(outside),
        "requests": len(window),
    }


def p99(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def timeline(records: list[Record], windows: list[tuple[float, float]], begin: float,
             end: float) -> dict[str, Any]:
    """Per BIN seconds: the worst latency and the failures, relative to the load's start."""
    bins = int((end - begin) / BIN) + 1
    worst = [0.0] * bins
    failed = [0] * bins
    for start, latency, status in records:
        index = int((start - begin) / BIN)
        if 0 <= index < bins:
            worst[index] = max(worst[index], latency)
            if not 200 <= status < 300:
                failed[index] += 1
    return {
        "bin": BIN,
        "worst_ms": [round(w * 1000, 2) for w in worst],
        "failed": failed,
        "deploys": [(round(s - begin, 3), round(e - begin, 3)) for s, e in windows],
    }


# -- (g) the supervisor killed under load, and started again ----------------------------------
G_RECOVERY = 20.0  # how long the relaunched tool gets to supervise the service again
G_TARGET = "0 failed; supervised again; 0 left unsupervised"


def service_processes() -> list[psutil.Process]:
    """The benchmarked service's processes among ours (orphans re-parent to the bench, a
    subreaper, so every one this job started is here)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(arg.endswith("bench/app.py") for arg in proc.cmdline()):
                found.append(proc)
    return found


def killed(tool: Tool, res: Results, settings: Settings, directory: Path) -> None:
    """SIGKILL the supervisor (the OOM killer, a botched upgrade) under load through nginx, then
    launch it again as an init system would, with the same config. Counted: failed requests,
    whether the tool runs the program again (through its own control interface) and how soon,
    and the service processes left running that it does not report (orphans serving on,
    unsupervised: no restart if they crash, and in the way of the next deploy)."""
    nginx = start_nginx(directory)
    client = PyClient(nginx.url("/"), directory)
    recovered: float | None = None
    unsupervised = 0
    running = 0
    try:
        tool.start([Program("web", "svc")], nginx)
        tool.wait_running()
        wait_until(lambda: http_ok(nginx.listen, "/"), 30, "nginx to proxy to the service")
        client.start()
        time.sleep(1.0)
        begin = time.monotonic()
        assert tool.process is not None
        tool.process.kill()
        tool.process.wait()
        relaunched = tool.relaunch()

        def left_alone() -> int:
            reported = set(tool.pids("web"))
            return sum(1 for proc in service_processes() if proc.pid not in reported)

        # Recovered: the tool runs the program and reports every service process there is
        # (flipvisor drains what the killed one left). Not merely "running" once: supervisord
        # says RUNNING for each new process that then fails to bind the port the orphan holds.
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: tool.all_running(["web"]) and left_alone() == 0, G_RECOVERY,
                       "the program to be supervised again", interval=0.05)
            recovered = time.monotonic() - relaunched
        try:
            unsupervised = left_alone()
            before = tool.pids("web")
            time.sleep(1.0)
            stable = bool(before) and tool.pids("web") == before
        except Exception:  # the tool does not answer: none of its service is supervised
            unsupervised = len(service_processes())
            stable = False
        if not stable:
            recovered = None
        running = len(service_processes())
        end = time.monotonic()
        run = client.stop()
    finally:
        if client.process is not None and client.process.poll() is None:
            client.process.kill()
            client.process.wait()
        tool.stop()
        nginx.stop()
        kill_orphans(service_processes())
    window = [r for r in run.records if begin <= r[0] <= end]
    failed = sum(1 for _, _, status in window if not 200 <= status < 300)
    res.add("g.failed", tool.name, failed, label="failed requests, kill → relaunch → settled "
            "(a connection per request)", unit="", group="g", target="0")
    res.add("g.recovered", tool.name, 1 if recovered is not None else 0,
            label=f"supervises the service again within {G_RECOVERY:g} s: reports every "
            "service process, with stable PIDs (1 yes, 0 no)", unit="",
            group="g", target="1")
    if recovered is not None:
        res.add("g.recover", tool.name, _ms(recovered),
                label="relaunch → supervised again (the killed one's processes gone)", unit="ms",
                group="g")
    res.add("g.unsupervised", tool.name, unsupervised,
            label="service processes left running that the tool does not report", unit="",
            group="g", target="0")
    res.add("g.processes", tool.name, running,
            label="service processes running afterwards (1 configured)", unit="", group="g")
    res.extra.setdefault("killed", []).append(
        {"tool": tool.name, "failed": failed, "requests": len(window),
         "recover_ms": _ms(recovered) if recovered is not None else None,
         "unsupervised": unsupervised, "processes": running})
