# ruff: noqa: RUF001 (typographic signs are meant: this writes a document for people)
"""docs/benchmarks.md (results table: medians, min/max, ratios, targets, machine, date) and
docs/benchmarks-deploy.png (latency and failures over time during (e)'s deploys) from Results."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from bench.common import ROOT
from bench.results import Metric, Results

TOOLS = ["flipvisor", "supervisord", "circus", "flipvisor-fixed"]
COLORS = {"flipvisor": "tab:green", "supervisord": "tab:red", "circus": "tab:blue",
          "flipvisor-fixed": "tab:purple"}
HEADINGS = {"flipvisor-fixed": "flipvisor, fixed port"}
# flipvisor's other deployment mode: its cells are judged against the same targets.
VARIANT = "flipvisor-fixed"
GROUPS = {
    "b": "(b) Crash → replacement",
    "e": "(e) Deploy under load (5 deploys through nginx)",
    "e-info": "(e) Details",
    "a": "(a) Start-up",
    "d": "(d) Control round trip",
    "c": "(c) Overhead",
    "f": "(f) flipvisor's own share of a flip (ready-at-once service, from `flip --json`)",
    "g": "(g) The supervisor SIGKILLed under load, then started again (not in issue 5's list)",
}
DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "benchmarks-deploy.png"

Check = Callable[[dict[str, float]], bool]


def _check(key: str) -> Check | None:
    """Whether flipvisor meets issue 5's target for ``key`` (None: no target)."""
    if key.startswith("b."):
        return lambda m: all(m["flipvisor"] * 10 <= m[p] for p in ("supervisord", "circus")
                             if p in m)
    if key == "a.start200":
        return lambda m: "circus" in m and m["flipvisor"] * 2 <= m["circus"]
    if key == "c.cpu":
        return lambda m: all(m["flipvisor"] * 4 <= m[p] for p in ("supervisord", "circus")
                             if p in m)
    if key == "c.rss":
        return lambda m: "supervisord" in m and m["flipvisor"] <= m["supervisord"]
    if key == "d.api":
        return lambda m: m["flipvisor"] < 1.0
    if key in ("d.shell", "d.shelljson"):
        return lambda m: m["flipvisor"] < 100.0
    if re.fullmatch(r"e\.[^.]+\.[^.]+\.failed", key):
        return lambda m: m["flipvisor"] == 0
    if key.endswith(".p99ratio"):
        return lambda m: m["flipvisor"] <= 1.5
    if key == "f.own":
        return lambda m: m["flipvisor"] < 100.0
    if key in ("g.failed", "g.unsupervised"):
        return lambda m: m["flipvisor"] == 0
    if key == "g.recovered":
        return lambda m: m["flipvisor"] == 1
    return None


def _fmt(value: float) -> str:
    if value == int(value) and abs(value) >= 10:
        return f"{int(value)}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if value else "0"


def _cell(metric: Metric, tool: str) -> str:
    values = metric.samples.get(tool)
    if not values:
        return "—"
    median = metric.median(tool)
    assert median is not None
    spread = f" [{_fmt(min(values))}–{_fmt(max(values))}]" if len(values) > 1 else ""
    return f"**{_fmt(median)}**{spread}"


def _ratio(metric: Metric, peer: str) -> str:
    mine, theirs = metric.median("flipvisor"), metric.median(peer)
    if mine is None or theirs is None or not theirs:
        return "—"
    ratio = mine / theirs
    # Two significant digits below 0.1: a 400-fold margin must not print as "0.00".
    return f"{ratio:.2f}" if ratio >= 0.1 or not ratio else f"{ratio:.2g}"


def table(results: Results, group: str) -> list[str]:
    metrics = [m for m in results.metrics.values() if m.group == group]
    if not metrics:
        return []
    tools = [t for t in TOOLS if any(m.samples.get(t) for m in metrics)]
    headings = " | ".join(HEADINGS.get(t, t) for t in tools)
    lines = [f"### {GROUPS.get(group, group)}", "",
             f"| metric | unit | {headings} | fv ÷ supervisord | fv ÷ circus | target | met |",
             "| --- | --- | " + "--- | " * len(tools) + "--- | --- | --- | --- |"]
    for m in metrics:
        check = _check(m.key)
        medians = {t: v for t in TOOLS if (v := m.median(t)) is not None}
        met = ""
        if check is not None and "flipvisor" in medians:
            met = "yes" if check(medians) else "**no**"
        if check is not None and VARIANT in medians:
            as_flipvisor = {**medians, "flipvisor": medians[VARIANT]}
            met += f" (fixed port: {'yes' if check(as_flipvisor) else '**no**'})"
        lines.append(f"| {m.label} | {m.unit} | " + " | ".join(_cell(m, t) for t in tools)
                     + f" | {_ratio(m, 'supervisord')} | {_ratio(m, 'circus')} | {m.target} "
                     f"| {met.strip()} |")
    return [*lines, ""]


def per_program(results: Results) -> None:
    """Rows derived from the medians: what one more program costs each tool, apart from what
    the tool costs before its first program (its interpreter and libraries)."""
    derived = [("a.per", "a.start200", "a.start50", 150, 1.0,
                "start-up per program: (200 programs − 50) ÷ 150", "ms"),
               ("c.rssper", "c.rss", "c.rss1", 199, 1024.0,
                "RSS per worker: (200 workers − 1) ÷ 199", "KiB")]
    for key, large, small, count, scale, label, unit in derived:
        if large not in results.metrics or small not in results.metrics:
            continue
        group = results.metrics[large].group
        for tool in TOOLS:
            high, low = results.metrics[large].median(tool), results.metrics[small].median(tool)
            if high is not None and low is not None:
                results.metrics.setdefault(key, Metric(key, label, unit, group)).samples[tool] = [
                    round((high - low) / count * scale, 2)]


def write_docs(results: Results) -> None:
    DOC.parent.mkdir(exist_ok=True)
    per_program(results)
    plotted = plot(results)
    meta = results.meta
    machine = meta.get("machine", {})
    s = meta.get("settings", {})
    lines = [
        "# Benchmarks: flipvisor, supervisord and Circus side by side",
        "",
        f"Generated by `python3 -m bench.run{' --quick' if meta.get('quick') else ''}` on "
        f"{meta.get('date', '?')} ({meta.get('seconds', '?')} s, {meta.get('repeat')} "
        "repetitions; the tools take turns, their order rotated each repetition). Raw samples: "
        "`bench/results/<timestamp>.json` (not committed).",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()) + ".",
        f"Load average at start/end: {meta.get('loadavg_start', '?')} / "
        f"{meta.get('loadavg_end', '?')} (the machine is shared: absolute times are noise, "
        "compare within a row).",
        "",
        "Each cell: **median** [min–max] over the repetitions. fv ÷ peer: flipvisor's median "
        "divided by the peer's (below 1: flipvisor took less time / used less). "
        "\"met\": flipvisor against issue 5's target. Where flipvisor falls short, and why: "
        "[performance.md](performance.md).",
        "",
    ]
    for group in GROUPS:
        lines += table(results, group)
    if plotted:
        lines += ["## Deploys under load", "",
                  "![latency and failures during deploys](benchmarks-deploy.png)", "",
                  "Worst latency per 100 ms (lines, log scale) and failed requests (crosses, "
                  "right axis) during the last repetition of (e); the shaded bars at the bottom "
                  "are each tool's deploy commands.", ""]
    lines += [
        "## How it is measured",
        "",
        "- Every tool runs in its own temp dir with a config the harness writes, and is "
        "stopped (and every descendant killed) after each measurement.",
        "- State is read through each tool's own control interface, in process: flipvisor's "
        "control-socket client, supervisord's XML-RPC over its unix socket (what "
        "`supervisorctl` uses), Circus's zmq `CircusClient` (what `circusctl` uses). Shell "
        "round trips use each tool's console script directly.",
        "- Configs: defaults, except supervisord `startsecs=0` (else `RUNNING` comes 1 s "
        "late by design) and Circus `check_delay = 1` (its ini default is 5 s, which would "
        "make its respawn 5× slower). flipvisor: readiness `http: /health` (interval 0.1 s), "
        "drain delay 0.5 s, proxy with `pidfile` — the defaults.",
        "- The service is `tests/apps/svc.py` through `bench/app.py`, which turns Nagle off "
        "on accepted connections (as gunicorn/uvicorn do), so no tool gains from its listening "
        "socket's options. supervisord: it binds a fixed port; Circus: a shared socket "
        "(`use_sockets`, `$(circus.sockets.web)` moved to fd 3); flipvisor: its fd 3.",
        "- (b): one fresh instance per sample (a second kill would meet each tool's restart "
        "backoff); SIGKILL the worker. The replacement's time comes from the kernel: the proc "
        "connector (netlink, `bench/procwatch.py`) timestamps the worker's exit and "
        "the first fork in the daemon's process tree after it (CLOCK_MONOTONIC ns, taken as "
        "it happens; one observer for the three tools), and that fork is checked to be the new "
        "worker's. "
        "Nothing is asked of the tool until then: a control request wakes a daemon's loop "
        "(supervisord restarts an exited process at the next turn of its loop, which waits up "
        "to 1 s; polled every 5 ms it forks in ~5 ms, left alone in ~1 s). Then the control "
        "interface for the new PID, and GET /health every 5 ms until it answers: that time "
        "includes the service's own Python start-up. Without the proc connector (a container, "
        "or no CAP_NET_ADMIN before Linux 6.6), "
        "the control interface is polled every 5 ms for the new PID instead (\"new PID seen\"), "
        "which both coarsens and perturbs the measurement.",
        "- (a): from launching the daemon until one status call shows every program with a "
        "live process (flipvisor: `running` with a serving PID; supervisord: `RUNNING`; "
        "Circus: every watcher `active`, set after its processes were spawned).",
        f"- (c)/(d): {s.get('idle_workers', 200)} `sleep infinity` workers; after 2 s of "
        f"settling, the CPU time of the daemon's threads (/proc schedstat, in ns) over "
        f"{s.get('idle_seconds', '?')} s and its RSS; then 50 in-process status calls and 5 "
        "shell `status` commands (medians).",
        f"- (e): nginx in front (same template for all), {s.get('deploy_seconds', '?')} s of "
        "load, 5 deploys (flipvisor `flip` via its CLI, supervisord `stopProcess`+"
        "`startProcess` as `supervisorctl restart` does, Circus `reload` graceful, waiting). "
        "\"flipvisor, fixed port\" is flipvisor's other mode, in (e) only: `socket.port` fixed "
        "(one socket kept across generations, as Circus's shared socket), readiness "
        "`notify`, no `proxy:` section, so nginx points at the port once and is never "
        "reloaded; its \"met\" is in parentheses. "
        "Clients: wrk, 2 threads × 1 keep-alive connection, 2 ms pause between requests (a "
        "LuaJIT FFI clock records each request; a request whose connection broke is a failure, "
        "wrk's own socket-error count is listed apart since it also counts idle connections "
        "nginx closes); and a Python client, 2 threads, a new connection per request, 2 ms "
        "pause. \"During deploys\": requests started between a deploy command's start and "
        "0.5 s after it returned. Longest gap: between two successful answers, counted only "
        "if some request was started within it.",
        "- (g): nginx in front, the Python client's load; after 1 s, SIGKILL the daemon and launch "
        "it again at once with the same config (what systemd's `Restart=` does). \"Supervised "
        "again\": the control interface reports the program running and every service process "
        "there is (the killed daemon's orphans included), and its PIDs are the same 1 s later. "
        "supervisord and Circus leave the orphan serving, unsupervised (no restart if it "
        "crashes): supervisord's new process cannot bind the port the orphan holds and "
        "restarts in a loop; circusd cannot bind its socket. Nothing in issue 5 asks for (g); "
        "its targets are flipvisor's own claims (README: \"If the supervisor is killed\").",
        "",
    ]
    if results.errors:
        lines += ["## Errors during this run", ""] + [f"- `{e}`" for e in results.errors] + [""]
    DOC.write_text("\n".join(lines))


def plot(results: Results) -> bool:
    timelines = results.extra.get("timelines")
    if not timelines:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = sorted(timelines)
    clients = ["python", "wrk"]
    fig, axes = plt.subplots(len(scenarios), len(clients), figsize=(13, 4.2 * len(scenarios)),
                             squeeze=False)
    for row, scenario in enumerate(scenarios):
        for col, client in enumerate(clients):
            ax = axes[row][col]
            errors_ax = ax.twinx()
            per_tool = timelines[scenario].get(client, {})
            for lane, tool in enumerate(t for t in TOOLS if t in per_tool):
                tl = per_tool[tool]
                xs = [i * tl["bin"] for i in range(len(tl["worst_ms"]))]
                ys = [max(v, 0.1) if v else float("nan") for v in tl["worst_ms"]]
                ax.plot(xs, ys, color=COLORS[tool], label=HEADINGS.get(tool, tool),
                        linewidth=1.1)
                fx = [x for x, f in zip(xs, tl["failed"], strict=False) if f]
                fy = [f for f in tl["failed"] if f]
                if fx:
                    errors_ax.scatter(fx, fy, color=COLORS[tool], marker="x", s=22)
                for start, end in tl["deploys"]:
                    ax.axvspan(start, end, ymin=0.02 + 0.03 * lane, ymax=0.04 + 0.03 * lane,
                               color=COLORS[tool], alpha=0.8)
            ax.set_yscale("log")
            delay = float(scenario.removeprefix("ready").removesuffix("ms")) / 1000
            what = "ready at once" if not delay else f"{delay:g} s to start"
            kind = "keep-alive (wrk)" if client == "wrk" else "connection per request"
            ax.set_title(f"service {what}, {kind}")
            ax.set_xlabel("seconds since load started")
            ax.set_ylabel("worst latency per 100 ms (ms)")
            errors_ax.set_ylabel("failed requests per 100 ms (×)")
            errors_ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    PLOT.parent.mkdir(exist_ok=True)
    fig.savefig(PLOT, dpi=90)
    plt.close(fig)
    return True


def main() -> None:
    """Rewrite the docs from a saved results file: ``python3 -m bench.report FILE``."""
    import sys

    write_docs(Results.load(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
