"""A Generation of real workers on its own socket, built as flip.py builds it: serving, drain
(delay, signal, timeout then SIGKILL), discard, restarts and revive, and its final state."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest
from anyio.abc import TaskGroup

from flipvisor import generation
from flipvisor import worker as worker_module
from flipvisor.config import (
    DrainConfig,
    LogsConfig,
    ProgramConfig,
    ReadinessConfig,
    RegistryConfig,
)
from flipvisor.errors import ProbeFailed, SpawnError
from flipvisor.events import Event, EventLog
from flipvisor.generation import Generation
from flipvisor.generation_drain import drain_takes_at_most
from flipvisor.logs import ProgramLog
from flipvisor.output_pipe import OUTPUT_GRACE
from flipvisor.published_keys import serving_snapshot
from flipvisor.reaper import Reaper
from flipvisor.registration import Registration
from flipvisor.registry import Snapshot
from flipvisor.registry.local import LocalRegistry
from flipvisor.sockets import bind_listener
from flipvisor.states import GenerationState, WorkerState
from flipvisor.worker import Worker
from tests.fixtures.flipvisor import group_member_wrapper, svc_command
from tests.waiting import await_until

DEADLINE = 15.0

# Records which signal it was stopped with: blocks a few, waits for one, exits 0.
SIGNAL_RECORDER = r"""
import os, signal, sys
waited = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP}
signal.pthread_sigmask(signal.SIG_BLOCK, waited)
with open(sys.argv[1], "a") as f:
    f.write(f"START {os.getpid()}\n")
info = signal.sigwaitinfo(waited)
with open(sys.argv[1], "a") as f:
    f.write(f"SIG {info.si_signo} {os.getpid()}\n")
"""


@dataclass
class Harness:
    """What flip.py gives a generation: a reaper, a log, events and two callbacks."""

    tmp_path: Path
    reaper: Reaper
    tg: TaskGroup
    log: ProgramLog
    events: EventLog = field(default_factory=EventLog)
    exits: list[tuple[int, int | None, str]] = field(default_factory=list)
    logged_at_exit: list[str] = field(default_factory=list)  # the log file as each exit came
    restart_delay: float | None = None  # what on_worker_exit answers
    pids_changed: int = 0
    restarted: int = 0  # what on_worker_restarted counted
    generations: list[Generation] = field(default_factory=list)

    def on_worker_exit(
        self, gen: Generation, worker: Worker, returncode: int | None, reason: str
    ) -> float | None:
        self.exits.append((worker.index, returncode, reason))
        self.logged_at_exit.append(self.log.path.read_text())
        return self.restart_delay

    def on_pids_changed(self, gen: Generation) -> None:
        self.pids_changed += 1

    def on_worker_restarted(self, gen: Generation) -> None:
        self.restarted += 1

    def make(self, config: ProgramConfig, number: int = 1) -> Generation:
        gen = Generation(
            program="web",
            number=number,
            config=config,
            reaper=self.reaper,
            log=self.log,
            events=self.events,
            state_dir=self.tmp_path,
            on_worker_exit=self.on_worker_exit,
            on_pids_changed=self.on_pids_changed,
            on_worker_restarted=self.on_worker_restarted,
            listener=bind_listener(config.socket),
        )
        self.generations.append(gen)
        return gen

    async def start(self, config: ProgramConfig, number: int = 1) -> Generation:
        gen = self.make(config, number)
        with anyio.fail_after(DEADLINE):
            await self.tg.start(gen.run)
        return gen

    def kinds(self, *wanted: str) -> list[str]:
        return [e.kind for e in self.events.recent() if not wanted or e.kind in wanted]

    def events_of(self, kind: str) -> list[Event]:
        return [e for e in self.events.recent() if e.kind == kind]


@asynccontextmanager
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """A running reaper and a task group for generations; every generation is stopped after."""
    log = ProgramLog(tmp_path / "logs" / "web.log", LogsConfig())
    try:
        async with anyio.create_task_group() as tg:
            reaper = Reaper(reap_orphans=False)
            await tg.start(reaper.run)
            h = Harness(tmp_path, reaper, tg, log)
            try:
                yield h
            finally:
                with anyio.CancelScope(shield=True), anyio.fail_after(DEADLINE):
                    for gen in h.generations:
                        gen.request_stop(delay=0.0)
                        await gen.wait_stopped()
            tg.cancel_scope.cancel()
    finally:
        log.close()


def svc_config(markers: Path, *flags: str, **fields: Any) -> ProgramConfig:
    return ProgramConfig(
        command=svc_command("--markers", str(markers), *flags),
        numprocs=fields.pop("numprocs", 2),
        drain=fields.pop("drain", DrainConfig(delay=0.0, timeout=5.0)),
        **fields,
    )


def marked(markers: Path, word: str) -> set[int]:
    """PIDs that wrote ``word`` to the markers file."""
    if not markers.exists():
        return set()
    found = set()
    for line in markers.read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == word:
            found.add(int(parts[-1]))
    return found


async def wait_marked(markers: Path, word: str, pids: set[int]) -> None:
    async def check() -> bool:
        return pids <= marked(markers, word)

    await await_until(check, timeout=DEADLINE, message=f"{word} from {pids}")


def to_serving(gen: Generation) -> None:
    """What a successful flip does to a generation."""
    gen.transition(GenerationState.READY)
    gen.transition(GenerationState.PROMOTING)
    gen.transition(GenerationState.SERVING)
    gen.was_serving = True


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


async def get_root(port: int) -> dict[str, Any]:
    # Plain http: verify=False spares loading the CA bundle (over 100 ms of CPU the first time,
    # much more on a loaded machine), which the drain's delay must not be spent on.
    async with httpx.AsyncClient(timeout=5, verify=False, trust_env=False) as client:
        response = await client.get(f"http://127.0.0.1:{port}/")
    body: dict[str, Any] = response.json()
    return body


# -- serving ---------------------------------------------------------------------------------


async def test_two_workers_serve_on_the_generations_socket(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    async with harness(tmp_path) as h:
        gen = await h.start(svc_config(markers), number=4)
        pids = set(gen.pids)
        assert len(pids) == 2
        assert gen.state is GenerationState.STARTING
        assert [w.state for w in gen.workers] == [WorkerState.RUNNING, WorkerState.RUNNING]
        assert {r["pid"] for r in gen.pid_records()} == pids
        await wait_marked(markers, "START", pids)
        seen: set[int] = set()
        with anyio.fail_after(DEADLINE):
            while seen != pids:  # the kernel spreads connections; both workers accept
                body = await get_root(gen.port)
                assert body["pid"] in pids
                assert body["generation"] == 4
                seen.add(body["pid"])
                assert body["worker"] == next(w.index for w in gen.workers if w.pid == body["pid"])
        assert h.kinds("spawned") == ["spawned", "spawned"]
        to_serving(gen)
        await gen.drain()
    assert h.exits == [], "a drained generation does not ask whether to restart"


# -- drain -----------------------------------------------------------------------------------


async def test_drain_waits_for_the_delay_then_signals(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    delay = 2.0  # the request below must be answered within it, on a loaded machine too
    async with harness(tmp_path) as h:
        gen = await h.start(svc_config(markers, drain=DrainConfig(delay=delay, timeout=5)))
        pids = set(gen.pids)
        await wait_marked(markers, "START", pids)
        to_serving(gen)
        port = gen.port
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(gen.drain)

            async def draining() -> bool:
                return gen.state is GenerationState.DRAINING

            await await_until(draining, timeout=1, message="the drain to begin")
            # Within the delay the old generation still answers (the proxy may still send).
            body = await get_root(port)
            assert time.monotonic() - started < delay, "answered during the delay"
            assert body["pid"] in pids
        elapsed = time.monotonic() - started
        assert gen.state is GenerationState.STOPPED
        assert marked(markers, "TERM") == pids
        assert marked(markers, "STOP") == pids, "svc finished its shutdown"
        exited = [e for e in h.events.recent() if e.kind == "exited"]
        assert len(exited) == 2
        assert all(e.time >= started_wall(started) + delay - 0.05 for e in exited)
        assert delay <= elapsed < delay + 5
        assert [w.last_exit for w in gen.workers] == ["exit status 0", "exit status 0"]
        assert [w.state for w in gen.workers] == [WorkerState.STOPPED, WorkerState.STOPPED]
        assert "killed" not in h.kinds()
        assert h.kinds("draining", "stopped") == ["draining", "stopped"]
        assert gen.socket.fileno() == -1, "the listening socket is closed"
        assert refused(port)
        assert gen.pids == []


def started_wall(monotonic_start: float) -> float:
    """The wall-clock time of a monotonic instant (events carry wall-clock times)."""
    return time.time() - (time.monotonic() - monotonic_start)


async def test_drain_sends_the_configured_signal(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    config = ProgramConfig(
        command=[sys.executable, "-c", SIGNAL_RECORDER, str(markers)],
        numprocs=2,
        drain=DrainConfig(delay=0.0, signal="SIGUSR1", timeout=5),
    )
    async with harness(tmp_path) as h:
        gen = await h.start(config)
        pids = set(gen.pids)
        await wait_marked(markers, "START", pids)
        to_serving(gen)
        with anyio.fail_after(DEADLINE):
            await gen.drain()
    signalled = [line.split() for line in markers.read_text().splitlines() if line[:3] == "SIG"]
    assert sorted(signalled) == sorted(["SIG", str(int(signal.SIGUSR1)), str(p)] for p in pids)
    assert gen.state is GenerationState.STOPPED


async def test_drain_wakes_a_stopped_worker_to_handle_its_signal(tmp_path: Path) -> None:
    """A worker stopped by SIGSTOP (a debugger, a frozen container, an operator) cannot act on
    SIGTERM: the drain waited its whole timeout, then SIGKILLed it mid-request. SIGCONT follows
    the drain signal, as systemd sends it, so the worker shuts down as asked."""
    markers = tmp_path / "markers"
    config = ProgramConfig(
        command=[sys.executable, "-c", SIGNAL_RECORDER, str(markers)],
        numprocs=2,
        drain=DrainConfig(delay=0.0, timeout=5),
    )
    async with harness(tmp_path) as h:
        gen = await h.start(config)
        pids = set(gen.pids)
        await wait_marked(markers, "START", pids)
        to_serving(gen)
        frozen = gen.pids[0]
        os.kill(frozen, signal.SIGSTOP)  # our unreaped child: its PID is still its own
        with anyio.fail_after(DEADLINE):
            await gen.drain()
    signalled = [line.split() for line in markers.read_text().splitlines() if line[:3] == "SIG"]
    assert sorted(signalled) == sorted(["SIG", str(int(signal.SIGTERM)), str(p)] for p in pids)
    assert not [e for e in h.events.recent() if e.kind == "killed"]


async def test_drain_sigkills_workers_that_ignore_the_signal(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    timeout = 0.5
    config = svc_config(markers, "--ignore-term", drain=DrainConfig(delay=0.0, timeout=timeout))
    async with harness(tmp_path) as h:
        gen = await h.start(config)
        pids = set(gen.pids)
        await wait_marked(markers, "START", pids)
        to_serving(gen)
        started = time.monotonic()
        with anyio.fail_after(DEADLINE):
            await gen.drain()
        elapsed = time.monotonic() - started
    assert timeout <= elapsed < timeout + 5
    assert gen.state is GenerationState.STOPPED, "it served: stopped, not failed"
    killed = [e for e in h.events.recent() if e.kind == "killed"]
    assert {e.fields["pid"] for e in killed} == pids
    assert all("SIGTERM" in e.message for e in killed)
    assert [w.last_exit for w in gen.workers] == ["killed by SIGKILL"] * 2
    assert marked(markers, "TERM") == set(), "the signal really was ignored"


async def test_the_drain_signal_reaches_the_workers_whole_process_group(tmp_path: Path) -> None:
    """A worker that is a wrapper around the real app: the app gets the drain signal too."""
    markers = tmp_path / "markers"
    command = group_member_wrapper(tmp_path, markers, shutdown=0.2)
    member: psutil.Process | None = None
    try:
        async with harness(tmp_path) as h:
            gen = await h.start(one_worker(command))
            (leader,) = gen.pids

            async def app_started() -> set[int]:
                return marked(markers, "START")

            (app_pid,) = await await_until(app_started, timeout=DEADLINE, message="the app")
            member = psutil.Process(app_pid)  # remembers its start time: no PID reuse below
            assert os.getpgid(app_pid) == leader, "the app is in the worker's process group"
            to_serving(gen)
            with anyio.fail_after(DEADLINE):
                await gen.drain()
        # pytest is no subreaper: the orphaned app is not ours to wait for, so wait on its word.
        await wait_marked(markers, "TERM", {app_pid})
        await wait_marked(markers, "STOP", {app_pid})
        assert gen.workers[0].last_exit == "killed by SIGTERM", "bash died of it at once"
    finally:
        if member is not None and member.is_running():
            member.kill()


async def test_cancelled_generation_still_stops_its_workers(tmp_path: Path) -> None:
    """The supervisor exiting (cancellation) reaps every worker and closes the socket."""
    markers = tmp_path / "markers"
    async with harness(tmp_path) as h:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                gen = h.make(svc_config(markers))
                await tg.start(gen.run)
                pids = set(gen.pids)
                await wait_marked(markers, "START", pids)
                to_serving(gen)
                scope.cancel()
        h.generations.remove(gen)
        assert gen.socket.fileno() == -1
        assert gen.state is GenerationState.STOPPED
        assert all(w.child is not None and w.child.exit.reaped for w in gen.workers)
        assert all(w.child is not None and w.child.pidfd == -1 for w in gen.workers), "closed"
        assert marked(markers, "TERM") == pids, "stopped with the drain signal, not killed"


async def test_a_cancelled_generation_reads_what_its_workers_write_while_they_stop(
    tmp_path: Path,
) -> None:
    """A worker that logs its shutdown must not die of SIGPIPE: its output is still read while
    it stops, so it exits as it meant to and its last words reach the log."""
    script = "trap 'echo stopping; exit 0' TERM; echo started; while :; do sleep 0.05; done"
    async with harness(tmp_path) as h:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                gen = h.make(one_worker(["sh", "-c", script]))
                await tg.start(gen.run)

                async def started() -> bool:
                    return "started" in "".join(gen.tail)

                await await_until(started, timeout=DEADLINE, message="the worker's first line")
                to_serving(gen)
                scope.cancel()
        h.generations.remove(gen)
        child = gen.workers[0].child
        assert child is not None and child.exit.returncode == 0, "not killed by SIGPIPE"
        assert any(line.endswith("stopping") for line in gen.tail), list(gen.tail)


# -- never served ----------------------------------------------------------------------------


async def test_discard_fails_a_starting_generation_at_once(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    # A long delay that discard must not wait for.
    config = svc_config(markers, drain=DrainConfig(delay=30.0, timeout=5))
    async with harness(tmp_path) as h:
        gen = await h.start(config)
        port = gen.port
        await wait_marked(markers, "START", set(gen.pids))
        with anyio.fail_after(10):
            await gen.discard("probe timed out")
        assert gen.state is GenerationState.FAILED
        assert gen.failure == "probe timed out"
        with anyio.fail_after(1):
            assert await gen.wait_failed() == "probe timed out"
        assert gen.socket.fileno() == -1
        assert refused(port)
        assert h.kinds("failed") == ["failed"]
        # The event says why, as the flip's report does: `events` shows it on its own.
        assert [e.message for e in h.events_of("failed")] == ["probe timed out"]
        assert "stopped" not in h.kinds()


async def test_a_called_off_generation_that_had_failed_ends_failed(
    tmp_path: Path,
) -> None:
    # A worker failed it during its probe, and a stop called its flip off at the same time:
    # it failed, and says so (`stopped` is for a flip called off before anything went wrong).
    markers = tmp_path / "markers"
    async with harness(tmp_path) as h:
        gen = await h.start(svc_config(markers))
        await wait_marked(markers, "START", set(gen.pids))
        gen.fail("worker 0 exited before it was ready")
        with anyio.fail_after(10):
            await gen.call_off()
        assert gen.state is GenerationState.FAILED
        assert h.kinds("draining", "failed", "stopped") == ["draining", "failed"]


async def test_a_called_off_generation_ends_stopped(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    async with harness(tmp_path) as h:
        gen = await h.start(svc_config(markers))
        await wait_marked(markers, "START", set(gen.pids))
        with anyio.fail_after(10):
            await gen.call_off()
        assert gen.state is GenerationState.STOPPED
        assert h.kinds("draining", "failed", "stopped") == ["draining", "stopped"]


async def test_stopped_before_ready_is_failed(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        gen = await h.start(svc_config(tmp_path / "markers"))
        gen.request_stop(delay=0.0)
        with anyio.fail_after(DEADLINE):
            await gen.wait_stopped()
    assert gen.state is GenerationState.FAILED
    assert gen.failure == "stopped before it was ready"


async def test_a_worker_that_cannot_start_fails_the_generation_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Either wait would show as an elapsed time of 2 s or more; a loaded machine's slower spawn
    # and scheduling stay well below that.
    monkeypatch.setattr(generation, "KILL_GRACE", 2.0)
    config = ProgramConfig(
        command=["no-such-command-xyz"], numprocs=2, drain=DrainConfig(delay=0.0, timeout=2.0)
    )
    async with harness(tmp_path) as h:
        gen = h.make(config)
        started = time.monotonic()
        with pytest.raises(SpawnError, match="no-such-command-xyz"):
            await h.tg.start(gen.run)
        elapsed = time.monotonic() - started
        with anyio.fail_after(DEADLINE):
            await gen.wait_stopped()
    assert gen.state is GenerationState.FAILED
    assert gen.failure is not None
    assert "not found" in gen.failure
    assert gen.socket.fileno() == -1
    # Nothing runs, so nothing needs the drain timeout (2 s) nor the kill grace (2 s).
    assert elapsed < 2.0, f"the spawn error took {elapsed:.1f}s to surface"


async def test_a_ready_generation_that_never_served_can_be_drained(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    async with harness(tmp_path) as h:
        gen = h.make(svc_config(markers))
        h.generations.remove(gen)  # stopped here: the harness must not wait on it
        outcome: list[BaseException] = []

        async def run() -> None:
            try:
                await gen.run()
            except Exception as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await await_until(_has_pids(gen), timeout=DEADLINE)
            gen.transition(GenerationState.READY)
            with anyio.move_on_after(DEADLINE) as scope:  # a drain that hangs, not a slow one
                await gen.drain()
            tg.cancel_scope.cancel()
    assert outcome == []
    assert not scope.cancelled_caught, "drain() returned"
    assert gen.state in (GenerationState.STOPPED, GenerationState.FAILED)


def _has_pids(gen: Generation) -> Callable[[], Any]:
    async def check() -> bool:
        return len(gen.pids) == gen.config.numprocs

    return check


# -- exits, restarts, revive -----------------------------------------------------------------


async def test_worker_exit_asks_the_owner_and_restarts(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    async with harness(tmp_path) as h:
        h.restart_delay = 0.0
        gen = await h.start(svc_config(markers))
        to_serving(gen)
        first = gen.workers[0].pid
        assert first is not None
        await wait_marked(markers, "START", set(gen.pids))
        gen.workers[0].kill()

        async def replaced() -> bool:
            pid = gen.workers[0].pid
            return pid is not None and pid != first

        await await_until(replaced, timeout=DEADLINE, message="worker 0 restarted")
        assert h.exits == [(0, -signal.SIGKILL, "killed by SIGKILL")]
        assert gen.workers[0].restarts == 1
        assert gen.restarts == 1
        assert h.restarted == 1  # the program's count, once the replacement runs
        assert h.pids_changed == 2  # its PID gone at the exit, its replacement's at the spawn
        assert len(gen.pids) == 2
        await gen.drain()
    assert gen.state is GenerationState.STOPPED


async def test_registration_publishes_pids_that_changed_after_the_swap(tmp_path: Path) -> None:
    # A worker that restarts between promotion's swap and the generation serving (while the
    # proxy's old workers finish) changed its PID when nobody published it: promoted() does.
    registry = LocalRegistry(tmp_path / "registry.json", RegistryConfig())
    async with harness(tmp_path) as h:
        gen = await h.start(svc_config(tmp_path / "markers"))
        to_serving(gen)
        swapped = serving_snapshot(gen, Snapshot())
        stale = Snapshot({**swapped.values, "pid/current": "999999"})
        await registry.swap("web", Snapshot(), stale)
        registration = Registration("web", registry, h.events, serving=lambda: gen)
        registration.promoted(gen, stale, deferred=False, tg=h.tg)
        current = ",".join(str(pid) for pid in gen.pids)

        async def published() -> bool:
            return (await registry.snapshot("web")).get("pid/current") == current

        await await_until(published, timeout=DEADLINE, message="the restarted PIDs published")
        assert registration.published is not None
        assert registration.published.get("pid/current") == current


async def test_revive_restarts_slots_that_gave_up(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    async with harness(tmp_path) as h:
        h.restart_delay = None  # policy "never": the slot stays stopped
        gen = await h.start(svc_config(markers))
        to_serving(gen)
        await wait_marked(markers, "START", set(gen.pids))
        survivor = gen.workers[1].pid
        gen.workers[0].kill()

        async def gave_up() -> bool:
            return gen.workers[0].state is WorkerState.STOPPED

        await await_until(gave_up, timeout=DEADLINE, message="worker 0 to give up")
        assert gen.pids == [survivor]
        with anyio.fail_after(DEADLINE):
            assert await gen.revive() == 1
        assert len(gen.pids) == 2
        assert gen.workers[1].pid == survivor, "a running slot is left alone"
        assert gen.workers[0].state is WorkerState.RUNNING
        # Its PID gone at the exit, the revived one's published at its spawn (no restart
        # counted: the slot never restarted).
        assert (gen.workers[0].restarts, h.pids_changed) == (0, 2)
        with anyio.fail_after(DEADLINE):
            assert await gen.revive() == 0, "nothing left to revive"
        assert (await get_root(gen.port))["pid"] in gen.pids
        await gen.drain()
        with anyio.fail_after(1):
            assert await gen.revive() == 0, "a stopped generation is not revived"
    assert gen.state is GenerationState.STOPPED
    assert h.exits == [(0, -signal.SIGKILL, "killed by SIGKILL")]


async def test_a_stop_while_revive_runs_revives_no_further_slot(tmp_path: Path) -> None:
    """`start` revives a program's stopped slots one after another; a `stop` meanwhile (the
    drain requested while revive waits for one slot's start) ends the revival there. A slot
    revived after it would miss the drain signal, sent to the workers then running, and sit
    out ``drain.timeout`` until its SIGKILL."""
    markers = tmp_path / "markers"
    long_drain = DrainConfig(delay=0.0, timeout=DEADLINE * 4)
    async with harness(tmp_path) as h:
        h.restart_delay = None  # policy "never": the slots stay stopped
        gen = await h.start(svc_config(markers, numprocs=3, drain=long_drain))
        to_serving(gen)
        await wait_marked(markers, "START", set(gen.pids))
        for worker in gen.workers[1:]:
            worker.kill()

        async def gave_up() -> bool:
            return all(w.state is WorkerState.STOPPED for w in gen.workers[1:])

        await await_until(gave_up, timeout=DEADLINE, message="workers 1 and 2 to give up")

        def stop_once_slot_1_is_revived(event: Event) -> None:
            if event.kind == "spawned" and event.fields.get("worker") == 1:
                gen.request_stop(delay=0.0)

        with h.events.listening(stop_once_slot_1_is_revived), anyio.fail_after(DEADLINE):
            assert await gen.revive() == 1
            await gen.wait_stopped()  # within the drain signal's reach, not at its timeout
    spawned = [e.fields["worker"] for e in h.events_of("spawned")]
    assert spawned == [0, 1, 2, 1], "slot 2 is not revived once the stop came"
    assert h.kinds("killed") == []


@pytest.mark.parametrize("called_off_by", ["a stop", "give_up"])
async def test_a_restart_called_off_during_its_backoff_is_not_counted(
    tmp_path: Path, called_off_by: str
) -> None:
    """A restart is counted once its worker runs again, not when it is scheduled: one that a
    stop (or ``give_up``, the program gone fatal) calls off while it waits out its backoff
    never happened, and neither the worker's nor the program's restarts count it."""
    markers = tmp_path / "markers"
    async with harness(tmp_path) as h:
        h.restart_delay = 60.0  # still waiting when it is called off
        gen = await h.start(svc_config(markers))
        to_serving(gen)
        await wait_marked(markers, "START", set(gen.pids))
        gen.workers[0].kill()

        async def waiting() -> bool:
            return gen.workers[0].state is WorkerState.BACKOFF

        await await_until(waiting, timeout=DEADLINE, message="worker 0 waiting out its backoff")
        if called_off_by == "give_up":
            gen.give_up_restarts()
            assert gen.workers[0].state is WorkerState.STOPPED
        with anyio.fail_after(DEADLINE):
            await gen.drain()
        assert len(h.exits) == 1, h.exits  # the restart was scheduled
        assert h.kinds("spawned") == ["spawned", "spawned"]  # but never carried out
        assert (gen.workers[0].restarts, gen.restarts, h.restarted) == (0, 0, 0)


async def test_exits_while_stopping_are_not_restarted(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    async with harness(tmp_path) as h:
        h.restart_delay = 0.0  # would restart, if the generation were not stopping
        gen = await h.start(svc_config(markers))
        pids = set(gen.pids)
        await wait_marked(markers, "START", pids)
        to_serving(gen)
        with anyio.fail_after(DEADLINE):
            await gen.drain()
    assert h.exits == []
    assert h.kinds("spawned") == ["spawned", "spawned"]


# -- output and exit -------------------------------------------------------------------------

# Writes a partial line (only written to the log at end of file), closes its output, and keeps
# running until SIGTERM, which it answers with exit status 7.
CLOSES_OUTPUT = r"""
import os, signal, sys
signal.signal(signal.SIGTERM, lambda *_: os._exit(7))
sys.stdout.write("closing without a newline")
sys.stdout.flush()
os.close(1)
os.close(2)
while True:
    signal.pause()
"""


def one_worker(command: list[str]) -> ProgramConfig:
    return ProgramConfig(command=command, drain=DrainConfig(delay=0.0, timeout=5.0))


async def test_a_worker_that_closes_its_output_is_supervised_until_it_exits(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path) as h:
        gen = await h.start(one_worker([sys.executable, "-c", CLOSES_OUTPUT]))
        slot = gen.workers[0]
        pid = slot.pid

        async def output_ended() -> bool:  # the partial line is written at end of file
            return "closing without a newline" in gen.tail

        await await_until(output_ended, timeout=DEADLINE, message="the output to end")
        assert slot.state is WorkerState.RUNNING
        assert slot.pid == pid, "still supervised after its output ended"
        assert h.exits == []
        assert slot.child is not None
        slot.child.send_signal(signal.SIGTERM)

        async def exited() -> bool:
            return bool(h.exits)

        await await_until(exited, timeout=DEADLINE, message="the exit to be reported")
        assert h.exits == [(0, 7, "exit status 7")]
        assert slot.state is WorkerState.STOPPED
        assert slot.child.pidfd == -1


async def test_output_written_just_before_the_exit_is_all_captured(tmp_path: Path) -> None:
    count = 5000
    code = f"for i in range({count}): print(f'line {{i}}')\nprint('end', end='')"
    async with harness(tmp_path) as h:
        gen = await h.start(one_worker([sys.executable, "-c", code]))

        async def exited() -> bool:
            return bool(h.exits)

        await await_until(exited, timeout=DEADLINE, message="the exit to be reported")
        # Checked as soon as the exit is reported: capture had finished by then.
        lines = (tmp_path / "logs" / "web.log").read_text().splitlines()
        assert h.exits == [(0, 0, "exit status 0")]
    assert [line.split(" | ", 1)[1] for line in lines] == [
        *(f"line {i}" for i in range(count)),
        "end",
    ]
    assert gen.tail[-1] == "end"


# The first run starts a child that inherits its output and outlives it (as a gunicorn master's
# workers outlive the master SIGKILLed), waits until that child is set up, writes its last words
# (no newline) and SIGKILLs itself. The replacement (the marker file exists) just runs.
LEAVES_A_CHILD_HOLDING_ITS_OUTPUT = r"""
import os, signal, subprocess, sys, time
marker, child_code = sys.argv[1], sys.argv[2]
if os.path.exists(marker):
    while True:
        signal.pause()
open(marker, "w").close()
ready_r, ready_w = os.pipe()
child = subprocess.Popen([sys.executable, "-c", child_code, str(ready_w)], pass_fds=[ready_w])
os.close(ready_w)
os.read(ready_r, 1)
print("child", child.pid, flush=True)
sys.stdout.write(f"last words {time.time()!r}")
sys.stdout.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""
# Writes a line to its inherited output on SIGUSR1; gone within a minute whatever happens.
WRITES_ON_SIGUSR1 = r"""
import os, signal, sys
signal.alarm(60)
signal.signal(signal.SIGUSR1, lambda *_: print("the child still writes", flush=True))
os.write(int(sys.argv[1]), b"x")
while True:
    signal.pause()
"""


async def test_a_child_holding_the_output_delays_neither_the_exit_nor_the_restart(
    tmp_path: Path,
) -> None:
    """The exit is reported, and the replacement spawned, as the worker is reaped: its last
    words are in the log by then, and what its child writes later is still read (under the
    dead worker's prefix), so the child neither dies of SIGPIPE nor blocks."""
    command = [
        sys.executable,
        "-c",
        LEAVES_A_CHILD_HOLDING_ITS_OUTPUT,
        str(tmp_path / "started-once"),
        WRITES_ON_SIGUSR1,
    ]
    async with harness(tmp_path) as h:
        h.restart_delay = 0.0
        gen = await h.start(one_worker(command))
        first = gen.workers[0].child
        assert first is not None

        async def replaced() -> Event | None:
            return next((e for e in h.events_of("spawned") if e.fields["pid"] != first.pid), None)

        spawned = await await_until(replaced, timeout=DEADLINE, message="the replacement")
        child_pid = next(int(line.split()[1]) for line in gen.tail if line.startswith("child "))
        pidfd = os.pidfd_open(child_pid)
        try:
            died = float(
                next(line for line in gen.tail if line.startswith("last words ")).split()[2]
            )
            # The old wait for the end of the output took OUTPUT_GRACE more here: below that
            # bound, a loaded machine's slower reaping and spawning are no failure.
            assert spawned.time - died < OUTPUT_GRACE, "restarted as it was reaped"
            assert h.exits == [(0, -signal.SIGKILL, "killed by SIGKILL")]
            (logged,) = h.logged_at_exit
            assert f"pid={first.pid} | last words {died!r}" in logged, "logged before the exit"
            signal.pidfd_send_signal(pidfd, signal.SIGUSR1)

            async def child_wrote() -> bool:
                return "the child still writes" in gen.tail

            await await_until(child_wrote, timeout=DEADLINE, message="the child's late line")
            log = (tmp_path / "logs" / "web.log").read_text()
            assert f"pid={first.pid} | the child still writes" in log
            signal.pidfd_send_signal(pidfd, 0)  # still running: no SIGPIPE
        finally:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)


# Three incarnations each leave a child holding their output, then die; the fourth stays.
LEAVES_A_CHILD_EACH_TIME = r"""
import os, signal, subprocess, sys
counter = sys.argv[1]
runs = len(open(counter).read()) if os.path.exists(counter) else 0
open(counter, "a").write("x")
if runs >= 3:
    while True:
        signal.pause()
subprocess.Popen(["sleep", "60"])
os.kill(os.getpid(), signal.SIGKILL)
"""


async def test_the_outputs_left_held_by_a_crash_loop_are_read_up_to_a_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each incarnation's output stays read while what it left holds it, but not without end:
    past the bound, the output of a further exit is closed (and the log says so)."""
    monkeypatch.setattr(worker_module, "MAX_LEFTOVER_READERS", 1)
    command = [sys.executable, "-c", LEAVES_A_CHILD_EACH_TIME, str(tmp_path / "runs")]
    async with harness(tmp_path) as h:
        h.restart_delay = 0.0
        gen = await h.start(one_worker(command))

        async def fourth_runs() -> bool:
            return len(h.events_of("spawned")) == 4 and len(h.exits) == 3

        await await_until(fourth_runs, timeout=DEADLINE, message="three exits, four spawns")
        log = tmp_path / "logs" / "web.log"

        async def two_closed() -> bool:
            return log.read_text().count("no longer read (1 such outputs of this worker are)") == 2

        await await_until(two_closed, timeout=DEADLINE, message="two outputs closed")
        assert gen.workers[0]._leftover_readers == 1


# -- readiness -------------------------------------------------------------------------------


async def test_without_a_probe_a_generation_is_ready_at_once(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        gen = await h.start(svc_config(tmp_path / "markers"))
        with anyio.fail_after(1):
            await gen.wait_ready()
        gen.ensure_whole()


async def test_without_a_probe_a_worker_that_already_exited_fails_readiness(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path) as h:
        gen = await h.start(svc_config(tmp_path / "markers"))
        gen.fail("worker 1 of generation 1 exit status 3")
        with anyio.fail_after(1), pytest.raises(ProbeFailed, match="exit status 3"):
            await gen.wait_ready()
        with pytest.raises(ProbeFailed, match="before the generation was promoted"):
            gen.ensure_whole()


async def test_a_worker_exit_ends_the_probe_at_once(tmp_path: Path) -> None:
    # The probe alone would wait 30 s: /nothing-here never answers 2xx.
    config = svc_config(
        tmp_path / "markers", readiness=ReadinessConfig(http="/nothing-here", timeout=30)
    )
    async with harness(tmp_path) as h:
        gen = await h.start(config)
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:

                async def probe() -> None:
                    with pytest.raises(ProbeFailed, match="probed: worker 0 crashed"):
                        await gen.wait_ready()

                tg.start_soon(probe)
                gen.fail("worker 0 crashed")


async def test_a_worker_still_held_after_sigkill_is_waited_for_once_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker the kernel holds after SIGKILL (D state): a reaper that is not running stands in
    # for it, with a real process whose exit is never collected. The drain SIGKILLs it and waits
    # out the kill grace once; the worker's own stop (the task group's cancel) must not then
    # run the drain signal, timeout and kill grace all over again, past what the drain promises
    # (``drain_takes_at_most``, which a discard's bound builds on). And the events must say the
    # worker is still running, not only that the generation stopped.
    grace = 3.0
    monkeypatch.setattr(generation, "KILL_GRACE", grace)
    monkeypatch.setattr("flipvisor.spawn.KILL_GRACE", grace)
    drain = DrainConfig(delay=0.0, timeout=0.5)
    config = ProgramConfig(command=["sleep", "30"], numprocs=1, drain=drain)
    reaper = Reaper(reap_orphans=False)  # not reaping: as if the kernel held the killed worker
    log = ProgramLog(tmp_path / "logs" / "web.log", LogsConfig())
    try:
        async with anyio.create_task_group() as tg:
            h = Harness(tmp_path, reaper, tg, log)
            gen = await h.start(config)
            pid = gen.workers[0].pid
            assert pid is not None
            try:
                gen.request_stop(delay=0.0)
                bound = drain_takes_at_most(drain, delay=0.0, kill_grace=grace)
                with anyio.fail_after(bound):
                    await gen.wait_stopped()
            finally:
                await await_until(lambda: _gone(pid), timeout=DEADLINE, message="the worker")
                reaper.reap()  # collect it after all
    finally:
        log.close()
    [still] = h.events_of("still-running")
    assert still.fields["pid"] == pid
    assert "SIGKILL" in still.message


async def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
