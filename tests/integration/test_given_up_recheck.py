"""A given-up stop that a `start` overtook (``CrashPolicy._stop_given_up``): found given up,
then revived before the scheduled stop ran. The stop looks again when it runs, and stops
nothing that serves again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from flipvisor.config import DrainConfig, ProgramConfig, ReadinessConfig
from tests.fixtures.flipvisor import svc_command
from tests.integration.test_discard import DEADLINE, listed, running_program, started_worker
from tests.waiting import await_until


async def test_a_stop_scheduled_before_a_start_revived_the_generation_stops_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ProgramConfig(
        command=svc_command(),
        numprocs=1,
        readiness=ReadinessConfig(http="/health", timeout=DEADLINE),
        drain=DrainConfig(delay=0.0, timeout=2.0),
    )
    async with running_program(tmp_path, config) as program:
        program.start_flip(kind="start").close()  # nobody follows its steps
        await started_worker(program)

        async def serving() -> bool:
            return program.serving is not None and program.current_flip is None

        await await_until(serving, timeout=DEADLINE, message="generation 1 serving")
        gen = program.serving
        assert gen is not None
        crashes = program.crashes
        ran = anyio.Event()
        stop_given_up = crashes._stop_given_up

        async def spied(*args: Any) -> None:
            await stop_given_up(*args)
            ran.set()

        monkeypatch.setattr(crashes, "_stop_given_up", spied)
        # Found given up while fatal (as at an orphan's reaping)...
        program.fatal_reason = "worker 0 of generation 1 exited"
        with monkeypatch.context() as found:
            found.setattr(gen, "given_up", lambda exiting=None: True)
            crashes.stop_if_given_up()
        # ...then a `start` cleared fatal (its worker runs) before the scheduled stop ran.
        program.fatal_reason = None
        with anyio.fail_after(DEADLINE):
            await ran.wait()
        assert program.serving is gen, listed(program)
        assert "given-up" not in [e.kind for e in program.runtime.events.recent()]
