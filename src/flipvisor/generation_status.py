"""A generation as ``status --json`` shows it: built in one pass over its workers, with no
properties, as a status of 200 programs is meant to take well under a millisecond.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

from .config import ProgramConfig, fingerprint

if TYPE_CHECKING:  # for its type only: the generation shown
    from .generation import Generation


def generation_status(
    gen: Generation, now: float, warm_until: float | None = None
) -> dict[str, Any]:
    """``gen`` in ``status --json`` at ``now`` (epoch seconds). ``warm_until``: when the program
    drains it, if it is the one kept warm for a rollback (epoch seconds)."""
    pids = []
    restarts = 0
    for worker in gen.workers:
        restarts += worker.restarts
        child = worker.child
        if child is not None and child.exit.returncode is None:  # spawned, not yet reaped
            pids.append(child.pid)
    return {
        "generation": gen.number,
        "state": gen.state,  # a StrEnum: encodes as its value
        "port": gen.port,
        "pids": pids,
        "uptime": to_the_millisecond(now - gen.created_at),
        "restarts": restarts,
        "last_exit": gen.last_exit,
        "command": gen.command,
        "fingerprint": gen.fingerprint,
        "warm_until": warm_until,
    }


def to_the_millisecond(seconds: float) -> float:
    """``round(seconds, 3)``, the same float, in about half the time: status rounds every
    generation's uptime, and ``round`` with digits converts through a decimal string.

    Scaled to milliseconds, the one rounding error of the multiplication is far below 0.0001
    ms for any uptime under a century, so the nearest integer is the one ``round`` finds unless
    the value is within 0.0001 of a half (then ``round`` itself decides); and dividing that
    integer by 1000 gives the float nearest to it, as ``round`` returns."""
    scaled = seconds * 1000.0
    whole = round(scaled)
    if -0.4999 < scaled - whole < 0.4999:
        return whole / 1000
    return round(seconds, 3)


def deploy_shown(config: ProgramConfig) -> tuple[str, str]:
    """What status shows of the deploy a generation runs: its command and fingerprint.

    Fixed for the generation's life, so computed once rather than for every status request.
    The command as one string (``shlex.split`` gives the list back): a list per generation is
    more objects for every client to decode, about 14 % of a 200-program status round trip
    (docs/performance.md)."""
    return shlex.join(config.command), fingerprint(config)
