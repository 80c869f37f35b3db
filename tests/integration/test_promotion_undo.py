"""A failed promotion's undo (``promotion_undo.py``) cut short by its own bound: what the
report then says the operator must do."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import anyio
import pytest

from flipvisor import promotion_undo
from flipvisor.config import ProxyConfig
from flipvisor.errors import ProxyError, ProxyReloadNotTaken
from flipvisor.progress import FlipReport
from flipvisor.promotion_steps import Undo
from flipvisor.proxy_file import put_in_place
from flipvisor.proxy_journal import flip_journal
from flipvisor.proxy_record import pending
from flipvisor.reaper import Reaper
from tests.reaping import running_reaper
from tests.stand_in_master import stand_in_master


async def undone(
    proxy: ProxyConfig,
    failure: BaseException,
    steps: list[Undo],
    *,
    reaper: Reaper,
    ignore: tuple[type[BaseException], ...] = (),
    **extra: Any,
) -> FlipReport:
    """``undo_promotion`` of generation 2 of web after ``failure`` (the proxy may have reloaded
    towards it; an error of ``ignore`` it raises let pass), its report finished as a flip's end
    does; returned."""
    report = FlipReport("web")
    gen = cast(Any, SimpleNamespace(number=2, program="web"))
    try:
        with anyio.fail_after(10), contextlib.suppress(*ignore):
            await promotion_undo.undo_promotion(
                failure,
                steps,
                True,
                gen=gen,
                program="web",
                proxy=proxy,
                reaper=reaper,
                report=report,
                **extra,
            )
    finally:
        report.finish()  # closes the report's update stream
        report.close()
    return report


async def test_an_undo_cut_short_before_the_reload_back_says_so_not_that_the_reload_hung(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The undo steps (the registry swapped back, here one that hangs: an etcd that stopped
    answering under a long registry timeout) ran out of ``UNDO_TIMEOUT`` before the reload back
    began. The report said "reloading it back did not finish", which never started."""
    monkeypatch.setattr(promotion_undo, "UNDO_TIMEOUT", 0.2)
    # A short proxy timeout too: the undo's bound allows for the reload back (``undo_bound``).
    proxy = ProxyConfig(
        template=tmp_path / "t.j2", dest=tmp_path / "site.conf", reload_cmd=["true"], timeout=0.05
    )

    async def hangs() -> None:
        await anyio.sleep_forever()

    # The reaper is not reached: nothing is reloaded back.
    report = await undone(proxy, ProxyError("reload failed"), [hangs], reaper=cast(Reaper, None))

    assert report.stranded is not None
    assert "undoing the promotion did not finish within 0.2s" in report.stranded
    assert "reloading it back" not in report.stranded
    assert str(proxy.dest) in report.stranded and "`true`" in report.stranded


@pytest.mark.parametrize("refused", [True, False])
async def test_a_failed_reload_back_after_a_refused_reload_says_nginx_routes_as_before(
    tmp_path: Path, refused: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The reload towards generation 2 was refused (nginx started no new worker), and the
    reload back fails too. nginx routes as before then: the report said "the proxy may still
    route to generation 2", and the flip's message "generation 2 is stopped, so the requests
    the proxy sends it fail", which nginx never did. After a reload that may have been applied
    (``refused`` False), that is still what it says."""
    proxy = ProxyConfig(
        template=tmp_path / "t.j2", dest=tmp_path / "site.conf", reload_cmd=["false"]
    )
    refusal = ProxyReloadNotTaken("nginx has not applied the reload")
    async with running_reaper() as reaper:
        report = await undone(proxy, refusal, [], reaper=reaper, refused=refused)

    reload_back = next(step for step in report.steps if step.name == "reload-back")
    if refused:
        assert report.stranded is None
        assert "nginx refused the reload to generation 2, so it routes as before" in (
            reload_back.detail
        )
        assert "may still route to generation 2" not in reload_back.detail
        # Said once, as it was: not again as a reload back that "did not finish" (review).
        assert "did not finish" not in caplog.text, caplog.text
    else:
        assert report.stranded is not None
        assert "may still route to generation 2" in report.stranded
    # No proxy-undo journal here: no record is kept for the next start, so none is promised.
    assert "next start" not in reload_back.detail, reload_back.detail


@pytest.mark.parametrize("reload_back", ["true", "false"])
async def test_the_proxy_undo_record_stays_until_the_proxy_is_reloaded_back(
    tmp_path: Path, reload_back: str
) -> None:
    """The flip's proxy-undo record went as soon as its file was put back, before the reload
    back: a supervisor killed during that reload (which may go on after a --timeout answered the
    flip) left nothing to tell the next start that the proxy may still route to the generation
    it threw away (QA 10). It goes once the proxy is reloaded back; after a reload back that
    failed, it stays, and the next start reloads the proxy (``proxy_recovery.py``)."""
    state_dir, dest = tmp_path / "state", tmp_path / "site.conf"
    dest.write_bytes(b"server 127.0.0.1:2001;\n")
    proxy = ProxyConfig(template=tmp_path / "t.j2", dest=dest, reload_cmd=[reload_back])
    journal = flip_journal(state_dir, "web", generation=2, port=2002, supervisor={"pid": 1})
    installed = put_in_place(dest, b"server 127.0.0.1:2002;\n", journal)
    await journal.before_registry_step()

    async def put_the_file_back() -> None:
        installed.restore()

    failure = ProxyError("the registry step failed")
    async with running_reaper() as reaper:
        report = await undone(
            proxy,
            failure,
            [put_the_file_back],
            reaper=reaper,
            journal=journal,
            ignore=(ProxyError,),
        )

    assert dest.read_bytes() == b"server 127.0.0.1:2001;\n"
    if reload_back == "true":
        assert report.stranded is None, report.stranded
        assert pending(state_dir) == []
    else:
        assert report.stranded is not None
        [kept] = pending(state_dir)
        assert kept.registry_next is True
        # What to run now, and that the next start reloads the proxy, as the record is kept.
        reload_back_step = next(step for step in report.steps if step.name == "reload-back")
        assert "run `false` now" in reload_back_step.detail, reload_back_step.detail
        assert (
            "the next start of the supervisor checks the proxy's config and reloads it"
            in reload_back_step.detail
        ), reload_back_step.detail
        # Kept on purpose, not by a kill: the next start says so (``Pending.how_left``).
        assert kept.reload_back_failed


async def test_an_undo_cut_short_while_old_proxy_workers_finish_says_it_was_reloaded_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reload back was done and confirmed (a new worker), and the undo's bound ran out
    while the proxy's old workers finished their requests: the report said that reloading it
    back "did not finish", and to reload the proxy by hand, which it was (review)."""
    monkeypatch.setattr(promotion_undo, "undo_bound", lambda *_: 0.5)
    with stand_in_master(tmp_path, keep_old=True) as pidfile:
        proxy = ProxyConfig(
            template=tmp_path / "t.j2",
            dest=tmp_path / "site.conf",
            reload_cmd=["kill", "-HUP", pidfile.read_text().strip()],
            pidfile=pidfile,
            timeout=5,
        )
        async with running_reaper() as reaper:
            report = await undone(proxy, ProxyError("the registry step failed"), [], reaper=reaper)

    assert report.stranded is None, report.stranded


async def test_a_failed_reload_back_promises_the_next_start_only_a_record_that_is_kept(
    tmp_path: Path,
) -> None:
    """The flip's journal recorded no change (its proxy step changed no file), and the reload
    back fails: the message promised that "the next start of the supervisor checks the proxy's
    config and reloads it (the flip's proxy-undo record is kept for that)", with no record on
    disk for the next start to read (review)."""
    state_dir = tmp_path / "state"
    proxy = ProxyConfig(
        template=tmp_path / "t.j2", dest=tmp_path / "site.conf", reload_cmd=["false"]
    )
    journal = flip_journal(state_dir, "web", generation=2, port=2002, supervisor={"pid": 1})
    await journal.before_registry_step()  # nothing to mark: no change recorded
    async with running_reaper() as reaper:
        report = await undone(
            proxy, ProxyError("the registry step failed"), [], reaper=reaper, journal=journal
        )

    assert pending(state_dir) == []
    reload_back = next(step for step in report.steps if step.name == "reload-back")
    assert "run `false` now" in reload_back.detail, reload_back.detail
    assert "next start" not in reload_back.detail, reload_back.detail
    assert "record is kept" not in reload_back.detail, reload_back.detail
