"""The deploy history that rollback reads: persisted, and only different configs shift it."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from flipvisor.config import ProgramConfig
from flipvisor.history import History

V1 = ProgramConfig(command=["app", "--version", "1"], env={"A": "1"}, cwd=Path("/srv/a"))
V2 = ProgramConfig(command=["app", "--version", "2"])


def test_previous_is_the_last_different_config_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "history" / "web.json"
    history = History(path)
    assert history.current is None and history.previous is None
    history.deployed(V1)
    history.deployed(V2)
    history.deployed(V2)  # a restart: same config, not its own rollback target
    assert (history.current, history.previous) == (V2, V1)
    again = History(path)  # a new supervisor reads it back, env and cwd included
    assert (again.current, again.previous) == (V2, V1)
    assert again.previous is not None and again.previous.cwd == Path("/srv/a")


@pytest.mark.parametrize("content", ["not json", '{"current": {"command": []}}', "[1]"])
def test_a_damaged_history_means_no_rollback_target(tmp_path: Path, content: str) -> None:
    path = tmp_path / "web.json"
    path.write_text(content)
    history = History(path)
    assert history.current is None and history.previous is None
    history.deployed(V1)  # and it is replaced by the next deploy
    assert History(path).current == V1


def test_a_deploy_recorded_as_a_cancellation_lands_is_written_all_the_same(
    tmp_path: Path,
) -> None:
    # A shutdown cancelling the flip's last step: the memory said V2 while the file kept V1,
    # and the next run rolled back to the wrong config.
    path = tmp_path / "history" / "web.json"
    history = History(path)
    history.deployed(V1)

    async def record_cancelled() -> None:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await history.record_deployed(V2)

    anyio.run(record_cancelled)

    again = History(path)
    assert (again.current, again.previous) == (V2, V1)
