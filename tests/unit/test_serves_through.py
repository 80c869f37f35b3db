"""Supervisor._serves_through: whether another program serves through a proxy file, compared
as handovers compare it (``proxy_file.same_file``), so that a renamed program's failed first
reload restores the file of the one still serving instead of being retried forever."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from flipvisor.supervisor import Supervisor


def supervising(**dests: Path | None) -> SimpleNamespace:
    """What ``_serves_through`` reads of a supervisor: its programs, each serving a generation
    whose config has that ``proxy.dest`` (None: no proxy)."""
    programs = {
        name: SimpleNamespace(
            name=name,
            serving=SimpleNamespace(
                config=SimpleNamespace(proxy=None if dest is None else SimpleNamespace(dest=dest))
            ),
        )
        for name, dest in dests.items()
    }
    return SimpleNamespace(programs=programs)


def test_another_spelling_of_the_file_is_served_through(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "link").symlink_to(out)
    held = supervising(web=out / "up.conf", other=None)
    for spelling in (
        out / "up.conf",
        out / ".." / "out" / "up.conf",
        tmp_path / "link" / "up.conf",
    ):
        assert Supervisor._serves_through(held, "site", spelling), spelling  # type: ignore[arg-type]


def test_its_own_file_or_another_file_is_not(tmp_path: Path) -> None:
    held = supervising(web=tmp_path / "up.conf")
    assert not Supervisor._serves_through(held, "web", tmp_path / "up.conf")  # type: ignore[arg-type]
    assert not Supervisor._serves_through(held, "site", tmp_path / "other.conf")  # type: ignore[arg-type]
