"""Whose promotion a program's etcd keys hold (``registry/keys_owner.py``): another supervisor's
is left to it; this one's, missing keys, garbage and a gone supervisor's of this host are
written over."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from flipvisor.current_record import HOSTNAME
from flipvisor.registry import Snapshot
from flipvisor.registry.keys_owner import promoted_by_another
from flipvisor.starttime import Identity, Recorded, boot_id, recorded_now


def keys(generation: int, supervisor: Recorded, *, host: str = HOSTNAME) -> Snapshot:
    record = {"generation": generation, "port": 40000 + generation, "pids": [], "host": host}
    record["supervisor"] = supervisor.to_json()
    return Snapshot(
        {"port/current": str(40000 + generation), "generation/current": json.dumps(record)}
    )


@pytest.fixture
def other() -> Iterator[Recorded]:
    """A running process that stands for another supervisor of this host."""
    process = subprocess.Popen(["sleep", "60"])
    try:
        found = recorded_now(process.pid)
        assert found is not None
        yield found
    finally:
        process.kill()
        process.wait()


def _gone_of_this_boot() -> Recorded:
    process = subprocess.Popen(["true"])
    found = recorded_now(process.pid)
    process.wait()
    assert found is not None
    return found


def test_another_s_newer_promotion_is_theirs_though_ours_names_that_supervisor(
    other: Recorded,
) -> None:
    # A failed flip's undo puts the other supervisor's generation 5 back (desired); that
    # supervisor promoted generation 6 since: not ours to write over with its older keys.
    assert promoted_by_another(keys(6, other), [keys(5, other), None, None]) == other


def test_the_keys_this_registry_wrote_are_ours(other: Recorded) -> None:
    assert promoted_by_another(keys(5, other), [None, None, keys(5, other)]) is None


def test_keys_naming_this_process_are_ours() -> None:
    me = recorded_now(os.getpid())
    assert me is not None
    assert promoted_by_another(keys(7, me), [keys(8, me), None, None]) is None


def test_a_gone_supervisor_of_this_host_and_boot_is_stale() -> None:
    assert promoted_by_another(keys(3, _gone_of_this_boot()), [None, None, None]) is None


def test_a_supervisor_of_this_host_s_earlier_boot_is_stale() -> None:
    earlier = Recorded(os.getpid(), Identity(123, "not-" + boot_id()), 1.0)
    assert promoted_by_another(keys(3, earlier), [None, None, None]) is None


def test_another_host_s_supervisor_sharing_this_boot_id_is_left_to_it() -> None:
    # A container on this machine shares its boot id, not its PIDs: its supervisor's PID here
    # names nothing, or another process, and says nothing of whether it runs.
    theirs = _gone_of_this_boot()
    assert promoted_by_another(keys(3, theirs, host="pod-b"), [None, None, None]) == theirs


def test_no_record_or_garbage_is_ours() -> None:
    garbage: dict[str, Any] = {"generation/current": "not json"}
    assert promoted_by_another(Snapshot(garbage), [None, None, None]) is None
    assert promoted_by_another(Snapshot({}), [None, None, None]) is None
