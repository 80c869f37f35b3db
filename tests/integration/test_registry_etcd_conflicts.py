"""The etcd registry against another writer that keeps changing a program's keys while it writes
them (a real etcd; the other writer's puts made at our seam, between the read and the write, so
that every conditional write conflicts): it backs off, gives up, and writes at the next trigger."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import anyio
import pytest

from flipvisor.lineage import this_supervisor
from flipvisor.registry import KEY_SUFFIXES
from flipvisor.registry.etcd_conflicts import FIRST_DELAY, MAX_CONFLICTS, MAX_DELAY
from flipvisor.registry.etcd_keys import ProgramKeys
from tests.fixtures.etcd import EtcdServer
from tests.integration.test_registry_etcd import registry_for, supervised
from tests.waiting import await_until, holds

pytestmark = pytest.mark.etcd

# Of a retry's delay: the smallest jitter, less a little for the event loop's clock.
LEAST_OF_DELAY = 0.5
CLOCK_SLACK = 0.005


async def test_keys_another_writer_keeps_changing_are_retried_with_backoff_then_left(
    etcd_server: EtcdServer,
    etcd_prefix: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each write found the keys changed since its read: it was tried again at once, read and
    written in a tight loop for as long as the other writer went on. Now each retry waits a
    growing delay, and after ``MAX_CONFLICTS`` in a row the registry stops, with a warning,
    until the next publish."""
    registry = registry_for(f"http://{etcd_server.endpoint}", etcd_prefix)
    ours = supervised(1, 41000, [101], this_supervisor())
    attempts: list[float] = []  # when each conditional write of ours began
    other_writer = {"on": True}
    write = ProgramKeys._write_if_unchanged

    async def written_over(self: ProgramKeys, *args: Any, **kwargs: Any) -> bool:
        attempts.append(anyio.current_time())
        if other_writer["on"]:
            key, value = f"{etcd_prefix}/app/port/previous", str(len(attempts))
            await anyio.to_thread.run_sync(etcd_server.put, key, value)
        return await write(self, *args, **kwargs)

    def got() -> dict[str, str]:
        keys = {s: etcd_server.get(f"{etcd_prefix}/app/{s}") for s in KEY_SUFFIXES}
        return {s: value for s, value in keys.items() if value is not None}

    monkeypatch.setattr(ProgramKeys, "_write_if_unchanged", written_over)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(registry.run)
            await registry.publish("app", ours)
            await await_until(
                lambda: holds(f"changed them {MAX_CONFLICTS} times in a row" in caplog.text),
                timeout=30,
                message="the registry to give up on keys another writer keeps changing",
            )
            assert len(attempts) == MAX_CONFLICTS
            assert "app" not in registry.health()["pending"]  # ``run`` does not try again
            for conflicts, (before, after) in enumerate(pairwise(attempts), start=1):
                delay = min(FIRST_DELAY * 2 ** (conflicts - 1), MAX_DELAY)
                assert after - before >= delay * LEAST_OF_DELAY - CLOCK_SLACK, attempts
            # The next trigger, the other writer gone: written.
            other_writer["on"] = False
            await registry.publish("app", ours)
            await await_until(lambda: holds(got() == dict(ours.values)), message="the keys")
            assert len(attempts) == MAX_CONFLICTS + 1
            tg.cancel_scope.cancel()
    finally:
        await registry.aclose()
