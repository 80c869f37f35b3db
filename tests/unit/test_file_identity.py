"""A path is removed only while it names the file we made: another process's file put there
since is left alone. Real files."""

from __future__ import annotations

from pathlib import Path

from flipvisor.file_identity import identity_of, unlink_if_ours


def test_our_file_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    path.write_text("")
    assert unlink_if_ours(path, identity_of(path))
    assert not path.exists()
    assert not unlink_if_ours(path, None)  # nothing there, nothing of ours


def test_a_file_put_there_since_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    path.write_text("ours")
    ours = identity_of(path)
    # Ours moved aside, not deleted: its inode stays taken, so theirs cannot reuse the number.
    path.rename(tmp_path / "ours")
    path.write_text("theirs")
    assert identity_of(path) != ours
    assert not unlink_if_ours(path, ours)
    assert path.read_text() == "theirs"
