"""The registry keys that name a serving generation: ``port``, ``pid`` and the
``generation/current`` record (every worker's PID with its start time, the host, the supervisor
that owns them, the command), and what they become when a promotion swaps them or a worker is
replaced.
"""

from __future__ import annotations

import json
import time

from .current_record import HOSTNAME
from .generation import Generation
from .lineage import this_supervisor
from .registry import Snapshot


def generation_record(gen: Generation) -> str:
    """The ``generation/current`` JSON document for ``gen``."""
    return json.dumps(
        {
            "generation": gen.number,
            "port": gen.port,
            "pids": gen.pid_records(),
            "host": HOSTNAME,
            # Whose workers these are: a supervisor started after this one was killed replaces
            # them (leftovers.py), unless this one still runs.
            "supervisor": this_supervisor(),
            "command": list(gen.config.command),
            "promoted_at": round(time.time(), 3),
        }
    )


def pid_list(gen: Generation) -> str:
    """``gen``'s running workers as ``pid/current`` names them: ``101,102``."""
    return ",".join(str(pid) for pid in gen.pids)


def serving_snapshot(gen: Generation, replaced: Snapshot) -> Snapshot:
    """The keys once ``gen`` serves: what ``replaced`` held as current becomes previous."""
    values = {
        "port/current": str(gen.port),
        "pid/current": pid_list(gen),
        "generation/current": generation_record(gen),
    }
    for kind in ("port", "pid"):
        previous = replaced.get(f"{kind}/current")
        if previous is not None:
            values[f"{kind}/previous"] = previous
    return Snapshot(values)


def with_current_pids(gen: Generation, published: Snapshot) -> Snapshot:
    """``published`` with ``pid/current`` and the record updated after a worker was replaced."""
    values = dict(published.values)
    values["pid/current"] = pid_list(gen)
    record = json.loads(values.get("generation/current") or "{}")
    record.update(pids=gen.pid_records(), generation=gen.number, port=gen.port)
    values["generation/current"] = json.dumps(record)
    return Snapshot(values)
