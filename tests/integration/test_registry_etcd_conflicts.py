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
from tests.integration.test_registry_etcd import record, registry_for, supervised
from tests.waiting import await_until, holds

pytestmark = pytest.mark.etcd

# Of a retry's delay: the smallest jitter, less a little for the event loop's clock.
LEAST_OF_DELAY = 0.5
CLOCK_SLACK = 0.005


class OtherWriter:
    """Another writer that, while ``on``, changes ``program``'s keys between each of our reads
    and its conditional write (at our seam), so that every write conflicts; ``attempts``: when
    each write of ours began."""

    def __init__(
        self, etcd: EtcdServer, prefix: str, monkeypatch: pytest.MonkeyPatch, program: str = "app"
    ) -> None:
        self.on = True
        self.attempts: list[float] = []
        write = ProgramKeys._write_if_unchanged

        async def written_over(keys: ProgramKeys, *args: Any, **kwargs: Any) -> bool:
            self.attempts.append(anyio.current_time())
            if self.on:
                key, value = f"{prefix}/{program}/port/previous", str(len(self.attempts))
                await anyio.to_thread.run_sync(etcd.put, key, value)
            return await write(keys, *args, **kwargs)

        monkeypatch.setattr(ProgramKeys, "_write_if_unchanged", written_over)


async def given_up(caplog: pytest.LogCaptureFixture) -> None:
    await await_until(
        lambda: holds(f"changed them {MAX_CONFLICTS} times in a row" in caplog.text),
        timeout=30,
        message="the registry to give up on keys another writer keeps changing",
    )


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
    other_writer = OtherWriter(etcd_server, etcd_prefix, monkeypatch)
    attempts = other_writer.attempts

    def got() -> dict[str, str]:
        keys = {s: etcd_server.get(f"{etcd_prefix}/app/{s}") for s in KEY_SUFFIXES}
        return {s: value for s, value in keys.items() if value is not None}

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(registry.run)
            await registry.publish("app", ours)
            await given_up(caplog)
            assert len(attempts) == MAX_CONFLICTS
            assert "app" not in registry.health()["pending"]  # ``run`` does not try again
            # ... but ``status`` shows the keys are not right: beyond one warning line.
            assert registry.health()["conflicting"] == ["app"]
            for conflicts, (before, after) in enumerate(pairwise(attempts), start=1):
                delay = min(FIRST_DELAY * 2 ** (conflicts - 1), MAX_DELAY)
                assert after - before >= delay * LEAST_OF_DELAY - CLOCK_SLACK, attempts
            # The next trigger, the other writer gone: written.
            other_writer.on = False
            await registry.publish("app", ours)
            await await_until(lambda: holds(got() == dict(ours.values)), message="the keys")
            assert len(attempts) == MAX_CONFLICTS + 1
            assert registry.health()["conflicting"] == []
            tg.cancel_scope.cancel()
    finally:
        await registry.aclose()


async def test_a_withdrawal_of_taken_over_keys_given_up_on_is_tried_again_at_a_reconnect(
    restartable_etcd: EtcdServer,
    etcd_prefix: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A withdrawal of the keys of a killed supervisor's workers taken over at start-up is in
    ``withdrawing`` alone (nothing ``desired``): a reconnect put back in ``pending`` only the
    desired programs, so once given up on, the keys named the stopped workers for good."""
    taken_over = record(1, 41000, [101])
    for suffix, value in taken_over.values.items():
        restartable_etcd.put(f"{etcd_prefix}/app/{suffix}", value)
    registry = registry_for(restartable_etcd.endpoint, etcd_prefix, timeout=2)
    other_writer = OtherWriter(restartable_etcd, etcd_prefix, monkeypatch)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(registry.run)
            await registry.withdraw("app", taken_over=taken_over.get("generation/current"))
            await given_up(caplog)
            assert registry.health()["conflicting"] == ["app"]
            other_writer.on = False
            restartable_etcd.stop()
            restartable_etcd.start()
            # etcd holds the withdrawal before the registry has its answer: wait for both.
            await await_until(
                lambda: holds(
                    restartable_etcd.get(f"{etcd_prefix}/app/port/current") is None
                    and registry.health()["conflicting"] == []
                ),
                timeout=30,
                message="the keys withdrawn after the reconnect, and no longer conflicting",
            )
            assert len(other_writer.attempts) == MAX_CONFLICTS + 1
            tg.cancel_scope.cancel()
    finally:
        await registry.aclose()
