"""What a ``fatal`` or given-up program's operator is told to do: one wording, wherever it is
shown (``status`` and its ``--json``, the ``fatal`` and ``given-up`` events)."""

from __future__ import annotations

from flipvisor.display import status_rows
from flipvisor.fatal_advice import fatal_advice, next_steps

CRASHED = "worker 0 of generation 2 exit status 3; more than 5 restarts in 60s"
LOGS = "`flipvisor logs web` shows its output"
START = "`flipvisor start web` tries again"
ROLLBACK = "`flipvisor rollback web` routes back at once to generation 1, kept warm for it"


def test_a_crash_loop_gets_its_output_and_start() -> None:
    assert fatal_advice("web", CRASHED) == f"{CRASHED}; {LOGS}; {START}"


def test_a_generation_kept_warm_adds_the_rollback_before_start() -> None:
    assert fatal_advice("web", CRASHED, warm=1) == f"{CRASHED}; {LOGS}; {ROLLBACK}; {START}"


def test_a_reason_that_names_start_is_its_own_next_step_but_for_the_rollback() -> None:
    """A failed flip's reason says what to fix, then `start`: neither the output nor another
    `start` is added (the supervisor added the output while a generation was kept warm, the
    status table did not)."""
    failed = "cannot write the proxy file /srv/web.conf: denied; fix it, then `flipvisor start web`"
    assert fatal_advice("web", failed) == failed
    assert fatal_advice("web", failed, warm=1) == f"{failed}; {ROLLBACK}"


def test_a_reason_that_points_at_the_logs_is_not_told_twice() -> None:
    internal = "internal error: boom; `flipvisor logs web` has the rest"
    assert next_steps("web", internal) == [START]


def test_advice_passed_through_again_is_unchanged() -> None:
    """The CLI passes the supervisor's ``fatal_reason`` through ``fatal_advice`` (for an older
    supervisor's bare reason): the steps are there already, none is added twice."""
    for warm in (None, 1):
        advice = fatal_advice("web", CRASHED, warm)
        assert fatal_advice("web", advice) == advice


def test_the_status_note_is_the_supervisor_s_advice_as_sent() -> None:
    """The note below the table is ``fatal_reason`` as the supervisor words it: it added the
    output and `start` after a rollback, and the note added them again in its own words."""
    sent = fatal_advice("web", CRASHED, warm=1)
    program = {"name": "web", "state": "fatal", "restarts": 0, "generations": []}
    _, notes = status_rows({"programs": [{**program, "fatal_reason": sent}]}, 0.0)
    assert notes == [f"web: fatal: {sent}"]
    _, notes = status_rows({"programs": [{**program, "fatal_reason": CRASHED}]}, 0.0)
    assert notes == [f"web: fatal: {CRASHED}; {LOGS}; {START}"]


COLD = "`flipvisor rollback web` starts the previous deploy afresh"


def test_a_previous_deploy_without_a_warm_generation_adds_the_cold_rollback() -> None:
    """A release that crash-loops after its flip (no rollback_window): `start` starts it again,
    so the rollback (a cold start of the previous deploy) is named before it."""
    assert fatal_advice("web", CRASHED, previous=True) == f"{CRASHED}; {LOGS}; {COLD}; {START}"
    # A warm generation is the better way back: only it is named.
    assert (
        fatal_advice("web", CRASHED, 1, previous=True) == f"{CRASHED}; {LOGS}; {ROLLBACK}; {START}"
    )
    advice = fatal_advice("web", CRASHED, previous=True)
    assert fatal_advice("web", advice, previous=True) == advice
