"""What a ``drain_pid`` entry's keys say: the PIDs of a ``pid/*`` value, the processes a
``generation/current`` record names (by start tick and boot id, or start time), and the changes
that turn one read of the keys into another (a re-read handled as one more change).

Parsing only: what is trusted, and what is drained, is ``watch_drain.py``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import json_text
from .registry import WatchEvent
from .starttime import Recorded, recorded_from_json


def difference(
    before: Mapping[str, str], after: Mapping[str, str], revision: int
) -> list[WatchEvent]:
    """The changes that turn ``before`` into ``after`` (a deleted key's value is None)."""
    return [
        WatchEvent(key, after.get(key), revision)
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    ]


def parse_pids(value: str | None) -> list[int]:
    """The PIDs of a ``pid/*`` value ("101,102"); junk entries are skipped."""
    if not value:
        return []
    return [int(part) for part in value.split(",") if part.strip().isdigit() and int(part) > 0]


def recorded_processes(value: str | None) -> dict[int, Recorded]:
    """pid -> the process a ``generation/current`` JSON record names under it, by its start
    tick and boot id or its start time (empty if absent or bad; a bad entry is left out)."""
    try:
        record: Any = json_text.loads(value) if value else {}
        entries = list(record.get("pids", []))
    except (ValueError, TypeError, AttributeError):
        return {}
    processes = {}
    for entry in entries:
        try:
            process = recorded_from_json(entry)
        except (ValueError, TypeError, KeyError):
            continue
        processes[process.pid] = process
    return processes
