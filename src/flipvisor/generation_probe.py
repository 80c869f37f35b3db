"""A generation's readiness: its probe raced against its workers' exits (one lost while the probe
runs fails it at once, not at the probe's timeout), and the probe in a sentence for a flip's
report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from .errors import FlipvisorError, ProbeFailed
from .probe import ProbeProgress, probe_url, wait_ready
from .worker import worker_env

if TYPE_CHECKING:  # for its type only: the generation probed is the caller
    from .generation import Generation


async def probe_until_ready(gen: Generation) -> None:
    """Return once ``gen``'s readiness probe passed (at once without one).

    Raises:
        ProbeFailed: the probe failed or timed out, or a worker exited while it ran.
    """
    readiness = gen.config.readiness
    if readiness is None:
        # No probe, so nothing to race a worker's exit against: ready once spawned, unless
        # one already exited. Promotion checks again before each step it cannot take back.
        gen.ensure_whole()
        return
    failure: str | None = None
    gen.probing = ProbeProgress()
    probe_error: FlipvisorError | None = None
    async with anyio.create_task_group() as race:

        async def watch_workers() -> None:
            nonlocal failure
            failure = await gen.wait_failed()
            race.cancel_scope.cancel()

        race.start_soon(watch_workers)
        try:
            await wait_ready(
                readiness,
                host=gen.host,
                port=gen.port,
                reaper=gen.reaper,
                env=worker_env(gen.workers[0].spec, 0),
                cwd=gen.config.cwd,
                notify=gen.notify,
                worker_pids=lambda: set(gen.pids),
                numprocs=gen.config.numprocs,
                progress=gen.probing,
            )
        except FlipvisorError as exc:  # caught here so it is not wrapped in a group
            probe_error = exc
        race.cancel_scope.cancel()
    if failure is not None:
        raise ProbeFailed(f"a worker exited while the generation was probed: {failure}")
    if probe_error is not None:
        raise probe_error


def describe_probe(gen: Generation) -> str:
    """How ``gen`` proves it is ready, for a flip's report."""
    readiness = gen.config.readiness
    if readiness is None:
        return "no readiness probe: ready once spawned"
    if readiness.http is not None:
        return f"GET {probe_url(gen.host, gen.port, readiness.http)}"
    if readiness.exec is not None:
        return "exec " + " ".join(arg.replace("{port}", str(gen.port)) for arg in readiness.exec)
    return "sd_notify READY=1"
