"""``to_the_millisecond`` (each generation's uptime in status) is ``round(x, 3)``, float for
float: the status path uses it only because it is quicker."""

from __future__ import annotations

import random

import pytest

from flipvisor.generation_status import to_the_millisecond


def test_it_equals_round_on_random_uptimes_from_a_millisecond_to_a_century() -> None:
    """Negative too: the wall clock may be set back under a running generation."""
    rng = random.Random(5)
    for _ in range(200_000):
        seconds = rng.uniform(-1, 1) * 10 ** rng.randint(-3, 9)
        assert to_the_millisecond(seconds) == round(seconds, 3), repr(seconds)


def test_it_equals_round_at_and_around_every_half_millisecond() -> None:
    """Where the two could part: a value whose thousandfold lies on or near a half."""
    for k in range(0, 200_000, 7):
        half = k / 1000 + 0.0005
        for seconds in (half, half + 1e-12, half - 1e-12, k / 2000, 1e6 + half, -half):
            assert to_the_millisecond(seconds) == round(seconds, 3), repr(seconds)


@pytest.mark.parametrize("seconds", [0.0, 0.0005, 0.0015, 2.675, 1.0005, 86400.0004999, 3.14159])
def test_known_cases(seconds: float) -> None:
    assert to_the_millisecond(seconds) == round(seconds, 3)
