"""JSON from outside the process (registry values, state files) that ``json.loads`` cannot decode
for its depth: a ValueError, so every reader's "not a record flipvisor wrote" path takes it, never
the RecursionError that killed ``run`` and ``watch`` (QA 15)."""

from __future__ import annotations

import pytest

from flipvisor import json_text
from flipvisor.current_record import parse_current
from flipvisor.registry.base import Snapshot, owner_of
from flipvisor.runrecord import parse_record
from flipvisor.watch_drain_keys import recorded_processes

DEEP_JSON = "[" * 100_000 + "]" * 100_000  # valid JSON, too deep for json.loads


def test_json_nested_too_deeply_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        json_text.loads(DEEP_JSON)
    with pytest.raises(ValueError):
        json_text.loads(DEEP_JSON.encode())
    assert json_text.loads('{"generation": 2}') == {"generation": 2}


def test_a_deeply_nested_generation_record_is_not_a_record_flipvisor_wrote() -> None:
    with pytest.raises(ValueError):
        parse_current(DEEP_JSON)
    assert recorded_processes(DEEP_JSON) == {}
    assert parse_record(DEEP_JSON.encode(), "/etc/flipvisor.yaml") is None
    owner = owner_of(
        Snapshot({"generation/current": DEEP_JSON, "port/current": "80", "pid/current": "1"})
    )
    assert owner == "port 80, pid 1"
