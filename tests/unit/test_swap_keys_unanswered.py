"""``promotion_steps._swap_keys`` and ``Registry.unanswered``: only a first start (``optional``)
defers its registration at once when the registry is known not to answer; a flip still asks."""

from __future__ import annotations

from typing import cast

import pytest

from flipvisor import promotion_steps
from flipvisor.errors import RegistryUnanswered
from flipvisor.generation import Generation
from flipvisor.registry import Registry, Snapshot

PUBLISHED = Snapshot({"port/current": "41000"})


class KnownUnanswered:
    """A registry whose latest request went unanswered, and that answers the next ones."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.why = RegistryUnanswered("etcd at 127.0.0.1:2379 did not answer within 1 s")

    def unanswered(self) -> RegistryUnanswered | None:
        return self.why

    async def snapshot(self, program: str) -> Snapshot:
        self.calls.append(f"snapshot {program}")
        return Snapshot()

    async def swap(self, program: str, expected: Snapshot, new: Snapshot) -> None:
        self.calls.append(f"swap {program}")


@pytest.fixture(autouse=True)
def published_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a generation publishes, without making one (no workers are involved here)."""
    monkeypatch.setattr(promotion_steps, "serving_snapshot", lambda gen, replaced: PUBLISHED)


async def test_a_flip_still_asks_a_registry_known_not_to_answer() -> None:
    registry = KnownUnanswered()
    expected, published, deferred = await promotion_steps._swap_keys(
        cast(Generation, None), program="app", registry=cast(Registry, registry), optional=False
    )
    assert registry.calls == ["snapshot app", "swap app"]
    assert (expected, published, deferred) == (Snapshot(), PUBLISHED, None)


async def test_a_first_start_defers_at_once_when_the_registry_is_known_not_to_answer() -> None:
    registry = KnownUnanswered()
    expected, published, deferred = await promotion_steps._swap_keys(
        cast(Generation, None), program="app", registry=cast(Registry, registry), optional=True
    )
    assert registry.calls == []
    assert deferred is registry.why
    assert expected == published == PUBLISHED
