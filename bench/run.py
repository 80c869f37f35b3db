"""``python3 -m bench.run [--quick] [--only b,e,...] [--repeat N]``: run the workloads for
flipvisor, supervisord and Circus interleaved (the tools' order rotates each repetition), save
``bench/results/<timestamp>.json``, and write docs/benchmarks.md and docs/benchmarks-deploy.png."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import workloads
from bench.common import ROOT, become_subreaper, reap_strays
from bench.results import Results
from bench.tools import TOOLS, Tool

ORDER = ["b", "e", "a", "d", "c", "f", "g"]  # d and c share one run; f comes from e's flips


def versions() -> dict[str, str]:
    from importlib.metadata import version

    found = {"python": platform.python_version(), "nproc": str(os.cpu_count())}
    for package in ("flipvisor", "supervisor", "circus", "pyzmq", "tornado"):
        try:
            found[package] = version(package)
        except Exception:
            found[package] = "?"
    for binary, flag in (("nginx", "-v"), ("wrk", "-v")):
        try:
            out = subprocess.run([binary, flag], capture_output=True, text=True, timeout=10,
                                 check=False)
            first = (out.stdout + out.stderr).strip().splitlines()[0]
            found[binary] = first.removeprefix("nginx version: ").split(" [")[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            found[binary] = "?"
    found["kernel"] = platform.release()
    return found


def byte_compile_flipvisor() -> None:
    """Compile flipvisor's modules to bytecode, as installing it from a wheel does.

    supervisord and Circus come from wheels, which pip byte-compiles at install; flipvisor is
    installed from this checkout in editable mode, which compiles nothing. Where the environment
    also sets PYTHONDONTWRITEBYTECODE (this machine does), every flipvisor process would compile
    its modules from source at each start: about 100 ms of every start-up and shell `status`
    that an installed flipvisor does not pay. Python still reads bytecode it did not write."""
    import compileall

    source = ROOT / "src" / "flipvisor"
    if source.is_dir():
        compileall.compile_dir(str(source), quiet=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer sizes")
    parser.add_argument("--only", default=",".join(ORDER), help="workloads, e.g. b,e")
    parser.add_argument("--repeat", type=int, default=None,
                        help="repetitions (default 3, 2 with --quick)")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/")
    args = parser.parse_args(argv)
    repeat = args.repeat or (2 if args.quick else 3)
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    if "c" in only and "d" not in only:
        only.append("d")  # c is measured in d's job
    if "f" in only and "e" not in only:
        only.append("e")  # f is read from e's flips
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    settings = workloads.Settings(
        quick=args.quick,
        startup_sizes=(1, 50) if args.quick else (1, 50, 200),
        idle_seconds=10.0 if args.quick else 30.0,
        deploy_seconds=10.0 if args.quick else 20.0,
    )
    become_subreaper()
    byte_compile_flipvisor()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    results = Results(ROOT / "bench" / "results" / f"{stamp}.json")
    results.meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "quick": args.quick, "repeat": repeat, "only": only, "tools": tools,
                    "settings": settings.__dict__, "machine": versions()}
    results.meta["loadavg_start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    base = Path(tempfile.mkdtemp(prefix="flipvisor-bench-"))
    os.environ.pop("FLIPVISOR_CONFIG", None)
    begun = time.monotonic()
    try:
        for workload in [w for w in ORDER if w in only]:
            jobs = plan(workload, settings)
            for rep in range(repeat):
                order = tools[rep % len(tools):] + tools[:rep % len(tools)]
                for job_name, job in jobs:
                    for tool_name in order:
                        takes_part = TOOLS[tool_name].workloads
                        if takes_part is not None and workload not in takes_part:
                            continue
                        directory = base / f"{workload}-{job_name}-{rep}-{tool_name}"
                        directory.mkdir(parents=True)
                        tool = TOOLS[tool_name](directory / "tool")
                        print(f"[{time.monotonic() - begun:6.1f}s] {workload} {job_name} "
                              f"rep {rep + 1}/{repeat}: {tool_name}", flush=True)
                        try:
                            job(tool, results, directory)
                        except Exception as exc:
                            message = f"{workload} {job_name} {tool_name} rep {rep}: {exc!r}"
                            print("  FAILED:", message, file=sys.stderr, flush=True)
                            traceback.print_exc()
                            results.errors.append(message)
            results.save()
    finally:
        reap_strays()
        results.meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        results.meta["seconds"] = round(time.monotonic() - begun, 1)
        results.save()
        shutil.rmtree(base, ignore_errors=True)
    print(f"results: {results.path}")
    if not args.no_docs:
        from bench.report import write_docs

        write_docs(results)
        print("wrote docs/benchmarks.md and docs/benchmarks-deploy.png")
    return 0


Job = Callable[[Tool, Results, Path], None]


def plan(workload: str, s: workloads.Settings) -> list[tuple[str, Job]]:
    """The (name, job) pairs of one workload; d runs inside c's job (same 200 workers)."""
    if workload == "b":
        return [("crash", lambda t, r, d: workloads.crash(t, r, s))]
    if workload == "e":
        return [(f"deploy{delay:g}", lambda t, r, d, delay=delay: workloads.deploy(
            t, r, s, delay, d)) for delay in (0.0, 0.5)]
    if workload == "a":
        return [(f"start{n}", lambda t, r, d, n=n: workloads.startup(t, r, s, n))
                for n in s.startup_sizes]
    if workload == "d":
        return [("idle+status", lambda t, r, d: workloads.idle(t, r, s))]
    if workload == "g":
        return [("killed", lambda t, r, d: workloads.killed(t, r, s, d))]
    return []  # "c" is measured with "d"; "f" with "e"


if __name__ == "__main__":
    sys.exit(main())
