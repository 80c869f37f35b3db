"""A generation that never served, discarded by its failed flip (``discard.py``): a real Program
whose first start fails its readiness probe, with real workers that ignore the drain signal. The
flip waits for the generation's whole drain, or no longer than its --timeout allows; past that
the generation stays the program's (listed, waited for by a stop and by the next flip on its
fixed port) until it has ended."""

from __future__ import annotations

import time
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
    SocketConfig,
)
from flipvisor.discard import DEADLINE_GRACE, DISCARD_MARGIN, discard_bound
from flipvisor.events import EventLog
from flipvisor.program import Program, Runtime
from flipvisor.registry.local import LocalRegistry
from flipvisor.spawn import KILL_GRACE
from tests.fixtures.flipvisor import svc_command
from tests.fixtures.nginx import free_port
from tests.reaping import running_reaper
from tests.waiting import await_until

DEADLINE = 20.0


def stubborn(drain_timeout: float, *, probe_timeout: float = 0.5, port: int = 0) -> ProgramConfig:
    """A worker that ignores SIGTERM (only the drain's SIGKILL ends it) and never gets ready."""
    # Ignored from its first instruction (an ignored signal stays ignored across exec), not
    # once the service has started: on a loaded machine the probe may fail before that.
    ignoring = ["sh", "-c", 'trap "" TERM; exec "$0" "$@"']
    return ProgramConfig(
        command=[*ignoring, *svc_command("--ignore-term", "--health-fail")],
        numprocs=1,
        # On a fixed port, notify (an http probe might reach another generation): never sent.
        readiness=ReadinessConfig(http="/health", timeout=probe_timeout)
        if port == 0
        else ReadinessConfig(notify=True, timeout=probe_timeout),
        drain=DrainConfig(delay=0.0, timeout=drain_timeout),
        socket=SocketConfig(port=port),
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


# How late past --timeout and DEADLINE_GRACE a loaded machine may answer; far short of the drain.
ANSWER_SLACK = 2.0
DRAIN_TIMEOUT = 8.0  # several times the flip's --timeout


async def timed_out_flip(program: Program, timeout: float) -> tuple[int, float]:
    """A start of ``program`` with ``--timeout timeout`` that its never-ready worker times out:
    the worker's PID, and how long after the flip began it answered."""
    began = time.monotonic()
    report = program.start_flip(kind="start", timeout=timeout)
    report.close()  # nobody follows its steps
    pid = await started_worker(program)
    with anyio.fail_after(DEADLINE):
        await report.wait()
    took = time.monotonic() - began
    assert not report.ok
    assert report.error is not None
    assert report.error.startswith(f"the flip took longer than --timeout {timeout:g}s"), report
    assert "; rolled back;" in report.error, report.error
    return pid, took


async def test_a_flip_timeout_answers_by_its_deadline_and_the_drain_goes_on(
    tmp_path: Path,
) -> None:
    """`--timeout S` bounds the whole flip: its discard is not waited for to the drain's SIGKILL
    (drain.timeout several times S), but the generation stays listed until it has ended."""
    config = stubborn(drain_timeout=DRAIN_TIMEOUT, probe_timeout=60.0)
    async with running_program(tmp_path, config) as program:
        pid, took = await timed_out_flip(program, timeout=1.0)
        assert took < 1.0 + DEADLINE_GRACE + ANSWER_SLACK, f"answered after {took:.1f}s"
        assert alive(pid), "the drain's SIGKILL is not due before the answer"
        assert listed(program)[1]["pids"] == [pid], "status still lists it"
        with anyio.fail_after(DRAIN_TIMEOUT + DEADLINE):
            while alive(pid):  # listed for as long as its worker runs
                assert 1 in listed(program) or not alive(pid)
                await anyio.sleep(0.05)

        async def dropped() -> bool:
            return listed(program) == {}

        await await_until(dropped, timeout=DEADLINE, message="generation 1 dropped")
        killed = [e for e in program.runtime.events.recent() if e.kind == "killed"]
        assert [e.fields["pid"] for e in killed] == [pid], "by its drain's SIGKILL, once"


async def test_the_next_flip_on_its_fixed_port_waits_for_the_discarded_generation(
    tmp_path: Path,
) -> None:
    """A flip right after one that timed out, on the same fixed port: the discarded generation's
    worker still listens there. The flip says it waits for it, then binds the port and serves,
    rather than failing to bind under it."""
    port = free_port()
    (tmp_path / "notify").mkdir(mode=0o700)  # as `run` makes it in the state_dir
    config = stubborn(drain_timeout=DRAIN_TIMEOUT, probe_timeout=60.0, port=port)
    async with running_program(tmp_path, config) as program:
        pid, _ = await timed_out_flip(program, timeout=1.0)
        assert alive(pid)
        healthy = config.model_copy(
            update={
                "command": svc_command("--notify"),
                "readiness": ReadinessConfig(notify=True, timeout=DEADLINE),
            }
        )
        report = program.start_flip(healthy, kind="start")
        report.close()
        with anyio.fail_after(DRAIN_TIMEOUT + DEADLINE):
            await report.wait()
        assert report.ok, report.error
        waited = [step for step in report.steps if step.name == "wait"]
        assert len(waited) == 1 and "discarded generation 1" in waited[0].detail
        assert not alive(pid)
        assert [gen["generation"] for gen in program.status()["generations"]] == [2]
