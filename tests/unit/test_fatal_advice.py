"""What a ``fatal`` or given-up program's operator is told to do: one wording, wherever it is
shown (``status`` and its ``--json``, the ``fatal`` and ``given-up`` events)."""

from __future__ import annotations

from flipvisor.display import status_rows
from flipvisor.fatal_advice import RollbackWay, fatal_advice, next_steps, shown_command

CRASHED = "worker 0 of generation 2 exit status 3; more than 5 restarts in 60s"
LOGS = "`flipvisor logs web` shows its output"
START = "`flipvisor start web` tries again"
ROLLBACK = "`flipvisor rollback web` routes back at once to generation 1, kept warm for it"


def test_a_crash_loop_gets_its_output_and_start() -> None:
    assert fatal_advice("web", CRASHED) == f"{CRASHED}; {LOGS}; {START}"


def test_a_generation_kept_warm_adds_the_rollback_before_start() -> None:
    advice = fatal_advice("web", CRASHED, RollbackWay(warm=1))
    assert advice == f"{CRASHED}; {LOGS}; {ROLLBACK}; {START}"


def test_a_reason_that_names_start_is_its_own_next_step_but_for_the_rollback() -> None:
    """A failed flip's reason says what to fix, then `start`: neither the output nor another
    `start` is added (the supervisor added the output while a generation was kept warm, the
    status table did not)."""
    failed = "cannot write the proxy file /srv/web.conf: denied; fix it, then `flipvisor start web`"
    assert fatal_advice("web", failed) == failed
    assert fatal_advice("web", failed, RollbackWay(warm=1)) == f"{failed}; {ROLLBACK}"


def test_a_reason_that_points_at_the_logs_is_not_told_twice() -> None:
    internal = "internal error: boom; `flipvisor logs web` has the rest"
    assert next_steps("web", internal) == [START]


def test_advice_passed_through_again_is_unchanged() -> None:
    """The CLI passes the supervisor's ``fatal_reason`` through ``fatal_advice`` (for an older
    supervisor's bare reason): the steps are there already, none is added twice."""
    for warm in (None, 1):
        advice = fatal_advice("web", CRASHED, RollbackWay(warm))
        assert fatal_advice("web", advice) == advice


def test_the_status_note_is_the_supervisor_s_advice_as_sent() -> None:
    """The note below the table is ``fatal_reason`` as the supervisor words it: it added the
    output and `start` after a rollback, and the note added them again in its own words."""
    sent = fatal_advice("web", CRASHED, RollbackWay(warm=1))
    program = {"name": "web", "state": "fatal", "restarts": 0, "generations": []}
    _, notes = status_rows({"programs": [{**program, "fatal_reason": sent}]}, 0.0)
    assert notes == [f"web: fatal: {sent}"]
    _, notes = status_rows({"programs": [{**program, "fatal_reason": CRASHED}]}, 0.0)
    assert notes == [f"web: fatal: {CRASHED}; {LOGS}; {START}"]


COLD = "`flipvisor rollback web` starts afresh the previous deploy (`/srv/v1/app --port 80`)"
PREVIOUS = RollbackWay(command="/srv/v1/app --port 80")


def test_a_previous_deploy_without_a_warm_generation_adds_the_cold_rollback() -> None:
    """A release that crash-loops after its flip (no rollback_window): `start` starts it again,
    so the rollback (a cold start of the previous deploy) is named before it."""
    assert fatal_advice("web", CRASHED, PREVIOUS) == f"{CRASHED}; {LOGS}; {COLD}; {START}"
    # A warm generation is the better way back: only it is named.
    warm = RollbackWay(1, PREVIOUS.command)
    assert fatal_advice("web", CRASHED, warm) == f"{CRASHED}; {LOGS}; {ROLLBACK}; {START}"
    advice = fatal_advice("web", CRASHED, PREVIOUS)
    assert fatal_advice("web", advice, PREVIOUS) == advice


def test_after_a_rollback_the_cold_rollback_names_the_deploy_it_was_rolled_back_from() -> None:
    """Flip A→B, rollback (history: current A, previous B), A crash-loops: `rollback` would
    deploy B, the release just escaped. The advice says so, with B's command, not "the previous
    deploy" as if it were a known good one."""
    escaped = RollbackWay(command="/srv/v2/app", rolled_back_from=True)
    steps = next_steps("web", CRASHED, escaped)
    assert steps[1] == (
        "`flipvisor rollback web` starts afresh the previous deploy (`/srv/v2/app`) "
        "(the deploy it was rolled back from)"
    )
    warm = next_steps("web", CRASHED, RollbackWay(1, "/srv/v2/app", rolled_back_from=True))
    assert "generation 1 (the deploy it was rolled back from)" in warm[1]


def test_a_long_command_is_shortened() -> None:
    said = shown_command(["/srv/releases/2026-12-02-build-41/bin/app", "--config", "x" * 80])
    assert len(said) == 60 and said.endswith("…") and said.startswith("/srv/releases/")
    assert shown_command(["app", "--port", "{port}"]) == "app --port '{port}'"


def test_a_failed_rollback_is_not_told_that_start_tries_again() -> None:
    """A failed rollback with nothing serving: its advice (`rollback` again, or `flip`) is the
    reason. `start` would deploy the config file's section, the release rolled back from: not
    "tries again"."""
    failed = (
        "cannot spawn: no such file; restore the previous deploy's command `/srv/v1/app`, then "
        "`flipvisor rollback web`; or deploy the config file's section instead with "
        "`flipvisor flip web`"
    )
    assert next_steps("web", failed) == [LOGS]
    assert next_steps("web", "bind failed; `flipvisor flip web` deploys the file") == [LOGS]
