"""Durable atomic writes (``durable.py``), and the files flipvisor replaces through them: each
write is fsynced and renamed into place, and the folder fsynced after (review: the deploy
history and the run record were renamed into place without an fsync, so a power loss could
leave an empty file where the rename had already reached the disk). Real files in a temporary
folder; the folder's fsync observed at our own seam (``durable.fsync_dir``)."""

from __future__ import annotations

import threading
from pathlib import Path

import anyio
import pytest

from flipvisor import durable
from flipvisor.config import ProgramConfig
from flipvisor.history import History
from flipvisor.registry.local_file import read_registry_file, write_registry_file
from flipvisor.runrecord import RUNTIME_ENV, write_record

V1 = ProgramConfig(command=["app", "--version", "1"], env={"TOKEN": "secret"})


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, int]]:
    """The folders ``durable.write_atomic`` made durable, with the thread that did it."""
    found: list[tuple[Path, int]] = []
    fsync_dir = durable.fsync_dir

    def recorded(directory: Path) -> None:
        found.append((directory, threading.get_ident()))
        fsync_dir(directory)

    monkeypatch.setattr(durable, "fsync_dir", recorded)
    return found


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(
    tmp_path: Path, synced: list[tuple[Path, int]]
) -> None:
    dest = tmp_path / "a.json"
    dest.write_bytes(b"old")
    durable.write_atomic(dest, b"new", 0o600)
    assert dest.read_bytes() == b"new" and dest.stat().st_mode & 0o777 == 0o600
    assert [name.name for name in tmp_path.iterdir()] == ["a.json"]
    assert [folder for folder, _ in synced] == [tmp_path]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    dest = tmp_path / "a.json"
    dest.write_bytes(b"old")

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        durable.write_atomic(dest, b"new", 0o600, prepare=fail)
    assert dest.read_bytes() == b"old"
    assert [name.name for name in tmp_path.iterdir()] == ["a.json"]


def test_torn_temporaries_are_told_by_name() -> None:
    names = [".web.json.abcd_123.tmp", ".web.json.tmp", "web.json", ".x.conf.abcd1234.tmp"]
    torn = durable.torn_temporaries(names, of=lambda name: name.endswith(".json"))
    assert torn == [".web.json.abcd_123.tmp"]


def test_the_deploy_history_is_written_durably_off_the_event_loop(
    tmp_path: Path, synced: list[tuple[Path, int]]
) -> None:
    path = tmp_path / "history" / "web.json"
    history = History(path)

    anyio.run(history.record_deployed, V1)

    assert History(path).current == V1
    assert path.stat().st_mode & 0o777 == 0o600  # its env may hold secrets
    [(folder, thread)] = synced
    assert folder == path.parent and thread != threading.get_ident()


def test_the_deploy_history_folder_is_made_again_if_removed(tmp_path: Path) -> None:
    path = tmp_path / "history" / "web.json"
    History(path).deployed(V1)
    path.unlink()
    path.parent.rmdir()
    History(path).deployed(V1)
    assert History(path).current == V1


def test_the_run_record_is_written_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synced: list[tuple[Path, int]]
) -> None:
    monkeypatch.setenv(RUNTIME_ENV, str(tmp_path / "run"))
    config = tmp_path / "flipvisor.yaml"
    config.write_text("programs: {}\n")
    record = write_record(config, tmp_path / "control.sock")
    assert record.stat().st_mode & 0o777 == 0o600
    assert [folder for folder, _ in synced] == [record.parent]
    assert sorted(p.name for p in record.parent.iterdir()) == [record.name]


def test_the_local_registry_file_is_written_durably(
    tmp_path: Path, synced: list[tuple[Path, int]]
) -> None:
    path = tmp_path / "registry" / "keys.json"
    write_registry_file(path, {"a": "1"})
    assert read_registry_file(path) == {"a": "1"}
    assert path.stat().st_mode & 0o777 == 0o600
    assert [folder for folder, _ in synced] == [path.parent]
