"""A Reaper for in-process tests: library mode (only the children it registered), running for
the duration of a block; a fresh interpreter for tests that change process-wide state; and
whether a PID still runs, for both."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from flipvisor.reaper import Reaper

ROOT = Path(__file__).resolve().parents[1]


@asynccontextmanager
async def running_reaper() -> AsyncIterator[Reaper]:
    """A ``Reaper(reap_orphans=False)`` reaping for the duration of the block; never the pytest
    process's other children (a session fixture's etcd, say)."""
    async with anyio.create_task_group() as tg:
        reaper = Reaper(reap_orphans=False)
        await tg.start(reaper.run)
        try:
            yield reaper
        finally:
            tg.cancel_scope.cancel()


def run_script(script: str, *args: str) -> Any:
    """Run ``script`` with ``args`` in a fresh interpreter (for what must not touch pytest's own
    process: becoming a subreaper, closing fd 3); the JSON it prints. Fails the test if it fails."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs: an exited process, even one not reaped yet, is not alive. Also
    for ``run_script`` scripts (``from tests.reaping import alive``: they run in the repo root)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        # A pidfd reads ready once its process exited.
        return not select.select([pidfd], [], [], 0)[0]
    finally:
        os.close(pidfd)
