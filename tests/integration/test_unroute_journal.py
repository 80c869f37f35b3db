"""A removed program's proxy file and the proxy-undo journal (``unroute.py``, ``proxy_journal``):
its record is on disk before the file goes, for as long as the check without it runs, and gone
once the removal stands or the file was put back (review: these paths were untested). A real
check command, run as the proxy's would be, looks at the state_dir while it runs."""

from __future__ import annotations

from pathlib import Path

import anyio

from flipvisor.config import ProxyConfig
from flipvisor.proxy_lock import ProxyLock
from flipvisor.proxy_record import pending, record_path
from flipvisor.unroute import unroute
from tests.reaping import running_reaper


async def _unroute(tmp_path: Path, check: str) -> tuple[bool, Path, Path]:
    """Unroute ``gone`` with the shell ``check`` (given $DEST and $RECORD); returns whether a
    file was removed, the file and its record's path."""
    state_dir = tmp_path / "state"
    dest = tmp_path / "proxy" / "gone.conf"
    dest.parent.mkdir()
    dest.write_text("upstream gone { server 127.0.0.1:41234; }\n")
    record = record_path(state_dir, "gone")
    seen = tmp_path / "seen"
    script = f"DEST={dest} RECORD={record} SEEN={seen}; {check}"
    proxy = ProxyConfig(template=tmp_path / "gone.j2", dest=dest, check_cmd=["sh", "-c", script])
    async with running_reaper() as reaper:
        with anyio.fail_after(20):
            removed = await unroute(
                "gone", proxy, reaper=reaper, proxy_lock=ProxyLock(), state_dir=state_dir
            )
    return removed, dest, record


SEES = 'echo "file=$(test -e $DEST && echo y || echo n) record=$(grep -c removal $RECORD)" > $SEEN'


async def test_the_record_is_written_before_the_file_goes_and_dropped_once_it_stands(
    tmp_path: Path,
) -> None:
    removed, dest, record = await _unroute(tmp_path, SEES)

    assert removed and not dest.exists()
    assert (tmp_path / "seen").read_text() == "file=n record=1\n"  # during the check
    assert not record.exists() and pending(tmp_path / "state") == []


async def test_a_check_that_fails_without_the_file_puts_it_back_and_drops_the_record(
    tmp_path: Path,
) -> None:
    removed, dest, record = await _unroute(tmp_path, f"{SEES}; exit 1")

    assert not removed
    assert dest.read_text() == "upstream gone { server 127.0.0.1:41234; }\n"
    assert (tmp_path / "seen").read_text() == "file=n record=1\n"
    assert not record.exists() and pending(tmp_path / "state") == []
