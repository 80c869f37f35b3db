"""The proxy-undo journal (``proxy_journal.py``): what a proxy step replaces, recorded before the
file changes, read back by the next start, and put back only where the file still holds what
the step wrote. Real files in a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from flipvisor.errors import ProxyError
from flipvisor.proxy_file import put_in_place, take_away_now
from flipvisor.proxy_journal import flip_journal, pending, removal_journal

SUPERVISOR = {"pid": 4242, "started": 1.5, "ticks": 99, "boot_id": "b"}


def _flip(state_dir: Path) -> None:
    """Generation 2's file put in place over generation 1's, then "killed": no settle."""
    journal = flip_journal(state_dir, "web", generation=2, port=2002, supervisor=SUPERVISOR)
    put_in_place(state_dir.parent / "web.conf", b"server 127.0.0.1:2002;\n", journal)


def test_a_record_left_puts_the_previous_file_back_with_its_mode(tmp_path: Path) -> None:
    dest = tmp_path / "web.conf"
    dest.write_bytes(b"server 127.0.0.1:2001;\n")
    dest.chmod(0o640)
    _flip(tmp_path / "state")
    assert dest.read_bytes() == b"server 127.0.0.1:2002;\n"

    [left] = pending(tmp_path / "state")
    outcome = left.put_back()

    assert dest.read_bytes() == b"server 127.0.0.1:2001;\n"
    assert dest.stat().st_mode & 0o777 == 0o640
    assert outcome.settled and not outcome.left_alone, outcome
    left.forget()
    assert pending(tmp_path / "state") == []


def test_a_file_edited_by_hand_since_is_left_alone(tmp_path: Path) -> None:
    dest = tmp_path / "web.conf"
    dest.write_bytes(b"server 127.0.0.1:2001;\n")
    _flip(tmp_path / "state")
    dest.write_bytes(b"server 127.0.0.1:9999; # the operator's\n")

    [left] = pending(tmp_path / "state")
    outcome = left.put_back()

    assert dest.read_bytes() == b"server 127.0.0.1:9999; # the operator's\n"
    assert outcome.left_alone and outcome.settled
    assert "left as it is" in outcome.done[0]


def test_a_file_that_was_not_there_is_removed_again(tmp_path: Path) -> None:
    dest = tmp_path / "web.conf"
    _flip(tmp_path / "state")

    [left] = pending(tmp_path / "state")
    left.put_back()

    assert not dest.exists()


def test_a_removal_left_unfinished_puts_the_file_back(tmp_path: Path) -> None:
    dest = tmp_path / "gone.conf"
    dest.write_bytes(b"upstream gone {}\n")
    take_away_now(dest, removal_journal(tmp_path / "state", "gone"))
    assert not dest.exists()

    [left] = pending(tmp_path / "state")
    assert left.kind == "removal" and not left.promoted_by(None)
    left.put_back()

    assert dest.read_bytes() == b"upstream gone {}\n"


def test_the_flip_counts_as_promoted_only_if_the_record_names_its_generation(
    tmp_path: Path,
) -> None:
    (tmp_path / "web.conf").write_bytes(b"old\n")
    _flip(tmp_path / "state")
    [left] = pending(tmp_path / "state")

    def record(generation: int, port: int, supervisor: dict[str, object]) -> str:
        return json.dumps({"generation": generation, "port": port, "supervisor": supervisor})

    assert left.promoted_by(record(2, 2002, SUPERVISOR))
    assert not left.promoted_by(record(1, 2001, SUPERVISOR))  # the keys name the old one
    assert not left.promoted_by(record(2, 2002, {**SUPERVISOR, "ticks": 7}))  # another run's
    assert not left.promoted_by(None)
    assert not left.promoted_by("{ not json")


def test_settle_removes_the_record(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    journal = flip_journal(state_dir, "web", generation=2, port=2002, supervisor=SUPERVISOR)
    put_in_place(tmp_path / "web.conf", b"new\n", journal)
    assert (state_dir / "proxy-undo" / "web.json").stat().st_mode & 0o777 == 0o600

    anyio.run(journal.settle)

    assert pending(state_dir) == []


def test_a_record_that_cannot_be_read_is_set_aside_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A torn or hand-edited record: ignored with a warning, and renamed `.bad` (kept for the
    operator) so that the next start does not say it again (review)."""
    state_dir = tmp_path / "state"
    _flip(state_dir)
    [record] = (state_dir / "proxy-undo").glob("*.json")
    record.write_text("{")

    assert pending(state_dir) == []
    assert f"{record}.bad" in caplog.text
    assert record.with_name(f"{record.name}.bad").read_text() == "{"
    caplog.clear()
    assert pending(state_dir) == []
    assert caplog.text == ""


def test_a_journal_that_cannot_be_written_changes_no_file(tmp_path: Path) -> None:
    """The record comes first: a flip whose record cannot be written fails before the proxy
    file changes (review: untested)."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "proxy-undo").write_text("a file where the records' folder goes")
    dest = tmp_path / "web.conf"
    dest.write_bytes(b"server 127.0.0.1:2001;\n")
    with pytest.raises(ProxyError, match=r"cannot record what .* holds"):
        _flip(state_dir)
    assert dest.read_bytes() == b"server 127.0.0.1:2001;\n"
