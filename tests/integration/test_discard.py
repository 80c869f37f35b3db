"""A generation that never served, discarded by its failed flip (``discard.py``): a real Program
whose first start fails its readiness probe, with real workers that ignore the drain signal. The
flip waits for the generation's whole drain; past its bound the generation stays the program's
(listed, waited for by a stop) until it has ended."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from flipvisor import discard as discard_module
from flipvisor.config import (
    DrainConfig,
    LogsConfig,
    ProgramConfig,
    ReadinessConfig,
    RegistryConfig,
)
from flipvisor.discard import DISCARD_MARGIN, discard_bound
from flipvisor.events import EventLog
from flipvisor.generation import KILL_GRACE
from flipvisor.program import Program, Runtime
from flipvisor.registry.local import LocalRegistry
from tests.fixtures.flipvisor import svc_command
from tests.reaping import running_reaper
from tests.waiting import await_until

DEADLINE = 20.0


def stubborn(drain_timeout: float) -> ProgramConfig:
    """A worker that ignores SIGTERM (only the drain's SIGKILL ends it) and never gets ready."""
    # Ignored from its first instruction (an ignored signal stays ignored across exec), not
    # once the service has started: on a loaded machine the probe may fail before that.
    ignoring = ["sh", "-c", 'trap "" TERM; exec "$0" "$@"']
    return ProgramConfig(
        command=[*ignoring, *svc_command("--ignore-term", "--health-fail")],
        numprocs=1,
        readiness=ReadinessConfig(http="/health", timeout=0.5),
        drain=DrainConfig(delay=0.0, timeout=drain_timeout),
    )


@asynccontextmanager
async def running_program(tmp_path: Path, config: ProgramConfig) -> AsyncIterator[Program]:
    """``web`` running ``config`` in its own task group, on a real reaper; stopped after."""
    async with running_reaper() as reaper:
        runtime = Runtime(
            reaper=reaper,
            registry=LocalRegistry(tmp_path / "registry.json", RegistryConfig()),
            events=EventLog(),
            state_dir=tmp_path,
            logs=LogsConfig(),
        )
        program = Program("web", config, runtime)
        async with anyio.create_task_group() as tg:
            await tg.start(program.run)
            try:
                yield program
            finally:
                with anyio.CancelScope(shield=True), anyio.fail_after(DEADLINE):
                    await program.stop()
                tg.cancel_scope.cancel()


def listed(program: Program) -> dict[int, dict[str, Any]]:
    """The program's generations as ``status --json`` lists them, by number."""
    return {gen["generation"]: gen for gen in program.status()["generations"]}


async def started_worker(program: Program) -> int:
    """The PID of generation 1's worker, once it runs."""

    async def pid() -> int | None:
        gen = listed(program).get(1)
        return gen["pids"][0] if gen is not None and gen["pids"] else None

    return await await_until(pid, timeout=DEADLINE, message="generation 1's worker")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_flip_waits_for_the_whole_drain_however_long_its_timeout() -> None:
    """A drain of 120 s (long requests) is waited for to its SIGKILL, and past it for both kill
    graces (the workers', then what they left): not a fixed bound shorter than the drain."""
    for timeout in (1.0, 40.0, 120.0):
        bound = discard_bound(DrainConfig(delay=60.0, timeout=timeout))
        assert bound == timeout + 2 * KILL_GRACE + DISCARD_MARGIN, "a discard has no delay"


async def test_a_discarded_generation_is_listed_until_its_drain_is_over(tmp_path: Path) -> None:
    async with running_program(tmp_path, stubborn(drain_timeout=2.0)) as program:
        report = program.start_flip(kind="start")
        report.close()  # nobody follows its steps
        pid = await started_worker(program)
        with anyio.fail_after(DEADLINE):
            while not report.finished:  # listed for as long as its worker runs
                assert 1 in listed(program) or not alive(pid)
                await anyio.sleep(0.05)
        assert not report.ok
        assert not alive(pid), "the flip answered while its worker ran"
        assert listed(program) == {}
        killed = [e for e in program.runtime.events.recent() if e.kind == "killed"]
        assert [e.fields["pid"] for e in killed] == [pid], "the drain ran to its SIGKILL"


async def test_past_the_bound_the_generation_stays_the_programs_until_it_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the bound is for: a worker the kernel does not let go of once SIGKILLed (D state)
    must not hold the flip's answer forever. Here a bound shorter than the drain stands in for
    that: the flip answers, and the generation is still the program's while its worker runs."""
    monkeypatch.setattr(discard_module, "discard_bound", lambda drain: 0.5)
    async with running_program(tmp_path, stubborn(drain_timeout=3.0)) as program:
        report = program.start_flip(kind="start")
        report.close()  # nobody follows its steps
        pid = await started_worker(program)
        with anyio.fail_after(DEADLINE):
            await report.wait()
        assert not report.ok
        assert alive(pid), "answered within the bound, before the drain's SIGKILL"
        assert listed(program)[1]["pids"] == [pid], "status still lists it"
        with anyio.fail_after(DEADLINE):
            await program.stop()
        assert not alive(pid), "the stop waited for it"
        assert listed(program) == {}
        killed = [e for e in program.runtime.events.recent() if e.kind == "killed"]
        assert [e.fields["pid"] for e in killed] == [pid], "by its drain's SIGKILL, once"
