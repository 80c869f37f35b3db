"""judge_exit: what happens after a worker exits, for every kind of generation and policy."""

from __future__ import annotations

from typing import Any

import pytest

from flipvisor.config import RestartConfig
from flipvisor.restarts import RestartBudget, Verdict, judge_exit

WHERE = "worker 0 of generation 2"


def judge(
    policy: str = "always",
    *,
    budget: int = 5,
    returncode: int | None = 1,
    starting: bool = False,
    replacing: bool = True,
    failures: int = 0,
    warm: bool = False,
    fatal: bool = False,
    spending: RestartBudget | None = None,
) -> Verdict:
    """``judge_exit`` of ``WHERE``'s exit; ``spending``: the budget it spends (a fresh one of
    ``budget`` restarts per 60 s if not given)."""
    config = RestartConfig(policy=policy, max_restarts=budget, window=60)  # type: ignore[arg-type]
    return judge_exit(
        policy=config,
        budget=spending if spending is not None else RestartBudget(budget, 60),
        returncode=returncode,
        reason="exit status 1",
        consecutive_failures=failures,
        starting=starting,
        replacing=replacing,
        where=WHERE,
        warm=warm,
        fatal=fatal,
    )


CASES: list[tuple[str, dict[str, Any], Verdict]] = [
    ("serving worker crashes: restarted at once", {}, Verdict(delay=0.0)),
    (
        "replacing generation's worker crashes while probed: the flip fails",
        {"starting": True},
        Verdict(fail=f"{WHERE} exit status 1"),
    ),
    (
        "even with policy never, a replacing generation fails",
        {"starting": True, "policy": "never"},
        Verdict(fail=f"{WHERE} exit status 1"),
    ),
    (
        "first generation crashes while probed: restarted",
        {"starting": True, "replacing": False},
        Verdict(delay=0.0),
    ),
    (
        "policy never: the serving slot stays stopped",
        {"policy": "never"},
        Verdict(not_restarted=True),
    ),
    (
        "on-failure, clean exit: stays stopped",
        {"policy": "on-failure", "returncode": 0},
        Verdict(not_restarted=True),
    ),
    ("on-failure, crash: restarted", {"policy": "on-failure"}, Verdict(delay=0.0)),
    (
        "first generation, policy never: it fails",
        {"policy": "never", "starting": True, "replacing": False},
        Verdict(fail=f"{WHERE} exit status 1", not_restarted=True),
    ),
    (
        "budget spent on a serving generation: fatal",
        {"budget": 0},
        Verdict(fatal=f"{WHERE} exit status 1; no restart allowed (restart.max_restarts: 0)"),
    ),
    (
        "budget spent while the first generation starts: it fails",
        {"budget": 0, "starting": True, "replacing": False},
        Verdict(fail=f"{WHERE} exit status 1; no restart allowed (restart.max_restarts: 0)"),
    ),
    (
        "warm generation's worker crashes: retired, not restarted",
        {"warm": True},
        Verdict(retire=True),
    ),
    (
        "warm generation with the budget spent: retired, not fatal",
        {"warm": True, "budget": 0},
        Verdict(retire=True),
    ),
    (
        "warm generation, policy never, clean exit: retired",
        {"warm": True, "policy": "never", "returncode": 0},
        Verdict(retire=True),
    ),
    (
        "program fatal already, the window's budget back: not restarted",
        {"fatal": True},
        Verdict(not_restarted=True),
    ),
    (
        "program fatal, a replacing generation's worker crashes: the flip fails",
        {"fatal": True, "starting": True},
        Verdict(fail=f"{WHERE} exit status 1"),
    ),
]


@pytest.mark.parametrize(("case", "kwargs", "expected"), CASES, ids=[c[0] for c in CASES])
def test_judge_exit(case: str, kwargs: dict[str, Any], expected: Verdict) -> None:
    assert judge(**kwargs) == expected


def test_later_restarts_back_off() -> None:
    verdict = judge(failures=4)
    assert verdict.delay is not None and 0.4 <= verdict.delay <= 0.8


def test_a_spent_budget_names_the_limit() -> None:
    budget = RestartBudget(2, 60)
    assert budget.take() and budget.take()
    verdict = judge(budget=2, failures=2, spending=budget)
    assert verdict == Verdict(fatal=f"{WHERE} exit status 1; more than 2 restarts in 60s")


def test_a_warm_generation_s_exit_spends_nothing_of_the_budget() -> None:
    budget = RestartBudget(1, 60)
    for _ in range(3):
        assert judge(budget=1, warm=True, spending=budget) == Verdict(retire=True)
    assert budget.take(), "the serving generation still has its one restart"
