"""The rollback a ``fatal`` program's advice offers, as the history and the failing deploy make
it (``CrashPolicy``), and whether what serves is a rollback's (``flip_steps.note_promoted``).
The program is a stand-in with the state they read (our own seam); the history is a real file."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flipvisor.config import ProgramConfig
from flipvisor.crash_policy import CrashPolicy
from flipvisor.flip_steps import note_promoted
from flipvisor.history import History
from flipvisor.progress import FlipReport

CRASHED = "worker 0 of generation 3 exit status 3; more than 1 restarts in 60s"


def release(version: str) -> ProgramConfig:
    return ProgramConfig.model_validate({"command": [f"/srv/v{version}/app", "--port", "{port}"]})


def program(tmp_path: Path, *deployed: ProgramConfig, **state: Any) -> Any:
    history = History(tmp_path / "history" / "web.json")
    for config in deployed:
        history.deployed(config)
    events = SimpleNamespace(emit=lambda *args, **kwargs: None)
    fields = {"config": deployed[-1], "warm": None, "rolled_back": False, "fatal_reason": None}
    fields["routed_back_from"] = None
    return SimpleNamespace(
        name="web",
        history=history,
        generations=[],
        runtime=SimpleNamespace(events=events),
        **{**fields, **state},
    )


def advice(web: Any, failing: ProgramConfig) -> str:
    crashes = CrashPolicy(web)
    crashes.become_fatal(CRASHED, 3, failing=failing)
    said = crashes.describe_fatal()
    assert said is not None
    return said


def test_the_cold_rollback_names_the_previous_deploy_s_command(tmp_path: Path) -> None:
    web = program(tmp_path, release("1"), release("2"))
    said = advice(web, release("2"))
    cold = (
        "`flipvisor rollback web` starts afresh the previous deploy (`/srv/v1/app --port '{port}'`)"
    )
    assert cold in said and "rolled back from" not in said, said


def test_after_a_rollback_the_cold_rollback_is_the_deploy_rolled_back_from(tmp_path: Path) -> None:
    """Flip 1→2, rollback to 1 (history: current 1, previous 2), 1 crash-loops: `rollback`
    would deploy 2, the release just escaped, and the advice says so."""
    web = program(tmp_path, release("1"), release("2"), release("1"), rolled_back=True)
    said = advice(web, release("1"))
    assert (
        "previous deploy (`/srv/v2/app --port '{port}'`) (the deploy it was rolled back from)"
        in (said)
    ), said


def test_no_rollback_is_offered_to_the_deploy_that_fails(tmp_path: Path) -> None:
    """History current 2, previous 1; the file edited back to 1, whose `start` fails: a rollback
    would deploy 1 again, the failing deploy itself. Another section that fails gets it."""
    web = program(tmp_path, release("1"), release("2"))
    assert "flipvisor rollback" not in advice(web, release("1"))
    web = program(tmp_path / "other", release("1"), release("2"))
    assert "`flipvisor rollback web`" in advice(web, release("3"))


def test_a_rollback_back_onto_the_file_s_section_is_not_a_rolled_back_deploy(
    tmp_path: Path,
) -> None:
    """Flip 1→2, rollback to 1, rollback again to 2, the file's section: what serves is the
    file's, so a later `restart` has no rollback to undo (and says nothing of one)."""
    web = program(tmp_path, release("1"), release("2"), release("1"), rolled_back=True)
    web.config = release("2")
    for deployed, rolled_back in ((release("2"), False), (release("1"), True)):
        report = FlipReport("web", "rollback")
        note_promoted(web, report, deployed)
        report.finish()
        report.close()
        assert web.rolled_back is rolled_back
