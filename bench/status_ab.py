"""``python3 -m bench.status_ab [--blocks N] [--calls N] [--programs N] REV [REV ...]``: the
control round trip of (d) for several commits of flipvisor, side by side.

On a shared machine one run's absolute times are noise, and two runs minutes apart differ by
more than a change of a few percent. So every commit (``git archive`` of its ``src``) runs its
own supervisor with the same ``sleep`` programs, all at once, and the ``status`` calls go to them
in turns of a few calls each, through each commit's own ``flipvisor.client.call`` (the client is
half of the round trip): every commit meets the same moment's load. Prints per-block medians and
the overall median per commit, in milliseconds, and each answer's size.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import orjson
import yaml

RUN = 15  # calls to one commit in a row
WARM = 3  # of those, not counted: the client's memory settles on that commit's answers
READY_DEADLINE = 180.0
REPO = Path(__file__).resolve().parents[1]


def export_src(rev: str, into: Path) -> Path:
    """``rev``'s ``src`` folder, written under ``into``; the folder holding its package."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev, "src"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def start_supervisor(src: Path, folder: Path, programs: int) -> subprocess.Popen[bytes]:
    """``flipvisor run`` of the code in ``src``, with ``programs`` sleeping programs."""
    config = folder / "flipvisor.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(folder / "state"),
                "programs": {f"p{i}": {"command": ["sleep", "infinity"]} for i in range(programs)},
            }
        )
    )
    return subprocess.Popen(
        [sys.executable, "-m", "flipvisor", "-c", str(config), "run"],
        env={**os.environ, "PYTHONPATH": str(src)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def status_call(name: str, src: Path, socket_path: Path) -> Callable[[], dict[str, Any]]:
    """A ``status`` call through the client of the code in ``src``, imported under its own
    package name so that every commit's client sits side by side in this process."""
    package = f"flipvisor_{name}"
    (src / package).symlink_to(src / "flipvisor", target_is_directory=True)
    sys.path.insert(0, str(src))
    client = importlib.import_module(f"{package}.client")
    protocol = importlib.import_module(f"{package}.protocol")
    request = protocol.Request("status")

    def call() -> dict[str, Any]:
        answer: dict[str, Any] = client.call(socket_path, request, timeout=10)
        return answer

    return call


def wait_running(name: str, call: Callable[[], dict[str, Any]], programs: int) -> None:
    deadline = time.monotonic() + READY_DEADLINE
    while True:
        try:
            document = call()["result"]
            if (
                not document["starting"]
                and len(document["programs"]) == programs
                and all(p["state"] == "running" for p in document["programs"])
            ):
                return
        except Exception:  # not listening yet: the deadline ends the wait
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{name}: its {programs} programs did not run within the deadline")
        time.sleep(0.3)


def measure(calls: dict[str, Callable[[], Any]], blocks: int, per_block: int) -> None:
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for block in range(blocks):
        block_times: dict[str, list[float]] = {name: [] for name in calls}
        for turn in range(max(1, per_block // (RUN - WARM))):
            # Each turn starts with another commit, so none is always first after a pause.
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                for j in range(RUN):
                    began = time.perf_counter()
                    calls[name]()
                    if j >= WARM:
                        block_times[name].append(time.perf_counter() - began)
        for name, samples in block_times.items():
            times[name].extend(samples)
        medians = "  ".join(
            f"{n} {statistics.median(s) * 1000:.3f}" for n, s in block_times.items()
        )
        print(f"block {block + 1} (load {os.getloadavg()[0]:.1f}): {medians}", flush=True)
    overall = "  ".join(f"{n} {statistics.median(s) * 1000:.3f}" for n, s in times.items())
    print(f"overall medians (ms): {overall}")
    sizes = "  ".join(f"{n} {len(orjson.dumps(call()))}" for n, call in calls.items())
    print(f"answer bytes: {sizes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revs", nargs="+", help="commits to compare (e.g. main~3 HEAD)")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--calls", type=int, default=360, help="counted calls per commit per block")
    parser.add_argument("--programs", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="status-ab-") as temp:
        processes: list[subprocess.Popen[bytes]] = []
        calls: dict[str, Callable[[], Any]] = {}
        try:
            for index, rev in enumerate(args.revs):
                name = f"v{index}"  # a module name whatever the rev is called
                folder = Path(temp) / name
                folder.mkdir()
                src = export_src(rev, folder)
                processes.append(start_supervisor(src, folder, args.programs))
                calls[rev] = status_call(name, src, folder / "state" / "flipvisor.sock")
            for rev, call in calls.items():
                wait_running(rev, call, args.programs)
            for call in calls.values():
                for _ in range(20):  # warm up both sides
                    call()
            measure(calls, args.blocks, args.calls)
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=60)


if __name__ == "__main__":
    main()
