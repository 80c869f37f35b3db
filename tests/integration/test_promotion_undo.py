"""A failed promotion's undo (``promotion_undo.py``) cut short by its own bound: what the
report then says the operator must do."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import anyio
import pytest

from flipvisor import promotion_undo
from flipvisor.config import ProxyConfig
from flipvisor.errors import ProxyError
from flipvisor.progress import FlipReport
from flipvisor.reaper import Reaper


async def test_an_undo_cut_short_before_the_reload_back_says_so_not_that_the_reload_hung(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The undo steps (the registry swapped back, here one that hangs: an etcd that stopped
    answering under a long registry timeout) ran out of ``UNDO_TIMEOUT`` before the reload back
    began. The report said "reloading it back did not finish", which never started."""
    monkeypatch.setattr(promotion_undo, "UNDO_TIMEOUT", 0.2)
    proxy = ProxyConfig(
        template=tmp_path / "t.j2", dest=tmp_path / "site.conf", reload_cmd=["true"]
    )
    report = FlipReport("web")
    gen = cast(Any, SimpleNamespace(number=2, program="web"))

    async def hangs() -> None:
        await anyio.sleep_forever()

    try:
        with anyio.fail_after(10):
            await promotion_undo.undo_promotion(
                ProxyError("reload failed"),
                [hangs],
                True,
                gen=gen,
                program="web",
                proxy=proxy,
                reaper=cast(Reaper, None),  # not reached: nothing is reloaded back
                report=report,
            )
    finally:
        report.finish()  # closes the report's update stream, as a flip's end does
        report.close()

    assert report.stranded is not None
    assert "undoing the promotion did not finish within 0.2s" in report.stranded
    assert "reloading it back" not in report.stranded
    assert str(proxy.dest) in report.stranded and "`true`" in report.stranded
