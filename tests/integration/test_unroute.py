"""A removed program's proxy file taken away (``unroute.py``), with real check commands: what a
cancelled removal leaves behind."""

from __future__ import annotations

from pathlib import Path

import anyio

from flipvisor.config import ProxyConfig
from flipvisor.proxy_lock import ProxyLock
from flipvisor.proxy_record import record_path
from flipvisor.unroute import unroute
from tests.reaping import running_reaper
from tests.waiting import await_until, holds


async def test_a_cancelled_removal_puts_the_file_back_and_drops_its_record(
    tmp_path: Path,
) -> None:
    """Cancelled during the check without the file (a shutdown, say), the removal put the file
    back but left its proxy-undo record, so the next start said a previous supervisor was killed
    during the removal, and made it again. Having put the file back itself, it drops the record."""
    dest = tmp_path / "conf" / "web.conf"
    dest.parent.mkdir()
    dest.write_text("upstream web {}\n")
    checking = tmp_path / "checking"
    proxy = ProxyConfig(
        template=tmp_path / "t.j2",
        dest=dest,
        # Says it runs, then hangs until the removal is cancelled.
        check_cmd=["sh", "-c", f"touch {checking}; exec sleep 60"],
        reload_cmd=["true"],
    )
    state_dir = tmp_path / "state"
    async with running_reaper() as reaper:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    lambda: unroute(
                        "web",
                        proxy,
                        reaper=reaper,
                        proxy_lock=ProxyLock(),
                        state_dir=state_dir,
                    )
                )
                await await_until(lambda: holds(checking.exists()), message="the check ran")
                assert record_path(state_dir, "web").exists()  # the removal is under way
                tg.cancel_scope.cancel()
    assert dest.read_text() == "upstream web {}\n"
    assert not record_path(state_dir, "web").exists()
