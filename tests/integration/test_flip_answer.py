"""When a flip's ``--timeout`` answers its client (``flip_outcome.py``): early, while a rollback
runs, only for a flip that is rolled back; a promotion completing late is a promotion."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from flipvisor import proxy_journal
from flipvisor.config import DrainConfig, ProgramConfig, ReadinessConfig
from flipvisor.discard import DEADLINE_GRACE
from flipvisor.flip import ANSWER_AFTER_DISCARD
from tests.fixtures.flipvisor import svc_command
from tests.integration.test_discard import DEADLINE, running_program
from tests.waiting import await_until

TIMEOUT = 1.0


def ready_service() -> ProgramConfig:
    return ProgramConfig(
        command=svc_command(),
        numprocs=1,
        readiness=ReadinessConfig(http="/health", timeout=DEADLINE),
        drain=DrainConfig(delay=0.0, timeout=2.0),
    )


async def test_a_promotion_completing_after_the_deadline_is_answered_as_promoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal's record removed (fsynced, shielded) after the routing steps: on a slow
    disk that can outlast the flip's deadline and the answer's grace. The generation is routed
    to and serves; the early answer said "it is being rolled back" (exit 1), and the record a
    `flip-finished ok=True` with no `flip-failed`."""
    real_promoted = proxy_journal.ProxyJournal.promoted

    async def slow_promoted(self: proxy_journal.ProxyJournal) -> None:
        with anyio.CancelScope(shield=True):  # as the record's removal is
            await anyio.sleep(TIMEOUT + DEADLINE_GRACE + ANSWER_AFTER_DISCARD + 1.0)
        await real_promoted(self)

    async with running_program(tmp_path, ready_service()) as program:
        report = program.start_flip(kind="start")
        report.close()
        with anyio.fail_after(DEADLINE):
            await report.wait()
        assert report.ok, report.error
        monkeypatch.setattr(proxy_journal.ProxyJournal, "promoted", slow_promoted)
        report = program.flips.start_flip(timeout=TIMEOUT)
        report.close()
        with anyio.fail_after(DEADLINE):
            await report.wait()
        assert report.error is None, report.error
        assert report.warning is not None and "was promoted" in report.warning, report.warning

        async def flip_over() -> bool:
            return program.current_flip is None

        await await_until(flip_over, timeout=DEADLINE, message="the flip's end")
        assert program.serving is not None and program.serving.number == 2
        kinds = [e.kind for e in program.runtime.events.recent()]
        assert "flip-failed" not in kinds, kinds
        finished = [e for e in program.runtime.events.recent() if e.kind == "flip-finished"]
        assert finished[-1].fields["ok"] is True
