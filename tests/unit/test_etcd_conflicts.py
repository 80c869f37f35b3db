"""``ConflictBackoff``: when the etcd registry writes again keys another writer changed."""

from __future__ import annotations

import math

from flipvisor.registry.etcd_conflicts import ConflictBackoff


def test_wait_counts_a_retry_whose_time_passed_while_others_were_written() -> None:
    """``_keep_written`` found ``api`` not due, then wrote ``web``; meanwhile ``api``'s time
    passed. Waiting only for times still ahead left it out: inf (waiting for an unrelated
    trigger) or a later program's time. It is due at once."""
    backoff = ConflictBackoff(retry_at={"api": 1.0})
    assert not backoff.due("api", 0.9)
    assert backoff.wait({"api", "web"}, 1.1) == 0.0
    backoff.retry_at["web"] = 3.0
    assert backoff.wait({"api", "web"}, 1.1) == 0.0
    assert backoff.wait({"api", "web"}, 0.5) == 0.5


def test_wait_is_for_the_first_pending_program_that_backs_off() -> None:
    backoff = ConflictBackoff(retry_at={"api": 2.0, "web": 1.5, "gone": 0.5})
    assert backoff.wait({"api", "web"}, 1.0) == 0.5  # ``gone`` is not pending
    assert backoff.wait({"other"}, 1.0) == math.inf
    assert backoff.wait(set(), 1.0) == math.inf
