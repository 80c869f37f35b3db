"""A flip's live report: timed steps, their outcome, the update stream, and the final JSON."""

from __future__ import annotations

import time

import anyio
import anyio.lowlevel
import pytest

from flipvisor.flip_outcome import still_to_do
from flipvisor.progress import UPDATE_BUFFER, FlipReport, Step


def spin(seconds: float) -> None:
    """Let real time pass inside a step (a CPU wait, so the duration is not scheduler noise)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def drain_updates(report: FlipReport) -> list[Step]:
    """Every update published so far; stops at an empty or closed stream."""
    got: list[Step] = []
    while True:
        try:
            got.append(report.updates.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            return got


def test_step_is_timed_and_ok() -> None:
    report = FlipReport("web")
    try:
        before = time.monotonic()
        with report.step("spawn", "2 worker(s)") as step:
            assert step.status == "running"
            assert step.duration is None
            spin(0.05)
        elapsed = time.monotonic() - before
        assert step.status == "ok"
        assert step.duration is not None
        assert 0.05 <= step.duration <= elapsed
        assert report.steps == [step]
    finally:
        report.finish()
        report.close()


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_step_failed_on_exception_which_propagates(error: BaseException) -> None:
    report = FlipReport("web")
    try:
        with pytest.raises(type(error)), report.step("probe"):
            raise error
        step = report.steps[-1]
        assert step.status == "failed"
        assert step.duration is not None
    finally:
        report.finish("probe failed")
        report.close()


async def test_step_failed_when_cancelled() -> None:
    report = FlipReport("web")
    try:
        with anyio.move_on_after(0.05), report.step("probe"):
            await anyio.sleep(10)
        assert report.steps[0].status == "failed"
    finally:
        report.finish()
        report.close()


async def test_a_step_a_stop_calls_off_is_cancelled_not_failed() -> None:
    """A stop calling the flip off cancels the step under way: no failure of it (QA 11); a
    failure within the same flip is still one."""
    report = FlipReport("web")
    try:
        with pytest.raises(ValueError), report.step("spawn"):
            raise ValueError("boom")
        report.calling_off = True
        with anyio.move_on_after(0.05), report.step("probe"):
            await anyio.sleep(10)
        assert [step.status for step in report.steps] == ["failed", "cancelled"]
        assert [step.status for step in drain_updates(report)][-1] == "cancelled"
    finally:
        report.finish()
        report.close()


def test_updates_are_snapshots_then_closed_at_finish() -> None:
    report = FlipReport("web")
    try:
        with report.step("spawn"):
            pass
        with pytest.raises(ValueError), report.step("probe", "GET /health"):
            raise ValueError("no")
        report.finish("probe failed")
        updates = drain_updates(report)
        assert [(u.name, u.status) for u in updates] == [
            ("spawn", "running"),
            ("spawn", "ok"),
            ("probe", "running"),
            ("probe", "failed"),
        ]
        # Copies: the first update still says "running" though the step itself went on.
        assert updates[0] is not report.steps[0]
        assert updates[0].duration is None
        assert updates[1].duration is not None
        with pytest.raises(anyio.EndOfStream):
            report.updates.receive_nowait()
    finally:
        report.close()


async def test_follower_sees_end_of_stream_when_finished() -> None:
    report = FlipReport("web")
    seen: list[str] = []
    try:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:

                async def follow() -> None:
                    async for update in report.updates:
                        seen.append(f"{update.name}:{update.status}")

                tg.start_soon(follow)
                with report.step("spawn"):
                    await anyio.lowlevel.checkpoint()
                report.finish()
        assert seen == ["spawn:running", "spawn:ok"]
        await report.wait()
    finally:
        report.close()


def test_slow_or_absent_follower_loses_updates_not_steps() -> None:
    report = FlipReport("web")
    try:
        for index in range(UPDATE_BUFFER):  # two updates each: twice the buffer
            with report.step(f"s{index}"):
                pass
        assert len(report.steps) == UPDATE_BUFFER
        assert len(drain_updates(report)) == UPDATE_BUFFER
        report.close()  # the follower went away: publishing must not raise
        with report.step("after"):
            pass
        report.finish()
        assert report.ok
        assert len(report.to_json()["steps"]) == UPDATE_BUFFER + 1
    finally:
        report.close()


def test_ok_and_to_json() -> None:
    report = FlipReport("web", kind="rollback")
    try:
        assert not report.ok, "not finished yet"
        report.generation = 4
        with report.step("registry", "swap keys"):
            pass
        report.finish("etcd unreachable", ["line 1"])
        assert not report.ok
        data = report.to_json()
        assert data["program"] == "web"
        assert data["kind"] == "rollback"
        assert data["generation"] == 4
        assert data["ok"] is False
        assert data["abandoned"] is False  # failed, not called off
        assert data["error"] == "etcd unreachable"
        assert data["output"] == ["line 1"]
        assert isinstance(data["duration"], float)
        assert data["steps"] == [
            {
                "step": "registry",
                "status": "ok",
                "detail": "swap keys",
                "duration": round(report.steps[0].duration or 0.0, 4),
            }
        ]
    finally:
        report.close()


def test_finished_without_error_is_ok() -> None:
    report = FlipReport("web")
    report.finish()
    report.close()
    assert report.ok
    assert report.to_json()["ok"] is True
    assert report.to_json()["output"] == []
    assert report.to_json()["warning"] is None


def test_a_warning_is_still_ok_and_steps_after_the_answer_are_kept() -> None:
    # A flip whose --timeout ran out after the promotion answers, then drains on.
    report = FlipReport("web")
    try:
        with report.step("drain", "generation 1"):
            assert not report.finished
            report.finish(warning="generation 1 is still draining")
            assert report.finished
        assert report.ok
        data = report.to_json()
        assert (data["ok"], data["error"]) == (True, None)
        assert data["warning"] == "generation 1 is still draining"
        assert report.steps[0].status == "ok"  # recorded, though nobody is sent it any more
    finally:
        report.close()


async def test_wait_returns_once_finished() -> None:
    report = FlipReport("web")
    try:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(report.wait)
                await anyio.lowlevel.checkpoint()
                report.finish()
    finally:
        report.close()


@pytest.mark.parametrize(
    ("proxy_draining", "window", "says", "not_said"),
    [
        (True, 0.0, "generation 1 drains once the proxy's old workers are gone", "warm"),
        (False, 0.0, "generation 1 is still draining", "warm"),
        (True, 30.0, "generation 1 is kept warm 30 s for a rollback", "drains once"),
        (False, 30.0, "generation 1 is kept warm 30 s for a rollback", "still draining"),
    ],
)
def test_a_flip_answered_early_says_what_becomes_of_the_replaced_generation(
    proxy_draining: bool, window: float, says: str, not_said: str
) -> None:
    # With rollback_window the replaced generation is kept warm, not drained: saying it
    # "drains" would send an operator looking for a drain that never comes.
    text = still_to_do("generation 1", proxy_draining, window)
    assert says in text and not_said not in text, text
    assert ("proxy's old workers" in text) == proxy_draining


def test_a_second_outcome_is_ignored() -> None:
    # A flip answered while its rollback ran ends later: what it ends with is an event, and
    # the answer its follower got stays the report's.
    report = FlipReport("web")
    report.finish("being rolled back", ["last line"])
    report.finish()
    report.close()
    assert not report.ok
    assert (report.error, report.output) == ("being rolled back", ["last line"])


def test_a_caution_is_said_with_a_success_before_its_warning_and_not_with_a_failure() -> None:
    """A restart that undid a rollback says so (``caution``) in its answer's ``warning``, and
    before what its --timeout left under way; a failed one undid nothing."""
    undid = "it undid the rollback"
    said: list[str | None] = []
    for error, warning in ((None, "draining on"), (None, None), ("spawn failed", None)):
        report = FlipReport("web", "restart")
        report.caution = undid
        report.finish(error, warning=warning)
        report.close()
        said.append(report.to_json()["warning"])
    assert said == [f"{undid}; draining on", undid, None]


def test_a_promoted_flip_that_failed_afterwards_keeps_its_caution() -> None:
    """A restart promoted (it serves the file's section: the rollback is undone) whose retiring
    of what it replaced failed still undid the rollback: the error does not drop the caution."""
    report = FlipReport("web", "restart")
    report.caution = "it undid the rollback"
    report.routed = True
    report.finish("generation 3 was promoted and serves, but retiring generation 2 failed")
    report.close()
    assert report.to_json()["warning"] == "it undid the rollback"
